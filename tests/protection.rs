//! Fair use and abuse: per-key rate limits and concurrency caps, the
//! failed-key throttle against key guessing, request body size limits,
//! address allowlists (with `X-Forwarded-For` from trusted proxies only),
//! CORS, and how all of them are configured, reloaded, counted and refused.
//!
//! Every test runs the real binary on loopback in front of real upstreams
//! (an [`EchoServer`], a [`RecordingServer`] that keeps every byte, or a
//! [`StreamServer`] that streams slowly), and talks to it over bare
//! `TcpStream`s, so the exact status, headers and body of each answer are
//! checked. Tests wait by polling; the only sleeps wait out a `Retry-After`
//! the gateway gave (or a failed-key window), because that is the behaviour
//! under test.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

// ---------------------------------------------------------------------------
// Running beside the load test
// ---------------------------------------------------------------------------

/// The 100,000-address test keeps both CPUs busy on purpose; tests that
/// measure time (a burst against a per-second limit, an answer "at once",
/// a 2 s cool-down) must not run beside it. Every other test holds this
/// shared, the load test holds it exclusively.
static LOAD: RwLock<()> = RwLock::new(());

/// Taken first by every test but the load test.
fn shared() -> RwLockReadGuard<'static, ()> {
    LOAD.read().unwrap_or_else(|e| e.into_inner())
}

/// Taken first by the load test.
fn exclusive() -> RwLockWriteGuard<'static, ()> {
    LOAD.write().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Configs and keys
// ---------------------------------------------------------------------------

/// How long a reload (file watch or SIGHUP) may take to show in the log.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// A raw HTTP/1.1 client
// ---------------------------------------------------------------------------

/// Whether any `Vary` header lists `Origin`.
fn varies_on_origin(r: &RawResponse) -> bool {
    r.headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("vary"))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("origin"))
}

/// The `Access-Control-*` headers of an answer.
fn cors_headers(r: &RawResponse) -> Vec<(String, String)> {
    r.headers
        .iter()
        .filter(|(n, _)| n.to_ascii_lowercase().starts_with("access-control-"))
        .cloned()
        .collect()
}

fn assert_no_cors(r: &RawResponse, what: &str) {
    let found = cors_headers(r);
    assert!(
        found.is_empty(),
        "{what}: CORS headers {found:?} on {}",
        show(r)
    );
}

/// A comma-separated header value as a set of lower-case tokens.
fn token_set(v: &str) -> Vec<String> {
    let mut t: Vec<String> = v
        .split(',')
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    t.sort();
    t.dedup();
    t
}

// ---------------------------------------------------------------------------
// Streams held open
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Metrics and audit
// ---------------------------------------------------------------------------

/// `agw_refused_total{reason="<reason>"}` from the admin listener (0 if the
/// series is absent).
fn refused_total(admin: SocketAddr, reason: &str) -> f64 {
    let r = send(admin, "GET", "/metrics", &[], b"");
    assert_status(&r, 200, "GET /metrics");
    let prefix = format!("agw_refused_total{{reason=\"{reason}\"}} ");
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| {
            v.split(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad sample value in {v:?}"))
        })
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------

const RATE_A: &str = "prot-rate-key-a-0001";
const RATE_B: &str = "prot-rate-key-b-0002";

#[test]
fn rate_limit_allows_n_then_429_with_retry_after_then_recovers_and_keys_do_not_share_a_budget() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::chat(echo.addr)),
        &KeyFile::of([
            Key::new(RATE_A, "ann").service("chat").rate_limit("5/s"),
            Key::new(RATE_B, "bob").service("chat").rate_limit("5/s"),
        ]),
    );

    // A burst of 6 (milliseconds apart): 5 pass, the 6th is refused.
    let burst_start = Instant::now();
    for i in 1..=5 {
        assert_status(
            &get_keyed(&gw, "/chat/x", RATE_A, &[]),
            200,
            &format!("A request {i}"),
        );
    }
    let refused = get_keyed(&gw, "/chat/x", RATE_A, &[]);
    let refused_at = Instant::now();
    assert_refusal(
        &refused,
        429,
        "rate limit exceeded",
        &format!("A request 6 ({:?} after the first)", burst_start.elapsed()),
    );
    let wait = retry_after(&refused);
    assert!(wait <= 1, "Retry-After {wait} for a 5/s limit");
    assert_eq!(echo.hits(), 5, "the refused request reached the upstream");

    // Another key has its own budget.
    for i in 1..=5 {
        assert_status(
            &get_keyed(&gw, "/chat/x", RATE_B, &[]),
            200,
            &format!("B request {i}"),
        );
    }
    assert_refusal(
        &get_keyed(&gw, "/chat/x", RATE_B, &[]),
        429,
        "rate limit exceeded",
        "B request 6",
    );

    // Once the announced time has passed, A has its full budget again.
    wait_retry_after(refused_at, wait);
    for i in 1..=5 {
        assert_status(
            &get_keyed(&gw, "/chat/x", RATE_A, &[]),
            200,
            &format!("A request {i} after Retry-After"),
        );
    }
    assert_refusal(
        &get_keyed(&gw, "/chat/x", RATE_A, &[]),
        429,
        "rate limit exceeded",
        "A request 6 after Retry-After",
    );
}

#[test]
fn rate_limit_precedence_is_key_then_route_then_global_and_a_key_has_one_counter() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .rate_limit("2/min")
            .route(Route::stripped("a", "/a/", "chat", echo.addr).rate_limit("3/min"))
            .route(Route::stripped("b", "/b/", "chat", echo.addr)),
        &KeyFile::of([
            Key::new("prot-prec-own-0001", "own")
                .service("chat")
                .rate_limit("4/min"),
            Key::new("prot-prec-route-0002", "r1").service("chat"),
            Key::new("prot-prec-route-0003", "r2").service("chat"),
            Key::new("prot-prec-global-0004", "g").service("chat"),
            Key::new("prot-prec-both-0005", "both")
                .service("chat")
                .rate_limit("3/min"),
        ]),
    );
    // `n` requests pass on `path`, the next is 429.
    let exactly = |key: &str, path: &str, n: usize, what: &str| {
        for i in 1..=n {
            assert_status(
                &get_keyed(&gw, path, key, &[]),
                200,
                &format!("{what}: request {i}"),
            );
        }
        assert_refusal(
            &get_keyed(&gw, path, key, &[]),
            429,
            "rate limit exceeded",
            &format!("{what}: request {}", n + 1),
        );
    };
    exactly(
        "prot-prec-own-0001",
        "/a/x",
        4,
        "the key's own 4/min beats the route's 3/min",
    );
    exactly(
        "prot-prec-route-0002",
        "/a/x",
        3,
        "the route's 3/min beats the global 2/min",
    );
    // The route's value is a per-key default, not a budget the route's keys share.
    exactly(
        "prot-prec-route-0003",
        "/a/x",
        3,
        "a second key on the same route",
    );
    exactly(
        "prot-prec-global-0004",
        "/b/x",
        2,
        "the global 2/min on a route without one",
    );

    // One counter per key, whichever route it is used on.
    let both = "prot-prec-both-0005";
    assert_status(
        &get_keyed(&gw, "/a/x", both, &[]),
        200,
        "one-counter key on /a/",
    );
    assert_status(
        &get_keyed(&gw, "/b/x", both, &[]),
        200,
        "one-counter key on /b/",
    );
    assert_status(
        &get_keyed(&gw, "/a/x", both, &[]),
        200,
        "one-counter key on /a/ again",
    );
    for path in ["/b/x", "/a/x"] {
        assert_refusal(
            &get_keyed(&gw, path, both, &[]),
            429,
            "rate limit exceeded",
            &format!("the 4th request of a 3/min key, on {path}"),
        );
    }
}

