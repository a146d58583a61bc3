//! The real `kiln` binary, as an operator runs it: offline token bootstrap,
//! `kiln server`, the CLI verbs over HTTP, and no secret in any log line
//! even at the most verbose log level.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const CANARY: &str = "canary-9f3k-bmc-secret";
/// A root password a tenant sends in plaintext (the API hashes it).
const TENANT_CANARY: &str = "canary-Tn4nt-root-pw";

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

/// `kiln token create` straight into the data directory `data`: an admin
/// token.
fn admin_token(data: &str) -> String {
    let out = Command::new(KILN)
        .args(["token", "create", "--data-dir", data, "--role", "admin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `kiln server ARGS` on `data` and a free loopback port, logging to the
/// file `log` (at trace level the log outgrows a pipe read only at the
/// end), once it answers `token`: the server and its URL.
fn start_server(args: &[&str], data: &str, log: &std::path::Path, token: &str) -> (Server, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{listen}");
    let child = Command::new(KILN)
        .arg("server")
        .args(args)
        .args(["--data-dir", data, "--listen", &listen])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let server = Server { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while cli(&url, token, &["site", "list"]).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "kiln server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, url)
}

#[test]
fn operator_first_hour_and_no_secret_in_logs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.display().to_string();

    let token = admin_token(&data_s);
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

    // A DHCP that would send PXE clients a file nothing serves (TFTP
    // off) is refused at start-up, with the fix, before anything opens.
    let off_data = dir.path().join("tftp-off");
    let off_cfg = dir.path().join("tftp-off.toml");
    std::fs::write(
        &off_cfg,
        format!(
            "data_dir = \"{}\"\n[dhcp]\nmode = \"proxy\"\ninterfaces = [\"lo\"]\nport = 0\n[tftp]\nenabled = false\n",
            off_data.display()
        ),
    )
    .unwrap();
    let out = Command::new(KILN)
        .args(["server", "--config"])
        .arg(&off_cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("[dhcp] sends BIOS PXE clients `undionly.kpxe` by TFTP from this server, but TFTP is off")
            && err.contains("remove `enabled = false`"),
        "{err}"
    );
    assert!(!off_data.exists(), "the refused server made its data directory");

    let log_path = dir.path().join("server.log");
    let (mut server, url) = start_server(&["--log", "trace"], &data_s, &log_path, &token);
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
    // The system disk (seed 004): set by serial or WWN, cleared with `-`.
    let edit = |value: &str| {
        let out = cli(
            &url,
            &token,
            &["machine", "edit", "db1001", "--system-disk", value, "-o", "json"],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["system_disk"].clone()
    };
    assert_eq!(edit("0x5000c500a1b2c3d4"), "0x5000c500a1b2c3d4");
    assert_eq!(edit("-"), serde_json::Value::Null);
    let shown = [
        out.stdout,
        cli(&url, &token, &["machine", "show", "db1001", "-o", "json"]).stdout,
        cli(&url, &token, &["events", "-o", "json"]).stdout,
    ];
    for s in &shown {
        assert!(!String::from_utf8_lossy(s).contains(CANARY));
    }

    // A tenant's reimage with a plaintext root password: kept only as a
    // hash, answered, logged and passed to no process in the clear.
    let sha = "ab".repeat(32);
    let os = [
        "os",
        "add",
        "--name",
        "debian",
        "--version",
        "12",
        "--kind",
        "disk-image",
        "--source",
        "images/debian-12.raw",
        "--sha256",
        &sha,
    ];
    assert!(cli(&url, &token, &os).status.success());
    let tenant = cli(
        &url,
        &token,
        &["token", "create", "--role", "tenant", "--tenant", "acme"],
    );
    assert!(tenant.status.success(), "{}", String::from_utf8_lossy(&tenant.stderr));
    let tenant = String::from_utf8(tenant.stdout).unwrap().trim().to_string();
    kiln_client::install_tls_provider();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{url}/api/v1/machines/db1001/reimage"))
            .bearer_auth(&tenant)
            .json(&serde_json::json!({"os": "debian-12", "root_password": TENANT_CANARY}))
            .send()
            .await
            .unwrap();
        resp.text().await.unwrap()
    });
    assert!(!answer.contains(TENANT_CANARY), "{answer}");
    for pid in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(pid.path().join("cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(TENANT_CANARY),
            "a process's arguments"
        );
    }

    let db = std::fs::read(data.join("kiln.db")).unwrap();
    let wal = std::fs::read(data.join("kiln.db-wal")).unwrap_or_default();
    for canary in [CANARY, TENANT_CANARY] {
        assert!(!String::from_utf8_lossy(&db).contains(canary) && !String::from_utf8_lossy(&wal).contains(canary));
    }

    // Stop the server and read everything it logged.
    let _ = server.child.kill();
    let _ = server.child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("kiln server started"), "{log}");
    assert!(log.contains("/api/v1/machines"), "trace logging was on: {log}");
    assert!(!log.contains(CANARY), "the BMC password reached the log");
    assert!(
        !log.contains(TENANT_CANARY),
        "the tenant's root password reached the log"
    );
    assert!(
        log.contains("/reimage"),
        "the tenant's reimage was logged at trace level: {log}"
    );
    assert!(!log.contains(&token[5..]), "the token reached the log");
}

/// At most 20 bytes: an IPMI 2.0 password.
const BMC_CANARY: &str = "canary-7Qz-bmc-pw";

/// Every `/proc/PID/cmdline` on the machine, with its PID.
fn all_cmdlines() -> Vec<(String, String)> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.chars().all(|c| c.is_ascii_digit())
            && let Ok(raw) = std::fs::read(e.path().join("cmdline"))
        {
            out.push((name, String::from_utf8_lossy(&raw).replace('\0', " ")));
        }
    }
    out
}

