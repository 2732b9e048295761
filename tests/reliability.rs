//! Reliability tests against the real binary: failover between upstreams,
//! no retry once a request body went upstream, active health checks with an
//! upstream stopped and started again, stale pooled connections, hostile
//! clients, many idle connections, and upstreams that fail in every way.
//!
//! Every wait is a poll with a deadline; every test finishes in a few
//! seconds.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

const KEY: &str = "reliability-key-0001";
const KEYS: &str = r#"{"reliability-key-0001": {"user": "rel", "service": "chat"}}"#;

/// One route in YAML flow style (service `chat`, prefix stripped); `extra`
/// goes inside the mapping, e.g. `", read_timeout: 1s"`.
fn route(name: &str, prefix: &str, upstreams: &[SocketAddr], extra: &str) -> String {
    let ups: Vec<String> = upstreams.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "  - {{name: {name}, path_prefix: \"{prefix}\", service: chat, strip_prefix: true, upstreams: [{}]{extra}}}\n",
        ups.join(", ")
    )
}

/// A gateway with the given routes (2 worker threads).
fn gateway(routes: &[String]) -> Gateway {
    Gateway::start(&format!("threads: 2\nroutes:\n{}", routes.concat()), KEYS)
}

/// GET `path` with the key; the status and the body (empty on a read error).
fn get(agent: &ureq::Agent, gw: &Gateway, path: &str) -> (u16, String) {
    let mut resp = agent
        .get(gw.url(path))
        .header("X-API-Key", KEY)
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

/// POST `body` to `path` with the key; the status and the response body.
fn post(agent: &ureq::Agent, gw: &Gateway, path: &str, body: &[u8]) -> (u16, String) {
    let mut resp = agent
        .post(gw.url(path))
        .header("X-API-Key", KEY)
        .send(body)
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

/// How a raw exchange ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The peer closed the connection (clean EOF).
    Eof,
    /// The peer reset the connection.
    Reset,
    /// Nothing more arrived before the read timeout: a hang.
    TimedOut,
}

/// Everything a raw client read off one connection, and how it ended.
#[derive(Debug)]
struct Exchange {
    bytes: Vec<u8>,
    end: End,
    elapsed: Duration,
}

impl Exchange {
    /// The status of the first response, if a status line arrived.
    fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.bytes);
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Reads `stream` until EOF, reset or `timeout` without data.
fn read_all(mut stream: TcpStream, timeout: Duration) -> Exchange {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(timeout))
        .expect("set read timeout");
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break End::TimedOut
            }
            Err(_) => break End::Reset,
        }
    };
    Exchange {
        bytes,
        end,
        elapsed: start.elapsed(),
    }
}

/// Sends `request` on a new connection (write errors are ignored: the
/// gateway may answer and close before it has read everything) and reads
/// until the gateway closes the connection, or 5 s pass without data.
fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Exchange {
    let mut s = TcpStream::connect(addr).expect("connect to the gateway");
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("set write timeout");
    let _ = s.write_all(request);
    let ex = read_all(s, Duration::from_secs(5));
    eprintln!(
        "{:?}...: {:?}, {:?} after {:?}",
        String::from_utf8_lossy(&request[..request.len().min(40)]),
        ex.status(),
        ex.end,
        ex.elapsed
    );
    ex
}

/// A good request on a new connection still gets its 200.
fn assert_still_serving(gw: &Gateway) {
    let (status, _) = get(&agent(), gw, "/chat/after");
    assert_eq!(status, 200, "a good request after the hostile one");
}

/// Counts the open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// An upstream on a given listener that answers every request with `200`
/// and its `name` as the body, keep-alive. Health-check requests are
/// counted apart from the others.
struct Named {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    checks: Arc<AtomicUsize>,
    _server: CustomServer,
}

