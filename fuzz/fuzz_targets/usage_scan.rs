//! The usage meter (`AnswerMeter`, and `SseHider` in front of it when the
//! gateway asked for usage) on upstream answers cut into pieces anywhere,
//! in each framing the two APIs use: NDJSON and JSON for `api: ollama`,
//! SSE and JSON for `api: openai`, and an opaque body (compressed, not
//! JSON).
//!
//! Input: a mode byte, cut points (see `usage_common.rs`), then either the
//! answer itself (raw mode) or what `arbitrary` builds a well-formed
//! answer from (generated mode). Mode bits: 0-2 the framing (mod 6), 3 a
//! variant of its headers, 4 generated; in raw mode, bits 5-7 all set:
//! the body is repeated 16 times (what the meter keeps must not grow with
//! it; only now and then, as it is slower).
//!
//! Always: no panic; the meter keeps at most `METER_KEPT` heap bytes
//! between pieces and never has more than `METER_PEAK` live while
//! reading, whatever the body's length; the hider holds no more than its
//! unfinished event; the `Usage` is consistent with its source; an opaque
//! answer is `Unknown`.
//!
//! Raw mode: the same usage whatever the pieces (JSON and SSE framings;
//! NDJSON's fast path reads a line with two objects differently, and such
//! a line is not NDJSON); what the hider forwards is the answer with
//! whole events left out, and complete events are never held back.
//!
//! Generated mode: a list of records (Ollama's content and final records,
//! OpenAI's chunks, usage-only chunks and whole answers, embeddings, free
//! ones, mutated: members added, dropped, replaced, keys respelled as Go
//! reads them) rendered compact, spaced or pretty, non-ASCII and keys
//! escaped or not, as NDJSON/JSON or SSE events (with comments, `event:`,
//! `id:`, `retry:` lines, `[DONE]`, LF/CRLF/CR). The usage read equals what
//! a reference gives that parses the whole text with serde_json (line by
//! line, event by event), and through the hider the client gets exactly
//! the events but the usage-only ones.
#![no_main]

#[path = "usage_common.rs"]
mod common;

use ai_gateway::config::MAX_MODEL_NAME;
use ai_gateway::usage::{AnswerMeter, SseHider, Usage, UsageSource, HELD_EVENT_LIMIT};
use arbitrary::{Result, Unstructured};
use common::{
    arb_key, arb_number, arb_string, arb_value, at_points, fold_key, live, peak, pieces,
    render_members, repeated, reset_peak, Header, Members, Style,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// What the meter may keep between pieces: its scanner's key buffer (128
/// bytes) and value buffer (up to the largest wanted value, `usage`, 4 KiB),
/// each at most doubled by `Vec` growth, and the model named (256 bytes),
/// in the record being read and in the meter.
const METER_KEPT: usize = 2 * 128 + 2 * 4096 + 2 * MAX_MODEL_NAME + 512;
/// What may be live while a piece is read: also a decoded key, model or
/// `usage` object.
const METER_PEAK: usize = METER_KEPT + 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `api: ollama`, streamed: `application/x-ndjson`.
    OllamaStream,
    /// `api: ollama`, `"stream": false`: `application/json; charset=utf-8`.
    OllamaJson,
    /// `api: openai`, not streamed: `application/json` (or no type).
    OpenaiJson,
    /// `api: openai`, streamed: `text/event-stream`.
    OpenaiSse,
    /// The same through `SseHider`, as when the gateway asked for usage.
    OpenaiSseHidden,
    /// Compressed (`gzip`) or not JSON (`text/plain`): nothing is read.
    Opaque,
}

const FRAMINGS: [Framing; 6] = [
    Framing::OllamaStream,
    Framing::OllamaJson,
    Framing::OpenaiJson,
    Framing::OpenaiSse,
    Framing::OpenaiSseHidden,
    Framing::Opaque,
];

type Headers = (Option<&'static [u8]>, Option<&'static [u8]>);

