//! The job engine: claims due jobs from the store, runs their steps one at
//! a time and commits each step's answer before the next starts.
//!
//! Durability rules, all enforced here:
//! - before a step runs, its attempt is committed (state `running`, attempt
//!   count + 1; in the same transaction as the previous step's answer when
//!   the job goes straight on): a step that kills its server again and
//!   again is failed after `max_attempts`, not retried forever;
//! - a step's effects on the store (log, machine state, net-boot arm) are
//!   committed with its answer, fenced by the job's lease;
//! - a waiting job holds no lease: whichever server learns of its event (a
//!   stage report, an operator's action) or reaches its deadline runs it;
//! - a job that fails or is cancelled is undone by its kind (disarm, boot
//!   from disk) before it is final.
//!
//! Waking: [`Engine::wake`] is called by the API after it committed a stage
//! report or an operator action; the claim loop runs at once. Without wakes
//! it looks for due jobs once per `poll_interval` (other servers' events,
//! timeouts), which is one cheap indexed query, not a busy loop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kiln_store::{ArmRecord, JobRecord, JobSave, LogLine, Store};
use kiln_types::MachineId;
use kiln_types::catalog::OsImage;
use kiln_types::job::{Job, JobKind, JobLogKind, JobState, ReimageSpec};
use kiln_types::machine::{Machine, MachineState};
use serde::Deserialize;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::reimage::{self, ReimageTimeouts};
use crate::rollout;

/// What a step says when it returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: go on with the next step.
    Next,
    /// Not yet: run this step again when the job is woken (a stage report,
    /// an operator) or at `until`, whichever comes first.
    Wait { until: DateTime<Utc>, reason: String },
    /// A passing failure (a BMC timeout): run the step again after `after`,
    /// up to the engine's `max_attempts`.
    Retry { after: Duration, reason: String },
    /// Give up, in words a person can act on.
    Fail { reason: String },
}

/// A BMC action a step asks for. Only actions that set a state are used
/// (power *off* then *on*, never *cycle*): running one twice after a crash
/// is harmless, so no BMC action of a job ever needs to be sent exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BmcAction {
    /// Reachable and authenticated.
    Check,
    /// Next boot from the network, once.
    BootNetworkOnce,
    /// Boot from disk, persistently.
    BootDisk,
    PowerOff,
    PowerOn,
}

/// A BMC action that did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmcError {
    pub message: String,
    /// Worth trying again (a timeout, a busy BMC); false for what needs a
    /// person (bad credentials, no BMC, maintenance).
    pub retryable: bool,
}

/// What the job's machine net-boots while armed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetbootPlan {
    pub kernel: String,
    pub initrds: Vec<String>,
    pub cmdline: Vec<String>,
}

/// The outside world, as the engine's steps see it; the server implements
/// it with its BMC service, boot settings, hooks and task runners, tests
/// with whatever they need to observe.
pub trait Effects: Send + Sync + 'static {
    /// Carries out `action` on `machine`'s BMC (with its own deadline and
    /// retries), or says why not.
    fn bmc(&self, machine: MachineId, action: BmcAction) -> impl Future<Output = Result<(), BmcError>> + Send;

    /// What `image` net-boots to install itself on `machine` for `job` (the
    /// deploy agent for a disk image, the installer's kernel for an
    /// installer).
    fn netboot_plan(
        &self,
        job: &JobRecord,
        spec: &ReimageSpec,
        image: &OsImage,
        machine: &Machine,
    ) -> Result<NetbootPlan, String>;

    /// Runs the hooks configured for `event` (`pre_reimage`,
    /// `post_reimage`, `failure`): log lines, or why a required hook
    /// failed.
    fn run_hooks(
        &self,
        event: &'static str,
        job: &JobRecord,
    ) -> impl Future<Output = Result<Vec<String>, String>> + Send;

    /// Runs the job's post-install tasks: log lines, or why one failed.
    fn post_install(
        &self,
        job: &JobRecord,
        spec: &ReimageSpec,
    ) -> impl Future<Output = Result<Vec<String>, String>> + Send;

    /// A rollout's health check of a member whose reimage ended: `argv`
    /// run with the machine's fields in its environment; `Err` says why it
    /// did not pass.
    fn health_check(&self, argv: &[String], job: &JobRecord) -> impl Future<Output = Result<(), String>> + Send;
}

