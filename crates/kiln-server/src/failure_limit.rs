//! Failed API authentications per client address: after `limit` failures
//! in a window, that address is answered 429 (with `Retry-After`) until
//! the window ends, before its token is even looked up.
//!
//! Why our own fixed window and not governor (vetted in DEPENDENCIES.md):
//! only failures count, and a request must be refused *before* we know
//! whether it will fail. governor's keyed limiter answers "may this event
//! happen?" by consuming a cell, and has no way to ask "is this key over
//! its limit?" without consuming one, so every request (successful ones
//! too) would count. The window here is a counter and a start instant per
//! address, checked without counting, counted only on a 401. A fixed
//! window lets a client fail up to `2 × limit` times across a window's
//! edge; that is fine for its job, which is to stop one source from
//! hammering the token lookup (tokens are 256 random bits: guessing is
//! hopeless whatever the rate).
//!
//! Memory is bounded: windows that ended are dropped at most once per
//! window length, on the next failure (nothing else adds entries, so no
//! timer is needed), and at most [`MAX_TRACKED`] addresses are tracked.
//! IPv6 clients are keyed by their /64, the block one host usually holds,
//! so an attacker cannot get a fresh budget per address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most client addresses tracked at once (about 60 bytes each). Beyond
/// this, new addresses are not limited until old windows end: a source
/// spread over more than this many /64s is a flood no per-source limit
/// stops, and refusing them all would lock out honest clients instead.
pub const MAX_TRACKED: usize = 100_000;

/// The per-address failure windows of one server.
#[derive(Debug)]
pub struct FailureLimiter {
    limit: u32,
    window: Duration,
    max_tracked: usize,
    state: Mutex<Windows>,
}

#[derive(Debug, Default)]
struct Windows {
    by_key: HashMap<IpAddr, Window>,
    last_prune: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

/// What counting a failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Counted; the address may still try.
    Counted,
    /// This failure reached the limit: the address is refused for this long.
    NowBlocked(Duration),
    /// The limit is off, or the table is full: not counted.
    Untracked,
}

/// The key an address is limited under: IPv4 as is (IPv4-mapped IPv6
/// too), IPv6 by its /64.
pub fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

impl FailureLimiter {
    /// `limit` failures per `window` (0: no limit).
    pub fn new(limit: u32, window: Duration) -> FailureLimiter {
        FailureLimiter::with_capacity(limit, window, MAX_TRACKED)
    }

    fn with_capacity(limit: u32, window: Duration, max_tracked: usize) -> FailureLimiter {
        FailureLimiter {
            limit,
            window,
            max_tracked,
            state: Mutex::new(Windows::default()),
        }
    }

    /// `Err(retry_after)` when `ip` is refused at `now`. Counts nothing.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.limit == 0 {
            return Ok(());
        }
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.by_key.get(&key(ip)) {
            Some(w) if w.failures >= self.limit => match self.ends(w).checked_duration_since(now) {
                Some(left) if !left.is_zero() => Err(left),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Counts one failed authentication from `ip` at `now`.
    pub fn fail(&self, ip: IpAddr, now: Instant) -> Counted {
        if self.limit == 0 {
            return Counted::Untracked;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .last_prune
            .is_none_or(|at| now.saturating_duration_since(at) >= self.window)
        {
            let window = self.window;
            state.by_key.retain(|_, w| w.start + window > now);
            state.last_prune = Some(now);
        }
        let k = key(ip);
        if !state.by_key.contains_key(&k) && state.by_key.len() >= self.max_tracked {
            return Counted::Untracked;
        }
        let w = state.by_key.entry(k).or_insert(Window {
            start: now,
            failures: 0,
        });
        if self.ends(w) <= now {
            *w = Window {
                start: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
        if w.failures == self.limit {
            Counted::NowBlocked(self.ends(w).saturating_duration_since(now))
        } else {
            Counted::Counted
        }
    }

    fn ends(&self, w: &Window) -> Instant {
        w.start + self.window
    }

    /// How many addresses are tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).by_key.len()
    }
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1, so a
/// client that waits that long is let in.
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0 || d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn limit_failures_then_refused_until_the_window_ends() {
        let l = FailureLimiter::new(3, MIN);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for i in 0..2 {
            assert_eq!(l.check(a, t0), Ok(()), "failure {i}");
            assert_eq!(l.fail(a, t0 + Duration::from_secs(i)), Counted::Counted);
        }
        assert_eq!(
            l.fail(a, t0 + Duration::from_secs(10)),
            Counted::NowBlocked(Duration::from_secs(50))
        );
        assert_eq!(l.check(a, t0 + Duration::from_secs(10)), Err(Duration::from_secs(50)));
        assert_eq!(l.check(a, t0 + Duration::from_secs(59)), Err(Duration::from_secs(1)));
        // Another address is not affected.
        assert_eq!(l.check(ip("192.0.2.2"), t0 + Duration::from_secs(10)), Ok(()));
        // The window ends: a fresh budget.
        assert_eq!(l.check(a, t0 + MIN), Ok(()));
        assert_eq!(l.fail(a, t0 + MIN), Counted::Counted);
        assert_eq!(l.check(a, t0 + MIN), Ok(()));
    }

    #[test]
    fn zero_means_no_limit() {
        let l = FailureLimiter::new(0, MIN);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(l.fail(ip("192.0.2.1"), t0), Counted::Untracked);
        }
        assert_eq!(l.check(ip("192.0.2.1"), t0), Ok(()));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn ipv6_is_limited_by_its_64() {
        assert_eq!(key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(key(ip("::ffff:192.0.2.9")), ip("192.0.2.9"));
        let l = FailureLimiter::new(2, MIN);
        let t0 = Instant::now();
        l.fail(ip("2001:db8:1:2::1"), t0);
        l.fail(ip("2001:db8:1:2::ffff"), t0);
        assert!(l.check(ip("2001:db8:1:2:9::9"), t0).is_err(), "same /64");
        assert!(l.check(ip("2001:db8:1:3::1"), t0).is_ok(), "another /64");
    }

    #[test]
    fn ended_windows_are_pruned_and_the_table_is_bounded() {
        let l = FailureLimiter::with_capacity(5, MIN, 100);
        let t0 = Instant::now();
        for i in 0..100u32 {
            assert_eq!(
                l.fail(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), t0),
                Counted::Counted
            );
        }
        // Full: a new address is not tracked (and so not refused), the
        // known ones still count.
        assert_eq!(l.fail(ip("192.0.2.1"), t0), Counted::Untracked);
        assert_eq!(l.fail(ip("10.0.0.1"), t0), Counted::Counted);
        assert_eq!(l.tracked(), 100);
        // A window later every old window has ended and goes on the next failure.
        assert_eq!(l.fail(ip("192.0.2.1"), t0 + MIN), Counted::Counted);
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(100)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(50)), 50);
        assert_eq!(retry_after_secs(Duration::from_millis(50_001)), 51);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
