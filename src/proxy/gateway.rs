//! The Pingora `ProxyHttp` implementation: the hooks, in the order Pingora
//! calls them (see the diagram in the module above).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use log::debug;
use pingora::http::ResponseHeader;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::ErrorSource;

use super::ai;
use super::client_stream;
use super::context::{Caller, Outcome, Replay, RequestCtx, TryFailure};
use super::end_users;
use super::fleet;
use super::framing::check_head;
use super::headers::{rewrite_for_upstream, Identity};
use super::listener::{is_tls, FrontDoor, Listeners};
use super::phases::{self, KeyCheck, Limited, Now, Stop};
use super::reply::{add_cors, refusal_for, send_refusal, upstream_error_kind};
use crate::cluster::Cluster;
use crate::config::any_contains;
use crate::keys::{unix_millis, KeyDenial, KeyDigest};
use crate::ops::{
    request_id, AuditLog, AuditRecord, ClientTimeout, FailedTry, Metrics, SharedLive, NO_ROUTE,
};
use crate::policy::{
    admit_locally, Admission, Credential, Refusal, Request, Route, Upstream, DEFAULT_POOL,
};
use crate::state::{Carried, CounterId, Transition};
use crate::usage::AnswerMeter;

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

/// What a [`Gateway`] is made of; the daemon builds one at start.
pub struct GatewayParts {
    pub live: SharedLive,
    pub carried: Arc<Carried>,
    pub metrics: Arc<Metrics>,
    pub audit: Option<AuditLog>,
    pub listeners: Listeners,
    pub cluster: Option<Arc<Cluster>>,
    /// The zero of the monotonic clock per-key rate windows are kept in.
    pub started: Instant,
}

impl From<GatewayParts> for Gateway {
    fn from(p: GatewayParts) -> Gateway {
        Gateway {
            live: p.live,
            carried: p.carried,
            metrics: p.metrics,
            audit: p.audit,
            listeners: p.listeners,
            cluster: p.cluster,
            started: p.started,
        }
    }
}

impl Gateway {
    /// Milliseconds of the monotonic clock per-key windows are kept in.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The clocks of one request, read once.
    fn now(&self) -> Now {
        let unix_ms = unix_millis(SystemTime::now());
        Now {
            unix_ms,
            unix_s: u32::try_from(unix_ms / 1000).unwrap_or(u32::MAX),
            mono_ms: self.now_ms(),
        }
    }

