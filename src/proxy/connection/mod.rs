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
//!
//! Generic over the `ProxyHttp` it serves, as Pingora's own `HttpProxy`:
//! this module knows nothing of the gateway's hooks. They report the
//! head and HTTP/2 bodies through `client_stream` and `clock`, which this
//! loop reads.

mod slots;

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use log::debug;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::v2;
use pingora::protocols::http::v2::server::{H2Accept, HttpSession as H2Session};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Digest, Stream, ALPN};
use pingora::proxy::{HttpProxy, ProxyHttp};
use pingora::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, Sleep};

pub use self::slots::Slots;
use super::client_stream::ClientStream;
use super::clock::{in_h2_stream, Event, Signal};
use crate::config::ClientLimits;
use crate::ops::{ClientTimeout, Metrics, SharedLive};

/// Streams of one HTTP/2 connection rejected while being accepted
/// (malformed requests) before the connection is closed, as Pingora's own
/// loop does.
const MAX_REJECTED_H2_STREAMS: usize = 32;

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

/// The proxy service's application: Pingora's HTTP proxy (of the hooks
/// `SV`) behind the connection cap and the client timeouts.
pub struct ClientApp<SV> {
    proxy: Arc<HttpProxy<SV>>,
    live: SharedLive,
    metrics: Arc<Metrics>,
    /// Shared by every proxy service, so the cap counts them all.
    slots: Arc<Slots>,
}

