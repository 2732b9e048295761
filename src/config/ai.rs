//! A route's AI settings: `api` (which API its upstreams speak, so the
//! gateway can read models from requests and token usage from answers),
//! `include_usage`, and `models` (upstreams by model).

use std::fmt;
use std::path::Path;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use super::error::LoadError;
use super::fleet::UpstreamEntry;
use super::values::ModelPattern;
use super::yaml::location;

/// The API a route's upstream speaks, which lets the gateway read models
/// from requests and token usage from answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiKind {
    /// Ollama's own API (`/api/generate`, `/api/chat`, `/api/embed`,
    /// `/api/tags`, ...) and the OpenAI-compatible one it also serves
    /// under `/v1/`.
    Ollama,
    /// An OpenAI-compatible server (`/v1/chat/completions`,
    /// `/v1/completions`, `/v1/embeddings`, `/v1/models`).
    Openai,
    /// Anthropic's Messages API (`/v1/messages`, and
    /// `/v1/messages/count_tokens` passed through), as Ollama and vLLM
    /// also serve it. Refusals on such routes take Anthropic's error
    /// shape, so its SDKs raise their own exceptions.
    Anthropic,
}

impl ApiKind {
    pub fn name(self) -> &'static str {
        match self {
            ApiKind::Ollama => "ollama",
            ApiKind::Openai => "openai",
            ApiKind::Anthropic => "anthropic",
        }
    }
}

/// Upstreams of one model pattern, each with its position (resolved by
/// the compile step).
pub(super) type ModelUpstreams = Vec<(ModelPattern, Vec<Spanned<UpstreamEntry>>)>;

/// `models: {"llama3*": ["127.0.0.1:11434"], ...}` as written, in order;
/// each pattern once, each with at least one upstream.
#[derive(Debug, Default)]
pub(super) struct ModelRoutes(ModelUpstreams);

impl ModelRoutes {
    /// Whether some upstream has `max_in_flight`.
    pub(super) fn any_cap(&self) -> bool {
        self.0
            .iter()
            .flat_map(|(_, ups)| ups)
            .any(|u| u.value.max_in_flight.is_some())
    }
}

impl<'de> Deserialize<'de> for ModelRoutes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ModelRoutes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a map of model patterns to upstream lists, such as {"llama3*": ["127.0.0.1:11434"]}"#)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ModelRoutes, A::Error> {
                let mut out: ModelUpstreams = Vec::new();
                while let Some(pattern) = map.next_key::<ModelPattern>()? {
                    if out.iter().any(|(p, _)| p == &pattern) {
                        return Err(serde::de::Error::custom(format!(
                            "model pattern {:?} is listed twice",
                            pattern.as_str()
                        )));
                    }
                    let ups: Vec<Spanned<UpstreamEntry>> = map.next_value()?;
                    if ups.is_empty() {
                        return Err(serde::de::Error::custom(format!(
                            "model pattern {:?} has no upstreams",
                            pattern.as_str()
                        )));
                    }
                    out.push((pattern, ups));
                }
                Ok(ModelRoutes(out))
            }
        }
        // `any`: a value that is not a map is named in serde's words.
        d.deserialize_any(V)
    }
}

/// A route's AI settings, checked.
#[derive(Debug)]
pub(super) struct CheckedAi {
    pub(super) api: Option<ApiKind>,
    pub(super) include_usage: bool,
    pub(super) models: ModelUpstreams,
}

/// Checks the AI settings of the route `route`: `include_usage` and
/// `models` need `api`. Errors are about `path`.
pub(super) fn check(
    path: &Path,
    route: &str,
    api: Option<ApiKind>,
    include_usage: Option<Spanned<bool>>,
    models: Option<Spanned<ModelRoutes>>,
) -> Result<CheckedAi, LoadError> {
    if api.is_none() {
        let needs_api = match (&include_usage, &models) {
            (Some(u), _) if u.value => Some(("include_usage", location(u))),
            (_, Some(m)) => Some(("models", location(m))),
            _ => None,
        };
        if let Some((what, at)) = needs_api {
            return Err(LoadError::at(
                path,
                at,
                format!("route {route:?}: {what} needs `api: ollama`, `api: openai` or `api: anthropic` (the gateway reads models and usage only from APIs it knows)"),
            ));
        }
    }
    Ok(CheckedAi {
        api,
        include_usage: include_usage.is_some_and(|u| u.value),
        models: models.map(|m| m.value.0).unwrap_or_default(),
    })
}