    /// The request path up to the upstream: the phases, in their order
    /// (see `phases`). Sets in `ctx` what later hooks need: the client,
    /// the route, the caller, the admission, the AI request.
    async fn admit(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), Stop> {
        let now = self.now();
        let snapshot = &ctx.live.snapshot;
        let config = &snapshot.config;
        let req = session.req_header();
        let peer = session.client_addr().and_then(|a| a.as_inet()).copied();
        let spec = &config.failed_key_throttle;
        let failed_keys = &self.carried.failed_keys;
        let client = phases::admission(
            peer,
            &req.headers,
            &config.trusted_proxies,
            spec,
            failed_keys,
            now.unix_s,
        );
        ctx.client = client.addr;
        check_head(session)?;
        let request = Request::from_head(
            &req.method,
            req.uri.path(),
            req.version,
            &req.headers,
            client.ip,
        );
        let decision = snapshot.decide(&request, now.unix_ms);
        ctx.route_index = decision.route.map(|(i, _)| i);
        let route = decision.route.map(|(_, r)| r);
        ctx.cors_origin = route.and_then(|r| r.cors_origin(request.origin)).cloned();
        let check = KeyCheck {
            client: &client,
            spec,
            failed_keys,
            cluster: self.cluster.as_ref(),
            now_s: now.unix_s,
        };
        let principal = phases::key(decision.verdict, &check).inspect_err(|r| {
            if let (Some(KeyDenial::Expired | KeyDenial::Disabled), Credential::Key(k)) =
                (r.key_denial(), request.credential)
            {
                ctx.tried_key = Some(KeyDigest::of(k).id());
            }
        })?;
        let route = route.ok_or(Refusal::Internal)?;
        let shared = self.cluster.is_some();
        let end_user = end_users::find(
            snapshot,
            &principal,
            route,
            &req.headers,
            now.mono_ms,
            shared,
        );
        ctx.caller = Some(Caller {
            id: principal.id,
            user: principal.user.header.clone(),
            end_user: end_user.as_ref().ok().and_then(|e| e.value.clone()),
            extras: principal.extras.map(|e| e.slot),
        });
        let end_user = end_user?;
        if end_user.evicted {
            self.metrics.alerts().end_users_evicted.inc();
        }
        ctx.body.max = snapshot.limits_for(&principal, route).max_body;
        let counted = snapshot.counted(&principal, route);
        let limited = phases::limits(counted, CounterId::key(principal.id), shared);
        ctx.ai = ai::start(route, req.uri.path(), principal.models);
        // The pure check first: a refused model costs no limit (nor a
        // call to Redis).
        if let Some(ai) = ctx.ai.as_deref() {
            ai::check_path_model(ai)?;
        }
        ctx.admission = self.take_limits(end_user.limited, now.mono_ms).await?;
        let key_admission = self.take_limits(limited, now.mono_ms).await?;
        ctx.admission = key_admission.with_end_user(Some(std::mem::take(&mut ctx.admission)));
        if shared {
            end_users::note_shared_alerts(&ctx.admission, snapshot, ctx.caller.as_ref());
        }
        if !route.retry.on_status.is_empty() {
            // Before any body is read: a retried answer replays it.
            session.as_downstream_mut().enable_retry_buffering();
        }
        if let Some(ai) = ctx.ai.as_deref_mut() {
            if ai::wants_body(ai, route) && !session.is_body_empty() {
                ai::read_body_start(session, ai, route).await??;
            }
        }
        let pool = ctx.ai.as_ref().map_or(DEFAULT_POOL, |ai| ai.pool);
        ctx.tries.lease = Some(fleet::choose(session, route, pool, now.unix_ms).await?);
        Ok(())
    }

    /// Takes what the request uses of its key's limits, here or in Redis
    /// (a call bounded by `shared_state.timeout`).
    async fn take_limits(&self, limited: Limited, now_ms: u64) -> Result<Admission, Refusal> {
        match (limited, self.cluster.as_ref()) {
            (Limited::Free, _) => Ok(Admission::default()),
            (Limited::Here(limits, counter), _) => admit_locally(limits, &counter, now_ms),
            (Limited::Shared(id, limits, counter), Some(cluster)) => {
                cluster.admit(id, limits, &counter, now_ms).await
            }
            (Limited::Shared(_, limits, counter), None) => admit_locally(limits, &counter, now_ms),
        }
    }
}

impl Gateway {
    /// Records the current try's failure and takes a slot for the next
    /// try, if the route retries it and an upstream can take it now
    /// (see `fleet::next_try`). True when the request is tried again.
    fn retry(&self, ctx: &mut RequestCtx, failure: TryFailure, now_ms: i64) -> bool {
        let (Some(index), Some(addr)) = (ctx.route_index, ctx.upstream) else {
            return false;
        };
        let Some(route) = ctx.live.snapshot.router.get(index) else {
            return false;
        };
        let retried = match failure {
            TryFailure::Connect => route.retry.on_connect,
            TryFailure::Status(s) => route.retry.on(s),
        };
        let tag = ctx.tries.lease.as_ref().map(|l| l.tag);
        let m = tag.and_then(|t| ctx.live.upstream_metrics(index, t));
        if failure == TryFailure::Connect {
            // Counted whether or not it is retried; an answer only if it
            // is (otherwise it goes to the client: answered).
            ctx.tries.counted = true;
            if let Some(m) = m {
                m.failed.inc();
            }
        }
        if !retried {
            return false;
        }
        let pool = ctx.ai.as_ref().map_or(DEFAULT_POOL, |ai| ai.pool);
        ctx.tries.failed.push((addr, failure));
        let Some(next) = fleet::next_try(route, pool, &ctx.tries, now_ms) else {
            ctx.tries.failed.pop();
            return false;
        };
        ctx.tries.next = Some(next);
        if let Some(m) = m {
            if failure != TryFailure::Connect {
                m.failed.inc();
            }
            m.retried.inc();
        }
        ctx.live.metrics_for(Some(index)).retries.inc();
        true
    }

