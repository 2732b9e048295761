//! Shared by the targets of the body readers (`usage_scan`,
//! `request_model`, `model_list`): the input's header (how the body is cut
//! into pieces), a counting allocator (what a reader keeps), JSON values
//! from `arbitrary`, a renderer that writes them the ways servers and
//! clients do, and the reference's reader of an object's members in order
//! (serde_json, each value's raw text kept).
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use arbitrary::{Result, Unstructured};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

// ---------------------------------------------------------------------------
// Memory: the heap bytes live (requested sizes), and the most since a reset.

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes live now. The targets are single-threaded, so a difference
/// of two readings is what the code between them kept.
pub fn live() -> usize {
    LIVE.load(Relaxed)
}

/// Starts a new peak at the bytes live now; returns them.
pub fn reset_peak() -> usize {
    let now = LIVE.load(Relaxed);
    PEAK.store(now, Relaxed);
    now
}

/// The most heap bytes live since [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Relaxed)
}

// ---------------------------------------------------------------------------
// The input: a mode byte, up to 15 cut points, then the rest.

/// The first bytes of every input of these targets: `mode`, then a count
/// `n` (mod 16) and `n` little-endian `u16` cut points; the rest is the
/// body (raw modes) or what `arbitrary` builds one from.
pub struct Header<'a> {
    pub mode: u8,
    pub cuts: Vec<u16>,
    pub rest: &'a [u8],
}

impl<'a> Header<'a> {
    pub fn read(data: &'a [u8]) -> Option<Header<'a>> {
        let (&mode, data) = data.split_first()?;
        let (&n, mut data) = data.split_first()?;
        let mut cuts = Vec::new();
        for _ in 0..n % 16 {
            let Some((c, rest)) = data.split_first_chunk::<2>() else {
                break;
            };
            cuts.push(u16::from_le_bytes(*c));
            data = rest;
        }
        Some(Header {
            mode,
            cuts,
            rest: data,
        })
    }
}

/// `body` cut at `cuts` (each taken modulo the length + 1, sorted; empty
/// pieces included, as a reader may be given one).
pub fn pieces<'b>(body: &'b [u8], cuts: &[u16]) -> Vec<&'b [u8]> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| usize::from(*c) % (body.len() + 1))
        .collect();
    points.sort_unstable();
    let mut out = Vec::with_capacity(points.len() + 1);
    let mut from = 0;
    for p in points.into_iter().chain([body.len()]) {
        out.push(&body[from..p]);
        from = p;
    }
    out
}

/// The body repeated `times` times, and where to cut it: at `cuts` in
/// each copy (see [`at_points`]).
pub fn repeated(body: &[u8], times: usize, cuts: &[u16]) -> (Vec<u8>, Vec<usize>) {
    let n = body.len();
    let mut points: Vec<usize> = Vec::new();
    for copy in 0..times {
        points.extend(cuts.iter().map(|c| copy * n + usize::from(*c) % (n + 1)));
    }
    points.sort_unstable();
    (body.repeat(times), points)
}

/// `body` cut at sorted `points`.
pub fn at_points<'b>(body: &'b [u8], points: &[usize]) -> Vec<&'b [u8]> {
    let mut out = Vec::with_capacity(points.len() + 1);
    let mut from = 0;
    for &p in points.iter().chain([&body.len()]) {
        out.push(&body[from..p]);
        from = p;
    }
    out
}

// ---------------------------------------------------------------------------
// JSON values from `arbitrary`.

/// Keys the generators use besides arbitrary ones: the members the
/// readers look for (and spellings Go's decoder takes for them), and
/// others servers write.
pub const KEYS: &[&str] = &[
    "model",
    "MODEL",
    "Model",
    "name",
    "done",
    "Done",
    "stream",
    "stream_options",
    "include_usage",
    "usage",
    "uſage",
    "choices",
    "choiceſ",
    "prompt_eval_count",
    "eval_count",
    "Eval_Count",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "id",
    "object",
    "data",
    "models",
    "response",
    "message",
    "content",
    "role",
    "tool_calls",
    "arguments",
    "x",
    "",
];

/// Strings the generators use besides arbitrary ones.
pub const STRINGS: &[&str] = &[
    "",
    " ",
    "llama3.2",
    "llama3.2:latest",
    "qwen2.5:7b",
    "done",
    "\"done\":false",
    "\"done\":true}",
    "data: [DONE]",
    "\n\n",
    "\r\n",
    "{",
    "}]",
    "\\",
    "\u{e9}t\u{e9}",
    "\u{1f600}",
    "\u{0}",
    "\u{2028}",
    "model",
];

/// A string: one of [`STRINGS`] or up to 24 arbitrary characters.
pub fn arb_string(u: &mut Unstructured<'_>) -> Result<String> {
    if u.arbitrary::<bool>()? {
        let i = u.int_in_range(0..=STRINGS.len() - 1)?;
        return Ok(STRINGS[i].to_string());
    }
    let n = u.int_in_range(0..=24)?;
    let mut s = String::new();
    for _ in 0..n {
        s.push(u.arbitrary::<char>()?);
    }
    Ok(s)
}

