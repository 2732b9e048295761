//! End-to-end tests of the proxy path: the statuses the gateway answers by
//! itself, header handling, routing, load balancing, streaming and large
//! bodies, each against the real binary and real upstreams.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A gateway with `routes` (2 threads).
fn gateway(routes: impl IntoIterator<Item = Route>, keys: &KeyFile) -> Gateway {
    Gateway::start(&GatewayConfig::new().threads(2).routes(routes), keys)
}

const ALICE_KEY: &str = "alice-secret-key-0001";

fn alice_keys() -> KeyFile {
    KeyFile::of([Key::new(ALICE_KEY, "alice").service("chat")])
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header value").to_string())
}

/// Asserts a response the gateway made itself: `status`, JSON content type,
/// a `{"error": "..."}` body that does not contain `secret`. Returns the
/// error message.
fn assert_gateway_error(
    resp: &mut ureq::http::Response<ureq::Body>,
    status: u16,
    secret: Option<&str>,
) -> String {
    assert_eq!(resp.status(), status, "status");
    assert_eq!(
        header(resp, "content-type").as_deref(),
        Some("application/json"),
        "content-type"
    );
    let text = resp.body_mut().read_to_string().expect("read error body");
    if let Some(secret) = secret {
        assert!(!text.contains(secret), "body leaks the key: {text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    let obj = json.as_object().expect("body is a JSON object");
    assert_eq!(obj.len(), 1, "only an error field: {text}");
    let msg = obj
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or_else(|| panic!("no string error field: {text}"));
    assert!(!msg.is_empty(), "empty error message");
    msg.to_string()
}

/// Asserts a 401 with a Bearer challenge and returns the error message.
fn assert_unauthorized(
    resp: &mut ureq::http::Response<ureq::Body>,
    secret: Option<&str>,
) -> String {
    let challenge = header(resp, "www-authenticate").expect("401 carries WWW-Authenticate");
    assert!(challenge.starts_with("Bearer"), "challenge: {challenge}");
    assert_gateway_error(resp, 401, secret)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to gateway");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("set read timeout");
    s
}

/// Sends `request` verbatim on a new connection and reads one response.
fn raw_request(addr: SocketAddr, request: &str) -> RawResponse {
    let mut s = connect(addr);
    s.write_all(request.as_bytes()).expect("write raw request");
    read_response(&mut BufReader::new(s)).expect("read a response")
}

// ---------------------------------------------------------------------------
// Statuses the gateway makes itself
// ---------------------------------------------------------------------------

#[test]
fn unknown_path_is_404_json() {
    let echo = EchoServer::start();
    let gw = gateway([Route::chat(echo.addr)], &alice_keys());
    for path in ["/nothing/here", "/chat", "/"] {
        let mut resp = agent()
            .get(gw.url(path))
            .header("X-API-Key", ALICE_KEY)
            .call()
            .expect("request");
        let msg = assert_gateway_error(&mut resp, 404, Some(ALICE_KEY));
        assert!(msg.contains("route"), "{path}: {msg}");
    }
    assert_eq!(echo.hits(), 0);
}

#[test]
fn wrong_method_is_405_with_allow() {
    let echo = EchoServer::start();
    let gw = gateway([Route::chat(echo.addr).methods(["POST"])], &alice_keys());
    let mut resp = agent()
        .get(gw.url("/chat/api/generate"))
        .header("X-API-Key", ALICE_KEY)
        .call()
        .expect("request");
    assert_eq!(header(&resp, "allow").as_deref(), Some("POST"));
    assert_gateway_error(&mut resp, 405, Some(ALICE_KEY));
    assert_eq!(echo.hits(), 0);

    // The allowed method goes through.
    let resp = agent()
        .post(gw.url("/chat/api/generate"))
        .header("X-API-Key", ALICE_KEY)
        .send("{}")
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(echo.hits(), 1);
}

#[test]
fn missing_key_is_401_with_challenge() {
    let echo = EchoServer::start();
    let gw = gateway([Route::chat(echo.addr)], &alice_keys());
    let mut resp = agent().get(gw.url("/chat/x")).call().expect("request");
    assert_unauthorized(&mut resp, None);
    // A non-Bearer Authorization header presents no key either.
    let mut resp = agent()
        .get(gw.url("/chat/x"))
        .header("Authorization", format!("Basic {ALICE_KEY}"))
        .call()
        .expect("request");
    assert_unauthorized(&mut resp, Some(ALICE_KEY));
    assert_eq!(echo.hits(), 0);
}

#[test]
fn unknown_key_is_401_and_not_echoed() {
    let echo = EchoServer::start();
    let gw = gateway([Route::chat(echo.addr)], &alice_keys());
    let wrong = "wrong-key-that-must-not-be-echoed";
    let mut resp = agent()
        .get(gw.url("/chat/x"))
        .header("X-API-Key", wrong)
        .call()
        .expect("request");
    assert_unauthorized(&mut resp, Some(wrong));
    let mut resp = agent()
        .get(gw.url("/chat/x"))
        .header("Authorization", format!("Bearer {wrong}"))
        .call()
        .expect("request");
    assert_unauthorized(&mut resp, Some(wrong));
    assert_eq!(echo.hits(), 0);
}

#[test]
fn expired_key_is_401() {
    let echo = EchoServer::start();
    let keys = KeyFile::of([
        Key::new("expired-key-0002", "old")
            .service("chat")
            .expires_at("2001-01-01T00:00:00Z"),
        Key::new("future-key-0003", "new")
            .service("chat")
            .expires_at("2999-01-01T00:00:00Z"),
    ]);
    let gw = gateway([Route::chat(echo.addr)], &keys);
    let mut resp = agent()
        .get(gw.url("/chat/x"))
        .header("X-API-Key", "expired-key-0002")
        .call()
        .expect("request");
    let msg = assert_unauthorized(&mut resp, Some("expired-key-0002"));
    assert!(msg.contains("expired"), "{msg}");
    assert_eq!(echo.hits(), 0);
    // The same entry with a future expiry works.
    let resp = agent()
        .get(gw.url("/chat/x"))
        .header("X-API-Key", "future-key-0003")
        .call()
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(echo.hits(), 1);
}

#[test]
fn disabled_key_is_401() {
    let echo = EchoServer::start();
    let keys = KeyFile::of([Key::new("disabled-key-0004", "gone")
        .service("chat")
        .disabled(true)]);
    let gw = gateway([Route::chat(echo.addr)], &keys);
    let mut resp = agent()
        .get(gw.url("/chat/x"))
        .header("Authorization", "Bearer disabled-key-0004")
        .call()
        .expect("request");
    assert_unauthorized(&mut resp, Some("disabled-key-0004"));
    assert_eq!(echo.hits(), 0);
}

#[test]
fn key_for_another_service_is_403() {
    let echo = EchoServer::start();
    let keys = KeyFile::of([Key::new("tts-only-key-0005", "speaker").service("tts")]);
    let gw = gateway(
        [
            Route::chat(echo.addr),
            Route::stripped("tts", "/tts/", "tts", echo.addr),
        ],
        &keys,
    );
    let mut resp = agent()
        .get(gw.url("/chat/x"))
        .header("X-API-Key", "tts-only-key-0005")
        .call()
        .expect("request");
    assert!(header(&resp, "www-authenticate").is_none());
    assert_gateway_error(&mut resp, 403, Some("tts-only-key-0005"));
    assert_eq!(echo.hits(), 0);
    let resp = agent()
        .get(gw.url("/tts/x"))
        .header("X-API-Key", "tts-only-key-0005")
        .call()
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(echo.hits(), 1);
}

#[test]
fn dot_segments_are_400() {
    let echo = EchoServer::start();
    let gw = gateway([Route::chat(echo.addr)], &alice_keys());
    for path in [
        "/chat/../x",
        "/chat/%2e%2e/x",
        "/chat/%2E%2E/x",
        "/chat/.%2e/x",
        "/chat/./x",
        "/chat/a/..",
    ] {
        let resp = raw_request(
            gw.addr(),
            &format!(
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {ALICE_KEY}\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(resp.status, 400, "{path}");
        assert_eq!(
            resp.header("content-type"),
            Some("application/json"),
            "{path}"
        );
        let text = String::from_utf8_lossy(&resp.body);
        assert!(!text.contains(ALICE_KEY), "{path}: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).expect("JSON body");
        assert!(json["error"].is_string(), "{path}: {text}");
    }
    assert_eq!(echo.hits(), 0);
    // Dots inside a segment are fine.
    let resp = raw_request(
        gw.addr(),
        &format!(
            "GET /chat/..x/.y HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {ALICE_KEY}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(resp.status, 200);
    assert_eq!(echo.hits(), 1);
}

/// `;` starts segment parameters, which servlet-style upstreams (Tomcat,
/// Spring) strip before routing: `/w/admin;/x` would reach them as
/// `/w/admin/x`, past the stricter `/w/admin/` route. Refused by default;
/// a route with `allow_path_params: true` passes them when the path
/// without them is still that route's.
#[test]
fn segment_parameters_are_400_unless_the_route_allows_them() {
    let echo = EchoServer::start();
    let gw = gateway(
        [
            Route::stripped("w", "/w/", "chat", echo.addr),
            Route::stripped("wadmin", "/w/admin/", "admin", echo.addr),
            Route::stripped("m", "/m/", "chat", echo.addr).allow_path_params(true),
            Route::stripped("madmin", "/m/admin/", "admin", echo.addr),
        ],
        &alice_keys(),
    );
    let get = |path: &str| {
        raw_request(
            gw.addr(),
            &format!(
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {ALICE_KEY}\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    for path in [
        "/w/admin;/x",
        "/w/admin;jsessionid=1/x",
        "/w/admin%3B/x",
        "/w/a;b=1",
        "/m/admin;/x",
        "/m/admin%3b/x",
    ] {
        let resp = get(path);
        assert_eq!(resp.status, 400, "{path}");
        let json: serde_json::Value = serde_json::from_slice(&resp.body).expect("JSON body");
        assert_eq!(json["error"], "invalid path", "{path}");
    }
    assert_eq!(echo.hits(), 0, "no refused path reached an upstream");
    // The query is not the path.
    assert_eq!(get("/w/x?a=1;b=2").status, 200);
    // Allowed where the route says so, and passed on as written.
    assert_eq!(get("/m/a;v=1/b").status, 200);
    assert_eq!(
        echo.last_request().expect("a request").head.target,
        "/a;v=1/b"
    );
    assert_eq!(echo.hits(), 2);
}

#[test]
fn refused_upstream_is_502() {
    let gw = gateway([Route::chat(refused_addr())], &alice_keys());
    let mut resp = agent()
        .post(gw.url("/chat/api/generate"))
        .header("X-API-Key", ALICE_KEY)
        .send("{}")
        .expect("request");
    assert_gateway_error(&mut resp, 502, Some(ALICE_KEY));
}

#[test]
fn silent_upstream_is_504_after_read_timeout() {
    let silent = SilentServer::start();
    let gw = gateway([Route::chat(silent.addr).read_timeout("1s")], &alice_keys());
    let mut resp = agent()
        .post(gw.url("/chat/api/generate"))
        .header("X-API-Key", ALICE_KEY)
        .send("{}")
        .expect("request");
    assert_gateway_error(&mut resp, 504, Some(ALICE_KEY));
    assert!(silent.hits() >= 1, "the request reached the upstream");
}

// ---------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------

fn upstream_headers(json: &serde_json::Value) -> &serde_json::Map<String, serde_json::Value> {
    json["headers"].as_object().expect("headers object")
}

#[test]
fn credentials_are_stripped_and_user_is_set() {
    let echo = EchoServer::start();
    let gw = gateway([Route::chat(echo.addr)], &alice_keys());

    // X-API-Key, with a forged X-Gateway-User (twice) and an extra
    // Authorization header that must not leak either.
    let mut resp = agent()
        .post(gw.url("/chat/api/generate"))
        .header("X-API-Key", ALICE_KEY)
        .header("Authorization", "Basic c29tZTpvdGhlcg==")
        .header("X-Gateway-User", "mallory")
        .header("X-Gateway-User", "root")
        .header("X-Custom", "kept")
        .send("{}")
        .expect("request");
    assert_eq!(resp.status(), 200);
    let json = body_json(&mut resp);
    let h = upstream_headers(&json);
    assert!(h.get("x-api-key").is_none(), "{json}");
    assert!(h.get("authorization").is_none(), "{json}");
    assert_eq!(h["x-gateway-user"], serde_json::json!(["alice"]), "{json}");
    assert_eq!(h["x-custom"], serde_json::json!(["kept"]), "{json}");
    assert!(!json.to_string().contains(ALICE_KEY));

    // Authorization: Bearer.
    let mut resp = agent()
        .get(gw.url("/chat/api/tags"))
        .header("Authorization", format!("Bearer {ALICE_KEY}"))
        .header("X-Gateway-User", "mallory")
        .call()
        .expect("request");
    assert_eq!(resp.status(), 200);
    let json = body_json(&mut resp);
    let h = upstream_headers(&json);
    assert!(h.get("authorization").is_none(), "{json}");
    assert!(h.get("x-api-key").is_none(), "{json}");
    assert_eq!(h["x-gateway-user"], serde_json::json!(["alice"]), "{json}");

    // What the upstream recorded agrees with what it answered.
    let recorded = echo.requests();
    assert_eq!(recorded.len(), 2);
    for r in &recorded {
        assert!(r.head.header("x-api-key").is_none());
        assert!(r.head.header("authorization").is_none());
        assert_eq!(r.head.header_all("x-gateway-user"), vec!["alice"]);
        assert!(!r.head.headers.iter().any(|(_, v)| v.contains(ALICE_KEY)));
    }
}

// ---------------------------------------------------------------------------
// Paths and routing
// ---------------------------------------------------------------------------

#[test]
fn strip_prefix_true_removes_the_prefix() {
    let echo = EchoServer::start();
    let gw = gateway([Route::chat(echo.addr)], &alice_keys());
    let mut resp = agent()
        .get(gw.url("/chat/api/generate?x=1"))
        .header("X-API-Key", ALICE_KEY)
        .call()
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(body_json(&mut resp)["path"], "/api/generate?x=1");
    let mut resp = agent()
        .get(gw.url("/chat/"))
        .header("X-API-Key", ALICE_KEY)
        .call()
        .expect("request");
    assert_eq!(body_json(&mut resp)["path"], "/");
}

#[test]
fn strip_prefix_false_keeps_the_path() {
    let echo = EchoServer::start();
    let gw = gateway(
        [Route::new("openai", "/v1/", "chat")
            .strip_prefix(false)
            .upstream(echo.addr)],
        &alice_keys(),
    );
    let mut resp = agent()
        .get(gw.url("/v1/chat/completions?stream=1&a=%20b"))
        .header("X-API-Key", ALICE_KEY)
        .call()
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        body_json(&mut resp)["path"],
        "/v1/chat/completions?stream=1&a=%20b"
    );
}

#[test]
fn longest_prefix_wins_and_scopes_keys() {
    let admin_up = EchoServer::start();
    let gen_up = EchoServer::start();
    let keys = KeyFile::of([
        Key::new("admin-key-0006", "root").services(["admin", "ro"]),
        Key::new("ro-key-0007", "reader").service("ro"),
    ]);
    let gw = gateway(
        [
            Route::stripped("all", "/ollama/", "admin", admin_up.addr),
            Route::new("gen", "/ollama/api/generate", "ro")
                .strip_prefix(false)
                .upstream(gen_up.addr),
        ],
        &keys,
    );
    let get = |path: &str, key: &str| {
        agent()
            .post(gw.url(path))
            .header("X-API-Key", key)
            .send("{}")
            .expect("request")
    };

    let mut resp = get("/ollama/api/generate", "admin-key-0006");
    assert_eq!(resp.status(), 200);
    let json = body_json(&mut resp);
    assert_eq!(json["upstream"], gen_up.addr.to_string());
    assert_eq!(json["path"], "/ollama/api/generate");

    let mut resp = get("/ollama/api/pull", "admin-key-0006");
    assert_eq!(resp.status(), 200);
    let json = body_json(&mut resp);
    assert_eq!(json["upstream"], admin_up.addr.to_string());
    assert_eq!(json["path"], "/api/pull");
    assert_eq!((admin_up.hits(), gen_up.hits()), (1, 1));

    // The read-only key: generation only.
    let resp = get("/ollama/api/generate", "ro-key-0007");
    assert_eq!(resp.status(), 200);
    let mut resp = get("/ollama/api/pull", "ro-key-0007");
    assert_gateway_error(&mut resp, 403, Some("ro-key-0007"));
    assert_eq!((admin_up.hits(), gen_up.hits()), (1, 2));
}

#[test]
fn round_robin_spreads_requests() {
    let a = EchoServer::start();
    let b = EchoServer::start();
    let gw = gateway(
        [Route::new("chat", "/chat/", "chat")
            .strip_prefix(true)
            .upstreams([a.addr, b.addr])],
        &alice_keys(),
    );
    let agent = agent();
    for i in 0..10 {
        let resp = agent
            .get(gw.url(&format!("/chat/req{i}")))
            .header("X-API-Key", ALICE_KEY)
            .call()
            .expect("request");
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(a.hits() + b.hits(), 10);
    assert!(
        a.hits() >= 3 && b.hits() >= 3,
        "a={} b={}",
        a.hits(),
        b.hits()
    );
}

// ---------------------------------------------------------------------------
// Streaming and bodies
// ---------------------------------------------------------------------------

fn check_stream(streamer: &StreamServer, method: &str) {
    let gw = gateway([Route::chat(streamer.addr)], &alice_keys());
    let agent = agent();
    let mut resp = if method == "POST" {
        agent
            .post(gw.url("/chat/api/generate"))
            .header("X-API-Key", ALICE_KEY)
            .send(r#"{"model":"test"}"#)
    } else {
        agent
            .get(gw.url("/chat/v1/chat/completions"))
            .header("X-API-Key", ALICE_KEY)
            .call()
    }
    .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "content-type").as_deref(),
        Some(streamer.format.content_type())
    );
    let lines = read_lines_timed(resp.body_mut().as_reader());
    let expected = streamer.expected_lines();
    let got: Vec<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(got, expected);
    let last_written = streamer
        .last_chunk_written_at()
        .expect("the upstream wrote its last chunk");
    assert!(
        lines[0].1 < last_written,
        "the first line was received only after the upstream wrote its last chunk: buffered"
    );
    assert_eq!(streamer.hits(), 1);
}

#[test]
fn ndjson_stream_is_not_buffered() {
    let streamer = StreamServer::start(5, Duration::from_millis(300));
    check_stream(&streamer, "POST");
}

#[test]
fn sse_stream_is_not_buffered() {
    let streamer = StreamServer::start_sse(5, Duration::from_millis(300));
    check_stream(&streamer, "GET");
}

const BIG: u64 = 20 << 20;

#[test]
fn large_chunked_body_arrives_intact() {
    let echo = EchoServer::start();
    let gw = gateway([Route::chat(echo.addr)], &alice_keys());
    let mut reader = PatternReader::new(BIG);
    let mut resp = agent()
        .post(gw.url("/chat/upload"))
        .header("X-API-Key", ALICE_KEY)
        .send(ureq::SendBody::from_reader(&mut reader))
        .expect("upload");
    assert_eq!(resp.status(), 200);
    let json = body_json(&mut resp);
    assert_eq!(json["body_len"], BIG);
    assert_eq!(json["body_sha256"], pattern_sha256(BIG));
}

#[test]
fn large_content_length_body_arrives_intact() {
    let echo = EchoServer::start();
    let gw = gateway([Route::chat(echo.addr)], &alice_keys());
    let mut reader = PatternReader::new(BIG);
    let mut resp = agent()
        .put(gw.url("/chat/upload"))
        .header("X-API-Key", ALICE_KEY)
        .header("Content-Length", BIG.to_string())
        .send(ureq::SendBody::from_reader(&mut reader))
        .expect("upload");
    assert_eq!(resp.status(), 200);
    let json = body_json(&mut resp);
    assert_eq!(
        json["headers"]["content-length"],
        serde_json::json!([BIG.to_string()])
    );
    assert_eq!(json["body_len"], BIG);
    assert_eq!(json["body_sha256"], pattern_sha256(BIG));
}

#[test]
fn keep_alive_connection_serves_several_requests() {
    let echo = EchoServer::start();
    let gw = gateway([Route::chat(echo.addr)], &alice_keys());
    let stream = connect(gw.addr());
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    for i in 0..3 {
        let body = format!("body-{i}");
        write!(
            writer,
            "POST /chat/n{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {ALICE_KEY}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write request");
        let resp = read_response(&mut reader).expect("read a response");
        assert_eq!(resp.status, 200, "request {i}");
        let json: serde_json::Value = serde_json::from_slice(&resp.body).expect("JSON");
        assert_eq!(json["path"], format!("/n{i}"));
        assert_eq!(json["body_sha256"], sha256_hex(body.as_bytes()));
    }
    assert_eq!(echo.hits(), 3);
}

// ---------------------------------------------------------------------------
// The shipped configuration, with its upstreams pointed at echo servers
// ---------------------------------------------------------------------------

/// Runs `conf/gateway.yaml` as shipped, except for the listen address, the
/// key file and the upstream addresses (all pointed at `echo`).
fn shipped_gateway(echo: &EchoServer, keys: &KeyFile) -> Gateway {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/gateway.yaml"))
            .expect("read conf/gateway.yaml");
    let port = free_port();
    let up = echo.addr.to_string();
    let mut config = shipped
        .replace("\"127.0.0.1:8080\"", &format!("\"127.0.0.1:{port}\""))
        .replace("\"../keys/apikeys.json\"", "\"keys.json\"");
    for original in ["127.0.0.1:11434", "127.0.0.1:5002", "127.0.0.1:8000"] {
        config = config.replace(original, &up);
    }
    assert!(config.contains(&format!("127.0.0.1:{port}")), "{config}");
    assert!(config.contains("\"keys.json\""), "{config}");
    Gateway::start_raw(&config, keys, port)
}

fn shipped_keys() -> KeyFile {
    KeyFile::of([
        Key::new("user-key-0008", "user").services(["ollama", "tts", "openai"]),
        Key::new("admin-key-0009", "admin").service("*"),
    ])
}

#[test]
fn shipped_config_scopes_and_paths() {
    let echo = EchoServer::start();
    let gw = shipped_gateway(&echo, &shipped_keys());
    let send = |method: &str, path: &str, key: &str| {
        let agent = agent();
        let req = match method {
            "POST" => agent.post(gw.url(path)).header("X-API-Key", key).send("{}"),
            _ => agent.get(gw.url(path)).header("X-API-Key", key).call(),
        };
        req.expect("request")
    };
    // Ollama admin endpoints need the admin service.
    let mut resp = send("POST", "/ollama/api/pull", "user-key-0008");
    assert_gateway_error(&mut resp, 403, Some("user-key-0008"));
    let mut resp = send("POST", "/ollama/api/pull", "admin-key-0009");
    assert_eq!(resp.status(), 200);
    assert_eq!(body_json(&mut resp)["path"], "/api/pull");
    // Generation is POST only.
    let mut resp = send("GET", "/ollama/api/generate", "user-key-0008");
    assert_eq!(header(&resp, "allow").as_deref(), Some("POST"));
    assert_gateway_error(&mut resp, 405, None);
    // TTS strips, OpenAI keeps the path.
    let mut resp = send("POST", "/tts/speak", "user-key-0008");
    assert_eq!(body_json(&mut resp)["path"], "/speak");
    let mut resp = send("POST", "/v1/chat/completions", "user-key-0008");
    assert_eq!(body_json(&mut resp)["path"], "/v1/chat/completions");
}

/// The shipped config's scoped Ollama routes strip only `/ollama`, so
/// `/ollama/api/generate` reaches Ollama as `/api/generate`.
#[test]
fn shipped_config_ollama_generate_reaches_api_generate() {
    let echo = EchoServer::start();
    let gw = shipped_gateway(&echo, &shipped_keys());
    for (path, expected) in [
        ("/ollama/api/generate", "/api/generate"),
        ("/ollama/api/chat", "/api/chat"),
    ] {
        let mut resp = agent()
            .post(gw.url(path))
            .header("X-API-Key", "user-key-0008")
            .send("{}")
            .expect("request");
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(body_json(&mut resp)["path"], expected, "{path}");
    }
}
