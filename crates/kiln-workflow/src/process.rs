//! Running an operator's program (a command hook, a post-install script,
//! `ansible-playbook`) with a deadline, a clean environment and a bounded
//! copy of its output.
//!
//! What every caller gets from [`run`]:
//! - **argv, never a shell line.** The program and its arguments are passed
//!   to `execve` as they are; data reaches the program through environment
//!   variables and stdin, so a hostname cannot become a second command.
//! - **A clean environment.** The kiln server's own environment may hold a
//!   database URL with its password or other `KILN_*` settings, so the child
//!   starts from an empty one plus the few variables in [`INHERITED_ENV`]
//!   (`PATH`, `HOME`, locale, `SSH_AUTH_SOCK` …) and the variables the
//!   caller adds.
//! - **Its own process group**, so that on timeout — or when the caller
//!   drops the future, e.g. because the job was cancelled — the whole group
//!   is killed: a script's children go with it and nothing keeps acting on
//!   the machine after kiln gave up. On timeout the group first gets SIGTERM
//!   (a playbook can stop cleanly), then SIGKILL after [`KILL_GRACE`]. When
//!   the program exits by itself, whatever it left running in its group is
//!   killed as well: a leftover child would otherwise hold the output pipe
//!   open and keep the job waiting for an end of file that never comes.
//! - **Output as the job log wants it**: stdout and stderr share one pipe,
//!   so their lines stay in the order the program wrote them; only the last
//!   `output_limit` bytes are kept (the end of a playbook run holds the
//!   recap and the error), and the number of bytes dropped before them is
//!   counted so the log can say so.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The variables a child inherits from the kiln server, when set there.
/// Everything else it gets from its caller.
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    // ssh (and so Ansible) reaches the new host with the server's agent.
    "SSH_AUTH_SOCK",
];

/// `PATH` for a child when the server itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a timed-out program has between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(3);

/// How long the output is still read after the program's group is gone.
/// Only a process that left the group (`setsid`) can hold the pipe that
/// long; its output is then cut off rather than waited for.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What to run and how.
#[derive(Clone)]
pub struct ProcessSpec {
    /// The program: a path, or a name looked up in the child's `PATH`.
    pub program: String,
    pub args: Vec<String>,
    /// Variables on top of [`INHERITED_ENV`]; they win over inherited ones.
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the server's).
    pub current_dir: Option<PathBuf>,
    /// Bytes written to the program's stdin, which is then closed. `None`:
    /// stdin is `/dev/null`.
    pub stdin: Option<Vec<u8>>,
    /// After this the program's process group is terminated.
    pub timeout: Duration,
    /// How many bytes of output (the last ones) are kept.
    pub output_limit: usize,
}

impl fmt::Debug for ProcessSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessSpec")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env", &EnvNames(&self.env))
            .field("current_dir", &self.current_dir)
            .field("stdin_bytes", &self.stdin.as_ref().map(Vec::len))
            .field("timeout", &self.timeout)
            .field("output_limit", &self.output_limit)
            .finish()
    }
}

impl ProcessSpec {
    pub fn new(program: impl Into<String>, timeout: Duration) -> ProcessSpec {
        ProcessSpec {
            program: program.into(),
            args: vec![],
            env: BTreeMap::new(),
            current_dir: None,
            stdin: None,
            timeout,
            output_limit: 64 * 1024,
        }
    }

    /// The command line as a person reads it in a log (not for a shell).
    pub fn display_argv(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| {
                if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c)) {
                    a.clone()
                } else {
                    format!("'{}'", a.replace('\'', r"'\''"))
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited by itself with this code.
    Code(i32),
    /// A signal ended it before its deadline (not one kiln sent).
    Signal(i32),
    /// Still running at the deadline: its group was killed.
    TimedOut,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal(s) => write!(f, "was killed by signal {s}"),
            Exit::TimedOut => f.write_str("timed out"),
        }
    }
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct ProcessOutcome {
    pub exit: Exit,
    /// The last `output_limit` bytes of stdout and stderr, interleaved as
    /// written (invalid UTF-8 replaced).
    pub output: String,
    /// Bytes of output dropped before `output` (0: `output` is complete).
    pub output_dropped: u64,
    pub duration: Duration,
}

impl ProcessOutcome {
    pub fn success(&self) -> bool {
        self.exit == Exit::Code(0)
    }

