//! Issue 15's UEFI end-to-end test (its tests 5 and 3): a UEFI QEMU VM
//! (OVMF, software emulation) whose NIC has no iPXE ROM (virtio-net-pci
//! with `romfile=` empty, so OVMF's own PXE client starts) and two virtual
//! disks, behind an OpenIPMI `ipmi_sim` BMC, is discovered and reimaged by
//! a kiln whose configuration says nothing about TFTP or boot files:
//! - OVMF's PXE gets kiln's DHCP answer and TFTP-loads `snponly.efi`,
//!   which kiln serves from Debian's `ipxe` package by default;
//! - iPXE chains to `/boot/ipxe`, boots the deploy ramdisk, the agent lays
//!   out `lvm_raid1` (an ESP on each disk, GRUB at the removable path of
//!   each, a named NVRAM entry per ESP) and writes the test OS image;
//! - the VM boots its installed OS from disk in UEFI mode and reports
//!   stage 5; the OVMF variable store holds kiln's boot entries;
//! - with the first disk removed, then the second, it still boots.
//!
//! Phase times are printed (BENCHMARKS.md). Runs in a network namespace the
//! test makes; QEMU, ipmi_sim and kiln are stopped by PID.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MAC: &str = "52:54:00:85:00:01";
const BMC: &str = "127.0.0.1:6233";
const BMC_PASSWORD: &str = "e2e-uefi-bmc-pw";
const SERIAL: &str = "KILNUEFI-0001";
const UUID: &str = "4c616200-0000-4000-8000-000000000085";
const DISK_BYTES: u64 = 4 << 30;
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const ROOT_HASH: &str =
    "$6$kilne2esalt$2mWHPCs4bGsb6gk3pKv8fSjMHAgQHNBeL9ZZxVTq5NvtKPSVlQs1HbYFmQHXSx.7WzcG3zeXpO0E6MHkrY0jc.";

/// The chassis hook's QEMU start ([`chassis_script`]): OVMF with this VM's
/// own variable store; the boot order the BMC holds (network first after
/// `bootdev pxe`, else the disks first); a disk whose image file is not
/// there (the test moved it away) is not attached.
fn qemu_start(tap: &str) -> String {
    format!(
        r#"  if [ "$(cat "$D/bootdev" 2>/dev/null)" = pxe ]; then nic=1; d0=2; d1=3; else d0=1; d1=2; nic=3; fi
  disks=
  [ -e "$D/disk1.img" ] && disks="$disks -drive if=none,id=d0,file=$D/disk1.img,format=raw,cache=unsafe -device virtio-blk-pci,drive=d0,serial=kiln-uefi-disk-1,bootindex=$d0"
  [ -e "$D/disk2.img" ] && disks="$disks -drive if=none,id=d1,file=$D/disk2.img,format=raw,cache=unsafe -device virtio-blk-pci,drive=d1,serial=kiln-uefi-disk-2,bootindex=$d1"
  qemu-system-x86_64 -name kiln-uefi-e2e -accel tcg -machine pc,graphics=off -cpu qemu64 -smp 1 -m 1024 \
    -display none -vga none -monitor none -nodefaults -boot strict=on \
    -drive if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE} \
    -drive if=pflash,format=raw,unit=1,file="$D/OVMF_VARS.fd" \
    -smbios type=1,manufacturer=QEMU,product=kiln-uefi-e2e,serial={SERIAL},uuid={UUID} \
    -chardev file,id=ser0,path="$D/console-$n.log" -serial chardev:ser0 \
    -netdev tap,id=n0,ifname={tap},script=no,downscript=no \
    -device virtio-net-pci,netdev=n0,mac={MAC},romfile=,bootindex=$nic \
    $disks -pidfile "$D/qemu.pid" -daemonize 2>>"$D/qemu.log""#
    )
}

