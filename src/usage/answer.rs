//! Token usage read off an answer as it streams past, and the removal of
//! the usage-only SSE event a client did not ask for.
//!
//! [`AnswerMeter`] is fed every piece of the answer body as the gateway
//! forwards it; it keeps a few counters and at most a few KiB of the
//! members it reads (see [`Scanner`]), never the body. It reads:
//!
//! - Ollama: `prompt_eval_count` and `eval_count` in the final NDJSON record
//!   (`"done": true`), or in the one object of an answer that does not
//!   stream;
//! - OpenAI-compatible servers: `usage` in the JSON answer, or in the last
//!   SSE event of a stream (with `stream_options.include_usage`);
//! - Anthropic's Messages API: `usage` in the JSON answer, or the counts of
//!   a stream's `message_start` and last `message_delta` events (see
//!   [`super::anthropic`]).
//!
//! A stream that ends without usage (cut by the upstream, or an OpenAI
//! stream without `include_usage`) is *estimated*: one completion token
//! per content record, the way these servers stream; prompt tokens unknown
//! (but for an Anthropic stream, whose `message_start` gave them).
//! An answer that is compressed, not JSON, or has no usage is *unknown*.

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use std::sync::LazyLock;

use super::anthropic;
use super::scan::{Event, Scanner};
use crate::config::MAX_MODEL_NAME;

/// Members read from answers, with the most bytes kept of each.
const WANTED: &[(&str, usize)] = &[
    ("model", MAX_MODEL_NAME * 6 + 2),
    ("done", 8),
    ("prompt_eval_count", 24),
    ("eval_count", 24),
    ("usage", 4096),
    ("choices", 16),
];
const MODEL: usize = 0;
const DONE: usize = 1;
const PROMPT_EVAL_COUNT: usize = 2;
const EVAL_COUNT: usize = 3;
const USAGE: usize = 4;
const CHOICES: usize = 5;

/// How the answer body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// One JSON object, or NDJSON: a sequence of them.
    Json,
    /// `text/event-stream`: JSON in `data:` lines.
    Sse,
    /// Compressed, or not JSON: nothing is read.
    Opaque,
}

/// Where the usage of an answer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The upstream's own counts.
    Reported,
    /// Counted from the records of a stream that reported none.
    Estimated,
    /// Nothing to count from.
    Unknown,
}

impl UsageSource {
    pub fn label(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
            UsageSource::Unknown => "unknown",
        }
    }
}

/// The usage of one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub model: Option<String>,
    /// Every input token, cache reads and writes included.
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Of the prompt tokens, those written to and read from the prompt
    /// cache (Anthropic's `cache_creation_input_tokens` and
    /// `cache_read_input_tokens`), when the answer said.
    pub cache_creation_tokens: Option<u64>,
    pub cache_read_tokens: Option<u64>,
    pub source: UsageSource,
}

impl Usage {
    /// What counts against a token budget.
    pub fn total(&self) -> u64 {
        self.prompt_tokens
            .unwrap_or(0)
            .saturating_add(self.completion_tokens.unwrap_or(0))
    }
}

/// The members of the record being read.
#[derive(Debug, Default)]
struct Record {
    model: Option<String>,
    done: Option<bool>,
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
    usage: Option<(u64, u64)>,
    /// `choices` is a non-empty array.
    has_choices: bool,
    /// `choices` is `[]`.
    empty_choices: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line.
    Start,
    /// Reading the field name (up to `:`).
    Field,
    /// After `data:`; a single space may follow.
    DataSpace,
    /// The first byte of a `data:` value.
    DataFirst,
    /// In the value of a `data:` line, fed to the scanner.
    Data,
    /// In a line that is not read (another field, `[DONE]`, a comment).
    Skip,
}

/// Reads usage off an answer; see the module documentation.
#[derive(Debug)]
pub struct AnswerMeter {
    framing: Framing,
    streamed: bool,
    scanner: Scanner,
    line: Line,
    field: [u8; 8],
    field_len: usize,
    record: Record,
    records: u64,
    content_records: u64,
    model: Option<String>,
    prompt: Option<u64>,
    completion: Option<u64>,
    reported: bool,
    /// Set when a record that ended during the last feed had usage and no
    /// choices: an OpenAI usage-only chunk.
    usage_only_seen: bool,
    /// An answer of Anthropic's Messages API: its records are read by
    /// this (with the scanner's wanted members its own) instead.
    anthropic: Option<anthropic::Reader>,
    /// Content lines counted without being scanned (what the tests check).
    #[cfg(test)]
    skipped_lines: u64,
}

impl AnswerMeter {
    /// A meter for an answer with these headers (raw values).
    pub fn new(content_type: Option<&[u8]>, content_encoding: Option<&[u8]>) -> AnswerMeter {
        AnswerMeter::build(content_type, content_encoding, false)
    }

