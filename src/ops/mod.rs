//! What operators see: metrics, the audit log, request ids, and the admin
//! endpoints that expose them.
//!
//! Owns: [`Metrics`] (Prometheus, with label values only from route names
//! and fixed words), [`AuditLog`] (one JSON line per request, written off
//! the serving threads), request ids, [`Admin`] (`/metrics`, `/healthz`,
//! `/readyz`), the process log with Pingora's verbose targets capped
//! ([`logs`]), and [`Live`], the snapshot with its metric handles that the
//! proxy serves from.
//!
//! May import: `config`, `keys`, `state`, `policy`.

mod admin;
mod audit;
mod live;
pub mod logs;
mod metrics;
mod registry;
pub mod request_id;
mod upstream_metrics;

pub use admin::Admin;
pub use audit::{AuditLog, AuditRecord, AuditWriter, ClientAddr, FailedTry, QUEUE_LEN};
pub use live::{Live, SharedLive};
pub use metrics::{
    ClientTimeout, Metrics, RouteMetrics, UpstreamErrorKind, MAX_SEEN_MODELS, NO_MODEL, NO_ROUTE,
    OTHER_MODEL,
};
pub use upstream_metrics::UpstreamMetrics;
