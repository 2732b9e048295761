//! Shared support code for the `ai-gateway` integration tests.
//!
//! It provides three things:
//!
//! * small, dependency-free HTTP/1.1 upstream servers (echo, streaming,
//!   silent) that run on background threads, so tests can observe exactly
//!   what the gateway forwarded and how it forwarded it;
//! * a [`Gateway`] runner that writes a config + keys file into a temporary
//!   directory, spawns the real `ai-gateway` binary and waits until it
//!   answers HTTP;
//! * client helpers ([`agent`], [`sha256_hex`], [`PatternReader`], ...).
//!
//! Everything is blocking std code (threads + `std::net`), no async runtime.
//!
//! Used as `mod common;` from several test crates, each of which uses only a
//! subset of the helpers, hence the crate-wide `dead_code` allowance.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// Upper bound for a request header block; larger heads are rejected so a
/// misbehaving peer cannot make a test upstream allocate without bound.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How long [`Gateway::start`] waits for the binary to answer HTTP.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Size of the read buffer used when streaming request bodies.
const IO_BUF: usize = 64 * 1024;

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

/// Polls `f` every 10 ms until it is true; false once `timeout` has passed.
/// Tests synchronise with this, never with fixed sleeps.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The listener is dropped before returning, so there is a small window in
/// which another process could take the port; [`Gateway::start`] retries on
/// "address in use" to cover that race.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of a freshly bound listener")
        .port()
}

/// An address on 127.0.0.1 with nothing listening, so connecting to it is
/// refused; used as an upstream to provoke 502 responses.
pub fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for refused_addr");
    listener
        .local_addr()
        .expect("local_addr of a freshly bound listener")
}

/// Lower-case hex SHA-256 of `bytes`, the format the echo server reports.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex encoding of arbitrary bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(out, "{b:02x}").expect("writing to a String cannot fail");
    }
    out
}

/// Locks a mutex, ignoring poisoning: a panicking server thread must not
/// make every later assertion in the test fail with a confusing message.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A ureq agent suited to gateway tests: HTTP error statuses are returned as
/// normal responses (tests assert on 401/404/502/504 ...), redirects are not
/// followed (tests see what the gateway sent), proxies from the environment
/// are ignored (all traffic is local) and a generous global timeout keeps a
/// hung gateway from hanging the test suite.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// Reads a whole response body and parses it as JSON, panicking with the raw
/// text if it is not JSON (that text is the most useful failure message).
pub fn body_json(resp: &mut ureq::http::Response<ureq::Body>) -> serde_json::Value {
    let text = resp
        .body_mut()
        .read_to_string()
        .expect("read response body as text");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {text:?}"))
}

/// Reads `reader` to the end, returning each non-empty line (without its
/// terminator) together with the instant it was completely received.
///
/// Streaming tests compare these instants with the upstream's
/// [`StreamServer::last_chunk_written_at`] to prove the gateway does not
/// buffer whole responses.
pub fn read_lines_timed(reader: impl Read) -> Vec<(String, Instant)> {
    let mut reader = BufReader::new(reader);
    let mut out = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader
            .read_until(b'\n', &mut line)
            .expect("read streamed response body");
        if n == 0 {
            return out;
        }
        let at = Instant::now();
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        if !line.is_empty() {
            out.push((String::from_utf8_lossy(&line).into_owned(), at));
        }
    }
}

/// A deterministic, non-repeating-looking byte stream of a fixed length.
///
/// Lets tests upload large bodies (e.g. 20 MB) without holding them in
/// memory; [`pattern_sha256`] gives the digest the echo server must report.
#[derive(Debug, Clone)]
pub struct PatternReader {
    pos: u64,
    len: u64,
}

impl PatternReader {
    /// A reader producing exactly `len` bytes of the pattern.
    pub fn new(len: u64) -> PatternReader {
        PatternReader { pos: 0, len }
    }

    fn byte_at(pos: u64) -> u8 {
        // Mix two periods so the data is not a short repeating cycle.
        ((pos % 251) as u8) ^ (((pos / 251) % 241) as u8).wrapping_mul(7)
    }
}

