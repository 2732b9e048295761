//! Reloads (SIGHUP) and process lifecycle (SIGTERM, start-up failures),
//! against the real binary.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use common::*;

/// Generous bound for anything the gateway should do "soon".
const SOON: Duration = Duration::from_secs(15);

const KEY_A: &str = "reload-key-a-0001";
const KEY_B: &str = "reload-key-b-0002";

fn keys_with(key: &str, user: &str) -> KeyFile {
    KeyFile::of([Key::new(key, user).services(["chat", "tts"])])
}

/// The config: `/chat/` to `chat_upstream`. File watching is off, so
/// SIGHUP is the only reload trigger and every reload log line is ours.
fn config(chat_upstream: SocketAddr) -> GatewayConfig {
    GatewayConfig::new()
        .threads(2)
        .watch(false)
        .route(Route::chat(chat_upstream))
}

fn status(gw: &Gateway, path: &str, key: &str) -> u16 {
    agent()
        .get(gw.url(path))
        .header("X-API-Key", key)
        .call()
        .expect("request")
        .status()
        .as_u16()
}

/// Starts a slow NDJSON stream through the gateway and returns the body
/// reader after its first line has arrived, with that line.
fn start_stream(gw: &Gateway, key: &str) -> (BufReader<ureq::BodyReader<'static>>, String) {
    let resp = agent()
        .post(gw.url("/chat/api/generate"))
        .header("X-API-Key", key)
        .send(r#"{"model":"test"}"#)
        .expect("start the stream");
    assert_eq!(resp.status(), 200);
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).expect("read the first line");
    (reader, first.trim_end().to_string())
}

/// Reads the rest of a stream and checks that, with `first`, it is exactly
/// what the streamer sent.
fn finish_stream(reader: BufReader<ureq::BodyReader<'static>>, first: String, s: &StreamServer) {
    let mut got = vec![first];
    got.extend(read_lines_timed(reader).into_iter().map(|(l, _)| l));
    let expected: Vec<String> = (0..s.chunks)
        .map(|i| s.format.chunk(i, s.chunks).trim_end().to_string())
        .collect();
    assert_eq!(got, expected);
    assert!(s.records().last().is_some_and(|r| r.completed));
    assert_eq!(s.aborted(), 0);
}

// ---------------------------------------------------------------------------
// SIGHUP
// ---------------------------------------------------------------------------

#[test]
fn sighup_adds_and_revokes_keys() {
    let echo = EchoServer::start();
    let gw = Gateway::start(&config(echo.addr), keys_with(KEY_A, "a"));
    assert_eq!(status(&gw, "/chat/x", KEY_A), 200);
    assert_eq!(status(&gw, "/chat/x", KEY_B), 401);

    gw.write_keys(keys_with(KEY_B, "b"));
    gw.signal("HUP");
    assert!(
        gw.wait_log_contains("reload (SIGHUP): generation 2", SOON),
        "no reload line; log:\n{}",
        gw.log()
    );
    assert!(
        wait_until(SOON, || status(&gw, "/chat/x", KEY_B) == 200),
        "the new key never worked"
    );
    assert_eq!(
        status(&gw, "/chat/x", KEY_A),
        401,
        "the old key was not revoked"
    );
    let last = echo.last_request().expect("requests reached the upstream");
    assert_eq!(last.head.header("x-gateway-user"), Some("b"));
}

#[test]
fn broken_key_file_on_sighup_keeps_old_keys() {
    let echo = EchoServer::start();
    let mut gw = Gateway::start(&config(echo.addr), keys_with(KEY_A, "a"));
    gw.write_keys(format!(
        "{{\n  \"{KEY_B}\": {{\"user\": \"b\", \"service\": \"chat\"}},\n  oops\n}}\n"
    ));
    gw.signal("HUP");
    assert!(
        gw.wait_log_contains("reload (SIGHUP) failed", SOON),
        "no failure line; log:\n{}",
        gw.log()
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("reload (SIGHUP) failed"))
        .expect("failure line");
    assert!(line.contains("keys.json:3:"), "no file:line in {line:?}");
    assert!(line.contains("generation 1"), "{line}");
    assert!(
        !log.contains(KEY_A) && !log.contains(KEY_B),
        "log leaks a key"
    );
    assert_eq!(status(&gw, "/chat/x", KEY_A), 200);
    assert_eq!(status(&gw, "/chat/x", KEY_B), 401);
    assert!(gw.is_running());

    // Fixing the file and reloading again works: generation 2, not 3.
    gw.write_keys(keys_with(KEY_B, "b"));
    gw.signal("HUP");
    assert!(gw.wait_log_contains("generation 2,", SOON), "{}", gw.log());
    assert!(wait_until(SOON, || status(&gw, "/chat/x", KEY_B) == 200));
}

