//! What the status page charts: requests, refusals by reason and tokens
//! per key and user in 5-minute buckets over the last 24 hours and daily
//! over the last 30 days, and per route and upstream answers, errors and
//! latency over the last hour.
//!
//! Fed by the audit writer, one record at a time, on its own thread: the
//! serving threads never touch it. The page takes a lock for as long as
//! it copies out what it draws ([`History::view`]). Memory is bounded:
//! buckets older than their window are dropped as time moves on, at most
//! [`MAX_SERIES`] key series and [`MAX_UPSTREAMS`] upstream series are
//! kept (past that, new ones count under [`OTHER`]), and refusal reasons
//! are interned in a table of at most [`MAX_REASONS`] words.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

/// Seconds per fine bucket.
pub const FINE_S: u64 = 300;
/// Fine buckets kept: 24 hours.
pub const FINE_BUCKETS: u64 = 288;
/// Days kept.
pub const DAYS: u64 = 30;
/// Seconds per day.
pub const DAY_S: u64 = 86_400;
/// Fine buckets of upstream latency kept: one hour.
pub const LATENCY_BUCKETS: u64 = 12;
/// Key series (key id and user) kept at once.
pub const MAX_SERIES: usize = 4096;
/// Route and upstream series kept at once.
pub const MAX_UPSTREAMS: usize = 512;
/// Distinct refusal words kept.
pub const MAX_REASONS: usize = 64;
/// The name counted under once a table is full.
pub const OTHER: &str = "(other)";
/// The key or user of a request that had none (no key, no route).
pub const NONE: &str = "-";

/// Latency histogram bounds, in microseconds: 100 µs to ~10 min, each
/// 25% above the one before, so a percentile is off by at most 25%.
const LATENCY_SLOTS: usize = 72;

/// One request as the history counts it.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    /// Unix seconds.
    pub ts_s: u64,
    pub key_id: Option<&'a str>,
    pub user: Option<&'a str>,
    /// `accepted`, or the refusal's audit word.
    pub decision: &'a str,
    pub status: u16,
    pub route: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub latency_us: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Counts of one bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Refused requests by reason (index into the reason table).
    pub refused: Vec<(u16, u64)>,
}

impl Counts {
    fn add(&mut self, s: &Seen<'_>, reason: Option<u16>) {
        self.requests += 1;
        self.prompt_tokens = self.prompt_tokens.saturating_add(s.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(s.completion_tokens);
        if let Some(r) = reason {
            match self.refused.iter_mut().find(|(i, _)| *i == r) {
                Some((_, n)) => *n += 1,
                None => self.refused.push((r, 1)),
            }
        }
    }

    fn merge(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        for (r, n) in &o.refused {
            match self.refused.iter_mut().find(|(i, _)| i == r) {
                Some((_, m)) => *m += n,
                None => self.refused.push((*r, *n)),
            }
        }
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.iter().map(|(_, n)| n).sum()
    }
}

#[derive(Debug, Default)]
struct Series {
    fine: BTreeMap<u64, Counts>,
    daily: BTreeMap<u64, Counts>,
    last_seen_s: u64,
}

/// One route and upstream's answers in one fine bucket.
#[derive(Debug, Clone)]
struct Latency {
    answers: u64,
    errors: u64,
    slots: [u32; LATENCY_SLOTS],
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            answers: 0,
            errors: 0,
            slots: [0; LATENCY_SLOTS],
        }
    }
}

fn slot_of(us: u64) -> usize {
    let mut bound = 100.0_f64;
    let mut i = 0;
    // `us` as f64 is exact enough for a bucket choice.
    #[allow(clippy::cast_precision_loss)]
    let us = us as f64;
    while i + 1 < LATENCY_SLOTS && us > bound {
        bound *= 1.25;
        i += 1;
    }
    i
}

/// The upper bound of a latency slot, in milliseconds.
fn slot_ms(i: usize) -> f64 {
    let exp = i32::try_from(i).unwrap_or(i32::MAX);
    0.1 * 1.25_f64.powi(exp)
}