impl Read for PatternReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.len - self.pos;
        let n = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = Self::byte_at(self.pos + i as u64);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// SHA-256 (lower-case hex) of the first `len` bytes of [`PatternReader`].
pub fn pattern_sha256(len: u64) -> String {
    let mut reader = PatternReader::new(len);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; IO_BUF];
    loop {
        let n = reader.read(&mut buf).expect("PatternReader never fails");
        if n == 0 {
            return hex(&hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

// ---------------------------------------------------------------------------
// Minimal HTTP/1.1 request parsing
// ---------------------------------------------------------------------------

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

/// Writes a small `Connection: close` response; used for malformed requests.
fn write_error(stream: &mut impl Write, status: &str) {
    let body = format!("{status}\n");
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

/// Reads a request head, answering malformed ones with 400 and returning
/// `None` whenever the connection should end.
fn next_request(reader: &mut BufReader<TcpStream>, writer: &mut TcpStream) -> Option<RequestHead> {
    match read_request_head(reader) {
        Ok(head) => head,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            write_error(writer, "400 Bad Request");
            None
        }
        Err(_) => None,
    }
}

/// Splits an accepted connection into a buffered reader and a writer.
fn split(stream: TcpStream) -> Option<(BufReader<TcpStream>, TcpStream)> {
    let _ = stream.set_nodelay(true);
    let writer = stream.try_clone().ok()?;
    Some((BufReader::with_capacity(IO_BUF, stream), writer))
}

// ---------------------------------------------------------------------------
// Generic threaded server
// ---------------------------------------------------------------------------

type Handler = dyn Fn(TcpStream) + Send + Sync + 'static;

/// A TCP server on 127.0.0.1 that runs `handler` on its own thread for every
/// accepted connection. The building block of all the upstreams; public so
/// a test can build a one-off misbehaving upstream.
///
/// Dropping it stops accepting (stop flag + a self-connect to wake the
/// blocking `accept`) and shuts down every connection still open, so
/// handler threads blocked on I/O finish promptly.
pub struct CustomServer {
    /// The address the server listens on.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    accept_thread: Option<JoinHandle<()>>,
}

impl CustomServer {
    /// Binds 127.0.0.1:0 and starts accepting; `handler` owns each
    /// connection and closes it by returning (dropping the stream).
    pub fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> CustomServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream on 127.0.0.1:0");
        Self::start_on(listener, handler)
    }

    /// Like [`CustomServer::start`] but on an already bound listener, so the
    /// handler can be built knowing the address.
    pub fn start_on(
        listener: TcpListener,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> CustomServer {
        let handler: Arc<Handler> = Arc::new(handler);
        let addr = listener.local_addr().expect("upstream local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
        let accept_thread = {
            let stop = Arc::clone(&stop);
            let conns = Arc::clone(&conns);
            thread::Builder::new()
                .name(format!("upstream-accept-{addr}"))
                .spawn(move || accept_loop(listener, stop, conns, handler))
                .expect("spawn upstream accept thread")
        };
        CustomServer {
            addr,
            stop,
            conns,
            accept_thread: Some(accept_thread),
        }
    }

    /// Number of connections currently open on this server; lets tests check
    /// connection reuse or that the gateway closed upstream connections.
    pub fn open_connections(&self) -> usize {
        lock(&self.conns).len()
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    handler: Arc<Handler>,
) {
    let next_id = AtomicU64::new(0);
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(_) => {
                // E.g. EMFILE; back off instead of spinning.
                thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            lock(&conns).insert(id, clone);
        }
        let thread_conns = Arc::clone(&conns);
        let handler = Arc::clone(&handler);
        let spawned = thread::Builder::new()
            .name(format!("upstream-conn-{id}"))
            .spawn(move || {
                handler(stream);
                lock(&thread_conns).remove(&id);
            });
        if spawned.is_err() {
            lock(&conns).remove(&id);
        }
    }
}

impl Drop for CustomServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so the loop sees the stop flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        for (_, conn) in lock(&self.conns).drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

// ---------------------------------------------------------------------------
// Echo upstream
// ---------------------------------------------------------------------------

/// What the echo server saw for one fully received request.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The request head as received.
    pub head: RequestHead,
    /// Decoded body length in bytes.
    pub body_len: u64,
    /// Lower-case hex SHA-256 of the decoded body.
    pub body_sha256: String,
}

#[derive(Default)]
struct EchoState {
    hits: AtomicUsize,
    requests: Mutex<Vec<RecordedRequest>>,
}

/// Upstream that answers every request with a JSON description of it, so
/// tests can check what the gateway forwarded (method, target, headers,
/// body digest) without trusting the gateway's own logs.
///
/// Response: `200`, `Content-Type: application/json`, `X-Upstream: <addr>`,
/// Content-Length framed body
/// `{"method","path","headers":{"name":["v",..]},"body_len","body_sha256","upstream"}`.
pub struct EchoServer {
    /// The address the server listens on.
    pub addr: SocketAddr,
    state: Arc<EchoState>,
    server: CustomServer,
}

impl EchoServer {
    /// Starts an echo server on 127.0.0.1 with an OS-assigned port.
    pub fn start() -> EchoServer {
        let state = Arc::new(EchoState::default());
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo on 127.0.0.1:0");
        let addr = listener.local_addr().expect("echo local_addr");
        let server = {
            let state = Arc::clone(&state);
            CustomServer::start_on(listener, move |stream| {
                echo_connection(stream, &state, addr);
            })
        };
        EchoServer {
            addr: server.addr,
            state,
            server,
        }
    }

    /// Number of request heads received (counted before the body is read,
    /// so a request aborted mid-body still counts). Tests use it to prove a
    /// rejected request never reached the upstream.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Every request whose body was fully received, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// The most recent fully received request, if any.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        lock(&self.state.requests).last().cloned()
    }

    /// Connections currently open to this upstream.
    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }
}

fn echo_connection(stream: TcpStream, state: &EchoState, addr: SocketAddr) {
    let Some((mut reader, mut writer)) = split(stream) else {
        return;
    };
    while let Some(head) = next_request(&mut reader, &mut writer) {
        state.hits.fetch_add(1, Ordering::SeqCst);
        if head.expects_continue() && writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return;
        }
        let mut hasher = Sha256::new();
        let body_len = match read_request_body(&mut reader, &head, &mut |b| hasher.update(b)) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    write_error(&mut writer, "400 Bad Request");
                }
                return;
            }
        };
        let body_sha256 = hex(&hasher.finalize());

        let mut headers = serde_json::Map::new();
        for (name, value) in &head.headers {
            let entry = headers
                .entry(name.clone())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            if let serde_json::Value::Array(values) = entry {
                values.push(serde_json::Value::String(value.clone()));
            }
        }
        let body = serde_json::json!({
            "method": head.method,
            "path": head.target,
            "headers": headers,
            "body_len": body_len,
            "body_sha256": body_sha256,
            "upstream": addr.to_string(),
        })
        .to_string();

        let keep_alive = head.keep_alive();
        let is_head = head.method.eq_ignore_ascii_case("HEAD");
        lock(&state.requests).push(RecordedRequest {
            head,
            body_len,
            body_sha256,
        });

        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Upstream: {addr}\r\n{}\r\n",
            body.len(),
            if keep_alive { "" } else { "Connection: close\r\n" },
        );
        if !is_head {
            response.push_str(&body);
        }
        if writer.write_all(response.as_bytes()).is_err() || writer.flush().is_err() {
            return;
        }
        if !keep_alive {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Streaming upstream (Ollama-style NDJSON or SSE)
// ---------------------------------------------------------------------------

/// Wire format of a [`StreamServer`] response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFormat {
    /// `application/x-ndjson`: one JSON object per line (Ollama).
    Ndjson,
    /// `text/event-stream`: one `data: {json}` event per chunk (OpenAI).
    Sse,
}