impl Named {
    fn start_on(listener: TcpListener, name: &'static str) -> Named {
        let hits = Arc::new(AtomicUsize::new(0));
        let checks = Arc::new(AtomicUsize::new(0));
        let server = {
            let (hits, checks) = (Arc::clone(&hits), Arc::clone(&checks));
            CustomServer::start_on(listener, move |stream| {
                let Ok(mut writer) = stream.try_clone() else {
                    return;
                };
                let mut reader = BufReader::new(stream);
                while let Ok(Some(head)) = read_request_head(&mut reader) {
                    if head.header("user-agent") == Some("ai-gateway-health-check") {
                        checks.fetch_add(1, Ordering::SeqCst);
                    } else {
                        hits.fetch_add(1, Ordering::SeqCst);
                    }
                    if read_request_body(&mut reader, &head, &mut |_| {}).is_err() {
                        return;
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{name}",
                        name.len()
                    );
                    if writer.write_all(resp.as_bytes()).is_err() || !head.keep_alive() {
                        return;
                    }
                }
            })
        };
        Named {
            addr: server.addr,
            hits,
            checks,
            _server: server,
        }
    }

    /// Requests other than health checks.
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn checks(&self) -> usize {
        self.checks.load(Ordering::SeqCst)
    }
}

/// A listener on a port below the kernel's ephemeral range, so that once
/// it is closed no outgoing connection (of this or a parallel test) can
/// take the port before the test binds it again.
fn listener_below_ephemeral_range() -> TcpListener {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(10_000).max(1);
    let seed = std::process::id() as u64
        ^ u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()),
        );
    for i in 0..u64::from(span) {
        let port = 10_000 + ((seed + i * 7919) % u64::from(span)) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return l;
        }
    }
    panic!("no free port between 10000 and {low}");
}

/// Binds `addr` again (after the server that had it was dropped).
fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebinding {addr}: {e}; retrying");
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot bind {addr} again: {e}"),
        }
    }
}

/// Resets `stream` (RST instead of FIN) when it is closed.
fn reset_on_close(stream: TcpStream) {
    let socket = tokio::net::TcpSocket::from_std_stream(stream);
    socket.set_zero_linger().expect("SO_LINGER 0");
    drop(socket);
}

// ---------------------------------------------------------------------------
// Failover and retries
// ---------------------------------------------------------------------------

/// A refused upstream is retried on the other one (every request gets its
/// 200, bodies intact) and is taken out of rotation after its first
/// failure: only one connect to it ever fails.
#[test]
fn failed_connect_fails_over_and_takes_the_upstream_out_of_rotation() {
    let dead = refused_addr();
    let echo = EchoServer::start();
    let gw = gateway(&[route("chat", "/chat/", &[dead, echo.addr], "")]);
    let agent = agent();
    for i in 0..20 {
        if i % 2 == 0 {
            let (status, body) = get(&agent, &gw, &format!("/chat/get/{i}"));
            assert_eq!(status, 200, "GET {i}: {body}\n{}", gw.log());
        } else {
            let payload = format!("payload number {i}").repeat(100);
            let (status, body) = post(&agent, &gw, &format!("/chat/post/{i}"), payload.as_bytes());
            assert_eq!(status, 200, "POST {i}: {body}\n{}", gw.log());
            let json: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
            assert_eq!(
                json["body_sha256"],
                sha256_hex(payload.as_bytes()),
                "POST {i}"
            );
        }
    }
    assert_eq!(
        echo.hits(),
        20,
        "every request reached the live upstream once"
    );
    let log = gw.log();
    let marked = format!("upstream {dead} of route \"chat\" failed to connect");
    assert_eq!(
        log.matches(&marked).count(),
        1,
        "one out-of-rotation line for the dead upstream:\n{log}"
    );
    // Pingora logs every attempt that is retried: had the dead upstream
    // been tried again, there would be one line per try.
    let retried = log
        .lines()
        .filter(|l| l.contains("Fail to proxy") && l.contains("retry: true"))
        .count();
    assert_eq!(retried, 1, "one retried connect in all:\n{log}");
}

