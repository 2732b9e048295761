//! What a request body says: the model(s) it names, whether it asks for a
//! stream, and the edit that asks an OpenAI-compatible server for usage.

use super::scan::{Event, Scanner};
use crate::config::{ApiKind, ModelAlias, MAX_MODEL_NAME};

/// The most request body the gateway holds back to read the model before
/// choosing an upstream: the size of Pingora's retry buffer, which is what
/// replays the bytes read to the upstream.
pub const INSPECT_LIMIT: usize = 64 * 1024;

/// Members read from requests: `model` (and Ollama's older `name`, which
/// Ollama uses when `model` is empty), `stream` and `stream_options`.
const WANTED: &[(&str, usize)] = &[
    ("model", MAX_MODEL_NAME * 6 + 2),
    ("name", MAX_MODEL_NAME * 6 + 2),
    ("stream", 16),
    ("stream_options", 1024),
];
const MODEL: usize = 0;
const NAME: usize = 1;
const STREAM: usize = 2;
const STREAM_OPTIONS: usize = 3;

/// The most model members of one body an alias is rewritten in; a body
/// with more is not rewritten (and so not sent).
const MAX_MODEL_MEMBERS: usize = 8;

/// A model a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamedModel {
    Name(String),
    /// Not a string, empty, or too long to be a model name.
    Unreadable,
}

/// Reads a request body as it arrives (see [`Scanner`]). Keeps only what it
/// reports; never the body.
#[derive(Debug)]
pub struct RequestInspector {
    scanner: Scanner,
    /// Whether `name` counts as a model (Ollama).
    read_name: bool,
    /// Every `model` (and `name`) member, in order; read by the caller and
    /// cleared as it pleases.
    pub models: Vec<NamedModel>,
    /// How many there have been, cleared or not.
    named: usize,
    /// Where each of the first object's model members is (offset and
    /// length of the raw value), for rewriting an alias; at most
    /// [`MAX_MODEL_MEMBERS`].
    model_members: Vec<(u64, usize, NamedModel)>,
    /// Top-level values begun.
    values: u32,
    /// Where the first object's `{` is.
    object_at: Option<u64>,
    /// The first object has ended.
    complete: bool,
    stream: Option<bool>,
    /// `stream_options`: offset, raw value, and whether it was cut.
    stream_options: Option<(u64, Vec<u8>, bool)>,
}

impl RequestInspector {
    pub fn new(api: ApiKind) -> RequestInspector {
        RequestInspector {
            scanner: Scanner::new(WANTED),
            read_name: api == ApiKind::Ollama,
            models: Vec::new(),
            named: 0,
            model_members: Vec::new(),
            values: 0,
            object_at: None,
            complete: false,
            stream: None,
            stream_options: None,
        }
    }

    /// Reads the next piece of the body.
    pub fn feed(&mut self, piece: &[u8]) {
        let RequestInspector {
            scanner,
            read_name,
            models,
            named,
            model_members,
            values,
            object_at,
            complete,
            stream,
            stream_options,
        } = self;
        scanner.feed(piece, &mut |e| match e {
            Event::ObjectStart { at } => {
                *values += 1;
                object_at.get_or_insert(at);
            }
            Event::ObjectEnd { .. } => *complete = true,
            Event::Member {
                key,
                raw,
                at,
                truncated,
            } => {
                // Only the first object counts; a second makes the body
                // unreadable anyway (see `single_object`).
                if *values != 1 {
                    return;
                }
                match key {
                    MODEL | NAME if key == MODEL || *read_name => {
                        *named += 1;
                        let model = model_value(raw, truncated);
                        if model_members.len() < MAX_MODEL_MEMBERS {
                            model_members.push((at, raw.len(), model.clone()));
                        }
                        models.push(model);
                    }
                    STREAM => *stream = Some(raw == b"true"),
                    STREAM_OPTIONS => *stream_options = Some((at, raw.to_vec(), truncated)),
                    _ => {}
                }
            }
            Event::NotObjects => {}
        });
    }

    /// Whether some model has been named so far.
    pub fn named_any(&self) -> bool {
        self.named > 0
    }

    /// Whether what was read so far is (the start of) one JSON object and
    /// nothing else.
    pub fn single_object(&self) -> bool {
        !self.scanner.failed() && self.values <= 1
    }

