//! Jobs, their log and net-boot arms: every test body runs on SQLite and on
//! PostgreSQL.

use std::collections::HashSet;

use chrono::{Duration, Utc};
use kiln_store::{Actor, ArmRecord, JobControl, JobSave, LogLine, NewJob, NewMachine, Store, StoreError};
use kiln_test_utils::store_test;
use kiln_types::job::{JobFilter, JobKind, JobLogKind, JobState, Stage};
use kiln_types::machine::{MachineCreate, MachineState};
use kiln_types::{JobId, MachineId};

fn actor() -> Actor {
    Actor::new("test (admin)")
}

async fn machine(store: &Store, host: &str) -> MachineId {
    let spec = MachineCreate::new(host.parse().unwrap());
    let m = store
        .create_machines(
            &actor(),
            vec![NewMachine {
                spec,
                sealed_password: None,
            }],
        )
        .await
        .unwrap();
    m[0].id
}

fn new_job(machine_id: MachineId, host: &str) -> NewJob {
    NewJob {
        kind: JobKind::Reimage,
        machine_id: Some(machine_id),
        parent_id: None,
        hostname: host.into(),
        os_label: "debian 12".into(),
        spec: serde_json::json!({ "os_label": "debian 12" }),
        ticket: Some("T1".into()),
        callback_url: None,
        first_step: 0,
    }
}

fn arm(machine_id: MachineId, job_id: JobId) -> ArmRecord {
    ArmRecord {
        machine_id,
        job_id,
        kernel: "agent/vmlinuz".into(),
        initrds: vec!["agent/initrd.img".into()],
        cmdline: vec!["console=ttyS0".into()],
        expires_at: Utc::now() + Duration::minutes(30),
        consumed: false,
    }
}

store_test!(one_active_job_per_machine, |store| {
    let m = machine(&store, "db1").await;
    let job = store.create_job(&actor(), new_job(m, "db1")).await.unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert!(job.run_at.is_some(), "a new job is due at once");
    let err = store.create_job(&actor(), new_job(m, "db1")).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(msg) if msg.contains(&job.id.to_string())),
        "{err}"
    );
    // A machine with an active job cannot be deleted.
    let err = store.delete_machine(&actor(), "db1", None).await.unwrap_err();
    assert!(matches!(err, StoreError::Refused(_)), "{err}");
    let log = store.job_log(job.id, 0).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].kind, JobLogKind::Created);
    let listed = store
        .list_jobs(&JobFilter {
            machine: Some("DB1".into()),
            active: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
});

store_test!(claims_are_leased_and_saves_fenced, |store| {
    let m = machine(&store, "db2").await;
    let job = store.create_job(&actor(), new_job(m, "db2")).await.unwrap();
    let now = Utc::now() + Duration::seconds(1);
    let a = store
        .claim_due_jobs("server-a", now, Duration::seconds(30), 10)
        .await
        .unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].lease_owner.as_deref(), Some("server-a"));
    // Held: nobody else gets it.
    let b = store
        .claim_due_jobs("server-b", now, Duration::seconds(30), 10)
        .await
        .unwrap();
    assert!(b.is_empty());
    assert!(
        store
            .renew_job_lease(job.id, "server-a", now + Duration::seconds(60))
            .await
            .unwrap()
    );
    assert!(!store.renew_job_lease(job.id, "server-b", now).await.unwrap());
    // After the lease expires, server-b takes the job over...
    let later = now + Duration::seconds(61);
    let b = store
        .claim_due_jobs("server-b", later, Duration::seconds(30), 10)
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    // ...and server-a, which still thinks it runs the job, writes nothing.
    let mut stale = a[0].clone();
    stale.step_index = 5;
    let saved = store
        .save_job(
            "server-a",
            &stale,
            JobSave {
                arm: Some(Some(arm(m, job.id))),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(saved.is_none());
    assert!(store.netboot_arm(m).await.unwrap().is_none());
    assert_eq!(store.get_job(job.id).await.unwrap().step_index, 0);
});

