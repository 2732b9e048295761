//! The model-list filter (`ModelListFilter`): Ollama's `/api/tags` and
//! `/api/ps` (`{"models": [{"name", "model"}]}`) and OpenAI's `/v1/models`
//! (`{"object": "list", "data": [{"id"}]}`) answers, cut into pieces
//! anywhere, cut down to the models a key may use.
//!
//! Input: a mode byte, cut points (see `usage_common.rs`), then either a
//! byte choosing the allowed patterns (a mask over `PATTERNS`) and the
//! answer itself (raw mode), or what `arbitrary` builds a list and the
//! patterns from (generated mode). Mode bits: 0 the endpoint, 1 the
//! answer is readable (identity-encoded JSON), 2 generated; in raw mode,
//! bits 3-7 all set: the answer is padded with leading white space to 1
//! to 128 bytes over `MODEL_LIST_LIMIT`.
//!
//! Always: no panic; the filter holds at most the answer (doubled by
//! `Vec` growth), nothing once it is over the limit; `unreadable` is true
//! exactly when the answer was not readable, went over the limit or is
//! not JSON; and the output is exactly what a reference built with
//! serde_json gives: the answer with its list holding only the entries
//! that name a model (`name`/`model`, or `id`) and whose every name is a
//! string an allowed pattern matches (ASCII case, surrounding whitespace
//! and a `:latest` tag ignored; `*` any run of characters), everything
//! else kept as it was; or the empty list when the answer is not an
//! object with that list.
#![no_main]

#[path = "usage_common.rs"]
mod common;

use std::sync::{Arc, OnceLock};

use ai_gateway::config::ModelPattern;
use ai_gateway::usage::{Endpoint, ModelListFilter, MODEL_LIST_LIMIT};
use arbitrary::{Result, Unstructured};
use common::{
    arb_key, arb_string, arb_value, live, pieces, render_value, reset_peak, Header, Style,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// The patterns a raw input's mask chooses from.
const PATTERNS: [&str; 8] = [
    "llama3.2",
    "qwen*",
    "*",
    "mistral:7b",
    "*:LATEST",
    "Llama3.2:latest",
    "*embed*",
    "a*b*c",
];

/// Names the generated lists use besides arbitrary ones.
const NAMES: &[&str] = &[
    "llama3.2",
    "llama3.2:latest",
    "LLAMA3.2",
    "qwen2.5:7b",
    "qwen",
    "mistral:7b",
    "mistral",
    "nomic-embed-text:latest",
    "abc",
    "axxbxxc",
    " qwen ",
    "",
    ":latest",
    "org/model",
];

// ---------------------------------------------------------------------------
// The reference.

/// A name as matching compares it: trimmed, ASCII lower case, without one
/// trailing `:latest`.
fn fold(name: &str) -> Vec<u8> {
    let lower = name.trim().to_ascii_lowercase();
    lower
        .strip_suffix(":latest")
        .unwrap_or(&lower)
        .as_bytes()
        .to_vec()
}

/// Whether `text` matches `pattern` (`*`: any run of bytes), by dynamic
/// programming over prefixes.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    // row[j]: the pattern so far matches text[..j].
    let mut row = vec![false; text.len() + 1];
    row[0] = true;
    for &p in pattern {
        let mut next = vec![false; text.len() + 1];
        if p == b'*' {
            let mut any = false;
            for j in 0..=text.len() {
                any |= row[j];
                next[j] = any;
            }
        } else {
            for j in 1..=text.len() {
                next[j] = row[j - 1] && text[j - 1] == p;
            }
        }
        row = next;
    }
    row[text.len()]
}

fn allowed(patterns: &[String], name: &str) -> bool {
    let name = fold(name);
    patterns.iter().any(|p| glob(&fold(p), &name))
}