#[derive(Debug, Default)]
struct Inner {
    series: HashMap<(String, String), Series>,
    upstreams: HashMap<(String, String), BTreeMap<u64, Latency>>,
    reasons: Vec<String>,
    /// The newest fine bucket seen: when it moves on, old buckets go.
    newest_fine: u64,
}

/// The history store (see the module doc).
#[derive(Debug, Default)]
pub struct History {
    inner: Mutex<Inner>,
}

/// One key series as the page shows it.
#[derive(Debug, Clone)]
pub struct SeriesView {
    pub key_id: String,
    pub user: String,
    /// The last 24 hours, oldest first, one entry per fine bucket.
    pub fine: Vec<Counts>,
    /// The last 30 days, oldest first.
    pub daily: Vec<Counts>,
    pub day: Counts,
    pub month: Counts,
    pub last_seen_s: u64,
}

/// One route and upstream over the last hour.
#[derive(Debug, Clone)]
pub struct UpstreamView {
    pub route: String,
    pub upstream: String,
    pub answers: u64,
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A copy of what the page draws, taken at `now_s`.
#[derive(Debug, Clone, Default)]
pub struct HistoryView {
    pub now_s: u64,
    /// Unix seconds of the first fine bucket and of the first day.
    pub fine_start_s: u64,
    pub day_start_s: u64,
    pub series: Vec<SeriesView>,
    pub upstreams: Vec<UpstreamView>,
    pub reasons: Vec<String>,
}

impl History {
    /// Counts one request.
    pub fn add(&self, s: &Seen<'_>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.add(s);
    }

    /// Counts many requests under one lock (the rebuild at start).
    pub fn add_all<'a>(&self, seen: impl IntoIterator<Item = Seen<'a>>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        for s in seen {
            inner.add(&s);
        }
    }

    /// The buckets of the last 24 hours and 30 days before `now_s`, and
    /// the last hour of every upstream.
    pub fn view(&self, now_s: u64) -> HistoryView {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.view(now_s)
    }
}

impl Inner {
    fn reason(&mut self, word: &str) -> u16 {
        if let Some(i) = self.reasons.iter().position(|r| r == word) {
            return u16::try_from(i).unwrap_or(0);
        }
        if self.reasons.len() >= MAX_REASONS {
            return self.reason_other();
        }
        self.reasons.push(word.to_string());
        u16::try_from(self.reasons.len() - 1).unwrap_or(0)
    }

    fn reason_other(&mut self) -> u16 {
        match self.reasons.iter().position(|r| r == OTHER) {
            Some(i) => u16::try_from(i).unwrap_or(0),
            None => {
                // The last slot is kept for OTHER.
                self.reasons.truncate(MAX_REASONS - 1);
                self.reasons.push(OTHER.to_string());
                u16::try_from(self.reasons.len() - 1).unwrap_or(0)
            }
        }
    }

    fn add(&mut self, s: &Seen<'_>) {
        let fine = s.ts_s / FINE_S;
        if fine > self.newest_fine {
            self.newest_fine = fine;
            self.prune(fine);
        }
        let oldest_day = (self.newest_fine * FINE_S / DAY_S).saturating_sub(DAYS - 1);
        if s.ts_s / DAY_S < oldest_day {
            return;
        }
        let reason = (s.decision != "accepted").then(|| self.reason(s.decision));
        let mut name = (
            s.key_id.unwrap_or(NONE).to_string(),
            s.user.unwrap_or(NONE).to_string(),
        );
        if !self.series.contains_key(&name) && self.series.len() >= MAX_SERIES {
            name = (OTHER.to_string(), OTHER.to_string());
        }
        let series = self.series.entry(name).or_default();
        series.last_seen_s = series.last_seen_s.max(s.ts_s);
        if fine + FINE_BUCKETS > self.newest_fine {
            series.fine.entry(fine).or_default().add(s, reason);
        }
        series
            .daily
            .entry(s.ts_s / DAY_S)
            .or_default()
            .add(s, reason);

        let (Some(route), Some(upstream)) = (s.route, s.upstream) else {
            return;
        };
        if fine + LATENCY_BUCKETS <= self.newest_fine {
            return;
        }
        let mut name = (route.to_string(), upstream.to_string());
        if !self.upstreams.contains_key(&name) && self.upstreams.len() >= MAX_UPSTREAMS {
            name = (OTHER.to_string(), OTHER.to_string());
        }
        let l = self
            .upstreams
            .entry(name)
            .or_default()
            .entry(fine)
            .or_default();
        l.answers += 1;
        if s.status >= 500 {
            l.errors += 1;
        }
        if let Some(slot) = l.slots.get_mut(slot_of(s.latency_us)) {
            *slot = slot.saturating_add(1);
        }
    }

