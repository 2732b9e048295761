//! The gateway's own answers over HTTP/2 reach the client whole, whatever
//! the client does with the request body: curl (which kept sending and,
//! before, saw `(92) Stream error in the HTTP/2 framing layer` in about
//! half the tries) and a raw HTTP/2 client that sends its body only after
//! the answer came.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::tls::*;
use common::*;

const KEY: &str = "h2-answers-key-0001";
const OTHER: &str = "h2-answers-key-0002";
const LIMITED: &str = "h2-answers-key-0003";

fn keys() -> KeyFile {
    KeyFile::of([
        Key::new(KEY, "ann").service("chat"),
        Key::new(OTHER, "bob").service("other"),
        Key::new(LIMITED, "cy").service("chat").rate_limit("1/h"),
    ])
}

/// How many times each refusal is tried.
const TRIES: usize = 20;

/// A gateway with a TLS listener (HTTP/2 by ALPN) in front of an echo
/// upstream, `max_body_size: 1KB`, the throttle off (the wrong-key tries
/// would trip it).
struct H2Gateway {
    _gw: Gateway,
    _echo: EchoServer,
    tls: SocketAddr,
    ca_file: PathBuf,
    ca: TestCa,
    _certs: tempfile::TempDir,
}

impl H2Gateway {
    fn start() -> H2Gateway {
        let ca = TestCa::new("h2 answers CA");
        let certs = tempfile::tempdir().expect("cert dir");
        let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
        ca.leaf(&["localhost"], 1, 30).write(&cert, &key);
        let ca_file = certs.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.pem).expect("write CA");
        let echo = EchoServer::start();
        let (plain, tls_port) = (free_port(), free_port());
        let config = GatewayConfig::new()
            .listen(loopback(plain))
            .listen_tls(loopback(tls_port), &cert, &key)
            .failed_key_throttle(Throttle::off())
            .route(Route::chat(echo.addr))
            .route(Route::stripped("small", "/small/", "chat", echo.addr).max_body_size("1KB"));
        let gw = Gateway::start(&config, keys());
        H2Gateway {
            _gw: gw,
            _echo: echo,
            tls: SocketAddr::from(([127, 0, 0, 1], tls_port)),
            ca_file,
            ca,
            _certs: certs,
        }
    }

    /// curl `--http2`, POST with a body of `body_len` bytes and `headers`:
    /// the status and the HTTP version curl printed, and curl's exit code.
    fn curl_post(&self, headers: &[&str], body_len: usize) -> (String, i32) {
        self.curl_post_to("/chat/x", headers, body_len)
    }

    /// [`H2Gateway::curl_post`] to another path.
    fn curl_post_to(&self, path: &str, headers: &[&str], body_len: usize) -> (String, i32) {
        let body = self._certs.path().join(format!("body-{body_len}"));
        if !body.exists() {
            std::fs::write(&body, "x".repeat(body_len)).expect("write the body file");
        }
        let mut cmd = curl();
        cmd.args(["-s", "--http2", "--cacert"])
            .arg(&self.ca_file)
            .args([
                "--resolve",
                &format!("localhost:{}:127.0.0.1", self.tls.port()),
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "--data-binary",
                &format!("@{}", body.display()),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{http_version}",
            ]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        let out = cmd
            .arg(format!("https://localhost:{}{path}", self.tls.port()))
            .output()
            .expect("run curl");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.status.code().unwrap_or(-1),
        )
    }

    /// Runs [`H2Gateway::curl_post`] [`TRIES`] times and asserts every try
    /// got `want` over HTTP/2 with curl exiting 0.
    fn every_try(&self, what: &str, path: &str, headers: &[&str], body_len: usize, want: u16) {
        let got: Vec<(String, i32)> = (0..TRIES)
            .map(|_| self.curl_post_to(path, headers, body_len))
            .collect();
        let right = got
            .iter()
            .filter(|(out, code)| *out == format!("{want} 2") && *code == 0)
            .count();
        assert_eq!(
            right, TRIES,
            "{what}: (curl output, exit code) per try: {got:?}"
        );
    }
}

