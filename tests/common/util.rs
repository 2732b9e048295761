//! Small utilities shared by the tests: polling, ports, hashing, a ureq
//! agent, and a deterministic large-body source.

use std::io::{self, BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Size of the read buffer used when streaming request bodies.
pub(super) const IO_BUF: usize = 64 * 1024;

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

/// Polls `f` every 20 ms until it returns `Some`, or panics with `what`.
pub fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago, and that
/// this test process has not handed out before (the kernel may give the
/// same ephemeral port to two binds in a row once the first is closed, and
/// a config with two listeners then names one port twice).
///
/// The listener is dropped before returning, so there is a small window in
/// which another process could take the port; [`Gateway::start`] retries on
/// "address in use" to cover that race.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener =
            TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
        let port = listener
            .local_addr()
            .expect("local_addr of a freshly bound listener")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// `127.0.0.1:<port>`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
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
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
