//! The reimage job through the engine, on SQLite and PostgreSQL, with
//! recording effects: the happy path, every step run twice, a failure and a
//! cancel at every step, and a job taken over after its server died.
//! (The real BMC, DHCP and HTTP paths are driven by the server's tests.)

mod common;

use std::sync::Arc;

use chrono::{Duration, Utc};
use common::*;
use kiln_store::{JobRecord, JobSave, Store};
use kiln_test_utils::store_test;
use kiln_types::job::{JobState, Stage};
use kiln_types::machine::{BootPolicy, MachineState};
use kiln_types::{JobId, MachineId};
use kiln_workflow::engine::StepCx;
use kiln_workflow::reimage::{self, STEPS};
use kiln_workflow::{BmcAction, Engine, Outcome};

async fn step_name(store: &Store, id: JobId) -> &'static str {
    STEPS
        .get(store.get_job(id).await.unwrap().step_index as usize)
        .copied()
        .unwrap_or("done")
}

/// Reports stages 1..=5 as the agent and the new OS would, running the
/// engine after each.
async fn install(store: &Store, engine: &Arc<Engine<Recorder>>, id: JobId) {
    for n in 1..=5 {
        store.report_stage(id, Stage(n), "ok").await.unwrap();
        engine.run_due_once().await.unwrap();
    }
}

store_test!(a_reimage_runs_to_deployed, |store| {
    let fx = Recorder::new(Fault::None);
    let engine = engine(&store, fx.clone(), "s1");
    let (id, m) = create(&store, "web1", false).await;
    engine.run_due_once().await.unwrap();
    let job = store.get_job(id).await.unwrap();
    assert_eq!(
        (job.state, step_name(&store, id).await),
        (JobState::Waiting, "wait_installer")
    );
    assert_eq!(job.reason.as_deref(), Some("waiting for stage 1 (installer started)"));
    let arm = store
        .netboot_arm(m)
        .await
        .unwrap()
        .expect("armed while waiting for the installer");
    assert_eq!(arm.job_id, id);
    assert_eq!(
        store.get_machine("web1", None).await.unwrap().state,
        MachineState::Reimaging
    );
    // Nothing is due while it waits.
    assert_eq!(engine.run_due_once().await.unwrap(), 0);

    store.report_stage(id, Stage::STARTED, "agent up").await.unwrap();
    engine.run_due_once().await.unwrap();
    assert!(store.netboot_arm(m).await.unwrap().is_none(), "disarmed after stage 1");
    assert_eq!(step_name(&store, id).await, "wait_base_installed");
    install(&store, &engine, id).await;

    let job = store.get_job(id).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.reason);
    assert_eq!(
        store.get_machine("web1", None).await.unwrap().state,
        MachineState::Deployed
    );
    use BmcAction::*;
    assert_eq!(
        *fx.bmc.lock().unwrap(),
        vec![Check, BootNetworkOnce, PowerOff, PowerOn, BootDisk]
    );
    assert_eq!(*fx.hooks.lock().unwrap(), vec!["pre_reimage", "post_reimage"]);
    let log = store.job_log(id, 0).await.unwrap();
    assert!(log.iter().any(|l| l.stage == Some(Stage(5))));
    // What runs where: stage 5 recorded the image on the machine.
    let os = store
        .get_machine("web1", None)
        .await
        .unwrap()
        .installed_os
        .expect("the installed OS is recorded at stage 5");
    assert_eq!((os.name.as_str(), os.version.as_str(), os.job_id), ("debian", "12", id));
});

store_test!(an_always_netboot_machine_never_has_its_boot_device_changed, |store| {
    let fx = Recorder::new(Fault::None);
    let engine = engine(&store, fx.clone(), "s1");
    let (id, m) = create(&store, "pxe1", false).await;
    let patch = kiln_types::machine::MachinePatch {
        boot_policy: Some(BootPolicy::AlwaysNetboot),
        ..Default::default()
    };
    store
        .update_machine(&common::actor(), "pxe1", patch, None, None)
        .await
        .unwrap();
    engine.run_due_once().await.unwrap();
    assert!(
        store.netboot_arm(m).await.unwrap().is_some(),
        "armed: kiln's answer is the installer"
    );
    install(&store, &engine, id).await;
    let job = store.get_job(id).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.reason);
    use BmcAction::*;
    assert_eq!(*fx.bmc.lock().unwrap(), vec![Check, PowerOff, PowerOn], "only power");
    let log = store.job_log(id, 0).await.unwrap();
    assert!(
        log.iter().filter(|l| l.message.contains("always-netboot")).count() == 2,
        "both boot-device steps say why they were skipped: {log:?}"
    );

    // A failing job of such a machine does not set the disk either.
    let fx = Recorder::new(Fault::Bmc(PowerOn));
    let failing = common::engine(&store, fx.clone(), "s1");
    let (id, _) = create(&store, "pxe2", false).await;
    let patch = kiln_types::machine::MachinePatch {
        boot_policy: Some(BootPolicy::AlwaysNetboot),
        ..Default::default()
    };
    store
        .update_machine(&common::actor(), "pxe2", patch, None, None)
        .await
        .unwrap();
    failing.run_due_once().await.unwrap();
    let job = store.get_job(id).await.unwrap();
    assert_eq!(job.state, JobState::Failed, "{:?}", job.reason);
    assert!(
        !fx.bmc.lock().unwrap().contains(&BootDisk),
        "{:?}",
        fx.bmc.lock().unwrap()
    );
});