/// The list field, and the names an entry gives, for `endpoint`.
fn shape(endpoint: Endpoint) -> (&'static str, &'static [&'static str]) {
    match endpoint {
        Endpoint::OpenaiModels => ("data", &["id"]),
        _ => ("models", &["name", "model"]),
    }
}

fn keeps(patterns: &[String], names: &[&str], entry: &Value) -> bool {
    let Value::Object(e) = entry else {
        return false;
    };
    let given: Vec<&Value> = names.iter().filter_map(|n| e.get(*n)).collect();
    !given.is_empty()
        && given
            .iter()
            .all(|v| v.as_str().is_some_and(|s| allowed(patterns, s)))
}

fn reference(endpoint: Endpoint, patterns: &[String], body: Option<&[u8]>) -> Value {
    let (field, names) = shape(endpoint);
    let parsed = body.and_then(|b| serde_json::from_slice::<Value>(b).ok());
    match parsed {
        Some(Value::Object(mut doc)) if doc.get(field).is_some_and(Value::is_array) => {
            if let Some(Value::Array(list)) = doc.get_mut(field) {
                list.retain(|e| keeps(patterns, names, e));
            }
            Value::Object(doc)
        }
        _ if endpoint == Endpoint::OpenaiModels => json!({"object": "list", "data": []}),
        _ => json!({"models": []}),
    }
}

// ---------------------------------------------------------------------------

/// Filters an answer of `total` bytes fed as `pieces`; `answer` is the
/// answer without the white space it may have been padded with (what the
/// reference reads: the same JSON, faster).
fn check(
    endpoint: Endpoint,
    readable: bool,
    patterns: &[String],
    total: usize,
    pieces: &[&[u8]],
    answer: &[u8],
) {
    let allowed_patterns: Arc<[ModelPattern]> = patterns
        .iter()
        .map(|p| ModelPattern::parse(p).expect("the patterns are valid"))
        .collect();
    let over = total > MODEL_LIST_LIMIT;
    let base = reset_peak();
    let mut f = ModelListFilter::new(endpoint, allowed_patterns, readable);
    for p in pieces {
        f.push(p);
    }
    let kept = live().saturating_sub(base);
    let held = if over || !readable { 0 } else { total };
    assert!(
        kept <= 2 * held + 64,
        "the filter keeps {kept} bytes for an answer of {total}"
    );
    let json = serde_json::from_slice::<Value>(answer).is_ok();
    assert_eq!(f.unreadable(), !readable || over || !json);
    let out = f.finish();
    let want = reference(endpoint, patterns, (readable && !over).then_some(answer));
    let want_bytes = serde_json::to_vec(&want).expect("a value serializes");
    assert!(
        out == want_bytes,
        "filtered:\n{}\nexpected:\n{}\nanswer:\n{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&want_bytes),
        String::from_utf8_lossy(answer),
    );
}

fn name_value(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=7)? {
        0..=4 => Value::from(NAMES[u.int_in_range(0..=NAMES.len() - 1)?]),
        5 | 6 => Value::from(arb_string(u)?),
        _ => arb_value(u, 1)?,
    })
}

fn entry(u: &mut Unstructured<'_>, endpoint: Endpoint) -> Result<Value> {
    if u.ratio(1, 10)? {
        return arb_value(u, 2);
    }
    let mut e = serde_json::Map::new();
    if endpoint == Endpoint::OpenaiModels {
        if u.ratio(9, 10)? {
            e.insert("id".into(), name_value(u)?);
        }
        e.insert("object".into(), json!("model"));
        e.insert("created".into(), json!(1_798_761_600));
        e.insert("owned_by".into(), json!("library"));
    } else {
        let name = name_value(u)?;
        match u.int_in_range(0..=5)? {
            0 => {
                e.insert("name".into(), name);
            }
            1 => {
                e.insert("model".into(), name);
            }
            2 => {
                e.insert("name".into(), name);
                e.insert("model".into(), name_value(u)?);
            }
            3 => {}
            _ => {
                e.insert("name".into(), name.clone());
                e.insert("model".into(), name);
            }
        }
        e.insert("size".into(), json!(2_019_393_189));
        e.insert("digest".into(), json!("a80c4f17acd5"));
        e.insert(
            "details".into(),
            json!({"family": "llama", "parameter_size": "3.2B"}),
        );
    }
    for _ in 0..u.int_in_range(0..=1)? {
        e.insert(arb_key(u)?, arb_value(u, 2)?);
    }
    Ok(Value::Object(e))
}

