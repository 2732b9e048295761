//! The upstream phase: a slot on an upstream of the request's pool, taken
//! (or waited for, in the route's queue) before the request goes on, and
//! taken again for each retry.
//!
//! The slot is a [`Lease`] kept in the request's context: the upstream's
//! count of requests in flight goes down when the context does, which is
//! when the answer has ended or the client has left, whichever way the
//! request ended.

use std::net::SocketAddr;

use http::header::CONTENT_LENGTH;
use pingora::prelude::*;
use pingora::proxy::Session;

use super::context::{Tries, TryFailure};
use super::phases::Stop;
use crate::policy::{Pick, Refusal, Route};
use crate::state::{Entered, Lease};
use crate::usage::INSPECT_LIMIT;

/// What a full route's 503 suggests as `Retry-After`.
const BUSY_RETRY_AFTER_S: u32 = 1;

/// Takes a slot on an upstream of `pool`, waiting in the route's queue
/// when every upstream is at its cap. A client that leaves while queued
/// leaves the queue (noticed at once over HTTP/2, and over HTTP/1.1 once
/// its body is in: see [`wait_for_client_to_leave`]).
pub async fn choose(
    session: &mut Session,
    route: &Route,
    pool: usize,
    now_ms: i64,
) -> Result<Lease, Stop> {
    let busy = Refusal::UpstreamsBusy {
        retry_after_s: BUSY_RETRY_AFTER_S,
    };
    match route.take_upstream(pool, now_ms, &[]) {
        Pick::Got(lease) => return Ok(lease),
        Pick::Nothing => return Err(Refusal::Internal.into()),
        Pick::Full => {}
    }
    let Some((queue, timeout)) = route.queue(pool) else {
        return Err(busy.into());
    };
    let mut waiting = match queue.enter(|m| m.state.health.is_up(now_ms)) {
        Entered::Slot(lease) => return Ok(lease),
        Entered::Full => return Err(busy.into()),
        Entered::Queued(w) => w,
    };
    read_small_body(session).await;
    let wait = tokio::time::timeout(timeout, waiting.slot());
    tokio::select! {
        got = wait => match got {
            Ok(Some(lease)) => Ok(lease),
            // Timed out (or the queue went with its snapshot).
            Ok(None) | Err(_) => Err(busy.into()),
        },
        // The client's doing (a downstream error): nothing is answered,
        // the audit line says `client_closed`.
        () = wait_for_client_to_leave(session) => Err(Stop::Fail(
            Error::explain(
                ErrorType::ConnectionClosed,
                "the client left while its request was queued",
            )
            .into_down(),
        )),
    }
}

/// Reads an HTTP/1.1 body small enough for Pingora's retry buffer (which
/// sends it upstream first, as for bodies the AI phase reads), so that a
/// queued request can watch its connection for the client leaving. A
/// larger or chunked body is left to stream later.
async fn read_small_body(session: &mut Session) {
    if session.is_http2() {
        return;
    }
    let declared: Option<usize> = session
        .req_header()
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let downstream = session.as_downstream_mut();
    let read_so_far = downstream.body_bytes_read();
    let fits = declared.is_some_and(|cl| cl <= INSPECT_LIMIT && read_so_far <= cl);
    if !fits || downstream.retry_buffer_truncated() || downstream.is_body_done() {
        return;
    }
    downstream.enable_retry_buffering();
    while !downstream.is_body_done() {
        match downstream.read_request_body().await {
            Ok(Some(_)) => {}
            // The end, or an error Pingora meets again on its own read.
            Ok(None) | Err(_) => break,
        }
    }
}

/// Resolves when the client goes away: its HTTP/2 stream reset, or its
/// HTTP/1.1 connection closed once the body is in. Pending forever when
/// that cannot be watched (a body still to come).
async fn wait_for_client_to_leave(session: &mut Session) {
    let downstream = session.as_downstream_mut();
    if let Some(closed) = downstream.watch_h2_stream_close() {
        let _ = closed.await;
        return;
    }
    if downstream.is_body_done() {
        // Bytes after the body are a pipelined request the gateway does
        // not take: either way the wait is over for this one.
        let _ = downstream.read_body_or_idle(true).await;
        return;
    }
    std::future::pending::<()>().await
}

/// Takes a slot for the next try after a failure, when the route retries
/// it and an upstream can take it now: never one this request could not
/// connect to, not one it already tried while an untried one is left,
/// and not the one that just failed while another is left. `None`: the
/// failure stands. `tries.failed` holds the try that just failed.
pub fn next_try(route: &Route, pool: usize, tries: &Tries, now_ms: i64) -> Option<Lease> {
    if tries.failed.len() >= usize::from(route.retry.attempts) {
        return None;
    }
    let no_connect: Vec<SocketAddr> = tries
        .failed
        .iter()
        .filter(|(_, f)| *f == TryFailure::Connect)
        .map(|(a, _)| *a)
        .collect();
    let tried: Vec<SocketAddr> = tries.failed.iter().map(|(a, _)| *a).collect();
    let mut not_last = no_connect.clone();
    not_last.extend(tries.failed.last().map(|(a, _)| *a));
    [tried, not_last, no_connect].iter().find_map(|avoid| {
        match route.take_upstream(pool, now_ms, avoid) {
            Pick::Got(lease) => Some(lease),
            Pick::Full | Pick::Nothing => None,
        }
    })
}
