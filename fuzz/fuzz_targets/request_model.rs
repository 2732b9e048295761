//! The request-body model reader (`RequestInspector`) on bodies cut into
//! pieces anywhere, for `api: ollama` (which also reads `name`) and
//! `api: openai`.
//!
//! Input: a mode byte, cut points (see `usage_common.rs`), then either the
//! body itself (raw mode) or what `arbitrary` builds a JSON body from
//! (generated mode). Mode bits: 0 the API, 1 generated; in raw mode, bits
//! 2-4 all set: the body is repeated 16 times (what the reader keeps must
//! not grow with it; only now and then, as it is slower).
//!
//! Always: no panic; besides the models it reports (which the gateway
//! clears after each piece) the reader keeps at most `REQUEST_KEPT` heap
//! bytes, whatever the body's length; it reads the same whatever the
//! pieces (models, `single_object`, `complete`, `streams`, the edit); an
//! edit it offers fits the body.
//!
//! When serde_json reads the whole body as one object (every generated
//! body; raw ones that happen to be): the models are exactly the values
//! of the members named `model` (and `name` for Ollama) as Go's decoder
//! matches names, in order, each a `Name` when it is a string that is
//! not blank and at most `MAX_MODEL_NAME` bytes, else `Unreadable`; the
//! body is one complete object, `complete` only once its last `}` has
//! arrived, and the models reported after each piece are a prefix of the
//! final ones; `streams` is the last `stream` member being `true`; and
//! `include_usage_edit` is offered exactly when it should be and gives a
//! body that serde_json reads as the same members with
//! `stream_options.include_usage` set to `true`.
#![no_main]

#[path = "usage_common.rs"]
mod common;

use ai_gateway::config::{ApiKind, MAX_MODEL_NAME};
use ai_gateway::usage::{Edit, NamedModel, RequestInspector};
use arbitrary::{Result, Unstructured};
use common::{
    arb_key, arb_string, arb_value, at_points, fold_key, live, pieces, render_members, repeated,
    reset_peak, Header, Members, Style,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// What the reader may keep besides its models: its scanner's key buffer
/// (128 bytes) and value buffer (up to the longest wanted value, a model
/// name in escapes: `6 * MAX_MODEL_NAME + 2` bytes), each at most doubled
/// by `Vec` growth, and `stream_options` (1 KiB).
const REQUEST_KEPT: usize = 2 * 128 + 2 * (6 * MAX_MODEL_NAME + 2) + 1024 + 512;

/// The heap the reported models use.
fn models_heap(models: &Vec<NamedModel>) -> usize {
    models.capacity() * std::mem::size_of::<NamedModel>()
        + models
            .iter()
            .map(|m| match m {
                NamedModel::Name(s) => s.capacity(),
                NamedModel::Unreadable => 0,
            })
            .sum::<usize>()
}

/// What a reader says once it has read a body.
#[derive(Debug, PartialEq, Eq)]
struct Reading {
    models: Vec<NamedModel>,
    named_any: bool,
    single_object: bool,
    complete: bool,
    streams: bool,
    edit: Option<Edit>,
}

fn reading(r: &RequestInspector) -> Reading {
    Reading {
        models: r.models.clone(),
        named_any: r.named_any(),
        single_object: r.single_object(),
        complete: r.complete(),
        streams: r.streams(),
        edit: r.include_usage_edit(),
    }
}

/// What is checked after each piece of a body serde_json reads as one
/// object: where its last `}` is, and the final models.
struct Valid<'a> {
    last_brace: usize,
    models: &'a [NamedModel],
}

/// Reads `pieces` keeping every model; checks the memory kept and, for a
/// valid body, the readings after each piece.
fn read(api: ApiKind, pieces: &[&[u8]], valid: Option<&Valid<'_>>) -> Reading {
    let base = reset_peak();
    let mut r = RequestInspector::new(api);
    let mut fed = 0;
    for p in pieces {
        r.feed(p);
        fed += p.len();
        if let Some(v) = valid {
            assert!(r.single_object(), "a prefix of one object is one object");
            assert_eq!(
                r.complete(),
                fed > v.last_brace,
                "complete after {fed} bytes"
            );
            assert!(
                v.models.starts_with(&r.models),
                "{:?} so far, {:?} in the end",
                r.models,
                v.models
            );
        }
    }
    let kept = live()
        .saturating_sub(base)
        .saturating_sub(models_heap(&r.models));
    assert!(
        kept <= REQUEST_KEPT,
        "the reader keeps {kept} bytes besides its models"
    );
    reading(&r)
}

