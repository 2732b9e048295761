//! Every request is accounted for exactly once: one audit line and one
//! increment of `agw_requests_total`, whatever the gateway answered (each
//! refusal kind) and for accepted requests, against the real binary.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

const GOOD: &str = "acct-key-good";
const OTHER_SERVICE: &str = "acct-key-tts";
const EXPIRED: &str = "acct-key-expired";
const DISABLED: &str = "acct-key-disabled";

fn keys() -> KeyFile {
    KeyFile::of([
        Key::new(GOOD, "ann").service("chat"),
        Key::new(OTHER_SERVICE, "bob").service("tts"),
        Key::new(EXPIRED, "old")
            .service("chat")
            .expires_at("2020-01-01T00:00:00Z"),
        Key::new(DISABLED, "gone").service("chat").disabled(true),
    ])
}

/// Sends `head` (without the final blank line, which is added) on a new
/// connection and returns the status.
fn send(addr: SocketAddr, head: &str) -> u16 {
    let mut s = TcpStream::connect(addr).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set read timeout");
    s.write_all(format!("{head}\r\n\r\n").as_bytes())
        .expect("send request");
    read_response(&mut BufReader::new(s))
        .expect("a response")
        .status
}

/// The sum of every `agw_requests_total` series; `None` while the admin
/// listener does not answer.
fn requests_total(admin: SocketAddr) -> Option<u64> {
    let text = metrics_text(admin);
    if text.is_empty() {
        return None;
    }
    Some(
        text.lines()
            .filter(|l| l.starts_with("agw_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next())
            .map(|v| v.parse::<u64>().expect("a counter value"))
            .sum(),
    )
}

#[test]
fn every_refusal_and_every_accepted_request_is_counted_and_audited_once() {
    let echo = EchoServer::start();
    let silent = SilentServer::start();
    let refused = refused_addr();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .with_admin()
            .audit_log("audit.log")
            .route(Route::chat(echo.addr).methods(["GET", "POST"]))
            .route(Route::new("down", "/down/", "chat").upstream(refused))
            .route(
                Route::new("slow", "/slow/", "chat")
                    .read_timeout("1s")
                    .upstream(silent.addr),
            ),
        keys(),
    );
    let admin = gw.admin();
    assert!(
        wait_until(Duration::from_secs(10), || requests_total(admin).is_some()),
        "the admin listener answers"
    );
    let before = requests_total(admin).expect("metrics");
    let big = "a".repeat(40 * 1024);
    // (request id, head after the request line's path, expected status, expected decision)
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("acct-ok", format!("GET /chat/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {GOOD}"), 200, "accepted"),
        ("acct-bad-path", format!("GET /chat/%2e%2e/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {GOOD}"), 400, "bad_path"),
        (
            "acct-bad-framing",
            format!("POST /chat/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {GOOD}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"),
            400,
            "bad_framing",
        ),
        ("acct-missing", "GET /chat/x HTTP/1.1\r\nHost: a".to_string(), 401, "missing_key"),
        ("acct-unknown", "GET /chat/x HTTP/1.1\r\nHost: a\r\nX-API-Key: nope".to_string(), 401, "unknown_key"),
        ("acct-expired", format!("GET /chat/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {EXPIRED}"), 401, "expired_key"),
        ("acct-disabled", format!("GET /chat/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {DISABLED}"), 401, "disabled_key"),
        ("acct-wrong-service", format!("GET /chat/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {OTHER_SERVICE}"), 403, "wrong_service"),
        ("acct-no-route", format!("GET /nowhere HTTP/1.1\r\nHost: a\r\nX-API-Key: {GOOD}"), 404, "no_route"),
        ("acct-method", format!("DELETE /chat/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {GOOD}"), 405, "method_not_allowed"),
        ("acct-too-large", format!("GET /chat/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {GOOD}\r\nX-Big: {big}"), 431, "header_too_large"),
        ("acct-502", format!("GET /down/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {GOOD}"), 502, "upstream_error"),
        ("acct-504", format!("GET /slow/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {GOOD}"), 504, "upstream_error"),
    ];
    for (id, head, status, _) in &cases {
        let (line, rest) = head.split_once("\r\n").expect("a request line");
        let got = send(
            gw.addr(),
            &format!("{line}\r\nX-Request-Id: {id}\r\n{rest}"),
        );
        assert_eq!(got, *status, "{id}");
    }

    let audit_path = audit_file(&gw);
    let ours = || -> Vec<serde_json::Value> {
        audit_lines(&audit_path)
            .into_iter()
            .filter(|v| {
                v["request_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("acct-"))
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || ours().len() >= cases.len()),
        "audit lines for every request: {:?}",
        ours()
    );
    // The audit line is written after the metrics, in the same hook: once
    // every line is there, the counter is final.
    let lines = ours();
    let mut by_id: HashMap<String, Vec<&serde_json::Value>> = HashMap::new();
    for v in &lines {
        by_id
            .entry(v["request_id"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(v);
    }
    for (id, _, status, decision) in &cases {
        let seen = by_id.get(*id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(seen.len(), 1, "{id}: exactly one audit line, got {seen:?}");
        assert_eq!(seen[0]["status"], *status, "{id}: {}", seen[0]);
        assert_eq!(seen[0]["decision"], *decision, "{id}: {}", seen[0]);
    }
    assert_eq!(lines.len(), cases.len(), "no audit line twice: {lines:?}");
    assert_eq!(
        requests_total(admin).expect("metrics") - before,
        cases.len() as u64,
        "agw_requests_total rose once per request"
    );
}
