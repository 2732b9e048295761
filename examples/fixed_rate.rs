//! A fixed-rate HTTP/1.1 load client for `benches/load.sh`: sends requests
//! at a steady rate, well below what the server can take, and measures each
//! one's latency, so the latency a user feels can be compared between
//! targets (wrk measures at saturation, where queueing dominates; wrk2 is
//! not packaged).
//!
//! ```text
//! fixed_rate --url http://127.0.0.1:8080/ollama/api/generate --rate 5000 \
//!     --secs 10 --conns 32 [--warmup 1] [--method POST] [--body TEXT] [-H 'Name: value']...
//! ```
//!
//! `conns` keep-alive connections, one thread each. Request `k` is due at
//! `start + k / rate` and goes on connection `k mod conns`, so requests
//! leave evenly spaced whatever the connection count. A request's latency
//! runs from the moment it is written to the moment its whole response is
//! read. One that could not leave within 1 ms of its due time (its
//! connection still busy) is counted as late: many late requests mean the
//! rate is too close to saturation for the figures to mean what they say.
//! Samples of the first `warmup` seconds are dropped.
//!
//! Prints one line: `sent N measured N errors N late N rate R p50 X p90 X p99 X
//! p999 X max X` (latencies in ms).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Args {
    host: String,
    path: String,
    rate: f64,
    secs: f64,
    warmup: f64,
    conns: usize,
    method: String,
    body: String,
    headers: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        host: String::new(),
        path: String::new(),
        rate: 5000.0,
        secs: 10.0,
        warmup: 1.0,
        conns: 32,
        method: "GET".into(),
        body: String::new(),
        headers: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => {
                let url = value()?;
                let rest = url
                    .strip_prefix("http://")
                    .ok_or("only http:// URLs are supported")?;
                let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                a.host = host.to_string();
                a.path = if path.is_empty() {
                    "/".into()
                } else {
                    path.into()
                };
            }
            "--rate" => a.rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--secs" => a.secs = value()?.parse().map_err(|e| format!("--secs: {e}"))?,
            "--warmup" => a.warmup = value()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--conns" => a.conns = value()?.parse().map_err(|e| format!("--conns: {e}"))?,
            "--method" => a.method = value()?,
            "--body" => a.body = value()?,
            "-H" | "--header" => a.headers.push(value()?),
            "-h" | "--help" => {
                return Err(
                    "usage: fixed_rate --url URL [--rate N] [--secs S] [--warmup S] \
                            [--conns N] [--method M] [--body TEXT] [-H 'Name: value']..."
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.host.is_empty() {
        return Err("--url is required".into());
    }
    if a.rate <= 0.0 || a.secs <= 0.0 || a.conns == 0 || a.warmup < 0.0 || a.warmup >= a.secs {
        return Err("--rate, --secs and --conns must be positive, --warmup below --secs".into());
    }
    Ok(a)
}

/// What one connection's thread measured.
#[derive(Default)]
struct Tally {
    /// Latencies in nanoseconds, after the warm-up.
    samples: Vec<u64>,
    sent: u64,
    errors: u64,
    late: u64,
}

/// Reads one response (Content-Length or chunked framing); returns whether
/// its status was 2xx.
fn read_response(r: &mut BufReader<TcpStream>, line: &mut String) -> std::io::Result<bool> {
    let eof = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed");
    line.clear();
    if r.read_line(line)? == 0 {
        return Err(eof());
    }
    let ok = line.split(' ').nth(1).is_some_and(|s| s.starts_with('2'));
    let mut length = 0usize;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(line)? == 0 {
            return Err(eof());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
    }
    if !chunked {
        std::io::copy(&mut r.by_ref().take(length as u64), &mut std::io::sink())?;
        return Ok(ok);
    }
    loop {
        line.clear();
        if r.read_line(line)? == 0 {
            return Err(eof());
        }
        let size = usize::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "chunk size"))?;
        // The chunk and its CRLF; the last chunk's (empty) trailers too.
        std::io::copy(&mut r.by_ref().take(size as u64 + 2), &mut std::io::sink())?;
        if size == 0 {
            return Ok(ok);
        }
    }
}

fn connection(a: &Args, request: &[u8], index: usize, start: Instant) -> Tally {
    let mut t = Tally::default();
    let total = (a.rate * a.secs) as u64;
    let warm = Duration::from_secs_f64(a.warmup);
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut line = String::new();
    let mut k = index as u64;
    while k < total {
        let due = start + Duration::from_secs_f64(k as f64 / a.rate);
        k += a.conns as u64;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else if now - due > Duration::from_millis(1) {
            t.late += 1;
        }
        if conn.is_none() {
            match TcpStream::connect(&a.host).and_then(|s| {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let r = BufReader::with_capacity(16 * 1024, s.try_clone()?);
                Ok((s, r))
            }) {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    t.sent += 1;
                    t.errors += 1;
                    continue;
                }
            }
        }
        let (w, r) = conn.as_mut().expect("connected above");
        let sent_at = Instant::now();
        t.sent += 1;
        let answered = w
            .write_all(request)
            .and_then(|()| read_response(r, &mut line));
        let done = Instant::now();
        match answered {
            Ok(true) => {
                if due >= start + warm {
                    t.samples.push((done - sent_at).as_nanos() as u64);
                }
            }
            Ok(false) => t.errors += 1,
            Err(_) => {
                t.errors += 1;
                conn = None;
            }
        }
    }
    t
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fixed_rate: {e}");
            std::process::exit(2);
        }
    };
    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
        a.method,
        a.path,
        a.host,
        a.body.len()
    );
    for h in &a.headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.push_str(&a.body);
    let start = Instant::now() + Duration::from_millis(50);
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..a.conns)
            .map(|i| {
                let (a, request) = (&a, request.as_bytes());
                s.spawn(move || connection(a, request, i, start))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut all: Vec<u64> = tallies
        .iter()
        .flat_map(|t| t.samples.iter().copied())
        .collect();
    all.sort_unstable();
    let sent: u64 = tallies.iter().map(|t| t.sent).sum();
    let errors: u64 = tallies.iter().map(|t| t.errors).sum();
    let late: u64 = tallies.iter().map(|t| t.late).sum();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i] as f64 / 1e6
    };
    println!(
        "sent {sent} measured {} errors {errors} late {late} rate {:.0} p50 {:.3} p90 {:.3} p99 {:.3} p999 {:.3} max {:.3}",
        all.len(),
        sent as f64 / elapsed,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
}
