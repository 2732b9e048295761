//! Upstream health: which upstreams are in rotation.
//!
//! Passive: a failed connect takes an upstream out of rotation — for
//! [`PASSIVE_COOLDOWN`] when the route has no active check, or until the
//! active check next passes when it has one. Active (optional, per route):
//! the daemon's checker sends `GET <path>` to each upstream every
//! `interval`; any HTTP answer below 500 counts as up.
//!
//! Health is kept per upstream address in the
//! [`UpstreamBook`](super::UpstreamBook), outside the snapshot: a reload
//! (a key added by `keygen`, a route edited) keeps what is known about
//! every upstream the new configuration still names, and drops the rest.
//! Routes that name the same address share its health: it is the same
//! server.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// How long a passively failed upstream stays out of rotation when its
/// route has no active check; after that it gets requests again.
pub const PASSIVE_COOLDOWN: Duration = Duration::from_secs(10);

/// One upstream's health, shared by every snapshot that names its address.
#[derive(Debug, Default)]
pub struct UpstreamHealth {
    /// Out of rotation until this time (Unix ms); 0 = in rotation.
    down_until_ms: AtomicI64,
    /// When the active check is next due (Unix ms).
    next_check_ms: AtomicI64,
}

/// What changed, for logging and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentDown,
    CameUp,
    Unchanged,
}

impl UpstreamHealth {
    #[inline]
    pub fn is_up(&self, now_ms: i64) -> bool {
        now_ms >= self.down_until_ms.load(Ordering::Relaxed)
    }

    /// A connect failed: out of rotation until the cooldown ends, or (with
    /// an active check) until a check passes.
    pub fn connect_failed(&self, now_ms: i64, actively_checked: bool) -> Transition {
        let until = if actively_checked {
            i64::MAX
        } else {
            now_ms.saturating_add(PASSIVE_COOLDOWN.as_millis() as i64)
        };
        let was_up = self.is_up(now_ms);
        self.down_until_ms.store(until, Ordering::Relaxed);
        if was_up {
            Transition::WentDown
        } else {
            Transition::Unchanged
        }
    }

    /// A connect succeeded. Reads before writing so the common case (it
    /// was up) does not bounce the cache line between serving threads.
    #[inline]
    pub fn connected(&self) -> Transition {
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
            Transition::CameUp
        } else {
            Transition::Unchanged
        }
    }

    /// Claims the active check due at `now_ms`, if one is: true at most once
    /// per `interval`, so routes sharing the upstream do not check it twice.
    pub fn check_due(&self, now_ms: i64, interval: Duration) -> bool {
        if now_ms < self.next_check_ms.load(Ordering::Relaxed) {
            return false;
        }
        let next = now_ms.saturating_add(i64::try_from(interval.as_millis()).unwrap_or(i64::MAX));
        self.next_check_ms.store(next, Ordering::Relaxed);
        true
    }

    /// The result of an active check.
    pub fn checked(&self, ok: bool, now_ms: i64) -> Transition {
        if ok {
            self.connected()
        } else {
            let was_up = self.is_up(now_ms);
            self.down_until_ms.store(i64::MAX, Ordering::Relaxed);
            if was_up {
                Transition::WentDown
            } else {
                Transition::Unchanged
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passive_failure_without_active_check_lasts_the_cooldown() {
        let h = UpstreamHealth::default();
        assert!(h.is_up(1000));
        assert_eq!(h.connect_failed(1000, false), Transition::WentDown);
        assert!(!h.is_up(1000 + 9_999));
        assert!(h.is_up(1000 + PASSIVE_COOLDOWN.as_millis() as i64));
        assert_eq!(h.connect_failed(2000, false), Transition::Unchanged);
        assert_eq!(h.connected(), Transition::CameUp);
        assert!(h.is_up(2000));
        assert_eq!(h.connected(), Transition::Unchanged);
    }

    #[test]
    fn with_an_active_check_it_stays_down_until_a_check_passes() {
        let h = UpstreamHealth::default();
        h.connect_failed(1000, true);
        assert!(!h.is_up(i64::MAX - 1));
        assert_eq!(h.checked(false, 5000), Transition::Unchanged);
        assert_eq!(h.checked(true, 6000), Transition::CameUp);
        assert!(h.is_up(6000));
        assert_eq!(h.checked(false, 7000), Transition::WentDown);
    }

    #[test]
    fn a_check_is_due_once_per_interval() {
        let h = UpstreamHealth::default();
        assert!(h.check_due(1000, Duration::from_secs(5)));
        assert!(!h.check_due(1001, Duration::from_secs(5)));
        assert!(h.check_due(6000, Duration::from_secs(5)));
    }
}