/// ipmi_sim on a loopback port with user `admin` and `password`; killed by
/// PID on drop. The directory holds its config and state while it runs.
struct IpmiSim(Child, #[allow(dead_code)] tempfile::TempDir, u16);

impl Drop for IpmiSim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ipmi_sim(password: &str) -> IpmiSim {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = dir.path();
    std::fs::write(
        d.join("lan.conf"),
        format!(
            "name \"kilnbin\"\nset_working_mc 0x20\n  startlan 1\n    addr 127.0.0.1 {port}\n    priv_limit admin\n\
             allowed_auths_callback none md2 md5 straight\n    allowed_auths_user none md2 md5 straight\n\
             allowed_auths_operator none md2 md5 straight\n    allowed_auths_admin none md2 md5 straight\n\
             guid 4c616200000040008000000000000077\n  endlan\n\
             user 1 false \"\" \"\" user 1 none\n  user 2 true \"admin\" \"{password}\" admin 10 none md2 md5 straight\n"
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("sim.emu"),
        "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n",
    )
    .unwrap();
    std::fs::create_dir(d.join("state")).unwrap();
    let child = Command::new("ipmi_sim")
        .args(["-n", "-c"])
        .arg(d.join("lan.conf"))
        .arg("-f")
        .arg(d.join("sim.emu"))
        .arg("-s")
        .arg(d.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ipmi_sim (Debian package openipmi) is missing: scripts/test installs it");
    IpmiSim(child, dir, port)
}

/// The BMC password, used for real by the IPMI driver (a full RAKP
/// session with ipmi_sim) and handed to a command driver's program, shows
/// in no log line at trace level, no process's arguments, no API answer,
/// no audit event and nowhere in the database file.
#[test]
fn the_bmc_password_reaches_no_log_argv_answer_or_database() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.display().to_string();
    let token = admin_token(&data_s);
    let sim = ipmi_sim(BMC_CANARY);
    let seen = dir.path().join("password.sha256");
    // The program proves it got the password (its hash, so the canary
    // lands in no file) and takes a second, so its command line can be read.
    let script = format!(
        "printf %s \"$KILN_BMC_PASSWORD\" | sha256sum >{}; sleep 1",
        seen.display()
    );
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[bmc.command]\npower_on = [\"/bin/sh\", \"-c\", '{script}', \"kiln-canary-pdu\", \"{{hostname}}\", \"{{bmc_address}}\"]\n"
        ),
    )
    .unwrap();
    let log_path = dir.path().join("server.log");
    let config_s = config.display().to_string();
    let (mut server, url) = start_server(&["--config", &config_s, "--log", "trace"], &data_s, &log_path, &token);
    let add = |host: &str, driver: &str, address: &str| {
        let out = Command::new(KILN)
            .args(["machine", "add", "--hostname", host, "--bmc-driver", driver])
            .args(["--bmc-address", address, "--bmc-user", "admin"])
            .env("KILN_URL", &url)
            .env("KILN_TOKEN", &token)
            .env("KILN_BMC_PASSWORD", BMC_CANARY)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    add("ipmi1", "ipmi", &format!("127.0.0.1:{}", sim.2));
    add("pdu1", "command", "outlet-7");

    // IPMI: a real session (ipmi_sim may need a moment to listen).
    let mut answers = vec![];
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cli(&url, &token, &["bmc", "check", "ipmi1", "-o", "json"]);
        answers.push(out.stdout.clone());
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < end, "{}", String::from_utf8_lossy(&out.stdout));
        std::thread::sleep(Duration::from_millis(200));
    }
    // (No chassis hook here, so a read; the API tests drive power.)
    let out = cli(&url, &token, &["power", "status", "ipmi1", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    answers.push(out.stdout);

    // Command driver: watch every process's arguments while it runs.
    let mut power = Command::new(KILN)
        .args(["power", "on", "pdu1", "-o", "json"])
        .env("KILN_URL", &url)
        .env("KILN_TOKEN", &token)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut saw_program = false;
    let end = Instant::now() + Duration::from_secs(10);
    while power.try_wait().unwrap().is_none() {
        for (pid, cmdline) in all_cmdlines() {
            assert!(
                !cmdline.contains(BMC_CANARY),
                "process {pid} has the password in its arguments: {cmdline}"
            );
            saw_program |= cmdline.contains("kiln-canary-pdu");
        }
        assert!(Instant::now() < end, "kiln power on did not finish");
    }
    assert!(saw_program, "the scan saw the program running");
    let mut out = String::new();
    power.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(power.wait().unwrap().success(), "{out}");
    answers.push(out.into_bytes());
    let want = {
        let o = Command::new("sh")
            .args(["-c", &format!("printf %s '{BMC_CANARY}' | sha256sum")])
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap(),
        want,
        "the program got the password"
    );

    answers.push(cli(&url, &token, &["events", "-o", "json"]).stdout);
    answers.push(cli(&url, &token, &["machine", "show", "ipmi1", "-o", "json"]).stdout);
    for a in &answers {
        assert!(!String::from_utf8_lossy(a).contains(BMC_CANARY));
    }
    let events = String::from_utf8_lossy(answers.last().unwrap()).to_string();
    assert!(events.contains("password_set"), "{events}");
    let db = std::fs::read(data.join("kiln.db")).unwrap();
    let wal = std::fs::read(data.join("kiln.db-wal")).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&db).contains(BMC_CANARY) && !String::from_utf8_lossy(&wal).contains(BMC_CANARY));

    let _ = server.child.kill();
    let _ = server.child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("BMC call"), "the BMC calls were logged: {log}");
    assert!(
        log.contains("RMCP+ session open"),
        "an IPMI session ran at debug level: {log}"
    );
    assert!(!log.contains(BMC_CANARY), "the BMC password reached the log");
}

