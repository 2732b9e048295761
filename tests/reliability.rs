//! Reliability tests against the real binary, the upstream side: failover
//! between upstreams, no retry once a request body went upstream, active
//! health checks with an upstream stopped and started again, stale pooled
//! connections, and upstreams that fail in every way. The client side
//! (hostile and idle clients) is in `reliability_clients.rs`.
//!
//! Every wait is a poll with a deadline; every test finishes in a few
//! seconds (the shared gateway and raw client are in
//! `tests/common/reliability.rs`).

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::reliability::*;
use common::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

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
    let gw = gateway([Route::new("chat", "/chat/", "chat")
        .strip_prefix(true)
        .upstreams([dead, echo.addr])]);
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
    let gw = gateway([
        Route::new("close", "/close/", "chat")
            .strip_prefix(true)
            .upstreams([closes.addr, echo.addr]),
        Route::new("reset", "/reset/", "chat")
            .strip_prefix(true)
            .upstreams([resets.addr, echo.addr]),
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
    let gw = gateway([Route::new("pool", "/chat/", "chat")
        .strip_prefix(true)
        .upstreams([a_addr, b.addr])
        .health_check(HealthCheck::new("/").interval("200ms").timeout("200ms"))]);
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
    let gw = gateway([Route::chat(upstream.addr)]);
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
// Upstream faults
// ---------------------------------------------------------------------------

#[test]
fn refused_upstream_is_502_json() {
    let gw = gateway([Route::chat(refused_addr())]);
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
    let gw = gateway([
        Route::stripped("close", "/close/", "chat", closes.addr),
        Route::stripped("reset", "/reset/", "chat", resets.addr),
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
    let gw = gateway([Route::chat(silent.addr).read_timeout("1s")]);
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
    let gw = gateway([Route::chat(garbage.addr)]);
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
