//! Model lists (`/api/tags`, `/api/ps`, `/v1/models`) cut down to the
//! models a key may use.
//!
//! These answers are small (a few KiB), so they are held whole, up to
//! [`MODEL_LIST_LIMIT`], filtered, and sent on. Whatever cannot be read as
//! the list it should be (compressed, not JSON, too large, another shape)
//! becomes an empty list: a key limited to some models never sees others.

use std::sync::Arc;

use super::endpoint::Endpoint;
use crate::config::{any_model_matches, ModelPattern};

/// The largest model list held for filtering.
pub const MODEL_LIST_LIMIT: usize = 4 * 1024 * 1024;

/// Collects a model list answer and filters it at the end.
#[derive(Debug)]
pub struct ModelListFilter {
    endpoint: Endpoint,
    allowed: Arc<[ModelPattern]>,
    body: Vec<u8>,
    /// The answer could not be read as a list: the result is empty.
    unreadable: bool,
}

impl ModelListFilter {
    /// A filter for an answer of `endpoint` (one that lists models),
    /// keeping the models `allowed` matches. `readable` is false for an
    /// answer that is compressed or not JSON.
    pub fn new(endpoint: Endpoint, allowed: Arc<[ModelPattern]>, readable: bool) -> Self {
        ModelListFilter {
            endpoint,
            allowed,
            body: Vec::new(),
            unreadable: !readable,
        }
    }

    /// Takes the next piece of the answer.
    pub fn push(&mut self, piece: &[u8]) {
        if self.unreadable {
            return;
        }
        if self.body.len() + piece.len() > MODEL_LIST_LIMIT {
            self.unreadable = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(piece);
    }

    /// Whether the answer had to be replaced by an empty list.
    pub fn unreadable(&self) -> bool {
        self.unreadable || serde_json::from_slice::<serde_json::Value>(&self.body).is_err()
    }

    /// The filtered list, as JSON.
    pub fn finish(&self) -> Vec<u8> {
        let (field, names): (&str, &[&str]) = match self.endpoint {
            Endpoint::OpenaiModels => ("data", &["id"]),
            _ => ("models", &["name", "model"]),
        };
        let parsed = if self.unreadable {
            None
        } else {
            serde_json::from_slice::<serde_json::Value>(&self.body).ok()
        };
        let mut doc = match parsed {
            Some(serde_json::Value::Object(map))
                if map.get(field).is_some_and(|v| v.is_array()) =>
            {
                map
            }
            _ => {
                let mut empty = serde_json::Map::new();
                if self.endpoint == Endpoint::OpenaiModels {
                    empty.insert("object".into(), "list".into());
                }
                empty.insert(field.into(), serde_json::Value::Array(Vec::new()));
                empty
            }
        };
        if let Some(serde_json::Value::Array(list)) = doc.get_mut(field) {
            list.retain(|entry| self.allows(entry, names));
        }
        serde_json::to_vec(&doc).unwrap_or_default()
    }

    /// An entry is kept when it names a model and every name it gives is
    /// allowed.
    fn allows(&self, entry: &serde_json::Value, names: &[&str]) -> bool {
        let mut named = false;
        for n in names {
            match entry.get(*n) {
                None => {}
                Some(serde_json::Value::String(s)) => {
                    if !any_model_matches(&self.allowed, s) {
                        return false;
                    }
                    named = true;
                }
                Some(_) => return false,
            }
        }
        named
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(list: &[&str]) -> Arc<[ModelPattern]> {
        list.iter()
            .map(|p| ModelPattern::parse(p).unwrap())
            .collect()
    }

    fn run(endpoint: Endpoint, body: &str, readable: bool) -> serde_json::Value {
        let mut f = ModelListFilter::new(endpoint, allowed(&["llama3.2", "qwen*"]), readable);
        for piece in body.as_bytes().chunks(7) {
            f.push(piece);
        }
        serde_json::from_slice(&f.finish()).unwrap()
    }

    #[test]
    fn ollama_tags_keep_only_allowed_models() {
        let tags = r#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","size":1},{"name":"mistral:7b","model":"mistral:7b"},{"name":"qwen2.5:7b","model":"qwen2.5:7b","details":{"family":"qwen2"}},{"size":3}]}"#;
        let v = run(Endpoint::OllamaModels, tags, true);
        let names: Vec<&str> = v["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["llama3.2:latest", "qwen2.5:7b"]);
        assert_eq!(
            v["models"][1]["details"]["family"], "qwen2",
            "entries are kept whole"
        );
    }

    #[test]
    fn openai_models_keep_only_allowed_ids() {
        let list = r#"{"object":"list","data":[{"id":"qwen2","object":"model"},{"id":"gpt-x","object":"model"},{"id":7}]}"#;
        let v = run(Endpoint::OpenaiModels, list, true);
        assert_eq!(
            v,
            serde_json::json!({"object":"list","data":[{"id":"qwen2","object":"model"}]})
        );
    }

    #[test]
    fn what_cannot_be_read_becomes_an_empty_list() {
        assert_eq!(
            run(Endpoint::OllamaModels, "not json", true),
            serde_json::json!({"models": []})
        );
        assert_eq!(
            run(Endpoint::OllamaModels, r#"{"models":{}}"#, true),
            serde_json::json!({"models": []})
        );
        assert_eq!(
            run(
                Endpoint::OpenaiModels,
                r#"{"data":[{"id":"qwen2"}]}"#,
                false
            ),
            serde_json::json!({"object":"list","data": []})
        );
        let mut f = ModelListFilter::new(Endpoint::OllamaModels, allowed(&["*"]), true);
        f.push(&vec![b' '; MODEL_LIST_LIMIT]);
        f.push(b"{}");
        assert!(f.unreadable());
        assert_eq!(f.finish(), br#"{"models":[]}"#);
    }
}
