//! Following jobs live, for `kiln reimage --watch` and `kiln job watch`: one
//! event stream per job, merged into one display.
//!
//! On a terminal each job keeps one line, redrawn in place:
//!
//! ```text
//! web1  [=====>    ] 3/5 configured · step wait_finishing · 12m04s
//! ```
//!
//! Anywhere else (a pipe, a file, a CI log) every step, stage and wait is a
//! line of its own, appended, so the log reads well afterwards. What a line
//! says is decided by plain functions over [`Progress`], tested below
//! without a terminal.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kiln_client::{Client, ClientError, JobEvent};
use kiln_types::job::{Job, JobLogEntry, JobLogKind, JobState, Stage};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::cmd::error_message;
use crate::output::{Format, Out};

/// Consecutive failed connections to a job's event stream before the
/// watcher gives up on it (about two minutes with the back-off below: long
/// enough for a server restart, short enough not to hang a CI job forever).
const MAX_RECONNECTS: u32 = 10;

/// The longest pause between two reconnections.
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Width of the progress bar, in characters between the brackets.
const BAR_WIDTH: usize = 10;

/// How one watched job came out.
#[derive(Debug, Clone)]
pub enum Watched {
    /// The job ended; this is its final state.
    Ended(Job),
    /// Its event stream could not be followed to the end. The job itself
    /// may well go on; `job` is what was last known of it.
    Lost { job: Job, error: String },
}

impl Watched {
    /// The job, as it ended or as it was last known.
    pub fn job(&self) -> &Job {
        match self {
            Watched::Ended(job) | Watched::Lost { job, .. } => job,
        }
    }

    pub fn succeeded(&self) -> bool {
        matches!(self, Watched::Ended(job) if job.state == JobState::Succeeded)
    }
}

/// Ctrl-C while watching: the jobs are not touched, only the watch stops.
#[derive(Debug)]
pub struct StoppedWatching {
    ids: Vec<String>,
}

impl std::fmt::Display for StoppedWatching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped watching; the jobs go on (follow them again with `kiln job watch {}`, stop one with `kiln job cancel ID`)",
            self.ids.join(" ")
        )
    }
}

impl std::error::Error for StoppedWatching {}

/// Follows `jobs` until every one has ended (or its stream is lost), showing
/// progress on `out` when its format is a table. Returns how each came out,
/// in the order given; the caller decides what that means for the exit code
/// (see [`outcome`]).
pub async fn watch(client: &Client, jobs: Vec<Job>, out: &mut Out) -> anyhow::Result<Vec<Watched>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Update)>();
    // Every follower is in the set: dropping it (an early return, Ctrl-C)
    // stops them all.
    let mut followers = JoinSet::new();
    for (i, job) in jobs.iter().enumerate() {
        let (client, tx, id) = (client.clone(), tx.clone(), job.id.to_string());
        followers.spawn(follow(client, id, i, tx));
    }
    drop(tx);

    let mut progress: Vec<Progress> = jobs.into_iter().map(Progress::new).collect();
    let mut results: Vec<Option<Watched>> = vec![None; progress.len()];
    let mut screen = Screen::new(out, &progress);
    screen.draw(&progress, Utc::now())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            update = rx.recv() => {
                // Every follower sends its end before it returns, so a closed
                // channel means that all have ended.
                let Some((i, update)) = update else { break };
                let now = Utc::now();
                match update {
                    Update::Log(entry) => {
                        if progress[i].apply(&entry) {
                            screen.log(&progress, i, &entry, now)?;
                        }
                    }
                    Update::End(job) => {
                        progress[i].end(job.clone());
                        screen.ended(&progress, i, now)?;
                        results[i] = Some(Watched::Ended(job));
                    }
                    Update::Lost(error) => {
                        progress[i].lost = Some(error.clone());
                        screen.ended(&progress, i, now)?;
                        results[i] = Some(Watched::Lost { job: progress[i].job.clone(), error });
                    }
                }
            }
            // A waiting job sends nothing for minutes: the elapsed time
            // still moves on a terminal.
            _ = tick.tick(), if screen.live => screen.draw(&progress, Utc::now())?,
            _ = &mut ctrl_c => {
                screen.draw(&progress, Utc::now())?;
                let ids = progress.iter().filter(|p| !p.is_over()).map(|p| p.job.id.to_string()).collect();
                return Err(StoppedWatching { ids }.into());
            }
        }
    }
    screen.finish(&progress)?;
    Ok(results
        .into_iter()
        .zip(progress)
        .map(|(r, p)| {
            r.unwrap_or_else(|| Watched::Lost {
                job: p.job,
                error: "the watcher stopped before the job's end".into(),
            })
        })
        .collect())
}

