//! HTTPS against the real binary: TLS listeners with certificates made
//! here (rcgen), HTTP/2 by ALPN, certificates swapped on reload while a
//! stream goes on, `check` on bad certificates, the redirect listener, and
//! upstreams reached over TLS.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::tls::*;
use common::*;

const KEY: &str = "tls-test-key-0001";
fn keys() -> KeyFile {
    KeyFile::of([Key::new(KEY, "ann")
        .service("chat")
        .created_at("2025-06-01T18:58:30.356Z")])
}

/// A gateway with a plain listener (for the harness's readiness probe) and
/// a TLS listener using certificate files in `certs`.
struct Https {
    gw: Gateway,
    tls: SocketAddr,
    certs: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

/// Starts the gateway with `config` (settings and routes), a plain and a
/// TLS listener added.
fn start(leaf: &Leaf, config: GatewayConfig) -> Https {
    let certs = tempfile::tempdir().expect("cert dir");
    let cert = certs.path().join("cert.pem");
    let key = certs.path().join("key.pem");
    leaf.write(&cert, &key);
    let plain = free_port();
    let tls_port = free_port();
    let config = config
        .listen(loopback(plain))
        .listen_tls(loopback(tls_port), &cert, &key);
    let gw = Gateway::start(&config, keys());
    Https {
        gw,
        tls: SocketAddr::from(([127, 0, 0, 1], tls_port)),
        certs,
        cert,
        key,
    }
}

impl Https {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.tls.port())
    }

    /// curl's `--resolve` so `localhost` means the TLS listener.
    fn resolve(&self) -> String {
        format!("localhost:{}:127.0.0.1", self.tls.port())
    }
}

fn write_ca(dir: &tempfile::TempDir, ca: &TestCa) -> PathBuf {
    let p = dir.path().join("ca.pem");
    std::fs::write(&p, &ca.pem).expect("write CA");
    p
}

// ---------------------------------------------------------------------------
// Keys, headers and protocol versions over TLS
// ---------------------------------------------------------------------------

