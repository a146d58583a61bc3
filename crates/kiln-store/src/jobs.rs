//! Jobs, their log and the net-boot arms they set: the durable state of
//! kiln-workflow. The engine owns the rules (which step comes next); this
//! module keeps them durable and fenced:
//!
//! - a server claims due jobs with a lease (`FOR UPDATE SKIP LOCKED` on
//!   PostgreSQL, so several servers share the work; SQLite has one writer);
//! - every save of a job is fenced by that lease: a server whose lease was
//!   taken over writes nothing and learns it lost the job;
//! - a save writes the job, its log lines, the machine's state and the arm in
//!   one transaction, so "step done" and its effect on the boot decision are
//!   never seen apart;
//! - stage reports and operator actions set `run_at` to now, which is what
//!   wakes a waiting job.

use chrono::{DateTime, Duration, Utc};
use kiln_types::job::{JobFilter, JobKind, JobLogEntry, JobLogKind, JobState, MemberState, RolloutMember, Stage};
use kiln_types::machine::MachineState;
use kiln_types::{JobId, MachineId};
use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, Row};

use crate::events::{Change, record};
use crate::machines::get_bool;
use crate::{Actor, Backend, Params, Result, Store, StoreError, built, now, page_limit, parse_col, parse_ts, ts};

/// A job as stored: the API view plus what only the engine reads.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub kind: JobKind,
    pub state: JobState,
    pub machine_id: Option<MachineId>,
    /// The rollout that started this job, if one did.
    pub parent_id: Option<JobId>,
    pub hostname: String,
    pub os_label: String,
    /// What was asked (the job kind's spec type, as JSON).
    pub spec: serde_json::Value,
    /// What the steps recorded so far (a JSON object).
    pub data: serde_json::Value,
    pub step_index: u32,
    /// When the current step began (the base of its timeout).
    pub step_started_at: DateTime<Utc>,
    /// Runs of the current step so far (retries count).
    pub step_attempts: u32,
    pub stage: Stage,
    pub reason: Option<String>,
    pub ticket: Option<String>,
    pub callback_url: Option<String>,
    pub cancel_requested: bool,
    /// What the job's agent or installer reported when it gave up; the
    /// engine ends the job as failed with it.
    pub failure_reported: Option<String>,
    pub pause_requested: bool,
    pub run_at: Option<DateTime<Utc>>,
    pub lease_owner: Option<String>,
    pub lease_expires: Option<DateTime<Utc>>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A job about to be created.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: JobKind,
    /// None for a job about no single machine (a rollout).
    pub machine_id: Option<MachineId>,
    pub parent_id: Option<JobId>,
    /// The machine's hostname, or a rollout's name.
    pub hostname: String,
    pub os_label: String,
    pub spec: serde_json::Value,
    pub ticket: Option<String>,
    pub callback_url: Option<String>,
    /// Start at this step (e.g. past the net boot for `--no-pxe`).
    pub first_step: u32,
}

/// A log line about to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub kind: JobLogKind,
    pub step: Option<String>,
    pub stage: Option<Stage>,
    pub message: String,
}

impl LogLine {
    pub fn new(kind: JobLogKind, step: Option<&str>, message: impl Into<String>) -> LogLine {
        LogLine {
            kind,
            step: step.map(str::to_string),
            stage: None,
            message: message.into(),
        }
    }
}

/// What a job armed for its machine's next net boot (the token is derived
/// by the server from its key and the job id, never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmRecord {
    pub machine_id: MachineId,
    pub job_id: JobId,
    pub kernel: String,
    pub initrds: Vec<String>,
    pub cmdline: Vec<String>,
    pub expires_at: DateTime<Utc>,
    pub consumed: bool,
}

/// Effects saved together with a job.
#[derive(Debug, Clone, Default)]
pub struct JobSave {
    pub log: Vec<LogLine>,
    /// Set the machine's state (audited as the job's actor).
    pub machine_state: Option<MachineState>,
    /// `Some(Some(arm))` arms, `Some(None)` disarms.
    pub arm: Option<Option<ArmRecord>>,
}

