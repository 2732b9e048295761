//! Per-key request counters: a rate (a window per period) and requests in
//! flight.
//!
//! Each key that a limit applies to has one [`KeyCounter`], kept here by
//! key id so a reload (a key added by `keygen`, say) hands every remaining
//! key the counter it had; a key gone from the file loses it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::Rate;
use crate::keys::KeyId;

/// One key's counters. Lock-free: a request makes one compare-and-swap on
/// the rate and one atomic add on the concurrency.
#[derive(Debug, Default)]
pub struct KeyCounter {
    /// The current rate window: its start (milliseconds of the caller's
    /// monotonic clock) in the high 40 bits, the requests counted in it in
    /// the low 24, so one compare-and-swap updates both.
    window: AtomicU64,
    in_flight: AtomicU32,
}

/// Bits of [`KeyCounter::window`] that hold the count.
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// The largest rate count a window can hold.
pub const MAX_RATE_COUNT: u32 = (1 << COUNT_BITS) - 1;

impl KeyCounter {
    /// Takes one request from the key's `rate` at `now_ms` (a monotonic
    /// clock in milliseconds). `Err` carries how long until the window
    /// ends and requests are allowed again.
    ///
    /// `N/period`: the first request opens a window of one period, in which
    /// at most N requests pass; the next request after it opens the next
    /// window. So N can come at once, and never more than N in a window.
    pub fn take(&self, rate: Rate, now_ms: u64) -> Result<(), Duration> {
        let period = u64::try_from(rate.period.as_millis()).unwrap_or(u64::MAX);
        let max = u64::from(rate.count.get().min(MAX_RATE_COUNT));
        let now = now_ms & (u64::MAX >> COUNT_BITS);
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let start = current >> COUNT_BITS;
            let count = current & COUNT_MASK;
            let next = if count == 0 || now.saturating_sub(start) >= period {
                now << COUNT_BITS | 1
            } else if count < max {
                current + 1
            } else {
                let ends = start.saturating_add(period);
                return Err(Duration::from_millis(ends.saturating_sub(now).max(1)));
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    /// Counts a request in flight if fewer than `max` are; the guard
    /// uncounts it when dropped (at the end of the response, or when the
    /// client goes away).
    pub fn enter(self: &Arc<Self>, max: u32) -> Option<InFlightGuard> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InFlightGuard(Arc::clone(self)))
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// One request in flight for a key.
#[derive(Debug)]
pub struct InFlightGuard(Arc<KeyCounter>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every limited key's counter, by key id. Only snapshot builds and
/// reloads take the lock.
#[derive(Debug, Default)]
pub struct KeyCounters {
    entries: Mutex<HashMap<KeyId, Arc<KeyCounter>>>,
}

impl KeyCounters {
    /// The counters for exactly `ids` (a new key set), in the order given:
    /// the one already known for an id, or a new one. Keys not among `ids`
    /// are forgotten; requests still in flight keep theirs until they end.
    pub fn handles(&self, ids: impl Iterator<Item = KeyId>) -> Vec<Arc<KeyCounter>> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = HashMap::with_capacity(entries.len());
        let handles = ids
            .map(|id| {
                let c = entries.remove(&id).unwrap_or_default();
                next.insert(id, Arc::clone(&c));
                c
            })
            .collect();
        *entries = next;
        handles
    }

    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000;

    #[test]
    fn the_budget_at_once_then_nothing_until_the_window_ends() {
        let c = KeyCounter::default();
        let rate = Rate::parse("5/s").unwrap();
        let t0 = 10 * SEC;
        for _ in 0..5 {
            assert!(c.take(rate, t0).is_ok());
        }
        assert_eq!(c.take(rate, t0).unwrap_err(), Duration::from_secs(1));
        assert_eq!(
            c.take(rate, t0 + 600).unwrap_err(),
            Duration::from_millis(400)
        );
        // The window is over: the whole budget is back.
        for _ in 0..5 {
            assert!(c.take(rate, t0 + SEC).is_ok());
        }
        assert!(c.take(rate, t0 + SEC).is_err());
    }

    #[test]
    fn never_more_than_the_budget_in_a_period() {
        let c = KeyCounter::default();
        let rate = Rate::parse("10/min").unwrap();
        let mut admitted = Vec::new();
        for i in 0..600u64 {
            let now = 1 + i * SEC / 2;
            if c.take(rate, now).is_ok() {
                admitted.push(now);
            }
        }
        for (i, t) in admitted.iter().enumerate() {
            let in_window = admitted[i..].iter().filter(|u| **u < t + 60 * SEC).count();
            assert!(in_window <= 10, "{in_window} in the minute from {t}");
        }
    }

    #[test]
    fn concurrency_slots_come_back_when_guards_drop() {
        let c = Arc::new(KeyCounter::default());
        let a = c.enter(2).unwrap();
        let b = c.enter(2).unwrap();
        assert!(c.enter(2).is_none());
        drop(a);
        let _c = c.enter(2).unwrap();
        drop(b);
        assert_eq!(c.in_flight(), 1);
    }

    #[test]
    fn counters_carry_over_by_id_and_are_dropped_with_their_key() {
        let book = KeyCounters::default();
        let id = crate::keys::KeyDigest::of(b"k").id();
        let other = crate::keys::KeyDigest::of(b"other").id();
        let first = book.handles([id, other].into_iter());
        let again = book.handles([id].into_iter());
        assert!(Arc::ptr_eq(&first[0], &again[0]));
        assert_eq!(book.len(), 1, "the key no longer listed is forgotten");
        let back = book.handles([id, other].into_iter());
        assert!(
            !Arc::ptr_eq(&first[1], &back[1]),
            "a key added again starts afresh"
        );
    }
}