store_test!(no_pxe_skips_the_net_boot, |store| {
    let fx = Recorder::new(Fault::None);
    let engine = engine(&store, fx.clone(), "s1");
    let (id, m) = create(&store, "web2", true).await;
    engine.run_due_once().await.unwrap();
    let job = store.get_job(id).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.reason);
    assert!(store.netboot_arm(m).await.unwrap().is_none());
    assert_eq!(*fx.bmc.lock().unwrap(), vec![BmcAction::BootDisk]);
});

/// Brings a fresh job to step `target` (not run yet), reporting stages
/// as an agent would whenever the job waits for one.
async fn job_at(store: &Store, host: &str, target: usize) -> (JobId, MachineId, Arc<Recorder>) {
    let fx = Recorder::new(Fault::None);
    let engine = engine(store, fx.clone(), "s1");
    let (id, m) = create(store, host, false).await;
    loop {
        let job = store.get_job(id).await.unwrap();
        if job.step_index as usize >= target {
            break;
        }
        if job.state == JobState::Waiting {
            store.report_stage(id, Stage(job.stage.0 + 1), "ok").await.unwrap();
        }
        // Jobs left due by earlier calls may run too; they are not looked at again.
        assert!(engine.run_due_steps(1).await.unwrap() >= 1, "{host}: job not due");
    }
    (id, m, fx)
}

/// A step context for job `id` as the engine would build it.
async fn run_step_directly(
    store: &Store,
    fx: &Recorder,
    job: &JobRecord,
    now: chrono::DateTime<Utc>,
) -> (Outcome, JobSave, serde_json::Value) {
    let settings = settings();
    let mut cx = StepCx {
        job,
        store,
        effects: fx,
        settings: &settings,
        now,
        data: job.data.as_object().cloned().unwrap_or_default(),
        save: JobSave::default(),
    };
    let out = reimage::run_step(STEPS[job.step_index as usize], &mut cx).await;
    (out, cx.save, serde_json::Value::Object(cx.data))
}

store_test!(every_step_run_twice_gives_the_same_result, |store| {
    for (i, step) in STEPS.iter().enumerate() {
        let host = format!("twice{i}");
        let fx = Recorder::new(Fault::None);
        let (id, _m, _) = job_at(&store, &host, i).await;
        let job = store.get_job(id).await.unwrap();
        assert_eq!(job.step_index as usize, i, "{step}");
        let now = Utc::now();
        let (o1, s1, d1) = run_step_directly(&store, &fx, &job, now).await;
        let (o2, s2, d2) = run_step_directly(&store, &fx, &job, now).await;
        assert_eq!(o1, o2, "{step}");
        assert_eq!(format!("{s1:?}"), format!("{s2:?}"), "{step}");
        assert_eq!(d1, d2, "{step}");
        let calls = fx.bmc.lock().unwrap().clone();
        if let [a, b] = calls.as_slice() {
            assert_eq!(a, b, "{step}: the same BMC action both times");
        }
    }
});

