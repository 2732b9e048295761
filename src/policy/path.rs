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

/// True if `path` carries segment parameters: a `;`, literal or escaped
/// (`%3B`). Tomcat, Spring, Jetty and some Python frameworks drop
/// `;params` from each segment before routing, so `/w/admin;/x` reaches
/// them as `/w/admin/x` while the router saw a `/w/` path.
pub fn has_path_params(path: &str) -> bool {
    let b = path.as_bytes();
    b.contains(&b';')
        || b.windows(3).any(|w| {
            w.first() == Some(&b'%') && w.get(1..).is_some_and(|h| h.eq_ignore_ascii_case(b"3b"))
        })
}

/// `path` as a server that drops segment parameters reads it: each
/// segment cut at its first `;` (or `%3B`). Built only for the rare path
/// that has them.
pub fn without_path_params(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(seg.get(..param_start(seg)).unwrap_or(seg));
    }
    out
}

/// Where the parameters of one segment begin (its length when none).
fn param_start(seg: &str) -> usize {
    let b = seg.as_bytes();
    let literal = b.iter().position(|c| *c == b';');
    let escaped = b.windows(3).position(|w| {
        w.first() == Some(&b'%') && w.get(1..).is_some_and(|h| h.eq_ignore_ascii_case(b"3b"))
    });
    literal.into_iter().chain(escaped).min().unwrap_or(b.len())
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

    #[test]
    fn segment_parameters_are_found_and_stripped_as_servlets_do() {
        for p in [
            "/w/admin;/x",
            "/w/a;b=1",
            "/w/admin%3b/x",
            "/w/admin%3B",
            "/;",
        ] {
            assert!(has_path_params(p), "{p}");
        }
        for p in ["/w/admin/x", "/w/%3", "/w/%33b", "/w/3b"] {
            assert!(!has_path_params(p), "{p}");
        }
        assert_eq!(without_path_params("/w/admin;/x"), "/w/admin/x");
        assert_eq!(
            without_path_params("/w/admin;jsessionid=1/x;y"),
            "/w/admin/x"
        );
        assert_eq!(without_path_params("/w/admin%3Bz/x"), "/w/admin/x");
        assert_eq!(without_path_params("/w/a;b%3Bc/d"), "/w/a/d");
        assert_eq!(without_path_params("/"), "/");
    }
}
