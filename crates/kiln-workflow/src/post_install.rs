//! Post-install tasks: what runs once the new OS phoned home — an Ansible
//! playbook against the new host, or a script — with the output captured
//! for the job log.
//!
//! Tasks come from the operator's catalog only ([`Task`], kind
//! [`TaskKind`]): they run on the kiln server, so only an operator may
//! write them. A job's own `--post-install-script` is a tenant's code and
//! never runs here: the installer files put it into the new OS, whose
//! first boot runs it (kiln-boot's `firstboot.sh`). The content is text, so
//! each run writes it to a fresh private temporary directory (mode 0700),
//! runs it there, and removes the directory afterwards.
//! - **ansible**: `ansible-playbook -i inventory.json --extra-vars JSON
//!   [ansible_args…] playbook.yml`. The inventory has one host, named by the
//!   machine's hostname (so `inventory_hostname` is the name a playbook
//!   expects) with `ansible_host` set to the address kiln reaches it at,
//!   plus the `inventory_vars` from the config (`ansible_user`, …). The job's
//!   fields arrive as extra vars `kiln_job_id`, `kiln_machine_id`,
//!   `kiln_hostname`, `kiln_address`, `kiln_os`, `kiln_ticket`. The
//!   playbook should target `hosts: all`.
//! - **script**: runs *on the kiln server*, not on the new host: the script
//!   decides how to reach the machine (ssh, an API) from its environment:
//!   `KILN_HOST` (the address), `KILN_HOSTNAME`, `KILN_MACHINE_ID`,
//!   `KILN_JOB_ID`, `KILN_OS`, `KILN_TICKET`, `KILN_TASK`. Keeping it local
//!   means kiln holds no login of its own to the new host. The script's
//!   `#!` line picks its interpreter (none: `/bin/sh`).
//!
//! Both run through [`crate::process`]: a clean environment, their own
//! process group killed at the timeout, stdout and stderr interleaved into
//! the last `output_limit_bytes` of output.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_store::JobRecord;
use kiln_types::catalog::{Task, TaskKind};
use kiln_types::{JobId, MachineId};
use serde::{Deserialize, Serialize};

use crate::process::{self, Exit, ProcessSpec};

fn default_ansible_playbook() -> String {
    "ansible-playbook".into()
}

fn default_timeout_secs() -> u64 {
    30 * 60
}

fn default_output_limit() -> usize {
    256 * 1024
}

/// The longest a task may be allowed to run.
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;

/// `[post_install]` in the server's config file (all keys optional).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostInstallSettings {
    /// The `ansible-playbook` program: a path, or a name looked up in PATH.
    #[serde(default = "default_ansible_playbook")]
    pub ansible_playbook: String,
    /// Arguments added to every playbook run (e.g. `["--diff"]`,
    /// `["--private-key", "/etc/kiln/ansible_ed25519"]`).
    #[serde(default)]
    pub ansible_args: Vec<String>,
    /// Host variables of the one inventory host (e.g. `ansible_user =
    /// "root"`, `ansible_python_interpreter = "/usr/bin/python3"`).
    #[serde(default)]
    pub inventory_vars: BTreeMap<String, String>,
    /// Per task; then its process group is terminated.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// How much of a task's output (the end) goes to the job log.
    #[serde(default = "default_output_limit")]
    pub output_limit_bytes: usize,
    /// Extra environment for tasks (e.g. `ANSIBLE_CONFIG`,
    /// `ANSIBLE_ROLES_PATH`); not `KILN_*`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where the per-run temporary directories go (default: the system's
    /// temporary directory). kiln never executes a file from there, so a
    /// `noexec` mount is fine.
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
}

impl std::fmt::Debug for PostInstallSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostInstallSettings")
            .field("ansible_playbook", &self.ansible_playbook)
            .field("ansible_args", &self.ansible_args)
            .field("inventory_vars", &self.inventory_vars)
            .field("timeout_secs", &self.timeout_secs)
            .field("output_limit_bytes", &self.output_limit_bytes)
            .field("env", &process::EnvNames(&self.env))
            .field("work_dir", &self.work_dir)
            .finish()
    }
}