impl Framing {
    /// `Content-Type` and `Content-Encoding`.
    fn headers(self, variant: bool) -> Headers {
        let (ct, ce): (Option<&'static str>, Option<&'static str>) = match (self, variant) {
            (Framing::OllamaStream, false) => (Some("application/x-ndjson"), None),
            (Framing::OllamaStream, true) => (Some("Application/X-NDJSON"), Some("identity")),
            (Framing::OllamaJson, _) => (Some("application/json; charset=utf-8"), None),
            (Framing::OpenaiJson, false) => (Some("application/json"), None),
            (Framing::OpenaiJson, true) => (None, None),
            (Framing::OpenaiSse | Framing::OpenaiSseHidden, false) => {
                (Some("text/event-stream"), None)
            }
            (Framing::OpenaiSse | Framing::OpenaiSseHidden, true) => {
                (Some("text/event-stream; charset=utf-8"), None)
            }
            (Framing::Opaque, false) => (Some("application/json"), Some("gzip")),
            (Framing::Opaque, true) => (Some("text/plain"), None),
        };
        (ct.map(str::as_bytes), ce.map(str::as_bytes))
    }

    fn sse(self) -> bool {
        matches!(self, Framing::OpenaiSse | Framing::OpenaiSseHidden)
    }

    fn streamed(self) -> bool {
        self.sse() || self == Framing::OllamaStream
    }
}

/// What a run gives: the usage, and what the hider forwarded.
struct Run {
    usage: Usage,
    forwarded: Vec<u8>,
}

/// Feeds `pieces` to a meter (through a hider for `OpenaiSseHidden`),
/// checking what they keep. `whole` is the concatenation; with
/// `step_checks`, what the hider forwarded is checked after each piece.
fn run(
    framing: Framing,
    headers: Headers,
    pieces: &[&[u8]],
    whole: &[u8],
    step_checks: bool,
) -> Run {
    let hidden = framing == Framing::OpenaiSseHidden;
    let largest = pieces.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut forwarded: Vec<u8> = Vec::with_capacity(if hidden { whole.len() } else { 0 });
    // (fed, forwarded) after each piece, checked once the run is over (the
    // check allocates).
    let mut steps: Vec<(usize, usize)> = Vec::with_capacity(pieces.len());
    let base = reset_peak();
    let mut meter = AnswerMeter::new(headers.0, headers.1);
    assert_eq!(meter.is_sse(), framing.sse());
    if hidden {
        // The hider may hold its unfinished event (at most the limit, plus
        // the piece that made it pass), in a buffer that may double.
        let hider_kept = 2 * (HELD_EVENT_LIMIT + largest) + 64;
        let mut hider = SseHider::default();
        let mut fed = 0;
        for (i, p) in pieces.iter().enumerate() {
            let end = i + 1 == pieces.len();
            let out = hider.filter(p, end, &mut meter);
            forwarded.extend_from_slice(&out);
            drop(out);
            fed += p.len();
            let kept = live().saturating_sub(base);
            assert!(
                kept <= METER_KEPT + hider_kept,
                "meter and hider keep {kept} bytes after {fed} of {} (largest piece {largest})",
                whole.len()
            );
            steps.push((fed, forwarded.len()));
        }
        let transient = peak().saturating_sub(base);
        assert!(
            transient <= METER_PEAK + 6 * (HELD_EVENT_LIMIT + largest),
            "{transient} bytes live at most reading {} bytes through the hider",
            whole.len()
        );
        drop(hider);
        if step_checks {
            for (i, (fed, sent)) in steps.iter().enumerate() {
                let end = i + 1 == steps.len();
                check_forwarded(&whole[..*fed], &forwarded[..*sent], end);
            }
        }
    } else {
        for p in pieces {
            meter.feed(p);
            let kept = live().saturating_sub(base);
            assert!(
                kept <= METER_KEPT,
                "the meter keeps {kept} bytes after a piece of {}",
                p.len()
            );
        }
        let transient = peak().saturating_sub(base);
        assert!(
            transient <= METER_PEAK,
            "{transient} bytes live at most reading {} bytes",
            whole.len()
        );
    }
    let kept = live().saturating_sub(base);
    assert!(
        kept <= METER_KEPT,
        "the meter keeps {kept} bytes at the end"
    );
    let usage = meter.usage();
    check_usage(framing, &usage);
    Run { usage, forwarded }
}