/// After a job ended early: nothing armed, the boot device is back on disk
/// if the job had touched it, and the reason names the step.
async fn assert_safe(store: &Store, id: JobId, m: MachineId, fx: &Recorder, state: JobState, what: &str) {
    let job = store.get_job(id).await.unwrap();
    assert_eq!(job.state, state, "{what}: {:?}", job.reason);
    let reason = job.reason.clone().unwrap_or_default();
    assert!(!reason.is_empty(), "{what}: a reason");
    assert!(store.netboot_arm(m).await.unwrap().is_none(), "{what}: left armed");
    let bmc = fx.bmc.lock().unwrap().clone();
    let net = bmc.iter().rposition(|a| *a == BmcAction::BootNetworkOnce);
    let disk = bmc.iter().rposition(|a| *a == BmcAction::BootDisk);
    if fx.fault() == Fault::Bmc(BmcAction::BootDisk) {
        // The BMC refuses: the log says so, and the disarmed boot decision
        // sends a net boot to the disk anyway.
        let log = store.job_log(id, 0).await.unwrap();
        assert!(
            log.iter()
                .any(|l| l.message.contains("could not set the boot device back")),
            "{what}"
        );
    } else if let Some(net) = net {
        assert!(disk > Some(net), "{what}: boot device left on network: {bmc:?}");
    }
    assert_ne!(
        store.get_machine(&m.to_string(), None).await.unwrap().state,
        MachineState::Reimaging,
        "{what}: machine left reimaging"
    );
}

store_test!(a_failure_at_each_step_leaves_nothing_armed, |store| {
    let faults = [
        ("validate", Fault::Bmc(BmcAction::Check)),
        ("pre_hooks", Fault::Hooks("pre_reimage")),
        ("arm", Fault::Plan),
        ("boot_network", Fault::Bmc(BmcAction::BootNetworkOnce)),
        ("power_off", Fault::Bmc(BmcAction::PowerOff)),
        ("power_on", Fault::Bmc(BmcAction::PowerOn)),
        ("boot_disk", Fault::Bmc(BmcAction::BootDisk)),
        ("post_install", Fault::PostInstall),
        ("post_hooks", Fault::Hooks("post_reimage")),
    ];
    for (i, (step, fault)) in faults.into_iter().enumerate() {
        let host = format!("fail{i}");
        let target = STEPS.iter().position(|s| *s == step).unwrap();
        let (id, m, fx) = job_at(&store, &host, target).await;
        *fx.fault.lock().unwrap() = fault;
        engine(&store, fx.clone(), "s1").run_due_once().await.unwrap();
        assert_safe(&store, id, m, &fx, JobState::Failed, step).await;
        let reason = store.get_job(id).await.unwrap().reason.unwrap();
        assert!(reason.contains(step) && reason.contains("injected"), "{step}: {reason}");
        // Failure hooks undo what pre-reimage hooks did: nothing to undo
        // when the job failed before them.
        let failure_hooks = fx.hooks.lock().unwrap().contains(&"failure");
        assert_eq!(failure_hooks, step != "validate", "{step}: failure hooks");
    }
    // The waits: a silent installer fails at its deadline.
    let mut quick = settings();
    quick.reimage.installer_start_secs = 0;
    let fx = Recorder::new(Fault::None);
    let (id, m) = create(&store, "silent", false).await;
    Engine::new(store.clone(), fx.clone(), quick, "s1".into())
        .run_due_once()
        .await
        .unwrap();
    assert_safe(&store, id, m, &fx, JobState::Failed, "silent installer").await;
    let reason = store.get_job(id).await.unwrap().reason.unwrap();
    assert!(reason.contains("no stage 1 (installer started) report"), "{reason}");
});

store_test!(a_cancel_at_each_step_leaves_nothing_armed, |store| {
    for (i, step) in STEPS.iter().enumerate() {
        let host = format!("cancel{i}");
        let (id, m, fx) = job_at(&store, &host, i).await;
        store
            .control_job(&actor(), id, kiln_store::JobControl::Cancel)
            .await
            .unwrap();
        engine(&store, fx.clone(), "s1").run_due_once().await.unwrap();
        assert_safe(&store, id, m, &fx, JobState::Cancelled, step).await;
        let state = store.get_machine(&host, None).await.unwrap().state;
        let expected = if i >= STEPS.iter().position(|s| *s == "wait_configured").unwrap() {
            MachineState::Failed // the disk was written: not what it was
        } else {
            MachineState::Deployed
        };
        assert_eq!(state, expected, "{step}");
    }
});