    /// A meter for an answer of Anthropic's Messages API with these
    /// headers (raw values).
    pub fn anthropic(content_type: Option<&[u8]>, content_encoding: Option<&[u8]>) -> AnswerMeter {
        AnswerMeter::build(content_type, content_encoding, true)
    }

    fn build(
        content_type: Option<&[u8]>,
        content_encoding: Option<&[u8]>,
        anthropic: bool,
    ) -> AnswerMeter {
        let encoded = content_encoding.is_some_and(|e| {
            let e = e.trim_ascii();
            !e.is_empty() && !e.eq_ignore_ascii_case(b"identity")
        });
        let ct = content_type
            .map(|c| {
                let c = c.split(|b| *b == b';').next().unwrap_or_default();
                c.trim_ascii()
            })
            .unwrap_or_default();
        let is = |t: &[u8]| ct.eq_ignore_ascii_case(t);
        let json_suffix = ct.len() >= 5
            && ct
                .get(ct.len() - 5..)
                .is_some_and(|s| s.eq_ignore_ascii_case(b"+json"));
        let (framing, streamed) = if encoded {
            (Framing::Opaque, false)
        } else if is(b"text/event-stream") {
            (Framing::Sse, true)
        } else if is(b"application/x-ndjson") || is(b"application/jsonl") {
            (Framing::Json, true)
        } else if ct.is_empty() || is(b"application/json") || json_suffix {
            (Framing::Json, false)
        } else {
            (Framing::Opaque, false)
        };
        AnswerMeter {
            framing,
            streamed,
            scanner: Scanner::new(if anthropic { anthropic::WANTED } else { WANTED }),
            line: Line::Start,
            field: [0; 8],
            field_len: 0,
            record: Record::default(),
            records: 0,
            content_records: 0,
            model: None,
            prompt: None,
            completion: None,
            reported: false,
            usage_only_seen: false,
            anthropic: anthropic.then(anthropic::Reader::default),
            #[cfg(test)]
            skipped_lines: 0,
        }
    }

    /// Whether the answer is SSE.
    pub fn is_sse(&self) -> bool {
        self.framing == Framing::Sse
    }

    /// Reads the next piece of the answer.
    pub fn feed(&mut self, piece: &[u8]) {
        self.usage_only_seen = false;
        match self.framing {
            Framing::Opaque => {}
            Framing::Json => self.scan(piece),
            Framing::Sse => self.feed_sse(piece),
        }
    }

    /// Whether a usage-only record (usage, and `choices: []`) ended during
    /// the last [`AnswerMeter::feed`].
    pub fn saw_usage_only(&self) -> bool {
        self.usage_only_seen
    }

    /// A byte of an SSE line's field name (or the line's end, or the
    /// colon after the name): only `data:` lines are read further.
    fn field_byte(&mut self, b: u8, eol: bool) {
        if eol {
            self.line = Line::Start;
        } else if b == b':' {
            let name = self.field.get(..self.field_len).unwrap_or_default();
            self.line = if self.line == Line::Field && name == b"data" {
                Line::DataSpace
            } else {
                Line::Skip
            };
        } else if self.field_len < self.field.len() {
            if let Some(slot) = self.field.get_mut(self.field_len) {
                *slot = b;
            }
            self.field_len += 1;
            self.line = Line::Field;
        } else {
            self.line = Line::Skip;
        }
        if self.line != Line::Field {
            self.field_len = 0;
        }
    }

    fn feed_sse(&mut self, piece: &[u8]) {
        let mut i = 0;
        while i < piece.len() {
            let Some(&b) = piece.get(i) else { break };
            let eol = b == b'\n' || b == b'\r';
            match self.line {
                Line::Start | Line::Field => {
                    self.field_byte(b, eol);
                    i += 1;
                }
                Line::DataSpace => {
                    self.line = Line::DataFirst;
                    if b == b' ' {
                        i += 1;
                    }
                }
                Line::DataFirst if b == b' ' || b == b'\t' => i += 1,
                Line::DataFirst => {
                    // `[DONE]` and other values that are not objects are
                    // not read (unless an object spans several lines).
                    self.line = if self.scanner.between() && !(b == OBJECT_OPEN || eol) {
                        Line::Skip
                    } else {
                        Line::Data
                    };
                }
                Line::Data => {
                    let rest = piece.get(i..).unwrap_or_default();
                    let n = rest
                        .iter()
                        .position(|c| *c == b'\n' || *c == b'\r')
                        .unwrap_or(rest.len());
                    let data = rest.get(..n).unwrap_or_default();
                    self.scan(data);
                    i += n;
                    if n < rest.len() {
                        // Lines of one event's data are joined by a newline.
                        self.scan(b"\n");
                        self.line = Line::Start;
                        i += 1;
                    }
                }
                Line::Skip => {
                    if eol {
                        self.line = Line::Start;
                    }
                    i += 1;
                }
            }
        }
    }