/// Engine settings (`[jobs]` in the server's config).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSettings {
    /// Jobs this server runs at once.
    pub max_concurrent: usize,
    /// How long a claim holds without a heartbeat; a job whose server died
    /// is taken over this long after its last heartbeat.
    pub lease_secs: u64,
    /// How often to look for jobs that fell due without a wake-up.
    pub poll_interval_ms: u64,
    /// Runs of one step (interrupted or retried) before the job fails.
    pub max_attempts: u32,
    pub reimage: ReimageTimeouts,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_concurrent: 1024,
            lease_secs: 30,
            poll_interval_ms: 1000,
            max_attempts: 5,
            reimage: ReimageTimeouts::default(),
        }
    }
}

impl EngineSettings {
    fn lease(&self) -> chrono::Duration {
        chrono::Duration::seconds(self.lease_secs.max(1) as i64)
    }
}

/// The steps of a job kind, in order.
pub fn steps(kind: JobKind) -> &'static [&'static str] {
    match kind {
        JobKind::Reimage => reimage::STEPS,
        JobKind::Rollout => rollout::STEPS,
    }
}

/// Where a retry of a job that ended in step `ended_in` starts (`from`, if
/// the operator named a step, else the kind's choice), and the stage it
/// starts with.
pub fn retry_plan(
    kind: JobKind,
    ended_in: u32,
    from: Option<u32>,
    stage: kiln_types::job::Stage,
) -> (u32, kiln_types::job::Stage) {
    match kind {
        JobKind::Reimage => reimage::retry_plan(ended_in, from, stage),
        JobKind::Rollout => (from.unwrap_or(0), stage),
    }
}

/// The API view of a stored job.
pub fn job_view(r: &JobRecord) -> Job {
    let steps = steps(r.kind);
    let root_password_set = r.spec.get("root_password_hash").is_some_and(|v| !v.is_null());
    Job {
        id: r.id,
        kind: r.kind,
        state: r.state,
        machine_id: r.machine_id,
        hostname: r.hostname.clone(),
        step: steps.get(r.step_index as usize).copied().unwrap_or("done").to_string(),
        step_index: r.step_index,
        steps: steps.iter().map(|s| s.to_string()).collect(),
        stage: r.stage,
        reason: r.reason.clone(),
        os: r.os_label.clone(),
        ticket: r.ticket.clone(),
        callback_url: r.callback_url.clone(),
        root_password_set,
        created_by: r.created_by.clone(),
        created_at: r.created_at,
        updated_at: r.updated_at,
        finished_at: r.finished_at,
    }
}

/// What a running step may touch: its job (read), the job's scratch data
/// (`data`, saved with the answer) and the effects to commit with it.
#[derive(Debug)]
pub struct StepCx<'a, E> {
    pub job: &'a JobRecord,
    pub store: &'a Store,
    pub effects: &'a E,
    pub settings: &'a EngineSettings,
    pub now: DateTime<Utc>,
    pub data: serde_json::Map<String, serde_json::Value>,
    pub save: JobSave,
}

impl<E> StepCx<'_, E> {
    pub fn log(&mut self, kind: JobLogKind, message: impl Into<String>) {
        let step = steps(self.job.kind).get(self.job.step_index as usize).copied();
        self.save.log.push(LogLine::new(kind, step, message));
    }

    pub fn set_machine_state(&mut self, state: MachineState) {
        self.save.machine_state = Some(state);
    }

    pub fn arm(&mut self, arm: ArmRecord) {
        self.save.arm = Some(Some(arm));
    }

    pub fn disarm(&mut self) {
        self.save.arm = Some(None);
    }

    pub fn flag(&self, key: &str) -> bool {
        self.data.get(key).and_then(serde_json::Value::as_bool).unwrap_or(false)
    }

    pub fn set(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.data.insert(key.to_string(), value.into());
    }
}

