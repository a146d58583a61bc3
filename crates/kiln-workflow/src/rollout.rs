//! The rollout job: reimages its members (machines picked when it was
//! created), at most `concurrency` at a time, through reimage jobs of their
//! own (its children), and stops once more than `max_failures` failed.
//!
//! The stop button is the engine's: *pause* is the job's pause (its step
//! does not run, so no new member starts; running members finish), *resume*
//! its resume, *abort* its cancel, whose [`undo`] cancels the running
//! members (their own undo disarms them) and skips the rest.
//!
//! Its one step, `run`, is idempotent: it reads every member's state and
//! job, settles the members whose job ended (running the health check), and
//! starts pending ones into free slots — each start is one transaction
//! (job + member), so a crash leaves no child the rollout does not know.
//! A child's end wakes the rollout at once (see the engine).

use chrono::Duration;
use kiln_store::{Actor, JobControl, NewJob, StoreError};
use kiln_types::job::{JobKind, JobLogKind, JobState, MemberState, RolloutMember, RolloutSpec};

use crate::engine::{Effects, Ending, Outcome, StepCx};

pub const STEPS: &[&str] = &["run"];

/// How often a rollout looks at its members when nothing woke it.
const LOOK_AGAIN: Duration = Duration::seconds(30);

fn actor(cx: &StepCx<'_, impl Effects>) -> Actor {
    Actor::new(format!("rollout {}", cx.job.id))
}

pub async fn run_step<E: Effects>(_step: &str, cx: &mut StepCx<'_, E>) -> Outcome {
    let spec: RolloutSpec = match serde_json::from_value(cx.job.spec.clone()) {
        Ok(s) => s,
        Err(e) => {
            return Outcome::Fail {
                reason: format!("the rollout's stored request is unreadable ({e})"),
            };
        }
    };
    let mut members = match cx.store.rollout_members(cx.job.id).await {
        Ok(m) => m,
        Err(e) => return store_retry(e),
    };
    // Members whose job ended: done (after the health check) or failed.
    for m in members.iter_mut().filter(|m| m.state == MemberState::Running) {
        let Some(child_id) = m.job_id else { continue };
        let child = match cx.store.get_job(child_id).await {
            Ok(c) => c,
            Err(e) => return store_retry(e),
        };
        if !child.state.is_final() {
            continue;
        }
        let (state, message) = match child.state {
            JobState::Succeeded => match &spec.health_check {
                Some(argv) => match cx.effects.health_check(argv, &child).await {
                    Ok(()) => (MemberState::Done, "reimaged; health check passed".to_string()),
                    Err(why) => (
                        MemberState::Failed,
                        format!("reimaged, but the health check failed: {why}"),
                    ),
                },
                None => (MemberState::Done, "reimaged".to_string()),
            },
            other => (
                MemberState::Failed,
                format!("its job {}: {}", other, child.reason.as_deref().unwrap_or("no reason")),
            ),
        };
        if let Err(e) = cx
            .store
            .set_rollout_member(cx.job.id, m.position, state, Some(&message))
            .await
        {
            return store_retry(e);
        }
        cx.log(JobLogKind::Note, format!("{}: {state}: {message}", m.hostname));
        m.state = state;
        m.message = Some(message);
    }

    if let Some(stop) = over_budget(&members, &spec) {
        return stop;
    }
    let running = count_in(&members, MemberState::Running);
    let mut free = (spec.concurrency.max(1) as usize).saturating_sub(running);
    for m in members.iter_mut().filter(|m| m.state == MemberState::Pending) {
        if free == 0 {
            break;
        }
        match start(cx, &spec, m).await {
            Ok(()) => free -= 1,
            Err(StoreError::Conflict(why)) | Err(StoreError::Refused(why)) => {
                if let Err(e) = cx
                    .store
                    .set_rollout_member(cx.job.id, m.position, MemberState::Failed, Some(&why))
                    .await
                {
                    return store_retry(e);
                }
                cx.log(JobLogKind::Note, format!("{}: not started: {why}", m.hostname));
                m.state = MemberState::Failed;
            }
            Err(e) => return store_retry(e),
        }
    }
    let (running, done, failed, pending) = (
        count_in(&members, MemberState::Running),
        count_in(&members, MemberState::Done),
        count_in(&members, MemberState::Failed),
        count_in(&members, MemberState::Pending),
    );
    // Members that could not even start count too.
    if let Some(stop) = over_budget(&members, &spec) {
        return stop;
    }
    if running == 0 && pending == 0 {
        cx.log(JobLogKind::Note, format!("{done} done, {failed} failed"));
        return Outcome::Next;
    }
    Outcome::Wait {
        until: cx.now + LOOK_AGAIN,
        reason: format!("{running} running, {done} done, {failed} failed, {pending} pending"),
    }
}

