//! Upstreams of the fleet tests (several model servers behind one route):
//! each records the requests it saw, in order of arrival, and how many it
//! served at once (its own count, not the gateway's), and answers in one
//! of a few ways ([`Answer`]).

use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::raw_http::{read_request_body, read_request_head, RequestHead};
use super::upstreams::CustomServer;
use super::util::{hex, lock, IO_BUF};

/// How often a [`Answer::Held`] stream sends a line while it waits.
pub const HELD_TICK: Duration = Duration::from_millis(50);

/// The longest a held stream waits for its release, so that a test that
/// forgot one ends instead of hanging.
const HELD_MAX: Duration = Duration::from_secs(30);

/// How a [`FleetServer`] answers.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// `200` NDJSON, chunked: `chunks` lines, `delay` apart.
    Stream { chunks: usize, delay: Duration },
    /// `200` NDJSON, chunked: a line every [`HELD_TICK`] until the test
    /// lets one request go ([`FleetServer::release`]), then `{"done":true}`.
    Held,
    /// `503` to the first, third, ... request, `200` with the body's digest
    /// to the others.
    Alternate,
    /// This status to every request, with the body's digest.
    Status(u16),
    /// A `200` head promising 1000 bytes, 100 of them, then the connection
    /// closed.
    BreakOff,
}

/// One request as the upstream received it (recorded once its body is in,
/// before the answer).
#[derive(Debug, Clone)]
pub struct Seen {
    /// The request target, as the gateway sent it.
    pub path: String,
    /// The `Content-Length` header, if any.
    pub content_length: Option<String>,
    pub body_len: u64,
    pub body_sha256: String,
    /// The status answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    heads: AtomicUsize,
    current: AtomicUsize,
    max_seen: AtomicUsize,
    /// Answers written to their end.
    served: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    /// Releases of held requests not yet taken.
    releases: Mutex<usize>,
    released: Condvar,
}

/// Counts a request as in progress while it lives.
struct InProgress<'a>(&'a State);

impl<'a> InProgress<'a> {
    fn enter(state: &'a State) -> InProgress<'a> {
        let now = state.current.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_seen.fetch_max(now, Ordering::SeqCst);
        InProgress(state)
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::SeqCst);
    }
}

/// See the module documentation.
pub struct FleetServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    _server: CustomServer,
}

impl FleetServer {
    pub fn start(answer: Answer) -> FleetServer {
        let state = Arc::new(State::default());
        let server = {
            let state = Arc::clone(&state);
            CustomServer::start(move |stream| serve(stream, &state, answer))
        };
        FleetServer {
            addr: server.addr,
            state,
            _server: server,
        }
    }

    /// Request heads received.
    pub fn heads(&self) -> usize {
        self.state.heads.load(Ordering::SeqCst)
    }

    /// Requests in progress now.
    pub fn current(&self) -> usize {
        self.state.current.load(Ordering::SeqCst)
    }

    /// The most requests it had in progress at once.
    pub fn max_seen(&self) -> usize {
        self.state.max_seen.load(Ordering::SeqCst)
    }

    /// Answers written to their end.
    pub fn served(&self) -> usize {
        self.state.served.load(Ordering::SeqCst)
    }

    /// Every request whose body arrived, in order.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    /// The paths of [`FleetServer::seen`], in order.
    pub fn paths(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.path).collect()
    }

    /// Lets `n` held requests (waiting now or arriving later) finish.
    pub fn release(&self, n: usize) {
        *lock(&self.state.releases) += n;
        self.state.released.notify_all();
    }
}

/// Waits up to `tick` for a release and takes it.
fn take_release(state: &State, tick: Duration) -> bool {
    let guard = lock(&state.releases);
    let (mut left, _) = state
        .released
        .wait_timeout_while(guard, tick, |n| *n == 0)
        .unwrap_or_else(|p| p.into_inner());
    if *left == 0 {
        return false;
    }
    *left -= 1;
    true
}

fn serve(stream: TcpStream, state: &State, answer: Answer) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(IO_BUF, stream);
    while let Ok(Some(head)) = read_request_head(&mut reader) {
        state.heads.fetch_add(1, Ordering::SeqCst);
        let _busy = InProgress::enter(state);
        let mut hasher = Sha256::new();
        let Ok(body_len) = read_request_body(&mut reader, &head, &mut |b| hasher.update(b)) else {
            return;
        };
        let body_sha256 = hex(&hasher.finalize());
        let status = {
            let mut seen = lock(&state.seen);
            let status = match answer {
                Answer::Alternate if seen.len().is_multiple_of(2) => 503,
                Answer::Status(s) => s,
                _ => 200,
            };
            seen.push(Seen {
                path: head.target.clone(),
                content_length: head.header("content-length").map(str::to_string),
                body_len,
                body_sha256: body_sha256.clone(),
                status,
            });
            status
        };
        let done = match answer {
            Answer::Stream { chunks, delay } => stream_lines(&mut writer, chunks, delay),
            Answer::Held => held(&mut writer, state),
            Answer::Alternate | Answer::Status(_) => json(&mut writer, status, &head, &body_sha256),
            Answer::BreakOff => {
                let _ = writer.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n",
                );
                let _ = writer.write_all(&[b'x'; 100]);
                let _ = writer.flush();
                return;
            }
        };
        if done.is_err() {
            return;
        }
        state.served.fetch_add(1, Ordering::SeqCst);
        if !head.keep_alive() {
            return;
        }
    }
}

fn json(w: &mut TcpStream, status: u16, head: &RequestHead, sha: &str) -> io::Result<()> {
    let body = serde_json::json!({"path": head.target, "body_sha256": sha}).to_string();
    write!(
        w,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

fn chunk(w: &mut TcpStream, line: &str) -> io::Result<()> {
    write!(w, "{:x}\r\n{line}\r\n", line.len())?;
    w.flush()
}

const STREAM_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n";

/// The body of an [`Answer::Stream`] of `chunks` lines.
pub fn stream_body(chunks: usize) -> String {
    (0..chunks)
        .map(|i| format!("{{\"line\":{i},\"done\":{}}}\n", i + 1 == chunks))
        .collect()
}

fn stream_lines(w: &mut TcpStream, chunks: usize, delay: Duration) -> io::Result<()> {
    w.write_all(STREAM_HEAD)?;
    for (i, line) in stream_body(chunks).split_inclusive('\n').enumerate() {
        if i > 0 {
            thread::sleep(delay);
        }
        chunk(w, line)?;
    }
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
}

/// The last line of an [`Answer::Held`] stream.
pub const HELD_DONE: &str = "{\"done\":true}";

fn held(w: &mut TcpStream, state: &State) -> io::Result<()> {
    w.write_all(STREAM_HEAD)?;
    let start = Instant::now();
    let mut tick = 0u64;
    loop {
        chunk(w, &format!("{{\"tick\":{tick}}}\n"))?;
        tick += 1;
        if take_release(state, HELD_TICK) {
            break;
        }
        if start.elapsed() > HELD_MAX {
            return Err(io::ErrorKind::TimedOut.into());
        }
    }
    chunk(w, &format!("{HELD_DONE}\n"))?;
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
}