/// Why a job is being undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Failed,
    Cancelled,
}

/// Runs jobs. One per server; cheap to share (`Arc`).
#[derive(Debug)]
pub struct Engine<E> {
    store: Store,
    effects: Arc<E>,
    settings: EngineSettings,
    /// Names this server in job leases.
    owner: String,
    wake: Notify,
    slots: Arc<Semaphore>,
    /// Bumped on every change this server makes to a job (live views wait
    /// on it).
    changes: tokio::sync::watch::Sender<u64>,
    crash_at: Option<CrashPoint>,
}

/// Where the crash tests kill the server: `KILN_TEST_CRASH_AT=STEP:before`
/// (the step ran, its answer is not committed) or `STEP:after` (just
/// committed). The process sends itself SIGKILL there: no destructor, no
/// flush, exactly like a power loss of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CrashPoint {
    step: String,
    after_commit: bool,
}

impl CrashPoint {
    fn from_env() -> Option<CrashPoint> {
        let spec = std::env::var("KILN_TEST_CRASH_AT").ok()?;
        let (step, phase) = spec.split_once(':')?;
        Some(CrashPoint {
            step: step.to_string(),
            after_commit: phase == "after",
        })
    }
}

impl<E: Effects> Engine<E> {
    pub fn new(store: Store, effects: Arc<E>, settings: EngineSettings, owner: String) -> Arc<Engine<E>> {
        let slots = Arc::new(Semaphore::new(settings.max_concurrent.max(1)));
        Arc::new(Engine {
            store,
            effects,
            settings,
            owner,
            wake: Notify::new(),
            slots,
            changes: tokio::sync::watch::Sender::new(0),
            crash_at: CrashPoint::from_env(),
        })
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Look for due jobs now (after a stage report or operator action was
    /// committed).
    pub fn wake(&self) {
        self.changed();
        self.wake.notify_one();
    }

    /// Says when this server changed a job (a step, a stage report, an
    /// operator's action), for live views.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Claims and runs due jobs until `shutdown`. Jobs running then are
    /// left where they are: their leases expire and any server resumes them.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let poll = Duration::from_millis(self.settings.poll_interval_ms.max(10));
        loop {
            let mut pause = poll;
            match self.claim_and_start(&shutdown).await {
                Ok(0) => {
                    if let Ok(Some(due)) = self.store.next_job_due().await {
                        let until = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                        pause = pause.min(until.max(Duration::from_millis(5)));
                    }
                }
                Ok(_) => pause = Duration::ZERO,
                Err(e) => tracing::warn!(error = %e, "claiming jobs failed; trying again"),
            }
            if pause.is_zero() && self.slots.available_permits() > 0 {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        Ok(())
    }

    /// Claims as many due jobs as there are free slots and starts them;
    /// how many were started.
    async fn claim_and_start(self: &Arc<Self>, shutdown: &CancellationToken) -> anyhow::Result<usize> {
        let free = self.slots.available_permits();
        if free == 0 {
            return Ok(0);
        }
        let claimed = self
            .store
            .claim_due_jobs(&self.owner, Utc::now(), self.settings.lease(), free)
            .await?;
        let n = claimed.len();
        for job in claimed {
            let permit = self.slots.clone().acquire_owned().await?;
            let (engine, stop) = (self.clone(), shutdown.child_token());
            tokio::spawn(async move {
                engine.drive(job, u32::MAX, stop).await;
                drop(permit);
            });
        }
        Ok(n)
    }

    /// Runs the due jobs to their next wait or end, one after another in
    /// this task (tests drive the engine with it). Returns how many ran.
    pub async fn run_due_once(self: &Arc<Self>) -> anyhow::Result<usize> {
        self.run_due_steps(u32::MAX).await
    }

    /// Like [`Engine::run_due_once`], but each job stops after `max_steps`
    /// finished steps and stays due: tests stop jobs at any step boundary
    /// with it.
    pub async fn run_due_steps(self: &Arc<Self>, max_steps: u32) -> anyhow::Result<usize> {
        let claimed = self
            .store
            .claim_due_jobs(
                &self.owner,
                Utc::now(),
                self.settings.lease(),
                self.settings.max_concurrent,
            )
            .await?;
        let n = claimed.len();
        for job in claimed {
            self.drive(job, max_steps, CancellationToken::new()).await;
        }
        Ok(n)
    }

    /// Runs one claimed job until it waits, ends, or its lease is lost;
    /// a heartbeat keeps the lease while steps run.
    async fn drive(self: &Arc<Self>, job: JobRecord, max_steps: u32, stop: CancellationToken) {
        let id = job.id;
        let lost = CancellationToken::new();
        let heartbeat = {
            let (store, owner, lost, stop) = (self.store.clone(), self.owner.clone(), lost.clone(), stop.clone());
            let lease = self.settings.lease();
            let every = (lease / 3).to_std().unwrap_or(Duration::from_secs(1));
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    match store.renew_job_lease(id, &owner, Utc::now() + lease).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(job = %id, "job lease was taken over; stopping here");
                            lost.cancel();
                            return;
                        }
                        Err(e) => tracing::warn!(job = %id, error = %e, "renewing the job lease failed"),
                    }
                }
            })
        };
        let result = tokio::select! {
            r = self.drive_steps(job, max_steps) => r,
            _ = lost.cancelled() => Ok(()),
            _ = stop.cancelled() => Ok(()),
        };
        heartbeat.abort();
        if let Err(e) = result {
            // The lease expires and the job is picked up again.
            tracing::warn!(job = %id, error = %e, "job stopped on a store error; it resumes when its lease expires");
        }
    }

    fn crash_point(&self, step: &str, after_commit: bool) {
        if let Some(c) = &self.crash_at
            && c.step == step
            && c.after_commit == after_commit
        {
            tracing::warn!(step, after_commit, "KILN_TEST_CRASH_AT: killing this server");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Saves `job` with `save`; `None` if this server lost the job.
    async fn save(&self, job: &JobRecord, save: JobSave) -> anyhow::Result<Option<JobRecord>> {
        let saved = self.store.save_job(&self.owner, job, save).await?;
        match saved {
            Some(_) => self.changed(),
            None => tracing::warn!(job = %job.id, "job lease was taken over; stopping here"),
        }
        Ok(saved)
    }

    async fn drive_steps(&self, mut job: JobRecord, max_steps: u32) -> anyhow::Result<()> {
        let steps = steps(job.kind);
        let mut finished = 0;
        // Whether the current step's attempt was committed with the last
        // step's answer (see `Outcome::Next` below).
        let mut attempt_on_record = false;
        loop {
            if job.cancel_requested {
                return self
                    .end(job, Ending::Cancelled, "cancelled by an operator".into())
                    .await;
            }
            if let Some(why) = job.failure_reported.clone() {
                let reason = format!("the machine reported a failure: {why}");
                return self.end(job, Ending::Failed, reason).await;
            }
            if job.pause_requested {
                if attempt_on_record {
                    // Recorded, but the step never ran.
                    job.step_attempts -= 1;
                }
                job.state = JobState::Paused;
                job.run_at = None;
                job.reason = Some("paused by an operator; `kiln job resume` goes on".into());
                job.lease_owner = None;
                job.lease_expires = None;
                let log = vec![LogLine::new(JobLogKind::Paused, step_name(&job), "paused")];
                self.save(
                    &job,
                    JobSave {
                        log,
                        ..Default::default()
                    },
                )
                .await?;
                return Ok(());
            }
            let Some(&step) = steps.get(job.step_index as usize) else {
                return self.succeed(job).await;
            };
            if !std::mem::take(&mut attempt_on_record) {
                if job.step_attempts >= self.settings.max_attempts {
                    let reason = format!(
                        "step {step} ran {} times without finishing ({}); fix the cause, then `kiln job retry {}`",
                        job.step_attempts,
                        job.reason.as_deref().unwrap_or("interrupted"),
                        job.id
                    );
                    return self.end(job, Ending::Failed, reason).await;
                }
                // The attempt is on record before anything happens.
                // A waiting step runs again on each wake-up; it "started" once.
                let entering = job.step_attempts == 0 && job.state != JobState::Waiting;
                job.state = JobState::Running;
                job.step_attempts += 1;
                let mut save = JobSave::default();
                if entering {
                    save.log.push(LogLine::new(JobLogKind::Step, Some(step), "started"));
                }
                let Some(saved) = self.save(&job, save).await? else {
                    return Ok(());
                };
                job = saved;
            }
            let mut cx = StepCx {
                job: &job,
                store: &self.store,
                effects: &*self.effects,
                settings: &self.settings,
                now: Utc::now(),
                data: job.data.as_object().cloned().unwrap_or_default(),
                save: JobSave::default(),
            };
            let outcome = match job.kind {
                JobKind::Reimage => reimage::run_step(step, &mut cx).await,
                JobKind::Rollout => rollout::run_step(step, &mut cx).await,
            };
            let (data, mut save) = (cx.data, cx.save);
            let mut next = job.clone();
            next.data = serde_json::Value::Object(data);
            self.crash_point(step, false);
            match outcome {
                Outcome::Next => {
                    save.log.push(LogLine::new(JobLogKind::Step, Some(step), "done"));
                    next.step_index += 1;
                    next.step_started_at = Utc::now();
                    next.step_attempts = 0;
                    next.reason = None;
                    finished += 1;
                    if finished == max_steps {
                        next.state = JobState::Queued;
                        next.run_at = Some(Utc::now());
                        next.lease_owner = None;
                        next.lease_expires = None;
                        self.save(&next, save).await?;
                        return Ok(());
                    }
                    // The next step's attempt goes on record in the same
                    // commit as this answer: one transaction between two
                    // steps, not two (on SQLite, where writes take turns,
                    // 1,000 jobs in step queued for each of them,
                    // bench/reimage.sh).
                    if let Some(&following) = steps.get(next.step_index as usize) {
                        next.step_attempts = 1;
                        save.log
                            .push(LogLine::new(JobLogKind::Step, Some(following), "started"));
                        attempt_on_record = true;
                    }
                    let Some(saved) = self.save(&next, save).await? else {
                        return Ok(());
                    };
                    self.crash_point(step, true);
                    job = saved;
                }
                Outcome::Wait { until, reason } => {
                    if job.reason.as_deref() != Some(&reason) {
                        save.log
                            .push(LogLine::new(JobLogKind::Wait, Some(step), reason.clone()));
                    }
                    // A wait is not an attempt: only interrupted runs count.
                    next.step_attempts -= 1;
                    self.park(next, until, reason, save).await?;
                    self.crash_point(step, true);
                    return Ok(());
                }
                Outcome::Retry { after, reason } => {
                    save.log.push(LogLine::new(
                        JobLogKind::Retry,
                        Some(step),
                        format!("{reason}; trying again in {}s", after.as_secs()),
                    ));
                    let until = Utc::now() + chrono::Duration::from_std(after).unwrap_or_default();
                    self.park(next, until, reason, save).await?;
                    self.crash_point(step, true);
                    return Ok(());
                }
                Outcome::Fail { reason } => {
                    let reason = format!("step {step}: {reason}");
                    // The step's own effects first (e.g. what it armed is
                    // undone below anyway).
                    let Some(saved) = self.save(&next, save).await? else {
                        return Ok(());
                    };
                    return self.end(saved, Ending::Failed, reason).await;
                }
            }
        }
    }

    /// Puts `job` to sleep until `until` (or a wake-up), lease released.
    async fn park(
        &self,
        mut job: JobRecord,
        until: DateTime<Utc>,
        reason: String,
        save: JobSave,
    ) -> anyhow::Result<()> {
        job.state = JobState::Waiting;
        job.run_at = Some(until);
        job.reason = Some(reason);
        job.lease_owner = None;
        job.lease_expires = None;
        // The claim loop sleeps until the next job it knows of can be
        // claimed, at most a poll interval: one parked due sooner (a stage
        // reported while the step ran, a short retry) must not wait for it.
        let soon = Utc::now() + chrono::Duration::milliseconds(self.settings.poll_interval_ms as i64);
        if let Some(saved) = self.save(&job, save).await?
            && saved.run_at.is_some_and(|at| at <= soon)
        {
            self.wake.notify_one();
        }
        Ok(())
    }

    async fn succeed(&self, mut job: JobRecord) -> anyhow::Result<()> {
        job.state = JobState::Succeeded;
        job.reason = None;
        job.run_at = None;
        job.lease_owner = None;
        job.lease_expires = None;
        job.finished_at = Some(Utc::now());
        let log = vec![LogLine::new(JobLogKind::Succeeded, None, "done")];
        if let Some(saved) = self
            .save(
                &job,
                JobSave {
                    log,
                    ..Default::default()
                },
            )
            .await?
        {
            self.ended(&saved).await;
        }
        Ok(())
    }

    /// Undoes what the job armed, then makes it final. The undo runs again
    /// if the server dies before the end is committed (it is idempotent).
    async fn end(&self, mut job: JobRecord, ending: Ending, reason: String) -> anyhow::Result<()> {
        // The undo (and the failure hooks it runs) sees why.
        job.reason = Some(reason.clone());
        let mut cx = StepCx {
            job: &job,
            store: &self.store,
            effects: &*self.effects,
            settings: &self.settings,
            now: Utc::now(),
            data: job.data.as_object().cloned().unwrap_or_default(),
            save: JobSave::default(),
        };
        match job.kind {
            JobKind::Reimage => reimage::undo(&mut cx, ending).await,
            JobKind::Rollout => rollout::undo(&mut cx, ending).await,
        }
        let (data, mut save) = (cx.data, cx.save);
        let mut last = job.clone();
        last.data = serde_json::Value::Object(data);
        last.state = match ending {
            Ending::Failed => JobState::Failed,
            Ending::Cancelled => JobState::Cancelled,
        };
        last.reason = Some(reason.clone());
        last.run_at = None;
        last.lease_owner = None;
        last.lease_expires = None;
        last.finished_at = Some(Utc::now());
        let kind = match ending {
            Ending::Failed => JobLogKind::Failed,
            Ending::Cancelled => JobLogKind::Cancelled,
        };
        save.log.push(LogLine::new(kind, step_name(&job), reason));
        if let Some(saved) = self.save(&last, save).await? {
            self.ended(&saved).await;
        }
        Ok(())
    }

    /// After `job` ended: its rollout looks at once, and jobs the end made
    /// due (an aborted rollout's cancelled members) run at once.
    async fn ended(&self, job: &JobRecord) {
        if let Some(parent) = job.parent_id
            && let Err(e) = self.store.wake_job(parent).await
        {
            tracing::warn!(job = %job.id, error = %e, "could not wake the job's rollout; it looks again later");
        }
        self.wake.notify_one();
    }
}

fn step_name(job: &JobRecord) -> Option<&'static str> {
    steps(job.kind).get(job.step_index as usize).copied()
}