// ---------------------------------------------------------------------------
// Concurrency caps
// ---------------------------------------------------------------------------

const CONC_KEY: &str = "prot-conc-key-0001";

fn conc_keys() -> KeyFile {
    KeyFile::of([Key::new(CONC_KEY, "ann").service("chat").max_concurrent(2)])
}

#[test]
fn max_concurrent_refuses_a_third_stream_at_once_and_a_finished_stream_frees_its_slot() {
    let _load = shared();
    // On /s1/: 30 chunks 100 ms apart, about 3 s a stream. On /s2/: 100
    // chunks, about 10 s, so stream B is still running after A and while C
    // runs (a stream's slot is free once the gateway has relayed its end,
    // whether or not the test has read it).
    let up = StreamServer::start(30, Duration::from_millis(100));
    let long = StreamServer::start(100, Duration::from_millis(100));
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::stripped("s1", "/s1/", "chat", up.addr))
            .route(Route::stripped("s2", "/s2/", "chat", long.addr)),
        &conc_keys(),
    );
    let a = must_open(gw.addr(), "/s1/gen", CONC_KEY, "stream A");
    // The key's one counter covers every route.
    let b = must_open(gw.addr(), "/s2/gen", CONC_KEY, "stream B");

    let took = assert_stream_refused(gw.addr(), "/s1/gen", CONC_KEY, "a third stream");
    assert!(
        took < Duration::from_secs(1),
        "the third request was answered after {took:?}: queued instead of refused at once"
    );
    assert_eq!(
        up.hits() + long.hits(),
        2,
        "the refused request reached the upstream"
    );

    // A's body read to its end: its slot is free again.
    let body = a.finish();
    assert_eq!(
        String::from_utf8_lossy(&body),
        up.expected_body(),
        "stream A's body"
    );
    let c = open_stream_within(
        gw.addr(),
        "/s1/gen",
        CONC_KEY,
        Duration::from_secs(2),
        "a new stream after A ended",
    );
    // B and C are open: the cap holds again.
    assert_stream_refused(
        gw.addr(),
        "/s2/gen",
        CONC_KEY,
        "a third stream beside B and C",
    );
    drop(b);
    drop(c);
}

#[test]
fn a_client_disconnecting_mid_stream_frees_its_concurrency_slot() {
    let _load = shared();
    // 200 chunks 50 ms apart: a stream would last 10 s if nobody left.
    let up = StreamServer::start(200, Duration::from_millis(50));
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::stripped("s", "/s/", "chat", up.addr)),
        &conc_keys(),
    );
    let opened = Instant::now();
    let mut a = must_open(gw.addr(), "/s/gen", CONC_KEY, "stream A");
    let _b = must_open(gw.addr(), "/s/gen", CONC_KEY, "stream B");
    assert_stream_refused(gw.addr(), "/s/gen", CONC_KEY, "a third stream");
    assert!(
        a.next_chunk().expect("A's first chunk").is_some(),
        "stream A ended at once"
    );
    a.disconnect();

    // Well before A would have ended by itself, its slot is free.
    let _c = open_stream_within(
        gw.addr(),
        "/s/gen",
        CONC_KEY,
        Duration::from_secs(4),
        "a new stream after A's client went away",
    );
    assert!(
        opened.elapsed() < Duration::from_secs(9),
        "the slot was only freed when A's stream would have ended anyway"
    );
    assert_stream_refused(
        gw.addr(),
        "/s/gen",
        CONC_KEY,
        "a third stream beside B and C",
    );
}

// ---------------------------------------------------------------------------
// Limits across reloads
// ---------------------------------------------------------------------------

#[test]
fn an_exhausted_rate_limit_stays_exhausted_across_a_keygen_reload() {
    let _load = shared();
    let echo = EchoServer::start();
    let key = "prot-reload-rate-0001";
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::chat(echo.addr)),
        &KeyFile::of([Key::new(key, "ann").service("chat").rate_limit("3/min")]),
    );
    for i in 1..=3 {
        assert_status(
            &get_keyed(&gw, "/chat/x", key, &[]),
            200,
            &format!("request {i}"),
        );
    }
    let r = get_keyed(&gw, "/chat/x", key, &[]);
    assert_refusal(&r, 429, "rate limit exceeded", "request 4");
    let wait = retry_after(&r);
    assert!(wait <= 60, "Retry-After {wait} for a 3/min limit");

    let out = run_cli(
        &[
            "keygen",
            "--user",
            "newcomer",
            "--service",
            "chat",
            "--config",
            s(&gw.config_path),
        ],
        gw.dir.path(),
    );
    assert!(out.status.success(), "keygen: {}", out.stderr);
    let new_key = out.stdout.trim().to_string();
    assert!(
        gw.wait_log_contains("generation 2", RELOAD_TIMEOUT),
        "no reload after keygen: {}",
        gw.log()
    );
    assert_status(
        &get_keyed(&gw, "/chat/x", &new_key, &[]),
        200,
        "the new key",
    );

    let r = get_keyed(&gw, "/chat/x", key, &[]);
    assert_refusal(
        &r,
        429,
        "rate limit exceeded",
        "the exhausted key after the reload",
    );
    assert_eq!(echo.hits(), 4, "3 before the reload + the new key's one");
}

#[test]
fn revoking_and_re_enabling_a_key_mid_stream_leaks_no_concurrency_slot() {
    let _load = shared();
    // 20 chunks 100 ms apart: about 2 s per stream.
    let up = StreamServer::start(20, Duration::from_millis(100));
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::stripped("s", "/s/", "chat", up.addr)),
        &conc_keys(),
    );
    let a = must_open(gw.addr(), "/s/gen", CONC_KEY, "stream A");

    let out = run_cli(
        &[
            "keys",
            "revoke",
            &key_id(CONC_KEY),
            "--config",
            s(&gw.config_path),
        ],
        gw.dir.path(),
    );
    assert!(out.status.success(), "keys revoke: {}", out.stderr);
    assert!(
        gw.wait_log_contains("generation 2", RELOAD_TIMEOUT),
        "no reload after keys revoke: {}",
        gw.log()
    );
    assert_refusal(
        &send(gw.addr(), "GET", "/s/gen", &[("X-API-Key", CONC_KEY)], b""),
        401,
        "api key revoked",
        "the revoked key",
    );

    // Enabled again, as it was.
    gw.write_keys(&conc_keys());
    assert!(
        gw.wait_log_contains("generation 3", RELOAD_TIMEOUT),
        "no reload after re-enabling: {}",
        gw.log()
    );
    let body = a.finish();
    assert_eq!(
        String::from_utf8_lossy(&body),
        up.expected_body(),
        "stream A went on to its end"
    );

    // Every stream is over: exactly max_concurrent (2) may open again.
    let _b = open_stream_within(
        gw.addr(),
        "/s/gen",
        CONC_KEY,
        Duration::from_secs(2),
        "the first stream after the re-enable",
    );
    let _c = must_open(
        gw.addr(),
        "/s/gen",
        CONC_KEY,
        "the second stream after the re-enable (a slot leaked?)",
    );
    assert_stream_refused(
        gw.addr(),
        "/s/gen",
        CONC_KEY,
        "a third stream after the re-enable (the counter was reset under A?)",
    );
}