/// An operator's action on a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobControl {
    Cancel,
    Pause,
    Resume,
    /// Run a failed or cancelled job again from this step (named `step`,
    /// for the log), with its highest stage set back to `stage` (0 when
    /// the install is run again: the old stages must not count).
    Retry {
        step_index: u32,
        step: &'static str,
        stage: Stage,
    },
}

const JOB_COLUMNS: &str = "id, kind, state, machine_id, parent_id, hostname, os_label, spec, data, step_index, step_started_at, \
     step_attempts, stage, reason, ticket, callback_url, cancel_requested, failure_reported, pause_requested, run_at, \
     lease_owner, lease_expires, created_by, created_at, updated_at, finished_at";

fn opt_ts(row: &AnyRow, col: &str) -> Result<Option<DateTime<Utc>>> {
    row.try_get::<Option<String>, _>(col)?
        .as_deref()
        .map(parse_ts)
        .transpose()
}

fn json_col(what: &str, s: &str) -> Result<serde_json::Value> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn job_from_row(row: &AnyRow) -> Result<JobRecord> {
    let text = |col: &str| -> Result<String> { Ok(row.try_get::<String, _>(col)?) };
    let opt = |col: &str| -> Result<Option<String>> { Ok(row.try_get::<Option<String>, _>(col)?) };
    let stage: i64 = row.try_get("stage")?;
    Ok(JobRecord {
        id: parse_col("job id", &text("id")?)?,
        kind: parse_col("job kind", &text("kind")?)?,
        state: parse_col("job state", &text("state")?)?,
        machine_id: opt("machine_id")?.map(|m| parse_col("machine id", &m)).transpose()?,
        parent_id: opt("parent_id")?.map(|m| parse_col("job id", &m)).transpose()?,
        hostname: text("hostname")?,
        os_label: text("os_label")?,
        spec: json_col("job spec", &text("spec")?)?,
        data: json_col("job data", &text("data")?)?,
        step_index: row.try_get::<i64, _>("step_index")? as u32,
        step_started_at: parse_ts(&text("step_started_at")?)?,
        step_attempts: row.try_get::<i64, _>("step_attempts")? as u32,
        stage: Stage::new(stage as u8).map_err(StoreError::Corrupt)?,
        reason: opt("reason")?,
        ticket: opt("ticket")?,
        callback_url: opt("callback_url")?,
        cancel_requested: get_bool(row, "cancel_requested")?,
        failure_reported: opt("failure_reported")?,
        pause_requested: get_bool(row, "pause_requested")?,
        run_at: opt_ts(row, "run_at")?,
        lease_owner: opt("lease_owner")?,
        lease_expires: opt_ts(row, "lease_expires")?,
        created_by: text("created_by")?,
        created_at: parse_ts(&text("created_at")?)?,
        updated_at: parse_ts(&text("updated_at")?)?,
        finished_at: opt_ts(row, "finished_at")?,
    })
}

fn arm_from_row(row: &AnyRow) -> Result<ArmRecord> {
    let text = |col: &str| -> Result<String> { Ok(row.try_get::<String, _>(col)?) };
    let list = |col: &str| -> Result<Vec<String>> {
        serde_json::from_str(&text(col)?).map_err(|e| StoreError::Corrupt(format!("netboot arm {col}: {e}")))
    };
    Ok(ArmRecord {
        machine_id: parse_col("machine id", &text("machine_id")?)?,
        job_id: parse_col("job id", &text("job_id")?)?,
        kernel: text("kernel")?,
        initrds: list("initrds")?,
        cmdline: list("cmdline")?,
        expires_at: parse_ts(&text("expires_at")?)?,
        consumed: get_bool(row, "consumed")?,
    })
}

async fn load_job(conn: &mut AnyConnection, id: JobId) -> Result<JobRecord> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
    match sqlx::query::<Any>(built(sql))
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?
    {
        Some(row) => job_from_row(&row),
        None => Err(StoreError::NotFound {
            kind: "job",
            key: id.to_string(),
        }),
    }
}

