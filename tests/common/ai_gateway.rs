//! The gateway of the `ai_*` tests (and the routes and keys of
//! `clients.rs`): routes with `api` in front of the mock model servers of
//! [`super::ai_upstream`], keys with model scopes and token budgets, and a
//! raw client that sends what the official clients send.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::ai_upstream::{AiOptions, AiServer};
use super::config::{GatewayConfig, Key, KeyFile, Route};
use super::gateway::{Gateway, DEFAULT_LOG_LEVEL};
use super::metrics::sample;
use super::raw_http::{read_response, RawResponse};
use super::util::{agent, read_lines_timed};

/// May use every model.
pub const ANN: &str = "ai-test-key-ann";

/// May use `llama3.2` and `qwen*`.
pub const BOB: &str = "ai-test-key-bob";

/// Token budget of 20 per minute.
pub const CAROL: &str = "ai-test-key-carol";

/// A key file of three keys for service `ai`: `ann` may use every model,
/// `bob` only `llama3.2` and `qwen*`, `carol` 20 tokens a minute.
pub fn ai_keys(ann: &str, bob: &str, carol: &str) -> KeyFile {
    KeyFile::of([
        Key::new(ann, "ann").service("ai"),
        Key::new(bob, "bob")
            .service("ai")
            .models(["llama3.2", "qwen*"]),
        Key::new(carol, "carol").service("ai").token_limit("20/min"),
    ])
}

/// `/ollama/` (prefix stripped, service `ai`, `api: ollama`) to `upstream`.
pub fn ollama_route(upstream: SocketAddr) -> Route {
    Route::stripped("ollama", "/ollama/", "ai", upstream).api("ollama")
}

/// `/anthropic/` (prefix stripped, service `ai`, `api: anthropic`) to
/// `upstream`: what Anthropic's SDK, given the base URL
/// `http://gateway/anthropic`, sends to `/anthropic/v1/messages`.
pub fn anthropic_route(upstream: SocketAddr) -> Route {
    Route::stripped("anthropic", "/anthropic/", "ai", upstream).api("anthropic")
}

/// `/v1/` (prefix kept, service `ai`, `api: openai`, `include_usage`) to
/// `upstream`.
pub fn openai_route(upstream: SocketAddr) -> Route {
    Route::new("openai", "/v1/", "ai")
        .api("openai")
        .include_usage(true)
        .upstream(upstream)
}

/// A gateway with an Ollama route (`/ollama/`), an OpenAI route with
/// `include_usage` (`/v1/`), one without (`/v1b/`), an Anthropic route
/// (`/anthropic/`, to the Ollama mock, which speaks the Messages API as
/// Ollama does) and a plain route (`/plain/`) to the Ollama mock, an admin
/// listener, the audit log and per-user metrics; `token_limit` is set on
/// each AI route.
pub struct Ai {
    pub gw: Gateway,
    pub admin: SocketAddr,
}

pub fn start_ai(ollama: &AiServer, openai: &AiServer, token_limit: Option<&str>) -> Ai {
    start_ai_logged(ollama, openai, token_limit, DEFAULT_LOG_LEVEL)
}

pub fn start_ai_logged(
    ollama: &AiServer,
    openai: &AiServer,
    token_limit: Option<&str>,
    log_level: &str,
) -> Ai {
    let limited = |r: Route| match token_limit {
        Some(rate) => r.token_limit(rate),
        None => r,
    };
    let gw = Gateway::start_with_log_level(
        &GatewayConfig::new()
            .with_admin()
            .audit_log("audit.log")
            .metrics_per_user(true)
            .route(limited(ollama_route(ollama.addr)))
            .route(limited(openai_route(openai.addr)))
            .route(limited(
                Route::new("openai-plain", "/v1b/", "ai")
                    .strip_prefix_part("/v1b")
                    .api("openai")
                    .upstream(openai.addr),
            ))
            .route(limited(anthropic_route(ollama.addr)))
            .route(Route::stripped("plain", "/plain/", "ai", ollama.addr)),
        ai_keys(ANN, BOB, CAROL),
        log_level,
    );
    let admin = gw.admin();
    Ai { gw, admin }
}

