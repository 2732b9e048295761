//! Token usage on routes with `api`, read off answers as they stream (audit
//! line, metrics): Ollama streams and single answers, OpenAI JSON and SSE
//! with `include_usage` added and its usage-only event hidden, streams cut
//! short (Anthropic's too), compressed and non-JSON answers, and the usage
//! report across rotated audit logs.
//!
//! Against the real binary and the mock model servers of
//! `tests/common/ai_upstream.rs`, with clients that send what the official
//! ones send (`tests/clients.rs` drives the official Python libraries
//! themselves).

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use common::ai_gateway::*;
use common::*;

#[test]
fn ollama_tokens_are_read_from_streams_and_single_answers() {
    let ollama = AiServer::start(slow_ai(5));
    let openai = AiServer::start(AiOptions::default());
    let ai = start_ai(&ollama, &openai, None);
    let gw = &ai.gw;

    let body = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]});
    let lines = ai_stream_lines(gw, "/ollama/api/chat", ANN, "o-stream", &body);
    let sent = ollama.sent();
    assert_streamed(&lines, &sent[0].written);
    let last: Value = serde_json::from_str(&lines[5].0).expect("the final record");
    assert_eq!(
        last["eval_count"], 5,
        "the final record reaches the client unchanged"
    );

    let r = ai_post(
        gw,
        "/ollama/api/generate",
        ANN,
        "o-single",
        &json!({"model": "llama3.2", "prompt": "hi", "stream": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = ai_post(
        gw,
        "/ollama/api/embed",
        ANN,
        "o-embed",
        &json!({"model": "llama3.2", "input": "hi"}),
    );
    assert_eq!(r.status, 200);
    let r = ai_post(gw, "/plain/api/chat", ANN, "o-plain", &body);
    assert_eq!(r.status, 200);

    for (rid, completion) in [("o-stream", 5), ("o-single", 5), ("o-embed", 0)] {
        let a = audit_of(gw, rid);
        assert_eq!(a["model"], "llama3.2", "{a}");
        assert_eq!(a["prompt_tokens"], 11, "{a}");
        assert_eq!(a["completion_tokens"], completion, "{a}");
        assert_eq!(a["usage"], "reported", "{a}");
    }
    let plain = audit_of(gw, "o-plain");
    for field in ["model", "prompt_tokens", "completion_tokens", "usage"] {
        assert_eq!(
            plain[field],
            Value::Null,
            "a route without api reads nothing: {plain}"
        );
    }

    let m = metrics_text(ai.admin);
    assert_eq!(
        metric_u64(
            &m,
            r#"agw_tokens_total{kind="prompt",model="llama3.2",route="ollama"}"#
        ),
        33,
        "{m}"
    );
    assert_eq!(
        metric_u64(
            &m,
            r#"agw_tokens_total{kind="completion",model="llama3.2",route="ollama"}"#
        ),
        10,
        "{m}"
    );
    assert_eq!(
        metric_u64(&m, r#"agw_user_tokens_total{kind="prompt",user="ann"}"#),
        33,
        "{m}"
    );
    assert_eq!(
        metric_u64(&m, r#"agw_usage_total{route="ollama",source="reported"}"#),
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
        ..slow_ai(4)
    });
    let ai = start_ai(&ollama, &openai, None);
    let gw = &ai.gw;

    // A client that did not ask: the upstream is asked, the client never
    // sees the usage-only event, and the events come as they are written.
    let body =
        json!({"model": "qwen2", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let lines = ai_stream_lines(gw, "/v1/chat/completions", ANN, "s-hidden", &body);
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
    let r = ai_post(gw, "/v1/chat/completions", ANN, "s-asked", &asked);
    assert_eq!(r.status, 200);
    assert_eq!(
        openai.requests()[1].body_sha256,
        sha256_hex(asked.to_string().as_bytes()),
        "forwarded byte for byte"
    );
    let evs = events(&r.text());
    assert!(evs.iter().any(is_usage_only), "{evs:?}");

    let r = ai_post(
        gw,
        "/v1/chat/completions",
        ANN,
        "s-json",
        &json!({"model": "qwen2", "messages": []}),
    );
    assert_eq!(r.status, 200);
    let r = ai_post(
        gw,
        "/v1/embeddings",
        ANN,
        "s-embed",
        &json!({"model": "qwen2", "input": "hi"}),
    );
    assert_eq!(r.status, 200);
    // Without include_usage on the route, a stream is estimated.
    let r = ai_post(gw, "/v1b/v1/chat/completions", ANN, "s-estimated", &body);
    assert_eq!(r.status, 200);
    assert!(openai.requests()[4].json().get("stream_options").is_none());

    for (rid, prompt, completion, source) in [
        ("s-hidden", json!(7), json!(4), "reported"),
        ("s-asked", json!(7), json!(4), "reported"),
        ("s-json", json!(7), json!(4), "reported"),
        ("s-embed", json!(7), json!(0), "reported"),
        ("s-estimated", Value::Null, json!(4), "estimated"),
    ] {
        let a = audit_of(gw, rid);
        assert_eq!(
            (&a["prompt_tokens"], &a["completion_tokens"], &a["usage"]),
            (&prompt, &completion, &json!(source)),
            "{rid}: {a}"
        );
        assert_eq!(a["model"], "qwen2");
    }
    let m = metrics_text(ai.admin);
    assert_eq!(
        metric_u64(
            &m,
            r#"agw_tokens_total{kind="prompt",model="qwen2",route="openai"}"#
        ),
        28,
        "{m}"
    );
    assert_eq!(
        metric_u64(
            &m,
            r#"agw_tokens_total{kind="completion",model="qwen2",route="openai-plain"}"#
        ),
        4,
        "{m}"
    );
    assert_eq!(
        metric_u64(
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
    let ai = start_ai(&ollama, &openai, None);
    let gw = &ai.gw;
    let (status, text) = ai_post_raw(
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
    let (status, text) = ai_post_raw(
        gw,
        "/v1/chat/completions",
        ANN,
        "cut-s",
        &json!({"model": "qwen2", "messages": [], "stream": true}),
    );
    assert_eq!(status, 200);
    assert_eq!(text.matches("data: {").count(), 2, "{text}");
    for (rid, n) in [("cut-o", 3), ("cut-s", 2)] {
        let a = audit_of(gw, rid);
        assert_eq!(a["usage"], "estimated", "{a}");
        assert_eq!(a["completion_tokens"], n, "{a}");
        assert_eq!(a["prompt_tokens"], Value::Null, "{a}");
    }
    // Anthropic's stream, cut after message_start and one delta: the input
    // it was told, one token per delta.
    let (status, text) = ai_post_raw(
        gw,
        "/anthropic/v1/messages",
        ANN,
        "cut-a",
        &json!({"model": "qwen2", "max_tokens": 8, "messages": [], "stream": true}),
    );
    assert_eq!(status, 200);
    assert_eq!(text.matches("event: ").count(), 3, "{text}");
    let a = audit_of(gw, "cut-a");
    assert_eq!(
        (&a["usage"], &a["prompt_tokens"], &a["completion_tokens"]),
        (&json!("estimated"), &json!(11), &json!(1)),
        "{a}"
    );
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
    let ai = start_ai(&gzip, &text, None);
    let gw = &ai.gw;
    let r = ai_post(
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
    let r = ai_post(
        gw,
        "/v1/chat/completions",
        ANN,
        "txt",
        &json!({"model": "qwen2", "messages": []}),
    );
    assert_eq!((r.status, r.text().as_str()), (200, "this is not json"));
    for rid in ["gz", "txt"] {
        let a = audit_of(gw, rid);
        assert_eq!(a["status"], 200, "{a}");
        assert_eq!(a["usage"], "unknown", "{a}");
        assert_eq!(
            (&a["prompt_tokens"], &a["completion_tokens"]),
            (&Value::Null, &Value::Null),
            "{a}"
        );
    }
    let m = metrics_text(ai.admin);
    assert_eq!(
        metric_u64(&m, r#"agw_usage_total{route="ollama",source="unknown"}"#),
        1,
        "{m}"
    );
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
    let ai = start_ai(&ollama, &openai, None);
    let gw = &ai.gw;
    let chat = json!({"model": "llama3.2", "messages": []});
    let sse = json!({"model": "qwen2", "messages": [], "stream": true});
    // First day's traffic, then logrotate: move, SIGUSR1, compress later.
    assert_eq!(
        ai_post(gw, "/ollama/api/chat", ANN, "u-1", &chat).status,
        200
    );
    assert_eq!(
        ai_post(gw, "/v1/chat/completions", BOB, "u-2", &sse).status,
        200
    );
    assert_eq!(
        ai_post(
            gw,
            "/v1/chat/completions",
            BOB,
            "u-3",
            &json!({"model": "mistral"})
        )
        .status,
        403
    );
    audit_of(gw, "u-3");
    let log = audit_file(gw);
    std::fs::rename(&log, gw.dir.path().join("audit.log.1")).expect("rotate");
    gw.signal("USR1");
    assert!(wait_until(Duration::from_secs(10), || {
        let _ = ai_get(gw, "/ollama/api/tags", ANN, "u-probe");
        log.exists()
    }));
    gzip_file(
        &gw.dir.path().join("audit.log.1"),
        &gw.dir.path().join("audit.log.2.gz"),
    );
    assert_eq!(
        ai_post(
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
        ai_post(
            gw,
            "/v1/embeddings",
            ANN,
            "u-5",
            &json!({"model": "qwen2", "input": "x"})
        )
        .status,
        200
    );
    audit_of(gw, "u-5");

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