    /// Whether an answer with `status` goes to another upstream instead of
    /// the client: the route retries the status, nothing of the answer
    /// was sent, the request body can be replayed (still whole in
    /// Pingora's retry buffer), and an upstream can take it now.
    fn retries_answer(&self, session: &mut Session, ctx: &mut RequestCtx, status: u16) -> bool {
        if !ctx.route().is_some_and(|r| r.retry.on(status)) {
            ctx.tries.status_retry = false;
            return false;
        }
        let replayable = !session.as_downstream().retry_buffer_truncated()
            && ctx
                .ai
                .as_ref()
                .is_none_or(|ai| !matches!(ai.replay, Replay::Prefix(_)));
        let now_ms = unix_millis(SystemTime::now());
        let retried = session.response_written().is_none()
            && replayable
            && self.retry(ctx, TryFailure::Status(status), now_ms);
        ctx.tries.status_retry = retried;
        retried
    }
}

/// The last try in its upstream's metrics: answered (with the time to
/// its head), or failed, unless `fail_to_connect` counted it already.
fn count_last_try(ctx: &RequestCtx, e: Option<&Error>) {
    let (Some(index), Some(lease), Some(_)) =
        (ctx.route_index, ctx.tries.lease.as_ref(), ctx.upstream)
    else {
        return;
    };
    let Some(m) = ctx.live.upstream_metrics(index, lease.tag) else {
        return;
    };
    if ctx.upstream_status.is_some() {
        m.answered.inc();
        if let Some(t) = ctx.ttfb {
            m.latency.observe(t.as_secs_f64());
        }
    } else if e.is_some_and(|e| e.esource() == &ErrorSource::Upstream) && !ctx.tries.counted {
        m.failed.inc();
    }
}