impl StreamFormat {
    /// The `Content-Type` the server sends for this format.
    pub fn content_type(self) -> &'static str {
        match self {
            StreamFormat::Ndjson => "application/x-ndjson",
            StreamFormat::Sse => "text/event-stream",
        }
    }

    /// The exact bytes of chunk `i` (0-based) out of `total`, so tests can
    /// compare what the client received with what the upstream sent.
    pub fn chunk(self, i: usize, total: usize) -> String {
        let done = i + 1 == total;
        let json = format!(r#"{{"model":"test","response":"tok{i}","done":{done}}}"#);
        match self {
            StreamFormat::Ndjson => format!("{json}\n"),
            StreamFormat::Sse => format!("data: {json}\n\n"),
        }
    }
}

/// Timing of one streamed response, as seen by the upstream.
#[derive(Debug, Clone, Copy)]
pub struct StreamRecord {
    /// When the request (head + body) had been fully read.
    pub started: Instant,
    /// When the first data chunk had been written and flushed.
    pub first_chunk_at: Option<Instant>,
    /// When the last data chunk had been written and flushed; `None` if the
    /// stream was aborted before that.
    pub last_chunk_at: Option<Instant>,
    /// Whether the terminating zero-length chunk was written.
    pub completed: bool,
}

#[derive(Default)]
struct StreamState {
    hits: AtomicUsize,
    aborted: AtomicUsize,
    records: Mutex<Vec<StreamRecord>>,
}

