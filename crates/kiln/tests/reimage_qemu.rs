//! Issue 6's end-to-end test: a blank QEMU VM (software emulation) with two
//! virtual disks and an OpenIPMI `ipmi_sim` BMC, enrolled with nothing but
//! its BMC, is discovered, reimaged with `lvm_raid1` from the test OS image
//! (scripts/make-test-os-image.sh), boots it from disk and reports stage 5;
//! reimaged again by its tenant (issue 14) with a post-install script that
//! would leave a canary file on the kiln server and a callback URL on the
//! tenant's own network: the script runs in the new OS (cloud-init's
//! `runcmd`), stage 5 carries its exit status and output, the callback
//! comes from the VM's address, and the server gets no canary and starts no
//! process; PXE-booted by accident (it is sent to its disk, which is left
//! unchanged); and reimaged with a wrong checksum (the job fails and the
//! disks do not boot). A stand-in switch sends LLDP on the bridge, and
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

impl Lab {
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
        self.reimage_as(&self.token, os, &[])
    }

    /// Runs a reimage with `token` (an admin's or a tenant's) and `extra`
    /// arguments, and waits for its end (followed with the admin token);
    /// the final job.
    fn reimage_as(&self, token: &str, os: &str, extra: &[&str]) -> serde_json::Value {
        let mut args = vec![
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
        ];
        args.extend(extra);
        args.extend(["-o", "json"]);
        let out = kiln(&self.ns.0, token, &args);
        let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
            "data_dir = \"{}\"\nlisten = \"0.0.0.0:7070\"\n\n[api]\nallow_plain_http = true\n\n[outbound]\nallow = [\"10.83.0.0/24\"]\n\n\
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

    // 4. The machine's tenant reimages it (issue 14), with a script that
    //    would leave a canary file on the kiln server and a callback to the
    //    tenant's own listener, on another network. Both must come from the
    //    new OS (cloud-init's runcmd runs kiln's first-boot script there);
    //    the server starts no process for them.
    let tenant = tenant_reimage(&lab, d);

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
         (stage 1 to 5: {to_stage_5:.1} s); {write_line}; tenant's reimage start to stage 5 {:.1} s, \
         its stage 5 to callback {:.1} s",
        discovered.as_secs_f64(),
        reimaged.as_secs_f64(),
        tenant.reimaged.as_secs_f64(),
        tenant.to_callback
    );
}

/// The tenant's network, 10.83.0.0/24, where its callback listener runs:
/// namespace `{lab ns}-cb` behind a veth from the lab's namespace, which
/// routes between it and the VMs' bridge. The listener's address is not
/// one of the kiln server's.
const TENANT_ROUTER: &str = "10.83.0.1";
const TENANT_LISTENER: &str = "10.83.0.2";
const TENANT_PORT: u16 = 8080;
/// What the tenant's script exits with, and so what stage 5 and the
/// callback must carry.
const SCRIPT_EXIT: u64 = 7;

/// How long the tenant's reimage took.
struct TenantPhase {
    /// From the reimage request to the job's end (stage 5 included).
    reimaged: Duration,
    /// Seconds from stage 5 in the job to the callback's arrival.
    to_callback: f64,
}

