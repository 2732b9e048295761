//! The gateway as the official client libraries see it: `ollama`, `openai`
//! and `anthropic` for Python (`tests/clients/drive.py`), against the mock
//! model servers, through routes with `api`: streams arrive part by part,
//! usage is counted, the usage-only event is hidden unless asked for, model
//! lists are filtered, and refusals surface as the libraries' own errors
//! with the gateway's message.
//!
//! Needs the libraries: `python3 -m venv .venv && .venv/bin/pip install -r
//! tests/clients/requirements.txt` (what `.ci/run` does), or a python that
//! has them in `AGW_TEST_PYTHON`.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use common::ai_gateway::{ai_keys, anthropic_route, metric_u64, ollama_route, openai_route};
use common::*;

const ANN: &str = "client-test-key-ann";
const BOB: &str = "client-test-key-bob";
const CAROL: &str = "client-test-key-carol";

/// The python that has the three libraries, or a failure that says how to
/// get one. Checked once: importing them takes seconds.
fn python() -> PathBuf {
    static CHECKED: OnceLock<PathBuf> = OnceLock::new();
    CHECKED.get_or_init(check_python).clone()
}

fn check_python() -> PathBuf {
    let p = std::env::var_os("AGW_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let ok = Command::new(&p)
        .args(["-c", "import ollama, openai, anthropic"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "these tests drive the gateway with the official ollama, openai and anthropic Python libraries, \
         and {} cannot import them. Install them with\n\
         \x20   python3 -m venv .venv && .venv/bin/pip install -r tests/clients/requirements.txt\n\
         from the repository root, or set AGW_TEST_PYTHON to a python that has them.",
        p.display()
    );
    p
}

/// Runs one scenario of `drive.py` and returns what the client saw.
fn drive(gw: &Gateway, scenario: &str, key: &str, model: &str) -> Value {
    drive_all(gw, &[(scenario, key, model)]).swap_remove(0)
}

/// Runs scenarios of `drive.py` one after the other in one python process
/// (a library is imported once) and returns what the client saw in each.
fn drive_all(gw: &Gateway, steps: &[(&str, &str, &str)]) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/drive.py");
    let mut cmd = Command::new(python());
    cmd.arg(&script).arg(gw.url(""));
    for (scenario, key, model) in steps {
        cmd.args([scenario, key, model]);
    }
    let mut child = cmd
        .env("NO_PROXY", "*")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    let what = format!("{steps:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait for python").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("python output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Vec<Value> =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{what}: {e}: {stdout}"));
    assert_eq!(seen.len(), steps.len(), "{what}: {stdout}");
    seen
}

fn start(ollama: &AiServer, openai: &AiServer) -> Gateway {
    Gateway::start(
        &GatewayConfig::new()
            .audit_log("audit.log")
            .route(ollama_route(ollama.addr))
            .route(openai_route(openai.addr)),
        ai_keys(ANN, BOB, CAROL),
    )
}

/// The audit lines of requests to a route so far (not the harness's
/// readiness probes).
fn route_audit_lines(gw: &Gateway) -> Vec<Value> {
    audit_lines(&audit_file(gw))
        .into_iter()
        .filter(|v| !v["route"].is_null())
        .collect()
}

