//! kiln's DHCP server against real clients, across network namespaces the
//! test makes and removes: busybox `udhcpc` gets a machine's inventory
//! address, the lease survives a server restart, an unknown client gets
//! nothing while discovery is off and a pool address once it is on, and a
//! release ends the lease. Needs root (namespaces) and busybox; fails, never
//! skips, without them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Two namespaces joined by a veth pair: the server side 10.77.0.1/24, the
/// client side unconfigured. Removed (with everything in them) on drop.
struct Net {
    server: String,
    client: String,
    server_if: String,
    client_if: String,
}

impl Net {
    /// `kind` tells apart the tests of this binary, which run at once.
    fn new(kind: char) -> Net {
        let tag = format!("{kind}{}", std::process::id() % 100_000);
        let server_if = format!("kd{tag}s0");
        let net = Net {
            server: format!("kd{tag}s"),
            client: format!("kd{tag}c"),
            server_if: server_if.clone(),
            client_if: format!("kd{tag}c0"),
        };
        ip(&["netns", "add", &net.server]);
        ip(&["netns", "add", &net.client]);
        ip(&[
            "link",
            "add",
            &server_if,
            "type",
            "veth",
            "peer",
            "name",
            &net.client_if,
        ]);
        ip(&["link", "set", &server_if, "netns", &net.server]);
        ip(&["link", "set", &net.client_if, "netns", &net.client]);
        for (ns, dev) in [(&net.server, &server_if), (&net.client, &net.client_if)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&["-n", &net.server, "addr", "add", "10.77.0.1/24", "dev", &server_if]);
        net
    }

    fn set_client_mac(&self, mac: &str) {
        ip(&["-n", &self.client, "link", "set", &self.client_if, "down"]);
        ip(&["-n", &self.client, "link", "set", &self.client_if, "address", mac]);
        ip(&["-n", &self.client, "link", "set", &self.client_if, "up"]);
    }

    /// Writes the udhcpc script: like busybox's default one it configures the
    /// address (a release is sent from it), and it records what was bound.
    fn udhcpc_script(dir: &Path) -> (PathBuf, PathBuf) {
        let script = dir.join("udhcpc.sh");
        let bound = dir.join("bound");
        let _ = std::fs::remove_file(&bound);
        std::fs::write(
            &script,
            format!(
                concat!(
                    "#!/bin/sh\n",
                    "case \"$1\" in\n",
                    "deconfig) busybox ifconfig \"$interface\" 0.0.0.0 ;;\n",
                    "bound|renew) busybox ifconfig \"$interface\" \"$ip\" netmask \"$subnet\"; ",
                    "echo \"$ip\" > {}.tmp && mv {}.tmp {} ;;\n",
                    "esac\n",
                    "exit 0\n",
                ),
                bound.display(),
                bound.display(),
                bound.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        (script, bound)
    }

    /// Runs udhcpc once (until it has a lease, or gives up) in the client
    /// namespace; the address it got, if any.
    fn udhcpc(&self, dir: &Path) -> Option<String> {
        let (script, bound) = Self::udhcpc_script(dir);
        let s = script.display().to_string();
        let args = [
            "netns",
            "exec",
            &self.client,
            "busybox",
            "udhcpc",
            "-f",
            "-q",
            "-n",
            "-t",
            "4",
            "-T",
            "1",
            "-A",
            "1",
        ];
        let _ = Command::new("ip")
            .args(args)
            .args(["-i", &self.client_if, "-s", &s])
            .output()
            .unwrap();
        std::fs::read_to_string(&bound).ok().map(|ip| ip.trim().to_string())
    }

    /// Runs udhcpc until it is bound, then stops it with SIGTERM so that it
    /// releases the lease (`-R`); the address it had.
    fn udhcpc_then_release(&self, dir: &Path) -> Option<String> {
        let (script, bound) = Self::udhcpc_script(dir);
        let s = script.display().to_string();
        let args = [
            "netns",
            "exec",
            &self.client,
            "busybox",
            "udhcpc",
            "-f",
            "-R",
            "-t",
            "4",
            "-T",
            "1",
            "-A",
            "1",
        ];
        let mut child = Command::new("ip")
            .args(args)
            .args(["-i", &self.client_if, "-s", &s])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let ip = loop {
            if let Ok(ip) = std::fs::read_to_string(&bound) {
                break Some(ip.trim().to_string());
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // `ip netns exec` execs udhcpc, so the child's PID is udhcpc's.
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let _ = child.wait();
        ip
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.server]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.client]).status();
    }
}

fn config(dir: &Path, net: &Net, discovery: bool) -> PathBuf {
    let path = dir.join(format!("kiln-{discovery}.toml"));
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:7070\"\nlog = \"info\"\n\n\
             [boot]\ndiscovery = {discovery}\n\n[dhcp]\nmode = \"full\"\ninterfaces = [\"{}\"]\n\n\
             [[dhcp.subnet]]\nnetwork = \"10.77.0.0/24\"\npool = [\"10.77.0.100\", \"10.77.0.110\"]\n\
             routers = [\"10.77.0.1\"]\nlease_time = 600\n",
            dir.join("data").display(),
            net.server_if
        ),
    )
    .unwrap();
    path
}

