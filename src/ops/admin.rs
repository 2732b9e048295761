//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the
//! process is alive) and `/readyz` (a snapshot is loaded and every listen
//! address accepts connections). No key is needed, which is why the admin
//! address defaults to loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use super::live::SharedLive;
use super::metrics::Metrics;

/// How long `/readyz` waits for a listen address to accept.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

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
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
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
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
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
            "/readyz" => {
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
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                br#"{"error":"not found: try /metrics, /healthz or /readyz"}"#.to_vec(),
            ),
        }
    }
}