#[test]
fn broken_config_on_sighup_keeps_everything() {
    let echo = EchoServer::start();
    let mut gw = Gateway::start(&config(echo.addr), keys_with(KEY_A, "a"));
    let good = std::fs::read_to_string(&gw.config_path).expect("read config");
    let broken = good.replace("\"strip_prefix\": true", "\"strip_prefx\": true");
    assert_ne!(good, broken);
    gw.write_config(&broken);
    // The key file changes too: a failed reload must not take it either.
    gw.write_keys(keys_with(KEY_B, "b"));
    gw.signal("HUP");
    assert!(
        gw.wait_log_contains("reload (SIGHUP) failed", SOON),
        "no failure line; log:\n{}",
        gw.log()
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("reload (SIGHUP) failed"))
        .expect("failure line");
    assert!(line.contains("gateway.yaml:"), "{line}");
    assert!(line.contains("strip_prefx"), "{line}");
    assert!(gw.is_running());
    assert_eq!(status(&gw, "/chat/x", KEY_A), 200);
    assert_eq!(status(&gw, "/chat/x", KEY_B), 401);
    // The route still strips its prefix: the old config is in effect.
    let last = echo.last_request().expect("request reached the upstream");
    assert_eq!(last.head.target, "/x");
}

#[test]
fn route_added_on_sighup_serves() {
    let chat = EchoServer::start();
    let tts = EchoServer::start();
    let gw = Gateway::start(&config(chat.addr), keys_with(KEY_A, "a"));
    assert_eq!(status(&gw, "/tts/speak", KEY_A), 404);

    gw.write_config(
        gw.config()
            .clone()
            .route(Route::stripped("tts", "/tts/", "tts", tts.addr)),
    );
    gw.signal("HUP");
    assert!(
        gw.wait_log_contains("generation 2, 2 routes,", SOON),
        "{}",
        gw.log()
    );
    assert!(wait_until(SOON, || status(&gw, "/tts/speak", KEY_A) == 200));
    let last = tts
        .last_request()
        .expect("the new route reached its upstream");
    assert_eq!(last.head.target, "/speak");
    assert_eq!(status(&gw, "/chat/x", KEY_A), 200);
    assert_eq!(chat.requests().len(), 1);
}

#[test]
fn listen_change_on_sighup_needs_a_restart() {
    let echo = EchoServer::start();
    let gw = Gateway::start(&config(echo.addr), keys_with(KEY_A, "a"));
    let other = free_port();
    gw.write_config(config(echo.addr).listen(loopback(other)));
    gw.signal("HUP");
    assert!(
        gw.wait_log_contains("needs a restart", SOON),
        "{}",
        gw.log()
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("needs a restart"))
        .expect("restart line");
    assert!(line.contains("listen"), "{line}");
    assert!(gw.wait_log_contains("generation 2", SOON), "{log}");
    // Still serving on the old address.
    assert_eq!(status(&gw, "/chat/x", KEY_A), 200);
}

#[test]
fn request_in_flight_finishes_on_its_snapshot() {
    let streamer = StreamServer::start(8, Duration::from_millis(300));
    let gw = Gateway::start(&config(streamer.addr), keys_with(KEY_A, "a"));
    let (reader, first) = start_stream(&gw, KEY_A);

    gw.write_keys(keys_with(KEY_B, "b"));
    gw.signal("HUP");
    assert!(
        gw.wait_log_contains("reload (SIGHUP): generation 2", SOON),
        "{}",
        gw.log()
    );
    assert!(
        streamer.last_chunk_written_at().is_none(),
        "the stream finished before the reload; the test proves nothing"
    );
    finish_stream(reader, first, &streamer);
    // The reload did take effect for new requests.
    assert!(wait_until(SOON, || status(&gw, "/chat/x", KEY_A) == 401));
}

