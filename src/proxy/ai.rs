//! Requests on routes with `api`: the model read from the body before an
//! upstream is chosen, the body's replay, the in-stream model check, the
//! `include_usage` edit, and the usage read off the answer.
//!
//! Reading the body first (Pingora 0.9.1, checked in its source):
//! `request_filter` turns on the downstream session's retry buffer and
//! reads with `read_request_body`; every byte read is also appended to the
//! retry buffer (`v1/server.rs`, `read_body_bytes`), which Pingora sends
//! upstream first, through `request_body_filter`, before it reads the
//! rest of the body (`proxy_h1.rs`, `proxy_handle_downstream`). The
//! buffer holds 64 KiB (`BODY_BUF_LIMIT`); a read that takes it past that
//! empties it and marks it truncated, and `get_retry_buffer()` then gives
//! nothing. So:
//!
//! - the gateway reads until it has what it needs or 64 KiB are held;
//! - a chunked body: the read that crosses 64 KiB returns data, and the
//!   body's end is only ever found by a later read (`do_read_chunked_body`
//!   returns the terminating chunk as its own read), so the body is not
//!   over and Pingora goes on reading it: the gateway puts what it read in
//!   front of the next piece ([`Replay::Prefix`]);
//! - a `Content-Length` body over 64 KiB: a read takes at most what is
//!   left of the body, capped at 64 KiB, so while more than 64 KiB are
//!   left a read cannot finish it; the gateway stops reading before the
//!   last 64 KiB could arrive in one read. (A body that Pingora considered
//!   complete with a truncated buffer could never reach the upstream.)
//!
//! What was read is then forwarded byte for byte (or with the
//! `include_usage` edit, with `Content-Length` fixed).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, TRANSFER_ENCODING};
use http::Version;
use log::{debug, error, warn};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::Session;

use super::context::{AiRequest, Replay};
use crate::config::{any_model_matches, ModelAlias, ModelPattern};
use crate::policy::{judge_models, Refusal, Route};
use crate::usage::{
    model_in_path, AnswerMeter, Edit, Endpoint, ModelListFilter, NamedModel, RequestInspector,
    SseHider, INSPECT_LIMIT,
};

/// Starts the handling of a request on a route with `api`; `None` on
/// other routes.
pub fn start(
    route: &Route,
    path: &str,
    allowed: Option<&Arc<[ModelPattern]>>,
) -> Option<Box<AiRequest>> {
    let api = route.api?;
    let upstream_path = route.upstream_path(path);
    let endpoint = Endpoint::of(api, upstream_path);
    let mut ai = Box::new(AiRequest::new(api, endpoint, allowed.cloned()));
    if endpoint.lists_models() && !route.aliases.is_empty() {
        ai.aliases = Some(Arc::clone(&route.aliases));
    }
    if endpoint == Endpoint::OpenaiModel {
        ai.model = model_in_path(upstream_path).map(str::to_owned);
    }
    Some(ai)
}

/// Judges a model named in the path (`GET /v1/models/{id}`) for a key
/// limited to some.
pub fn check_path_model(ai: &AiRequest) -> Result<(), Refusal> {
    match (&ai.allowed, &ai.model) {
        (Some(allowed), Some(id))
            if ai.endpoint == Endpoint::OpenaiModel && !any_model_matches(allowed, id) =>
        {
            Err(Refusal::ModelNotAllowed)
        }
        _ => Ok(()),
    }
}

/// Whether the body must be read before an upstream is chosen.
pub fn wants_body(ai: &AiRequest, route: &Route) -> bool {
    ai.allowed.is_some()
        || route.routes_by_model()
        || !route.aliases.is_empty()
        || (route.include_usage && ai.endpoint == Endpoint::OpenaiCompletions)
}

