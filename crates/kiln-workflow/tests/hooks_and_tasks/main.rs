//! Hooks and post-install tasks against real peers: an HTTP receiver on
//! 127.0.0.1 that checks signatures for real, real child processes, and
//! Debian's `ansible-playbook` (installed by `scripts/test`).

mod hooks;
mod post_install;

use std::path::Path;
use std::time::{Duration, Instant};

/// Whether process `pid` is gone: no longer in /proc, or a zombie waiting
/// for a parent (a container's init may be slow to reap). Polls up to 5 s.
pub async fn process_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        let gone = match stat {
            Err(_) => true,
            // Field 3, after the parenthesised command name, is the state.
            Ok(s) => s
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        };
        if gone {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a PID a test's shell wrote to `path`.
pub fn read_pid(path: &Path) -> u32 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{} holds `{text}`, not a PID: {e}", path.display()))
}
