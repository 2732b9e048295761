//! Hostile clients, for the `hardening_*` tests: a gateway with `/chat/`
//! and `/admin/` in front of one upstream, exact bytes written on a raw
//! `TcpStream` (so no client library normalises the request), and checks
//! that an answer is the gateway's own refusal and that the upstream (a
//! [`RecordingServer`](super::RecordingServer)) received nothing, or
//! exactly one request. Tests that try several variants of one attack
//! report every variant that misbehaved at once ([`assert_cases`]).

use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use super::config::{GatewayConfig, Key, KeyFile, Route};
use super::gateway::Gateway;
use super::raw_http::{read_response, RawResponse};
use super::upstreams::{FoundRequest, RecordingServer};

/// Granted `chat`.
pub const ALICE_KEY: &str = "alice-hardening-key-0001";

/// Granted `chat` too.
pub const BOB_KEY: &str = "bob-hardening-key-0002";

/// The two keys of the hardening tests, both for `chat`.
pub fn hardening_keys() -> KeyFile {
    KeyFile::of([
        Key::new(ALICE_KEY, "alice").service("chat"),
        Key::new(BOB_KEY, "bob").service("chat"),
    ])
}

/// How long a raw client waits for a response before calling it missing.
pub const HOSTILE_TIMEOUT: Duration = Duration::from_secs(5);

/// A gateway with `/chat/` (service `chat`) and `/admin/` (service `admin`,
/// which no key may use) both in front of `upstream`.
pub fn hardening_gateway(upstream: SocketAddr) -> Gateway {
    Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::chat(upstream))
            .route(Route::stripped("admin", "/admin/", "admin", upstream)),
        hardening_keys(),
    )
}

pub fn hostile_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to gateway");
    s.set_read_timeout(Some(HOSTILE_TIMEOUT))
        .expect("set read timeout");
    s.set_write_timeout(Some(HOSTILE_TIMEOUT))
        .expect("set write timeout");
    s
}

/// Writes `request` verbatim on a new connection and reads one response.
/// A write error is ignored (the gateway may answer and close before it
/// read everything); a missing or unreadable response is an `Err`.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> Result<RawResponse, String> {
    exchange_with(addr, request, false)
}

/// Like [`exchange`], then shuts down the write half, so a gateway that
/// reads the body up to the end of the connection does not wait forever.
pub fn exchange_and_shutdown(addr: SocketAddr, request: &[u8]) -> Result<RawResponse, String> {
    exchange_with(addr, request, true)
}

pub fn exchange_with(
    addr: SocketAddr,
    request: &[u8],
    shutdown: bool,
) -> Result<RawResponse, String> {
    let mut s = hostile_connect(addr);
    let _ = s.write_all(request);
    if shutdown {
        let _ = s.shutdown(Shutdown::Write);
    }
    read_response(&mut BufReader::new(s)).map_err(|e| format!("no response ({e})"))
}

/// Escaped, truncated text for failure messages.
pub fn show_bytes(bytes: &[u8]) -> String {
    let text = bytes.escape_ascii().to_string();
    if text.len() > 600 {
        format!("{}...", &text[..600])
    } else {
        text
    }
}

/// Checks that `resp` is the gateway's own error: `status`, a JSON
/// content type and exactly `{"error": error}`.
pub fn check_error(
    resp: &Result<RawResponse, String>,
    status: u16,
    error: &str,
) -> Result<(), String> {
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
pub fn check_error_or_bare(
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
pub fn check_ok(resp: &Result<RawResponse, String>) -> Result<(), String> {
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
pub fn check_refused(
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
pub fn check_refused_or_bare(
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

pub fn check_refused_with(
    gw: &Gateway,
    up: &RecordingServer,
    request: &[u8],
    status: u16,
    error: &str,
    send: fn(SocketAddr, &[u8]) -> Result<RawResponse, String>,
) -> Result<(), String> {
    check_refused_inner(gw, up, request, status, error, send, check_error)
}

pub type Check = fn(&Result<RawResponse, String>, u16, &str) -> Result<(), String>;

pub fn check_refused_inner(
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
            show_bytes(&all[before.min(all.len())..])
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
pub fn check_forwarded(
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
            other
                .iter()
                .map(|r| show_bytes(&r.raw_head))
                .collect::<Vec<_>>()
        )),
    }
}

/// Panics listing every case that failed; `cases` pairs a label with the
/// outcome of that case.
pub fn assert_cases(cases: Vec<(String, Result<(), String>)>) {
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
pub fn keyed(method: &str, path: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: gw.test\r\nX-API-Key: {ALICE_KEY}\r\n{extra}\r\n{body}"
    )
    .into_bytes()
}
