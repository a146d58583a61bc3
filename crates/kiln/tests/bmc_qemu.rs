//! The end-to-end BMC test (issue 4, "Done when"): OpenIPMI's `ipmi_sim`
//! is the BMC of a QEMU VM — its chassis hook starts QEMU on "power on" and
//! kills it on "power off", with the boot order the BMC holds — and the
//! real `kiln` binary drives it over IPMI (RMCP+, cipher suite 3) through
//! the CLI and the API: power on, off and cycle, and "next boot: network",
//! which makes the VM PXE-boot from kiln's own DHCP and HTTP boot, as its
//! serial console shows. Everything runs in a network namespace the test
//! makes and deletes; QEMU, ipmi_sim and kiln are stopped by PID.
//!
//! Recipe: `../shared/lab/` (bmc.sh, bmc-chassis.sh, vm.sh).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MAC: &str = "52:54:00:79:00:01";
const BMC: &str = "127.0.0.1:6230";
const BMC_PASSWORD: &str = "e2e-bmc-pw";

/// The chassis hook's QEMU start ([`chassis_script`]): each power-on
/// writes its own console file (`console-N.log`). With boot device `pxe`
/// the NIC comes first, else the (blank) disk alone: `-boot strict=on`
/// keeps SeaBIOS from falling through to the network.
fn qemu_start(tap: &str) -> String {
    format!(
        r#"  if [ "$(cat "$D/bootdev" 2>/dev/null)" = pxe ]; then nic=",bootindex=1"; disk=",bootindex=2"; else nic=""; disk=",bootindex=1"; fi
  qemu-system-x86_64 -name kiln-bmc-e2e -accel tcg -machine pc,graphics=off -cpu qemu64 -smp 1 -m 256 \
    -display none -vga none -monitor none -nodefaults -boot strict=on \
    -chardev file,id=ser0,path="$D/console-$n.log" -serial chardev:ser0 \
    -netdev tap,id=n0,ifname={tap},script=no,downscript=no -device virtio-net-pci,netdev=n0,mac={MAC}$nic \
    -drive if=none,id=d0,file="$D/disk.img",format=raw -device virtio-blk-pci,drive=d0$disk \
    -pidfile "$D/qemu.pid" -daemonize 2>>"$D/qemu.log""#
    )
}

