//! Reliability tests against the real binary, the client side: hostile
//! clients (oversized heads, `Content-Length` with `Transfer-Encoding`,
//! malformed chunks, garbage request lines, a client leaving mid-stream)
//! and 10,000 idle or silent connections. The upstream side is in
//! `reliability.rs`.
//!
//! Every wait is a poll with a deadline; every test finishes in a few
//! seconds (the shared gateway and raw client are in
//! `tests/common/reliability.rs`).

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::reliability::*;
use common::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Hostile clients
// ---------------------------------------------------------------------------

#[test]
fn oversized_header_is_refused_and_the_next_request_is_served() {
    let echo = EchoServer::start();
    let gw = gateway([Route::chat(echo.addr)]);
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
    let gw = gateway([Route::chat(echo.addr)]);
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
    let gw = gateway([Route::chat(echo.addr)]);
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
    let gw = gateway([Route::chat(echo.addr)]);
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
    let gw = gateway([Route::chat(echo.addr)]);
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
    let gw = gateway([Route::chat(streamer.addr)]);
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
    // cap derived from a 20,000 open-file limit (8,944) is below 10,000.
    let gw = Gateway::start(
        &config([Route::chat(echo.addr)])
            .client_header_timeout("60s")
            .max_connections(IDLE as u64 + 500),
        keys(),
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
    let gw = Gateway::start(
        &config([Route::chat(echo.addr)])
            .with_admin()
            .client_header_timeout(&format!("{}s", HEADER_TIMEOUT.as_secs()))
            .max_connections(SILENT as u64 + 500),
        keys(),
    );
    let admin = gw.admin();
    let header = r#"agw_client_timeouts_total{kind="header"}"#;
    assert!(
        wait_until(Duration::from_secs(10), || sample(
            &metrics_text(admin),
            header
        ) == Some(0.0)),
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
        wait_until(Duration::from_secs(3), || sample(
            &metrics_text(admin),
            "agw_client_connections"
        )
        .is_some_and(|n| n >= SILENT as f64)),
        "the gateway holds them: {:?}",
        sample(&metrics_text(admin), "agw_client_connections")
    );
    let took = served_after(&gw);
    eprintln!("served in {took:?} next to {SILENT} silent connections");
    assert!(took < Duration::from_secs(1), "served after {took:?}");
    if opened.elapsed() < HEADER_TIMEOUT {
        assert_eq!(
            sample(&metrics_text(admin), header),
            Some(0.0),
            "closed too early"
        );
    }

    // Every one is closed by the gateway, each counted once.
    assert!(
        wait_until(Duration::from_secs(30), || sample(
            &metrics_text(admin),
            header
        ) == Some(SILENT as f64)),
        "header timeouts: {:?}",
        sample(&metrics_text(admin), header)
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
        wait_until(Duration::from_secs(10), || sample(
            &metrics_text(admin),
            "agw_client_connections"
        ) == Some(0.0)),
        "open connections: {:?}",
        sample(&metrics_text(admin), "agw_client_connections")
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
