//! Slow clients and the connection cap, against the real binary on
//! loopback with raw sockets: `client_header_timeout` (trickled, silent and
//! blank-line heads, first and later requests), `client_idle_timeout`,
//! `client_body_timeout` (a slow body passes, a stalled one ends), and
//! `max_connections` (refusal at once, the open connections unharmed, the
//! gauge back to 0), each counted in `/metrics` and none logged; and the
//! limits taking effect on reload.
//!
//! Waits are polls with deadlines; the fixed pauses are the slowness under
//! test (a byte every 500 ms, a 3 s gap between requests).

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const KEY: &str = "slow-clients-key-0001";
fn keys() -> KeyFile {
    KeyFile::of([Key::new(KEY, "slow").service("chat")])
}

/// The pace of a trickling client.
const TRICKLE: Duration = Duration::from_millis(500);

/// A gateway with an admin listener (see [`config`]).
struct Setup {
    gw: Gateway,
    admin: SocketAddr,
}

/// Two threads, an admin listener and one route to `upstream`; the test
/// adds its settings.
fn config(upstream: SocketAddr) -> GatewayConfig {
    GatewayConfig::new()
        .threads(2)
        .with_admin()
        .route(Route::chat(upstream))
}

fn start(config: GatewayConfig) -> Setup {
    let gw = Gateway::start(&config, keys());
    let admin = gw.admin();
    assert!(
        wait_until(Duration::from_secs(10), || try_metric(
            admin,
            "agw_client_connections"
        )
        .is_some()),
        "the admin listener answers"
    );
    Setup { gw, admin }
}

/// The value of one series (`name` with its labels written as in the
/// exposition, e.g. `agw_client_timeouts_total{kind="header"}`), if the
/// admin listener answers.
fn try_metric(admin: SocketAddr, series: &str) -> Option<f64> {
    sample(&metrics_text(admin), series)
}

fn metric(admin: SocketAddr, series: &str) -> f64 {
    try_metric(admin, series).unwrap_or_else(|| panic!("{series} is not exported"))
}

fn timeouts(admin: SocketAddr, kind: &str) -> f64 {
    metric(
        admin,
        &format!("agw_client_timeouts_total{{kind=\"{kind}\"}}"),
    )
}

/// Polls until `series` equals `want`; panics with the last value.
fn wait_metric(admin: SocketAddr, series: &str, want: f64) {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(10), || {
        last = try_metric(admin, series);
        last == Some(want)
    });
    assert!(ok, "{series} is {last:?}, want {want}");
}

/// A keyed GET of `/chat/<path>`, keep-alive.
fn get(path: &str) -> String {
    format!("GET /chat/{path} HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\n\r\n")
}

/// A raw keep-alive client connection.
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
    connected: Instant,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let w = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        let connected = Instant::now();
        w.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let r = BufReader::new(w.try_clone().expect("clone the socket"));
        Client { w, r, connected }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).expect("send");
    }

    /// Sends a request and reads its response.
    fn request(&mut self, req: &str) -> RawResponse {
        self.send(req.as_bytes());
        read_response(&mut self.r).expect("a response")
    }

    /// Waits until the gateway closes the connection, sending `byte` every
    /// [`TRICKLE`] until then (nothing when `None`); how long that took
    /// since `since`. Panics if it is still open after 10 s.
    fn trickle_until_closed(&mut self, byte: Option<u8>, since: Instant) -> Duration {
        self.r
            .get_ref()
            .set_read_timeout(Some(TRICKLE))
            .expect("read timeout");
        let deadline = since + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.r.fill_buf() {
                Ok([]) => return since.elapsed(),
                Ok(data) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(data)),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if let Some(b) = byte {
                        if self.w.write_all(&[b]).is_err() {
                            return since.elapsed();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return since.elapsed(),
            }
        }
        panic!("the connection is still open after 10 s");
    }

    /// Whether the gateway has closed the connection (checked without
    /// waiting long).
    fn is_closed(&mut self) -> bool {
        self.r
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let closed = match self.r.fill_buf() {
            Ok(data) => data.is_empty(),
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        };
        self.r
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        closed
    }
}

/// `elapsed` is within `[at, at + 1 s)`.
fn assert_closed_at(what: &str, elapsed: Duration, at: Duration) {
    eprintln!("{what}: closed after {elapsed:?} (timeout {at:?})");
    assert!(
        elapsed >= at && elapsed < at + Duration::from_secs(1),
        "{what}: closed after {elapsed:?}, expected between {at:?} and {:?}",
        at + Duration::from_secs(1)
    );
}