/// `kiln server` keeps a Redfish BMC's session from one call to the next,
/// and ends it when it stops (SIGTERM): a restart leaves no session behind
/// to fill the BMC's few session slots.
#[test]
fn a_stopping_server_closes_the_redfish_sessions_it_kept() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt
        .block_on(kiln_sim::start(kiln_sim::SimConfig {
            tls: true,
            password: CANARY.into(),
            ..kiln_sim::SimConfig::default()
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("bmc-ca.pem");
    std::fs::write(&ca, sim.ca_pem().unwrap()).unwrap();
    let data_s = dir.path().join("data").display().to_string();
    let token = admin_token(&data_s);
    let (mut server, url) = start_server(&[], &data_s, &dir.path().join("server.log"), &token);
    let ca_s = ca.display().to_string();
    let out = cli(
        &url,
        &token,
        &[
            "machine",
            "add",
            "--hostname",
            "rf1",
            "--mac",
            "52:54:00:00:07:01",
            "--bmc-driver",
            "redfish",
            "--bmc-address",
            sim.bmc(0).url(),
            "--bmc-user",
            "admin",
            "--bmc-password",
            CANARY,
            "--bmc-ca-file",
            &ca_s,
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for _ in 0..2 {
        let out = cli(&url, &token, &["power", "status", "rf1"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let s = sim.bmc(0).stats();
    assert_eq!((s.sessions_created, s.sessions_deleted), (1, 0), "one session, kept");

    let pid = nix::unistd::Pid::from_raw(server.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "kiln server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = sim.bmc(0).stats();
    assert_eq!(s.sessions_deleted, 1, "the kept session was closed");
    assert!(sim.bmc(0).with(|b| b.sessions.is_empty()));
}
