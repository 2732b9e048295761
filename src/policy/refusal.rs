//! Every answer the gateway gives instead of the upstream's, in one type.
//!
//! A [`Refusal`] owns, per kind, everything that is said about it: the
//! status, the JSON body, the extra header it needs, and the one word that
//! is both its metric label and its audit `decision`. The reply, the
//! metrics and the audit log read them from here, so adding a kind means
//! adding a variant and the code that decides it, nothing else.

use crate::config::ApiKind;
use crate::keys::KeyDenial;

/// Why a request was answered by the gateway itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Both `Content-Length` and `Transfer-Encoding`: the ambiguity request
    /// smuggling relies on.
    BadFraming,
    /// `Content-Length` repeated, as a list, or not one decimal number: an
    /// upstream could frame the body differently.
    InvalidContentLength,
    /// `Transfer-Encoding` other than one `chunked`.
    InvalidTransferEncoding,
    /// A request head with bare LF line ends.
    MalformedHead,
    /// An HTTP/1.1 request without exactly one `Host` (RFC 9112 §3.2).
    BadHost,
    /// A request head over the size limit.
    HeaderTooLarge,
    /// The path has `.` or `..` segments or an escape the upstream may
    /// decode differently: refused so that a prefix such as
    /// `/ollama/api/generate` cannot be escaped into another endpoint.
    BadPath,
    NoRoute,
    /// The route does not allow the method; the reply carries `Allow`.
    MethodNotAllowed,
    /// `Upgrade` on a route without `websocket: true`, or an upgrade to
    /// anything but websocket: the connection would become a tunnel the
    /// key check never sees into.
    UpgradeNotAllowed,
    /// Two different keys in one request.
    ConflictingKeys,
    /// The client's address is not in an `allow` list.
    IpNotAllowed,
    /// A CORS preflight from an allowed origin, answered by the gateway:
    /// browsers send it without a key.
    Preflight,
    /// Too many failed key checks from the client's address lately.
    KeyThrottled {
        retry_after_s: u32,
    },
    Key(KeyDenial),
    /// The key's request rate is used up until the window ends.
    RateLimited {
        retry_after_s: u32,
    },
    /// The key has as many requests in flight as it may.
    TooManyConcurrent,
    /// The key used up its token budget; it may try again when the
    /// window ends.
    TokenBudgetExceeded {
        retry_after_s: u32,
    },
    /// The request names a model the key may not use (or names the model
    /// twice).
    ModelNotAllowed,
    /// The key may use only some models, and the request's model could not
    /// be read: a body that is not one JSON object, a `model` that is not
    /// a model name, or none at all.
    ModelUnreadable,
    /// The key names its end users by a header, and the request's value
    /// is not one: repeated, empty, over 128 bytes or not visible ASCII.
    BadEndUser,
    /// A request Pingora could not read (a malformed body, say).
    BadRequest,
    /// The request body stalled longer than `client_body_timeout`.
    BodyTimeout,
    BodyTooLarge,
    /// The upstream could not be reached or broke off.
    UpstreamUnavailable,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The key's limits are counted in Redis, Redis cannot be reached, and
    /// `on_redis_error: deny` says to refuse rather than count locally.
    SharedStateUnavailable,
    /// Every upstream the request could go to is at its `max_in_flight`,
    /// and the route's queue is full, timed out, or absent.
    UpstreamsBusy {
        retry_after_s: u32,
    },
    /// The model asked for is an alias, and the body is too large (or
    /// not whole in time) for the gateway to rewrite it: it is never sent
    /// upstream with the alias.
    AliasBodyTooLarge,
    Internal,
}

/// A header some refusals carry besides the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraHeader {
    /// `Allow`, with the methods of the route.
    Allow,
    /// `WWW-Authenticate`, with this challenge.
    Challenge(&'static str),
    /// `Retry-After`, in whole seconds.
    RetryAfter(u32),
    /// The route's CORS preflight headers.
    Preflight,
}

/// The `WWW-Authenticate` challenge sent with every 401.
pub const CHALLENGE: &str = "Bearer realm=\"ai-gateway\"";

