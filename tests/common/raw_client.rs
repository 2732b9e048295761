//! A raw HTTP/1.1 client for tests that check the gateway's exact answers:
//! one request per connection (`Connection: close`), and streams read
//! chunk by chunk while they come.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::gateway::Gateway;
use super::raw_http::{read_response, RawResponse};

/// How long a raw client waits for an answer before calling it missing.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(CLIENT_TIMEOUT))
        .expect("set read timeout");
    s.set_write_timeout(Some(CLIENT_TIMEOUT))
        .expect("set write timeout");
    let _ = s.set_nodelay(true);
    s
}

/// The bytes of a request with `Connection: close`; a `Content-Length`
/// is added when there is a body (or the method is POST).
pub fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends one request on a new connection (in one write, `Connection:
/// close`) and reads the whole answer. A write error is ignored (the
/// gateway may refuse and close before it read the body); no connection
/// or no answer is an `Err`.
pub fn try_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<RawResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.set_write_timeout(Some(Duration::from_secs(15)))?;
    let _ = s.set_nodelay(true);
    let _ = s.write_all(&request_bytes(addr, method, path, headers, body));
    read_response(&mut BufReader::new(s))
}

/// [`try_send`] that must get an answer.
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    try_send(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} {headers:?}: no answer from {addr}: {e}"))
}

/// Where a request goes: a gateway (its first listener) or an address.
pub trait Target {
    fn target(&self) -> SocketAddr;
}

impl Target for SocketAddr {
    fn target(&self) -> SocketAddr {
        *self
    }
}

impl Target for Gateway {
    fn target(&self) -> SocketAddr {
        self.addr()
    }
}

impl<T: Target + ?Sized> Target for &T {
    fn target(&self) -> SocketAddr {
        (**self).target()
    }
}

/// `GET path` with `X-API-Key: key` (and any `extra` headers), on a new
/// connection; must get an answer.
pub fn get_keyed(to: impl Target, path: &str, key: &str, extra: &[(&str, &str)]) -> RawResponse {
    let mut headers = vec![("X-API-Key", key)];
    headers.extend_from_slice(extra);
    send(to.target(), "GET", path, &headers, b"")
}

pub fn show(r: &RawResponse) -> String {
    let text = r.text();
    let cut = text.char_indices().nth(300).map_or(text.len(), |(i, _)| i);
    let more = if cut < text.len() { "..." } else { "" };
    format!("{} {:?} {}{more}", r.status, r.headers, &text[..cut])
}

/// A streamed answer whose head has been read and whose body is still
/// coming.
pub struct OpenStream {
    pub reader: BufReader<TcpStream>,
    pub headers: Vec<(String, String)>,
}

/// Reads a response head: the status and the headers.
pub fn read_head(r: &mut impl BufRead) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before a response",
        ));
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("status {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            return Ok((status, headers));
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
}

impl OpenStream {
    pub fn is_chunked(&self) -> bool {
        self.headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        })
    }

    /// The next HTTP chunk of the body, `None` after the last one.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        if !self.is_chunked() {
            let mut buf = vec![0u8; 4096];
            let n = self.reader.read(&mut buf)?;
            buf.truncate(n);
            return Ok((n > 0).then_some(buf));
        }
        let mut size_line = String::new();
        if self.reader.read_line(&mut size_line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, size_line.clone()))?;
        if size == 0 {
            loop {
                let mut t = String::new();
                if self.reader.read_line(&mut t)? == 0 || t.trim().is_empty() {
                    return Ok(None);
                }
            }
        }
        let mut data = vec![0u8; size];
        self.reader.read_exact(&mut data)?;
        let mut crlf = [0u8; 2];
        self.reader.read_exact(&mut crlf)?;
        Ok(Some(data))
    }

    /// Reads the body to its end (the terminating chunk).
    pub fn finish(mut self) -> Vec<u8> {
        let mut body = Vec::new();
        while let Some(c) = self.next_chunk().expect("read the streamed body") {
            body.extend_from_slice(&c);
        }
        body
    }

    /// Goes away mid-stream: closes the connection without reading on.
    pub fn disconnect(self) {
        let _ = self.reader.get_ref().shutdown(Shutdown::Both);
    }
}