/// Step 4: a tenant token reimages the tenant's machine with a
/// post-install script and a callback URL; everything the request carried
/// runs in the new OS, nothing on the server.
fn tenant_reimage(lab: &Lab, d: &Path) -> TenantPhase {
    let pid = std::process::id();
    let canary = PathBuf::from(format!("/tmp/kiln-e2e-canary-{pid}"));
    let _ = std::fs::remove_file(&canary);
    let marker = format!("kiln-e2e-marker-{pid}");
    // `sleep 1`: were the script run on the server, the process watch below
    // would see it, not only its canary.
    let script = d.join("tenant-post-install.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ntouch {}\necho \"{marker} on $(hostname)\"\nsleep 1\nexit {SCRIPT_EXIT}\n",
            canary.display()
        ),
    )
    .unwrap();

    let cb_ns = Netns::new(format!("{}-cb", lab.ns.0));
    let (veth, peer) = ("krcb0", "krcb1");
    ip(&[
        "-n", &lab.ns.0, "link", "add", veth, "type", "veth", "peer", "name", peer, "netns", &cb_ns.0,
    ]);
    ip(&[
        "-n",
        &lab.ns.0,
        "addr",
        "add",
        &format!("{TENANT_ROUTER}/24"),
        "dev",
        veth,
    ]);
    ip(&["-n", &lab.ns.0, "link", "set", veth, "up"]);
    ip(&[
        "-n",
        &cb_ns.0,
        "addr",
        "add",
        &format!("{TENANT_LISTENER}/24"),
        "dev",
        peer,
    ]);
    ip(&["-n", &cb_ns.0, "link", "set", peer, "up"]);
    ip(&["-n", &cb_ns.0, "route", "add", "default", "via", TENANT_ROUTER]);
    // The VM's default route is the lab's bridge address (DHCP `routers`).
    run(Command::new("ip").args(["netns", "exec", &lab.ns.0, "sysctl", "-qw", "net.ipv4.ip_forward=1"]));
    let requests = d.join("tenant-callback.log");
    let listener = Proc {
        child: Command::new("ip")
            .args(["netns", "exec", &cb_ns.0, "python3", "-c", &callback_listener()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&requests).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        log: requests,
    };
    listener.wait_for("listening", Duration::from_secs(10));

    kiln(&lab.ns.0, &lab.token, &["tenant", "add", "acme"]);
    kiln(&lab.ns.0, &lab.token, &["machine", "edit", "vm1", "--owner", "acme"]);
    let out = kiln(
        &lab.ns.0,
        &lab.token,
        &[
            "token", "create", "--role", "tenant", "--tenant", "acme", "--name", "acme-e2e",
        ],
    );
    let tenant_token = String::from_utf8(out.stdout).unwrap().trim().to_string();

    // `ip netns exec` execs the server: its PID is the child's.
    let server = lab.server.child.id();
    let comm = std::fs::read_to_string(format!("/proc/{server}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "kiln", "the server's PID is not kiln's");
    let watch = Descendants::watch(server);
    let t = Instant::now();
    let callback_url = format!("http://{TENANT_LISTENER}:{TENANT_PORT}/kiln-callback");
    let job = lab.reimage_as(
        &tenant_token,
        "testos-1",
        &[
            "--post-install-script",
            &script.display().to_string(),
            "--callback-url",
            &callback_url,
        ],
    );
    let reimaged = t.elapsed();
    assert_eq!(job["state"], "succeeded", "{job:#}\n{}", lab.diagnostics());
    let console = lab.wait_console(lab.boots(), "kiln-firstboot: callback called", Duration::from_secs(60));
    let started = watch.stop();
    let id = job["id"].as_str().unwrap();

    // The script ran in the new OS: stage 5 carries its status and output.
    let stage5 = stage_message(&job, 5);
    assert_eq!(
        stage5,
        format!("first boot; post-install script exit {SCRIPT_EXIT}: {marker} on vm1"),
        "{job:#}"
    );
    for needle in [
        "kiln-test-os: runcmd: /var/lib/kiln/firstboot.sh".to_string(),
        format!("kiln-firstboot: post-install script exit {SCRIPT_EXIT}"),
        format!("kiln-firstboot: callback called: {callback_url}"),
    ] {
        assert!(
            console.contains(&needle),
            "`{needle}` is not on the console:\n{console}"
        );
    }
    // Nothing ran on the server: no canary, no child process, no task.
    assert!(
        !canary.exists(),
        "the tenant's script ran on the kiln server: {} exists",
        canary.display()
    );
    assert!(started.is_empty(), "the kiln server started processes: {started:?}");
    let log = serde_json::to_string(&job["log"]).unwrap();
    assert!(!log.contains("post-install task"), "{job:#}");

    // The callback: one POST, from the VM's own address, with the JSON.
    let vm_ip = console
        .lines()
        .find_map(|l| l.strip_prefix("kiln-test-os: network: "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|cidr| cidr.split('/').next())
        .unwrap_or_else(|| panic!("no network line on the console:\n{console}"))
        .to_string();
    let requests: Vec<serde_json::Value> = listener
        .log_text()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    let r = &requests[0];
    assert_eq!(r["method"], "POST", "{r:#}");
    assert_eq!(r["path"], "/kiln-callback", "{r:#}");
    assert!(vm_ip.starts_with("10.82.0."), "{console}");
    assert_eq!(
        r["client"],
        vm_ip.as_str(),
        "the callback came from the VM, not the server: {r:#}"
    );
    assert_eq!(r["content_type"], "application/json", "{r:#}");
    assert!(
        r["authorization"].is_null(),
        "the job token reached the callback: {r:#}"
    );
    let body: serde_json::Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"job_id": id, "hostname": "vm1", "stage": 5, "post_install_exit": SCRIPT_EXIT})
    );
    let stage5_at = chrono::DateTime::parse_from_rfc3339(&stage_at(&job, 5)).unwrap();
    let to_callback = r["at"].as_f64().unwrap() - stage5_at.timestamp_millis() as f64 / 1000.0;
    drop(listener);
    TenantPhase { reimaged, to_callback }
}