#[test]
fn keys_are_checked_over_tls() {
    let ca = TestCa::new("test CA");
    let echo = EchoServer::start();
    let h = start(
        &ca.leaf(&["localhost"], 1, 30),
        GatewayConfig::new().route(Route::chat(echo.addr)),
    );
    let tls_agent = https_agent(&ca.pem);

    let mut resp = tls_agent
        .post(h.url("/chat/api/generate"))
        .header("X-API-Key", KEY)
        .send(r#"{"model":"m"}"#)
        .expect("request over TLS");
    assert_eq!(resp.status(), 200);
    let json = body_json(&mut resp);
    assert_eq!(json["path"], "/api/generate");
    let headers = json["headers"].as_object().expect("headers");
    assert_eq!(headers["x-gateway-user"][0], "ann");
    assert_eq!(headers["x-forwarded-proto"][0], "https");
    assert!(!headers.contains_key("x-api-key"), "the key went upstream");

    let resp = tls_agent
        .post(h.url("/chat/api/generate"))
        .send("{}")
        .expect("request over TLS");
    assert_eq!(resp.status(), 401);

    // The plain listener still says http.
    let mut resp = agent()
        .post(h.gw.url("/chat/api/generate"))
        .header("X-API-Key", KEY)
        .send("{}")
        .expect("plain request");
    assert_eq!(
        body_json(&mut resp)["headers"]["x-forwarded-proto"][0],
        "http"
    );
}

/// A ClientHello offering exactly `version` (0x0302 = TLS 1.1, 0x0303 =
/// TLS 1.2), with ECDHE suites, groups and signature algorithms a TLS 1.2
/// server accepts.
fn client_hello(version: u16) -> Vec<u8> {
    let mut ext = Vec::new();
    let name = b"localhost";
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    for (kind, data) in [
        (0x0000u16, sni),
        (0x000a, vec![0, 4, 0, 0x1d, 0, 0x17]),
        (0x000b, vec![1, 0]),
        (0x000d, vec![0, 6, 4, 3, 8, 4, 4, 1]),
        (0xff01, vec![0]),
    ] {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(&data);
    }
    let mut hello = Vec::new();
    hello.extend_from_slice(&version.to_be_bytes());
    hello.extend_from_slice(&[7u8; 32]);
    hello.push(0);
    let suites: [u16; 5] = [0xc02b, 0xc02f, 0xc009, 0xc013, 0x002f];
    hello.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        hello.extend_from_slice(&s.to_be_bytes());
    }
    hello.extend_from_slice(&[1, 0]);
    hello.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    hello.extend_from_slice(&ext);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// The first record the server answers a ClientHello with: its content
/// type and the first bytes of its body.
fn first_record(addr: SocketAddr, hello: &[u8]) -> (u8, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(hello).expect("send ClientHello");
    let mut head = [0u8; 5];
    s.read_exact(&mut head)
        .expect("the server answers with a record");
    let len = u16::from_be_bytes([head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.min(64)];
    s.read_exact(&mut body).expect("record body");
    (head[0], body)
}

#[test]
fn tls_1_1_is_refused_and_1_2_accepted() {
    let ca = TestCa::new("test CA");
    let h = start(
        &ca.leaf(&["localhost"], 1, 30),
        GatewayConfig::new().route(Route::chat("127.0.0.1:9")),
    );
    // The same hello, offering TLS 1.2: a ServerHello (handshake record,
    // message type 2), so the hello itself is well formed.
    let (kind, body) = first_record(h.tls, &client_hello(0x0303));
    assert_eq!((kind, body[0]), (0x16, 2), "TLS 1.2 gets a ServerHello");
    // Offering TLS 1.1 only: a fatal alert (21), protocol_version (70).
    let (kind, body) = first_record(h.tls, &client_hello(0x0302));
    assert_eq!(
        kind, 0x15,
        "TLS 1.1 is answered with an alert, not a ServerHello"
    );
    assert_eq!(body, vec![2, 70], "fatal protocol_version alert");
}

// ---------------------------------------------------------------------------
// HTTP/2
// ---------------------------------------------------------------------------

#[test]
fn http2_is_negotiated_by_alpn_and_http1_otherwise() {
    let ca = TestCa::new("test CA");
    let h = start(
        &ca.leaf(&["localhost"], 1, 30),
        GatewayConfig::new().route(Route::chat("127.0.0.1:9")),
    );
    let t = tls_connect(h.tls, "localhost", &[&ca.pem], &[b"h2", b"http/1.1"]).unwrap();
    assert_eq!(t.conn.alpn_protocol(), Some(&b"h2"[..]));
    let t = tls_connect(h.tls, "localhost", &[&ca.pem], &[b"http/1.1"]).unwrap();
    assert_eq!(t.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let t = tls_connect(h.tls, "localhost", &[&ca.pem], &[]).unwrap();
    assert_eq!(t.conn.alpn_protocol(), None);
}

#[test]
fn http2_streams_ndjson_chunk_by_chunk_with_curl() {
    let ca = TestCa::new("test CA");
    let streamer = StreamServer::start(6, Duration::from_millis(300));
    let echo = EchoServer::start();
    let h = start(
        &ca.leaf(&["localhost"], 1, 30),
        GatewayConfig::new()
            .route(Route::chat(streamer.addr))
            .route(Route::stripped("echo", "/echo/", "chat", echo.addr)),
    );
    let ca_file = write_ca(&h.certs, &ca);

    // Without a key: 401 over HTTP/2.
    let out = curl()
        .args(["-s", "--http2", "--cacert"])
        .arg(&ca_file)
        .args([
            "--resolve",
            &h.resolve(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ])
        .arg(h.url("/echo/x"))
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401 2");

    // With a key: the credential is stripped over HTTP/2 too.
    let out = curl()
        .args(["-s", "--http2", "--cacert"])
        .arg(&ca_file)
        .args([
            "--resolve",
            &h.resolve(),
            "-H",
            &format!("X-API-Key: {KEY}"),
        ])
        .arg(h.url("/echo/x?q=1"))
        .output()
        .expect("run curl");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("echo JSON");
    assert_eq!(json["path"], "/x?q=1");
    assert_eq!(json["headers"]["x-forwarded-proto"][0], "https");
    assert!(json["headers"].get("x-api-key").is_none());

    // The NDJSON stream: each line arrives as the upstream writes it.
    let mut child = curl()
        .args(["-sN", "--http2", "--cacert"])
        .arg(&ca_file)
        .args([
            "--resolve",
            &h.resolve(),
            "-H",
            &format!("X-API-Key: {KEY}"),
            "-d",
            r#"{"model":"m"}"#,
            "-w",
            "http_version=%{http_version}\n",
        ])
        .arg(h.url("/chat/api/generate"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl");
    let lines = lines_timed(child.stdout.take().expect("curl stdout"));
    let _ = child.wait();
    let (version, body) = lines.split_last().expect("curl printed something");
    assert_eq!(version.0, "http_version=2");
    let got: Vec<&str> = body.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(got, streamer.expected_lines());
    let last_written = streamer.last_chunk_written_at().expect("the stream ended");
    assert!(
        body[0].1 < last_written,
        "the first line arrived only after the upstream wrote its last one: buffered"
    );
    let spread = body[body.len() - 1].1 - body[0].1;
    assert!(
        spread >= Duration::from_millis(1000),
        "lines arrived within {spread:?}, not spread over the stream"
    );
}

#[test]
fn limits_audit_and_timeouts_hold_over_http2() {
    let ca = TestCa::new("test CA");
    let echo = EchoServer::start();
    let admin = free_port();
    let h = start(
        &ca.leaf(&["localhost"], 1, 30),
        GatewayConfig::new()
            .client_header_timeout("1s")
            .max_connections(2)
            .admin_listen(admin)
            .audit_log("audit.log")
            .rate_limit("2/min")
            .route(Route::chat(echo.addr)),
    );
    let ca_file = write_ca(&h.certs, &ca);
    let curl_code = |version: &str| {
        let out = curl()
            .args(["-s", version, "--cacert"])
            .arg(&ca_file)
            .args([
                "--resolve",
                &h.resolve(),
                "-H",
                &format!("X-API-Key: {KEY}"),
            ])
            .args(["-o", "/dev/null", "-w", "%{http_code} %{http_version}"])
            .arg(h.url("/chat/x"))
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The per-key rate limit.
    let codes: Vec<String> = (0..3).map(|_| curl_code("--http2")).collect();
    assert_eq!(codes, ["200 2", "200 2", "429 2"]);

    // The audit line and the metrics of HTTP/2 requests.
    let audit = h.gw.dir.path().join("audit.log");
    // (The harness's readiness probe has a line of its own.)
    let chat_lines = || -> Vec<serde_json::Value> {
        audit_lines(&audit)
            .into_iter()
            .filter(|l| l["path"] == "/chat/x")
            .collect()
    };
    assert!(wait_until(Duration::from_secs(5), || chat_lines().len() >= 3));
    let lines = chat_lines();
    let decisions: Vec<&str> = lines
        .iter()
        .map(|l| l["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["accepted", "accepted", "rate_limited"]);
    assert_eq!(lines[0]["user"], "ann");
    assert_eq!(lines[0]["status"], 200);
    let metrics = agent()
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .call()
        .expect("metrics")
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        metrics.contains(r#"agw_requests_total{route="chat",status="200"} 2"#),
        "{metrics}"
    );

    // The connection cap: two connections that completed the TLS
    // handshake with h2 and say nothing hold both slots; a third gets
    // the 503 (HTTP/1.1) or is closed (HTTP/2).
    let silent: Vec<TlsStream> = (0..2)
        .map(|_| tls_connect(h.tls, "localhost", &[&ca.pem], &[b"h2"]).unwrap())
        .collect();
    assert!(silent
        .iter()
        .all(|t| t.conn.alpn_protocol() == Some(&b"h2"[..])));
    assert!(wait_until(Duration::from_secs(2), || curl_code(
        "--http1.1"
    ) == "503 1.1"));
    assert_eq!(
        curl_code("--http2"),
        "000 0",
        "an HTTP/2 client over the cap is closed"
    );

    // The header timeout closes them (a client that completes the TLS
    // handshake with h2 and then sends nothing), and the slots are free.
    let started = Instant::now();
    for mut t in silent {
        t.sock
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 256];
        loop {
            match t.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "silent HTTP/2 connections were closed after {took:?}, expected ~1 s"
    );
    assert!(
        wait_until(Duration::from_secs(3), || curl_code("--http2") == "429 2"),
        "served again once the silent connections are closed"
    );
    assert!(
        metric_at(
            local_admin(admin),
            r#"agw_client_timeouts_total{kind="header"}"#
        ) >= 2.0,
        "the header timeouts are counted"
    );
}

/// An HTTP/2 connection to the gateway's TLS listener (ALPN `h2`),
/// driven by a task of the current runtime.
async fn h2_connect(h: &Https, ca: &TestCa) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(h.tls)
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(client_config(&[&ca.pem], &[b"h2"]))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("TLS handshake");
    let (client, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(connection);
    client.ready().await.expect("h2 ready")
}

/// Sends an HTTP/2 POST whose body never comes (the stream stays open,
/// no DATA frame) and waits up to `limit` for the answer: its status, or
/// the stream's reset, and how long it took.
fn stalled_h2_post(h: &Https, ca: &TestCa, limit: Duration) -> (Result<u16, String>, Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut client = h2_connect(h, ca).await;
        let request = http::Request::post(h.url("/chat/x"))
            .header("x-api-key", KEY)
            .header("content-type", "application/json")
            .body(())
            .expect("request");
        let started = Instant::now();
        let (answer, _body_never_sent) = client.send_request(request, false).expect("send");
        let got = match tokio::time::timeout(limit, answer).await {
            Ok(Ok(resp)) => Ok(resp.status().as_u16()),
            Ok(Err(e)) => Err(format!("stream ended without an answer: {e}")),
            Err(_) => Err(format!("no answer within {limit:?}")),
        };
        (got, started.elapsed())
    })
}

/// Sends an HTTP/2 POST whose body comes in `pieces`, `gap` apart; returns
/// the status and the answer's body.
fn slow_h2_post(h: &Https, ca: &TestCa, pieces: &[&str], gap: Duration) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut client = h2_connect(h, ca).await;
        let request = http::Request::post(h.url("/chat/x"))
            .header("x-api-key", KEY)
            .body(())
            .expect("request");
        let (answer, mut body) = client.send_request(request, false).expect("send");
        for (i, piece) in pieces.iter().enumerate() {
            tokio::time::sleep(gap).await;
            body.send_data(
                bytes::Bytes::copy_from_slice(piece.as_bytes()),
                i + 1 == pieces.len(),
            )
            .expect("send a piece");
        }
        let resp = answer.await.expect("an answer");
        let status = resp.status().as_u16();
        let mut recv = resp.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.expect("answer body");
            let _ = recv.flow_control().release_capacity(chunk.len());
            text.extend_from_slice(&chunk);
        }
        (status, String::from_utf8_lossy(&text).into_owned())
    })
}

/// An HTTP/2 request whose body stalls is ended by `client_body_timeout`,
/// as on HTTP/1 (there with a 408; here the stream is reset) and counted;
/// a slow body that keeps coming passes intact.
#[test]
fn a_stalled_http2_body_ends_at_the_body_timeout() {
    let ca = TestCa::new("test CA");
    let echo = EchoServer::start();
    let admin = free_port();
    let h = start(
        &ca.leaf(&["localhost"], 1, 30),
        GatewayConfig::new()
            .client_body_timeout("1s")
            .admin_listen(admin)
            .route(Route::chat(echo.addr).read_timeout("30s")),
    );
    let (got, took) = stalled_h2_post(&h, &ca, Duration::from_secs(10));
    eprintln!("stalled HTTP/2 body: {got:?} after {took:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "ended after {took:?} ({got:?}): expected the 1 s client_body_timeout"
    );
    assert!(
        matches!(got, Ok(408)) || got.as_ref().is_err_and(|e| e.contains("ended")),
        "{got:?}"
    );
    assert!(
        metric_at(
            local_admin(admin),
            r#"agw_client_timeouts_total{kind="body"}"#
        ) >= 1.0,
        "the body timeout is counted"
    );
    assert!(
        echo.requests().is_empty(),
        "no complete request went upstream"
    );

    // Pieces 0.6 s apart, 2.4 s in all: each wait is under the 1 s clock.
    let pieces = ["{\"a\":", "\"slow ", "but ", "steady\"}"];
    let (status, answer) = slow_h2_post(&h, &ca, &pieces, Duration::from_millis(600));
    assert_eq!(status, 200, "{answer}");
    let whole: String = pieces.concat();
    assert!(
        answer.contains(&sha256_hex(whole.as_bytes())),
        "the upstream got the whole body: {answer}"
    );
}

/// SIGTERM during an HTTP/2 stream: the gateway (which accepts HTTP/2
/// streams in a loop of its own) lets the stream finish, then exits 0.
#[test]
fn sigterm_lets_an_http2_stream_finish() {
    let ca = TestCa::new("test CA");
    let streamer = StreamServer::start(6, Duration::from_millis(300));
    let mut h = start(
        &ca.leaf(&["localhost"], 1, 30),
        GatewayConfig::new().route(Route::chat(streamer.addr)),
    );
    let ca_file = write_ca(&h.certs, &ca);
    let mut child = curl()
        .args(["-sN", "--http2", "--cacert"])
        .arg(&ca_file)
        .args([
            "--resolve",
            &h.resolve(),
            "-H",
            &format!("X-API-Key: {KEY}"),
        ])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .arg(h.url("/chat/stream"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl");
    assert!(
        wait_until(Duration::from_secs(5), || streamer
            .first_chunk_written_at()
            .is_some()),
        "the stream never started"
    );
    h.gw.signal("TERM");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("curl's stdout")
        .read_to_string(&mut out)
        .expect("read the stream");
    assert!(child.wait().expect("curl").success());
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.last(), Some(&"200 2"), "{out}");
    assert_eq!(
        &lines[..lines.len() - 1],
        streamer.expected_lines().as_slice(),
        "the whole stream arrived"
    );
    let status =
        h.gw.wait_exit(Duration::from_secs(10))
            .expect("the gateway exits");
    assert!(status.success(), "exit status {status}");
}

// ---------------------------------------------------------------------------
// Certificates swapped without a restart
// ---------------------------------------------------------------------------

/// Starts a stream on the old certificate, swaps the certificate with
/// `swap`, and checks new connections get the new one while the stream
/// finishes on the old.
fn renewal_while_streaming(swap: impl FnOnce(&Https, &Leaf)) {
    let ca = TestCa::new("test CA");
    let old = ca.leaf(&["localhost"], 0x1001, 30);
    let new = ca.leaf(&["localhost"], 0x2002, 60);
    let streamer = StreamServer::start(8, Duration::from_millis(250));
    let h = start(&old, GatewayConfig::new().route(Route::chat(streamer.addr)));
    assert_eq!(
        served_leaf(h.tls, "localhost", &[&ca.pem]).unwrap(),
        old.der
    );

    let mut stream = tls_connect(h.tls, "localhost", &[&ca.pem], &[b"http/1.1"]).unwrap();
    assert_eq!(serial_of(&peer_leaf(&stream)), "1001");
    let body = r#"{"model":"m"}"#;
    write!(
        stream,
        "POST /chat/api/generate HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream.flush().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || streamer
            .first_chunk_written_at()
            .is_some()),
        "the stream started"
    );

    swap(&h, &new);
    assert!(
        wait_until(Duration::from_secs(10), || served_leaf(
            h.tls,
            "localhost",
            &[&ca.pem]
        )
        .is_ok_and(|d| d == new.der)),
        "new connections get the new certificate; log:\n{}",
        h.gw.log()
    );
    assert_eq!(
        serial_of(&served_leaf(h.tls, "localhost", &[&ca.pem]).unwrap()),
        "2002"
    );
    assert!(
        streamer.last_chunk_written_at().is_none(),
        "the swap happened while the stream was still going"
    );

    let mut text = String::new();
    stream.read_to_string(&mut text).ok();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for line in streamer.expected_lines() {
        assert!(text.contains(&line), "missing {line:?} in {text:?}");
    }
    assert_eq!(
        serial_of(&peer_leaf(&stream)),
        "1001",
        "the stream kept its certificate"
    );
}

#[test]
fn sighup_swaps_the_certificate_while_a_stream_continues() {
    renewal_while_streaming(|h, new| {
        // Written in place without the watcher seeing a rename first: the
        // signal is what reloads (watch is on, so either may come first).
        new.write(&h.cert, &h.key);
        h.gw.signal("HUP");
    });
}

#[test]
fn a_changed_certificate_file_is_picked_up_by_itself() {
    renewal_while_streaming(|h, new| {
        new.write(&h.cert, &h.key);
    });
}

#[test]
fn a_bad_certificate_on_reload_keeps_the_old_one() {
    let ca = TestCa::new("test CA");
    let old = ca.leaf(&["localhost"], 0x77, 30);
    let h = start(
        &old,
        GatewayConfig::new()
            .admin_listen("0")
            .route(Route::chat("127.0.0.1:9")),
    );
    // A key that belongs to another certificate.
    let other = ca.leaf(&["localhost"], 0x78, 30);
    std::fs::write(&h.key, &other.key_pem).unwrap();
    h.gw.signal("HUP");
    assert!(
        h.gw.wait_log_contains("certificate not reloaded", Duration::from_secs(10)),
        "the bad pair is reported; log:\n{}",
        h.gw.log()
    );
    let log = h.gw.log();
    assert!(
        log.contains(&format!(
            "{}: the private key does not match",
            h.key.display()
        )),
        "the error names the file: {log}"
    );
    assert!(!log.contains("BEGIN"), "no PEM in the log");
    assert_eq!(
        served_leaf(h.tls, "localhost", &[&ca.pem]).unwrap(),
        old.der
    );
}

// ---------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------

fn check_with(leaf_cert: &str, leaf_key: &str, write_cert: bool) -> CliOutput {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    if write_cert {
        std::fs::write(&cert, leaf_cert).unwrap();
    }
    std::fs::write(&key, leaf_key).unwrap();
    let config = GatewayConfig::new()
        .unset("shutdown_grace")
        .listen("127.0.0.1:1")
        .listen_tls("127.0.0.1:2", "cert.pem", "key.pem")
        .route(Route::chat("127.0.0.1:9"));
    std::fs::write(dir.path().join("gateway.yaml"), config.render()).unwrap();
    std::fs::write(dir.path().join("keys.json"), keys().render()).unwrap();
    let out = run_cli(&["check", "--config", "gateway.yaml"], dir.path());
    // Keep the folder until the command is done.
    drop(dir);
    out
}

#[test]
fn check_names_the_file_of_a_bad_certificate() {
    let ca = TestCa::new("test CA");
    let good = ca.leaf(&["localhost"], 5, 90);
    let out = check_with(&good.cert_pem, &good.key_pem, true);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("certificate"), "{}", out.stdout);
    assert!(
        out.stdout.contains("for localhost (serial 05)"),
        "{}",
        out.stdout
    );

    let other = ca.leaf(&["localhost"], 6, 90);
    let out = check_with(&good.cert_pem, &other.key_pem, true);
    assert!(!out.status.success());
    assert!(
        out.stderr
            .contains("key.pem: the private key does not match the certificate in")
            && out.stderr.contains("cert.pem"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("BEGIN"), "no key material in errors");

    let expired = ca.leaf(&["localhost"], 7, -2);
    let out = check_with(&expired.cert_pem, &expired.key_pem, true);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("cert.pem: the certificate expired at"),
        "{}",
        out.stderr
    );

    let out = check_with(&good.cert_pem, &good.key_pem, false);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("cert.pem: cannot read"),
        "{}",
        out.stderr
    );

    let soon = ca.leaf(&["localhost"], 8, 5);
    let out = check_with(&soon.cert_pem, &soon.key_pem, true);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("warning:")
            && out
                .stderr
                .contains("cert.pem: the certificate expires in 4 day(s)"),
        "{}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------
// Redirect listener
// ---------------------------------------------------------------------------

#[test]
fn a_redirect_listener_answers_308_except_for_challenges() {
    let ca = TestCa::new("test CA");
    let leaf = ca.leaf(&["localhost"], 1, 30);
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("c.pem"), certs.path().join("k.pem"));
    leaf.write(&cert, &key);
    let redirect = free_port();
    let tls_port = free_port();
    let config = GatewayConfig::new()
        .unset("shutdown_grace")
        .listen_redirect(loopback(redirect))
        .listen_tls(loopback(tls_port), &cert, &key)
        .route(Route::chat("127.0.0.1:9"));
    let gw = Gateway::start(&config, keys());
    let resp = agent()
        .get(format!(
            "http://127.0.0.1:{redirect}/chat/api/tags?x=1&y=%20"
        ))
        .header("Host", "ai.example.com")
        .call()
        .expect("request");
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers().get("location").and_then(|v| v.to_str().ok()),
        Some(format!("https://ai.example.com:{tls_port}/chat/api/tags?x=1&y=%20").as_str())
    );
    // No key check first: a redirect never reveals whether a key is good.
    let resp = agent()
        .post(format!("http://127.0.0.1:{redirect}/chat/api/generate"))
        .header("Host", "ai.example.com:80")
        .send("{}")
        .expect("request");
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers().get("location").and_then(|v| v.to_str().ok()),
        Some(format!("https://ai.example.com:{tls_port}/chat/api/generate").as_str())
    );
    let resp = agent()
        .get(format!(
            "http://127.0.0.1:{redirect}/.well-known/acme-challenge/some-token"
        ))
        .call()
        .expect("request");
    assert_eq!(resp.status(), 404, "a challenge path is not redirected");
    assert!(resp.headers().get("location").is_none());
    // The asterisk form (`OPTIONS *`) has no path: the redirect goes to `/`.
    let mut s = TcpStream::connect(("127.0.0.1", redirect)).expect("connect");
    s.write_all(b"OPTIONS * HTTP/1.1\r\nHost: ai.example.com\r\nConnection: close\r\n\r\n")
        .expect("send");
    let r = read_response(&mut std::io::BufReader::new(s)).expect("an answer");
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some(format!("https://ai.example.com:{tls_port}/").as_str())
    );
    drop(gw);
}