/// An upstream that read the whole POST and then closed (or reset) the
/// connection without answering: the request may have been acted on, so
/// it is not sent again; the client gets a 502.
#[test]
fn post_whose_body_went_upstream_is_not_retried() {
    let seen = Arc::new(AtomicUsize::new(0));
    let bad = |reset: bool| {
        let seen = Arc::clone(&seen);
        CustomServer::start(move |stream| {
            let Ok(clone) = stream.try_clone() else {
                return;
            };
            let mut reader = BufReader::new(clone);
            if let Ok(Some(head)) = read_request_head(&mut reader) {
                if read_request_body(&mut reader, &head, &mut |_| {}).is_ok() {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            }
            drop(reader);
            if reset {
                reset_on_close(stream);
            }
        })
    };
    let closes = bad(false);
    let resets = bad(true);
    let echo = EchoServer::start();
    let gw = gateway(&[
        route("close", "/close/", &[closes.addr, echo.addr], ""),
        route("reset", "/reset/", &[resets.addr, echo.addr], ""),
    ]);
    let payload = b"{\"prompt\": \"do something once\"}".repeat(50);
    for (n, path) in ["/close/api/generate", "/reset/api/generate"]
        .into_iter()
        .enumerate()
    {
        let (status, body) = post(&agent(), &gw, path, &payload);
        assert_eq!(status, 502, "{path}: {body}");
        assert_eq!(body, r#"{"error":"upstream unavailable"}"#, "{path}");
        assert_eq!(seen.load(Ordering::SeqCst), n + 1, "{path}: seen once");
    }
    assert_eq!(echo.hits(), 0, "no request was sent again elsewhere");
    // Nothing late either.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    assert_eq!(echo.hits(), 0);
}

// ---------------------------------------------------------------------------
// Active health check
// ---------------------------------------------------------------------------

/// Upstream A is stopped: the check takes it out of rotation and every
/// request goes to B. A is started again on the same port: the check
/// puts it back and requests reach it again. No request fails throughout.
#[test]
fn active_check_follows_an_upstream_stopped_and_started() {
    let listener_a = listener_below_ephemeral_range();
    let a_addr = listener_a.local_addr().expect("A addr");
    let a = Named::start_on(listener_a, "A");
    let b = Named::start_on(TcpListener::bind("127.0.0.1:0").expect("bind B"), "B");
    let gw = gateway(&[route(
        "pool",
        "/chat/",
        &[a_addr, b.addr],
        ", health_check: {path: /, interval: 200ms, timeout: 200ms}",
    )]);
    assert!(
        wait_until(Duration::from_secs(3), || a.checks() > 0 && b.checks() > 0),
        "both upstreams get health checks"
    );
    let agent = agent();
    for _ in 0..6 {
        assert_eq!(get(&agent, &gw, "/chat/warm").0, 200);
    }
    assert!(a.hits() >= 2 && b.hits() >= 2, "round-robin over A and B");

    // Stop A: its port refuses connections now.
    drop(a);
    let down = format!("upstream {a_addr} of route \"pool\" is down");
    assert!(
        gw.wait_log_contains(&down, Duration::from_secs(3)),
        "the check sees A down:\n{}",
        gw.log()
    );
    let b_before = b.hits();
    for i in 0..20 {
        let (status, body) = get(&agent, &gw, &format!("/chat/down/{i}"));
        assert_eq!(
            (status, body.as_str()),
            (200, "B"),
            "request {i} while A is down"
        );
    }
    assert_eq!(b.hits(), b_before + 20, "all requests went to B");

    // Traffic in the background while A comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let traffic = {
        let (stop, results) = (Arc::clone(&stop), Arc::clone(&results));
        let url = gw.url("/chat/traffic");
        thread::spawn(move || {
            let agent = common::agent();
            while !stop.load(Ordering::SeqCst) {
                let r = match agent.get(&url).header("X-API-Key", KEY).call() {
                    Ok(mut resp) => (
                        resp.status().as_u16(),
                        resp.body_mut().read_to_string().unwrap_or_default(),
                    ),
                    Err(e) => (0, e.to_string()),
                };
                results.lock().unwrap().push(r);
                thread::sleep(Duration::from_millis(10));
            }
        })
    };

    // Start A again on the same port.
    let a2 = Named::start_on(rebind(a_addr), "A");
    let up = format!("upstream {a_addr} of route \"pool\" is up again");
    let came_up = gw.wait_log_contains(&up, Duration::from_secs(3));
    let reached = wait_until(Duration::from_secs(3), || a2.hits() >= 3);
    stop.store(true, Ordering::SeqCst);
    traffic.join().expect("traffic thread");
    assert!(came_up, "the check sees A up again:\n{}", gw.log());
    assert!(reached, "requests reach A again (A hits {})", a2.hits());
    let results = results.lock().unwrap();
    let failed: Vec<_> = results.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        results.len()
    );
    assert!(results.iter().any(|(_, body)| body == "A"));
}

