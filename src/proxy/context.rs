//! What the proxy keeps about one request between Pingora's hooks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use prometheus::IntGauge;

use crate::config::{ApiKind, ModelAlias, ModelPattern};
use crate::keys::KeyId;
use crate::ops::{ClientAddr, Live};
use crate::policy::{Admission, Refusal, Route, DEFAULT_POOL};
use crate::state::Lease;
use crate::usage::{AnswerMeter, Endpoint, ModelListFilter, RequestInspector, SseHider};

/// Per-request state. The snapshot is taken when the context is made (the
/// first thing Pingora does with a request), so every later hook, `logging`
/// included, has it without a branch to forget.
pub struct RequestCtx {
    pub start: Instant,
    /// The snapshot this request is decided against, kept to its end so a
    /// reload cannot change the route under it.
    pub live: Arc<Live>,
    /// The route, resolved once by the decision (also for refusals that
    /// come after routing, so they are counted under their route).
    pub route_index: Option<usize>,
    pub request_id: Option<HeaderValue>,
    /// Whose key admitted the request; `None` until the key phase passed.
    pub caller: Option<Caller>,
    /// The id of an expired or revoked key the request presented, for the
    /// audit line (the status page lists keys still tried).
    pub tried_key: Option<crate::keys::KeyId>,
    pub outcome: Outcome,
    /// The upstream of the current (last) try.
    pub upstream: Option<SocketAddr>,
    pub upstream_status: Option<u16>,
    pub ttfb: Option<Duration>,
    /// The slot held on the upstream, and the tries that failed.
    pub tries: Tries,
    /// The client's address (the peer, or from a trusted proxy's
    /// `X-Forwarded-For`), as the allowlist, the throttle and the audit
    /// line see it.
    pub client: Option<ClientAddr>,
    /// The page origin to name in CORS headers, when the route allows it.
    pub cors_origin: Option<HeaderValue>,
    /// The largest body this request may send, and how much it has sent.
    pub body: BodyBudget,
    /// The key's concurrency slot (held until the request ends) and token
    /// meter.
    pub admission: Admission,
    /// A refusal decided while the body was streaming upstream, answered
    /// by `fail_to_proxy`.
    pub late_refusal: Option<Refusal>,
    /// What the gateway reads and changes of a request to an API (routes
    /// with `api`); `None` elsewhere, so plain routes carry nothing more.
    pub ai: Option<Box<AiRequest>>,
    _in_flight: InFlight,
}

/// The upstreams a request goes to: the slot it holds, the one taken for
/// a retry, and the tries that failed.
#[derive(Debug, Default)]
pub struct Tries {
    /// The slot on the upstream of the current try, held to the request's
    /// end (see `fleet`).
    pub lease: Option<Lease>,
    /// The slot taken for the next try, when a failure is retried.
    pub next: Option<Lease>,
    /// Failed tries, in order: the upstream and how it failed. Empty (no
    /// allocation) unless a try failed.
    pub failed: Vec<(SocketAddr, TryFailure)>,
    /// The current try's answer status is retried: decided (with the
    /// request body checked to be replayable) before Pingora's default
    /// policy, which would refuse a POST, is asked.
    pub status_retry: bool,
    /// The current try's failure is in the upstream's metrics already
    /// (a failed connect), so `logging` does not count it again.
    pub counted: bool,
}

/// How a try failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryFailure {
    Connect,
    /// The upstream answered this status, one the route retries.
    Status(u16),
}

/// The key that admitted a request: its id (for logs and counters) and
/// the `X-Gateway-User` value its user goes upstream as, built at load;
/// for a key that names its end users, the request's end user.
#[derive(Debug, Clone)]
pub struct Caller {
    pub id: KeyId,
    pub user: HeaderValue,
    /// The value of the key's `end_user_header` (checked), if sent.
    pub end_user: Option<HeaderValue>,
    /// The key's [`crate::keys::KeyExtras::slot`], when it has extras.
    pub extras: Option<u32>,
}

/// A request body against `max_body_size`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyBudget {
    /// The largest body the request may send; `None` for no limit.
    pub max: Option<u64>,
    /// What it has sent so far.
    pub seen: u64,
}