// ---------------------------------------------------------------------------
// Upstreams over TLS
// ---------------------------------------------------------------------------

#[test]
fn https_upstreams_are_verified_against_upstream_ca() {
    let upstream_ca = TestCa::new("upstream CA");
    // The upstream's certificate names localhost (the name the gateway
    // sends as SNI and verifies), not 127.0.0.1.
    let upstream = TlsUpstream::start(&upstream_ca.leaf(&["localhost"], 9, 30));
    let wrong_ca = TestCa::new("some other CA");
    let client_ca = TestCa::new("client CA");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("upstream-ca.pem");
    let wrong = dir.path().join("wrong-ca.pem");
    std::fs::write(&good, &upstream_ca.pem).unwrap();
    std::fs::write(&wrong, &wrong_ca.pem).unwrap();
    let port = upstream.addr.port();
    let upstream_url = format!("https://localhost:{port}");
    let h = start(
        &client_ca.leaf(&["localhost"], 1, 30),
        GatewayConfig::new()
            .route(Route::stripped("good", "/good/", "chat", &upstream_url).upstream_ca(&good))
            .route(Route::stripped("wrong", "/wrong/", "chat", &upstream_url).upstream_ca(&wrong)),
    );

    let mut resp = agent()
        .get(h.gw.url("/good/v1/models"))
        .header("X-API-Key", KEY)
        .call()
        .expect("request");
    assert_eq!(resp.status(), 200);
    let json = body_json(&mut resp);
    assert_eq!(json["tls"], true);
    assert_eq!(json["path"], "/v1/models");
    assert_eq!(upstream.hits(), 1);

    let resp = agent()
        .get(h.gw.url("/wrong/v1/models"))
        .header("X-API-Key", KEY)
        .call()
        .expect("request");
    assert_eq!(resp.status(), 502);
    assert_eq!(upstream.hits(), 1, "nothing reached the upstream");
    let name = format!("https://localhost:{}", upstream.addr.port());
    assert!(
        h.gw.wait_log_contains(&format!("upstream {name}"), Duration::from_secs(5)),
        "the log names the upstream; log:\n{}",
        h.gw.log()
    );
    assert!(
        h.gw.log().contains("TLS handshake failed"),
        "{}",
        h.gw.log()
    );
}

