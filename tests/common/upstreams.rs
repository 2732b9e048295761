//! Test upstream servers: small, dependency-free HTTP/1.1 servers (echo,
//! streaming, silent, or a custom handler) on background threads, so tests
//! can observe exactly what the gateway forwarded and how.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::raw_http::{read_request_body, read_request_head, RequestHead};
use super::util::{hex, lock, IO_BUF};

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
// Recording upstream
// ---------------------------------------------------------------------------

/// Largest head (or chunked body) a [`RecordingServer`] waits for before it
/// stops looking for requests on a connection; bytes are still recorded.
const RECORDING_PARSE_LIMIT: usize = 1024 * 1024;

/// One request a [`RecordingServer`] found in the bytes of a connection.
#[derive(Debug, Clone)]
pub struct FoundRequest {
    /// Index of the connection it arrived on (accept order, from 0).
    pub conn: usize,
    /// The head, parsed leniently: names lower-cased, values trimmed.
    pub head: RequestHead,
    /// The exact bytes of the head, request line to blank line included.
    pub raw_head: Vec<u8>,
    /// The body as framed by the lenient rules (see [`RecordingServer`]);
    /// chunked bodies are decoded.
    pub body: Vec<u8>,
}

#[derive(Default)]
struct RecordingState {
    /// Raw bytes received, one entry per connection in accept order.
    conns: Mutex<Vec<Vec<u8>>>,
    /// Request heads found (counted before the body is complete).
    heads: AtomicUsize,
    /// Requests whose body was complete, in order.
    requests: Mutex<Vec<FoundRequest>>,
}

/// Upstream that records every byte it receives, per connection, and
/// answers each request it can find with `200`, `Content-Length: 2`, `ok`.
///
/// It parses leniently, the way a careless backend would, so that anything
/// the gateway lets through is visible:
///
/// * a head ends at the first empty line, whether lines end in CRLF or bare
///   LF; lines without a colon are ignored; names are lower-cased and
///   trimmed;
/// * a body is chunked if any `Transfer-Encoding` value mentions `chunked`;
///   otherwise its length is the first `Content-Length` value if that is
///   plain ASCII digits, else 0, so a request hidden in a body the gateway
///   framed differently surfaces as a request of its own.
///
/// Tests use [`RecordingServer::total_bytes`] and
/// [`RecordingServer::request_count`] to prove that nothing reached it, and
/// [`RecordingServer::requests`] to check exactly what was forwarded.
pub struct RecordingServer {
    /// The address the server listens on.
    pub addr: SocketAddr,
    state: Arc<RecordingState>,
    server: CustomServer,
}

impl RecordingServer {
    /// Starts a recording server on 127.0.0.1 with an OS-assigned port.
    pub fn start() -> RecordingServer {
        let state = Arc::new(RecordingState::default());
        let server = {
            let state = Arc::clone(&state);
            CustomServer::start(move |stream| recording_connection(stream, &state))
        };
        RecordingServer {
            addr: server.addr,
            state,
            server,
        }
    }

    /// Number of request heads found so far, including any whose body has
    /// not (yet) fully arrived.
    pub fn request_count(&self) -> usize {
        self.state.heads.load(Ordering::SeqCst)
    }

    /// Every request whose body arrived completely, in order.
    pub fn requests(&self) -> Vec<FoundRequest> {
        lock(&self.state.requests).clone()
    }

    /// The raw bytes received, one entry per connection in accept order
    /// (connections that sent nothing have an empty entry).
    pub fn connections(&self) -> Vec<Vec<u8>> {
        lock(&self.state.conns).clone()
    }

    /// Total number of bytes received on all connections.
    pub fn total_bytes(&self) -> usize {
        lock(&self.state.conns).iter().map(Vec::len).sum()
    }

    /// Whether `needle` occurs in the bytes of any one connection.
    pub fn received_contains(&self, needle: &[u8]) -> bool {
        lock(&self.state.conns)
            .iter()
            .any(|c| c.windows(needle.len()).any(|w| w == needle))
    }

    /// All bytes received, connection after connection, as lossy text (for
    /// failure messages).
    pub fn received_text(&self) -> String {
        let conns = lock(&self.state.conns);
        let all: Vec<u8> = conns.iter().flatten().copied().collect();
        String::from_utf8_lossy(&all).into_owned()
    }