    /// Reads JSON. In an NDJSON stream whose model is known, a line that
    /// is a content record in the compact form servers write
    /// (`"done":false`, no token count, no usage) is counted without being
    /// scanned: every line of a stream but the last is one, and the last,
    /// with the counts, is always scanned.
    fn scan(&mut self, mut bytes: &[u8]) {
        if self.streamed {
            while let Some(nl) = memchr::memchr(b'\n', bytes) {
                let (line, rest) = bytes.split_at(nl + 1);
                if self.model.is_some() && self.scanner.between() && is_content_line(line) {
                    self.scanner.skip(line.len());
                    self.records += 1;
                    self.content_records += 1;
                    #[cfg(test)]
                    {
                        self.skipped_lines += 1;
                    }
                } else {
                    self.scan_all(line);
                }
                bytes = rest;
            }
        }
        self.scan_all(bytes);
    }

    fn scan_all(&mut self, bytes: &[u8]) {
        if let AnswerMeter {
            scanner,
            records,
            model,
            anthropic: Some(reader),
            ..
        } = self
        {
            scanner.feed(bytes, &mut |e| match e {
                Event::ObjectStart { .. } => reader.start(),
                Event::Member {
                    key,
                    raw,
                    truncated,
                    ..
                } => reader.member(key, raw, truncated),
                Event::ObjectEnd { .. } => {
                    *records += 1;
                    let named = reader.end();
                    if model.is_none() {
                        *model = named;
                    }
                }
                Event::NotObjects => {}
            });
            return;
        }
        let AnswerMeter {
            scanner,
            record,
            records,
            content_records,
            model,
            prompt,
            completion,
            reported,
            usage_only_seen,
            ..
        } = self;
        scanner.feed(bytes, &mut |e| match e {
            Event::ObjectStart { .. } => *record = Record::default(),
            // The first model named is the answer's: later ones are not
            // read again.
            Event::Member { key: MODEL, .. } if model.is_some() => {}
            Event::Member {
                key,
                raw,
                truncated,
                ..
            } => read_member(record, key, raw, truncated),
            Event::ObjectEnd { .. } => {
                let r = std::mem::take(record);
                *records += 1;
                if r.done == Some(false) || r.has_choices {
                    *content_records += 1;
                }
                if model.is_none() {
                    *model = r.model;
                }
                if let Some((p, c)) = r.usage {
                    *prompt = Some(p);
                    *completion = Some(c);
                    *reported = true;
                    if r.empty_choices {
                        *usage_only_seen = true;
                    }
                } else if r.prompt_eval_count.is_some() || r.eval_count.is_some() {
                    *prompt = Some(r.prompt_eval_count.unwrap_or(0));
                    *completion = Some(r.eval_count.unwrap_or(0));
                    *reported = true;
                }
            }
            Event::NotObjects => {}
        });
    }

    /// The usage read so far: call when the answer has ended (or broke off).
    pub fn usage(&self) -> Usage {
        let failed = self.framing == Framing::Opaque || self.scanner.failed();
        if let Some(reader) = &self.anthropic {
            return self.anthropic_usage(reader, failed);
        }
        let source = if self.reported && !failed {
            UsageSource::Reported
        } else if !failed && (self.streamed || self.records > 1) && self.content_records > 0 {
            UsageSource::Estimated
        } else {
            UsageSource::Unknown
        };
        let (prompt_tokens, completion_tokens) = match source {
            UsageSource::Reported => (self.prompt, self.completion),
            UsageSource::Estimated => (None, Some(self.content_records)),
            UsageSource::Unknown => (None, None),
        };
        Usage {
            model: if failed { None } else { self.model.clone() },
            prompt_tokens,
            completion_tokens,
            cache_creation_tokens: None,
            cache_read_tokens: None,
            source,
        }
    }

    /// [`AnswerMeter::usage`] of an Anthropic answer: reported when a
    /// `usage` was read; a stream without one (cut before its
    /// `message_delta`) estimated from its `content_block_delta` events,
    /// with the input counts of its `message_start` if it had one.
    fn anthropic_usage(&self, reader: &anthropic::Reader, failed: bool) -> Usage {
        let c = &reader.counts;
        let started = c.prompt().is_some();
        let source = if failed {
            UsageSource::Unknown
        } else if reader.reported {
            UsageSource::Reported
        } else if self.streamed && (reader.deltas > 0 || started) {
            UsageSource::Estimated
        } else {
            UsageSource::Unknown
        };
        let completion = match source {
            UsageSource::Reported => c.output(),
            UsageSource::Estimated => Some(reader.deltas),
            UsageSource::Unknown => None,
        };
        let known = source != UsageSource::Unknown;
        Usage {
            model: if failed { None } else { self.model.clone() },
            prompt_tokens: c.prompt().filter(|_| known),
            completion_tokens: completion,
            cache_creation_tokens: c.cache_creation().filter(|_| known),
            cache_read_tokens: c.cache_read().filter(|_| known),
            source,
        }
    }
}

