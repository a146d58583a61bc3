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
