//! The CLI verbs, driven in-process against a real server on both backends.

use std::io::Write;
use std::sync::{Arc, Mutex};

use kiln_test_utils::{TestServer, api_test};
use kiln_types::machine::{Machine, MachineFilter};

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

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
async fn kiln(srv: &TestServer, token: &str, args: &[&str]) -> (i32, String) {
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

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
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
    let mut sink = kiln_cli::output::Out {
        format: kiln_cli::output::Format::Table,
        w: Box::new(Buf::default()),
    };
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
        m.nics.iter().map(|n| n.mac.to_string()).collect::<Vec<_>>(),
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
    assert_eq!(all.len(), 6);
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
