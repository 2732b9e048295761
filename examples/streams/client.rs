//! The clients: `n` concurrent streams, opened evenly over a ramp, each on
//! its own connection (`Connection: close`: one stream per connection, as
//! a chat client that keeps nothing open between answers). Every line's
//! delay is its arrival time minus the upstream's stamp (`"t":N`); a stream
//! that ends before its last line (or answers anything but 200) is broken.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Delays up to this many microseconds are kept exactly; longer ones in
/// the last bucket (their maximum apart).
const EXACT_US: usize = 1_000_000;

/// What one target's run of streams saw.
pub struct Outcome {
    /// Delay histogram, one bucket per microsecond.
    delays: Vec<u32>,
    pub chunks: u64,
    pub max_us: u64,
    pub completed: u32,
    pub broken: u32,
}

impl Outcome {
    fn new() -> Self {
        Outcome {
            delays: vec![0; EXACT_US + 1],
            chunks: 0,
            max_us: 0,
            completed: 0,
            broken: 0,
        }
    }

    /// A run that never happened: every stream counted broken.
    pub fn failed(n: u32) -> Self {
        let mut o = Outcome::new();
        o.broken = n;
        o
    }

    fn record(&mut self, us: u64) {
        let slot = usize::try_from(us).unwrap_or(EXACT_US).min(EXACT_US);
        if let Some(count) = self.delays.get_mut(slot) {
            *count += 1;
        }
        self.chunks += 1;
        self.max_us = self.max_us.max(us);
    }

    /// The delay below which `q` of the lines arrived, in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let want = (self.chunks as f64 * q).ceil() as u64;
        let mut seen = 0u64;
        for (us, count) in self.delays.iter().enumerate() {
            seen += u64::from(*count);
            if seen >= want.max(1) {
                return us as u64;
            }
        }
        self.max_us
    }
}

/// One run: what to ask, of whom, how many at once.
pub struct Load {
    pub addr: SocketAddr,
    /// The request bytes (head and body), the same for every stream.
    pub request: Rc<Vec<u8>>,
    pub n: u32,
    pub ramp: Duration,
    /// Lines each stream must carry, the last one included.
    pub lines: u32,
}

/// Streams open right now (read by the sampler while the run goes on).
pub type Open = Arc<AtomicU32>;

/// Runs the load to its end on the calling `LocalSet`.
pub async fn run(load: Load, open: Open) -> Outcome {
    let outcome = Rc::new(RefCell::new(Outcome::new()));
    let mut tasks = Vec::with_capacity(load.n as usize);
    let start = tokio::time::Instant::now();
    for i in 0..load.n {
        let due = start + load.ramp.mul_f64(f64::from(i) / f64::from(load.n.max(1)));
        let (request, outcome, open) = (load.request.clone(), outcome.clone(), open.clone());
        let (addr, lines) = (load.addr, load.lines);
        tasks.push(tokio::task::spawn_local(async move {
            tokio::time::sleep_until(due).await;
            open.fetch_add(1, Ordering::Relaxed);
            let whole = stream(addr, &request, lines, &outcome)
                .await
                .unwrap_or(false);
            open.fetch_sub(1, Ordering::Relaxed);
            let mut o = outcome.borrow_mut();
            if whole {
                o.completed += 1;
            } else {
                o.broken += 1;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    Rc::try_unwrap(outcome)
        .map(RefCell::into_inner)
        .unwrap_or_else(|_| Outcome::new())
}

/// One stream; `Ok(true)` when it answered 200 and carried every line.
async fn stream(
    addr: SocketAddr,
    request: &[u8],
    lines: u32,
    outcome: &RefCell<Outcome>,
) -> std::io::Result<bool> {
    let mut socket = TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    socket.write_all(request).await?;
    let mut buf = vec![0u8; 4096];
    let mut pending: Vec<u8> = Vec::with_capacity(512);
    let (mut status_ok, mut first, mut seen, mut done) = (false, true, 0u32, false);
    loop {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            return Ok(status_ok && done && seen == lines);
        }
        let now = crate::now_us();
        for piece in buf
            .get(..n)
            .unwrap_or_default()
            .split_inclusive(|b| *b == b'\n')
        {
            pending.extend_from_slice(piece);
            if !pending.ends_with(b"\n") {
                continue;
            }
            if first {
                status_ok = pending.starts_with(b"HTTP/1.1 200");
                first = false;
            }
            if let Some(t) = stamp(&pending) {
                outcome.borrow_mut().record(now.saturating_sub(t));
                seen += 1;
            }
            done |= memchr::memmem::find(&pending, b"\"done\":true").is_some()
                || memchr::memmem::find(&pending, b"[DONE]").is_some();
            pending.clear();
        }
    }
}

/// The upstream's stamp in a line: the digits after `"t":`.
fn stamp(line: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(line, b"\"t\":")? + 4;
    let digits = line.get(at..)?.iter().take_while(|b| b.is_ascii_digit());
    let mut value = 0u64;
    let mut any = false;
    for d in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(value)
}