    /// The last `n` non-empty lines of output, for an error message.
    pub fn last_lines(&self, n: usize) -> String {
        last_lines(&self.output, n)
    }

    /// The output as the job log shows it: with a first line that says how
    /// much was cut off, if anything was.
    pub fn output_for_log(&self) -> String {
        if self.output_dropped == 0 {
            self.output.clone()
        } else {
            format!(
                "[… {} earlier bytes of output dropped …]\n{}",
                self.output_dropped, self.output
            )
        }
    }
}

/// The last `n` non-empty lines of `text`, each cut to 300 characters.
pub fn last_lines(text: &str, n: usize) -> String {
    let mut lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .rev()
        .take(n)
        .collect();
    lines.reverse();
    lines
        .iter()
        .map(|l| {
            if l.chars().count() > 300 {
                format!("{}…", l.chars().take(300).collect::<String>())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The program could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(
        "cannot start `{program}`: {source} (is it installed and executable? a bare name is looked up in PATH={path})"
    )]
    Spawn {
        program: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the output pipe for `{program}`")]
    Pipe {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lost track of `{program}` while waiting for it")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// Checks an environment variable name from the config: letters, digits
/// and `_`, not starting with a digit, and not `KILN_*` (those are kiln's
/// own and carry the job's data).
pub fn check_env_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "environment variable name `{name}` is not valid: use letters, digits and `_`, not starting with a digit"
        ));
    }
    if name.starts_with("KILN_") {
        return Err(format!(
            "environment variable `{name}`: names starting with KILN_ are set by kiln itself, pick another name"
        ));
    }
    Ok(())
}

/// Shows an environment table in `Debug` output with its names only: the
/// values configured for hooks and tasks are often API tokens.
pub struct EnvNames<'a>(pub &'a BTreeMap<String, String>);

impl fmt::Debug for EnvNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.keys().map(|k| (k, "[redacted]"))).finish()
    }
}

/// The last `limit` bytes written to it, and how many came before them.
#[derive(Debug)]
struct Tail {
    bytes: VecDeque<u8>,
    limit: usize,
    dropped: u64,
}

