//! The protection settings together (rate limits, concurrency caps, the
//! failed-key throttle, body size limits, allow lists, CORS; each has its
//! own test file): applied on a config reload, every refusal counted by
//! reason and audited with the same word, and `check` on their documented
//! forms and errors.
//!
//! Every test runs the real binary on loopback in front of real upstreams
//! and talks to it over bare `TcpStream`s, so the exact status, headers
//! and body of each answer are checked. Tests wait by polling.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;

/// How long a reload (file watch or SIGHUP) may take to show in the log.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The origin the CORS route allows.
const ORIGIN: &str = "https://chat.example";

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

#[test]
fn protection_settings_apply_on_config_reload() {
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
        KeyFile::of([
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
fn every_protection_refusal_is_counted_by_reason_and_audited_with_the_same_word() {
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
        KeyFile::of([
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

#[test]
fn check_accepts_every_documented_form_of_the_protection_settings() {
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