/// What holds for any usage.
fn check_usage(framing: Framing, u: &Usage) {
    match u.source {
        UsageSource::Reported => {
            assert!(
                u.prompt_tokens.is_some() && u.completion_tokens.is_some(),
                "{u:?}"
            )
        }
        UsageSource::Estimated => {
            assert!(u.prompt_tokens.is_none(), "{u:?}");
            assert!(u.completion_tokens.is_some_and(|n| n > 0), "{u:?}");
            assert!(framing != Framing::Opaque);
        }
        UsageSource::Unknown => {
            assert!(
                u.prompt_tokens.is_none() && u.completion_tokens.is_none(),
                "{u:?}"
            )
        }
    }
    if let Some(m) = &u.model {
        assert!(!m.is_empty() && m.len() <= MAX_MODEL_NAME, "{u:?}");
    }
    if framing == Framing::Opaque {
        assert_eq!(u.source, UsageSource::Unknown);
        assert_eq!(u.model, None);
    }
    let _ = u.total();
}

/// The answer split where the hider ends events (after a `\n` that ends a
/// line with nothing but `\r`): the complete events, and the rest.
fn hider_events(input: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut events = Vec::new();
    let mut from = 0;
    let mut text = false;
    for (i, b) in input.iter().enumerate() {
        match b {
            b'\n' => {
                if !text {
                    events.push(&input[from..=i]);
                    from = i + 1;
                }
                text = false;
            }
            b'\r' => {}
            _ => text = true,
        }
    }
    (events, &input[from..])
}

/// What the hider forwarded for `input` (all of it at `end`) is the
/// complete events with some left out, then the unfinished event if the
/// answer ended or the event is too large to hold.
fn check_forwarded(input: &[u8], forwarded: &[u8], end: bool) {
    let (events, rest) = hider_events(input);
    let mut out = forwarded;
    for e in events {
        if let Some(after) = out.strip_prefix(e) {
            out = after;
        }
    }
    let want_rest: &[u8] = if end || rest.len() > HELD_EVENT_LIMIT {
        rest
    } else {
        b""
    };
    assert!(
        out == want_rest,
        "forwarded {:?}\nfor {:?} (end {end})",
        String::from_utf8_lossy(forwarded),
        String::from_utf8_lossy(input)
    );
}

// ---------------------------------------------------------------------------
// The reference: serde_json on whole records.

/// `usage` as OpenAI writes it.
#[derive(serde::Deserialize)]
struct OpenaiUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

#[derive(Debug, Default)]
struct Totals {
    records: u64,
    content_records: u64,
    model: Option<String>,
    prompt: Option<u64>,
    completion: Option<u64>,
    reported: bool,
}

