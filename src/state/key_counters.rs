//! Per-key counters: a request rate (a window per period), requests in
//! flight, and a token budget (a window per period).
//!
//! Each key that a limit applies to has one [`KeyCounter`], kept here by
//! key id so a reload (a key added by `keygen`, say) hands every remaining
//! key the counter it had; a key gone from the file loses it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use super::alerts::AlertTarget;
use crate::config::{Alerting, Rate, TokenRate};
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
    /// The current token window: its start (whole seconds of the caller's
    /// monotonic clock, plus one, so that 0 means "none yet") in the high
    /// 32 bits, the tokens counted in it (saturating) in the low 32.
    tokens: AtomicU64,
    /// This instance's part of the key's counts kept in Redis, made on
    /// first use: only with `shared_state` set, so a gateway without it
    /// pays one pointer per key.
    shared: OnceLock<Box<SharedShare>>,
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
        Some(InFlightGuard {
            counter: Arc::clone(self),
            shared: false,
        })
    }

    /// This instance's part of the key's counts kept in Redis.
    #[inline]
    pub fn shared(&self) -> &SharedShare {
        self.shared.get_or_init(Box::default)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the key may start a request under its token `budget` at
    /// `now_ms` (monotonic milliseconds). `Err` carries how long until the
    /// window in which the budget was used up ends. A request is admitted
    /// while the budget is not used up: the one that crosses it completes.
    pub fn tokens_left(&self, budget: TokenRate, now_ms: u64) -> Result<(), Duration> {
        let now = secs(now_ms);
        let current = self.tokens.load(Ordering::Relaxed);
        let (start, used) = unpack_tokens(current);
        match start {
            Some(start) if !expired(start, now, budget) && used >= budget.count.get() => {
                let ends = u64::from(start) + budget.period.as_secs();
                Err(Duration::from_secs(
                    ends.saturating_sub(u64::from(now)).max(1),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Counts `n` tokens at `now_ms`: into the current window, or into a
    /// new one that starts now when there is none or it has ended. The
    /// step says what the window held before and after, in one atomic
    /// change, so each threshold is crossed by exactly one call.
    pub fn add_tokens(&self, budget: TokenRate, n: u64, now_ms: u64) -> TokenStep {
        let now = secs(now_ms);
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let mut current = self.tokens.load(Ordering::Relaxed);
        loop {
            let (start, used) = unpack_tokens(current);
            let (start, before) = match start {
                Some(start) if !expired(start, now, budget) => (start, used),
                _ => (now, 0),
            };
            let after = u32::try_from(before).unwrap_or(u32::MAX).saturating_add(n);
            match self.tokens.compare_exchange_weak(
                current,
                pack_tokens(start, after),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return TokenStep {
                        before,
                        after: u64::from(after),
                        window_end_ms: (u64::from(start) + budget.period.as_secs()) * 1000,
                    }
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Whether no request holds a slot of this counter (here or of the
    /// cluster's): it may be forgotten without losing a count in use.
    pub fn is_idle(&self) -> bool {
        self.in_flight() == 0
            && self
                .shared
                .get()
                .is_none_or(|s| s.slots.load(Ordering::Relaxed) & LOW32 == 0)
    }

    /// The rate window open at `now_ms` (for the status page): requests
    /// counted in it and how long until it ends; `None` when none is open.
    pub fn rate_window(&self, rate: Rate, now_ms: u64) -> Option<(u64, Duration)> {
        let period = u64::try_from(rate.period.as_millis()).unwrap_or(u64::MAX);
        let now = now_ms & (u64::MAX >> COUNT_BITS);
        let v = self.window.load(Ordering::Relaxed);
        let (start, count) = (v >> COUNT_BITS, v & COUNT_MASK);
        if count == 0 || now.saturating_sub(start) >= period {
            return None;
        }
        let left = start.saturating_add(period).saturating_sub(now);
        Some((count, Duration::from_millis(left)))
    }

    /// The token window open at `now_ms` (for the status page): tokens
    /// counted in it and how long until it ends; `None` when none is open.
    pub fn token_window(&self, budget: TokenRate, now_ms: u64) -> Option<(u64, Duration)> {
        let now = secs(now_ms);
        match unpack_tokens(self.tokens.load(Ordering::Relaxed)) {
            (Some(start), used) if !expired(start, now, budget) => {
                let ends = u64::from(start) + budget.period.as_secs();
                Some((
                    used,
                    Duration::from_secs(ends.saturating_sub(u64::from(now))),
                ))
            }
            _ => None,
        }
    }

    /// Tokens counted in the window that is current at `now_ms`.
    pub fn tokens_used(&self, budget: TokenRate, now_ms: u64) -> u64 {
        match unpack_tokens(self.tokens.load(Ordering::Relaxed)) {
            (Some(start), used) if !expired(start, secs(now_ms), budget) => used,
            _ => 0,
        }
    }
}

/// Whole seconds of a monotonic millisecond clock.
fn secs(now_ms: u64) -> u32 {
    u32::try_from(now_ms / 1000).unwrap_or(u32::MAX)
}

fn expired(start: u32, now: u32, budget: TokenRate) -> bool {
    u64::from(now.saturating_sub(start)) >= budget.period.as_secs()
}

fn pack_tokens(start: u32, used: u32) -> u64 {
    (u64::from(start.saturating_add(1)) << 32) | u64::from(used)
}

/// The window start (if a window was opened) and the tokens counted.
fn unpack_tokens(v: u64) -> (Option<u32>, u64) {
    let start = (v >> 32) as u32;
    (start.checked_sub(1), v & u64::from(u32::MAX))
}

/// What one count of tokens did to a window: the tokens it held before
/// and after, and when it ends (the caller's monotonic milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenStep {
    pub before: u64,
    pub after: u64,
    pub window_end_ms: u64,
}

/// What a request adds to its key's token budget when it ends.
#[derive(Debug, Clone)]
pub struct TokenMeter {
    counter: Arc<KeyCounter>,
    budget: TokenRate,
    /// Also count the tokens for Redis (sent by the cluster's sync task).
    shared: bool,
}

impl TokenMeter {
    pub fn new(counter: Arc<KeyCounter>, budget: TokenRate) -> Self {
        TokenMeter {
            counter,
            budget,
            shared: false,
        }
    }

    /// A meter whose tokens also go to the budget shared through Redis.
    pub fn shared(counter: Arc<KeyCounter>, budget: TokenRate) -> Self {
        TokenMeter {
            counter,
            budget,
            shared: true,
        }
    }

    /// Counts `n` tokens at `now_ms` (the monotonic clock of admission):
    /// into the local window (what a fallback to local counting uses),
    /// and, when shared, into what is still to be sent to Redis. The step
    /// is the local window's, for a meter that is not shared (a shared
    /// budget's steps are Redis's, seen by the sync task).
    pub fn add(&self, n: u64, now_ms: u64) -> Option<TokenStep> {
        let step = self.counter.add_tokens(self.budget, n, now_ms);
        if self.shared {
            self.counter.shared().add_unsent(n);
            return None;
        }
        Some(step)
    }

    /// The budget counted into.
    pub fn budget(&self) -> TokenRate {
        self.budget
    }

    /// For a shared budget: where the alerts of its crossings go (see
    /// [`SharedShare::note_alerts`]); nothing for a local one.
    pub fn note_alerts(
        &self,
        key_id: KeyId,
        alerting: &Alerting<'_>,
        user: &str,
        end_user: Option<&str>,
    ) {
        if self.shared {
            self.counter
                .shared()
                .note_alerts(key_id, alerting, user, end_user);
        }
    }

    pub fn used(&self, now_ms: u64) -> u64 {
        self.counter.tokens_used(self.budget, now_ms)
    }
}

/// One request in flight for a key: a local slot, or one of the slots
/// this instance holds of the key's cluster-wide ones.
#[derive(Debug)]
pub struct InFlightGuard {
    counter: Arc<KeyCounter>,
    shared: bool,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.shared {
            self.counter.shared().slots.fetch_sub(1, Ordering::AcqRel);
        } else {
            self.counter.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// This instance's part of a key's limits when they are counted in Redis.
///
/// Requests and concurrency slots are taken from Redis in leases, so a
/// request finds its share here and waits on Redis only when the lease is
/// spent: the fields below are what the lease holds. Only the `cluster`
/// layer changes them, apart from the atomics a request takes and gives
/// back.
#[derive(Debug, Default)]
pub struct SharedShare {
    /// Requests leased from the cluster's current rate window: the end of
    /// the lease (monotonic milliseconds, never later than Redis's window)
    /// in the high 40 bits, the requests left in the low 24.
    lease: AtomicU64,
    /// Concurrency slots: held of the cluster's (high 32 bits), in use
    /// here (low 32).
    slots: AtomicU64,
    /// The cluster's token count as last heard: the window's end (whole
    /// monotonic seconds, plus one, so that 0 means "not heard") in the
    /// high 32 bits, the tokens used (saturating) in the low 32.
    tokens_heard: AtomicU64,
    /// Tokens counted here and not yet added in Redis.
    tokens_unsent: AtomicU64,
    /// Held across this instance's Redis calls for the key, so that a
    /// lease is asked for once however many requests find it spent, and
    /// the sync task never writes a slot count an acquisition is changing.
    pub calls: tokio::sync::Mutex<()>,
    /// Who the budget's alerts are about, for the sync task (set by the
    /// requests, made anew only when the settings change).
    alert: arc_swap::ArcSwapOption<AlertTarget>,
}

const LOW32: u64 = u32::MAX as u64;

impl SharedShare {
    /// Takes one request from the lease, if it is current and not spent.
    #[inline]
    pub fn take_leased(&self, now_ms: u64) -> bool {
        let mut current = self.lease.load(Ordering::Relaxed);
        loop {
            let ends = current >> COUNT_BITS;
            let left = current & COUNT_MASK;
            if left == 0 || now_ms >= ends {
                return false;
            }
            match self.lease.compare_exchange_weak(
                current,
                current - 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// Replaces the lease: `left` requests usable until `ends_ms`.
    pub fn set_lease(&self, ends_ms: u64, left: u32) {
        let ends = ends_ms & (u64::MAX >> COUNT_BITS);
        let left = u64::from(left.min(MAX_RATE_COUNT));
        self.lease
            .store(ends << COUNT_BITS | left, Ordering::Relaxed);
    }

    /// A slot among the ones this instance holds, if one is free.
    #[inline]
    pub fn enter_held(counter: &Arc<KeyCounter>) -> Option<InFlightGuard> {
        let slots = &counter.shared().slots;
        let mut current = slots.load(Ordering::Relaxed);
        loop {
            let held = current >> 32;
            let used = current & LOW32;
            if used >= held {
                return None;
            }
            match slots.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(InFlightGuard {
                        counter: Arc::clone(counter),
                        shared: true,
                    })
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Adds `granted` slots just taken from the cluster, and uses one.
    pub fn hold_and_enter(counter: &Arc<KeyCounter>, granted: u32) -> InFlightGuard {
        counter
            .shared()
            .slots
            .fetch_add((u64::from(granted) << 32) | 1, Ordering::AcqRel);
        InFlightGuard {
            counter: Arc::clone(counter),
            shared: true,
        }
    }

    /// Gives up the held slots not in use; returns how many were given up
    /// and how many are still held.
    pub fn release_unused(&self) -> (u32, u32) {
        let mut current = self.slots.load(Ordering::Relaxed);
        loop {
            let held = current >> 32;
            let used = current & LOW32;
            if held <= used {
                return (0, u32::try_from(held).unwrap_or(u32::MAX));
            }
            match self.slots.compare_exchange_weak(
                current,
                used << 32 | used,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return (
                        u32::try_from(held - used).unwrap_or(u32::MAX),
                        u32::try_from(used).unwrap_or(u32::MAX),
                    )
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Slots held of the cluster's.
    pub fn held(&self) -> u32 {
        u32::try_from(self.slots.load(Ordering::Relaxed) >> 32).unwrap_or(u32::MAX)
    }

    /// Records the cluster's token count for the window ending at
    /// `ends_ms` (monotonic).
    pub fn hear_tokens(&self, used: u64, ends_ms: u64) {
        // Whole seconds, rounded down as a local window's start is: the
        // window may read as over up to a second before Redis's is.
        let ends = u32::try_from(ends_ms / 1000).unwrap_or(u32::MAX);
        let used = u32::try_from(used).unwrap_or(u32::MAX);
        self.tokens_heard
            .store(pack_tokens(ends, used), Ordering::Relaxed);
    }

    /// Forgets what was heard, so the next request asks Redis again.
    pub fn forget_tokens(&self) {
        self.tokens_heard.store(0, Ordering::Relaxed);
    }

    /// Tokens used in the cluster's window as last heard, and when that
    /// window ends; `None` when nothing was heard yet. A window that has
    /// ended reads as 0 used.
    pub fn tokens(&self, now_ms: u64) -> Option<(u64, u64)> {
        let (ends, used) = unpack_tokens(self.tokens_heard.load(Ordering::Relaxed));
        let ends = ends?;
        let ends_ms = u64::from(ends) * 1000;
        let unsent = self.tokens_unsent.load(Ordering::Relaxed);
        if now_ms >= ends_ms {
            return Some((unsent, ends_ms));
        }
        Some((used.saturating_add(unsent), ends_ms))
    }

    fn add_unsent(&self, n: u64) {
        self.tokens_unsent.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes every token not yet sent (the sync task sends them).
    pub fn take_unsent(&self) -> u64 {
        self.tokens_unsent.swap(0, Ordering::Relaxed)
    }

    /// Whether tokens wait to be sent.
    pub fn has_unsent(&self) -> bool {
        self.tokens_unsent.load(Ordering::Relaxed) > 0
    }

    /// Keeps the alert settings of the counter's budget, as a request
    /// found them: a load and a compare, a new target only when they
    /// changed (a reload).
    pub fn note_alerts(
        &self,
        key_id: KeyId,
        alerting: &Alerting<'_>,
        user: &str,
        end_user: Option<&str>,
    ) {
        let same = self
            .alert
            .load()
            .as_ref()
            .is_some_and(|t| t.is(alerting, user, end_user));
        if !same {
            let target = AlertTarget::new(key_id, alerting, user, end_user);
            self.alert.store(Some(Arc::new(target)));
        }
    }

    /// The alert settings last noted, if any.
    pub fn alert_target(&self) -> Option<Arc<AlertTarget>> {
        self.alert.load_full()
    }

    /// Puts back tokens a failed send could not deliver.
    pub fn keep_unsent(&self, n: u64) {
        self.add_unsent(n);
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
    fn a_token_budget_admits_until_used_up_then_waits_for_the_window() {
        let c = KeyCounter::default();
        let budget = TokenRate::parse("1k/min").unwrap();
        let t0 = 5 * SEC;
        assert!(c.tokens_left(budget, t0).is_ok(), "nothing used yet");
        c.add_tokens(budget, 600, t0);
        assert!(c.tokens_left(budget, t0 + SEC).is_ok());
        // The request that crosses the budget was admitted; it completes.
        c.add_tokens(budget, 600, t0 + 2 * SEC);
        assert_eq!(c.tokens_used(budget, t0 + 2 * SEC), 1_200);
        assert_eq!(
            c.tokens_left(budget, t0 + 10 * SEC).unwrap_err(),
            Duration::from_secs(50),
            "until the minute that began with the first tokens ends"
        );
        assert_eq!(
            c.tokens_left(budget, t0 + 59 * SEC + 999).unwrap_err(),
            Duration::from_secs(1)
        );
        assert!(c.tokens_left(budget, t0 + 60 * SEC).is_ok(), "a new window");
        c.add_tokens(budget, 10, t0 + 61 * SEC);
        assert_eq!(c.tokens_used(budget, t0 + 61 * SEC), 10, "counted afresh");
        assert_eq!(c.tokens_used(budget, t0 + 200 * SEC), 0);
    }

    #[test]
    fn token_counts_saturate_and_a_window_can_start_at_zero() {
        let c = KeyCounter::default();
        let budget = TokenRate::parse("4000M/day").unwrap();
        c.add_tokens(budget, u64::MAX, 0);
        c.add_tokens(budget, 5, 0);
        assert_eq!(c.tokens_used(budget, 0), u64::from(u32::MAX));
        assert!(c.tokens_left(budget, 0).is_err());
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
    fn a_lease_is_spent_locally_and_ends_with_its_window() {
        let share = SharedShare::default();
        assert!(!share.take_leased(0), "no lease yet");
        share.set_lease(10 * SEC, 3);
        for _ in 0..3 {
            assert!(share.take_leased(SEC));
        }
        assert!(!share.take_leased(SEC), "spent");
        share.set_lease(10 * SEC, 5);
        assert!(!share.take_leased(10 * SEC), "over at its end");
    }

    #[test]
    fn held_slots_are_used_then_the_unused_given_back() {
        let c = Arc::new(KeyCounter::default());
        assert!(SharedShare::enter_held(&c).is_none(), "none held");
        let a = SharedShare::hold_and_enter(&c, 3);
        let b = SharedShare::enter_held(&c).unwrap();
        assert_eq!(c.shared().held(), 3);
        drop(a);
        assert_eq!(c.shared().release_unused(), (2, 1), "one still in use");
        assert!(SharedShare::enter_held(&c).is_none(), "nothing spare");
        drop(b);
        assert_eq!(c.shared().release_unused(), (1, 0));
        assert_eq!(c.shared().release_unused(), (0, 0));
        assert_eq!(c.in_flight(), 0, "local slots untouched");
    }

    #[test]
    fn shared_tokens_add_what_is_unsent_to_what_was_heard() {
        let c = Arc::new(KeyCounter::default());
        let budget = TokenRate::parse("1k/min").unwrap();
        assert_eq!(c.shared().tokens(0), None, "nothing heard");
        c.shared().hear_tokens(900, 61 * SEC + 999);
        let meter = TokenMeter::shared(Arc::clone(&c), budget);
        meter.add(150, SEC);
        assert_eq!(c.shared().tokens(SEC), Some((1_050, 61 * SEC)));
        assert_eq!(c.tokens_used(budget, SEC), 150, "counted locally too");
        assert_eq!(c.shared().take_unsent(), 150);
        assert_eq!(c.shared().tokens(SEC), Some((900, 61 * SEC)));
        c.shared().keep_unsent(150);
        assert!(c.shared().has_unsent());
        assert_eq!(
            c.shared().tokens(61 * SEC),
            Some((150, 61 * SEC)),
            "an ended window counts only what is unsent"
        );
        c.shared().forget_tokens();
        assert_eq!(c.shared().tokens(SEC), None);
    }

    #[test]
    fn a_key_without_shared_state_pays_one_pointer_for_it() {
        // 24 bytes of local counters (padded) and the lazily made share:
        // a million limited keys must not cost the cluster's state.
        assert!(std::mem::size_of::<KeyCounter>() <= 40);
        let c = KeyCounter::default();
        assert!(c.shared.get().is_none());
        let _ = c.shared();
        assert!(c.shared.get().is_some(), "made on first use");
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
