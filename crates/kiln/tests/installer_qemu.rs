//! The installer path end to end (issue 6): a reimage with an OS image of
//! kind `installer` whose kernel directory is Debian's netboot installer
//! (`debian-installer-12-netboot-amd64`, copied into kiln's artifacts).
//! The real `kiln` binary runs the job: its power goes through the command
//! BMC driver, a script that starts and stops a QEMU VM (software
//! emulation, SeaBIOS, QEMU's iPXE ROM) on a bridge in a namespace the test
//! makes. The VM PXE-boots from kiln's DHCP and HTTP boot into d-i, which
//! fetches the job's preseed from kiln and reports stage 1 from its
//! `early_command` with the job token. There is no Debian mirror here, so
//! the install goes no further: the test cancels the job and checks that
//! the machine is no longer armed. It prints the time from VM start to
//! stage 1 (BENCHMARKS.md compares it with the image path).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const DI: &str = "/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64";
const MAC: &str = "52:54:00:7a:00:01";
const TAP: &str = "kitap0";

/// The command BMC: `vm.sh on|off|status|bootdev DEVICE`. On starts QEMU
/// (1 GiB: d-i unpacks its 40 MB initrd into RAM) and writes the start
/// time; off kills it by its pidfile.
fn bmc_script(dir: &Path) -> String {
    format!(
        r#"#!/bin/sh
D={dir}
echo "$*" >>"$D/actions.log"
running() {{ [ -s "$D/qemu.pid" ] && kill -0 "$(cat "$D/qemu.pid")" 2>/dev/null; }}
case $1 in
on)
  running && exit 0
  rm -f "$D/qemu.pid"
  date +%s.%N >"$D/started"
  exec qemu-system-x86_64 -name kiln-installer-e2e -accel tcg -machine pc,graphics=off -cpu qemu64 \
    -smp 1 -m 1024 -display none -vga none -monitor none -nodefaults -no-reboot \
    -chardev file,id=ser0,path="$D/console.log" -serial chardev:ser0 \
    -netdev tap,id=n0,ifname={TAP},script=no,downscript=no \
    -device virtio-net-pci,netdev=n0,mac={MAC},bootindex=1 \
    -pidfile "$D/qemu.pid" -daemonize </dev/null >/dev/null 2>>"$D/qemu.log" ;;
off)
  if running; then
    kill "$(cat "$D/qemu.pid")"
    i=0; while running && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  fi
  rm -f "$D/qemu.pid" ;;
status) if running; then echo on; else echo off; fi ;;
bootdev) echo "$2" >"$D/bootdev" ;;
*) exit 1 ;;
esac
"#,
        dir = dir.display()
    )
}