/// No line was logged for a client timeout or a refused connection.
fn assert_nothing_logged_per_connection(gw: &Gateway) {
    let log = gw.log();
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Fail to proxy") || l.contains("ERROR"))
        .collect();
    assert!(
        noisy.is_empty(),
        "logged per connection:\n{}",
        noisy.join("\n")
    );
}

// ---------------------------------------------------------------------------
// client_header_timeout
// ---------------------------------------------------------------------------

#[test]
fn a_trickled_head_is_closed_at_the_header_timeout() {
    let echo = EchoServer::start();
    let s = start(config(echo.addr).client_header_timeout("2s"));
    let before = timeouts(s.admin, "header");
    let mut c = Client::connect(s.gw.addr());
    c.send(b"GET /chat/x HTTP/1.1\r\n");
    let took = c.trickle_until_closed(Some(b'X'), c.connected);
    assert_closed_at(
        "a head trickled a byte every 500 ms",
        took,
        Duration::from_secs(2),
    );
    wait_metric(
        s.admin,
        r#"agw_client_timeouts_total{kind="header"}"#,
        before + 1.0,
    );
    assert_eq!(timeouts(s.admin, "idle"), 0.0);
    assert_eq!(echo.hits(), 0, "nothing went upstream");
    assert_nothing_logged_per_connection(&s.gw);
}

