//! Post-install tasks as real processes: scripts, and playbooks run by
//! Debian's real `ansible-playbook` against localhost over the `local`
//! connection (`scripts/test` installs `ansible-core`; without it the
//! Ansible tests fail and say so, they do not skip).

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_types::catalog::TaskKind;
use kiln_types::{JobId, MachineId};
use kiln_workflow::post_install::{PostInstallRunner, PostInstallSettings, PostInstallTask, TaskResult, TaskTarget};

fn target() -> TaskTarget {
    TaskTarget {
        job_id: JobId::new(),
        machine_id: MachineId::new(),
        hostname: "web01".into(),
        address: "127.0.0.1".into(),
        os: Some("debian-12".into()),
        ticket: None,
    }
}

fn script(name: &str, content: &str) -> PostInstallTask {
    PostInstallTask {
        name: name.into(),
        kind: TaskKind::Script,
        content: content.into(),
    }
}

fn playbook(name: &str, content: &str) -> PostInstallTask {
    PostInstallTask {
        name: name.into(),
        kind: TaskKind::Ansible,
        content: content.into(),
    }
}

fn runner(settings: PostInstallSettings) -> PostInstallRunner {
    PostInstallRunner::new(settings).unwrap()
}

#[tokio::test]
async fn a_script_runs_with_the_machine_in_its_environment_and_its_output_in_order() {
    let t = target();
    let task = script(
        "hello",
        "#!/bin/sh -e\necho \"host=$KILN_HOST name=$KILN_HOSTNAME os=$KILN_OS ticket=[$KILN_TICKET] task=$KILN_TASK\"\n\
         echo to-stderr >&2\necho \"job=$KILN_JOB_ID machine=$KILN_MACHINE_ID\"\necho \"cwd=$(pwd)\"\n",
    );
    let o = runner(PostInstallSettings::default()).run(&task, &t).await;
    assert!(o.ok(), "{}\n{}", o.summary(), o.output);
    let lines: Vec<&str> = o.output.lines().collect();
    assert_eq!(lines[0], "host=127.0.0.1 name=web01 os=debian-12 ticket=[] task=hello");
    assert_eq!(lines[1], "to-stderr", "stderr keeps its place between the stdout lines");
    assert_eq!(lines[2], format!("job={} machine={}", t.job_id, t.machine_id));
    // It ran in its private temporary directory, which is gone afterwards.
    let cwd = lines[3].strip_prefix("cwd=").unwrap();
    assert!(cwd.contains("kiln-task-"), "{cwd}");
    assert!(!Path::new(cwd).exists(), "{cwd} was left behind");
    assert!(o.command.starts_with("/bin/sh -e /"), "{}", o.command);
    assert!(
        o.summary()
            .starts_with("post-install task `hello` (script) succeeded in "),
        "{}",
        o.summary()
    );
}

#[tokio::test]
async fn a_script_without_a_shebang_runs_under_sh_and_a_failure_has_its_code() {
    let o = runner(PostInstallSettings::default())
        .run(
            &script("broken", "echo starting\necho 'apt: no such package' >&2\nexit 4\n"),
            &target(),
        )
        .await;
    assert_eq!(o.result, TaskResult::Failed { exit_code: 4 });
    assert!(o.command.starts_with("/bin/sh /"), "{}", o.command);
    assert_eq!(
        o.summary(),
        "post-install task `broken` (script) exited with code 4; last output:\nstarting\napt: no such package"
    );
}

#[tokio::test]
async fn the_script_file_is_private_and_an_interpreter_line_is_honoured() {
    let o = runner(PostInstallSettings::default())
        .run(
            &script("py", "#!/usr/bin/env python3\nimport os, stat, sys\nm = os.stat(sys.argv[0]).st_mode\nprint(oct(stat.S_IMODE(m)))\n"),
            &target(),
        )
        .await;
    assert!(o.ok(), "{}", o.summary());
    assert_eq!(o.output.trim(), "0o700");
}

#[tokio::test]
async fn output_is_bounded_to_its_end() {
    let settings = PostInstallSettings {
        output_limit_bytes: 4096,
        ..Default::default()
    };
    let o = runner(settings)
        .run(
            &script("chatty", "for i in $(seq 1 20000); do echo \"line $i\"; done\n"),
            &target(),
        )
        .await;
    assert!(o.ok());
    assert!(o.output.starts_with("[… "), "{}", &o.output[..80]);
    assert!(o.output.contains(" earlier bytes of output dropped …]\n"));
    assert!(o.output.ends_with("line 19999\nline 20000\n"));
    assert!(o.output.len() < 4096 + 100);
}

