//! What routes with `api` allow: token budgets (the crossing request
//! finishes, then refusals until the window ends; a route's default),
//! model-scoped keys (refused other models wherever the body names them,
//! model lists filtered), routing by model, `Expect: 100-continue`
//! when the gateway reads the body first, and refusals in the error shape
//! of each route's API.
//!
//! Against the real binary and the mock model servers of
//! `tests/common/ai_upstream.rs`, with clients that send what the official
//! ones send (`tests/clients.rs` drives the official Python libraries
//! themselves).

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};

use common::ai_gateway::*;
use common::*;

#[test]
fn a_token_budget_lets_the_crossing_request_finish_then_refuses_until_the_window_ends() {
    // Each chat: 11 prompt + 4 completion = 15 tokens; carol may use 20 a
    // minute.
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions::default());
    let ai = start_ai(&ollama, &openai, None);
    let gw = &ai.gw;
    let chat = json!({"model": "llama3.2", "messages": [], "stream": true});
    let r = ai_post(gw, "/ollama/api/chat", CAROL, "b-1", &chat);
    assert_eq!(r.status, 200);
    audit_of(gw, "b-1");
    let r = ai_post(gw, "/ollama/api/chat", CAROL, "b-2", &chat);
    assert_eq!(r.status, 200, "15 of 20 used: admitted, and it completes");
    assert_eq!(
        r.text().lines().count(),
        5,
        "the stream that crosses the budget is not cut"
    );
    audit_of(gw, "b-2");
    let refused = ai_post(gw, "/ollama/api/chat", CAROL, "b-3", &chat);
    assert_eq!(refused.status, 429);
    assert_eq!(error_of(&refused), "token budget exceeded");
    let wait: u64 = refused
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(audit_of(gw, "b-3")["decision"], "token_budget_exceeded");
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
    let r = ai_post(gw, "/ollama/api/chat", CAROL, "b-4", &chat);
    assert_eq!(r.status, 429, "the reload did not reset the budget");
    let r = ai_post(gw, "/ollama/api/chat", ANN, "b-5", &chat);
    assert_eq!(r.status, 200, "other keys are not affected");
    // The budget counts on routes with api only.
    let r = ai_post(gw, "/plain/api/chat", CAROL, "b-6", &chat);
    assert_eq!(r.status, 200);
    let m = metrics_text(ai.admin);
    assert_eq!(
        metric_u64(&m, r#"agw_refused_total{reason="token_budget_exceeded"}"#),
        2,
        "{m}"
    );
}

