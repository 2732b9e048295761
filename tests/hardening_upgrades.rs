//! Hostile clients against upgrades: an `Upgrade` on a route without
//! `websocket` is 400, `h2c` is never forwarded, an unrequested 101 from
//! the upstream is 502 and opens no tunnel, and a websocket round trip
//! works on a websocket route.
//!
//! Every test runs the real binary on loopback in front of a real upstream,
//! and drives it from a raw `TcpStream` writing exact bytes, so no client
//! library normalises the request (see `tests/common/hostile.rs`). Most
//! upstreams are a [`RecordingServer`], which keeps every byte it received
//! and parses leniently, so anything the gateway lets through is visible.
//! Tests that try several variants of one attack run them all and report
//! every variant that misbehaved in one failure message.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::hostile::*;
use common::*;

// ---------------------------------------------------------------------------
// Upgrades
// ---------------------------------------------------------------------------

#[test]
fn upgrade_on_a_route_without_websocket_is_400() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let variants = [
        (
            "websocket",
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        ),
        (
            "websocket, other spelling",
            "connection: keep-alive, upgrade\r\nupgrade: WebSocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        ),
    ];
    let cases = variants
        .iter()
        .map(|(label, lines)| {
            let request = keyed("GET", "/chat/socket", lines, "");
            (
                label.to_string(),
                check_refused(&gw, &up, &request, 400, "upgrade not allowed on this route"),
            )
        })
        .collect();
    assert_cases(cases);
    assert_eq!(up.request_count(), 0);
}

/// An `h2c` upgrade may be refused or ignored (served as HTTP/1.1), but
/// the upgrade is never passed on to the upstream.
#[test]
fn h2c_upgrade_is_never_forwarded() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let request = keyed(
        "GET",
        "/chat/socket",
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        "",
    );
    let resp = exchange(gw.addr(), &request);
    if check_ok(&resp).is_err() {
        check_error(&resp, 400, "upgrade not allowed on this route").unwrap();
    }
    for found in up.requests() {
        let head = &found.head;
        assert!(
            head.header("upgrade").is_none() && head.header("http2-settings").is_none(),
            "upgrade forwarded: {}",
            show_bytes(&found.raw_head)
        );
    }
    assert!(!up.received_contains(b"h2c"), "{}", up.received_text());
}

/// Reads a status line and headers only: a `101` has no body to read.
fn read_head_only(r: &mut impl BufRead) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, line.clone()))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let h = h.trim_end();
        if h.is_empty() {
            return Ok((status, headers));
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
}

/// An upstream that answers every request with `101 Switching Protocols`
/// (whether or not it asked for an upgrade) and then records whatever
/// arrives on the connection.
struct SwitchingUpstream {
    heads: Arc<AtomicUsize>,
    after_101: Arc<Mutex<Vec<u8>>>,
    server: CustomServer,
}

