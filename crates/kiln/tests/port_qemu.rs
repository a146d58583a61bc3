//! Issue 15's test 2 (seed 000): a QEMU VM enrolled by its switch port
//! only — no MAC anywhere, only the circuit-id ISC `dhcrelay -a` adds for
//! the relay's client-facing interface, and its BMC — on another subnet
//! behind the relay, is discovered and then reimaged (test OS image,
//! `flat` on one disk); kiln learned its MAC from the first relayed
//! request, and HTTP boot, discovery, the deploy plan's identity check and
//! the new OS all went by it.
//!
//! ```text
//!  server ns: kiln, ipmi_sim          relay ns: dhcrelay, bridge, the VM
//!  kps0 10.84.1.1/24 ──veth── kpr1 10.84.1.2/24 │ kpbr0 10.84.2.1/24 ── kptap0 ── QEMU
//! ```
//!
//! QEMU runs in the relay's namespace (the BMC's chassis hook starts it
//! there); everything is stopped by PID and the namespaces are deleted.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MAC: &str = "52:54:00:84:00:01";
const BMC: &str = "127.0.0.1:6233";
const BMC_PASSWORD: &str = "e2e-port-bmc-pw";
const SERIAL: &str = "KILNE2E-PORT-1";
const UUID: &str = "4c616200-0000-4000-8000-000000000084";
const DISK_BYTES: u64 = 4 << 30;
/// The relay's interface toward the VM: `dhcrelay -a` sends its name as the
/// circuit-id, so it is the switch port the machine is enrolled on.
const BRIDGE: &str = "kpbr0";
const TAP: &str = "kptap0";

/// The chassis hook's QEMU start: network first after `bootdev pxe`, else
/// the disk; in the relay's namespace `relay_ns`.
fn qemu_start(relay_ns: &str) -> String {
    format!(
        r#"  if [ "$(cat "$D/bootdev" 2>/dev/null)" = pxe ]; then nic=1; d0=2; else d0=1; nic=2; fi
  ip netns exec {relay_ns} qemu-system-x86_64 -name kiln-port-e2e -accel tcg -machine pc,graphics=off -cpu qemu64 \
    -smp 1 -m 1024 -display none -vga none -monitor none -nodefaults -boot strict=on \
    -smbios type=1,manufacturer=QEMU,product=kiln-e2e,serial={SERIAL},uuid={UUID} \
    -chardev file,id=ser0,path="$D/console-$n.log" -serial chardev:ser0 \
    -netdev tap,id=n0,ifname={TAP},script=no,downscript=no -device virtio-net-pci,netdev=n0,mac={MAC},bootindex=$nic \
    -drive if=none,id=d0,file="$D/disk1.img",format=raw,cache=unsafe \
    -device virtio-blk-pci,drive=d0,serial=kiln-port-disk-1,bootindex=$d0 \
    -pidfile "$D/qemu.pid" -daemonize 2>>"$D/qemu.log""#
    )
}

fn qemu_running(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("qemu.pid")).is_ok_and(|pid| Path::new(&format!("/proc/{}", pid.trim())).exists())
}

fn console(bmc: &Path) -> String {
    let n = std::fs::read_to_string(bmc.join("boots")).unwrap_or_default();
    strip_ansi(&std::fs::read(bmc.join(format!("console-{}.log", n.trim()))).unwrap_or_default())
}

fn json(ns: &str, token: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_slice(&kiln(ns, token, &all).stdout).unwrap()
}

