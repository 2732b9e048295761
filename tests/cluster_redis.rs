//! The Redis behind a cluster (`shared_state`): without it, `local`
//! instances count alone and `deny` ones refuse limited keys, and both
//! recover when it returns; a password and TLS to it; a slow Redis holding
//! a request no longer than the timeout; and `check` on its settings.
//!
//! Every test runs real `ai-gateway` processes on loopback (see
//! `tests/common/cluster.rs`), all pointed at the same key file and the
//! same real `redis-server`, and talks to them over bare `TcpStream`s so
//! the exact status and body of each answer are checked. Tests wait by
//! polling, never by sleeping; no test waits a rate limit's window out.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::cluster::*;
use common::redis::RedisServer;
use common::*;

// ---------------------------------------------------------------------------
// Redis going away and coming back
// ---------------------------------------------------------------------------

/// Rate limit 5/min, used only once Redis is down (on A, then on B).
const DOWN_LOCAL_KEY: &str = "cluster-down-local-0001";

/// Rate limit 5/min, on the `deny` instance C.
const DOWN_DENY_KEY: &str = "cluster-down-deny-0002";

/// No limit at all.
const DOWN_PLAIN_KEY: &str = "cluster-down-plain-0003";

/// Rate limit 30/min, used only once Redis is back.
const DOWN_AFTER_KEY: &str = "cluster-down-after-0004";

/// Sends `n` requests with `key` to `node`: 200s or the rate-limit 429.
/// Returns the number admitted.
fn admitted_on(node: &Node, key: &str, n: usize, what: &str) -> usize {
    let mut admitted = 0;
    for i in 1..=n {
        let r = get_keyed(node.addr(), "/chat/x", key, &[]);
        if r.status == 200 {
            admitted += 1;
        } else {
            assert_refusal(
                &r,
                429,
                "rate limit exceeded",
                &format!("{what}: request {i} on {}", node.name),
            );
        }
    }
    admitted
}

