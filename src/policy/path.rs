//! Paths the gateway refuses because an upstream could read them
//! differently from the router.

/// True if `path` could mean something different to the upstream than to
/// the router, which matches raw bytes:
///
/// - a dot segment (`.`, `..`), also with `;` parameters (`..;/`, `.;x`,
///   `..%3b`), which servlet-style upstreams strip before resolving it;
/// - a percent-escape that decodes to an unreserved character or a
///   (back)slash (RFC 3986 says to decode unreserved ones, so no client
///   needs them): `/v1/%61dmin/` or `/v1/admin%2Fx` past a stricter
///   `/v1/admin/` route, `/ollama/api/generate/..%2Fpull` past a narrower
///   prefix;
/// - an escape of a control character (`%00`, `%0a`, `%7f`), which cuts
///   C strings and log lines short;
/// - double encoding (`%25` followed by two hex digits, e.g. `%252e`), which
///   an upstream that decodes twice turns into one of the above;
/// - a literal backslash, a path separator to some servers;
/// - a malformed escape.
pub fn is_ambiguous_path(path: &str) -> bool {
    let b = path.as_bytes();
    if b.contains(&b'\\') {
        return true;
    }
    let mut i = 0;
    while let Some(off) = b
        .get(i..)
        .and_then(|rest| rest.iter().position(|c| *c == b'%'))
    {
        let at = i + off;
        let Some(decoded) = escape_at(b, at) else {
            return true;
        };
        if decoded.is_ascii_alphanumeric()
            || decoded.is_ascii_control()
            || matches!(decoded, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\')
            || (decoded == b'%' && is_hex_pair(b, at + 3))
        {
            return true;
        }
        i = at + 3;
    }
    path.split('/').any(is_dot_segment)
}

/// The byte that the escape `%XY` at `at` stands for, if it is one.
fn escape_at(b: &[u8], at: usize) -> Option<u8> {
    if b.get(at) != Some(&b'%') {
        return None;
    }
    hex_pair(b, at + 1)
}

/// The value of the two hex digits at `at`, if there are two.
fn hex_pair(b: &[u8], at: usize) -> Option<u8> {
    let hi = b.get(at).copied().and_then(hex_digit)?;
    let lo = b.get(at + 1).copied().and_then(hex_digit)?;
    Some(hi << 4 | lo)
}

fn is_hex_pair(b: &[u8], at: usize) -> bool {
    hex_pair(b, at).is_some()
}

/// `.` or `..`, alone or before `;` parameters (literal or `%3b`).
fn is_dot_segment(seg: &str) -> bool {
    seg.strip_prefix("..")
        .or_else(|| seg.strip_prefix('.'))
        .is_some_and(|rest| {
            rest.is_empty()
                || rest.starts_with(';')
                || rest.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("%3b"))
        })
}

fn hex_digit(c: u8) -> Option<u8> {
    char::from(c)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_and_passed() {
        for p in [
            "/chat/a\\b",
            "/chat/%252e%252e/admin",
            "/chat/%252F",
            "/chat/..;/admin",
            "/chat/.;x/a",
            "/chat/..%3b/admin",
            "/chat/..%3B/admin",
            "/chat/a%00b",
            "/chat/a%0ab",
            "/chat/a%7fb",
            "/chat/%2e%2e/x",
            "/chat/..",
            "/chat/%zz",
        ] {
            assert!(is_ambiguous_path(p), "{p}");
        }
        for p in [
            "/chat/a%20b%3F%25",
            "/chat/a;b=1",
            "/chat/...",
            "/chat/..x/.y",
            "/chat/%25",
            "/chat/%25zz",
            "/chat/x;..",
        ] {
            assert!(!is_ambiguous_path(p), "{p}");
        }
    }
}
