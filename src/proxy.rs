//! The Pingora `ProxyHttp` implementation: the whole path of a request.
//!
//! ```text
//!  client ─▶ early_request_filter    bound downstream keep-alive
//!         ─▶ request_filter          load the snapshot once; request id;
//!              │                     route, method, key
//!              └ denied ─▶ JSON 400/401/403/404/405, then logging
//!         ─▶ upstream_peer           round-robin over the route's peers
//!         ─▶ upstream_request_filter strip credentials, add X-Gateway-User
//!                                    and X-Request-Id, strip the prefix
//!         ◀─▶ bodies stream both ways, chunk by chunk (Pingora's default)
//!         ─▶ fail_to_proxy           502/504 with a JSON body
//!         ─▶ logging                 metrics and the audit line
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use log::debug;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};
use prometheus::IntGauge;

use crate::audit::{AuditLog, AuditRecord};
use crate::health::Transition;
use crate::keys::{unix_millis, KeyDenial, KeyId};
use crate::metrics::{denial_label, Metrics, UpstreamErrorKind};
use crate::snapshot::{presented_key, Denial, SharedSnapshot, Snapshot};

/// How long an idle client keep-alive connection is kept open. Pingora's
/// default is forever, which lets idle clients pile up.
pub const CLIENT_KEEPALIVE_SECS: u64 = 60;

/// The `WWW-Authenticate` challenge sent with every 401.
const CHALLENGE: &str = "Bearer realm=\"ai-gateway\"";

/// The gateway's proxy logic: the snapshot handle, metrics and the audit log.
pub struct Gateway {
    snapshot: SharedSnapshot,
    metrics: Arc<Metrics>,
    audit: Option<AuditLog>,
}

impl Gateway {
    pub fn new(snapshot: SharedSnapshot, metrics: Arc<Metrics>, audit: Option<AuditLog>) -> Self {
        Gateway {
            snapshot,
            metrics,
            audit,
        }
    }
}

/// Per-request state.
pub struct RequestCtx {
    start: Instant,
    /// The snapshot this request was decided against; kept to its end so a
    /// reload cannot change the route under it.
    snapshot: Option<Arc<Snapshot>>,
    route_index: Option<usize>,
    request_id: Option<HeaderValue>,
    user: Option<HeaderValue>,
    key_id: Option<KeyId>,
    /// `accepted`, or the reason for a denial.
    decision: &'static str,
    upstream: Option<SocketAddr>,
    upstream_status: Option<u16>,
    ttfb: Option<Duration>,
    /// Connect attempts retried on another upstream (at most one).
    connect_retries: u8,
    _in_flight: InFlight,
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

/// An answer the gateway gives itself: status, stable JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: &'static str,
}

impl Reply {
    const fn new(status: u16, body: &'static str) -> Self {
        Reply { status, body }
    }
}