impl Refusal {
    /// Every kind, for metrics that are resolved once at start and for
    /// tests that must cover them all.
    pub const ALL: [Refusal; 34] = [
        Refusal::BadFraming,
        Refusal::InvalidContentLength,
        Refusal::InvalidTransferEncoding,
        Refusal::MalformedHead,
        Refusal::BadHost,
        Refusal::HeaderTooLarge,
        Refusal::BadPath,
        Refusal::NoRoute,
        Refusal::MethodNotAllowed,
        Refusal::UpgradeNotAllowed,
        Refusal::ConflictingKeys,
        Refusal::IpNotAllowed,
        Refusal::Preflight,
        Refusal::KeyThrottled { retry_after_s: 1 },
        Refusal::RateLimited { retry_after_s: 1 },
        Refusal::TooManyConcurrent,
        Refusal::TokenBudgetExceeded { retry_after_s: 1 },
        Refusal::ModelNotAllowed,
        Refusal::ModelUnreadable,
        Refusal::Key(KeyDenial::Missing),
        Refusal::Key(KeyDenial::Unknown),
        Refusal::Key(KeyDenial::Expired),
        Refusal::Key(KeyDenial::Disabled),
        Refusal::Key(KeyDenial::WrongService),
        Refusal::BadEndUser,
        Refusal::BadRequest,
        Refusal::BodyTimeout,
        Refusal::BodyTooLarge,
        Refusal::UpstreamUnavailable,
        Refusal::UpstreamTimeout,
        Refusal::SharedStateUnavailable,
        Refusal::UpstreamsBusy { retry_after_s: 1 },
        Refusal::AliasBodyTooLarge,
        Refusal::Internal,
    ];

    /// The HTTP status of the reply.
    pub const fn status(self) -> u16 {
        match self {
            Refusal::Preflight => 204,
            Refusal::IpNotAllowed => 403,
            Refusal::KeyThrottled { .. }
            | Refusal::RateLimited { .. }
            | Refusal::TooManyConcurrent
            | Refusal::TokenBudgetExceeded { .. } => 429,
            Refusal::ModelNotAllowed => 403,
            Refusal::BadFraming
            | Refusal::InvalidContentLength
            | Refusal::InvalidTransferEncoding
            | Refusal::MalformedHead
            | Refusal::BadHost
            | Refusal::BadPath
            | Refusal::UpgradeNotAllowed
            | Refusal::ConflictingKeys
            | Refusal::ModelUnreadable
            | Refusal::BadEndUser
            | Refusal::BadRequest => 400,
            Refusal::Key(KeyDenial::WrongService) => 403,
            Refusal::Key(_) => 401,
            Refusal::NoRoute => 404,
            Refusal::MethodNotAllowed => 405,
            Refusal::BodyTimeout => 408,
            Refusal::BodyTooLarge => 413,
            Refusal::HeaderTooLarge => 431,
            Refusal::Internal => 500,
            Refusal::UpstreamUnavailable => 502,
            Refusal::UpstreamTimeout => 504,
            Refusal::SharedStateUnavailable | Refusal::UpstreamsBusy { .. } => 503,
            Refusal::AliasBodyTooLarge => 413,
        }
    }

    /// The JSON body of the reply in the gateway's own shape,
    /// `{"error": "message"}`.
    pub const fn body(self) -> &'static str {
        self.body_in(ErrorShape::Plain)
    }

    /// The metric label and audit `decision`: fixed words, never anything a
    /// client sent.
    pub const fn label(self) -> &'static str {
        match self {
            Refusal::Preflight => "preflight",
            Refusal::IpNotAllowed => "ip_not_allowed",
            Refusal::KeyThrottled { .. } => "key_throttled",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::TooManyConcurrent => "too_many_concurrent",
            Refusal::TokenBudgetExceeded { .. } => "token_budget_exceeded",
            Refusal::ModelNotAllowed => "model_not_allowed",
            Refusal::ModelUnreadable => "model_unreadable",
            Refusal::BadFraming => "bad_framing",
            Refusal::InvalidContentLength => "invalid_content_length",
            Refusal::InvalidTransferEncoding => "invalid_transfer_encoding",
            Refusal::MalformedHead => "malformed_head",
            Refusal::BadHost => "bad_host",
            Refusal::HeaderTooLarge => "header_too_large",
            Refusal::BadPath => "bad_path",
            Refusal::NoRoute => "no_route",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::UpgradeNotAllowed => "upgrade_not_allowed",
            Refusal::ConflictingKeys => "conflicting_keys",
            Refusal::Key(KeyDenial::Missing) => "missing_key",
            Refusal::Key(KeyDenial::Unknown) => "unknown_key",
            Refusal::Key(KeyDenial::Expired) => "expired_key",
            Refusal::Key(KeyDenial::Disabled) => "disabled_key",
            Refusal::Key(KeyDenial::WrongService) => "wrong_service",
            Refusal::BadEndUser => "bad_end_user",
            Refusal::BadRequest => "bad_request",
            Refusal::BodyTimeout => "client_timeout",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::UpstreamUnavailable | Refusal::UpstreamTimeout => "upstream_error",
            Refusal::SharedStateUnavailable => "shared_state_unavailable",
            Refusal::UpstreamsBusy { .. } => "upstreams_busy",
            Refusal::AliasBodyTooLarge => "alias_body_too_large",
            Refusal::Internal => "internal_error",
        }
    }

    /// The header the reply needs besides the body, if any.
    pub const fn extra_header(self) -> Option<ExtraHeader> {
        match self {
            Refusal::MethodNotAllowed => Some(ExtraHeader::Allow),
            Refusal::Preflight => Some(ExtraHeader::Preflight),
            Refusal::KeyThrottled { retry_after_s }
            | Refusal::RateLimited { retry_after_s }
            | Refusal::TokenBudgetExceeded { retry_after_s }
            | Refusal::UpstreamsBusy { retry_after_s } => {
                Some(ExtraHeader::RetryAfter(retry_after_s))
            }
            Refusal::SharedStateUnavailable => Some(ExtraHeader::RetryAfter(1)),
            Refusal::Key(k) if !matches!(k, KeyDenial::WrongService) => {
                Some(ExtraHeader::Challenge(CHALLENGE))
            }
            _ => None,
        }
    }

    /// The key refusal inside, for the failed-key counters.
    pub const fn key_denial(self) -> Option<KeyDenial> {
        match self {
            Refusal::Key(k) => Some(k),
            _ => None,
        }
    }

    /// Whether this counts as a failed key check for the throttle: no key,
    /// or one that does not work at all. A valid key on a route it is not
    /// granted is no guess.
    pub const fn is_failed_key(self) -> bool {
        matches!(
            self,
            Refusal::Key(
                KeyDenial::Missing | KeyDenial::Unknown | KeyDenial::Expired | KeyDenial::Disabled
            )
        )
    }
}