/// Reads the start of the body (see the module documentation), judges
/// the models it names for a key limited to some, chooses the pool, and
/// prepares the `include_usage` edit. `Err` is a failure to read (the
/// client went away, or sent a malformed body); `Ok(Err)` a refusal.
pub async fn read_body_start(
    session: &mut Session,
    ai: &mut AiRequest,
    route: &Route,
) -> Result<Result<(), Refusal>> {
    let rewrite = route.include_usage && ai.endpoint == Endpoint::OpenaiCompletions;
    let content_length: Option<usize> = session
        .req_header()
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let expects_continue = session
        .req_header()
        .headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let downstream = session.as_downstream_mut();
    if expects_continue {
        // The client waits for this before it sends the body the gateway
        // is about to read; the upstream then gets no `Expect`.
        downstream.write_continue_response().await?;
        ai.continued = true;
    }
    downstream.enable_retry_buffering();
    let mut inspector = RequestInspector::new(ai.api);
    let mut held = BytesMut::new();
    loop {
        if downstream.is_body_done() || held.len() >= INSPECT_LIMIT {
            break;
        }
        let safe = content_length
            .is_none_or(|cl| cl <= INSPECT_LIMIT || cl.saturating_sub(held.len()) > INSPECT_LIMIT);
        if !safe {
            break;
        }
        let Some(piece) = downstream.read_request_body().await? else {
            break;
        };
        inspector.feed(&piece);
        held.extend_from_slice(&piece);
        let first = inspector.models.first();
        let have_model = first.is_some();
        // An alias is rewritten: that needs the whole body.
        let alias = matches!(first, Some(NamedModel::Name(n)) if route.alias(n).is_some());
        if !inspector.single_object() || (have_model && !rewrite && !alias) {
            break;
        }
    }
    let done = downstream.is_body_done();
    let truncated = downstream.retry_buffer_truncated();
    if truncated && done {
        // Ruled out above; if it ever happened the body could not reach
        // the upstream, so the request must not go on.
        error!(
            "request body of {} bytes was read whole past the retry buffer; refusing it",
            held.len()
        );
        return Ok(Err(Refusal::Internal));
    }
    let held = held.freeze();
    ai.replay = if held.is_empty() {
        Replay::Nothing
    } else if truncated {
        Replay::Prefix(held.clone())
    } else {
        Replay::RetryBuffer
    };
    let first = inspector.models.iter().find_map(|m| match m {
        NamedModel::Name(n) => Some(n.clone()),
        NamedModel::Unreadable => None,
    });
    let alias = first.as_deref().and_then(|m| route.alias(m));
    let served = alias.map_or(first.as_deref(), |a| Some(a.target.as_str()));
    ai.pool = route.pool_for(served);
    if ai.model.is_none() {
        ai.model = served.map(str::to_owned);
    }
    if alias.is_some() {
        ai.requested_model = first.clone();
    }
    if let Some(allowed) = &ai.allowed {
        let verdict = judge_models(
            allowed,
            &inspector.models,
            inspector.single_object(),
            done && !inspector.named_any(),
        );
        if let Err(r) = verdict {
            return Ok(Err(r));
        }
        if done && !inspector.complete() {
            // The whole body, and not one JSON object.
            return Ok(Err(Refusal::ModelUnreadable));
        }
    }
    let whole = done && !truncated;
    if let Err(r) = rewrite_body(ai, &inspector, &held, alias, rewrite && whole, whole) {
        return Ok(Err(r));
    }
    if ai.allowed.is_some() && !done {
        // The rest is checked as it streams upstream.
        inspector.models.clear();
        ai.inspector = Some(inspector);
    }
    debug!(
        "read {} body bytes before choosing an upstream, {} (model {:?}, pool {})",
        held.len(),
        if truncated {
            "past the retry buffer: sent in front of the next piece"
        } else {
            "in the retry buffer"
        },
        ai.model,
        ai.pool
    );
    Ok(Ok(()))
}

/// Makes the body the upstream gets, when it changes: an alias's target
/// as the model (a body that cannot be rewritten whole is refused, never
/// sent with the alias), `stream_options.include_usage` added when
/// `ask_usage`. `whole`: `held` is the complete body.
fn rewrite_body(
    ai: &mut AiRequest,
    inspector: &RequestInspector,
    held: &[u8],
    alias: Option<&ModelAlias>,
    ask_usage: bool,
    whole: bool,
) -> Result<(), Refusal> {
    let mut edits = Vec::new();
    if let Some(alias) = alias {
        match inspector.alias_edits(alias).filter(|_| whole) {
            Some(e) => edits.extend(e),
            None => return Err(Refusal::AliasBodyTooLarge),
        }
    }
    if ask_usage {
        if let Some(edit) = inspector.include_usage_edit() {
            edits.push(edit);
            ai.asked_usage = true;
        }
    }
    if !edits.is_empty() {
        match Edit::apply_all(&mut edits, held) {
            Some(body) => ai.rewritten = Some(Bytes::from(body)),
            None if alias.is_some() => return Err(Refusal::AliasBodyTooLarge),
            None => {}
        }
    }
    Ok(())
}

/// The request body on its way upstream: the bytes read before come
/// first (rewritten if need be), and the rest is checked for models as it
/// passes. `Err` is a refusal: the piece is not forwarded, so the
/// upstream never gets the complete body.
pub fn request_body(
    ai: &mut AiRequest,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
) -> std::result::Result<(), Refusal> {
    let first = std::mem::take(&mut ai.fresh_attempt);
    let mut fresh = body.clone();
    if first {
        match std::mem::replace(&mut ai.replay, Replay::Nothing) {
            Replay::Nothing => {}
            Replay::RetryBuffer => {
                // This call carries the retry buffer: read already. Kept
                // for another attempt, which replays it again.
                ai.replay = Replay::RetryBuffer;
                fresh = None;
                if let Some(r) = &ai.rewritten {
                    *body = Some(r.clone());
                }
            }
            Replay::Prefix(prefix) => {
                let mut joined =
                    BytesMut::with_capacity(prefix.len() + body.as_ref().map_or(0, Bytes::len));
                joined.extend_from_slice(&prefix);
                if let Some(b) = body.as_ref() {
                    joined.extend_from_slice(b);
                }
                *body = Some(joined.freeze());
            }
        }
    }
    let Some(inspector) = ai.inspector.as_mut() else {
        return Ok(());
    };
    if let Some(piece) = fresh.as_ref() {
        inspector.feed(piece);
    }
    let allowed = ai.allowed.as_deref().unwrap_or_default();
    let verdict = judge_models(
        allowed,
        &inspector.models,
        inspector.single_object(),
        end_of_stream && !inspector.named_any(),
    );
    let verdict = verdict.and_then(|()| {
        if end_of_stream && !inspector.complete() {
            Err(Refusal::ModelUnreadable)
        } else {
            Ok(())
        }
    });
    if ai.model.is_none() {
        ai.model = inspector.models.iter().find_map(|m| match m {
            NamedModel::Name(n) => Some(n.clone()),
            NamedModel::Unreadable => None,
        });
    }
    inspector.models.clear();
    verdict
}

