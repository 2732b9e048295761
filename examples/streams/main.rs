//! Streams at scale: thousands of concurrent model-server streams through
//! ai-gateway and through nginx, to the same paced upstream, in the same
//! run, and what each open stream costs each server.
//!
//! ```text
//! cargo build --release --bin ai-gateway --example streams
//! target/release/examples/streams [--gateway target/release/ai-gateway] [--nginx /usr/sbin/nginx]
//!     [--n 1000,5000,max] [--formats ndjson,sse] [--lines 200] [--interval-ms 50]
//!     [--ramp-secs 3] [--rounds 1] [--targets direct,nginx,gateway]
//! ```
//!
//! For each format, N and round, each target is started fresh (its idle
//! memory after a few warm-up streams is the baseline), then N streams are
//! opened evenly over the ramp, each `lines` lines `interval` apart (one
//! line per chunk, stamped by the upstream) plus a last line with usage.
//! Per target: CPU per chunk (user + system time of the server's processes
//! over the run, divided by the lines delivered), memory per open stream
//! (the largest RSS while streams were open, minus the baseline, divided
//! by N), each line's delay (arrival minus the upstream's stamp; "added"
//! is the target's quantile minus the upstream-direct one of the same
//! round), streams broken. The upstream and the clients run in this
//! process, one thread each. `max` is the most streams the open-file
//! limit lets every process hold (each proxy holds 2 per stream, as does
//! this process; 2,000 kept spare), in steps of 500. Prints one markdown table per format. `STREAMS_KEEP=1`
//! keeps the servers' folders (configs, logs) and names the folder.

mod client;
mod peers;
mod procfs;
mod report;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use client::{Load, Outcome};
use peers::Peer;

/// Microseconds since this process's first call: the clock the upstream
/// stamps lines with and the clients read them by (one process, so one
/// clock).
pub fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ndjson,
    Sse,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Direct,
    Nginx,
    Gateway,
}

struct Args {
    gateway: PathBuf,
    nginx: PathBuf,
    ns: Vec<String>,
    formats: Vec<Format>,
    targets: Vec<Target>,
    lines: u32,
    interval: Duration,
    ramp: Duration,
    rounds: usize,
}

/// One target's figures in one run.
pub struct Measured {
    pub target: Target,
    pub n: u32,
    pub outcome: Outcome,
    /// Server CPU per delivered line, µs (None for the upstream alone).
    pub cpu_us_per_chunk: Option<f64>,
    pub rss_idle_kib: u64,
    pub rss_open_kib: u64,
    /// Streams open when the largest RSS was read.
    pub open_at_peak: u32,
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("streams: {e}");
            std::process::exit(2);
        }
    };
    let fd_limit = raise_fd_limit();
    let upstream = start_upstream(args.interval);
    let max_n = ((fd_limit.saturating_sub(2000)) / 2 / 500 * 500) as u32;
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut tables = Vec::new();
    for format in &args.formats {
        let mut rows = Vec::new();
        for n_text in &args.ns {
            let n = if n_text == "max" {
                max_n
            } else {
                n_text.parse().unwrap_or(1000).min(max_n)
            };
            for round in 0..args.rounds {
                let mut order = args.targets.clone();
                let turn = round % order.len().max(1);
                order.rotate_left(turn);
                for target in order {
                    eprintln!(
                        "[streams] {} n={n} round {} {}",
                        report::format_name(*format),
                        round + 1,
                        report::target_name(target)
                    );
                    match run_one(&args, &dir, upstream, target, *format, n) {
                        Ok(m) => rows.push(m),
                        Err(e) => eprintln!("[streams]   failed: {e}"),
                    }
                }
            }
        }
        tables.push((*format, rows));
    }
    if std::env::var_os("STREAMS_KEEP").is_some() {
        eprintln!("[streams] kept {}", dir.keep().display());
    }
    print!(
        "{}",
        report::render(&tables, args.lines, args.interval, fd_limit, max_n)
    );
}

fn run_one(
    args: &Args,
    dir: &tempfile::TempDir,
    upstream: SocketAddr,
    target: Target,
    format: Format,
    n: u32,
) -> Result<Measured, String> {
    let run_dir = dir
        .path()
        .join(format!("{}-{n}-{}", report::target_name(target), now_us()));
    std::fs::create_dir_all(&run_dir).map_err(|e| e.to_string())?;
    let peer = match target {
        Target::Direct => Peer::direct(upstream),
        Target::Nginx => peers::start_nginx(&args.nginx, &run_dir, upstream)?,
        Target::Gateway => peers::start_gateway(&args.gateway, &run_dir, upstream, n)?,
    };
    let warm = drive(&peer, target, format, 8, Duration::ZERO, 2, &[]);
    if warm.outcome.broken > 0 {
        return Err(format!(
            "{} broke {} of 8 warm-up streams",
            peer.name, warm.outcome.broken
        ));
    }
    let pids = peer.pid().map(procfs::tree).unwrap_or_default();
    let rss_idle = procfs::rss_kib(&pids);
    let ticks_before = procfs::ticks(&pids);
    let run = drive(&peer, target, format, n, args.ramp, args.lines, &pids);
    let ticks = procfs::ticks(&pids).saturating_sub(ticks_before);
    let outcome = run.outcome;
    let cpu = (!pids.is_empty() && outcome.chunks > 0)
        .then(|| ticks as f64 / procfs::TICKS_PER_SEC * 1e6 / outcome.chunks as f64);
    Ok(Measured {
        target,
        n,
        outcome,
        cpu_us_per_chunk: cpu,
        rss_idle_kib: rss_idle,
        rss_open_kib: run.peak_kib.max(rss_idle),
        open_at_peak: run.open_at_peak,
    })
}

