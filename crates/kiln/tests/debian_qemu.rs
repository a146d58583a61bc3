//! Issue 15's test 1: a UEFI (OVMF) QEMU VM, enrolled by its BMC
//! (OpenIPMI's `ipmi_sim`), is discovered and reimaged with a real Debian
//! 12 whole-disk image (scripts/make-debian-image.sh, cached between runs
//! in /var/cache/kiln-test): the agent streams the qcow2 onto the VM's
//! disk, grows the root partition and adds a `CIDATA` NoCloud seed behind
//! it; the VM boots the image from disk in UEFI mode through the image's own
//! GRUB at the removable path; cloud-init runs the user-data kiln serves and
//! kiln's first-boot script reports stage 5 from the new OS.
//!
//! Real pieces throughout: kiln's DHCP and HTTP boot through the VM's own
//! iPXE ROM (EFI), the ramdisk from `kiln ramdisk build`, Debian's kernel,
//! systemd and cloud-init. Phase timings are printed (BENCHMARKS.md). Runs
//! in a network namespace the test makes; QEMU, ipmi_sim and kiln are
//! stopped by PID.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MAC: &str = "52:54:00:82:15:01";
const BMC: &str = "127.0.0.1:6235";
const BMC_PASSWORD: &str = "e2e-debian-bmc-pw";
const SERIAL: &str = "KILNE2E-DEB-0001";
const UUID: &str = "4c616200-0000-4000-8000-000000001501";
const DISK_BYTES: u64 = 4 << 30;
const SUBNET: &str = "10.85.0";

/// The address the new OS must have on the NIC with [`MAC`]: the first of
/// the lab subnet's static range, which the inventory assigns (the test
/// gives no address) and cloud-init applies from kiln's network-config.
/// `None` would accept any address of kiln's DHCP pool.
const EXPECTED_ADDRESS: Option<&str> = Some("10.85.0.20");

/// Which firmware the VM runs: UEFI (OVMF, the default and CI's) or, with
/// `KILN_DEBIAN_FIRMWARE=bios`, SeaBIOS (scripts/debian-e2e.sh runs both).
fn uefi() -> bool {
    std::env::var("KILN_DEBIAN_FIRMWARE").map_or(true, |f| f != "bios")
}

/// The chassis hook's QEMU start: OVMF (UEFI) with its own variable store
/// or SeaBIOS, the BMC's boot order (network first after `bootdev pxe`),
/// one disk.
fn qemu_start(tap: &str) -> String {
    let firmware = if uefi() {
        "-drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \\\n    \
         -drive if=pflash,format=raw,file=\"$D/OVMF_VARS.fd\""
    } else {
        "-bios /usr/share/seabios/bios-256k.bin"
    };
    format!(
        r#"  if [ "$(cat "$D/bootdev" 2>/dev/null)" = pxe ]; then nic=1; d0=2; else d0=1; nic=2; fi
  qemu-system-x86_64 -name kiln-debian-e2e -accel tcg -machine q35,graphics=off -cpu qemu64 -smp 1 -m 1024 \
    -display none -vga none -monitor none -nodefaults -boot strict=on \
    {firmware} \
    -smbios type=1,manufacturer=QEMU,product=kiln-e2e,serial={SERIAL},uuid={UUID} \
    -chardev file,id=ser0,path="$D/console-$n.log" -serial chardev:ser0 \
    -netdev tap,id=n0,ifname={tap},script=no,downscript=no -device virtio-net-pci,netdev=n0,mac={MAC},bootindex=$nic \
    -drive if=none,id=d0,file="$D/disk1.img",format=raw,cache=unsafe,discard=unmap \
    -device virtio-blk-pci,drive=d0,serial=kiln-deb-disk-1,bootindex=$d0 \
    -pidfile "$D/qemu.pid" -daemonize 2>>"$D/qemu.log""#
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
}

/// The Debian image's cache directory (built there first if needed).
fn debian_image() -> PathBuf {
    let out = run(Command::new("bash")
        .arg(workspace().join("scripts/make-debian-image.sh"))
        .arg("--print-dir"));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn stage_line(job: &serde_json::Value, n: u64, key: &str) -> String {
    job["log"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["stage"].as_u64() == Some(n))
        .and_then(|l| l[key].as_str())
        .unwrap_or_else(|| panic!("no stage {n} in {job:#}"))
        .to_string()
}

fn secs_between(a: &str, b: &str) -> f64 {
    let a = chrono::DateTime::parse_from_rfc3339(a).unwrap();
    let b = chrono::DateTime::parse_from_rfc3339(b).unwrap();
    (b - a).num_milliseconds() as f64 / 1000.0
}

/// The IPv4 address cloud-init's network table (`ci-info: | ens… | True |
/// ADDRESS | … | MAC |`) shows on the console for the NIC with `mac`.
fn address_on_console(console: &str, mac: &str) -> Option<String> {
    console
        .lines()
        .filter(|l| l.contains("ci-info:") && l.contains(mac))
        .find_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            cells
                .iter()
                .find(|c| c.split('.').count() == 4 && c.split('.').all(|p| p.parse::<u8>().is_ok()))
                .map(|c| c.to_string())
        })
}

