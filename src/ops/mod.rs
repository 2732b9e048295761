//! What operators see: metrics, the audit log, request ids, and the admin
//! endpoints that expose them.
//!
//! Owns: [`Metrics`] (Prometheus, with label values only from route names
//! and fixed words), [`AuditLog`] (one JSON line per request, written off
//! the serving threads), request ids, the status page's [`History`] (fed
//! by the audit writer), the process log with Pingora's verbose targets capped
//! ([`logs`]), and [`Live`], the snapshot with its metric handles that the
//! proxy serves from.
//!
//! May import: `config`, `keys`, `state`, `policy`.

mod audit;
pub mod history;
mod live;
pub mod logs;
mod metrics;
mod registry;
pub mod request_id;
mod upstream_metrics;

pub use audit::{
    AdminRecord, AuditLog, AuditRecord, AuditWriter, ClientAddr, FailedTry, QUEUE_LEN,
};
pub use history::History;
pub use live::{Live, ReloadLog, ReloadSeen, SharedLive};
pub use metrics::{
    ClientTimeout, Metrics, RouteMetrics, UpstreamErrorKind, MAX_SEEN_MODELS, NO_MODEL, NO_ROUTE,
    OTHER_MODEL,
};
pub use upstream_metrics::UpstreamMetrics;