/// A load's outcome and the largest RSS of `pids` seen while it ran.
struct Run {
    outcome: Outcome,
    peak_kib: u64,
    open_at_peak: u32,
}

/// Runs `n` streams of `lines` lines against the peer on a client thread
/// of its own, sampling the RSS of `pids` every 100 ms meanwhile.
fn drive(
    peer: &Peer,
    target: Target,
    format: Format,
    n: u32,
    ramp: Duration,
    lines: u32,
    pids: &[u32],
) -> Run {
    let open = Arc::new(AtomicU32::new(0));
    let request = request_bytes(target, format, lines);
    let load_open = open.clone();
    let addr = peer.addr;
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let load = Load {
            addr,
            request: Rc::new(request),
            n,
            ramp,
            lines: lines + 1,
        };
        rt.block_on(tokio::task::LocalSet::new().run_until(client::run(load, load_open)))
    });
    let (mut peak_kib, mut open_at_peak) = (0, 0);
    while !client.is_finished() {
        let rss = procfs::rss_kib(pids);
        if rss > peak_kib {
            (peak_kib, open_at_peak) = (rss, open.load(Ordering::Relaxed));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let outcome = client.join().unwrap_or_else(|_| Outcome::failed(n));
    Run {
        outcome,
        peak_kib,
        open_at_peak,
    }
}

/// The request every stream sends: the route's path (the upstream's own
/// path for the direct runs), the key, a JSON body asking for a stream.
fn request_bytes(target: Target, format: Format, lines: u32) -> Vec<u8> {
    let (path, body) = match format {
        Format::Ndjson => (
            if target == Target::Direct {
                "/api/generate"
            } else {
                "/ollama/api/generate"
            },
            r#"{"model":"bench","prompt":"Why is the sky blue?","stream":true}"#,
        ),
        Format::Sse => (
            "/v1/chat/completions",
            r#"{"model":"bench","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Why is the sky blue?"}]}"#,
        ),
    };
    format!(
        "POST {path}?lines={lines} HTTP/1.1\r\nHost: bench\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n{body}",
        key = peers::KEY,
        len = body.len()
    )
    .into_bytes()
}

/// The paced upstream, on a thread of its own for the whole process.
fn start_upstream(interval: Duration) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let addr = listener.local_addr().expect("its address");
    listener.set_nonblocking(true).expect("non-blocking");
    // std listens with a backlog of 128: thousands of connections opened
    // within seconds (by the clients directly, or by nginx, which opens
    // one per stream) would overflow it and fail. Listening again raises it
    // (Linux caps it at net.core.somaxconn).
    // SAFETY: listen(2) on a socket this function owns.
    let _ = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 16384) };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            upstream::serve(listener, Rc::new(upstream::Pace { interval })).await;
        });
    });
    addr
}

/// Raises the soft open-file limit to the hard one; returns it.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    limit.rlim_cur
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        gateway: PathBuf::from("target/release/ai-gateway"),
        nginx: PathBuf::from("/usr/sbin/nginx"),
        ns: vec!["1000".into(), "5000".into(), "max".into()],
        formats: vec![Format::Ndjson, Format::Sse],
        targets: vec![Target::Direct, Target::Nginx, Target::Gateway],
        lines: 200,
        interval: Duration::from_millis(50),
        ramp: Duration::from_secs(3),
        rounds: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            // The usage is this file's header.
            let header = include_str!("main.rs")
                .lines()
                .take_while(|l| l.starts_with("//!"));
            header
                .for_each(|l| println!("{}", l.trim_start_matches("//!").trim_start_matches(' ')));
            std::process::exit(0);
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let list = || value.split(',').map(str::to_string).collect::<Vec<_>>();
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--gateway" => a.gateway = value.clone().into(),
            "--nginx" => a.nginx = value.clone().into(),
            "--n" => a.ns = list(),
            "--lines" => a.lines = num(&value)? as u32,
            "--interval-ms" => a.interval = Duration::from_millis(num(&value)?),
            "--ramp-secs" => a.ramp = Duration::from_secs(num(&value)?),
            "--rounds" => a.rounds = num(&value)?.max(1) as usize,
            "--formats" => {
                a.formats = list()
                    .iter()
                    .map(|f| report::parse_format(f))
                    .collect::<Result<_, _>>()?
            }
            "--targets" => {
                a.targets = list()
                    .iter()
                    .map(|t| report::parse_target(t))
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}