/// `Ok` when every job succeeded; else an error naming those that did not.
pub fn outcome(results: &[Watched]) -> anyhow::Result<()> {
    let bad: Vec<String> = results
        .iter()
        .filter(|w| !w.succeeded())
        .map(|w| match w {
            Watched::Ended(job) => format!("{} {} (job {})", job.hostname, job.state, job.id),
            Watched::Lost { job, error } => {
                format!("{}: lost track of job {}: {error}", job.hostname, job.id)
            }
        })
        .collect();
    match bad.len() {
        0 => Ok(()),
        1 => anyhow::bail!("{}", bad[0]),
        n => anyhow::bail!("{n} of {} jobs did not succeed: {}", results.len(), bad.join("; ")),
    }
}

/// What a follower tells the display.
#[derive(Debug)]
enum Update {
    Log(JobLogEntry),
    End(Job),
    Lost(String),
}

/// Follows job `id`'s event stream into `tx`, reconnecting after the last
/// line seen when the connection breaks (the server restarted, a proxy
/// timed out): watching only reads, so trying again is always safe.
async fn follow(client: Client, id: String, index: usize, tx: mpsc::UnboundedSender<(usize, Update)>) {
    let mut after = 0i64;
    let mut failures = 0u32;
    loop {
        let result = client
            .watch_job_after(&id, after, |event| {
                if let JobEvent::Log(entry) = event {
                    after = entry.seq;
                    failures = 0;
                    let _ = tx.send((index, Update::Log(entry.clone())));
                }
            })
            .await;
        let update = match result {
            Ok(job) => Update::End(job),
            Err(e) if is_passing(&e) && failures < MAX_RECONNECTS => {
                failures += 1;
                let pause = Duration::from_secs(1 << failures.min(4)).min(MAX_BACKOFF);
                tracing::debug!(job = %id, error = %e, "job event stream broke; reconnecting");
                tokio::time::sleep(pause).await;
                continue;
            }
            Err(e) => Update::Lost(error_message(&e)),
        };
        // The display may be gone (Ctrl-C); then nobody needs to know.
        let _ = tx.send((index, update));
        return;
    }
}

/// A failure that may go away by itself: no connection, a stream cut short,
/// a server error. A 4xx answer (no such job, no access) will not.
fn is_passing(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } | ClientError::Decode(_) => true,
        ClientError::Api { status, .. } => *status >= 500,
        // A certificate that is not the one trusted stays so.
        ClientError::Fingerprint { .. } | ClientError::Untrusted { .. } | ClientError::Tls(_) => false,
    }
}

/// What is known of one watched job, rebuilt from its log lines.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The job as first fetched, replaced by the final one at the end.
    pub job: Job,
    step: String,
    /// The highest stage reported (none yet: `None`, shown as `0/5`).
    stage: Option<Stage>,
    state: JobState,
    /// Why the current step is being tried again, if it is.
    retrying: Option<String>,
    /// The step whose start was shown last.
    started: Option<String>,
    ended: bool,
    lost: Option<String>,
}

impl Progress {
    pub fn new(job: Job) -> Progress {
        Progress {
            step: job.step.clone(),
            stage: (job.stage > Stage::ACCEPTED).then_some(job.stage),
            state: job.state,
            retrying: None,
            started: None,
            ended: false,
            lost: None,
            job,
        }
    }