/// Upstream that streams a chunked response slowly, one HTTP chunk per
/// line/event with `delay` between them, so tests can prove the gateway
/// forwards streamed bodies incrementally instead of buffering them, and
/// that client disconnects propagate upstream.
pub struct StreamServer {
    /// The address the server listens on.
    pub addr: SocketAddr,
    /// Body format served.
    pub format: StreamFormat,
    /// Number of data chunks per response.
    pub chunks: usize,
    state: Arc<StreamState>,
    server: CustomServer,
}

impl StreamServer {
    /// Ollama-like NDJSON streamer: `chunks` lines, `delay` between them.
    pub fn start(chunks: usize, delay: Duration) -> StreamServer {
        Self::start_with(StreamFormat::Ndjson, chunks, delay)
    }

    /// SSE streamer: `chunks` `data:` events, `delay` between them.
    pub fn start_sse(chunks: usize, delay: Duration) -> StreamServer {
        Self::start_with(StreamFormat::Sse, chunks, delay)
    }

    /// Streamer with an explicit body format.
    pub fn start_with(format: StreamFormat, chunks: usize, delay: Duration) -> StreamServer {
        let state = Arc::new(StreamState::default());
        let server = {
            let state = Arc::clone(&state);
            CustomServer::start(move |stream| {
                stream_connection(stream, &state, format, chunks, delay);
            })
        };
        StreamServer {
            addr: server.addr,
            format,
            chunks,
            state,
            server,
        }
    }

    /// Number of request heads received.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Number of responses abandoned because writing to the peer failed
    /// (i.e. the gateway closed the upstream connection mid-stream).
    pub fn aborted(&self) -> usize {
        self.state.aborted.load(Ordering::SeqCst)
    }

    /// Timing records for every response started, in order.
    pub fn records(&self) -> Vec<StreamRecord> {
        lock(&self.state.records).clone()
    }

    /// When the first chunk of the most recent response was written.
    pub fn first_chunk_written_at(&self) -> Option<Instant> {
        lock(&self.state.records)
            .last()
            .and_then(|r| r.first_chunk_at)
    }

    /// When the last data chunk of the most recent response was written
    /// (`None` while it is still streaming or if it was aborted).
    pub fn last_chunk_written_at(&self) -> Option<Instant> {
        lock(&self.state.records)
            .last()
            .and_then(|r| r.last_chunk_at)
    }

    /// The full body one response carries, for equality checks.
    pub fn expected_body(&self) -> String {
        (0..self.chunks)
            .map(|i| self.format.chunk(i, self.chunks))
            .collect()
    }

