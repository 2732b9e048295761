//! Raw HTTP/1.x reading: request heads and bodies as an upstream receives
//! them, and responses as a client on a bare `TcpStream` receives them
//! (for tests that send malformed requests or check exact bytes).

use std::io::{self, BufRead, Read};

/// Upper bound for a request header block; larger heads are rejected so a
/// misbehaving peer cannot make a test upstream allocate without bound.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A parsed HTTP/1.x request head, as an upstream received it.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// Request method, e.g. `POST`.
    pub method: String,
    /// The raw request target, including any query string.
    pub target: String,
    /// Protocol version token, e.g. `HTTP/1.1`.
    pub version: String,
    /// Headers in arrival order; names are lower-cased, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// First value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// All values of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Whether the connection may be reused after this request, following
    /// HTTP/1.1 (persistent unless `close`) and HTTP/1.0 (close unless
    /// `keep-alive`) defaults.
    pub fn keep_alive(&self) -> bool {
        let tokens: Vec<String> = self
            .header_all("connection")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect();
        if tokens.iter().any(|t| t == "close") {
            return false;
        }
        if self.version.eq_ignore_ascii_case("HTTP/1.0") {
            return tokens.iter().any(|t| t == "keep-alive");
        }
        true
    }

    /// Whether the body is framed with `Transfer-Encoding: chunked`.
    pub fn is_chunked(&self) -> bool {
        self.header_all("transfer-encoding")
            .iter()
            .flat_map(|v| v.split(','))
            .next_back()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
    }

    /// Whether the client asked for `100 Continue` before sending the body.
    pub fn expects_continue(&self) -> bool {
        self.header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one line (including its `\n`) of at most `limit` bytes.
fn read_line_limited(reader: &mut impl BufRead, limit: usize) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(limit as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if line.len() > limit {
        return Err(invalid("line too long"));
    }
    Ok(line)
}

/// Reads a request head (request line + headers up to the blank line).
///
/// Returns `Ok(None)` when the peer closed the connection cleanly before
/// sending anything, which is how a keep-alive connection normally ends.
/// The head is capped at [`MAX_HEAD_BYTES`].
pub fn read_request_head(reader: &mut impl BufRead) -> io::Result<Option<RequestHead>> {
    let mut used = 0usize;
    // Skip stray empty lines before the request line (RFC 9112 §2.2).
    let request_line = loop {
        let line = read_line_limited(reader, MAX_HEAD_BYTES - used)?;
        if line.is_empty() {
            if used == 0 {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        used += line.len();
        if !line.ends_with(b"\n") {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let trimmed = trim_eol(&line);
        if !trimmed.is_empty() {
            break String::from_utf8_lossy(trimmed).into_owned();
        }
    };
    let mut parts = request_line.split(' ').filter(|p| !p.is_empty());
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid(format!("bad request line {request_line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!("unsupported version {version:?}")));
    }
    let mut headers = Vec::new();
    loop {
        let line = read_line_limited(reader, MAX_HEAD_BYTES.saturating_sub(used))?;
        used += line.len();
        if !line.ends_with(b"\n") {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = trim_eol(&line);
        if line.is_empty() {
            break;
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| invalid("header line without colon"))?;
        let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(invalid(format!("bad header name {name:?}")));
        }
        let value = String::from_utf8_lossy(&line[colon + 1..])
            .trim_matches([' ', '\t'])
            .to_string();
        headers.push((name, value));
    }
    Ok(Some(RequestHead {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers,
    }))
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Reads exactly `len` body bytes, handing them to `sink` piece by piece.
fn read_exact_streaming(
    reader: &mut impl BufRead,
    mut len: u64,
    sink: &mut dyn FnMut(&[u8]),
) -> io::Result<()> {
    while len > 0 {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
        sink(&buf[..n]);
        reader.consume(n);
        len -= n as u64;
    }
    Ok(())
}

/// Reads the request body that follows `head`, framed by
/// `Transfer-Encoding: chunked` or `Content-Length` (no body otherwise),
/// passing the decoded bytes to `sink` as they arrive so large bodies are
/// never held in memory. Returns the decoded body length.
pub fn read_request_body(
    reader: &mut impl BufRead,
    head: &RequestHead,
    sink: &mut dyn FnMut(&[u8]),
) -> io::Result<u64> {
    if head.is_chunked() {
        let mut total = 0u64;
        loop {
            let line = read_line_limited(reader, 4096)?;
            if !line.ends_with(b"\n") {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let line = String::from_utf8_lossy(trim_eol(&line)).into_owned();
            let size_str = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size_str, 16)
                .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
            if size == 0 {
                // Trailer section: header lines until an empty line.
                loop {
                    let t = read_line_limited(reader, MAX_HEAD_BYTES)?;
                    if !t.ends_with(b"\n") {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    if trim_eol(&t).is_empty() {
                        return Ok(total);
                    }
                }
            }
            read_exact_streaming(reader, size, sink)?;
            total += size;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(invalid("chunk data not followed by CRLF"));
            }
        }
    }
    let Some(len) = head.header("content-length") else {
        return Ok(0);
    };
    let len: u64 = len
        .trim()
        .parse()
        .map_err(|_| invalid(format!("bad content-length {len:?}")))?;
    read_exact_streaming(reader, len, sink)?;
    Ok(len)
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Names as sent (compare case-insensitively with `header`).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// Reads one response off a raw connection: Content-Length, chunked (with
/// trailers) or close-delimited body.
pub fn read_response(r: &mut impl BufRead) -> io::Result<RawResponse> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!("bad status line {line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header {h:?}")))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let find = |n: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            let mut size_line = String::new();
            r.read_line(&mut size_line)?;
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| invalid(format!("bad chunk size {size_line:?}")))?;
            if size == 0 {
                loop {
                    let mut t = String::new();
                    if r.read_line(&mut t)? == 0 || t.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = find("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| invalid(format!("bad content-length {len:?}")))?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}