    /// Takes one log line into account, and says whether it tells anything
    /// new. The stream starts with the whole log, so replaying old lines
    /// must leave the same picture as living through them: the stage only
    /// goes up, the state follows the lines.
    pub fn apply(&mut self, entry: &JobLogEntry) -> bool {
        if let Some(step) = &entry.step {
            self.step.clone_from(step);
        }
        match entry.kind {
            JobLogKind::Created => self.state = JobState::Queued,
            JobLogKind::Step => {
                self.state = JobState::Running;
                self.retrying = None;
                // The engine logs a waiting step's start again each time a
                // stage report or a deadline wakes it: that is no news.
                if entry.message == "started" {
                    if self.started.as_deref() == entry.step.as_deref() {
                        return false;
                    }
                    self.started.clone_from(&entry.step);
                }
            }
            JobLogKind::Wait => {
                self.state = JobState::Waiting;
                self.retrying = None;
            }
            JobLogKind::Retry => {
                self.state = JobState::Waiting;
                self.retrying = Some(entry.message.clone());
            }
            JobLogKind::Stage => {
                if let Some(s) = entry.stage {
                    self.stage = Some(self.stage.map_or(s, |old| old.max(s)));
                }
            }
            JobLogKind::Paused => self.state = JobState::Paused,
            JobLogKind::Failed => self.state = JobState::Failed,
            JobLogKind::Cancelled => self.state = JobState::Cancelled,
            JobLogKind::Succeeded => self.state = JobState::Succeeded,
            // An operator's request or a note changes nothing by itself:
            // the engine's own lines follow when it acts on it.
            JobLogKind::Operator | JobLogKind::Note => {}
        }
        true
    }

    /// The job ended: its final record is the truth from here on.
    pub fn end(&mut self, job: Job) {
        self.step.clone_from(&job.step);
        if job.stage > Stage::ACCEPTED {
            self.stage = Some(job.stage);
        }
        self.state = job.state;
        self.retrying = None;
        self.ended = true;
        self.job = job;
    }

    fn is_over(&self) -> bool {
        self.ended || self.lost.is_some()
    }

    /// The job's one line on a terminal (without the host column).
    pub fn summary(&self, now: DateTime<Utc>) -> String {
        let n = self.stage.map_or(0, |s| s.0);
        let mut line = format!("{} {n}/{}", bar(n), Stage::LAST.0);
        if let Some(s) = self.stage {
            let _ = write!(line, " {}", s.meaning());
        }
        line.push_str(" · ");
        if let Some(lost) = &self.lost {
            let _ = write!(line, "not followed any more: {lost}");
            return line;
        }
        match self.state {
            JobState::Queued => line.push_str("queued"),
            JobState::Running | JobState::Waiting => {
                let _ = write!(line, "step {}", self.step);
                if let Some(why) = &self.retrying {
                    let _ = write!(line, " (retrying: {why})");
                }
            }
            JobState::Paused => {
                let _ = write!(line, "paused at step {}", self.step);
            }
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => {
                line.push_str(&self.ending(now));
                return line;
            }
        }
        let _ = write!(line, " · {}", human_duration(now - self.job.created_at));
        line
    }

    /// How the job ended, in a few words: `succeeded in 4m02s`, `failed
    /// after 15m00s at step wait_installer`. Until the final record is in
    /// (the log line of the end comes just before it), `now` stands in for
    /// the end.
    fn ending(&self, now: DateTime<Utc>) -> String {
        let took = human_duration(self.job.finished_at.unwrap_or(now) - self.job.created_at);
        match self.state {
            JobState::Succeeded => format!("succeeded in {took}"),
            state => format!("{state} after {took} at step {}", self.step),
        }
    }
}

/// `[=====>    ]` for stage 3 of 5.
pub fn bar(stage: u8) -> String {
    let last = usize::from(Stage::LAST.0);
    let filled = (usize::from(stage).min(last) * BAR_WIDTH) / last;
    let mut s = String::with_capacity(BAR_WIDTH + 2);
    s.push('[');
    match filled {
        0 => {}
        f if f == BAR_WIDTH => s.push_str(&"=".repeat(BAR_WIDTH)),
        f => {
            s.push_str(&"=".repeat(f - 1));
            s.push('>');
        }
    }
    s.push_str(&" ".repeat(BAR_WIDTH - filled));
    s.push(']');
    s
}