#[test]
fn a_uefi_vm_is_reimaged_with_a_real_debian_whole_disk_image() {
    require_root_and(&[
        ("qemu-system-x86_64", "qemu-system-x86 ipxe-qemu ovmf"),
        ("ipmi_sim", "openipmi"),
        ("mmdebstrap", "mmdebstrap"),
        ("qemu-img", "qemu-utils"),
    ]);
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The ramdisk, and the Debian image served from the artifacts directory.
    let artifacts = d.join("artifacts");
    let t = Instant::now();
    build_ramdisk(&artifacts);
    let ramdisk_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let cache = debian_image();
    let image_secs = t.elapsed().as_secs_f64();
    let served = artifacts.join("debian-12.qcow2");
    if std::fs::hard_link(cache.join("debian-12.qcow2"), &served).is_err() {
        std::fs::copy(cache.join("debian-12.qcow2"), &served).unwrap();
    }
    let sum = std::fs::read_to_string(cache.join("debian-12.qcow2.sha256")).unwrap();
    let sha256 = sum.split_whitespace().next().unwrap().to_string();
    let image_bytes = std::fs::metadata(&served).unwrap().len();
    let raw_bytes = std::fs::metadata(cache.join("debian-12.raw")).unwrap().len();

    let ns = Netns::new(format!("kd{}", std::process::id() % 100_000));
    let (bridge, tap) = ("kdbr0", "kdtap0");
    let _router = ns.bridge_with_tap(bridge, &format!("{SUBNET}.1/24"), tap);
    let data = d.join("data");
    let token = bootstrap_token(&data);
    let config = d.join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"0.0.0.0:7070\"\n\n[api]\nallow_plain_http = true\n\n\
             [boot]\ndiscovery = true\nhttp_base = \"http://{SUBNET}.1:7070\"\nartifacts = \"{}\"\n\n\
             [bmc]\ndeadline_secs = 20\n\n\
             [dhcp]\nmode = \"full\"\ninterfaces = [\"{bridge}\"]\n\n\
             [[dhcp.subnet]]\nnetwork = \"{SUBNET}.0/24\"\npool = [\"{SUBNET}.100\", \"{SUBNET}.120\"]\n\
             routers = [\"{SUBNET}.1\"]\nlease_time = 600\n",
            data.display(),
            artifacts.display()
        ),
    )
    .unwrap();
    let server = start_server(&ns.0, &config, d, "DHCP listening");

    let bmc = d.join("bmc");
    std::fs::create_dir_all(&bmc).unwrap();
    std::fs::File::create(bmc.join("disk1.img"))
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    if uefi() {
        std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", bmc.join("OVMF_VARS.fd")).unwrap();
    }
    let _sim = start_ipmi_sim(&ns.0, &bmc, BMC, BMC_PASSWORD, &UUID.replace('-', ""), &qemu_start(tap));
    let _vm = VmGuard(bmc.clone());
    let lab = Lab {
        ns,
        token,
        bmc: bmc.clone(),
        server,
    };

    lab.kiln(&[
        "machine",
        "add",
        "--hostname",
        "deb1",
        "--bmc-driver",
        "ipmi",
        "--bmc-address",
        BMC,
        "--bmc-user",
        "admin",
        "--bmc-password",
        BMC_PASSWORD,
    ]);
    lab.until("ipmi_sim answers", Duration::from_secs(15), || {
        let v = lab.json(&["bmc", "check", "deb1"]);
        (v[0]["result"]["ok"] == true).then_some(())
    });

    // Discovery: the agent under UEFI reports the disk and powers off.
    let t = Instant::now();
    lab.kiln(&["machine", "discover", "deb1"]);
    lab.until("deb1 is discovered", Duration::from_secs(300), || {
        let m = lab.json(&["machine", "show", "deb1"]);
        (m["state"] == "ready").then_some(())
    });
    lab.until("the agent powers the VM off", Duration::from_secs(60), || {
        (!qemu_running(&bmc)).then_some(())
    });
    let discovered = t.elapsed().as_secs_f64();

    // The image: whole-disk, qcow2 (declared, and checked by the agent
    // against the file's magic). A RAID layout is refused at validation.
    let added = lab.json(&[
        "os",
        "add",
        "--name",
        "debian",
        "--version",
        "12",
        "--kind",
        "disk-image",
        "--content",
        "whole-disk",
        "--format",
        "qcow2",
        "--source",
        "debian-12.qcow2",
        "--sha256",
        &sha256,
    ]);
    assert_eq!(added["content"], "whole-disk", "{added:#}");
    assert_eq!(added["format"], "qcow2", "{added:#}");
    let refused = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns.0,
            KILN,
            "reimage",
            "deb1",
            "--os",
            "debian-12",
            "--layout",
            "lvm_raid1",
        ])
        .env("KILN_URL", "http://127.0.0.1:7070")
        .env("KILN_TOKEN", &lab.token)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr).into_owned() + &String::from_utf8_lossy(&refused.stdout);
    assert!(
        !refused.status.success() && said.contains("`flat` layout only"),
        "a whole-disk image with lvm_raid1 must be refused: {said}"
    );

    // Network from the inventory: a subnet whose static range is clear of
    // kiln's DHCP pool, and deb1's NIC by MAC with the next free address.
    lab.kiln(&[
        "subnet",
        "add",
        "lab",
        "--prefix",
        &format!("{SUBNET}.0/24"),
        "--gateway",
        &format!("{SUBNET}.1"),
        "--static",
        &format!("{SUBNET}.20-{SUBNET}.40"),
    ]);
    let net_file = d.join("deb1-network.yaml");
    std::fs::write(
        &net_file,
        format!("interfaces:\n  - {{name: lan0, mac: \"{MAC}\", addresses: [{{subnet: lab, default_route: true}}]}}\n"),
    )
    .unwrap();
    lab.kiln(&["network", "set", "deb1", "--file", net_file.to_str().unwrap()]);

    let t = Instant::now();
    let out = lab.kiln(&["reimage", "deb1", "--os", "debian-12", "--layout", "flat", "-o", "json"]);
    let job: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let id = job[0]["job"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{job:#}"))
        .to_string();
    let job = lab.until(&format!("job {id} ends"), Duration::from_secs(1200), || {
        let j = lab.json(&["job", "show", &id]);
        let state = j["state"].as_str().unwrap_or_default().to_string();
        matches!(state.as_str(), "succeeded" | "failed" | "cancelled").then_some(j)
    });
    let reimaged = t.elapsed().as_secs_f64();
    assert_eq!(job["state"], "succeeded", "{job:#}\n{}", lab.diagnostics());

    // The agent's side: the image on the disk, grown, CIDATA behind it.
    let written = stage_line(&job, 2, "message");
    assert!(
        written.contains("sha256 checked") && written.contains("qcow2"),
        "{written}"
    );
    let configured = stage_line(&job, 3, "message");
    assert!(
        configured.contains("grown") && configured.contains("CIDATA"),
        "{configured}"
    );

    // The new OS: booted in UEFI mode, by the image's own GRUB, cloud-init
    // ran kiln's user-data, and stage 5 came from it.
    let console = lab.console(lab.boots());
    assert_eq!(
        console.contains("efi: EFI v"),
        uefi(),
        "not booted in the VM's firmware mode:\n{console}"
    );
    assert!(console.contains("Debian GNU/Linux 12"), "{console}");
    assert!(console.contains("root=UUID="), "{console}");
    assert!(console.contains("Cloud-init v."), "{console}");
    let address = address_on_console(&console, MAC)
        .unwrap_or_else(|| panic!("cloud-init shows no address for {MAC}:\n{console}"));
    match EXPECTED_ADDRESS {
        Some(want) => assert_eq!(address, want, "the new OS's address on {MAC}"),
        None => {
            let host: u8 = address.strip_prefix(&format!("{SUBNET}.")).unwrap().parse().unwrap();
            assert!((100..=120).contains(&host), "{address} is not from kiln's pool");
        }
    }
    let m = lab.json(&["machine", "show", "deb1"]);
    assert_eq!(m["state"], "deployed", "{m:#}");

    let at = |n| stage_line(&job, n, "at");
    let created = job["created_at"].as_str().unwrap_or_default().to_string();
    eprintln!(
        "debian e2e timings ({}): ramdisk {ramdisk_secs:.1} s, Debian image {image_secs:.1} s (cached or \
         built); power-on to discovered {discovered:.1} s; reimage start to stage 5 {reimaged:.1} s: to stage 1 \
         (ramdisk boot) {:.1} s, stage 1 to 2 (image) {:.1} s, 2 to 4 {:.1} s, 4 to 5 (Debian boot, \
         cloud-init) {:.1} s; image {image_bytes} bytes qcow2, {raw_bytes} bytes written; {written}; \
         {configured}; address {address}; whole test {:.1} s",
        if uefi() { "UEFI" } else { "BIOS" },
        if created.is_empty() {
            f64::NAN
        } else {
            secs_between(&created, &at(1))
        },
        secs_between(&at(1), &at(2)),
        secs_between(&at(2), &at(4)),
        secs_between(&at(4), &at(5)),
        started.elapsed().as_secs_f64()
    );
}