/// Reads `pieces` as the gateway does once it has chosen an upstream:
/// models cleared after each piece. Returns how many were reported.
fn read_clearing(api: ApiKind, pieces: &[&[u8]]) -> usize {
    let base = reset_peak();
    let mut r = RequestInspector::new(api);
    let mut named = 0;
    for p in pieces {
        r.feed(p);
        named += r.models.len();
        r.models.clear();
        let kept = live()
            .saturating_sub(base)
            .saturating_sub(models_heap(&r.models));
        assert!(
            kept <= REQUEST_KEPT,
            "the reader keeps {kept} bytes after a piece of {}",
            p.len()
        );
    }
    assert_eq!(r.named_any(), named > 0);
    named
}

// ---------------------------------------------------------------------------
// The reference: serde_json on the whole body.

fn model_value(raw: &str) -> NamedModel {
    match serde_json::from_str::<String>(raw) {
        Ok(s) if !s.trim().is_empty() && s.len() <= MAX_MODEL_NAME => NamedModel::Name(s),
        _ => NamedModel::Unreadable,
    }
}

fn reference_models(api: ApiKind, members: &Members) -> Vec<NamedModel> {
    members
        .0
        .iter()
        .filter(|(k, _)| {
            let k = fold_key(k);
            k == "model" || (api == ApiKind::Ollama && k == "name")
        })
        .map(|(_, raw)| model_value(raw.get()))
        .collect()
}

/// The members as values, in order.
fn values(members: &Members) -> Vec<(String, Value)> {
    members
        .0
        .iter()
        .map(|(k, raw)| {
            (
                k.clone(),
                serde_json::from_str(raw.get()).expect("a raw value parses"),
            )
        })
        .collect()
}

/// The members the body must have after the `include_usage` edit, or
/// `None` when no edit is due: the body does not stream, the client asked
/// for usage itself, or `stream_options` is not an object or `null` (or
/// longer than the 1 KiB the reader keeps of it).
fn reference_edit(members: &Members) -> Option<Vec<(String, Value)>> {
    let last = |name: &str| members.0.iter().rposition(|(k, _)| fold_key(k) == name);
    let stream = last("stream")?;
    if members.0[stream].1.get() != "true" {
        return None;
    }
    let mut want = values(members);
    match last("stream_options") {
        None => want.insert(0, ("stream_options".into(), json!({"include_usage": true}))),
        Some(i) => {
            if members.0[i].1.get().len() > 1024 {
                return None;
            }
            let mut options = match &want[i].1 {
                Value::Object(m) => m.clone(),
                Value::Null => serde_json::Map::new(),
                _ => return None,
            };
            if options.get("include_usage") == Some(&Value::Bool(true)) {
                return None;
            }
            options.insert("include_usage".into(), Value::Bool(true));
            want[i].1 = Value::Object(options);
        }
    }
    Some(want)
}

/// Whether two values are equal, floats within a few units in the last
/// place: the edit writes `stream_options` again from serde_json's reading
/// of it, and serde_json (without `float_roundtrip`, as the gateway builds
/// it) may read a float one unit off.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// Compares the readings of a body serde_json reads as one object with
/// the reference's.
fn check_valid(api: ApiKind, body: &[u8], pieces: &[&[u8]]) {
    let members: Members = serde_json::from_slice(body).expect("checked by the caller");
    let models = reference_models(api, &members);
    let last_brace = body.iter().rposition(|b| *b == b'}').expect("an object");
    let got = read(
        api,
        pieces,
        Some(&Valid {
            last_brace,
            models: &models,
        }),
    );
    let text = String::from_utf8_lossy(body);
    assert_eq!(got.models, models, "body: {text}");
    assert!(got.single_object && got.complete, "body: {text}");
    assert_eq!(got.named_any, !models.is_empty());
    let stream = members
        .0
        .iter()
        .rev()
        .find(|(k, _)| fold_key(k) == "stream");
    assert_eq!(
        got.streams,
        stream.is_some_and(|(_, raw)| raw.get() == "true")
    );
    let want = reference_edit(&members);
    match (&got.edit, want) {
        (None, None) => {}
        (Some(edit), Some(want)) => {
            let edited = edit.apply(body).expect("the edit fits the body");
            let after: Members = serde_json::from_slice(&edited).unwrap_or_else(|e| {
                panic!(
                    "the edited body is not JSON ({e}): {}\nbody: {text}",
                    String::from_utf8_lossy(&edited)
                )
            });
            let after = values(&after);
            assert!(
                after.len() == want.len()
                    && after
                        .iter()
                        .zip(&want)
                        .all(|((k, v), (wk, wv))| k == wk && same(v, wv)),
                "edited: {after:?}\nexpected: {want:?}\nbody: {text}"
            );
        }
        (got, want) => panic!("edit {got:?}, expected {want:?}; body: {text}"),
    }
}

