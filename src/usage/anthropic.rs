//! What an answer of Anthropic's Messages API (`POST /v1/messages`) says
//! about its token usage, read by [`super::AnswerMeter`] one record at a
//! time (the JSON answer, or the JSON of each SSE event).
//!
//! - A JSON answer has `model` and `usage` at its top level.
//! - A stream's `message_start` event carries the message so far, with
//!   `model` and the input counts in `message.usage`; each
//!   `message_delta` event carries `usage` with the output count so far
//!   (and, on newer servers, the input counts again). The counts are
//!   cumulative: the last one wins, they are never summed.
//! - `content_block_delta` events carry the text, about one token each
//!   (how Ollama and vLLM stream): what a cut stream is estimated from.
//!
//! The cache counts (`cache_creation_input_tokens`,
//! `cache_read_input_tokens`) are input the model read, so they count as
//! prompt tokens, and are also kept apart.

use crate::config::MAX_MODEL_NAME;

/// The most of `message_start`'s `message` kept: its `content` is empty
/// there, so the whole object is a few hundred bytes.
const MESSAGE_LIMIT: usize = 8 * 1024;

/// Members read from each record, with the most bytes kept of each.
pub(super) const WANTED: &[(&str, usize)] = &[
    ("type", 32),
    ("model", MAX_MODEL_NAME * 6 + 2),
    ("usage", 4096),
    ("message", MESSAGE_LIMIT),
];
const TYPE: usize = 0;
const MODEL: usize = 1;
const USAGE: usize = 2;
const MESSAGE: usize = 3;

/// Token counts as Anthropic names them; a field is `None` when the
/// record did not have it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub(super) struct Counts {
    #[serde(rename = "input_tokens")]
    input: Option<u64>,
    #[serde(rename = "output_tokens")]
    output: Option<u64>,
    #[serde(rename = "cache_creation_input_tokens")]
    cache_creation: Option<u64>,
    #[serde(rename = "cache_read_input_tokens")]
    cache_read: Option<u64>,
}

impl Counts {
    /// The counts of a `usage` object; `None` for `null`, something
    /// else, or an object without any of them.
    fn parse(raw: &[u8]) -> Option<Counts> {
        let c: Counts = serde_json::from_slice::<Option<Counts>>(raw).ok()??;
        (c != Counts::default()).then_some(c)
    }

    /// Takes the counts `newer` has (cumulative: they replace, never add).
    fn update(&mut self, newer: Counts) {
        let Counts {
            input,
            output,
            cache_creation,
            cache_read,
        } = newer;
        self.input = input.or(self.input);
        self.output = output.or(self.output);
        self.cache_creation = cache_creation.or(self.cache_creation);
        self.cache_read = cache_read.or(self.cache_read);
    }

    /// Every input token: the uncached ones and both cache counts.
    pub(super) fn prompt(&self) -> Option<u64> {
        if self.input.is_none() && self.cache_creation.is_none() && self.cache_read.is_none() {
            return None;
        }
        Some(
            self.input
                .unwrap_or(0)
                .saturating_add(self.cache_creation.unwrap_or(0))
                .saturating_add(self.cache_read.unwrap_or(0)),
        )
    }

    pub(super) fn output(&self) -> Option<u64> {
        self.output
    }

    pub(super) fn cache_creation(&self) -> Option<u64> {
        self.cache_creation
    }

    pub(super) fn cache_read(&self) -> Option<u64> {
        self.cache_read
    }
}

/// What a record is, by its `type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Kind {
    #[default]
    Other,
    MessageStart,
    ContentDelta,
}

/// The members of the record being read.
#[derive(Debug, Default)]
pub(super) struct Record {
    kind: Kind,
    model: Option<String>,
    usage: Option<Counts>,
    /// `message_start`'s message: its model and input counts.
    message: Option<(Option<String>, Option<Counts>)>,
}

/// Reads the records of one answer and adds them up.
#[derive(Debug, Default)]
pub(super) struct Reader {
    /// The record being read.
    record: Record,
    pub(super) counts: Counts,
    /// A top-level `usage` was read: the answer's (JSON) or a
    /// `message_delta`'s. `message_start` alone is not enough: its output
    /// count is a placeholder.
    pub(super) reported: bool,
    /// `content_block_delta` events.
    pub(super) deltas: u64,
}