#[test]
fn a_route_default_token_budget_applies_to_keys_without_their_own() {
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions::default());
    let ai = start_ai(&ollama, &openai, Some("10/h"));
    let gw = &ai.gw;
    let body = json!({"model": "qwen2", "messages": []});
    assert_eq!(
        ai_post(gw, "/v1/chat/completions", ANN, "r-1", &body).status,
        200
    );
    audit_of(gw, "r-1");
    let r = ai_post(gw, "/v1/chat/completions", ANN, "r-2", &body);
    assert_eq!(r.status, 429);
    let wait: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!(wait > 3_000 && wait <= 3_600, "{wait}");
    assert_eq!(
        ai_post(gw, "/v1/chat/completions", CAROL, "r-3", &body).status,
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
    let ai = start_ai_logged(&ollama, &openai, None, "debug");
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
            Some(piece) => ai_post_chunked(gw, path, BOB, rid, body, *piece),
            None => ai_request(gw, "POST", path, BOB, rid, body, ""),
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
    let a = audit_of(gw, "m-first-no");
    assert_eq!(
        (&a["decision"], &a["model"]),
        (&json!("model_not_allowed"), &json!("mistral")),
        "{a}"
    );
    assert_eq!(audit_of(gw, "m-none")["decision"], "model_unreadable");
    let late = audit_of(gw, "m-big-last-no");
    assert_eq!(
        (&late["decision"], &late["status"]),
        (&json!("model_not_allowed"), &json!(403)),
        "{late}"
    );
    // A key without `models` may use any.
    let r = ai_request(
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
    let r = ai_post(
        gw,
        "/ollama/api/show",
        BOB,
        "m-name",
        &json!({"name": "mistral"}),
    );
    assert_eq!(r.status, 403);
    // A request is counted in `logging`, just after its answer went out:
    // wait for the last one's count, not for a time.
    let not_allowed = r#"agw_refused_total{reason="model_not_allowed"}"#;
    wait_until(Duration::from_secs(5), || {
        metric_u64(&metrics_text(ai.admin), not_allowed) >= 9
    });
    let m = metrics_text(ai.admin);
    assert_eq!(metric_u64(&m, not_allowed), 9, "{m}");
    assert_eq!(
        metric_u64(&m, r#"agw_refused_total{reason="model_unreadable"}"#),
        4,
        "{m}"
    );
}

#[test]
fn model_lists_show_a_scoped_key_only_its_models() {
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions::default());
    let ai = start_ai(&ollama, &openai, None);
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
    let r = ai_get(gw, "/ollama/api/tags", BOB, "l-bob-tags");
    assert_eq!(r.status, 200);
    assert_eq!(
        names(&r, "models", "name"),
        ["llama3.2:latest", "qwen2.5:7b"]
    );
    let r = ai_get(gw, "/ollama/api/tags", ANN, "l-ann-tags");
    assert_eq!(
        names(&r, "models", "name"),
        ["llama3.2:latest", "qwen2.5:7b", "mistral:7b"]
    );
    assert_eq!(
        r.header("content-length").map(str::to_owned),
        Some(r.body.len().to_string()),
        "unfiltered: as sent"
    );
    let r = ai_get(gw, "/v1/models", BOB, "l-bob-models");
    assert_eq!(names(&r, "data", "id"), ["llama3.2:latest", "qwen2.5:7b"]);
    assert!(
        r.header("content-length")
            .is_none_or(|l| l == r.body.len().to_string()),
        "no stale Content-Length"
    );
    assert_eq!(
        ai_get(gw, "/v1/models/mistral:7b", BOB, "l-bob-one").status,
        403
    );
    assert_eq!(
        ai_get(gw, "/v1/models/qwen2.5:7b", BOB, "l-bob-two").status,
        200
    );
    let r = ai_get(gw, "/ollama/api/ps", BOB, "l-bob-ps");
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
    let gw = Gateway::start(
        &GatewayConfig::new()
            .with_admin()
            .audit_log("audit.log")
            .route(
                Route::new("chat", "/v1/", "ai")
                    .api("openai")
                    .upstream(other.addr)
                    .model("llama3*", [llama.addr])
                    .model("qwen*", [qwen.addr]),
            ),
        ai_keys(ANN, BOB, CAROL),
    );
    let chat = |model: &str, rid: &str| {
        let r = ai_post(
            &gw,
            "/v1/chat/completions",
            ANN,
            rid,
            &json!({"messages": [], "model": model}),
        );
        assert_eq!(r.status, 200, "{rid}");
        audit_of(&gw, rid)["upstream"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(chat("llama3.2", "rt-1"), llama.addr.to_string());
    assert_eq!(chat("LLAMA3.1:8b", "rt-2"), llama.addr.to_string());
    assert_eq!(chat("qwen2.5:7b", "rt-3"), qwen.addr.to_string());
    assert_eq!(chat("mistral", "rt-4"), other.addr.to_string());
    let r = ai_get(&gw, "/v1/models", ANN, "rt-5");
    assert_eq!(r.status, 200);
    assert_eq!(
        audit_of(&gw, "rt-5")["upstream"],
        other.addr.to_string(),
        "no model: the route's upstreams"
    );
    // A model named only after the first 64 KiB: the route's upstreams.
    let r = ai_request(
        &gw,
        "POST",
        "/v1/chat/completions",
        ANN,
        "rt-6",
        &chat_body(false, "qwen2", 70_000),
        "",
    );
    assert_eq!(r.status, 200);
    assert_eq!(audit_of(&gw, "rt-6")["upstream"], other.addr.to_string());
    assert_eq!((llama.requests().len(), qwen.requests().len()), (2, 1));
}

#[test]
fn expect_continue_is_answered_when_the_gateway_reads_the_body_first() {
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions::default());
    let ai = start_ai(&ollama, &openai, None);
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

#[test]
fn refusals_speak_the_api_of_their_route() {
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions::default());
    let ai = start_ai(&ollama, &openai, None);
    let gw = &ai.gw;
    let body = json!({"model": "qwen2", "max_tokens": 8, "messages": []}).to_string();
    let no_key = |path: &str| {
        let mut r = agent()
            .post(&gw.url(path))
            .header("Content-Type", "application/json")
            .send(body.as_bytes())
            .expect("an answer");
        (
            r.status().as_u16(),
            r.body_mut().read_to_string().expect("a body"),
        )
    };
    let missing = [
        (
            "/anthropic/v1/messages",
            r#"{"type":"error","error":{"type":"authentication_error","message":"missing api key"}}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"error":{"message":"missing api key","type":"invalid_request_error","param":null,"code":"missing_key"}}"#,
        ),
        ("/ollama/api/chat", r#"{"error":"missing api key"}"#),
        ("/plain/api/chat", r#"{"error":"missing api key"}"#),
        // No route, no API: the gateway's own shape.
        (
            "/nowhere/v1/messages",
            r#"{"error":"no route for this path"}"#,
        ),
    ];
    for (path, want) in missing {
        let (status, text) = no_key(path);
        assert_eq!(text, want, "{path}");
        assert_eq!(
            status,
            if path.starts_with("/nowhere") {
                404
            } else {
                401
            }
        );
    }
    // Refused after the upstream was chosen (the model after 70 KiB of
    // messages, read as the body streams on): still the route's shape.
    let late = chat_body(false, "mistral", 70_000);
    let r = ai_request(
        gw,
        "POST",
        "/anthropic/v1/messages",
        BOB,
        "s-late",
        &late,
        "",
    );
    assert_eq!(r.status, 403);
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap_or_default(),
        json!({"type": "error", "error": {"type": "permission_error", "message": "model not allowed for this key"}})
    );
    assert_eq!(audit_of(gw, "s-late")["decision"], "model_not_allowed");
    let r = ai_request(
        gw,
        "POST",
        "/v1/chat/completions",
        BOB,
        "s-late-o",
        &late,
        "",
    );
    let v = serde_json::from_slice::<Value>(&r.body).unwrap_or_default();
    assert_eq!(
        (r.status, &v["error"]["code"], &v["error"]["message"]),
        (
            403,
            &json!("model_not_found"),
            &json!("model not allowed for this key")
        ),
        "{v}"
    );
}
