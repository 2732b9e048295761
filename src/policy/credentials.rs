//! Where a request's API key is found, and what counts as presenting one.
//!
//! A key comes in `X-API-Key` or in `Authorization: Bearer`. A client may
//! send the same key in several of these; when they disagree, the request is
//! refused: which one the gateway checked and which one a lenient upstream
//! reads could otherwise differ.

use http::header::AUTHORIZATION;
use http::HeaderMap;

/// The credential a request presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// No key (an empty `X-API-Key` counts as none).
    Absent,
    /// One key, however many headers carried it.
    Key(&'a [u8]),
    /// Two different keys.
    Conflicting,
}

impl<'a> Credential<'a> {
    /// The key, when exactly one was presented.
    pub fn key(self) -> Option<&'a [u8]> {
        match self {
            Credential::Key(k) => Some(k),
            Credential::Absent | Credential::Conflicting => None,
        }
    }

    /// Adds one more presented key: the same key again changes nothing.
    fn and(self, key: &'a [u8]) -> Self {
        match self {
            _ if key.is_empty() => self,
            Credential::Absent => Credential::Key(key),
            Credential::Key(k) if k == key => self,
            Credential::Key(_) | Credential::Conflicting => Credential::Conflicting,
        }
    }
}

/// The credential in `headers`: every `X-API-Key` and every
/// `Authorization: Bearer` value, which must all agree. Other
/// `Authorization` schemes are not keys and are ignored.
#[inline]
pub fn presented_key(headers: &HeaderMap) -> Credential<'_> {
    let mut found = Credential::Absent;
    for v in headers.get_all("x-api-key") {
        found = found.and(v.as_bytes().trim_ascii());
    }
    for v in headers.get_all(AUTHORIZATION) {
        let auth = v.as_bytes();
        if let (Some(scheme), Some(rest)) = (auth.get(..7), auth.get(7..)) {
            if scheme.eq_ignore_ascii_case(b"bearer ") {
                found = found.and(rest.trim_ascii());
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn key_extraction() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), Credential::Absent);
        h.insert("authorization", HeaderValue::from_static("Bearer  abc "));
        assert_eq!(presented_key(&h), Credential::Key(b"abc"));
        h.insert("authorization", HeaderValue::from_static("bearer xyz"));
        assert_eq!(presented_key(&h), Credential::Key(b"xyz"));
        h.insert("authorization", HeaderValue::from_static("Basic eHl6"));
        assert_eq!(presented_key(&h), Credential::Absent);
        h.insert("authorization", HeaderValue::from_static("Bear"));
        assert_eq!(presented_key(&h), Credential::Absent);
        h.insert("x-api-key", HeaderValue::from_static("k1"));
        assert_eq!(presented_key(&h), Credential::Key(b"k1"));
        h.insert("authorization", HeaderValue::from_static("Bearer tok"));
        h.insert("x-api-key", HeaderValue::from_static(""));
        assert_eq!(presented_key(&h), Credential::Key(b"tok"));
        h.remove("authorization");
        assert_eq!(presented_key(&h), Credential::Absent);
    }

    #[test]
    fn disagreeing_keys_conflict_and_agreeing_ones_do_not() {
        let mut h = HeaderMap::new();
        h.append("x-api-key", HeaderValue::from_static("k1"));
        h.append("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(presented_key(&h), Credential::Conflicting);

        let mut h = HeaderMap::new();
        h.append("x-api-key", HeaderValue::from_static("k1"));
        h.append("x-api-key", HeaderValue::from_static(" k1"));
        h.append("authorization", HeaderValue::from_static("Bearer k1"));
        assert_eq!(presented_key(&h), Credential::Key(b"k1"));
        h.append("authorization", HeaderValue::from_static("Bearer other"));
        assert_eq!(presented_key(&h), Credential::Conflicting);

        let mut h = HeaderMap::new();
        h.append("x-api-key", HeaderValue::from_static("k1"));
        h.append("authorization", HeaderValue::from_static("Basic eHl6"));
        assert_eq!(presented_key(&h), Credential::Key(b"k1"));
    }
}
