//! Issue 6's end-to-end test: a blank QEMU VM (software emulation) with two
//! virtual disks and an OpenIPMI `ipmi_sim` BMC, enrolled with nothing but
//! its BMC, is discovered, reimaged with `lvm_raid1` from the test OS image
//! (scripts/make-test-os-image.sh), boots it from disk and reports stage 5;
//! reimaged again; PXE-booted by accident (it is sent to its disk, which is
//! left unchanged); and reimaged with a wrong checksum (the job fails and
//! the disks do not boot). A stand-in switch sends LLDP on the bridge, and
//! discovery records the port.
//!
//! Everything is real: kiln's DHCP, TFTP-less HTTP boot through the VM's
//! own iPXE ROM, the ramdisk `kiln ramdisk build` makes, the agent's
//! layout commands, GRUB. The phase timings are printed (BENCHMARKS.md).
//! Runs in a network namespace the test makes; QEMU, ipmi_sim and kiln
//! are stopped by PID.

mod common;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const MAC: &str = "52:54:00:82:00:01";
const BMC: &str = "127.0.0.1:6232";
const BMC_PASSWORD: &str = "e2e-reimage-bmc-pw";
const SERIAL: &str = "KILNE2E-0001";
/// The VM's SMBIOS UUID, and the GUID ipmi_sim gives (in the plain
/// byte order it uses, which kiln reads).
const UUID: &str = "4c616200-0000-4000-8000-000000000082";
const DISK_BYTES: u64 = 4 << 30;
const ROOT_HASH: &str =
    "$6$kilne2esalt$2mWHPCs4bGsb6gk3pKv8fSjMHAgQHNBeL9ZZxVTq5NvtKPSVlQs1HbYFmQHXSx.7WzcG3zeXpO0E6MHkrY0jc.";

/// The chassis hook's QEMU start ([`chassis_script`]): the boot order the
/// BMC holds (network first after `bootdev pxe`, else the disks first and
/// the network last, as servers usually are); each power-on writes its own
/// console file.
fn qemu_start(tap: &str) -> String {
    format!(
        r#"  if [ "$(cat "$D/bootdev" 2>/dev/null)" = pxe ]; then nic=1; d0=2; d1=3; else d0=1; d1=2; nic=3; fi
  qemu-system-x86_64 -name kiln-reimage-e2e -accel tcg -machine pc,graphics=off -cpu qemu64 -smp 1 -m 1024 \
    -display none -vga none -monitor none -nodefaults -boot strict=on \
    -smbios type=1,manufacturer=QEMU,product=kiln-e2e,serial={SERIAL},uuid={UUID} \
    -chardev file,id=ser0,path="$D/console-$n.log" -serial chardev:ser0 \
    -netdev tap,id=n0,ifname={tap},script=no,downscript=no -device virtio-net-pci,netdev=n0,mac={MAC},bootindex=$nic \
    -drive if=none,id=d0,file="$D/disk1.img",format=raw,cache=unsafe \
    -device virtio-blk-pci,drive=d0,serial=kiln-e2e-disk-1,bootindex=$d0 \
    -drive if=none,id=d1,file="$D/disk2.img",format=raw,cache=unsafe \
    -device virtio-blk-pci,drive=d1,serial=kiln-e2e-disk-2,bootindex=$d1 \
    -pidfile "$D/qemu.pid" -daemonize 2>>"$D/qemu.log""#
    )
}

fn qemu_running(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("qemu.pid")).is_ok_and(|pid| Path::new(&format!("/proc/{}", pid.trim())).exists())
}

struct Lab {
    ns: Netns,
    token: String,
    bmc: PathBuf,
    server: Proc,
}

impl Lab {
    fn kiln(&self, args: &[&str]) -> std::process::Output {
        kiln(&self.ns.0, &self.token, args)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_slice(&self.kiln(&all).stdout).unwrap()
    }

    fn console(&self, n: u32) -> String {
        strip_ansi(&std::fs::read(self.bmc.join(format!("console-{n}.log"))).unwrap_or_default())
    }