/// Waits for `n` audit lines and returns the last.
fn nth_audit(gw: &Gateway, n: usize) -> Value {
    assert!(
        wait_until(Duration::from_secs(10), || route_audit_lines(gw).len() >= n),
        "{n} audit lines: {:?}",
        route_audit_lines(gw)
    );
    route_audit_lines(gw)
        .get(n - 1)
        .cloned()
        .unwrap_or(Value::Null)
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Each part reached the client before the upstream wrote the next one.
fn assert_parts_streamed(parts: &[Value], written: &[SystemTime]) {
    for (i, part) in parts.iter().enumerate() {
        let Some(next) = written.get(i + 1) else {
            break;
        };
        let at = part["at"].as_f64().expect("a time");
        assert!(
            at < secs(*next),
            "part {i} arrived only after the upstream wrote part {}",
            i + 1
        );
    }
}

fn slow() -> AiOptions {
    AiOptions {
        chunks: 4,
        delay: Duration::from_millis(200),
        ..AiOptions::default()
    }
}

#[test]
fn the_official_ollama_library_streams_counts_lists_and_is_refused() {
    let ollama = AiServer::start(slow());
    let openai = AiServer::start(AiOptions::default());
    let gw = start(&ollama, &openai);

    let r = drive(&gw, "ollama-chat-stream", ANN, "llama3.2");
    let parts = r["parts"].as_array().expect("parts");
    assert_eq!(parts.len(), 5, "{r}");
    let texts: Vec<&str> = parts
        .iter()
        .map(|p| p["text"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(texts, ["tok0 ", "tok1 ", "tok2 ", "tok3 ", ""]);
    assert_eq!(parts[4]["raw"]["eval_count"], 4, "{r}");
    assert_parts_streamed(parts, &ollama.sent()[0].written_wall);
    let a = nth_audit(&gw, 1);
    assert_eq!(
        (&a["model"], &a["prompt_tokens"], &a["completion_tokens"]),
        (&json!("llama3.2"), &json!(11), &json!(4)),
        "{a}"
    );

    let r = drive(&gw, "ollama-generate", ANN, "qwen2.5:7b");
    assert_eq!(
        (&r["prompt_eval_count"], &r["eval_count"]),
        (&json!(11), &json!(4)),
        "{r}"
    );
    assert_eq!(nth_audit(&gw, 2)["usage"], "reported");

    let r = drive(&gw, "ollama-list", BOB, "");
    assert_eq!(r["models"], json!(["llama3.2:latest", "qwen2.5:7b"]), "{r}");
    let r = drive(&gw, "ollama-list", ANN, "");
    assert_eq!(
        r["models"],
        json!(["llama3.2:latest", "qwen2.5:7b", "mistral:7b"]),
        "{r}"
    );

    let r = drive(&gw, "ollama-chat", BOB, "mistral");
    assert_eq!(
        (&r["status"], &r["error"]),
        (&json!(403), &json!("model not allowed for this key")),
        "{r}"
    );
    let r = drive(&gw, "ollama-chat", BOB, "qwen2.5");
    assert_eq!(r["eval_count"], 4, "{r}");
    let r = drive(&gw, "ollama-chat", "not-a-key", "qwen2.5");
    assert_eq!(
        (&r["status"], &r["error"]),
        (&json!(401), &json!("invalid api key")),
        "{r}"
    );
}

#[test]
fn the_official_openai_library_streams_counts_lists_and_is_refused() {
    let ollama = AiServer::start(AiOptions::default());
    let openai = AiServer::start(AiOptions {
        prompt_tokens: 7,
        ..slow()
    });
    let gw = start(&ollama, &openai);

    // Not asked for: the upstream is asked, the client sees no usage event.
    let r = drive(&gw, "openai-stream", ANN, "qwen2");
    let parts = r["parts"].as_array().expect("parts");
    let texts: Vec<&str> = parts
        .iter()
        .map(|p| p["text"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(texts, ["tok0 ", "tok1 ", "tok2 ", "tok3 "], "{r}");
    assert!(parts.iter().all(|p| p["raw"]["usage"].is_null()), "{r}");
    assert_eq!(
        openai.requests()[0].json()["stream_options"]["include_usage"],
        true
    );
    assert_parts_streamed(parts, &openai.sent()[0].written_wall);
    let a = nth_audit(&gw, 1);
    assert_eq!(
        (&a["prompt_tokens"], &a["completion_tokens"], &a["usage"]),
        (&json!(7), &json!(4), &json!("reported")),
        "{a}"
    );

    // Asked for: shown.
    let r = drive(&gw, "openai-stream-usage", ANN, "qwen2");
    let parts = r["parts"].as_array().expect("parts");
    let last = parts.last().expect("a last part");
    assert_eq!(last["raw"]["choices"], json!([]), "{r}");
    assert_eq!(last["raw"]["usage"]["prompt_tokens"], 7, "{r}");

    let r = drive(&gw, "openai-chat", ANN, "qwen2");
    assert_eq!(r["usage"]["total_tokens"], 11, "{r}");
    let r = drive(&gw, "openai-embed", ANN, "qwen2");
    assert_eq!(r["usage"]["prompt_tokens"], 7, "{r}");
    let r = drive(&gw, "openai-models", BOB, "");
    assert_eq!(r["models"], json!(["llama3.2:latest", "qwen2.5:7b"]), "{r}");

    let r = drive(&gw, "openai-chat", BOB, "mistral");
    assert_eq!(
        (&r["kind"], &r["status"]),
        (&json!("PermissionDeniedError"), &json!(403)),
        "{r}"
    );
    assert_eq!(r["error"], "model not allowed for this key", "{r}");

    // 7 + 4 = 11 tokens a chat; carol may use 20 a minute.
    for _ in 0..2 {
        let r = drive(&gw, "openai-chat", CAROL, "qwen2");
        assert_eq!(r["usage"]["total_tokens"], 11, "{r}");
    }
    let r = drive(&gw, "openai-chat", CAROL, "qwen2");
    assert_eq!(
        (&r["kind"], &r["status"]),
        (&json!("RateLimitError"), &json!(429)),
        "{r}"
    );
    assert_eq!(r["error"], "token budget exceeded", "{r}");
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("tokens"), &json!("rate_limit_exceeded")),
        "{r}"
    );
    let wait: u64 = r["retry_after"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&wait), "{r}");

    let r = drive(&gw, "openai-chat", "not-a-key", "qwen2");
    assert_eq!(
        (&r["kind"], &r["status"], &r["error"], &r["code"]),
        (
            &json!("AuthenticationError"),
            &json!(401),
            &json!("invalid api key"),
            &json!("invalid_api_key")
        ),
        "{r}"
    );
}

#[test]
fn the_official_anthropic_library_streams_counts_and_is_refused() {
    // 5 uncached input tokens, 100 written to the cache, 20 read from it:
    // 125 input tokens an answer, and 4 output.
    let upstream = AiServer::start(AiOptions {
        prompt_tokens: 5,
        cache_creation_tokens: 100,
        cache_read_tokens: 20,
        ..slow()
    });
    let gw = Gateway::start(
        &GatewayConfig::new()
            .with_admin()
            .audit_log("audit.log")
            .route(anthropic_route(upstream.addr)),
        ai_keys(ANN, BOB, CAROL),
    );

    // One python process for all (importing the library takes seconds).
    let seen = drive_all(
        &gw,
        &[
            ("anthropic-stream", ANN, "qwen3-coder"),
            ("anthropic-message", ANN, "qwen3-coder"),
            ("anthropic-count", BOB, "qwen3-coder"),
            ("anthropic-message", BOB, "claude-x"),
            ("anthropic-no-key", "", "qwen3-coder"),
            ("anthropic-message", CAROL, "qwen3-coder"),
            ("anthropic-stream", CAROL, "qwen3-coder"),
        ],
    );
    let [stream, message, count, scoped, no_key, carol, carol_again] = &seen[..] else {
        panic!("seven answers: {seen:?}");
    };

    let mut want = vec!["message_start", "content_block_start"];
    want.extend(["content_block_delta"; 4]);
    want.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(stream["types"], json!(want), "{stream}");
    let parts = stream["parts"].as_array().expect("parts");
    let texts: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
    assert_eq!(texts, ["tok0 ", "tok1 ", "tok2 ", "tok3 "], "{stream}");
    let written = &upstream.sent()[0].written_wall;
    let (first, last) = (parts[0]["at"].as_f64(), written.last().map(|t| secs(*t)));
    assert!(
        first.zip(last).is_some_and(|(f, l)| f < l),
        "the first event arrived before the upstream wrote the last: {stream}"
    );
    assert_parts_streamed(parts, written);
    let a = nth_audit(&gw, 1);
    assert_eq!(
        (&a["model"], &a["prompt_tokens"], &a["completion_tokens"]),
        (&json!("qwen3-coder"), &json!(125), &json!(4)),
        "{a}"
    );
    assert_eq!(
        (
            &a["cache_creation_tokens"],
            &a["cache_read_tokens"],
            &a["usage"]
        ),
        (&json!(100), &json!(20), &json!("reported")),
        "{a}"
    );

    assert_eq!(message["text"], "tok0 tok1 tok2 tok3 ", "{message}");
    assert_eq!(message["usage"]["cache_read_input_tokens"], 20, "{message}");
    let a = nth_audit(&gw, 2);
    assert_eq!(
        (&a["prompt_tokens"], &a["completion_tokens"], &a["usage"]),
        (&json!(125), &json!(4), &json!("reported")),
        "{a}"
    );
    // Passed through, model checked, no usage: it counts a prompt.
    assert_eq!(count["input_tokens"], 5, "{count}");
    let a = nth_audit(&gw, 3);
    assert_eq!(
        (&a["model"], &a["usage"]),
        (&json!("qwen3-coder"), &Value::Null),
        "{a}"
    );

    assert_eq!(
        (&scoped["kind"], &scoped["status"], &scoped["type"]),
        (
            &json!("PermissionDeniedError"),
            &json!(403),
            &json!("permission_error")
        ),
        "{scoped}"
    );
    assert_eq!(
        scoped["error"], "model not allowed for this key",
        "{scoped}"
    );
    assert_eq!(
        (&no_key["kind"], &no_key["status"], &no_key["type"]),
        (
            &json!("AuthenticationError"),
            &json!(401),
            &json!("authentication_error")
        ),
        "{no_key}"
    );
    assert_eq!(no_key["error"], "missing api key", "{no_key}");
    // Carol may use 20 tokens a minute: her first answer crosses it (the
    // cache counts as input), the next is refused.
    assert_eq!(carol["usage"]["output_tokens"], 4, "{carol}");
    let r = carol_again;
    assert_eq!(
        (&r["kind"], &r["status"], &r["type"]),
        (
            &json!("RateLimitError"),
            &json!(429),
            &json!("rate_limit_error")
        ),
        "{r}"
    );
    assert_eq!(r["error"], "token budget exceeded", "{r}");
    let wait: u64 = r["retry_after"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&wait), "{r}");

    // Three answers of 125 + 4 tokens, as the upstream reported them.
    let (prompt, completion) = upstream.reported_tokens();
    assert_eq!((prompt, completion), (375, 12));
    let m = metrics_text(gw.admin());
    for (series, want) in [
        (
            r#"agw_tokens_total{kind="prompt",model="qwen3-coder",route="anthropic"}"#,
            prompt,
        ),
        (
            r#"agw_tokens_total{kind="completion",model="qwen3-coder",route="anthropic"}"#,
            completion,
        ),
        (
            r#"agw_cache_tokens_total{kind="creation",model="qwen3-coder",route="anthropic"}"#,
            300,
        ),
        (
            r#"agw_cache_tokens_total{kind="read",model="qwen3-coder",route="anthropic"}"#,
            60,
        ),
    ] {
        assert_eq!(metric_u64(&m, series), want, "{series}\n{m}");
    }
    let config = gw.config_path.to_str().expect("utf-8");
    let out = run_cli(
        &["usage", "--json", "--config", config, "--by", "user"],
        gw.dir.path(),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let report: Value = serde_json::from_str(&out.stdout).expect("a JSON report");
    let total = &report["total"];
    assert_eq!(
        (&total["prompt_tokens"], &total["completion_tokens"]),
        (&json!(prompt), &json!(completion)),
        "{report}"
    );
    assert_eq!(
        (&total["cache_creation_tokens"], &total["cache_read_tokens"]),
        (&json!(300), &json!(60)),
        "{report}"
    );
    assert_eq!(report["groups"]["carol"]["total_tokens"], 129, "{report}");
}