/// Reads one record (a top-level object's members in order, keys matched
/// as Go's decoder does); returns whether it is a usage-only chunk (usage,
/// and `choices: []`). A member longer than the meter keeps of it is not
/// read (a model name over `6 * MAX_MODEL_NAME + 2` bytes, a `usage` over
/// 4 KiB; neither is a real one).
fn reference_record(t: &mut Totals, members: &Members) -> bool {
    let mut model = None;
    let mut done = None;
    let mut prompt_eval_count = None;
    let mut eval_count = None;
    let mut usage = None;
    let mut choices: Option<bool> = None; // Some(empty)
    for (key, raw) in &members.0 {
        let raw = raw.get();
        match fold_key(key).as_str() {
            "model" if raw.len() <= 6 * MAX_MODEL_NAME + 2 => {
                model = serde_json::from_str::<String>(raw)
                    .ok()
                    .filter(|m| !m.is_empty() && m.len() <= MAX_MODEL_NAME);
            }
            "done" => {
                done = Some(serde_json::from_str::<Value>(raw).ok() == Some(Value::Bool(true)))
            }
            "prompt_eval_count" => prompt_eval_count = serde_json::from_str::<u64>(raw).ok(),
            "eval_count" => eval_count = serde_json::from_str::<u64>(raw).ok(),
            "usage" if raw.len() <= 4096 => {
                usage = serde_json::from_str::<Option<OpenaiUsage>>(raw)
                    .ok()
                    .flatten()
                    .filter(|u| u.prompt_tokens.is_some() || u.completion_tokens.is_some())
                    .map(|u| {
                        (
                            u.prompt_tokens.unwrap_or(0),
                            u.completion_tokens.unwrap_or(0),
                        )
                    });
            }
            "choices" => {
                choices = match serde_json::from_str::<Value>(raw) {
                    Ok(Value::Array(a)) => Some(a.is_empty()),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    t.records += 1;
    if done == Some(false) || choices == Some(false) {
        t.content_records += 1;
    }
    if t.model.is_none() {
        t.model = model;
    }
    if let Some((p, c)) = usage {
        t.prompt = Some(p);
        t.completion = Some(c);
        t.reported = true;
        choices == Some(true)
    } else {
        if prompt_eval_count.is_some() || eval_count.is_some() {
            t.prompt = Some(prompt_eval_count.unwrap_or(0));
            t.completion = Some(eval_count.unwrap_or(0));
            t.reported = true;
        }
        false
    }
}

/// Reads every record of a JSON text (one object, or a sequence: NDJSON).
fn reference_json(t: &mut Totals, text: &str) {
    for m in serde_json::Deserializer::from_str(text).into_iter::<Members>() {
        let m = m.unwrap_or_else(|e| panic!("generated JSON does not parse: {e}\n{text}"));
        reference_record(t, &m);
    }
}

/// The `data` of each SSE event, as the spec reads it (lines end with
/// CRLF, LF or CR; one space after `data:` dropped; the lines of an event
/// joined with `\n`), the unfinished last event included.
fn sse_data(text: &str) -> Vec<String> {
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    for line in text.split('\n') {
        if line.is_empty() {
            events.extend(data.take());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        if field == "data" {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            }
        }
    }
    events.extend(data);
    events
}

fn reference_usage(framing: Framing, text: &str) -> Usage {
    let mut t = Totals::default();
    match framing {
        Framing::Opaque => {}
        Framing::OpenaiSse | Framing::OpenaiSseHidden => {
            for data in sse_data(text) {
                if data.trim() != "[DONE]" {
                    reference_json(&mut t, &data);
                }
            }
        }
        _ => reference_json(&mut t, text),
    }
    let source = if framing == Framing::Opaque {
        UsageSource::Unknown
    } else if t.reported {
        UsageSource::Reported
    } else if (framing.streamed() || t.records > 1) && t.content_records > 0 {
        UsageSource::Estimated
    } else {
        UsageSource::Unknown
    };
    let (prompt_tokens, completion_tokens) = match source {
        UsageSource::Reported => (t.prompt, t.completion),
        UsageSource::Estimated => (None, Some(t.content_records)),
        UsageSource::Unknown => (None, None),
    };
    Usage {
        model: if framing == Framing::Opaque {
            None
        } else {
            t.model
        },
        prompt_tokens,
        completion_tokens,
        cache_creation_tokens: None,
        cache_read_tokens: None,
        source,
    }
}

// ---------------------------------------------------------------------------
// Generated answers.

const MODELS: &[&str] = &[
    "llama3.2",
    "qwen2",
    "llama3.2:latest",
    "m",
    "",
    " ",
    "\u{e9}",
];

fn model_value(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=9)? {
        0..=5 => Value::from(MODELS[u.int_in_range(0..=MODELS.len() - 1)?]),
        6 => Value::from("\u{e9}".repeat(MAX_MODEL_NAME / 2 + u.int_in_range(0..=1)?)),
        7 => Value::from("m".repeat(MAX_MODEL_NAME + u.int_in_range(0..=1)?)),
        8 => Value::from(arb_string(u)?),
        _ => arb_value(u, 1)?,
    })
}

fn count_value(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=7)? {
        0..=3 => Value::from(u.int_in_range(0..=5000u64)?),
        4 => Value::from(u.arbitrary::<u64>()?),
        5 => arb_number(u)?,
        6 => json!(18446744073709551616.0f64),
        _ => arb_value(u, 1)?,
    })
}

fn usage_value(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=5)? {
        0..=2 => {
            let mut m = serde_json::Map::new();
            if u.ratio(7, 8)? {
                m.insert("prompt_tokens".into(), count_value(u)?);
            }
            if u.ratio(7, 8)? {
                m.insert("completion_tokens".into(), count_value(u)?);
            }
            m.insert("total_tokens".into(), count_value(u)?);
            if u.ratio(1, 4)? {
                m.insert("prompt_tokens_details".into(), arb_value(u, 2)?);
            }
            Value::Object(m)
        }
        3 => Value::Null,
        _ => arb_value(u, 2)?,
    })
}

