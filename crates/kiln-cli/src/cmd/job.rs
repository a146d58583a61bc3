//! `kiln job list|show|watch|cancel|pause|resume|retry`: the durable jobs
//! (reimages) the server runs, and an operator's hand on them.

use clap::Subcommand;
use futures::StreamExt;
use kiln_types::JobId;
use kiln_types::job::{Job, JobDetail, JobFilter, JobState, RetryRequest, Stage};
use serde::Serialize;

use crate::Ctx;
use crate::cmd::error_message;
use crate::output::{Format, Out, opt};
use crate::watch;

#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// List jobs, newest first.
    List(ListArgs),
    /// Show a job: what it does, where it is, and its log.
    Show {
        #[arg(value_parser = job_id)]
        id: JobId,
    },
    /// Follow jobs live until they end; exit 1 unless all succeeded.
    Watch {
        #[arg(required = true, value_parser = job_id)]
        ids: Vec<JobId>,
    },
    /// Cancel jobs at their next step boundary: what a job armed is undone
    /// and the machine boots its disk.
    Cancel {
        #[arg(required = true, value_parser = job_id)]
        ids: Vec<JobId>,
    },
    /// Pause jobs at their next step boundary (a running step finishes
    /// first; stage reports are still recorded).
    Pause {
        #[arg(required = true, value_parser = job_id)]
        ids: Vec<JobId>,
    },
    /// Resume paused jobs.
    Resume {
        #[arg(required = true, value_parser = job_id)]
        ids: Vec<JobId>,
    },
    /// Run a failed or cancelled job again, from the step it ended in.
    Retry {
        #[arg(value_parser = job_id)]
        id: JobId,
        /// Start from this step instead (`kiln job show ID` lists them).
        #[arg(long, value_name = "STEP")]
        from_step: Option<String>,
        /// Follow the job until it ends.
        #[arg(long)]
        watch: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only jobs still going (queued, running, waiting, paused).
    #[arg(long)]
    active: bool,
    /// Only jobs in this state.
    #[arg(long, value_name = "STATE")]
    state: Option<JobState>,
    /// Only jobs of this machine (hostname or id).
    #[arg(long, value_name = "HOST")]
    machine: Option<String>,
    /// At most this many (the server's default is 100, its most 1000).
    #[arg(long, value_name = "N")]
    limit: Option<u32>,
}

/// Job ids are UUIDs; anything else is a usage error before any request.
fn job_id(s: &str) -> Result<JobId, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not a job id: job ids are UUIDs (see `kiln job list`)"))
}

pub async fn run(c: JobCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let client = ctx.client()?;
    match c {
        JobCmd::List(a) => {
            let filter = JobFilter {
                state: a.state,
                active: a.active,
                machine: a.machine,
                limit: a.limit,
            };
            let jobs = client.list_jobs(&filter).await?;
            let rows = jobs.iter().map(row).collect();
            out.table(
                &jobs,
                &[
                    "ID", "HOSTNAME", "KIND", "STATE", "STEP", "STAGE", "OS", "TICKET", "CREATED",
                ],
                rows,
            )
        }
        JobCmd::Show { id } => {
            let detail = client.get_job(&id.to_string()).await?;
            show(&detail, out)
        }
        JobCmd::Watch { ids } => {
            let mut jobs = Vec::with_capacity(ids.len());
            for id in ids {
                jobs.push(client.get_job(&id.to_string()).await?.job);
            }
            follow(&client, jobs, out).await
        }
        JobCmd::Cancel { ids } => control(&client, ids, "cancel", out).await,
        JobCmd::Pause { ids } => control(&client, ids, "pause", out).await,
        JobCmd::Resume { ids } => control(&client, ids, "resume", out).await,
        JobCmd::Retry { id, from_step, watch } => {
            let job = client.retry_job(&id.to_string(), &RetryRequest { from_step }).await?;
            if watch {
                return follow(&client, vec![job], out).await;
            }
            if out.format == Format::Json {
                return out.json(&job);
            }
            out.line(format!(
                "job {} on {} is {} again, from step {}",
                job.id, job.hostname, job.state, job.step
            ))
        }
    }
}

/// Watches `jobs` to their end; the final jobs as JSON with `-o json`.
async fn follow(client: &kiln_client::Client, jobs: Vec<Job>, out: &mut Out) -> anyhow::Result<()> {
    let watched = watch::watch(client, jobs, out).await?;
    if out.format == Format::Json {
        let finals: Vec<&Job> = watched.iter().map(watch::Watched::job).collect();
        out.json(&finals)?;
    }
    watch::outcome(&watched)
}