/// `42s`, `3m02s`, `1h05m`.
pub fn human_duration(d: chrono::TimeDelta) -> String {
    let secs = d.num_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// What a log line says as a line of its own (without time and host), or
/// `None` for lines the next one makes redundant (a step's "done" is
/// followed by the next step, a success by the end's line).
pub fn log_text(entry: &JobLogEntry, steps: &[String]) -> Option<String> {
    let step = entry.step.as_deref().unwrap_or("-");
    Some(match entry.kind {
        JobLogKind::Step if entry.message == "done" => return None,
        JobLogKind::Step if entry.message == "started" => match steps.iter().position(|s| s == step) {
            Some(i) => format!("step {step} ({}/{})", i + 1, steps.len()),
            None => format!("step {step}"),
        },
        JobLogKind::Step => format!("step {step}: {}", entry.message),
        JobLogKind::Stage => {
            let Some(stage) = entry.stage else {
                return Some(format!("stage: {}", entry.message));
            };
            let mut s = format!("stage {}/{} {}", stage.0, Stage::LAST.0, stage.meaning());
            if entry.message != stage.meaning() {
                let _ = write!(s, ": {}", entry.message);
            }
            s
        }
        JobLogKind::Wait => format!("{step}: {}", entry.message),
        JobLogKind::Retry => format!("{step}: {}", entry.message),
        JobLogKind::Paused => format!("paused at step {step}"),
        JobLogKind::Created | JobLogKind::Operator => entry.message.clone(),
        JobLogKind::Note => format!("note: {}", entry.message),
        // Printed as they come, not only at the end: a retried job's log
        // holds the earlier failure that made someone retry it.
        JobLogKind::Failed | JobLogKind::Cancelled => {
            // The engine's reasons start with the step, named already.
            let why = entry
                .message
                .strip_prefix(&format!("step {step}: "))
                .unwrap_or(&entry.message);
            format!("{} at step {step}: {why}", entry.kind)
        }
        JobLogKind::Succeeded => return None,
    })
}

/// The last plain line about a job: how it ended (the reason came in the
/// line before), and where to look when it did not succeed.
pub fn end_line(p: &Progress) -> String {
    if p.lost.is_some() || p.state == JobState::Succeeded {
        return end_text(p);
    }
    format!("{} (`kiln job show {}`)", p.ending(Utc::now()), p.job.id)
}

/// How a job ended, and why when it did not succeed.
pub fn end_text(p: &Progress) -> String {
    if let Some(lost) = &p.lost {
        return format!("not followed any more (job {}): {lost}", p.job.id);
    }
    match &p.job.reason {
        Some(why) if p.state != JobState::Succeeded => {
            // The engine's reasons start with the step, which the ending names.
            let why = why.strip_prefix(&format!("step {}: ", p.step)).unwrap_or(why);
            format!("{}: {why}", p.ending(Utc::now()))
        }
        _ => p.ending(Utc::now()),
    }
}

/// The display: plain appended lines, or live lines redrawn on a terminal,
/// or nothing at all for JSON output (whose result is printed at the end).
struct Screen<'a> {
    out: &'a mut Out,
    show: bool,
    live: bool,
    host_width: usize,
    /// Live lines on the screen now, below the cursor's line start.
    drawn: usize,
    /// What they say (most events change nothing on screen: no redraw).
    shown: Vec<String>,
}