impl Default for PostInstallSettings {
    fn default() -> Self {
        PostInstallSettings {
            ansible_playbook: default_ansible_playbook(),
            ansible_args: vec![],
            inventory_vars: BTreeMap::new(),
            timeout_secs: default_timeout_secs(),
            output_limit_bytes: default_output_limit(),
            env: BTreeMap::new(),
            work_dir: None,
        }
    }
}

impl PostInstallSettings {
    /// Every problem with these settings, one per entry.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = vec![];
        if self.ansible_playbook.trim().is_empty() {
            problems.push("ansible_playbook is empty: give the program's path or leave the key out".into());
        }
        if self.timeout_secs == 0 || self.timeout_secs > MAX_TIMEOUT_SECS {
            problems.push(format!(
                "timeout_secs = {} is out of range: give 1 to {MAX_TIMEOUT_SECS} seconds",
                self.timeout_secs
            ));
        }
        if !(4096..=16 << 20).contains(&self.output_limit_bytes) {
            problems.push(format!(
                "output_limit_bytes = {} is out of range: give 4096 to 16777216",
                self.output_limit_bytes
            ));
        }
        for k in self.env.keys() {
            if let Err(e) = process::check_env_name(k) {
                problems.push(format!("env: {e}"));
            }
        }
        for k in self.inventory_vars.keys() {
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                problems.push(format!("inventory_vars: `{k}` is not an Ansible variable name"));
            }
        }
        problems
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// A task to run: from the catalog, or a job's own script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostInstallTask {
    pub name: String,
    pub kind: TaskKind,
    /// Playbook YAML or script text.
    pub content: String,
}

impl From<&Task> for PostInstallTask {
    fn from(t: &Task) -> Self {
        PostInstallTask {
            name: t.name.clone(),
            kind: t.kind,
            content: t.content.clone(),
        }
    }
}

/// The machine a task is for, and the job's fields it may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTarget {
    pub job_id: JobId,
    pub machine_id: MachineId,
    pub hostname: String,
    /// Where kiln reaches the new OS (its IP address, or a resolvable name).
    pub address: String,
    /// `name-version` of the installed OS.
    pub os: Option<String>,
    pub ticket: Option<String>,
}

impl TaskTarget {
    /// The target of a stored job's tasks; `address` is where kiln reaches
    /// the new OS (the machine's IP address, or its FQDN).
    pub fn from_job(job: &JobRecord, address: impl Into<String>) -> Result<TaskTarget, String> {
        Ok(TaskTarget {
            job_id: job.id,
            machine_id: job.machine_id.ok_or("the machine was deleted")?,
            hostname: job.hostname.clone(),
            address: address.into(),
            os: (!job.os_label.is_empty()).then(|| job.os_label.clone()),
            ticket: job.ticket.clone(),
        })
    }
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum TaskResult {
    Succeeded,
    /// It exited with a code other than 0.
    Failed {
        exit_code: i32,
    },
    /// A signal ended it (not kiln's timeout).
    Killed {
        signal: i32,
    },
    /// It ran past the timeout; its process group was killed.
    TimedOut {
        after_secs: u64,
    },
    /// It never ran: the file could not be written, the program not found…
    NotStarted {
        error: String,
    },
}

/// A finished task, for the job log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutcome {
    pub task: String,
    pub kind: TaskKind,
    pub result: TaskResult,
    pub duration_ms: u64,
    /// The command line that ran (the temporary file paths in it are gone).
    pub command: String,
    /// The end of stdout and stderr, interleaved; starts with a note if
    /// earlier output was dropped.
    pub output: String,
}

impl TaskOutcome {
    pub fn ok(&self) -> bool {
        self.result == TaskResult::Succeeded
    }