/// The rollout's end when more members failed than it may lose.
fn over_budget(members: &[RolloutMember], spec: &RolloutSpec) -> Option<Outcome> {
    let failed: Vec<&str> = members
        .iter()
        .filter(|m| m.state == MemberState::Failed)
        .map(|m| m.hostname.as_str())
        .collect();
    (failed.len() > spec.max_failures as usize).then(|| Outcome::Fail {
        reason: format!(
            "{} members failed ({}), more than the {} allowed: no more members start; the running ones finish",
            failed.len(),
            failed.join(", "),
            spec.max_failures
        ),
    })
}

fn count_in(members: &[RolloutMember], s: MemberState) -> usize {
    members.iter().filter(|m| m.state == s).count()
}

fn store_retry(e: StoreError) -> Outcome {
    Outcome::Retry {
        after: std::time::Duration::from_secs(1),
        reason: format!("the store failed: {e}"),
    }
}

/// Starts member `m`'s reimage (job and member row in one transaction).
async fn start<E: Effects>(
    cx: &mut StepCx<'_, E>,
    spec: &RolloutSpec,
    m: &mut RolloutMember,
) -> Result<(), StoreError> {
    let Some(machine_id) = m.machine_id else {
        return Err(StoreError::Refused("the machine was deleted".into()));
    };
    let mut each = spec.template.clone();
    each.hostname = m
        .hostname
        .parse()
        .map_err(|e: kiln_types::ValidationError| StoreError::Invalid(e.to_string()))?;
    let new = NewJob {
        kind: JobKind::Reimage,
        machine_id: Some(machine_id),
        parent_id: Some(cx.job.id),
        hostname: m.hostname.clone(),
        os_label: each.os_label.clone(),
        spec: serde_json::to_value(&each).map_err(|e| StoreError::Invalid(e.to_string()))?,
        ticket: spec.ticket.clone(),
        callback_url: None,
        first_step: 0,
    };
    let job = cx
        .store
        .start_rollout_member(&actor(cx), cx.job.id, m.position, new)
        .await?;
    cx.log(JobLogKind::Note, format!("{}: started, job {}", m.hostname, job.id));
    m.state = MemberState::Running;
    m.job_id = Some(job.id);
    Ok(())
}

/// An aborted rollout cancels its running members (each undoes its own
/// arm); a stopped or aborted one skips the members it never started.
pub async fn undo<E: Effects>(cx: &mut StepCx<'_, E>, ending: Ending) {
    let Ok(members) = cx.store.rollout_members(cx.job.id).await else {
        cx.log(JobLogKind::Note, "could not read the members to stop them");
        return;
    };
    let why = match ending {
        Ending::Cancelled => "the rollout was aborted",
        Ending::Failed => "the rollout stopped",
    };
    for m in members {
        match m.state {
            MemberState::Pending => {
                let _ = cx
                    .store
                    .set_rollout_member(cx.job.id, m.position, MemberState::Skipped, Some(why))
                    .await;
            }
            MemberState::Running if ending == Ending::Cancelled => {
                if let Some(child) = m.job_id {
                    // Already ended is fine: nothing to cancel.
                    let _ = cx.store.control_job(&actor(cx), child, JobControl::Cancel).await;
                }
                let _ = cx
                    .store
                    .set_rollout_member(
                        cx.job.id,
                        m.position,
                        MemberState::Failed,
                        Some("aborted: its job was cancelled"),
                    )
                    .await;
                cx.log(JobLogKind::Note, format!("{}: its job was cancelled", m.hostname));
            }
            _ => {}
        }
    }
}
