//! Rollouts through the engine, on SQLite and PostgreSQL: members start at
//! most `concurrency` at a time; pause mid-wave starts no new member;
//! resume goes on; abort cancels the running members and leaves none
//! armed; the failure budget (a failed health check) stops the rollout.

mod common;

use std::sync::Arc;

use common::*;
use kiln_store::{JobControl, NewJob, Store};
use kiln_test_utils::store_test;
use kiln_types::JobId;
use kiln_types::job::{JobKind, JobState, MemberState, RolloutSpec, Stage};
use kiln_workflow::Engine;

/// A rollout over fresh machines `hosts`.
async fn rollout(store: &Store, hosts: &[&str], concurrency: u32, max_failures: u32) -> JobId {
    let mut members = vec![];
    let mut template = None;
    for h in hosts {
        let (m, image) = setup(store, h).await;
        template.get_or_insert_with(|| spec(&image, h, false));
        members.push((m, h.to_string()));
    }
    let spec = RolloutSpec {
        selector: "tag=test".into(),
        template: template.unwrap(),
        callback_url: None,
        ticket: Some("T7".into()),
        concurrency,
        max_failures,
        health_check: Some(vec!["check".into()]),
    };
    store
        .create_rollout(
            &actor(),
            NewJob {
                kind: JobKind::Rollout,
                machine_id: None,
                parent_id: None,
                hostname: "rollout tag=test".into(),
                os_label: "debian-12".into(),
                spec: serde_json::to_value(&spec).unwrap(),
                ticket: None,
                callback_url: None,
                first_step: 0,
            },
            &members,
        )
        .await
        .unwrap()
        .id
}

/// Runs the engine until nothing is due.
async fn settle(engine: &Arc<Engine<Recorder>>) {
    for _ in 0..50 {
        if engine.run_due_once().await.unwrap() == 0 {
            return;
        }
    }
    panic!("the engine never settled");
}

async fn members(store: &Store, id: JobId) -> Vec<(String, MemberState)> {
    store
        .rollout_members(id)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.hostname, m.state))
        .collect()
}

fn in_state(ms: &[(String, MemberState)], s: MemberState) -> Vec<String> {
    ms.iter().filter(|(_, st)| *st == s).map(|(h, _)| h.clone()).collect()
}

/// Plays the agent and new OS of `host`'s running reimage, to its end.
async fn install(store: &Store, engine: &Arc<Engine<Recorder>>, rollout: JobId, host: &str) {
    let m = store.rollout_members(rollout).await.unwrap();
    let child = m.iter().find(|m| m.hostname == host).unwrap().job_id.unwrap();
    for n in 1..=5 {
        store.report_stage(child, Stage(n), "ok").await.unwrap();
        settle(engine).await;
    }
    assert_eq!(store.get_job(child).await.unwrap().state, JobState::Succeeded);
}

store_test!(a_rollout_runs_in_waves_pauses_resumes_and_aborts, |store| {
    let fx = Recorder::new(Fault::None);
    let engine = engine(&store, fx.clone(), "s1");
    let id = rollout(&store, &["r0", "r1", "r2", "r3", "r4"], 2, 1).await;
    settle(&engine).await;
    let ms = members(&store, id).await;
    assert_eq!(in_state(&ms, MemberState::Running), ["r0", "r1"]);
    assert_eq!(in_state(&ms, MemberState::Pending), ["r2", "r3", "r4"]);
    let job = store.get_job(id).await.unwrap();
    assert_eq!(job.state, JobState::Waiting);
    assert_eq!(job.reason.as_deref(), Some("2 running, 0 done, 0 failed, 3 pending"));

    // Pause mid-wave: the running members finish, no new one starts.
    store.control_job(&actor(), id, JobControl::Pause).await.unwrap();
    settle(&engine).await;
    assert_eq!(store.get_job(id).await.unwrap().state, JobState::Paused);
    install(&store, &engine, id, "r0").await;
    install(&store, &engine, id, "r1").await;
    let ms = members(&store, id).await;
    assert_eq!(
        in_state(&ms, MemberState::Pending),
        ["r2", "r3", "r4"],
        "paused: nothing new started"
    );
    assert_eq!(
        store.list_jobs(&Default::default()).await.unwrap().len(),
        3,
        "the rollout and two members"
    );

    // Resume: r0 and r1 are settled (health checked), two more start.
    store.control_job(&actor(), id, JobControl::Resume).await.unwrap();
    settle(&engine).await;
    let ms = members(&store, id).await;
    assert_eq!(in_state(&ms, MemberState::Done), ["r0", "r1"]);
    assert_eq!(in_state(&ms, MemberState::Running), ["r2", "r3"]);
    // r2 and r3 wait for their installer, armed.
    assert_eq!(store.netboot_arms().await.unwrap().len(), 2);

    // Abort: the running members are cancelled and disarmed, r4 skipped.
    store.control_job(&actor(), id, JobControl::Cancel).await.unwrap();
    settle(&engine).await;
    assert_eq!(store.get_job(id).await.unwrap().state, JobState::Cancelled);
    let ms = members(&store, id).await;
    assert_eq!(in_state(&ms, MemberState::Failed), ["r2", "r3"]);
    assert_eq!(in_state(&ms, MemberState::Skipped), ["r4"]);
    assert!(
        store.netboot_arms().await.unwrap().is_empty(),
        "abort left a member armed"
    );
    for m in store.rollout_members(id).await.unwrap() {
        if let Some(child) = m.job_id {
            assert!(store.get_job(child).await.unwrap().state.is_final(), "{}", m.hostname);
        }
    }
});

store_test!(the_failure_budget_stops_a_rollout, |store| {
    let fx = Recorder::new(Fault::None);
    fx.unhealthy.lock().unwrap().push("b0".into());
    let engine = engine(&store, fx.clone(), "s1");
    let id = rollout(&store, &["b0", "b1", "b2"], 1, 0).await;
    settle(&engine).await;
    install(&store, &engine, id, "b0").await;
    settle(&engine).await;
    let job = store.get_job(id).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    let reason = job.reason.unwrap();
    assert!(
        reason.contains("b0") && reason.contains("more than the 0 allowed"),
        "{reason}"
    );
    let ms = members(&store, id).await;
    assert_eq!(in_state(&ms, MemberState::Failed), ["b0"]);
    assert_eq!(in_state(&ms, MemberState::Skipped), ["b1", "b2"]);
    let detail = store.rollout_members(id).await.unwrap();
    assert!(
        detail[0].message.as_deref().unwrap().contains("health check failed"),
        "{detail:?}"
    );
    assert!(store.netboot_arms().await.unwrap().is_empty());
});

store_test!(a_rollout_where_every_member_passes_succeeds, |store| {
    let fx = Recorder::new(Fault::None);
    let engine = engine(&store, fx.clone(), "s1");
    let id = rollout(&store, &["c0", "c1", "c2"], 3, 0).await;
    settle(&engine).await;
    for h in ["c0", "c1", "c2"] {
        install(&store, &engine, id, h).await;
    }
    settle(&engine).await;
    assert_eq!(store.get_job(id).await.unwrap().state, JobState::Succeeded);
    let ms = members(&store, id).await;
    assert_eq!(in_state(&ms, MemberState::Done), ["c0", "c1", "c2"]);
});
