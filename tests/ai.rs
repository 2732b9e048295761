//! Routes with `api`: token usage read off answers as they stream (audit
//! line, metrics), `include_usage`, token budgets, model-scoped keys,
//! routing by model and the usage report, against the real binary and the
//! mock model servers of `tests/common/ai_upstream.rs`, with clients that
//! send what the official ones send (`tests/clients.rs` drives the
//! official Python libraries themselves).

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

/// May use every model.
const ANN: &str = "ai-test-key-ann";
/// May use `llama3.2` and `qwen*`.
const BOB: &str = "ai-test-key-bob";
/// Token budget of 20 per minute.
const CAROL: &str = "ai-test-key-carol";

fn keys() -> String {
    format!(
        r#"{{
  "{ANN}": {{"user": "ann", "service": "ai"}},
  "{BOB}": {{"user": "bob", "service": "ai", "models": ["llama3.2", "qwen*"]}},
  "{CAROL}": {{"user": "carol", "service": "ai", "token_limit": "20/min"}}
}}"#
    )
}

/// A gateway with an Ollama route (`/ollama/`), an OpenAI route with
/// `include_usage` (`/v1/`), one without (`/v1b/`), and a plain route
/// (`/plain/`) to the Ollama mock; `extra` is added to each AI route.
struct Ai {
    gw: Gateway,
    admin: SocketAddr,
}

fn start(ollama: &AiServer, openai: &AiServer, extra: &str) -> Ai {
    start_logged(ollama, openai, extra, DEFAULT_LOG_LEVEL)
}

fn start_logged(ollama: &AiServer, openai: &AiServer, extra: &str, log_level: &str) -> Ai {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let gw = Gateway::start_with_log_level(
        &format!(
            "admin_listen: \"{admin}\"\naudit_log: audit.log\nmetrics_per_user: true\nroutes:\n\
             \x20 - {{name: ollama, path_prefix: /ollama/, service: ai, strip_prefix: true, api: ollama, upstreams: [\"{o}\"]{extra}}}\n\
             \x20 - {{name: openai, path_prefix: /v1/, service: ai, api: openai, include_usage: true, upstreams: [\"{a}\"]{extra}}}\n\
             \x20 - {{name: openai-plain, path_prefix: /v1b/, service: ai, strip_prefix: /v1b, api: openai, upstreams: [\"{a}\"]{extra}}}\n\
             \x20 - {{name: plain, path_prefix: /plain/, service: ai, strip_prefix: true, upstreams: [\"{o}\"]}}\n",
            o = ollama.addr,
            a = openai.addr,
        ),
        &keys(),
        log_level,
    );
    Ai { gw, admin }
}

