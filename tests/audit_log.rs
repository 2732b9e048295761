// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

// The audit log against the real binary: one line per decision with
// exactly the documented fields and never a key, `-` for stderr, reopening
// on SIGUSR1 and SIGHUP, and request ids kept or made (the same in the
// answer, upstream and the audit line).

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use common::*;

// ---------------------------------------------------------------------------
// Keys and config
// ---------------------------------------------------------------------------

/// Granted `chat` (the only route's service).
const ANN_KEY: &str = "sk-test-SECRET-abc123";
/// Granted `tts` only: a 403 on `/chat/`.
const BOB_KEY: &str = "sk-test-SECRET-bob456";
/// In no key file: a 401.
const WRONG_KEY: &str = "sk-test-SECRET-wrong789";
/// A substring of every test key: it must never show up in logs or metrics.
const KEY_MARK: &str = "SECRET";

fn keys() -> KeyFile {
    KeyFile::of([
        Key::new(ANN_KEY, "ann").service("chat"),
        Key::new(BOB_KEY, "bob").service("tts"),
    ])
}

/// Two threads and one route, `/chat/` to `upstream`; the test adds its
/// settings.
fn config(upstream: SocketAddr) -> GatewayConfig {
    GatewayConfig::new().threads(2).route(Route::chat(upstream))
}

// ---------------------------------------------------------------------------
// Audit log helpers
// ---------------------------------------------------------------------------

const AUDIT_FIELDS: [&str; 20] = [
    "ts",
    "request_id",
    "client",
    "method",
    "path",
    "route",
    "key_id",
    "user",
    "decision",
    "status",
    "upstream",
    "upstream_status",
    "latency_ms",
    "ttfb_ms",
    "bytes_in",
    "bytes_out",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "usage",
];

fn assert_audit_shape(v: &Value, line: &str) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("audit line is not an object: {line}"));
    let got: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = AUDIT_FIELDS.into_iter().collect();
    assert_eq!(got, want, "audit line fields: {line}");
}

