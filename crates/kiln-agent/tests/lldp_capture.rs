//! LLDP capture for real: a network namespace with a veth pair; a raw
//! socket (python3) sends a switch's LLDP frames on one end, and
//! `kiln-agent lldp` on the other end reports the switch and port. Needs
//! root, like the other network tests (CI runs as root).

use std::process::{Command, Stdio};
use std::time::Duration;

const AGENT: &str = env!("CARGO_BIN_EXE_kiln-agent");

fn ip(args: &[&str]) {
    let ok = Command::new("ip").args(args).status().is_ok_and(|s| s.success());
    assert!(ok, "ip {args:?} failed");
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let head = (u16::from(kind) << 9) | value.len() as u16;
    [head.to_be_bytes().as_slice(), value].concat()
}

/// A switch's LLDP frame: chassis MAC, port `ge-0/0/7` (interface name),
/// TTL 120, system name `asw-e2e`.
fn frame() -> Vec<u8> {
    let mut f = vec![
        0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e, 0x02, 0x00, 0x00, 0x00, 0x00, 0x99, 0x88, 0xcc,
    ];
    f.extend(tlv(1, &[4, 0x02, 0, 0, 0, 0, 0x99]));
    f.extend(tlv(2, &[[5u8].as_slice(), b"ge-0/0/7"].concat()));
    f.extend(tlv(3, &120u16.to_be_bytes()));
    f.extend(tlv(5, b"asw-e2e"));
    f.extend(tlv(0, &[]));
    f
}

#[test]
fn discovery_hears_the_switch_port() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    assert!(
        root,
        "this test makes a network namespace and needs root (CI runs as root)"
    );
    let ns = Netns(format!("kl{}", std::process::id() % 100_000));
    let _ = Command::new("ip").args(["netns", "del", &ns.0]).status();
    ip(&["netns", "add", &ns.0]);
    ip(&["-n", &ns.0, "link", "add", "kl0", "type", "veth", "peer", "name", "kl1"]);
    ip(&["-n", &ns.0, "link", "set", "kl0", "address", "52:54:00:4c:00:01", "up"]);
    ip(&["-n", &ns.0, "link", "set", "kl1", "up"]);

    let listener = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            AGENT,
            "lldp",
            "--interface",
            "kl0",
            "--wait",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The switch: one frame a second for a few seconds, on the other end.
    let send = format!(
        "import socket, time\ns = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\ns.bind(('kl1', 0))\n\
         for _ in range(8):\n    s.send(bytes.fromhex('{}'))\n    time.sleep(0.5)\n",
        hex::encode(frame())
    );
    std::thread::sleep(Duration::from_millis(500));
    let sent = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c", &send])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = listener.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        seen,
        serde_json::json!([{ "mac": "52:54:00:4c:00:01", "switch": "asw-e2e", "port": "ge-0/0/7" }])
    );
}
