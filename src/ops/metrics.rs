//! Prometheus metrics.
//!
//! Label values come only from route names and fixed reason strings, never
//! from a key, a user (unless the config asks for per-user counts) or a
//! path, so cardinality stays bounded whatever clients send. Model names
//! are labels only when the config or the key file names them, or while
//! fewer than [`MAX_SEEN_MODELS`] others have been seen; the rest count as
//! `other`. Each route's
//! handles are resolved once when a snapshot is built, so recording a
//! request touches only atomics.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use prometheus::{
    Encoder, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use super::registry::{counter, counter_vec, gauge, histogram_vec, registered};
use super::upstream_metrics::{UpstreamFamilies, UpstreamMetrics};
use crate::config::ModelPattern;
use crate::policy::Refusal;

/// Status codes that get a pre-resolved counter per route.
const COMMON_STATUSES: [u16; 14] = [
    200, 201, 204, 400, 401, 403, 404, 405, 413, 429, 500, 502, 503, 504,
];

/// The `route` label of requests that matched no route.
pub const NO_ROUTE: &str = "-";

/// How many model names not named in the config become labels; later
/// ones are counted as [`OTHER_MODEL`].
pub const MAX_SEEN_MODELS: usize = 32;
/// The `model` label of models past the cap.
pub const OTHER_MODEL: &str = "other";
/// The `model` label when no model is known.
pub const NO_MODEL: &str = "-";

/// Which model names are labels.
#[derive(Debug, Default)]
struct ModelLabels {
    /// Exact names from the config and the key file (current snapshot),
    /// by their folded form.
    named: HashMap<String, String>,
    /// Others seen, up to the cap; never forgotten, so a label never
    /// changes meaning.
    seen: HashSet<String>,
    /// The label found for each model name as answers write it (bounded:
    /// [`RESOLVED_CAP`]), so that counting an answer's tokens allocates
    /// nothing and takes only a read lock once its model was met; emptied
    /// when the named models change.
    resolved: HashMap<String, Arc<str>>,
}

/// Model names whose label is remembered (past it, a name is looked up
/// afresh each time: names beyond the cap all read as [`OTHER_MODEL`]).
const RESOLVED_CAP: usize = 4 * MAX_SEEN_MODELS;

/// Why a request failed upstream, as a fixed label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Refused,
    Timeout,
    Reset,
    InvalidResponse,
    Other,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 5] = [
        UpstreamErrorKind::Refused,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::InvalidResponse,
        UpstreamErrorKind::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            UpstreamErrorKind::Refused => "refused",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::InvalidResponse => "invalid_response",
            UpstreamErrorKind::Other => "other",
        }
    }
}

/// Which client timeout closed a connection or ended a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTimeout {
    /// The request head did not arrive within `client_header_timeout`.
    Header,
    /// A keep-alive connection waited longer than `client_idle_timeout`
    /// for its next request.
    Idle,
    /// A read of the request body waited longer than `client_body_timeout`.
    Body,
}

impl ClientTimeout {
    const ALL: [ClientTimeout; 3] = [
        ClientTimeout::Header,
        ClientTimeout::Idle,
        ClientTimeout::Body,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ClientTimeout::Header => "header",
            ClientTimeout::Idle => "idle",
            ClientTimeout::Body => "body",
        }
    }
}

/// How many refusal kinds there are: one pre-resolved counter each.
const REFUSALS: usize = Refusal::ALL.len();

/// All of the gateway's metrics, in their own registry.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    ttfb: HistogramVec,
    bytes_in: IntCounterVec,
    bytes_out: IntCounterVec,
    upstream_errors: IntCounterVec,
    /// Per refusal kind (in [`Refusal::ALL`] order): every refusal, and for
    /// key refusals the failed-key counter too.
    refused: [IntCounter; REFUSALS],
    auth_failures: [Option<IntCounter>; REFUSALS],
    pub in_flight: IntGauge,
    reload_ok: IntCounter,
    reload_failed: IntCounter,
    pub keys_loaded: IntGauge,
    pub routes_loaded: IntGauge,
    pub generation: IntGauge,
    pub audit_dropped: IntCounter,
    /// Open client connections on the proxy listeners.
    pub client_connections: IntGauge,
    /// Client connections refused because `max_connections` were open.
    pub client_refused: IntCounter,
    client_timeouts: [IntCounter; 3],
    per_user: IntCounterVec,
    tokens: TokenMetrics,
    model_labels: RwLock<ModelLabels>,
    tls: TlsMetrics,
    /// Shared state (Redis): whether it answers (1) or not (0).
    pub shared_state_up: IntGauge,
    /// Redis calls that failed or timed out.
    pub shared_state_errors: IntCounter,
    /// Requests decided without Redis while it was unreachable, by
    /// `on_redis_error` mode ("local" counted here, "deny" refused).
    shared_state_fallback: [IntCounter; 2],
    route_cache: std::sync::Mutex<HashMap<String, Arc<RouteMetrics>>>,
    upstreams: UpstreamFamilies,
}

