//! Hostile clients against request framing: `Content-Length` lists,
//! repeats and non-decimal values, `Transfer-Encoding` other than chunked
//! or beside a length, bare LF and malformed header lines, pipelined
//! requests, and `Host` missing or repeated: refused with 400 before any
//! byte reaches the upstream, while well-framed requests pass once.
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

use std::io::{BufReader, Write};

use common::hostile::*;
use common::*;

// ---------------------------------------------------------------------------
// Content-Length
// ---------------------------------------------------------------------------

/// An 82-byte body, the length the Content-Length variants below announce.
fn body82() -> String {
    let body = format!("{{\"prompt\":\"{}\"}}", "a".repeat(69));
    assert_eq!(body.len(), 82);
    body
}

#[test]
fn content_length_lists_and_repeated_lines_are_400() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let body = body82();
    // (label, lines, whether Pingora refuses it itself, before any hook:
    // it cannot frame differing values; identical ones it would collapse
    // for itself but forward as written, so the gateway refuses those)
    let variants = [
        ("list with a space", "Content-Length: 82, 82\r\n", false),
        ("list without a space", "Content-Length: 82,82\r\n", false),
        (
            "two identical lines",
            "Content-Length: 82\r\nContent-Length: 82\r\n",
            false,
        ),
        (
            "two differing lines",
            "Content-Length: 82\r\nContent-Length: 80\r\n",
            true,
        ),
        ("differing list", "Content-Length: 82, 80\r\n", true),
        ("list with an empty item", "Content-Length: 82,\r\n", true),
    ];
    let cases = variants
        .iter()
        .map(|(label, lines, by_pingora)| {
            let request = keyed("POST", "/chat/api/generate", lines, &body);
            let check = if *by_pingora {
                check_refused_or_bare
            } else {
                check_refused
            };
            (
                label.to_string(),
                check(&gw, &up, &request, 400, "invalid content-length"),
            )
        })
        .collect();
    assert_cases(cases);
    assert_eq!(up.request_count(), 0);
}

#[test]
fn content_length_that_is_not_plain_decimal_is_400() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let body = body82();
    let variants = [
        ("plus sign", "+82"),
        ("hex", "0x52"),
        ("inner space", " 8 2"),
        ("decimal point", "82.0"),
        ("negative", "-82"),
        ("empty", ""),
    ];
    let cases = variants
        .iter()
        .map(|(label, value)| {
            let request = keyed(
                "POST",
                "/chat/api/generate",
                &format!("Content-Length: {value}\r\n"),
                &body,
            );
            (
                format!("{label} ({value:?})"),
                check_refused_or_bare(&gw, &up, &request, 400, "invalid content-length"),
            )
        })
        .collect();
    assert_cases(cases);
    assert_eq!(up.request_count(), 0);
}

#[test]
fn content_length_list_cannot_smuggle_a_hidden_request() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    // A keyless request to another route, padded to 82 bytes, as the body.
    let mut hidden = String::from("GET /admin/secret HTTP/1.1\r\nHost: gw.test\r\nX-Pad: ");
    hidden.push_str(&"p".repeat(82 - hidden.len() - 4));
    hidden.push_str("\r\n\r\n");
    assert_eq!(hidden.len(), 82);
    let request = keyed(
        "POST",
        "/chat/api/generate",
        "Content-Length: 82, 82\r\n",
        &hidden,
    );

    let outcome = check_refused(&gw, &up, &request, 400, "invalid content-length");
    let smuggled = up.received_contains(b"/admin/secret") || up.received_contains(b"/secret ");
    let found: Vec<String> = up.requests().into_iter().map(|r| r.head.target).collect();
    assert!(
        !smuggled,
        "the hidden request reached the upstream; requests it found: {found:?}; bytes: {}",
        show_bytes(up.received_text().as_bytes())
    );
    outcome.unwrap();
    assert_eq!(up.request_count(), 0, "requests: {found:?}");
}

#[test]
fn single_content_length_reaches_the_upstream_once() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let request = keyed(
        "POST",
        "/chat/api/generate",
        "Content-Length: 5\r\n",
        "hello",
    );
    let found = check_forwarded(&gw, &up, &request).unwrap();
    assert_eq!(found.head.target, "/api/generate");
    assert_eq!(found.head.header_all("content-length"), ["5"]);
    assert_eq!(found.body, b"hello");
    assert_eq!(up.request_count(), 1);
}

// ---------------------------------------------------------------------------
// Request-head syntax
// ---------------------------------------------------------------------------

#[test]
fn bare_lf_in_the_request_head_is_400() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let k = ALICE_KEY;
    let variants = [
        (
            "every line",
            format!("GET /chat/x HTTP/1.1\nHost: a\nX-API-Key: {k}\n\n"),
        ),
        (
            "one header line",
            format!("GET /chat/x HTTP/1.1\r\nHost: a\nX-API-Key: {k}\r\n\r\n"),
        ),
        (
            "the request line",
            format!("GET /chat/x HTTP/1.1\nHost: a\r\nX-API-Key: {k}\r\n\r\n"),
        ),
        (
            "the final empty line",
            format!("GET /chat/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {k}\r\n\n"),
        ),
    ];
    let cases = variants
        .iter()
        .map(|(label, request)| {
            (
                label.to_string(),
                check_refused(&gw, &up, request.as_bytes(), 400, "malformed request head"),
            )
        })
        .collect();
    assert_cases(cases);
    assert_eq!(up.request_count(), 0);
}