/// The reply for each denial. The messages are part of the interface:
/// clients may match on them, so they do not change.
pub fn denial_reply(d: Denial) -> Reply {
    match d {
        Denial::BadPath => Reply::new(400, r#"{"error":"invalid path"}"#),
        Denial::NoRoute => Reply::new(404, r#"{"error":"no route for this path"}"#),
        Denial::MethodNotAllowed { .. } => Reply::new(405, r#"{"error":"method not allowed"}"#),
        Denial::Key(KeyDenial::Missing) => Reply::new(401, r#"{"error":"missing api key"}"#),
        Denial::Key(KeyDenial::Unknown) => Reply::new(401, r#"{"error":"invalid api key"}"#),
        Denial::Key(KeyDenial::Expired) => Reply::new(401, r#"{"error":"api key expired"}"#),
        Denial::Key(KeyDenial::Disabled) => Reply::new(401, r#"{"error":"api key revoked"}"#),
        Denial::Key(KeyDenial::WrongService) => {
            Reply::new(403, r#"{"error":"api key not allowed for this service"}"#)
        }
    }
}

/// The reply for a proxying failure, by HTTP status.
pub fn error_reply(status: u16) -> Reply {
    match status {
        502 => Reply::new(502, r#"{"error":"upstream unavailable"}"#),
        504 => Reply::new(504, r#"{"error":"upstream timed out"}"#),
        500 => Reply::new(500, r#"{"error":"internal error"}"#),
        413 => Reply::new(413, r#"{"error":"request body too large"}"#),
        s if (400..500).contains(&s) => Reply::new(s, r#"{"error":"bad request"}"#),
        s => Reply::new(s, r#"{"error":"gateway error"}"#),
    }
}

/// Which status a proxying error becomes. Pingora's default maps every
/// upstream error to 502; a timeout talking to the upstream is a 504.
pub fn error_status(e: &Error) -> u16 {
    use ErrorType::*;
    match (e.etype(), e.esource()) {
        (HTTPStatus(code), _) => *code,
        (
            ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout,
            ErrorSource::Upstream,
        ) => 504,
        (_, ErrorSource::Upstream) => 502,
        // The client is gone: there is nobody to answer.
        (WriteError | ReadError | ConnectionClosed, ErrorSource::Downstream) => 0,
        (_, ErrorSource::Downstream) => 400,
        _ => 500,
    }
}

/// Writes `reply` as a complete JSON response and closes the connection
/// afterwards (an unread request body is never drained into the void).
async fn send_reply(
    session: &mut Session,
    reply: Reply,
    allow: Option<&HeaderValue>,
    request_id: Option<&HeaderValue>,
) -> Result<()> {
    let mut resp = ResponseHeader::build(reply.status, Some(6))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", reply.body.len())?;
    resp.insert_header("cache-control", "no-store")?;
    if reply.status == 401 {
        resp.insert_header("www-authenticate", CHALLENGE)?;
    }
    if let Some(allow) = allow {
        resp.insert_header("allow", allow.clone())?;
    }
    if let Some(id) = request_id {
        resp.insert_header("x-request-id", id.clone())?;
    }
    session
        .as_downstream_mut()
        .write_error_response(resp, Bytes::from_static(reply.body.as_bytes()))
        .await
}

fn internal(why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::InternalError, why)
}

/// The largest request head accepted (request line and headers). Model
/// APIs need a few hundred bytes; a huge header is abuse or a mistake.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Requests refused before any routing: a header block over
/// [`MAX_HEADER_BYTES`] (431), or both `Content-Length` and
/// `Transfer-Encoding` (400: the ambiguity request smuggling relies on).
/// Pingora drops `Content-Length` when both are sent, so for requests with
/// `Transfer-Encoding` (rare) the raw head is checked for it.
fn malformed(session: &Session) -> Option<(Reply, &'static str)> {
    let req = session.req_header();
    let headers = &req.headers;
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        let sent_length = headers.contains_key(http::header::CONTENT_LENGTH)
            || session
                .as_downstream()
                .as_http1()
                .is_some_and(|h1| has_content_length_line(&h1.get_headers_raw_bytes()));
        if sent_length {
            return Some((
                Reply::new(
                    400,
                    r#"{"error":"both content-length and transfer-encoding"}"#,
                ),
                "bad_framing",
            ));
        }
    }
    let size = req.raw_path().len()
        + headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if size > MAX_HEADER_BYTES {
        return Some((
            Reply::new(431, r#"{"error":"request header fields too large"}"#),
            "header_too_large",
        ));
    }
    None
}

/// Whether a raw request head has a `Content-Length` header line (the
/// request line is skipped; the name may carry stray whitespace).
fn has_content_length_line(head: &[u8]) -> bool {
    head.split(|b| *b == b'\n').skip(1).any(|line| {
        line.split(|b| *b == b':')
            .next()
            .is_some_and(|name| name.trim_ascii().eq_ignore_ascii_case(b"content-length"))
    })
}

/// The fixed label of an upstream failure.
fn upstream_error_kind(e: &Error) -> UpstreamErrorKind {
    use ErrorType::*;
    match e.etype() {
        ConnectRefused | ConnectNoRoute | ConnectError => UpstreamErrorKind::Refused,
        ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout => {
            UpstreamErrorKind::Timeout
        }
        ConnectionClosed | ReadError | WriteError => UpstreamErrorKind::Reset,
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 => UpstreamErrorKind::InvalidResponse,
        _ => UpstreamErrorKind::Other,
    }
}

/// The audit `decision` of a denial.
fn denial_decision(d: Denial) -> &'static str {
    match d {
        Denial::BadPath => "bad_path",
        Denial::NoRoute => "no_route",
        Denial::MethodNotAllowed { .. } => "method_not_allowed",
        Denial::Key(k) => denial_label(k),
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            snapshot: None,
            route_index: None,
            request_id: None,
            user: None,
            key_id: None,
            decision: "error",
            upstream: None,
            upstream_status: None,
            ttfb: None,
            connect_retries: 0,
            _in_flight: InFlight::new(&self.metrics.in_flight),
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        session.set_keepalive(Some(CLIENT_KEEPALIVE_SECS));
        Ok(())
    }

    /// Route, method and key: the one decision, against one snapshot load.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let snapshot = self.snapshot.load_full();
        let now_ms = unix_millis(SystemTime::now());
        let req = session.req_header();
        ctx.request_id = Some(crate::request_id::for_request(
            req.headers.get("x-request-id"),
        ));
        if let Some((reply, decision)) = malformed(session) {
            ctx.decision = decision;
            ctx.snapshot = Some(snapshot);
            send_reply(session, reply, None, ctx.request_id.as_ref()).await?;
            return Ok(true);
        }
        let decision = snapshot.decide(
            &req.method,
            req.uri.path(),
            presented_key(&req.headers),
            now_ms,
        );
        match decision {
            Ok(admitted) => {
                ctx.route_index = Some(admitted.route_index);
                ctx.user = Some(admitted.principal.user.header.clone());
                ctx.key_id = Some(admitted.principal.id);
                ctx.decision = "accepted";
                ctx.snapshot = Some(snapshot);
                Ok(false)
            }
            Err(denial) => {
                debug!("denied {} {}: {:?}", req.method, req.uri.path(), denial);
                ctx.decision = denial_decision(denial);
                ctx.route_index = match denial {
                    Denial::MethodNotAllowed { route_index } => Some(route_index),
                    Denial::Key(_) => snapshot.router.find(req.uri.path()).map(|(i, _)| i),
                    Denial::BadPath | Denial::NoRoute => None,
                };
                if let Denial::Key(k) = denial {
                    self.metrics.auth_failure(k);
                }
                let allow = match denial {
                    Denial::MethodNotAllowed { route_index } => snapshot
                        .router
                        .get(route_index)
                        .and_then(|r| r.allow_header()),
                    _ => None,
                };
                send_reply(
                    session,
                    denial_reply(denial),
                    allow,
                    ctx.request_id.as_ref(),
                )
                .await?;
                ctx.snapshot = Some(snapshot);
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let snapshot = ctx
            .snapshot
            .as_ref()
            .ok_or_else(|| internal("no snapshot"))?;
        let route = ctx
            .route_index
            .and_then(|i| snapshot.router.get(i))
            .ok_or_else(|| internal("no route"))?;
        // On a retry, `ctx.upstream` is the upstream that just failed.
        let exclude = ctx.upstream.filter(|_| ctx.connect_retries > 0);
        let now_ms = unix_millis(SystemTime::now());
        let upstream = route
            .next_upstream(now_ms, exclude)
            .ok_or_else(|| internal("route without upstreams"))?;
        ctx.upstream = Some(upstream.addr);
        Ok(Box::new(upstream.peer.clone()))
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
        let Some(snapshot) = ctx.snapshot.as_ref() else {
            return e;
        };
        let Some(route) = ctx.route_index.and_then(|i| snapshot.router.get(i)) else {
            return e;
        };
        if let Some(up) = ctx.upstream.and_then(|a| route.upstream(a)) {
            let now_ms = unix_millis(SystemTime::now());
            let checked = route.health_check().is_some();
            if up.health.connect_failed(now_ms, checked) == Transition::WentDown {
                log::warn!(
                    "upstream {} of route {:?} failed to connect ({:?}): out of rotation",
                    up.addr,
                    route.name,
                    e.etype()
                );
            }
        }
        if ctx.connect_retries == 0 && route.upstreams().len() > 1 {
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
        let Some(snapshot) = ctx.snapshot.as_ref() else {
            return Ok(());
        };
        let route = ctx.route_index.and_then(|i| snapshot.router.get(i));
        if let Some((route, up)) =
            route.and_then(|r| ctx.upstream.and_then(|a| r.upstream(a)).map(|u| (r, u)))
        {
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

    /// The credential never goes upstream; the user it belongs to does.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_request.remove_header("x-api-key");
        upstream_request.remove_header("authorization");
        if let Some(user) = ctx.user.clone() {
            upstream_request.insert_header("x-gateway-user", user)?;
        }
        if let Some(id) = ctx.request_id.clone() {
            upstream_request.insert_header("x-request-id", id)?;
        }
        let snapshot = ctx
            .snapshot
            .as_ref()
            .ok_or_else(|| internal("no snapshot"))?;
        let route = ctx
            .route_index
            .and_then(|i| snapshot.router.get(i))
            .ok_or_else(|| internal("no route"))?;
        let uri = &upstream_request.uri;
        if let Some(target) = route.upstream_target(uri.path(), uri.query()) {
            upstream_request.set_raw_path(&target)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_status = Some(upstream_response.status.as_u16());
        ctx.ttfb = Some(ctx.start.elapsed());
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(id) = ctx.request_id.clone() {
            upstream_response.insert_header("x-request-id", id)?;
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let status = error_status(e);
        if status > 0 {
            if let Err(err) =
                send_reply(session, error_reply(status), None, ctx.request_id.as_ref()).await
            {
                debug!("could not send the error response: {err}");
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    /// Metrics and the audit line, for every request.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let latency = ctx.start.elapsed();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let bytes_in = session.body_bytes_read() as u64;
        let bytes_out = session.body_bytes_sent() as u64;
        let Some(snapshot) = ctx.snapshot.as_ref() else {
            return;
        };
        if let Some(m) = snapshot.metrics_for(ctx.route_index) {
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
        }
        if snapshot.config.metrics_per_user {
            if let Some(user) = ctx.user.as_ref().and_then(|u| u.to_str().ok()) {
                self.metrics.user_request(user);
            }
        }
        let Some(audit) = &self.audit else {
            return;
        };
        let req = session.req_header();
        let route = ctx.route_index.and_then(|i| snapshot.router.get(i));
        audit.log(AuditRecord {
            ts: SystemTime::now() - latency,
            request_id: ctx
                .request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            client: session.client_addr().and_then(|a| a.as_inet()).copied(),
            method: req.method.as_str().to_string(),
            path: req.uri.path().to_string(),
            route: route.map(|r| r.name.clone()),
            key_id: ctx.key_id.map(|k| k.to_string()),
            user: ctx
                .user
                .as_ref()
                .map(|u| String::from_utf8_lossy(u.as_bytes()).into_owned()),
            decision: if ctx.decision == "accepted" && e.is_some() {
                "upstream_error"
            } else {
                ctx.decision
            },
            status,
            upstream: ctx.upstream,
            upstream_status: ctx.upstream_status,
            latency_ms: latency,
            ttfb_ms: ctx.ttfb,
            bytes_in,
            bytes_out,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_lines_are_found_in_raw_heads() {
        assert!(has_content_length_line(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
        ));
        assert!(has_content_length_line(
            b"POST / HTTP/1.1\r\ncontent-length : 5\r\n\r\n"
        ));
        assert!(!has_content_length_line(
            b"POST / HTTP/1.1\r\nX-Content-Length: 5\r\n\r\n"
        ));
        assert!(!has_content_length_line(
            b"POST /content-length: HTTP/1.1\r\n\r\n"
        ));
    }

    #[test]
    fn every_reply_body_is_json_with_an_error_field() {
        let denials = [
            Denial::BadPath,
            Denial::NoRoute,
            Denial::MethodNotAllowed { route_index: 0 },
            Denial::Key(KeyDenial::Missing),
            Denial::Key(KeyDenial::Unknown),
            Denial::Key(KeyDenial::Expired),
            Denial::Key(KeyDenial::Disabled),
            Denial::Key(KeyDenial::WrongService),
        ];
        let replies = denials
            .into_iter()
            .map(denial_reply)
            .chain([400, 413, 500, 502, 504, 599].into_iter().map(error_reply));
        for r in replies {
            let v: serde_json::Value = serde_json::from_str(r.body).unwrap();
            assert!(
                v.get("error").and_then(|e| e.as_str()).is_some(),
                "{}",
                r.body
            );
        }
    }

    #[test]
    fn statuses_for_denials() {
        assert_eq!(denial_reply(Denial::NoRoute).status, 404);
        assert_eq!(denial_reply(Denial::Key(KeyDenial::Expired)).status, 401);
        assert_eq!(
            denial_reply(Denial::Key(KeyDenial::WrongService)).status,
            403
        );
        assert_eq!(
            denial_reply(Denial::MethodNotAllowed { route_index: 1 }).status,
            405
        );
    }

    #[test]
    fn upstream_timeouts_are_504_and_other_upstream_errors_502() {
        let e = Error::new_up(ErrorType::ReadTimedout);
        assert_eq!(error_status(&e), 504);
        let e = Error::new_up(ErrorType::ConnectTimedout);
        assert_eq!(error_status(&e), 504);
        let e = Error::new_up(ErrorType::ConnectRefused);
        assert_eq!(error_status(&e), 502);
        let e = Error::new_down(ErrorType::ReadError);
        assert_eq!(error_status(&e), 0);
        let e = Error::new_down(ErrorType::InvalidHTTPHeader);
        assert_eq!(error_status(&e), 400);
        assert_eq!(error_status(&Error::new(ErrorType::HTTPStatus(413))), 413);
        assert_eq!(error_status(&Error::new(ErrorType::InternalError)), 500);
    }
}
