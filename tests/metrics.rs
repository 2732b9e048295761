// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

// Prometheus metrics against the real binary: the exposition is valid
// (checked by a strict parser, itself tested here), requests, denials and
// reloads are counted once, nothing secret is exported, and
// `metrics_per_user` adds a user series.

use std::net::SocketAddr;
use std::time::Duration;

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

#[test]
fn prometheus_checker_rejects_malformed_text() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"a\\\"b\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
    let s = parse_exposition(good).unwrap();
    assert_eq!(
        series_value(&s, "a_total", &[("x", "1"), ("y", "a\"b")]),
        Some(3.0)
    );
    assert_eq!(series_value(&s, "h_count", &[]), Some(2.0));
    for bad in [
        "# TYPE a_total countr\na_total 1\n",
        "# TYPE a_total counter\na_total one\n",
        "# TYPE a_total counter\na_total{x=1} 1\n",
        "# TYPE a_total counter\na_total{x=\"1\" 1\n",
        "# TYPE a_total counter\na_total{1x=\"1\"} 1\n",
        "# TYPE a_total counter\na_total{x=\"1\",x=\"2\"} 1\n",
        "# TYPE a_total counter\na-total 1\n",
        "# TYPE a_total counter\na_total  1\n",
        "# TYPE a_total counter\na_total 1 2 3\n",
        "b_total 1\n",
        "# TYPE a counter\n# TYPE a gauge\na 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn metrics_count_requests_denials_and_reloads() {
    let echo = EchoServer::start();
    let gw = &Gateway::start(&config(echo.addr).with_admin(), keys());
    let admin = gw.admin();

    let ok200 = [("route", "chat"), ("status", "200")];
    let denied401 = [("route", "chat"), ("status", "401")];
    let unknown = [("reason", "unknown_key")];
    let duration = [("route", "chat")];

    let (_, before) = scrape(admin);
    let ok_before = series_value(&before, "agw_requests_total", &ok200).unwrap_or(0.0);
    let denied_before = series_value(&before, "agw_requests_total", &denied401).unwrap_or(0.0);
    let unknown_before = series_value(&before, "agw_auth_failures_total", &unknown)
        .expect("auth failure reasons are exported from the start");
    let duration_before =
        series_value(&before, "agw_request_duration_seconds_count", &duration).unwrap_or(0.0);
    assert_eq!(series_value(&before, "agw_keys_loaded", &[]), Some(2.0));
    assert_eq!(series_value(&before, "agw_routes_loaded", &[]), Some(1.0));
    assert_eq!(
        series_value(&before, "agw_snapshot_generation", &[]),
        Some(1.0)
    );
    assert_eq!(
        series_value(&before, "agw_reloads_total", &[("result", "ok")]),
        Some(0.0)
    );

    const OK: usize = 5;
    const DENIED: usize = 2;
    for i in 0..OK {
        let r = send(
            gw.addr(),
            "POST",
            &format!("/chat/private-path-{i}?q=secret-query"),
            &[("X-API-Key", ANN_KEY)],
            b"{}",
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for _ in 0..DENIED {
        let r = send(
            gw.addr(),
            "POST",
            "/chat/private-path-denied",
            &[("X-API-Key", WRONG_KEY)],
            b"{}",
        );
        assert_eq!(r.status, 401, "{}", r.text());
    }

    wait_metric_at_least(admin, "agw_requests_total", &ok200, ok_before + OK as f64);
    let after = wait_metric_at_least(
        admin,
        "agw_request_duration_seconds_count",
        &duration,
        duration_before + (OK + DENIED) as f64,
    );
    assert_eq!(
        series_value(&after, "agw_requests_total", &ok200),
        Some(ok_before + OK as f64),
        "exactly one count per accepted request"
    );
    assert_eq!(
        series_value(&after, "agw_requests_total", &denied401),
        Some(denied_before + DENIED as f64)
    );
    assert_eq!(
        series_value(&after, "agw_auth_failures_total", &unknown),
        Some(unknown_before + DENIED as f64)
    );
    assert_eq!(
        series_value(&after, "agw_request_duration_seconds_count", &duration),
        Some(duration_before + (OK + DENIED) as f64),
        "every request on the route is timed"
    );
    assert_eq!(
        series_value(&after, "agw_requests_in_flight", &[]),
        Some(0.0)
    );
    assert!(
        !after.iter().any(|s| s.name == "agw_user_requests_total"),
        "per-user series without metrics_per_user"
    );

    gw.signal("HUP");
    // The gauge is set just before the counter: wait for both.
    let reloaded = poll(Duration::from_secs(10), "generation 2 after SIGHUP", || {
        let (_, s) = scrape(admin);
        let done = series_value(&s, "agw_snapshot_generation", &[]) >= Some(2.0)
            && series_value(&s, "agw_reloads_total", &[("result", "ok")]) >= Some(1.0);
        done.then_some(s)
    });
    assert_eq!(
        series_value(&reloaded, "agw_snapshot_generation", &[]),
        Some(2.0)
    );
    assert_eq!(
        series_value(&reloaded, "agw_reloads_total", &[("result", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        series_value(&reloaded, "agw_reloads_total", &[("result", "error")]),
        Some(0.0)
    );
    assert_eq!(series_value(&reloaded, "agw_keys_loaded", &[]), Some(2.0));

    let (text, _) = scrape(admin);
    for secret in [
        ANN_KEY,
        WRONG_KEY,
        KEY_MARK,
        "private-path",
        "secret-query",
        "/chat/",
        "__probe__",
    ] {
        assert!(
            !text.contains(secret),
            "exposition contains {secret:?}:\n{text}"
        );
    }
}

#[test]
fn metrics_per_user_adds_a_user_series() {
    let echo = EchoServer::start();
    let gw = &Gateway::start(
        &config(echo.addr).metrics_per_user(true).with_admin(),
        keys(),
    );
    let admin = gw.admin();
    for _ in 0..3 {
        let r = send(gw.addr(), "GET", "/chat/x", &[("X-API-Key", ANN_KEY)], b"");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = send(gw.addr(), "GET", "/chat/x", &[("X-API-Key", BOB_KEY)], b"");
    assert_eq!(r.status, 403, "{}", r.text());
    let r = send(
        gw.addr(),
        "GET",
        "/chat/x",
        &[("X-API-Key", WRONG_KEY)],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.text());

    let ann = [("user", "ann")];
    let s = wait_metric_at_least(admin, "agw_user_requests_total", &ann, 3.0);
    assert_eq!(series_value(&s, "agw_user_requests_total", &ann), Some(3.0));
    let users: Vec<&Sample> = s
        .iter()
        .filter(|s| s.name == "agw_user_requests_total")
        .collect();
    assert_eq!(
        users.len(),
        1,
        "only accepted requests count per user: {users:?}"
    );
}