/// Asserts a gateway refusal with `status` whose body is JSON
/// `{"error": "<some text>"}` (the wording is the implementation's).
fn assert_json_error(r: &RawResponse, status: u16, what: &str) {
    let body: Option<Value> = serde_json::from_slice(&r.body).ok();
    let error_ok = body
        .as_ref()
        .and_then(|b| b.as_object())
        .is_some_and(|o| o.len() == 1 && o["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(
        r.status == status && error_ok && r.header("content-type") == Some("application/json"),
        "{what}: want {status} with a JSON {{\"error\": ...}} body, got {}",
        show(r)
    );
}

#[test]
fn without_redis_local_instances_count_alone_and_deny_refuses_then_both_recover_when_it_returns() {
    let _one = one_cluster();
    let mut redis = RedisServer::start();
    let echo = EchoServer::start();
    let all_keys = [
        DOWN_LOCAL_KEY,
        DOWN_DENY_KEY,
        DOWN_PLAIN_KEY,
        DOWN_AFTER_KEY,
    ];
    let cluster = Cluster::start(
        &[
            shared(&redis, "local"),
            shared(&redis, "local"),
            shared(&redis, "deny"),
        ],
        &Route::chat(echo.addr),
        &KeyFile::of([
            Key::new(DOWN_LOCAL_KEY, "loc")
                .service("chat")
                .rate_limit("5/min"),
            Key::new(DOWN_DENY_KEY, "den")
                .service("chat")
                .rate_limit("5/min"),
            Key::new(DOWN_PLAIN_KEY, "pla").service("chat"),
            Key::new(DOWN_AFTER_KEY, "aft")
                .service("chat")
                .rate_limit("30/min"),
        ]),
    );
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));

    // Healthy: everything served, every instance ready.
    assert_status(
        &get_keyed(c.addr(), "/chat/x", DOWN_DENY_KEY, &[]),
        200,
        "the limited key on the deny instance C with Redis up",
    );
    for node in &cluster.nodes {
        assert_status(
            &readyz(node.admin),
            200,
            &format!("/readyz on {} with Redis up", node.name),
        );
    }
    let errors_before: Vec<f64> = cluster
        .nodes
        .iter()
        .map(|n| metric_at(n.admin, ERRORS))
        .collect();
    let local_before = metric_at(a.admin, FALLBACK_LOCAL);
    let deny_before = metric_at(c.admin, FALLBACK_DENY);
    let unavailable_before = metric_at(c.admin, REFUSED_UNAVAILABLE);

    redis.stop();

    // `local`: A counts the limited key alone, to its own 5; so does B.
    let on_a = admitted_on(a, DOWN_LOCAL_KEY, 8, "Redis down, local");
    assert_eq!(
        on_a,
        5,
        "A (on_redis_error: local) with Redis down: a 5/min key should be served and limited at 5 locally; metrics:\n{}\nlog:\n{}",
        shared_metrics(a.admin),
        a.gw.log()
    );
    let on_b = admitted_on(b, DOWN_LOCAL_KEY, 8, "Redis down, local");
    assert_eq!(
        on_b,
        5,
        "B (on_redis_error: local) with Redis down counts alone too; metrics:\n{}",
        shared_metrics(b.admin)
    );
    assert_status(
        &get_keyed(a.addr(), "/chat/x", DOWN_PLAIN_KEY, &[]),
        200,
        "a key without limits on A with Redis down",
    );

    // `deny`: C refuses limited keys with a 503 JSON error; others pass.
    let mut refused_on_c = 0.0;
    for key in [DOWN_DENY_KEY, DOWN_LOCAL_KEY] {
        let r = get_keyed(c.addr(), "/chat/x", key, &[]);
        assert_json_error(
            &r,
            503,
            &format!("a limited key on C (on_redis_error: deny) with Redis down ({key})"),
        );
        refused_on_c += 1.0;
    }
    assert_status(
        &get_keyed(c.addr(), "/chat/x", DOWN_PLAIN_KEY, &[]),
        200,
        "a key without limits on C (deny) with Redis down",
    );

    // The gauges and counters say so.
    for (node, before) in cluster.nodes.iter().zip(&errors_before) {
        let seen = wait_until(REDIS_STATE_TIMEOUT, || {
            let m = metrics_text(node.admin);
            sample(&m, UP) == Some(0.0) && sample(&m, ERRORS).unwrap_or(0.0) > *before
        });
        assert!(
            seen,
            "instance {}: with Redis down, want {UP} 0 and {ERRORS} above {before}; got:\n{}",
            node.name,
            shared_metrics(node.admin)
        );
    }
    let local_now = metric_at(a.admin, FALLBACK_LOCAL);
    assert!(
        local_now > local_before,
        "A: {FALLBACK_LOCAL} {local_before} -> {local_now}"
    );
    let deny_now = metric_at(c.admin, FALLBACK_DENY);
    assert!(
        deny_now > deny_before,
        "C: {FALLBACK_DENY} {deny_before} -> {deny_now}"
    );
    let unavailable_now = metric_at(c.admin, REFUSED_UNAVAILABLE);
    assert_eq!(
        unavailable_now - unavailable_before,
        refused_on_c,
        "C: {REFUSED_UNAVAILABLE} should count each 503"
    );

    // Readiness: `deny` is not ready without Redis, `local` is.
    let not_ready = wait_until(REDIS_STATE_TIMEOUT, || readyz(c.admin).status == 503);
    let r = readyz(c.admin);
    assert!(
        not_ready && r.status == 503,
        "/readyz on C (deny) with Redis down: {}",
        show(&r)
    );
    assert!(
        r.text().to_ascii_lowercase().contains("redis"),
        "/readyz on C does not say Redis is the reason: {}",
        show(&r)
    );
    assert_status(
        &readyz(a.admin),
        200,
        "/readyz on A (local) with Redis down",
    );

    // The log says why, once the address is unreachable.
    for node in [a, c] {
        assert!(
            node.gw
                .wait_log_contains("shared state", REDIS_STATE_TIMEOUT),
            "instance {}: no log line about the shared state with Redis down:\n{}",
            node.name,
            node.gw.log()
        );
    }

    // Redis back on the same port; no gateway is restarted.
    redis.restart();
    let restarted = Instant::now();
    for node in &cluster.nodes {
        let up = wait_until(REDIS_STATE_TIMEOUT, || {
            sample(&metrics_text(node.admin), UP) == Some(1.0)
        });
        assert!(
            up,
            "instance {}: {UP} not back to 1 {REDIS_STATE_TIMEOUT:?} after Redis returned:\n{}",
            node.name,
            shared_metrics(node.admin)
        );
    }
    eprintln!(
        "every instance saw Redis back after {:?}",
        restarted.elapsed()
    );
    assert!(
        wait_until(REDIS_STATE_TIMEOUT, || readyz(c.admin).status == 200),
        "/readyz on C after Redis returned: {}",
        show(&readyz(c.admin))
    );
    let mut last = None;
    let served = wait_until(REDIS_STATE_TIMEOUT, || {
        let r = get_keyed(c.addr(), "/chat/x", DOWN_DENY_KEY, &[]);
        let ok = r.status == 200;
        last = Some(r);
        ok
    });
    assert!(
        served,
        "C (deny) still refuses the limited key after Redis returned: {}",
        last.as_ref().map(show).unwrap_or_default()
    );

    // Shared counting resumed: a fresh 30/min key holds across the cluster,
    // counted in the new (empty) Redis.
    let resumed = round_robin(&cluster, DOWN_AFTER_KEY, 60, "after Redis returned");
    assert_cluster_limit(
        &resumed,
        30,
        "after Redis returned, 60 requests round-robin",
    );
    let in_redis = redis.keys();
    assert!(
        !in_redis.is_empty(),
        "after Redis returned, the cluster counted nothing in it"
    );
    assert!(
        in_redis
            .iter()
            .all(|k| all_keys.iter().all(|key| !k.contains(key))),
        "a Redis key name holds an API key: {in_redis:?}"
    );
    cluster.assert_logs_never_show(&all_keys);
}