impl<'a> Screen<'a> {
    fn new(out: &'a mut Out, jobs: &[Progress]) -> Screen<'a> {
        let show = out.format == Format::Table;
        let live = show && out.terminal;
        let host_width = jobs.iter().map(|p| p.job.hostname.len()).max().unwrap_or(0);
        Screen {
            out,
            show,
            live,
            host_width,
            drawn: 0,
            shown: vec![],
        }
    }

    /// Redraws the live lines (nothing to do when the output is plain).
    fn draw(&mut self, jobs: &[Progress], now: DateTime<Utc>) -> anyhow::Result<()> {
        if !self.live {
            return Ok(());
        }
        let (width, height) = terminal_size::terminal_size()
            .map(|(w, h)| (usize::from(w.0), usize::from(h.0)))
            .unwrap_or((100, 40));
        // A line that wraps would throw the cursor arithmetic off.
        let lines: Vec<String> = live_lines(jobs, self.host_width, now, height.saturating_sub(2).max(3))
            .iter()
            .map(|l| clip(l, width.saturating_sub(1)))
            .collect();
        if self.drawn == lines.len() && lines == self.shown {
            return Ok(());
        }
        self.clear()?;
        for line in &lines {
            writeln!(self.out.w, "{line}")?;
        }
        self.drawn = lines.len();
        self.shown = lines;
        self.out.w.flush()?;
        Ok(())
    }

    /// Moves back over the live lines and clears them.
    fn clear(&mut self) -> anyhow::Result<()> {
        if self.drawn > 0 {
            write!(self.out.w, "\x1b[{}A\r\x1b[J", self.drawn)?;
            self.drawn = 0;
        }
        Ok(())
    }

    /// A line that stays (above the live lines on a terminal).
    fn print_above(&mut self, jobs: &[Progress], text: &str, now: DateTime<Utc>) -> anyhow::Result<()> {
        self.clear()?;
        writeln!(self.out.w, "{text}")?;
        self.draw(jobs, now)
    }

    fn log(&mut self, jobs: &[Progress], i: usize, entry: &JobLogEntry, now: DateTime<Utc>) -> anyhow::Result<()> {
        if !self.show {
            return Ok(());
        }
        let p = &jobs[i];
        if self.live {
            // Steps and stages are in the live line; what an operator did
            // and what went wrong on the way stays on screen.
            return match entry.kind {
                JobLogKind::Operator | JobLogKind::Retry | JobLogKind::Note => {
                    let text = format!("{:w$}  {}", p.job.hostname, entry.message, w = self.host_width);
                    self.print_above(jobs, &text, now)
                }
                _ => self.draw(jobs, now),
            };
        }
        if let Some(text) = log_text(entry, &p.job.steps) {
            self.plain(&p.job.hostname, entry.at, &text)?;
        }
        Ok(())
    }

    fn ended(&mut self, jobs: &[Progress], i: usize, now: DateTime<Utc>) -> anyhow::Result<()> {
        if !self.show {
            return Ok(());
        }
        if self.live {
            return self.draw(jobs, now);
        }
        let p = &jobs[i];
        let at = p.job.finished_at.filter(|_| p.lost.is_none()).unwrap_or(now);
        self.plain(&p.job.hostname, at, &end_line(p))
    }

    fn plain(&mut self, host: &str, at: DateTime<Utc>, text: &str) -> anyhow::Result<()> {
        writeln!(
            self.out.w,
            "{}  {host:w$}  {text}",
            at.format("%H:%M:%SZ"),
            w = self.host_width
        )?;
        self.out.w.flush()?;
        Ok(())
    }

    /// The last picture; on a terminal also the whole reason of each job
    /// that did not succeed (the live line may have cut it).
    fn finish(&mut self, jobs: &[Progress]) -> anyhow::Result<()> {
        if !self.live {
            return Ok(());
        }
        self.draw(jobs, Utc::now())?;
        self.drawn = 0;
        for p in jobs
            .iter()
            .filter(|p| p.lost.is_some() || p.state != JobState::Succeeded)
        {
            writeln!(self.out.w, "{}: {}", p.job.hostname, end_text(p))?;
        }
        Ok(())
    }
}

/// The live lines: one per job, or when there are more jobs than rows, the
/// jobs still going first and a last line counting the rest.
fn live_lines(jobs: &[Progress], host_width: usize, now: DateTime<Utc>, rows: usize) -> Vec<String> {
    let line = |p: &Progress| format!("{:host_width$}  {}", p.job.hostname, p.summary(now));
    if jobs.len() <= rows {
        return jobs.iter().map(line).collect();
    }
    let mut order: Vec<&Progress> = jobs.iter().filter(|p| !p.is_over()).collect();
    order.extend(jobs.iter().filter(|p| p.is_over()));
    let (shown, rest) = order.split_at(rows - 1);
    let mut lines: Vec<String> = shown.iter().map(|p| line(p)).collect();
    let mut counts: Vec<(String, usize)> = vec![];
    for p in rest {
        let state = if p.lost.is_some() {
            "not followed".to_string()
        } else {
            p.state.to_string()
        };
        match counts.iter_mut().find(|(s, _)| *s == state) {
            Some((_, n)) => *n += 1,
            None => counts.push((state, 1)),
        }
    }
    let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    lines.push(format!("… and {} more: {}", rest.len(), counts.join(", ")));
    lines
}

/// `text` cut to `width` characters, with `…` when cut.
fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut s: String = text.chars().take(width.saturating_sub(1)).collect();
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_types::JobId;
    use kiln_types::job::JobKind;

