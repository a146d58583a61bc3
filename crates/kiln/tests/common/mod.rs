//! Shared by the tests that run the real `kiln` binary in network
//! namespaces the test makes (and removes, also on failure).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Fails (never skips) when the test cannot do its job here.
pub fn require_root_and(tools: &[(&str, &str)]) {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    assert!(
        root,
        "this test makes network namespaces and needs root; run the tests as root (CI does)"
    );
    for (tool, package) in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "`{tool}` is missing: apt-get install {package} (scripts/test does)"
        );
    }
}

/// A network namespace, deleted (with every device in it) on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child process stopped (by PID) on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle`; panics with the log otherwise.
    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log_text();
            if log.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`{needle}` did not appear within {timeout:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `kiln server --config CONFIG` inside `ns`, logging to a file in `dir`,
/// waiting until `ready` is logged.
pub fn start_server(ns: &str, config: &Path, dir: &Path, ready: &str) -> Proc {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let log = dir.join(format!("server-{n}.log"));
    let child = Command::new("ip")
        .args(["netns", "exec", ns, KILN, "server", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let server = Proc { child, log };
    server.wait_for(ready, Duration::from_secs(20));
    server
}

/// The kiln CLI inside `ns`, against the server on 127.0.0.1:7070 there.
pub fn kiln(ns: &str, token: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, KILN])
        .args(args)
        .env("KILN_URL", "http://127.0.0.1:7070")
        .env("KILN_TOKEN", token);
    run(&mut cmd)
}

/// A first admin token, made offline in `data`.
pub fn bootstrap_token(data: &Path) -> String {
    let out = run(Command::new(KILN).args([
        "token",
        "create",
        "--data-dir",
        &data.display().to_string(),
        "--role",
        "admin",
    ]));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The text of a serial console, without the ANSI escapes SeaBIOS's
/// serial console puts mid-line.
pub fn strip_ansi(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The static agent: `KILN_TEST_STATIC_AGENT` (scripts/test builds it
/// once before the tests), else built here with the documented command.
pub fn static_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_TEST_STATIC_AGENT") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "KILN_TEST_STATIC_AGENT={} is not a file", p.display());
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building the static kiln-agent (set KILN_TEST_STATIC_AGENT to skip)");
    run(Command::new(cargo)
        .current_dir(workspace())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "-q",
            "-p",
            "kiln-agent",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
        ]));
    target.join("x86_64-unknown-linux-gnu/release/kiln-agent")
}

/// Where the tests keep `kiln ramdisk build`'s package cache between runs
/// (target/tmp).
pub fn ramdisk_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("ramdisk-cache")
}

/// `kiln ramdisk build` of the static agent into `out`; its stdout.
pub fn build_ramdisk(out: &Path) -> String {
    let o = run(Command::new(KILN)
        .args(["ramdisk", "build", "--agent"])
        .arg(static_agent())
        .arg("--out")
        .arg(out)
        .arg("--cache")
        .arg(ramdisk_cache()));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

impl Netns {
    /// A bridge at `cidr` (no STP, no forwarding delay) with tap `tap` in
    /// it, for a QEMU VM's NIC, and IPv6 router advertisements on it (the
    /// returned process; keep it while the VM runs).
    #[must_use = "the router advertisements stop when this is dropped"]
    pub fn bridge_with_tap(&self, bridge: &str, cidr: &str, tap: &str) -> Proc {
        let ns = self.0.as_str();
        for args in [
            vec!["link", "add", bridge, "type", "bridge"],
            vec![
                "link",
                "set",
                bridge,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
            vec!["addr", "add", cidr, "dev", bridge],
            vec!["link", "set", bridge, "up"],
            vec!["tuntap", "add", tap, "mode", "tap"],
            vec!["link", "set", tap, "master", bridge],
            vec!["link", "set", tap, "up"],
        ] {
            let mut all = vec!["-n", ns];
            all.extend(args);
            ip(&all);
        }
        self.router_adverts(bridge)
    }

    /// Sends an IPv6 router advertisement (no prefix, no DHCPv6, not a
    /// default router) on `bridge` twice a second, for twenty minutes at
    /// most. iPXE's "Configuring" waits for one, about 13 s per net boot
    /// when none comes; with it, IPv6 is settled at once. Sends fail
    /// quietly until the bridge has a link-local address (a VM's tap up).
    fn router_adverts(&self, bridge: &str) -> Proc {
        let script = format!(
            "import socket, time\n\
             s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)\n\
             s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)\n\
             ra = bytes([134, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])\n\
             idx = socket.if_nametoindex('{bridge}')\n\
             for _ in range(2400):\n\
             \x20   try:\n\
             \x20       s.sendto(ra, ('ff02::1', 0, 0, idx))\n\
             \x20   except OSError:\n\
             \x20       pass\n\
             \x20   time.sleep(0.5)\n"
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &self.0, "python3", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Proc {
            child,
            log: PathBuf::from("/dev/null"),
        }
    }
}

/// Kills the QEMU whose pidfile is `DIR/qemu.pid` when the test ends,
/// however it ends.
pub struct VmGuard(pub PathBuf);

impl Drop for VmGuard {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.0.join("qemu.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// ipmi_sim's `chassis_control` hook for a VM in `dir`: its power is
/// whether its QEMU runs (pidfile `qemu.pid`), and the boot device the BMC
/// holds is in `bootdev`. `start` is the shell that starts QEMU
/// daemonized with that pidfile; it may read `$D` (the directory) and `$n`
/// (this power-on's number, for its console file). Every call is appended
/// to `actions.log`.
pub fn chassis_script(dir: &Path, start: &str) -> String {
    format!(
        r#"#!/bin/sh
D={dir}
echo "$*" >>"$D/actions.log"
running() {{ [ -s "$D/qemu.pid" ] && kill -0 "$(cat "$D/qemu.pid")" 2>/dev/null; }}
start() {{
  n=$(( $(cat "$D/boots" 2>/dev/null || echo 0) + 1 )); echo $n >"$D/boots"
  rm -f "$D/qemu.pid"
{start}
}}
stop() {{
  if running; then
    kill "$(cat "$D/qemu.pid")"
    i=0; while running && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  fi
  rm -f "$D/qemu.pid"
}}
op=$1; shift
case $op in
get)
  for p in "$@"; do
    case $p in
      power) if running; then echo power:1; else echo power:0; fi ;;
      boot) echo "boot:$(cat "$D/bootdev" 2>/dev/null || echo default)" ;;
      *) echo "Invalid parameter: $p"; exit 1 ;;
    esac
  done ;;
set)
  while [ $# -gt 1 ]; do
    p=$1; v=$2; shift 2
    case $p in
      power) if [ "$v" = 1 ]; then running || start; else stop; fi ;;
      reset) if running; then stop; start; fi ;;
      boot) echo "$v" >"$D/bootdev" ;;
      shutdown) ;;
      identify) shift ;;
      *) echo "Invalid parameter: $p"; exit 1 ;;
    esac
  done ;;
