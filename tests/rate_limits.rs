//! Per-key rate limits: `n` requests pass, the next gets 429 with a
//! `Retry-After` that is enough; keys do not share a budget; the key's own
//! limit beats the route's, which beats the global one; an exhausted
//! budget survives a reload; `keygen` writes limits the gateway applies.
//!
//! Every test runs the real binary on loopback in front of real upstreams
//! and talks to it over bare `TcpStream`s, so the exact status, headers
//! and body of each answer are checked. Tests wait by polling; the only sleeps wait out a
//! `Retry-After` the gateway gave, because that is the behaviour under
//! test.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

/// How long a reload (file watch or SIGHUP) may take to show in the log.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

const RATE_A: &str = "prot-rate-key-a-0001";

const RATE_B: &str = "prot-rate-key-b-0002";

#[test]
fn rate_limit_allows_n_then_429_with_retry_after_then_recovers_and_keys_do_not_share_a_budget() {
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::chat(echo.addr)),
        KeyFile::of([
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
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .rate_limit("2/min")
            .route(Route::stripped("a", "/a/", "chat", echo.addr).rate_limit("3/min"))
            .route(Route::stripped("b", "/b/", "chat", echo.addr)),
        KeyFile::of([
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

#[test]
fn an_exhausted_rate_limit_stays_exhausted_across_a_keygen_reload() {
    let echo = EchoServer::start();
    let key = "prot-reload-rate-0001";
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::chat(echo.addr)),
        KeyFile::of([Key::new(key, "ann").service("chat").rate_limit("3/min")]),
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
fn keygen_writes_rate_limit_and_max_concurrent_and_the_gateway_applies_them() {
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::chat(echo.addr)),
        KeyFile::of([Key::new("prot-keygen-0001", "ann").service("chat")]),
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