/// Token usage on routes with `api`, and what budgets per end user and
/// budget alerts count.
struct TokenMetrics {
    by_model: IntCounterVec,
    /// Prompt tokens written to and read from the prompt cache.
    cache: IntCounterVec,
    by_user: IntCounterVec,
    sources: IntCounterVec,
    alerts: AlertMetrics,
}

impl TokenMetrics {
    fn new(r: &Registry) -> TokenMetrics {
        TokenMetrics {
            by_model: counter_vec(
                r,
                "agw_tokens_total",
                "Tokens by route, model and kind (prompt, completion), on routes with api.",
                &["route", "model", "kind"],
            ),
            cache: counter_vec(
                r,
                "agw_cache_tokens_total",
                "Prompt tokens written to (creation) and read from (read) the prompt cache, by route and model, as Anthropic answers report them; already counted in agw_tokens_total's prompt.",
                &["route", "model", "kind"],
            ),
            by_user: counter_vec(
                r,
                "agw_user_tokens_total",
                "Tokens by user and kind (only when metrics_per_user is on).",
                &["user", "kind"],
            ),
            sources: counter_vec(
                r,
                "agw_usage_total",
                "Answers that carry usage, by route and where their counts come from (reported, estimated, unknown).",
                &["route", "source"],
            ),
            alerts: AlertMetrics::new(r),
        }
    }
}

/// End users forgotten to make room, and budget alerts: posted, failed
/// attempts, and given up (queue full, or every attempt failed).
pub struct AlertMetrics {
    pub end_users_evicted: IntCounter,
    pub sent: IntCounter,
    pub failed_attempts: IntCounter,
    pub dropped_queue_full: IntCounter,
    pub dropped_failed: IntCounter,
}

impl AlertMetrics {
    fn new(r: &Registry) -> AlertMetrics {
        let dropped = counter_vec(
            r,
            "agw_alerts_dropped_total",
            "Budget alerts never delivered, by reason (queue_full, failed: every attempt failed).",
            &["reason"],
        );
        AlertMetrics {
            end_users_evicted: counter(
                r,
                "agw_end_users_evicted_total",
                "End users forgotten (the one idle longest) to make room in a key's table of end users.",
            ),
            sent: counter(r, "agw_alerts_sent_total", "Budget alerts posted to their webhook."),
            failed_attempts: counter(
                r,
                "agw_alert_failures_total",
                "Attempts to post a budget alert that failed (refused, timed out, or not answered 2xx).",
            ),
            dropped_queue_full: dropped.with_label_values(&["queue_full"]),
            dropped_failed: dropped.with_label_values(&["failed"]),
        }
    }
}

/// Certificates: reloads, ACME orders, expiry.
struct TlsMetrics {
    /// Certificate files re-read on reload, by result.
    reload_ok: IntCounter,
    reload_failed: IntCounter,
    /// ACME orders (obtaining or renewing), by result.
    acme_ok: IntCounter,
    acme_failed: IntCounter,
    /// When each TLS listener's certificate expires (Unix seconds).
    expiry: IntGaugeVec,
}