    fn boots(&self) -> u32 {
        std::fs::read_to_string(self.bmc.join("boots"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
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

    /// Runs a reimage and waits for its end; the final job.
    fn reimage(&self, os: &str) -> serde_json::Value {
        let job = self.json(&[
            "reimage",
            "vm1",
            "--os",
            os,
            "--layout",
            "lvm_raid1",
            "--ssh-key",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2Ekilnkilnkilnkilnkilnkilnkilnkilnkilnkiln e2e@kiln",
            "--root-password-hash",
            ROOT_HASH,
        ]);
        let id = job[0]["job"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{job:#}"))
            .to_string();
        self.until(&format!("job {id} ends"), Duration::from_secs(900), || {
            let j = self.json(&["job", "show", &id]);
            let state = j["state"].as_str().unwrap_or_default().to_string();
            matches!(state.as_str(), "succeeded" | "failed" | "cancelled").then_some(j)
        })
    }
}

/// SHA-256 over a sparse file's data extents (with their offsets): what
/// `sha256sum` would tell apart, without reading gigabytes of holes.
fn sparse_hash(path: &Path) -> String {
    use nix::unistd::{Whence, lseek};
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as i64;
    let mut hash = Sha256::new();
    let mut at = 0i64;
    let mut buf = vec![0u8; 1 << 20];
    while at < len {
        let Ok(data) = lseek(file.as_fd(), at, Whence::SeekData) else {
            break;
        };
        let hole = lseek(file.as_fd(), data, Whence::SeekHole).unwrap();
        hash.update(data.to_le_bytes());
        file.seek(SeekFrom::Start(data as u64)).unwrap();
        let mut left = (hole - data) as usize;
        while left > 0 {
            let want = left.min(buf.len());
            let n = file.read(&mut buf[..want]).unwrap();
            assert!(n > 0);
            hash.update(&buf[..n]);
            left -= n;
        }
        at = hole;
    }
    hex::encode(hash.finalize())
}

fn disk_hashes(bmc: &Path) -> [String; 2] {
    [sparse_hash(&bmc.join("disk1.img")), sparse_hash(&bmc.join("disk2.img"))]
}

/// Seconds between two RFC 3339 timestamps.
fn secs_between(a: &str, b: &str) -> f64 {
    let a = chrono::DateTime::parse_from_rfc3339(a).unwrap();
    let b = chrono::DateTime::parse_from_rfc3339(b).unwrap();
    (b - a).num_milliseconds() as f64 / 1000.0
}

/// When job `job` logged stage `n` (its log line's time).
fn stage_at(job: &serde_json::Value, n: u64) -> String {
    job["log"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["stage"].as_u64() == Some(n))
        .and_then(|l| l["at"].as_str())
        .unwrap_or_else(|| panic!("no stage {n} in {job:#}"))
        .to_string()
}

fn stage_message(job: &serde_json::Value, n: u64) -> String {
    job["log"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["stage"].as_u64() == Some(n))
        .and_then(|l| l["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_blank_vm_is_discovered_and_reimaged_through_its_bmc() {
    require_root_and(&[
        ("qemu-system-x86_64", "qemu-system-x86 ipxe-qemu seabios"),
        ("ipmi_sim", "openipmi"),
        ("mkfs.ext4", "e2fsprogs"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The ramdisk and the test OS image, as an operator makes them.
    let artifacts = d.join("artifacts");
    let built = Instant::now();
    build_ramdisk(&artifacts);
    let image = build_test_os(&artifacts);
    eprintln!("ramdisk and test OS built in {:.0?}", built.elapsed());

    let ns = Netns::new(format!("kr{}", std::process::id() % 100_000));
    let (bridge, tap) = ("krbr0", "krtap0");
    let _router = ns.bridge_with_tap(bridge, "10.82.0.1/24", tap);

    let data = d.join("data");
    let token = bootstrap_token(&data);
    let config = d.join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"0.0.0.0:7070\"\n\n\
             [boot]\ndiscovery = true\nhttp_base = \"http://10.82.0.1:7070\"\nartifacts = \"{}\"\n\n\
             [bmc]\ndeadline_secs = 20\n\n\
             [dhcp]\nmode = \"full\"\ninterfaces = [\"{bridge}\"]\n\n\
             [[dhcp.subnet]]\nnetwork = \"10.82.0.0/24\"\npool = [\"10.82.0.100\", \"10.82.0.120\"]\n\
             routers = [\"10.82.0.1\"]\nlease_time = 600\n",
            data.display(),
            artifacts.display()
        ),
    )
    .unwrap();
    let server = start_server(&ns.0, &config, d, "DHCP listening");

    // The BMC: ipmi_sim in the namespace, its chassis hook owning QEMU.
    let bmc = d.join("bmc");
    std::fs::create_dir_all(&bmc).unwrap();
    for disk in ["disk1.img", "disk2.img"] {
        let f = std::fs::File::create(bmc.join(disk)).unwrap();
        f.set_len(DISK_BYTES).unwrap();
    }
    let _sim = start_ipmi_sim(&ns.0, &bmc, BMC, BMC_PASSWORD, &UUID.replace('-', ""), &qemu_start(tap));
    let _vm = VmGuard(bmc.clone());
    let lab = Lab {
        ns,
        token,
        bmc: bmc.clone(),
        server,
    };

    // 1. Enrolled by its BMC only: no MAC, no inventory.
    lab.kiln(&[
        "machine",
        "add",
        "--hostname",
        "vm1",
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
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.ns.0, KILN, "bmc", "check", "vm1", "-o", "json"])
            .env("KILN_URL", "http://127.0.0.1:7070")
            .env("KILN_TOKEN", &lab.token);
        let out = cmd.output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v[0]["result"]["ok"] == true).then_some(())
    });

    // 2. Discovery: kiln powers it on through the BMC; it PXE-boots the
    //    agent, which reports and powers off. A "switch" on the bridge
    //    sends LLDP every second: the agent reports the port it is on.
    let switch_log = d.join("lldp-switch.log");
    let _switch = Proc {
        child: Command::new("ip")
            .args(["netns", "exec", &lab.ns.0, "python3", "-c", &lldp_switch(bridge)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&switch_log).unwrap())
            .spawn()
            .unwrap(),
        log: switch_log,
    };
    let t = Instant::now();
    lab.kiln(&["machine", "discover", "vm1"]);
    let m = lab.until("vm1 is discovered", Duration::from_secs(300), || {
        let m = lab.json(&["machine", "show", "vm1"]);
        (m["state"] == "ready").then_some(m)
    });
    let discovered = t.elapsed();
    let hw = &m["hardware"];
    let disks: Vec<(String, u64)> = hw["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["serial"].as_str().unwrap_or("?").to_string(),
                d["size_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        disks,
        [
            ("kiln-e2e-disk-1".to_string(), DISK_BYTES),
            ("kiln-e2e-disk-2".to_string(), DISK_BYTES)
        ],
        "{m:#}"
    );
    assert_eq!(hw["dmi"]["serial"], SERIAL, "{m:#}");
    assert_eq!(hw["dmi"]["uuid"], UUID, "{m:#}");
    let memory = hw["memory_bytes"].as_u64().unwrap();
    assert!((900 << 20..=1024 << 20).contains(&memory), "1 GiB VM: {memory}");
    assert_eq!(m["nics"][0]["mac"], MAC, "{m:#}");
    assert_eq!(m["nics"][0]["switch"], "asw-e2e", "{m:#}\n{}", lab.console(1));
    assert_eq!(m["nics"][0]["port"], "ge-0/0/21", "{m:#}");
    lab.until("the agent powers the VM off", Duration::from_secs(60), || {
        (!qemu_running(&bmc)).then_some(())
    });
    assert!(
        lab.console(1).contains("kiln-agent: discovered as vm1"),
        "{}",
        lab.console(1)
    );

    // 3. A reimage with lvm_raid1 writes the test image; the VM reboots
    //    from disk into it and reports stage 5.
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
    let t = Instant::now();
    let job = lab.reimage("testos-1");
    let reimaged = t.elapsed();
    assert_eq!(job["state"], "succeeded", "{job:#}\n{}", lab.diagnostics());
    let console = lab.console(lab.boots());
    assert!(console.contains("kiln-test-os: booted"), "{console}");
    assert!(console.contains("hostname=vm1"), "{console}");
    assert!(console.contains("kiln-firstboot: stage 5 reported to"), "{console}");
    assert!(console.contains("md0"), "/boot is an md mirror:\n{console}");
    let m = lab.json(&["machine", "show", "vm1"]);
    assert_eq!(m["state"], "deployed");
    let write_line = stage_message(&job, 2);
    let to_stage_5 = secs_between(&stage_at(&job, 1), &stage_at(&job, 5));

    // 4. A second reimage of the same machine.
    let job2 = lab.reimage("testos-1");
    assert_eq!(job2["state"], "succeeded", "{job2:#}\n{}", lab.diagnostics());
    assert!(lab.console(lab.boots()).contains("kiln-firstboot: stage 5 reported to"));

    // 5. An accidental PXE boot of the deployed machine: kiln sends it to
    //    its disk (GRUB starts), and nothing was written.
    lab.kiln(&["power", "off", "vm1"]);
    let before = disk_hashes(&bmc);
    lab.kiln(&["bootdev", "pxe", "--once", "vm1"]);
    lab.kiln(&["power", "on", "vm1"]);
    let n = lab.boots();
    let text = lab.wait_console(n, "GNU GRUB", Duration::from_secs(120));
    lab.kiln(&["power", "off", "vm1"]);
    assert!(text.contains("kiln: booting from local disk"), "{text}");
    assert_eq!(disk_hashes(&bmc), before, "the disks changed:\n{text}");

    // 6. A wrong checksum: the job fails, and the disks do not boot.
    lab.kiln(&[
        "os",
        "add",
        "--name",
        "testos",
        "--version",
        "bad",
        "--kind",
        "disk-image",
        "--source",
        &image.file,
        "--sha256",
        &"ab".repeat(32),
    ]);
    let bad = lab.reimage("testos-bad");
    assert_eq!(bad["state"], "failed", "{bad:#}");
    let reason = bad["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("writing the image"), "{reason}");
    lab.until("the agent powers the VM off", Duration::from_secs(60), || {
        (!qemu_running(&bmc)).then_some(())
    });
    lab.kiln(&["power", "on", "vm1"]);
    let n = lab.boots();
    lab.wait_console(n, "Booting from Hard Disk", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(20));
    let text = lab.console(n);
    lab.kiln(&["power", "off", "vm1"]);
    assert!(
        !text.contains("GNU GRUB") && !text.contains("kiln-test-os"),
        "a disk written with a bad image booted:\n{text}"
    );

    eprintln!(
        "reimage e2e timings: power-on to discovered {:.1} s; reimage start to stage 5 {:.1} s \
         (stage 1 to 5: {to_stage_5:.1} s); {write_line}",
        discovered.as_secs_f64(),
        reimaged.as_secs_f64()
    );
}

/// A switch's LLDP sender on `bridge` (python3, a raw socket): port
/// `ge-0/0/21` of `asw-e2e`, one frame a second for ten minutes at most.
fn lldp_switch(bridge: &str) -> String {
    let tlv = |kind: u16, value: &[u8]| [((kind << 9) | value.len() as u16).to_be_bytes().as_slice(), value].concat();
    let mut frame = vec![0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e, 0x02, 0, 0, 0, 0, 0x21, 0x88, 0xcc];
    frame.extend(tlv(1, &[4, 0x02, 0, 0, 0, 0, 0x21]));
    frame.extend(tlv(2, &[[5u8].as_slice(), b"ge-0/0/21"].concat()));
    frame.extend(tlv(3, &120u16.to_be_bytes()));
    frame.extend(tlv(5, b"asw-e2e"));
    frame.extend(tlv(0, &[]));
    format!(
        "import socket, time\ns = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\ns.bind(('{bridge}', 0))\n\
         for _ in range(600):\n    s.send(bytes.fromhex('{}'))\n    time.sleep(1)\n",
        hex::encode(frame)
    )
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