/// Sends a request on a new connection (`Content-Length` framed) and
/// reads the whole response.
fn send(
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
fn send_raw(gw: &Gateway, path: &str, key: &str, rid: &str, body: &Value) -> (u16, String) {
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

fn post(gw: &Gateway, path: &str, key: &str, rid: &str, body: &Value) -> RawResponse {
    send(gw, "POST", path, key, rid, body.to_string().as_bytes(), "")
}

fn get(gw: &Gateway, path: &str, key: &str, rid: &str) -> RawResponse {
    send(gw, "GET", path, key, rid, b"", "")
}

/// Sends `body` chunked, in pieces of `piece` bytes written one by one.
fn send_chunked(
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

fn audit_path(gw: &Gateway) -> std::path::PathBuf {
    gw.dir.path().join("audit.log")
}

/// The audit line of request `rid`, once written.
fn audit(gw: &Gateway, rid: &str) -> Value {
    let path = audit_path(gw);
    let mut found = None;
    let ok = wait_until(Duration::from_secs(10), || {
        found = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(|v| v["request_id"] == rid)
            });
        found.is_some()
    });
    assert!(ok, "no audit line for {rid}:\n{}", gw.log());
    found.unwrap_or(Value::Null)
}

fn metrics(admin: SocketAddr) -> String {
    agent()
        .get(&format!("http://{admin}/metrics"))
        .call()
        .expect("metrics answer")
        .body_mut()
        .read_to_string()
        .expect("metrics text")
}

/// The value of the metric line that starts with `series` (0 if absent).
fn metric(text: &str, series: &str) -> u64 {
    sample(text, series).map_or(0, |v| v as u64)
}

fn error_of(r: &RawResponse) -> String {
    serde_json::from_slice::<Value>(&r.body).map_or_else(
        |_| format!("not JSON: {}", r.text()),
        |v| v["error"].as_str().unwrap_or_default().to_string(),
    )
}

/// Reads a streamed answer line by line, each with when it arrived.
fn stream_lines(
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
fn assert_streamed(lines: &[(String, Instant)], written: &[Instant]) {
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

fn slow(chunks: usize) -> AiOptions {
    AiOptions {
        chunks,
        delay: Duration::from_millis(150),
        ..AiOptions::default()
    }
}

#[test]
fn ollama_tokens_are_read_from_streams_and_single_answers() {
    let ollama = AiServer::start(slow(5));
    let openai = AiServer::start(AiOptions::default());
    let ai = start(&ollama, &openai, "");
    let gw = &ai.gw;

    let body = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]});
    let lines = stream_lines(gw, "/ollama/api/chat", ANN, "o-stream", &body);
    let sent = ollama.sent();
    assert_streamed(&lines, &sent[0].written);
    let last: Value = serde_json::from_str(&lines[5].0).expect("the final record");
    assert_eq!(
        last["eval_count"], 5,
        "the final record reaches the client unchanged"
    );

    let r = post(
        gw,
        "/ollama/api/generate",
        ANN,
        "o-single",
        &json!({"model": "llama3.2", "prompt": "hi", "stream": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(
        gw,
        "/ollama/api/embed",
        ANN,
        "o-embed",
        &json!({"model": "llama3.2", "input": "hi"}),
    );
    assert_eq!(r.status, 200);
    let r = post(gw, "/plain/api/chat", ANN, "o-plain", &body);
    assert_eq!(r.status, 200);

    for (rid, completion) in [("o-stream", 5), ("o-single", 5), ("o-embed", 0)] {
        let a = audit(gw, rid);
        assert_eq!(a["model"], "llama3.2", "{a}");
        assert_eq!(a["prompt_tokens"], 11, "{a}");
        assert_eq!(a["completion_tokens"], completion, "{a}");
        assert_eq!(a["usage"], "reported", "{a}");
    }
    let plain = audit(gw, "o-plain");
    for field in ["model", "prompt_tokens", "completion_tokens", "usage"] {
        assert_eq!(
            plain[field],
            Value::Null,
            "a route without api reads nothing: {plain}"
        );
    }

    let m = metrics(ai.admin);
    assert_eq!(
        metric(
            &m,
            r#"agw_tokens_total{kind="prompt",model="llama3.2",route="ollama"}"#
        ),
        33,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"agw_tokens_total{kind="completion",model="llama3.2",route="ollama"}"#
        ),
        10,
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"agw_user_tokens_total{kind="prompt",user="ann"}"#),
        33,
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"agw_usage_total{route="ollama",source="reported"}"#),
        3,
        "{m}"
    );
    assert!(!m.contains(r#"route="plain",source"#), "{m}");
}

/// The SSE events of a body, without the blank lines.
fn events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| json!(d)))
        .collect()
}

fn is_usage_only(e: &Value) -> bool {
    e["choices"] == json!([]) && e["usage"].is_object()
}

#[test]
fn openai_usage_from_json_and_sse_and_include_usage_added_and_hidden() {
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions {
        prompt_tokens: 7,
        ..slow(4)
    });
    let ai = start(&ollama, &openai, "");
    let gw = &ai.gw;

    // A client that did not ask: the upstream is asked, the client never
    // sees the usage-only event, and the events come as they are written.
    let body =
        json!({"model": "qwen2", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let lines = stream_lines(gw, "/v1/chat/completions", ANN, "s-hidden", &body);
    let seen = &openai.requests()[0];
    assert_eq!(
        seen.json()["stream_options"]["include_usage"],
        true,
        "the upstream was asked for usage"
    );
    assert_eq!(
        seen.head.header("content-length"),
        Some(seen.body.len().to_string().as_str())
    );
    assert_eq!(
        seen.head.header("accept-encoding"),
        None,
        "answers must be readable"
    );
    let got: Vec<Value> = lines
        .iter()
        .map(|(l, _)| {
            serde_json::from_str(l.trim_start_matches("data: ")).unwrap_or_else(|_| json!(l))
        })
        .collect();
    assert_eq!(got.len(), 5, "4 chunks and [DONE], no usage event: {got:?}");
    assert!(!got.iter().any(is_usage_only), "{got:?}");
    assert_eq!(got[4], json!("data: [DONE]"));
    let written = &openai.sent()[0].written;
    assert_eq!(written.len(), 6, "4 chunks, the usage event, [DONE]");
    for (i, (_, at)) in lines.iter().take(3).enumerate() {
        assert!(at < &written[i + 1], "event {i} was held back");
    }

    // A client that asked gets the body it sent, and the usage event.
    let asked = json!({"model": "qwen2", "messages": [], "stream": true, "stream_options": {"include_usage": true}});
    let r = post(gw, "/v1/chat/completions", ANN, "s-asked", &asked);
    assert_eq!(r.status, 200);
    assert_eq!(
        openai.requests()[1].body_sha256,
        sha256_hex(asked.to_string().as_bytes()),
        "forwarded byte for byte"
    );
    let evs = events(&r.text());
    assert!(evs.iter().any(is_usage_only), "{evs:?}");

    let r = post(
        gw,
        "/v1/chat/completions",
        ANN,
        "s-json",
        &json!({"model": "qwen2", "messages": []}),
    );
    assert_eq!(r.status, 200);
    let r = post(
        gw,
        "/v1/embeddings",
        ANN,
        "s-embed",
        &json!({"model": "qwen2", "input": "hi"}),
    );
    assert_eq!(r.status, 200);
    // Without include_usage on the route, a stream is estimated.
    let r = post(gw, "/v1b/v1/chat/completions", ANN, "s-estimated", &body);
    assert_eq!(r.status, 200);
    assert!(openai.requests()[4].json().get("stream_options").is_none());

    for (rid, prompt, completion, source) in [
        ("s-hidden", json!(7), json!(4), "reported"),
        ("s-asked", json!(7), json!(4), "reported"),
        ("s-json", json!(7), json!(4), "reported"),
        ("s-embed", json!(7), json!(0), "reported"),
        ("s-estimated", Value::Null, json!(4), "estimated"),
    ] {
        let a = audit(gw, rid);
        assert_eq!(
            (&a["prompt_tokens"], &a["completion_tokens"], &a["usage"]),
            (&prompt, &completion, &json!(source)),
            "{rid}: {a}"
        );
        assert_eq!(a["model"], "qwen2");
    }
    let m = metrics(ai.admin);
    assert_eq!(
        metric(
            &m,
            r#"agw_tokens_total{kind="prompt",model="qwen2",route="openai"}"#
        ),
        28,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"agw_tokens_total{kind="completion",model="qwen2",route="openai-plain"}"#
        ),
        4,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"agw_usage_total{route="openai-plain",source="estimated"}"#
        ),
        1,
        "{m}"
    );
}