    /// One line for the job log and a failed job's reason.
    pub fn summary(&self) -> String {
        let what = format!("post-install task `{}` ({})", self.task, self.kind);
        match &self.result {
            TaskResult::Succeeded => format!("{what} succeeded in {} ms", self.duration_ms),
            TaskResult::Failed { exit_code } => {
                let hint = if self.kind == TaskKind::Ansible {
                    match exit_code {
                        // ansible-playbook's documented exit codes.
                        2 => " (a task failed on the host)",
                        4 => " (the host was unreachable)",
                        5 => " (bad options or playbook syntax)",
                        _ => "",
                    }
                } else {
                    ""
                };
                format!("{what} exited with code {exit_code}{hint}{}", self.last_lines())
            }
            TaskResult::Killed { signal } => format!("{what} was killed by signal {signal}{}", self.last_lines()),
            TaskResult::TimedOut { after_secs } => format!(
                "{what} still ran after {after_secs} s ([post_install] timeout_secs): killed it and its process group{}",
                self.last_lines()
            ),
            TaskResult::NotStarted { error } => format!("{what} did not start: {error}"),
        }
    }

    fn last_lines(&self) -> String {
        let tail = process::last_lines(&self.output, 5);
        if tail.is_empty() {
            String::new()
        } else {
            format!("; last output:\n{tail}")
        }
    }
}

/// Errors in the `[post_install]` settings.
#[derive(Debug, thiserror::Error)]
#[error("[post_install]: {}", .problems.join("; "))]
pub struct PostInstallSetupError {
    pub problems: Vec<String>,
}

/// Runs post-install tasks with one set of settings.
#[derive(Debug, Clone)]
pub struct PostInstallRunner {
    settings: PostInstallSettings,
}

impl PostInstallRunner {
    pub fn new(settings: PostInstallSettings) -> Result<PostInstallRunner, PostInstallSetupError> {
        let problems = settings.validate();
        if !problems.is_empty() {
            return Err(PostInstallSetupError { problems });
        }
        Ok(PostInstallRunner { settings })
    }

    pub fn settings(&self) -> &PostInstallSettings {
        &self.settings
    }

    /// Runs one task against `target` and says how it went; never fails as
    /// a whole (a task that could not start is [`TaskResult::NotStarted`]).
    pub async fn run(&self, task: &PostInstallTask, target: &TaskTarget) -> TaskOutcome {
        let started = std::time::Instant::now();
        let outcome = |result, command: String, output: String| TaskOutcome {
            task: task.name.clone(),
            kind: task.kind,
            result,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            command,
            output,
        };
        let not_started = |error: String| outcome(TaskResult::NotStarted { error }, String::new(), String::new());
        if target.address.trim().is_empty() {
            return not_started(format!(
                "the machine `{}` has no address to reach it at",
                target.hostname
            ));
        }
        // Dropped (and so removed) when this function returns.
        let dir = match self.temp_dir() {
            Ok(d) => d,
            Err(e) => return not_started(e),
        };
        let spec = match task.kind {
            TaskKind::Ansible => self.ansible_spec(task, target, dir.path()),
            TaskKind::Script => self.script_spec(task, target, dir.path()),
        };
        let spec = match spec {
            Ok(s) => s,
            Err(e) => return not_started(e),
        };
        let command = spec.display_argv();
        tracing::info!(task = %task.name, kind = %task.kind, job = %target.job_id, host = %target.hostname,
            "running post-install task: {command}");
        let result = match process::run(&spec).await {
            Err(e) => return outcome(TaskResult::NotStarted { error: e.to_string() }, command, String::new()),
            Ok(p) => p,
        };
        let task_result = match result.exit {
            Exit::Code(0) => TaskResult::Succeeded,
            Exit::Code(exit_code) => TaskResult::Failed { exit_code },
            Exit::Signal(signal) => TaskResult::Killed { signal },
            Exit::TimedOut => TaskResult::TimedOut {
                after_secs: self.settings.timeout_secs,
            },
        };
        let done = outcome(task_result, command, result.output_for_log());
        if done.ok() {
            tracing::info!(task = %task.name, job = %target.job_id, "{}", done.summary());
        } else {
            tracing::warn!(task = %task.name, job = %target.job_id, "{}", done.summary());
        }
        done
    }

