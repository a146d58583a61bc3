//! `kiln rollout start|list|show|watch|pause|resume|abort`: reimage every
//! machine a selector picks, a few at a time, with a failure budget and a
//! stop button. A rollout is a job on the server; its members' reimages are
//! jobs of their own (`kiln job show ID`).

use std::time::Duration;

use kiln_types::job::{JobState, MemberState, Rollout, RolloutRequest};
use kiln_types::machine::{MachineFilter, MachineState};

use crate::Ctx;
use crate::cmd::reimage::InstallArgs;
use crate::output::{Format, Out};

const EXAMPLES: &str = "\
Examples:
  kiln rollout start --selector tag=db --selector rack=a1 --os debian-13 --concurrency 4 --max-failures 1
  kiln rollout start --selector tag=web --os debian-13 --health-check 'curl -fsS http://$KILN_HOST/health' --watch
  kiln rollout pause ID     # running members finish, no new one starts
  kiln rollout abort ID     # running members are cancelled, their machines boot their disks

Protected machines and machines in maintenance are left out (the rollout's
log says which). The health check runs on the kiln server through /bin/sh
after each member's reimage, with KILN_HOSTNAME, KILN_HOST (its address) and
KILN_JOB_ID set; a member counts as done only when it exits 0.";

#[derive(Debug, clap::Subcommand)]
pub enum RolloutCmd {
    /// Start a rollout over the machines a selector picks.
    #[command(after_long_help = EXAMPLES)]
    Start(Box<StartArgs>),
    /// List rollouts, newest first.
    List,
    /// Show a rollout and its members.
    Show { id: String },
    /// Follow a rollout until it ends; exit 1 unless it succeeded.
    Watch { id: String },
    /// Start no new member; running members finish.
    Pause { id: String },
    /// Go on after a pause.
    Resume { id: String },
    /// The stop button: cancel the running members (each is disarmed and
    /// boots its disk) and skip the rest.
    Abort { id: String },
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// Which machines: KEY=VALUE with KEY one of tag, rack, site, state,
    /// owner (repeat: all must match; several tags: all of them).
    #[arg(long = "selector", value_name = "KEY=VALUE", required = true, value_parser = parse_selector)]
    selectors: Vec<(String, String)>,
    /// Members reimaged at once.
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// Failed members tolerated; one more stops the rollout.
    #[arg(long, default_value_t = 0)]
    max_failures: u32,
    /// A shell command that must pass for a member to count as done.
    #[arg(long, value_name = "CMD")]
    health_check: Option<String>,
    /// Follow the rollout until it ends.
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    install: InstallArgs,
}