fn choices_value(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=4)? {
        0 => json!([]),
        1 | 2 => {
            let n = u.int_in_range(1..=2)?;
            let mut a = Vec::new();
            for i in 0..n {
                a.push(json!({"index": i, "delta": {"content": arb_string(u)?}, "finish_reason": null}));
            }
            Value::Array(a)
        }
        3 => json!([{"index": 0, "message": {"role": "assistant", "content": arb_string(u)?}}]),
        _ => arb_value(u, 3)?,
    })
}

/// A value for a member named `key`: of the kind the meter reads for it,
/// mostly.
fn value_for(u: &mut Unstructured<'_>, key: &str) -> Result<Value> {
    if u.ratio(1, 8)? {
        return arb_value(u, 3);
    }
    match fold_key(key).as_str() {
        "model" => model_value(u),
        "done" => Ok(Value::Bool(u.arbitrary()?)),
        "prompt_eval_count" | "eval_count" => count_value(u),
        "usage" => usage_value(u),
        "choices" => choices_value(u),
        _ => arb_value(u, 3),
    }
}

/// A tool call whose arguments the model wrote (anything, keys the meter
/// reads included).
fn tool_calls(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut args = serde_json::Map::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let k = arb_key(u)?;
        let v = value_for(u, &k)?;
        args.insert(k, v);
    }
    Ok(json!([{"function": {"name": arb_string(u)?, "arguments": args}}]))
}

fn record(u: &mut Unstructured<'_>) -> Result<Vec<(String, Value)>> {
    let m = |k: &str, v: Value| (k.to_string(), v);
    let mut r = match u.int_in_range(0..=7)? {
        // Ollama's content record (generate, or chat).
        0 => {
            let mut r = vec![
                m("model", model_value(u)?),
                m("created_at", json!("2026-11-29T12:00:00Z")),
            ];
            if u.arbitrary()? {
                r.push(m("response", Value::from(arb_string(u)?)));
            } else {
                let mut msg = json!({"role": "assistant", "content": arb_string(u)?});
                if u.ratio(1, 4)? {
                    msg["tool_calls"] = tool_calls(u)?;
                }
                r.push(m("message", msg));
            }
            r.push(m("done", json!(false)));
            r
        }
        // Ollama's final record.
        1 => {
            let mut r = vec![
                m("model", model_value(u)?),
                m("created_at", json!("2026-11-29T12:00:01Z")),
            ];
            if u.arbitrary()? {
                r.push(m("response", json!("")));
            } else {
                let mut msg = json!({"role": "assistant", "content": ""});
                if u.ratio(1, 3)? {
                    msg["tool_calls"] = tool_calls(u)?;
                }
                r.push(m("message", msg));
            }
            r.push(m("done_reason", json!("stop")));
            r.push(m("done", json!(true)));
            if u.arbitrary()? {
                r.push(m("context", json!([1, 2, 3])));
            }
            r.push(m("total_duration", Value::from(u.arbitrary::<u32>()?)));
            if u.ratio(7, 8)? {
                r.push(m("prompt_eval_count", count_value(u)?));
            }
            if u.ratio(7, 8)? {
                r.push(m("eval_count", count_value(u)?));
            }
            r
        }
        // An OpenAI chunk.
        2 => {
            let mut r = vec![
                m("id", json!("chatcmpl-1")),
                m("object", json!("chat.completion.chunk")),
                m("created", json!(1_798_761_600)),
                m("model", model_value(u)?),
                m("choices", choices_value(u)?),
            ];
            if u.arbitrary()? {
                r.push(m("usage", Value::Null));
            }
            r
        }
        // OpenAI's usage-only chunk (what `include_usage` adds).
        3 => vec![
            m("id", json!("chatcmpl-1")),
            m("object", json!("chat.completion.chunk")),
            m("created", json!(1_798_761_600)),
            m("model", model_value(u)?),
            m("choices", json!([])),
            m("usage", usage_value(u)?),
        ],
        // A whole OpenAI answer.
        4 => vec![
            m("id", json!("chatcmpl-2")),
            m("object", json!("chat.completion")),
            m("model", model_value(u)?),
            m("choices", choices_value(u)?),
            m("usage", usage_value(u)?),
        ],
        // Embeddings, Ollama's and OpenAI's.
        5 => vec![
            m("model", model_value(u)?),
            m("embeddings", json!([[0.1, -0.2]])),
            m("prompt_eval_count", count_value(u)?),
        ],
        6 => vec![
            m("object", json!("list")),
            m(
                "data",
                json!([{"object": "embedding", "embedding": [0.5], "index": 0}]),
            ),
            m("model", model_value(u)?),
            m("usage", usage_value(u)?),
        ],
        // Anything.
        _ => {
            let mut r = Vec::new();
            for _ in 0..u.int_in_range(0..=6)? {
                let k = arb_key(u)?;
                let v = value_for(u, &k)?;
                r.push((k, v));
            }
            r
        }
    };
    // Mutations: a member added, dropped or replaced, a key respelled.
    for _ in 0..u.int_in_range(0..=3)? {
        let at = u.int_in_range(0..=r.len())?;
        match u.int_in_range(0..=3)? {
            0 => {
                let k = arb_key(u)?;
                let v = value_for(u, &k)?;
                r.insert(at, (k, v));
            }
            1 if at < r.len() => {
                r.remove(at);
            }
            2 if at < r.len() => r[at].1 = arb_value(u, 3)?,
            3 if at < r.len() => {
                let k = &r[at].0;
                let respelled = match u.int_in_range(0..=2)? {
                    0 => k.to_ascii_uppercase(),
                    1 => k.replace('s', "\u{17f}").replace('k', "\u{212a}"),
                    _ => {
                        let mut c = k.chars();
                        c.next().map_or_else(String::new, |f| {
                            f.to_ascii_uppercase().to_string() + c.as_str()
                        })
                    }
                };
                r[at].0 = respelled;
            }
            _ => {}
        }
    }
    // Well-formed: member names are unique (as Go reads them).
    let mut seen = std::collections::HashSet::new();
    r.retain(|(k, _)| seen.insert(fold_key(k)));
    Ok(r)
}