/// Sends SIGHUP the moment the process has a handler for it (SigCgt in
/// /proc), which `main` installs before it does anything else: before the
/// config is read, before logging, before Pingora starts. The only window
/// left is between exec and `main`, which no program can close.
#[test]
fn sighup_as_soon_as_caught_does_not_kill() {
    let echo = EchoServer::start();
    let port = free_port();
    let files = GatewayFiles::write(
        config(echo.addr).listen(loopback(port)),
        keys_with(KEY_A, "a"),
    );
    let mut gw = Gateway::spawn(files, port);
    let catches_hup = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("SigCgt:").map(|v| v.trim().to_string()))
            })
            .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
            // SIGHUP is signal 1: bit 0 of the mask.
            .is_some_and(|mask| mask & 1 != 0)
    };
    let pid = gw.pid();
    assert!(
        wait_until(SOON, || catches_hup(pid)),
        "the gateway never installed a SIGHUP handler"
    );
    gw.signal("HUP");
    if let Err(msg) = gw.wait_ready(READY_TIMEOUT) {
        panic!("{msg}");
    }
    assert!(gw.is_running());
    assert_eq!(status(&gw, "/chat/x", KEY_A), 200);
}

/// SIGHUP once the gateway has started loading (its first log line), while
/// it is still setting up its listeners: queued, then handled as a reload.
#[test]
fn sighup_during_startup_does_not_kill() {
    let echo = EchoServer::start();
    let port = free_port();
    let files = GatewayFiles::write(
        config(echo.addr).listen(loopback(port)),
        keys_with(KEY_A, "a"),
    );
    let mut gw = Gateway::spawn(files, port);
    assert!(
        wait_until(SOON, || !gw.log().is_empty()),
        "no log line from the gateway"
    );
    gw.signal("HUP");
    if let Err(msg) = gw.wait_ready(READY_TIMEOUT) {
        panic!("{msg}");
    }
    assert!(
        gw.wait_log_contains("reload (SIGHUP): generation 2", SOON),
        "{}",
        gw.log()
    );
    assert!(gw.is_running());
    assert_eq!(status(&gw, "/chat/x", KEY_A), 200);
}

// ---------------------------------------------------------------------------
// SIGTERM and start-up failures
// ---------------------------------------------------------------------------

/// A config with a 30 s shutdown grace, so an exit well within that shows
/// the gateway did not wait the grace out.
fn config_30s(upstream: SocketAddr) -> GatewayConfig {
    config(upstream).shutdown_grace("30s")
}

#[test]
fn sigterm_when_idle_exits_0_without_waiting_the_grace() {
    let echo = EchoServer::start();
    let mut gw = Gateway::start(&config_30s(echo.addr), keys_with(KEY_A, "a"));
    assert_eq!(status(&gw, "/chat/x", KEY_A), 200);
    gw.signal("TERM");
    let exit = gw.wait_exit(Duration::from_secs(10));
    let exit = exit.unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", gw.log()));
    assert!(exit.success(), "exit status {exit}; log:\n{}", gw.log());
}

#[test]
fn sigterm_during_stream_lets_it_finish_then_exits_0() {
    let streamer = StreamServer::start(6, Duration::from_millis(300));
    let mut gw = Gateway::start(&config_30s(streamer.addr), keys_with(KEY_A, "a"));
    let (mut reader, first) = start_stream(&gw, KEY_A);
    gw.signal("TERM");
    let mut second = String::new();
    reader.read_line(&mut second).expect("read after SIGTERM");
    assert!(gw.is_running(), "exited with a stream in flight");
    assert!(streamer.last_chunk_written_at().is_none());

    let mut got = vec![first, second.trim_end().to_string()];
    got.extend(read_lines_timed(reader).into_iter().map(|(l, _)| l));
    let expected = streamer.expected_lines();
    assert_eq!(got, expected);
    assert_eq!(streamer.aborted(), 0);

    let exit = gw
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after the stream ended:\n{}", gw.log()));
    assert!(exit.success(), "exit status {exit}; log:\n{}", gw.log());
}

#[test]
fn unbindable_listen_address_exits_non_zero() {
    let echo = EchoServer::start();
    let held = TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let port = held.local_addr().expect("local addr").port();
    let files = GatewayFiles::write(
        config(echo.addr).listen(loopback(port)),
        keys_with(KEY_A, "a"),
    );
    let mut gw = Gateway::spawn(files, port);
    let exit = gw
        .wait_exit(SOON)
        .unwrap_or_else(|| panic!("still running with its port taken:\n{}", gw.log()));
    assert!(!exit.success(), "exit status {exit}");
    let log = gw.log();
    assert!(log.contains("cannot listen"), "{log}");
    assert!(log.contains(&format!("127.0.0.1:{port}")), "{log}");
    drop(held);
}