    /// The lines one response carries, without their line endings, as
    /// `read_lines_timed` returns them.
    pub fn expected_lines(&self) -> Vec<String> {
        (0..self.chunks)
            .map(|i| self.format.chunk(i, self.chunks).trim_end().to_string())
            .collect()
    }

    /// Connections currently open to this upstream.
    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }
}

fn stream_connection(
    stream: TcpStream,
    state: &StreamState,
    format: StreamFormat,
    chunks: usize,
    delay: Duration,
) {
    let Some((mut reader, mut writer)) = split(stream) else {
        return;
    };
    while let Some(head) = next_request(&mut reader, &mut writer) {
        state.hits.fetch_add(1, Ordering::SeqCst);
        if head.expects_continue() && writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return;
        }
        if read_request_body(&mut reader, &head, &mut |_| {}).is_err() {
            return;
        }
        let keep_alive = head.keep_alive();
        let index = {
            let mut records = lock(&state.records);
            records.push(StreamRecord {
                started: Instant::now(),
                first_chunk_at: None,
                last_chunk_at: None,
                completed: false,
            });
            records.len() - 1
        };
        let abort = || {
            state.aborted.fetch_add(1, Ordering::SeqCst);
        };
        let response_head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache\r\n{}\r\n",
            format.content_type(),
            if keep_alive { "" } else { "Connection: close\r\n" },
        );
        if writer.write_all(response_head.as_bytes()).is_err() || writer.flush().is_err() {
            abort();
            return;
        }
        if head.method.eq_ignore_ascii_case("HEAD") {
            lock(&state.records)[index].completed = true;
            if keep_alive {
                continue;
            }
            return;
        }
        for i in 0..chunks {
            if i > 0 {
                thread::sleep(delay);
            }
            let data = format.chunk(i, chunks);
            let frame = format!("{:x}\r\n{data}\r\n", data.len());
            if writer.write_all(frame.as_bytes()).is_err() || writer.flush().is_err() {
                abort();
                return;
            }
            let now = Instant::now();
            let mut records = lock(&state.records);
            if i == 0 {
                records[index].first_chunk_at = Some(now);
            }
            if i + 1 == chunks {
                records[index].last_chunk_at = Some(now);
            }
        }
        if writer.write_all(b"0\r\n\r\n").is_err() || writer.flush().is_err() {
            abort();
            return;
        }
        lock(&state.records)[index].completed = true;
        if !keep_alive {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Silent upstream
// ---------------------------------------------------------------------------

/// Upstream that reads requests but never answers, keeping connections open
/// until it is dropped; used to provoke gateway read timeouts (504).
pub struct SilentServer {
    /// The address the server listens on.
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    server: CustomServer,
}

impl SilentServer {
    /// Starts a silent server on 127.0.0.1 with an OS-assigned port.
    pub fn start() -> SilentServer {
        let hits = Arc::new(AtomicUsize::new(0));
        let server = {
            let hits = Arc::clone(&hits);
            CustomServer::start(move |stream| {
                let mut reader = BufReader::with_capacity(IO_BUF, stream);
                if let Ok(Some(_)) = read_request_head(&mut reader) {
                    hits.fetch_add(1, Ordering::SeqCst);
                }
                // Swallow everything else until the peer (or Drop) closes.
                let _ = io::copy(&mut reader, &mut io::sink());
            })
        };
        SilentServer {
            addr: server.addr,
            hits,
            server,
        }
    }

    /// Number of request heads received.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Connections currently open to this upstream (a gateway that gave up
    /// with 504 should eventually close its side).
    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }
}

// ---------------------------------------------------------------------------
// Gateway runner
// ---------------------------------------------------------------------------

/// Path of the gateway binary under test (built by cargo for integration tests).
pub fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ai-gateway")
}

/// The standard config preamble for a gateway on `port`, followed by `body`
/// (which carries `routes:` etc.). `keys_file` is relative to the temp dir,
/// which is both the config's directory and the child's working directory.
pub fn default_config(port: u16, body: &str) -> String {
    format!("listen: \"127.0.0.1:{port}\"\nkeys_file: \"keys.json\"\nshutdown_grace: 5s\n{body}")
}