store_test!(a_pause_between_two_steps_leaves_the_next_one_unrun, |store| {
    let fx = Recorder::new(Fault::None);
    let engine = engine(&store, fx.clone(), "s1");
    let (id, m) = create(&store, "paused1", false).await;
    // Asked while pre_hooks runs: its answer is committed (with the next
    // step's attempt), then the job pauses before arm runs.
    *fx.pause_in_hooks.lock().unwrap() = Some(store.clone());
    engine.run_due_once().await.unwrap();
    let job = store.get_job(id).await.unwrap();
    assert_eq!((job.state, step_name(&store, id).await), (JobState::Paused, "arm"));
    assert_eq!(job.step_attempts, 0, "arm never ran: no attempt of it is on record");
    assert!(store.netboot_arm(m).await.unwrap().is_none());
    assert_eq!(*fx.bmc.lock().unwrap(), vec![BmcAction::Check]);

    *fx.pause_in_hooks.lock().unwrap() = None;
    store
        .control_job(&actor(), id, kiln_store::JobControl::Resume)
        .await
        .unwrap();
    engine.run_due_once().await.unwrap();
    let job = store.get_job(id).await.unwrap();
    assert_eq!(
        (job.state, step_name(&store, id).await),
        (JobState::Waiting, "wait_installer")
    );
    assert!(store.netboot_arm(m).await.unwrap().is_some());
});

store_test!(a_job_whose_server_died_is_taken_over, |store| {
    let fx = Recorder::new(Fault::None);
    let (id, m) = create(&store, "orphan", false).await;
    // Server A claims the job and dies before running anything.
    let claimed = store
        .claim_due_jobs("server-a", Utc::now(), Duration::seconds(2), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let b = engine(&store, fx.clone(), "server-b");
    assert_eq!(b.run_due_once().await.unwrap(), 0, "held by A's lease");
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(b.run_due_once().await.unwrap(), 1, "taken over once A's lease expired");
    assert_eq!(step_name(&store, id).await, "wait_installer");
    install(&store, &b, id).await;
    assert_eq!(store.get_job(id).await.unwrap().state, JobState::Succeeded);
    assert!(store.netboot_arm(m).await.unwrap().is_none());
});

store_test!(a_step_interrupted_too_often_fails_the_job, |store| {
    let fx = Recorder::new(Fault::None);
    let (id, m) = create(&store, "crashy", false).await;
    let settings = settings();
    // Each claim that dies mid-step counts one attempt.
    for _ in 0..settings.max_attempts {
        let mut j = store
            .claim_due_jobs("dying", Utc::now() + Duration::seconds(1), Duration::seconds(30), 1)
            .await
            .unwrap()
            .remove(0);
        j.step_attempts += 1;
        j.lease_expires = Some(Utc::now() - Duration::seconds(1));
        store.save_job("dying", &j, JobSave::default()).await.unwrap().unwrap();
    }
    engine(&store, fx.clone(), "s1").run_due_once().await.unwrap();
    let job = store.get_job(id).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(job.reason.unwrap().contains("ran 5 times"));
    assert!(store.netboot_arm(m).await.unwrap().is_none());
});

store_test!(a_retry_after_the_install_started_runs_the_install_again, |store| {
    // Cancelled while the agent was writing (stage 3 reported).
    let target = STEPS.iter().position(|s| *s == "wait_finishing").unwrap();
    let (id, m, fx) = job_at(&store, "again", target).await;
    assert_eq!(store.get_job(id).await.unwrap().stage, Stage(3));
    store
        .control_job(&actor(), id, kiln_store::JobControl::Cancel)
        .await
        .unwrap();
    let engine = engine(&store, fx.clone(), "s1");
    engine.run_due_once().await.unwrap();
    let ended = store.get_job(id).await.unwrap();
    assert_eq!(ended.state, JobState::Cancelled);
    // The default retry starts at `arm` and forgets the old stages.
    let (from, stage) = kiln_workflow::retry_plan(ended.kind, ended.step_index, None, ended.stage);
    assert_eq!((STEPS[from as usize], stage), ("arm", Stage(0)));
    store
        .control_job(
            &actor(),
            id,
            kiln_store::JobControl::Retry {
                step_index: from,
                step: STEPS[from as usize],
                stage,
            },
        )
        .await
        .unwrap();
    engine.run_due_once().await.unwrap();
    let job = store.get_job(id).await.unwrap();
    assert_eq!(
        (STEPS[job.step_index as usize], job.state, job.stage),
        ("wait_installer", JobState::Waiting, Stage(0)),
        "it waits for the new installer"
    );
    assert!(store.netboot_arm(m).await.unwrap().is_some(), "armed again");
    // "started" is logged once per step, not on every wake-up.
    store.report_stage(id, Stage(0), "noise").await.unwrap();
    engine.run_due_once().await.unwrap();
    let log = store.job_log(id, 0).await.unwrap();
    let starts = log
        .iter()
        .filter(|l| l.step.as_deref() == Some("wait_installer") && l.message == "started")
        .count();
    assert_eq!(starts, 2, "once per run of the step: {log:#?}");
});