/// The shape of a refusal's JSON body. Each API's client libraries read
/// their own: on a route with `api`, the refusal speaks it, so the
/// libraries raise their own exceptions with the gateway's message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ErrorShape {
    /// `{"error": "message"}`: the gateway's own, and Ollama's.
    #[default]
    Plain,
    /// OpenAI's `{"error": {"message", "type", "param", "code"}}`.
    Openai,
    /// Anthropic's `{"type": "error", "error": {"type", "message"}}`.
    Anthropic,
}

impl ErrorShape {
    /// The shape of refusals on a route whose upstream speaks `api`.
    pub const fn of(api: Option<ApiKind>) -> ErrorShape {
        match api {
            Some(ApiKind::Openai) => ErrorShape::Openai,
            Some(ApiKind::Anthropic) => ErrorShape::Anthropic,
            Some(ApiKind::Ollama) | None => ErrorShape::Plain,
        }
    }
}

/// Writes [`Refusal::message`] and [`Refusal::body_in`] from one table:
/// per kind, the message, Anthropic's error type, and OpenAI's type and
/// code. Every body is a `&'static str` put together at compile time.
macro_rules! refusal_bodies {
    ($($kind:pat => $message:literal, $anthropic:literal, $openai:literal, $code:literal;)*) => {
        impl Refusal {
            /// What the refusal says. The messages are part of the
            /// interface: clients may match on them, so they do not
            /// change.
            pub const fn message(self) -> &'static str {
                match self {
                    Refusal::Preflight => "",
                    $($kind => $message,)*
                }
            }

            /// The JSON body of the reply, in `shape` (empty for a
            /// preflight's 204).
            pub const fn body_in(self, shape: ErrorShape) -> &'static str {
                match (shape, self) {
                    (_, Refusal::Preflight) => "",
                    $((ErrorShape::Plain, $kind) => {
                        concat!(r#"{"error":""#, $message, r#""}"#)
                    })*
                    $((ErrorShape::Openai, $kind) => concat!(
                        r#"{"error":{"message":""#, $message, r#"","type":""#, $openai,
                        r#"","param":null,"code":""#, $code, r#""}}"#
                    ),)*
                    $((ErrorShape::Anthropic, $kind) => concat!(
                        r#"{"type":"error","error":{"type":""#, $anthropic,
                        r#"","message":""#, $message, r#""}}"#
                    ),)*
                }
            }
        }
    };
}

