//! What the proxy keeps about one request between Pingora's hooks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use prometheus::IntGauge;

use crate::keys::KeyId;
use crate::ops::{ClientAddr, Live};
use crate::policy::{Refusal, Route};
use crate::state::InFlightGuard;

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
    pub user: Option<HeaderValue>,
    pub key_id: Option<KeyId>,
    pub outcome: Outcome,
    pub upstream: Option<SocketAddr>,
    pub upstream_status: Option<u16>,
    pub ttfb: Option<Duration>,
    /// Connect attempts retried on another upstream (at most one).
    pub connect_retries: u8,
    /// The client's address (the peer, or from a trusted proxy's
    /// `X-Forwarded-For`), as the allowlist, the throttle and the audit
    /// line see it.
    pub client: Option<ClientAddr>,
    /// The page origin to name in CORS headers, when the route allows it.
    pub cors_origin: Option<HeaderValue>,
    /// The largest body this request may send, and how much it has sent.
    pub max_body: Option<u64>,
    pub body_seen: u64,
    /// The key's concurrency slot, held until the request ends.
    pub key_slot: Option<InFlightGuard>,
    _in_flight: InFlight,
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
    /// Accepted, then the client's body stalled longer than
    /// `client_body_timeout`.
    ClientTimeout,
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
            Outcome::ClientTimeout => "client_timeout",
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
            user: None,
            key_id: None,
            outcome: Outcome::Undecided,
            upstream: None,
            upstream_status: None,
            ttfb: None,
            connect_retries: 0,
            client: None,
            cors_origin: None,
            max_body: None,
            body_seen: 0,
            key_slot: None,
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
