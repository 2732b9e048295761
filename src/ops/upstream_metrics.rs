//! Metrics per upstream address: requests in flight and queued (read from
//! the upstreams' state when `/metrics` is scraped, so serving a request
//! pays nothing for them), tries answered, failed and retried, and the
//! time to each answer's head. Label values are addresses from the
//! config, so their number is bounded by it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::registry::{counter_vec, histogram_vec_by, registered};

/// One upstream's pre-resolved handles.
pub struct UpstreamMetrics {
    /// Tries whose answer went to the client.
    pub answered: IntCounter,
    /// Tries that failed: a failed connect, a broken or timed-out answer,
    /// or an answer status that was retried elsewhere.
    pub failed: IntCounter,
    /// Failed tries that went to another upstream.
    pub retried: IntCounter,
    /// From the request's arrival to the upstream's answer head.
    pub latency: Histogram,
}

impl std::fmt::Debug for UpstreamMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamMetrics").finish_non_exhaustive()
    }
}

/// The families, and the handles made so far by address.
pub(super) struct UpstreamFamilies {
    in_flight: IntGaugeVec,
    queued: IntGaugeVec,
    answered: IntCounterVec,
    failed: IntCounterVec,
    retried: IntCounterVec,
    latency: HistogramVec,
    /// Retries by route (`agw_upstream_retries_total`).
    pub(super) retries: IntCounterVec,
    made: Mutex<HashMap<SocketAddr, Arc<UpstreamMetrics>>>,
    /// Addresses whose gauges are exported, to drop those of upstreams no
    /// longer named.
    exported: Mutex<HashSet<String>>,
}

impl UpstreamFamilies {
    pub(super) fn new(r: &Registry) -> UpstreamFamilies {
        let gauges = |name: &str, help: &str| {
            registered(r, IntGaugeVec::new(Opts::new(name, help), &["upstream"]))
        };
        let by_upstream = |name: &str, help: &str| counter_vec(r, name, help, &["upstream"]);
        UpstreamFamilies {
            in_flight: gauges(
                "agw_upstream_in_flight",
                "Requests in flight to each upstream through this gateway.",
            ),
            queued: gauges(
                "agw_upstream_queued",
                "Requests queued that each upstream could serve (queues are per route).",
            ),
            answered: by_upstream(
                "agw_upstream_answered_total",
                "Tries whose answer went to the client, by upstream.",
            ),
            failed: by_upstream(
                "agw_upstream_failed_total",
                "Tries that failed (connect, broken answer, or a retried status), by upstream.",
            ),
            retried: by_upstream(
                "agw_upstream_retried_total",
                "Failed tries that went to another upstream, by upstream.",
            ),
            latency: histogram_vec_by(
                r,
                "agw_upstream_latency_seconds",
                "Time from a request's arrival to the answer head of the upstream that answered it.",
                "upstream",
            ),
            retries: counter_vec(
                r,
                "agw_upstream_retries_total",
                "Tries of requests sent to another upstream after a failure, by route.",
                &["route"],
            ),
            made: Mutex::default(),
            exported: Mutex::default(),
        }
    }

    /// The handles of `addr`, made on first use and shared after.
    pub(super) fn of(&self, addr: SocketAddr) -> Arc<UpstreamMetrics> {
        let mut made = self.made.lock().unwrap_or_else(PoisonError::into_inner);
        let label = addr.to_string();
        Arc::clone(made.entry(addr).or_insert_with(|| {
            Arc::new(UpstreamMetrics {
                answered: self.answered.with_label_values(&[&label]),
                failed: self.failed.with_label_values(&[&label]),
                retried: self.retried.with_label_values(&[&label]),
                latency: self.latency.with_label_values(&[&label]),
            })
        }))
    }

    /// Sets the gauges to each upstream's load now; drops those of
    /// upstreams not in `loads`.
    pub(super) fn set_loads(&self, loads: &[(SocketAddr, u32, u32)]) {
        let mut exported = self.exported.lock().unwrap_or_else(PoisonError::into_inner);
        let now: HashSet<String> = loads.iter().map(|(a, _, _)| a.to_string()).collect();
        for gone in exported.difference(&now) {
            let _ = self.in_flight.remove_label_values(&[gone]);
            let _ = self.queued.remove_label_values(&[gone]);
        }
        for (addr, in_flight, queued) in loads {
            let label = addr.to_string();
            self.in_flight
                .with_label_values(&[&label])
                .set(i64::from(*in_flight));
            self.queued
                .with_label_values(&[&label])
                .set(i64::from(*queued));
        }
        *exported = now;
    }
}
