//! The admin listener (`admin_listen`): `/metrics` (Prometheus text),
//! `/healthz` (the process is alive) and `/readyz` (a snapshot is loaded
//! and every listen address accepts connections), which need no key; and
//! behind an admin key, the status page (`/`) and the key API
//! (`/api/keys`).
//!
//! Owns: the admin endpoints, admin authentication ([`auth`]: a key-file
//! entry with `"admin": true`, as HTTP Basic for the page or Bearer for
//! the API, counted by the failed-key throttle), the key API ([`api`]:
//! the key commands' locked edits of the key file, then a reload before
//! the answer), the status page ([`page`]) and the history's rebuild
//! from the audit log at start ([`rebuild`]). Work that blocks (key file
//! edits, reloads, publishing a revocation) runs through [`Control`],
//! which the daemon provides; this layer starts no thread itself.
//!
//! May import: `config`, `keys`, `state`, `tls`, `usage`, `policy`, `ops`, `cluster`.

mod api;
mod auth;
mod page;
pub mod rebuild;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::cluster::Cluster;
use crate::ops::{AuditLog, History, Metrics, ReloadLog, SharedLive};
use crate::state::Carried;

pub use rebuild::RebuildState;

/// How long `/readyz` waits for a listen address to accept.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// What the admin listener asks of the daemon.
pub trait Control: Send + Sync {
    /// Re-reads the config and the key file now, as SIGHUP does, and
    /// returns once the new snapshot is in service (its generation), or
    /// why it was not swapped in. Reloads never overlap.
    fn reload(&self, why: &str) -> Result<u64, String>;
    /// Runs `job` on a thread of its own, so that the admin listener
    /// keeps answering while a key file is locked, written and reloaded.
    fn off_thread(&self, job: Box<dyn FnOnce() + Send>);
}

/// The admin endpoints.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub live: SharedLive,
    /// The proxy's listen addresses, probed by `/readyz`.
    pub listen: Vec<SocketAddr>,
    /// `/readyz` also needs the shared-state Redis to answer (under
    /// `on_redis_error: deny`, where an instance without it refuses every
    /// limited key, a load balancer should send traffic elsewhere).
    pub needs_shared_state: bool,
    /// The failed-key throttle and per-key counters.
    pub carried: Arc<Carried>,
    pub cluster: Option<Arc<Cluster>>,
    /// Where admin actions are recorded (with `audit_log`).
    pub audit: Option<AuditLog>,
    /// The history the page charts (with `audit_log`).
    pub history: Option<Arc<History>>,
    pub rebuild: Arc<RebuildState>,
    pub control: Arc<dyn Control>,
    pub reloads: Arc<ReloadLog>,
    pub started: SystemTime,
    /// The zero of the monotonic clock the per-key windows are kept in.
    pub epoch: Instant,
}

/// An answer with a body, `no-store` (nothing here is for caches).
pub(crate) fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let len = body.len();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let headers = r.headers_mut();
    if let Ok(v) = content_type.parse() {
        headers.insert(http::header::CONTENT_TYPE, v);
    }
    headers.insert(http::header::CONTENT_LENGTH, len.into());
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

/// A JSON answer.
pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Vec<u8>> {
    reply(status, "application/json", value.to_string().into_bytes())
}

/// `{"error": ...}` with `status`.
pub(crate) fn error(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    json(status, &serde_json::json!({ "error": message }))
}

impl Admin {
    /// Each upstream's state, for `/readyz`: in rotation or not (the
    /// gateway stays ready while some are down: it answers for them), and
    /// its requests in flight and queued.
    fn upstream_states(&self) -> Vec<serde_json::Value> {
        self.live
            .load()
            .upstream_loads()
            .into_iter()
            .map(|(addr, in_flight, queued, up)| {
                serde_json::json!({
                    "address": addr.to_string(),
                    "state": if up { "up" } else { "down" },
                    "in_flight": in_flight,
                    "queued": queued,
                })
            })
            .collect()
    }

    /// Whether every listen address accepts a connection right now.
    async fn listeners_up(&self) -> bool {
        for addr in &self.listen {
            let probe =
                tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
            if !matches!(probe, Ok(Ok(_))) {
                return false;
            }
        }
        true
    }

    async fn readyz(&self) -> Response<Vec<u8>> {
        let generation = self.live.load().snapshot.generation;
        let redis_down = self.needs_shared_state && self.metrics.shared_state_up.get() != 1;
        if redis_down {
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                br#"{"status":"not ready","reason":"shared state (redis) unreachable and on_redis_error is deny"}"#.to_vec(),
            )
        } else if generation >= 1 && self.listeners_up().await {
            let body = serde_json::json!({
                "status": "ready",
                "generation": generation,
                "upstreams": self.upstream_states(),
            });
            reply(
                StatusCode::OK,
                "application/json",
                body.to_string().into_bytes(),
            )
        } else {
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                br#"{"status":"not ready"}"#.to_vec(),
            )
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let method = session.req_header().method.clone();
        match path.as_str() {
            "/metrics" => {
                let loads: Vec<_> = self
                    .live
                    .load()
                    .upstream_loads()
                    .into_iter()
                    .map(|(addr, in_flight, queued, _)| (addr, in_flight, queued))
                    .collect();
                self.metrics.set_upstream_loads(&loads);
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.render(),
                )
            }
            "/healthz" => reply(
                StatusCode::OK,
                "application/json",
                br#"{"status":"ok"}"#.to_vec(),
            ),
            "/readyz" => self.readyz().await,
            "/" => {
                if method != Method::GET && method != Method::HEAD {
                    return error(StatusCode::METHOD_NOT_ALLOWED, "the page answers GET");
                }
                match self.authenticate(session, true) {
                    Ok(_) => self.page(session.req_header().uri.query()),
                    Err(r) => *r,
                }
            }
            "/api/keys" => self.keys_api(session, &method, None).await,
            p if p.starts_with("/api/keys/") => {
                let id = p.trim_start_matches("/api/keys/").to_string();
                self.keys_api(session, &method, Some(&id)).await
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz, /readyz, / (status page) or /api/keys",
            ),
        }
    }
}
