//! Hooks: what kiln tells the rest of the site around a reimage — set a
//! downtime in monitoring, depool the machine from its load balancer,
//! comment on the ticket.
//!
//! A hook is configured in the server's config file as a `[[hooks]]` entry
//! (every key is in `docs/hooks.md`) and fires on one or more
//! [`HookEvent`]s. It is either
//! - a **webhook**: a POST of a JSON [`HookBody`] with the headers
//!   `X-Kiln-Event`, `X-Kiln-Delivery` (the same id on every attempt of one
//!   delivery, so a receiver can drop repeats) and `X-Kiln-Signature:
//!   sha256=<hex>`, an HMAC-SHA256 of the exact body bytes with the hook's
//!   secret (as GitHub signs its webhooks). Each attempt has the hook's
//!   timeout; a connection error, a timeout, a 5xx, 408 or 429 is retried
//!   up to `retries` times with a doubling delay (429/503 `Retry-After` is
//!   honoured); any other 4xx fails at once: it is a configuration error
//!   (wrong URL, wrong secret) that repeating will not fix. Success is 2xx;
//!   redirects are not followed (a POST must reach its final URL);
//! - a **command**: an argv run without a shell. The job's data reaches it
//!   only as environment variables ([`ENV_VARS`]) and as the same JSON body
//!   on stdin — never spliced into the argv, so a hostname cannot become an
//!   argument or a command. It runs in its own process group, which is
//!   killed at the timeout; exit 0 is success, anything else a failure whose
//!   message ends with the last lines of its output.
//!
//! [`HookRunner::fire`] runs the hooks of one event one after another in
//! config order (a depool after its silence, say) and returns one
//! [`HookOutcome`] each. Whether a failure fails the job: a hook's
//! `required` (default: true for `pre_reimage`, false otherwise). A failed
//! required `pre_reimage` hook also stops the hooks after it — the job will
//! fail before anything was armed, so depooling the machine next would only
//! leave it depooled; [`job_failure_reason`] tells the engine.
//!
//! The webhook secret is a [`Secret`]: it never appears in `Debug` output
//! or logs, and URLs are logged without their user info and query (which
//! may carry a token).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use kiln_store::JobRecord;
use kiln_types::secret::Secret;
use kiln_types::{JobId, MachineId};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use crate::process::{self, Exit, ProcessSpec};

/// Header with the event name.
pub const EVENT_HEADER: &str = "X-Kiln-Event";
/// Header with the delivery id (same on each retry of one delivery).
pub const DELIVERY_HEADER: &str = "X-Kiln-Delivery";
/// Header with `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "X-Kiln-Signature";

/// The environment variables a command hook gets (always set; empty when
/// the job has no such value).
pub const ENV_VARS: &[&str] = &[
    "KILN_EVENT",
    "KILN_HOOK",
    "KILN_DELIVERY",
    "KILN_JOB_ID",
    "KILN_MACHINE_ID",
    "KILN_HOSTNAME",
    "KILN_OS",
    "KILN_TICKET",
    "KILN_STEP",
    "KILN_STAGE",
    "KILN_REASON",
];

/// The most of a command hook's output kept for the job log.
pub const COMMAND_OUTPUT_LIMIT: usize = 64 * 1024;
/// The most of a refusing receiver's body quoted in the error.
const BODY_QUOTE_LIMIT: usize = 300;
/// Lines of a failed command's output quoted in the message.
const QUOTED_LINES: usize = 5;

/// The moments a hook can fire at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookEvent {
    /// Before a reimage touches the machine (nothing armed yet).
    PreReimage,
    /// After the new OS phoned home and the post-install tasks ran.
    PostReimage,
    /// A job failed, at whatever step.
    Failure,
}

impl HookEvent {
    pub const ALL: [HookEvent; 3] = [HookEvent::PreReimage, HookEvent::PostReimage, HookEvent::Failure];

    pub fn as_str(self) -> &'static str {
        match self {
            HookEvent::PreReimage => "pre_reimage",
            HookEvent::PostReimage => "post_reimage",
            HookEvent::Failure => "failure",
        }
    }
}

impl std::str::FromStr for HookEvent {
    type Err = String;

    fn from_str(s: &str) -> Result<HookEvent, String> {
        HookEvent::ALL.into_iter().find(|e| e.as_str() == s).ok_or_else(|| {
            format!(
                "unknown hook event `{s}`: one of {}",
                HookEvent::ALL.map(|e| format!("`{e}`")).join(", ")
            )
        })
    }
}