impl H2Gateway {
    /// [`TRIES`] times curl `--http2` uploading `body_len` bytes from its
    /// standard input (`-T -`: no `Content-Length`, so the body is counted
    /// as it comes and refused mid-body) to `/small/`: every try must get
    /// the 413 over HTTP/2 with curl exiting 0.
    fn every_chunked_try(&self, what: &str, body_len: usize) {
        use std::io::Write;
        let body = "x".repeat(body_len);
        let mut got = Vec::new();
        for _ in 0..TRIES {
            let mut child = curl()
                .args(["-s", "--http2", "--cacert"])
                .arg(&self.ca_file)
                .args([
                    "--resolve",
                    &format!("localhost:{}:127.0.0.1", self.tls.port()),
                    "-X",
                    "POST",
                    "-T",
                    "-",
                    "-H",
                    &format!("x-api-key: {KEY}"),
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{http_version}",
                ])
                .arg(format!("https://localhost:{}/small/x", self.tls.port()))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("run curl");
            if let Some(mut stdin) = child.stdin.take() {
                // curl may stop reading once it has the answer.
                let _ = stdin.write_all(body.as_bytes());
            }
            let out = child.wait_with_output().expect("curl's output");
            got.push((
                String::from_utf8_lossy(&out.stdout).into_owned(),
                out.status.code().unwrap_or(-1),
            ));
        }
        let right = got
            .iter()
            .filter(|(out, code)| out == "413 2" && *code == 0)
            .count();
        assert_eq!(
            right, TRIES,
            "{what}: (curl output, exit code) per try: {got:?}"
        );
    }
}

#[test]
fn every_refusal_of_a_request_with_a_body_reaches_curl_over_http2() {
    let g = H2Gateway::start();
    // A body well past what fits in one write, so curl is still sending
    // when the answer comes.
    let big = 256 * 1024;
    let key = format!("x-api-key: {KEY}");
    g.every_try("no key", "/chat/x", &[], big, 401);
    g.every_try(
        "wrong key",
        "/chat/x",
        &["x-api-key: h2-answers-wrong"],
        big,
        401,
    );
    g.every_try(
        "another service's key",
        "/chat/x",
        &[&format!("x-api-key: {OTHER}")],
        big,
        403,
    );
    g.every_try(
        "over max_body_size (Content-Length)",
        "/small/x",
        &[&key],
        big,
        413,
    );
    g.every_chunked_try("over max_body_size (no Content-Length: mid-body)", big);
    // The first request of the limited key is admitted (a small body),
    // then every one is over its rate.
    assert_eq!(
        g.curl_post(&[&format!("x-api-key: {LIMITED}")], 10),
        ("200 2".to_string(), 0)
    );
    g.every_try(
        "rate limited",
        "/chat/x",
        &[&format!("x-api-key: {LIMITED}")],
        big,
        429,
    );
    // And an admitted request with a body still goes through.
    g.every_try("admitted", "/chat/x", &[&key], 100, 200);
}

/// What a raw HTTP/2 client saw of one request: the status, the answer's
/// body, and how the stream ended.
#[derive(Debug)]
struct Seen {
    status: u16,
    body: String,
    /// `None` when the answer ended cleanly; else the error h2 reported
    /// (a reset with its reason).
    ended_by: Option<String>,
    /// Whether the request body could still be sent after the answer.
    body_sent: bool,
}