#[test]
fn a_silent_client_is_closed_at_the_header_timeout() {
    let echo = EchoServer::start();
    let s = start(config(echo.addr).client_header_timeout("2s"));
    let mut c = Client::connect(s.gw.addr());
    let took = c.trickle_until_closed(None, c.connected);
    assert_closed_at("a client that sends nothing", took, Duration::from_secs(2));
    wait_metric(s.admin, r#"agw_client_timeouts_total{kind="header"}"#, 1.0);
    assert_nothing_logged_per_connection(&s.gw);
}

/// Blank lines before a request line are skipped by the parser; they must
/// not pass for a complete head and stop the clock.
#[test]
fn blank_lines_before_the_head_do_not_stop_the_clock() {
    let echo = EchoServer::start();
    let s = start(config(echo.addr).client_header_timeout("2s"));
    let mut c = Client::connect(s.gw.addr());
    c.send(b"\r\n\r\n");
    let took = c.trickle_until_closed(Some(b'\n'), c.connected);
    assert_closed_at(
        "\\r\\n\\r\\n, then a newline every 500 ms",
        took,
        Duration::from_secs(2),
    );
    let mut c = Client::connect(s.gw.addr());
    c.send(b"\r\n\r\nGET /chat/x HTTP/1.1\r\n");
    let took = c.trickle_until_closed(Some(b'Y'), c.connected);
    assert_closed_at(
        "\\r\\n\\r\\n, then a trickled head",
        took,
        Duration::from_secs(2),
    );
    wait_metric(s.admin, r#"agw_client_timeouts_total{kind="header"}"#, 2.0);
    assert_eq!(echo.hits(), 0);
    assert_nothing_logged_per_connection(&s.gw);
}

// ---------------------------------------------------------------------------
// Keep-alive: client_idle_timeout, and the head clock of later requests
// ---------------------------------------------------------------------------

/// An idle gap longer than the header timeout but shorter than the idle
/// timeout: the second request on the connection is served.
#[test]
fn a_keep_alive_connection_waits_the_idle_timeout_not_the_header_timeout() {
    let echo = EchoServer::start();
    let s = start(
        config(echo.addr)
            .client_header_timeout("2s")
            .client_idle_timeout("10s"),
    );
    let mut c = Client::connect(s.gw.addr());
    assert_eq!(c.request(&get("one")).status, 200);
    thread::sleep(Duration::from_secs(3));
    assert!(!c.is_closed(), "closed during a 3 s gap");
    assert_eq!(c.request(&get("two")).status, 200, "the second request");
    let paths: Vec<String> = echo.requests().into_iter().map(|r| r.head.target).collect();
    assert_eq!(paths, ["/one", "/two"]);
    assert_eq!(timeouts(s.admin, "header"), 0.0);
    assert_eq!(timeouts(s.admin, "idle"), 0.0);
}

/// A later request's head has its own clock, started by its first byte.
#[test]
fn a_second_head_trickled_is_closed_at_the_header_timeout_from_its_first_byte() {
    let echo = EchoServer::start();
    let s = start(
        config(echo.addr)
            .client_header_timeout("2s")
            .client_idle_timeout("10s"),
    );
    let mut c = Client::connect(s.gw.addr());
    assert_eq!(c.request(&get("one")).status, 200);
    // Past the first head's deadline, so only a fresh clock can apply.
    thread::sleep(Duration::from_millis(2500));
    c.send(b"G");
    let first_byte = Instant::now();
    let took = c.trickle_until_closed(Some(b'E'), first_byte);
    assert_closed_at("a second head trickled", took, Duration::from_secs(2));
    wait_metric(s.admin, r#"agw_client_timeouts_total{kind="header"}"#, 1.0);
    assert_eq!(timeouts(s.admin, "idle"), 0.0);
    assert_eq!(echo.hits(), 1, "only the first request went upstream");
    assert_nothing_logged_per_connection(&s.gw);
}

#[test]
fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    let echo = EchoServer::start();
    let s = start(config(echo.addr).client_idle_timeout("1s"));
    let mut c = Client::connect(s.gw.addr());
    assert_eq!(c.request(&get("one")).status, 200);
    let served = Instant::now();
    let took = c.trickle_until_closed(None, served);
    assert_closed_at(
        "an idle keep-alive connection",
        took,
        Duration::from_secs(1),
    );
    wait_metric(s.admin, r#"agw_client_timeouts_total{kind="idle"}"#, 1.0);
    assert_eq!(timeouts(s.admin, "header"), 0.0);
    wait_metric(s.admin, "agw_client_connections", 0.0);
}

// ---------------------------------------------------------------------------
// client_body_timeout
// ---------------------------------------------------------------------------

/// The head clock stops when the head is in: a body slower than the header
/// timeout, but whose every read comes within the body timeout, is
/// proxied whole.
#[test]
fn a_slow_body_is_proxied_intact() {
    let echo = EchoServer::start();
    let s = start(
        config(echo.addr)
            .client_header_timeout("2s")
            .client_body_timeout("2s"),
    );
    let mut c = Client::connect(s.gw.addr());
    c.send(
        format!("POST /chat/upload HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\nContent-Length: 10\r\n\r\n")
            .as_bytes(),
    );
    let body = b"0123456789";
    for b in body {
        thread::sleep(TRICKLE);
        c.send(&[*b]);
    }
    let resp = read_response(&mut c.r).expect("a response");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        c.connected.elapsed() > Duration::from_secs(4),
        "the body took 5 s"
    );
    let got = echo.last_request().expect("the upstream got the request");
    assert_eq!(got.body_len, 10);
    assert_eq!(got.body_sha256, sha256_hex(body));
    assert_eq!(resp.json()["body_sha256"], sha256_hex(body));
    assert_eq!(timeouts(s.admin, "header"), 0.0);
    assert_eq!(timeouts(s.admin, "body"), 0.0);
}

#[test]
fn a_stalled_body_ends_the_request_with_408() {
    let echo = EchoServer::start();
    let s = start(
        config(echo.addr)
            .client_body_timeout("1s")
            .audit_log("audit.log"),
    );
    let mut c = Client::connect(s.gw.addr());
    c.send(
        format!("POST /chat/upload HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\nContent-Length: 10\r\n\r\nabc")
            .as_bytes(),
    );
    let sent = Instant::now();
    let resp = read_response(&mut c.r).expect("a response");
    let took = sent.elapsed();
    assert_eq!(resp.status, 408, "{}", resp.text());
    assert_eq!(resp.json()["error"], "request body timed out");
    assert_closed_at("a stalled body's answer", took, Duration::from_secs(1));
    assert!(c.is_closed(), "the connection is closed after the 408");
    wait_metric(s.admin, r#"agw_client_timeouts_total{kind="body"}"#, 1.0);
    assert!(
        echo.requests().is_empty(),
        "no complete request went upstream"
    );
    let audit = s.gw.dir.path().join("audit.log");
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(&audit)
            .is_ok_and(
                |a| a.contains(r#""decision":"client_timeout""#) && a.contains(r#""status":408"#)
            )),
        "audited: {:?}",
        std::fs::read_to_string(&audit)
    );
    assert_nothing_logged_per_connection(&s.gw);
}

// ---------------------------------------------------------------------------
// max_connections
// ---------------------------------------------------------------------------

/// How a connection over the cap ended: a 503 or a close.
fn refused_quickly(addr: SocketAddr) -> Duration {
    let mut c = Client::connect(addr);
    let _ = c.w.write_all(get("over").as_bytes());
    let mut bytes = Vec::new();
    let _ = c.r.read_to_end(&mut bytes);
    let took = c.connected.elapsed();
    let text = String::from_utf8_lossy(&bytes);
    eprintln!(
        "over the cap: {} after {took:?}",
        if text.is_empty() { "closed" } else { "503" }
    );
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 503 "),
        "over the cap: {text:?}"
    );
    if !text.is_empty() {
        assert!(text.contains("Connection: close"), "{text}");
        assert!(
            text.ends_with(r#"{"error":"too many connections"}"#),
            "{text}"
        );
    }
    took
}

#[test]
fn one_connection_over_max_connections_is_refused_and_the_others_keep_working() {
    let echo = EchoServer::start();
    let s = start(
        config(echo.addr)
            .max_connections(3)
            .client_header_timeout("1s"),
    );
    // Readiness probes may still be closing.
    wait_metric(s.admin, "agw_client_connections", 0.0);
    let mut open: Vec<Client> = (0..3).map(|_| Client::connect(s.gw.addr())).collect();
    for (i, c) in open.iter_mut().enumerate() {
        assert_eq!(c.request(&get(&format!("first/{i}"))).status, 200);
    }
    wait_metric(s.admin, "agw_client_connections", 3.0);

    for _ in 0..2 {
        let took = refused_quickly(s.gw.addr());
        assert!(took < Duration::from_millis(100), "refused after {took:?}");
    }
    wait_metric(s.admin, "agw_client_connections_refused_total", 2.0);
    for (i, c) in open.iter_mut().enumerate() {
        assert_eq!(
            c.request(&get(&format!("again/{i}"))).status,
            200,
            "connection {i} still serves"
        );
    }

    // Closing one lets a new one in.
    drop(open.remove(0));
    let mut newcomer = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let mut c = Client::connect(s.gw.addr());
            let _ = c.w.write_all(get("newcomer").as_bytes());
            match read_response(&mut c.r) {
                Ok(r) if r.status == 200 => {
                    newcomer = Some(c);
                    true
                }
                _ => false,
            }
        }),
        "no new connection after one closed"
    );
    assert_eq!(metric(s.admin, "agw_client_connections"), 3.0);

    // A connection that times out gives its slot back too.
    drop(newcomer);
    wait_metric(s.admin, "agw_client_connections", 2.0);
    let mut silent = Client::connect(s.gw.addr());
    let took = silent.trickle_until_closed(None, silent.connected);
    assert_closed_at("a silent connection", took, Duration::from_secs(1));
    drop(open);
    wait_metric(s.admin, "agw_client_connections", 0.0);
    assert!(metric(s.admin, "agw_client_connections_refused_total") >= 2.0);
    assert_eq!(timeouts(s.admin, "header"), 1.0);
    // Refusals are counted, and the log has at most the one warning.
    let log = s.gw.log();
    assert_eq!(
        log.matches("max_connections (3) reached").count(),
        1,
        "{log}"
    );
    assert_nothing_logged_per_connection(&s.gw);
}