    /// Connections currently open to this upstream.
    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }
}

fn recording_connection(mut stream: TcpStream, state: &RecordingState) {
    let _ = stream.set_nodelay(true);
    let conn = {
        let mut conns = lock(&state.conns);
        conns.push(Vec::new());
        conns.len() - 1
    };
    let mut pending: Vec<u8> = Vec::new();
    // The head found at the start of `pending`, waiting for its body.
    let mut current: Option<(RequestHead, usize)> = None;
    let mut buf = vec![0u8; IO_BUF];
    loop {
        // Answer every complete request in what has arrived so far.
        loop {
            if current.is_none() {
                let blank = pending
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                pending.drain(..blank);
                if let Some(head_len) = lenient_head_end(&pending) {
                    let head = lenient_parse_head(&pending[..head_len]);
                    state.heads.fetch_add(1, Ordering::SeqCst);
                    current = Some((head, head_len));
                }
            }
            let Some((head, head_len)) = current.as_ref() else {
                break;
            };
            let Some((body, body_len)) = lenient_body(head, &pending[*head_len..]) else {
                break;
            };
            let (head, head_len) = current.take().expect("checked above");
            let close = head
                .header_all("connection")
                .iter()
                .any(|v| v.to_ascii_lowercase().contains("close"));
            let is_head = head.method.eq_ignore_ascii_case("HEAD");
            lock(&state.requests).push(FoundRequest {
                conn,
                head,
                raw_head: pending[..head_len].to_vec(),
                body,
            });
            pending.drain(..head_len + body_len);
            let response: &[u8] = if is_head {
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
            };
            if stream.write_all(response).is_err() || stream.flush().is_err() || close {
                return;
            }
        }
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        lock(&state.conns)[conn].extend_from_slice(&buf[..n]);
        if pending.len() < RECORDING_PARSE_LIMIT {
            pending.extend_from_slice(&buf[..n]);
        }
    }
}

/// Length of the head at the start of `bytes` (through its empty line,
/// CRLF or bare LF), if it is complete.
fn lenient_head_end(bytes: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(off) = bytes[start..].iter().position(|&b| b == b'\n') {
        let line = &bytes[start..start + off];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        start += off + 1;
        if line.is_empty() {
            return Some(start);
        }
    }
    None
}

fn lenient_parse_head(head: &[u8]) -> RequestHead {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split_ascii_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let version = parts.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| {
            (
                name.trim().to_ascii_lowercase(),
                value.trim_matches([' ', '\t']).to_string(),
            )
        })
        .collect();
    RequestHead {
        method,
        target,
        version,
        headers,
    }
}

/// The body that follows `head` in `rest` and how many bytes of `rest` it
/// takes, if it has fully arrived.
fn lenient_body(head: &RequestHead, rest: &[u8]) -> Option<(Vec<u8>, usize)> {
    let chunked = head
        .header_all("transfer-encoding")
        .iter()
        .any(|v| v.to_ascii_lowercase().contains("chunked"));
    if !chunked {
        let len = head
            .header("content-length")
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        return (rest.len() >= len).then(|| (rest[..len].to_vec(), len));
    }
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let off = rest[pos..].iter().position(|&b| b == b'\n')?;
        let line = String::from_utf8_lossy(&rest[pos..pos + off]).into_owned();
        pos += off + 1;
        let digits: String = line
            .trim()
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        let size = usize::from_str_radix(&digits, 16).unwrap_or(0);
        if size == 0 {
            // Trailer lines up to an empty one.
            loop {
                let off = rest[pos..].iter().position(|&b| b == b'\n')?;
                let line = &rest[pos..pos + off];
                pos += off + 1;
                if line.strip_suffix(b"\r").unwrap_or(line).is_empty() {
                    return Some((body, pos));
                }
            }
        }
        let data = rest.get(pos..pos.checked_add(size)?)?;
        body.extend_from_slice(data);
        pos += size;
        // The line end after the data.
        let off = rest[pos..].iter().position(|&b| b == b'\n')?;
        pos += off + 1;
    }
}