/// The byte that opens a JSON object, written as a number so that no
/// brace stands unpaired in the code (brace-counting tools misread one).
const OBJECT_OPEN: u8 = 0x7B;

/// Whether an NDJSON line is a content record: one object whose own
/// `"done"` member says `false` (Ollama's intermediate records; its final
/// record says `"done":true` and carries the counts). Inside JSON strings
/// quotes are escaped, so text a model wrote cannot pass for the member;
/// an object nested in the record can (a tool call's arguments, which the
/// model writes), so the member must be at the record's own level. Ollama
/// writes `done` after the message: the last `"done":false` is checked,
/// and a line where it is nested is scanned.
fn is_content_line(line: &[u8]) -> bool {
    static NOT_DONE: LazyLock<memmem::FinderRev<'static>> =
        LazyLock::new(|| memmem::FinderRev::new(b"\"done\":false"));
    let body = line.trim_ascii();
    body.first() == Some(&OBJECT_OPEN)
        && body.last() == Some(&b'}')
        && NOT_DONE
            .rfind(body)
            .is_some_and(|at| depth_at(body, at) == Some(1))
}

/// How deep in objects and arrays byte `at` of the JSON text `json` is;
/// `None` inside a string.
fn depth_at(json: &[u8], at: usize) -> Option<u32> {
    let mut depth = 0u32;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json.get(..at).unwrap_or_default() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b'"' => in_string = true,
                OBJECT_OPEN | b'[' => depth = depth.saturating_add(1),
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    (!in_string).then_some(depth)
}

fn read_member(record: &mut Record, key: usize, raw: &[u8], truncated: bool) {
    let number = || -> Option<u64> {
        if truncated {
            return None;
        }
        std::str::from_utf8(raw).ok()?.parse().ok()
    };
    match key {
        MODEL if !truncated => {
            record.model = serde_json::from_slice::<String>(raw)
                .ok()
                .filter(|m| !m.is_empty() && m.len() <= MAX_MODEL_NAME);
        }
        DONE => record.done = Some(raw == b"true"),
        PROMPT_EVAL_COUNT => record.prompt_eval_count = number(),
        EVAL_COUNT => record.eval_count = number(),
        USAGE if !truncated => record.usage = openai_usage(raw),
        CHOICES => {
            let inner: Vec<u8> = raw
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            record.empty_choices = !truncated && inner == b"[]";
            record.has_choices = raw.first() == Some(&b'[') && !record.empty_choices;
        }
        _ => {}
    }
}

