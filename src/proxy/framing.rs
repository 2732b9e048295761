//! Checks of the request head itself, made before any routing: requests
//! whose framing a lenient upstream could read differently are refused.

use pingora::proxy::Session;

use crate::policy::Refusal;

/// The largest request head accepted (request line and headers). Model
/// APIs need a few hundred bytes; a huge header is abuse or a mistake.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Refuses a header block over [`MAX_HEADER_BYTES`] (431), or both
/// `Content-Length` and `Transfer-Encoding` (400: the ambiguity request
/// smuggling relies on). Pingora drops `Content-Length` when both are sent,
/// so for requests with `Transfer-Encoding` (rare) the raw head is checked
/// for it.
pub fn check_head(session: &Session) -> Result<(), Refusal> {
    let req = session.req_header();
    let headers = &req.headers;
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        let sent_length = headers.contains_key(http::header::CONTENT_LENGTH)
            || session
                .as_downstream()
                .as_http1()
                .is_some_and(|h1| has_content_length_line(&h1.get_headers_raw_bytes()));
        if sent_length {
            return Err(Refusal::BadFraming);
        }
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