    /// Drops what is older than the windows ending at fine bucket `now`.
    fn prune(&mut self, now: u64) {
        let fine_from = now.saturating_sub(FINE_BUCKETS - 1);
        let day_from = (now * FINE_S / DAY_S).saturating_sub(DAYS - 1);
        let lat_from = now.saturating_sub(LATENCY_BUCKETS - 1);
        self.series.retain(|_, s| {
            s.fine = s.fine.split_off(&fine_from);
            s.daily = s.daily.split_off(&day_from);
            !s.daily.is_empty()
        });
        self.upstreams.retain(|_, b| {
            *b = b.split_off(&lat_from);
            !b.is_empty()
        });
    }

    fn view(&self, now_s: u64) -> HistoryView {
        let now_fine = now_s / FINE_S;
        let fine_from = now_fine.saturating_sub(FINE_BUCKETS - 1);
        let now_day = now_s / DAY_S;
        let day_from = now_day.saturating_sub(DAYS - 1);
        let series = self
            .series
            .iter()
            .map(|((key_id, user), s)| {
                let fine: Vec<Counts> = (fine_from..=now_fine)
                    .map(|b| s.fine.get(&b).cloned().unwrap_or_default())
                    .collect();
                let daily: Vec<Counts> = (day_from..=now_day)
                    .map(|d| s.daily.get(&d).cloned().unwrap_or_default())
                    .collect();
                let mut day = Counts::default();
                fine.iter().for_each(|c| day.merge(c));
                let mut month = Counts::default();
                daily.iter().for_each(|c| month.merge(c));
                SeriesView {
                    key_id: key_id.clone(),
                    user: user.clone(),
                    fine,
                    daily,
                    day,
                    month,
                    last_seen_s: s.last_seen_s,
                }
            })
            .filter(|s| s.month.requests > 0)
            .collect();
        let lat_from = now_fine.saturating_sub(LATENCY_BUCKETS - 1);
        let upstreams = self
            .upstreams
            .iter()
            .map(|((route, upstream), buckets)| {
                let mut sum = Latency::default();
                for (_, l) in buckets.range(lat_from..=now_fine) {
                    sum.answers += l.answers;
                    sum.errors += l.errors;
                    for (a, b) in sum.slots.iter_mut().zip(l.slots.iter()) {
                        *a = a.saturating_add(*b);
                    }
                }
                UpstreamView {
                    route: route.clone(),
                    upstream: upstream.clone(),
                    answers: sum.answers,
                    errors: sum.errors,
                    p50_ms: percentile(&sum.slots, 50),
                    p99_ms: percentile(&sum.slots, 99),
                }
            })
            .filter(|u| u.answers > 0)
            .collect();
        HistoryView {
            now_s,
            fine_start_s: fine_from * FINE_S,
            day_start_s: day_from * DAY_S,
            series,
            upstreams,
            reasons: self.reasons.clone(),
        }
    }
}

