//! A relayed client: ISC `dhcrelay` between the client's namespace and
//! kiln's adds option 82 (the circuit-id is its client-facing interface);
//! kiln recognises the machine by that switch port — it is enrolled with no
//! MAC at all (issue 15) — answers to the relay (giaddr), the client gets
//! the machine's inventory address, and kiln has learned and recorded its
//! MAC. All three namespaces are the test's own.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn a_relayed_client_is_recognised_by_its_switch_port() {
    require_root_and(&[("busybox", "busybox-static"), ("dhcrelay", "isc-dhcp-relay")]);
    let dir = tempfile::tempdir().unwrap();
    let tag = std::process::id() % 100_000;
    let server = Netns::new(format!("kr{tag}s"));
    let relay = Netns::new(format!("kr{tag}r"));
    let client = Netns::new(format!("kr{tag}c"));
    // server  s0 10.79.1.1/24 ── r1 10.79.1.2/24  relay  r2 10.79.2.1/24 ── c0  client
    let (s0, r1, r2, c0) = ("krs0", "krr1", "krr2", "krc0");
    ip(&[
        "link",
        "add",
        &format!("{s0}t"),
        "type",
        "veth",
        "peer",
        "name",
        &format!("{r1}t"),
    ]);
    ip(&[
        "link",
        "add",
        &format!("{r2}t"),
        "type",
        "veth",
        "peer",
        "name",
        &format!("{c0}t"),
    ]);
    for (dev, ns) in [(s0, &server), (r1, &relay), (r2, &relay), (c0, &client)] {
        ip(&["link", "set", &format!("{dev}t"), "netns", &ns.0, "name", dev]);
        ip(&["-n", &ns.0, "link", "set", dev, "up"]);
    }
    ip(&["-n", &server.0, "addr", "add", "10.79.1.1/24", "dev", s0]);
    ip(&["-n", &server.0, "route", "add", "10.79.2.0/24", "via", "10.79.1.2"]);
    ip(&["-n", &relay.0, "addr", "add", "10.79.1.2/24", "dev", r1]);
    ip(&["-n", &relay.0, "addr", "add", "10.79.2.1/24", "dev", r2]);
    run(Command::new("ip").args(["netns", "exec", &relay.0, "sysctl", "-qw", "net.ipv4.ip_forward=1"]));

    let data = dir.path().join("data");
    let token = bootstrap_token(&data);
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:7070\"\n\n[dhcp]\nmode = \"full\"\ninterfaces = [\"{s0}\"]\n\n\
             [[dhcp.subnet]]\nnetwork = \"10.79.1.0/24\"\n\n\
             [[dhcp.subnet]]\nnetwork = \"10.79.2.0/24\"\nrouters = [\"10.79.2.1\"]\nlease_time = 600\n",
            data.display()
        ),
    )
    .unwrap();
    let kiln_server = start_server(&server.0, &config, dir.path(), "DHCP listening");
    // The machine is known by its cabling: the relay's port toward it.
    let m = serde_json::json!({"hostname": "racked1", "ipv4": "10.79.2.50",
        "nics": [{"circuit_id": r2}]});
    let file = dir.path().join("m.yaml");
    std::fs::write(&file, format!("- {m}\n")).unwrap();
    kiln(&server.0, &token, &["machine", "import", &file.display().to_string()]);

    let relay_log = dir.path().join("dhcrelay.log");
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &relay.0,
            "dhcrelay",
            "-4",
            "-d",
            "--no-pid",
            "-a",
            "-id",
            r2,
            "-iu",
            r1,
            "10.79.1.1",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&relay_log).unwrap())
        .spawn()
        .unwrap();
    let relay_proc = Proc { child, log: relay_log };
    relay_proc.wait_for("Sending on", Duration::from_secs(10));

    // The client's MAC is not in the inventory at all.
    ip(&["-n", &client.0, "link", "set", c0, "address", "02:00:00:79:00:99"]);
    let script = dir.path().join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && echo \"BOUND $ip $router\"\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new("ip")
        .args([
            "netns", "exec", &client.0, "busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "2", "-i", c0, "-s",
        ])
        .arg(&script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("BOUND 10.79.2.50 10.79.2.1"),
        "udhcpc: {stdout}{}\nkiln:\n{}\ndhcrelay:\n{}",
        String::from_utf8_lossy(&out.stderr),
        kiln_server.log_text(),
        relay_proc.log_text()
    );
    let log = kiln_server.log_text();
    assert!(log.contains("racked1 (02:00:00:79:00:99): ack 10.79.2.50"), "{log}");
    // The MAC the port showed is now on record, once.
    let out = kiln(&server.0, &token, &["machine", "show", "racked1", "-o", "json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["nics"][0]["mac"], "02:00:00:79:00:99", "{shown:#}");
    assert_eq!(shown["nics"][0]["circuit_id"], r2, "{shown:#}");
    assert_eq!(
        log.matches("learned the MAC of a NIC enrolled by switch port").count(),
        1,
        "{log}"
    );
    drop(relay_proc);
    drop(kiln_server);
}
