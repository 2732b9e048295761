//! A mock model server that speaks both Ollama's API and the
//! OpenAI-compatible one, streaming with delays between chunks, with token
//! counts the tests can predict and a record of what it received.
//!
//! - `POST /api/generate`, `/api/chat`: NDJSON records (one per token, then
//!   a final `"done": true` with `prompt_eval_count` and `eval_count`), or
//!   one JSON object with `"stream": false`.
//! - `POST /api/embed`: one object with `prompt_eval_count`.
//! - `POST /v1/chat/completions`, `/v1/completions`: SSE chunks (and the
//!   usage-only chunk when the request has
//!   `stream_options.include_usage: true`), or one JSON object with
//!   `usage`.
//! - `POST /v1/embeddings`: JSON with `usage`.
//! - `GET /api/tags`, `/api/ps`, `/v1/models`, `/v1/models/{id}`: the
//!   server's models.
//! - `POST /v1/messages` (Anthropic's Messages API): SSE events
//!   (`message_start` with the input counts, cache ones included, one
//!   `content_block_delta` per token, `message_delta` with the output
//!   count, `message_stop`), or one JSON message with `usage`;
//!   `/v1/messages/count_tokens`: `{"input_tokens": ...}`.
//!
//! Every answer is for the model the request names. The prompt counts
//! [`AiServer::prompt_tokens`] tokens, the completion one per chunk.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use super::raw_http::{read_request_body, read_request_head, RequestHead};
use super::upstreams::CustomServer;
use super::util::{hex, lock};

/// How the mock misbehaves, if at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Close the connection after this many stream records, before the
    /// final one (no terminating chunk).
    CutAfter(usize),
    /// Answer non-streaming requests gzip-compressed
    /// (`Content-Encoding: gzip`), whatever the request asked.
    Gzip,
    /// Answer with a text/plain body that is not JSON.
    NotJson,
}

/// What the mock was configured with.
#[derive(Debug, Clone)]
pub struct AiOptions {
    /// Content chunks per answer (= completion tokens).
    pub chunks: usize,
    /// Pause between streamed chunks.
    pub delay: Duration,
    /// Prompt tokens every answer reports (Anthropic's: uncached input).
    pub prompt_tokens: u64,
    /// Input tokens Anthropic answers report written to and read from the
    /// prompt cache (besides `prompt_tokens`).
    pub cache_creation_tokens: u64,
    pub cache_read_tokens: u64,
    /// Models listed by `/api/tags` and `/v1/models`.
    pub models: Vec<String>,
    pub fault: Fault,
}

