//! Hostile-client tests for the request-hardening work: request smuggling
//! through `Content-Length`/`Transfer-Encoding` tricks, bare-LF heads,
//! secrets in logs, header spoofing (underscores, forwarding headers,
//! credentials that disagree), upgrades, `Host`, and paths an upstream could
//! read differently from the router.
//!
//! Every test runs the real binary on loopback in front of a real upstream,
//! and drives it from a raw `TcpStream` writing exact bytes, so no client
//! library normalises the request. Most upstreams are a
//! [`RecordingServer`], which keeps every byte it received and parses
//! leniently, so anything the gateway lets through is visible.
//!
//! Tests that try several variants of one attack run them all and report
//! every variant that misbehaved in one failure message.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

const ALICE_KEY: &str = "alice-hardening-key-0001";
const BOB_KEY: &str = "bob-hardening-key-0002";
const KEYS: &str = r#"{
  "alice-hardening-key-0001": {"user": "alice", "service": "chat"},
  "bob-hardening-key-0002": {"user": "bob", "service": "chat"}
}"#;

/// How long a raw client waits for a response before calling it missing.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// One route in YAML flow style, prefix stripped; `extra` goes inside the
/// mapping (e.g. `", websocket: true"`).
fn route(name: &str, prefix: &str, service: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "  - {{name: {name}, path_prefix: \"{prefix}\", service: {service}, strip_prefix: true, upstreams: [\"{upstream}\"]{extra}}}\n"
    )
}

/// A config body: `top` (top-level settings, each line ending in `\n`)
/// followed by the routes.
fn config(top: &str, routes: &[String]) -> String {
    format!("threads: 2\n{top}routes:\n{}", routes.concat())
}

/// A gateway with `/chat/` (service `chat`) and `/admin/` (service `admin`,
/// which no key may use) both in front of `upstream`.
fn chat_gateway(upstream: SocketAddr) -> Gateway {
    Gateway::start(
        &config(
            "",
            &[
                route("chat", "/chat/", "chat", upstream, ""),
                route("admin", "/admin/", "admin", upstream, ""),
            ],
        ),
        KEYS,
    )
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to gateway");
    s.set_read_timeout(Some(CLIENT_TIMEOUT))
        .expect("set read timeout");
    s.set_write_timeout(Some(CLIENT_TIMEOUT))
        .expect("set write timeout");
    s
}

/// Writes `request` verbatim on a new connection and reads one response.
/// A write error is ignored (the gateway may answer and close before it
/// read everything); a missing or unreadable response is an `Err`.
fn exchange(addr: SocketAddr, request: &[u8]) -> Result<RawResponse, String> {
    exchange_with(addr, request, false)
}

/// Like [`exchange`], then shuts down the write half, so a gateway that
/// reads the body up to the end of the connection does not wait forever.
fn exchange_and_shutdown(addr: SocketAddr, request: &[u8]) -> Result<RawResponse, String> {
    exchange_with(addr, request, true)
}

fn exchange_with(addr: SocketAddr, request: &[u8], shutdown: bool) -> Result<RawResponse, String> {
    let mut s = connect(addr);
    let _ = s.write_all(request);
    if shutdown {
        let _ = s.shutdown(Shutdown::Write);
    }
    read_response(&mut BufReader::new(s)).map_err(|e| format!("no response ({e})"))
}

/// Escaped, truncated text for failure messages.
fn show(bytes: &[u8]) -> String {
    let text = bytes.escape_ascii().to_string();
    if text.len() > 600 {
        format!("{}...", &text[..600])
    } else {
        text
    }
}

/// Checks that `resp` is the gateway's own error: `status`, a JSON
/// content type and exactly `{"error": error}`.
fn check_error(resp: &Result<RawResponse, String>, status: u16, error: &str) -> Result<(), String> {
    let resp = resp.as_ref().map_err(Clone::clone)?;
    let expected = serde_json::json!({ "error": error });
    let body: Option<serde_json::Value> = serde_json::from_slice(&resp.body).ok();
    let content_type = resp.header("content-type");
    if resp.status != status
        || body.as_ref() != Some(&expected)
        || content_type != Some("application/json")
    {
        return Err(format!(
            "want {status} {expected}, got {} (content-type {content_type:?}) {:?}",
            resp.status,
            resp.text()
        ));
    }
    Ok(())
}