*) exit 1 ;;
esac
exit 0
"#,
        dir = dir.display()
    )
}

/// OpenIPMI's `ipmi_sim` in `ns`, listening for RMCP+ at `addr` with user
/// `admin` / `password`, its state in `dir`, its chassis hook `start`
/// ([`chassis_script`]) and system GUID `guid` (32 hex digits).
pub fn start_ipmi_sim(ns: &str, dir: &Path, addr: &str, password: &str, guid: &str, start: &str) -> Proc {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let hook = dir.join("chassis.sh");
    std::fs::write(&hook, chassis_script(dir, start)).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (host, port) = addr.split_once(':').unwrap();
    std::fs::write(
        dir.join("lan.conf"),
        format!(
            "name \"kilntest\"\nset_working_mc 0x20\n  startlan 1\n    addr {host} {port}\n    priv_limit admin\n\
             allowed_auths_callback none md2 md5 straight\n    allowed_auths_user none md2 md5 straight\n\
             allowed_auths_operator none md2 md5 straight\n    allowed_auths_admin none md2 md5 straight\n\
             guid {guid}\n  endlan\n  chassis_control \"{}\"\n\
             user 1 false \"\" \"\" user 1 none\n  user 2 true \"admin\" \"{password}\" admin 10 none md2 md5 straight\n",
            hook.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("sim.emu"),
        "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n",
    )
    .unwrap();
    let log = dir.join("ipmi_sim.log");
    Proc {
        child: Command::new("ip")
            .args(["netns", "exec", ns, "ipmi_sim", "-n", "-c"])
            .arg(dir.join("lan.conf"))
            .arg("-f")
            .arg(dir.join("sim.emu"))
            .arg("-s")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        log,
    }
}

/// Whether the QEMU a chassis hook started in `dir` still runs.
pub fn qemu_running(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("qemu.pid")).is_ok_and(|pid| Path::new(&format!("/proc/{}", pid.trim())).exists())
}

/// A QEMU lab: its network namespace, admin token, BMC directory (consoles,
/// boot count, QEMU and BMC logs) and kiln server; shared by the QEMU tests.
pub struct Lab {
    pub ns: Netns,
    pub token: String,
    pub bmc: PathBuf,
    pub server: Proc,
}

impl Lab {
    pub fn kiln(&self, args: &[&str]) -> std::process::Output {
        kiln(&self.ns.0, &self.token, args)
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_slice(&self.kiln(&all).stdout).unwrap()
    }

    pub fn console(&self, n: u32) -> String {
        strip_ansi(&std::fs::read(self.bmc.join(format!("console-{n}.log"))).unwrap_or_default())
    }

    pub fn boots(&self) -> u32 {
        std::fs::read_to_string(self.bmc.join("boots"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}
