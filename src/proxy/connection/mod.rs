//! Client connections, before and between requests: the connection cap and
//! the client timeouts. Pingora 0.9 has neither a total deadline for a
//! request head nor a connection cap, so the proxy service runs this
//! application, which wraps Pingora's own HTTP proxy:
//!
//! ```text
//!  accept ─▶ ClientApp::process_new
//!     ├ max_connections open ─▶ 503 JSON, Connection: close (HTTP/2: closed
//!     │    without an answer); counted, not logged
//!     ├ HTTP/2 (TLS, ALPN h2) ─▶ the stream wrapped in a ClientStream;
//!     │    head clock from accept until the client's connection preface
//!     │    is in, then Pingora's HTTP/2 server (its idle limit is
//!     │    client_idle_timeout as it was at start)
//!     └ HTTP/1 ─▶ the stream wrapped in a ClientStream; then per request:
//!          head clock (from accept, later from the head's first byte)
//!          │  or idle clock (between requests, until that first byte)
//!          ├ Pingora's process_new_http: read head ─▶ early_request_filter
//!          │     (HeadComplete: no clock; body reads get client_body_timeout)
//!          │     ─▶ … the request, as in the diagram of `proxy` …
//!          ├ clock runs out first ─▶ connection dropped, counted, not logged
//!          └ connection kept ─▶ next request
//! ```
//!
//! One timer per connection serves both clocks; it lives in this task's
//! future, so a connection costs one allocation (the stream wrapper) on top
//! of Pingora's own. The limits are read from the snapshot in service when
//! the connection is accepted and when each next request is awaited, so a
//! reload applies them to new connections and requests.
//!
//! A request head that runs out of time is not handed back to Pingora as a
//! read error (Pingora would log a "Fail to proxy" line per connection,
//! with no hook to quiet it): the loop drops Pingora's future instead.

mod events;
mod slots;
mod stream;

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::{HttpProxy, Session};
use pingora::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, Sleep};

use self::events::Event;
pub use self::slots::Slots;
use self::stream::ClientStream;
use super::gateway::Gateway;
use crate::config::ClientLimits;
use crate::ops::{ClientTimeout, Metrics, SharedLive};

/// What a client over the cap gets before the connection is closed.
const OVER_CAP_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: application/json\r\n\
Content-Length: 32\r\n\
Cache-Control: no-store\r\n\
Retry-After: 1\r\n\
Connection: close\r\n\
\r\n\
{\"error\":\"too many connections\"}";

/// How long writing that answer may take (it fits any fresh socket's send
/// buffer, so this only matters for a peer that is already gone).
const OVER_CAP_WRITE: Duration = Duration::from_secs(1);

/// The proxy service's application: Pingora's HTTP proxy behind the
/// connection cap and the client timeouts.
pub struct ClientApp {
    proxy: Arc<HttpProxy<Gateway>>,
    live: SharedLive,
    metrics: Arc<Metrics>,
    /// Shared by every proxy service, so the cap counts them all.
    slots: Arc<Slots>,
}

impl ClientApp {
    /// `proxy` is what `pingora::proxy::http_proxy` built around the
    /// gateway; `slots` counts open connections against `max_connections`
    /// and is the same for every proxy service of the process.
    pub fn new(
        proxy: HttpProxy<Gateway>,
        live: SharedLive,
        metrics: Arc<Metrics>,
        slots: Arc<Slots>,
    ) -> ClientApp {
        ClientApp {
            proxy: Arc::new(proxy),
            live,
            metrics,
            slots,
        }
    }

    fn limits(&self) -> ClientLimits {
        self.live.load().snapshot.config.clients.clone()
    }

    /// Whether the connection speaks plain HTTP/1 (no ALPN, or `http/1.1`)
    /// and Pingora would not look for an h2c preface on it.
    fn is_http1(&self, stream: &Stream) -> bool {
        let h2c = self.proxy.server_options().is_some_and(|o| o.h2c);
        !h2c && matches!(stream.selected_alpn_proto(), None | Some(ALPN::H1))
    }

    /// Serves an HTTP/1 connection to its end: Pingora's keep-alive loop
    /// (`pingora-core` `apps/mod.rs`), with the clocks around each request.
    async fn serve_http1(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
        accepted: Instant,
        limits: &ClientLimits,
    ) {
        let mut header_timeout = limits.header_timeout;
        let mut clock = Clock::Head;
        let mut timer = pin!(tokio::time::sleep_until(accepted + header_timeout));
        let mut session = ServerSession::new_http1(Box::new(ClientStream::new(stream)));
        loop {
            // The clocks bound every wait for a head; Pingora's own limit
            // (whole seconds, per read) stays out of the way. A connection
            // accepted during shutdown is served once and not kept.
            session.set_keepalive(if *shutdown.borrow() { None } else { Some(0) });
            let fut = self.proxy.process_new_http(session, shutdown);
            let ended = serve_request(fut, &mut clock, timer.as_mut(), header_timeout).await;
            let reused = match ended {
                Ok(Some(reused)) => reused,
                Ok(None) => return,
                Err(kind) => {
                    self.metrics.client_timeout(kind);
                    return;
                }
            };
            let (stream, settings) = reused.consume();
            if let Some(ours) = stream.as_any().downcast_ref::<ClientStream>() {
                ours.await_next_head();
            }
            session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            let limits = self.limits();
            header_timeout = limits.header_timeout;
            clock = Clock::Idle;
            timer.as_mut().reset(Instant::now() + limits.idle_timeout);
        }
    }
}

impl ClientApp {
    /// Serves an HTTP/2 connection (or anything else Pingora recognises
    /// by ALPN) as Pingora does, with the head's clock on its connection
    /// preface: a client that completes the TLS handshake and then says
    /// nothing is closed at `client_header_timeout`.
    async fn serve_h2(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
        accepted: Instant,
        limits: &ClientLimits,
    ) -> Option<Stream> {
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        if !h2 {
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let stream: Stream = Box::new(ClientStream::new_h2(stream));
        let mut clock = Clock::Head;
        let timer = pin!(tokio::time::sleep_until(accepted + limits.header_timeout));
        let fut = ServerApp::process_new(&self.proxy, stream, shutdown);
        match serve_request(fut, &mut clock, timer, limits.header_timeout).await {
            Ok(stream) => stream,
            Err(kind) => {
                self.metrics.client_timeout(kind);
                None
            }
        }
    }
}

/// Which clock runs for the current request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    /// Waiting for the first byte of the next request.
    Idle,
    /// Reading a request head.
    Head,
    /// The head is in; the request is Pingora's (body reads have their own
    /// per-read limit).
    Off,
}

/// Polls one request of Pingora's (or an HTTP/2 connection) until it
/// ends, or until the running clock (`timer`) runs out first: then the
/// request is dropped (and with it the connection) and the kind of timeout
/// returned.
async fn serve_request<T>(
    mut fut: Pin<Box<dyn Future<Output = T> + Send + '_>>,
    clock: &mut Clock,
    mut timer: Pin<&mut Sleep>,
    header_timeout: Duration,
) -> Result<T, ClientTimeout> {
    poll_fn(|cx| {
        // Pingora's future first, so bytes that have arrived are never
        // refused for a timeout.
        let _ = events::take();
        if let Poll::Ready(ended) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(ended));
        }
        match events::take() {
            Some(Event::HeadStarted) => {
                *clock = Clock::Head;
                timer.as_mut().reset(Instant::now() + header_timeout);
            }
            Some(Event::HeadComplete) => *clock = Clock::Off,
            None => {}
        }
        let kind = match *clock {
            Clock::Off => return Poll::Pending,
            Clock::Idle => ClientTimeout::Idle,
            Clock::Head => ClientTimeout::Header,
        };
        timer.as_mut().poll(cx).map(|()| Err(kind))
    })
    .await
}