/// A temporary directory holding `gateway.yaml` and `keys.json`, before any
/// process is started; lets tests run the binary in other ways (e.g.
/// `check` subcommands or expected start-up failures).
pub struct GatewayFiles {
    /// The temporary directory (deleted on drop).
    pub dir: TempDir,
    /// `<dir>/gateway.yaml`.
    pub config_path: PathBuf,
    /// `<dir>/keys.json`.
    pub keys_path: PathBuf,
    /// `<dir>/gateway.log`, where the gateway's stderr goes.
    pub log_path: PathBuf,
}

impl GatewayFiles {
    /// Creates a temp dir and writes the complete config and the keys file.
    pub fn write(config_full_yaml: &str, keys_json: &str) -> GatewayFiles {
        let dir = tempfile::Builder::new()
            .prefix("ai-gateway-test-")
            .tempdir()
            .expect("create temp dir for gateway files");
        let config_path = dir.path().join("gateway.yaml");
        let keys_path = dir.path().join("keys.json");
        let log_path = dir.path().join("gateway.log");
        fs::write(&config_path, config_full_yaml).expect("write gateway.yaml");
        fs::write(&keys_path, keys_json).expect("write keys.json");
        GatewayFiles {
            dir,
            config_path,
            keys_path,
            log_path,
        }
    }
}

/// A running `ai-gateway` process with its temp dir; killed on drop.
pub struct Gateway {
    /// Port of the (first) listen address, used by [`Gateway::url`].
    pub port: u16,
    /// Temp dir holding config, keys and log; deleted on drop.
    pub dir: TempDir,
    /// Absolute path of the config file passed with `--config`.
    pub config_path: PathBuf,
    /// Absolute path of the keys file.
    pub keys_path: PathBuf,
    /// File receiving the gateway's stderr (its log).
    pub log_path: PathBuf,
    child: Child,
}