    fn job(host: &str) -> Job {
        let at: DateTime<Utc> = "2026-11-21T10:00:00Z".parse().unwrap();
        let steps = [
            "validate",
            "arm",
            "wait_installer",
            "wait_configured",
            "wait_finishing",
            "finish",
        ];
        Job {
            id: JobId::new(),
            kind: JobKind::Reimage,
            state: JobState::Queued,
            machine_id: None,
            hostname: host.into(),
            step: "validate".into(),
            step_index: 0,
            steps: steps.iter().map(|s| s.to_string()).collect(),
            stage: Stage::ACCEPTED,
            reason: None,
            os: "debian-12".into(),
            ticket: None,
            callback_url: None,
            root_password_set: false,
            created_by: "test".into(),
            created_at: at,
            updated_at: at,
            finished_at: None,
        }
    }

    fn entry(seq: i64, kind: JobLogKind, step: Option<&str>, stage: Option<u8>, message: &str) -> JobLogEntry {
        JobLogEntry {
            seq,
            at: "2026-11-21T10:01:02Z".parse().unwrap(),
            kind,
            step: step.map(str::to_string),
            stage: stage.map(Stage),
            message: message.into(),
        }
    }

    fn later(secs: i64) -> DateTime<Utc> {
        "2026-11-21T10:00:00Z".parse::<DateTime<Utc>>().unwrap() + chrono::TimeDelta::seconds(secs)
    }

    #[test]
    fn the_bar_fills_by_stage() {
        assert_eq!(bar(0), "[          ]");
        assert_eq!(bar(1), "[=>        ]");
        assert_eq!(bar(3), "[=====>    ]");
        assert_eq!(bar(5), "[==========]");
        assert_eq!(bar(9), "[==========]");
    }

    #[test]
    fn durations_read_short() {
        assert_eq!(human_duration(chrono::TimeDelta::seconds(42)), "42s");
        assert_eq!(human_duration(chrono::TimeDelta::seconds(182)), "3m02s");
        assert_eq!(human_duration(chrono::TimeDelta::seconds(3900)), "1h05m");
        assert_eq!(human_duration(chrono::TimeDelta::seconds(-5)), "0s");
    }

    #[test]
    fn the_live_line_follows_steps_and_stages() {
        let mut p = Progress::new(job("web1"));
        assert_eq!(p.summary(later(3)), "[          ] 0/5 · queued · 3s");
        p.apply(&entry(2, JobLogKind::Step, Some("arm"), None, "started"));
        for n in 1..=3 {
            p.apply(&entry(3, JobLogKind::Stage, None, Some(n), "ok"));
        }
        // A late, lower stage does not move the bar back.
        p.apply(&entry(4, JobLogKind::Stage, None, Some(1), "late"));
        p.apply(&entry(5, JobLogKind::Step, Some("wait_finishing"), None, "started"));
        p.apply(&entry(
            6,
            JobLogKind::Wait,
            Some("wait_finishing"),
            None,
            "waiting for stage 4",
        ));
        assert_eq!(
            p.summary(later(724)),
            "[=====>    ] 3/5 configured · step wait_finishing · 12m04s"
        );
        p.apply(&entry(
            7,
            JobLogKind::Retry,
            Some("boot_disk"),
            None,
            "BMC timed out; trying again in 10s",
        ));
        assert!(
            p.summary(later(730))
                .contains("step boot_disk (retrying: BMC timed out; trying again in 10s)"),
            "{}",
            p.summary(later(730))
        );
        p.apply(&entry(8, JobLogKind::Paused, Some("boot_disk"), None, "paused"));
        assert!(p.summary(later(731)).contains("paused at step boot_disk"));

        let mut done = p.job.clone();
        done.state = JobState::Failed;
        done.step = "wait_first_boot".into();
        done.stage = Stage(4);
        done.reason = Some("step wait_first_boot: no stage 5 report within 20m".into());
        done.finished_at = Some(later(1800));
        p.end(done);
        assert_eq!(
            p.summary(later(2000)),
            "[=======>  ] 4/5 finishing, rebooting · failed after 30m00s at step wait_first_boot"
        );
        assert_eq!(
            end_text(&p),
            "failed after 30m00s at step wait_first_boot: no stage 5 report within 20m"
        );
    }

