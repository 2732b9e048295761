//! Paths the gateway refuses because an upstream could read them
//! differently from the router.

/// True if `path` could mean something different to the upstream than
/// to the router: a `.` or `..` segment, or a percent-escape that decodes
/// to an unreserved character or a (back)slash. Such escapes are never
/// needed (RFC 3986 says to decode unreserved ones), and an upstream that
/// decodes them could otherwise be reached on a path no route allowed:
/// `/v1/%61dmin/` or `/v1/admin%2Fx` past a stricter `/v1/admin/` route,
/// `/ollama/api/generate/..%2Fpull` past a narrower prefix. A malformed
/// escape is refused too.
pub fn is_ambiguous_path(path: &str) -> bool {
    let b = path.as_bytes();
    let mut i = 0;
    while let Some(off) = b
        .get(i..)
        .and_then(|rest| rest.iter().position(|c| *c == b'%'))
    {
        let at = i + off;
        let decoded = match (
            b.get(at + 1).copied().and_then(hex_digit),
            b.get(at + 2).copied().and_then(hex_digit),
        ) {
            (Some(hi), Some(lo)) => hi << 4 | lo,
            _ => return true,
        };
        if decoded.is_ascii_alphanumeric()
            || matches!(decoded, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\')
        {
            return true;
        }
        i = at + 3;
    }
    path.split('/').any(|seg| seg == "." || seg == "..")
}

fn hex_digit(c: u8) -> Option<u8> {
    char::from(c)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}