// ---------------------------------------------------------------------------
// Generated bodies.

const MODELS: &[&str] = &["llama3.2", "qwen2.5:7b", "org/model", "", "  ", "\u{e9}"];

/// A value for a member named `key`: of the kind a client sends, mostly.
fn value_for(u: &mut Unstructured<'_>, key: &str) -> Result<Value> {
    if u.ratio(1, 8)? {
        return arb_value(u, 3);
    }
    Ok(match fold_key(key).as_str() {
        "model" | "name" => match u.int_in_range(0..=5)? {
            0..=2 => Value::from(MODELS[u.int_in_range(0..=MODELS.len() - 1)?]),
            3 => Value::from("m".repeat(MAX_MODEL_NAME + u.int_in_range(0..=1)?)),
            4 => Value::from("\u{1f600}".repeat(MAX_MODEL_NAME / 4 + u.int_in_range(0..=1)?)),
            _ => Value::from(arb_string(u)?),
        },
        "stream" => Value::Bool(u.arbitrary()?),
        "stream_options" => match u.int_in_range(0..=3)? {
            0 => json!({"include_usage": u.arbitrary::<bool>()?}),
            1 => Value::Null,
            2 => {
                let mut m = serde_json::Map::new();
                for _ in 0..u.int_in_range(0..=3)? {
                    m.insert(arb_key(u)?, arb_value(u, 2)?);
                }
                Value::Object(m)
            }
            _ => Value::from("x".repeat(u.int_in_range(1000..=1100)?)),
        },
        "messages" => json!([{"role": "user", "content": arb_string(u)?}]),
        _ => arb_value(u, 3)?,
    })
}

/// A body: members (a chat request's, or any), a model somewhere, keys
/// respelled now and then; rendered in some style, with whitespace around.
fn body(u: &mut Unstructured<'_>) -> Result<String> {
    let mut members: Vec<(String, Value)> = Vec::new();
    if u.arbitrary()? {
        members.push(("messages".into(), value_for(u, "messages")?));
        members.push(("stream".into(), value_for(u, "stream")?));
    }
    for _ in 0..u.int_in_range(0..=5)? {
        let k = arb_key(u)?;
        let k = match u.int_in_range(0..=7)? {
            0 => k.to_ascii_uppercase(),
            1 => k.replace('s', "\u{17f}"),
            _ => k,
        };
        let v = value_for(u, &k)?;
        members.push((k, v));
    }
    if u.ratio(7, 8)? {
        let at = u.int_in_range(0..=members.len())?;
        let v = value_for(u, "model")?;
        members.insert(at, ("model".into(), v));
    }
    let style = Style::arbitrary(u)?;
    let ws = [" ", "\n", "\r\n", "\t"];
    let mut text = String::new();
    for _ in 0..u.int_in_range(0..=2)? {
        text.push_str(ws[u.int_in_range(0..=3)?]);
    }
    render_members(&members, style, &mut text);
    for _ in 0..u.int_in_range(0..=2)? {
        text.push_str(ws[u.int_in_range(0..=3)?]);
    }
    Ok(text)
}

fn check(api: ApiKind, body: &[u8], pieces: &[&[u8]]) {
    let cut = read(api, pieces, None);
    if pieces.len() > 1 {
        let whole = read(api, &[body], None);
        assert_eq!(cut, whole, "the same reading whatever the pieces");
    }
    assert_eq!(read_clearing(api, pieces), cut.models.len());
    if let Some(edit) = &cut.edit {
        assert!(cut.complete && cut.streams);
        assert!(edit.apply(body).is_some(), "{edit:?} does not fit the body");
    }
    let valid = matches!(serde_json::from_slice::<Value>(body), Ok(Value::Object(_)));
    if valid {
        check_valid(api, body, pieces);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(h) = Header::read(data) else {
        return;
    };
    let api = if h.mode & 1 == 0 {
        ApiKind::Ollama
    } else {
        ApiKind::Openai
    };
    if h.mode & 2 != 0 {
        let Ok(text) = body(&mut Unstructured::new(h.rest)) else {
            return;
        };
        let b = text.as_bytes();
        assert!(
            matches!(serde_json::from_slice::<Value>(b), Ok(Value::Object(_))),
            "a generated body is JSON: {text}"
        );
        check(api, b, &pieces(b, &h.cuts));
    } else {
        let times = if h.mode & 0x1C == 0x1C { 16 } else { 1 };
        let (all, points) = repeated(h.rest, times, &h.cuts);
        check(api, &all, &at_points(&all, &points));
    }
});