/// The tenant's callback listener (python3's http.server): one JSON line
/// per request on stdout — client address, method, path, content type,
/// authorization header, body, arrival (Unix time) — answered 204.
fn callback_listener() -> String {
    format!(
        "import http.server, json, time\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_POST(self):\n\
         \x20       n = int(self.headers.get('Content-Length') or 0)\n\
         \x20       body = self.rfile.read(n).decode('utf-8', 'replace')\n\
         \x20       print(json.dumps({{'client': self.client_address[0], 'method': self.command, 'path': self.path,\n\
         \x20           'content_type': self.headers.get('Content-Type'),\n\
         \x20           'authorization': self.headers.get('Authorization'), 'body': body, 'at': time.time()}}), flush=True)\n\
         \x20       self.send_response(204)\n\
         \x20       self.end_headers()\n\
         \x20   do_GET = do_PUT = do_DELETE = do_POST\n\
         \x20   def log_message(self, *args):\n\
         \x20       pass\n\
         s = http.server.HTTPServer(('{TENANT_LISTENER}', {TENANT_PORT}), H)\n\
         print('listening', flush=True)\n\
         s.serve_forever()\n"
    )
}

/// Every process below a PID (children, their children…) seen while the
/// watch runs: /proc is scanned every 50 ms, so a process that lives less
/// than that may be missed (the canary file covers those).
struct Descendants {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Descendants {
    fn watch(root: u32) -> Descendants {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = std::collections::BTreeMap::new();
            while !flag.load(Ordering::SeqCst) {
                for (pid, cmdline) in descendants(root) {
                    seen.entry(pid).or_insert(cmdline);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen.into_iter().map(|(pid, cmd)| format!("{pid}: {cmd}")).collect()
        });
        Descendants { stop, thread }
    }

    /// Stops the watch: `PID: command line` of each process seen.
    fn stop(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// The processes below `root` now, with their command lines.
fn descendants(root: u32) -> Vec<(u32, String)> {
    let mut parent = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    let below = |mut pid: u32| {
        while let Some(&p) = parent.get(&pid) {
            if p == root {
                return true;
            }
            pid = p;
        }
        false
    };
    parent
        .keys()
        .filter(|&&pid| below(pid))
        .map(|&pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            (pid, String::from_utf8_lossy(&cmd).replace('\0', " ").trim().to_string())
        })
        .collect()
}

/// The watch sees what it is meant to: a child of this test process.
#[test]
fn the_process_watch_sees_a_short_lived_child() {
    let watch = Descendants::watch(std::process::id());
    let mut child = Command::new("sleep").arg("0.3").spawn().unwrap();
    child.wait().unwrap();
    let seen = watch.stop();
    assert!(seen.iter().any(|p| p.ends_with(": sleep 0.3")), "{seen:?}");
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