fn json(out: std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn an_installer_reimage_boots_d_i_which_fetches_the_preseed_and_reports_stage_1() {
    require_root_and(&[("qemu-system-x86_64", "qemu-system-x86 ipxe-qemu seabios")]);
    assert!(
        Path::new(DI).join("initrd.gz").exists(),
        "{DI} is missing: apt-get install debian-installer-12-netboot-amd64 (scripts/test does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let _vm = VmGuard(vm_dir.clone());

    let ns = Netns::new(format!("ki{}", std::process::id() % 100_000));
    let bridge = "kibr0";
    let _router = ns.bridge_with_tap(bridge, "10.79.0.1/24", TAP);

    // d-i's kernel and initrd under the artifacts, as the OS image's
    // `source` names them. Copies: /boot/file/ refuses symlinks that lead
    // out of the artifacts directory.
    let art = dir.path().join("artifacts");
    let di = art.join("d-i/bookworm/amd64");
    std::fs::create_dir_all(&di).unwrap();
    for f in ["linux", "initrd.gz"] {
        std::fs::copy(Path::new(DI).join(f), di.join(f)).unwrap();
    }
    let bmc = dir.path().join("vm.sh");
    std::fs::write(&bmc, bmc_script(&vm_dir)).unwrap();
    std::fs::set_permissions(&bmc, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let data = dir.path().join("data");
    let token = bootstrap_token(&data);
    // d-i asks for name servers (at critical priority) when DHCP names
    // none, so the subnet has one, though nothing answers there: the
    // preseed URL has an address, not a name.
    let config = dir.path().join("kiln.toml");
    let b = bmc.display();
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"0.0.0.0:7070\"\n\n[api]\nallow_plain_http = true\n\n\
             [boot]\nhttp_base = \"http://10.79.0.1:7070\"\nartifacts = \"{}\"\n\n\
             [dhcp]\nmode = \"full\"\ninterfaces = [\"{bridge}\"]\n\n\
             [[dhcp.subnet]]\nnetwork = \"10.79.0.0/24\"\npool = [\"10.79.0.100\", \"10.79.0.120\"]\n\
             routers = [\"10.79.0.1\"]\ndns = [\"10.79.0.1\"]\nlease_time = 600\n\n\
             [bmc.command]\npower_on = [\"{b}\", \"on\"]\npower_off = [\"{b}\", \"off\"]\n\
             power_status = [\"{b}\", \"status\"]\nbootdev = [\"{b}\", \"bootdev\", \"{{device}}\"]\n\n\
             [jobs.reimage]\ninstaller_start_secs = 600\n",
            data.display(),
            art.display()
        ),
    )
    .unwrap();
    let server = start_server(&ns.0, &config, dir.path(), "DHCP listening");
    let k = |args: &[&str]| kiln(&ns.0, &token, args);

    k(&[
        "os",
        "add",
        "--name",
        "debian",
        "--version",
        "12",
        "--kind",
        "installer",
        "--source",
        "d-i/bookworm/amd64",
    ]);
    k(&[
        "machine",
        "add",
        "--hostname",
        "vm1",
        "--mac",
        MAC,
        "--ipv4",
        "10.79.0.21",
        "--state",
        "ready",
        "--bmc-driver",
        "command",
        "--bmc-address",
        "vm1",
    ]);
    let started = json(k(&[
        "reimage",
        "vm1",
        "--os",
        "debian-12",
        "--new",
        "--no-hooks",
        "-o",
        "json",
    ]));
    let id = started[0]["job"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no job: {started}"))
        .to_string();

    // From power-on to the preseed's first report: d-i under TCG takes a
    // minute or more.
    let deadline = Instant::now() + Duration::from_secs(420);
    let console = || strip_ansi(&std::fs::read(vm_dir.join("console.log")).unwrap_or_default());
    let job = loop {
        let job = json(k(&["job", "show", &id, "-o", "json"]));
        if job["stage"].as_u64().unwrap_or(0) >= 1 || job["state"] == "failed" || job["state"] == "cancelled" {
            break job;
        }
        assert!(
            Instant::now() < deadline,
            "no stage 1 within 420 s: {job}\nconsole:\n{}\nserver log:\n{}",
            console(),
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        job["stage"].as_u64(),
        Some(1),
        "{job}\nconsole:\n{}\nserver log:\n{}",
        console(),
        server.log_text()
    );
    let stage1 = job["log"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["stage"].as_u64() == Some(1))
        .unwrap_or_else(|| panic!("no stage 1 line in {job}"));
    assert!(
        stage1["message"].as_str().unwrap_or("").contains("installer started"),
        "the preseed's early_command reported it: {stage1}"
    );
    let at: chrono::DateTime<chrono::Utc> = stage1["at"].as_str().unwrap().parse().unwrap();
    let vm_start: f64 = std::fs::read_to_string(vm_dir.join("started"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let secs = at.timestamp_micros() as f64 / 1e6 - vm_start;
    println!("installer path: VM start -> stage 1 (d-i early_command): {secs:.1} s");
    // Where the time went, from the server's log.
    let log = strip_ansi(server.log_text().as_bytes());
    let first = |needle: &str| {
        log.lines().find(|l| l.contains(needle)).and_then(|l| {
            let at: chrono::DateTime<chrono::Utc> = l.split_whitespace().next()?.parse().ok()?;
            Some(at.timestamp_micros() as f64 / 1e6 - vm_start)
        })
    };
    for (what, needle) in [
        ("iPXE asks for its script", "ipxe script"),
        ("d-i's DHCP (kernel and initrd loaded, d-i up)", "no boot file"),
        ("d-i fetches the preseed", "installer file"),
    ] {
        if let Some(t) = first(needle) {
            println!("  {t:6.1} s  {what}");
        }
    }
    println!("  {secs:6.1} s  stage 1 reported");

    // What the server saw: d-i's kernel and initrd, then the preseed with
    // the token in its query, which the request log leaves out.
    let log = server.log_text();
    assert!(log.contains("installer file"), "{log}");
    let token = kiln_token_of_script(&console());
    if let Some(t) = &token {
        assert!(!log.contains(t.as_str()), "the server logged the job token:\n{log}");
    }
    // The console shows d-i's command line (the kernel prints it).
    let text = console();
    assert!(
        text.contains(&format!("url=http://10.79.0.1:7070/boot/job/{id}/preseed?token=")),
        "{text}"
    );
    assert!(text.contains("hostname=vm1"), "{text}");

    // No mirror here: stop. The cancel leaves the machine unarmed.
    k(&["job", "cancel", &id]);
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let job = json(k(&["job", "show", &id, "-o", "json"]));
        if job["state"] == "cancelled" {
            break;
        }
        assert!(Instant::now() < end, "the job did not end: {job}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let explain = json(k(&["boot", "explain", "vm1", "-o", "json"]));
    assert_eq!(explain["answer"], "local_disk", "{explain}");
    assert!(
        !explain["script"].as_str().unwrap_or("").contains("kernel"),
        "{explain}"
    );
    drop(server);
}

/// The job token as the VM's kernel printed its command line, if it did.
fn kiln_token_of_script(console: &str) -> Option<String> {
    console
        .split_whitespace()
        .find_map(|w| w.split_once("preseed?token=").map(|(_, t)| t.to_string()))
}
