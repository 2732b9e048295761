//! The Pingora `ProxyHttp` implementation: the hooks, in the order Pingora
//! calls them (see the diagram in the module above).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use log::{debug, warn};
use pingora::http::ResponseHeader;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::ErrorSource;

use super::ai;
use super::client_stream;
use super::context::{Outcome, RequestCtx};
use super::framing::check_head;
use super::headers::{rewrite_for_upstream, Identity};
use super::listener::{is_tls, FrontDoor, Listeners};
use super::reply::{add_cors, refusal_for, send_refusal, upstream_error_kind};
use crate::cluster::Cluster;
use crate::config::any_contains;
use crate::keys::{unix_millis, KeyDenial};
use crate::ops::{
    request_id, AuditLog, AuditRecord, ClientAddr, ClientTimeout, Metrics, SharedLive, NO_ROUTE,
};
use crate::policy::{admit_locally, client_ip, Refusal, Request, DEFAULT_POOL};
use crate::state::{Carried, Transition};
use crate::usage::AnswerMeter;

/// The address taken for a client whose socket has none (a Unix socket).
const UNKNOWN_CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// The gateway's proxy logic: the snapshot handle, the state that outlives
/// it, metrics and the audit log. Each proxy service runs its own clone
/// (see `daemon::services`): the clones share all of these, and the zero of
/// the clock the rate windows are kept in.
#[derive(Clone)]
pub struct Gateway {
    live: SharedLive,
    carried: Arc<Carried>,
    metrics: Arc<Metrics>,
    audit: Option<AuditLog>,
    /// ACME challenges and redirects, by listener.
    listeners: Listeners,
    /// Limits shared with other instances, when `shared_state` is set.
    cluster: Option<Arc<Cluster>>,
    /// The zero of the monotonic clock per-key rate windows are kept in.
    started: Instant,
}

impl Gateway {
    pub fn new(
        live: SharedLive,
        carried: Arc<Carried>,
        metrics: Arc<Metrics>,
        audit: Option<AuditLog>,
        listeners: Listeners,
        cluster: Option<Arc<Cluster>>,
        started: Instant,
    ) -> Self {
        Gateway {
            live,
            carried,
            metrics,
            audit,
            listeners,
            cluster,
            started,
        }
    }
}

impl Gateway {
    /// Milliseconds of the monotonic clock per-key windows are kept in.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Whether a connect error is the TLS handshake's (a certificate that
/// does not verify, a protocol mismatch).
fn is_tls_error(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::InvalidCert
            | ErrorType::HandshakeError
            | ErrorType::TLSWantX509Lookup
    )
}