/// [`wait_audit`], each line checked to have exactly the documented
/// fields.
fn wait_checked_audit(path: &Path, rids: &[&str], timeout: Duration) -> Vec<Value> {
    let lines = wait_audit(path, rids, timeout);
    for v in &lines {
        assert_audit_shape(v, &v.to_string());
    }
    lines
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

// ---------------------------------------------------------------------------
// Audit log
// ---------------------------------------------------------------------------

#[test]
fn audit_log_records_every_decision_and_never_a_key() {
    let echo = EchoServer::start();
    let gw = &Gateway::start(&config(echo.addr).audit_log("audit.log"), keys());
    let audit = audit_file(gw);

    let body = br#"{"prompt":"hi"}"#;
    let ok = send(
        gw.addr(),
        "POST",
        "/chat/api/generate?x=1",
        &[("X-API-Key", ANN_KEY), ("X-Request-Id", "test-rid-1")],
        body,
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    let unknown = send(
        gw.addr(),
        "POST",
        "/chat/api/generate",
        &[
            ("Authorization", &format!("Bearer {WRONG_KEY}")),
            ("X-Request-Id", "test-rid-2"),
        ],
        body,
    );
    assert_eq!(unknown.status, 401, "{}", unknown.text());
    let wrong_service = send(
        gw.addr(),
        "POST",
        "/chat/api/generate",
        &[("X-API-Key", BOB_KEY), ("X-Request-Id", "test-rid-3")],
        body,
    );
    assert_eq!(wrong_service.status, 403, "{}", wrong_service.text());
    let no_route = send(
        gw.addr(),
        "GET",
        "/nothing/here",
        &[("X-API-Key", ANN_KEY), ("X-Request-Id", "test-rid-4")],
        b"",
    );
    assert_eq!(no_route.status, 404, "{}", no_route.text());

    let rids = ["test-rid-1", "test-rid-2", "test-rid-3", "test-rid-4"];
    let lines = wait_checked_audit(&audit, &rids, Duration::from_secs(10));
    // Our 4 requests, plus the harness's readiness probe (a 404).
    let ours: Vec<&Value> = lines
        .iter()
        .filter(|v| rids.contains(&v["request_id"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(ours.len(), 4, "one line per request: {lines:#?}");
    assert!(
        lines.len() <= 6,
        "unexpected extra audit lines (probe + 4 expected): {lines:#?}"
    );

    // The accepted request.
    let a = by_rid(&lines, "test-rid-1").unwrap();
    assert_eq!(a["decision"], "accepted", "{a}");
    assert_eq!(a["status"], 200, "{a}");
    assert_eq!(a["method"], "POST", "{a}");
    assert_eq!(a["path"], "/chat/api/generate", "path without query: {a}");
    assert_eq!(a["route"], "chat", "{a}");
    assert_eq!(a["upstream"], echo.addr.to_string(), "{a}");
    assert_eq!(a["upstream_status"], 200, "{a}");
    assert_eq!(a["key_id"], sha256_hex(ANN_KEY.as_bytes())[..12], "{a}");
    assert_eq!(a["user"], "ann", "{a}");
    assert_eq!(a["bytes_in"], body.len() as u64, "{a}");
    assert_eq!(a["bytes_out"], ok.body.len() as u64, "{a}");
    assert!(a["bytes_out"].as_u64().unwrap() > 0, "{a}");
    let latency = a["latency_ms"].as_f64().expect("latency_ms is a number");
    let ttfb = a["ttfb_ms"]
        .as_f64()
        .expect("ttfb_ms is a number when accepted");
    assert!(
        latency >= 0.0 && ttfb >= 0.0 && ttfb <= latency,
        "ttfb {ttfb} must be within latency {latency}: {a}"
    );
    assert!(
        a["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{a}"
    );
    let ts = a["ts"].as_str().expect("ts is a string");
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "ts is RFC 3339 UTC with millis: {ts}"
    );

    // The denials.
    for (rid, decision, status, route) in [
        ("test-rid-2", "unknown_key", 401, Value::from("chat")),
        ("test-rid-3", "wrong_service", 403, Value::from("chat")),
        ("test-rid-4", "no_route", 404, Value::Null),
    ] {
        let d = by_rid(&lines, rid).unwrap();
        assert_eq!(d["decision"], decision, "{d}");
        assert_eq!(d["status"], status, "{d}");
        assert_eq!(d["route"], route, "{d}");
        assert_eq!(d["upstream"], Value::Null, "{d}");
        assert_eq!(d["upstream_status"], Value::Null, "{d}");
        assert_eq!(d["ttfb_ms"], Value::Null, "{d}");
        assert_eq!(d["key_id"], Value::Null, "{d}");
        assert_eq!(d["user"], Value::Null, "{d}");
        assert!(d["latency_ms"].as_f64().is_some(), "{d}");
    }
    assert_eq!(echo.hits(), 1, "only the accepted request went upstream");

    // No key, not even the unknown one, in the audit file or the log.
    let audit_text = fs::read_to_string(&audit).unwrap();
    let log = gw.log();
    for key in [ANN_KEY, BOB_KEY, WRONG_KEY, KEY_MARK] {
        assert!(
            !audit_text.contains(key),
            "audit log leaks {key}:\n{audit_text}"
        );
        assert!(!log.contains(key), "gateway log leaks {key}:\n{log}");
    }
}

#[test]
fn audit_log_dash_writes_to_stderr() {
    let echo = EchoServer::start();
    let gw = &Gateway::start(&config(echo.addr).audit_log("-"), keys());
    let r = send(
        gw.addr(),
        "POST",
        "/chat/x",
        &[("X-API-Key", ANN_KEY), ("X-Request-Id", "stderr-rid-1")],
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        gw.wait_log_contains(r#""request_id":"stderr-rid-1""#, Duration::from_secs(10)),
        "no audit line on stderr:\n{}",
        gw.log()
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains(r#""request_id":"stderr-rid-1""#))
        .unwrap();
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("the audit line on stderr is a whole JSON line ({e}): {line:?}")
    });
    assert_audit_shape(&v, line);
    assert_eq!(v["decision"], "accepted");
    assert_eq!(v["user"], "ann");
    assert!(
        !gw.dir.path().join("-").exists(),
        "\"-\" means stderr, not a file named -"
    );
    assert!(!log.contains(KEY_MARK), "log leaks a key:\n{log}");
}

#[test]
fn audit_log_reopens_on_sigusr1_and_sighup() {
    let echo = EchoServer::start();
    let gw = &Gateway::start(&config(echo.addr).audit_log("audit.log"), keys());
    let dir = gw.dir.path();
    let audit = dir.join("audit.log");
    let send = |rid: &str| {
        let r = send(
            gw.addr(),
            "GET",
            "/chat/x",
            &[("X-API-Key", ANN_KEY), ("X-Request-Id", rid)],
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.text());
    };

    send("before-rotate");
    wait_checked_audit(&audit, &["before-rotate"], Duration::from_secs(10));

    for (signal, rotated, rid) in [
        ("USR1", "audit.log.1", "after-usr1"),
        ("HUP", "audit.log.2", "after-hup"),
    ] {
        let rotated = dir.join(rotated);
        fs::rename(&audit, &rotated).unwrap();
        gw.signal(signal);
        // The writer creates the file again when it reopens.
        poll(
            Duration::from_secs(10),
            &format!("audit.log to be reopened after SIG{signal}"),
            || audit.exists().then_some(()),
        );
        send(rid);
        let lines = wait_checked_audit(&audit, &[rid], Duration::from_secs(10));
        assert!(
            by_rid(&lines, "before-rotate").is_none(),
            "the new file starts empty"
        );
        let old = fs::read_to_string(&rotated).unwrap();
        assert!(
            !old.contains(rid),
            "{rid} went to the rotated file {}:\n{old}",
            rotated.display()
        );
    }
    let first = fs::read_to_string(dir.join("audit.log.1")).unwrap();
    assert!(first.contains("before-rotate"), "{first}");
    assert!(
        gw.wait_log_contains("reload (SIGHUP)", Duration::from_secs(10)),
        "SIGHUP also reloads:\n{}",
        gw.log()
    );
}

// ---------------------------------------------------------------------------
// Request ids
// ---------------------------------------------------------------------------

/// The `x-request-id` values the echo upstream reports having received.
fn upstream_ids(echo_response: &RawResponse) -> Vec<String> {
    let v = echo_response.json();
    v["headers"]["x-request-id"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn request_ids_are_kept_when_well_formed_and_made_otherwise() {
    let echo = EchoServer::start();
    let gw = &Gateway::start(&config(echo.addr).audit_log("audit.log"), keys());
    let audit = audit_file(gw);

    // Well formed: kept, sent upstream once, returned.
    let good = "client-id_1.2:3";
    let r = send(
        gw.addr(),
        "POST",
        "/chat/x",
        &[("X-API-Key", ANN_KEY), ("X-Request-Id", good)],
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some(good));
    assert_eq!(r.header_count("x-request-id"), 1);
    assert_eq!(upstream_ids(&r), vec![good.to_string()]);

    // Malformed (spaces; too long): replaced by a generated id, the same
    // in the response, upstream and the audit line.
    let too_long = "a".repeat(129);
    let mut generated = Vec::new();
    for bad in ["bad id with spaces", too_long.as_str()] {
        let r = send(
            gw.addr(),
            "POST",
            "/chat/bad-id",
            &[("X-API-Key", ANN_KEY), ("X-Request-Id", bad)],
            b"{}",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let id = r.header("x-request-id").expect("a request id").to_string();
        assert!(is_hex32(&id), "generated id {id:?} is 32 hex digits");
        assert_eq!(r.header_count("x-request-id"), 1);
        assert_eq!(upstream_ids(&r), vec![id.clone()], "upstream's view");
        let lines = wait_checked_audit(&audit, &[&id], Duration::from_secs(10));
        let line = by_rid(&lines, &id).unwrap();
        assert_eq!(line["path"], "/chat/bad-id", "{line}");
        assert!(
            !lines.iter().any(|v| v["request_id"] == bad),
            "the malformed id was logged"
        );
        generated.push(id);
    }
    assert_ne!(generated[0], generated[1], "generated ids are unique");

    // Denials carry an id too: generated, or the client's.
    let r = send(
        gw.addr(),
        "GET",
        "/chat/x",
        &[("X-API-Key", WRONG_KEY)],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.text());
    let id = r.header("x-request-id").expect("a 401 has an X-Request-Id");
    assert!(is_hex32(id), "{id:?}");
    let r = send(
        gw.addr(),
        "GET",
        "/chat/x",
        &[("X-API-Key", WRONG_KEY), ("X-Request-Id", "rid-401")],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("rid-401"));
    let r = send(gw.addr(), "GET", "/elsewhere", &[], b"");
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.header("x-request-id").is_some_and(is_hex32), "{r:?}");
    assert_eq!(echo.hits(), 3, "only accepted requests went upstream");
}
