//! The CLI verbs, driven in-process against a real server on both backends.
//! One binary; a module per area beyond the first ones here.

mod jobs;
mod network;
mod tls;
mod tokens;

use std::io::Write;
use std::sync::{Arc, Mutex};

use clap::Parser;
use kiln_test_utils::{TestServer, api_test};
use kiln_types::machine::{Machine, MachineFilter};

#[derive(Clone, Default)]
pub(crate) struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `kiln ARGS` against `srv` with `token`; returns (exit code, stdout).
pub(crate) async fn kiln(srv: &TestServer, token: &str, args: &[&str]) -> (i32, String) {
    let buf = Buf::default();
    let mut argv = vec![
        "kiln".to_string(),
        "--url".into(),
        srv.url.clone(),
        "--token".into(),
        token.into(),
    ];
    argv.extend(args.iter().map(|s| s.to_string()));
    let code = kiln_cli::run(argv, Box::new(buf.clone())).await;
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (code, out)
}

/// Runs `kiln ARGS` against `srv` and returns the error the verb failed
/// with, as the user sees it on stderr (`kiln_cli::run` prints it there).
pub(crate) async fn kiln_error(srv: &TestServer, token: &str, args: &[&str]) -> String {
    let mut argv = vec!["kiln", "--url", &srv.url, "--token", token];
    argv.extend(args);
    let cli = kiln_cli::Cli::try_parse_from(argv).expect("the arguments parse");
    let ctx = kiln_cli::Ctx::new(Some(srv.url.clone()), Some(token.to_string()));
    let mut out = kiln_cli::output::Out::new(cli.output, Box::new(Buf::default()));
    match kiln_cli::dispatch(cli.command, &ctx, &mut out).await {
        Ok(()) => panic!("kiln {args:?} succeeded"),
        Err(e) => format!("{e:#}"),
    }
}

pub(crate) fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