#[tokio::test]
async fn a_task_past_its_timeout_is_killed_with_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let settings = PostInstallSettings {
        timeout_secs: 1,
        env: [("PID_FILE".to_string(), pid_file.to_str().unwrap().to_string())].into(),
        ..Default::default()
    };
    let started = Instant::now();
    let o = runner(settings)
        .run(
            &script(
                "hangs",
                "#!/bin/sh\necho waiting\nsleep 100 &\necho $! > \"$PID_FILE\"\nwait\n",
            ),
            &target(),
        )
        .await;
    assert_eq!(o.result, TaskResult::TimedOut { after_secs: 1 });
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        o.summary()
            .contains("still ran after 1 s ([post_install] timeout_secs)"),
        "{}",
        o.summary()
    );
    assert!(o.summary().ends_with("last output:\nwaiting"), "{}", o.summary());
    let grandchild = crate::read_pid(&pid_file);
    assert!(
        crate::process_gone(grandchild).await,
        "the background sleep {grandchild} survived"
    );
}

#[tokio::test]
async fn a_missing_ansible_playbook_program_is_not_started() {
    let settings = PostInstallSettings {
        ansible_playbook: "/nonexistent/ansible-playbook".into(),
        ..Default::default()
    };
    let o = runner(settings).run(&playbook("p", "- hosts: all\n"), &target()).await;
    let TaskResult::NotStarted { error } = &o.result else {
        panic!("{:?}", o.result)
    };
    assert!(
        error.starts_with("cannot start `/nonexistent/ansible-playbook`"),
        "{error}"
    );
}

/// A stand-in `ansible-playbook` that records its argv, one per line, and
/// the files it was given: checks the exact command line without Ansible.
#[tokio::test]
async fn the_playbook_command_line_inventory_and_extra_vars() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("ansible-playbook");
    let record = dir.path().join("record");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {rec}\ncat \"$2\" > {rec}.inventory\n\
             for last; do :; done\ncat \"$last\" > {rec}.playbook\n",
            rec = record.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let settings = PostInstallSettings {
        ansible_playbook: fake.to_str().unwrap().into(),
        ansible_args: vec!["--diff".into()],
        inventory_vars: [("ansible_user".to_string(), "root".to_string())].into(),
        ..Default::default()
    };
    let t = TaskTarget {
        address: "192.0.2.7".into(),
        ticket: Some("OPS-1".into()),
        ..target()
    };
    let runner = runner(settings);
    let task = playbook("base", "- hosts: all\n  tasks: []\n");
    let mut o = runner.run(&task, &t).await;
    // A program written a moment ago can fail to start with ETXTBSY while
    // another test thread's fork still holds it open for writing (kiln
    // itself only runs installed programs, and scripts through their
    // interpreter); try again then.
    for _ in 0..20 {
        match &o.result {
            TaskResult::NotStarted { error } if error.contains("Text file busy") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                o = runner.run(&task, &t).await;
            }
            _ => break,
        }
    }
    assert!(o.ok(), "{}", o.summary());
    let argv = std::fs::read_to_string(&record).unwrap();
    let argv: Vec<&str> = argv.lines().collect();
    assert_eq!(argv.len(), 6, "{argv:?}");
    assert_eq!(argv[0], "-i");
    assert!(argv[1].ends_with("/inventory.json"));
    assert_eq!(argv[2], "--extra-vars");
    let extra: serde_json::Value = serde_json::from_str(argv[3]).unwrap();
    assert_eq!(
        extra,
        serde_json::json!({
            "kiln_job_id": t.job_id, "kiln_machine_id": t.machine_id, "kiln_hostname": "web01",
            "kiln_address": "192.0.2.7", "kiln_os": "debian-12", "kiln_ticket": "OPS-1",
        })
    );
    assert_eq!(argv[4], "--diff");
    assert!(argv[5].ends_with("/playbook.yml"));
    let inventory: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("record.inventory")).unwrap()).unwrap();
    assert_eq!(
        inventory,
        serde_json::json!({"all": {"hosts": {"web01": {"ansible_host": "192.0.2.7", "ansible_user": "root"}}}})
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("record.playbook")).unwrap(),
        "- hosts: all\n  tasks: []\n"
    );
}