#[test]
fn a_machine_enrolled_by_switch_port_behind_a_relay_is_discovered_and_reimaged() {
    require_root_and(&[
        ("qemu-system-x86_64", "qemu-system-x86 ipxe-qemu seabios"),
        ("ipmi_sim", "openipmi"),
        ("dhcrelay", "isc-dhcp-relay"),
        ("mkfs.ext4", "e2fsprogs"),
    ]);
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let artifacts = d.join("artifacts");
    build_ramdisk(&artifacts);
    let image = build_test_os(&artifacts);
    let built = started.elapsed();

    let tag = std::process::id() % 100_000;
    let server_ns = Netns::new(format!("kp{tag}s"));
    let relay_ns = Netns::new(format!("kp{tag}r"));
    let (s0, r1) = ("kps0", "kpr1");
    ip(&[
        "link",
        "add",
        &format!("{s0}{tag}"),
        "type",
        "veth",
        "peer",
        "name",
        &format!("{r1}{tag}"),
    ]);
    for (dev, ns) in [(s0, &server_ns), (r1, &relay_ns)] {
        ip(&["link", "set", &format!("{dev}{tag}"), "netns", &ns.0, "name", dev]);
        ip(&["-n", &ns.0, "link", "set", dev, "up"]);
    }
    ip(&["-n", &server_ns.0, "addr", "add", "10.84.1.1/24", "dev", s0]);
    ip(&["-n", &server_ns.0, "route", "add", "10.84.2.0/24", "via", "10.84.1.2"]);
    ip(&["-n", &relay_ns.0, "addr", "add", "10.84.1.2/24", "dev", r1]);
    run(Command::new("ip").args(["netns", "exec", &relay_ns.0, "sysctl", "-qw", "net.ipv4.ip_forward=1"]));
    let _router = relay_ns.bridge_with_tap(BRIDGE, "10.84.2.1/24", TAP);

    let data = d.join("data");
    let token = bootstrap_token(&data);
    let config = d.join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"0.0.0.0:7070\"\n\n[api]\nallow_plain_http = true\n\n\
             [boot]\ndiscovery = true\nhttp_base = \"http://10.84.1.1:7070\"\nartifacts = \"{}\"\n\n\
             [bmc]\ndeadline_secs = 20\n\n\
             [dhcp]\nmode = \"full\"\ninterfaces = [\"{s0}\"]\n\n\
             [[dhcp.subnet]]\nnetwork = \"10.84.1.0/24\"\n\n\
             [[dhcp.subnet]]\nnetwork = \"10.84.2.0/24\"\npool = [\"10.84.2.100\", \"10.84.2.120\"]\n\
             routers = [\"10.84.2.1\"]\nlease_time = 600\n",
            data.display(),
            artifacts.display()
        ),
    )
    .unwrap();
    let server = start_server(&server_ns.0, &config, d, "DHCP listening");
    let relay_log = d.join("dhcrelay.log");
    let relay = Proc {
        child: Command::new("ip")
            .args([
                "netns",
                "exec",
                &relay_ns.0,
                "dhcrelay",
                "-4",
                "-d",
                "--no-pid",
                "-a",
                "-id",
                BRIDGE,
                "-iu",
                r1,
                "10.84.1.1",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&relay_log).unwrap())
            .spawn()
            .unwrap(),
        log: relay_log,
    };
    relay.wait_for("Sending on", Duration::from_secs(10));

    let bmc = d.join("bmc");
    std::fs::create_dir_all(&bmc).unwrap();
    std::fs::File::create(bmc.join("disk1.img"))
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let _sim = start_ipmi_sim(
        &server_ns.0,
        &bmc,
        BMC,
        BMC_PASSWORD,
        &UUID.replace('-', ""),
        &qemu_start(&relay_ns.0),
    );
    let _vm = VmGuard(bmc.clone());
    let ns = server_ns.0.as_str();
    let diagnostics = || {
        format!(
            "console:\n{}\nqemu: {}\ndhcrelay:\n{}\nserver log (last lines):\n{}",
            console(&bmc),
            std::fs::read_to_string(bmc.join("qemu.log")).unwrap_or_default(),
            relay.log_text(),
            server
                .log_text()
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    let until = |what: &str, timeout: Duration, f: &mut dyn FnMut() -> bool| {
        let end = Instant::now() + timeout;
        while !f() {
            assert!(
                Instant::now() < end,
                "{what}: not within {timeout:?}\n{}",
                diagnostics()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    };

    // Enrolled by its cabling and its BMC: no MAC.
    kiln(
        ns,
        &token,
        &[
            "machine",
            "add",
            "--hostname",
            "vm2",
            "--circuit-id",
            BRIDGE,
            "--bmc-driver",
            "ipmi",
            "--bmc-address",
            BMC,
            "--bmc-user",
            "admin",
            "--bmc-password",
            BMC_PASSWORD,
        ],
    );
    let m = json(ns, &token, &["machine", "show", "vm2"]);
    assert!(m["nics"][0].get("mac").is_none(), "{m:#}");
    until("ipmi_sim answers", Duration::from_secs(15), &mut || {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, KILN, "bmc", "check", "vm2", "-o", "json"])
            .env("KILN_URL", "http://127.0.0.1:7070")
            .env("KILN_TOKEN", &token)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|v| v[0]["result"]["ok"] == true)
    });

    // Discovery: the first relayed request teaches kiln the MAC; the
    // agent's report, by that MAC, completes the machine.
    let t = Instant::now();
    kiln(ns, &token, &["machine", "discover", "vm2"]);
    until("vm2 is discovered", Duration::from_secs(300), &mut || {
        json(ns, &token, &["machine", "show", "vm2"])["state"] == "ready"
    });
    let discovered = t.elapsed();
    let m = json(ns, &token, &["machine", "show", "vm2"]);
    assert_eq!(
        m["nics"].as_array().unwrap().len(),
        1,
        "one NIC, the learned one: {m:#}"
    );
    assert_eq!(m["nics"][0]["mac"], MAC, "learned: {m:#}");
    assert_eq!(m["nics"][0]["circuit_id"], BRIDGE, "{m:#}");
    assert_eq!(m["hardware"]["dmi"]["serial"], SERIAL, "{m:#}");
    let log = server.log_text();
    assert!(
        log.contains("learned the MAC of a NIC enrolled by switch port"),
        "{}",
        diagnostics()
    );
    let events = json(ns, &token, &["events", "--target", "vm2"]);
    let learned: Vec<&serde_json::Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "machine.port_learned")
        .collect();
    assert_eq!(learned.len(), 1, "learned once: {events:#}");
    assert!(
        learned[0]["actor"]
            .as_str()
            .unwrap()
            .contains(&format!("circuit-id {BRIDGE}")),
        "{events:#}"
    );
    until("the agent powers the VM off", Duration::from_secs(60), &mut || {
        !qemu_running(&bmc)
    });

    // The reimage: the deploy plan names the learned MAC, the agent finds
    // it on the VM's NIC and writes; the VM boots the disk, stage 5.
    kiln(
        ns,
        &token,
        &[
            "os",
            "add",
            "--name",
            "testos",
            "--version",
            "1",
            "--kind",
            "disk-image",
            "--source",
            &image.0,
            "--sha256",
            &image.1,
        ],
    );
    let t = Instant::now();
    let out = json(ns, &token, &["reimage", "vm2", "--os", "testos-1", "--layout", "flat"]);
    let id = out[0]["job"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{out:#}"))
        .to_string();
    let mut job = serde_json::Value::Null;
    until("the reimage ends", Duration::from_secs(600), &mut || {
        job = json(ns, &token, &["job", "show", &id]);
        matches!(job["state"].as_str(), Some("succeeded" | "failed" | "cancelled"))
    });
    let reimaged = t.elapsed();
    assert_eq!(job["state"], "succeeded", "{job:#}\n{}", diagnostics());
    let deploy_boot = std::fs::read_to_string(bmc.join("console-2.log")).unwrap_or_default();
    assert!(
        deploy_boot.contains("the job's machine: ") && deploy_boot.contains(&format!("nic {MAC}")),
        "the agent matched the learned MAC:\n{deploy_boot}"
    );
    let text = console(&bmc);
    assert!(
        text.contains("kiln-test-os: booted") && text.contains("hostname=vm2"),
        "{text}"
    );
    let m = json(ns, &token, &["machine", "show", "vm2"]);
    assert_eq!(m["state"], "deployed");
    assert_eq!(m["nics"][0]["mac"], MAC, "still on record: {m:#}");
    assert!(m.get("port_alert").is_none(), "{m:#}");
    kiln(ns, &token, &["power", "off", "vm2"]);

    eprintln!(
        "port e2e timings: ramdisk and test OS built {:.1} s; discover (power-on to ready) {:.1} s; \
         reimage (flat, start to stage 5) {:.1} s; whole test {:.1} s",
        built.as_secs_f64(),
        discovered.as_secs_f64(),
        reimaged.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(relay);
    drop(server);
}

/// The test OS image (scripts/make-test-os-image.sh) in `artifacts`: its
/// file name and SHA-256.
fn build_test_os(artifacts: &Path) -> (String, String) {
    run(Command::new("bash")
        .arg(workspace().join("scripts/make-test-os-image.sh"))
        .arg("--artifacts")
        .arg(artifacts)
        .arg(artifacts));
    let sum = std::fs::read_to_string(artifacts.join("kiln-test-os.ext4.sha256")).unwrap();
    (
        "kiln-test-os.ext4".into(),
        sum.split_whitespace().next().unwrap().to_string(),
    )
}
