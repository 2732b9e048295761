//! Building metrics into a registry: the helpers every metric family of
//! this layer is made with, and the latency buckets they share.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Latency buckets in seconds: from a cached answer to a long generation.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Registers a metric built from a static definition (which cannot fail
/// but for a programming error, caught by the unit tests) and returns it.
pub(super) fn registered<M>(registry: &Registry, metric: prometheus::Result<M>) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let m = metric.expect("static metric definition");
    registry
        .register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

pub(super) fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> IntCounterVec {
    registered(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

pub(super) fn histogram_vec(registry: &Registry, name: &str, help: &str) -> HistogramVec {
    histogram_vec_by(registry, name, help, "route")
}

/// A latency histogram family with one label.
pub(super) fn histogram_vec_by(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> HistogramVec {
    registered(
        registry,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
            &[label],
        ),
    )
}

pub(super) fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    registered(registry, IntGauge::new(name, help))
}

pub(super) fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    registered(registry, IntCounter::new(name, help))
}