api_test!(import_a_rack_all_or_nothing, |srv| {
    let t = srv.admin_token.clone();
    assert_eq!(kiln(&srv, &t, &["site", "add", "eqiad"]).await.0, 0);
    assert_eq!(kiln(&srv, &t, &["rack", "add", "a1", "--site", "eqiad"]).await.0, 0);
    let dir = tempfile::tempdir().unwrap();
    let broken = write(
        dir.path(),
        "broken.csv",
        "hostname,rack,mac,switch,port,tags\n\
        db1001,a1,52:54:00:00:00:01,asw-a1,xe-0/0/1,db\n\
        db1002,a1,not-a-mac,asw-a1,xe-0/0/2,db\n\
        db1003,a1,52:54:00:00:00:03,asw-a1,xe-0/0/3,bad tag!\n",
    );
    let (code, _) = kiln(&srv, &t, &["machine", "import", &broken]).await;
    assert_eq!(code, 1);
    assert!(
        srv.admin()
            .list_machines(&MachineFilter::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // A file that parses but clashes with the database: reported by line.
    assert_eq!(
        kiln(
            &srv,
            &t,
            &["machine", "add", "--hostname", "old1", "--mac", "52:54:00:00:00:09"]
        )
        .await
        .0,
        0
    );
    let clash = write(
        dir.path(),
        "clash.yaml",
        "- hostname: db1001\n  rack: a1\n- hostname: db1002\n  nics:\n  - mac: 52:54:00:00:00:09\n",
    );
    let (code, _) = kiln(&srv, &t, &["machine", "import", &clash]).await;
    assert_eq!(code, 1);
    let ctx = kiln_cli::Ctx::new(Some(srv.url.clone()), Some(t.clone()));
    let mut sink = kiln_cli::output::Out::new(kiln_cli::output::Format::Table, Box::new(Buf::default()));
    let err = kiln_cli::import::run(std::path::Path::new(&clash), None, false, &ctx, &mut sink)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 problem; nothing was imported"), "{err}");
    assert!(
        err.contains("line 3: nics[0].mac: MAC 52:54:00:00:00:09 is already used by machine old1"),
        "{err}"
    );
    let err = kiln_cli::import::run(std::path::Path::new(&broken), None, false, &ctx, &mut sink)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 problems")
            && err.contains("line 3: nics[0].mac: invalid MAC")
            && err.contains("line 4: tags[1]"),
        "{err}"
    );
    assert_eq!(
        srv.admin()
            .list_machines(&MachineFilter::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    let good = write(
        dir.path(),
        "rack.csv",
        "hostname,rack,mac,switch,port,tags,bmc_driver,bmc_address\n\
        db1001,a1,52:54:00:00:00:01,asw-a1,xe-0/0/1,db;bm,ipmi,10.0.0.1\n\
        db1001,,52:54:00:00:00:11,asw-a1,xe-0/0/11,,,\n\
        db1002,a1,52:54:00:00:00:02,asw-a1,xe-0/0/2,db,ipmi,10.0.0.2\n",
    );
    let (code, out) = kiln(&srv, &t, &["machine", "import", "--dry-run", &good]).await;
    assert_eq!(code, 0);
    assert!(out.contains("2 machines are valid"), "{out}");
    assert_eq!(kiln(&srv, &t, &["machine", "import", &good]).await.0, 0);
    let (code, out) = kiln(&srv, &t, &["machine", "list", "--tag", "db", "--output", "json"]).await;
    assert_eq!(code, 0);
    let listed: Vec<Machine> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        listed.iter().map(|m| m.hostname.as_str()).collect::<Vec<_>>(),
        ["db1001", "db1002"]
    );
    assert_eq!(listed[0].nics.len(), 2);
    let (_, table) = kiln(&srv, &t, &["machine", "list", "--rack", "a1"]).await;
    assert!(table.contains("HOSTNAME") && table.contains("eqiad/a1"), "{table}");
    let (code, _) = kiln(
        &srv,
        &t,
        &[
            "machine",
            "edit",
            "db1002",
            "--add-mac",
            "52:54:00:00:00:22",
            "--remove-mac",
            "52:54:00:00:00:02",
            "--add-tag",
            "hot",
        ],
    )
    .await;
    assert_eq!(code, 0);
    let m = srv.admin().get_machine("db1002").await.unwrap();
    assert_eq!(
        m.nics.iter().map(|n| n.label()).collect::<Vec<_>>(),
        ["52:54:00:00:00:22"]
    );
    assert!(m.tags.iter().any(|t| t.as_str() == "hot"));
    // Taking db1001's MAC is refused, nothing changes.
    let (code, _) = kiln(
        &srv,
        &t,
        &["machine", "edit", "db1002", "--add-mac", "52:54:00:00:00:11"],
    )
    .await;
    assert_eq!(code, 1);
    assert_eq!(srv.admin().get_machine("db1002").await.unwrap().nics.len(), 1);
    let (_, events) = kiln(&srv, &t, &["events", "--target", "db1002"]).await;
    assert!(events.contains("machine.create"), "{events}");
});

api_test!(machines_enrolled_by_switch_port, |srv| {
    // Issue 15: `machine add` with a port and no MAC, `edit --add-port` /
    // `--remove-port`, and `confirm-port` with nothing to confirm.
    let t = srv.admin_token.clone();
    let (code, out) = kiln(
        &srv,
        &t,
        &[
            "machine",
            "add",
            "--hostname",
            "racked1",
            "--circuit-id",
            "xe-0/0/7",
            "--remote-id",
            "asw-a1",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let m = srv.admin().get_machine("racked1").await.unwrap();
    assert_eq!(m.nics.len(), 1);
    assert_eq!(
        (
            m.nics[0].mac,
            m.nics[0].circuit_id.as_deref(),
            m.nics[0].remote_id.as_deref()
        ),
        (None, Some("xe-0/0/7"), Some("asw-a1"))
    );
    let (code, out) = kiln(
        &srv,
        &t,
        &[
            "machine",
            "edit",
            "racked1",
            "--add-port",
            "remote-id=rack7-port2",
            "--remove-port",
            "circuit-id=xe-0/0/7,remote-id=asw-a1",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let m = srv.admin().get_machine("racked1").await.unwrap();
    assert_eq!(m.nics.len(), 1);
    assert_eq!(
        (m.nics[0].mac, m.nics[0].remote_id.as_deref()),
        (None, Some("rack7-port2"))
    );
    let (code, out) = kiln(&srv, &t, &["machine", "edit", "racked1", "--add-port", "port=1"]).await;
    assert_ne!(code, 0, "a malformed port is refused: {out}");
    assert_eq!(srv.admin().get_machine("racked1").await.unwrap().nics.len(), 1);
    let e = kiln_error(&srv, &t, &["machine", "confirm-port", "racked1"]).await;
    assert!(e.contains("no port alert"), "{e}");
});

api_test!(offline_bootstrap_token_works_with_the_server, |srv| {
    let dir = srv.config.data_dir.display().to_string();
    let mut args = vec![
        "kiln".to_string(),
        "token".into(),
        "create".into(),
        "--data-dir".into(),
        dir,
        "--role".into(),
        "operator".into(),
    ];
    if let Some(url) = &srv.config.database_url {
        args.extend(["--database-url".to_string(), url.clone()]);
    }
    let buf = Buf::default();
    assert_eq!(kiln_cli::run(args, Box::new(buf.clone())).await, 0);
    let token = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let token = token.trim();
    assert!(
        token.starts_with("kiln_") && !token.contains(char::is_whitespace),
        "stdout is only the token: {token:?}"
    );
    let (code, out) = kiln(
        &srv,
        token,
        &[
            "machine",
            "add",
            "--hostname",
            "op1",
            "--mac",
            "52:54:00:00:00:01",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let (code, _) = kiln(&srv, "kiln_wrong", &["machine", "list"]).await;
    assert_eq!(code, 1);
});

#[tokio::test]
async fn bad_flags_are_usage_errors() {
    let srv = TestServer::start(kiln_test_utils::Backend::Sqlite).await;
    let t = srv.admin_token.clone();
    assert_eq!(
        kiln(&srv, &t, &["machine", "add", "--hostname", "x1", "--mac", "zz"])
            .await
            .0,
        2
    );
    assert_eq!(kiln(&srv, &t, &["machine", "list", "--state", "sleeping"]).await.0, 2);
    assert_eq!(kiln(&srv, &t, &["machine", "show", "nope"]).await.0, 1);
    srv.stop().await;
}

api_test!(the_example_racks_import, |srv| {
    let t = srv.admin_token.clone();
    for args in [
        &["site", "add", "eqiad"][..],
        &["rack", "add", "a1", "--site", "eqiad", "--row", "a"],
        &["site", "add", "codfw"],
        &["rack", "add", "b1", "--site", "codfw", "--row", "b"],
        &["tenant", "add", "acme"],
    ] {
        assert_eq!(kiln(&srv, &t, args).await.0, 0, "{args:?}");
    }
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    for file in ["rack-a1.csv", "rack-b1.yaml"] {
        let (code, out) = kiln(&srv, &t, &["machine", "import", &format!("{examples}/{file}")]).await;
        assert_eq!(code, 0, "{file}: {out}");
    }
    let all = srv
        .admin()
        .list_machines(&MachineFilter::default())
        .await
        .unwrap()
        .items;
    assert_eq!(all.len(), 8);
    // Issue 15: one machine of each file is enrolled by its switch port only.
    for (host, port) in [("db1003", "xe-0/0/5"), ("web2003", "asw-b1:ge-0/0/3")] {
        let m = all.iter().find(|m| m.hostname.as_str() == host).unwrap();
        assert_eq!(
            (m.nics[0].mac, m.nics[0].circuit_id.as_deref()),
            (None, Some(port)),
            "{host}"
        );
    }
    let gpu = srv
        .admin()
        .list_machines(&MachineFilter {
            tag: Some("gpu".into()),
            owner: Some("acme".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(gpu.items.len(), 2);
});

/// A self-signed test CA (P-256, valid until 2126), made with `openssl req
/// -x509`; the server parses it, so it must be a real certificate.
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBjTCCATOgAwIBAgIUMwhF17kf44dJPGH+9Bb3aC0YABMwCgYIKoZIzj0EAwIw\n\
GzEZMBcGA1UEAwwQa2lsbiBDTEkgdGVzdCBDQTAgFw0yNjEyMDUyMzA0NTNaGA8y\n\
MTI2MTExMTIzMDQ1M1owGzEZMBcGA1UEAwwQa2lsbiBDTEkgdGVzdCBDQTBZMBMG\n\
ByqGSM49AgEGCCqGSM49AwEHA0IABAN9HFtclcBWJ1wAkp2YChbGP//4TiS4yX7a\n\
roVnCr/ehv/0Hs88H9F0VF+pPOrgtvXTiKO69/u4geQ//QdqcNSjUzBRMB0GA1Ud\n\
DgQWBBSx35ccgfmPYVJxF6szxWL9veEVTzAfBgNVHSMEGDAWgBSx35ccgfmPYVJx\n\
F6szxWL9veEVTzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIFlr\n\
I/Z1EDQV4DkS7jcvWHDLO7o3h38qL5X1Mm6ppzHtAiEA9l3O6xDtFOd13dCfF8Lr\n\
fVrp/kQLMpZVT6So47gbpg4=\n\
-----END CERTIFICATE-----\n\
";

api_test!(machine_bmc_tls_flags, |srv| {
    let t = srv.admin_token.clone();
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "site-ca.pem", TEST_CA);
    let admin = srv.admin();
    let bmc = async |host: &str| admin.get_machine(host).await.unwrap().bmc.unwrap();
    let add = [
        "machine",
        "add",
        "--hostname",
        "rf1",
        "--bmc-driver",
        "redfish",
        "--bmc-address",
        "https://10.0.0.5",
        "--bmc-user",
        "admin",
        "--bmc-password",
        "pw",
        "--bmc-ca-file",
        &ca,
    ];
    let (code, out) = kiln(&srv, &t, &add).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(TLS checked against its own CA too)"), "{out}");
    assert_eq!(bmc("rf1").await.ca_cert.as_deref(), Some(TEST_CA));
    // Insecure and a CA together are refused: say which.
    assert_eq!(kiln(&srv, &t, &["machine", "edit", "rf1", "--bmc-insecure"]).await.0, 1);
    let (code, out) = kiln(
        &srv,
        &t,
        &["machine", "edit", "rf1", "--bmc-insecure", "--bmc-ca-file", "-"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(TLS certificate NOT checked: insecure)"), "{out}");
    let b = bmc("rf1").await;
    assert!(
        b.insecure && b.ca_cert.is_none() && b.password_set,
        "user and password kept: {b:?}"
    );
    assert_eq!(b.username.as_deref(), Some("admin"));
    // A new password (the whole BMC restated) keeps the TLS settings.
    let (code, _) = kiln(
        &srv,
        &t,
        &[
            "machine",
            "edit",
            "rf1",
            "--bmc-driver",
            "redfish",
            "--bmc-address",
            "https://10.0.0.5",
            "--bmc-password",
            "pw2",
        ],
    )
    .await;
    assert_eq!(code, 0);
    assert!(bmc("rf1").await.insecure);
    assert_eq!(
        kiln(&srv, &t, &["machine", "edit", "rf1", "--bmc-insecure=false"])
            .await
            .0,
        0
    );
    assert!(!bmc("rf1").await.insecure);
    let events = srv
        .admin()
        .list_events(&kiln_types::event::EventFilter {
            target: Some("rf1".into()),
            action: Some("machine.update".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .items;
    let flags: Vec<(bool, bool)> = events
        .iter()
        .map(|e| {
            let flag = |v: &Option<serde_json::Value>| v.as_ref().unwrap()["bmc"]["insecure"].as_bool().unwrap();
            (flag(&e.before), flag(&e.after))
        })
        .collect();
    assert_eq!(flags, [(true, false), (true, true), (false, true)], "newest first");
    // Not for a driver without TLS, nor without a BMC at all.
    let ipmi = [
        "machine",
        "add",
        "--hostname",
        "ip1",
        "--bmc-driver",
        "ipmi",
        "--bmc-address",
        "10.0.0.6",
        "--bmc-insecure",
    ];
    assert_eq!(kiln(&srv, &t, &ipmi).await.0, 1);
    assert_eq!(kiln(&srv, &t, &["machine", "add", "--hostname", "bare1"]).await.0, 0);
    assert_eq!(
        kiln(&srv, &t, &["machine", "edit", "bare1", "--bmc-ca-file", &ca])
            .await
            .0,
        1
    );
    assert_eq!(
        kiln(
            &srv,
            &t,
            &["machine", "edit", "rf1", "--bmc-ca-file", "/nonexistent.pem"]
        )
        .await
        .0,
        1
    );
});

/// A server whose command driver keeps each machine's power in the file
/// named by its BMC address.
fn pdu_settings() -> kiln_server::Settings {
    let script = r#"f=$1; case $2 in on) echo on >"$f";; off) echo off >"$f";; cycle) echo on >"$f";; status) cat "$f" 2>/dev/null || echo off;; boot) echo "$3 $4" >"$f.boot";; esac"#;
    let t = |verb: &str| {
        format!(r#"["/bin/sh", "-c", '{script}', "pdu", "{{bmc_address}}", "{verb}", "{{device}}", "{{persistence}}"]"#)
    };
    let t2 = |verb: &str| format!(r#"["/bin/sh", "-c", '{script}', "pdu", "{{bmc_address}}", "{verb}"]"#);
    let text = format!(
        "[bmc.command]\npower_on = {}\npower_off = {}\npower_cycle = {}\npower_status = {}\nbootdev = {}\n",
        t2("on"),
        t2("off"),
        t2("cycle"),
        t2("status"),
        t("boot")
    );
    toml::from_str(&text).expect("pdu settings")
}

api_test!(
    power_bootdev_and_check_for_many_hosts,
    settings = pdu_settings(),
    |srv| {
        let t = srv.admin_token.clone();
        let dir = tempfile::tempdir().unwrap();
        for h in ["p1", "p2", "p3"] {
            let addr = dir.path().join(h).display().to_string();
            let args = [
                "machine",
                "add",
                "--hostname",
                h,
                "--tag",
                "pdu",
                "--bmc-driver",
                "command",
                "--bmc-address",
                &addr,
            ];
            assert_eq!(kiln(&srv, &t, &args).await.0, 0);
        }
        // A machine without a BMC among them: its row fails, the others work.
        assert_eq!(
            kiln(&srv, &t, &["machine", "add", "--hostname", "p4", "--tag", "pdu"])
                .await
                .0,
            0
        );
        let (code, out) = kiln(&srv, &t, &["power", "on", "--tag", "pdu"]).await;
        assert_eq!(code, 1, "one host failed: {out}");
        for h in ["p1", "p2", "p3"] {
            assert!(
                out.lines().any(|l| l.contains(h) && l.contains("power on: done")),
                "{out}"
            );
        }
        assert!(
            out.lines().any(|l| l.contains("p4") && l.contains("has no BMC")),
            "{out}"
        );

        let (code, out) = kiln(&srv, &t, &["power", "status", "p1", "p2", "-o", "json"]).await;
        assert_eq!(code, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["hostname"], "p1");
        assert_eq!(v[0]["result"]["state"], "on");
        assert_eq!(v[1]["ok"], true);

        assert_eq!(kiln(&srv, &t, &["power", "off", "p2"]).await.0, 0);
        let (_, out) = kiln(&srv, &t, &["power", "status", "--tag", "pdu"]).await;
        assert!(out.lines().any(|l| l.contains("p2") && l.contains("off")), "{out}");
        assert!(out.lines().any(|l| l.contains("p3") && l.contains("on")), "{out}");

        let (code, out) = kiln(&srv, &t, &["bootdev", "pxe", "--once", "p1", "p3"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("network (next boot)"), "{out}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("p3.boot")).unwrap(),
            "network once\n"
        );
        // `http` is UEFI HTTP boot, UEFI implied.
        let (code, out) = kiln(&srv, &t, &["bootdev", "http", "p1"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("uefi_http (until changed, UEFI)"), "{out}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("p1.boot")).unwrap(),
            "uefi_http persistent\n"
        );
        let (code, out) = kiln(&srv, &t, &["bmc", "check", "p1"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("command"), "{out}");
        let (code, _) = kiln(&srv, &t, &["power", "cycle"]).await;
        assert_eq!(code, 1, "no host named and no selector");
    }
);

/// Runs `kiln ARGS` with no server around it (`kiln demo` starts its own);
/// returns (exit code, stdout).
async fn kiln_alone(args: &[&str]) -> (i32, String) {
    let buf = Buf::default();
    let argv = std::iter::once("kiln")
        .chain(args.iter().copied())
        .map(str::to_string)
        .collect();
    let code = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        kiln_cli::run(argv, Box::new(buf.clone())),
    )
    .await
    .expect("the command ends");
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (code, out)
}

/// The README's first command, shortened: the demo enrolls its fleet with
/// simulated BMCs and reimages a few machines through the real DHCP, HTTP
/// boot, BMC and stage-report paths; `--exit-when-done` ends it after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_simulated_machines_being_reimaged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let data = data.to_str().unwrap();
    let args = [
        "demo",
        "--data-dir",
        data,
        "--listen",
        "127.0.0.1:0",
        "--per-rack",
        "3",
        "--reimage",
        "2",
        "--stage-secs",
        "0.2",
        "--exit-when-done",
    ];
    let (code, out) = kiln_alone(&args).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(6 machines enrolled now)"), "{out}");
    assert!(out.contains("export KILN_TOKEN=kiln_"), "{out}");
    assert!(out.contains("kiln job watch "), "{out}");
    assert_eq!(out.matches(" succeeded\n").count(), 2, "{out}");
    assert!(out.contains("stage 5: hello from the new OS"), "{out}");
    assert!(out.contains("the machine: DHCP lease 127.77."), "{out}");
    assert!(out.contains("booted Pxe then Hdd"), "{out}");
    assert!(out.contains("demo reimages done: 2 of 2 succeeded"), "{out}");

    // Again on the same data directory: nothing enrolled twice, the BMCs
    // re-enrolled on this run's ports, the same machines reimaged again.
    let (code, out) = kiln_alone(&args).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(0 machines enrolled now)"), "{out}");
    assert!(out.contains("demo reimages done: 2 of 2 succeeded"), "{out}");

    // --seed-only enrolls and exits: no fleet, no reimage.
    let fresh = dir.path().join("seeded");
    let (code, out) = kiln_alone(&[
        "demo",
        "--data-dir",
        fresh.to_str().unwrap(),
        "--per-rack",
        "2",
        "--seed-only",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("(4 machines enrolled now)") && !out.contains("reimaging"),
        "{out}"
    );
}