// ---------------------------------------------------------------------------
// Stale keep-alive connections
// ---------------------------------------------------------------------------

/// The upstream closes every connection 50 ms after answering, without
/// `Connection: close`. Requests 200 ms apart find the pooled connection
/// closed; that must never reach the client. GETs and POSTs alike.
#[test]
fn upstream_closing_idle_connections_never_surfaces_as_an_error() {
    let hits = Arc::new(AtomicUsize::new(0));
    let upstream = {
        let hits = Arc::clone(&hits);
        CustomServer::start(move |stream| {
            let Ok(mut writer) = stream.try_clone() else {
                return;
            };
            let mut reader = BufReader::new(stream);
            let Ok(Some(head)) = read_request_head(&mut reader) else {
                return;
            };
            hits.fetch_add(1, Ordering::SeqCst);
            if read_request_body(&mut reader, &head, &mut |_| {}).is_err() {
                return;
            }
            let _ = writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            thread::sleep(Duration::from_millis(50));
        })
    };
    let gw = gateway(&[route("chat", "/chat/", &[upstream.addr], "")]);
    let agent = agent();
    for i in 0..16 {
        let (status, body) = if i % 2 == 0 {
            get(&agent, &gw, "/chat/api/tags")
        } else {
            post(&agent, &gw, "/chat/api/generate", b"{\"prompt\":\"hi\"}")
        };
        assert_eq!(
            (status, body.as_str()),
            (200, "ok"),
            "request {i}\n{}",
            gw.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(hits.load(Ordering::SeqCst), 16, "each request served once");
}

// ---------------------------------------------------------------------------
// Hostile clients
// ---------------------------------------------------------------------------

#[test]
fn oversized_header_is_refused_and_the_next_request_is_served() {
    let echo = EchoServer::start();
    let gw = gateway(&[route("chat", "/chat/", &[echo.addr], "")]);
    let one_big = format!(
        "GET /chat/x HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let many: String = (0..90)
        .map(|i| format!("X-Pad-{i}: {}\r\n", "b".repeat(800)))
        .collect();
    let many = format!("GET /chat/x HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\n{many}\r\n");
    for (what, request) in [
        ("one 64 KiB header", one_big),
        ("90 headers of 800 B", many),
    ] {
        let ex = raw_exchange(gw.addr(), request.as_bytes());
        assert_ne!(ex.end, End::TimedOut, "{what}: no answer: {}", ex.text());
        let status = ex.status();
        assert!(
            matches!(status, Some(431) | Some(400)),
            "{what}: {status:?} {}",
            ex.text()
        );
        assert_still_serving(&gw);
    }
    // Only the good requests went upstream.
    assert_eq!(echo.hits(), 2);
    assert!(echo.requests().iter().all(|r| r.head.target == "/after"));
}

/// Requests with both `Content-Length` and `Transfer-Encoding` (the
/// ambiguity request smuggling relies on), each followed on the same
/// connection by a second request hidden where a `Content-Length` reader
/// would see body bytes.
fn cl_te_requests() -> Vec<(&'static str, String)> {
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "Content-Length: 30\r\nTransfer-Encoding: gzip, chunked\r\n",
    ]
    .into_iter()
    .map(|framing| {
        (
            framing,
            format!(
                "POST /chat/api/generate HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\n{framing}\r\n5\r\nhello\r\n0\r\n\r\nGET /chat/smuggled HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\n\r\n"
            ),
        )
    })
    .collect()
}

/// Whatever the gateway does with such a request, it answers once and
/// closes the connection, the hidden request is never served, and the
/// upstream never gets both framing headers.
#[test]
fn content_length_with_transfer_encoding_never_smuggles() {
    let echo = EchoServer::start();
    let gw = gateway(&[route("chat", "/chat/", &[echo.addr], "")]);
    for (framing, request) in cl_te_requests() {
        let ex = raw_exchange(gw.addr(), request.as_bytes());
        assert_ne!(
            ex.end,
            End::TimedOut,
            "{framing:?}: not closed: {}",
            ex.text()
        );
        assert_eq!(
            ex.text().matches("HTTP/1.").count(),
            1,
            "{framing:?}: one response, the hidden request is not served: {}",
            ex.text()
        );
    }
    for r in echo.requests() {
        assert_ne!(
            r.head.target, "/smuggled",
            "the hidden request went upstream"
        );
        assert!(
            r.head.header("content-length").is_none()
                || r.head.header("transfer-encoding").is_none(),
            "both framings went upstream: {:?}",
            r.head
        );
    }
    assert_still_serving(&gw);
}

/// The documented answer: 400, and the upstream never sees the request.
#[test]
fn content_length_with_transfer_encoding_is_400_and_never_forwarded() {
    let echo = EchoServer::start();
    let gw = gateway(&[route("chat", "/chat/", &[echo.addr], "")]);
    for (framing, request) in cl_te_requests() {
        let ex = raw_exchange(gw.addr(), request.as_bytes());
        assert_eq!(ex.status(), Some(400), "{framing:?}: {}", ex.text());
    }
    assert_eq!(echo.hits(), 0, "the upstream never saw them");
    assert_still_serving(&gw);
}

#[test]
fn malformed_chunked_body_is_refused_and_the_daemon_keeps_serving() {
    let echo = EchoServer::start();
    let gw = gateway(&[route("chat", "/chat/", &[echo.addr], "")]);
    let request = format!(
        "POST /chat/api/generate HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    );
    let ex = raw_exchange(gw.addr(), request.as_bytes());
    assert_ne!(ex.end, End::TimedOut, "no hang: {}", ex.text());
    assert!(
        ex.status() == Some(400) || ex.bytes.is_empty(),
        "400 or a closed connection, got: {}",
        ex.text()
    );
    assert!(
        echo.requests().is_empty(),
        "no complete request reached the upstream"
    );
    assert_still_serving(&gw);
}

#[test]
fn garbage_request_lines_get_400_or_a_close() {
    let echo = EchoServer::start();
    let gw = gateway(&[route("chat", "/chat/", &[echo.addr], "")]);
    let garbage: [&[u8]; 4] = [
        b"GARBAGE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET /chat/x HTTP/9.9\r\nHost: gw\r\n\r\n",
        b"GET\x00/chat/x HTTP/1.1\r\n\r\n",
    ];
    for g in garbage {
        let ex = raw_exchange(gw.addr(), g);
        assert_ne!(ex.end, End::TimedOut, "{g:?}: no hang: {}", ex.text());
        assert!(
            ex.status() == Some(400) || ex.bytes.is_empty(),
            "{g:?}: 400 or a closed connection, got: {}",
            ex.text()
        );
    }
    assert_eq!(echo.hits(), 0);
    assert_still_serving(&gw);
}

/// The client reads one line of a long stream and goes away: the gateway
/// cancels the upstream request instead of letting the model run on.
#[test]
fn client_leaving_mid_stream_cancels_the_upstream_request() {
    // 100 chunks 100 ms apart: 10 s if nobody cancels.
    let streamer = StreamServer::start(100, Duration::from_millis(100));
    let gw = gateway(&[route("chat", "/chat/", &[streamer.addr], "")]);
    let mut s = TcpStream::connect(gw.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set read timeout");
    write!(
        s,
        "POST /chat/api/generate HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\nContent-Length: 2\r\n\r\n{{}}"
    )
    .expect("send request");
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    while !line.contains("tok0") {
        line.clear();
        let n = reader.read_line(&mut line).expect("read the stream");
        assert!(n > 0, "stream ended before the first token");
    }
    let left_at = Instant::now();
    drop(reader);
    assert!(
        wait_until(Duration::from_secs(2), || streamer.aborted() == 1),
        "upstream stream not cancelled within 2 s (aborted {})",
        streamer.aborted()
    );
    eprintln!(
        "upstream stream cancelled {:?} after the client left",
        left_at.elapsed()
    );
    let records = streamer.records();
    assert_eq!(records.len(), 1);
    assert!(!records[0].completed, "the stream did not run to its end");
}

// ---------------------------------------------------------------------------
// Many idle connections
// ---------------------------------------------------------------------------

/// The soft open-file limit of this process after raising it to the hard
/// limit (the gateway inherits it): each side of 10,000 connections needs
/// 10,000 descriptors.
fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is narrower on some targets
    let soft = lim.rlim_cur as u64;
    soft
}

/// Taken by the tests that open 10,000 connections, so that they do not
/// run at once: together they would need twice the descriptors.
static MANY_CONNECTIONS: Mutex<()> = Mutex::new(());

/// Whether `n` connections fit this machine's open-file limit (raised
/// first); says why not when they do not.
fn room_for_connections(n: usize) -> bool {
    let limit = raise_open_file_limit();
    if limit < n as u64 + 500 {
        eprintln!("skipped: the open-file limit is {limit}, {n} connections need more");
        return false;
    }
    true
}

/// Opens `n` connections to `addr` that send nothing.
fn open_silent(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let started = Instant::now();
    let conns: Vec<TcpStream> = (0..n)
        .map(|i| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("silent connection {i}: {e}"))
        })
        .collect();
    eprintln!("opened {n} silent connections in {:?}", started.elapsed());
    conns
}

/// Polls a keyed GET until it gets a 200 (for up to 5 s); how long that
/// took.
fn served_after(gw: &Gateway) -> Duration {
    let asked = Instant::now();
    let mut last = String::new();
    let served = wait_until(Duration::from_secs(5), || {
        match agent()
            .get(gw.url("/chat/busy"))
            .header("X-API-Key", KEY)
            .call()
        {
            Ok(r) if r.status() == 200 => true,
            Ok(r) => {
                last = format!("status {}", r.status());
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    assert!(served, "no 200 within 5 s: {last}");
    asked.elapsed()
}

/// One series of the admin listener's `/metrics` (written as exported,
/// labels included), if it answers.
fn admin_metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .ok()?;
    let resp = read_response(&mut BufReader::new(s)).ok()?;
    resp.text().lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// 10,000 connections that send nothing do not stop the gateway from
/// serving, and their descriptors are released when they close.
#[test]
fn ten_thousand_idle_connections_do_not_block_serving() {
    const IDLE: usize = 10_000;
    let _one_at_a_time = MANY_CONNECTIONS.lock().unwrap_or_else(|p| p.into_inner());
    if !room_for_connections(IDLE) {
        return;
    }
    let echo = EchoServer::start();
    // Set on purpose, so that this test keeps its meaning (idle clients do
    // not block serving) with the new defaults: the header timeout (10 s)
    // would close these silent connections while the test runs, and the
    // cap derived from a 20,000 open-file limit (9,840) is below 10,000.
    let gw = Gateway::start(
        &format!(
            "threads: 2\nclient_header_timeout: 60s\nmax_connections: {}\nroutes:\n{}",
            IDLE + 500,
            route("chat", "/chat/", &[echo.addr], "")
        ),
        KEYS,
    );
    let baseline = open_fds(gw.pid());
    let idle = open_silent(gw.addr(), IDLE);
    assert!(
        wait_until(Duration::from_secs(10), || open_fds(gw.pid())
            >= baseline + IDLE - 100),
        "the gateway accepted them: {} fds, baseline {baseline}",
        open_fds(gw.pid())
    );
    let took = served_after(&gw);
    eprintln!("served in {took:?} next to {IDLE} idle connections");
    drop(idle);
    assert!(
        wait_until(Duration::from_secs(10), || open_fds(gw.pid())
            < baseline + 100),
        "descriptors released: {} open, baseline {baseline}",
        open_fds(gw.pid())
    );
    assert_still_serving(&gw);
}

/// 10,000 connections that send nothing are closed by the gateway at
/// `client_header_timeout`, each counted once and none logged, while a
/// keyed request is still served in under a second.
#[test]
fn ten_thousand_silent_connections_are_closed_by_the_header_timeout() {
    const SILENT: usize = 10_000;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(6);
    let _one_at_a_time = MANY_CONNECTIONS.lock().unwrap_or_else(|p| p.into_inner());
    if !room_for_connections(SILENT) {
        return;
    }
    let echo = EchoServer::start();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let gw = Gateway::start(
        &format!(
            "threads: 2\nadmin_listen: \"{admin}\"\nclient_header_timeout: {}s\nmax_connections: {}\nroutes:\n{}",
            HEADER_TIMEOUT.as_secs(),
            SILENT + 500,
            route("chat", "/chat/", &[echo.addr], "")
        ),
        KEYS,
    );
    let header = r#"agw_client_timeouts_total{kind="header"}"#;
    assert!(
        wait_until(Duration::from_secs(10), || admin_metric(admin, header)
            == Some(0.0)),
        "the admin listener answers"
    );
    let baseline = open_fds(gw.pid());
    let opened = Instant::now();
    let mut silent = open_silent(gw.addr(), SILENT);
    let all_open = opened.elapsed();
    assert!(
        all_open < HEADER_TIMEOUT - Duration::from_secs(2),
        "opening took {all_open:?}: too slow for a {HEADER_TIMEOUT:?} header timeout"
    );
    assert!(
        wait_until(Duration::from_secs(3), || admin_metric(
            admin,
            "agw_client_connections"
        )
        .is_some_and(|n| n >= SILENT as f64)),
        "the gateway holds them: {:?}",
        admin_metric(admin, "agw_client_connections")
    );
    let took = served_after(&gw);
    eprintln!("served in {took:?} next to {SILENT} silent connections");
    assert!(took < Duration::from_secs(1), "served after {took:?}");
    if opened.elapsed() < HEADER_TIMEOUT {
        assert_eq!(admin_metric(admin, header), Some(0.0), "closed too early");
    }

    // Every one is closed by the gateway, each counted once.
    assert!(
        wait_until(Duration::from_secs(30), || admin_metric(admin, header)
            == Some(SILENT as f64)),
        "header timeouts: {:?}",
        admin_metric(admin, header)
    );
    let closed_by = opened.elapsed();
    eprintln!("all closed {closed_by:?} after the first connect");
    assert!(closed_by >= HEADER_TIMEOUT, "closed after {closed_by:?}");
    for (i, s) in silent.iter_mut().enumerate().step_by(997) {
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("read timeout");
        let mut byte = [0u8; 1];
        assert!(
            matches!(s.read(&mut byte), Ok(0) | Err(_)),
            "connection {i} is still open"
        );
    }
    assert!(
        wait_until(Duration::from_secs(10), || admin_metric(
            admin,
            "agw_client_connections"
        ) == Some(0.0)),
        "open connections: {:?}",
        admin_metric(admin, "agw_client_connections")
    );
    assert!(
        wait_until(Duration::from_secs(10), || open_fds(gw.pid())
            < baseline + 100),
        "descriptors released: {} open, baseline {baseline}",
        open_fds(gw.pid())
    );
    let log = gw.log();
    assert!(
        log.lines().count() < 100,
        "the log grew with the timeouts: {} lines",
        log.lines().count()
    );
    assert!(!log.contains("Fail to proxy"), "{log}");
    drop(silent);
    assert_still_serving(&gw);
}

// ---------------------------------------------------------------------------
// Upstream faults
// ---------------------------------------------------------------------------

#[test]
fn refused_upstream_is_502_json() {
    let gw = gateway(&[route("chat", "/chat/", &[refused_addr()], "")]);
    let mut resp = agent()
        .get(gw.url("/chat/x"))
        .header("X-API-Key", KEY)
        .call()
        .expect("request");
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert_eq!(
        body_json(&mut resp),
        serde_json::json!({"error": "upstream unavailable"})
    );
}

/// The upstream sends the head and one chunk of a chunked stream, then
/// closes (or resets) the connection. The client must see a truncated
/// stream: the connection ends without the terminating `0\r\n\r\n`, and
/// promptly (no hang).
#[test]
fn upstream_dying_mid_body_ends_the_client_stream_in_error() {
    let dying = |reset: bool| {
        CustomServer::start(move |stream| {
            let Ok(mut writer) = stream.try_clone() else {
                return;
            };
            let mut reader = BufReader::new(stream);
            let Ok(Some(head)) = read_request_head(&mut reader) else {
                return;
            };
            if read_request_body(&mut reader, &head, &mut |_| {}).is_err() {
                return;
            }
            let chunk = "{\"response\":\"tok0\",\"done\":false}\n";
            let _ = write!(
                writer,
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n",
                chunk.len()
            );
            let _ = writer.flush();
            thread::sleep(Duration::from_millis(200));
            drop(reader);
            if reset {
                reset_on_close(writer);
            }
        })
    };
    let closes = dying(false);
    let resets = dying(true);
    let gw = gateway(&[
        route("close", "/close/", &[closes.addr], ""),
        route("reset", "/reset/", &[resets.addr], ""),
    ]);
    for path in ["/close/api/generate", "/reset/api/generate"] {
        let mut s = TcpStream::connect(gw.addr()).expect("connect");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\n\r\n"
        )
        .expect("send");
        let ex = read_all(s, Duration::from_secs(5));
        let text = ex.text();
        eprintln!("{path}: {:?} after {:?}: {text:?}", ex.end, ex.elapsed);
        assert_ne!(ex.end, End::TimedOut, "{path}: the stream hangs: {text:?}");
        assert!(
            ex.elapsed < Duration::from_secs(5),
            "{path}: {:?}",
            ex.elapsed
        );
        assert_eq!(ex.status(), Some(200), "{path}: {text:?}");
        assert!(
            text.contains("tok0"),
            "{path}: the first chunk arrived: {text:?}"
        );
        assert!(
            !text.ends_with("0\r\n\r\n"),
            "{path}: a truncated stream must not look complete: {text:?}"
        );
    }
    // The same through an HTTP client: reading the body is an error.
    let mut resp = agent()
        .get(gw.url("/close/api/generate"))
        .header("X-API-Key", KEY)
        .call()
        .expect("response head");
    assert_eq!(resp.status(), 200);
    let read = resp.body_mut().read_to_string();
    assert!(
        read.is_err(),
        "a truncated body reads as complete: {read:?}"
    );
}

#[test]
fn upstream_that_never_answers_is_504_after_the_read_timeout() {
    let silent = SilentServer::start();
    let gw = gateway(&[route(
        "chat",
        "/chat/",
        &[silent.addr],
        ", read_timeout: 1s",
    )]);
    let started = Instant::now();
    let (status, body) = get(&agent(), &gw, "/chat/api/generate");
    let elapsed = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert_eq!(body, r#"{"error":"upstream timed out"}"#);
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "answered after {elapsed:?}"
    );
    assert_eq!(silent.hits(), 1);
}

#[test]
fn upstream_answering_garbage_is_502() {
    let garbage = CustomServer::start(|stream| {
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        if let Ok(Some(_)) = read_request_head(&mut reader) {
            let _ = writer.write_all(b"garbage\r\n\r\n");
            thread::sleep(Duration::from_millis(100));
        }
    });
    let gw = gateway(&[route("chat", "/chat/", &[garbage.addr], "")]);
    let (status, body) = get(&agent(), &gw, "/chat/x");
    assert_eq!(status, 502, "{body}");
    assert_eq!(body, r#"{"error":"upstream unavailable"}"#);
    assert_still_serving_502(&gw);
}

/// The gateway still answers after the garbage (with 502 again: the
/// upstream only knows garbage).
fn assert_still_serving_502(gw: &Gateway) {
    let (status, _) = get(&agent(), gw, "/chat/y");
    assert_eq!(status, 502);
}
