//! Webhooks against a real receiver, command hooks as real processes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use kiln_store::JobRecord;
use kiln_types::job::{JobKind, JobState, Stage};
use kiln_types::{JobId, MachineId};
use kiln_workflow::hooks::{
    HookBody, HookConfig, HookEvent, HookKind, HookPayload, HookRunner, RetryDelays, job_failure_reason,
    verify_signature,
};
use serde::Deserialize;

const SECRET: &str = "test-secret-0123456789abcdef";

/// What the receiver does with one request (after the signature check).
#[derive(Debug, Clone)]
enum Reply {
    Status(u16, &'static str),
    /// Answers 200 after this long.
    Slow(Duration),
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    headers: HeaderMap,
    body: Bytes,
    signature_ok: bool,
}

#[derive(Debug, Default)]
struct ReceiverState {
    secret: Vec<u8>,
    replies: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
}

/// A webhook receiver on 127.0.0.1:0 that checks `X-Kiln-Signature` with
/// its own copy of the secret (401 when it does not match), then answers as
/// scripted (200 once the script is used up).
struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
}

impl Receiver {
    async fn start(secret: &str, replies: Vec<Reply>) -> Receiver {
        let state = Arc::new(ReceiverState {
            secret: secret.as_bytes().to_vec(),
            replies: Mutex::new(replies.into()),
            seen: Mutex::default(),
        });
        let app = axum::Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

async fn receive(State(state): State<Arc<ReceiverState>>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    let signature = headers
        .get("x-kiln-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let signature_ok = verify_signature(&state.secret, &body, signature);
    state.seen.lock().unwrap().push(Seen {
        headers: headers.clone(),
        body: body.clone(),
        signature_ok,
    });
    if !signature_ok {
        return (StatusCode::UNAUTHORIZED, "bad signature".into());
    }
    let reply = state.replies.lock().unwrap().pop_front();
    match reply {
        None => (StatusCode::OK, "ok".into()),
        Some(Reply::Status(code, text)) => (StatusCode::from_u16(code).unwrap(), text.into()),
        Some(Reply::Slow(d)) => {
            tokio::time::sleep(d).await;
            (StatusCode::OK, "late".into())
        }
    }
}

/// Hooks from TOML, as the server's config file holds them.
fn hooks(toml_text: &str) -> Vec<HookConfig> {
    #[derive(Deserialize)]
    struct File {
        hooks: Vec<HookConfig>,
    }
    toml::from_str::<File>(toml_text)
        .unwrap_or_else(|e| panic!("{e}"))
        .hooks
}

fn webhook(name: &str, url: &str, secret: &str, retries: u32, timeout_secs: u64) -> String {
    format!(
        r#"
        [[hooks]]
        name = "{name}"
        events = ["pre_reimage", "post_reimage", "failure"]
        timeout_secs = {timeout_secs}
        [hooks.webhook]
        url = "{url}"
        secret = "{secret}"
        retries = {retries}
        "#
    )
}

/// A TOML string literal (argv elements hold quotes and backslashes).
fn lit(s: &str) -> String {
    toml::Value::String(s.into()).to_string()
}

fn command(name: &str, events: &str, argv: &[&str], timeout_secs: u64, extra: &str) -> String {
    let argv = argv.iter().map(|a| lit(a)).collect::<Vec<_>>().join(", ");
    format!(
        r#"
        [[hooks]]
        name = "{name}"
        events = {events}
        timeout_secs = {timeout_secs}
        {extra}
        [hooks.command]
        argv = [{argv}]
        env = {{ SITE_VAR = "from-config" }}
        "#
    )
}

fn runner(toml_text: &str) -> HookRunner {
    HookRunner::new(hooks(toml_text))
        .unwrap()
        .with_retry_delays(RetryDelays {
            first: Duration::from_millis(20),
            max: Duration::from_millis(100),
        })
}

fn payload() -> HookPayload {
    HookPayload {
        job_id: JobId::new(),
        machine_id: Some(MachineId::new()),
        hostname: "web01".into(),
        os: Some("debian-12".into()),
        ticket: Some("OPS-1234".into()),
        step: None,
        stage: None,
        reason: None,
        details: serde_json::json!({"layout": "lvm"}),
    }
}

#[tokio::test]
async fn a_2xx_is_one_signed_delivery_with_the_payload() {
    let rx = Receiver::start(SECRET, vec![]).await;
    let r = runner(&webhook("ticket", &rx.url(), SECRET, 3, 5));
    let p = payload();
    let outcomes = r.fire(HookEvent::PostReimage, &p).await;
    assert_eq!(outcomes.len(), 1);
    let o = &outcomes[0];
    assert!(o.ok, "{o}");
    assert_eq!((o.attempts, o.kind, o.required), (1, HookKind::Webhook, false));
    assert!(o.message.contains("200 OK"), "{}", o.message);

    let seen = rx.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].signature_ok);
    assert_eq!(seen[0].headers["x-kiln-event"], "post_reimage");
    assert_eq!(seen[0].headers["content-type"], "application/json");
    let body: HookBody = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(body.event, HookEvent::PostReimage);
    assert_eq!(body.hook, "ticket");
    assert_eq!(body.payload, p);
    assert_eq!(seen[0].headers["x-kiln-delivery"], body.delivery.to_string().as_str());
    assert_eq!(job_failure_reason(&outcomes), None);
}

#[tokio::test]
async fn a_5xx_is_retried_with_the_same_body_and_delivery() {
    let rx = Receiver::start(SECRET, vec![Reply::Status(503, "busy"), Reply::Status(500, "oops")]).await;
    let r = runner(&webhook("silence", &rx.url(), SECRET, 3, 5));
    let outcomes = r.fire(HookEvent::PreReimage, &payload()).await;
    assert!(outcomes[0].ok, "{}", outcomes[0]);
    assert_eq!(outcomes[0].attempts, 3);
    let seen = rx.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.body == seen[0].body && s.signature_ok));
    assert!(
        seen.iter()
            .all(|s| s.headers["x-kiln-delivery"] == seen[0].headers["x-kiln-delivery"])
    );
}