#[test]
fn protection_settings_apply_on_config_reload() {
    let _load = shared();
    let echo = EchoServer::start();
    let key = "prot-cfg-reload-0001";
    let fresh = "prot-cfg-reload-0002";
    let body = |allow: &str, size: &str, rate: Option<&str>| {
        let c = Route::stripped("c", "/c/", "chat", echo.addr);
        GatewayConfig::new()
            .threads(2)
            .route(Route::stripped("a", "/a/", "chat", echo.addr).allow([allow]))
            .route(Route::stripped("b", "/b/", "chat", echo.addr).max_body_size(size))
            .route(match rate {
                Some(rate) => c.rate_limit(rate),
                None => c,
            })
    };
    let gw = Gateway::start(
        &body("10.0.0.0/8", "10B", None),
        &KeyFile::of([
            Key::new(key, "ann").service("chat"),
            Key::new(fresh, "bob").service("chat"),
        ]),
    );
    let twenty = [b'x'; 20];
    assert_refusal(
        &get_keyed(&gw, "/a/x", key, &[]),
        403,
        "address not allowed",
        "/a/ before",
    );
    assert_refusal(
        &send(gw.addr(), "POST", "/b/x", &[("X-API-Key", key)], &twenty),
        413,
        "request body too large",
        "/b/ before",
    );
    for _ in 0..3 {
        assert_status(
            &get_keyed(&gw, "/c/x", key, &[]),
            200,
            "/c/ before (no limit)",
        );
    }

    gw.write_config(body("127.0.0.1", "100B", Some("1/min")).listen(gw.addr()));
    assert!(
        gw.wait_log_contains("generation 2", RELOAD_TIMEOUT),
        "no reload after the config change: {}",
        gw.log()
    );
    assert_status(
        &get_keyed(&gw, "/a/x", key, &[]),
        200,
        "/a/ after allowing 127.0.0.1",
    );
    assert_status(
        &send(gw.addr(), "POST", "/b/x", &[("X-API-Key", key)], &twenty),
        200,
        "/b/ after raising the limit",
    );
    assert_status(
        &get_keyed(&gw, "/c/x", fresh, &[]),
        200,
        "/c/ after 1/min: request 1",
    );
    assert_refusal(
        &get_keyed(&gw, "/c/x", fresh, &[]),
        429,
        "rate limit exceeded",
        "/c/ after 1/min: request 2",
    );
}

#[test]
fn keygen_writes_rate_limit_and_max_concurrent_and_the_gateway_applies_them() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::chat(echo.addr)),
        &KeyFile::of([Key::new("prot-keygen-0001", "ann").service("chat")]),
    );
    let before = fs::read_to_string(&gw.keys_path).expect("read keys.json");
    let bad = run_cli(
        &[
            "keygen",
            "--user",
            "lim",
            "--service",
            "chat",
            "--rate-limit",
            "five",
            "--config",
            s(&gw.config_path),
        ],
        gw.dir.path(),
    );
    assert!(!bad.status.success(), "keygen accepted --rate-limit five");
    assert_eq!(
        fs::read_to_string(&gw.keys_path).expect("read keys.json"),
        before,
        "a refused keygen changed the key file"
    );

    let out = run_cli(
        &[
            "keygen",
            "--user",
            "lim",
            "--service",
            "chat",
            "--rate-limit",
            "2/min",
            "--max-concurrent",
            "2",
            "--config",
            s(&gw.config_path),
        ],
        gw.dir.path(),
    );
    assert!(out.status.success(), "keygen: {}", out.stderr);
    let key = out.stdout.trim().to_string();
    let file: serde_json::Map<String, Value> =
        serde_json::from_str(&fs::read_to_string(&gw.keys_path).expect("read keys.json"))
            .expect("keys.json is a JSON object");
    let entry = file
        .values()
        .find(|e| e["user"] == "lim")
        .unwrap_or_else(|| panic!("no entry for user lim: {file:?}"));
    assert_eq!(entry["rate_limit"], "2/min", "{entry}");
    assert_eq!(entry["max_concurrent"], 2, "{entry}");

    assert!(
        gw.wait_log_contains("generation 2", RELOAD_TIMEOUT),
        "no reload after keygen: {}",
        gw.log()
    );
    for i in 1..=2 {
        assert_status(
            &get_keyed(&gw, "/chat/x", &key, &[]),
            200,
            &format!("request {i}"),
        );
    }
    assert_refusal(
        &get_keyed(&gw, "/chat/x", &key, &[]),
        429,
        "rate limit exceeded",
        "request 3",
    );
}

// ---------------------------------------------------------------------------
// Key guessing: the failed-key throttle
// ---------------------------------------------------------------------------

const GOOD: &str = "prot-guess-good-0001";
const REVOKED: &str = "prot-guess-revoked-0002";
const EXPIRED: &str = "prot-guess-expired-0003";
const OTHER_SERVICE: &str = "prot-guess-tts-0004";

fn guess_keys() -> KeyFile {
    KeyFile::of([
        Key::new(GOOD, "ann").service("chat"),
        Key::new(REVOKED, "rev").service("chat").disabled(true),
        Key::new(EXPIRED, "old")
            .service("chat")
            .expires_at("2020-01-01T00:00:00Z"),
        Key::new(OTHER_SERVICE, "tts").service("tts"),
    ])
}

/// `GET /chat/x` as client `ip` (through the trusted proxy 127.0.0.1),
/// with `key` if any.
fn get_as(gw: &Gateway, ip: &str, key: Option<&str>) -> RawResponse {
    let mut headers = vec![("X-Forwarded-For", ip)];
    if let Some(k) = key {
        headers.push(("X-API-Key", k));
    }
    send(gw.addr(), "GET", "/chat/x", &headers, b"")
}

#[test]
fn failed_key_throttle_blocks_an_address_even_with_a_valid_key_then_lifts_after_cooldown() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .failed_key_throttle(Throttle::after(5, "60s", "2s"))
            .route(Route::chat(echo.addr)),
        &guess_keys(),
    );
    let guesser = "203.0.113.10";
    let other = "203.0.113.20";
    let log_start = gw.log().len();

    // Every kind of failed key check counts: missing, unknown, revoked,
    // expired.
    let failures: [(Option<&str>, &str); 5] = [
        (None, "missing api key"),
        (Some("prot-guess-unknown-0001"), "invalid api key"),
        (Some(REVOKED), "api key revoked"),
        (Some(EXPIRED), "api key expired"),
        (Some("prot-guess-unknown-0002"), "invalid api key"),
    ];
    for (i, (key, error)) in failures.iter().enumerate() {
        assert_refusal(
            &get_as(&gw, guesser, *key),
            401,
            error,
            &format!("failure {}", i + 1),
        );
    }

    // The 6th request is refused before any key is checked.
    let blocked = get_as(&gw, guesser, Some(GOOD));
    let blocked_at = Instant::now();
    assert_refusal(
        &blocked,
        429,
        "too many failed key attempts",
        "a valid key after 5 failures",
    );
    let wait = retry_after(&blocked);
    assert!(wait <= 2, "Retry-After {wait} for a 2 s cool-down");
    assert_eq!(echo.hits(), 0, "a throttled request reached the upstream");

    // Another address behind the same proxy is not affected.
    assert_status(
        &get_as(&gw, other, Some(GOOD)),
        200,
        "another address, valid key",
    );

    // Ten more throttled requests; the block is logged once, not per request.
    let mut last = (blocked_at, wait);
    for i in 0..10 {
        let r = get_as(&gw, guesser, Some(GOOD));
        assert_refusal(
            &r,
            429,
            "too many failed key attempts",
            &format!("throttled request {i}"),
        );
        last = (Instant::now(), retry_after(&r));
    }
    // For the implementer: the block line is found by the client address
    // and "throttl" (as in "throttled"); adjust this substring to what the
    // gateway logs, but keep it one line per block.
    let block_lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains(guesser) && l.to_ascii_lowercase().contains("throttl"))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(5), || block_lines(
            &gw.log()[log_start..]
        ) >= 1),
        "no log line about throttling {guesser}: {}",
        gw.log()
    );
    assert_eq!(
        block_lines(&gw.log()[log_start..]),
        1,
        "one log line per block, not per request: {}",
        gw.log()
    );

    // After the cool-down announced by the last refusal, the valid key works.
    wait_retry_after(last.0, last.1);
    assert_status(
        &get_as(&gw, guesser, Some(GOOD)),
        200,
        "the valid key after the cool-down",
    );
    assert_eq!(echo.hits(), 2);
}