/// Sends a request on a new connection (`Content-Length` framed) and
/// reads the whole response.
pub fn ai_request(
    gw: &Gateway,
    method: &str,
    path: &str,
    key: &str,
    rid: &str,
    body: &[u8],
    headers: &str,
) -> RawResponse {
    let mut s = TcpStream::connect(gw.addr()).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nX-Request-Id: {rid}\r\nContent-Type: application/json\r\nAccept-Encoding: gzip, deflate\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send head");
    // The gateway may refuse (and close) before the body is all sent.
    let _ = s.write_all(body);
    read_response(&mut BufReader::new(s)).expect("a response")
}

/// Sends a request and reads until the connection closes: the status and
/// the raw bytes, for answers that break off.
pub fn ai_post_raw(gw: &Gateway, path: &str, key: &str, rid: &str, body: &Value) -> (u16, String) {
    let mut s = TcpStream::connect(gw.addr()).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nX-Request-Id: {rid}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

pub fn ai_post(gw: &Gateway, path: &str, key: &str, rid: &str, body: &Value) -> RawResponse {
    ai_request(gw, "POST", path, key, rid, body.to_string().as_bytes(), "")
}

pub fn ai_get(gw: &Gateway, path: &str, key: &str, rid: &str) -> RawResponse {
    ai_request(gw, "GET", path, key, rid, b"", "")
}

/// Sends `body` chunked, in pieces of `piece` bytes written one by one.
pub fn ai_post_chunked(
    gw: &Gateway,
    path: &str,
    key: &str,
    rid: &str,
    body: &[u8],
    piece: usize,
) -> RawResponse {
    let mut s = TcpStream::connect(gw.addr()).expect("connect to the gateway");
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nX-Request-Id: {rid}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("send head");
    for p in body.chunks(piece) {
        // The gateway may answer (and close) before the body is all sent.
        if s.write_all(format!("{:x}\r\n", p.len()).as_bytes())
            .is_err()
            || s.write_all(p).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
        let _ = s.flush();
    }
    let _ = s.write_all(b"0\r\n\r\n");
    read_response(&mut BufReader::new(s)).expect("a response")
}

/// The value of the metric line that starts with `series` (0 if absent).
pub fn metric_u64(text: &str, series: &str) -> u64 {
    sample(text, series).map_or(0, |v| v as u64)
}

/// The message of a refusal, in any of its shapes: the gateway's own and
/// Ollama's `{"error": "..."}`, OpenAI's and Anthropic's
/// `{..."error": {"message": "..."}}`.
pub fn error_of(r: &RawResponse) -> String {
    serde_json::from_slice::<Value>(&r.body).map_or_else(
        |_| format!("not JSON: {}", r.text()),
        |v| {
            let e = &v["error"];
            e.as_str()
                .or(e["message"].as_str())
                .unwrap_or_default()
                .to_string()
        },
    )
}

/// Reads a streamed answer line by line, each with when it arrived.
pub fn ai_stream_lines(
    gw: &Gateway,
    path: &str,
    key: &str,
    rid: &str,
    body: &Value,
) -> Vec<(String, Instant)> {
    let resp = agent()
        .post(&gw.url(path))
        .header("Authorization", &format!("Bearer {key}"))
        .header("X-Request-Id", rid)
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .expect("a streamed answer");
    assert_eq!(resp.status(), 200);
    read_lines_timed(resp.into_body().into_reader())
}

/// Every line arrived before the upstream wrote the one after it: nothing
/// was held back.
pub fn assert_streamed(lines: &[(String, Instant)], written: &[Instant]) {
    assert_eq!(lines.len(), written.len(), "one line per record: {lines:?}");
    for (i, (line, at)) in lines.iter().enumerate() {
        if let Some(next) = written.get(i + 1) {
            assert!(
                at < next,
                "line {i} ({line}) arrived only after the upstream wrote line {}",
                i + 1
            );
        }
    }
}

pub fn slow_ai(chunks: usize) -> AiOptions {
    AiOptions {
        chunks,
        delay: Duration::from_millis(150),
        ..AiOptions::default()
    }
}