#[test]
fn udhcpc_gets_inventory_addresses_and_leases_survive_restarts() {
    require_root_and(&[("busybox", "busybox-static")]);
    let dir = tempfile::tempdir().unwrap();
    let net = Net::new('u');
    let token = bootstrap_token(&dir.path().join("data"));

    let cfg_off = config(dir.path(), &net, false);
    let server = start_server(&net.server, &cfg_off, dir.path(), "DHCP listening");
    kiln(
        &net.server,
        &token,
        &[
            "machine",
            "add",
            "--hostname",
            "node42",
            "--mac",
            "52:54:00:77:00:42",
            "--ipv4",
            "10.77.0.42",
            "--state",
            "deployed",
        ],
    );

    // A known machine gets its inventory address.
    net.set_client_mac("52:54:00:77:00:42");
    assert_eq!(net.udhcpc(dir.path()).as_deref(), Some("10.77.0.42"));

    // Thousands of random and malformed packets (including a DHCP request
    // whose hardware length overruns its buffer): the server stays up,
    // its leases do not change, and the client is still served.
    let leases_before = String::from_utf8(kiln(&net.server, &token, &["leases", "-o", "json"]).stdout).unwrap();
    let flood = format!(
        concat!(
            "import os, socket\n",
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n",
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\n",
            "s.setsockopt(socket.SOL_SOCKET, 25, b'{}')\n",
            "bad = bytearray(300); bad[0] = 1; bad[1] = 1; bad[2] = 200\n",
            "bad[236:240] = bytes([99, 130, 83, 99]); bad[240:243] = bytes([53, 1, 1]); bad[243] = 255\n",
            "for n in range(3000):\n",
            "    s.sendto(bytes(bad) if n % 10 == 0 else os.urandom(n % 700), ('255.255.255.255', 67))\n",
        ),
        net.client_if
    );
    let received = || -> u64 {
        let snmp = run(Command::new("ip").args(["netns", "exec", &net.server, "cat", "/proc/net/snmp"])).stdout;
        let text = String::from_utf8(snmp).unwrap();
        let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
        let names: Vec<&str> = udp[0].split_whitespace().collect();
        let values: Vec<&str> = udp[1].split_whitespace().collect();
        // Delivered, plus dropped on a full receive queue: what reached the socket.
        ["InDatagrams", "RcvbufErrors"]
            .iter()
            .map(|name| {
                values[names.iter().position(|n| n == name).unwrap()]
                    .parse::<u64>()
                    .unwrap()
            })
            .sum()
    };
    let before = received();
    run(Command::new("ip").args(["netns", "exec", &net.client, "python3", "-c", &flood]));
    std::thread::sleep(Duration::from_millis(500));
    let got = received() - before;
    assert!(got >= 2900, "the flood did not reach the server: {got} datagrams");
    let leases_after = String::from_utf8(kiln(&net.server, &token, &["leases", "-o", "json"]).stdout).unwrap();
    assert_eq!(leases_before, leases_after, "garbage changed the leases");
    assert_eq!(
        net.udhcpc(dir.path()).as_deref(),
        Some("10.77.0.42"),
        "still served after the flood"
    );

    // An unknown client gets nothing while discovery is off.
    net.set_client_mac("52:54:00:77:00:99");
    assert_eq!(net.udhcpc(dir.path()), None);
    let log = server.log_text();
    assert!(log.contains("discovery is off"), "{log}");
    drop(server);

    // Restart with discovery on: the acknowledged lease is still there, and
    // the unknown client now gets a pool address.
    let cfg_on = config(dir.path(), &net, true);
    let server = start_server(&net.server, &cfg_on, dir.path(), "DHCP listening");
    let leases = String::from_utf8(kiln(&net.server, &token, &["leases", "--output", "json"]).stdout).unwrap();
    assert!(
        leases.contains("10.77.0.42") && leases.contains("52:54:00:77:00:42"),
        "{leases}"
    );
    // An inventory address inside the pool is never handed to another client.
    kiln(
        &net.server,
        &token,
        &["machine", "add", "--hostname", "held1", "--ipv4", "10.77.0.100"],
    );
    let got = net.udhcpc(dir.path()).expect("a pool address with discovery on");
    assert_eq!(got, "10.77.0.101");
    let leases = String::from_utf8(kiln(&net.server, &token, &["leases", "--output", "json"]).stdout).unwrap();
    assert!(leases.contains(&got), "{leases}");
    // Nor one enrolled while the server runs (its copy of the inventory
    // addresses follows the store).
    kiln(
        &net.server,
        &token,
        &["machine", "add", "--hostname", "held2", "--ipv4", "10.77.0.102"],
    );
    net.set_client_mac("52:54:00:77:00:98");
    assert_eq!(net.udhcpc(dir.path()).as_deref(), Some("10.77.0.103"));
    net.set_client_mac("52:54:00:77:00:99");

    // The same client again keeps its address; releasing ends the lease.
    assert_eq!(net.udhcpc_then_release(dir.path()).as_deref(), Some(got.as_str()));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let leases = String::from_utf8(kiln(&net.server, &token, &["leases", "--output", "json"]).stdout).unwrap();
        if !leases.contains(&got) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the released lease is still listed: {leases}\nserver log:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);
}

