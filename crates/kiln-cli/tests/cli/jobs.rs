//! `kiln reimage` and `kiln job …` against a server whose machines have
//! simulated Redfish BMCs (kiln-sim). The test plays the installer: it finds
//! the job token in the iPXE script the armed machine would get
//! (`kiln.token=`) and reports the install stages with it.

use std::time::{Duration, Instant};

use kiln_client::Client;
use kiln_server::Settings;
use kiln_test_utils::{TestServer, api_test};
use kiln_types::Secret;
use kiln_types::catalog::Arch;
use kiln_types::job::{Job, JobDetail, JobFilter, JobState};
use kiln_types::machine::{BmcDriver, BmcInput, Disk, Hardware, MachineCreate, MachineState};

use super::{kiln, kiln_error, write};

const GIB: u64 = 1 << 30;
const MACS: [&str; 2] = ["52:54:00:12:34:01", "52:54:00:12:34:02"];
const SSH_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBkWfjXkG3dPfz3vYHtmn6JhyWqIuh0SLAdY3mbmCqrg ops@example";

/// `bmcs` simulated Redfish BMCs and as many machines, `web1`, `web2`, …,
/// each with the hardware a Debian image needs; the image in the catalog.
async fn fleet(srv: &TestServer, bmcs: usize) -> kiln_sim::Sim {
    let sim = kiln_sim::start(kiln_sim::SimConfig {
        bmcs,
        username: "admin".into(),
        password: "rf-secret".into(),
        ..kiln_sim::SimConfig::default()
    })
    .await
    .unwrap();
    let t = &srv.admin_token;
    let sha = "ab".repeat(32);
    let add_os = [
        "os",
        "add",
        "--name",
        "debian",
        "--version",
        "12",
        "--kind",
        "disk-image",
        "--tag",
        "bm",
        "--min-ram",
        "2G",
        "--min-disk",
        "20G",
        "--source",
        "images/debian-12.raw.zst",
        "--sha256",
        &sha,
    ];
    assert_eq!(kiln(srv, t, &add_os).await.0, 0);
    for (i, mac) in MACS.iter().enumerate().take(bmcs) {
        let mut m = MachineCreate::new(format!("web{}", i + 1).parse().unwrap());
        m.state = MachineState::Deployed;
        m.nics = vec![serde_json::from_value(serde_json::json!({ "mac": mac })).unwrap()];
        m.bmc = Some(BmcInput {
            driver: BmcDriver::Redfish,
            address: sim.bmc(i).url().into(),
            username: Some("admin".into()),
            password: Some(Secret::new("rf-secret")),
            insecure: false,
            ca_cert: None,
        });
        m.hardware = Some(Hardware {
            arch: Some(Arch::X86_64),
            memory_bytes: 8 * GIB,
            disks: ["vda", "vdb"]
                .iter()
                .map(|n| Disk {
                    name: n.to_string(),
                    size_bytes: 100 * GIB,
                    rotational: false,
                    model: None,
                    serial: None,
                    by_id: None,
                })
                .collect(),
            ..Default::default()
        });
        srv.admin().create_machine(&m).await.unwrap();
    }
    sim
}