/// One address is often many people (a team behind a NAT, the users of a
/// front end): a key that worked from it before the block is still served
/// during the block, while every other key, right or wrong, gets the same
/// 429 (so the block tells a guesser nothing).
#[test]
fn a_blocked_address_is_still_served_for_keys_that_worked_from_it_before() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .failed_key_throttle(Throttle::after(3, "60s", "60s"))
            .route(Route::chat(echo.addr)),
        &guess_keys(),
    );
    let nat = "203.0.113.77";
    assert_status(&get_as(&gw, nat, Some(GOOD)), 200, "the team's key, before");
    for i in 1..=3 {
        assert_refusal(
            &get_as(&gw, nat, Some("prot-guess-stale-key")),
            401,
            "invalid api key",
            &format!("the stale key, failure {i}"),
        );
    }
    // Blocked: the stale key and a right key never used from here get the
    // same answer, and neither reaches the upstream.
    let hits = echo.hits();
    let stale = get_as(&gw, nat, Some("prot-guess-stale-key"));
    assert_refusal(
        &stale,
        429,
        "too many failed key attempts",
        "the stale key, blocked",
    );
    let fresh = get_as(&gw, nat, Some(OTHER_SERVICE));
    assert_refusal(
        &fresh,
        429,
        "too many failed key attempts",
        "a right key new to the address",
    );
    assert_eq!(
        stale.body, fresh.body,
        "a right key is refused like a wrong one"
    );
    assert!(retry_after(&fresh) > 50, "the block lasts its cool-down");
    assert_eq!(
        echo.hits(),
        hits,
        "a throttled request reached the upstream"
    );
    // The team's key goes on working during the block.
    for i in 0..5 {
        assert_status(
            &get_as(&gw, nat, Some(GOOD)),
            200,
            &format!("the team's key during the block, request {i}"),
        );
    }
    assert_eq!(echo.hits(), hits + 5);
    // Known per address: the same key first seen from another blocked
    // address is refused there.
    let other = "203.0.113.78";
    for _ in 0..3 {
        get_as(&gw, other, Some("prot-guess-stale-key"));
    }
    assert_refusal(
        &get_as(&gw, other, Some(GOOD)),
        429,
        "too many failed key attempts",
        "the team's key from an address it never worked from",
    );
}

#[test]
fn failed_key_throttle_is_on_by_default_with_20_failures_and_a_300s_cooldown() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .route(Route::chat(echo.addr)),
        &guess_keys(),
    );
    let guesser = "198.51.100.7";
    for i in 1..=20 {
        assert_refusal(
            &get_as(&gw, guesser, Some("prot-default-unknown")),
            401,
            "invalid api key",
            &format!("failure {i}"),
        );
    }
    let r = get_as(&gw, guesser, Some(GOOD));
    assert_refusal(&r, 429, "too many failed key attempts", "after 20 failures");
    let wait = retry_after(&r);
    assert!(
        (290..=300).contains(&wait),
        "Retry-After {wait} for the default 300 s cool-down"
    );
    assert_status(
        &get_as(&gw, "198.51.100.8", Some(GOOD)),
        200,
        "another address",
    );
}

#[test]
fn failed_key_throttle_can_be_turned_off() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .failed_key_throttle(Throttle::off())
            .route(Route::chat(echo.addr)),
        &guess_keys(),
    );
    let guesser = "198.51.100.9";
    for i in 1..=30 {
        assert_refusal(
            &get_as(&gw, guesser, Some("prot-off-unknown")),
            401,
            "invalid api key",
            &format!("failure {i}"),
        );
    }
    assert_status(
        &get_as(&gw, guesser, Some(GOOD)),
        200,
        "the valid key after 30 failures",
    );
}

#[test]
fn failed_key_attempts_older_than_the_window_are_forgotten_and_a_wrong_service_is_not_a_failure() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .failed_key_throttle(Throttle::after(3, "1s", "60s"))
            .route(Route::chat(echo.addr)),
        &guess_keys(),
    );
    let guesser = "198.51.100.10";
    // A valid key of another service is refused (403) but is no failed key
    // check: any number of them leaves the address unthrottled.
    for i in 1..=5 {
        assert_refusal(
            &get_as(&gw, guesser, Some(OTHER_SERVICE)),
            403,
            "api key not allowed for this service",
            &format!("wrong service {i}"),
        );
    }
    for i in 1..=2 {
        assert_refusal(
            &get_as(&gw, guesser, Some("prot-window-unknown")),
            401,
            "invalid api key",
            &format!("early failure {i}"),
        );
    }
    // Wait out the 1 s window: the two early failures no longer count.
    thread::sleep(Duration::from_millis(1500));
    for i in 1..=2 {
        assert_refusal(
            &get_as(&gw, guesser, Some("prot-window-unknown")),
            401,
            "invalid api key",
            &format!("late failure {i} (the early ones must have expired)"),
        );
    }
    assert_status(
        &get_as(&gw, guesser, Some(GOOD)),
        200,
        "2 failures in the window",
    );
    // A third failure within the window: the address is blocked.
    assert_refusal(
        &get_as(&gw, guesser, Some("prot-window-unknown")),
        401,
        "invalid api key",
        "the third failure in the window",
    );
    assert_refusal(
        &get_as(&gw, guesser, Some("prot-window-unknown")),
        429,
        "too many failed key attempts",
        "after 3 failures in the window",
    );
    // GOOD worked from this address before the block, so it still does.
    assert_status(
        &get_as(&gw, guesser, Some(GOOD)),
        200,
        "a key known to work from the blocked address",
    );
}