/// The upper bound (ms) of the slot holding the `pct`th percentile.
fn percentile(slots: &[u32], pct: u64) -> Option<f64> {
    let total: u64 = slots.iter().map(|&n| u64::from(n)).sum();
    if total == 0 {
        return None;
    }
    let rank = (total * pct).div_ceil(100).max(1);
    let mut seen = 0;
    for (i, &n) in slots.iter().enumerate() {
        seen += u64::from(n);
        if seen >= rank {
            return Some(slot_ms(i));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(ts_s: u64, key: &'static str, decision: &'static str) -> Seen<'static> {
        Seen {
            ts_s,
            key_id: Some(key),
            user: Some("ann"),
            decision,
            status: if decision == "accepted" { 200 } else { 429 },
            route: Some("chat"),
            upstream: Some("127.0.0.1:1"),
            latency_us: 2_000,
            prompt_tokens: 3,
            completion_tokens: 4,
        }
    }

    #[test]
    fn counts_land_in_their_buckets_and_age_out() {
        let h = History::default();
        let t0 = 1_800_000_000;
        h.add(&seen(t0, "k1", "accepted"));
        h.add(&seen(t0 + 10, "k1", "rate_limited"));
        h.add(&seen(t0 + 10, "k2", "accepted"));
        let v = h.view(t0 + 20);
        assert_eq!(v.series.len(), 2);
        let k1 = v.series.iter().find(|s| s.key_id == "k1").unwrap();
        assert_eq!(k1.fine.len(), FINE_BUCKETS as usize);
        assert_eq!(k1.daily.len(), DAYS as usize);
        assert_eq!(k1.day.requests, 2);
        assert_eq!(k1.day.prompt_tokens, 6);
        assert_eq!(k1.day.refused_total(), 1);
        assert_eq!(v.reasons[usize::from(k1.day.refused[0].0)], "rate_limited");
        assert_eq!(k1.fine.last().unwrap().requests, 2);
        let u = &v.upstreams[0];
        assert_eq!((u.answers, u.errors), (3, 0));
        assert!(u.p50_ms.unwrap() >= 2.0 && u.p50_ms.unwrap() < 2.5);
        // A day later: out of the 24 hours, still in the 30 days.
        h.add(&seen(t0 + DAY_S + 600, "k2", "accepted"));
        let v = h.view(t0 + DAY_S + 600);
        let k1 = v.series.iter().find(|s| s.key_id == "k1").unwrap();
        assert_eq!(k1.day.requests, 0);
        assert_eq!(k1.month.requests, 2);
        assert_eq!(v.upstreams.len(), 1, "the old hour is gone");
        // 31 days later: gone.
        h.add(&seen(t0 + 31 * DAY_S, "k3", "accepted"));
        let v = h.view(t0 + 31 * DAY_S);
        assert!(v.series.iter().all(|s| s.key_id == "k3"), "{:?}", v.series);
    }

    #[test]
    fn series_are_bounded() {
        let h = History::default();
        let t0 = 1_800_000_000;
        let names: Vec<String> = (0..MAX_SERIES + 10).map(|i| format!("k{i}")).collect();
        h.add_all(names.iter().map(|k| Seen {
            key_id: Some(k),
            ..seen(t0, "x", "accepted")
        }));
        let v = h.view(t0);
        assert_eq!(v.series.len(), MAX_SERIES + 1);
        let other = v.series.iter().find(|s| s.key_id == OTHER).unwrap();
        assert_eq!(other.day.requests, 10);
    }

    #[test]
    fn percentiles() {
        let mut slots = [0u32; LATENCY_SLOTS];
        slots[slot_of(1_000)] = 98;
        slots[slot_of(1_000_000)] = 2;
        let p50 = percentile(&slots, 50).unwrap();
        let p99 = percentile(&slots, 99).unwrap();
        assert!((1.0..1.25).contains(&p50), "{p50}");
        assert!((1000.0..1250.0).contains(&p99), "{p99}");
        assert_eq!(percentile(&[0; 4], 50), None);
    }
}
