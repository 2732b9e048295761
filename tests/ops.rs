// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

// Operations against the real binary: health and readiness (ready only
// once serving), SIGTERM during a stream (it finishes, then exit 0) and a
// graceful upgrade that loses no request. The audit log and metrics have
// files of their own (`audit_log.rs`, `metrics.rs`).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

// ---------------------------------------------------------------------------
// Keys and config
// ---------------------------------------------------------------------------

/// Granted `chat` (the only route's service).
const ANN_KEY: &str = "sk-test-SECRET-abc123";
/// Granted `tts` only: a 403 on `/chat/`.
const BOB_KEY: &str = "sk-test-SECRET-bob456";

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
// Health and readiness
// ---------------------------------------------------------------------------

#[test]
fn healthz_and_readyz_and_ready_only_once_serving() {
    let echo = EchoServer::start();
    let port = free_port();
    let admin = loopback(free_port());
    let files = GatewayFiles::write(
        config(echo.addr).listen(loopback(port)).admin_listen(admin),
        keys(),
    );
    let mut gw = Gateway::spawn(files, port);
    let main = gw.addr();

    let accepts =
        |addr: SocketAddr| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();

    // A 200 is allowed only once the main listener accepts: checked right
    // after each answer (a listener, once up, stays up).
    let mut not_ready_seen = 0;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        assert!(gw.is_running(), "gateway exited:\n{}", gw.log());
        let answer = readyz_status(admin);
        let main_up = accepts(main);
        match answer {
            Some(200) => {
                assert!(
                    main_up,
                    "/readyz said 200 while the main listener refused connections"
                );
                break;
            }
            Some(503) | None => not_ready_seen += 1,
            Some(other) => panic!("/readyz answered {other}"),
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", gw.log());
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        not_ready_seen > 0,
        "the first probe, right after spawn, cannot have been ready"
    );

    let ready = try_send(admin, "GET", "/readyz", &[], b"").unwrap();
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready", "{}", ready.text());
    assert_eq!(ready.json()["generation"], 1, "{}", ready.text());

    let health = try_send(admin, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(health.header("content-type"), Some("application/json"));
    assert_eq!(health.json(), serde_json::json!({"status": "ok"}));

    let missing = try_send(admin, "GET", "/nope", &[], b"").unwrap();
    assert_eq!(missing.status, 404, "{}", missing.text());

    // And the gateway does serve.
    let r = send(gw.addr(), "GET", "/chat/x", &[("X-API-Key", ANN_KEY)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------
// SIGTERM during a stream
// ---------------------------------------------------------------------------

#[test]
fn sigterm_lets_a_stream_finish_then_exits_0() {
    const CHUNKS: usize = 8;
    let stream = StreamServer::start(CHUNKS, Duration::from_millis(300));
    let mut gw = Gateway::start(
        &config(stream.addr).shutdown_grace("30s").with_admin(),
        keys(),
    );
    let addr = gw.addr();

    let agent = agent();
    let resp = agent
        .post(gw.url("/chat/api/generate"))
        .header("X-API-Key", ANN_KEY)
        .send(r#"{"prompt":"slow"}"#)
        .expect("start the stream");
    assert_eq!(resp.status(), 200);
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).expect("first line");
    assert_eq!(first, stream.format.chunk(0, CHUNKS));

    let term_at = Instant::now();
    gw.signal("TERM");
    let rest = thread::spawn(move || {
        let lines = read_lines_timed(reader);
        (lines, Instant::now())
    });

    // While the stream is still running, new connections are refused.
    let refused_at = poll(
        Duration::from_secs(5),
        "the listener to close after SIGTERM",
        || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                .is_err()
                .then(Instant::now)
        },
    );

    let ready = readyz_status(gw.admin());
    assert_ne!(ready, Some(200), "/readyz is 200 while shutting down");
    let still_streaming = !rest.is_finished();

    let (lines, done_at) = rest.join().expect("stream reader thread");
    let mut got = vec![first.trim_end().to_string()];
    got.extend(lines.into_iter().map(|(l, _)| l));
    let want: Vec<String> = (0..CHUNKS)
        .map(|i| stream.format.chunk(i, CHUNKS).trim_end().to_string())
        .collect();
    assert_eq!(got, want, "the stream completed intact");
    let last: Value = serde_json::from_str(got.last().unwrap()).unwrap();
    assert_eq!(last["done"], true);
    assert!(
        refused_at < done_at && still_streaming,
        "the listener closed only after the stream ended"
    );

    let status = gw
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("still running 15 s after SIGTERM:\n{}", gw.log()));
    let exited_after = term_at.elapsed();
    assert!(status.success(), "exit status {status}:\n{}", gw.log());
    assert!(
        exited_after < Duration::from_secs(15),
        "exited {exited_after:?} after SIGTERM, not once the stream was done"
    );
    assert!(
        done_at.elapsed() < Duration::from_secs(10),
        "exit came long after the stream ended"
    );
}

// ---------------------------------------------------------------------------
// Graceful upgrade
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Outcome {
    at: Instant,
    result: Result<u16, String>,
}

#[test]
fn graceful_upgrade_loses_no_request() {
    let echo = EchoServer::start();
    let mut a = Gateway::start(
        &config(echo.addr).upgrade_sock("up.sock").with_admin(),
        keys(),
    );
    let admin = a.admin();
    let addr = a.addr();

    // The client: one request per new connection, every result kept.
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let client = {
        let (stop, outcomes) = (Arc::clone(&stop), Arc::clone(&outcomes));
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let result = try_send(addr, "GET", "/chat/ping", &[("X-API-Key", ANN_KEY)], b"")
                    .map(|r| r.status)
                    .map_err(|e| e.to_string());
                outcomes.lock().unwrap().push(Outcome {
                    at: Instant::now(),
                    result,
                });
                thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let count = || outcomes.lock().unwrap().len();
    poll(
        Duration::from_secs(10),
        "the client loop to get going",
        || (count() >= 10).then_some(()),
    );

    let sock = a.dir.path().join("up.sock");
    let mut b = Upgraded::spawn(&a.config_path, a.dir.path());
    b.wait_log("Bootstrap starting", Duration::from_secs(10));
    poll(Duration::from_secs(5), "B to create up.sock", || {
        sock.exists().then_some(())
    });
    a.signal("QUIT");
    b.wait_log("Bootstrap done", Duration::from_secs(10));
    b.wait_log("Starting service: ai-gateway", Duration::from_secs(10));

    // A waits 5 s after handing over, then drains (idle) and exits.
    let status = a
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("old gateway still running:\n{}", a.log()));
    let a_exited = Instant::now();
    assert!(status.success(), "old gateway exit {status}:\n{}", a.log());

    let at_exit = count();
    poll(
        Duration::from_secs(15),
        "requests after the old gateway exited",
        || {
            (count() >= at_exit + 30 && a_exited.elapsed() > Duration::from_millis(1500))
                .then_some(())
        },
    );
    stop.store(true, Ordering::SeqCst);
    client.join().expect("client thread");

    let outcomes = outcomes.lock().unwrap();
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| o.result != Ok(200)).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the upgrade: {failures:?}\nold log:\n{}",
        failures.len(),
        outcomes.len(),
        a.log()
    );
    assert!(outcomes.len() > 50, "only {} requests made", outcomes.len());
    let after = outcomes.iter().filter(|o| o.at > a_exited).count();
    assert!(after >= 30, "{after} requests after the old gateway exited");

    // Those were served by B: it is alive and counted them.
    assert!(
        b.child.try_wait().unwrap().is_none(),
        "the new gateway died:\n{}",
        b.log()
    );
    let (_, samples) = scrape(admin);
    let served = series_value(
        &samples,
        "agw_requests_total",
        &[("route", "chat"), ("status", "200")],
    )
    .unwrap_or(0.0);
    assert!(
        served >= after as f64,
        "the new gateway served {served} requests, fewer than the {after} made after the old one exited"
    );
    assert!(a.log().contains("listener sockets sent"), "{}", a.log());
}