#[test]
fn a_stream_cut_short_counts_what_it_can_and_logs_nothing_about_usage() {
    let ollama = AiServer::start(AiOptions {
        fault: Fault::CutAfter(3),
        ..AiOptions::default()
    });
    let openai = AiServer::start(AiOptions {
        fault: Fault::CutAfter(2),
        ..AiOptions::default()
    });
    let ai = start(&ollama, &openai, "");
    let gw = &ai.gw;
    let (status, text) = send_raw(
        gw,
        "/ollama/api/chat",
        ANN,
        "cut-o",
        &json!({"model": "llama3.2", "messages": []}),
    );
    assert_eq!(status, 200);
    assert_eq!(
        text.matches("\"done\":false").count(),
        3,
        "what was written arrived: {text}"
    );
    let (status, text) = send_raw(
        gw,
        "/v1/chat/completions",
        ANN,
        "cut-s",
        &json!({"model": "qwen2", "messages": [], "stream": true}),
    );
    assert_eq!(status, 200);
    assert_eq!(text.matches("data: {").count(), 2, "{text}");
    for (rid, n) in [("cut-o", 3), ("cut-s", 2)] {
        let a = audit(gw, rid);
        assert_eq!(a["usage"], "estimated", "{a}");
        assert_eq!(a["completion_tokens"], n, "{a}");
        assert_eq!(a["prompt_tokens"], Value::Null, "{a}");
    }
    let log = gw.log();
    let alarming: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("usage") || l.contains("token") || l.contains("ai_gateway::proxy::ai")
        })
        .collect();
    assert!(alarming.is_empty(), "{alarming:?}");
}