/// Header lines that RFC 9112 makes invalid: whitespace before the colon
/// (a classic smuggling vector), obsolete line folding, no colon at all.
#[test]
fn invalid_header_line_syntax_is_400() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let variants = [
        ("space before the colon", "Content-Length : 5\r\n"),
        ("tab before the colon", "X-Thing\t: 1\r\n"),
        ("obsolete line folding", "X-Thing: a\r\n folded\r\n"),
        ("no colon", "X-Thing\r\n"),
    ];
    let cases = variants
        .iter()
        .map(|(label, lines)| {
            let request = keyed("POST", "/chat/api/generate", lines, "hello");
            (
                label.to_string(),
                check_refused_or_bare(&gw, &up, &request, 400, "malformed request head"),
            )
        })
        .collect();
    assert_cases(cases);
    assert_eq!(up.request_count(), 0);
}

// ---------------------------------------------------------------------------
// Transfer-Encoding
// ---------------------------------------------------------------------------

#[test]
fn transfer_encoding_other_than_chunked_is_400() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let chunked_body = "5\r\nhello\r\n0\r\n\r\n";
    let variants = [
        (
            "chunked, identity",
            "Transfer-Encoding: chunked, identity\r\n",
        ),
        ("gzip", "Transfer-Encoding: gzip\r\n"),
        ("xchunked", "Transfer-Encoding: xchunked\r\n"),
        ("identity", "Transfer-Encoding: identity\r\n"),
        (
            "chunked line then gzip line",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
        ),
        ("chunked twice", "Transfer-Encoding: chunked, chunked\r\n"),
    ];
    let mut cases: Vec<(String, Result<(), String>)> = variants
        .iter()
        .map(|(label, lines)| {
            let request = keyed("POST", "/chat/api/generate", lines, chunked_body);
            (
                label.to_string(),
                // Pingora refuses codings it does not know itself; the
                // gateway refuses what it would accept (`chunked, chunked`).
                check_refused_inner(
                    &gw,
                    &up,
                    &request,
                    400,
                    "invalid transfer-encoding",
                    exchange_and_shutdown,
                    check_error_or_bare,
                ),
            )
        })
        .collect();
    // HTTP/1.0 has no chunked encoding (RFC 9112 §6.1).
    let http10 = format!(
        "POST /chat/api/generate HTTP/1.0\r\nHost: gw.test\r\nX-API-Key: {ALICE_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}"
    );
    cases.push((
        "chunked on HTTP/1.0".to_string(),
        check_refused_inner(
            &gw,
            &up,
            http10.as_bytes(),
            400,
            "invalid transfer-encoding",
            exchange_and_shutdown,
            check_error_or_bare,
        ),
    ));
    assert_cases(cases);
    assert_eq!(up.request_count(), 0);
}

#[test]
fn content_length_with_transfer_encoding_is_400() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let request = keyed(
        "POST",
        "/chat/api/generate",
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "5\r\nhello\r\n0\r\n\r\n",
    );
    check_refused(
        &gw,
        &up,
        &request,
        400,
        "both content-length and transfer-encoding",
    )
    .unwrap();
    assert_eq!(up.request_count(), 0);
}

#[test]
fn plain_chunked_request_reaches_the_upstream() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let request = keyed(
        "POST",
        "/chat/api/generate",
        "Transfer-Encoding: chunked\r\n",
        "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    let found = check_forwarded(&gw, &up, &request).unwrap();
    assert_eq!(found.body, b"hello world");
    assert!(found.head.header("content-length").is_none());
}

/// A keyless request pipelined behind a keyed one on the same connection
/// is judged on its own: never forwarded, and if it is answered at all
/// (closing the connection instead is fine) the answer is a 401.
#[test]
fn pipelined_keyless_request_is_not_forwarded() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let mut request = keyed("GET", "/chat/first", "", "");
    request.extend_from_slice(b"GET /chat/second HTTP/1.1\r\nHost: gw.test\r\n\r\n");
    let mut s = hostile_connect(gw.addr());
    s.write_all(&request).expect("write pipelined requests");
    let mut reader = BufReader::new(s);
    let first = read_response(&mut reader).map_err(|e| format!("no first response ({e})"));
    check_ok(&first).unwrap();
    if let Ok(second) = read_response(&mut reader) {
        check_error(&Ok(second), 401, "missing api key").unwrap();
    }
    let targets: Vec<String> = up.requests().into_iter().map(|r| r.head.target).collect();
    assert_eq!(targets, ["/first"]);
    assert!(!up.received_contains(b"/second"));
}

// ---------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------

#[test]
fn missing_or_repeated_host_is_400() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let k = ALICE_KEY;
    // (label, request, whether Pingora refuses it itself: several Host
    // lines it does; a missing one the gateway does)
    let variants = [
        (
            "no Host",
            format!("GET /chat/x HTTP/1.1\r\nX-API-Key: {k}\r\n\r\n"),
            false,
        ),
        (
            "two identical Host",
            format!("GET /chat/x HTTP/1.1\r\nHost: a\r\nHost: a\r\nX-API-Key: {k}\r\n\r\n"),
            true,
        ),
        (
            "two different Host",
            format!("GET /chat/x HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-API-Key: {k}\r\n\r\n"),
            true,
        ),
    ];
    let cases = variants
        .iter()
        .map(|(label, request, by_pingora)| {
            let check = if *by_pingora {
                check_refused_or_bare
            } else {
                check_refused
            };
            (
                label.to_string(),
                check(
                    &gw,
                    &up,
                    request.as_bytes(),
                    400,
                    "missing or repeated host header",
                ),
            )
        })
        .collect();
    assert_cases(cases);
    assert_eq!(up.request_count(), 0);
}

#[test]
fn http10_without_host_is_accepted() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let request = format!("GET /chat/x HTTP/1.0\r\nX-API-Key: {ALICE_KEY}\r\n\r\n");
    let found = check_forwarded(&gw, &up, request.as_bytes()).unwrap();
    assert_eq!(found.head.target, "/x");
}