// ---------------------------------------------------------------------------
// The shipped examples (README's HTTPS and "Coming from Caddy + Flask")
// ---------------------------------------------------------------------------

/// The Flask app's key file, as it is: flat JSON, `user`, `service`,
/// `created_at`.
const FLASK_KEYS: &str = r#"{"e5c4b8c2-537c-47af-94a8-c8489709b49b": {"user": "beano", "service": "chat", "created_at": "2025-06-01T18:58:30.356Z"}}"#;

fn shipped(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conf")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_shipped_https_examples_are_in_the_readme_and_work() {
    let readme = shipped("../docs/https.md");
    for name in ["https.yaml", "https-acme.yaml"] {
        assert!(
            readme.contains(&shipped(name)),
            "docs/https.md does not show conf/{name} as it is"
        );
    }

    // conf/https.yaml, on free loopback ports, with an echo server for
    // Ollama and the Flask key file as it is.
    let ca = TestCa::new("example CA");
    let echo = EchoServer::start();
    let redirect = free_port();
    let tls_port = free_port();
    let config = shipped("https.yaml")
        .replace("0.0.0.0:80", &format!("127.0.0.1:{redirect}"))
        .replace("0.0.0.0:443", &format!("127.0.0.1:{tls_port}"))
        .replace("127.0.0.1:11434", &echo.addr.to_string());
    let files = GatewayFiles::write(&config, FLASK_KEYS);
    std::fs::rename(&files.keys_path, files.dir.path().join("apikeys.json")).unwrap();
    let tls_dir = files.dir.path().join("tls");
    std::fs::create_dir(&tls_dir).unwrap();
    ca.leaf(&["localhost"], 3, 90)
        .write(&tls_dir.join("fullchain.pem"), &tls_dir.join("privkey.pem"));
    let out = run_cli(&["check", "--config", "gateway.yaml"], files.dir.path());
    assert!(out.status.success(), "{}", out.stderr);
    let mut gw = Gateway::spawn(files, redirect);
    gw.wait_ready(READY_TIMEOUT).expect("the example starts");

    let (status, body) = https_raw(
        SocketAddr::from(([127, 0, 0, 1], tls_port)),
        "localhost",
        &[&ca.pem],
        "POST /chat/api/generate HTTP/1.1\r\nHost: localhost\r\nX-API-Key: e5c4b8c2-537c-47af-94a8-c8489709b49b\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
    assert_eq!(json["path"], "/api/generate");
    assert_eq!(json["headers"]["x-gateway-user"][0], "beano");
    let resp = agent()
        .post(format!("http://127.0.0.1:{redirect}/chat/api/generate"))
        .header("Host", "ai.example.com")
        .send("{}")
        .expect("plain request");
    assert_eq!(resp.status(), 308);

    // conf/https-acme.yaml passes check without contacting Let's Encrypt
    // (its cache folder is moved into a temp dir).
    let dir = tempfile::tempdir().unwrap();
    let config = shipped("https-acme.yaml").replace(
        "/var/lib/ai-gateway/acme",
        &dir.path().join("acme").display().to_string(),
    );
    std::fs::write(dir.path().join("gateway.yaml"), config).unwrap();
    std::fs::write(dir.path().join("apikeys.json"), FLASK_KEYS).unwrap();
    let out = run_cli(&["check", "--config", "gateway.yaml"], dir.path());
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("acme for ai.example.com from https://acme-v02.api.letsencrypt.org/directory: no certificate cached yet"),
        "{}",
        out.stdout
    );
}