#[tokio::test]
async fn retries_are_bounded() {
    let rx = Receiver::start(SECRET, vec![Reply::Status(502, "bad gateway"); 10]).await;
    let r = runner(&webhook("silence", &rx.url(), SECRET, 2, 5));
    let outcomes = r.fire(HookEvent::PreReimage, &payload()).await;
    let o = &outcomes[0];
    assert!(!o.ok);
    assert_eq!(o.attempts, 3);
    assert_eq!(rx.seen().len(), 3);
    assert!(
        o.message
            .contains("502 Bad Gateway: bad gateway (gave up after 3 attempts)"),
        "{}",
        o.message
    );
    // A pre-reimage hook is required unless it says otherwise.
    let reason = job_failure_reason(&outcomes).unwrap();
    assert!(
        reason.starts_with("required pre_reimage hook `silence` failed: POST http://127.0.0.1:"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_4xx_fails_at_once_with_the_status_and_the_body() {
    let rx = Receiver::start(SECRET, vec![Reply::Status(422, "unknown host\nweb01")]).await;
    let r = runner(&webhook("ticket", &rx.url(), SECRET, 3, 5));
    let outcomes = r.fire(HookEvent::Failure, &payload()).await;
    let o = &outcomes[0];
    assert!(!o.ok);
    assert_eq!(o.attempts, 1);
    assert_eq!(rx.seen().len(), 1);
    assert!(
        o.message
            .contains("answered 422 Unprocessable Entity: unknown host web01 (a 4xx is not retried"),
        "{}",
        o.message
    );
    // Failure hooks are not required by default: recorded, the job does not fail for it.
    assert!(!o.required);
    assert_eq!(job_failure_reason(&outcomes), None);
}

#[tokio::test]
async fn a_wrong_secret_is_refused_by_the_receiver() {
    let rx = Receiver::start(SECRET, vec![]).await;
    let r = runner(&webhook("ticket", &rx.url(), "another-secret-0123456789", 3, 5));
    let outcomes = r.fire(HookEvent::PostReimage, &payload()).await;
    let o = &outcomes[0];
    assert!(!o.ok);
    assert_eq!(o.attempts, 1, "a 401 is not retried");
    assert!(o.message.contains("401 Unauthorized: bad signature"), "{}", o.message);
    let seen = rx.seen();
    assert!(!seen[0].signature_ok);
    // The receiver's check is real: the same body verifies under the
    // sender's secret and not under the receiver's.
    let sig = seen[0].headers["x-kiln-signature"].to_str().unwrap();
    assert!(verify_signature(b"another-secret-0123456789", &seen[0].body, sig));
    assert!(!verify_signature(SECRET.as_bytes(), &seen[0].body, sig));
}

#[tokio::test]
async fn a_slow_receiver_times_out_per_attempt() {
    let rx = Receiver::start(
        SECRET,
        vec![
            Reply::Slow(Duration::from_secs(10)),
            Reply::Slow(Duration::from_secs(10)),
        ],
    )
    .await;
    let r = runner(&webhook("slow", &rx.url(), SECRET, 1, 1));
    let started = Instant::now();
    let outcomes = r.fire(HookEvent::PreReimage, &payload()).await;
    let took = started.elapsed();
    let o = &outcomes[0];
    assert!(!o.ok);
    assert_eq!(o.attempts, 2, "a timeout is retried");
    assert!(
        o.message
            .contains("no answer within 1 s (timeout_secs) (gave up after 2 attempts)"),
        "{}",
        o.message
    );
    assert!(took < Duration::from_secs(4), "two 1 s attempts took {took:?}");
}

#[tokio::test]
async fn connection_errors_are_retried() {
    // A port nothing listens on: bind, learn the port, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = runner(&webhook("down", &format!("http://127.0.0.1:{port}/hook"), SECRET, 2, 2));
    let outcomes = r.fire(HookEvent::PostReimage, &payload()).await;
    let o = &outcomes[0];
    assert!(!o.ok);
    assert_eq!(o.attempts, 3);
    assert!(o.message.contains("gave up after 3 attempts"), "{}", o.message);
    assert!(o.message.to_lowercase().contains("connect"), "{}", o.message);
}

#[tokio::test]
async fn a_command_gets_the_job_in_its_environment_and_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("env");
    let stdin_file = dir.path().join("stdin");
    let r = runner(&command(
        "depool",
        r#"["pre_reimage"]"#,
        &[
            "/bin/sh",
            "-c",
            r#"env > "$1" && cat > "$2" && echo depooled"#,
            "sh",
            env_file.to_str().unwrap(),
            stdin_file.to_str().unwrap(),
        ],
        10,
        "",
    ));
    let mut p = payload();
    p.reason = Some("reimage requested".into());
    let outcomes = r.fire(HookEvent::PreReimage, &p).await;
    let o = &outcomes[0];
    assert!(o.ok, "{o}");
    assert_eq!((o.kind, o.attempts, o.required), (HookKind::Command, 1, true));
    assert_eq!(o.output.as_deref(), Some("depooled\n"));

    let env = std::fs::read_to_string(&env_file).unwrap();
    let has = |line: &str| env.lines().any(|l| l == line);
    for line in [
        "KILN_EVENT=pre_reimage".to_string(),
        "KILN_HOOK=depool".to_string(),
        format!("KILN_JOB_ID={}", p.job_id),
        format!("KILN_MACHINE_ID={}", p.machine_id.unwrap()),
        "KILN_HOSTNAME=web01".to_string(),
        "KILN_OS=debian-12".to_string(),
        "KILN_TICKET=OPS-1234".to_string(),
        "KILN_REASON=reimage requested".to_string(),
        "KILN_STEP=".to_string(),
        "KILN_STAGE=".to_string(),
        "SITE_VAR=from-config".to_string(),
    ] {
        assert!(has(&line), "{line} missing from\n{env}");
    }
    // The server's own environment does not leak into hooks (cargo sets
    // CARGO_MANIFEST_DIR for this test process).
    assert!(std::env::var("CARGO_MANIFEST_DIR").is_ok());
    assert!(!env.contains("CARGO_MANIFEST_DIR="), "{env}");
    assert!(env.lines().any(|l| l.starts_with("PATH=")));

    let body: HookBody = serde_json::from_slice(&std::fs::read(&stdin_file).unwrap()).unwrap();
    assert_eq!(body.payload, p);
    assert!(env.contains(&format!("KILN_DELIVERY={}", body.delivery)));
}

#[tokio::test]
async fn a_failing_command_reports_its_code_and_last_output() {
    let r = runner(&command(
        "icinga-downtime",
        r#"["pre_reimage"]"#,
        &[
            "/bin/sh",
            "-c",
            "echo scheduling; echo 'icinga: 403 forbidden' >&2; exit 3",
        ],
        10,
        "",
    ));
    let outcomes = r.fire(HookEvent::PreReimage, &payload()).await;
    let o = &outcomes[0];
    assert!(!o.ok);
    assert_eq!(
        o.message,
        "`/bin/sh` exited with code 3; last output:\nscheduling\nicinga: 403 forbidden"
    );
    let reason = job_failure_reason(&outcomes).unwrap();
    assert!(
        reason.contains("`icinga-downtime` failed: `/bin/sh` exited with code 3"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_missing_program_is_a_clear_failure() {
    let r = runner(&command("x", r#"["failure"]"#, &["/nonexistent/depool"], 10, ""));
    let outcomes = r.fire(HookEvent::Failure, &payload()).await;
    let o = &outcomes[0];
    assert!(!o.ok && !o.skipped);
    assert_eq!(o.attempts, 1);
    assert!(
        o.message.starts_with("cannot start `/nonexistent/depool`: "),
        "{}",
        o.message
    );
    assert!(o.message.contains("No such file or directory"), "{}", o.message);
    // Required or not decides; a missing program is a failure like any other.
    let r = runner(&command("x", r#"["pre_reimage"]"#, &["/nonexistent/depool"], 10, ""));
    let outcomes = r.fire(HookEvent::PreReimage, &payload()).await;
    assert!(job_failure_reason(&outcomes).unwrap().contains("cannot start"));
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let r = runner(&command(
        "hangs",
        r#"["post_reimage"]"#,
        &[
            "/bin/sh",
            "-c",
            r#"sleep 100 & echo $! > "$1"; sleep 100"#,
            "sh",
            pid_file.to_str().unwrap(),
        ],
        1,
        "",
    ));
    let started = Instant::now();
    let outcomes = r.fire(HookEvent::PostReimage, &payload()).await;
    let o = &outcomes[0];
    assert!(!o.ok);
    assert!(
        o.message
            .contains("still ran after 1 s (timeout_secs): killed it and its process group"),
        "{}",
        o.message
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let grandchild = crate::read_pid(&pid_file);
    assert!(
        crate::process_gone(grandchild).await,
        "the background sleep {grandchild} survived"
    );
}

#[tokio::test]
async fn dropping_the_fire_future_kills_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let r = runner(&command(
        "hangs",
        r#"["failure"]"#,
        &[
            "/bin/sh",
            "-c",
            r#"sleep 100 & echo $! > "$1"; sleep 100"#,
            "sh",
            pid_file.to_str().unwrap(),
        ],
        60,
        "",
    ));
    let p = payload();
    // The engine gives up on the step (job cancelled): the future is dropped.
    let fired = tokio::time::timeout(Duration::from_millis(500), r.fire(HookEvent::Failure, &p)).await;
    assert!(fired.is_err());
    let grandchild = crate::read_pid(&pid_file);
    assert!(
        crate::process_gone(grandchild).await,
        "the background sleep {grandchild} survived"
    );
}

#[tokio::test]
async fn argv_with_shell_metacharacters_arrives_literally() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("argv");
    let pwned = dir.path().join("pwned");
    let tricky = [
        "a; touch PWNED".replace("PWNED", pwned.to_str().unwrap()),
        "$(touch PWNED)".replace("PWNED", pwned.to_str().unwrap()),
        "`touch PWNED`".replace("PWNED", pwned.to_str().unwrap()),
        "x | y && z > w".to_string(),
        "'single' \"double\" \\back".to_string(),
        "$KILN_HOSTNAME *".to_string(),
        String::new(),
    ];
    let mut argv = vec!["/bin/sh", "-c", r#"printf '%s\n' "$@" > "$0""#, out.to_str().unwrap()];
    argv.extend(tricky.iter().map(String::as_str));
    let r = runner(&command("literal", r#"["failure"]"#, &argv, 10, ""));
    let o = &r.fire(HookEvent::Failure, &payload()).await[0];
    assert!(o.ok, "{o}");
    let got = std::fs::read_to_string(&out).unwrap();
    let want: String = tricky.iter().map(|a| format!("{a}\n")).collect();
    assert_eq!(got, want);
    assert!(!pwned.exists(), "an argument was run as a command");
}

#[tokio::test]
async fn a_failed_required_pre_hook_stops_the_hooks_after_it() {
    let rx = Receiver::start(SECRET, vec![]).await;
    let text = [
        command("silence", r#"["pre_reimage"]"#, &["/bin/false"], 10, ""),
        webhook("depool", &rx.url(), SECRET, 0, 5),
    ]
    .concat();
    let r = runner(&text);
    let outcomes = r.fire(HookEvent::PreReimage, &payload()).await;
    assert_eq!(outcomes.len(), 2);
    assert!(!outcomes[0].ok && !outcomes[0].skipped && outcomes[0].attempts == 1);
    assert!(!outcomes[1].ok && outcomes[1].skipped && outcomes[1].attempts == 0);
    assert!(outcomes[1].to_string().contains("not run"), "{}", outcomes[1]);
    assert_eq!(
        outcomes[1].message,
        "not run: the required hook `silence` before it failed"
    );
    assert!(rx.seen().is_empty(), "the depool hook ran after the failed silence");
    assert!(job_failure_reason(&outcomes).unwrap().contains("`silence`"));

    // On other events every hook runs, and optional failures do not fail the job.
    let outcomes = r.fire(HookEvent::PostReimage, &payload()).await;
    assert_eq!(outcomes.len(), 1, "only depool fires on post_reimage");
    assert!(outcomes[0].ok);
}

#[tokio::test]
async fn a_post_hook_marked_required_fails_the_job() {
    let r = runner(&command(
        "must",
        r#"["post_reimage"]"#,
        &["/bin/false"],
        10,
        "required = true",
    ));
    let outcomes = r.fire(HookEvent::PostReimage, &payload()).await;
    assert!(outcomes[0].required);
    assert!(job_failure_reason(&outcomes).is_some());
    // No hook for an event: nothing runs, nothing fails.
    assert!(r.fire(HookEvent::Failure, &payload()).await.is_empty());
    assert!(!r.has_hooks_for(HookEvent::Failure));
}

/// A stored job in the middle of its `pre_hooks` step.
fn job_record() -> JobRecord {
    let now = chrono::Utc::now();
    JobRecord {
        id: JobId::new(),
        kind: JobKind::Reimage,
        state: JobState::Running,
        machine_id: Some(MachineId::new()),
        parent_id: None,
        hostname: "web02".into(),
        os_label: "debian 12".into(),
        spec: serde_json::json!({}),
        data: serde_json::json!({}),
        step_index: kiln_workflow::steps(JobKind::Reimage)
            .iter()
            .position(|s| *s == "pre_hooks")
            .unwrap() as u32,
        step_started_at: now,
        step_attempts: 1,
        stage: Stage::ACCEPTED,
        reason: None,
        ticket: Some("OPS-9".into()),
        callback_url: None,
        cancel_requested: false,
        failure_reported: None,
        pause_requested: false,
        run_at: None,
        lease_owner: None,
        lease_expires: None,
        created_by: "test".into(),
        created_at: now,
        updated_at: now,
        finished_at: None,
    }
}

#[tokio::test]
async fn run_for_job_answers_the_way_the_engine_asks() {
    let rx = Receiver::start(SECRET, vec![]).await;
    let text = [
        webhook("ticket", &rx.url(), SECRET, 0, 5),
        command(
            "echo",
            r#"["pre_reimage"]"#,
            &["/bin/sh", "-c", "echo \"$KILN_STEP $KILN_STAGE $KILN_OS\""],
            10,
            "",
        ),
    ]
    .concat();
    let r = runner(&text);
    let job = job_record();
    let lines = r.run_for_job("pre_reimage", &job).await.unwrap();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(
        lines[0].starts_with("pre_reimage hook `ticket` (webhook): ok in "),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("pre_reimage hook `echo` (command): ok in "),
        "{}",
        lines[1]
    );
    assert_eq!(lines[2], "pre_reimage hook `echo` output:\npre_hooks 0 debian 12");
    let body: HookBody = serde_json::from_slice(&rx.seen()[0].body).unwrap();
    assert_eq!(body.payload, HookPayload::from_job(&job));
    assert_eq!((body.payload.job_id, body.payload.machine_id), (job.id, job.machine_id));
    assert_eq!(body.payload.step.as_deref(), Some("pre_hooks"));

    let err = r.run_for_job("pre_install", &job).await.unwrap_err();
    assert_eq!(
        err,
        "unknown hook event `pre_install`: one of `pre_reimage`, `post_reimage`, `failure`"
    );

    let failing = runner(&command("nope", r#"["pre_reimage"]"#, &["/bin/false"], 10, ""));
    let err = failing.run_for_job("pre_reimage", &job).await.unwrap_err();
    assert_eq!(
        err,
        "required pre_reimage hook `nope` failed: `/bin/false` exited with code 1 (no output)"
    );
}