impl Tail {
    fn new(limit: usize) -> Tail {
        Tail {
            bytes: VecDeque::with_capacity(limit.min(64 * 1024)),
            limit,
            dropped: 0,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        // Only the end of a chunk larger than the whole tail can survive.
        let chunk = if chunk.len() > self.limit {
            self.dropped += (chunk.len() - self.limit) as u64;
            &chunk[chunk.len() - self.limit..]
        } else {
            chunk
        };
        let overflow = (self.bytes.len() + chunk.len()).saturating_sub(self.limit);
        self.bytes.drain(..overflow);
        self.dropped += overflow as u64;
        self.bytes.extend(chunk);
    }

    fn take(&mut self) -> (String, u64) {
        let bytes: Vec<u8> = self.bytes.drain(..).collect();
        (String::from_utf8_lossy(&bytes).into_owned(), self.dropped)
    }
}

/// Kills the process group on drop unless disarmed: when the caller drops
/// the future (job cancelled, its own deadline), the program must not run on.
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn signal_group(pgid: i32, signal: nix::sys::signal::Signal) {
    // ESRCH (the group is already gone) is the usual, harmless answer.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
}

/// The environment a child starts with: the allowed part of ours, then the
/// caller's variables.
fn child_env(extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = INHERITED_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    env.entry("PATH".into()).or_insert_with(|| DEFAULT_PATH.into());
    env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Runs `spec` to its end or its deadline. `Err` only when the program
/// could not be started (or waited for); a non-zero exit or a timeout is an
/// `Ok` outcome that says so.
pub async fn run(spec: &ProcessSpec) -> Result<ProcessOutcome, ProcessError> {
    let started = Instant::now();
    let env = child_env(&spec.env);
    let pipe_err = |source| ProcessError::Pipe {
        program: spec.program.clone(),
        source,
    };
    // One pipe for stdout and stderr: the log shows an error next to the
    // line that led to it.
    let (reader, writer) = std::io::pipe().map_err(pipe_err)?;
    let writer_for_stderr = writer.try_clone().map_err(pipe_err)?;
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader)).map_err(pipe_err)?;

    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(&env)
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::from(OwnedFd::from(writer)))
        .stderr(Stdio::from(OwnedFd::from(writer_for_stderr)))
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &spec.current_dir {
        cmd.current_dir(dir);
    }
    let spawned = cmd.spawn();
    // The command holds our copies of the pipe's write end: drop them now,
    // or the reader never sees the end of the output.
    drop(cmd);
    let mut child = spawned.map_err(|source| ProcessError::Spawn {
        program: spec.program.clone(),
        path: env.get("PATH").cloned().unwrap_or_default(),
        source,
    })?;
    // With process_group(0) the group's id is the child's pid.
    let pgid = child.id().and_then(|pid| i32::try_from(pid).ok());
    let mut guard = GroupGuard(pgid);

    let tail = Arc::new(Mutex::new(Tail::new(spec.output_limit.max(1))));
    let reading = tokio::spawn(read_into(reader, tail.clone()));
    // In a task of its own: a program that never reads its stdin must not
    // block us once the payload is larger than the pipe's buffer.
    let writing = match (child.stdin.take(), spec.stdin.clone()) {
        (Some(mut stdin), Some(bytes)) => Some(tokio::spawn(async move {
            // EPIPE (the program exited without reading) is not our error.
            let _ = stdin.write_all(&bytes).await;
        })),
        _ => None,
    };

    let wait_err = |source| ProcessError::Wait {
        program: spec.program.clone(),
        source,
    };
    let exit = match tokio::time::timeout(spec.timeout, child.wait()).await {
        Ok(status) => exit_of(status.map_err(wait_err)?),
        Err(_) => {
            if let Some(pgid) = pgid {
                signal_group(pgid, nix::sys::signal::Signal::SIGTERM);
            }
            if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_err() {
                if let Some(pgid) = pgid {
                    signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
                }
                child.wait().await.map_err(wait_err)?;
            }
            Exit::TimedOut
        }
    };
    // The leader is gone; its group may not be. Killing it right after the
    // leader was reaped is safe in practice: the group id could only be
    // reused once every member has died and the pid space wrapped around.
    if let Some(pgid) = pgid {
        signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
    }
    guard.0 = None;
    if let Some(w) = writing {
        w.abort();
    }
    let mut reading = reading;
    if tokio::time::timeout(DRAIN_GRACE, &mut reading).await.is_err() {
        reading.abort();
        tracing::warn!(program = %spec.program, "a process outside the program's group still holds its output open; output cut off");
    }
    let (output, output_dropped) = tail.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ok(ProcessOutcome {
        exit,
        output,
        output_dropped,
        duration: started.elapsed(),
    })
}

fn exit_of(status: ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        // Neither is impossible on Unix; treat it as a failure.
        (None, None) => Exit::Code(-1),
    }
}

async fn read_into(mut reader: tokio::net::unix::pipe::Receiver, tail: Arc<Mutex<Tail>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => tail.lock().unwrap_or_else(|p| p.into_inner()).push(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_bytes_and_counts_the_rest() {
        let mut t = Tail::new(5);
        t.push(b"abc");
        t.push(b"defg");
        assert_eq!(t.take(), ("cdefg".to_string(), 2));
        let mut t = Tail::new(3);
        t.push(b"0123456789");
        assert_eq!(t.take(), ("789".to_string(), 7));
    }

    #[test]
    fn env_names() {
        assert!(check_env_name("ANSIBLE_CONFIG").is_ok());
        assert!(check_env_name("_x1").is_ok());
        for bad in ["", "1A", "A-B", "A=B", "A B"] {
            assert!(check_env_name(bad).unwrap_err().contains("not valid"), "{bad}");
        }
        assert!(check_env_name("KILN_HOSTNAME").unwrap_err().contains("set by kiln"));
    }

    #[test]
    fn last_lines_skips_blank_lines() {
        assert_eq!(last_lines("a\n\nb\nc\n\n", 2), "b\nc");
        assert_eq!(last_lines("", 3), "");
    }

    #[test]
    fn display_argv_quotes_what_a_shell_would_split() {
        let mut spec = ProcessSpec::new("/bin/echo", Duration::from_secs(1));
        spec.args = vec!["a b".into(), "it's".into(), "--x=1".into(), "".into()];
        assert_eq!(spec.display_argv(), r"/bin/echo 'a b' 'it'\''s' --x=1 ''");
    }
}