impl Gateway {
    /// Starts a gateway on a free port with the standard preamble (see
    /// [`default_config`]) followed by `config_yaml_body`, and waits until it
    /// answers HTTP. Retries on a fresh port if the chosen one was taken in
    /// the meantime. Panics (with the gateway log) if it does not come up.
    pub fn start(config_yaml_body: &str, keys_json: &str) -> Gateway {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port();
            let files = GatewayFiles::write(&default_config(port, config_yaml_body), keys_json);
            let mut gw = Gateway::spawn(files, port);
            match gw.wait_ready(READY_TIMEOUT) {
                Ok(()) => return gw,
                Err(msg) => {
                    let in_use = gw.log().to_ascii_lowercase().contains("in use");
                    if !(in_use && attempt < 3) {
                        panic!("{msg}");
                    }
                }
            }
        }
    }

    /// Starts a gateway with a complete, test-written config that listens
    /// on (at least) `127.0.0.1:<port>`, and waits until it answers HTTP.
    pub fn start_raw(config_full_yaml: &str, keys_json: &str, port: u16) -> Gateway {
        let mut gw = Gateway::spawn(GatewayFiles::write(config_full_yaml, keys_json), port);
        if let Err(msg) = gw.wait_ready(READY_TIMEOUT) {
            panic!("{msg}");
        }
        gw
    }

    /// Spawns `ai-gateway run --config <config_path>` for prepared files
    /// without waiting for readiness (for tests that expect start-up to
    /// fail, or that want to time it). `port` is only used for probing/URLs.
    pub fn spawn(files: GatewayFiles, port: u16) -> Gateway {
        let log = fs::File::create(&files.log_path).expect("create gateway.log");
        let child = Command::new(gateway_bin())
            .arg("run")
            .arg("--config")
            .arg(&files.config_path)
            .current_dir(files.dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn the ai-gateway binary");
        Gateway {
            port,
            dir: files.dir,
            config_path: files.config_path,
            keys_path: files.keys_path,
            log_path: files.log_path,
            child,
        }
    }

    /// Polls until `GET /__probe__` on the port gets any HTTP response.
    ///
    /// Returns an error message containing the log if the process exits
    /// first or the timeout passes.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on gateway child") {
                return Err(format!(
                    "gateway exited before becoming ready ({status}); log:\n{}",
                    self.log()
                ));
            }
            if probe_http(self.port) {
                // A foreign server could own the port if we lost a race; a
                // gateway failing to bind would exit, so check once more.
                thread::sleep(Duration::from_millis(20));
                if let Some(status) = self.child.try_wait().expect("try_wait on gateway child") {
                    return Err(format!(
                        "gateway exited right after the port answered ({status}); log:\n{}",
                        self.log()
                    ));
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "gateway not answering on 127.0.0.1:{} after {timeout:?}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Socket address of the gateway's (first) listener.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Process id of the gateway.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name, e.g. `"HUP"`, `"TERM"`, `"INT"` (via `kill`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run the kill command");
        assert!(
            status.success(),
            "kill -{sig} {} failed: {status}",
            self.pid()
        );
    }

    /// The gateway's stderr output so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Atomically replaces the keys file (temp file in the same dir, then
    /// rename), so the gateway never observes a half-written file.
    pub fn write_keys(&self, json: &str) {
        atomic_write(&self.keys_path, json);
    }

    /// Atomically replaces the config file (see [`Gateway::write_keys`]).
    pub fn write_config(&self, yaml: &str) {
        atomic_write(&self.config_path, yaml);
    }

    /// Polls for process exit for up to `timeout`; `None` if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on gateway child") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("try_wait on gateway child")
            .is_none()
    }

    /// Polls the log until it contains `needle`; false after `timeout`.
    pub fn wait_log_contains(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_log_count(needle, 1, timeout)
    }

    /// Polls the log until `needle` occurs at least `count` times (e.g. to
    /// wait for a second reload message); false after `timeout`.
    pub fn wait_log_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().matches(needle).count() >= count)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- ai-gateway log ({}) ----\n{}\n---- end of log ----",
                self.log_path.display(),
                self.log()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn atomic_write(path: &Path, contents: &str) {
    let dir = path.parent().expect("file path has a parent dir");
    let name = path
        .file_name()
        .expect("file path has a file name")
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, contents).expect("write temp file");
    fs::rename(&tmp, path).expect("rename temp file over target");
}

/// One-shot readiness probe: any HTTP/1.x status line counts as ready.
fn probe_http(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let request = "GET /__probe__ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut got = 0;
    while got < 9 {
        match stream.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    buf[..got].starts_with(b"HTTP/1.")
}

/// Output of a one-shot run of the binary (see [`run_cli`]).
#[derive(Debug)]
pub struct CliOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

/// Runs `ai-gateway <args>` in `cwd` to completion (killed after 30 s so a
/// hang fails the test instead of stalling the suite). Output goes through
/// files, so large output cannot deadlock on a full pipe.
pub fn run_cli(args: &[&str], cwd: &Path) -> CliOutput {
    let out_dir = tempfile::tempdir().expect("temp dir for CLI output");
    let out_path = out_dir.path().join("stdout");
    let err_path = out_dir.path().join("stderr");
    let mut child = Command::new(gateway_bin())
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("create stdout file"))
        .stderr(fs::File::create(&err_path).expect("create stderr file"))
        .spawn()
        .expect("spawn the ai-gateway binary");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait on CLI child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ai-gateway {args:?} did not exit within 30 s");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    CliOutput {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

// ---------------------------------------------------------------------------
// A raw HTTP/1.1 response reader, for tests that talk to the gateway over a
// bare TcpStream (malformed requests, exact bytes).
// ---------------------------------------------------------------------------

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

fn bad_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
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
        return Err(bad_data(format!("bad status line {line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad_data(format!("bad status line {line:?}")))?;
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
            .ok_or_else(|| bad_data(format!("bad header {h:?}")))?;
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
                .map_err(|_| bad_data(format!("bad chunk size {size_line:?}")))?;
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
            .map_err(|_| bad_data(format!("bad content-length {len:?}")))?;
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
