//! The machine the agent acts on, as deploy mode needs it: programs to run
//! (the layout's commands, `mount`, `blkid`, `grub-install`) and device
//! nodes to wait for. A trait, so the deploy flow is tested with a fake
//! that records what it was asked to run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A program failed, or a device never appeared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SystemError {
    #[error("`{command}` could not be started: {error}")]
    Spawn { command: String, error: String },
    #[error("`{command}` failed ({status}): {output}")]
    Failed {
        command: String,
        status: String,
        output: String,
    },
    #[error("{0} did not appear within {1} s")]
    NoDevice(String, u64),
}

pub trait System {
    /// Runs `argv` (no shell) and gives its standard output; a non-zero
    /// exit is an error carrying the end of its output.
    fn run(&mut self, argv: &[String]) -> Result<String, SystemError>;
    /// Waits until the device node `path` exists: the kernel makes
    /// partitions, md arrays and LVM volumes a moment after the command
    /// that asked for them, and the ramdisk has no udev to wait on.
    fn wait_for_device(&mut self, path: &str) -> Result<(), SystemError>;
    /// Where a device path such as `/dev/vg0/root` is opened for writing:
    /// itself on a real machine.
    fn device_path(&self, device: &str) -> PathBuf;
}

/// The real machine. Every command gets `DM_DISABLE_UDEV=1` (LVM makes
/// its own device nodes: there is no udev in the ramdisk) and no stdin,
/// and is echoed to standard error, which the ramdisk sends to the console.
#[derive(Debug, Default)]
pub struct HostSystem;

impl System for HostSystem {
    fn run(&mut self, argv: &[String]) -> Result<String, SystemError> {
        let command = argv.join(" ");
        eprintln!("kiln-agent: $ {command}");
        let (program, args) = argv.split_first().ok_or_else(|| SystemError::Spawn {
            command: String::new(),
            error: "empty command".into(),
        })?;
        let out = Command::new(program)
            .args(args)
            .env("DM_DISABLE_UDEV", "1")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| SystemError::Spawn {
                command: command.clone(),
                error: e.to_string(),
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok(stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(SystemError::Failed {
            command,
            status: out.status.to_string(),
            output: last_lines(&format!("{stdout}{stderr}"), 5),
        })
    }

    fn wait_for_device(&mut self, path: &str) -> Result<(), SystemError> {
        const LIMIT: Duration = Duration::from_secs(15);
        let started = Instant::now();
        while !Path::new(path).exists() {
            if started.elapsed() > LIMIT {
                return Err(SystemError::NoDevice(path.to_string(), LIMIT.as_secs()));
            }
            sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn device_path(&self, device: &str) -> PathBuf {
        PathBuf::from(device)
    }
}

/// The last `n` non-empty lines of `text`, joined with ` / `: enough of a
/// tool's complaint to act on, short enough for a job's reason.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

/// The device paths a command needs to exist before it runs: every
/// `/dev/…` argument but the array `mdadm --create` makes.
pub fn devices_needed(argv: &[String]) -> Vec<&str> {
    let creates = argv.first().is_some_and(|p| p == "mdadm") && argv.iter().any(|a| a == "--create");
    argv.iter()
        .enumerate()
        .filter(|(i, a)| a.starts_with("/dev/") && !(creates && *i > 0 && argv[i - 1] == "--create"))
        .map(|(_, a)| a.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn an_array_being_created_is_not_waited_for() {
        let create = argv("mdadm --create /dev/md0 --level=1 --raid-devices=2 /dev/vda2 /dev/vdb2 --run");
        assert_eq!(devices_needed(&create), ["/dev/vda2", "/dev/vdb2"]);
        assert_eq!(devices_needed(&argv("pvcreate /dev/md1")), ["/dev/md1"]);
        assert!(devices_needed(&argv("vgchange --activate n")).is_empty());
    }

    #[test]
    fn failures_keep_their_last_lines() {
        let mut host = HostSystem;
        let sh = |script: &str| vec!["sh".to_string(), "-c".to_string(), script.to_string()];
        let SystemError::Failed { output, status, .. } = host.run(&sh("echo one; echo two >&2; exit 3")).unwrap_err()
        else {
            panic!("not a failure")
        };
        assert_eq!(output, "one / two");
        assert!(status.contains('3'), "{status}");
        let e = host.run(&argv("/nonexistent/tool")).unwrap_err();
        assert!(matches!(e, SystemError::Spawn { .. }), "{e}");
        assert_eq!(last_lines("a\n\nb\nc\n", 2), "b / c");
        let ok = host.run(&sh("echo hi")).unwrap();
        assert_eq!(ok, "hi\n");
    }
}
