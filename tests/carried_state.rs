//! State that outlives a snapshot: what the gateway learnt about an
//! upstream survives a reload that `keygen` triggers by adding a key.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::time::Duration;

use common::*;

const KEY: &str = "carried-key-0001";

/// How many times the gateway has taken an upstream out of rotation.
fn times_taken_out(gw: &Gateway) -> usize {
    gw.log().matches("failed to connect").count()
}

#[test]
fn an_upstream_out_of_rotation_stays_out_across_a_keygen_reload() {
    let echo = EchoServer::start();
    let dead = refused_addr();
    let gw = Gateway::start(
        &GatewayConfig::new().route(
            Route::new("chat", "/chat/", "chat")
                .strip_prefix(true)
                .upstreams([dead, echo.addr]),
        ),
        KeyFile::of([Key::new(KEY, "ann").service("chat")]),
    );
    let get = || {
        agent()
            .get(&gw.url("/chat/x"))
            .header("X-API-Key", KEY)
            .call()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    // Round robin reaches the dead upstream within two requests; the
    // failed connect is retried on the live one, so both still succeed.
    for _ in 0..2 {
        assert_eq!(get(), 200);
    }
    assert!(
        gw.wait_log_contains(
            &format!("upstream {dead} of route \"chat\" failed to connect"),
            Duration::from_secs(5)
        ),
        "{}",
        gw.log()
    );
    assert_eq!(times_taken_out(&gw), 1, "{}", gw.log());

    // An unrelated key added from the command line: the file watcher
    // reloads the snapshot.
    let out = run_cli(
        &[
            "keygen",
            "--user",
            "someone-else",
            "--service",
            "chat",
            "--config",
            gw.config_path.to_str().expect("utf-8 path"),
        ],
        gw.dir.path(),
    );
    assert!(out.status.success(), "keygen: {}", out.stderr);
    assert!(
        gw.wait_log_contains("generation 2", Duration::from_secs(10)),
        "the keygen reload: {}",
        gw.log()
    );

    // Within the passive cool-down (10 s) the dead upstream is still out:
    // no request is sent to it, so it is not taken out a second time.
    for _ in 0..6 {
        assert_eq!(get(), 200);
    }
    assert_eq!(
        times_taken_out(&gw),
        1,
        "the reload put the dead upstream back in rotation: {}",
        gw.log()
    );
    assert_eq!(echo.hits(), 8, "every request reached the live upstream");
}