/// Polls until `done` holds for job `id` (the engine runs in the server).
async fn until(admin: &Client, id: &str, what: &str, done: impl Fn(&Job) -> bool) -> Job {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let job = admin.get_job(id).await.unwrap().job;
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}: {job:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The job token the armed machine with `mac` gets on its kernel command
/// line, from the iPXE script HTTP boot serves it.
async fn job_token(srv: &TestServer, mac: &str) -> String {
    let script = reqwest::get(format!("{}/boot/ipxe?mac={mac}&platform=pcbios", srv.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kiln.token="))
        .unwrap_or_else(|| panic!("no job token in {script}"))
        .to_string()
}

api_test!(a_reimage_watched_to_the_end_while_the_installer_reports, |srv| {
    let sim = fleet(&srv, 1).await;
    let t = srv.admin_token.clone();
    let dir = tempfile::tempdir().unwrap();
    let password = write(dir.path(), "root.pw", "canary-root-pw\n");
    let keys = write(dir.path(), "keys.pub", &format!("{SSH_KEY}\n"));

    // `--watch` runs until the job ends, so in a task of its own while
    // this test plays the installer.
    let args: Vec<String> = [
        "reimage",
        "web1",
        "--os",
        "debian-12",
        "--layout",
        "lvm_raid1",
        "-t",
        "T42",
        "--root-password-file",
        &password,
        "--ssh-key",
        &format!("@{keys}"),
        "--watch",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let watcher = {
        let (srv, t) = (srv.clone(), t.clone());
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kiln(&srv, &t, &args).await
        })
    };

    let admin = srv.admin();
    let job = {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let filter = JobFilter {
                machine: Some("web1".into()),
                ..Default::default()
            };
            if let Some(job) = admin.list_jobs(&filter).await.unwrap().pop() {
                break job;
            }
            assert!(Instant::now() < end, "no job was started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let id = job.id.to_string();
    until(&admin, &id, "the installer wait", |j| j.step == "wait_installer").await;
    let installer = srv.client(Some(&job_token(&srv, MACS[0]).await));
    for (n, what) in [
        (1, "agent started"),
        (2, "image written"),
        (3, "configured"),
        (4, "rebooting"),
        (5, "hello from the new OS — ✓"),
    ] {
        installer.report_stage(&id, n, what).await.unwrap();
    }
    let (code, out) = tokio::time::timeout(Duration::from_secs(60), watcher)
        .await
        .expect("the watch ends with the job")
        .unwrap();
    assert_eq!(code, 0, "{out}");
    // The table of started jobs, then a line per step and stage.
    assert!(out.contains("HOSTNAME") && out.contains(&id), "{out}");
    for line in [
        "web1  reimage of web1 with debian-12 requested by",
        "web1  step validate (1/15)",
        "web1  wait_installer: waiting for stage 1",
        "web1  stage 1/5 installer started: agent started",
        "web1  step wait_finishing (10/15)",
        "web1  stage 3/5 configured",
        "web1  stage 5/5 first boot of the new OS: hello from the new OS — ✓",
        "web1  succeeded in",
    ] {
        assert!(out.contains(line), "no `{line}` in:\n{out}");
    }
    assert!(!out.contains("canary-root-pw"), "{out}");

    let (code, shown) = kiln(&srv, &t, &["job", "show", &id]).await;
    assert_eq!(code, 0, "{shown}");
    for text in [
        "state  succeeded",
        "stage  5 (first boot of the new OS)",
        "ticket  T42",
        "root password  set (hash only)",
        "3 (configured)",
        "hello from the new OS",
    ] {
        assert!(shown.contains(text), "no `{text}` in:\n{shown}");
    }
    let (code, json) = kiln(&srv, &t, &["job", "show", &id, "-o", "json"]).await;
    assert_eq!(code, 0);
    let detail: JobDetail = serde_json::from_str(&json).unwrap();
    assert_eq!(detail.job.state, JobState::Succeeded);
    let stages: Vec<u8> = detail.log.iter().filter_map(|l| l.stage.map(|s| s.0)).collect();
    assert_eq!(stages, [1, 2, 3, 4, 5]);
    assert!(!json.contains("canary-root-pw") && !json.contains("$6$"), "{json}");

    // A watcher that lost its connection picks up after the last line it saw.
    let mut seqs = vec![];
    let end = admin
        .watch_job_after(&id, 5, |e| {
            if let kiln_client::JobEvent::Log(l) = e {
                seqs.push(l.seq);
            }
        })
        .await
        .unwrap();
    assert_eq!(end.state, JobState::Succeeded);
    assert_eq!(seqs.first(), Some(&6));
    assert_eq!(seqs.last(), detail.log.last().map(|l| &l.seq));

    let (_, listed) = kiln(&srv, &t, &["job", "list", "--machine", "web1"]).await;
    assert!(listed.contains(&id) && listed.contains("succeeded"), "{listed}");
    let (_, active) = kiln(&srv, &t, &["job", "list", "--active", "-o", "json"]).await;
    assert_eq!(serde_json::from_str::<Vec<Job>>(&active).unwrap(), []);
    let (_, done) = kiln(&srv, &t, &["job", "list", "--state", "succeeded", "-o", "json"]).await;
    assert_eq!(serde_json::from_str::<Vec<Job>>(&done).unwrap().len(), 1);
    sim.shutdown().await;
});

api_test!(refusals_pause_cancel_and_retry, |srv| {
    let sim = fleet(&srv, 2).await;
    let t = srv.admin_token.clone();

    // The API's reason, with the host it was for.
    let (code, out) = kiln(&srv, &t, &["reimage", "web1", "--os", "nope", "-o", "json"]).await;
    assert_eq!(code, 1);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["hostname"], "web1");
    assert_eq!(rows[0]["ok"], false);
    assert_eq!(rows[0]["error"], "OS image `nope` not found");
    let e = kiln_error(&srv, &t, &["reimage", "web1", "--os", "nope"]).await;
    assert_eq!(e, "web1: OS image `nope` not found");
    let e = kiln_error(
        &srv,
        &t,
        &["reimage", "web1", "--os", "debian-12", "--root-password", "hunter2"],
    )
    .await;
    assert!(e.contains("not the password itself"), "{e}");
    assert!(srv.admin().list_jobs(&JobFilter::default()).await.unwrap().is_empty());

    // Two hosts, a job each.
    let (code, out) = kiln(
        &srv,
        &t,
        &["reimage", "web1", "web2", "--os", "debian-12", "-o", "json"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<String> = (0..2)
        .map(|i| rows[i]["job"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(rows[1]["hostname"], "web2");
    assert_ne!(ids[0], ids[1]);

    // A second reimage while one is active: refused, naming the job.
    let e = kiln_error(&srv, &t, &["reimage", "web1", "--os", "debian-12"]).await;
    assert!(
        e.starts_with("web1 already has an active job") && e.contains(&ids[0]),
        "{e}"
    );
    let (code, out) = kiln(&srv, &t, &["reimage", "web1", "web2", "--os", "debian-12"]).await;
    assert_eq!(code, 1);
    assert!(
        out.lines()
            .any(|l| l.contains("web2") && l.contains("not started") && l.contains(&ids[1])),
        "{out}"
    );
    let (_, active) = kiln(&srv, &t, &["job", "list", "--active"]).await;
    assert!(active.contains(&ids[0]) && active.contains(&ids[1]), "{active}");

    // Pause and resume.
    let admin = srv.admin();
    let (code, out) = kiln(&srv, &t, &["job", "pause", &ids[1]]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pause requested"), "{out}");
    until(&admin, &ids[1], "the pause", |j| j.state == JobState::Paused).await;
    let (code, out) = kiln(&srv, &t, &["job", "resume", &ids[1]]).await;
    assert_eq!(code, 0, "{out}");
    until(&admin, &ids[1], "the resume", |j| j.state != JobState::Paused).await;

    // Cancel both; the watch sees them end and fails, as they did not succeed.
    let (code, out) = kiln(&srv, &t, &["job", "cancel", &ids[0], &ids[1]]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("cancel requested").count(), 2, "{out}");
    let (code, out) = kiln(&srv, &t, &["job", "watch", &ids[0], &ids[1]]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("web1  cancelled after") && out.contains("web2  cancelled after"),
        "{out}"
    );
    assert!(out.contains("pause requested by"), "{out}");
    let e = kiln_error(&srv, &t, &["job", "watch", &ids[0], &ids[1]]).await;
    assert!(e.starts_with("2 of 2 jobs did not succeed: web1 cancelled"), "{e}");
    let (code, out) = kiln(&srv, &t, &["job", "watch", &ids[0], "-o", "json"]).await;
    assert_eq!(code, 1);
    let finals: Vec<Job> = serde_json::from_str(&out).unwrap();
    assert_eq!(finals[0].state, JobState::Cancelled);

    // An ended job cannot be cancelled; it can be retried, from a real step.
    let (code, out) = kiln(&srv, &t, &["job", "cancel", &ids[0]]).await;
    assert_eq!(code, 1);
    assert!(out.contains("has ended"), "{out}");
    let e = kiln_error(&srv, &t, &["job", "retry", &ids[0], "--from-step", "nope"]).await;
    assert!(e.contains("no step `nope`") && e.contains("wait_installer"), "{e}");
    let (code, out) = kiln(
        &srv,
        &t,
        &["job", "retry", &ids[0], "--from-step", "validate", "-o", "json"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let again: Job = serde_json::from_str(&out).unwrap();
    assert_eq!((again.state, again.step.as_str()), (JobState::Queued, "validate"));
    let (code, out) = kiln(&srv, &t, &["job", "cancel", &ids[0]]).await;
    assert_eq!(code, 0, "{out}");
    until(&admin, &ids[0], "the second cancel", |j| j.state.is_final()).await;

    // Job ids are checked before any request.
    assert_eq!(kiln(&srv, &t, &["job", "show", "web1"]).await.0, 2);
    let (code, _) = kiln(&srv, &t, &["job", "show", &kiln_types::JobId::new().to_string()]).await;
    assert_eq!(code, 1);
    sim.shutdown().await;
});

api_test!(
    a_failed_job_fails_the_watch_and_retry_watches_again,
    settings = Settings {
        jobs: Some(toml::from_str("[reimage]\ninstaller_start_secs = 1").unwrap()),
        ..Settings::default()
    },
    |srv| {
        let sim = fleet(&srv, 1).await;
        let t = srv.admin_token.clone();
        let (code, out) = kiln(
            &srv,
            &t,
            &["reimage", "web1", "--os", "debian-12", "--watch", "-o", "json"],
        )
        .await;
        assert_eq!(code, 1, "{out}");
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(rows[0]["job"]["state"], "failed");
        let reason = rows[0]["job"]["reason"].as_str().unwrap();
        assert!(reason.contains("no stage 1"), "{reason}");
        let id = rows[0]["job"]["id"].as_str().unwrap().to_string();

        let (code, out) = kiln(&srv, &t, &["job", "retry", &id, "--watch"]).await;
        assert_eq!(code, 1, "{out}");
        // The first failure, the retry, the second failure, the end.
        assert_eq!(
            out.matches("web1  failed at step wait_installer: no stage 1 (installer started) report")
                .count(),
            2,
            "{out}"
        );
        assert!(out.contains("retried from step"), "{out}");
        assert!(
            out.contains("web1  failed after ") && out.contains(&format!("(`kiln job show {id}`)")),
            "{out}"
        );
        sim.shutdown().await;
    }
);

api_test!(a_rollout_started_paused_and_aborted_from_the_cli, |srv| {
    let sim = fleet(&srv, 2).await;
    let t = &srv.admin_token;
    let admin = srv.admin();
    let (code, _) = kiln(
        &srv,
        t,
        &["rollout", "start", "--selector", "color=red", "--os", "debian-12"],
    )
    .await;
    assert_ne!(code, 0, "an unknown selector is refused");
    let (code, out) = kiln(
        &srv,
        t,
        &[
            "--output",
            "json",
            "rollout",
            "start",
            "--selector",
            "state=deployed",
            "--os",
            "debian-12",
            "--concurrency",
            "1",
            "--health-check",
            "test -n \"$KILN_HOST\"",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let r: kiln_types::job::Rollout = serde_json::from_str(&out).unwrap();
    let id = r.job.id.to_string();
    let hosts: Vec<&str> = r.members.iter().map(|m| m.hostname.as_str()).collect();
    assert_eq!(hosts, ["web1", "web2"]);
    // One member at a time: web1 starts, web2 waits.
    let end = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let r = admin.get_rollout(&id).await.unwrap();
        if let Some(j) = r.members[0].job_id {
            break j.to_string();
        }
        assert!(Instant::now() < end, "{r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    until(&admin, &first, "web1's installer wait", |j| j.step == "wait_installer").await;
    let (code, out) = kiln(&srv, t, &["rollout", "pause", &id]).await;
    assert_eq!(code, 0, "{out}");
    until(&admin, &id, "the pause", |j| j.state == JobState::Paused).await;
    let (code, out) = kiln(&srv, t, &["rollout", "show", &id]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("paused") && out.contains("1 running") && out.contains("1 pending"),
        "{out}"
    );
    // The stop button: web1's reimage is cancelled and disarmed, web2 skipped.
    let (code, out) = kiln(&srv, t, &["rollout", "abort", &id]).await;
    assert_eq!(code, 0, "{out}");
    until(&admin, &id, "the abort", |j| j.state.is_final()).await;
    until(&admin, &first, "web1's cancel", |j| j.state.is_final()).await;
    let (code, out) = kiln(&srv, t, &["rollout", "show", &id]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("cancelled") && out.contains("skipped"), "{out}");
    let script = reqwest::get(format!("{}/boot/ipxe?mac={}&platform=pcbios", srv.url, MACS[0]))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!script.contains("kiln.token"), "web1 left armed: {script}");
    let (code, out) = kiln(&srv, t, &["rollout", "list"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&id) && out.contains("state=deployed"), "{out}");
    // Watching an ended rollout reports how it ended.
    let (code, _) = kiln(&srv, t, &["rollout", "watch", &id]).await;
    assert_ne!(code, 0, "an aborted rollout is not a success");
    sim.shutdown().await;
});