    /// Runs `tasks` in order, as the engine's `Effects::post_install` wants
    /// it: the job log's lines (each task's summary and output), or why the
    /// job fails — the first task that fails stops the rest, which may
    /// depend on it.
    pub async fn run_all(&self, tasks: &[PostInstallTask], target: &TaskTarget) -> Result<Vec<String>, String> {
        let mut lines = vec![];
        for task in tasks {
            let outcome = self.run(task, target).await;
            if !outcome.ok() {
                return Err(outcome.summary());
            }
            lines.push(outcome.summary());
            if !outcome.output.trim().is_empty() {
                lines.push(format!("`{}` output:\n{}", outcome.task, outcome.output.trim_end()));
            }
        }
        Ok(lines)
    }

    fn temp_dir(&self) -> Result<tempfile::TempDir, String> {
        let parent = self.settings.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        // tempfile makes the directory 0700: only kiln's user reads the task.
        tempfile::Builder::new()
            .prefix("kiln-task-")
            .tempdir_in(&parent)
            .map_err(|e| format!("cannot create a temporary directory in {}: {e}", parent.display()))
    }

    /// The variables every task gets (`KILN_*` last, so nothing overrides
    /// them).
    fn env(&self, task: &PostInstallTask, target: &TaskTarget) -> BTreeMap<String, String> {
        let mut env = self.settings.env.clone();
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        env.extend(
            [
                ("KILN_TASK", task.name.clone()),
                ("KILN_HOST", target.address.clone()),
                ("KILN_HOSTNAME", target.hostname.clone()),
                ("KILN_MACHINE_ID", target.machine_id.to_string()),
                ("KILN_JOB_ID", target.job_id.to_string()),
                ("KILN_OS", opt(&target.os)),
                ("KILN_TICKET", opt(&target.ticket)),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        env
    }

    fn base_spec(&self, program: String, dir: &Path, env: BTreeMap<String, String>) -> ProcessSpec {
        let mut spec = ProcessSpec::new(program, self.settings.timeout());
        spec.current_dir = Some(dir.to_path_buf());
        spec.env = env;
        spec.output_limit = self.settings.output_limit_bytes;
        spec
    }

    fn ansible_spec(&self, task: &PostInstallTask, target: &TaskTarget, dir: &Path) -> Result<ProcessSpec, String> {
        let playbook = write_file(dir, "playbook.yml", &task.content, 0o600)?;
        let mut host_vars: BTreeMap<&str, &str> = self
            .settings
            .inventory_vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        host_vars.insert("ansible_host", &target.address);
        // JSON is YAML: Ansible's yaml inventory plugin reads `.json` files.
        let inventory = serde_json::json!({
            "all": { "hosts": { target.hostname.as_str(): host_vars } }
        });
        let inventory = write_file(dir, "inventory.json", &inventory.to_string(), 0o600)?;
        let extra_vars = serde_json::json!({
            "kiln_job_id": target.job_id,
            "kiln_machine_id": target.machine_id,
            "kiln_hostname": target.hostname,
            "kiln_address": target.address,
            "kiln_os": target.os,
            "kiln_ticket": target.ticket,
        });

        let mut env = self.env(task, target);
        // Plain text in the job log, and stdout/stderr flushed as written
        // so that they interleave in order. The operator's env may differ.
        for (k, v) in [
            ("ANSIBLE_NOCOLOR", "1"),
            ("ANSIBLE_FORCE_COLOR", "0"),
            ("PYTHONUNBUFFERED", "1"),
        ] {
            env.entry(k.into()).or_insert_with(|| v.into());
        }
        let mut spec = self.base_spec(self.settings.ansible_playbook.clone(), dir, env);
        spec.args = vec![
            "-i".into(),
            path_arg(&inventory)?,
            "--extra-vars".into(),
            extra_vars.to_string(),
        ];
        spec.args.extend(self.settings.ansible_args.iter().cloned());
        spec.args.push(path_arg(&playbook)?);
        Ok(spec)
    }

    fn script_spec(&self, task: &PostInstallTask, target: &TaskTarget, dir: &Path) -> Result<ProcessSpec, String> {
        let script = write_file(dir, "script", &task.content, 0o700)?;
        let script = path_arg(&script)?;
        // The interpreter runs with the script as its argument, rather than
        // the script being executed itself: a file just written by a
        // multi-threaded process can fail to exec with ETXTBSY (another
        // thread's fork may briefly hold it open for writing), and the
        // temporary directory may be on a `noexec` mount.
        let (program, mut args) = interpreter(&task.content);
        args.push(script);
        let mut spec = self.base_spec(program, dir, self.env(task, target));
        spec.args = args;
        Ok(spec)
    }
}

/// The interpreter and its argument from a script's `#!` line, split the
/// way Linux does (the program, then the rest of the line as one
/// argument); `/bin/sh` without one, as a POSIX shell would run it.
pub fn interpreter(content: &str) -> (String, Vec<String>) {
    let Some(line) = content.strip_prefix("#!") else {
        return ("/bin/sh".into(), vec![]);
    };
    let line = line.lines().next().unwrap_or("").trim();
    match line.split_once([' ', '\t']) {
        _ if line.is_empty() => ("/bin/sh".into(), vec![]),
        Some((program, arg)) if !arg.trim().is_empty() => (program.into(), vec![arg.trim().into()]),
        Some((program, _)) => (program.into(), vec![]),
        None => (line.into(), vec![]),
    }
}

fn write_file(dir: &Path, name: &str, content: &str, mode: u32) -> Result<PathBuf, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(content.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

fn path_arg(p: &Path) -> Result<String, String> {
    p.to_str().map(str::to_string).ok_or_else(|| {
        format!(
            "the temporary path {} is not UTF-8: set [post_install] work_dir",
            p.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shebang_lines_split_like_linux() {
        let table = [
            ("echo hi", "/bin/sh", vec![]),
            ("#!/bin/bash\necho", "/bin/bash", vec![]),
            ("#! /bin/bash -eu \necho", "/bin/bash", vec!["-eu"]),
            ("#!/usr/bin/env python3\n", "/usr/bin/env", vec!["python3"]),
            ("#!/usr/bin/env -S a b\n", "/usr/bin/env", vec!["-S a b"]),
            ("#!\n", "/bin/sh", vec![]),
        ];
        for (content, program, args) in table {
            assert_eq!(
                interpreter(content),
                (program.to_string(), args.iter().map(|s| s.to_string()).collect()),
                "{content:?}"
            );
        }
    }

    #[test]
    fn settings_defaults_and_errors() {
        let s: PostInstallSettings = toml::from_str("").unwrap();
        assert_eq!(s, PostInstallSettings::default());
        assert!(s.validate().is_empty());
        let s: PostInstallSettings = toml::from_str(
            r#"
            ansible_playbook = ""
            timeout_secs = 0
            output_limit_bytes = 10
            env = { KILN_HOST = "x" }
            inventory_vars = { "a-b" = "1" }
            "#,
        )
        .unwrap();
        let problems = s.validate().join("\n");
        for want in [
            "ansible_playbook is empty",
            "timeout_secs = 0",
            "output_limit_bytes = 10",
            "set by kiln",
            "`a-b`",
        ] {
            assert!(problems.contains(want), "{want} not in {problems}");
        }
        let err = toml::from_str::<PostInstallSettings>("ansible = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `ansible`"), "{err}");
    }
}