fn internal(why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::InternalError, why)
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules: Pingora's default adds a response compression
    /// module, disabled, whose context is built and consulted for every
    /// request; the gateway compresses nothing.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    /// The one snapshot load of the request.
    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.live.load_full(), &self.metrics.in_flight)
    }

    /// The head is in: its clock stops, the body's reads get theirs.
    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        client_stream::head_complete(session, &ctx.live.snapshot.config.clients);
        Ok(())
    }

    /// The head checks, the failed-key throttle, then the one decision
    /// (addresses, path, route, method, key, body size), then the key's
    /// rate and concurrency limits.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        match self.listeners.handle(session).await? {
            FrontDoor::Pass => {}
            FrontDoor::Challenge => {
                ctx.outcome = Outcome::AcmeChallenge;
                return Ok(true);
            }
            FrontDoor::Redirected => {
                ctx.outcome = Outcome::Redirected;
                return Ok(true);
            }
        }
        let req = session.req_header();
        ctx.request_id = Some(request_id::for_request(req.headers.get("x-request-id")));
        let snapshot = &ctx.live.snapshot;
        let config = &snapshot.config;
        let peer = session.client_addr().and_then(|a| a.as_inet()).copied();
        let ip = peer.map_or(UNKNOWN_CLIENT, |p| {
            client_ip(p.ip(), &req.headers, &config.trusted_proxies)
        });
        ctx.client = peer.map(|p| {
            if p.ip() == ip {
                ClientAddr::Peer(p)
            } else {
                ClientAddr::Forwarded(ip)
            }
        });
        let now_ms = unix_millis(SystemTime::now());
        let now_s = u32::try_from(now_ms / 1000).unwrap_or(u32::MAX);
        let throttle = &config.failed_key_throttle;
        let failed_keys = &self.carried.failed_keys;
        let addr = throttle.enabled.then(|| failed_keys.tag(ip));
        let blocked = addr.and_then(|a| failed_keys.blocked(a, now_s));
        let verdict = check_head(session);
        let mut shared_limits = None;
        let verdict = verdict.and_then(|()| {
            let request =
                Request::from_head(&req.method, req.uri.path(), req.version, &req.headers, ip);
            let decision = snapshot.decide(&request, now_ms);
            ctx.route_index = decision.route.map(|(i, _)| i);
            let route = decision.route.map(|(_, r)| r);
            ctx.cors_origin = route.and_then(|r| r.cors_origin(request.origin)).cloned();
            // A blocked address is served only for keys that worked from it
            // before; anything else, right key or wrong, gets the same 429.
            if let (Some(retry_after_s), Some(addr)) = (blocked, addr) {
                match decision.verdict {
                    Ok(p) if failed_keys.known(addr, p.id, now_s) => {}
                    _ => return Err(Refusal::KeyThrottled { retry_after_s }),
                }
            }
            let principal = decision.verdict.inspect_err(|r| {
                if r.is_failed_key() && throttle.enabled {
                    if let Some(cluster) = &self.cluster {
                        cluster.key_failed(ip, throttle);
                    }
                    if failed_keys.failed(ip, now_s, throttle) {
                        warn!(
                            "client {ip} throttled: blocked for {}s after {} failed key checks",
                            throttle.cooldown.as_secs(),
                            throttle.max_failures
                        );
                    }
                }
            })?;
            if let Some(addr) = addr {
                failed_keys.succeeded(addr, principal.id, now_s);
            }
            if let Some(cluster) = &self.cluster {
                if cluster.is_revoked(principal.id) {
                    return Err(Refusal::Key(KeyDenial::Disabled));
                }
            }
            let route = route.ok_or(Refusal::Internal)?;
            ctx.user = Some(principal.user.header.clone());
            ctx.key_id = Some(principal.id);
            ctx.max_body = snapshot.limits_for(&principal, route).max_body;
            let now = self.now_ms();
            match (self.cluster.as_ref(), snapshot.counted(&principal, route)) {
                (_, None) => {}
                // Counted in Redis: admitted below, where it may wait.
                (Some(_), Some((limits, counter))) => {
                    shared_limits = Some((principal.id, limits, Arc::clone(counter), now));
                }
                (None, Some((limits, counter))) => {
                    ctx.admission = admit_locally(limits, counter, now)?;
                }
            }
            ctx.ai = ai::start(route, req.uri.path(), principal.models);
            ctx.ai.as_deref().map_or(Ok(()), ai::check_path_model)
        });
        // Limits counted across instances: the lease at hand, or a call to
        // Redis bounded by its timeout.
        let verdict = match (verdict, shared_limits, self.cluster.as_ref()) {
            (Ok(()), Some((id, limits, counter, now)), Some(cluster)) => cluster
                .admit(id, limits, &counter, now)
                .await
                .map(|admission| ctx.admission = admission),
            (verdict, _, _) => verdict,
        };
        // A request to an API may need its model before an upstream is
        // chosen: read the start of the body.
        let verdict = match (verdict, ctx.ai.take()) {
            (Ok(()), Some(mut started)) => {
                let route = ctx.route().ok_or_else(|| internal("no route"))?;
                let read = if ai::wants_body(&started, route) && !session.is_body_empty() {
                    ai::read_body_start(session, &mut started, route).await
                } else {
                    Ok(Ok(()))
                };
                ctx.ai = Some(started);
                read?
            }
            (verdict, started) => {
                ctx.ai = started;
                verdict
            }
        };
        let req = session.req_header();
        match verdict {
            Ok(()) => {
                ctx.outcome = Outcome::Accepted;
                Ok(false)
            }
            Err(refusal) => {
                debug!("refused {} {}: {refusal:?}", req.method, req.uri.path());
                ctx.outcome = Outcome::Refused(refusal);
                send_refusal(
                    session,
                    refusal,
                    ctx.route(),
                    ctx.cors_origin.as_ref(),
                    ctx.request_id.as_ref(),
                )
                .await?;
                Ok(true)
            }
        }
    }

    /// Counts a streamed body against the route's `max_body_size`: past it,
    /// the request fails before the rest goes upstream (the upstream sees
    /// the request broken off, never a body that looks complete).
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if session.is_http2() {
            client_stream::h2_body_read(end_of_stream);
        }
        if let Some(ai) = ctx.ai.as_mut() {
            if let Err(refusal) = ai::request_body(ai, body, end_of_stream) {
                ctx.late_refusal = Some(refusal);
                return Error::e_explain(
                    ErrorType::HTTPStatus(refusal.status()),
                    "the request body names a model the key may not use",
                );
            }
        }
        if let (Some(max), Some(chunk)) = (ctx.max_body, body.as_ref()) {
            ctx.body_seen = ctx.body_seen.saturating_add(chunk.len() as u64);
            if ctx.body_seen > max {
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    "the request body grew past max_body_size",
                );
            }
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let route = ctx.route().ok_or_else(|| internal("no route"))?;
        // On a retry, `ctx.upstream` is the upstream that just failed.
        let exclude = ctx.upstream.filter(|_| ctx.connect_retries > 0);
        let now_ms = unix_millis(SystemTime::now());
        let pool = ctx.ai.as_ref().map_or(DEFAULT_POOL, |ai| ai.pool);
        let upstream = route
            .next_upstream_in(pool, now_ms, exclude)
            .ok_or_else(|| internal("route without upstreams"))?;
        let peer = Box::new(upstream.peer.clone());
        ctx.upstream = Some(upstream.addr);
        if let Some(ai) = ctx.ai.as_mut() {
            ai.fresh_attempt = true;
        }
        Ok(peer)
    }

    /// A failed connect takes the upstream out of rotation, and the request
    /// is tried once more on another upstream (nothing was sent yet, so
    /// this is safe for every method).
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let Some(route) = ctx.route() else {
            return e;
        };
        if let Some(up) = ctx.upstream.and_then(|a| route.upstream(a)) {
            let now_ms = unix_millis(SystemTime::now());
            let checked = route.health_check().is_some();
            let went_down = up.health.connect_failed(now_ms, checked) == Transition::WentDown;
            if is_tls_error(&e) {
                // A certificate the gateway cannot verify is a setup
                // mistake worth a line each time it is met.
                log::warn!(
                    "upstream {} of route {:?}: TLS handshake failed: {e}",
                    up.spec,
                    route.name
                );
            } else if went_down {
                log::warn!(
                    "upstream {} of route {:?} failed to connect ({:?}): out of rotation",
                    up.spec,
                    route.name,
                    e.etype()
                );
            }
        }
        let pool = ctx.ai.as_ref().map_or(DEFAULT_POOL, |ai| ai.pool);
        let retry = ctx.connect_retries == 0 && route.pool_len(pool) > 1;
        if retry {
            ctx.connect_retries += 1;
            e.set_retry(true);
        }
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(route) = ctx.route() else {
            return Ok(());
        };
        if let Some(up) = ctx.upstream.and_then(|a| route.upstream(a)) {
            if up.health.connected() == Transition::CameUp {
                log::info!(
                    "upstream {} of route {:?} answers again: back in rotation",
                    up.addr,
                    route.name
                );
            }
        }
        Ok(())
    }

    /// The credential never goes upstream; the user it belongs to does,
    /// with the other headers only the gateway may set.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let config = &ctx.live.snapshot.config;
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let who = Identity {
            user: ctx.user.as_ref(),
            request_id: ctx.request_id.as_ref(),
            peer,
            peer_trusted: peer.is_some_and(|p| any_contains(&config.trusted_proxies, p)),
            tls: is_tls(session),
        };
        let underscores = config.underscores_in_headers;
        rewrite_for_upstream(upstream_request, underscores, &who)?;
        let route = ctx.route().ok_or_else(|| internal("no route"))?;
        let uri = &upstream_request.uri;
        if let Some(target) = route.upstream_target(uri.path(), uri.query()) {
            upstream_request.set_raw_path(&target)?;
        }
        if let Some(ai) = ctx.ai.as_ref() {
            ai::upstream_request(ai, upstream_request)?;
        }
        Ok(())
    }

    /// A `101` the client did not ask for would turn the connection into a
    /// tunnel that no key check sees into: it is a 502 instead.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_status = Some(upstream_response.status.as_u16());
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS
            && !session.is_upgrade_req()
        {
            return Error::e_explain(
                ErrorType::HTTPStatus(502),
                "the upstream switched protocols unasked",
            );
        }
        ctx.ttfb = Some(ctx.start.elapsed());
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(ai) = ctx.ai.as_mut() {
            let req = session.req_header();
            ai::answer_head(ai, upstream_response, req.version, &req.method)?;
        }
        if let Some(id) = ctx.request_id.clone() {
            upstream_response.insert_header("x-request-id", id)?;
        }
        if let Some(origin) = &ctx.cors_origin {
            add_cors(upstream_response, origin)?;
        }
        Ok(())
    }

    /// Answers stream through untouched; on routes with `api` each piece
    /// is read for usage as it passes (see `ai::answer_body`).
    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        if let Some(ai) = ctx.ai.as_mut() {
            ai::answer_body(ai, body, end_of_stream);
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let refusal = ctx.late_refusal.or_else(|| refusal_for(e));
        ctx.outcome = match refusal {
            Some(r) => Outcome::Refused(r),
            None => Outcome::ClientGone,
        };
        if refusal == Some(Refusal::BodyTimeout) {
            self.metrics.client_timeout(ClientTimeout::Body);
        }
        // Once the upstream's answer has started, all that can be done is
        // to end the connection.
        let answerable = session.response_written().is_none();
        if let Some(r) = refusal.filter(|_| answerable) {
            let sent = send_refusal(
                session,
                r,
                None,
                ctx.cors_origin.as_ref(),
                ctx.request_id.as_ref(),
            )
            .await;
            if let Err(err) = sent {
                debug!("could not send the error response: {err}");
            }
        }
        FailToProxy {
            error_code: refusal.filter(|_| answerable).map_or(0, Refusal::status),
            can_reuse_downstream: false,
        }
    }

    /// A body over `max_body_size` or a stalled one, or a refusal decided
    /// late (a model the key may not use), is the client's doing,
    /// answered, audited and counted: no error line for each one (the log
    /// stays bounded whatever clients send).
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        matches!(
            refusal_for(e),
            Some(Refusal::BodyTooLarge | Refusal::BodyTimeout)
        ) || ctx.late_refusal.is_some()
    }

    /// Pingora's own error lines ("Fail to proxy") end with this summary:
    /// the method and path only, so a key sent in a query string is never
    /// logged.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        format!("{} {}", req.method, req.uri.path())
    }

    /// Metrics and the audit line, for every request: the context always
    /// holds its snapshot, so no path can skip them.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let latency = ctx.start.elapsed();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let bytes_in = session.body_bytes_read() as u64;
        let bytes_out = session.body_bytes_sent() as u64;
        let m = ctx.live.metrics_for(ctx.route_index);
        m.count_status(status);
        m.duration.observe(latency.as_secs_f64());
        if let Some(t) = ctx.ttfb {
            m.ttfb.observe(t.as_secs_f64());
        }
        m.bytes_in.inc_by(bytes_in);
        m.bytes_out.inc_by(bytes_out);
        if let Some(e) = e.filter(|e| e.esource() == &ErrorSource::Upstream) {
            m.upstream_error(upstream_error_kind(e));
        }
        if let Outcome::Refused(r) = ctx.outcome {
            self.metrics.refused(r);
        }
        let per_user = ctx.live.snapshot.config.metrics_per_user;
        let user = ctx.user.as_ref().and_then(|u| u.to_str().ok());
        if per_user {
            if let Some(user) = user {
                self.metrics.user_request(user);
            }
        }
        // Usage, on routes with `api`: counted into the key's budget (the
        // request that crosses it completes; the next is refused) and the
        // metrics, and written to the audit line.
        let ai = ctx.ai.as_deref();
        let mut usage = ai.and_then(|ai| ai.meter.as_ref()).map(AnswerMeter::usage);
        let model = usage
            .as_mut()
            .and_then(|u| u.model.take())
            .or_else(|| ai.and_then(|ai| ai.model.clone()));
        if let Some(u) = &usage {
            if let Some(meter) = &ctx.admission.tokens {
                meter.add(u.total(), self.now_ms());
            }
            let route = ctx.route().map_or(NO_ROUTE, |r| r.name.as_str());
            self.metrics.tokens(
                route,
                model.as_deref(),
                u.source.label(),
                u.prompt_tokens,
                u.completion_tokens,
                user.filter(|_| per_user),
            );
        }
        let Some(audit) = &self.audit else {
            return;
        };
        let req = session.req_header();
        audit.log(AuditRecord {
            ts: SystemTime::now() - latency,
            request_id: ctx
                .request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            client: ctx.client,
            method: req.method.as_str().to_string(),
            path: req.uri.path().to_string(),
            route: ctx.route().map(|r| r.name.clone()),
            key_id: ctx.key_id.map(|k| k.to_string()),
            user: ctx
                .user
                .as_ref()
                .map(|u| String::from_utf8_lossy(u.as_bytes()).into_owned()),
            decision: ctx.outcome.label(),
            status,
            upstream: ctx.upstream,
            upstream_status: ctx.upstream_status,
            latency_ms: latency,
            ttfb_ms: ctx.ttfb,
            bytes_in,
            bytes_out,
            model,
            prompt_tokens: usage.as_ref().and_then(|u| u.prompt_tokens),
            completion_tokens: usage.as_ref().and_then(|u| u.completion_tokens),
            usage: usage.as_ref().map(|u| u.source.label()),
        });
    }
}