impl fmt::Display for HookEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_timeout_secs() -> u64 {
    30
}

fn default_retries() -> u32 {
    3
}

/// The most retries a webhook may ask for; a receiver down for longer is
/// down, and the job should say so rather than wait.
pub const MAX_RETRIES: u32 = 10;
/// The longest timeout a hook may have.
pub const MAX_TIMEOUT_SECS: u64 = 3600;
/// The shortest webhook secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// `[hooks.webhook]`: where and how to POST.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL the body is POSTed to.
    pub url: String,
    /// The HMAC-SHA256 key for `X-Kiln-Signature`.
    pub secret: Secret,
    /// Retries after the first attempt (connection errors, timeouts, 5xx).
    #[serde(default = "default_retries")]
    pub retries: u32,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &redact_url(&self.url))
            .field("secret", &self.secret)
            .field("retries", &self.retries)
            .finish()
    }
}

/// `[hooks.command]`: what to run.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// The program and its arguments, passed as they are (no shell, no
    /// placeholders: the job's data is in `KILN_*` variables and on stdin).
    pub argv: Vec<String>,
    /// Extra environment variables (not `KILN_*`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl fmt::Debug for CommandConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandConfig")
            .field("argv", &self.argv)
            .field("env", &process::EnvNames(&self.env))
            .finish()
    }
}

/// What a hook does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAction {
    Webhook(WebhookConfig),
    Command(CommandConfig),
}

/// One `[[hooks]]` entry as written in the file, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    name: String,
    events: Vec<HookEvent>,
    #[serde(default = "default_timeout_secs")]
    timeout_secs: u64,
    #[serde(default)]
    required: Option<bool>,
    #[serde(default)]
    webhook: Option<WebhookConfig>,
    #[serde(default)]
    command: Option<CommandConfig>,
}

/// One validated `[[hooks]]` entry. Deserializing it validates it, so a
/// config file with a bad hook fails to load with the hook and the problem
/// named.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawHook")]
pub struct HookConfig {
    /// Unique among the hooks; shown in the job log.
    pub name: String,
    /// The events it fires on (at least one, no repeats).
    pub events: Vec<HookEvent>,
    /// Per attempt for a webhook, for the whole run for a command.
    pub timeout_secs: u64,
    /// Whether its failure fails the job; `None`: only for `pre_reimage`.
    pub required: Option<bool>,
    pub action: HookAction,
}

impl TryFrom<RawHook> for HookConfig {
    type Error = String;

    fn try_from(raw: RawHook) -> Result<HookConfig, String> {
        let action = match (raw.webhook, raw.command) {
            (Some(w), None) => HookAction::Webhook(w),
            (None, Some(c)) => HookAction::Command(c),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "hook `{}`: has both [hooks.webhook] and [hooks.command]: a hook is one or the other",
                    raw.name
                ));
            }
            (None, None) => {
                return Err(format!(
                    "hook `{}`: has neither [hooks.webhook] (url, secret) nor [hooks.command] (argv): add one",
                    raw.name
                ));
            }
        };
        let hook = HookConfig {
            name: raw.name,
            events: raw.events,
            timeout_secs: raw.timeout_secs,
            required: raw.required,
            action,
        };
        hook.validate()?;
        Ok(hook)
    }
}

impl HookConfig {
    /// Every problem with this hook, in one message that names it. Loading
    /// the config runs this; so does [`HookRunner::new`], for hooks built
    /// in code.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = vec![];
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !name_ok {
            problems.push(format!("name `{}` must have 1 to 64 of A-Z a-z 0-9 . _ -", self.name));
        }
        if self.events.is_empty() {
            problems.push(format!(
                "events is empty: list one or more of {}",
                HookEvent::ALL.map(|e| format!("`{e}`")).join(", ")
            ));
        }
        let mut seen = HashSet::new();
        for e in &self.events {
            if !seen.insert(e) {
                problems.push(format!("event `{e}` is listed twice"));
            }
        }
        if self.timeout_secs == 0 || self.timeout_secs > MAX_TIMEOUT_SECS {
            problems.push(format!(
                "timeout_secs = {} is out of range: give 1 to {MAX_TIMEOUT_SECS} seconds",
                self.timeout_secs
            ));
        }
        match &self.action {
            HookAction::Webhook(w) => problems.extend(check_webhook(w)),
            HookAction::Command(c) => problems.extend(check_command(c)),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("hook `{}`: {}", self.name, problems.join("; ")))
        }
    }
}

