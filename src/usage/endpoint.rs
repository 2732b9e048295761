//! Which API endpoint a request is for, from the path the upstream sees.

use crate::config::ApiKind;

/// An endpoint the gateway knows something about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Ollama `/api/generate`, `/api/chat`: NDJSON streams (or one object)
    /// ending with `prompt_eval_count` and `eval_count`.
    OllamaGenerate,
    /// Ollama `/api/embed`: one object with `prompt_eval_count`.
    OllamaEmbed,
    /// Ollama `/api/tags` and `/api/ps`: `{"models":[{"name":...}]}`.
    OllamaModels,
    /// OpenAI `/v1/chat/completions`, `/v1/completions`: JSON with
    /// `usage`, or SSE with `usage` in the last chunk when asked for.
    OpenaiCompletions,
    /// OpenAI `/v1/embeddings`: JSON with `usage`.
    OpenaiEmbeddings,
    /// OpenAI `/v1/models`: `{"data":[{"id":...}]}`.
    OpenaiModels,
    /// OpenAI `/v1/models/{id}`: one model, named in the path.
    OpenaiModel,
    /// Anthropic `/v1/messages`: JSON with `usage`, or SSE with the input
    /// count in `message_start` and the output count in `message_delta`.
    AnthropicMessages,
    /// Anything else on the route: proxied; a model in a JSON body is
    /// still checked.
    Other,
}

impl Endpoint {
    /// The endpoint of `path` (the path sent upstream, without the query)
    /// on a route whose upstream speaks `api`. An Ollama route also knows
    /// the OpenAI-compatible and Anthropic endpoints Ollama serves under
    /// `/v1/`; an Anthropic route also knows the OpenAI-compatible ones
    /// (Ollama and vLLM serve both). `/v1/messages/count_tokens` is
    /// `Other`: its answer counts a prompt, it uses no tokens.
    pub fn of(api: ApiKind, path: &str) -> Endpoint {
        let path = path.strip_suffix('/').unwrap_or(path);
        if matches!(api, ApiKind::Anthropic | ApiKind::Ollama) && path.ends_with("/v1/messages") {
            return Endpoint::AnthropicMessages;
        }
        if api == ApiKind::Ollama {
            if path.ends_with("/api/generate") || path.ends_with("/api/chat") {
                return Endpoint::OllamaGenerate;
            }
            if path.ends_with("/api/embed") {
                return Endpoint::OllamaEmbed;
            }
            if path.ends_with("/api/tags") || path.ends_with("/api/ps") {
                return Endpoint::OllamaModels;
            }
        }
        if path.ends_with("/completions") {
            Endpoint::OpenaiCompletions
        } else if path.ends_with("/embeddings") && !path.ends_with("/api/embeddings") {
            Endpoint::OpenaiEmbeddings
        } else if path.ends_with("/models") {
            Endpoint::OpenaiModels
        } else if model_in_path(path).is_some() {
            Endpoint::OpenaiModel
        } else {
            Endpoint::Other
        }
    }

    /// Whether answers carry token usage.
    pub fn metered(self) -> bool {
        matches!(
            self,
            Endpoint::OllamaGenerate
                | Endpoint::OllamaEmbed
                | Endpoint::OpenaiCompletions
                | Endpoint::OpenaiEmbeddings
                | Endpoint::AnthropicMessages
        )
    }

    /// Whether answers list models (filtered for keys limited to some).
    pub fn lists_models(self) -> bool {
        matches!(self, Endpoint::OllamaModels | Endpoint::OpenaiModels)
    }
}

/// The model named by an OpenAI `/models/{id}` path (the id may contain
/// `/`, as in `/v1/models/org/name`).
pub fn model_in_path(path: &str) -> Option<&str> {
    let at = path.find("/models/")?;
    let id = path.get(at + "/models/".len()..)?;
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_by_path() {
        use ApiKind::*;
        use Endpoint::*;
        for (api, path, want) in [
            (Ollama, "/api/generate", OllamaGenerate),
            (Ollama, "/api/chat/", OllamaGenerate),
            (Ollama, "/api/embed", OllamaEmbed),
            (Ollama, "/api/embeddings", Other),
            (Ollama, "/api/tags", OllamaModels),
            (Ollama, "/api/ps", OllamaModels),
            (Ollama, "/api/pull", Other),
            (Ollama, "/v1/chat/completions", OpenaiCompletions),
            (Ollama, "/v1/models", OpenaiModels),
            (Openai, "/v1/chat/completions", OpenaiCompletions),
            (Openai, "/v1/completions", OpenaiCompletions),
            (Openai, "/v1/embeddings", OpenaiEmbeddings),
            (Openai, "/v1/models", OpenaiModels),
            (Openai, "/v1/models/org/llama", OpenaiModel),
            (Openai, "/api/generate", Other),
            (Openai, "/api/tags", Other),
            (Openai, "/health", Other),
            (Openai, "/v1/messages", Other),
            (Openai, "/v1/threads/t1/messages", Other),
            (Anthropic, "/v1/messages", AnthropicMessages),
            (Anthropic, "/v1/messages/", AnthropicMessages),
            (Anthropic, "/v1/messages/count_tokens", Other),
            (Anthropic, "/v1/models", OpenaiModels),
            (Anthropic, "/v1/models/claude-x", OpenaiModel),
            (Anthropic, "/v1/chat/completions", OpenaiCompletions),
            (Ollama, "/v1/messages", AnthropicMessages),
        ] {
            assert_eq!(Endpoint::of(api, path), want, "{api:?} {path}");
        }
        assert_eq!(model_in_path("/v1/models/org/llama"), Some("org/llama"));
        assert_eq!(model_in_path("/v1/models/"), None);
    }
}
