//! The client's stream as Pingora sees it: the accepted stream, unchanged,
//! plus one flag that notices the first byte of the next request head and
//! its connection's [`Signal`] to report it to; and the two calls with
//! which the request hooks report the head and an HTTP/2 body.
//!
//! Every method of Pingora's `IO` traits is forwarded, those with default
//! bodies included: the HTTP session takes the client address from
//! `get_socket_digest`, TLS information from `get_ssl*`, and so on, and a
//! default left in place would silently answer "none".

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::proxy::Session;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::clock::{post_h2, Event, Signal};
use crate::config::ClientLimits;

/// A client connection's stream.
#[derive(Debug)]
pub struct ClientStream {
    inner: Stream,
    /// Where the connection's loop reads what happened.
    signal: Arc<Signal>,
    /// Between two requests of a keep-alive connection: the first read that
    /// returns data starts the next head's clock. (Atomic only because
    /// Pingora hands the stream out by shared reference; one relaxed load
    /// per read.)
    awaiting_head: AtomicBool,
    /// HTTP/2: bytes of the client's connection preface still to come (its
    /// 24-byte magic and the first frame's 9-byte header); when they are
    /// in, the head's clock stops. 0 for HTTP/1.
    preface_left: AtomicUsize,
}

/// The HTTP/2 client connection preface and the header of the SETTINGS
/// frame that must follow it (RFC 9113 section 3.4).
const H2_PREFACE_LEN: usize = 24 + 9;

impl ClientStream {
    /// Wraps a freshly accepted stream (whose first head's clock started
    /// at accept, so nothing is awaited).
    pub fn new(inner: Stream, signal: Arc<Signal>) -> ClientStream {
        ClientStream {
            inner,
            signal,
            awaiting_head: AtomicBool::new(false),
            preface_left: AtomicUsize::new(0),
        }
    }

    /// Wraps a fresh HTTP/2 connection (TLS with ALPN h2): the head's
    /// clock, started at accept, stops once the client's connection
    /// preface has arrived.
    pub fn new_h2(inner: Stream, signal: Arc<Signal>) -> ClientStream {
        ClientStream {
            inner,
            signal,
            awaiting_head: AtomicBool::new(false),
            preface_left: AtomicUsize::new(H2_PREFACE_LEN),
        }
    }

    /// The previous request is done and the connection is kept: report the
    /// first byte of the next one.
    pub fn await_next_head(&self) {
        self.awaiting_head.store(true, Ordering::Relaxed);
    }

    /// The request head has been parsed (called from the request hooks,
    /// which only see the stream by shared reference).
    pub fn head_complete(&self) {
        self.signal.post(Event::HeadComplete);
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let preface_left = this.preface_left.load(Ordering::Relaxed);
        if preface_left > 0 {
            let before = buf.filled().len();
            let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
            let got = buf.filled().len().saturating_sub(before);
            if matches!(polled, Poll::Ready(Ok(()))) && got > 0 {
                let left = preface_left.saturating_sub(got);
                this.preface_left.store(left, Ordering::Relaxed);
                if left == 0 {
                    this.signal.post(Event::HeadComplete);
                }
            }
            return polled;
        }
        if !this.awaiting_head.load(Ordering::Relaxed) {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.awaiting_head.store(false, Ordering::Relaxed);
            this.signal.post(Event::HeadStarted);
        }
        polled
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for ClientStream {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await;
    }
}

impl UniqueID for ClientStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ClientStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ClientStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ClientStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for ClientStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, socket_digest: SocketDigest) {
        self.inner.set_socket_digest(socket_digest);
    }
}

#[async_trait]
impl Peek for ClientStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// Called from `early_request_filter`: the request head is in. Stops the
/// head's clock and bounds each read of the body by `client_body_timeout`
/// (Pingora's per-read limit, which a later request resets).
pub fn head_complete(session: &mut Session, limits: &ClientLimits) {
    let body_expected = !session.is_body_empty();
    let downstream = session.as_downstream_mut();
    downstream.set_read_timeout(Some(limits.body_timeout));
    let ours = downstream
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<ClientStream>());
    match ours {
        Some(stream) => stream.head_complete(),
        // An HTTP/2 stream: its body's clock starts now (its loop in
        // `connection` keeps it).
        None if body_expected => post_h2(Event::BodyRead),
        None => {}
    }
}

/// Called from `request_body_filter` on an HTTP/2 stream: a piece of the
/// body arrived (the clock starts again) or the body ended (no clock).
pub fn h2_body_read(end_of_stream: bool) {
    post_h2(if end_of_stream {
        Event::BodyDone
    } else {
        Event::BodyRead
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a test runtime")
    }

    #[test]
    fn reports_the_first_byte_of_the_next_head_once() {
        runtime().block_on(async {
            let (client, server) = tokio::io::duplex(64);
            let mut client = client;
            let signal = Arc::new(Signal::default());
            let mut s = ClientStream::new(Box::new(server), Arc::clone(&signal));
            let mut buf = [0u8; 8];

            // A fresh connection's first head was started at accept.
            client.write_all(b"GET").await.unwrap();
            assert_eq!(s.read(&mut buf).await.unwrap(), 3);
            assert_eq!(signal.take(), None);

            s.await_next_head();
            client.write_all(b"\r\n").await.unwrap();
            assert_eq!(s.read(&mut buf).await.unwrap(), 2);
            assert_eq!(signal.take(), Some(Event::HeadStarted));
            client.write_all(b"x").await.unwrap();
            assert_eq!(s.read(&mut buf).await.unwrap(), 1);
            assert_eq!(signal.take(), None, "only the first byte counts");

            s.head_complete();
            assert_eq!(signal.take(), Some(Event::HeadComplete));

            // End of stream is not the start of a head.
            s.await_next_head();
            drop(client);
            assert_eq!(s.read(&mut buf).await.unwrap(), 0);
            assert_eq!(signal.take(), None);
        });
    }

    #[test]
    fn an_h2_preface_stops_the_clock_once_complete() {
        runtime().block_on(async {
            let (mut client, server) = tokio::io::duplex(64);
            let signal = Arc::new(Signal::default());
            let mut s = ClientStream::new_h2(Box::new(server), Arc::clone(&signal));
            let mut buf = [0u8; 64];
            client.write_all(&[0u8; 20]).await.unwrap();
            assert_eq!(s.read(&mut buf).await.unwrap(), 20);
            assert_eq!(signal.take(), None);
            client.write_all(&[0u8; 13]).await.unwrap();
            assert_eq!(s.read(&mut buf).await.unwrap(), 13);
            assert_eq!(signal.take(), Some(Event::HeadComplete));
            client.write_all(&[0u8; 5]).await.unwrap();
            assert_eq!(s.read(&mut buf).await.unwrap(), 5);
            assert_eq!(signal.take(), None);
        });
    }

    #[test]
    fn writes_and_the_stream_identity_pass_through() {
        runtime().block_on(async {
            let (mut client, server) = tokio::io::duplex(64);
            let inner: Stream = Box::new(server);
            let id = inner.id();
            let mut s = ClientStream::new(inner, Arc::default());
            assert_eq!(s.id(), id);
            assert!(s.selected_alpn_proto().is_none());
            s.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
            s.flush().await.unwrap();
            let mut buf = [0u8; 17];
            client.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"HTTP/1.1 200 OK\r\n");
        });
    }
}