fn ansible_playbook() -> String {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join("ansible-playbook");
        if p.exists() {
            return p.to_str().unwrap().into();
        }
    }
    panic!(
        "ansible-playbook (Debian package ansible-core) is not installed: run the tests with scripts/test, which installs it"
    );
}

/// Ansible against this machine itself: `ansible_connection=local`, so the
/// inventory host `web01` with `ansible_host=127.0.0.1` is reached without ssh.
fn local_ansible(dir: &Path) -> PostInstallSettings {
    PostInstallSettings {
        ansible_playbook: ansible_playbook(),
        inventory_vars: [
            ("ansible_connection".to_string(), "local".to_string()),
            ("ansible_python_interpreter".to_string(), "/usr/bin/python3".to_string()),
        ]
        .into(),
        // Ansible keeps its own temporary files under HOME.
        env: [(
            "ANSIBLE_LOCAL_TEMP".to_string(),
            dir.join("ansible-tmp").to_str().unwrap().to_string(),
        )]
        .into(),
        timeout_secs: 120,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_real_playbook_runs_against_the_host_with_the_job_fields() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    let pb = format!(
        r#"
- hosts: all
  gather_facts: false
  tasks:
    - name: say who we are
      debug:
        msg: "inventory={{{{ inventory_hostname }}}} host={{{{ ansible_host }}}} kiln={{{{ kiln_hostname }}}} os={{{{ kiln_os }}}}"
    - name: leave a mark
      copy:
        dest: "{marker}"
        content: "{{{{ kiln_machine_id }}}}\n"
"#,
        marker = marker.display()
    );
    let t = target();
    let o = runner(local_ansible(dir.path())).run(&playbook("mark", &pb), &t).await;
    assert!(o.ok(), "{}\n{}", o.summary(), o.output);
    assert!(
        o.output
            .contains("inventory=web01 host=127.0.0.1 kiln=web01 os=debian-12"),
        "{}",
        o.output
    );
    assert!(o.output.contains("PLAY RECAP"), "{}", o.output);
    assert!(
        !o.output.contains("\u{1b}["),
        "colour codes in the job log:\n{}",
        o.output
    );
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), format!("{}\n", t.machine_id));
}

#[tokio::test]
async fn a_failing_playbook_says_a_task_failed() {
    let dir = tempfile::tempdir().unwrap();
    let pb = "- hosts: all\n  gather_facts: false\n  tasks:\n    - name: break\n      command: /bin/false\n";
    let o = runner(local_ansible(dir.path()))
        .run(&playbook("breaks", pb), &target())
        .await;
    assert_eq!(o.result, TaskResult::Failed { exit_code: 2 }, "{}", o.output);
    assert!(
        o.summary().contains("exited with code 2 (a task failed on the host)"),
        "{}",
        o.summary()
    );
    assert!(o.output.contains("failed=1"), "{}", o.output);
}

#[tokio::test]
async fn a_playbook_with_bad_syntax_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let o = runner(local_ansible(dir.path()))
        .run(
            &playbook("bad", "- hosts: all\n  tasks:\n    - nosuchmodule_xyz: {}\n"),
            &target(),
        )
        .await;
    assert!(!o.ok());
    assert!(matches!(o.result, TaskResult::Failed { .. }), "{:?}", o.result);
    assert!(o.output.contains("nosuchmodule_xyz"), "{}", o.output);
}

#[tokio::test]
async fn run_all_stops_at_the_first_failure_and_logs_each_task() {
    let runner = runner(PostInstallSettings::default());
    let t = target();
    let tasks = [script("first", "echo one\n"), script("second", "echo two\n")];
    let lines = runner.run_all(&tasks, &t).await.unwrap();
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert!(lines[0].starts_with("post-install task `first` (script) succeeded in "));
    assert_eq!(lines[1], "`first` output:\none");
    assert!(lines[2].starts_with("post-install task `second` (script) succeeded in "));

    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let tasks = [
        script("breaks", "echo 'disk full' >&2; exit 1\n"),
        script("after", &format!("touch {}\n", marker.display())),
    ];
    let err = runner.run_all(&tasks, &t).await.unwrap_err();
    assert_eq!(
        err,
        "post-install task `breaks` (script) exited with code 1; last output:\ndisk full"
    );
    assert!(!marker.exists(), "a task ran after one failed");
}