/// Whether a record says `"done": false` at its top level.
fn not_done(r: &[(String, Value)]) -> bool {
    r.iter()
        .any(|(k, v)| fold_key(k) == "done" && *v == Value::Bool(false))
}

/// One rendered record, and whether the reference reads it as the
/// usage-only chunk.
fn render_record(r: &[(String, Value)], style: Style) -> (String, bool) {
    let mut text = String::new();
    render_members(r, style, &mut text);
    let members: Members = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("generated record does not parse: {e}\n{text}"));
    let usage_only = reference_record(&mut Totals::default(), &members);
    (text, usage_only)
}

/// A generated answer: its text, and for SSE its events (text, whether the
/// hider must leave it out).
struct Answer {
    text: String,
    events: Vec<(String, bool)>,
}

fn answer(u: &mut Unstructured<'_>, framing: Framing) -> Result<Answer> {
    let style = Style::arbitrary(u)?;
    let n = match framing {
        Framing::OllamaJson | Framing::OpenaiJson if u.ratio(3, 4)? => 1,
        _ => u.int_in_range(0..=8)?,
    };
    let mut records = Vec::new();
    for _ in 0..n {
        let mut r = record(u)?;
        if framing == Framing::OllamaStream && not_done(&r) {
            // A content record carries no counts (as Ollama writes them;
            // the meter counts such lines without reading them).
            r.retain(|(k, _)| {
                !matches!(
                    fold_key(k).as_str(),
                    "prompt_eval_count" | "eval_count" | "usage"
                )
            });
        }
        records.push(render_record(&r, style));
    }
    let mut text = String::new();
    let mut events = Vec::new();
    if framing.sse() {
        let eol = match u.int_in_range(0..=3)? {
            0 | 1 => "\n",
            2 => "\r\n",
            // CR alone is SSE too, but the hider only ends events at LF.
            _ if framing == Framing::OpenaiSse => "\r",
            _ => "\n",
        };
        let space = if u.ratio(7, 8)? { " " } else { "" };
        let count = records.len();
        // A stream the upstream cut: its last event unfinished, no
        // `[DONE]`.
        let cut_short = count > 0 && u.ratio(1, 8)?;
        for (i, (json, usage_only)) in records.into_iter().enumerate() {
            let mut e = String::new();
            let extras = u.arbitrary::<u8>()?;
            for (bit, line) in [": keep-alive", "event: message", "id: 7", "retry: 3000"]
                .iter()
                .enumerate()
            {
                if extras & (1 << bit) != 0 {
                    e.push_str(line);
                    e.push_str(eol);
                }
            }
            if extras & 0x10 != 0 {
                // A comment alone is an event for the hider.
                e.push_str(eol);
                events.push((std::mem::take(&mut e), false));
                e.push_str(": ping");
                e.push_str(eol);
            }
            for line in json.split('\n') {
                e.push_str("data:");
                e.push_str(space);
                e.push_str(line);
                e.push_str(eol);
            }
            let finished = i + 1 < count || !cut_short;
            if finished {
                e.push_str(eol);
            }
            events.push((e, usage_only && finished));
        }
        match u.int_in_range(0..=3)? {
            _ if cut_short => {}
            0 => {}
            1 => events.push((format!("data: [DONE]{eol}"), false)),
            _ => events.push((format!("data:{space}[DONE]{eol}{eol}"), false)),
        }
        for (e, _) in &events {
            text.push_str(e);
        }
    } else {
        let sep = match (framing, u.int_in_range(0..=4)?) {
            (Framing::OllamaStream, 0) => "\r\n",
            (Framing::OllamaStream, 1) => "\n\n",
            (Framing::OllamaStream, _) => "\n",
            (_, 0) => "",
            (_, 1) => " ",
            _ => "\n",
        };
        let last = u.arbitrary::<bool>()?;
        let count = records.len();
        for (i, (json, _)) in records.into_iter().enumerate() {
            text.push_str(&json);
            if i + 1 < count || last {
                text.push_str(sep);
            }
        }
    }
    Ok(Answer { text, events })
}