// OpenAI's codes where it has one for the case (`invalid_api_key`,
// `rate_limit_exceeded`, `model_not_found`, which it also sends with a 403
// for a model a project may not use), else the refusal's label.
refusal_bodies! {
    Refusal::IpNotAllowed => "address not allowed",
        "permission_error", "invalid_request_error", "ip_not_allowed";
    Refusal::KeyThrottled { .. } => "too many failed key attempts",
        "rate_limit_error", "requests", "rate_limit_exceeded";
    Refusal::RateLimited { .. } => "rate limit exceeded",
        "rate_limit_error", "requests", "rate_limit_exceeded";
    Refusal::TooManyConcurrent => "too many concurrent requests",
        "rate_limit_error", "requests", "rate_limit_exceeded";
    Refusal::TokenBudgetExceeded { .. } => "token budget exceeded",
        "rate_limit_error", "tokens", "rate_limit_exceeded";
    Refusal::ModelNotAllowed => "model not allowed for this key",
        "permission_error", "invalid_request_error", "model_not_found";
    Refusal::ModelUnreadable => "the request body must be a JSON object that names the model",
        "invalid_request_error", "invalid_request_error", "model_unreadable";
    Refusal::BadFraming => "both content-length and transfer-encoding",
        "invalid_request_error", "invalid_request_error", "bad_framing";
    Refusal::InvalidContentLength => "invalid content-length",
        "invalid_request_error", "invalid_request_error", "invalid_content_length";
    Refusal::InvalidTransferEncoding => "invalid transfer-encoding",
        "invalid_request_error", "invalid_request_error", "invalid_transfer_encoding";
    Refusal::MalformedHead => "malformed request head",
        "invalid_request_error", "invalid_request_error", "malformed_head";
    Refusal::BadHost => "missing or repeated host header",
        "invalid_request_error", "invalid_request_error", "bad_host";
    Refusal::HeaderTooLarge => "request header fields too large",
        "invalid_request_error", "invalid_request_error", "header_too_large";
    Refusal::BadPath => "invalid path",
        "invalid_request_error", "invalid_request_error", "bad_path";
    Refusal::NoRoute => "no route for this path",
        "not_found_error", "invalid_request_error", "no_route";
    Refusal::MethodNotAllowed => "method not allowed",
        "invalid_request_error", "invalid_request_error", "method_not_allowed";
    Refusal::UpgradeNotAllowed => "upgrade not allowed on this route",
        "invalid_request_error", "invalid_request_error", "upgrade_not_allowed";
    Refusal::ConflictingKeys => "conflicting api keys",
        "invalid_request_error", "invalid_request_error", "conflicting_keys";
    Refusal::Key(KeyDenial::Missing) => "missing api key",
        "authentication_error", "invalid_request_error", "missing_key";
    Refusal::Key(KeyDenial::Unknown) => "invalid api key",
        "authentication_error", "invalid_request_error", "invalid_api_key";
    Refusal::Key(KeyDenial::Expired) => "api key expired",
        "authentication_error", "invalid_request_error", "invalid_api_key";
    Refusal::Key(KeyDenial::Disabled) => "api key revoked",
        "authentication_error", "invalid_request_error", "invalid_api_key";
    Refusal::Key(KeyDenial::WrongService) => "api key not allowed for this service",
        "permission_error", "invalid_request_error", "wrong_service";
    Refusal::BadEndUser =>
        "the end user header must be one value of 1 to 128 visible ASCII characters",
        "invalid_request_error", "invalid_request_error", "bad_end_user";
    Refusal::BadRequest => "bad request",
        "invalid_request_error", "invalid_request_error", "bad_request";
    Refusal::BodyTimeout => "request body timed out",
        "invalid_request_error", "invalid_request_error", "client_timeout";
    Refusal::BodyTooLarge => "request body too large",
        "request_too_large", "invalid_request_error", "body_too_large";
    Refusal::UpstreamUnavailable => "upstream unavailable",
        "api_error", "server_error", "upstream_error";
    Refusal::UpstreamTimeout => "upstream timed out",
        "timeout_error", "server_error", "upstream_error";
    Refusal::SharedStateUnavailable => "limits cannot be checked: shared state unavailable",
        "overloaded_error", "server_error", "shared_state_unavailable";
    Refusal::UpstreamsBusy { .. } => "all upstreams busy",
        "overloaded_error", "server_error", "upstreams_busy";
    Refusal::AliasBodyTooLarge =>
        "request body too large to rewrite the model alias it names (at most 64 KiB)",
        "request_too_large", "invalid_request_error", "alias_body_too_large";
    Refusal::Internal => "internal error",
        "api_error", "server_error", "internal_error";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_body_is_json_with_an_error_field() {
        for r in Refusal::ALL.into_iter().filter(|r| r.status() != 204) {
            let v: serde_json::Value = serde_json::from_str(r.body()).unwrap();
            assert_eq!(v["error"].as_str(), Some(r.message()), "{r:?}");
            assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{r:?}");
        }
        assert_eq!(
            Refusal::TokenBudgetExceeded { retry_after_s: 9 }.body(),
            r#"{"error":"token budget exceeded"}"#,
            "the default shape is unchanged"
        );
    }

    /// What OpenAI's and Anthropic's client libraries read of a body.
    fn parsed(r: Refusal, shape: ErrorShape) -> serde_json::Value {
        serde_json::from_str(r.body_in(shape)).unwrap_or_else(|e| panic!("{r:?} {shape:?}: {e}"))
    }

    #[test]
    fn openai_bodies() {
        for r in Refusal::ALL.into_iter().filter(|r| r.status() != 204) {
            let v = parsed(r, ErrorShape::Openai);
            let e = &v["error"];
            assert_eq!(e["message"].as_str(), Some(r.message()), "{v}");
            assert_eq!(e["param"], serde_json::Value::Null, "{v}");
            let want = match r.status() {
                429 => ["requests", "tokens"].as_slice(),
                500.. => &["server_error"],
                _ => &["invalid_request_error"],
            };
            let kind = e["type"].as_str().unwrap_or_default();
            assert!(want.contains(&kind), "{r:?}: {v}");
            let code = e["code"].as_str().unwrap_or_default();
            assert!(
                !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{v}"
            );
        }
        let v = parsed(Refusal::Key(KeyDenial::Unknown), ErrorShape::Openai);
        assert_eq!(v["error"]["code"], "invalid_api_key");
        let v = parsed(
            Refusal::TokenBudgetExceeded { retry_after_s: 1 },
            ErrorShape::Openai,
        );
        assert_eq!(
            (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
            (Some("tokens"), Some("rate_limit_exceeded"))
        );
    }

    #[test]
    fn anthropic_bodies_name_the_type_of_their_status() {
        for r in Refusal::ALL.into_iter().filter(|r| r.status() != 204) {
            let v = parsed(r, ErrorShape::Anthropic);
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["message"].as_str(), Some(r.message()), "{v}");
            let want = match r.status() {
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                503 => "overloaded_error",
                504 => "timeout_error",
                500.. => "api_error",
                _ => "invalid_request_error",
            };
            assert_eq!(v["error"]["type"].as_str(), Some(want), "{r:?}");
        }
    }

    #[test]
    fn shapes_by_api() {
        assert_eq!(ErrorShape::of(None), ErrorShape::Plain);
        assert_eq!(ErrorShape::of(Some(ApiKind::Ollama)), ErrorShape::Plain);
        assert_eq!(ErrorShape::of(Some(ApiKind::Openai)), ErrorShape::Openai);
        assert_eq!(
            ErrorShape::of(Some(ApiKind::Anthropic)),
            ErrorShape::Anthropic
        );
        for shape in [ErrorShape::Plain, ErrorShape::Openai, ErrorShape::Anthropic] {
            assert_eq!(Refusal::Preflight.body_in(shape), "");
        }
    }

    #[test]
    fn statuses_and_headers() {
        assert_eq!(Refusal::NoRoute.status(), 404);
        assert_eq!(Refusal::Key(KeyDenial::Expired).status(), 401);
        assert_eq!(Refusal::Key(KeyDenial::WrongService).status(), 403);
        assert_eq!(Refusal::MethodNotAllowed.status(), 405);
        assert_eq!(
            Refusal::Key(KeyDenial::Missing).extra_header(),
            Some(ExtraHeader::Challenge(CHALLENGE))
        );
        assert_eq!(Refusal::Key(KeyDenial::WrongService).extra_header(), None);
        assert_eq!(
            Refusal::MethodNotAllowed.extra_header(),
            Some(ExtraHeader::Allow)
        );
        for r in Refusal::ALL {
            assert_eq!(
                r.status() == 401,
                matches!(r.extra_header(), Some(ExtraHeader::Challenge(_))),
                "{r:?}: every 401 and only a 401 carries the challenge"
            );
        }
    }

    #[test]
    fn labels_are_metric_safe_words() {
        let mut seen = std::collections::HashMap::new();
        for r in Refusal::ALL {
            if let Some(other) = seen.insert(r.label(), r) {
                assert!(
                    matches!(other, Refusal::UpstreamUnavailable) && r == Refusal::UpstreamTimeout,
                    "{other:?} and {r:?} share a label"
                );
            }
            let l = r.label();
            assert!(
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{l}"
            );
            assert_ne!(l, "accepted");
        }
    }
}