// ---------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------

fn check_keys() -> KeyFile {
    KeyFile::of([Key::new("cluster-check-key-0001", "ann").service("chat")])
}

/// The route of the configs `check` runs on.
fn check_route() -> Route {
    Route::new("chat", "/chat/", "chat").upstream("127.0.0.1:9")
}

/// A config with `shared_state_block` (top level) and one route, written
/// as text: the tests below are about the positions in it.
fn check_config(shared_state_block: &str) -> String {
    GatewayConfig::new()
        .listen(loopback(free_port()))
        .extra_yaml(&format!(
            "{shared_state_block}routes:\n  - name: chat\n    path_prefix: /chat/\n    service: chat\n    upstreams: [\"127.0.0.1:9\"]\n"
        ))
        .render()
}

/// A config with `shared` and one route.
fn shared_config(shared: SharedState) -> GatewayConfig {
    GatewayConfig::new()
        .listen(loopback(free_port()))
        .shared_state(shared)
        .route(check_route())
}

/// Asserts a failed `check` whose stderr names `file`, then `line` (as
/// `file:line:`), then a reason.
fn assert_check_fails_at(out: &CliOutput, file: &Path, line: usize, what: &str) {
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
    let after = &err[at + name.len()..];
    let reported = after
        .split(':')
        .next()
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("{what}: no line number after the file name: {err}"));
    assert_eq!(reported, line, "{what}: the wrong line: {err}");
    let reason: String = after
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphabetic())
        .collect();
    assert!(
        reason.len() >= 5,
        "{what}: no reason after {}:{line}: {err}",
        file.display()
    );
}