/// VmRSS of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Sends one bad-key guess from each address `first..first + count`
/// (through the trusted proxy 127.0.0.1) on `threads` keep-alive
/// connections. Returns the statuses seen, with their counts (0 stands for
/// a request that got no answer even on a new connection).
fn guess_from_addresses(
    addr: SocketAddr,
    first: u32,
    count: u32,
    threads: u32,
    deadline: Instant,
) -> BTreeMap<u16, usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, usize>::new()));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let next = Arc::clone(&next);
            let statuses = Arc::clone(&statuses);
            thread::spawn(move || {
                let mut conn: Option<BufReader<TcpStream>> = None;
                let mut local = BTreeMap::<u16, usize>::new();
                loop {
                    let i = next.fetch_add(64, Ordering::Relaxed) as u32;
                    if i >= count || Instant::now() > deadline {
                        break;
                    }
                    for j in i..(i + 64).min(count) {
                        let ip = Ipv4Addr::from(first + j);
                        let req = format!(
                            "GET /chat/x HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: prot-guess-{j}\r\nX-Forwarded-For: {ip}\r\n\r\n"
                        );
                        let mut status = 0;
                        for _attempt in 0..2 {
                            let reader = conn.get_or_insert_with(|| BufReader::new(connect(addr)));
                            if reader.get_mut().write_all(req.as_bytes()).is_err() {
                                conn = None;
                                continue;
                            }
                            match read_response(reader) {
                                Ok(r) => {
                                    status = r.status;
                                    let close = r
                                        .header("connection")
                                        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                                    if close {
                                        conn = None;
                                    }
                                    break;
                                }
                                Err(_) => conn = None,
                            }
                        }
                        *local.entry(status).or_default() += 1;
                    }
                }
                let mut all = statuses.lock().unwrap();
                for (k, v) in local {
                    *all.entry(k).or_default() += v;
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("guessing thread panicked");
    }
    let all = statuses.lock().unwrap().clone();
    all
}

#[test]
fn a_hundred_thousand_guessing_addresses_keep_the_gateway_serving_in_bounded_memory() {
    let _load = exclusive();
    const ADDRESSES: u32 = 100_000;
    const RSS_BOUND_KIB: u64 = 64 * 1024;
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .route(Route::chat(echo.addr)),
        &guess_keys(),
    );
    let deadline = Instant::now() + Duration::from_secs(240);
    let base_warm = u32::from(Ipv4Addr::new(172, 16, 0, 0));
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));

    // Warm up (buffers, thread pools, connection state) with other addresses.
    let warm = guess_from_addresses(gw.addr(), base_warm, 2_000, 4, deadline);
    assert_eq!(warm.get(&401), Some(&2_000), "warm-up statuses: {warm:?}");
    let rss_before = rss_kib(gw.pid());

    let started = Instant::now();
    let seen = guess_from_addresses(gw.addr(), base, ADDRESSES, 6, deadline);
    let took = started.elapsed();
    let rss_after = rss_kib(gw.pid());
    eprintln!(
        "{ADDRESSES} guessing addresses in {took:?}: gateway VmRSS {rss_before} KiB before, {rss_after} KiB after ({:+} KiB)",
        rss_after as i64 - rss_before as i64
    );
    assert_eq!(
        seen.get(&401),
        Some(&(ADDRESSES as usize)),
        "every guess from a new address is a plain 401 (statuses: {seen:?}, in {took:?})"
    );
    assert!(
        rss_after < rss_before + RSS_BOUND_KIB,
        "VmRSS grew from {rss_before} KiB to {rss_after} KiB over {ADDRESSES} addresses"
    );

    // Still serving: a valid key, from the proxy itself and from a new address.
    assert_status(
        &send(gw.addr(), "GET", "/chat/x", &[("X-API-Key", GOOD)], b""),
        200,
        "the valid key, direct",
    );
    assert_status(
        &get_as(&gw, "192.0.2.200", Some(GOOD)),
        200,
        "the valid key, new address",
    );
}

// ---------------------------------------------------------------------------
// Body size limits
// ---------------------------------------------------------------------------

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
    let _load = shared();
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
        &KeyFile::of([Key::new(BODY_KEY, "ann").service("chat")]),
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
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .max_body_size("50B")
            .route(Route::stripped("kb", "/kb/", "chat", echo.addr).max_body_size("1KB"))
            .route(Route::stripped("kib", "/kib/", "chat", echo.addr).max_body_size("1KiB"))
            .route(Route::stripped("bare", "/bare/", "chat", echo.addr).max_body_size(1000))
            .route(Route::stripped("default", "/default/", "chat", echo.addr)),
        &KeyFile::of([Key::new(BODY_KEY, "ann").service("chat")]),
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

// ---------------------------------------------------------------------------
// Address allowlists and X-Forwarded-For
// ---------------------------------------------------------------------------

const ALLOW_KEY: &str = "prot-allow-key-0001";

fn allow_keys() -> KeyFile {
    KeyFile::of([Key::new(ALLOW_KEY, "ann").service("chat")])
}

#[test]
fn an_address_outside_allow_gets_403_before_the_key_check_and_it_is_no_failed_attempt() {
    let _load = shared();
    let up = RecordingServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .failed_key_throttle(Throttle::after(3, "60s", "60s"))
            .route(Route::stripped("private", "/private/", "chat", up.addr).allow(["10.0.0.0/8"]))
            .route(Route::stripped("open", "/open/", "chat", up.addr)),
        &allow_keys(),
    );
    for i in 1..=5 {
        let r = get_keyed(&gw, "/private/x", "prot-allow-wrong-key", &[]);
        assert_refusal(
            &r,
            403,
            "address not allowed",
            &format!("invalid key {i} from 127.0.0.1"),
        );
    }
    let r = send(gw.addr(), "GET", "/private/x", &[], b"");
    assert_refusal(&r, 403, "address not allowed", "no key from 127.0.0.1");
    let r = get_keyed(&gw, "/private/x", ALLOW_KEY, &[]);
    assert_refusal(
        &r,
        403,
        "address not allowed",
        "the valid key from 127.0.0.1",
    );
    assert_eq!(
        up.total_bytes(),
        0,
        "the upstream received: {}",
        up.received_text()
    );

    // The six refused invalid keys were no failed key attempts (the limit is
    // 3): the address is not throttled elsewhere.
    assert_status(
        &get_keyed(&gw, "/open/x", ALLOW_KEY, &[]),
        200,
        "the valid key on /open/",
    );
    assert_refusal(
        &get_keyed(&gw, "/open/x", "prot-allow-wrong-key", &[]),
        401,
        "invalid api key",
        "the first real failure",
    );
}

#[test]
fn a_global_allow_list_applies_to_every_route_and_loopback_in_it_works() {
    let _load = shared();
    let echo = EchoServer::start();
    let closed = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .allow(["10.0.0.0/8"])
            .route(Route::chat(echo.addr)),
        &allow_keys(),
    );
    let r = get_keyed(&closed, "/chat/x", "prot-allow-wrong-key", &[]);
    assert_refusal(
        &r,
        403,
        "address not allowed",
        "an invalid key, global allow without loopback",
    );
    assert_eq!(echo.hits(), 0);

    let open = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .allow(["127.0.0.1"])
            .route(Route::chat(echo.addr)),
        &allow_keys(),
    );
    assert_status(
        &get_keyed(&open, "/chat/x", ALLOW_KEY, &[]),
        200,
        "127.0.0.1 allowed",
    );
    assert_refusal(
        &get_keyed(&open, "/chat/x", "prot-allow-wrong-key", &[]),
        401,
        "invalid api key",
        "an allowed address still needs a valid key",
    );
    assert_eq!(echo.hits(), 1);
}

#[test]
fn x_forwarded_for_counts_only_from_trusted_proxies() {
    let _load = shared();
    let echo = EchoServer::start();
    let route_line = Route::chat(echo.addr);
    let trusting = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .allow(["192.0.2.0/24"])
            .route(route_line.clone()),
        &allow_keys(),
    );
    assert_status(
        &get_keyed(
            &trusting,
            "/chat/x",
            ALLOW_KEY,
            &[("X-Forwarded-For", "192.0.2.7")],
        ),
        200,
        "XFF 192.0.2.7 from a trusted proxy",
    );
    assert_refusal(
        &get_keyed(
            &trusting,
            "/chat/x",
            ALLOW_KEY,
            &[("X-Forwarded-For", "198.51.100.7")],
        ),
        403,
        "address not allowed",
        "XFF outside the list from a trusted proxy",
    );
    assert_refusal(
        &get_keyed(&trusting, "/chat/x", ALLOW_KEY, &[]),
        403,
        "address not allowed",
        "the proxy itself (no XFF) is not in the list",
    );

    // Without trusted_proxies, a direct client's XFF is ignored.
    let direct = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .allow(["192.0.2.0/24"])
            .route(route_line),
        &allow_keys(),
    );
    assert_refusal(
        &get_keyed(
            &direct,
            "/chat/x",
            ALLOW_KEY,
            &[("X-Forwarded-For", "192.0.2.7")],
        ),
        403,
        "address not allowed",
        "XFF from an untrusted direct client",
    );
    assert_eq!(echo.hits(), 1);
}