/// Closes a connection over the cap: with a short 503 when it speaks
/// HTTP/1; an HTTP/2 connection (ALPN h2) is closed without an answer, as
/// an HTTP/1 text would be garbage to it.
async fn refuse(mut stream: Stream) {
    if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
        let _ = tokio::time::timeout(
            OVER_CAP_WRITE,
            pingora::protocols::Shutdown::shutdown(&mut *stream),
        )
        .await;
        return;
    }
    let answered = tokio::time::timeout(OVER_CAP_WRITE, async {
        stream.write_all(OVER_CAP_RESPONSE).await?;
        stream.flush().await
    })
    .await;
    if matches!(answered, Ok(Ok(()))) {
        pingora::protocols::Shutdown::shutdown(&mut *stream).await;
    }
}

#[async_trait]
impl ServerApp for ClientApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        let limits = self.limits();
        let Some(_slot) = self.slots.take(limits.max_connections) else {
            self.metrics.client_refused.inc();
            refuse(stream).await;
            return None;
        };
        if self.is_http1(&stream) {
            self.serve_http1(stream, shutdown, accepted, &limits).await;
            None
        } else {
            self.serve_h2(stream, shutdown, accepted, &limits).await
        }
    }

    /// Wakes the keep-alive connections parked in Pingora's proxy, so they
    /// close at shutdown instead of waiting out their idle time.
    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.proxy).await;
    }
}

/// Called from `early_request_filter`: the request head is in. Stops the
/// head's clock and bounds each read of the body by `client_body_timeout`
/// (Pingora's per-read limit, which a later request resets).
pub fn head_complete(session: &mut Session, limits: &ClientLimits) {
    let downstream = session.as_downstream_mut();
    downstream.set_read_timeout(Some(limits.body_timeout));
    let ours = downstream
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<ClientStream>());
    match ours {
        Some(stream) => stream.head_complete(),
        // Not from the loop above (HTTP/2): Pingora's own idle limit.
        None => downstream.set_keepalive(Some(whole_seconds(limits.idle_timeout))),
    }
}

fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_cap_answer_is_well_formed() {
        let text = std::str::from_utf8(OVER_CAP_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.contains("Connection: close"));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap()["error"],
            "too many connections"
        );
    }

    #[test]
    fn idle_limits_round_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(60)), 60);
    }
}