fn parse_selector(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE (e.g. tag=db)"))?;
    if !["tag", "rack", "site", "state", "owner"].contains(&k) {
        return Err(format!("`{k}` is not a selector: use tag, rack, site, state or owner"));
    }
    if v.is_empty() {
        return Err(format!("`{s}`: the value is empty"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn filter(selectors: &[(String, String)]) -> anyhow::Result<MachineFilter> {
    let mut f = MachineFilter::default();
    let mut tags = vec![];
    for (k, v) in selectors {
        match k.as_str() {
            "tag" => tags.push(v.clone()),
            "rack" => f.rack = Some(v.clone()),
            "site" => f.site = Some(v.clone()),
            "state" => {
                f.state = Some(
                    v.parse::<MachineState>()
                        .map_err(|e| anyhow::anyhow!("--selector: {e}"))?,
                )
            }
            _ => f.owner = Some(v.clone()),
        }
    }
    if !tags.is_empty() {
        f.tag = Some(tags.join(","));
    }
    Ok(f)
}

fn counts(r: &Rollout) -> String {
    let n = |s: MemberState| r.members.iter().filter(|m| m.state == s).count();
    format!(
        "{} members: {} done, {} running, {} failed, {} pending, {} skipped",
        r.members.len(),
        n(MemberState::Done),
        n(MemberState::Running),
        n(MemberState::Failed),
        n(MemberState::Pending),
        n(MemberState::Skipped)
    )
}

fn show(r: &Rollout, out: &mut Out) -> anyhow::Result<()> {
    if out.format == Format::Json {
        return out.json(r);
    }
    out.line(format!("rollout {}  {}  {}", r.job.id, r.job.state, r.job.hostname))?;
    out.line(format!(
        "os {}  concurrency {}  failures allowed {}",
        r.job.os, r.concurrency, r.max_failures
    ))?;
    out.line(counts(r))?;
    if let Some(reason) = &r.job.reason {
        out.line(format!("why: {reason}"))?;
    }
    let rows = r
        .members
        .iter()
        .map(|m| {
            vec![
                m.hostname.clone(),
                m.state.to_string(),
                m.job_id.map(|j| j.to_string()).unwrap_or_else(|| "-".into()),
                m.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out.table(&r.members, &["HOSTNAME", "STATE", "JOB", "MESSAGE"], rows)
}

/// Polls the rollout until it ends, printing a line whenever its counts
/// change; Ok only if it succeeded.
async fn watch(client: &kiln_client::Client, id: &str, out: &mut Out) -> anyhow::Result<()> {
    let mut last = String::new();
    loop {
        let r = client.get_rollout(id).await?;
        let line = format!("{}  {}", r.job.state, counts(&r));
        if line != last && out.format == Format::Table {
            out.line(format!("{}  {line}", chrono::Local::now().format("%H:%M:%S")))?;
            last = line;
        }
        if r.job.state.is_final() {
            if out.format == Format::Json {
                out.json(&r)?;
            }
            return match r.job.state {
                JobState::Succeeded => Ok(()),
                state => Err(anyhow::anyhow!(
                    "rollout {id} {state}: {}",
                    r.job.reason.as_deref().unwrap_or("no reason given")
                )),
            };
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

pub async fn run(c: RolloutCmd, ctx: &Ctx, out: &mut Out) -> anyhow::Result<()> {
    let client = ctx.client()?;
    match c {
        RolloutCmd::Start(a) => {
            let mut reimage = a.install.request()?;
            // Hashed here: the plaintext never leaves this process.
            if let Some(pw) = a.install.password().await? {
                reimage.root_password_hash =
                    Some(kiln_boot::password::hash_root_password(&pw).map_err(|e| anyhow::anyhow!(e))?);
            }
            let req = RolloutRequest {
                selector: filter(&a.selectors)?,
                reimage,
                concurrency: a.concurrency,
                max_failures: a.max_failures,
                health_check: a.health_check.map(|cmd| vec!["/bin/sh".to_string(), "-c".into(), cmd]),
            };
            let r = client.create_rollout(&req).await?;
            show(&r, out)?;
            if a.watch {
                watch(&client, &r.job.id.to_string(), out).await?;
            }
            Ok(())
        }
        RolloutCmd::List => {
            let all = client.list_rollouts().await?;
            let rows = all
                .iter()
                .map(|r| {
                    vec![
                        r.job.id.to_string(),
                        r.job.state.to_string(),
                        r.job.hostname.trim_start_matches("rollout ").to_string(),
                        r.job.os.clone(),
                        counts(r),
                    ]
                })
                .collect();
            out.table(&all, &["ID", "STATE", "SELECTOR", "OS", "MEMBERS"], rows)
        }
        RolloutCmd::Show { id } => show(&client.get_rollout(&id).await?, out),
        RolloutCmd::Watch { id } => watch(&client, &id, out).await,
        RolloutCmd::Pause { id } => show(&client.rollout_action(&id, "pause").await?, out),
        RolloutCmd::Resume { id } => show(&client.rollout_action(&id, "resume").await?, out),
        RolloutCmd::Abort { id } => show(&client.rollout_action(&id, "abort").await?, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_become_a_machine_filter() {
        let s: Vec<(String, String)> = ["tag=db", "tag=eqiad", "rack=a1", "state=deployed"]
            .iter()
            .map(|s| parse_selector(s).unwrap())
            .collect();
        let f = filter(&s).unwrap();
        assert_eq!(f.tag.as_deref(), Some("db,eqiad"));
        assert_eq!(f.rack.as_deref(), Some("a1"));
        assert_eq!(f.state, Some(MachineState::Deployed));
        assert!(parse_selector("color=red").unwrap_err().contains("not a selector"));
        assert!(parse_selector("tag").unwrap_err().contains("KEY=VALUE"));
        let bad = vec![("state".to_string(), "sleepy".to_string())];
        assert!(filter(&bad).unwrap_err().to_string().contains("sleepy"));
    }
}