#[test]
fn dhclient_gets_renews_and_releases_a_lease() {
    require_root_and(&[("dhclient", "isc-dhcp-client")]);
    let dir = tempfile::tempdir().unwrap();
    let net = Net::new('d');
    let token = bootstrap_token(&dir.path().join("data"));
    let server = start_server(
        &net.server,
        &config(dir.path(), &net, false),
        dir.path(),
        "DHCP listening",
    );
    kiln(
        &net.server,
        &token,
        &[
            "machine",
            "add",
            "--hostname",
            "node43",
            "--mac",
            "52:54:00:77:00:43",
            "--ipv4",
            "10.77.0.43",
        ],
    );
    net.set_client_mac("52:54:00:77:00:43");
    // dhclient's own script would touch /etc/resolv.conf: ours only
    // configures the address and records what happened.
    let events = dir.path().join("events");
    let script = dir.path().join("dhclient.sh");
    std::fs::write(
        &script,
        format!(
            concat!(
                "#!/bin/sh\n",
                "echo \"$reason $new_ip_address\" >> {}\n",
                "case \"$reason\" in\n",
                "BOUND|RENEW|REBOOT) ip addr replace \"$new_ip_address/24\" dev \"$interface\" ;;\n",
                "RELEASE|EXPIRE|STOP) ip addr flush dev \"$interface\" ;;\n",
                "esac\n",
            ),
            events.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let leases = dir.path().join("dhclient.leases");
    let pid = dir.path().join("dhclient.pid");
    // dhclient stays in the background once bound: stop it by its PID
    // whatever happens to the test.
    struct StopDhclient(std::path::PathBuf);
    impl Drop for StopDhclient {
        fn drop(&mut self) {
            if let Ok(pid) = std::fs::read_to_string(&self.0) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
    let _stop = StopDhclient(pid.clone());
    let dhclient = |extra: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &net.client, "dhclient", "-4", "-1", "-sf"])
            .arg(&script)
            .arg("-lf")
            .arg(&leases)
            .arg("-pf")
            .arg(&pid)
            .args(extra)
            .arg(&net.client_if)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        run(&mut cmd)
    };
    let kiln_leases = || String::from_utf8(kiln(&net.server, &token, &["leases", "-o", "json"]).stdout).unwrap();

    // Get: bound to the inventory address, and kiln holds the lease.
    dhclient(&[]);
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(text.contains("BOUND 10.77.0.43"), "{text}");
    assert!(kiln_leases().contains("10.77.0.43"));
    // Renew: a second run while bound asks for the same address again.
    let before = kiln_leases();
    std::thread::sleep(Duration::from_millis(1100));
    dhclient(&["-x"]); // stop the first one without releasing
    dhclient(&[]);
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(text.matches("10.77.0.43").count() >= 2, "{text}");
    let after = kiln_leases();
    assert!(
        after.contains("10.77.0.43") && after != before,
        "the lease was extended:\n{before}\n{after}"
    );
    // Release: the lease is gone from kiln.
    dhclient(&["-r"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while kiln_leases().contains("10.77.0.43") {
        assert!(
            Instant::now() < deadline,
            "not released:\n{}\n{}",
            kiln_leases(),
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);
}
