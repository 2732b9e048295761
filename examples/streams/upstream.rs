//! The paced model server every target streams from: each answer is an
//! Ollama NDJSON stream (`/api/...`) or an OpenAI SSE stream (any other
//! path), one line per `interval`, written as one HTTP/1.1 chunk, each line
//! stamped with the microsecond it was written (`"t":N`, on the clock of
//! [`crate::now_us`]) so the client can tell how long the line took to
//! reach it. Keep-alive, so a proxy's upstream pool is used as in real life.

use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a stream looks like: its line count comes with each request
/// (`?lines=N`, default [`DEFAULT_LINES`]), the pace is the server's.
pub struct Pace {
    pub interval: Duration,
}

/// Lines of a stream when the request does not say.
const DEFAULT_LINES: u32 = 200;

/// Serves until the process ends; one task per connection on the calling
/// thread's runtime (a `LocalSet`).
pub async fn serve(listener: TcpListener, pace: Rc<Pace>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::task::spawn_local(connection(stream, pace.clone()));
    }
}

/// The request's path and whether the client keeps the connection.
struct Request {
    sse: bool,
    lines: u32,
    close: bool,
}

async fn connection(mut stream: TcpStream, pace: Rc<Pace>) {
    let mut buf = Vec::with_capacity(2048);
    let mut out = Vec::with_capacity(512);
    while let Some(request) = read_request(&mut stream, &mut buf).await {
        if answer(&mut stream, &request, &pace, &mut out)
            .await
            .is_err()
            || request.close
        {
            return;
        }
    }
}

/// Reads one request head and its Content-Length body; `None` at EOF or on
/// a malformed request.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let head_end = loop {
        if let Some(at) = memchr::memmem::find(buf, b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > 64 * 1024 || read_more(stream, buf).await? == 0 {
            return None;
        }
    };
    let head = std::str::from_utf8(buf.get(..head_end)?)
        .ok()?
        .to_ascii_lowercase();
    let path = head.split(' ').nth(1)?.to_string();
    let body_len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let close = header(&head, "connection").is_some_and(|v| v == "close");
    while buf.len() < head_end + body_len {
        if read_more(stream, buf).await? == 0 {
            return None;
        }
    }
    buf.drain(..head_end + body_len);
    let lines = path
        .split_once("lines=")
        .and_then(|(_, v)| v.split('&').next()?.parse().ok())
        .unwrap_or(DEFAULT_LINES);
    Some(Request {
        sse: !path.contains("/api/"),
        lines,
        close,
    })
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await.ok()?;
    buf.extend_from_slice(chunk.get(..n)?);
    Some(n)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim() == name)
        .map(|(_, v)| v.trim())
}

async fn answer(
    stream: &mut TcpStream,
    request: &Request,
    pace: &Pace,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let kind = if request.sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    let head =
        format!("HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nTransfer-Encoding: chunked\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut next = tokio::time::Instant::now();
    for i in 0..request.lines {
        next += pace.interval;
        tokio::time::sleep_until(next).await;
        line(out, request.sse, Some(i), request.lines);
        stream.write_all(out).await?;
    }
    line(out, request.sse, None, request.lines);
    out.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(out).await
}

/// Writes one chunk into `out`: line `i`, or the last line with the usage
/// (`None`), the shape of Ollama's and OpenAI's streams.
fn line(out: &mut Vec<u8>, sse: bool, i: Option<u32>, lines: u32) {
    let t = crate::now_us();
    let text = match (sse, i) {
        (false, Some(_)) => format!(
            "{{\"model\":\"bench\",\"created_at\":\"2026-12-08T00:00:00Z\",\"response\":\"tok \",\"done\":false,\"t\":{t}}}\n"
        ),
        (false, None) => format!(
            "{{\"model\":\"bench\",\"created_at\":\"2026-12-08T00:00:00Z\",\"response\":\"\",\"done\":true,\"done_reason\":\"stop\",\"prompt_eval_count\":12,\"eval_count\":{lines},\"t\":{t}}}\n"
        ),
        (true, Some(_)) => format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"bench\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok \"}}}}],\"t\":{t}}}\n\n"
        ),
        (true, None) => format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"bench\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{lines},\"total_tokens\":{}}},\"t\":{t}}}\n\ndata: [DONE]\n\n",
            lines + 12
        ),
    };
    out.clear();
    out.extend_from_slice(format!("{:x}\r\n", text.len()).as_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}