/// `GET path` with `key` on a new connection; returns the open stream once
/// its head arrived with 200, or the whole answer otherwise.
pub fn open_stream(addr: SocketAddr, path: &str, key: &str) -> Result<OpenStream, RawResponse> {
    let mut s = connect(addr);
    s.write_all(&request_bytes(
        addr,
        "GET",
        path,
        &[("X-API-Key", key)],
        b"",
    ))
    .expect("send the stream request");
    let mut reader = BufReader::new(s);
    let (status, headers) = read_head(&mut reader).expect("read the stream's response head");
    if status == 200 {
        return Ok(OpenStream { reader, headers });
    }
    let len = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0usize);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).expect("read the refusal body");
    Err(RawResponse {
        status,
        headers,
        body,
    })
}

/// Asserts the gateway's own answer: `status`, `Content-Type:
/// application/json` and exactly `{"error": error}`.
pub fn assert_refusal(r: &RawResponse, status: u16, error: &str, what: &str) {
    let expected = serde_json::json!({ "error": error });
    let body: Option<Value> = serde_json::from_slice(&r.body).ok();
    assert!(
        r.status == status
            && body.as_ref() == Some(&expected)
            && r.header("content-type") == Some("application/json"),
        "{what}: want {status} {expected}, got {}",
        show(r)
    );
}

pub fn assert_status(r: &RawResponse, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: got {}", show(r));
}

/// The `Retry-After` of a 429: whole seconds, at least 1.
pub fn retry_after(r: &RawResponse) -> u64 {
    let v = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After on {}", show(r)));
    let secs: u64 = v
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {v:?} is not whole seconds"));
    assert!(secs >= 1, "Retry-After {secs} must be at least 1");
    secs
}

/// Sleeps until `retry_after` seconds after `since`: waiting out the window
/// the gateway announced is the behaviour under test. (A `Retry-After`
/// rounded down would make the request after it fail, as it should.)
pub fn wait_retry_after(since: Instant, retry_after: u64) {
    let until = since + Duration::from_secs(retry_after);
    let now = Instant::now();
    if until > now {
        thread::sleep(until - now);
    }
}

pub fn preflight(gw: &Gateway, path: &str, origin: &str, extra: &[(&str, &str)]) -> RawResponse {
    let mut headers = vec![
        ("Origin", origin),
        ("Access-Control-Request-Method", "POST"),
        (
            "Access-Control-Request-Headers",
            "content-type, authorization",
        ),
    ];
    headers.extend_from_slice(extra);
    send(gw.addr(), "OPTIONS", path, &headers, b"")
}

/// [`open_stream`] that must succeed.
pub fn must_open(addr: SocketAddr, path: &str, key: &str, what: &str) -> OpenStream {
    open_stream(addr, path, key)
        .unwrap_or_else(|r| panic!("{what}: the stream was refused: {}", show(&r)))
}

/// Asserts that a stream request is refused with 429 `too many concurrent
/// requests` (reading only the answer's head if it is a stream); returns
/// how long the answer took.
pub fn assert_stream_refused(addr: SocketAddr, path: &str, key: &str, what: &str) -> Duration {
    assert_stream_refused_or(addr, path, key, what, String::new)
}

/// [`assert_stream_refused`], with `context()` (e.g. the state of a shared
/// store, taken while the stream is open) added to the failure message.
pub fn assert_stream_refused_or(
    addr: SocketAddr,
    path: &str,
    key: &str,
    what: &str,
    context: impl FnOnce() -> String,
) -> Duration {
    let asked = Instant::now();
    match open_stream(addr, path, key) {
        Ok(st) => {
            let took = asked.elapsed();
            let context = context();
            st.disconnect();
            panic!("{what}: the stream opened (200 after {took:?}) instead of a 429{context}");
        }
        Err(r) => {
            let took = asked.elapsed();
            assert_refusal(&r, 429, "too many concurrent requests", what);
            took
        }
    }
}

/// Retries [`open_stream`] until it succeeds (a slot is freed by the
/// gateway just after the body ended, or after it noticed a disconnect),
/// refused meanwhile only with 429 `too many concurrent requests`.
pub fn open_stream_within(
    addr: SocketAddr,
    path: &str,
    key: &str,
    timeout: Duration,
    what: &str,
) -> OpenStream {
    let deadline = Instant::now() + timeout;
    loop {
        match open_stream(addr, path, key) {
            Ok(st) => return st,
            Err(r) => {
                assert_refusal(&r, 429, "too many concurrent requests", what);
                if Instant::now() >= deadline {
                    panic!("{what}: still 429 after {timeout:?}: the slot was not freed");
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