fn qemu_pid(dir: &Path) -> Option<String> {
    let pid = std::fs::read_to_string(dir.join("qemu.pid")).ok()?;
    let pid = pid.trim().to_string();
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn console(dir: &Path, n: u32) -> String {
    strip_ansi(&std::fs::read(dir.join(format!("console-{n}.log"))).unwrap_or_default())
}

fn wait_console(dir: &Path, n: u32, needle: &str, timeout: Duration, server: &Proc) -> String {
    let end = Instant::now() + timeout;
    loop {
        let text = console(dir, n);
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < end,
            "`{needle}` never appeared on boot {n}'s console:\n{text}\nqemu: {}\nserver log:\n{}",
            std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default(),
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn power_state(ns: &str, token: &str) -> String {
    let out = kiln(ns, token, &["power", "status", "vm1", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["result"]["state"].as_str().unwrap().to_string()
}

#[test]
fn kiln_powers_a_qemu_vm_through_ipmi_sim_and_makes_it_pxe_boot() {
    require_root_and(&[
        ("qemu-system-x86_64", "qemu-system-x86 ipxe-qemu seabios"),
        ("ipmi_sim", "openipmi"),
    ]);
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ns = Netns::new(format!("kb{}", std::process::id() % 100_000));
    let (bridge, tap) = ("kbbr0", "kbtap0");
    let _router = ns.bridge_with_tap(bridge, "10.79.0.1/24", tap);

    // kiln: DHCP and HTTP boot on the bridge, the API on 127.0.0.1:7070.
    let data = d.join("data");
    let token = bootstrap_token(&data);
    let config = d.join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"0.0.0.0:7070\"\n\n[api]\nallow_plain_http = true\n\n[boot]\nhttp_base = \"http://10.79.0.1:7070\"\n\n\
             [bmc]\ndeadline_secs = 20\n\n\
             [dhcp]\nmode = \"full\"\ninterfaces = [\"{bridge}\"]\n\n\
             [[dhcp.subnet]]\nnetwork = \"10.79.0.0/24\"\npool = [\"10.79.0.100\", \"10.79.0.120\"]\n\
             routers = [\"10.79.0.1\"]\nlease_time = 600\n",
            data.display()
        ),
    )
    .unwrap();
    let server = start_server(&ns.0, &config, d, "DHCP listening");

    // The BMC: ipmi_sim inside the namespace, its chassis hook owning QEMU.
    let bmc = d.join("bmc");
    std::fs::create_dir_all(&bmc).unwrap();
    Command::new("truncate")
        .args(["-s", "1M"])
        .arg(bmc.join("disk.img"))
        .status()
        .unwrap();
    let sim = start_ipmi_sim(
        &ns.0,
        &bmc,
        BMC,
        BMC_PASSWORD,
        "4c616200000040008000000000000079",
        &qemu_start(tap),
    );
    let _vm = VmGuard(bmc.clone());

    kiln(
        &ns.0,
        &token,
        &[
            "machine",
            "add",
            "--hostname",
            "vm1",
            "--mac",
            MAC,
            "--ipv4",
            "10.79.0.21",
            "--state",
            "deployed",
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
    // ipmi_sim is up when kiln's check logs in.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.0, KILN, "bmc", "check", "vm1", "-o", "json"])
            .env("KILN_URL", "http://127.0.0.1:7070")
            .env("KILN_TOKEN", &token);
        let out = cmd.output().unwrap();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v[0]["result"]["cipher_suite"], 3, "{v}");
            assert_eq!(v[0]["result"]["power"], "off", "{v}");
            break;
        }
        assert!(Instant::now() < end, "ipmi_sim never answered: {}", sim.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }

    // 1. Boot from disk (a blank one): SeaBIOS tries it and stops; no PXE.
    kiln(&ns.0, &token, &["bootdev", "disk", "vm1"]);
    kiln(&ns.0, &token, &["power", "on", "vm1"]);
    let text = wait_console(&bmc, 1, "No bootable device", Duration::from_secs(30), &server);
    assert!(text.contains("Booting from Hard Disk"), "{text}");
    // (iPXE's ROM prints its banner at every start; it boots only if
    // SeaBIOS gives it the turn, and then it configures the NIC.)
    assert!(
        !text.contains("Configuring") && !text.contains("Booting from ROM"),
        "the network was not tried:\n{text}"
    );
    assert_eq!(power_state(&ns.0, &token), "on");
    let first = qemu_pid(&bmc).expect("QEMU runs");

    // 2. Off: QEMU is gone.
    kiln(&ns.0, &token, &["power", "off", "vm1"]);
    assert!(qemu_pid(&bmc).is_none(), "QEMU {first} still runs after power off");
    assert_eq!(power_state(&ns.0, &token), "off");

    // 3. Next boot: network, through kiln; power on → a real PXE boot from
    //    kiln's DHCP and iPXE script (a deployed machine with no job is
    //    told to boot its disk).
    kiln(&ns.0, &token, &["bootdev", "pxe", "--once", "vm1"]);
    kiln(&ns.0, &token, &["power", "on", "vm1"]);
    let text = wait_console(
        &bmc,
        2,
        "kiln: booting from local disk",
        Duration::from_secs(60),
        &server,
    );
    assert!(text.contains("Configuring (net0"), "{text}");
    assert!(text.contains("10.79.0.21"), "its inventory address:\n{text}");
    assert!(
        server.log_text().contains(&format!("vm1 ({MAC}): ack 10.79.0.21")),
        "{}",
        server.log_text()
    );
    let second = qemu_pid(&bmc).expect("QEMU runs");

    // 4. Cycle: ipmi_sim turns it off, then on again — a new QEMU, a new boot.
    kiln(&ns.0, &token, &["power", "cycle", "vm1"]);
    wait_console(&bmc, 3, "SeaBIOS", Duration::from_secs(20), &server);
    let third = qemu_pid(&bmc).expect("QEMU runs after the cycle");
    assert_ne!(second, third);
    let actions = std::fs::read_to_string(bmc.join("actions.log")).unwrap();
    let sets: Vec<&str> = actions.lines().filter(|l| l.starts_with("set ")).collect();
    assert_eq!(
        sets,
        [
            "set boot default",
            "set power 1",
            "set power 0",
            "set boot pxe",
            "set power 1",
            "set power 0",
            "set power 1"
        ],
        "{actions}"
    );
    kiln(&ns.0, &token, &["power", "off", "vm1"]);
    assert!(qemu_pid(&bmc).is_none());

    // Every action is in the audit log, with its result.
    let out = kiln(
        &ns.0,
        &token,
        &["events", "--target", "vm1", "--action", "bmc.", "-o", "json"],
    );
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let acted: Vec<String> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] != "bmc.check")
        .map(|e| {
            let a = &e["after"];
            format!(
                "{} {} {}",
                a["action"].as_str().or(a["device"].as_str()).unwrap_or("?"),
                a["result"].as_str().unwrap_or("?"),
                e["actor"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let admin = "(admin)";
    assert_eq!(acted.len(), 7, "{acted:?}");
    assert!(
        acted.iter().all(|a| a.contains(" ok ") && a.ends_with(admin)),
        "{acted:?}"
    );
    assert_eq!(acted[0].split(' ').next(), Some("off"));
    assert_eq!(acted[1].split(' ').next(), Some("cycle"));
    let took = started.elapsed();
    eprintln!("end-to-end BMC test took {took:?}");
    drop(sim);
}