#[test]
fn x_forwarded_for_is_read_from_the_right_skipping_trusted_hops() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1", "10.0.0.0/8"])
            .allow(["192.0.2.0/24"])
            .route(Route::chat(echo.addr)),
        &allow_keys(),
    );
    assert_status(
        &get_keyed(
            &gw,
            "/chat/x",
            ALLOW_KEY,
            &[("X-Forwarded-For", "192.0.2.7, 10.1.2.3")],
        ),
        200,
        "client 192.0.2.7 behind a trusted hop 10.1.2.3",
    );
    // A client that prepends an allowed address: the rightmost untrusted
    // address (203.0.113.5) is the client.
    assert_refusal(
        &get_keyed(
            &gw,
            "/chat/x",
            ALLOW_KEY,
            &[("X-Forwarded-For", "192.0.2.7, 203.0.113.5")],
        ),
        403,
        "address not allowed",
        "a spoofed 192.0.2.7 left of the real client 203.0.113.5",
    );
    assert_refusal(
        &get_keyed(
            &gw,
            "/chat/x",
            ALLOW_KEY,
            &[("X-Forwarded-For", "192.0.2.7, 203.0.113.5, 10.9.9.9")],
        ),
        403,
        "address not allowed",
        "a spoofed 192.0.2.7, the client 203.0.113.5, a trusted hop",
    );
    assert_eq!(echo.hits(), 1);
}

#[test]
fn allow_lists_match_ipv6_addresses_and_ranges() {
    let _load = shared();
    let echo = EchoServer::start();
    // Direct IPv6 clients: a second listener on [::1].
    let v6_listener = match TcpListener::bind("[::1]:0") {
        Ok(l) => l,
        Err(e) => panic!("this test needs IPv6 loopback ([::1]): {e}"),
    };
    let v6_port = v6_listener.local_addr().expect("local_addr").port();
    drop(v6_listener);
    let port = free_port();
    let config = GatewayConfig::new()
        .listen(loopback(port))
        .listen(format!("[::1]:{v6_port}"))
        .threads(2)
        .trusted_proxies(["127.0.0.1"])
        .route(Route::stripped("v6", "/v6/", "chat", echo.addr).allow(["::1", "192.0.2.0/24"]))
        .route(
            Route::stripped("mixed", "/mixed/", "chat", echo.addr).allow([
                "fe80::/10",
                "127.0.0.0/8",
                "2001:db8::/32",
            ]),
        );
    let gw = Gateway::start(&config, &allow_keys());
    let v4 = gw.addr();
    let v6 = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], v6_port));
    let k = [("X-API-Key", ALLOW_KEY)];

    assert_status(
        &send(v6, "GET", "/v6/x", &k, b""),
        200,
        "::1 on a route allowing ::1",
    );
    assert_refusal(
        &send(v4, "GET", "/v6/x", &k, b""),
        403,
        "address not allowed",
        "127.0.0.1 on a route allowing ::1 and 192.0.2.0/24",
    );
    assert_status(
        &send(v4, "GET", "/mixed/x", &k, b""),
        200,
        "127.0.0.1 in 127.0.0.0/8",
    );
    assert_refusal(
        &send(v6, "GET", "/mixed/x", &k, b""),
        403,
        "address not allowed",
        "::1 is not in fe80::/10",
    );
    // IPv6 clients named by a trusted proxy.
    let xff = |ip: &'static str| [("X-API-Key", ALLOW_KEY), ("X-Forwarded-For", ip)];
    assert_status(
        &send(v4, "GET", "/mixed/x", &xff("2001:db8::7"), b""),
        200,
        "2001:db8::7",
    );
    assert_status(
        &send(v4, "GET", "/mixed/x", &xff("fe80::1"), b""),
        200,
        "fe80::1",
    );
    assert_refusal(
        &send(v4, "GET", "/mixed/x", &xff("2001:db9::1"), b""),
        403,
        "address not allowed",
        "2001:db9::1 is in no range",
    );
    assert_eq!(echo.hits(), 4);
}

// ---------------------------------------------------------------------------
// CORS
// ---------------------------------------------------------------------------

const ORIGIN: &str = "https://chat.example";
const EVIL: &str = "https://evil.example";
const CORS_KEY: &str = "prot-cors-key-0001";
const CORS_LIMITED: &str = "prot-cors-limited-0002";
const CORS_TTS: &str = "prot-cors-tts-0003";

fn cors_gateway(echo: &EchoServer) -> Gateway {
    Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::chat(echo.addr).cors(Cors::new([ORIGIN])))
            .route(
                Route::stripped("custom", "/custom/", "chat", echo.addr).cors(
                    Cors::new([ORIGIN])
                        .max_age("60s")
                        .headers(["authorization", "x-custom"]),
                ),
            )
            .route(Route::stripped("plain", "/plain/", "chat", echo.addr)),
        &KeyFile::of([
            Key::new(CORS_KEY, "ann").service("chat"),
            Key::new(CORS_LIMITED, "lim")
                .service("chat")
                .rate_limit("1/min"),
            Key::new(CORS_TTS, "tts").service("tts"),
        ]),
    )
}

fn assert_allows_origin(r: &RawResponse, what: &str) {
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(ORIGIN),
        "{what}: {}",
        show(r)
    );
    assert_eq!(r.header_count("access-control-allow-origin"), 1, "{what}");
    assert!(varies_on_origin(r), "{what}: no Vary: Origin: {}", show(r));
}

#[test]
fn cors_preflight_from_an_allowed_origin_is_answered_204_without_a_key_or_the_upstream() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = cors_gateway(&echo);

    let r = preflight(&gw, "/chat/v1/chat/completions", ORIGIN, &[]);
    assert_status(&r, 204, "preflight from the allowed origin");
    assert!(r.body.is_empty(), "a 204 with a body: {}", show(&r));
    assert_allows_origin(&r, "preflight");
    let methods = r
        .header("access-control-allow-methods")
        .unwrap_or_else(|| panic!("no Access-Control-Allow-Methods: {}", show(&r)));
    assert!(
        token_set(methods).contains(&"post".to_string()),
        "the requested POST is not allowed: {methods:?}"
    );
    assert_eq!(
        r.header("access-control-allow-headers").map(token_set),
        Some(token_set("authorization, content-type, x-api-key")),
        "default allowed headers: {}",
        show(&r)
    );
    assert_eq!(
        r.header("access-control-max-age"),
        Some("600"),
        "{}",
        show(&r)
    );

    let r = preflight(&gw, "/custom/x", ORIGIN, &[]);
    assert_status(&r, 204, "preflight on the route with custom settings");
    assert_allows_origin(&r, "custom preflight");
    assert_eq!(
        r.header("access-control-allow-headers").map(token_set),
        Some(token_set("authorization, x-custom")),
        "configured allowed headers: {}",
        show(&r)
    );
    assert_eq!(
        r.header("access-control-max-age"),
        Some("60"),
        "{}",
        show(&r)
    );

    assert_eq!(echo.hits(), 0, "a preflight reached the upstream");

    // OPTIONS without Access-Control-Request-Method is no preflight: it
    // needs a key like any request (and still carries the CORS headers).
    let r = send(gw.addr(), "OPTIONS", "/chat/x", &[("Origin", ORIGIN)], b"");
    assert_refusal(
        &r,
        401,
        "missing api key",
        "OPTIONS without Access-Control-Request-Method",
    );
    assert_allows_origin(&r, "OPTIONS without Access-Control-Request-Method");
    assert_eq!(echo.hits(), 0);
}