// ---------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------

#[test]
fn a_reload_applies_the_cap_and_the_timeouts_to_new_connections() {
    let echo = EchoServer::start();
    let s = start(
        config(echo.addr)
            .max_connections(1)
            .client_header_timeout("5s"),
    );
    wait_metric(s.admin, "agw_client_connections", 0.0);
    let mut held = Client::connect(s.gw.addr());
    assert_eq!(held.request(&get("held")).status, 200);
    let took = refused_quickly(s.gw.addr());
    assert!(took < Duration::from_millis(100), "refused after {took:?}");

    s.gw.write_config(
        s.gw.config()
            .clone()
            .max_connections(2)
            .client_header_timeout("1s"),
    );
    assert!(
        s.gw.wait_log_contains("generation 2", Duration::from_secs(10)),
        "reloaded:\n{}",
        s.gw.log()
    );
    // The cap of 2 lets a second connection in beside the held one, and
    // the new header timeout closes it when it sends nothing.
    let mut second = Client::connect(s.gw.addr());
    let took = second.trickle_until_closed(None, second.connected);
    assert_closed_at(
        "a silent connection after the reload",
        took,
        Duration::from_secs(1),
    );
    assert_eq!(held.request(&get("held/again")).status, 200);
    wait_metric(s.admin, r#"agw_client_timeouts_total{kind="header"}"#, 1.0);
}