/// Like [`check_error`], but also accepts Pingora's own bare answer
/// (`status` with an empty body): Pingora refuses a head it cannot frame or
/// parse (differing or unparsable `Content-Length`, several `Host` lines,
/// malformed header lines, `Transfer-Encoding` other than `chunked`) before
/// any of the gateway's hooks run, so the gateway cannot word that answer.
fn check_error_or_bare(
    resp: &Result<RawResponse, String>,
    status: u16,
    error: &str,
) -> Result<(), String> {
    match resp {
        Ok(r) if r.status == status && r.body.is_empty() => Ok(()),
        _ => check_error(resp, status, error),
    }
}

/// Checks that `resp` is the recording upstream's `200 ok`.
fn check_ok(resp: &Result<RawResponse, String>) -> Result<(), String> {
    let resp = resp.as_ref().map_err(Clone::clone)?;
    if resp.status != 200 || resp.body != b"ok" {
        return Err(format!(
            "want the upstream's 200 ok, got {} {:?}",
            resp.status,
            resp.text()
        ));
    }
    Ok(())
}

/// Sends `request`, expects the gateway's error `status`/`error`, and that
/// the upstream received no byte meanwhile.
fn check_refused(
    gw: &Gateway,
    up: &RecordingServer,
    request: &[u8],
    status: u16,
    error: &str,
) -> Result<(), String> {
    check_refused_with(gw, up, request, status, error, exchange)
}

/// [`check_refused`] for heads Pingora may refuse itself (see
/// [`check_error_or_bare`]).
fn check_refused_or_bare(
    gw: &Gateway,
    up: &RecordingServer,
    request: &[u8],
    status: u16,
    error: &str,
) -> Result<(), String> {
    check_refused_inner(
        gw,
        up,
        request,
        status,
        error,
        exchange,
        check_error_or_bare,
    )
}

fn check_refused_with(
    gw: &Gateway,
    up: &RecordingServer,
    request: &[u8],
    status: u16,
    error: &str,
    send: fn(SocketAddr, &[u8]) -> Result<RawResponse, String>,
) -> Result<(), String> {
    check_refused_inner(gw, up, request, status, error, send, check_error)
}

type Check = fn(&Result<RawResponse, String>, u16, &str) -> Result<(), String>;

