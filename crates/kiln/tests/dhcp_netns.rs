//! kiln's DHCP server against real clients, across network namespaces the
//! test makes and removes: busybox `udhcpc` gets a machine's inventory
//! address, the lease survives a server restart, an unknown client gets
//! nothing while discovery is off and a pool address once it is on, and a
//! release ends the lease. Needs root (namespaces) and busybox; fails, never
//! skips, without them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Two namespaces joined by a veth pair: the server side 10.77.0.1/24, the
/// client side unconfigured. Removed (with everything in them) on drop.
struct Net {
    server: String,
    client: String,
    server_if: String,
    client_if: String,
}

impl Net {
    fn new() -> Net {
        let tag = std::process::id() % 100_000;
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

struct Server {
    child: Child,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(net: &Net, config: &Path, dir: &Path) -> Server {
    let log = dir.join(format!("server-{}.log", Instant::now().elapsed().as_nanos()));
    let child = Command::new("ip")
        .args(["netns", "exec", &net.server, KILN, "server", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let server = Server { child, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(&server.log).unwrap_or_default();
        if log.contains("DHCP listening") {
            return server;
        }
        assert!(Instant::now() < deadline, "kiln server did not start DHCP:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kiln(net: &Net, token: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &net.server, KILN])
        .args(args)
        .env("KILN_URL", "http://127.0.0.1:7070")
        .env("KILN_TOKEN", token);
    run(&mut cmd)
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
    assert!(
        nix_is_root(),
        "this test makes network namespaces and needs root; run the tests as root (CI does)"
    );
    assert!(
        Command::new("busybox").arg("true").status().is_ok_and(|s| s.success()),
        "busybox is missing: apt-get install busybox-static (.ci/run does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let net = Net::new();
    let data = dir.path().join("data");
    let token = String::from_utf8(
        run(Command::new(KILN).args([
            "token",
            "create",
            "--data-dir",
            &data.display().to_string(),
            "--role",
            "admin",
        ]))
        .stdout,
    )
    .unwrap()
    .trim()
    .to_string();

    let cfg_off = config(dir.path(), &net, false);
    let server = start_server(&net, &cfg_off, dir.path());
    kiln(
        &net,
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

    // An unknown client gets nothing while discovery is off.
    net.set_client_mac("52:54:00:77:00:99");
    assert_eq!(net.udhcpc(dir.path()), None);
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("discovery is off"), "{log}");
    drop(server);

    // Restart with discovery on: the acknowledged lease is still there, and
    // the unknown client now gets a pool address.
    let cfg_on = config(dir.path(), &net, true);
    let server = start_server(&net, &cfg_on, dir.path());
    let leases = String::from_utf8(kiln(&net, &token, &["leases", "--output", "json"]).stdout).unwrap();
    assert!(
        leases.contains("10.77.0.42") && leases.contains("52:54:00:77:00:42"),
        "{leases}"
    );
    let got = net.udhcpc(dir.path()).expect("a pool address with discovery on");
    assert!(got.starts_with("10.77.0.1"), "{got}");
    let leases = String::from_utf8(kiln(&net, &token, &["leases", "--output", "json"]).stdout).unwrap();
    assert!(leases.contains(&got), "{leases}");

    // The same client again keeps its address; releasing ends the lease.
    assert_eq!(net.udhcpc_then_release(dir.path()).as_deref(), Some(got.as_str()));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let leases = String::from_utf8(kiln(&net, &token, &["leases", "--output", "json"]).stdout).unwrap();
        if !leases.contains(&got) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the released lease is still listed: {leases}\nserver log:\n{}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