impl<SV> ClientApp<SV>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    /// `proxy` is what `pingora::proxy::http_proxy` built around the
    /// gateway; `slots` counts open connections against `max_connections`
    /// and is the same for every proxy service of the process.
    pub fn new(
        proxy: HttpProxy<SV>,
        live: SharedLive,
        metrics: Arc<Metrics>,
        slots: Arc<Slots>,
    ) -> Self {
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
        let signal = Arc::new(Signal::default());
        let mut session =
            ServerSession::new_http1(Box::new(ClientStream::new(stream, Arc::clone(&signal))));
        loop {
            // The clocks bound every wait for a head; Pingora's own limit
            // (whole seconds, per read) stays out of the way. A connection
            // accepted during shutdown is served once and not kept.
            session.set_keepalive(if *shutdown.borrow() { None } else { Some(0) });
            let fut = self.proxy.process_new_http(session, shutdown);
            let ended =
                serve_request(fut, &signal, &mut clock, timer.as_mut(), header_timeout).await;
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

impl<SV> ClientApp<SV>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    /// Serves an HTTP/2 connection (or anything else Pingora recognises
    /// by ALPN), with the head's clock on its connection preface: a client
    /// that completes the TLS handshake and then says nothing is closed at
    /// `client_header_timeout`. HTTP/2 streams are accepted here rather
    /// than by Pingora's loop, so each stream's body has a clock too.
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
        let signal = Arc::new(Signal::default());
        let stream: Stream = Box::new(ClientStream::new_h2(stream, Arc::clone(&signal)));
        let mut clock = Clock::Head;
        let timer = pin!(tokio::time::sleep_until(accepted + limits.header_timeout));
        let fut = Box::pin(self.accept_h2_streams(stream, shutdown.clone()));
        match serve_request(fut, &signal, &mut clock, timer, limits.header_timeout).await {
            Ok(()) => None,
            Err(kind) => {
                self.metrics.client_timeout(kind);
                None
            }
        }
    }

    /// The HTTP/2 connection's accept loop, as Pingora's own (graceful
    /// shutdown: GOAWAY, then the streams already open are served; the
    /// idle limit once no stream is open; a bound on rejected streams),
    /// except that each stream is served by [`ClientApp::serve_h2_stream`].
    async fn accept_h2_streams(self: &Arc<Self>, stream: Stream, mut shutdown: ShutdownWatch) {
        let digest = Arc::new(Digest {
            ssl_digest: stream.get_ssl_digest(),
            timing_digest: stream.get_timing_digest(),
            proxy_digest: stream.get_proxy_digest(),
            socket_digest: stream.get_socket_digest(),
        });
        let mut conn = match v2::server::handshake(stream, self.proxy.h2_options()).await {
            Ok(conn) => conn,
            Err(e) => {
                debug!("HTTP/2 handshake with a client failed: {e}");
                return;
            }
        };
        let idle_timeout = self.proxy.server_options().and_then(|o| o.h2_idle_timeout);
        let (open, mut open_rx) = tokio::sync::watch::channel(0usize);
        let open = Arc::new(open);
        let mut rejected = 0usize;
        let mut shutting_down = false;
        loop {
            let next = if shutting_down {
                H2Session::from_h2_conn(&mut conn, Arc::clone(&digest)).await
            } else {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => {
                        conn.graceful_shutdown();
                        shutting_down = true;
                        continue;
                    }
                    next = H2Session::from_h2_conn(&mut conn, Arc::clone(&digest)) => next,
                    _ = idle_for(&mut open_rx, idle_timeout.unwrap_or_default()), if idle_timeout.is_some() => return,
                }
            };
            match next {
                // A client often just closes the connection.
                Err(e) => {
                    debug!("HTTP/2 connection ended: {e}");
                    return;
                }
                Ok(None) => return,
                Ok(Some(H2Accept::Rejected)) => {
                    rejected += 1;
                    if rejected >= MAX_REJECTED_H2_STREAMS {
                        debug!("HTTP/2 connection closed after {rejected} rejected streams");
                        return;
                    }
                }
                Ok(Some(H2Accept::Session(session))) => {
                    let app = Arc::clone(self);
                    let shutdown = shutdown.clone();
                    let open = Arc::clone(&open);
                    open.send_modify(|n| *n += 1);
                    tokio::spawn(async move {
                        app.serve_h2_stream(session, &shutdown).await;
                        open.send_modify(|n| *n = n.saturating_sub(1));
                    });
                }
            }
        }
    }

    /// Serves one HTTP/2 stream, ending it when its body stalls for longer
    /// than `client_body_timeout` (Pingora 0.9 has no read timeout for
    /// HTTP/2 bodies): the request is dropped, which resets the stream.
    async fn serve_h2_stream(&self, session: H2Session, shutdown: &ShutdownWatch) {
        let body_timeout = self.live.load().snapshot.config.clients.body_timeout;
        let signal = Arc::new(Signal::default());
        let mut fut = pin!(in_h2_stream(
            Arc::clone(&signal),
            self.proxy
                .process_new_http(ServerSession::new_http2(session), shutdown)
        ));
        let mut timer = pin!(tokio::time::sleep(body_timeout));
        let mut armed = false;
        let timed_out = poll_fn(|cx| {
            let _ = signal.take();
            if fut.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            match signal.take() {
                Some(Event::BodyRead) => {
                    armed = true;
                    timer.as_mut().reset(Instant::now() + body_timeout);
                }
                Some(Event::BodyDone) => armed = false,
                _ => {}
            }
            if armed {
                timer.as_mut().poll(cx).map(|()| true)
            } else {
                Poll::Pending
            }
        })
        .await;
        if timed_out {
            self.metrics.client_timeout(ClientTimeout::Body);
        }
    }
}

/// Waits until no stream is open, then for `idle`.
async fn idle_for(open: &mut tokio::sync::watch::Receiver<usize>, idle: Duration) {
    if open.wait_for(|n| *n == 0).await.is_err() {
        return std::future::pending().await;
    }
    tokio::time::sleep(idle).await;
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
/// returned. `signal` is the connection's: what the stream and the hooks
/// report there during a poll moves the clock right after it.
async fn serve_request<T>(
    mut fut: Pin<Box<dyn Future<Output = T> + Send + '_>>,
    signal: &Signal,
    clock: &mut Clock,
    mut timer: Pin<&mut Sleep>,
    header_timeout: Duration,
) -> Result<T, ClientTimeout> {
    poll_fn(|cx| {
        // Pingora's future first, so bytes that have arrived are never
        // refused for a timeout; what the signal holds is this poll's.
        let _ = signal.take();
        if let Poll::Ready(ended) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(ended));
        }
        match signal.take() {
            Some(Event::HeadStarted) => {
                *clock = Clock::Head;
                timer.as_mut().reset(Instant::now() + header_timeout);
            }
            Some(Event::HeadComplete) => *clock = Clock::Off,
            // The HTTP/2 body clock is the stream loop's.
            Some(Event::BodyRead | Event::BodyDone) | None => {}
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
impl<SV> ServerApp for ClientApp<SV>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
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
}
