//! The gateway's own answers, and what a proxying error becomes.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::{ErrorSource, ErrorType};

use crate::ops::UpstreamErrorKind;
use crate::policy::{ErrorShape, ExtraHeader, Refusal, Route};

/// Writes the refusal as a complete response (JSON, but for a preflight's
/// empty 204) and closes the connection afterwards (an unread request body
/// is never drained into the void). `route` supplies the body's shape (its
/// `api`'s; the gateway's own before a route is known), the `Allow` header
/// of a 405 and the CORS headers of a preflight; `cors_origin` is the page
/// origin the route allows, if any, so a browser can read the refusal.
pub async fn send_refusal(
    session: &mut Session,
    refusal: Refusal,
    route: Option<&Route>,
    cors_origin: Option<&HeaderValue>,
    request_id: Option<&HeaderValue>,
) -> Result<()> {
    let body = refusal.body_in(ErrorShape::of(route.and_then(|r| r.api)));
    let mut resp = ResponseHeader::build(refusal.status(), Some(10))?;
    if !body.is_empty() {
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len())?;
    }
    resp.insert_header("cache-control", "no-store")?;
    match refusal.extra_header() {
        Some(ExtraHeader::Challenge(c)) => resp.insert_header("www-authenticate", c)?,
        Some(ExtraHeader::Allow) => {
            if let Some(allow) = route.and_then(|r| r.allow_header()) {
                resp.insert_header("allow", allow.clone())?;
            }
        }
        Some(ExtraHeader::RetryAfter(s)) => resp.insert_header("retry-after", s)?,
        Some(ExtraHeader::Preflight) => {
            if let Some(cors) = route.and_then(|r| r.cors.as_ref()) {
                resp.insert_header("access-control-allow-methods", cors.allow_methods.clone())?;
                resp.insert_header("access-control-allow-headers", cors.allow_headers.clone())?;
                resp.insert_header("access-control-max-age", cors.max_age.clone())?;
            }
        }
        None => {}
    }
    if let Some(origin) = cors_origin {
        add_cors(&mut resp, origin)?;
    }
    if let Some(id) = request_id {
        resp.insert_header("x-request-id", id.clone())?;
    }
    answer(session, resp, Bytes::from_static(body.as_bytes())).await
}

/// The most of an unread HTTP/2 request body read and thrown away after
/// the gateway answered early (a refusal before or during the body).
pub const DISCARD_MAX_BYTES: usize = 8 << 20;

/// The longest that discarding may take.
pub const DISCARD_MAX_TIME: Duration = Duration::from_secs(2);

/// Writes an answer of the gateway's own, whole, and ends the exchange so
/// that every client reads it. HTTP/1: the connection is closed after it
/// (an unread body is never drained). HTTP/2: the rest of the request
/// body is read and thrown away, up to [`DISCARD_MAX_BYTES`] within
/// [`DISCARD_MAX_TIME`], as nginx does; a body larger or slower than that
/// is ended with `RST_STREAM(NO_ERROR)` behind the answer when the stream
/// is dropped (the h2 crate queues that reset after the answer's frames,
/// RFC 9113 §8.1). Without this, the stream was reset while the client
/// was still sending, and curl reported a framing error instead of the
/// status.
pub async fn answer(session: &mut Session, resp: ResponseHeader, body: Bytes) -> Result<()> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A body declared larger than the discard's bound would be reset
    // anyway: no point reading it first.
    let worth_reading = declared.is_none_or(|n| n <= DISCARD_MAX_BYTES as u64);
    let downstream = session.as_downstream_mut();
    downstream.write_error_response(resp, body).await?;
    if worth_reading && downstream.is_http2() && !downstream.is_body_done() {
        let _ = tokio::time::timeout(DISCARD_MAX_TIME, discard_body(downstream)).await;
    }
    Ok(())
}

/// Reads the request body to its end, or to [`DISCARD_MAX_BYTES`], or to
/// the first error (a client that reset the stream).
async fn discard_body(downstream: &mut pingora::protocols::http::ServerSession) {
    let mut read = 0usize;
    while read < DISCARD_MAX_BYTES && !downstream.is_body_done() {
        match downstream.read_request_body().await {
            Ok(Some(chunk)) => read = read.saturating_add(chunk.len()),
            Ok(None) | Err(_) => return,
        }
    }
}

/// The CORS headers of every answer to an allowed origin.
pub fn add_cors(resp: &mut ResponseHeader, origin: &HeaderValue) -> Result<()> {
    resp.insert_header("access-control-allow-origin", origin.clone())?;
    resp.insert_header("access-control-expose-headers", "x-request-id, retry-after")?;
    resp.append_header("vary", "origin")?;
    Ok(())
}

/// What a proxying error becomes: the refusal to answer with, or `None`
/// when the client is gone and there is nobody to answer. Pingora's default
/// maps every upstream error to 502; a timeout talking to the upstream is a
/// 504.
pub fn refusal_for(e: &Error) -> Option<Refusal> {
    use ErrorType::*;
    Some(match (e.etype(), e.esource()) {
        (HTTPStatus(code), _) => match code {
            413 => Refusal::BodyTooLarge,
            431 => Refusal::HeaderTooLarge,
            502 => Refusal::UpstreamUnavailable,
            504 => Refusal::UpstreamTimeout,
            400..=499 => Refusal::BadRequest,
            _ => Refusal::Internal,
        },
        (
            ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout,
            ErrorSource::Upstream,
        ) => Refusal::UpstreamTimeout,
        (_, ErrorSource::Upstream) => Refusal::UpstreamUnavailable,
        (WriteError | ReadError | ConnectionClosed, ErrorSource::Downstream) => return None,
        (ReadTimedout, ErrorSource::Downstream) => Refusal::BodyTimeout,
        (_, ErrorSource::Downstream) => Refusal::BadRequest,
        _ => Refusal::Internal,
    })
}

/// The fixed label of an upstream failure.
pub fn upstream_error_kind(e: &Error) -> UpstreamErrorKind {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_timeouts_are_504_and_other_upstream_errors_502() {
        let status = |e: &Error| refusal_for(e).map(Refusal::status);
        assert_eq!(status(&Error::new_up(ErrorType::ReadTimedout)), Some(504));
        assert_eq!(
            status(&Error::new_up(ErrorType::ConnectTimedout)),
            Some(504)
        );
        assert_eq!(status(&Error::new_up(ErrorType::ConnectRefused)), Some(502));
        assert_eq!(status(&Error::new_down(ErrorType::ReadError)), None);
        assert_eq!(status(&Error::new_down(ErrorType::ReadTimedout)), Some(408));
        assert_eq!(
            status(&Error::new_down(ErrorType::InvalidHTTPHeader)),
            Some(400)
        );
        assert_eq!(status(&Error::new(ErrorType::HTTPStatus(413))), Some(413));
        assert_eq!(status(&Error::new(ErrorType::InternalError)), Some(500));
    }
}