impl TlsMetrics {
    fn new(r: &Registry) -> TlsMetrics {
        let reloads = counter_vec(
            r,
            "agw_tls_cert_reloads_total",
            "Certificate files re-read on reload, by result (a failed one keeps the old certificate).",
            &["result"],
        );
        let acme = counter_vec(
            r,
            "agw_acme_orders_total",
            "ACME orders (a first certificate or a renewal), by result.",
            &["result"],
        );
        let expiry = registered(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "agw_tls_cert_expiry_timestamp_seconds",
                    "When the certificate each TLS listener serves expires (Unix time).",
                ),
                &["listener"],
            ),
        );
        TlsMetrics {
            reload_ok: reloads.with_label_values(&["ok"]),
            reload_failed: reloads.with_label_values(&["error"]),
            acme_ok: acme.with_label_values(&["ok"]),
            acme_failed: acme.with_label_values(&["error"]),
            expiry,
        }
    }
}

/// One route's pre-resolved handles.
pub struct RouteMetrics {
    route: String,
    requests_vec: IntCounterVec,
    /// Resolved on first use, so only statuses that occur are exported.
    by_status: [OnceLock<IntCounter>; COMMON_STATUSES.len()],
    pub duration: Histogram,
    pub ttfb: Histogram,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    upstream_errors: [IntCounter; 5],
    /// Tries sent to another upstream after a failure.
    pub retries: IntCounter,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    #[inline]
    pub fn count_status(&self, status: u16) {
        match COMMON_STATUSES.iter().position(|s| *s == status) {
            Some(i) => {
                if let Some(slot) = self.by_status.get(i) {
                    slot.get_or_init(|| {
                        self.requests_vec
                            .with_label_values(&[self.route.as_str(), &status.to_string()])
                    })
                    .inc();
                }
            }
            None => self
                .requests_vec
                .with_label_values(&[self.route.as_str(), &status.to_string()])
                .inc(),
        }
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        if let Some(i) = UpstreamErrorKind::ALL.iter().position(|k| *k == kind) {
            if let Some(c) = self.upstream_errors.get(i) {
                c.inc();
            }
        }
    }
}

