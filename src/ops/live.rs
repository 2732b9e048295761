//! The value the proxy serves from: a policy snapshot with the metric
//! handles of its routes resolved once, so recording a request touches only
//! atomics and the hot path makes a single `ArcSwap` load for both.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::metrics::{Metrics, RouteMetrics, NO_ROUTE};
use super::upstream_metrics::UpstreamMetrics;
use crate::policy::Snapshot;

/// The snapshot in service, shared by the proxy, the reloader, the health
/// checker and the admin endpoints; replaced whole on every reload.
pub type SharedLive = Arc<ArcSwap<Live>>;

/// A snapshot and its routes' metric handles.
#[derive(Debug)]
pub struct Live {
    pub snapshot: Snapshot,
    /// Per route, in the router's order.
    route_metrics: Box<[Arc<RouteMetrics>]>,
    /// For requests that matched no route.
    unrouted_metrics: Arc<RouteMetrics>,
    /// Per route, per upstream (in the route's order).
    upstream_metrics: Box<[Box<[Arc<UpstreamMetrics>]>]>,
}

impl Live {
    /// Resolves the snapshot's metric handles and publishes its gauges.
    pub fn new(snapshot: Snapshot, metrics: &Metrics) -> Live {
        let route_metrics = snapshot
            .router
            .routes()
            .iter()
            .map(|r| metrics.route(&r.name))
            .collect();
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        metrics.keys_loaded.set(gauge(snapshot.keys.len()));
        metrics.routes_loaded.set(gauge(snapshot.router.len()));
        metrics
            .generation
            .set(i64::try_from(snapshot.generation).unwrap_or(i64::MAX));
        metrics.set_named_models(
            snapshot
                .router
                .routes()
                .iter()
                .flat_map(|r| r.named_models())
                .chain(snapshot.keys.named_models()),
        );
        let upstream_metrics = snapshot
            .router
            .routes()
            .iter()
            .map(|r| {
                r.upstreams()
                    .iter()
                    .map(|u| metrics.upstream(u.addr))
                    .collect()
            })
            .collect();
        Live {
            upstream_metrics,
            snapshot,
            route_metrics,
            unrouted_metrics: metrics.route(NO_ROUTE),
        }
    }

    /// The metric handles for a route index, or for unrouted requests.
    #[inline]
    pub fn metrics_for(&self, route_index: Option<usize>) -> &RouteMetrics {
        route_index
            .and_then(|i| self.route_metrics.get(i))
            .unwrap_or(&self.unrouted_metrics)
    }

    /// The handles of upstream `tag` (its index) of route `route_index`.
    #[inline]
    pub fn upstream_metrics(&self, route_index: usize, tag: usize) -> Option<&UpstreamMetrics> {
        self.upstream_metrics
            .get(route_index)?
            .get(tag)
            .map(|m| &**m)
    }

    /// Every upstream the snapshot names, once each, with its requests in
    /// flight and queued now.
    pub fn upstream_loads(&self) -> Vec<(std::net::SocketAddr, u32, u32, bool)> {
        let now_ms = crate::keys::unix_millis(std::time::SystemTime::now());
        let mut loads: Vec<(std::net::SocketAddr, u32, u32, bool)> = Vec::new();
        for up in self
            .snapshot
            .router
            .routes()
            .iter()
            .flat_map(|r| r.upstreams())
        {
            if loads.iter().all(|(a, ..)| *a != up.addr) {
                let load = &up.state.load;
                let is_up = up.state.health.is_up(now_ms);
                loads.push((up.addr, load.in_flight(), load.queued(), is_up));
            }
        }
        loads.sort_unstable_by_key(|(a, ..)| *a);
        loads
    }
}

/// The last reload, as the status page shows it: when, which generation
/// it made, or why it failed (the old snapshot then stayed).
#[derive(Debug, Clone)]
pub struct ReloadSeen {
    pub at: std::time::SystemTime,
    pub why: String,
    pub result: Result<u64, String>,
}

/// Where the reloader records each reload.
#[derive(Debug, Default)]
pub struct ReloadLog {
    last: std::sync::Mutex<Option<ReloadSeen>>,
}

impl ReloadLog {
    pub fn record(&self, seen: ReloadSeen) {
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(seen);
    }

    pub fn last(&self) -> Option<ReloadSeen> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