/// A failed connect takes the upstream out of rotation, with a log line
/// when it went down (and each time for TLS: a setup mistake).
fn note_connect_failure(route: &Route, up: &Upstream, e: &Error, now_ms: i64) {
    let checked = route.health_check().is_some();
    let went_down = up.state.health.connect_failed(now_ms, checked) == Transition::WentDown;
    if is_tls_error(e) {
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

    /// The front door (ACME challenges, redirects), then the phases of
    /// `phases` in their order; a refusal is answered here.
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
        let headers = &session.req_header().headers;
        ctx.request_id = Some(request_id::for_request(headers.get("x-request-id")));
        match self.admit(session, ctx).await {
            Ok(()) => {
                ctx.outcome = Outcome::Accepted;
                Ok(false)
            }
            Err(Stop::Fail(e)) => Err(e),
            Err(Stop::Refuse(refusal)) => {
                let req = session.req_header();
                debug!("refused {} {}: {refusal:?}", req.method, req.uri.path());
                ctx.outcome = Outcome::Refused(refusal);
                let route = ctx.route();
                let (origin, id) = (ctx.cors_origin.as_ref(), ctx.request_id.as_ref());
                send_refusal(session, refusal, route, origin, id).await?;
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
        if let (Some(max), Some(chunk)) = (ctx.body.max, body.as_ref()) {
            ctx.body.seen = ctx.body.seen.saturating_add(chunk.len() as u64);
            if ctx.body.seen > max {
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    "the request body grew past max_body_size",
                );
            }
        }
        Ok(())
    }

    /// The upstream of the slot the request holds: the one the upstream
    /// phase took, or the one taken for a retry. A retry Pingora decides
    /// itself (a reused connection that closed) goes to the same upstream.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        if let Some(next) = ctx.tries.next.take() {
            // The failed try's slot is given back here.
            ctx.tries.lease = Some(next);
        }
        ctx.tries.counted = false;
        ctx.upstream_status = None;
        let route = ctx.route().ok_or_else(|| internal("no route"))?;
        let upstream = ctx
            .tries
            .lease
            .as_ref()
            .and_then(|l| route.leased(l))
            .ok_or_else(|| internal("no upstream slot"))?;
        let peer = Box::new(upstream.peer.clone());
        ctx.upstream = Some(upstream.addr);
        if let Some(ai) = ctx.ai.as_mut() {
            ai.fresh_attempt = true;
        }
        Ok(peer)
    }

    /// A failed connect takes the upstream out of rotation; the request
    /// goes to another upstream when the route retries connects (the
    /// default: once), nothing having been sent yet.
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
        let now_ms = unix_millis(SystemTime::now());
        if let Some(up) = ctx.upstream.and_then(|a| route.upstream(a)) {
            note_connect_failure(route, up, &e, now_ms);
        }
        let next = self.retry(ctx, TryFailure::Connect, now_ms);
        if next {
            e.set_retry(true);
        }
        e
    }

    /// Pingora's default policy after a connection is made (retry only
    /// idempotent requests whose body is still in the retry buffer, and
    /// only errors on reused connections), except for an answer status
    /// the route retries: that was decided in `upstream_response_filter`,
    /// body checked, for any method.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if std::mem::take(&mut ctx.tries.status_retry) {
            return e;
        }
        let idempotent = session.req_header().method.is_idempotent();
        if !idempotent || session.as_downstream().retry_buffer_truncated() {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
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
            if up.state.health.connected() == Transition::CameUp {
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
            user: ctx.caller.as_ref().map(|c| &c.user),
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
        let status = upstream_response.status.as_u16();
        ctx.upstream_status = Some(status);
        if self.retries_answer(session, ctx, status) {
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                "the upstream's answer is retried on another upstream",
            );
            e.set_retry(true);
            return Err(e);
        }
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
                ctx.route(),
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
        count_last_try(ctx, e);
        if let Outcome::Refused(r) = ctx.outcome {
            self.metrics.refused(r);
        }
        let per_user = ctx.live.snapshot.config.metrics_per_user;
        let user = ctx
            .caller
            .as_ref()
            .map(|c| &c.user)
            .and_then(|u| u.to_str().ok());
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
            let (snapshot, caller) = (&ctx.live.snapshot, ctx.caller.as_ref());
            let queue = &self.carried.alerts;
            let now_ms = self.now_ms();
            let dropped =
                end_users::count_tokens(&ctx.admission, u.total(), now_ms, caller, snapshot, queue);
            self.metrics.alerts_dropped(dropped);
            let route = ctx.route().map_or(NO_ROUTE, |r| r.name.as_str());
            self.metrics.tokens(
                route,
                model.as_deref(),
                u.source.label(),
                u.prompt_tokens,
                u.completion_tokens,
                user.filter(|_| per_user),
            );
            let (creation, read) = (u.cache_creation_tokens, u.cache_read_tokens);
            self.metrics
                .cache_tokens(route, model.as_deref(), creation, read);
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
            key_id: ctx
                .caller
                .as_ref()
                .map(|c| c.id)
                .or(ctx.tried_key)
                .map(|id| id.to_string()),
            user: ctx
                .caller
                .as_ref()
                .map(|c| String::from_utf8_lossy(c.user.as_bytes()).into_owned()),
            end_user: ctx
                .caller
                .as_ref()
                .and_then(|c| c.end_user.as_ref())
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            decision: ctx.outcome.label(),
            status,
            upstream: ctx.upstream,
            upstream_status: ctx.upstream_status,
            latency_ms: latency,
            ttfb_ms: ctx.ttfb,
            bytes_in,
            bytes_out,
            model,
            requested_model: ai.and_then(|ai| ai.requested_model.clone()),
            retried: ctx
                .tries
                .failed
                .iter()
                .map(|(upstream, failure)| FailedTry {
                    upstream: *upstream,
                    failed: match failure {
                        TryFailure::Connect => "connect".to_string(),
                        TryFailure::Status(s) => s.to_string(),
                    },
                })
                .collect(),
            prompt_tokens: usage.as_ref().and_then(|u| u.prompt_tokens),
            completion_tokens: usage.as_ref().and_then(|u| u.completion_tokens),
            cache_creation_tokens: usage.as_ref().and_then(|u| u.cache_creation_tokens),
            cache_read_tokens: usage.as_ref().and_then(|u| u.cache_read_tokens),
            usage: usage.as_ref().map(|u| u.source.label()),
        });
    }
}