/// The request head for the upstream: answers must be readable (no
/// compression asked for), and the body's edit and `Expect` accounted for.
pub fn upstream_request(ai: &AiRequest, req: &mut RequestHeader) -> Result<()> {
    req.remove_header("accept-encoding");
    if ai.continued {
        req.remove_header(&EXPECT);
    }
    // A rewritten body keeps the framing the client chose: its length
    // replaces the client's `Content-Length`; a chunked one stays chunked.
    if let Some(body) = &ai.rewritten {
        if req.headers.contains_key(CONTENT_LENGTH) {
            req.insert_header(CONTENT_LENGTH, body.len())?;
        }
    }
    Ok(())
}

/// Prepares to read the answer whose head is `resp`: the usage meter, the
/// hider of the usage-only event, or the model list filter. Changes the
/// framing headers when the body will change.
pub fn answer_head(
    ai: &mut AiRequest,
    resp: &mut ResponseHeader,
    client: Version,
    method: &http::Method,
) -> Result<()> {
    if !resp.status.is_success() || method == http::Method::HEAD {
        return Ok(());
    }
    let header = |name| {
        resp.headers
            .get(name)
            .map(|v: &http::HeaderValue| v.as_bytes())
    };
    let encoding = header(CONTENT_ENCODING);
    let identity = encoding.is_none_or(|e| {
        let e = e.trim_ascii();
        e.is_empty() || e.eq_ignore_ascii_case(b"identity")
    });
    let mut body_changes = false;
    if ai.endpoint.lists_models() && resp.status == http::StatusCode::OK {
        let json = header(CONTENT_TYPE).is_none_or(|c| {
            let c = c.to_ascii_lowercase();
            c.starts_with(b"application/json") || c.windows(5).any(|w| w == b"+json")
        });
        let readable = identity && json;
        // A key that may use every model gets an unreadable list as it
        // came; one limited to some never sees it.
        let aliases = ai.aliases.clone().filter(|_| readable);
        if ai.allowed.is_some() || aliases.is_some() {
            ai.list_filter = Some(ModelListFilter::new(
                ai.endpoint,
                ai.allowed.clone(),
                aliases.unwrap_or_else(|| Arc::new([])),
                readable,
            ));
            resp.remove_header(&CONTENT_ENCODING);
            resp.insert_header(CONTENT_TYPE, "application/json")?;
            body_changes = true;
        }
    } else if ai.endpoint.metered() {
        let meter = if ai.endpoint == Endpoint::AnthropicMessages {
            AnswerMeter::anthropic(header(CONTENT_TYPE), encoding)
        } else {
            AnswerMeter::new(header(CONTENT_TYPE), encoding)
        };
        // The gateway asked for the usage-only event: hide it.
        if ai.asked_usage && meter.is_sse() {
            ai.hider = Some(SseHider::default());
            body_changes = true;
        }
        ai.meter = Some(meter);
    }
    if body_changes && resp.headers.contains_key(CONTENT_LENGTH) {
        resp.remove_header(&CONTENT_LENGTH);
        if client == Version::HTTP_11 {
            resp.insert_header(TRANSFER_ENCODING, "chunked")?;
        }
    }
    Ok(())
}

/// A piece of the answer on its way to the client: read for usage,
/// passed on unchanged the moment it arrives, except for the usage-only
/// event the gateway asked for (left out) and model lists (held, then
/// filtered).
pub fn answer_body(ai: &mut AiRequest, body: &mut Option<Bytes>, end_of_stream: bool) {
    if let Some(filter) = ai.list_filter.as_mut() {
        if let Some(piece) = body.take() {
            filter.push(&piece);
        }
        if end_of_stream {
            if filter.unreadable() {
                warn!(
                    "a model list from the upstream could not be read; the key gets an empty list"
                );
            }
            *body = Some(Bytes::from(filter.finish()));
        }
        return;
    }
    let Some(meter) = ai.meter.as_mut() else {
        return;
    };
    match ai.hider.as_mut() {
        Some(hider) => {
            let piece = body.as_deref().unwrap_or_default();
            let out = hider.filter(piece, end_of_stream, meter);
            *body = (!out.is_empty()).then_some(out);
        }
        None => {
            if let Some(piece) = body.as_ref() {
                meter.feed(piece);
            }
        }
    }
}