store_test!(a_save_carries_log_machine_state_and_arm, |store| {
    let m = machine(&store, "db3").await;
    let job = store.create_job(&actor(), new_job(m, "db3")).await.unwrap();
    let gen_before = store.machines_generation().await.unwrap();
    let mut j = store
        .claim_due_jobs("s", Utc::now() + Duration::seconds(1), Duration::seconds(30), 1)
        .await
        .unwrap()
        .remove(0);
    j.state = JobState::Waiting;
    j.step_index = 3;
    j.data = serde_json::json!({ "previous_state": "new" });
    let saved = store
        .save_job(
            "s",
            &j,
            JobSave {
                log: vec![LogLine::new(JobLogKind::Step, Some("arm"), "armed")],
                machine_state: Some(MachineState::Reimaging),
                arm: Some(Some(arm(m, job.id))),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(saved.step_index, 3);
    assert_eq!(saved.data["previous_state"], "new");
    assert_eq!(
        store.get_machine("db3", None).await.unwrap().state,
        MachineState::Reimaging
    );
    assert_eq!(store.netboot_arm(m).await.unwrap().unwrap(), arm_like(&store, m).await);
    assert!(
        store.machines_generation().await.unwrap() > gen_before,
        "the state change reloads the DHCP inventory"
    );
    assert_eq!(store.netboot_arms().await.unwrap().len(), 1);
    // Disarm.
    store
        .save_job(
            "s",
            &saved,
            JobSave {
                arm: Some(None),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert!(store.netboot_arm(m).await.unwrap().is_none());
    let log = store.job_log(job.id, 1).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].step.as_deref(), Some("arm"));
});

async fn arm_like(store: &Store, m: MachineId) -> ArmRecord {
    store.netboot_arm(m).await.unwrap().unwrap()
}

store_test!(stage_reports_move_forward_only_and_consume_the_arm, |store| {
    let m = machine(&store, "db4").await;
    let job = store.create_job(&actor(), new_job(m, "db4")).await.unwrap();
    let mut j = store
        .claim_due_jobs("s", Utc::now() + Duration::seconds(1), Duration::seconds(30), 1)
        .await
        .unwrap()
        .remove(0);
    j.state = JobState::Waiting;
    j.run_at = Some(Utc::now() + Duration::minutes(10));
    j.lease_owner = None;
    j.lease_expires = None;
    store
        .save_job(
            "s",
            &j,
            JobSave {
                arm: Some(Some(arm(m, job.id))),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    let after = store.report_stage(job.id, Stage::STARTED, "agent up").await.unwrap();
    assert_eq!(after.stage, Stage::STARTED);
    assert!(after.run_at.unwrap() <= Utc::now(), "a stage report wakes the job");
    assert!(store.netboot_arm(m).await.unwrap().unwrap().consumed);
    store.report_stage(job.id, Stage(3), "configured").await.unwrap();
    let late = store.report_stage(job.id, Stage(2), "image written").await.unwrap();
    assert_eq!(late.stage, Stage(3), "a late report never moves a job back");
    let log = store.job_log(job.id, 0).await.unwrap();
    assert!(log.last().unwrap().message.contains("late"));
    assert_eq!(log.last().unwrap().stage, Some(Stage(2)));
});

store_test!(operators_cancel_pause_resume_retry, |store| {
    let m = machine(&store, "db5").await;
    let job = store.create_job(&actor(), new_job(m, "db5")).await.unwrap();
    let err = store
        .control_job(
            &actor(),
            job.id,
            JobControl::Retry {
                step_index: 0,
                step: "validate",
                stage: Stage(0),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Refused(_)), "{err}");
    let operator_lines = |store: Store| async move {
        store
            .job_log(job.id, 0)
            .await
            .unwrap()
            .iter()
            .filter(|l| l.kind == JobLogKind::Operator)
            .count()
    };
    let paused = store.control_job(&actor(), job.id, JobControl::Pause).await.unwrap();
    assert!(paused.pause_requested);
    // Twice is once: one log line.
    store.control_job(&actor(), job.id, JobControl::Pause).await.unwrap();
    assert_eq!(operator_lines(store.clone()).await, 1);
    let resumed = store.control_job(&actor(), job.id, JobControl::Resume).await.unwrap();
    assert!(!resumed.pause_requested);
    store.control_job(&actor(), job.id, JobControl::Resume).await.unwrap();
    assert_eq!(operator_lines(store.clone()).await, 2);
    let cancelled = store.control_job(&actor(), job.id, JobControl::Cancel).await.unwrap();
    assert!(cancelled.cancel_requested);
    store.control_job(&actor(), job.id, JobControl::Cancel).await.unwrap();
    assert_eq!(operator_lines(store.clone()).await, 3);
    // The engine carries the cancel out; here, by hand.
    let mut j = store
        .claim_due_jobs("s", Utc::now() + Duration::seconds(1), Duration::seconds(30), 1)
        .await
        .unwrap()
        .remove(0);
    j.state = JobState::Cancelled;
    j.run_at = None;
    j.finished_at = Some(Utc::now());
    store.save_job("s", &j, JobSave::default()).await.unwrap().unwrap();
    let err = store.report_stage(job.id, Stage(1), "too late").await.unwrap_err();
    assert!(matches!(err, StoreError::Refused(_)), "{err}");
    let err = store
        .control_job(&actor(), job.id, JobControl::Cancel)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Refused(_)), "{err}");
    // A new job may start now; while it runs, the old one cannot be retried.
    let second = store.create_job(&actor(), new_job(m, "db5")).await.unwrap();
    let err = store
        .control_job(
            &actor(),
            job.id,
            JobControl::Retry {
                step_index: 2,
                step: "arm",
                stage: Stage(0),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    let mut s = store
        .claim_due_jobs("s", Utc::now() + Duration::seconds(1), Duration::seconds(30), 1)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(s.id, second.id);
    s.state = JobState::Failed;
    s.run_at = None;
    s.finished_at = Some(Utc::now());
    store.save_job("s", &s, JobSave::default()).await.unwrap().unwrap();
    let retried = store
        .control_job(
            &actor(),
            job.id,
            JobControl::Retry {
                step_index: 2,
                step: "arm",
                stage: Stage(0),
            },
        )
        .await
        .unwrap();
    assert_eq!((retried.state, retried.step_index), (JobState::Queued, 2));
    assert!(retried.finished_at.is_none() && retried.lease_owner.is_none());
    // Every operator action is in the audit log.
    let events = store
        .list_events(&kiln_types::event::EventFilter {
            action: Some("job.".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let actions: HashSet<String> = events.items.iter().map(|e| e.action.clone()).collect();
    for a in ["job.create", "job.pause", "job.resume", "job.cancel", "job.retry"] {
        assert!(actions.contains(a), "{a} missing from {actions:?}");
    }
});

store_test!(concurrent_claims_never_share_a_job, |store| {
    let mut ids = HashSet::new();
    for i in 0..24 {
        let host = format!("n{i:02}");
        let m = machine(&store, &host).await;
        ids.insert(store.create_job(&actor(), new_job(m, &host)).await.unwrap().id);
    }
    let at = Utc::now() + Duration::seconds(1);
    let claimers = (0..4).map(|c| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut got = vec![];
            for _ in 0..4 {
                got.extend(
                    store
                        .claim_due_jobs(&format!("server-{c}"), at, Duration::seconds(30), 3)
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|j| j.id),
                );
            }
            got
        })
    });
    let mut seen = HashSet::new();
    for c in claimers {
        for id in c.await.unwrap() {
            assert!(seen.insert(id), "job {id} was claimed twice");
        }
    }
    assert_eq!(seen, ids, "every due job is claimed");
});