impl SwitchingUpstream {
    fn start() -> SwitchingUpstream {
        let heads = Arc::new(AtomicUsize::new(0));
        let after_101: Arc<Mutex<Vec<u8>>> = Arc::default();
        let server = {
            let (heads, after_101) = (Arc::clone(&heads), Arc::clone(&after_101));
            CustomServer::start(move |stream| {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok(mut writer) = stream.try_clone() else {
                    return;
                };
                let mut reader = BufReader::new(stream);
                if !matches!(read_request_head(&mut reader), Ok(Some(_))) {
                    return;
                }
                heads.fetch_add(1, Ordering::SeqCst);
                let reply = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
                if writer.write_all(reply).is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => after_101
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .extend_from_slice(&buf[..n]),
                    }
                }
            })
        };
        SwitchingUpstream {
            heads,
            after_101,
            server,
        }
    }

    fn received_after_101(&self) -> Vec<u8> {
        self.after_101
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[test]
fn unrequested_101_from_upstream_is_502_and_opens_no_tunnel() {
    let up = SwitchingUpstream::start();
    let gw = hardening_gateway(up.server.addr);
    let mut s = hostile_connect(gw.addr());
    s.write_all(&keyed("GET", "/chat/plain", "", ""))
        .expect("write request");
    let mut reader = BufReader::new(s.try_clone().expect("clone client stream"));
    let first = read_head_only(&mut reader);
    // Whatever came back, try to use the connection as a tunnel.
    let _ = s.write_all(b"GET /chat/secret HTTP/1.1\r\nHost: gw.test\r\n\r\n");
    let tunnelled = wait_until(Duration::from_millis(1500), || {
        let after = up.received_after_101();
        after.windows(6).any(|w| w == b"secret")
    });

    let mut problems = Vec::new();
    match &first {
        Ok((502, _)) => {}
        other => problems.push(format!("want 502, got {other:?}")),
    }
    if tunnelled {
        problems.push(format!(
            "bytes written after the response reached the upstream through a tunnel: {}",
            show_bytes(&up.received_after_101())
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("; "));
    assert_eq!(up.heads.load(Ordering::SeqCst), 1);
}

/// A stream that keeps a copy of every byte read from it.
struct Tee {
    inner: TcpStream,
    read: Recorded,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes read on one connection, shared with the test.
type Recorded = Arc<Mutex<Vec<u8>>>;

/// A websocket echo upstream (tungstenite, sync). Returns the server and
/// the raw bytes received per connection (handshake head first).
fn websocket_echo() -> (CustomServer, Arc<Mutex<Vec<Recorded>>>) {
    let conns: Arc<Mutex<Vec<Recorded>>> = Arc::default();
    let server = {
        let conns = Arc::clone(&conns);
        CustomServer::start(move |stream| {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let read: Recorded = Arc::default();
            conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Arc::clone(&read));
            let Ok(mut ws) = tungstenite::accept(Tee {
                inner: stream,
                read,
            }) else {
                return;
            };
            while let Ok(msg) = ws.read() {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).is_ok() {
                    continue;
                }
                break;
            }
        })
    };
    (server, conns)
}

/// The handshake heads a [`websocket_echo`] upstream received.
fn handshakes(conns: &Mutex<Vec<Recorded>>) -> Vec<RequestHead> {
    conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(|c| {
            let bytes = c.lock().unwrap_or_else(|p| p.into_inner()).clone();
            read_request_head(&mut &bytes[..]).ok().flatten()
        })
        .collect()
}

#[test]
fn websocket_round_trip_on_a_websocket_route() {
    use tungstenite::client::IntoClientRequest;

    let (upstream, seen) = websocket_echo();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::stripped("ws", "/ws/", "chat", upstream.addr).websocket(true)),
        hardening_keys(),
    );
    let url = format!("ws://127.0.0.1:{}/ws/echo", gw.port);

    // Without a key: the upgrade is refused with 401.
    let request = url.as_str().into_client_request().expect("ws request");
    match tungstenite::client(request, hostile_connect(gw.addr())) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            assert_eq!(resp.status(), 401);
        }
        Err(e) => panic!("keyless upgrade: want an HTTP 401, got {e}"),
        Ok((_, resp)) => panic!("keyless upgrade succeeded: {}", resp.status()),
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "keyless upgrade reached upstream"
    );

    // With a key: a real exchange through the gateway.
    let mut request = url.as_str().into_client_request().expect("ws request");
    request
        .headers_mut()
        .insert("x-api-key", ALICE_KEY.parse().expect("header value"));
    let (mut ws, resp) = tungstenite::client(request, hostile_connect(gw.addr()))
        .expect("websocket handshake via gateway");
    assert_eq!(resp.status(), 101);
    let text = "hello through the gateway";
    ws.send(tungstenite::Message::text(text)).expect("send");
    let echoed = ws.read().expect("read echo");
    assert_eq!(echoed.to_text().expect("text message"), text);
    let _ = ws.close(None);

    let seen = handshakes(&seen);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/echo");
    assert!(seen[0].header("x-api-key").is_none());
    assert_eq!(seen[0].header_all("x-gateway-user"), ["alice"]);
}