/// `(prompt_tokens, completion_tokens)` of an OpenAI `usage` object;
/// `None` for `null` or something else.
fn openai_usage(raw: &[u8]) -> Option<(u64, u64)> {
    if raw == b"null" {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct U {
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
    }
    let u: Option<U> = serde_json::from_slice(raw).ok()?;
    let u = u?;
    if u.prompt_tokens.is_none() && u.completion_tokens.is_none() {
        return None;
    }
    Some((
        u.prompt_tokens.unwrap_or(0),
        u.completion_tokens.unwrap_or(0),
    ))
}

/// The most of an unfinished SSE event held back while it may still turn
/// out to be the usage-only event: such events are a few hundred bytes.
pub const HELD_EVENT_LIMIT: usize = 16 * 1024;

/// Removes the usage-only SSE event (the one `include_usage` adds) from a
/// stream, forwarding everything else as soon as it is complete. Only an
/// unfinished trailing event is ever held back, and at most
/// [`HELD_EVENT_LIMIT`] of it.
#[derive(Debug, Default)]
pub struct SseHider {
    /// The unfinished event, held back.
    held: BytesMut,
    /// The current event grew past the limit: it is passed through to its
    /// end without being looked at.
    passing: bool,
    /// The current line has had something besides line ends.
    line_has_text: bool,
}

impl SseHider {
    /// What to forward of `piece` (the next piece of the answer; `end` when
    /// it is the last). Complete events go to `meter`, and the usage-only
    /// one is left out.
    pub fn filter(&mut self, piece: &[u8], end: bool, meter: &mut AnswerMeter) -> Bytes {
        let mut out = BytesMut::new();
        let mut from = 0;
        for (i, b) in piece.iter().enumerate() {
            match b {
                b'\n' => {
                    if !self.line_has_text {
                        // A blank line: the event ends here.
                        let event = piece.get(from..=i).unwrap_or_default();
                        self.event_done(event, &mut out, meter);
                        from = i + 1;
                    }
                    self.line_has_text = false;
                }
                b'\r' => {}
                _ => self.line_has_text = true,
            }
        }
        let rest = piece.get(from..).unwrap_or_default();
        if self.passing {
            meter.feed(rest);
            out.extend_from_slice(rest);
        } else {
            self.held.extend_from_slice(rest);
            if self.held.len() > HELD_EVENT_LIMIT {
                // Too big for a usage-only event: let it through.
                self.passing = true;
                meter.feed(&self.held);
                out.extend_from_slice(&self.held);
                self.held.clear();
            }
        }
        if end && !self.held.is_empty() {
            meter.feed(&self.held);
            out.extend_from_slice(&self.held);
            self.held.clear();
        }
        out.freeze()
    }

    fn event_done(&mut self, tail: &[u8], out: &mut BytesMut, meter: &mut AnswerMeter) {
        if self.passing {
            self.passing = false;
            meter.feed(tail);
            out.extend_from_slice(tail);
            return;
        }
        self.held.extend_from_slice(tail);
        meter.feed(&self.held);
        if !meter.saw_usage_only() {
            out.extend_from_slice(&self.held);
        }
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(ct: &str, body: &str, step: usize) -> Usage {
        let mut m = AnswerMeter::new(Some(ct.as_bytes()), None);
        for piece in body.as_bytes().chunks(step.max(1)) {
            m.feed(piece);
        }
        m.usage()
    }

    fn each_step(ct: &str, body: &str) -> Usage {
        let whole = meter(ct, body, body.len());
        for step in [1, 2, 5, 13] {
            assert_eq!(meter(ct, body, step), whole, "pieces of {step}");
        }
        whole
    }

    const OLLAMA_STREAM: &str = concat!(
        "{\"model\":\"llama3.2\",\"response\":\"The\",\"done\":false}\n",
        "{\"model\":\"llama3.2\",\"response\":\" sky\",\"done\":false}\n",
        "{\"model\":\"llama3.2\",\"response\":\"\",\"done\":true,\"context\":[1,2,3,4,5],",
        "\"prompt_eval_count\":26,\"eval_count\":290}\n"
    );

    #[test]
    fn content_lines_are_counted_without_being_scanned() {
        assert!(is_content_line(
            b"{\"model\":\"m\",\"response\":\"a\",\"done\":false}\n"
        ));
        assert!(is_content_line(
            b" {\"done\":false,\"response\":\"\\\"done\\\":true\"}\r\n"
        ));
        assert!(!is_content_line(b"{\"done\":true,\"eval_count\":3}\n"));
        assert!(
            !is_content_line(b"{\"response\":\"\\\"done\\\":false\"}\n"),
            "only in a string"
        );
        assert!(
            !is_content_line(b"{\"done\":false,\n"),
            "not a whole object"
        );
        // A stream cut before its final record: what was counted without
        // scanning makes the same estimate as a full scan would.
        let mut lines = String::new();
        for i in 0..50 {
            lines.push_str(&format!(
                "{{\"model\":\"m\",\"response\":\"t{i}\",\"done\":false}}\n"
            ));
        }
        let cut = each_step("application/x-ndjson", &lines);
        let mut m = AnswerMeter::new(Some(b"application/x-ndjson"), None);
        m.framing = Framing::Json;
        m.streamed = false;
        m.feed(lines.as_bytes());
        let scanned = m.usage();
        let mut fast = AnswerMeter::new(Some(b"application/x-ndjson"), None);
        fast.feed(lines.as_bytes());
        assert_eq!(
            fast.skipped_lines, 49,
            "every line after the first, unscanned"
        );
        assert_eq!(fast.usage(), cut);
        assert_eq!(cut.model.as_deref(), Some("m"));
        assert_eq!(
            cut.completion_tokens, scanned.completion_tokens,
            "{cut:?} {scanned:?}"
        );
        assert_eq!(cut.source, scanned.source);
    }

    #[test]
    fn done_false_inside_the_final_record_is_not_a_content_line() {
        // Found by fuzz/fuzz_targets/usage_scan.rs: a tool call's arguments
        // (which the model writes) saying `"done":false` in Ollama's final
        // record made the line pass for a content record, so its counts
        // were never read.
        let stream = concat!(
            "{\"model\":\"qwen2\",\"message\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"done\":false}\n",
            "{\"model\":\"qwen2\",\"message\":{\"role\":\"assistant\",\"content\":\"\",",
            "\"tool_calls\":[{\"function\":{\"name\":\"f\",\"arguments\":{\"done\":false}}}]},",
            "\"done_reason\":\"stop\",\"done\":true,\"prompt_eval_count\":86,\"eval_count\":7}\n"
        );
        let u = each_step("application/x-ndjson", stream);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.source),
            (Some(86), Some(7), UsageSource::Reported)
        );
        let last = stream.lines().nth(1).unwrap_or_default();
        assert!(!is_content_line(last.as_bytes()));
        assert!(
            !is_content_line(b"{\"model\":\"m\",\"x\":{\"done\":false}}\n"),
            "nested, and no done of its own"
        );
        assert!(
            is_content_line(
                b"{\"message\":{\"tool_calls\":[{\"arguments\":{\"done\":false}}]},\"done\":false}\n"
            ),
            "its own done too"
        );
    }

    #[test]
    fn ollama_streams_and_single_answers() {
        let u = each_step("application/x-ndjson", OLLAMA_STREAM);
        assert_eq!(u.model.as_deref(), Some("llama3.2"));
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens),
            (Some(26), Some(290))
        );
        assert_eq!(u.source, UsageSource::Reported);
        let one = r#"{"model":"m","message":{"content":"hi"},"done":true,"prompt_eval_count":3,"eval_count":4}"#;
        let u = each_step("application/json; charset=utf-8", one);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(3), Some(4)));
        let embed = r#"{"model":"e","embeddings":[[0.1,0.2]],"prompt_eval_count":8}"#;
        let u = each_step("application/json", embed);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(8), Some(0)));
    }

    #[test]
    fn a_cut_stream_is_estimated_and_a_huge_final_record_costs_nothing() {
        let cut = OLLAMA_STREAM.lines().take(2).collect::<Vec<_>>().join("\n");
        let u = each_step("application/x-ndjson", &cut);
        assert_eq!(u.source, UsageSource::Estimated);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (None, Some(2)));
        let context = (0..200_000)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let big = format!(
            "{{\"done\":false}}\n{{\"done\":true,\"context\":[{context}],\"prompt_eval_count\":5,\"eval_count\":6}}\n"
        );
        let mut m = AnswerMeter::new(Some(b"application/x-ndjson"), None);
        for piece in big.as_bytes().chunks(4096) {
            m.feed(piece);
        }
        let u = m.usage();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(5), Some(6)));
        assert!(m.scanner.offset() > 1_000_000);
        // 1.3 MB read; what is kept is the buffers of the wanted keys
        // (the longest, `model`, at most 1,538 bytes), not the context.
        let longest = WANTED.iter().map(|(_, n)| *n).max().unwrap_or(0);
        assert!(
            m.scanner.kept_bytes() <= 2 * (longest + 128),
            "{} bytes kept",
            m.scanner.kept_bytes()
        );
    }

    fn sse(events: &[&str]) -> String {
        events.iter().map(|e| format!("data: {e}\n\n")).collect()
    }

    const CHUNK: &str = r#"{"id":"c","object":"chat.completion.chunk","model":"qwen2","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}"#;
    const USAGE_ONLY: &str = r#"{"id":"c","object":"chat.completion.chunk","model":"qwen2","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}}"#;

    #[test]
    fn openai_answers() {
        let body = sse(&[CHUNK, CHUNK, USAGE_ONLY, "[DONE]"]);
        let u = each_step("text/event-stream; charset=utf-8", &body);
        assert_eq!(u.model.as_deref(), Some("qwen2"));
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(11), Some(2)));
        assert_eq!(u.source, UsageSource::Reported);
        let crlf = body.replace('\n', "\r\n").replace("data: ", "data:");
        assert_eq!(each_step("text/event-stream", &crlf), u);

        let without = sse(&[CHUNK, CHUNK, CHUNK, "[DONE]"]);
        let u = each_step("text/event-stream", &without);
        assert_eq!(u.source, UsageSource::Estimated);
        assert_eq!(u.completion_tokens, Some(3));

        let json = r#"{"id":"x","object":"chat.completion","model":"m","choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":7,"completion_tokens":9,"total_tokens":16}}"#;
        let u = each_step("application/json", json);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.source),
            (Some(7), Some(9), UsageSource::Reported)
        );
        assert_eq!(
            each_step("Application/Vnd.Example+JSON", json).source,
            UsageSource::Reported
        );
        let emb = r#"{"object":"list","data":[{"embedding":[0.1]}],"model":"e","usage":{"prompt_tokens":4,"total_tokens":4}}"#;
        let u = each_step("application/json", emb);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(4), Some(0)));
        let comments = ": keep-alive\nevent: message\nid: 3\nretry: 10\n\n".to_string() + &body;
        assert_eq!(
            each_step("text/event-stream", &comments).prompt_tokens,
            Some(11)
        );
    }

    #[test]
    fn what_cannot_be_read_is_unknown() {
        let mut gz = AnswerMeter::new(Some(b"application/json"), Some(b"gzip"));
        gz.feed(b"\x1f\x8b\x08\x00garbage");
        assert_eq!(gz.usage().source, UsageSource::Unknown);
        let u = each_step("text/plain", "prompt_eval_count: 5");
        assert_eq!(u.source, UsageSource::Unknown);
        let u = each_step("application/json", "<html>oops</html>");
        assert_eq!((u.source, u.model), (UsageSource::Unknown, None));
        let u = each_step("application/json", r#"{"model":"m","choices":[{"x":1}]}"#);
        assert_eq!(u.source, UsageSource::Unknown, "one answer without usage");
        let mut id = AnswerMeter::new(Some(b"application/json"), Some(b"identity"));
        id.feed(br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#);
        assert_eq!(id.usage().source, UsageSource::Reported);
    }

    /// What a client receives through the hider when the upstream writes
    /// `body` in pieces of `step`, and the usage read.
    fn hide(body: &str, step: usize) -> (String, Usage) {
        let mut m = AnswerMeter::new(Some(b"text/event-stream"), None);
        let mut h = SseHider::default();
        let mut out = Vec::new();
        let pieces: Vec<&[u8]> = body.as_bytes().chunks(step.max(1)).collect();
        for (i, p) in pieces.iter().enumerate() {
            out.extend_from_slice(&h.filter(p, i + 1 == pieces.len(), &mut m));
        }
        (String::from_utf8(out).unwrap(), m.usage())
    }

    #[test]
    fn the_usage_only_event_is_hidden_and_everything_else_kept() {
        let body = sse(&[CHUNK, CHUNK, USAGE_ONLY, "[DONE]"]);
        let want = sse(&[CHUNK, CHUNK, "[DONE]"]);
        for step in [1, 3, 7, 64, body.len()] {
            let (got, u) = hide(&body, step);
            assert_eq!(got, want, "pieces of {step}");
            assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(11), Some(2)));
        }
        let crlf = body.replace('\n', "\r\n");
        assert_eq!(hide(&crlf, 5).0, want.replace('\n', "\r\n"));
        // An unfinished last event is forwarded at the end.
        let (got, _) = hide("data: {\"choices\":[1]}\n\ndata: [DONE]", 4);
        assert_eq!(got, "data: {\"choices\":[1]}\n\ndata: [DONE]");
    }

    #[test]
    fn complete_events_are_never_held_back() {
        let mut m = AnswerMeter::new(Some(b"text/event-stream"), None);
        let mut h = SseHider::default();
        let first = format!("data: {CHUNK}\n\ndata: {{\"choi");
        let out = h.filter(first.as_bytes(), false, &mut m);
        assert_eq!(
            out,
            format!("data: {CHUNK}\n\n").as_bytes(),
            "only the unfinished event waits"
        );
        let out = h.filter(b"ces\":[{}]}\n\n", false, &mut m);
        assert_eq!(out, &b"data: {\"choices\":[{}]}\n\n"[..]);
        // A huge event is not held past the limit.
        let huge = format!(
            "data: {{\"choices\":[\"{}",
            "x".repeat(HELD_EVENT_LIMIT + 1)
        );
        let out = h.filter(huge.as_bytes(), false, &mut m);
        assert_eq!(out.len(), huge.len());
        let out = h.filter(b"\"]}\n\n", false, &mut m);
        assert_eq!(out, &b"\"]}\n\n"[..]);
        assert_eq!(m.usage().completion_tokens, Some(3));
    }

    /// An Anthropic answer fed in pieces of 1, 2, 5, 13 and whole: the
    /// same usage each time.
    fn anthropic_each_step(ct: &str, body: &str) -> Usage {
        let run = |step: usize| {
            let mut m = AnswerMeter::anthropic(Some(ct.as_bytes()), None);
            for piece in body.as_bytes().chunks(step.max(1)) {
                m.feed(piece);
            }
            m.usage()
        };
        let whole = run(body.len());
        for step in [1, 2, 5, 13] {
            assert_eq!(run(step), whole, "pieces of {step}");
        }
        whole
    }

    /// Anthropic's SSE: each event named, then its data.
    fn events(events: &[(&str, &str)]) -> String {
        events
            .iter()
            .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
            .collect()
    }

    const A_START: &str = r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-x","stop_reason":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":20,"output_tokens":1}}}"#;
    const A_BLOCK: &str =
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#;
    const A_DELTA: &str = r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi \"usage\":{\"output_tokens\":999}"}}"#;
    const A_TOOL_DELTA: &str = r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"usage\": {\"output_tokens\": 999}, \"model\": \"x\"}"}}"#;

    fn anthropic_stream(deltas: usize, tail: &[(&str, &str)]) -> String {
        let mut all = vec![
            ("message_start", A_START),
            ("content_block_start", A_BLOCK),
            ("ping", r#"{"type": "ping"}"#),
        ];
        all.extend(std::iter::repeat_n(
            ("content_block_delta", A_DELTA),
            deltas,
        ));
        all.push(("content_block_delta", A_TOOL_DELTA));
        all.extend_from_slice(tail);
        events(&all)
    }

    #[test]
    fn anthropic_streams_take_the_last_message_delta_and_count_the_cache_as_input() {
        let body = anthropic_stream(
            3,
            &[
                (
                    "content_block_stop",
                    r#"{"type":"content_block_stop","index":0}"#,
                ),
                (
                    "message_delta",
                    r#"{"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":2}}"#,
                ),
                (
                    "message_delta",
                    r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
                ),
                ("message_stop", r#"{"type":"message_stop"}"#),
            ],
        );
        let u = anthropic_each_step("text/event-stream; charset=utf-8", &body);
        assert_eq!(u.model.as_deref(), Some("claude-x"));
        assert_eq!(u.source, UsageSource::Reported);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens),
            (Some(145), Some(15)),
            "input 25 + cache 100 + 20; output cumulative, never summed"
        );
        assert_eq!(
            (u.cache_creation_tokens, u.cache_read_tokens),
            (Some(100), Some(20))
        );
        assert_eq!(
            anthropic_each_step("text/event-stream", &body.replace('\n', "\r\n")),
            u
        );
        // A newer server repeats the input counts in message_delta: they
        // replace message_start's.
        let body = anthropic_stream(
            1,
            &[(
                "message_delta",
                r#"{"type":"message_delta","delta":{},"usage":{"input_tokens":30,"cache_creation_input_tokens":0,"cache_read_input_tokens":120,"output_tokens":4}}"#,
            )],
        );
        let u = anthropic_each_step("text/event-stream", &body);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(150), Some(4)));
        assert_eq!(
            (u.cache_creation_tokens, u.cache_read_tokens),
            (Some(0), Some(120))
        );
    }

    #[test]
    fn anthropic_json_answers() {
        let json = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","usage":{"input_tokens":7,"output_tokens":9}}"#;
        let u = anthropic_each_step("application/json", json);
        assert_eq!(
            (
                u.model.as_deref(),
                u.prompt_tokens,
                u.completion_tokens,
                u.source
            ),
            (Some("claude-x"), Some(7), Some(9), UsageSource::Reported)
        );
        assert_eq!((u.cache_creation_tokens, u.cache_read_tokens), (None, None));
        let u = anthropic_each_step("application/json", r#"{"type":"message","content":[]}"#);
        assert_eq!((u.source, u.prompt_tokens), (UsageSource::Unknown, None));
        let u = anthropic_each_step("application/json", "<html>oops</html>");
        assert_eq!((u.source, u.model), (UsageSource::Unknown, None));
        // The OpenAI reader does not take Anthropic's names, and the other
        // way round.
        assert_eq!(
            each_step("application/json", json).source,
            UsageSource::Unknown
        );
        let openai =
            r#"{"model":"m","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":9}}"#;
        assert_eq!(
            anthropic_each_step("application/json", openai).source,
            UsageSource::Unknown
        );
    }

    #[test]
    fn a_cut_anthropic_stream_is_estimated_with_the_input_it_was_told() {
        let u = anthropic_each_step("text/event-stream", &anthropic_stream(2, &[]));
        assert_eq!(u.source, UsageSource::Estimated);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens),
            (Some(145), Some(3)),
            "message_start's input; one token per content_block_delta"
        );
        // Cut inside an event: the part read counts for nothing.
        let mut cut = anthropic_stream(2, &[]);
        cut.push_str("event: content_block_delta\ndata: {\"type\":\"content_blo");
        assert_eq!(anthropic_each_step("text/event-stream", &cut), u);
        // Cut before anything but message_start.
        let only_start = events(&[("message_start", A_START)]);
        let u = anthropic_each_step("text/event-stream", &only_start);
        assert_eq!(
            (u.source, u.prompt_tokens, u.completion_tokens),
            (UsageSource::Estimated, Some(145), Some(0))
        );
        // No message_start at all: the input is unknown.
        let deltas = events(&[
            ("content_block_delta", A_DELTA),
            ("content_block_delta", A_DELTA),
        ]);
        let u = anthropic_each_step("text/event-stream", &deltas);
        assert_eq!(
            (u.source, u.prompt_tokens, u.completion_tokens),
            (UsageSource::Estimated, None, Some(2))
        );
        assert_eq!(
            u.model, None,
            "a model named inside a delta is not the answer's"
        );
        // Nothing: unknown.
        let u = anthropic_each_step("text/event-stream", ": keep-alive\n\n");
        assert_eq!(u.source, UsageSource::Unknown);
    }

    #[test]
    fn anthropic_records_keep_little_whatever_their_size() {
        let text = "x".repeat(300_000);
        let big = format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{text}"}}}}"#
        );
        let body = events(&[("message_start", A_START), ("content_block_delta", &big)]);
        let mut m = AnswerMeter::anthropic(Some(b"text/event-stream"), None);
        for piece in body.as_bytes().chunks(4096) {
            m.feed(piece);
        }
        assert_eq!(m.usage().completion_tokens, Some(1));
        let most = anthropic::WANTED.iter().map(|(_, n)| *n).max().unwrap_or(0);
        assert!(
            m.scanner.kept_bytes() <= 2 * (most + 128),
            "{} bytes kept",
            m.scanner.kept_bytes()
        );
    }
}