/// The label of `model` (see [`Metrics::model_label`]).
fn label_of<'a>(labels: &'a mut ModelLabels, model: Option<&'a str>) -> &'a str {
    let Some(model) = model else {
        return NO_MODEL;
    };
    if !labels.named.is_empty() {
        if let Some(label) = labels.named.get(&ModelPattern::folded(model)) {
            return label;
        }
    }
    if labels.seen.contains(model) {
        return model;
    }
    if labels.seen.len() < MAX_SEEN_MODELS {
        labels.seen.insert(model.to_string());
        return model;
    }
    OTHER_MODEL
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Every refusal by kind, and key refusals again as auth failures.
type RefusalCounters = ([IntCounter; REFUSALS], [Option<IntCounter>; REFUSALS]);

fn refusal_counters(r: &Registry) -> RefusalCounters {
    let auth = counter_vec(
        r,
        "agw_auth_failures_total",
        "Requests refused for their key, by reason.",
        &["reason"],
    );
    let refused = counter_vec(
        r,
        "agw_refused_total",
        "Requests the gateway answered itself, by reason.",
        &["reason"],
    );
    (
        Refusal::ALL.map(|k| refused.with_label_values(&[k.label()])),
        Refusal::ALL.map(|k| k.key_denial().map(|_| auth.with_label_values(&[k.label()]))),
    )
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let requests = counter_vec(
            &r,
            "agw_requests_total",
            "Requests by route and status.",
            &["route", "status"],
        );
        let (refused, auth_failures) = refusal_counters(&r);
        let reloads = counter_vec(&r, "agw_reloads_total", "Reloads by result.", &["result"]);
        let client_timeouts = counter_vec(
            &r,
            "agw_client_timeouts_total",
            "Client connections closed (header, idle) or requests ended (body) by a client timeout, by kind.",
            &["kind"],
        );
        let fallback = counter_vec(
            &r,
            "agw_shared_state_fallback_total",
            "Requests whose limits were decided without Redis while it was unreachable, by on_redis_error mode.",
            &["mode"],
        );
        Metrics {
            shared_state_up: gauge(
                &r,
                "agw_shared_state_up",
                "Whether the shared-state Redis answers (1) or not (0); 0 also when none is configured.",
            ),
            shared_state_errors: counter(
                &r,
                "agw_shared_state_errors_total",
                "Redis calls that failed or timed out.",
            ),
            shared_state_fallback: [
                fallback.with_label_values(&["local"]),
                fallback.with_label_values(&["deny"]),
            ],
            duration: histogram_vec(
                &r,
                "agw_request_duration_seconds",
                "Total request latency by route.",
            ),
            ttfb: histogram_vec(
                &r,
                "agw_upstream_ttfb_seconds",
                "Time from the request's arrival to the upstream's response header, by route.",
            ),
            bytes_in: counter_vec(
                &r,
                "agw_request_body_bytes_total",
                "Request body bytes by route.",
                &["route"],
            ),
            bytes_out: counter_vec(
                &r,
                "agw_response_body_bytes_total",
                "Response body bytes by route.",
                &["route"],
            ),
            upstream_errors: counter_vec(
                &r,
                "agw_upstream_errors_total",
                "Failures talking to upstreams, by route and kind.",
                &["route", "kind"],
            ),
            refused,
            auth_failures,
            in_flight: gauge(&r, "agw_requests_in_flight", "Requests being served now."),
            tls: TlsMetrics::new(&r),
            reload_ok: reloads.with_label_values(&["ok"]),
            reload_failed: reloads.with_label_values(&["error"]),
            keys_loaded: gauge(&r, "agw_keys_loaded", "Keys in the current snapshot."),
            routes_loaded: gauge(&r, "agw_routes_loaded", "Routes in the current snapshot."),
            generation: gauge(
                &r,
                "agw_snapshot_generation",
                "Generation of the current snapshot (1 at start).",
            ),
            audit_dropped: counter(
                &r,
                "agw_audit_dropped_total",
                "Audit records dropped because the queue was full.",
            ),
            client_connections: gauge(
                &r,
                "agw_client_connections",
                "Open client connections on the proxy listeners.",
            ),
            client_refused: counter(
                &r,
                "agw_client_connections_refused_total",
                "Client connections refused because max_connections were open.",
            ),
            client_timeouts: ClientTimeout::ALL
                .map(|k| client_timeouts.with_label_values(&[k.label()])),
            per_user: counter_vec(
                &r,
                "agw_user_requests_total",
                "Requests by user (only when metrics_per_user is on).",
                &["user"],
            ),
            tokens: TokenMetrics::new(&r),
            model_labels: RwLock::default(),
            requests,
            upstreams: UpstreamFamilies::new(&r),
            registry: r,
            route_cache: Default::default(),
        }
    }

    /// The handles for `route`, created on first use and shared after.
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        let mut cache = self.route_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = cache.get(route) {
            return Arc::clone(m);
        }
        let m = Arc::new(RouteMetrics {
            route: route.to_string(),
            requests_vec: self.requests.clone(),
            by_status: Default::default(),
            duration: self.duration.with_label_values(&[route]),
            ttfb: self.ttfb.with_label_values(&[route]),
            bytes_in: self.bytes_in.with_label_values(&[route]),
            bytes_out: self.bytes_out.with_label_values(&[route]),
            upstream_errors: UpstreamErrorKind::ALL
                .map(|k| self.upstream_errors.with_label_values(&[route, k.label()])),
            retries: self.upstreams.retries.with_label_values(&[route]),
        });
        cache.insert(route.to_string(), Arc::clone(&m));
        m
    }

    /// The handles of the upstream at `addr`, made on first use.
    pub fn upstream(&self, addr: std::net::SocketAddr) -> Arc<UpstreamMetrics> {
        self.upstreams.of(addr)
    }

    /// Sets the in-flight and queued gauges: `(address, in flight,
    /// queued)` for every upstream named now.
    pub fn set_upstream_loads(&self, loads: &[(std::net::SocketAddr, u32, u32)]) {
        self.upstreams.set_loads(loads);
    }

    /// Counts a refusal under its label (and a key refusal as a failed key).
    pub fn refused(&self, why: Refusal) {
        // By label: kinds that carry a value (a Retry-After) are one kind.
        if let Some(i) = Refusal::ALL.iter().position(|k| k.label() == why.label()) {
            if let Some(c) = self.refused.get(i) {
                c.inc();
            }
            if let Some(Some(c)) = self.auth_failures.get(i) {
                c.inc();
            }
        }
    }

    /// Counts a connection or request ended by a client timeout.
    pub fn client_timeout(&self, kind: ClientTimeout) {
        if let Some(i) = ClientTimeout::ALL.iter().position(|k| *k == kind) {
            if let Some(c) = self.client_timeouts.get(i) {
                c.inc();
            }
        }
    }

    /// Makes the exact model names of the current snapshot labels.
    pub fn set_named_models<'a>(
        &self,
        named: impl Iterator<Item = &'a crate::config::ModelPattern>,
    ) {
        let named = named
            .filter(|p| p.is_exact())
            .map(|p| (ModelPattern::folded(p.as_str()), p.as_str().to_string()))
            .collect();
        let mut labels = self
            .model_labels
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        labels.named = named;
        labels.resolved.clear();
    }

    /// The `model` label for `model`: the name the config gives it, the
    /// name itself while fewer than [`MAX_SEEN_MODELS`] others are labels,
    /// else [`OTHER_MODEL`]. A model met before costs a read lock and a
    /// map lookup.
    pub fn model_label(&self, model: Option<&str>) -> Arc<str> {
        let Some(name) = model else {
            return Arc::from(NO_MODEL);
        };
        let known = self
            .model_labels
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .resolved
            .get(name)
            .cloned();
        if let Some(label) = known {
            return label;
        }
        let labels = &mut *self
            .model_labels
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let label: Arc<str> = Arc::from(label_of(labels, Some(name)));
        if labels.resolved.len() < RESOLVED_CAP {
            labels.resolved.insert(name.to_string(), Arc::clone(&label));
        }
        label
    }

    /// Counts the tokens of one answer of `model`, and where its counts
    /// came from. Allocates only for a model never met before (and for
    /// answers that name no model).
    pub fn tokens(
        &self,
        route: &str,
        model: Option<&str>,
        source: &str,
        prompt: Option<u64>,
        completion: Option<u64>,
        user: Option<&str>,
    ) {
        self.tokens
            .sources
            .with_label_values(&[route, source])
            .inc();
        if prompt.is_none() && completion.is_none() {
            return;
        }
        let label = self.model_label(model);
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            let Some(n) = n else { continue };
            self.tokens
                .by_model
                .with_label_values(&[route, &label, kind])
                .inc_by(n);
            if let Some(user) = user {
                self.tokens
                    .by_user
                    .with_label_values(&[user, kind])
                    .inc_by(n);
            }
        }
    }

    /// Counts the prompt-cache tokens of one answer of `model` (part of
    /// its prompt tokens, which [`Metrics::tokens`] counted).
    pub fn cache_tokens(
        &self,
        route: &str,
        model: Option<&str>,
        creation: Option<u64>,
        read: Option<u64>,
    ) {
        if creation.is_none() && read.is_none() {
            return;
        }
        let label = self.model_label(model);
        for (kind, n) in [("creation", creation), ("read", read)] {
            if let Some(n) = n {
                self.tokens
                    .cache
                    .with_label_values(&[route, &label, kind])
                    .inc_by(n);
            }
        }
    }

    pub fn user_request(&self, user: &str) {
        self.per_user.with_label_values(&[user]).inc();
    }

    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reload_ok.inc();
        } else {
            self.reload_failed.inc();
        }
    }

    pub fn cert_reloaded(&self, ok: bool) {
        if ok {
            self.tls.reload_ok.inc();
        } else {
            self.tls.reload_failed.inc();
        }
    }

    /// End users evicted, and budget alerts.
    pub fn alerts(&self) -> &AlertMetrics {
        &self.tokens.alerts
    }

    /// Counts alerts that found the queue full.
    pub fn alerts_dropped(&self, n: u64) {
        if n > 0 {
            self.tokens.alerts.dropped_queue_full.inc_by(n);
        }
    }

    /// A request decided without Redis: counted locally, or refused.
    pub fn shared_state_fallback(&self, denied: bool) {
        self.shared_state_fallback[usize::from(denied)].inc();
    }

    pub fn acme_order(&self, ok: bool) {
        if ok {
            self.tls.acme_ok.inc();
        } else {
            self.tls.acme_failed.inc();
        }
    }

    /// Records when the certificate served on `listener` expires.
    pub fn cert_expires(&self, listener: &str, not_after: std::time::SystemTime) {
        let secs = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.tls.expiry.with_label_values(&[listener]).set(secs);
    }

    /// Every metric's current values, for the status page.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("cannot encode metrics: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_up_in_the_exposition() {
        let m = Metrics::new();
        let chat = m.route("chat");
        chat.count_status(200);
        chat.count_status(200);
        chat.count_status(418);
        chat.duration.observe(0.003);
        chat.upstream_error(UpstreamErrorKind::Timeout);
        m.refused(Refusal::Key(crate::keys::KeyDenial::Expired));
        m.refused(Refusal::NoRoute);
        m.reloaded(true);
        m.generation.set(3);
        m.client_timeout(ClientTimeout::Idle);
        m.client_timeout(ClientTimeout::Idle);
        m.client_refused.inc();
        m.client_connections.set(2);
        assert!(Arc::ptr_eq(&chat, &m.route("chat")));
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(r#"agw_requests_total{route="chat",status="200"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"agw_requests_total{route="chat",status="418"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"agw_upstream_errors_total{kind="timeout",route="chat"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"agw_auth_failures_total{reason="expired_key"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"agw_refused_total{reason="expired_key"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"agw_refused_total{reason="no_route"} 1"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"agw_auth_failures_total{reason="no_route"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"agw_reloads_total{result="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains("agw_snapshot_generation 3"), "{text}");
        assert!(
            text.contains(r#"agw_client_timeouts_total{kind="idle"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"agw_client_timeouts_total{kind="header"} 0"#),
            "{text}"
        );
        assert!(
            text.contains("agw_client_connections_refused_total 1"),
            "{text}"
        );
        assert!(text.contains("agw_client_connections 2"), "{text}");
        assert!(
            text.contains(r#"agw_request_duration_seconds_bucket{route="chat",le="0.005"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn remembered_labels_follow_the_named_models() {
        let m = Metrics::new();
        assert_eq!(&*m.model_label(Some("gemma")), "gemma");
        m.set_named_models([ModelPattern::parse("GEMMA").unwrap()].iter());
        assert_eq!(
            &*m.model_label(Some("gemma")),
            "GEMMA",
            "a reload that names the model relabels it"
        );
    }

    #[test]
    fn model_labels_are_bounded() {
        let m = Metrics::new();
        m.set_named_models([ModelPattern::parse("llama3.2").unwrap()].iter());
        assert_eq!(&*m.model_label(Some("llama3.2:latest")), "llama3.2");
        assert_eq!(&*m.model_label(None), NO_MODEL);
        for i in 0..MAX_SEEN_MODELS {
            assert_eq!(&*m.model_label(Some(&format!("m{i}"))), format!("m{i}"));
        }
        assert_eq!(
            &*m.model_label(Some("m0")),
            "m0",
            "a label once given stays"
        );
        assert_eq!(&*m.model_label(Some("one-too-many")), OTHER_MODEL);
        assert_eq!(
            &*m.model_label(Some("LLAMA3.2")),
            "llama3.2",
            "named ones are never capped"
        );
        m.tokens(
            "chat",
            Some("llama3.2:latest"),
            "reported",
            Some(26),
            Some(290),
            Some("ann"),
        );
        m.tokens("chat", Some("llama3.2"), "estimated", None, Some(4), None);
        m.tokens("chat", Some("m0"), "unknown", None, None, None);
        m.cache_tokens("chat", Some("llama3.2"), Some(100), Some(20));
        m.cache_tokens("chat", Some("llama3.2"), None, Some(5));
        let text = String::from_utf8(m.render()).unwrap();
        for want in [
            r#"agw_tokens_total{kind="prompt",model="llama3.2",route="chat"} 26"#,
            r#"agw_tokens_total{kind="completion",model="llama3.2",route="chat"} 294"#,
            r#"agw_user_tokens_total{kind="completion",user="ann"} 290"#,
            r#"agw_usage_total{route="chat",source="estimated"} 1"#,
            r#"agw_usage_total{route="chat",source="unknown"} 1"#,
            r#"agw_cache_tokens_total{kind="creation",model="llama3.2",route="chat"} 100"#,
            r#"agw_cache_tokens_total{kind="read",model="llama3.2",route="chat"} 25"#,
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }
}
