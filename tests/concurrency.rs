//! Per-key concurrency caps (`max_concurrent`): a request over the cap is
//! refused at once, and a slot is freed when a stream ends, when its client
//! goes away, and never leaked by revoking and re-enabling the key
//! mid-stream.
//!
//! Every test runs the real binary on loopback in front of real upstreams
//! and talks to it over bare `TcpStream`s, so the exact status, headers
//! and body of each answer are checked. Tests wait by polling; slow streams come from a
//! [`StreamServer`].

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::time::{Duration, Instant};

use common::*;

/// How long a reload (file watch or SIGHUP) may take to show in the log.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

const CONC_KEY: &str = "prot-conc-key-0001";

fn conc_keys() -> KeyFile {
    KeyFile::of([Key::new(CONC_KEY, "ann").service("chat").max_concurrent(2)])
}

#[test]
fn max_concurrent_refuses_a_third_stream_at_once_and_a_finished_stream_frees_its_slot() {
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
        conc_keys(),
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
    // 200 chunks 50 ms apart: a stream would last 10 s if nobody left.
    let up = StreamServer::start(200, Duration::from_millis(50));
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::stripped("s", "/s/", "chat", up.addr)),
        conc_keys(),
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

#[test]
fn revoking_and_re_enabling_a_key_mid_stream_leaks_no_concurrency_slot() {
    // 20 chunks 100 ms apart: about 2 s per stream.
    let up = StreamServer::start(20, Duration::from_millis(100));
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::stripped("s", "/s/", "chat", up.addr)),
        conc_keys(),
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
    gw.write_keys(conc_keys());
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