#[test]
fn check_names_the_file_and_line_of_a_bad_redis_url_and_passes_a_good_one_without_connecting() {
    // The bad URL first in its mapping, then after another setting: the
    // error names the URL's own line either way.
    for bad in ["http://x", "redis://127.0.0.1:99999999/0", "not a url"] {
        for block in [
            format!("shared_state:\n  redis: \"{bad}\"\n  on_redis_error: deny\n"),
            format!(
                "shared_state:\n  on_redis_error: deny\n  timeout: 100ms\n  redis: \"{bad}\"\n"
            ),
        ] {
            let text = check_config(&block);
            let (files, out) = run_check(&text, check_keys());
            assert_check_fails_at(
                &out,
                &files.config_path,
                line_of(&text, bad),
                &format!("redis: {bad:?} in\n{block}"),
            );
        }
    }
    let text = check_config(
        "shared_state:\n  redis: \"redis://127.0.0.1:6379/0\"\n  on_redis_error: maybe\n",
    );
    let (files, out) = run_check(&text, check_keys());
    assert_check_fails_at(
        &out,
        &files.config_path,
        line_of(&text, "maybe"),
        "on_redis_error: maybe",
    );

    // Good URLs to a port that accepts connections but is never served:
    // `check` passes and never connects.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a listener nobody serves");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let port = listener.local_addr().expect("listener address").port();
    for state in [
        SharedState::new(&format!("redis://127.0.0.1:{port}/0")),
        SharedState::new(&format!("redis://:pw@127.0.0.1:{port}/2"))
            .on_redis_error("deny")
            .timeout("250ms"),
        SharedState::new(&format!("rediss://user:pw@localhost:{port}/0"))
            .on_redis_error("local")
            .timeout("1s"),
    ] {
        let (_files, out) = run_check(shared_config(state.clone()), check_keys());
        assert!(
            out.status.success(),
            "check refused a good shared_state:\n{state:?}\nstderr: {}",
            out.stderr
        );
    }
    match listener.accept() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("`check` connected to the Redis address (from {peer})"),
        Err(e) => panic!("accept on the unserved listener: {e}"),
    }
    // A port where nothing listens at all passes too.
    let nothing = refused_addr();
    let (_files, out) = run_check(
        shared_config(SharedState::new(&format!("redis://{nothing}/0")).on_redis_error("deny")),
        check_keys(),
    );
    assert!(
        out.status.success(),
        "check refused a Redis address where nothing listens: {}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------
// A password and TLS to Redis
// ---------------------------------------------------------------------------

const TLS_KEY: &str = "cluster-tls-key-0001";

const REDIS_PASSWORD: &str = "s3cret-redis-pw";

/// `shared_state` for a TLS Redis with a password, verified against `ca`.
fn tls_shared_state(port: u16, password: &str, ca: &Path) -> GatewayConfig {
    GatewayConfig::new()
        .shared_state(SharedState::new(&format!("rediss://:{password}@localhost:{port}/0")).ca(ca))
}

/// The password and TLS come from the URL (and `ca` for a private CA):
/// counting is shared over them, the password never shows in a log, and a
/// wrong password or a CA that did not sign Redis's certificate leaves the
/// instance counting locally, saying so.
#[test]
fn a_password_and_tls_to_redis_are_used_and_the_password_never_logged() {
    let _one = one_cluster();
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = common::tls::TestCa::new("redis test CA");
    let leaf = ca.leaf(&["localhost", "127.0.0.1"], 7, 30);
    let (cert, key, ca_file) = (
        dir.path().join("redis.crt"),
        dir.path().join("redis.key"),
        dir.path().join("ca.pem"),
    );
    leaf.write(&cert, &key);
    fs::write(&ca_file, &ca.pem).expect("write the CA");
    let other_ca_file = dir.path().join("other-ca.pem");
    fs::write(&other_ca_file, common::tls::TestCa::new("another CA").pem).expect("write");
    let tls_port = free_port();
    let tls_port_arg = tls_port.to_string();
    let redis = RedisServer::start_with(&[
        "--requirepass",
        REDIS_PASSWORD,
        "--tls-port",
        &tls_port_arg,
        "--tls-cert-file",
        s(&cert),
        "--tls-key-file",
        s(&key),
        "--tls-ca-cert-file",
        s(&ca_file),
        "--tls-auth-clients",
        "no",
    ]);
    let echo = EchoServer::start();
    let routes = Route::chat(echo.addr);
    let keys_json = KeyFile::of([Key::new(TLS_KEY, "ann")
        .service("chat")
        .rate_limit("10/min")]);
    let good = tls_shared_state(tls_port, REDIS_PASSWORD, &ca_file);
    let cluster = Cluster::start(&[good.clone(), good], &routes, &keys_json);
    let admitted = round_robin(&cluster, TLS_KEY, 20, "over TLS with a password");
    assert_cluster_limit(&admitted, 10, "10/min over TLS, two instances");
    assert!(
        redis.command(&["AUTH", REDIS_PASSWORD]).starts_with("+OK"),
        "the test's own check of the password"
    );

    // A wrong password, and a CA that did not sign the server's
    // certificate: never up, errors counted, requests served locally.
    let wrong_pw = start_node(
        "wrong password",
        &cluster.keys_path,
        &tls_shared_state(tls_port, "not-the-password", &ca_file),
        &routes,
    );
    let wrong_ca = start_node(
        "wrong CA",
        &cluster.keys_path,
        &tls_shared_state(tls_port, REDIS_PASSWORD, &other_ca_file),
        &routes,
    );
    for node in [&wrong_pw, &wrong_ca] {
        let errors = wait_until(REDIS_STATE_TIMEOUT, || metric_at(node.admin, ERRORS) >= 1.0);
        assert!(
            errors,
            "{}: no shared-state error counted; metrics:\n{}",
            node.name,
            shared_metrics(node.admin)
        );
        assert_eq!(metric_at(node.admin, UP), 0.0, "{}: up", node.name);
        assert_status(
            &get_keyed(node.addr(), "/chat/x", TLS_KEY, &[]),
            200,
            &format!("{}: counted locally, its own 10/min", node.name),
        );
        assert!(
            wait_until(REDIS_STATE_TIMEOUT, || node
                .gw
                .log()
                .contains("shared state")),
            "{}: nothing logged about Redis; log:\n{}",
            node.name,
            node.gw.log()
        );
    }
    for log in cluster
        .nodes
        .iter()
        .map(|n| n.gw.log())
        .chain([wrong_pw.gw.log(), wrong_ca.gw.log()])
    {
        assert!(
            !log.contains(REDIS_PASSWORD),
            "a log shows the password:\n{log}"
        );
        assert!(
            !log.contains("not-the-password"),
            "a log shows the password:\n{log}"
        );
        assert!(!log.contains(TLS_KEY), "a log shows the key:\n{log}");
    }
}

// ---------------------------------------------------------------------------
// A slow Redis
// ---------------------------------------------------------------------------

const SLOW_KEY: &str = "cluster-slow-key-0001";

/// A Redis that stops answering (busy for 3 s: `DEBUG SLEEP`) holds a
/// request no longer than `shared_state.timeout`: the request is decided
/// locally (`local`), the error counted, and sharing resumes once Redis
/// answers again.
#[test]
fn a_slow_redis_holds_a_request_no_longer_than_the_timeout() {
    let _one = one_cluster();
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let echo = EchoServer::start();
    let top = GatewayConfig::new().shared_state(shared_state(&redis, "local").timeout("200ms"));
    let cluster = Cluster::start(
        &[top],
        &Route::chat(echo.addr),
        &KeyFile::of([Key::new(SLOW_KEY, "slo")
            .service("chat")
            .rate_limit("100/min")]),
    );
    let node = cluster.node(0);
    // Redis is single-threaded: while it sleeps, nothing is answered.
    let port = redis.port();
    let sleeper = thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
        s.write_all(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$1\r\n3\r\n")
            .expect("send DEBUG SLEEP");
        let mut reply = [0u8; 16];
        let n = s.read(&mut reply).unwrap_or(0);
        String::from_utf8_lossy(&reply[..n]).into_owned()
    });
    // Until Redis stops answering PING, it has not started sleeping.
    assert!(
        wait_until(Duration::from_secs(2), || {
            TcpStream::connect(("127.0.0.1", port))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_millis(100)))?;
                    s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
                    let mut b = [0u8; 8];
                    s.read(&mut b)
                })
                .is_err()
        }),
        "redis never started sleeping"
    );
    // The key's first request needs a lease from Redis.
    let sent = Instant::now();
    let r = get_keyed(node.addr(), "/chat/x", SLOW_KEY, &[]);
    let took = sent.elapsed();
    assert_status(
        &r,
        200,
        "the limited key while Redis sleeps (counted locally)",
    );
    assert!(
        took < Duration::from_millis(1500),
        "the request waited {took:?} for a sleeping Redis (timeout 200ms)"
    );
    assert!(
        metric_at(node.admin, ERRORS) >= 1.0,
        "the timeout is counted"
    );
    assert!(
        metric_at(node.admin, FALLBACK_LOCAL) >= 1.0,
        "decided locally"
    );
    // Later requests do not wait at all: Redis is marked down.
    let sent = Instant::now();
    assert_status(
        &get_keyed(node.addr(), "/chat/x", SLOW_KEY, &[]),
        200,
        "again",
    );
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(sleeper.join().expect("the sleeper"), "+OK\r\n");
    assert!(
        wait_until(REDIS_STATE_TIMEOUT, || metric_at(node.admin, UP) == 1.0),
        "Redis answers again: up; metrics:\n{}",
        shared_metrics(node.admin)
    );
    assert!(
        node.gw.log().contains("shared state: redis"),
        "the slow Redis is logged"
    );
}
