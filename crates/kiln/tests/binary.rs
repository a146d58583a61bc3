//! The real `kiln` binary, as an operator runs it: offline token bootstrap,
//! `kiln server`, the CLI verbs over HTTP, and no secret in any log line
//! even at the most verbose log level.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const CANARY: &str = "canary-9f3k-bmc-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(url: &str, token: &str, args: &[&str]) -> Output {
    Command::new(KILN)
        .args(args)
        .env("KILN_URL", url)
        .env("KILN_TOKEN", token)
        .env_remove("KILN_OUTPUT")
        .output()
        .unwrap()
}

#[test]
fn operator_first_hour_and_no_secret_in_logs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.display().to_string();

    let out = Command::new(KILN)
        .args(["token", "create", "--data-dir", &data_s, "--role", "admin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("kiln_"));

    // A config file with an unknown key is refused, naming the key.
    let bad_cfg = dir.path().join("bad.toml");
    std::fs::write(&bad_cfg, "data_dir = \"/tmp/x\"\nlisten_port = 7070\n").unwrap();
    let out = Command::new(KILN)
        .args(["server", "--config"])
        .arg(&bad_cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listen_port"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let child = Command::new(KILN)
        .args(["server", "--data-dir", &data_s, "--listen", &listen, "--log", "trace"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Server { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while cli(&url, &token, &["site", "list"]).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "kiln server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let key = std::fs::metadata(data.join("secret.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(key.permissions().mode() & 0o777, 0o600);

    let out = cli(&url, &token, &["tenant", "add", "acme"]);
    assert!(out.status.success());
    let out = cli(
        &url,
        &token,
        &[
            "machine",
            "add",
            "--hostname",
            "db1001",
            "--mac",
            "52:54:00:00:00:01",
            "--tag",
            "db",
            "--owner",
            "acme",
            "--bmc-driver",
            "ipmi",
            "--bmc-address",
            "10.0.0.1",
            "--bmc-user",
            "root",
            "--bmc-password",
            CANARY,
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A duplicate MAC fails with a message naming the holder, and exit code 1.
    let out = cli(
        &url,
        &token,
        &["machine", "add", "--hostname", "db1002", "--mac", "52:54:00:00:00:01"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already used by machine db1001"));

    let out = cli(&url, &token, &["machine", "list", "--tag", "db", "--output", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["hostname"], "db1001");
    assert_eq!(listed[0]["bmc"]["password_set"], true);
    let shown = [
        out.stdout,
        cli(&url, &token, &["machine", "show", "db1001", "-o", "json"]).stdout,
        cli(&url, &token, &["events", "-o", "json"]).stdout,
    ];
    for s in &shown {
        assert!(!String::from_utf8_lossy(s).contains(CANARY));
    }
    let db = std::fs::read(data.join("kiln.db")).unwrap();
    let wal = std::fs::read(data.join("kiln.db-wal")).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&db).contains(CANARY) && !String::from_utf8_lossy(&wal).contains(CANARY));

    // Stop the server and read everything it logged.
    let _ = server.child.kill();
    let _ = server.child.wait();
    let mut log = String::new();
    server.child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(log.contains("kiln server started"), "{log}");
    assert!(log.contains("/api/v1/machines"), "trace logging was on: {log}");
    assert!(!log.contains(CANARY), "the BMC password reached the log");
    assert!(!log.contains(&token[5..]), "the token reached the log");
}