#[test]
fn cors_headers_are_on_every_answer_to_an_allowed_origin_including_refusals() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = cors_gateway(&echo);
    let origin = [("Origin", ORIGIN)];

    let r = get_keyed(&gw, "/chat/x", CORS_KEY, &origin);
    assert_status(&r, 200, "a keyed request");
    assert_allows_origin(&r, "the upstream's 200");

    let r = send(gw.addr(), "POST", "/chat/x", &origin, b"{}");
    assert_refusal(&r, 401, "missing api key", "no key");
    assert_allows_origin(&r, "the gateway's 401");

    let r = get_keyed(&gw, "/chat/x", CORS_TTS, &origin);
    assert_refusal(
        &r,
        403,
        "api key not allowed for this service",
        "another service's key",
    );
    assert_allows_origin(&r, "the gateway's 403");

    assert_status(
        &get_keyed(&gw, "/chat/x", CORS_LIMITED, &origin),
        200,
        "limited key, request 1",
    );
    let r = get_keyed(&gw, "/chat/x", CORS_LIMITED, &origin);
    assert_refusal(&r, 429, "rate limit exceeded", "limited key, request 2");
    assert_allows_origin(&r, "the gateway's 429");
}

#[test]
fn cors_gives_a_disallowed_origin_nothing_and_routes_without_cors_are_unchanged() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = cors_gateway(&echo);

    // A disallowed origin: no Access-Control-* on a real request...
    for origin in [
        EVIL,
        "https://chat.example.evil.example",
        "http://chat.example",
    ] {
        let r = get_keyed(&gw, "/chat/x", CORS_KEY, &[("Origin", origin)]);
        assert_status(&r, 200, &format!("a keyed request from {origin}"));
        assert_no_cors(&r, origin);
    }
    // ...and its preflight takes the normal path: a key is needed...
    let hits = echo.hits();
    let r = preflight(&gw, "/chat/x", EVIL, &[]);
    assert_refusal(
        &r,
        401,
        "missing api key",
        "a preflight from a disallowed origin",
    );
    assert_no_cors(&r, "the 401 to a disallowed origin's preflight");
    // ...and with one it reaches the upstream.
    let r = preflight(&gw, "/chat/x", EVIL, &[("X-API-Key", CORS_KEY)]);
    assert_status(&r, 200, "a keyed preflight from a disallowed origin");
    assert_no_cors(
        &r,
        "the upstream's answer to a disallowed origin's preflight",
    );
    assert_eq!(echo.hits(), hits + 1, "the keyed OPTIONS went upstream");
    assert_eq!(
        echo.last_request().expect("recorded").head.method,
        "OPTIONS"
    );

    // A route without cors: the allowed origin changes nothing either.
    let r = preflight(&gw, "/plain/x", ORIGIN, &[]);
    assert_refusal(
        &r,
        401,
        "missing api key",
        "a preflight on a route without cors",
    );
    assert_no_cors(&r, "a preflight on a route without cors");
    let r = get_keyed(&gw, "/plain/x", CORS_KEY, &[("Origin", ORIGIN)]);
    assert_status(&r, 200, "a keyed request on a route without cors");
    assert_no_cors(&r, "a keyed request on a route without cors");
    assert!(
        !varies_on_origin(&r),
        "Vary: Origin on a route without cors: {}",
        show(&r)
    );
}

// ---------------------------------------------------------------------------
// Metrics and audit
// ---------------------------------------------------------------------------

#[test]
fn every_protection_refusal_is_counted_by_reason_and_audited_with_the_same_word() {
    let _load = shared();
    let echo = EchoServer::start();
    let up = StreamServer::start(50, Duration::from_millis(100));
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .with_admin()
            .audit_log("audit.log")
            .trusted_proxies(["127.0.0.1"])
            .failed_key_throttle(Throttle::after(2, "60s", "60s"))
            .route(Route::chat(echo.addr).cors(Cors::new([ORIGIN])))
            .route(Route::stripped("stream", "/stream/", "chat", up.addr))
            .route(
                Route::stripped("private", "/private/", "chat", echo.addr).allow(["192.0.2.0/24"]),
            )
            .route(Route::stripped("small", "/small/", "chat", echo.addr).max_body_size("10B")),
        &KeyFile::of([
            Key::new("prot-metrics-plain-0001", "ann").service("chat"),
            Key::new("prot-metrics-rate-0002", "rate")
                .service("chat")
                .rate_limit("1/min"),
            Key::new("prot-metrics-conc-0003", "conc")
                .service("chat")
                .max_concurrent(1),
        ]),
    );
    let admin = gw.admin();
    let reasons = [
        "rate_limited",
        "too_many_concurrent",
        "key_throttled",
        "body_too_large",
        "ip_not_allowed",
        "preflight",
    ];
    let before: Vec<f64> = reasons.iter().map(|r| refused_total(admin, r)).collect();
    let rid = |reason: &str| format!("prot-{reason}");
    let ids: BTreeMap<&str, String> = reasons.iter().map(|r| (*r, rid(r))).collect();
    let id = |reason: &str| ("X-Request-Id", ids[reason].as_str());

    // rate_limited
    let rate = "prot-metrics-rate-0002";
    assert_status(
        &get_keyed(&gw, "/chat/x", rate, &[]),
        200,
        "rate key, request 1",
    );
    let r = get_keyed(&gw, "/chat/x", rate, &[id("rate_limited")]);
    assert_refusal(&r, 429, "rate limit exceeded", "rate key, request 2");

    // too_many_concurrent
    let conc = "prot-metrics-conc-0003";
    let held = must_open(gw.addr(), "/stream/x", conc, "the one stream");
    let r = get_keyed(&gw, "/stream/x", conc, &[id("too_many_concurrent")]);
    assert_refusal(&r, 429, "too many concurrent requests", "a second stream");
    held.disconnect();

    // key_throttled (from an address of its own, behind the trusted proxy)
    let xff = ("X-Forwarded-For", "203.0.113.99");
    for _ in 0..2 {
        assert_status(
            &get_keyed(&gw, "/chat/x", "prot-metrics-wrong", &[xff]),
            401,
            "a failure",
        );
    }
    let r = get_keyed(
        &gw,
        "/chat/x",
        "prot-metrics-plain-0001",
        &[xff, id("key_throttled")],
    );
    assert_refusal(&r, 429, "too many failed key attempts", "after 2 failures");

    // body_too_large
    let plain = "prot-metrics-plain-0001";
    let r = send(
        gw.addr(),
        "POST",
        "/small/x",
        &[("X-API-Key", plain), id("body_too_large")],
        b"eleven byte",
    );
    assert_refusal(&r, 413, "request body too large", "11 bytes over 10B");

    // ip_not_allowed
    let r = get_keyed(&gw, "/private/x", plain, &[id("ip_not_allowed")]);
    assert_refusal(&r, 403, "address not allowed", "127.0.0.1 on /private/");

    // preflight
    let r = preflight(&gw, "/chat/x", ORIGIN, &[id("preflight")]);
    assert_status(&r, 204, "a preflight");

    for (reason, was) in reasons.iter().zip(&before) {
        let want = was + 1.0;
        let mut now = 0.0;
        let reached = wait_until(Duration::from_secs(5), || {
            now = refused_total(admin, reason);
            now >= want
        });
        assert!(
            reached,
            "agw_refused_total{{reason=\"{reason}\"}} is {now}, want {want}"
        );
        assert_eq!(
            now, want,
            "agw_refused_total{{reason=\"{reason}\"}} counted more than once"
        );
    }

    let audit = gw.dir.path().join("audit.log");
    let want: Vec<(String, &str, u64)> = [
        ("rate_limited", 429),
        ("too_many_concurrent", 429),
        ("key_throttled", 429),
        ("body_too_large", 413),
        ("ip_not_allowed", 403),
        ("preflight", 204),
    ]
    .into_iter()
    .map(|(reason, status)| (rid(reason), reason, status))
    .collect();
    let mut lines = Vec::new();
    let complete = wait_until(Duration::from_secs(5), || {
        lines = audit_lines(&audit);
        want.iter()
            .all(|(id, _, _)| lines.iter().any(|l| l["request_id"] == id.as_str()))
    });
    assert!(complete, "audit lines missing; have: {lines:?}");
    for (id, reason, status) in &want {
        let line = lines
            .iter()
            .find(|l| l["request_id"] == id.as_str())
            .expect("checked above");
        assert_eq!(line["decision"], *reason, "{line}");
        assert_eq!(line["status"], *status, "{line}");
    }
}