/// A key: one of [`KEYS`] or an arbitrary string.
pub fn arb_key(u: &mut Unstructured<'_>) -> Result<String> {
    if u.ratio(3, 4)? {
        let i = u.int_in_range(0..=KEYS.len() - 1)?;
        return Ok(KEYS[i].to_string());
    }
    arb_string(u)
}

/// A number of any kind JSON has: small, `u64`, `i64`, a finite float.
pub fn arb_number(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=3)? {
        0 => Value::from(u.int_in_range(0..=300u64)?),
        1 => Value::from(u.arbitrary::<u64>()?),
        2 => Value::from(u.arbitrary::<i64>()?),
        _ => serde_json::Number::from_f64(u.arbitrary::<f64>()?).map_or(Value::Null, Value::Number),
    })
}

/// A JSON value at most `depth` levels deep (objects and arrays of at
/// most 4 elements).
pub fn arb_value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let top = if depth == 0 { 3 } else { 5 };
    Ok(match u.int_in_range(0..=top)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => arb_number(u)?,
        3 => Value::String(arb_string(u)?),
        4 => {
            let n = u.int_in_range(0..=4)?;
            let mut a = Vec::new();
            for _ in 0..n {
                a.push(arb_value(u, depth - 1)?);
            }
            Value::Array(a)
        }
        _ => {
            let n = u.int_in_range(0..=4)?;
            let mut m = serde_json::Map::new();
            for _ in 0..n {
                m.insert(arb_key(u)?, arb_value(u, depth - 1)?);
            }
            Value::Object(m)
        }
    })
}

// ---------------------------------------------------------------------------
// Rendering: compact (serde_json, Go), spaced (Python's `json.dumps`),
// pretty; non-ASCII escaped or not; keys escaped or not.

#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub spacing: Spacing,
    /// Non-ASCII characters as `\uXXXX` (Python's `ensure_ascii`).
    pub ascii: bool,
    /// Every character of every key as `\uXXXX`.
    pub escape_keys: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Compact,
    Spaced,
    Pretty,
}

impl Style {
    pub fn arbitrary(u: &mut Unstructured<'_>) -> Result<Style> {
        Ok(Style {
            spacing: match u.int_in_range(0..=3)? {
                0 | 1 => Spacing::Compact,
                2 => Spacing::Spaced,
                _ => Spacing::Pretty,
            },
            ascii: u.ratio(1, 4)?,
            escape_keys: u.ratio(1, 8)?,
        })
    }
}

fn escape_all(s: &str, out: &mut String) {
    let mut buf = [0u16; 2];
    for c in s.chars() {
        for unit in c.encode_utf16(&mut buf) {
            let _ = write!(out, "\\u{unit:04x}");
        }
    }
}

/// `s` as a JSON string.
pub fn render_string(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    let mut buf = [0u16; 2];
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (ascii && !c.is_ascii()) => {
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn render_key(k: &str, style: Style, out: &mut String) {
    if style.escape_keys {
        out.push('"');
        escape_all(k, out);
        out.push('"');
    } else {
        render_string(k, style.ascii, out);
    }
}

fn newline(style: Style, indent: usize, out: &mut String) {
    if style.spacing == Spacing::Pretty {
        out.push('\n');
        for _ in 0..indent {
            out.push_str("  ");
        }
    }
}

fn render_object<'v>(
    members: impl ExactSizeIterator<Item = (&'v str, &'v Value)>,
    style: Style,
    indent: usize,
    out: &mut String,
) {
    out.push('{');
    let n = members.len();
    for (i, (k, v)) in members.enumerate() {
        if i > 0 {
            out.push(',');
            if style.spacing == Spacing::Spaced {
                out.push(' ');
            }
        }
        newline(style, indent + 1, out);
        render_key(k, style, out);
        out.push(':');
        if style.spacing != Spacing::Compact {
            out.push(' ');
        }
        render_value(v, style, indent + 1, out);
    }
    if n > 0 {
        newline(style, indent, out);
    }
    out.push('}');
}

/// `v` as JSON in `style`.
pub fn render_value(v: &Value, style: Style, indent: usize, out: &mut String) {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => out.push_str(&v.to_string()),
        Value::String(s) => render_string(s, style.ascii, out),
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    if style.spacing == Spacing::Spaced {
                        out.push(' ');
                    }
                }
                newline(style, indent + 1, out);
                render_value(e, style, indent + 1, out);
            }
            if !a.is_empty() {
                newline(style, indent, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            render_object(m.iter().map(|(k, v)| (k.as_str(), v)), style, indent, out)
        }
    }
}

/// An object from its members in order (keys may repeat).
pub fn render_members(members: &[(String, Value)], style: Style, out: &mut String) {
    render_object(members.iter().map(|(k, v)| (k.as_str(), v)), style, 0, out);
}

// ---------------------------------------------------------------------------
// The reference's reading: a top-level object's members in order, repeated
// keys included, each value's raw text kept.

pub struct Members(pub Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A key as Go's `encoding/json` matches it against a lower-case ASCII
/// field name: ASCII case ignored, `ſ` is `s`, the Kelvin sign is `k`.
pub fn fold_key(k: &str) -> String {
    k.chars()
        .map(|c| match c {
            '\u{17f}' => 's',
            '\u{212a}' => 'k',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}
