//! A small, fast stand-in for an Ollama server, for `benches/load.sh`.
//! Standard library only: one thread per connection, HTTP/1.1 keep-alive.
//!
//! ```text
//! bench_upstream [--listen 127.0.0.1:0] [--mode json|ndjson]
//!                [--chunks 10] [--first-ms 10] [--interval-ms 20]
//! ```
//!
//! - `json` answers every request like a non-streaming `/api/generate`: one
//!   JSON body of about 300 bytes with a `Content-Length`.
//! - `ndjson` streams like a streaming `/api/generate`: the response header at
//!   once, the first NDJSON line after `--first-ms`, then one line every
//!   `--interval-ms`, `--chunks` lines in all (the last one `"done":true`,
//!   with `prompt_eval_count` and `eval_count` as Ollama's), chunked.
//!
//! On start it prints `listening on <addr>` (the real port when given port
//! 0) on stdout. The request body is read and discarded.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

/// The body of a non-streaming Ollama `/api/generate` answer (about 300 bytes).
const GENERATE_BODY: &str = concat!(
    r#"{"model":"llama3.2:1b","created_at":"2026-11-25T12:00:00.000000000Z","#,
    r#""response":"The sky is blue because air molecules scatter short blue wavelengths of sunlight more than red ones.","#,
    r#""done":true,"done_reason":"stop","total_duration":512345678,"load_duration":12345678,"#,
    r#""prompt_eval_count":26,"prompt_eval_duration":23456789,"eval_count":21,"eval_duration":456789012}"#
);

#[derive(Clone, Copy)]
enum Mode {
    Json,
    Ndjson {
        chunks: u32,
        first: Duration,
        interval: Duration,
    },
}

fn main() {
    let mut listen = String::from("127.0.0.1:0");
    let mut mode = "json".to_string();
    let (mut chunks, mut first_ms, mut interval_ms) = (10u32, 10u64, 20u64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--listen" => listen = value(),
            "--mode" => mode = value(),
            "--chunks" => chunks = value().parse().unwrap_or_else(|_| usage("bad --chunks")),
            "--first-ms" => first_ms = value().parse().unwrap_or_else(|_| usage("bad --first-ms")),
            "--interval-ms" => {
                interval_ms = value()
                    .parse()
                    .unwrap_or_else(|_| usage("bad --interval-ms"))
            }
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    let mode = match mode.as_str() {
        "json" => Mode::Json,
        "ndjson" => Mode::Ndjson {
            chunks: chunks.max(1),
            first: Duration::from_millis(first_ms),
            interval: Duration::from_millis(interval_ms),
        },
        other => usage(&format!("unknown mode {other}")),
    };
    let listener = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("bench_upstream: cannot listen on {listen}: {e}");
        std::process::exit(1)
    });
    let addr = listener.local_addr().expect("local address");
    println!("listening on {addr}");
    let _ = io::stdout().flush();
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let _ = thread::Builder::new().stack_size(64 * 1024).spawn(move || {
                    let _ = serve(stream, mode);
                });
            }
            Err(e) => {
                eprintln!("bench_upstream: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn usage(why: &str) -> ! {
    eprintln!("bench_upstream: {why}");
    eprintln!(
        "usage: bench_upstream [--listen ADDR] [--mode json|ndjson] [--chunks N] [--first-ms MS] [--interval-ms MS]"
    );
    std::process::exit(2)
}

/// Serves requests on one connection until the client closes it.
fn serve(stream: TcpStream, mode: Mode) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(16 * 1024, stream);
    let json_head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
        GENERATE_BODY.len()
    );
    let json_response = [json_head.as_bytes(), GENERATE_BODY.as_bytes()].concat();
    let mut line = String::new();
    loop {
        // Request line; EOF here is the client closing a kept-alive connection.
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let http10 = line.trim_end().ends_with("HTTP/1.0");
        let mut content_length = 0usize;
        let mut chunked = false;
        let mut close = http10;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((name, value)) = h.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    close = true;
                } else if v.contains("keep-alive") {
                    close = false;
                }
            }
        }
        if chunked {
            discard_chunked(&mut reader)?;
        } else if content_length > 0 {
            io::copy(
                &mut (&mut reader).take(content_length as u64),
                &mut io::sink(),
            )?;
        }
        match mode {
            Mode::Json => out.write_all(&json_response)?,
            Mode::Ndjson {
                chunks,
                first,
                interval,
            } => stream_ndjson(&mut out, chunks, first, interval)?,
        }
        if close {
            return Ok(());
        }
    }
}

fn stream_ndjson(
    out: &mut TcpStream,
    chunks: u32,
    first: Duration,
    interval: Duration,
) -> io::Result<()> {
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    thread::sleep(first);
    for i in 0..chunks {
        if i > 0 {
            thread::sleep(interval);
        }
        let line = if i + 1 == chunks {
            format!(
                r#"{{"model":"llama3.2:1b","created_at":"2026-11-25T12:00:00Z","response":"","done":true,"done_reason":"stop","prompt_eval_count":26,"eval_count":{}}}"#,
                chunks - 1
            ) + "\n"
        } else {
            format!(
                r#"{{"model":"llama3.2:1b","created_at":"2026-11-25T12:00:00Z","response":"token{i} ","done":false}}"#
            ) + "\n"
        };
        out.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())?;
    }
    out.write_all(b"0\r\n\r\n")
}

/// Reads and drops a chunked request body, trailers included.
fn discard_chunked<R: BufRead>(reader: &mut R) -> io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let size_str = line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_str, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                    return Ok(());
                }
            }
        }
        io::copy(&mut reader.take(size as u64 + 2), &mut io::sink())?;
    }
}