impl Default for AiOptions {
    fn default() -> Self {
        AiOptions {
            chunks: 4,
            delay: Duration::from_millis(20),
            prompt_tokens: 11,
            cache_creation_tokens: 0,
            cache_read_tokens: 0,
            models: vec![
                "llama3.2:latest".into(),
                "qwen2.5:7b".into(),
                "mistral:7b".into(),
            ],
            fault: Fault::None,
        }
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct AiRequest {
    pub head: RequestHead,
    pub body: Vec<u8>,
    pub body_sha256: String,
    /// When the request was complete.
    pub at: Instant,
}

impl AiRequest {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Timing of one streamed answer.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    /// When each data record (or SSE event) was flushed, in order.
    pub written: Vec<Instant>,
    /// The same, on the wall clock (for clients in other processes).
    pub written_wall: Vec<SystemTime>,
    /// Every input token reported (Anthropic's cache ones included).
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Whether the answer carried its usage (final record, usage chunk or
    /// JSON `usage`).
    pub reported: bool,
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<AiRequest>>,
    sent: Mutex<Vec<Sent>>,
    heads: Mutex<usize>,
}

/// See the module documentation.
pub struct AiServer {
    pub addr: SocketAddr,
    pub opts: AiOptions,
    state: Arc<State>,
    _server: CustomServer,
}

impl AiServer {
    pub fn start(opts: AiOptions) -> AiServer {
        let state = Arc::new(State::default());
        let server = {
            let state = Arc::clone(&state);
            let opts = opts.clone();
            CustomServer::start(move |stream| serve(stream, &state, &opts))
        };
        AiServer {
            addr: server.addr,
            opts,
            state,
            _server: server,
        }
    }

    /// Requests whose body arrived whole, in order.
    pub fn requests(&self) -> Vec<AiRequest> {
        lock(&self.state.requests).clone()
    }

    /// Request heads received, whether or not their body arrived whole.
    pub fn heads(&self) -> usize {
        *lock(&self.state.heads)
    }

    /// Every answer sent, in order.
    pub fn sent(&self) -> Vec<Sent> {
        lock(&self.state.sent).clone()
    }

    /// Tokens reported in answers: `(prompt, completion)`.
    pub fn reported_tokens(&self) -> (u64, u64) {
        self.sent()
            .iter()
            .filter(|s| s.reported)
            .fold((0, 0), |(p, c), s| {
                (p + s.prompt_tokens, c + s.completion_tokens)
            })
    }
}

fn serve(stream: TcpStream, state: &State, opts: &AiOptions) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = std::io::BufReader::new(stream);
    loop {
        let head = match read_request_head(&mut reader) {
            Ok(Some(h)) => h,
            _ => return,
        };
        *lock(&state.heads) += 1;
        if head.expects_continue() && writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return;
        }
        let mut body = Vec::new();
        if read_request_body(&mut reader, &head, &mut |b| body.extend_from_slice(b)).is_err() {
            return;
        }
        let req = AiRequest {
            body_sha256: hex(&Sha256::digest(&body)),
            head,
            body,
            at: Instant::now(),
        };
        lock(&state.requests).push(req.clone());
        let keep = answer(&mut writer, &req, state, opts);
        if !keep || !req.head.keep_alive() {
            return;
        }
    }
}

fn write_json(w: &mut TcpStream, status: &str, body: &[u8], extra: &str) -> bool {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    );
    w.write_all(head.as_bytes()).is_ok() && w.write_all(body).is_ok() && w.flush().is_ok()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// Answers one request; false when the connection must close.
fn answer(w: &mut TcpStream, req: &AiRequest, state: &State, opts: &AiOptions) -> bool {
    let path = req.head.target.split('?').next().unwrap_or("").to_string();
    let json = req.json();
    let model = json["model"]
        .as_str()
        .or(json["name"].as_str())
        .unwrap_or("unnamed")
        .to_string();
    let stream = json["stream"].as_bool();
    let include_usage = json["stream_options"]["include_usage"] == serde_json::Value::Bool(true);
    let p = opts.prompt_tokens;
    let n = opts.chunks;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let listed = |f: &dyn Fn(&str) -> serde_json::Value| -> Vec<serde_json::Value> {
        opts.models.iter().map(|m| f(m)).collect()
    };
    let single = |body: serde_json::Value, reported: bool| -> (Vec<u8>, Sent) {
        let sent = Sent {
            written: vec![Instant::now()],
            written_wall: vec![SystemTime::now()],
            prompt_tokens: p,
            completion_tokens: if path.ends_with("embed") || path.ends_with("embeddings") {
                0
            } else {
                n as u64
            },
            reported,
        };
        (serde_json::to_vec(&body).unwrap_or_default(), sent)
    };
    let reply_single = |w: &mut TcpStream, body: serde_json::Value| -> bool {
        let (bytes, sent) = single(body, opts.fault == Fault::None);
        lock(&state.sent).push(sent);
        match opts.fault {
            Fault::Gzip => write_json(w, "200 OK", &gzip(&bytes), "Content-Encoding: gzip\r\n"),
            Fault::NotJson => {
                let text = b"this is not json";
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                    text.len()
                );
                w.write_all(head.as_bytes()).is_ok() && w.write_all(text).is_ok()
            }
            _ => write_json(w, "200 OK", &bytes, ""),
        }
    };
    match path.as_str() {
        "/api/generate" | "/api/chat" => {
            let chat = path == "/api/chat";
            let content = |i: usize| -> serde_json::Value {
                if chat {
                    serde_json::json!({"role": "assistant", "content": format!("tok{i} ")})
                } else {
                    serde_json::json!(format!("tok{i} "))
                }
            };
            let field = if chat { "message" } else { "response" };
            if stream == Some(false) {
                let all: String = (0..n).map(|i| format!("tok{i} ")).collect();
                let mut body = serde_json::json!({
                    "model": model, "created_at": "2026-11-25T12:00:00Z",
                    "done": true, "done_reason": "stop", "total_duration": 1000,
                    "prompt_eval_count": p, "eval_count": n,
                });
                body[field] = if chat {
                    serde_json::json!({"role": "assistant", "content": all})
                } else {
                    serde_json::json!(all)
                };
                return reply_single(w, body);
            }
            let mut records: Vec<String> = (0..n)
                .map(|i| {
                    let mut r = serde_json::json!({"model": model, "created_at": "2026-11-25T12:00:00Z", "done": false});
                    r[field] = content(i);
                    r.to_string() + "\n"
                })
                .collect();
            let mut last = serde_json::json!({
                "model": model, "created_at": "2026-11-25T12:00:00Z", "done": true,
                "done_reason": "stop", "context": [1, 2, 3], "total_duration": 1000,
                "prompt_eval_count": p, "eval_count": n,
            });
            last[field] = if chat {
                serde_json::json!({"role": "assistant", "content": ""})
            } else {
                serde_json::json!("")
            };
            records.push(last.to_string() + "\n");
            stream_chunked(
                w,
                "application/x-ndjson",
                &records,
                state,
                opts,
                p,
                n as u64,
                true,
            )
        }
        "/api/embed" => reply_single(
            w,
            serde_json::json!({"model": model, "embeddings": [[0.1, 0.2, 0.3]], "prompt_eval_count": p}),
        ),
        "/v1/chat/completions" | "/v1/completions" => {
            let chat = path == "/v1/chat/completions";
            let object = if chat {
                "chat.completion"
            } else {
                "text_completion"
            };
            if stream != Some(true) {
                let all: String = (0..n).map(|i| format!("tok{i} ")).collect();
                let choice = if chat {
                    serde_json::json!({"index": 0, "message": {"role": "assistant", "content": all}, "finish_reason": "stop"})
                } else {
                    serde_json::json!({"index": 0, "text": all, "finish_reason": "stop"})
                };
                return reply_single(
                    w,
                    serde_json::json!({
                        "id": "cmpl-1", "object": object, "created": now, "model": model,
                        "choices": [choice],
                        "usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n as u64},
                    }),
                );
            }
            let chunk_object = if chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            let mut events: Vec<String> = (0..n)
                .map(|i| {
                    let finish = if i + 1 == n { serde_json::json!("stop") } else { serde_json::Value::Null };
                    let choice = if chat {
                        serde_json::json!({"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": finish})
                    } else {
                        serde_json::json!({"index": 0, "text": format!("tok{i} "), "finish_reason": finish})
                    };
                    let mut c = serde_json::json!({"id": "cmpl-1", "object": chunk_object, "created": now, "model": model, "choices": [choice]});
                    if include_usage {
                        c["usage"] = serde_json::Value::Null;
                    }
                    format!("data: {c}\n\n")
                })
                .collect();
            if include_usage {
                let u = serde_json::json!({
                    "id": "cmpl-1", "object": chunk_object, "created": now, "model": model, "choices": [],
                    "usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n as u64},
                });
                events.push(format!("data: {u}\n\n"));
            }
            events.push("data: [DONE]\n\n".to_string());
            stream_chunked(
                w,
                "text/event-stream; charset=utf-8",
                &events,
                state,
                opts,
                p,
                n as u64,
                include_usage,
            )
        }
        "/v1/messages" => anthropic_messages(w, &model, stream == Some(true), state, opts),
        "/v1/messages/count_tokens" => {
            let body = serde_json::json!({"input_tokens": p}).to_string();
            write_json(w, "200 OK", body.as_bytes(), "")
        }
        "/v1/embeddings" => reply_single(
            w,
            serde_json::json!({
                "object": "list", "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "usage": {"prompt_tokens": p, "total_tokens": p},
            }),
        ),
        "/api/tags" | "/api/ps" => {
            let models = listed(&|m| {
                serde_json::json!({"name": m, "model": m, "modified_at": "2026-11-25T12:00:00Z",
                    "size": 1000, "digest": "abc", "details": {"format": "gguf", "family": "x"}})
            });
            let body =
                serde_json::to_vec(&serde_json::json!({"models": models})).unwrap_or_default();
            write_json(w, "200 OK", &body, "")
        }
        "/v1/models" => {
            let data = listed(
                &|m| serde_json::json!({"id": m, "object": "model", "created": 1, "owned_by": "mock"}),
            );
            let body = serde_json::to_vec(&serde_json::json!({"object": "list", "data": data}))
                .unwrap_or_default();
            write_json(w, "200 OK", &body, "")
        }
        other if other.starts_with("/v1/models/") => {
            let id = other.trim_start_matches("/v1/models/");
            let body = serde_json::to_vec(
                &serde_json::json!({"id": id, "object": "model", "created": 1, "owned_by": "mock"}),
            )
            .unwrap_or_default();
            write_json(w, "200 OK", &body, "")
        }
        _ => write_json(w, "404 Not Found", br#"{"error":"not found"}"#, ""),
    }
}

/// Answers Anthropic's `POST /v1/messages` for `model`: SSE events, one
/// HTTP chunk each, or one JSON message.
fn anthropic_messages(
    w: &mut TcpStream,
    model: &str,
    stream: bool,
    state: &State,
    opts: &AiOptions,
) -> bool {
    let n = opts.chunks;
    let (cw, cr) = (opts.cache_creation_tokens, opts.cache_read_tokens);
    let usage = |output: usize| {
        serde_json::json!({
            "input_tokens": opts.prompt_tokens, "cache_creation_input_tokens": cw,
            "cache_read_input_tokens": cr, "output_tokens": output,
        })
    };
    let input = opts.prompt_tokens + cw + cr;
    if !stream {
        let all: String = (0..n).map(|i| format!("tok{i} ")).collect();
        let body = serde_json::json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": all}],
            "stop_reason": "end_turn", "stop_sequence": null, "usage": usage(n),
        });
        lock(&state.sent).push(Sent {
            written: vec![Instant::now()],
            written_wall: vec![SystemTime::now()],
            prompt_tokens: input,
            completion_tokens: n as u64,
            reported: true,
        });
        return write_json(w, "200 OK", body.to_string().as_bytes(), "");
    }
    let event = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
    let start = serde_json::json!({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": model,
        "stop_reason": null, "stop_sequence": null, "usage": usage(1),
    }});
    let mut events = vec![
        event("message_start", start),
        event(
            "content_block_start",
            serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    events.extend((0..n).map(|i| {
        event(
            "content_block_delta",
            serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": format!("tok{i} ")}}),
        )
    }));
    events.push(event(
        "content_block_stop",
        serde_json::json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(event(
        "message_delta",
        serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": n}}),
    ));
    events.push(event(
        "message_stop",
        serde_json::json!({"type": "message_stop"}),
    ));
    stream_chunked(
        w,
        "text/event-stream; charset=utf-8",
        &events,
        state,
        opts,
        input,
        n as u64,
        true,
    )
}

/// Streams `records` chunked, one HTTP chunk each, `opts.delay` apart;
/// the last record is the one that reports usage (when `reported`).
#[allow(clippy::too_many_arguments)]
fn stream_chunked(
    w: &mut TcpStream,
    content_type: &str,
    records: &[String],
    state: &State,
    opts: &AiOptions,
    prompt: u64,
    completion: u64,
    reported: bool,
) -> bool {
    let index = {
        let mut sent = lock(&state.sent);
        sent.push(Sent {
            written: Vec::new(),
            written_wall: Vec::new(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            reported: false,
        });
        sent.len() - 1
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n"
    );
    if w.write_all(head.as_bytes()).is_err() || w.flush().is_err() {
        return false;
    }
    for (i, r) in records.iter().enumerate() {
        if let Fault::CutAfter(k) = opts.fault {
            if i == k {
                let _ = w.shutdown(std::net::Shutdown::Both);
                return false;
            }
        }
        if i > 0 {
            thread::sleep(opts.delay);
        }
        let frame = format!("{:x}\r\n{r}\r\n", r.len());
        if w.write_all(frame.as_bytes()).is_err() || w.flush().is_err() {
            return false;
        }
        if let Some(s) = lock(&state.sent).get_mut(index) {
            s.written.push(Instant::now());
            s.written_wall.push(SystemTime::now());
        }
    }
    if let Some(s) = lock(&state.sent).get_mut(index) {
        s.reported = reported;
    }
    w.write_all(b"0\r\n\r\n").is_ok() && w.flush().is_ok()
}