impl Reader {
    /// A record begins.
    pub(super) fn start(&mut self) {
        self.record = Record::default();
    }

    /// A wanted member of the record.
    pub(super) fn member(&mut self, key: usize, raw: &[u8], truncated: bool) {
        read_member(&mut self.record, key, raw, truncated);
    }

    /// The record ended: adds it up, and returns its model, if it named
    /// one.
    pub(super) fn end(&mut self) -> Option<String> {
        let Record {
            kind,
            model,
            usage,
            message,
        } = std::mem::take(&mut self.record);
        if kind == Kind::ContentDelta {
            self.deltas += 1;
        }
        let mut model = model;
        if let (Kind::MessageStart, Some((m, counts))) = (kind, message) {
            model = model.or(m);
            if let Some(c) = counts {
                self.counts.update(c);
            }
        }
        if let Some(c) = usage {
            self.counts.update(c);
            self.reported = true;
        }
        model
    }
}

/// Reads a wanted member into `record`.
fn read_member(record: &mut Record, key: usize, raw: &[u8], truncated: bool) {
    if truncated {
        return;
    }
    match key {
        TYPE => {
            record.kind = match raw {
                b"\"message_start\"" => Kind::MessageStart,
                b"\"content_block_delta\"" => Kind::ContentDelta,
                _ => Kind::Other,
            };
        }
        MODEL => record.model = model_name(raw),
        USAGE => record.usage = Counts::parse(raw),
        MESSAGE => record.message = start_message(raw),
        _ => {}
    }
}

fn model_name(raw: &[u8]) -> Option<String> {
    serde_json::from_slice::<String>(raw)
        .ok()
        .filter(|m| !m.is_empty() && m.len() <= MAX_MODEL_NAME)
}

/// The model and counts of `message_start`'s message.
fn start_message(raw: &[u8]) -> Option<(Option<String>, Option<Counts>)> {
    #[derive(serde::Deserialize)]
    struct Message {
        model: Option<serde_json::Value>,
        usage: Option<serde_json::Value>,
    }
    let m: Message = serde_json::from_slice(raw).ok()?;
    let model = match m.model {
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_MODEL_NAME => Some(s),
        _ => None,
    };
    let usage = m
        .usage
        .and_then(|u| serde_json::from_value::<Counts>(u).ok())
        .filter(|c| *c != Counts::default());
    Some((model, usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_objects() {
        let c = Counts::parse(
            br#"{"input_tokens":5,"cache_creation_input_tokens":100,"cache_read_input_tokens":20,"output_tokens":3,"service_tier":"standard"}"#,
        )
        .expect("counts");
        assert_eq!((c.prompt(), c.output()), (Some(125), Some(3)));
        assert_eq!((c.cache_creation(), c.cache_read()), (Some(100), Some(20)));
        assert_eq!(Counts::parse(b"null"), None);
        assert_eq!(Counts::parse(b"{}"), None);
        assert_eq!(Counts::parse(br#"{"input_tokens":"5"}"#), None);
        assert_eq!(Counts::parse(br#"{"input_tokens":-1}"#), None);
        let mut total = Counts::parse(br#"{"input_tokens":9,"output_tokens":1}"#).expect("start");
        total.update(Counts::parse(br#"{"output_tokens":7}"#).expect("delta"));
        total.update(Counts::parse(br#"{"output_tokens":12}"#).expect("delta"));
        assert_eq!((total.prompt(), total.output()), (Some(9), Some(12)));
    }

    #[test]
    fn message_start_is_read_only_from_its_message() {
        let raw = br#"{"id":"m","type":"message","role":"assistant","content":[],"model":"claude-x","usage":{"input_tokens":25,"output_tokens":1}}"#;
        let (model, counts) = start_message(raw).expect("a message");
        assert_eq!(model.as_deref(), Some("claude-x"));
        assert_eq!(counts.and_then(|c| c.prompt()), Some(25));
        let mut r = Reader::default();
        r.start();
        r.member(TYPE, b"\"ping\"", false);
        r.member(MESSAGE, raw, false);
        assert_eq!(r.end(), None, "a message outside message_start is not read");
        assert_eq!(r.counts, Counts::default());
    }
}