fn generated(framing: Framing, headers: Headers, cuts: &[u16], rest: &[u8]) {
    let mut u = Unstructured::new(rest);
    let Ok(a) = answer(&mut u, framing) else {
        return;
    };
    let body = a.text.as_bytes();
    let run = run(framing, headers, &pieces(body, cuts), body, false);
    let want = reference_usage(framing, &a.text);
    assert_eq!(run.usage, want, "answer:\n{}", a.text);
    if framing == Framing::OpenaiSseHidden
        && a.events.iter().all(|(e, _)| e.len() <= HELD_EVENT_LIMIT)
    {
        let shown: String = a
            .events
            .iter()
            .filter(|(_, hide)| !hide)
            .map(|(e, _)| e.as_str())
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&run.forwarded),
            shown,
            "the client gets every event but the usage-only ones; answer:\n{}",
            a.text
        );
    }
}

fn raw(framing: Framing, headers: Headers, cuts: &[u16], body: &[u8], times: usize) {
    let (all, points) = repeated(body, times, cuts);
    let cut = at_points(&all, &points);
    let run_cut = run(framing, headers, &cut, &all, times == 1);
    if framing == Framing::OpenaiSseHidden {
        check_forwarded(&all, &run_cut.forwarded, true);
    }
    if framing != Framing::OllamaStream && times == 1 && cut.len() > 1 {
        let run_whole = run(framing, headers, &[&all[..]], &all, false);
        assert_eq!(
            run_cut.usage, run_whole.usage,
            "the same usage whatever the pieces"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(h) = Header::read(data) else {
        return;
    };
    let framing = FRAMINGS[usize::from(h.mode & 7) % FRAMINGS.len()];
    let headers = framing.headers(h.mode & 8 != 0);
    if h.mode & 0x10 != 0 {
        generated(framing, headers, &h.cuts, h.rest);
    } else {
        let times = if h.mode & 0xE0 == 0xE0 { 16 } else { 1 };
        raw(framing, headers, &h.cuts, h.rest, times);
    }
});