    /// Whether the body read so far is one complete JSON object.
    pub fn complete(&self) -> bool {
        self.complete && self.single_object()
    }

    /// The body says `"stream": true`.
    pub fn streams(&self) -> bool {
        self.stream == Some(true)
    }

    /// How to ask the upstream for usage in a streamed answer
    /// (`stream_options.include_usage`), for a complete body that streams:
    /// `None` when the client asked for it itself, or the body is not
    /// complete, not one object, or not a stream.
    pub fn include_usage_edit(&self) -> Option<Edit> {
        if !self.complete() || !self.streams() {
            return None;
        }
        match &self.stream_options {
            None => {
                let at = usize::try_from(self.object_at?).ok()? + 1;
                Some(Edit {
                    at,
                    remove: 0,
                    insert: br#""stream_options":{"include_usage":true},"#.to_vec(),
                })
            }
            Some((_, _, true)) => None,
            Some((at, raw, false)) => {
                let mut options = match serde_json::from_slice::<serde_json::Value>(raw) {
                    Ok(serde_json::Value::Object(map)) => map,
                    Ok(serde_json::Value::Null) => serde_json::Map::new(),
                    _ => return None,
                };
                if options.get("include_usage") == Some(&serde_json::Value::Bool(true)) {
                    return None;
                }
                options.insert("include_usage".into(), serde_json::Value::Bool(true));
                Some(Edit {
                    at: usize::try_from(*at).ok()?,
                    remove: raw.len(),
                    insert: serde_json::to_vec(&options).ok()?,
                })
            }
        }
    }
}

impl RequestInspector {
    /// The edits that make every model member naming `alias` name its
    /// target instead, for a complete body; `None` when the body is not
    /// one complete object, or has too many model members to be sure all
    /// are seen.
    pub fn alias_edits(&self, alias: &ModelAlias) -> Option<Vec<Edit>> {
        if !self.complete() || self.named > MAX_MODEL_MEMBERS {
            return None;
        }
        let target = serde_json::to_vec(alias.target.as_str()).ok()?;
        self.model_members
            .iter()
            .filter(|(_, _, m)| matches!(m, NamedModel::Name(n) if alias.name.matches(n)))
            .map(|(at, len, _)| {
                Some(Edit {
                    at: usize::try_from(*at).ok()?,
                    remove: *len,
                    insert: target.clone(),
                })
            })
            .collect()
    }
}

fn model_value(raw: &[u8], truncated: bool) -> NamedModel {
    if truncated {
        return NamedModel::Unreadable;
    }
    match serde_json::from_slice::<String>(raw) {
        Ok(s) if !s.trim().is_empty() && s.len() <= MAX_MODEL_NAME => NamedModel::Name(s),
        _ => NamedModel::Unreadable,
    }
}

/// A change to a body: `remove` bytes at `at`, then `insert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub at: usize,
    pub remove: usize,
    pub insert: Vec<u8>,
}

impl Edit {
    /// `body` with the edit made; `None` if it does not fit the body.
    pub fn apply(&self, body: &[u8]) -> Option<Vec<u8>> {
        let end = self.at.checked_add(self.remove)?;
        let (head, tail) = (body.get(..self.at)?, body.get(end..)?);
        let mut out = Vec::with_capacity(head.len() + self.insert.len() + tail.len());
        out.extend_from_slice(head);
        out.extend_from_slice(&self.insert);
        out.extend_from_slice(tail);
        Some(out)
    }