/// The admission order, through Pingora's own request hooks: each test
/// writes a literal request into an in-memory stream, lets Pingora parse
/// it into a `Session`, and runs `request_filter` on it. No socket, no
/// upstream, milliseconds.
#[cfg(test)]
mod tests {
    use std::path::Path;

    use arc_swap::ArcSwap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::Config;
    use crate::ops::Live;
    use crate::policy::Snapshot;
    use crate::tls::Challenges;

    const CONFIG: &str = r#"
listen: "127.0.0.1:1"
keys_file: k.json
failed_key_throttle: {max_failures: 2, window: 60s, cooldown: 60s}
allow: ["0.0.0.0", "10.0.0.0/8"]
routes:
  - {name: chat, path_prefix: /chat/, service: chat, upstreams: ["127.0.0.1:2"], methods: [POST]}
  - {name: tts, path_prefix: /tts/, service: tts, upstreams: ["127.0.0.1:2"], rate_limit: 1/min}
"#;
    const KEYS: &str = r#"{"team-key": {"user": "ann", "service": "*"}, "new-key": {"user": "bob", "service": "chat"}}"#;

    fn gateway(config: &str) -> Gateway {
        let cfg = Config::parse(Path::new("/t/g.yaml"), config).expect("config");
        let carried = Arc::new(Carried::default());
        let snapshot = Snapshot::compile(cfg, KEYS, 1, &carried).expect("snapshot");
        let metrics = Arc::new(Metrics::new());
        let live = Arc::new(ArcSwap::from_pointee(Live::new(snapshot, &metrics)));
        Gateway::from(GatewayParts {
            live,
            carried,
            metrics,
            audit: None,
            listeners: Listeners::new(&[], Arc::new(Challenges::default())),
            cluster: None,
            started: Instant::now(),
        })
    }

    /// What `request_filter` made of one request: whether it answered
    /// (and the answer's status line), and the outcome it recorded.
    async fn filter(gw: &Gateway, request: &str) -> (Option<String>, Outcome, Option<String>) {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(request.as_bytes()).await.expect("write");
        let mut session = Session::new_h1(Box::new(server));
        assert!(session.read_request().await.expect("a request"));
        let mut ctx = gw.new_ctx();
        let answered = gw
            .request_filter(&mut session, &mut ctx)
            .await
            .expect("no Pingora error");
        drop(session);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.expect("read the answer");
        let text = String::from_utf8_lossy(&out);
        let status = text.lines().next().map(str::to_owned);
        assert_eq!(answered, status.is_some(), "{text}");
        let user = ctx
            .caller
            .map(|c| String::from_utf8_lossy(c.user.as_bytes()).into_owned());
        (status, ctx.outcome, user)
    }