#[test]
fn compressed_and_non_json_answers_pass_through_as_unknown() {
    let gzip = AiServer::start(AiOptions {
        fault: Fault::Gzip,
        ..AiOptions::default()
    });
    let text = AiServer::start(AiOptions {
        fault: Fault::NotJson,
        ..AiOptions::default()
    });
    let ai = start(&gzip, &text, "");
    let gw = &ai.gw;
    let r = post(
        gw,
        "/ollama/api/chat",
        ANN,
        "gz",
        &json!({"model": "llama3.2", "messages": [], "stream": false}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&r.body[..])
        .read_to_string(&mut plain)
        .expect("the gzip body arrives intact");
    assert_eq!(
        serde_json::from_str::<Value>(&plain).expect("JSON inside")["prompt_eval_count"],
        11
    );
    let r = post(
        gw,
        "/v1/chat/completions",
        ANN,
        "txt",
        &json!({"model": "qwen2", "messages": []}),
    );
    assert_eq!((r.status, r.text().as_str()), (200, "this is not json"));
    for rid in ["gz", "txt"] {
        let a = audit(gw, rid);
        assert_eq!(a["status"], 200, "{a}");
        assert_eq!(a["usage"], "unknown", "{a}");
        assert_eq!(
            (&a["prompt_tokens"], &a["completion_tokens"]),
            (&Value::Null, &Value::Null),
            "{a}"
        );
    }
    let m = metrics(ai.admin);
    assert_eq!(
        metric(&m, r#"agw_usage_total{route="ollama",source="unknown"}"#),
        1,
        "{m}"
    );
}

#[test]
fn a_token_budget_lets_the_crossing_request_finish_then_refuses_until_the_window_ends() {
    // Each chat: 11 prompt + 4 completion = 15 tokens; carol may use 20 a
    // minute.
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions::default());
    let ai = start(&ollama, &openai, "");
    let gw = &ai.gw;
    let chat = json!({"model": "llama3.2", "messages": [], "stream": true});
    let r = post(gw, "/ollama/api/chat", CAROL, "b-1", &chat);
    assert_eq!(r.status, 200);
    audit(gw, "b-1");
    let r = post(gw, "/ollama/api/chat", CAROL, "b-2", &chat);
    assert_eq!(r.status, 200, "15 of 20 used: admitted, and it completes");
    assert_eq!(
        r.text().lines().count(),
        5,
        "the stream that crosses the budget is not cut"
    );
    audit(gw, "b-2");
    let refused = post(gw, "/ollama/api/chat", CAROL, "b-3", &chat);
    assert_eq!(refused.status, 429);
    assert_eq!(error_of(&refused), "token budget exceeded");
    let wait: u64 = refused
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(audit(gw, "b-3")["decision"], "token_budget_exceeded");
    assert_eq!(
        ollama.requests().len(),
        2,
        "the refused request never went upstream"
    );

    // keygen adds a key, which reloads: the budget is still used up.
    let out = run_cli(
        &[
            "keygen",
            "--user",
            "dave",
            "--service",
            "ai",
            "--token-limit",
            "1M/day",
            "--config",
            gw.config_path.to_str().expect("utf-8"),
        ],
        gw.dir.path(),
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        gw.wait_log_contains("generation 2", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    let r = post(gw, "/ollama/api/chat", CAROL, "b-4", &chat);
    assert_eq!(r.status, 429, "the reload did not reset the budget");
    let r = post(gw, "/ollama/api/chat", ANN, "b-5", &chat);
    assert_eq!(r.status, 200, "other keys are not affected");
    // The budget counts on routes with api only.
    let r = post(gw, "/plain/api/chat", CAROL, "b-6", &chat);
    assert_eq!(r.status, 200);
    let m = metrics(ai.admin);
    assert_eq!(
        metric(&m, r#"agw_refused_total{reason="token_budget_exceeded"}"#),
        2,
        "{m}"
    );
}

#[test]
fn a_route_default_token_budget_applies_to_keys_without_their_own() {
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions::default());
    let ai = start(&ollama, &openai, ", token_limit: 10/h");
    let gw = &ai.gw;
    let body = json!({"model": "qwen2", "messages": []});
    assert_eq!(
        post(gw, "/v1/chat/completions", ANN, "r-1", &body).status,
        200
    );
    audit(gw, "r-1");
    let r = post(gw, "/v1/chat/completions", ANN, "r-2", &body);
    assert_eq!(r.status, 429);
    let wait: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!(wait > 3_000 && wait <= 3_600, "{wait}");
    assert_eq!(
        post(gw, "/v1/chat/completions", CAROL, "r-3", &body).status,
        200,
        "a key's own budget wins"
    );
}

fn chat_body(model_first: bool, model: &str, filler: usize) -> Vec<u8> {
    let messages = json!([{"role": "user", "content": "x".repeat(filler)}]);
    let v = if model_first {
        format!(r#"{{"model":"{model}","messages":{messages},"stream":false}}"#)
    } else {
        format!(r#"{{"messages":{messages},"stream":false,"model":"{model}"}}"#)
    };
    v.into_bytes()
}

/// What a model-scoped request must end in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// 200, the body forwarded byte for byte.
    Passed,
    /// Refused before the upstream saw anything.
    Refused(u16),
    /// Refused as the body streamed on: the upstream got the head, never
    /// the whole body.
    RefusedLate(u16),
}

#[test]
fn model_scoped_keys_are_refused_other_models_wherever_the_body_names_them() {
    use Expect::*;
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions::default());
    let ai = start_logged(&ollama, &openai, "", "debug");
    let gw = &ai.gw;
    let path = "/v1/chat/completions";
    let twice = br#"{"model":"qwen2","messages":[],"MODEL":"mistral"}"#.to_vec();
    let escaped = br#"{"mod\u0065l":"mistral","messages":[]}"#.to_vec();
    // (request id, body, sent chunked in pieces of, expected end)
    let cases: Vec<(&str, Vec<u8>, Option<usize>, Expect)> = vec![
        (
            "m-first-no",
            chat_body(true, "mistral", 10),
            None,
            Refused(403),
        ),
        (
            "m-first-ok",
            chat_body(true, "qwen2.5:7b", 10),
            None,
            Passed,
        ),
        (
            "m-last-no",
            chat_body(false, "mistral", 10),
            None,
            Refused(403),
        ),
        (
            "m-last-ok",
            chat_body(false, "llama3.2:latest", 10),
            None,
            Passed,
        ),
        // After 70 KiB of messages: past the part read before choosing an
        // upstream, so checked as the body streams on.
        (
            "m-big-last-no",
            chat_body(false, "mistral", 70_000),
            None,
            RefusedLate(403),
        ),
        (
            "m-big-last-ok",
            chat_body(false, "qwen2", 70_000),
            None,
            Passed,
        ),
        (
            "m-big-first-no",
            chat_body(true, "mistral", 100_000),
            None,
            Refused(403),
        ),
        (
            "m-big-first-ok",
            chat_body(true, "qwen2", 100_000),
            None,
            Passed,
        ),
        // Chunked, in many small pieces, model after 40 KiB of messages.
        (
            "m-chunked-no",
            chat_body(false, "mistral", 40_000),
            Some(1000),
            Refused(403),
        ),
        (
            "m-chunked-ok",
            chat_body(false, "qwen2", 40_000),
            Some(1000),
            Passed,
        ),
        // Chunked past 64 KiB: the read that crosses 64 KiB is sent on in
        // front of the next piece.
        (
            "m-chunked-big-no",
            chat_body(false, "mistral", 100_000),
            Some(5000),
            RefusedLate(403),
        ),
        (
            "m-chunked-big-ok",
            chat_body(false, "qwen2", 100_000),
            Some(5000),
            Passed,
        ),
        (
            "m-chunked-big-first-ok",
            chat_body(true, "qwen2", 150_000),
            Some(3000),
            Passed,
        ),
        // Named twice (Go's decoder takes the last, in any case): every
        // one must be allowed.
        ("m-twice", twice, None, Refused(403)),
        ("m-escaped", escaped, None, Refused(403)),
        ("m-none", br#"{"messages":[]}"#.to_vec(), None, Refused(400)),
        (
            "m-none-big",
            format!(
                r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
                "x".repeat(70_000)
            )
            .into_bytes(),
            None,
            RefusedLate(400),
        ),
        ("m-not-json", b"model=qwen2".to_vec(), None, Refused(400)),
        (
            "m-two-objects",
            br#"{"model":"qwen2"}{"model":"mistral"}"#.to_vec(),
            None,
            Refused(400),
        ),
    ];
    for (rid, body, chunked, expect) in &cases {
        let (heads, completed) = (openai.heads(), openai.requests().len());
        let r = match chunked {
            Some(piece) => send_chunked(gw, path, BOB, rid, body, *piece),
            None => send(gw, "POST", path, BOB, rid, body, ""),
        };
        match expect {
            Passed => {
                assert_eq!(r.status, 200, "{rid}: {}", r.text());
                let got = openai
                    .requests()
                    .last()
                    .cloned()
                    .expect("the request reached the upstream");
                assert_eq!(
                    got.body_sha256,
                    sha256_hex(body),
                    "{rid}: the body is forwarded byte for byte"
                );
                assert_eq!(got.body.len(), body.len(), "{rid}");
            }
            Refused(status) | RefusedLate(status) => {
                assert_eq!(r.status, *status, "{rid}: {}", r.text());
                let want = if *status == 403 {
                    "model not allowed for this key"
                } else {
                    "the request body must be a JSON object that names the model"
                };
                assert_eq!(error_of(&r), want, "{rid}");
                assert_eq!(
                    openai.requests().len(),
                    completed,
                    "{rid}: no whole request reached the upstream"
                );
                let late = matches!(expect, RefusedLate(_));
                assert!(
                    wait_until(Duration::from_secs(5), || (openai.heads() > heads) == late),
                    "{rid}: the upstream saw the head: {}",
                    openai.heads() > heads
                );
            }
        }
    }
    // The bodies over 64 KiB went both ways: in the retry buffer, and in
    // front of the next piece after the read that crossed 64 KiB.
    let log = gw.log();
    assert!(
        log.contains("body bytes before choosing an upstream, in the retry buffer"),
        "{log}"
    );
    assert!(
        log.contains("body bytes before choosing an upstream, past the retry buffer"),
        "{log}"
    );
    let a = audit(gw, "m-first-no");
    assert_eq!(
        (&a["decision"], &a["model"]),
        (&json!("model_not_allowed"), &json!("mistral")),
        "{a}"
    );
    assert_eq!(audit(gw, "m-none")["decision"], "model_unreadable");
    let late = audit(gw, "m-big-last-no");
    assert_eq!(
        (&late["decision"], &late["status"]),
        (&json!("model_not_allowed"), &json!(403)),
        "{late}"
    );
    // A key without `models` may use any.
    let r = send(
        gw,
        "POST",
        path,
        ANN,
        "m-ann",
        &chat_body(false, "mistral", 70_000),
        "",
    );
    assert_eq!(r.status, 200);
    // Ollama's `name` counts as a model too.
    let r = post(
        gw,
        "/ollama/api/show",
        BOB,
        "m-name",
        &json!({"name": "mistral"}),
    );
    assert_eq!(r.status, 403);
    let m = metrics(ai.admin);
    assert_eq!(
        metric(&m, r#"agw_refused_total{reason="model_not_allowed"}"#),
        9,
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"agw_refused_total{reason="model_unreadable"}"#),
        4,
        "{m}"
    );
}

#[test]
fn model_lists_show_a_scoped_key_only_its_models() {
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions::default());
    let ai = start(&ollama, &openai, "");
    let gw = &ai.gw;
    let names = |r: &RawResponse, list: &str, field: &str| -> Vec<String> {
        let v: Value =
            serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()));
        v[list]
            .as_array()
            .expect("a list")
            .iter()
            .map(|m| m[field].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let r = get(gw, "/ollama/api/tags", BOB, "l-bob-tags");
    assert_eq!(r.status, 200);
    assert_eq!(
        names(&r, "models", "name"),
        ["llama3.2:latest", "qwen2.5:7b"]
    );
    let r = get(gw, "/ollama/api/tags", ANN, "l-ann-tags");
    assert_eq!(
        names(&r, "models", "name"),
        ["llama3.2:latest", "qwen2.5:7b", "mistral:7b"]
    );
    assert_eq!(
        r.header("content-length").map(str::to_owned),
        Some(r.body.len().to_string()),
        "unfiltered: as sent"
    );
    let r = get(gw, "/v1/models", BOB, "l-bob-models");
    assert_eq!(names(&r, "data", "id"), ["llama3.2:latest", "qwen2.5:7b"]);
    assert!(
        r.header("content-length")
            .is_none_or(|l| l == r.body.len().to_string()),
        "no stale Content-Length"
    );
    assert_eq!(
        get(gw, "/v1/models/mistral:7b", BOB, "l-bob-one").status,
        403
    );
    assert_eq!(
        get(gw, "/v1/models/qwen2.5:7b", BOB, "l-bob-two").status,
        200
    );
    let r = get(gw, "/ollama/api/ps", BOB, "l-bob-ps");
    assert_eq!(
        names(&r, "models", "model"),
        ["llama3.2:latest", "qwen2.5:7b"]
    );
}

#[test]
fn routing_by_model_reaches_the_server_that_hosts_it() {
    let llama = AiServer::start(AiOptions::default());
    let qwen = AiServer::start(AiOptions::default());
    let other = AiServer::start(AiOptions::default());
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let gw = Gateway::start(
        &format!(
            "admin_listen: \"{admin}\"\naudit_log: audit.log\nroutes:\n\
             \x20 - {{name: chat, path_prefix: /v1/, service: ai, api: openai, upstreams: [\"{}\"], models: {{\"llama3*\": [\"{}\"], \"qwen*\": [\"{}\"]}}}}\n",
            other.addr, llama.addr, qwen.addr
        ),
        &keys(),
    );
    let chat = |model: &str, rid: &str| {
        let r = post(
            &gw,
            "/v1/chat/completions",
            ANN,
            rid,
            &json!({"messages": [], "model": model}),
        );
        assert_eq!(r.status, 200, "{rid}");
        audit(&gw, rid)["upstream"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(chat("llama3.2", "rt-1"), llama.addr.to_string());
    assert_eq!(chat("LLAMA3.1:8b", "rt-2"), llama.addr.to_string());
    assert_eq!(chat("qwen2.5:7b", "rt-3"), qwen.addr.to_string());
    assert_eq!(chat("mistral", "rt-4"), other.addr.to_string());
    let r = get(&gw, "/v1/models", ANN, "rt-5");
    assert_eq!(r.status, 200);
    assert_eq!(
        audit(&gw, "rt-5")["upstream"],
        other.addr.to_string(),
        "no model: the route's upstreams"
    );
    // A model named only after the first 64 KiB: the route's upstreams.
    let r = send(
        &gw,
        "POST",
        "/v1/chat/completions",
        ANN,
        "rt-6",
        &chat_body(false, "qwen2", 70_000),
        "",
    );
    assert_eq!(r.status, 200);
    assert_eq!(audit(&gw, "rt-6")["upstream"], other.addr.to_string());
    assert_eq!((llama.requests().len(), qwen.requests().len()), (2, 1));
}

#[test]
fn expect_continue_is_answered_when_the_gateway_reads_the_body_first() {
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions::default());
    let ai = start(&ollama, &openai, "");
    let mut s = TcpStream::connect(ai.gw.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let body = chat_body(true, "qwen2", 2_000);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {BOB}\r\nExpect: 100-continue\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("head");
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    // An interim answer has no body: its head ends at the blank line.
    let mut interim = String::new();
    while !interim.ends_with("\r\n\r\n") {
        let n = std::io::BufRead::read_line(&mut reader, &mut interim)
            .expect("an interim answer before the body");
        assert!(n > 0, "closed: {interim:?}");
    }
    assert!(interim.starts_with("HTTP/1.1 100 "), "{interim:?}");
    s.write_all(&body).expect("body");
    let r = read_response(&mut reader).expect("the answer");
    assert_eq!(r.status, 200, "{}", r.text());
    let got = &openai.requests()[0];
    assert_eq!(
        got.head.header("expect"),
        None,
        "the upstream is not asked to continue again"
    );
    assert_eq!(got.body_sha256, sha256_hex(&body));
}

/// Runs `ai-gateway usage` with `args` and parses its JSON.
fn usage_json(gw: &Gateway, args: &[&str]) -> Value {
    let mut all = vec![
        "usage",
        "--json",
        "--config",
        gw.config_path.to_str().expect("utf-8"),
    ];
    all.extend_from_slice(args);
    let out = run_cli(&all, gw.dir.path());
    assert!(out.status.success(), "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn gzip_file(from: &Path, to: &Path) {
    let data = std::fs::read(from).expect("read the rotated log");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(to).expect("create .gz"),
        flate2::Compression::default(),
    );
    enc.write_all(&data).expect("compress");
    enc.finish().expect("finish .gz");
    std::fs::remove_file(from).expect("remove the uncompressed file");
}

#[test]
fn the_usage_report_totals_what_the_upstreams_sent_across_rotated_logs() {
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions {
        prompt_tokens: 7,
        chunks: 3,
        ..AiOptions::default()
    });
    let ai = start(&ollama, &openai, "");
    let gw = &ai.gw;
    let chat = json!({"model": "llama3.2", "messages": []});
    let sse = json!({"model": "qwen2", "messages": [], "stream": true});
    // First day's traffic, then logrotate: move, SIGUSR1, compress later.
    assert_eq!(post(gw, "/ollama/api/chat", ANN, "u-1", &chat).status, 200);
    assert_eq!(
        post(gw, "/v1/chat/completions", BOB, "u-2", &sse).status,
        200
    );
    assert_eq!(
        post(
            gw,
            "/v1/chat/completions",
            BOB,
            "u-3",
            &json!({"model": "mistral"})
        )
        .status,
        403
    );
    audit(gw, "u-3");
    let log = audit_path(gw);
    std::fs::rename(&log, gw.dir.path().join("audit.log.1")).expect("rotate");
    gw.signal("USR1");
    assert!(wait_until(Duration::from_secs(10), || {
        let _ = get(gw, "/ollama/api/tags", ANN, "u-probe");
        log.exists()
    }));
    gzip_file(
        &gw.dir.path().join("audit.log.1"),
        &gw.dir.path().join("audit.log.2.gz"),
    );
    assert_eq!(
        post(
            gw,
            "/ollama/api/generate",
            BOB,
            "u-4",
            &json!({"model": "qwen2", "prompt": "x", "stream": false})
        )
        .status,
        200
    );
    assert_eq!(
        post(
            gw,
            "/v1/embeddings",
            ANN,
            "u-5",
            &json!({"model": "qwen2", "input": "x"})
        )
        .status,
        200
    );
    audit(gw, "u-5");

    let (op, oc) = ollama.reported_tokens();
    let (ap, ac) = openai.reported_tokens();
    let report = usage_json(gw, &["--by", "user"]);
    assert_eq!(report["total"]["prompt_tokens"], op + ap, "{report}");
    assert_eq!(report["total"]["completion_tokens"], oc + ac, "{report}");
    assert_eq!(
        report["files"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    let ann = &report["groups"]["ann"];
    assert_eq!(
        (&ann["prompt_tokens"], &ann["completion_tokens"]),
        (&json!(11 + 7), &json!(4)),
        "{report}"
    );
    let bob = &report["groups"]["bob"];
    assert_eq!(
        (&bob["requests"], &bob["errors"]),
        (&json!(3), &json!(1)),
        "{report}"
    );
    assert_eq!(bob["total_tokens"], 7 + 3 + 11 + 4, "{report}");
    let by_model = usage_json(gw, &["--by", "model"]);
    assert_eq!(
        by_model["groups"]["qwen2"]["total_tokens"],
        10 + 15 + 7,
        "{by_model}"
    );
    assert_eq!(
        by_model["groups"]["llama3.2"]["total_tokens"], 15,
        "{by_model}"
    );
    let recent = usage_json(gw, &["--by", "key", "--since", "1h"]);
    assert_eq!(recent["total"]["requests"], report["total"]["requests"]);
    let future = usage_json(gw, &["--since", "2999-01-01"]);
    assert_eq!(future["total"]["requests"], 0);

    let out = run_cli(
        &[
            "usage",
            "--audit-log",
            log.to_str().expect("utf-8"),
            "--by",
            "user",
        ],
        gw.dir.path(),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let rows: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "USER",
            "REQUESTS",
            "ERRORS",
            "PROMPT",
            "COMPLETION",
            "TOTAL"
        ],
        "{}",
        out.stdout
    );
    let total = rows
        .iter()
        .find(|r| r.first() == Some(&"total"))
        .expect("a total row");
    assert_eq!(total[3], (op + ap).to_string(), "{}", out.stdout);
    assert_eq!(total[4], (oc + ac).to_string(), "{}", out.stdout);
}