    /// `body` with every edit made (they do not overlap: each is a
    /// different member's value, or the insertion at the object's start);
    /// `None` if one does not fit.
    pub fn apply_all(edits: &mut [Edit], body: &[u8]) -> Option<Vec<u8>> {
        // From the end, so the offsets of those still to make hold.
        edits.sort_unstable_by_key(|e| std::cmp::Reverse(e.at));
        let mut out = body.to_vec();
        let mut limit = usize::MAX;
        for e in edits.iter() {
            if e.at.checked_add(e.remove)? > limit {
                return None;
            }
            out = e.apply(&out)?;
            limit = e.at;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inspect(api: ApiKind, body: &str, step: usize) -> RequestInspector {
        let mut r = RequestInspector::new(api);
        for piece in body.as_bytes().chunks(step.max(1)) {
            r.feed(piece);
        }
        r
    }

    fn names(r: &RequestInspector) -> Vec<NamedModel> {
        r.models.clone()
    }

    fn name(s: &str) -> NamedModel {
        NamedModel::Name(s.into())
    }

    #[test]
    fn models_anywhere_at_the_top_level() {
        let big = "x".repeat(70_000);
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"{big}","model":"inner"}}],"model":"qwen2"}}"#
        );
        for step in [1, 1000, body.len()] {
            let r = inspect(ApiKind::Openai, &body, step);
            assert_eq!(names(&r), [name("qwen2")]);
            assert!(r.complete());
        }
        let r = inspect(
            ApiKind::Ollama,
            r#"{"model":"a","name":"b","MODEL":"c"}"#,
            3,
        );
        assert_eq!(names(&r), [name("a"), name("b"), name("c")]);
        let r = inspect(ApiKind::Openai, r#"{"model":"a","name":"b"}"#, 3);
        assert_eq!(names(&r), [name("a")], "name is Ollama's alone");
    }

    #[test]
    fn what_is_not_a_model_name() {
        for body in [
            r#"{"model":7}"#,
            r#"{"model":null}"#,
            r#"{"model":""}"#,
            r#"{"model":{"a":1}}"#,
        ] {
            assert_eq!(
                names(&inspect(ApiKind::Openai, body, 2)),
                [NamedModel::Unreadable],
                "{body}"
            );
        }
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_NAME + 1));
        assert_eq!(
            names(&inspect(ApiKind::Openai, &long, 100)),
            [NamedModel::Unreadable]
        );
        let escaped = r#"{"model":"ll\u0061ma"}"#;
        assert_eq!(
            names(&inspect(ApiKind::Openai, escaped, 1)),
            [name("llama")]
        );
    }

    #[test]
    fn bodies_that_are_not_one_object() {
        let r = inspect(ApiKind::Openai, r#"{"model":"a"}{"model":"b"}"#, 4);
        assert!(!r.single_object() && !r.complete());
        assert_eq!(names(&r), [name("a")]);
        assert!(!inspect(ApiKind::Openai, "model=a", 4).single_object());
        let partial = inspect(ApiKind::Openai, r#"{"model":"a","messa"#, 4);
        assert!(partial.single_object() && !partial.complete());
    }

    fn edited(body: &str) -> Option<String> {
        let r = inspect(ApiKind::Openai, body, 5);
        r.include_usage_edit()
            .map(|e| String::from_utf8(e.apply(body.as_bytes()).unwrap()).unwrap())
    }

    #[test]
    fn include_usage_is_added_where_the_client_did_not_ask() {
        assert_eq!(
            edited(r#" {"model":"m","stream":true}"#).as_deref(),
            Some(r#" {"stream_options":{"include_usage":true},"model":"m","stream":true}"#)
        );
        assert_eq!(
            edited(r#"{"stream":true,"stream_options":{"x":1}}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"x":1,"include_usage":true}}"#)
        );
        assert_eq!(
            edited(r#"{"stream":true,"stream_options": {"include_usage": false} ,"n":1}"#)
                .as_deref(),
            Some(r#"{"stream":true,"stream_options": {"include_usage":true} ,"n":1}"#)
        );
        assert_eq!(
            edited(r#"{"stream_options":null,"stream":true}"#).as_deref(),
            Some(r#"{"stream_options":{"include_usage":true},"stream":true}"#)
        );
        // The client asked, does not stream, or the body is not whole.
        assert_eq!(
            edited(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            None
        );
        assert_eq!(edited(r#"{"model":"m","stream":false}"#), None);
        assert_eq!(edited(r#"{"model":"m"}"#), None);
        assert_eq!(edited(r#"{"model":"m","stream":true"#), None);
        assert_eq!(edited(r#"{"stream":true}{"stream":true}"#), None);
        assert_eq!(edited(r#"{"stream":true,"stream_options":[1]}"#), None);
    }

    #[test]
    fn edits_out_of_range_are_refused() {
        let e = Edit {
            at: 5,
            remove: 10,
            insert: vec![],
        };
        assert!(e.apply(b"short").is_none());
    }
}
