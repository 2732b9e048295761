//! Request body size limits (`max_body_size`): a declared or chunked body
//! over the limit is refused with 413 and never reaches the upstream
//! whole, exactly the limit passes, and the units (decimal, binary, bare
//! bytes).
//!
//! Every test runs the real binary on loopback in front of real upstreams
//! and talks to it over bare `TcpStream`s, so the exact status, headers
//! and body of each answer are checked. Tests wait by polling; a [`RecordingServer`]
//! keeps every byte the upstream received.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{self, BufReader, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const BODY_KEY: &str = "prot-body-key-0001";

/// Sends a chunked POST with `chunks` (each its own write) and the
/// terminating chunk; returns the answer, if any.
fn send_chunked(addr: SocketAddr, path: &str, chunks: &[Vec<u8>]) -> io::Result<RawResponse> {
    let mut s = connect(addr);
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {BODY_KEY}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    let _ = s.write_all(head.as_bytes());
    for c in chunks {
        let mut frame = format!("{:x}\r\n", c.len()).into_bytes();
        frame.extend_from_slice(c);
        frame.extend_from_slice(b"\r\n");
        if s.write_all(&frame).is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    read_response(&mut BufReader::new(s))
}

#[test]
fn max_body_size_refuses_declared_and_chunked_bodies_over_it_and_passes_exactly_it() {
    let declared_up = RecordingServer::start();
    let chunked_up = RecordingServer::start();
    // Only ever sent the request that must be aborted, so its connection
    // count tells whether the gateway closed that connection.
    let abort_up = RecordingServer::start();
    let limit = "100B";
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::stripped("body", "/body/", "chat", declared_up.addr).max_body_size(limit))
            .route(
                Route::stripped("chunked", "/chunked/", "chat", chunked_up.addr)
                    .max_body_size(limit),
            )
            .route(Route::stripped("abort", "/abort/", "chat", abort_up.addr).max_body_size(limit)),
        KeyFile::of([Key::new(BODY_KEY, "ann").service("chat")]),
    );

    // Declared 101 bytes: refused, and nothing reaches the upstream.
    let over = vec![b'o'; 101];
    let r = send(
        gw.addr(),
        "POST",
        "/body/over",
        &[("X-API-Key", BODY_KEY)],
        &over,
    );
    assert_refusal(
        &r,
        413,
        "request body too large",
        "a declared 101-byte body",
    );
    assert_eq!(
        (declared_up.request_count(), declared_up.total_bytes()),
        (0, 0),
        "the upstream received something: {:?}",
        declared_up.received_text()
    );

    // Exactly 100 bytes: through, whole.
    let exact: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
    let r = send(
        gw.addr(),
        "POST",
        "/body/exact",
        &[("X-API-Key", BODY_KEY)],
        &exact,
    );
    assert_status(&r, 200, "a declared 100-byte body");
    let got = declared_up.requests();
    assert_eq!(got.len(), 1, "requests upstream: {got:?}");
    assert_eq!(got[0].head.target, "/exact");
    assert_eq!(
        sha256_hex(&got[0].body),
        sha256_hex(&exact),
        "the 100-byte body upstream"
    );
    assert!(
        !declared_up.received_contains(&over[..50]),
        "the refused body reached the upstream"
    );

    // Chunked, exactly 100 bytes in two chunks: through, whole.
    let halves = vec![vec![b'h'; 50], vec![b'H'; 50]];
    let r = send_chunked(gw.addr(), "/chunked/exact", &halves).expect("an answer to 2 x 50 bytes");
    assert_status(&r, 200, "a chunked body of exactly 100 bytes");
    let got = chunked_up.requests();
    assert_eq!(got.len(), 1, "chunked requests upstream: {got:?}");
    assert_eq!(
        got[0].body,
        halves.concat(),
        "the chunked 100-byte body upstream"
    );

    // Chunked, 3 x 60 bytes: the request ends once it grows past 100.
    let chunks = vec![vec![b'1'; 60], vec![b'2'; 60], vec![b'3'; 60]];
    match send_chunked(gw.addr(), "/abort/over", &chunks) {
        // Nothing was sent to the client yet: the answer, if any, is 413.
        Ok(r) => assert_refusal(&r, 413, "request body too large", "3 x 60 chunked bytes"),
        // Leniency: a connection closed without an answer is not a 200 either.
        Err(e) => eprintln!("3 x 60 chunked bytes: no answer ({e})"),
    }

    // The upstream saw the request aborted, if it saw it at all: its
    // connection closed, no terminating chunk after the head, never the
    // third chunk, never a complete request.
    assert!(
        wait_until(Duration::from_secs(5), || abort_up.open_connections() == 0),
        "the upstream connection of the aborted request stayed open; received: {:?}",
        abort_up.received_text()
    );
    for (i, bytes) in abort_up.connections().iter().enumerate() {
        let after_head = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(bytes.len(), |p| p + 4);
        let body = &bytes[after_head..];
        let shown = body.escape_ascii().to_string();
        assert!(
            !body.windows(5).any(|w| w == b"0\r\n\r\n"),
            "connection {i} carried the terminating chunk: {shown:?}"
        );
        assert!(
            !body.windows(60).any(|w| w == chunks[2].as_slice()),
            "connection {i} carried the third chunk: {shown:?}"
        );
    }
    assert!(
        abort_up.requests().is_empty(),
        "the upstream received the request complete: {:?}",
        abort_up.requests()
    );
}

#[test]
fn max_body_size_units_are_decimal_and_binary_and_a_bare_number_is_bytes() {
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .max_body_size("50B")
            .route(Route::stripped("kb", "/kb/", "chat", echo.addr).max_body_size("1KB"))
            .route(Route::stripped("kib", "/kib/", "chat", echo.addr).max_body_size("1KiB"))
            .route(Route::stripped("bare", "/bare/", "chat", echo.addr).max_body_size(1000))
            .route(Route::stripped("default", "/default/", "chat", echo.addr)),
        KeyFile::of([Key::new(BODY_KEY, "ann").service("chat")]),
    );
    for (path, limit) in [
        ("/kb/x", 1000),
        ("/kib/x", 1024),
        ("/bare/x", 1000),
        ("/default/x", 50),
    ] {
        let fits = vec![b'f'; limit];
        let r = send(gw.addr(), "POST", path, &[("X-API-Key", BODY_KEY)], &fits);
        assert_status(&r, 200, &format!("{limit} bytes on {path}"));
        let last = echo.last_request().expect("the echo saw the request");
        assert_eq!(last.body_len, limit as u64, "{path}");
        let hits = echo.hits();
        let over = vec![b'o'; limit + 1];
        let r = send(gw.addr(), "POST", path, &[("X-API-Key", BODY_KEY)], &over);
        assert_refusal(
            &r,
            413,
            "request body too large",
            &format!("{} bytes on {path}", limit + 1),
        );
        assert_eq!(
            echo.hits(),
            hits,
            "the refused body on {path} reached the upstream"
        );
    }
}
