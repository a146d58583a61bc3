//! A QEMU VM (software emulation, SeaBIOS, its own iPXE ROM) net-boots from
//! kiln: kiln's DHCP recognises the iPXE client and sends it to kiln's HTTP
//! script, which — with no job armed for this deployed machine — tells it
//! to boot its local disk. The test asserts on the serial console. The
//! bridge, tap and namespace are the test's own; QEMU is stopped by PID.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn a_deployed_machine_that_pxe_boots_is_sent_to_its_disk() {
    require_root_and(&[("qemu-system-x86_64", "qemu-system-x86 ipxe-qemu seabios")]);
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new(format!("kq{}", std::process::id() % 100_000));
    let (bridge, tap) = ("kqbr0", "kqtap0");
    ip(&["-n", &ns.0, "link", "add", bridge, "type", "bridge"]);
    ip(&[
        "-n",
        &ns.0,
        "link",
        "set",
        bridge,
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
    ]);
    ip(&["-n", &ns.0, "addr", "add", "10.78.0.1/24", "dev", bridge]);
    ip(&["-n", &ns.0, "link", "set", bridge, "up"]);
    ip(&["-n", &ns.0, "tuntap", "add", tap, "mode", "tap"]);
    ip(&["-n", &ns.0, "link", "set", tap, "master", bridge]);
    ip(&["-n", &ns.0, "link", "set", tap, "up"]);

    let data = dir.path().join("data");
    let token = bootstrap_token(&data);
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"0.0.0.0:7070\"\n\n[boot]\nhttp_base = \"http://10.78.0.1:7070\"\n\n\
             [dhcp]\nmode = \"full\"\ninterfaces = [\"{bridge}\"]\n\n\
             [[dhcp.subnet]]\nnetwork = \"10.78.0.0/24\"\nrouters = [\"10.78.0.1\"]\nlease_time = 600\n",
            data.display()
        ),
    )
    .unwrap();
    let server = start_server(&ns.0, &config, dir.path(), "DHCP listening");
    let mac = "52:54:00:78:00:01";
    kiln(
        &ns.0,
        &token,
        &[
            "machine",
            "add",
            "--hostname",
            "vm1",
            "--mac",
            mac,
            "--ipv4",
            "10.78.0.21",
            "--state",
            "deployed",
        ],
    );

    let console = dir.path().join("console.log");
    let qemu = Command::new("ip")
        .args(["netns", "exec", &ns.0, "qemu-system-x86_64"])
        .args([
            "-name",
            "kiln-pxe-test",
            "-accel",
            "tcg",
            "-machine",
            "pc,graphics=off",
            "-cpu",
            "qemu64",
        ])
        .args([
            "-smp",
            "1",
            "-m",
            "256",
            "-display",
            "none",
            "-vga",
            "none",
            "-monitor",
            "none",
            "-nodefaults",
        ])
        .args([
            "-chardev",
            &format!("file,id=ser0,path={}", console.display()),
            "-serial",
            "chardev:ser0",
        ])
        .args(["-netdev", &format!("tap,id=n0,ifname={tap},script=no,downscript=no")])
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac},bootindex=1")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("qemu.log")).unwrap())
        .spawn()
        .unwrap();
    let vm = Proc {
        child: qemu,
        log: console.clone(),
    };

    // iPXE waits for an IPv6 router advertisement that nobody sends here
    // (about 13 s), then asks kiln; budget generously for a busy machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    let text = loop {
        let text = strip_ansi(&std::fs::read(&console).unwrap_or_default());
        if text.contains("kiln: booting from local disk") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        text.contains("kiln: booting from local disk"),
        "the VM never ran kiln's script.\nconsole:\n{text}\nserver log:\n{}",
        server.log_text()
    );
    assert!(text.contains("10.78.0.21"), "it got its inventory address:\n{text}");
    assert!(!text.contains("kernel"), "no kernel was loaded:\n{text}");
    let log = server.log_text();
    assert!(log.contains("vm1 (52:54:00:78:00:01): ack 10.78.0.21"), "{log}");
    assert!(log.contains("ipxe script"), "{log}");
    drop(vm);
    drop(server);
}