// ---------------------------------------------------------------------------
// Config: accepted forms and errors
// ---------------------------------------------------------------------------

/// Asserts a failed `check` whose stderr names `file`, then a line number
/// (as `file:line:`), and quotes the offending value `bad` (so an error
/// that only says "unknown field" does not count). Returns the line.
fn assert_check_fails(out: &CliOutput, file: &Path, bad: &str, what: &str) -> usize {
    assert!(
        !out.status.success(),
        "{what}: check should fail; stdout: {} stderr: {}",
        out.stdout,
        out.stderr
    );
    let name = format!("{}:", file.display());
    let err = &out.stderr;
    let at = err
        .find(&name)
        .unwrap_or_else(|| panic!("{what}: stderr does not name {}: {err}", file.display()));
    let line = err[at + name.len()..]
        .split(':')
        .next()
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("{what}: no line number after the file name: {err}"));
    assert!(
        err.contains(bad),
        "{what}: the error does not quote the bad value {bad:?}: {err}"
    );
    line
}

/// [`assert_check_fails`] for a config error, which names the line of the
/// bad value itself.
fn assert_fails_at_line(out: &CliOutput, file: &Path, bad: &str, line: usize, what: &str) {
    let reported = assert_check_fails(out, file, bad, what);
    assert_eq!(reported, line, "{what}: the wrong line: {}", out.stderr);
}

fn check_keys() -> KeyFile {
    KeyFile::of([Key::new("prot-check-key-0001", "ann").service("chat")])
}

/// A config on a free port with `yaml` (written as text: the tests below
/// are about the positions in it).
fn config_text(yaml: &str) -> String {
    GatewayConfig::new()
        .listen(loopback(free_port()))
        .extra_yaml(yaml)
        .render()
}

#[test]
fn check_accepts_every_documented_form_of_the_protection_settings() {
    let _load = shared();
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let body = GatewayConfig::new()
        .threads(2)
        .rate_limit("1000/day")
        .max_concurrent(8)
        .max_body_size("10MB")
        .allow(["127.0.0.1", "10.0.0.0/8", "::1", "fd00::/8"])
        .trusted_proxies(["127.0.0.1", "10.0.0.0/8", "::1"])
        .failed_key_throttle(
            Throttle::new()
                .enabled(true)
                .max_failures(20)
                .window("60s")
                .cooldown("300s"),
        )
        .route(
            Route::stripped("a", "/a/", "chat", up)
                .rate_limit("5/s")
                .max_concurrent(2)
                .max_body_size("100B"),
        )
        .route(
            Route::stripped("b", "/b/", "chat", up)
                .rate_limit("60/min")
                .max_body_size("1KB")
                .allow(["::1"]),
        )
        .route(
            Route::stripped("c", "/c/", "chat", up)
                .rate_limit("100/h")
                .max_body_size("1KiB")
                .allow(["192.0.2.0/24", "2001:db8::/32"]),
        )
        .route(
            Route::stripped("d", "/d/", "chat", up)
                .max_body_size("2MiB")
                .cors(Cors::new(["https://chat.example"])),
        )
        .route(
            Route::stripped("e", "/e/", "chat", up)
                .max_body_size("1GB")
                .cors(
                    Cors::new(["https://a.example", "https://b.example"])
                        .max_age("600s")
                        .headers(["authorization", "content-type", "x-api-key"]),
                ),
        )
        .route(Route::stripped("f", "/f/", "chat", up).max_body_size("2GiB"))
        .route(Route::stripped("g", "/g/", "chat", up).max_body_size("512"))
        .route(Route::stripped("h", "/h/", "chat", up).max_body_size(512));
    let keys_json = KeyFile::of([
        Key::new("prot-check-key-0001", "ann")
            .service("chat")
            .rate_limit("60/min")
            .max_concurrent(2),
        Key::new("prot-check-key-0002", "bob")
            .service("chat")
            .rate_limit("10/s"),
        Key::new("prot-check-key-0003", "cy")
            .service("chat")
            .max_concurrent(1),
    ]);
    let (_files, out) = run_check(body.listen(loopback(free_port())), &keys_json);
    assert!(
        out.status.success(),
        "check refused the documented forms: {}",
        out.stderr
    );
    let (_files, out) = run_check(
        GatewayConfig::new()
            .listen(loopback(free_port()))
            .threads(2)
            .failed_key_throttle(Throttle::off())
            .route(Route::stripped("a", "/a/", "chat", up)),
        check_keys(),
    );
    assert!(
        out.status.success(),
        "failed_key_throttle: {{enabled: false}}: {}",
        out.stderr
    );
}

#[test]
fn check_names_the_file_and_line_of_a_bad_rate_limit() {
    let _load = shared();
    let text = config_text("rate_limit: \"five\"\nroutes:\n  - name: chat\n    path_prefix: /chat/\n    service: chat\n    upstreams: [\"127.0.0.1:9\"]\n");
    let (files, out) = run_check(&text, check_keys());
    assert_fails_at_line(
        &out,
        &files.config_path,
        "five",
        line_of(&text, "\"five\""),
        "rate_limit: \"five\"",
    );
}

#[test]
fn check_names_the_file_and_line_of_a_bad_max_body_size() {
    let _load = shared();
    let text = config_text("routes:\n  - name: chat\n    path_prefix: /chat/\n    service: chat\n    max_body_size: \"10XB\"\n    upstreams: [\"127.0.0.1:9\"]\n");
    let (files, out) = run_check(&text, check_keys());
    assert_fails_at_line(
        &out,
        &files.config_path,
        "10XB",
        line_of(&text, "10XB"),
        "max_body_size: \"10XB\"",
    );
}

#[test]
fn check_names_the_file_and_line_of_a_bad_allow_address() {
    let _load = shared();
    let text = config_text("routes:\n  - name: chat\n    path_prefix: /chat/\n    service: chat\n    upstreams: [\"127.0.0.1:9\"]\n    allow:\n      - \"10.0.0.0/8\"\n      - \"300.1.1.1\"\n");
    let (files, out) = run_check(&text, check_keys());
    assert_fails_at_line(
        &out,
        &files.config_path,
        "300.1.1.1",
        line_of(&text, "300.1.1.1"),
        "allow: [\"300.1.1.1\"]",
    );
}

#[test]
fn check_names_the_key_file_and_the_key_id_of_a_bad_limit_in_a_key_entry() {
    let _load = shared();
    let text = GatewayConfig::new()
        .listen(loopback(free_port()))
        .route(Route::new("chat", "/chat/", "chat").upstream("127.0.0.1:9"));
    // Key-file errors name the file, a line of the entry and the key's id
    // (never the key), as the other key-file errors do.
    for (field, bad) in [("rate_limit", "\"fast\""), ("max_concurrent", "\"two\"")] {
        let keys_json = format!(
            "{{\n  \"prot-check-key-0001\": {{\n    \"user\": \"ann\",\n    \"service\": \"chat\",\n    \"{field}\": {bad}\n  }}\n}}\n"
        );
        let (files, out) = run_check(&text, &keys_json);
        let what = format!("\"{field}\": {bad}");
        assert_check_fails(&out, &files.keys_path, bad.trim_matches('"'), &what);
        assert!(
            out.stderr.contains(&key_id("prot-check-key-0001")),
            "{what}: the error does not name the key id: {}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("prot-check-key-0001"),
            "{what}: the error shows the key: {}",
            out.stderr
        );
    }
}
