//! Where a request's API key is found.

use http::HeaderMap;

/// The key a request presents: `X-API-Key`, else `Authorization: Bearer`.
#[inline]
pub fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("x-api-key") {
        let v = trim_ascii(v.as_bytes());
        // An empty X-API-Key (a client default) does not hide a Bearer token.
        if !v.is_empty() || !headers.contains_key("authorization") {
            return Some(v);
        }
    }
    let auth = headers.get("authorization")?.as_bytes();
    let (scheme, rest) = (auth.get(..7)?, auth.get(7..)?);
    if scheme.eq_ignore_ascii_case(b"bearer ") {
        Some(trim_ascii(rest))
    } else {
        None
    }
}

fn trim_ascii(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn key_extraction() {
        let mut h = HeaderMap::new();
        assert!(presented_key(&h).is_none());
        h.insert("authorization", HeaderValue::from_static("Bearer  abc "));
        assert_eq!(presented_key(&h), Some(&b"abc"[..]));
        h.insert("authorization", HeaderValue::from_static("bearer xyz"));
        assert_eq!(presented_key(&h), Some(&b"xyz"[..]));
        h.insert("authorization", HeaderValue::from_static("Basic eHl6"));
        assert!(presented_key(&h).is_none());
        h.insert("authorization", HeaderValue::from_static("Bear"));
        assert!(presented_key(&h).is_none());
        h.insert("x-api-key", HeaderValue::from_static("k1"));
        assert_eq!(presented_key(&h), Some(&b"k1"[..]));
        h.insert("authorization", HeaderValue::from_static("Bearer tok"));
        h.insert("x-api-key", HeaderValue::from_static(""));
        assert_eq!(presented_key(&h), Some(&b"tok"[..]));
        h.remove("authorization");
        assert_eq!(presented_key(&h), Some(&b""[..]));
    }
}