impl Lab {
    fn diagnostics(&self) -> String {
        let server = self.server.log_text();
        let tail: Vec<&str> = server.lines().rev().take(60).collect();
        format!(
            "qemu: {}\nBMC actions: {}\nserver log (last lines):\n{}",
            std::fs::read_to_string(self.bmc.join("qemu.log")).unwrap_or_default(),
            std::fs::read_to_string(self.bmc.join("actions.log")).unwrap_or_default(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Waits for `needle` on boot `n`'s console.
    fn wait_console(&self, n: u32, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let text = self.console(n);
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < end,
                "`{needle}` never appeared on boot {n}'s console:\n{text}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Polls `what` every second until it gives `Some`.
    fn until<T>(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let end = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < end,
                "{what}: not within {timeout:?}\nconsole of boot {}:\n{}\n{}",
                self.boots(),
                self.console(self.boots()),
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Powers the VM on with the disks it has now, waits for the test OS
    /// to say it booted, powers it off; that boot's console.
    fn boot_from_disk(&self, why: &str) -> String {
        self.kiln(&["power", "on", "vm1"]);
        let n = self.boots();
        let text = self.wait_console(n, "kiln-test-os: firmware:", Duration::from_secs(300));
        self.kiln(&["power", "off", "vm1"]);
        self.until(&format!("{why}: the VM is off"), Duration::from_secs(30), || {
            (!qemu_running(&self.bmc)).then_some(())
        });
        text
    }
}

/// Whether the OVMF variable store holds `label` (UEFI variables keep a
/// boot entry's description in UTF-16LE).
fn vars_hold(vars: &Path, label: &str) -> bool {
    let bytes = std::fs::read(vars).unwrap();
    let wide: Vec<u8> = label.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    bytes.windows(wide.len()).any(|w| w == wide.as_slice())
}

#[test]
fn a_uefi_vm_without_ipxe_pxe_boots_kilns_ipxe_is_reimaged_and_boots_with_either_disk_gone() {
    require_root_and(&[
        ("qemu-system-x86_64", "qemu-system-x86 ovmf"),
        ("ipmi_sim", "openipmi"),
        ("mkfs.ext4", "e2fsprogs"),
    ]);
    for f in [OVMF_CODE, OVMF_VARS, "/usr/lib/ipxe/snponly.efi"] {
        assert!(Path::new(f).is_file(), "{f} is missing: apt-get install ovmf ipxe");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t0 = Instant::now();

    let artifacts = d.join("artifacts");
    build_ramdisk(&artifacts);
    let image = build_test_os(&artifacts);
    let built = t0.elapsed();

    let ns = Netns::new(format!("ku{}", std::process::id() % 100_000));
    let (bridge, tap) = ("kubr0", "kutap0");
    let _router = ns.bridge_with_tap(bridge, "10.85.0.1/24", tap);
    let data = d.join("data");
    let token = bootstrap_token(&data);
    let config = d.join("kiln.toml");
    // Nothing about TFTP or first-stage files: the defaults must serve
    // OVMF's PXE client.
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"0.0.0.0:7070\"\n\n[api]\nallow_plain_http = true\n\n\
             [boot]\ndiscovery = true\nhttp_base = \"http://10.85.0.1:7070\"\nartifacts = \"{}\"\n\n\
             [bmc]\ndeadline_secs = 20\n\n\
             [dhcp]\nmode = \"full\"\ninterfaces = [\"{bridge}\"]\n\n\
             [[dhcp.subnet]]\nnetwork = \"10.85.0.0/24\"\npool = [\"10.85.0.100\", \"10.85.0.120\"]\n\
             routers = [\"10.85.0.1\"]\nlease_time = 600\n",
            data.display(),
            artifacts.display()
        ),
    )
    .unwrap();
    let server = start_server(&ns.0, &config, d, "DHCP listening");

    let bmc = d.join("bmc");
    std::fs::create_dir_all(&bmc).unwrap();
    for disk in ["disk1.img", "disk2.img"] {
        let f = std::fs::File::create(bmc.join(disk)).unwrap();
        f.set_len(DISK_BYTES).unwrap();
    }
    // This VM's own UEFI variables, from OVMF's empty template.
    std::fs::copy(OVMF_VARS, bmc.join("OVMF_VARS.fd")).unwrap();
    let _sim = start_ipmi_sim(&ns.0, &bmc, BMC, BMC_PASSWORD, &UUID.replace('-', ""), &qemu_start(tap));
    let _vm = VmGuard(bmc.clone());
    let lab = Lab {
        ns,
        token,
        bmc: bmc.clone(),
        server,
    };

    // Enrolled by MAC and BMC.
    lab.kiln(&[
        "machine",
        "add",
        "--hostname",
        "vm1",
        "--mac",
        MAC,
        "--bmc-driver",
        "ipmi",
        "--bmc-address",
        BMC,
        "--bmc-user",
        "admin",
        "--bmc-password",
        BMC_PASSWORD,
    ]);
    lab.kiln(&[
        "os",
        "add",
        "--name",
        "testos",
        "--version",
        "1",
        "--kind",
        "disk-image",
        "--source",
        &image.file,
        "--sha256",
        &image.sha256,
    ]);
    lab.until("ipmi_sim answers", Duration::from_secs(15), || {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.ns.0, KILN, "bmc", "check", "vm1", "-o", "json"])
            .env("KILN_URL", "http://127.0.0.1:7070")
            .env("KILN_TOKEN", &lab.token);
        let out = cmd.output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v[0]["result"]["ok"] == true).then_some(())
    });

    // Discovery (the deploy agent refuses a machine nothing identifies):
    // OVMF's PXE → kiln's TFTP snponly.efi → /boot/ipxe → the agent, which
    // reports and powers off.
    let t = Instant::now();
    lab.kiln(&["machine", "discover", "vm1"]);
    let m = lab.until("vm1 is discovered", Duration::from_secs(400), || {
        let m = lab.json(&["machine", "show", "vm1"]);
        (m["state"] == "ready").then_some(m)
    });
    let discovered = t.elapsed();
    assert_eq!(m["hardware"]["dmi"]["serial"], SERIAL, "{m:#}");
    let pxe = lab.console(1);
    // OVMF's own PXE client (no NIC ROM) was sent snponly.efi, fetched it
    // by TFTP from kiln, and iPXE ran.
    for needle in [">>Start PXE over IPv4", "NBP filename is snponly.efi", "iPXE"] {
        assert!(pxe.contains(needle), "`{needle}` is not on the first console:\n{pxe}");
    }
    lab.until("the agent powers the VM off", Duration::from_secs(60), || {
        (!qemu_running(&bmc)).then_some(())
    });

    // The reimage: the same chain to the deploy ramdisk → the disks → the
    // installed OS → stage 5.
    let t = Instant::now();
    let out = lab.kiln(&[
        "reimage",
        "vm1",
        "--os",
        "testos-1",
        "--layout",
        "lvm_raid1",
        "--root-password-hash",
        ROOT_HASH,
        "-o",
        "json",
    ]);
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = job[0]["job"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{job:#}"))
        .to_string();
    let job = lab.until(&format!("job {id} ends"), Duration::from_secs(900), || {
        let j = lab.json(&["job", "show", &id]);
        let state = j["state"].as_str().unwrap_or_default().to_string();
        matches!(state.as_str(), "succeeded" | "failed" | "cancelled").then_some(j)
    });
    let reimaged = t.elapsed();
    assert_eq!(job["state"], "succeeded", "{job:#}\n{}", lab.diagnostics());
    let console = lab.console(lab.boots());
    for needle in ["kiln-test-os: booted hostname=vm1", "kiln-test-os: firmware: uefi"] {
        assert!(console.contains(needle), "`{needle}` is not on the console:\n{console}");
    }
    let deploy = (1..=lab.boots()).map(|n| lab.console(n)).collect::<String>();
    assert!(
        !deploy.contains("IO charset") && !deploy.contains("no NVRAM boot entry"),
        "the ESP or the NVRAM entry failed:\n{deploy}"
    );
    // kiln's NVRAM entries, one per ESP, in this VM's variable store.
    lab.kiln(&["power", "off", "vm1"]);
    lab.until("the VM is off", Duration::from_secs(30), || {
        (!qemu_running(&bmc)).then_some(())
    });
    for label in ["vm1 (kiln, vda)", "vm1 (kiln, vdb)"] {
        assert!(
            vars_hold(&bmc.join("OVMF_VARS.fd"), label),
            "no NVRAM boot entry `{label}`:\n{deploy}"
        );
    }

    // Issue test 3: either disk gone, it still boots (in UEFI mode).
    let t = Instant::now();
    std::fs::rename(bmc.join("disk1.img"), bmc.join("disk1.away")).unwrap();
    let first_gone = lab.boot_from_disk("disk 1 gone");
    let no_disk1 = t.elapsed();
    std::fs::rename(bmc.join("disk1.away"), bmc.join("disk1.img")).unwrap();
    std::fs::rename(bmc.join("disk2.img"), bmc.join("disk2.away")).unwrap();
    let t = Instant::now();
    let second_gone = lab.boot_from_disk("disk 2 gone");
    let no_disk2 = t.elapsed();
    std::fs::rename(bmc.join("disk2.away"), bmc.join("disk2.img")).unwrap();
    for (what, text) in [("disk 1 gone", &first_gone), ("disk 2 gone", &second_gone)] {
        assert!(
            text.contains("kiln-test-os: firmware: uefi") && text.contains("kiln-test-os: booted hostname=vm1"),
            "{what}:\n{text}"
        );
    }

    eprintln!(
        "uefi e2e timings: ramdisk and test OS built {:.1} s; power-on to discovered (OVMF PXE, TFTP \
         snponly.efi, iPXE, the agent) {:.1} s; reimage start to stage 5 {:.1} s; power-on to booted with disk 1 \
         gone {:.1} s, with disk 2 gone {:.1} s; total {:.1} s",
        built.as_secs_f64(),
        discovered.as_secs_f64(),
        reimaged.as_secs_f64(),
        no_disk1.as_secs_f64(),
        no_disk2.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// The test OS image in `artifacts`: its file name and SHA-256.
struct TestImage {
    file: String,
    sha256: String,
}

/// scripts/make-test-os-image.sh into `artifacts`, next to the ramdisk it
/// takes its kernel and initramfs from.
fn build_test_os(artifacts: &Path) -> TestImage {
    run(Command::new("bash")
        .arg(workspace().join("scripts/make-test-os-image.sh"))
        .arg("--artifacts")
        .arg(artifacts)
        .arg(artifacts));
    let sum = std::fs::read_to_string(artifacts.join("kiln-test-os.ext4.sha256")).unwrap();
    TestImage {
        file: "kiln-test-os.ext4".into(),
        sha256: sum.split_whitespace().next().unwrap().to_string(),
    }
}