    #[test]
    fn a_step_woken_again_is_not_news() {
        let mut p = Progress::new(job("web1"));
        let start = entry(1, JobLogKind::Step, Some("wait_installer"), None, "started");
        assert!(p.apply(&start));
        assert!(p.apply(&entry(2, JobLogKind::Stage, None, Some(1), "agent started")));
        assert!(!p.apply(&start));
        assert!(p.apply(&entry(3, JobLogKind::Step, Some("wait_installer"), None, "done")));
        assert!(p.apply(&entry(
            4,
            JobLogKind::Step,
            Some("wait_base_installed"),
            None,
            "started"
        )));
    }

    #[test]
    fn plain_lines_say_each_step_and_stage_once() {
        let steps = job("web1").steps;
        let text = |e: &JobLogEntry| log_text(e, &steps);
        assert_eq!(
            text(&entry(1, JobLogKind::Step, Some("wait_installer"), None, "started")).as_deref(),
            Some("step wait_installer (3/6)")
        );
        assert_eq!(text(&entry(2, JobLogKind::Step, Some("arm"), None, "done")), None);
        assert_eq!(
            text(&entry(3, JobLogKind::Stage, None, Some(3), "configured")).as_deref(),
            Some("stage 3/5 configured")
        );
        assert_eq!(
            text(&entry(4, JobLogKind::Stage, None, Some(1), "agent started")).as_deref(),
            Some("stage 1/5 installer started: agent started")
        );
        assert_eq!(
            text(&entry(
                5,
                JobLogKind::Wait,
                Some("wait_installer"),
                None,
                "waiting for stage 1"
            ))
            .as_deref(),
            Some("wait_installer: waiting for stage 1")
        );
        assert_eq!(
            text(&entry(6, JobLogKind::Failed, Some("arm"), None, "step arm: boom")).as_deref(),
            Some("failed at step arm: boom")
        );
        assert_eq!(text(&entry(7, JobLogKind::Succeeded, None, None, "done")), None);
    }

    #[test]
    fn too_many_jobs_for_the_screen_fold_into_a_count() {
        let mut jobs: Vec<Progress> = (1..=6).map(|i| Progress::new(job(&format!("web{i}")))).collect();
        for p in &mut jobs[..3] {
            let mut done = p.job.clone();
            done.state = JobState::Succeeded;
            done.finished_at = Some(later(60));
            p.end(done);
        }
        let lines = live_lines(&jobs, 4, later(61), 4);
        assert_eq!(lines.len(), 4);
        assert!(
            lines[0].starts_with("web4") && lines[2].starts_with("web6"),
            "{lines:?}"
        );
        assert_eq!(lines[3], "… and 3 more: 3 succeeded");
        assert_eq!(live_lines(&jobs, 4, later(61), 6).len(), 6);
    }

    #[test]
    fn clipping_keeps_lines_on_one_row() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("a line that is too long", 10), "a line th…");
    }

    /// The terminal display moves back over its lines and redraws them.
    #[test]
    fn a_terminal_gets_its_lines_redrawn_in_place() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let mut out = Out {
            format: Format::Table,
            w: Box::new(buf.clone()),
            terminal: true,
        };
        let mut jobs = vec![Progress::new(job("web1")), Progress::new(job("db2"))];
        let mut screen = Screen::new(&mut out, &jobs);
        screen.draw(&jobs, later(1)).unwrap();
        let e = entry(2, JobLogKind::Stage, None, Some(2), "written");
        jobs[1].apply(&e);
        screen.log(&jobs, 1, &e, later(2)).unwrap();
        // Nothing changed on screen: nothing is written.
        screen.draw(&jobs, later(2)).unwrap();
        let op = entry(3, JobLogKind::Operator, None, None, "pause requested by admin");
        screen.log(&jobs, 0, &op, later(3)).unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let frames: Vec<&str> = text.split("\x1b[2A\r\x1b[J").collect();
        assert_eq!(frames.len(), 3, "{text:?}");
        assert_eq!(
            frames[0],
            "web1  [          ] 0/5 · queued · 1s\ndb2   [          ] 0/5 · queued · 1s\n"
        );
        assert!(
            frames[1].contains("db2   [===>      ] 2/5 base system installed"),
            "{text:?}"
        );
        // The operator's line stays above the redrawn lines.
        assert!(
            frames[2].starts_with("web1  pause requested by admin\nweb1  ["),
            "{text:?}"
        );
    }
}