fn check_webhook(w: &WebhookConfig) -> Vec<String> {
    let mut problems = vec![];
    match reqwest::Url::parse(&w.url) {
        Err(e) => problems.push(format!("webhook url `{}` is not a URL: {e}", redact_url(&w.url))),
        Ok(u) if !matches!(u.scheme(), "http" | "https") => problems.push(format!(
            "webhook url `{}` must start with http:// or https://",
            redact_url(&w.url)
        )),
        Ok(u) if u.host_str().is_none_or(str::is_empty) => {
            problems.push(format!("webhook url `{}` has no host", redact_url(&w.url)))
        }
        Ok(_) => {}
    }
    if w.secret.expose().len() < MIN_SECRET_LEN {
        problems.push(format!(
            "webhook secret is shorter than {MIN_SECRET_LEN} characters: use a random one, e.g. `openssl rand -hex 32`"
        ));
    }
    if w.retries > MAX_RETRIES {
        problems.push(format!("webhook retries = {} is more than {MAX_RETRIES}", w.retries));
    }
    problems
}

fn check_command(c: &CommandConfig) -> Vec<String> {
    let mut problems = vec![];
    match c.argv.first() {
        None => problems.push(
            "command argv is empty: give the program and its arguments, e.g. [\"/usr/local/bin/depool\", \"--wait\"]"
                .into(),
        ),
        Some(p) if p.trim().is_empty() => problems.push("command argv[0] (the program) is empty".into()),
        Some(_) => {}
    }
    if c.argv.iter().any(|a| a.contains('\0')) {
        problems.push("command argv has a NUL character".into());
    }
    for (k, v) in &c.env {
        if let Err(e) = process::check_env_name(k) {
            problems.push(format!("command env: {e}"));
        }
        if v.contains('\0') {
            problems.push(format!("command env `{k}` has a NUL character"));
        }
    }
    problems
}

impl HookConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// Whether a failure of this hook on `event` fails the job.
    pub fn required_for(&self, event: HookEvent) -> bool {
        self.required.unwrap_or(event == HookEvent::PreReimage)
    }

    pub fn fires_on(&self, event: HookEvent) -> bool {
        self.events.contains(&event)
    }

    pub fn kind(&self) -> HookKind {
        match self.action {
            HookAction::Webhook(_) => HookKind::Webhook,
            HookAction::Command(_) => HookKind::Command,
        }
    }
}

/// Webhook or command, for outcomes and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookKind {
    Webhook,
    Command,
}

impl fmt::Display for HookKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HookKind::Webhook => "webhook",
            HookKind::Command => "command",
        })
    }
}

/// What the job tells its hooks ([`HookPayload::from_job`] fills it from
/// the stored job).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookPayload {
    pub job_id: JobId,
    /// `None` only when the machine was deleted while the job ran.
    pub machine_id: Option<MachineId>,
    pub hostname: String,
    /// The OS being installed, as the job names it (e.g. `debian 12`).
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub ticket: Option<String>,
    /// The step the job is in (for `failure`: the step that failed).
    #[serde(default)]
    pub step: Option<String>,
    /// The install stage the machine reported last (0–5).
    #[serde(default)]
    pub stage: Option<u8>,
    /// Why the job is waiting or failed, when it says.
    #[serde(default)]
    pub reason: Option<String>,
    /// Anything else the job wants its hooks to see (a JSON object).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

impl HookPayload {
    /// The payload for a stored job: its ids, hostname, OS, ticket, current
    /// step, install stage and reason.
    pub fn from_job(job: &JobRecord) -> HookPayload {
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        HookPayload {
            job_id: job.id,
            machine_id: job.machine_id,
            hostname: job.hostname.clone(),
            os: non_empty(&job.os_label),
            ticket: job.ticket.clone(),
            step: crate::engine::steps(job.kind)
                .get(job.step_index as usize)
                .map(|s| s.to_string()),
            stage: Some(job.stage.0),
            reason: job.reason.clone(),
            details: serde_json::Value::Null,
        }
    }
}

/// The JSON a webhook receives (and a command reads on stdin): the event,
/// which hook and delivery this is, and the payload's fields at the top
/// level. The body is signed as sent; a receiver checks the signature over
/// the raw bytes before parsing them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookBody {
    pub event: HookEvent,
    pub hook: String,
    /// One id per delivery, the same on its retries.
    pub delivery: Uuid,
    /// When the delivery was made (the same on its retries), so a receiver
    /// can refuse old replays.
    pub sent_at: DateTime<Utc>,
    #[serde(flatten)]
    pub payload: HookPayload,
}

