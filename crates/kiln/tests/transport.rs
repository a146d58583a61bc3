//! The real binary's transport (issue 14): `kiln server` with a generated
//! TLS certificate and the CLI pinning it by fingerprint; a plain-HTTP API
//! on an address other than loopback refused unless the config allows it
//! (in a network namespace the test makes, on an address of its own).

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{KILN, Netns, Proc, bootstrap_token, ip, require_root_and};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cli(url: &str, token: &str, fingerprint: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(KILN);
    cmd.args(args)
        .env("KILN_URL", url)
        .env("KILN_TOKEN", token)
        .env_remove("KILN_OUTPUT")
        .env_remove("KILN_CA_FILE")
        .env_remove("KILN_FINGERPRINT");
    if let Some(fp) = fingerprint {
        cmd.env("KILN_FINGERPRINT", fp);
    }
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_tls_server_is_pinned_by_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.display().to_string();
    let config = dir.path().join("kiln.toml");
    std::fs::write(&config, "[api]\ntls = true\n").unwrap();
    let token = bootstrap_token(&data);
    let listen = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("server.log");
    let child = Command::new(KILN)
        .args(["server", "--config"])
        .arg(&config)
        .args(["--data-dir", &data_s, "--listen", &listen])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let server = Proc { child, log };
    server.wait_for("kiln server started", Duration::from_secs(20));

    // The fingerprint the server logged is the one `kiln server
    // fingerprint` reads on the server.
    let out = Command::new(KILN)
        .args(["server", "fingerprint", "--data-dir", &data_s])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let fp = text(&out.stdout).trim().to_string();
    assert!(fp.starts_with("sha256:") && fp.len() == 71, "{fp}");
    let logged = server.log_text();
    assert!(
        logged.contains(&fp) && logged.contains(&format!("https://{listen}")),
        "{logged}"
    );
    // A token made offline comes with the line that pins the server.
    let out = Command::new(KILN)
        .args(["token", "create", "--data-dir", &data_s, "--role", "operator"])
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains(&format!("export KILN_FINGERPRINT={fp}")),
        "{}",
        text(&out.stderr)
    );

    let url = format!("https://{listen}");
    let ok = cli(&url, &token, Some(&fp), &["site", "add", "eqiad"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let wrong = format!("sha256:{}", "0f".repeat(32));
    let refused = cli(&url, &token, Some(&wrong), &["site", "add", "codfw"]);
    assert_eq!(refused.status.code(), Some(1));
    let e = text(&refused.stderr);
    assert!(e.contains(&format!("fingerprint {fp}, not the pinned {wrong}")), "{e}");
    let unpinned = cli(&url, &token, None, &["site", "list"]);
    assert!(
        text(&unpinned.stderr).contains("KILN_FINGERPRINT="),
        "{}",
        text(&unpinned.stderr)
    );
    let list = cli(&url, &token, Some(&fp), &["site", "list", "-o", "json"]);
    let sites: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(
        sites.as_array().unwrap().len(),
        1,
        "only the pinned call went through: {sites}"
    );
}

#[test]
fn a_plain_api_off_loopback_needs_the_explicit_allow() {
    require_root_and(&[("ip", "iproute2")]);
    let ns = Netns::new(format!("kiln-plain-{}", std::process::id()));
    ip(&[
        "-n", &ns.0, "link", "add", "prov0", "type", "veth", "peer", "name", "prov1",
    ]);
    ip(&["-n", &ns.0, "link", "set", "prov1", "up"]);
    ip(&["-n", &ns.0, "addr", "add", "10.213.77.1/24", "dev", "prov0"]);
    ip(&["-n", &ns.0, "link", "set", "prov0", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("kiln.toml");
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\nlisten = \"10.213.77.1:7070\"\n{extra}",
                data.display()
            ),
        )
        .unwrap()
    };
    write("");
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, KILN, "server", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused at once, not after serving"
    );
    let e = text(&out.stderr);
    assert!(
        e.contains("10.213.77.1:7070, which is not loopback") && e.contains("allow_plain_http = true"),
        "{e}"
    );

    write("[api]\nallow_plain_http = true\n");
    let token = bootstrap_token(&data);
    let log = dir.path().join("server.log");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, KILN, "server", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let server = Proc { child, log };
    server.wait_for("kiln server started", Duration::from_secs(20));
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, KILN, "site", "list"])
        .env("KILN_URL", "http://10.213.77.1:7070")
        .env("KILN_TOKEN", &token)
        .env_remove("KILN_FINGERPRINT")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), server.log_text());
    drop(server);
}
