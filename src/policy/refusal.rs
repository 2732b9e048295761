//! Every answer the gateway gives instead of the upstream's, in one type.
//!
//! A [`Refusal`] owns, per kind, everything that is said about it: the
//! status, the JSON body, the extra header it needs, and the one word that
//! is both its metric label and its audit `decision`. The reply, the
//! metrics and the audit log read them from here, so adding a kind means
//! adding a variant and the code that decides it, nothing else.

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

    /// The JSON body of the reply. The messages are part of the interface:
    /// clients may match on them, so they do not change.
    pub const fn body(self) -> &'static str {
        match self {
            Refusal::Preflight => "",
            Refusal::IpNotAllowed => r#"{"error":"address not allowed"}"#,
            Refusal::KeyThrottled { .. } => r#"{"error":"too many failed key attempts"}"#,
            Refusal::RateLimited { .. } => r#"{"error":"rate limit exceeded"}"#,
            Refusal::TooManyConcurrent => r#"{"error":"too many concurrent requests"}"#,
            Refusal::TokenBudgetExceeded { .. } => r#"{"error":"token budget exceeded"}"#,
            Refusal::ModelNotAllowed => r#"{"error":"model not allowed for this key"}"#,
            Refusal::ModelUnreadable => {
                r#"{"error":"the request body must be a JSON object that names the model"}"#
            }
            Refusal::BadFraming => r#"{"error":"both content-length and transfer-encoding"}"#,
            Refusal::InvalidContentLength => r#"{"error":"invalid content-length"}"#,
            Refusal::InvalidTransferEncoding => r#"{"error":"invalid transfer-encoding"}"#,
            Refusal::MalformedHead => r#"{"error":"malformed request head"}"#,
            Refusal::BadHost => r#"{"error":"missing or repeated host header"}"#,
            Refusal::HeaderTooLarge => r#"{"error":"request header fields too large"}"#,
            Refusal::BadPath => r#"{"error":"invalid path"}"#,
            Refusal::NoRoute => r#"{"error":"no route for this path"}"#,
            Refusal::MethodNotAllowed => r#"{"error":"method not allowed"}"#,
            Refusal::UpgradeNotAllowed => r#"{"error":"upgrade not allowed on this route"}"#,
            Refusal::ConflictingKeys => r#"{"error":"conflicting api keys"}"#,
            Refusal::Key(KeyDenial::Missing) => r#"{"error":"missing api key"}"#,
            Refusal::Key(KeyDenial::Unknown) => r#"{"error":"invalid api key"}"#,
            Refusal::Key(KeyDenial::Expired) => r#"{"error":"api key expired"}"#,
            Refusal::Key(KeyDenial::Disabled) => r#"{"error":"api key revoked"}"#,
            Refusal::Key(KeyDenial::WrongService) => {
                r#"{"error":"api key not allowed for this service"}"#
            }
            Refusal::BadEndUser => {
                r#"{"error":"the end user header must be one value of 1 to 128 visible ASCII characters"}"#
            }
            Refusal::BadRequest => r#"{"error":"bad request"}"#,
            Refusal::BodyTimeout => r#"{"error":"request body timed out"}"#,
            Refusal::BodyTooLarge => r#"{"error":"request body too large"}"#,
            Refusal::UpstreamUnavailable => r#"{"error":"upstream unavailable"}"#,
            Refusal::UpstreamTimeout => r#"{"error":"upstream timed out"}"#,
            Refusal::SharedStateUnavailable => {
                r#"{"error":"limits cannot be checked: shared state unavailable"}"#
            }
            Refusal::UpstreamsBusy { .. } => r#"{"error":"all upstreams busy"}"#,
            Refusal::AliasBodyTooLarge => {
                r#"{"error":"request body too large to rewrite the model alias it names (at most 64 KiB)"}"#
            }
            Refusal::Internal => r#"{"error":"internal error"}"#,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_body_is_json_with_an_error_field() {
        for r in Refusal::ALL.into_iter().filter(|r| r.status() != 204) {
            let v: serde_json::Value = serde_json::from_str(r.body()).unwrap();
            assert!(v.get("error").and_then(|e| e.as_str()).is_some(), "{r:?}");
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
