//! Model lists (`/api/tags`, `/api/ps`, `/v1/models`) cut down to the
//! models a key may use, with the route's model aliases the key may use
//! added (each a copy of its target's entry, renamed, or a plain entry
//! when the list lacks the target).
//!
//! These answers are small (a few KiB), so they are held whole, up to
//! [`MODEL_LIST_LIMIT`], filtered, and sent on. Whatever cannot be read as
//! the list it should be (compressed, not JSON, too large, another shape)
//! becomes an empty list: a key limited to some models never sees others.

use std::sync::Arc;

use super::endpoint::Endpoint;
use crate::config::{any_model_matches, ModelAlias, ModelPattern};

/// The largest model list held for filtering.
pub const MODEL_LIST_LIMIT: usize = 4 * 1024 * 1024;

/// Collects a model list answer and filters it at the end.
#[derive(Debug)]
pub struct ModelListFilter {
    endpoint: Endpoint,
    /// `None`: the key may use every model.
    allowed: Option<Arc<[ModelPattern]>>,
    aliases: Arc<[ModelAlias]>,
    body: Vec<u8>,
    /// The answer could not be read as a list: the result is empty.
    unreadable: bool,
}

impl ModelListFilter {
    /// A filter for an answer of `endpoint` (one that lists models),
    /// keeping the models `allowed` matches and adding the `aliases` it
    /// allows. `readable` is false for an answer that is compressed or
    /// not JSON.
    pub fn new(
        endpoint: Endpoint,
        allowed: Option<Arc<[ModelPattern]>>,
        aliases: Arc<[ModelAlias]>,
        readable: bool,
    ) -> Self {
        ModelListFilter {
            endpoint,
            allowed,
            aliases,
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
            let added = self.alias_entries(list, names);
            list.retain(|entry| self.allows(entry, names));
            list.extend(added);
        }
        serde_json::to_vec(&doc).unwrap_or_default()
    }

    /// An entry for each alias the key may use that the list does not
    /// name already: its target's entry renamed, or a plain one.
    fn alias_entries(&self, list: &[serde_json::Value], names: &[&str]) -> Vec<serde_json::Value> {
        let named = |entry: &serde_json::Value, m: &ModelPattern| {
            names.iter().any(|n| {
                entry
                    .get(*n)
                    .and_then(|v| v.as_str())
                    .is_some_and(|s| m.matches(s))
            })
        };
        let mut out = Vec::new();
        for alias in self.aliases.iter() {
            let name = alias.name.as_str();
            let may = self
                .allowed
                .as_deref()
                .is_none_or(|a| any_model_matches(a, name));
            if !may || list.iter().any(|e| named(e, &alias.name)) {
                continue;
            }
            let entry = match list.iter().find(|e| named(e, &alias.target)) {
                Some(serde_json::Value::Object(target)) => {
                    let mut copy = target.clone();
                    for n in names {
                        if copy.contains_key(*n) {
                            copy.insert((*n).into(), name.into());
                        }
                    }
                    serde_json::Value::Object(copy)
                }
                _ if self.endpoint == Endpoint::OpenaiModels => serde_json::json!({
                    "id": name, "object": "model", "created": 0, "owned_by": "ai-gateway",
                }),
                _ => serde_json::json!({"name": name, "model": name}),
            };
            out.push(entry);
        }
        out
    }

    /// An entry is kept when it names a model and every name it gives is
    /// allowed.
    fn allows(&self, entry: &serde_json::Value, names: &[&str]) -> bool {
        let mut named = false;
        for n in names {
            match entry.get(*n) {
                None => {}
                Some(serde_json::Value::String(s)) => {
                    if self
                        .allowed
                        .as_deref()
                        .is_some_and(|a| !any_model_matches(a, s))
                    {
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
        let aliases: Arc<[ModelAlias]> = Arc::new([]);
        let mut f = ModelListFilter::new(
            endpoint,
            Some(allowed(&["llama3.2", "qwen*"])),
            aliases,
            readable,
        );
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
        let mut f = ModelListFilter::new(
            Endpoint::OllamaModels,
            Some(allowed(&["*"])),
            Arc::new([]),
            true,
        );
        f.push(&vec![b' '; MODEL_LIST_LIMIT]);
        f.push(b"{}");
        assert!(f.unreadable());
        assert_eq!(f.finish(), br#"{"models":[]}"#);
    }

    #[test]
    fn aliases_the_key_may_use_are_listed() {
        let alias = |n: &str, t: &str| ModelAlias {
            name: ModelPattern::parse(n).unwrap(),
            target: ModelPattern::parse(t).unwrap(),
        };
        let aliases: Arc<[ModelAlias]> =
            Arc::new([alias("gpt-4o", "llama3.2"), alias("gpt-4o-mini", "qwen2.5")]);
        let tags = r#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","size":9}]}"#;
        let mut f = ModelListFilter::new(Endpoint::OllamaModels, None, Arc::clone(&aliases), true);
        f.push(tags.as_bytes());
        let v: serde_json::Value = serde_json::from_slice(&f.finish()).unwrap();
        assert_eq!(
            v["models"],
            serde_json::json!([
                {"name":"llama3.2:latest","model":"llama3.2:latest","size":9},
                {"name":"gpt-4o","model":"gpt-4o","size":9},
                {"name":"gpt-4o-mini","model":"gpt-4o-mini"},
            ])
        );
        let list = r#"{"object":"list","data":[{"id":"llama3.2","object":"model"}]}"#;
        let mut f = ModelListFilter::new(
            Endpoint::OpenaiModels,
            Some(allowed(&["gpt-4o"])),
            aliases,
            true,
        );
        f.push(list.as_bytes());
        let v: serde_json::Value = serde_json::from_slice(&f.finish()).unwrap();
        assert_eq!(
            v["data"],
            serde_json::json!([{"id":"gpt-4o","object":"model"}])
        );
    }
}
