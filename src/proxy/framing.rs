//! Checks of the request head itself, made before any routing: requests
//! whose framing a lenient upstream could read differently are refused.

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::Version;
use pingora::proxy::Session;

use crate::policy::Refusal;

/// The largest request head accepted (request line and headers). Model
/// APIs need a few hundred bytes; a huge header is abuse or a mistake.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Refuses, in this order: a head with bare LF line ends; both
/// `Content-Length` and `Transfer-Encoding` (the ambiguity request smuggling
/// relies on); a `Content-Length` that is repeated, a list, or not one
/// decimal number; a `Transfer-Encoding` other than one `chunked` on
/// HTTP/1.1; an HTTP/1.1 request without `Host`; a head over
/// [`MAX_HEADER_BYTES`].
///
/// Pingora itself refuses (with a bare 400, before any hook runs) what it
/// cannot frame at all: differing `Content-Length` values, unparsable ones,
/// several `Host` lines, malformed header lines. What it accepts but
/// forwards as written is refused here. It drops `Content-Length` when
/// `Transfer-Encoding` is present, so for such requests (rare) the raw head
/// is read for it.
pub fn check_head(session: &Session) -> Result<(), Refusal> {
    let req = session.req_header();
    let headers = &req.headers;
    let raw = session
        .as_downstream()
        .as_http1()
        .map(|h1| h1.get_headers_raw_bytes());
    if raw.as_deref().is_some_and(has_bare_lf) {
        return Err(Refusal::MalformedHead);
    }
    let mut encodings = headers.get_all(TRANSFER_ENCODING).iter();
    if let Some(first) = encodings.next() {
        let sent_length = headers.contains_key(CONTENT_LENGTH)
            || raw.as_deref().is_some_and(has_content_length_line);
        if sent_length {
            return Err(Refusal::BadFraming);
        }
        let only_chunked = encodings.next().is_none()
            && first
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked");
        if !only_chunked || req.version != Version::HTTP_11 {
            return Err(Refusal::InvalidTransferEncoding);
        }
    }
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        let decimal = |v: &[u8]| !v.is_empty() && v.iter().all(u8::is_ascii_digit);
        if lengths.next().is_some() || !decimal(first.as_bytes()) {
            return Err(Refusal::InvalidContentLength);
        }
    }
    if req.version == Version::HTTP_11 && !headers.contains_key(HOST) {
        return Err(Refusal::BadHost);
    }
    let size = req.raw_path().len()
        + headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if size > MAX_HEADER_BYTES {
        return Err(Refusal::HeaderTooLarge);
    }
    Ok(())
}

/// Whether a line of the raw head ends in LF without CR. Pingora's parser
/// accepts such lines; an upstream that splits on CRLF only would see a
/// different request.
fn has_bare_lf(head: &[u8]) -> bool {
    let mut prev = 0u8;
    for &b in head {
        if b == b'\n' && prev != b'\r' {
            return true;
        }
        prev = b;
    }
    false
}

/// Whether a raw request head has a `Content-Length` header line (the
/// request line is skipped; the name may carry stray whitespace).
fn has_content_length_line(head: &[u8]) -> bool {
    head.split(|b| *b == b'\n').skip(1).any(|line| {
        line.split(|b| *b == b':')
            .next()
            .is_some_and(|name| name.trim_ascii().eq_ignore_ascii_case(b"content-length"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_lf_is_found() {
        assert!(!has_bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n\n"));
        assert!(has_bare_lf(b"\n"));
    }

    #[test]
    fn content_length_lines_are_found_in_raw_heads() {
        assert!(has_content_length_line(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
        ));
        assert!(has_content_length_line(
            b"POST / HTTP/1.1\r\ncontent-length : 5\r\n\r\n"
        ));
        assert!(!has_content_length_line(
            b"POST / HTTP/1.1\r\nX-Content-Length: 5\r\n\r\n"
        ));
        assert!(!has_content_length_line(
            b"POST /content-length: HTTP/1.1\r\n\r\n"
        ));
    }
}