/// `sha256=<hex>`: the `X-Kiln-Signature` value for `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether `header` (an `X-Kiln-Signature` value) signs `body` under
/// `secret`; compares in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// What one hook did on one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookOutcome {
    pub hook: String,
    pub event: HookEvent,
    pub kind: HookKind,
    pub ok: bool,
    /// Whether a failure fails the job.
    pub required: bool,
    /// Not run at all: a required `pre_reimage` hook before it failed.
    #[serde(default)]
    pub skipped: bool,
    /// HTTP requests sent for a webhook; 1 for a command (0 when skipped).
    pub attempts: u32,
    pub duration_ms: u64,
    /// What happened, for a person: `200 OK`, `exited with code 2: …`.
    pub message: String,
    /// A command's output (the end of it), for the job log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl fmt::Display for HookOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (self.ok, self.skipped) {
            (true, _) => "ok",
            (false, true) => "not run",
            (false, false) if self.required => "failed (required)",
            (false, false) => "failed",
        };
        write!(
            f,
            "{} hook `{}` ({}): {status} in {} ms: {}",
            self.event, self.hook, self.kind, self.duration_ms, self.message
        )
    }
}

/// The reason the job must fail because of its hooks, if it must: the first
/// required hook that ran and failed.
pub fn job_failure_reason(outcomes: &[HookOutcome]) -> Option<String> {
    outcomes
        .iter()
        .find(|o| o.required && !o.ok && !o.skipped)
        .map(|o| format!("required {} hook `{}` failed: {}", o.event, o.hook, o.message))
}

/// The job log's lines for some outcomes: one per hook, plus the output of
/// a command that printed something and succeeded (a failure's last lines
/// are already in its message).
pub fn job_log_lines(outcomes: &[HookOutcome]) -> Vec<String> {
    let mut lines = vec![];
    for o in outcomes {
        lines.push(o.to_string());
        if let Some(output) = o.output.as_deref().filter(|out| o.ok && !out.trim().is_empty()) {
            lines.push(format!("{} hook `{}` output:\n{}", o.event, o.hook, output.trim_end()));
        }
    }
    lines
}

/// Errors building a [`HookRunner`].
#[derive(Debug, thiserror::Error)]
pub enum HookSetupError {
    #[error("two hooks are named `{0}`: hook names must be unique (they name the hook in job logs)")]
    DuplicateName(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot set up the webhook HTTP client: {0}")]
    HttpClient(String),
}

/// Delays between webhook attempts: `first`, doubling, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryDelays {
    pub first: Duration,
    pub max: Duration,
}