/// A list answer (now and then of another shape), and the patterns.
fn generated(u: &mut Unstructured<'_>, endpoint: Endpoint) -> Result<(String, Vec<String>)> {
    let mask = u.arbitrary::<u8>()?;
    let mut patterns: Vec<String> = PATTERNS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, p)| p.to_string())
        .collect();
    if u.ratio(1, 4)? {
        let p = arb_string(u)?;
        if ModelPattern::parse(&p).is_ok() {
            patterns.push(p);
        }
    }
    let (field, _) = shape(endpoint);
    let mut list = Vec::new();
    for _ in 0..u.int_in_range(0..=8)? {
        list.push(entry(u, endpoint)?);
    }
    let mut doc = serde_json::Map::new();
    if endpoint == Endpoint::OpenaiModels {
        doc.insert("object".into(), json!("list"));
    }
    match u.int_in_range(0..=9)? {
        0 => {
            doc.insert(field.into(), arb_value(u, 1)?);
        }
        1 => {
            // The other API's field.
            let other = if field == "data" { "models" } else { "data" };
            doc.insert(other.into(), Value::Array(list));
        }
        _ => {
            doc.insert(field.into(), Value::Array(list));
        }
    }
    for _ in 0..u.int_in_range(0..=1)? {
        doc.insert(arb_key(u)?, arb_value(u, 2)?);
    }
    let style = Style::arbitrary(u)?;
    let mut text = String::new();
    render_value(&Value::Object(doc), style, 0, &mut text);
    Ok((text, patterns))
}

fuzz_target!(|data: &[u8]| {
    let Some(h) = Header::read(data) else {
        return;
    };
    let endpoint = if h.mode & 1 == 0 {
        Endpoint::OllamaModels
    } else {
        Endpoint::OpenaiModels
    };
    let readable = h.mode & 2 != 0;
    if h.mode & 4 != 0 {
        let Ok((text, patterns)) = generated(&mut Unstructured::new(h.rest), endpoint) else {
            return;
        };
        let body = text.as_bytes();
        check(
            endpoint,
            readable,
            &patterns,
            body.len(),
            &pieces(body, &h.cuts),
            body,
        );
        return;
    }
    let Some((&mask, rest)) = h.rest.split_first() else {
        return;
    };
    let patterns: Vec<String> = PATTERNS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, p)| p.to_string())
        .collect();
    if h.mode & 0xF8 == 0xF8 {
        // Over the limit by 1 to 128 bytes, as `cuts[0]` (or 0) says
        // (bits 3-7 all set: only now and then, a 4 MiB answer is slow to
        // copy; one at the limit, which is read, slower still, is left to
        // the unit tests): leading white space, then the answer, cut.
        static SPACES: OnceLock<Vec<u8>> = OnceLock::new();
        let spaces = SPACES.get_or_init(|| vec![b' '; MODEL_LIST_LIMIT + 128]);
        let total = MODEL_LIST_LIMIT + 1 + h.cuts.first().map_or(0, |c| usize::from(*c % 128));
        let pad = &spaces[..total.saturating_sub(rest.len())];
        let mut cut = vec![pad];
        cut.extend(pieces(rest, &h.cuts));
        check(
            endpoint,
            readable,
            &patterns,
            pad.len() + rest.len(),
            &cut,
            rest,
        );
    } else {
        check(
            endpoint,
            readable,
            &patterns,
            rest.len(),
            &pieces(rest, &h.cuts),
            rest,
        );
    }
});
