//! Hostile clients against headers and paths: no secret (key, query
//! token) reaches the debug log, underscore and gateway-owned header names
//! are not forwarded, forwarding headers are replaced, credentials that
//! disagree are refused, and paths an upstream could read differently from
//! the router are 400.
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

use common::hostile::*;
use common::*;

// ---------------------------------------------------------------------------
// Secrets in logs
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
    let keys_json = KeyFile::of(keys.iter().enumerate().map(|(i, key)| {
        let disabled = matches!(i + 1, 8 | 9);
        Key::new(key, &format!("user{}", i + 1))
            .services(["chat", "dead", "slow"])
            .disabled(disabled)
    }));
    let gw = Gateway::start_with_log_level(
        &GatewayConfig::new()
            .threads(2)
            .audit_log("-")
            .route(Route::chat(up.addr))
            .route(Route::stripped("dead", "/dead/", "dead", dead))
            .route(Route::stripped("slow", "/slow/", "slow", silent.addr).read_timeout("1s")),
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
    let _ = wait_until(HOSTILE_TIMEOUT, || gw.log().contains(marker));
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
                show_bytes(lines[0].as_bytes())
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
// Underscores in header names
// ---------------------------------------------------------------------------

/// Headers of a forwarded request whose name contains `_`.
fn underscore_names(req: &FoundRequest) -> Vec<String> {
    req.head
        .headers
        .iter()
        .filter(|(n, _)| n.contains('_'))
        .map(|(n, v)| format!("{n}: {v}"))
        .collect()
}

#[test]
fn underscore_headers_are_not_forwarded() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
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
        show_bytes(&found.raw_head)
    );
    assert_eq!(found.head.header_all("x-gateway-user"), ["alice"]);
    assert!(!up.received_contains(BOB_KEY.as_bytes()));
}

#[test]
fn underscores_in_headers_forwards_ordinary_ones_but_never_gateway_names() {
    let up = RecordingServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .underscores_in_headers(true)
            .route(Route::chat(up.addr)),
        hardening_keys(),
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
        show_bytes(&found.raw_head)
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
    assert_eq!(
        spoofed,
        Vec::<String>::new(),
        "{}",
        show_bytes(&found.raw_head)
    );
    assert_eq!(found.head.header_all("x-gateway-user"), ["alice"]);
    let ids = found.head.header_all("x-request-id");
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_ne!(ids[0], "spoofed-id");
}

// ---------------------------------------------------------------------------
// Forwarding headers
// ---------------------------------------------------------------------------

#[test]
fn client_forwarding_headers_are_replaced_or_dropped() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
    let request = keyed(
        "GET",
        "/chat/x",
        "X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\nX-Real-IP: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n",
        "",
    );
    let found = check_forwarded(&gw, &up, &request).unwrap();
    let head = &found.head;
    let raw = show_bytes(&found.raw_head);
    assert_eq!(head.header_all("x-forwarded-for"), ["127.0.0.1"], "{raw}");
    assert_eq!(head.header_all("x-forwarded-proto"), ["http"], "{raw}");
    for name in ["x-real-ip", "forwarded", "x-forwarded-host"] {
        assert!(head.header(name).is_none(), "{name} forwarded: {raw}");
    }
    assert!(!up.received_contains(b"1.2.3.4"), "{raw}");
}

// ---------------------------------------------------------------------------
// Credentials that disagree
// ---------------------------------------------------------------------------

#[test]
fn conflicting_api_keys_are_400() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
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
    let gw = hardening_gateway(up.addr);
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
                        return Err(format!(
                            "credential forwarded: {}",
                            show_bytes(&found.raw_head)
                        ));
                    }
                    if head.header_all("x-gateway-user") != ["alice"] {
                        return Err(format!("x-gateway-user: {}", show_bytes(&found.raw_head)));
                    }
                    Ok(())
                });
            (label.to_string(), outcome)
        })
        .collect();
    assert_cases(cases);
}

// ---------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------

#[test]
fn paths_an_upstream_could_read_differently_are_400() {
    let up = RecordingServer::start();
    let gw = hardening_gateway(up.addr);
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
    let gw = hardening_gateway(up.addr);
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
