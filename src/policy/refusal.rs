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
    Key(KeyDenial),
    /// A request Pingora could not read (a malformed body, say).
    BadRequest,
    BodyTooLarge,
    /// The upstream could not be reached or broke off.
    UpstreamUnavailable,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    Internal,
}

/// A header some refusals carry besides the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraHeader {
    /// `Allow`, with the methods of the route.
    Allow,
    /// `WWW-Authenticate`, with this challenge.
    Challenge(&'static str),
}

/// The `WWW-Authenticate` challenge sent with every 401.
pub const CHALLENGE: &str = "Bearer realm=\"ai-gateway\"";

impl Refusal {
    /// Every kind, for metrics that are resolved once at start and for
    /// tests that must cover them all.
    pub const ALL: [Refusal; 21] = [
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
        Refusal::Key(KeyDenial::Missing),
        Refusal::Key(KeyDenial::Unknown),
        Refusal::Key(KeyDenial::Expired),
        Refusal::Key(KeyDenial::Disabled),
        Refusal::Key(KeyDenial::WrongService),
        Refusal::BadRequest,
        Refusal::BodyTooLarge,
        Refusal::UpstreamUnavailable,
        Refusal::UpstreamTimeout,
        Refusal::Internal,
    ];

    /// The HTTP status of the reply.
    pub const fn status(self) -> u16 {
        match self {
            Refusal::BadFraming
            | Refusal::InvalidContentLength
            | Refusal::InvalidTransferEncoding
            | Refusal::MalformedHead
            | Refusal::BadHost
            | Refusal::BadPath
            | Refusal::UpgradeNotAllowed
            | Refusal::ConflictingKeys
            | Refusal::BadRequest => 400,
            Refusal::Key(KeyDenial::WrongService) => 403,
            Refusal::Key(_) => 401,
            Refusal::NoRoute => 404,
            Refusal::MethodNotAllowed => 405,
            Refusal::BodyTooLarge => 413,
            Refusal::HeaderTooLarge => 431,
            Refusal::Internal => 500,
            Refusal::UpstreamUnavailable => 502,
            Refusal::UpstreamTimeout => 504,
        }
    }

    /// The JSON body of the reply. The messages are part of the interface:
    /// clients may match on them, so they do not change.
    pub const fn body(self) -> &'static str {
        match self {
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
            Refusal::BadRequest => r#"{"error":"bad request"}"#,
            Refusal::BodyTooLarge => r#"{"error":"request body too large"}"#,
            Refusal::UpstreamUnavailable => r#"{"error":"upstream unavailable"}"#,
            Refusal::UpstreamTimeout => r#"{"error":"upstream timed out"}"#,
            Refusal::Internal => r#"{"error":"internal error"}"#,
        }
    }

    /// The metric label and audit `decision`: fixed words, never anything a
    /// client sent.
    pub const fn label(self) -> &'static str {
        match self {
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
            Refusal::BadRequest => "bad_request",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::UpstreamUnavailable | Refusal::UpstreamTimeout => "upstream_error",
            Refusal::Internal => "internal_error",
        }
    }

    /// The header the reply needs besides the body, if any.
    pub const fn extra_header(self) -> Option<ExtraHeader> {
        match self {
            Refusal::MethodNotAllowed => Some(ExtraHeader::Allow),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_body_is_json_with_an_error_field() {
        for r in Refusal::ALL {
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
        for r in Refusal::ALL {
            let l = r.label();
            assert!(
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{l}"
            );
            assert_ne!(l, "accepted");
        }
    }
}