/// Appends log lines to job `id`, each numbered next in one statement.
/// Callers hold the job row locked (they updated it first in the same
/// transaction), so `seq` cannot race.
async fn append_log(conn: &mut AnyConnection, id: JobId, lines: &[LogLine]) -> Result<()> {
    let at = ts(now());
    for line in lines {
        sqlx::query::<Any>(
            "INSERT INTO job_log (job_id, seq, at, kind, step, stage, message) \
             SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4, $5, $6 FROM job_log WHERE job_id = $1",
        )
        .bind(id.to_string())
        .bind(at.clone())
        .bind(line.kind.as_str())
        .bind(line.step.clone())
        .bind(line.stage.map(|s| i64::from(s.0)))
        .bind(line.message.clone())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Sets the state of `machine` inside a job's transaction, audited.
async fn set_machine_state(
    conn: &mut AnyConnection,
    actor: &Actor,
    machine: MachineId,
    state: MachineState,
) -> Result<()> {
    let Some(row) = sqlx::query::<Any>("SELECT hostname, state FROM machines WHERE id = $1")
        .bind(machine.to_string())
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(()); // deleted meanwhile: nothing to set
    };
    let hostname: String = row.try_get("hostname")?;
    let before: String = row.try_get("state")?;
    if before == state.as_str() {
        return Ok(());
    }
    sqlx::query::<Any>("UPDATE machines SET state = $1, updated_at = $2 WHERE id = $3")
        .bind(state.as_str())
        .bind(ts(now()))
        .bind(machine.to_string())
        .execute(&mut *conn)
        .await?;
    crate::machines::bump_machines_generation(conn).await?;
    record(
        conn,
        actor,
        Change {
            action: "machine.state",
            target_kind: "machine",
            target_id: machine.to_string(),
            target_name: hostname,
            before: Some(serde_json::json!({ "state": before })),
            after: Some(serde_json::json!({ "state": state })),
        },
    )
    .await
}

/// Arms or disarms `machine`'s next net boot. Not a machine change for
/// the DHCP listener's inventory: it answers a known machine with the same
/// boot file armed or not (HTTP boot reads the arm from the store).
async fn write_arm(conn: &mut AnyConnection, machine: MachineId, arm: Option<&ArmRecord>) -> Result<()> {
    sqlx::query::<Any>("DELETE FROM netboot_arms WHERE machine_id = $1")
        .bind(machine.to_string())
        .execute(&mut *conn)
        .await?;
    if let Some(a) = arm {
        let json = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
        sqlx::query::<Any>(
            "INSERT INTO netboot_arms (machine_id, job_id, kernel, initrds, cmdline, expires_at, consumed) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(a.machine_id.to_string())
        .bind(a.job_id.to_string())
        .bind(a.kernel.clone())
        .bind(json(&a.initrds))
        .bind(json(&a.cmdline))
        .bind(ts(a.expires_at))
        .bind(a.consumed)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Inserts a queued job (and its first log line and audit event).
async fn insert_job(conn: &mut AnyConnection, actor: &Actor, new: &NewJob) -> Result<JobRecord> {
    if let Some(machine) = new.machine_id
        && let Some(row) =
            sqlx::query::<Any>("SELECT id, kind, state FROM jobs WHERE machine_id = $1 AND finished_at IS NULL")
                .bind(machine.to_string())
                .fetch_optional(&mut *conn)
                .await?
    {
        let (id, kind, state): (String, String, String) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        return Err(StoreError::Conflict(format!(
            "{} already has an active job: {kind} {id}, {state}; cancel it (`kiln job cancel {id}`) or wait for it to end",
            new.hostname
        )));
    }
    let id = JobId::new();
    let at = ts(now());
    sqlx::query::<Any>(
        "INSERT INTO jobs (id, kind, state, machine_id, parent_id, hostname, os_label, spec, data, step_index, \
         step_started_at, step_attempts, stage, ticket, callback_url, cancel_requested, pause_requested, \
         run_at, created_by, created_at, updated_at) \
         VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, '{}', $8, $9, 0, 0, $10, $11, FALSE, FALSE, $9, $12, $9, $9)",
    )
    .bind(id.to_string())
    .bind(new.kind.as_str())
    .bind(new.machine_id.map(|m| m.to_string()))
    .bind(new.parent_id.map(|m| m.to_string()))
    .bind(new.hostname.clone())
    .bind(new.os_label.clone())
    .bind(new.spec.to_string())
    .bind(i64::from(new.first_step))
    .bind(at.clone())
    .bind(new.ticket.clone())
    .bind(new.callback_url.clone())
    .bind(actor.0.clone())
    .execute(&mut *conn)
    .await?;
    let message = format!(
        "{} of {} with {} requested by {}",
        new.kind, new.hostname, new.os_label, actor.0
    );
    append_log(conn, id, &[LogLine::new(JobLogKind::Created, None, message)]).await?;
    let (target_kind, target_id) = match new.machine_id {
        Some(m) => ("machine", m.to_string()),
        None => ("job", id.to_string()),
    };
    record(
        conn,
        actor,
        Change {
            action: "job.create",
            target_kind,
            target_id,
            target_name: new.hostname.clone(),
            before: None,
            after: Some(serde_json::json!({
                "job": id, "kind": new.kind, "os": new.os_label, "ticket": new.ticket, "parent": new.parent_id,
            })),
        },
    )
    .await?;
    load_job(conn, id).await
}

impl Store {
    /// Creates a queued job for a machine that has no active job.
    pub async fn create_job(&self, actor: &Actor, new: NewJob) -> Result<JobRecord> {
        let mut tx = self.write_tx().await?;
        let job = insert_job(&mut tx, actor, &new).await?;
        tx.commit().await?;
        Ok(job)
    }

    /// Creates a rollout's job and its members (positions in `members`
    /// order), all queued.
    pub async fn create_rollout(
        &self,
        actor: &Actor,
        new: NewJob,
        members: &[(MachineId, String)],
    ) -> Result<JobRecord> {
        let mut tx = self.write_tx().await?;
        let job = insert_job(&mut tx, actor, &new).await?;
        let at = ts(now());
        for (position, (machine, hostname)) in members.iter().enumerate() {
            sqlx::query::<Any>(
                "INSERT INTO rollout_members (rollout_id, position, machine_id, hostname, state, updated_at) \
                 VALUES ($1, $2, $3, $4, 'pending', $5)",
            )
            .bind(job.id.to_string())
            .bind(position as i64)
            .bind(machine.to_string())
            .bind(hostname.clone())
            .bind(at.clone())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(job)
    }

    /// The members of rollout `id`, in order.
    pub async fn rollout_members(&self, id: JobId) -> Result<Vec<RolloutMember>> {
        let rows = sqlx::query::<Any>(
            "SELECT position, machine_id, hostname, state, job_id, message FROM rollout_members \
             WHERE rollout_id = $1 ORDER BY position",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let opt = |c: &str| -> Result<Option<String>> { Ok(r.try_get::<Option<String>, _>(c)?) };
                Ok(RolloutMember {
                    position: r.try_get::<i64, _>("position")? as u32,
                    hostname: r.try_get("hostname")?,
                    machine_id: opt("machine_id")?.map(|m| parse_col("machine id", &m)).transpose()?,
                    state: parse_col("member state", &r.try_get::<String, _>("state")?)?,
                    job_id: opt("job_id")?.map(|m| parse_col("job id", &m)).transpose()?,
                    message: opt("message")?,
                })
            })
            .collect()
    }

    /// Starts member `position` of rollout `rollout`: its reimage job is
    /// created and recorded on the member in one transaction, so a crash
    /// leaves no job the rollout does not know of.
    pub async fn start_rollout_member(
        &self,
        actor: &Actor,
        rollout: JobId,
        position: u32,
        new: NewJob,
    ) -> Result<JobRecord> {
        let mut tx = self.write_tx().await?;
        let job = insert_job(&mut tx, actor, &new).await?;
        sqlx::query::<Any>(
            "UPDATE rollout_members SET state = 'running', job_id = $1, message = NULL, updated_at = $2 \
             WHERE rollout_id = $3 AND position = $4",
        )
        .bind(job.id.to_string())
        .bind(ts(now()))
        .bind(rollout.to_string())
        .bind(i64::from(position))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(job)
    }

    /// Sets member `position` of rollout `rollout` to `state`.
    pub async fn set_rollout_member(
        &self,
        rollout: JobId,
        position: u32,
        state: MemberState,
        message: Option<&str>,
    ) -> Result<()> {
        let _turn = self.write_turn().await?;
        sqlx::query::<Any>(
            "UPDATE rollout_members SET state = $1, message = $2, updated_at = $3 \
             WHERE rollout_id = $4 AND position = $5",
        )
        .bind(state.as_str())
        .bind(message)
        .bind(ts(now()))
        .bind(rollout.to_string())
        .bind(i64::from(position))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Makes waiting job `id` due now (a child ended: its parent looks).
    pub async fn wake_job(&self, id: JobId) -> Result<()> {
        let _turn = self.write_turn().await?;
        sqlx::query::<Any>("UPDATE jobs SET run_at = $1 WHERE id = $2 AND state = 'waiting'")
            .bind(ts(now()))
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn get_job(&self, id: JobId) -> Result<JobRecord> {
        let mut conn = self.pool.acquire().await?;
        load_job(&mut conn, id).await
    }

    /// Jobs, newest first.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>> {
        let mut params = Params::default();
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE TRUE");
        if let Some(s) = filter.state {
            sql.push_str(&format!(" AND state = {}", params.add(s.to_string())));
        }
        if filter.active {
            sql.push_str(" AND finished_at IS NULL");
        }
        if let Some(m) = &filter.machine {
            let p = params.add(m.to_ascii_lowercase());
            sql.push_str(&format!(" AND (machine_id = {p} OR hostname = {p})"));
        }
        let limit = page_limit(filter.limit)?;
        sql.push_str(&format!(" ORDER BY created_at DESC, id DESC LIMIT {limit}"));
        let rows = params
            .bind_all(sqlx::query::<Any>(built(sql)))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Log lines of job `id` after `after_seq`, oldest first.
    pub async fn job_log(&self, id: JobId, after_seq: i64) -> Result<Vec<JobLogEntry>> {
        let rows = sqlx::query::<Any>(
            "SELECT seq, at, kind, step, stage, message FROM job_log WHERE job_id = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(id.to_string())
        .bind(after_seq)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let stage: Option<i64> = r.try_get("stage")?;
                Ok(JobLogEntry {
                    seq: r.try_get("seq")?,
                    at: parse_ts(&r.try_get::<String, _>("at")?)?,
                    kind: parse_col("job log kind", &r.try_get::<String, _>("kind")?)?,
                    step: r.try_get("step")?,
                    stage: stage
                        .map(|s| Stage::new(s as u8).map_err(StoreError::Corrupt))
                        .transpose()?,
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }

    /// Claims up to `limit` jobs that are due at `at` and not held by a live
    /// lease, for `owner` until `at + lease`. On PostgreSQL rows another
    /// server is claiming right now are skipped, not waited for.
    pub async fn claim_due_jobs(
        &self,
        owner: &str,
        at: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<JobRecord>> {
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let mut tx = self.write_tx().await?;
        let sql = format!(
            "SELECT id FROM jobs WHERE run_at IS NOT NULL AND run_at <= $1 \
             AND (lease_expires IS NULL OR lease_expires < $1) ORDER BY run_at LIMIT {limit}{lock}"
        );
        let ids: Vec<String> = sqlx::query::<Any>(built(sql))
            .bind(ts(at))
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut jobs = Vec::with_capacity(ids.len());
        let sql = format!("UPDATE jobs SET lease_owner = $1, lease_expires = $2 WHERE id = $3 RETURNING {JOB_COLUMNS}");
        for id in ids {
            let row = sqlx::query::<Any>(built(sql.clone()))
                .bind(owner)
                .bind(ts(at + lease))
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
            jobs.push(job_from_row(&row)?);
        }
        tx.commit().await?;
        Ok(jobs)
    }

    /// When the next job can be claimed (for the engine's sleep), if any
    /// can: its `run_at`, or the end of the lease that holds it if that is
    /// later. A job running a step is due but leased: counting its `run_at`
    /// made an engine with any job running look again every few
    /// milliseconds, a claim transaction each time.
    pub async fn next_job_due(&self) -> Result<Option<DateTime<Utc>>> {
        let row = sqlx::query::<Any>(
            "SELECT MIN(CASE WHEN lease_expires > run_at THEN lease_expires ELSE run_at END) \
             FROM jobs WHERE run_at IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        row.try_get::<Option<String>, _>(0)?
            .as_deref()
            .map(parse_ts)
            .transpose()
    }

    /// Extends `owner`'s lease on job `id`; false if it is no longer
    /// `owner`'s (taken over after it expired).
    pub async fn renew_job_lease(&self, id: JobId, owner: &str, until: DateTime<Utc>) -> Result<bool> {
        let _turn = self.write_turn().await?;
        let done = sqlx::query::<Any>("UPDATE jobs SET lease_expires = $1 WHERE id = $2 AND lease_owner = $3")
            .bind(ts(until))
            .bind(id.to_string())
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Saves `job` (every field the engine changes) with its effects, if
    /// `owner` still holds its lease. Returns the saved record, re-read, with
    /// what others changed meanwhile (a reported stage, an operator's
    /// cancel or pause: the engine never writes those), or `None` when the
    /// lease was lost — then nothing was written.
    ///
    /// A job saved as waiting stays due at once if a stage was reported or
    /// an operator acted since the engine read it (`job.stage` is what it
    /// saw): a wake-up that lands while a step runs is never lost.
    pub async fn save_job(&self, owner: &str, job: &JobRecord, effects: JobSave) -> Result<Option<JobRecord>> {
        let mut tx = self.write_tx().await?;
        let at = ts(now());
        // The row as saved comes back with the update: nothing else in this
        // transaction writes it, so it is what a re-read at the end would give.
        let sql = format!(
            "UPDATE jobs SET state = $1, data = $2, step_index = $3, step_started_at = $4, step_attempts = $5, \
             reason = $6, \
             run_at = CASE WHEN $1 = 'waiting' AND (stage <> $7 OR cancel_requested OR pause_requested OR failure_reported IS NOT NULL) \
                 THEN $8 ELSE $9 END, \
             lease_owner = $10, lease_expires = $11, updated_at = $8, finished_at = $12 \
             WHERE id = $13 AND lease_owner = $14 RETURNING {JOB_COLUMNS}"
        );
        let saved = sqlx::query::<Any>(built(sql))
            .bind(job.state.as_str())
            .bind(job.data.to_string())
            .bind(i64::from(job.step_index))
            .bind(ts(job.step_started_at))
            .bind(i64::from(job.step_attempts))
            .bind(job.reason.clone())
            .bind(i64::from(job.stage.0))
            .bind(at)
            .bind(job.run_at.map(ts))
            .bind(job.lease_owner.clone())
            .bind(job.lease_expires.map(ts))
            .bind(job.finished_at.map(ts))
            .bind(job.id.to_string())
            .bind(owner)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(saved) = saved else {
            return Ok(None);
        };
        let saved = job_from_row(&saved)?;
        append_log(&mut tx, job.id, &effects.log).await?;
        let actor = Actor::new(format!("job {}", job.id));
        if let (Some(state), Some(machine)) = (effects.machine_state, job.machine_id) {
            set_machine_state(&mut tx, &actor, machine, state).await?;
        }
        if let (Some(arm), Some(machine)) = (effects.arm, job.machine_id) {
            write_arm(&mut tx, machine, arm.as_ref()).await?;
        }
        tx.commit().await?;
        if effects.machine_state.is_some() {
            self.note_machine_change();
        }
        Ok(Some(saved))
    }

    /// Records stage `stage` of job `id` as reported by its agent or
    /// installer. A stage lower than one already reported is logged but
    /// never moves the job back; once the job has ended, a report of a stage
    /// it reached is accepted as a retry and changes nothing, any other is
    /// refused. Stage 1
    /// (installer started) consumes the net-boot arm at once. Wakes the job.
    pub async fn report_stage(&self, id: JobId, stage: Stage, message: &str) -> Result<JobRecord> {
        let mut tx = self.write_tx().await?;
        let job = load_job(&mut tx, id).await?;
        if job.state.is_final() && stage <= job.stage {
            // A retried report (the first-boot unit retries until it gets
            // a 2xx): already counted, nothing to change.
            return Ok(job);
        }
        if job.state.is_final() {
            return Err(StoreError::Refused(format!(
                "job {id} has ended ({}): it takes no more stage reports",
                job.state
            )));
        }
        let at = now();
        // Waiting jobs are due at once; paused ones stay paused.
        let run_at = match job.state {
            JobState::Paused => None,
            _ => Some(ts(at)),
        };
        // The row as updated comes back with the update (nothing below
        // writes it).
        let sql =
            format!("UPDATE jobs SET stage = $1, run_at = $2, updated_at = $3 WHERE id = $4 RETURNING {JOB_COLUMNS}");
        let updated = sqlx::query::<Any>(built(sql))
            .bind(i64::from(job.stage.max(stage).0))
            .bind(run_at)
            .bind(ts(at))
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        let updated = job_from_row(&updated)?;
        let mut line = LogLine::new(JobLogKind::Stage, None, message.to_string());
        line.stage = Some(stage);
        if stage < job.stage {
            line.message = format!("{message} (late: stage {} was reported already)", job.stage.0);
        }
        append_log(&mut tx, id, &[line]).await?;
        if stage >= Stage::STARTED
            && let Some(machine) = job.machine_id
        {
            sqlx::query::<Any>(
                "UPDATE netboot_arms SET consumed = TRUE WHERE machine_id = $1 AND job_id = $2 AND consumed = FALSE",
            )
            .bind(machine.to_string())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(updated)
    }

    /// The job's agent or installer gave up (`message` says why). The job
    /// is woken and the engine ends it as failed, running its undo. The
    /// first report counts; a report after the job ended changes nothing
    /// (an agent retrying a report that got through).
    pub async fn report_failure(&self, id: JobId, message: &str) -> Result<JobRecord> {
        let mut tx = self.write_tx().await?;
        let job = load_job(&mut tx, id).await?;
        if job.state.is_final() || job.failure_reported.is_some() {
            return Ok(job);
        }
        let at = now();
        let run_at = match job.state {
            JobState::Paused => None,
            _ => Some(ts(at)),
        };
        let sql = format!(
            "UPDATE jobs SET failure_reported = $1, run_at = $2, updated_at = $3 WHERE id = $4 RETURNING {JOB_COLUMNS}"
        );
        let updated = sqlx::query::<Any>(built(sql))
            .bind(message)
            .bind(run_at)
            .bind(ts(at))
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        let updated = job_from_row(&updated)?;
        let line = LogLine::new(
            JobLogKind::Note,
            None,
            format!("the machine reported a failure: {message}"),
        );
        append_log(&mut tx, id, &[line]).await?;
        tx.commit().await?;
        Ok(updated)
    }

    /// An operator's cancel, pause, resume or retry. Cancel and pause are
    /// requests the engine carries out at the job's next step boundary (a
    /// cancel undoes what the job armed); the job is woken for them.
    pub async fn control_job(&self, actor: &Actor, id: JobId, control: JobControl) -> Result<JobRecord> {
        let mut tx = self.write_tx().await?;
        let job = load_job(&mut tx, id).await?;
        let at = ts(now());
        let ended = |what: &str| {
            StoreError::Refused(format!(
                "job {id} has ended ({}): it cannot be {what}; start a new one or `kiln job retry {id}`",
                job.state
            ))
        };
        // Asking again for what is already asked changes nothing, and
        // logs nothing (an operator pressing pause twice).
        let asked_already = !job.state.is_final()
            && match control {
                JobControl::Cancel => job.cancel_requested,
                JobControl::Pause => job.pause_requested || job.state == JobState::Paused,
                JobControl::Resume => !job.pause_requested && job.state != JobState::Paused,
                JobControl::Retry { .. } => false,
            };
        if asked_already {
            return Ok(job);
        }
        let (sql, message): (&str, String) = match control {
            JobControl::Cancel if job.state.is_final() => return Err(ended("cancelled")),
            JobControl::Cancel => (
                "UPDATE jobs SET cancel_requested = TRUE, run_at = $1, updated_at = $1 WHERE id = $2",
                format!("cancel requested by {}", actor.0),
            ),
            JobControl::Pause if job.state.is_final() => return Err(ended("paused")),
            JobControl::Pause => (
                "UPDATE jobs SET pause_requested = TRUE, run_at = $1, updated_at = $1 WHERE id = $2",
                format!("pause requested by {}", actor.0),
            ),
            JobControl::Resume if job.state.is_final() => return Err(ended("resumed")),
            JobControl::Resume => (
                "UPDATE jobs SET pause_requested = FALSE, \
                 state = CASE WHEN state = 'paused' THEN 'waiting' ELSE state END, run_at = $1, updated_at = $1 \
                 WHERE id = $2",
                format!("resumed by {}", actor.0),
            ),
            JobControl::Retry { .. } if !matches!(job.state, JobState::Failed | JobState::Cancelled) => {
                return Err(StoreError::Refused(format!(
                    "job {id} is {}: only a failed or cancelled job can be retried",
                    job.state
                )));
            }
            JobControl::Retry {
                step_index,
                step,
                stage,
            } => {
                if let Some(machine) = job.machine_id
                    && let Some(row) =
                        sqlx::query::<Any>("SELECT id FROM jobs WHERE machine_id = $1 AND finished_at IS NULL")
                            .bind(machine.to_string())
                            .fetch_optional(&mut *tx)
                            .await?
                {
                    let other: String = row.try_get(0)?;
                    return Err(StoreError::Conflict(format!(
                        "{} has another active job ({other}): it must end before this one is retried",
                        job.hostname
                    )));
                }
                sqlx::query::<Any>(
                    "UPDATE jobs SET state = 'queued', step_index = $1, step_started_at = $2, step_attempts = 0, \
                     reason = NULL, finished_at = NULL, cancel_requested = FALSE, pause_requested = FALSE, \
                     failure_reported = NULL, \
                     run_at = $2, lease_owner = NULL, lease_expires = NULL, updated_at = $2, stage = $4 WHERE id = $3",
                )
                .bind(i64::from(step_index))
                .bind(at.clone())
                .bind(id.to_string())
                .bind(i64::from(stage.0))
                .execute(&mut *tx)
                .await?;
                ("", format!("retried from step {step} by {}", actor.0))
            }
        };
        if !sql.is_empty() {
            sqlx::query::<Any>(sql)
                .bind(at)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        append_log(
            &mut tx,
            id,
            &[LogLine::new(JobLogKind::Operator, None, message.clone())],
        )
        .await?;
        let action = match control {
            JobControl::Cancel => "job.cancel",
            JobControl::Pause => "job.pause",
            JobControl::Resume => "job.resume",
            JobControl::Retry { .. } => "job.retry",
        };
        record(
            &mut tx,
            actor,
            Change {
                action,
                target_kind: "job",
                target_id: id.to_string(),
                target_name: job.hostname.clone(),
                before: Some(serde_json::json!({ "state": job.state })),
                after: Some(serde_json::json!({ "message": message })),
            },
        )
        .await?;
        let job = load_job(&mut tx, id).await?;
        tx.commit().await?;
        Ok(job)
    }

    /// Appends notes to job `id`'s log outside a step (e.g. a failed
    /// callback after the job ended).
    pub async fn append_job_log(&self, id: JobId, lines: &[LogLine]) -> Result<()> {
        let mut tx = self.write_tx().await?;
        // Lock the job row first: log sequence numbers are per job.
        sqlx::query::<Any>("UPDATE jobs SET updated_at = updated_at WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        append_log(&mut tx, id, lines).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The net-boot arm of `machine`, if a job set one.
    pub async fn netboot_arm(&self, machine: MachineId) -> Result<Option<ArmRecord>> {
        sqlx::query::<Any>("SELECT * FROM netboot_arms WHERE machine_id = $1")
            .bind(machine.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(arm_from_row)
            .transpose()
    }

    /// Every net-boot arm (for the DHCP listener's inventory).
    pub async fn netboot_arms(&self) -> Result<Vec<ArmRecord>> {
        sqlx::query::<Any>("SELECT * FROM netboot_arms")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(arm_from_row)
            .collect()
    }
}