impl Default for RetryDelays {
    fn default() -> Self {
        RetryDelays {
            first: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

impl RetryDelays {
    /// The delay before attempt `attempt + 1` (after `attempt` failed,
    /// counting from 1).
    fn after(&self, attempt: u32) -> Duration {
        self.first
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max)
    }
}

/// Runs the configured hooks. Cheap to clone (the hooks and the HTTP
/// client's connection pool are shared).
#[derive(Debug, Clone)]
pub struct HookRunner {
    hooks: Arc<[HookConfig]>,
    http: reqwest::Client,
    delays: RetryDelays,
}

impl HookRunner {
    /// Checks the hooks as a set (unique names) and builds the HTTP client
    /// (TLS on rustls with the ring provider, the system's trusted roots).
    pub fn new(hooks: Vec<HookConfig>) -> Result<HookRunner, HookSetupError> {
        let mut names = HashSet::new();
        for h in &hooks {
            h.validate().map_err(HookSetupError::Invalid)?;
            if !names.insert(h.name.as_str()) {
                return Err(HookSetupError::DuplicateName(h.name.clone()));
            }
        }
        Ok(HookRunner {
            hooks: hooks.into(),
            http: http_client()?,
            delays: RetryDelays::default(),
        })
    }

    /// Other delays between webhook attempts (tests use milliseconds).
    pub fn with_retry_delays(mut self, delays: RetryDelays) -> HookRunner {
        self.delays = delays;
        self
    }

    pub fn hooks(&self) -> &[HookConfig] {
        &self.hooks
    }

    /// Whether any hook fires on `event` (the engine can skip the step).
    pub fn has_hooks_for(&self, event: HookEvent) -> bool {
        self.hooks.iter().any(|h| h.fires_on(event))
    }

    /// Runs every hook configured for `event`, in config order, and says
    /// how each went. After a required `pre_reimage` hook fails, the ones
    /// after it are not run (outcomes with `skipped: true`). Never fails as a
    /// whole: see [`job_failure_reason`].
    ///
    /// A webhook is retried, so a receiver may see one delivery more than
    /// once (when an answer was lost): it should drop repeats of an
    /// `X-Kiln-Delivery` it has acted on.
    pub async fn fire(&self, event: HookEvent, payload: &HookPayload) -> Vec<HookOutcome> {
        let delivery = Uuid::new_v4();
        let sent_at = Utc::now();
        let mut outcomes = vec![];
        let mut stopped_by: Option<String> = None;
        for hook in self.hooks.iter().filter(|h| h.fires_on(event)) {
            let required = hook.required_for(event);
            if let Some(failed) = &stopped_by {
                outcomes.push(HookOutcome {
                    hook: hook.name.clone(),
                    event,
                    kind: hook.kind(),
                    ok: false,
                    required,
                    skipped: true,
                    attempts: 0,
                    duration_ms: 0,
                    message: format!("not run: the required hook `{failed}` before it failed"),
                    output: None,
                });
                continue;
            }
            let body = HookBody {
                event,
                hook: hook.name.clone(),
                delivery,
                sent_at,
                payload: payload.clone(),
            };
            let started = Instant::now();
            let run = match &hook.action {
                HookAction::Webhook(w) => self.post(hook, w, &body).await,
                HookAction::Command(c) => run_command(hook, c, &body).await,
            };
            let outcome = HookOutcome {
                hook: hook.name.clone(),
                event,
                kind: hook.kind(),
                ok: run.ok,
                required,
                skipped: false,
                attempts: run.attempts,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                message: run.message,
                output: run.output,
            };
            if outcome.ok {
                tracing::info!(hook = %outcome.hook, %event, job = %payload.job_id, attempts = outcome.attempts,
                    duration_ms = outcome.duration_ms, "hook ok: {}", outcome.message);
            } else {
                tracing::warn!(hook = %outcome.hook, %event, job = %payload.job_id, attempts = outcome.attempts,
                    required, duration_ms = outcome.duration_ms, "hook failed: {}", outcome.message);
                if required && event == HookEvent::PreReimage {
                    stopped_by = Some(hook.name.clone());
                }
            }
            outcomes.push(outcome);
        }
        outcomes
    }

    /// [`fire`](Self::fire) for a stored job, answered the way the engine's
    /// `Effects::run_hooks` wants it: one log line per hook, or the reason
    /// the job must fail (the lines are then in the server's log only).
    pub async fn run_for_job(&self, event: &str, job: &JobRecord) -> Result<Vec<String>, String> {
        let event: HookEvent = event.parse()?;
        let outcomes = self.fire(event, &HookPayload::from_job(job)).await;
        match job_failure_reason(&outcomes) {
            Some(reason) => Err(reason),
            None => Ok(job_log_lines(&outcomes)),
        }
    }

    async fn post(&self, hook: &HookConfig, w: &WebhookConfig, body: &HookBody) -> RunResult {
        let bytes = match serde_json::to_vec(body) {
            Ok(b) => b,
            Err(e) => return RunResult::failed(1, format!("cannot encode the body as JSON: {e}")),
        };
        let sig = signature(w.secret.expose().as_bytes(), &bytes);
        let shown_url = redact_url(&w.url);
        let max_attempts = w.retries.saturating_add(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let answer = self
                .http
                .post(&w.url)
                .timeout(hook.timeout())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(EVENT_HEADER, body.event.as_str())
                .header(DELIVERY_HEADER, body.delivery.to_string())
                .header(SIGNATURE_HEADER, &sig)
                .body(bytes.clone())
                .send()
                .await;
            let (problem, retry_after) = match answer {
                Ok(resp) if resp.status().is_success() => {
                    return RunResult {
                        ok: true,
                        attempts: attempt,
                        message: format!("POST {shown_url}: {}", resp.status()),
                        output: None,
                    };
                }
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = retry_after(&resp);
                    let text = body_start(resp).await;
                    let quoted = if text.is_empty() {
                        String::new()
                    } else {
                        format!(": {text}")
                    };
                    let retryable = status.is_server_error()
                        || status == reqwest::StatusCode::REQUEST_TIMEOUT
                        || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                    if !retryable {
                        let hint = if status.is_redirection() {
                            "redirects are not followed: set the hook's url to the final address"
                        } else {
                            "a 4xx is not retried: check the hook's url and secret against the receiver"
                        };
                        return RunResult::failed(
                            attempt,
                            format!("POST {shown_url}: the receiver answered {status}{quoted} ({hint})"),
                        );
                    }
                    (format!("the receiver answered {status}{quoted}"), retry_after)
                }
                Err(e) if e.is_timeout() => (format!("no answer within {} s (timeout_secs)", hook.timeout_secs), None),
                Err(e) => (error_chain(&e.without_url()), None),
            };
            if attempt >= max_attempts {
                return RunResult::failed(
                    attempt,
                    format!(
                        "POST {shown_url}: {problem} (gave up after {attempt} attempt{})",
                        if attempt == 1 { "" } else { "s" }
                    ),
                );
            }
            let delay = retry_after
                .unwrap_or_else(|| self.delays.after(attempt))
                .min(self.delays.max);
            tracing::info!(hook = %hook.name, attempt, "webhook attempt failed, retrying in {delay:?}: {problem}");
            tokio::time::sleep(delay).await;
        }
    }
}

/// How one hook's run went, before it becomes a [`HookOutcome`].
struct RunResult {
    ok: bool,
    attempts: u32,
    message: String,
    output: Option<String>,
}

impl RunResult {
    fn failed(attempts: u32, message: String) -> RunResult {
        RunResult {
            ok: false,
            attempts,
            message,
            output: None,
        }
    }
}

async fn run_command(hook: &HookConfig, c: &CommandConfig, body: &HookBody) -> RunResult {
    // Validation guarantees a program; a failure here is still no panic.
    let Some((program, args)) = c.argv.split_first() else {
        return RunResult::failed(1, "command argv is empty".into());
    };
    let mut spec = ProcessSpec::new(program, hook.timeout());
    spec.args = args.to_vec();
    spec.env = c.env.clone();
    spec.env.extend(kiln_env(body));
    spec.stdin = Some(serde_json::to_vec(body).unwrap_or_default());
    spec.output_limit = COMMAND_OUTPUT_LIMIT;
    let outcome = match process::run(&spec).await {
        Ok(o) => o,
        // Counts as an attempt: a required hook whose program is missing
        // must fail the job.
        Err(e) => return RunResult::failed(1, error_chain(&e)),
    };
    let tail = outcome.last_lines(QUOTED_LINES);
    let with_tail = |what: String| {
        if tail.is_empty() {
            format!("{what} (no output)")
        } else {
            format!("{what}; last output:\n{tail}")
        }
    };
    let message = match outcome.exit {
        Exit::Code(0) => format!("`{program}` exited with code 0"),
        Exit::TimedOut => with_tail(format!(
            "`{program}` still ran after {} s (timeout_secs): killed it and its process group",
            hook.timeout_secs
        )),
        other => with_tail(format!("`{program}` {other}")),
    };
    RunResult {
        ok: outcome.success(),
        attempts: 1,
        message,
        output: Some(outcome.output_for_log()),
    }
}

/// The `KILN_*` variables of a command hook ([`ENV_VARS`]).
fn kiln_env(body: &HookBody) -> BTreeMap<String, String> {
    let p = &body.payload;
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    [
        ("KILN_EVENT", body.event.as_str().to_string()),
        ("KILN_HOOK", body.hook.clone()),
        ("KILN_DELIVERY", body.delivery.to_string()),
        ("KILN_JOB_ID", p.job_id.to_string()),
        (
            "KILN_MACHINE_ID",
            p.machine_id.map(|m| m.to_string()).unwrap_or_default(),
        ),
        ("KILN_HOSTNAME", p.hostname.clone()),
        ("KILN_OS", opt(&p.os)),
        ("KILN_TICKET", opt(&p.ticket)),
        ("KILN_STEP", opt(&p.step)),
        ("KILN_STAGE", p.stage.map(|s| s.to_string()).unwrap_or_default()),
        ("KILN_REASON", opt(&p.reason)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// `Retry-After` in seconds (the HTTP-date form is rare for webhooks and
/// falls back to the normal delay).
fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The start of a response body, on one line, for an error message. Reads
/// no more than it quotes.
async fn body_start(mut resp: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < BODY_QUOTE_LIMIT {
        match resp.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > BODY_QUOTE_LIMIT || bytes.len() >= BODY_QUOTE_LIMIT {
        format!("{}…", one_line.chars().take(BODY_QUOTE_LIMIT).collect::<String>())
    } else {
        one_line
    }
}

/// An error and its sources on one line (`a: b: c`), the way a person
/// needs it in a job log (the server's outbound client uses it too).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// A URL fit for logs: without user info and with the query hidden (either
/// may carry a token).
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            if u.query().is_some() {
                u.set_query(Some("[redacted]"));
            }
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "[unparsable url]".into(),
    }
}

/// The webhook client: rustls on the ring provider, like the rest of kiln
/// (see the root Cargo.toml), verifying against the system's trusted roots
/// (a site CA goes there, e.g. via `update-ca-certificates`).
fn http_client() -> Result<reqwest::Client, HookSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
        .map_err(|e| HookSetupError::HttpClient(format!("cannot load the system's trusted certificates: {e}")))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HookSetupError::HttpClient(format!("TLS set-up failed: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        // A POST answered with a redirect would become a GET elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| HookSetupError::HttpClient(error_chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Vec<HookConfig>, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            hooks: Vec<HookConfig>,
        }
        toml::from_str::<File>(toml_text)
            .map(|f| f.hooks)
            .map_err(|e| e.to_string())
    }

    const SECRET: &str = "0123456789abcdef0123";

    #[test]
    fn a_webhook_and_a_command_parse() {
        let hooks = parse(&format!(
            r#"
            [[hooks]]
            name = "ticket"
            events = ["post_reimage", "failure"]
            timeout_secs = 5
            [hooks.webhook]
            url = "https://relay.example/kiln"
            secret = "{SECRET}"

            [[hooks]]
            name = "depool"
            events = ["pre_reimage"]
            [hooks.command]
            argv = ["/usr/local/bin/depool", "--reason", "reimage"]
            env = {{ CONFCTL_CONFIG = "/etc/conftool.yaml" }}
            "#
        ))
        .unwrap();
        assert_eq!(hooks.len(), 2);
        assert_eq!(hooks[0].timeout(), Duration::from_secs(5));
        assert!(matches!(&hooks[0].action, HookAction::Webhook(w) if w.retries == 3));
        assert!(!hooks[0].required_for(HookEvent::PostReimage));
        assert_eq!(hooks[1].timeout_secs, 30);
        assert!(hooks[1].required_for(HookEvent::PreReimage));
        assert_eq!(hooks[1].kind(), HookKind::Command);
    }

    #[test]
    fn config_errors_say_what_and_how() {
        let table = [
            (
                r#"name = "x"
                events = ["pre_install"]
                command = { argv = ["true"] }"#,
                "unknown variant `pre_install`, expected one of `pre_reimage`, `post_reimage`, `failure`",
            ),
            (
                r#"name = "x"
                events = ["failure"]
                command = { argv = [] }"#,
                "argv is empty",
            ),
            (
                r#"name = "x"
                events = ["failure"]
                command = { argv = [""] }"#,
                "argv[0] (the program) is empty",
            ),
            (
                r#"name = "x"
                events = ["failure"]
                timeout_secs = 0
                command = { argv = ["true"] }"#,
                "timeout_secs = 0 is out of range",
            ),
            (
                r#"name = "x"
                events = []
                command = { argv = ["true"] }"#,
                "events is empty",
            ),
            (
                r#"name = "x"
                events = ["failure", "failure"]
                command = { argv = ["true"] }"#,
                "listed twice",
            ),
            (
                r#"name = "x"
                events = ["failure"]"#,
                "has neither",
            ),
            (
                r#"name = "x y"
                events = ["failure"]
                command = { argv = ["true"] }"#,
                "name `x y` must have",
            ),
            (
                r#"name = "x"
                events = ["failure"]
                command = { argv = ["true"], env = { KILN_OS = "x" } }"#,
                "set by kiln itself",
            ),
            (
                r#"name = "x"
                events = ["failure"]
                command = { argv = ["true"], retries = 2 }"#,
                "unknown field `retries`",
            ),
            (
                r#"name = "x"
                events = ["failure"]
                webhook = { url = "ftp://a/b", secret = "0123456789abcdef" }"#,
                "must start with http:// or https://",
            ),
            (
                r#"name = "x"
                events = ["failure"]
                webhook = { url = "relay/kiln", secret = "0123456789abcdef" }"#,
                "is not a URL",
            ),
            (
                r#"name = "x"
                events = ["failure"]
                webhook = { url = "https://a/b", secret = "short" }"#,
                "openssl rand -hex 32",
            ),
            (
                r#"name = "x"
                events = ["failure"]
                webhook = { url = "https://a/b", secret = "0123456789abcdef", retries = 50 }"#,
                "more than 10",
            ),
            (
                r#"name = "x"
                events = ["failure"]
                webhook = { url = "https://a/b", secret = "0123456789abcdef" }
                command = { argv = ["true"] }"#,
                "has both",
            ),
            (
                r#"name = "x"
                event = ["failure"]
                command = { argv = ["true"] }"#,
                "unknown field `event`",
            ),
        ];
        for (body, want) in table {
            let err = parse(&format!("[[hooks]]\n{body}")).unwrap_err();
            assert!(err.contains(want), "{body}\n→ {err}\nwanted: {want}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_and_urls_lose_their_credentials() {
        let hooks = parse(
            r#"
            [[hooks]]
            name = "t"
            events = ["failure"]
            webhook = { url = "https://user:pw@relay.example/hook?token=tok123", secret = "canary-0123456789" }
            "#,
        )
        .unwrap();
        let shown = format!("{hooks:?}");
        for leak in ["canary", "pw@", "tok123"] {
            assert!(!shown.contains(leak), "{leak} in {shown}");
        }
        assert!(shown.contains("https://relay.example/hook?[redacted]"), "{shown}");

        let hooks = parse(
            r#"
            [[hooks]]
            name = "t"
            events = ["failure"]
            command = { argv = ["/bin/true"], env = { JIRA_TOKEN = "canary-token" } }
            "#,
        )
        .unwrap();
        let shown = format!("{hooks:?}");
        assert!(!shown.contains("canary") && shown.contains("JIRA_TOKEN"), "{shown}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut hooks = parse(
            r#"
            [[hooks]]
            name = "a"
            events = ["failure"]
            command = { argv = ["true"] }
            "#,
        )
        .unwrap();
        hooks.push(hooks[0].clone());
        let err = HookRunner::new(hooks).unwrap_err();
        assert!(err.to_string().contains("two hooks are named `a`"), "{err}");
    }

    #[test]
    fn hooks_built_in_code_are_validated_too() {
        let hook = HookConfig {
            name: "x".into(),
            events: vec![HookEvent::Failure],
            timeout_secs: 0,
            required: None,
            action: HookAction::Command(CommandConfig {
                argv: vec![],
                env: BTreeMap::new(),
            }),
        };
        let err = HookRunner::new(vec![hook]).unwrap_err().to_string();
        assert!(err.starts_with("hook `x`: timeout_secs = 0"), "{err}");
        assert!(err.contains("argv is empty"), "{err}");
    }

    #[test]
    fn signatures_verify_only_with_the_right_secret_and_body() {
        let sig = signature(b"secret", b"{\"a\":1}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert!(verify_signature(b"secret", b"{\"a\":1}", &sig));
        assert!(!verify_signature(b"other", b"{\"a\":1}", &sig));
        assert!(!verify_signature(b"secret", b"{\"a\":2}", &sig));
        assert!(!verify_signature(
            b"secret",
            b"{\"a\":1}",
            sig.trim_start_matches("sha256=")
        ));
    }

    #[test]
    fn a_known_signature() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let d = RetryDelays {
            first: Duration::from_secs(1),
            max: Duration::from_secs(5),
        };
        let got: Vec<u64> = (1..=5).map(|a| d.after(a).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 5, 5]);
        assert_eq!(d.after(200), Duration::from_secs(5));
    }

    #[test]
    fn failure_reason_names_the_first_required_failure_that_ran() {
        let o = |hook: &str, ok, required, skipped| HookOutcome {
            hook: hook.into(),
            event: HookEvent::PreReimage,
            kind: HookKind::Command,
            ok,
            required,
            skipped,
            attempts: if skipped { 0 } else { 1 },
            duration_ms: 1,
            message: "boom".into(),
            output: None,
        };
        assert_eq!(
            job_failure_reason(&[o("a", true, true, false), o("b", false, false, false)]),
            None
        );
        // A skipped required hook is not the reason: the one that failed before it is.
        let reason = job_failure_reason(&[
            o("c", false, true, true),
            o("a", false, false, false),
            o("b", false, true, false),
        ]);
        assert_eq!(reason.as_deref(), Some("required pre_reimage hook `b` failed: boom"));
    }
}