/// Sends a POST's HEADERS without END_STREAM, waits for the answer, then
/// sends DATA (`body_len` bytes, END_STREAM), and reads the answer's body.
fn headers_then_data(g: &H2Gateway, key: Option<&str>, body_len: usize) -> Seen {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(g.tls)
            .await
            .expect("connect");
        let tls = tokio_rustls::TlsConnector::from(client_config(&[&g.ca.pem], &[b"h2"]))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").expect("name"),
                tcp,
            )
            .await
            .expect("TLS handshake");
        let (client, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
        tokio::spawn(connection);
        let mut client = client.ready().await.expect("h2 ready");
        let mut request = http::Request::post(format!("https://localhost:{}/chat/x", g.tls.port()))
            .header("content-type", "application/json");
        if let Some(k) = key {
            request = request.header("x-api-key", k);
        }
        let (answer, mut send) = client
            .send_request(request.body(()).expect("request"), false)
            .expect("send headers");
        let resp = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("an answer within 10 s")
            .expect("an answer, not a reset");
        let status = resp.status().as_u16();
        let body_sent = send
            .send_data(bytes::Bytes::from(vec![b'x'; body_len]), true)
            .is_ok();
        let mut recv = resp.into_body();
        let mut text = Vec::new();
        let mut ended_by = None;
        while let Some(chunk) = recv.data().await {
            match chunk {
                Ok(chunk) => {
                    let _ = recv.flow_control().release_capacity(chunk.len());
                    text.extend_from_slice(&chunk);
                }
                Err(e) => {
                    ended_by = Some(e.to_string());
                    break;
                }
            }
        }
        Seen {
            status,
            body: String::from_utf8_lossy(&text).into_owned(),
            ended_by,
            body_sent,
        }
    })
}

#[test]
fn a_raw_http2_client_sending_its_body_after_the_answer_reads_it_whole() {
    let g = H2Gateway::start();
    for (key, want, error) in [
        (None, 401, "missing api key"),
        (Some(OTHER), 403, "not allowed for this service"),
    ] {
        let seen = headers_then_data(&g, key, 100);
        assert_eq!(seen.status, want, "{seen:?}");
        let json: serde_json::Value =
            serde_json::from_str(&seen.body).unwrap_or_else(|e| panic!("{e}: {seen:?}"));
        assert!(
            json["error"].as_str().is_some_and(|m| m.contains(error)),
            "{seen:?}"
        );
        assert_eq!(seen.ended_by, None, "the answer ends cleanly: {seen:?}");
        assert!(seen.body_sent, "the body could still be sent: {seen:?}");
    }
    // The gateway still serves on the same listener.
    assert_eq!(
        g.curl_post(&[&format!("x-api-key: {KEY}")], 10),
        ("200 2".to_string(), 0)
    );
}

/// A chunked (no `Content-Length`) HTTP/2 body that grows past
/// `max_body_size` is ended with a 413 mid-body: the answer reaches the
/// client whole, and the stream ends without an error, while the client
/// is still sending.
#[test]
fn a_413_mid_body_reaches_a_raw_http2_client_whole() {
    let g = H2Gateway::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let seen = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(g.tls)
            .await
            .expect("connect");
        let tls = tokio_rustls::TlsConnector::from(client_config(&[&g.ca.pem], &[b"h2"]))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").expect("name"),
                tcp,
            )
            .await
            .expect("TLS handshake");
        let (client, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
        tokio::spawn(connection);
        let mut client = client.ready().await.expect("h2 ready");
        let request = http::Request::post(format!("https://localhost:{}/small/x", g.tls.port()))
            .header("x-api-key", KEY)
            .body(())
            .expect("request");
        let (answer, mut send) = client.send_request(request, false).expect("send headers");
        // 800 bytes (under the 1 KB limit), then 1,500 more in pieces.
        send.send_data(bytes::Bytes::from(vec![b'x'; 800]), false)
            .expect("first piece");
        for i in 0..3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = send.send_data(bytes::Bytes::from(vec![b'y'; 500]), i == 2);
        }
        let resp = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("an answer within 10 s")
            .expect("an answer, not a reset");
        let status = resp.status().as_u16();
        let mut recv = resp.into_body();
        let mut text = Vec::new();
        let mut ended_by = None;
        while let Some(chunk) = recv.data().await {
            match chunk {
                Ok(chunk) => {
                    let _ = recv.flow_control().release_capacity(chunk.len());
                    text.extend_from_slice(&chunk);
                }
                Err(e) => {
                    ended_by = Some(e.to_string());
                    break;
                }
            }
        }
        (
            status,
            String::from_utf8_lossy(&text).into_owned(),
            ended_by,
        )
    });
    assert_eq!(seen.0, 413, "{seen:?}");
    assert_eq!(seen.1, r#"{"error":"request body too large"}"#, "{seen:?}");
    assert_eq!(seen.2, None, "the answer ends cleanly: {seen:?}");
}