/// A request on a route with `api`.
#[derive(Debug)]
pub struct AiRequest {
    pub api: ApiKind,
    pub endpoint: Endpoint,
    /// The models the key may use, when it may not use them all.
    pub allowed: Option<Arc<[ModelPattern]>>,
    /// The first model the request names (body, or `/models/{id}` path);
    /// for an alias, its target (the model that serves it).
    pub model: Option<String>,
    /// The alias the client asked for, when it asked for one.
    pub requested_model: Option<String>,
    /// The group of the route's upstreams that serves the model.
    pub pool: usize,
    /// How the body bytes read before choosing the upstream reach it.
    pub replay: Replay,
    /// The body the upstream gets instead of the one read: an alias's
    /// target as the model, `stream_options.include_usage` added.
    pub rewritten: Option<Bytes>,
    /// The gateway added `stream_options.include_usage` (so the
    /// usage-only event is hidden from the client).
    pub asked_usage: bool,
    /// The gateway answered `Expect: 100-continue` itself.
    pub continued: bool,
    /// The next call of the request body filter is the first of an
    /// attempt (set when an upstream is chosen).
    pub fresh_attempt: bool,
    /// Reads the rest of the body as it streams, for a key limited to some
    /// models whose whole body was not read first.
    pub inspector: Option<RequestInspector>,
    pub meter: Option<AnswerMeter>,
    pub hider: Option<SseHider>,
    pub list_filter: Option<ModelListFilter>,
    /// The route's aliases, on requests for model lists (which show them).
    pub aliases: Option<Arc<[ModelAlias]>>,
}

/// How the part of a body read before the upstream was chosen gets there.
#[derive(Debug)]
pub enum Replay {
    /// Nothing was read.
    Nothing,
    /// Pingora's retry buffer holds it (at most 64 KiB) and sends it first.
    RetryBuffer,
    /// It outgrew the retry buffer (the read that crossed 64 KiB): the
    /// gateway puts it in front of the next piece of the body.
    Prefix(Bytes),
}

impl AiRequest {
    pub fn new(api: ApiKind, endpoint: Endpoint, allowed: Option<Arc<[ModelPattern]>>) -> Self {
        AiRequest {
            api,
            endpoint,
            allowed,
            model: None,
            requested_model: None,
            pool: DEFAULT_POOL,
            replay: Replay::Nothing,
            rewritten: None,
            asked_usage: false,
            continued: false,
            fresh_attempt: false,
            inspector: None,
            meter: None,
            hider: None,
            list_filter: None,
            aliases: None,
        }
    }
}

/// How a request ended, as far as the gateway is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Pingora gave up on the request before the gateway decided it.
    Undecided,
    /// Sent upstream.
    Accepted,
    /// Answered by the gateway.
    Refused(Refusal),
    /// Accepted, then the client went away before the answer was complete.
    ClientGone,
    /// An ACME HTTP-01 challenge, answered before any key check.
    AcmeChallenge,
    /// A `redirect_https` listener's `308`.
    Redirected,
}

impl Outcome {
    /// The audit `decision`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Undecided => "error",
            Outcome::Accepted => "accepted",
            Outcome::Refused(r) => r.label(),
            Outcome::ClientGone => "client_closed",
            Outcome::AcmeChallenge => "acme_challenge",
            Outcome::Redirected => "redirect_https",
        }
    }
}

impl RequestCtx {
    pub fn new(live: Arc<Live>, in_flight: &IntGauge) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            live,
            route_index: None,
            request_id: None,
            caller: None,
            tried_key: None,
            outcome: Outcome::Undecided,
            upstream: None,
            upstream_status: None,
            ttfb: None,
            tries: Tries::default(),
            client: None,
            cors_origin: None,
            body: BodyBudget::default(),
            admission: Admission::default(),
            late_refusal: None,
            ai: None,
            _in_flight: InFlight::new(in_flight),
        }
    }

    /// The route the decision resolved, if it found one.
    #[inline]
    pub fn route(&self) -> Option<&Route> {
        self.route_index
            .and_then(|i| self.live.snapshot.router.get(i))
    }
}

/// Counts a request as in flight from its context's creation to its drop.
struct InFlight(IntGauge);

impl InFlight {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
