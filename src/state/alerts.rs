//! Budget alerts between the request that crosses a threshold and the
//! daemon's task that posts them: which thresholds a count of tokens
//! crossed, the alert, and the bounded queue.
//!
//! Exactly once per key (or end user), window and threshold comes from
//! where the crossing is seen: the one atomic change of a counter's
//! window that carries it past the threshold ([`crate::state::TokenStep`]),
//! here, or the one `INCRBY` in Redis that does, with `shared_state`.
//! Counters outlive snapshots, so a reload neither repeats nor loses one.
//! The hot path only pushes, and only when a threshold was crossed; a
//! full queue drops the alert (counted by the caller).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{Alerting, Webhook};
use crate::keys::KeyId;

/// Alerts waiting to be posted, at most.
pub const ALERT_QUEUE: usize = 256;

/// One alert: where it goes and what it says.
#[derive(Debug)]
pub struct Alert {
    pub webhook: Arc<Webhook>,
    /// The bound on each attempt to post it.
    pub timeout: Duration,
    pub body: AlertBody,
}

/// The JSON posted.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlertBody {
    pub key_id: String,
    pub user: String,
    /// The end user, for an end user's budget; `null` for the key's.
    pub end_user: Option<String>,
    /// The budget: tokens per window.
    pub limit: u64,
    /// Tokens used in the window, counting the request that crossed.
    pub used: u64,
    pub threshold: f64,
    /// When the window ends (RFC 3339, UTC).
    pub window_end: String,
}

/// A count of tokens that may have crossed thresholds of a budget.
#[derive(Debug, Clone, Copy)]
pub struct Crossing<'a> {
    pub key_id: KeyId,
    pub user: &'a str,
    pub end_user: Option<&'a str>,
    pub limit: u64,
    pub before: u64,
    pub after: u64,
    /// The window's end, in Unix milliseconds.
    pub window_end_unix_ms: i64,
}

/// The thresholds of `at` that going from `before` to `after` tokens of
/// `limit` crossed: those whose share of the budget (rounded up to a
/// whole token) is above `before` and at most `after`.
pub fn crossed(at: &[f64], limit: u64, before: u64, after: u64) -> impl Iterator<Item = f64> + '_ {
    at.iter().copied().filter(move |t| {
        let mark = (t * limit as f64).ceil() as u64;
        before < mark && mark <= after
    })
}

/// The queue between the request path and the task that posts.
#[derive(Debug)]
pub struct AlertQueue {
    tx: mpsc::Sender<Alert>,
    rx: Mutex<Option<mpsc::Receiver<Alert>>>,
}

impl Default for AlertQueue {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(ALERT_QUEUE);
        AlertQueue {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl AlertQueue {
    /// Queues an alert for each threshold `c` crossed; returns how many
    /// found the queue full (dropped). Costs nothing when none was
    /// crossed.
    pub fn crossed(&self, alerting: &Alerting<'_>, c: &Crossing<'_>) -> u64 {
        let mut dropped = 0;
        for threshold in crossed(alerting.at, c.limit, c.before, c.after) {
            let alert = Alert {
                webhook: Arc::clone(alerting.webhook),
                timeout: alerting.timeout,
                body: AlertBody {
                    key_id: c.key_id.to_string(),
                    user: c.user.to_string(),
                    end_user: c.end_user.map(str::to_string),
                    limit: c.limit,
                    used: c.after,
                    threshold,
                    window_end: rfc3339(c.window_end_unix_ms),
                },
            };
            if self.tx.try_send(alert).is_err() {
                dropped += 1;
            }
        }
        dropped
    }

    /// The receiving end, for the one task that posts (`None` after the
    /// first call).
    pub fn take_receiver(&self) -> Option<mpsc::Receiver<Alert>> {
        self.rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// Unix milliseconds as RFC 3339 in UTC, to the second.
fn rfc3339(unix_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Who a shared counter's alerts are about and where they go: kept
/// beside the counter's share of the cluster, for the sync task, which
/// sees the crossings in Redis's totals but not the requests.
#[derive(Debug, PartialEq)]
pub struct AlertTarget {
    pub key_id: KeyId,
    pub user: Box<str>,
    pub end_user: Option<Box<str>>,
    pub webhook: Arc<Webhook>,
    pub at: Box<[f64]>,
    pub timeout: Duration,
}

impl AlertTarget {
    /// Whether this target says the same as `alerting` for these names
    /// (a reload that changed the settings makes a new one).
    pub fn is(&self, alerting: &Alerting<'_>, user: &str, end_user: Option<&str>) -> bool {
        Arc::ptr_eq(&self.webhook, alerting.webhook)
            && *self.at == *alerting.at
            && self.timeout == alerting.timeout
            && *self.user == *user
            && self.end_user.as_deref() == end_user
    }

    pub fn new(key_id: KeyId, alerting: &Alerting<'_>, user: &str, end_user: Option<&str>) -> Self {
        AlertTarget {
            key_id,
            user: user.into(),
            end_user: end_user.map(Into::into),
            webhook: Arc::clone(alerting.webhook),
            at: alerting.at.into(),
            timeout: alerting.timeout,
        }
    }

    /// The settings it was made from.
    pub fn alerting(&self) -> Alerting<'_> {
        Alerting {
            webhook: &self.webhook,
            at: &self.at,
            timeout: self.timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_is_crossed_once_by_the_count_that_reaches_it() {
        let at = [0.8, 1.0];
        let all = |b, a| crossed(&at, 20, b, a).collect::<Vec<_>>();
        assert_eq!(all(0, 15), Vec::<f64>::new());
        assert_eq!(all(15, 16), [0.8]);
        assert_eq!(all(16, 30), [1.0]);
        assert_eq!(all(0, 30), [0.8, 1.0], "one count may cross both");
        assert_eq!(all(20, 40), Vec::<f64>::new(), "already past");
        // 0.8 of 7 is 5.6: the sixth token crosses it.
        assert_eq!(crossed(&at, 7, 5, 6).collect::<Vec<_>>(), [0.8]);
    }

    #[test]
    fn a_full_queue_drops_and_says_so() {
        let q = AlertQueue::default();
        let hook = Arc::new(Webhook::parse("http://127.0.0.1:9/").unwrap());
        let alerting = Alerting {
            webhook: &hook,
            at: &[0.5, 1.0],
            timeout: Duration::from_secs(1),
        };
        let c = Crossing {
            key_id: crate::keys::KeyDigest::of(b"k").id(),
            user: "ann",
            end_user: Some("u-1"),
            limit: 10,
            before: 0,
            after: 10,
            window_end_unix_ms: 1_800_000_000_000,
        };
        let mut dropped = 0;
        for _ in 0..ALERT_QUEUE {
            dropped += q.crossed(&alerting, &c);
        }
        assert_eq!(
            dropped, ALERT_QUEUE as u64,
            "half of the 2 x {ALERT_QUEUE} fit"
        );
        let mut rx = q.take_receiver().unwrap();
        let first = rx.try_recv().unwrap();
        assert_eq!(first.body.window_end, "2027-01-15T08:00:00Z");
        assert_eq!(first.body.end_user.as_deref(), Some("u-1"));
        assert_eq!((first.body.threshold, first.body.used), (0.5, 10));
        assert!(q.take_receiver().is_none());
    }
}