/// One job's answer to an operator action.
#[derive(Debug, Serialize)]
struct Controlled {
    id: JobId,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<Job>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `cancel`, `pause` or `resume` each of `ids`: a row per job, exit 1 when
/// any was refused.
async fn control(client: &kiln_client::Client, ids: Vec<JobId>, action: &str, out: &mut Out) -> anyhow::Result<()> {
    let results: Vec<Controlled> = futures::stream::iter(ids.into_iter().map(|id| {
        let client = client.clone();
        async move {
            match client.job_action(&id.to_string(), action).await {
                Ok(job) => Controlled {
                    id,
                    ok: true,
                    job: Some(job),
                    error: None,
                },
                Err(e) => Controlled {
                    id,
                    ok: false,
                    job: None,
                    error: Some(error_message(&e)),
                },
            }
        }
    }))
    .buffered(8)
    .collect()
    .await;
    // Cancel and pause happen at the job's next step boundary: the answer is
    // that the request is recorded, not that the job has stopped yet.
    let done = match action {
        "cancel" => "cancel requested",
        "pause" => "pause requested",
        _ => "resumed",
    };
    let rows = results
        .iter()
        .map(|r| match &r.job {
            Some(job) => vec![
                r.id.to_string(),
                job.hostname.clone(),
                job.state.to_string(),
                done.to_string(),
            ],
            None => vec![
                r.id.to_string(),
                "-".into(),
                "-".into(),
                r.error.clone().unwrap_or_default(),
            ],
        })
        .collect();
    out.table(&results, &["JOB", "HOSTNAME", "STATE", "RESULT"], rows)?;
    let failed: Vec<&Controlled> = results.iter().filter(|r| !r.ok).collect();
    match failed.as_slice() {
        [] => Ok(()),
        [one] => anyhow::bail!("job {}: {}", one.id, one.error.as_deref().unwrap_or("?")),
        many => anyhow::bail!("{} of {} jobs refused to {action}", many.len(), results.len()),
    }
}

/// The stage as a person reads it: `3 (configured)`, or `-` before any.
fn stage(job: &Job) -> String {
    if job.stage == Stage::ACCEPTED && job.state != JobState::Succeeded {
        "-".into()
    } else {
        job.stage.to_string()
    }
}

fn when(at: &chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn row(job: &Job) -> Vec<String> {
    vec![
        job.id.to_string(),
        job.hostname.clone(),
        job.kind.to_string(),
        job.state.to_string(),
        job.step.clone(),
        stage(job),
        job.os.clone(),
        opt(&job.ticket),
        job.created_at.format("%Y-%m-%d %H:%M").to_string(),
    ]
}

fn show(detail: &JobDetail, out: &mut Out) -> anyhow::Result<()> {
    if out.format == Format::Json {
        return out.json(detail);
    }
    let job = &detail.job;
    let step = format!(
        "{} ({} of {})",
        job.step,
        (job.step_index as usize + 1).min(job.steps.len()),
        job.steps.len()
    );
    let took = job
        .finished_at
        .map(|end| format!("{} (took {})", when(&end), watch::human_duration(end - job.created_at)));
    out.record(
        detail,
        vec![
            ("id", job.id.to_string()),
            ("kind", job.kind.to_string()),
            ("hostname", job.hostname.clone()),
            ("os", job.os.clone()),
            ("state", job.state.to_string()),
            ("step", step),
            ("stage", stage(job)),
            ("reason", opt(&job.reason)),
            ("ticket", opt(&job.ticket)),
            ("callback url", opt(&job.callback_url)),
            (
                "root password",
                if job.root_password_set { "set (hash only)" } else { "-" }.into(),
            ),
            ("created by", job.created_by.clone()),
            ("created", when(&job.created_at)),
            ("updated", when(&job.updated_at)),
            ("finished", opt(&took)),
            ("steps", job.steps.join(" → ")),
        ],
    )?;
    out.line("")?;
    let rows = detail
        .log
        .iter()
        .map(|l| {
            vec![
                l.at.format("%H:%M:%S").to_string(),
                l.kind.to_string(),
                opt(&l.step),
                l.stage.map_or_else(|| "-".into(), |s| s.to_string()),
                l.message.clone(),
            ]
        })
        .collect();
    out.table(&detail.log, &["TIME (UTC)", "WHAT", "STEP", "STAGE", "MESSAGE"], rows)
}