fn check_refused_inner(
    gw: &Gateway,
    up: &RecordingServer,
    request: &[u8],
    status: u16,
    error: &str,
    send: fn(SocketAddr, &[u8]) -> Result<RawResponse, String>,
    check: Check,
) -> Result<(), String> {
    let before = up.total_bytes();
    let resp = send(gw.addr(), request);
    let mut problems = Vec::new();
    if let Err(e) = check(&resp, status, error) {
        problems.push(e);
    }
    let after = up.total_bytes();
    if after != before {
        let all: Vec<u8> = up.connections().concat();
        problems.push(format!(
            "the upstream received {} bytes: {}",
            after - before,
            show(&all[before.min(all.len())..])
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Sends `request`, expects the upstream's `200 ok`, and returns the one
/// request the upstream found for it.
fn check_forwarded(
    gw: &Gateway,
    up: &RecordingServer,
    request: &[u8],
) -> Result<FoundRequest, String> {
    let before = up.requests().len();
    let resp = exchange(gw.addr(), request);
    check_ok(&resp)?;
    let requests = up.requests();
    match &requests[before.min(requests.len())..] {
        [one] => Ok(one.clone()),
        other => Err(format!(
            "want exactly one request upstream, found {}: {:?}",
            other.len(),
            other.iter().map(|r| show(&r.raw_head)).collect::<Vec<_>>()
        )),
    }
}

/// Panics listing every case that failed; `cases` pairs a label with the
/// outcome of that case.
fn assert_cases(cases: Vec<(String, Result<(), String>)>) {
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|(label, r)| r.as_ref().err().map(|e| format!("  {label}: {e}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
}

/// A keyed request head to `path`, with `extra` header lines (each ending
/// in CRLF) and an optional body.
fn keyed(method: &str, path: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: gw.test\r\nX-API-Key: {ALICE_KEY}\r\n{extra}\r\n{body}"
    )
    .into_bytes()
}

/// Headers of a forwarded request whose name contains `_`.
fn underscore_names(req: &FoundRequest) -> Vec<String> {
    req.head
        .headers
        .iter()
        .filter(|(n, _)| n.contains('_'))
        .map(|(n, v)| format!("{n}: {v}"))
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Content-Length
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
    let gw = chat_gateway(up.addr);
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
    let gw = chat_gateway(up.addr);
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
    let gw = chat_gateway(up.addr);
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
        show(up.received_text().as_bytes())
    );
    outcome.unwrap();
    assert_eq!(up.request_count(), 0, "requests: {found:?}");
}

#[test]
fn single_content_length_reaches_the_upstream_once() {
    let up = RecordingServer::start();
    let gw = chat_gateway(up.addr);
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
// 2. Request-head syntax
// ---------------------------------------------------------------------------

#[test]
fn bare_lf_in_the_request_head_is_400() {
    let up = RecordingServer::start();
    let gw = chat_gateway(up.addr);
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
    let gw = chat_gateway(up.addr);
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
// 1b. Transfer-Encoding
// ---------------------------------------------------------------------------

#[test]
fn transfer_encoding_other_than_chunked_is_400() {
    let up = RecordingServer::start();
    let gw = chat_gateway(up.addr);
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
    let gw = chat_gateway(up.addr);
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
    let gw = chat_gateway(up.addr);
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
    let gw = chat_gateway(up.addr);
    let mut request = keyed("GET", "/chat/first", "", "");
    request.extend_from_slice(b"GET /chat/second HTTP/1.1\r\nHost: gw.test\r\n\r\n");
    let mut s = connect(gw.addr());
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
// 3. Secrets in logs
// ---------------------------------------------------------------------------

/// A distinct secret per use, so a leak says which request leaked.
fn secret(tag: &str) -> String {
    format!("sekrit-{tag}-q7Zv")
}

#[test]
fn no_secret_reaches_the_debug_log() {
    let up = RecordingServer::start();
    let silent = SilentServer::start();
    let dead = refused_addr();
    let keys: Vec<String> = (1..=20).map(|i| secret(&format!("k{i:02}"))).collect();
    let k = |i: usize| keys[i - 1].as_str();
    let q = |i: usize| secret(&format!("q{i:02}"));
    let u = |i: usize| secret(&format!("u{i:02}"));
    // k08 and k09 are revoked: 401 with a known key.
    let entries: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let disabled = matches!(i + 1, 8 | 9);
            format!(
                r#""{key}": {{"user": "user{}", "services": ["chat", "dead", "slow"], "disabled": {disabled}}}"#,
                i + 1
            )
        })
        .collect();
    let keys_json = format!("{{{}}}", entries.join(",\n"));
    let gw = Gateway::start_with_log_level(
        &config(
            "audit_log: \"-\"\n",
            &[
                route("chat", "/chat/", "chat", up.addr, ""),
                route("dead", "/dead/", "dead", dead, ""),
                route("slow", "/slow/", "slow", silent.addr, ", read_timeout: 1s"),
            ],
        ),
        &keys_json,
        "debug",
    );

    let h = "Host: gw.test\r\n";
    let oversized_filler = format!("X-Filler: {}\r\n", "f".repeat(33 * 1024));
    let requests: Vec<(&str, Option<u16>, String)> = vec![
        (
            "502 with keys in the query and X-API-Key",
            Some(502),
            format!("GET /dead/x?api_key={}&token={} HTTP/1.1\r\n{h}X-API-Key: {}\r\n\r\n", k(1), q(1), k(2)),
        ),
        (
            "504 with keys in the query and Bearer",
            Some(504),
            format!("GET /slow/x?api_key={}&token={} HTTP/1.1\r\n{h}Authorization: Bearer {}\r\n\r\n", k(3), q(2), k(4)),
        ),
        (
            "200 with X-API-Key and a key in the query",
            Some(200),
            format!("GET /chat/x?api_key={}&token={} HTTP/1.1\r\n{h}X-API-Key: {}\r\n\r\n", k(7), q(3), k(5)),
        ),
        (
            "200 with Bearer",
            Some(200),
            format!("POST /chat/x?token={} HTTP/1.1\r\n{h}Authorization: Bearer {}\r\nContent-Length: 2\r\n\r\nhi", q(4), k(6)),
        ),
        (
            "401 revoked key in X-API-Key",
            Some(401),
            format!("GET /chat/x?token={} HTTP/1.1\r\n{h}X-API-Key: {}\r\n\r\n", q(5), k(8)),
        ),
        (
            "401 revoked key in Bearer",
            Some(401),
            format!("GET /chat/x HTTP/1.1\r\n{h}Authorization: Bearer {}\r\n\r\n", k(9)),
        ),
        (
            "401 unknown key in X-API-Key",
            Some(401),
            format!("GET /chat/x?token={} HTTP/1.1\r\n{h}X-API-Key: {}\r\n\r\n", q(6), u(1)),
        ),
        (
            "401 unknown key in Bearer",
            Some(401),
            format!("GET /chat/x HTTP/1.1\r\n{h}Authorization: Bearer {}\r\n\r\n", u(2)),
        ),
        (
            "401 key only in the query",
            Some(401),
            format!("GET /chat/x?api_key={} HTTP/1.1\r\n{h}\r\n", k(16)),
        ),
        (
            "bare LF head",
            None,
            format!("GET /chat/x?token={} HTTP/1.1\nHost: gw.test\nX-API-Key: {}\n\n", q(7), k(10)),
        ),
        (
            "invalid content-length",
            None,
            format!("POST /chat/x?token={} HTTP/1.1\r\n{h}X-API-Key: {}\r\nContent-Length: 2, 3\r\n\r\nhi!", q(8), k(11)),
        ),
        (
            "space before a colon",
            None,
            format!("GET /chat/x?token={} HTTP/1.1\r\n{h}X-API-Key: {}\r\nX-Thing : 1\r\n\r\n", q(9), k(17)),
        ),
        (
            "oversized head",
            Some(431),
            format!("GET /chat/x?token={} HTTP/1.1\r\n{h}X-API-Key: {}\r\n{oversized_filler}\r\n", q(10), k(12)),
        ),
        (
            "conflicting X-API-Key and Bearer",
            None,
            format!("GET /chat/x HTTP/1.1\r\n{h}X-API-Key: {}\r\nAuthorization: Bearer {}\r\n\r\n", k(13), k(14)),
        ),
        (
            "404 with a key and a query",
            Some(404),
            format!("GET /nowhere/x?token={} HTTP/1.1\r\n{h}X-API-Key: {}\r\n\r\n", q(11), k(15)),
        ),
        (
            "bad path with a key and a query",
            Some(400),
            format!("GET /chat/%2e%2e/x?token={} HTTP/1.1\r\n{h}X-API-Key: {}\r\n\r\n", q(12), k(18)),
        ),
    ];

    let mut outcomes = Vec::new();
    let mut wrong_status = Vec::new();
    for (label, want, request) in &requests {
        let got = exchange(gw.addr(), request.as_bytes()).map(|r| r.status);
        if let Some(want) = want {
            if got.as_ref() != Ok(want) {
                wrong_status.push(format!("{label}: want {want}, got {got:?}"));
            }
        }
        outcomes.push(format!("{label}: {got:?}"));
    }
    // The requests are sequential; a last one that the gateway logs at
    // debug (denials name the path) marks the end of the log to read.
    let marker = "end-of-secrets-test";
    let _ = exchange(
        gw.addr(),
        format!("GET /nowhere/{marker} HTTP/1.1\r\n{h}\r\n").as_bytes(),
    );
    let _ = wait_until(CLIENT_TIMEOUT, || gw.log().contains(marker));
    let log = gw.log();

    assert!(
        wrong_status.is_empty(),
        "the requests did not take the paths this test needs: {wrong_status:?}"
    );
    assert!(!log.trim().is_empty(), "the gateway log is empty");
    assert!(
        log.lines().filter(|l| l.contains(" DEBUG ")).count() > 0,
        "no debug lines in the log, so the test proves nothing:\n{log}"
    );
    let mut secrets: Vec<String> = keys.clone();
    secrets.extend((1..=12).map(q));
    secrets.extend((1..=2).map(u));
    let leaked: Vec<String> = secrets
        .iter()
        .filter(|s| log.contains(s.as_str()))
        .map(|s| {
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(s.as_str())).collect();
            format!(
                "{s} in {} line(s), first: {}",
                lines.len(),
                show(lines[0].as_bytes())
            )
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "{} secret(s) in the gateway log:\n  {}\nrequests: {outcomes:#?}",
        leaked.len(),
        leaked.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// 4. Underscores in header names
// ---------------------------------------------------------------------------

#[test]
fn underscore_headers_are_not_forwarded() {
    let up = RecordingServer::start();
    let gw = chat_gateway(up.addr);
    let request = keyed(
        "GET",
        "/chat/x",
        &format!(
            "X_Gateway_User: root\r\nX-Gateway_User: root\r\nX_Custom: 1\r\nX_API_Key: {BOB_KEY}\r\n"
        ),
        "",
    );
    let found = check_forwarded(&gw, &up, &request).unwrap();
    assert_eq!(
        underscore_names(&found),
        Vec::<String>::new(),
        "underscore headers forwarded; head: {}",
        show(&found.raw_head)
    );
    assert_eq!(found.head.header_all("x-gateway-user"), ["alice"]);
    assert!(!up.received_contains(BOB_KEY.as_bytes()));
}

#[test]
fn underscores_in_headers_forwards_ordinary_ones_but_never_gateway_names() {
    let up = RecordingServer::start();
    let gw = Gateway::start(
        &config(
            "underscores_in_headers: true\n",
            &[route("chat", "/chat/", "chat", up.addr, "")],
        ),
        KEYS,
    );
    let request = keyed(
        "GET",
        "/chat/x",
        "X_Custom: 1\r\nX_Gateway_User: root\r\nX-Gateway_User: root\r\nx_request_id: spoofed-id\r\nX_Forwarded_For: 1.2.3.4\r\nX_Forwarded_Proto: https\r\n",
        "",
    );
    let found = check_forwarded(&gw, &up, &request).unwrap();
    assert_eq!(
        found.head.header("x_custom"),
        Some("1"),
        "{}",
        show(&found.raw_head)
    );
    let gateway_names = [
        "x-gateway-user",
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
    ];
    let spoofed: Vec<String> = underscore_names(&found)
        .into_iter()
        .filter(|h| {
            let name = h.split(':').next().unwrap_or("").replace('_', "-");
            gateway_names.contains(&name.as_str())
        })
        .collect();
    assert_eq!(spoofed, Vec::<String>::new(), "{}", show(&found.raw_head));
    assert_eq!(found.head.header_all("x-gateway-user"), ["alice"]);
    let ids = found.head.header_all("x-request-id");
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_ne!(ids[0], "spoofed-id");
}

// ---------------------------------------------------------------------------
// 5. Forwarding headers
// ---------------------------------------------------------------------------

#[test]
fn client_forwarding_headers_are_replaced_or_dropped() {
    let up = RecordingServer::start();
    let gw = chat_gateway(up.addr);
    let request = keyed(
        "GET",
        "/chat/x",
        "X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\nX-Real-IP: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n",
        "",
    );
    let found = check_forwarded(&gw, &up, &request).unwrap();
    let head = &found.head;
    let raw = show(&found.raw_head);
    assert_eq!(head.header_all("x-forwarded-for"), ["127.0.0.1"], "{raw}");
    assert_eq!(head.header_all("x-forwarded-proto"), ["http"], "{raw}");
    for name in ["x-real-ip", "forwarded", "x-forwarded-host"] {
        assert!(head.header(name).is_none(), "{name} forwarded: {raw}");
    }
    assert!(!up.received_contains(b"1.2.3.4"), "{raw}");
}

// ---------------------------------------------------------------------------
// 6. Upgrades
// ---------------------------------------------------------------------------

#[test]
fn upgrade_on_a_route_without_websocket_is_400() {
    let up = RecordingServer::start();
    let gw = chat_gateway(up.addr);
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
    let gw = chat_gateway(up.addr);
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
            show(&found.raw_head)
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
    let gw = chat_gateway(up.server.addr);
    let mut s = connect(gw.addr());
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
            show(&up.received_after_101())
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
        &config(
            "",
            &[route(
                "ws",
                "/ws/",
                "chat",
                upstream.addr,
                ", websocket: true",
            )],
        ),
        KEYS,
    );
    let url = format!("ws://127.0.0.1:{}/ws/echo", gw.port);

    // Without a key: the upgrade is refused with 401.
    let request = url.as_str().into_client_request().expect("ws request");
    match tungstenite::client(request, connect(gw.addr())) {
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
    let (mut ws, resp) =
        tungstenite::client(request, connect(gw.addr())).expect("websocket handshake via gateway");
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

// ---------------------------------------------------------------------------
// 7. Credentials that disagree
// ---------------------------------------------------------------------------

#[test]
fn conflicting_api_keys_are_400() {
    let up = RecordingServer::start();
    let gw = chat_gateway(up.addr);
    let variants = [
        (
            "two X-API-Key, both valid",
            format!("X-API-Key: {BOB_KEY}\r\n"),
        ),
        (
            "two X-API-Key, second unknown",
            "X-API-Key: not-a-key-at-all\r\n".to_string(),
        ),
        (
            "X-API-Key and a different Bearer",
            "Authorization: Bearer other\r\n".to_string(),
        ),
        (
            "X-API-Key and a different valid Bearer",
            format!("Authorization: Bearer {BOB_KEY}\r\n"),
        ),
    ];
    let cases = variants
        .iter()
        .map(|(label, lines)| {
            let request = keyed("GET", "/chat/x", lines, "");
            (
                label.to_string(),
                check_refused(&gw, &up, &request, 400, "conflicting api keys"),
            )
        })
        .collect();
    assert_cases(cases);
    assert_eq!(up.request_count(), 0);
}

#[test]
fn agreeing_api_keys_are_accepted() {
    let up = RecordingServer::start();
    let gw = chat_gateway(up.addr);
    let variants = [
        (
            "same key in X-API-Key and Bearer",
            format!("Authorization: Bearer {ALICE_KEY}\r\n"),
        ),
        (
            "two identical X-API-Key",
            format!("X-API-Key: {ALICE_KEY}\r\n"),
        ),
    ];
    let cases = variants
        .iter()
        .map(|(label, lines)| {
            let outcome =
                check_forwarded(&gw, &up, &keyed("GET", "/chat/x", lines, "")).and_then(|found| {
                    let head = &found.head;
                    if head.header("x-api-key").is_some() || head.header("authorization").is_some()
                    {
                        return Err(format!("credential forwarded: {}", show(&found.raw_head)));
                    }
                    if head.header_all("x-gateway-user") != ["alice"] {
                        return Err(format!("x-gateway-user: {}", show(&found.raw_head)));
                    }
                    Ok(())
                });
            (label.to_string(), outcome)
        })
        .collect();
    assert_cases(cases);
}

// ---------------------------------------------------------------------------
// 8. Host
// ---------------------------------------------------------------------------

#[test]
fn missing_or_repeated_host_is_400() {
    let up = RecordingServer::start();
    let gw = chat_gateway(up.addr);
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
    let gw = chat_gateway(up.addr);
    let request = format!("GET /chat/x HTTP/1.0\r\nX-API-Key: {ALICE_KEY}\r\n\r\n");
    let found = check_forwarded(&gw, &up, request.as_bytes()).unwrap();
    assert_eq!(found.head.target, "/x");
}

// ---------------------------------------------------------------------------
// 9. Paths
// ---------------------------------------------------------------------------

#[test]
fn paths_an_upstream_could_read_differently_are_400() {
    let up = RecordingServer::start();
    let gw = chat_gateway(up.addr);
    let paths = [
        "/chat/a\\b",
        "/chat/%252e%252e/admin",
        "/chat/%252F",
        "/chat/%255c",
        "/chat/..;/admin",
        "/chat/.;x/a",
        "/chat/..%3b/admin",
        "/chat/..%3B/admin",
        "/chat/a%00b",
        "/chat/a%0ab",
        "/chat/a%0Db",
        "/chat/a%09b",
        "/chat/a%1fb",
        "/chat/a%7fb",
    ];
    let cases = paths
        .iter()
        .map(|path| {
            (
                path.to_string(),
                check_refused(&gw, &up, &keyed("GET", path, "", ""), 400, "invalid path"),
            )
        })
        .collect();
    assert_cases(cases);
    assert_eq!(up.request_count(), 0);
}

#[test]
fn ordinary_escapes_pass() {
    let up = RecordingServer::start();
    let gw = chat_gateway(up.addr);
    // (`;` parameters are refused unless the route allows them:
    // tests/proxy.rs `segment_parameters_are_400_unless_the_route_allows_them`.)
    let paths = [("/chat/a%20b%3F%25", "/a%20b%3F%25")];
    let cases = paths
        .iter()
        .map(|(path, upstream_target)| {
            let outcome = check_forwarded(&gw, &up, &keyed("GET", path, "", "")).and_then(|f| {
                if f.head.target == *upstream_target {
                    Ok(())
                } else {
                    Err(format!("upstream target {:?}", f.head.target))
                }
            });
            (path.to_string(), outcome)
        })
        .collect();
    assert_cases(cases);
}