    fn post(path: &str, key: Option<&str>) -> String {
        let key = key.map_or(String::new(), |k| format!("X-API-Key: {k}\r\n"));
        format!("POST {path} HTTP/1.1\r\nHost: t\r\n{key}Content-Length: 0\r\n\r\n")
    }

    fn refused(r: Refusal) -> Outcome {
        Outcome::Refused(r)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn the_path_route_and_method_are_judged_before_the_key() {
        runtime().block_on(async {
            let gw = gateway(CONFIG);
            let (status, outcome, _) = filter(&gw, &post("/chat/../tts/x", None)).await;
            assert_eq!(status.as_deref(), Some("HTTP/1.1 400 Bad Request"));
            assert_eq!(outcome, refused(Refusal::BadPath));
            let (_, outcome, _) = filter(&gw, &post("/nowhere", None)).await;
            assert_eq!(outcome, refused(Refusal::NoRoute));
            let get = "GET /chat/x HTTP/1.1\r\nHost: t\r\n\r\n";
            let (status, outcome, _) = filter(&gw, get).await;
            assert_eq!(status.as_deref(), Some("HTTP/1.1 405 Method Not Allowed"));
            assert_eq!(outcome, refused(Refusal::MethodNotAllowed));
            let (status, outcome, _) = filter(&gw, &post("/chat/x", None)).await;
            assert_eq!(status.as_deref(), Some("HTTP/1.1 401 Unauthorized"));
            assert_eq!(
                outcome,
                refused(Refusal::Key(crate::keys::KeyDenial::Missing))
            );
        });
    }

    #[test]
    fn a_head_check_comes_before_everything_and_the_allow_list_before_the_path() {
        runtime().block_on(async {
            let gw = gateway(CONFIG);
            let both = "POST /chat/x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
            let (_, outcome, _) = filter(&gw, both).await;
            assert_eq!(outcome, refused(Refusal::BadFraming));
            // The in-memory stream has no address: the gateway takes
            // 0.0.0.0, which this allow list lacks.
            let gw = gateway(&CONFIG.replace(r#"["0.0.0.0", "10.0.0.0/8"]"#, r#"["10.0.0.0/8"]"#));
            let (status, outcome, _) = filter(&gw, &post("/chat/../x", Some("team-key"))).await;
            assert_eq!(status.as_deref(), Some("HTTP/1.1 403 Forbidden"));
            assert_eq!(outcome, refused(Refusal::IpNotAllowed));
        });
    }

    #[test]
    fn the_throttle_judges_the_key_then_the_limits_count() {
        runtime().block_on(async {
            let gw = gateway(CONFIG);
            let (status, outcome, user) = filter(&gw, &post("/tts/x", Some("team-key"))).await;
            assert_eq!((status, outcome), (None, Outcome::Accepted));
            assert_eq!(user.as_deref(), Some("ann"));
            for _ in 0..2 {
                let (_, outcome, _) = filter(&gw, &post("/chat/x", Some("stale"))).await;
                assert_eq!(
                    outcome,
                    refused(Refusal::Key(crate::keys::KeyDenial::Unknown))
                );
            }
            // Blocked: a right key new to the address is refused like a
            // wrong one; the key that worked before passes the throttle and
            // meets its route's rate limit (1/min, used above).
            let (status, outcome, _) = filter(&gw, &post("/chat/x", Some("new-key"))).await;
            assert_eq!(status.as_deref(), Some("HTTP/1.1 429 Too Many Requests"));
            assert!(matches!(
                outcome,
                Outcome::Refused(Refusal::KeyThrottled { .. })
            ));
            let (_, outcome, _) = filter(&gw, &post("/tts/x", Some("team-key"))).await;
            assert!(
                matches!(outcome, Outcome::Refused(Refusal::RateLimited { .. })),
                "{outcome:?}"
            );
            let (status, _, user) = filter(&gw, &post("/chat/x", Some("team-key"))).await;
            assert_eq!((status, user.as_deref()), (None, Some("ann")));
        });
    }
}
