//! Self-tests for the upstream servers in `tests/common`, exercised directly
//! (no gateway involved), so a failing gateway test can be trusted to be
//! about the gateway and not about the harness.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn raw_connect(addr: std::net::SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to upstream");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set read timeout");
    stream
}

#[test]
fn echo_reports_content_length_body() {
    let echo = EchoServer::start();
    let body = b"hello, upstream".to_vec();
    let mut resp = agent()
        .post(format!("http://{}/v1/generate?x=1&y=%20", echo.addr))
        .header("X-Test", "first")
        .send(&body)
        .expect("POST to echo");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let json = body_json(&mut resp);
    assert_eq!(json["method"], "POST");
    assert_eq!(json["path"], "/v1/generate?x=1&y=%20");
    assert_eq!(json["headers"]["x-test"], serde_json::json!(["first"]));
    assert_eq!(
        json["headers"]["content-length"],
        serde_json::json!([body.len().to_string()])
    );
    assert_eq!(json["body_len"], body.len() as u64);
    assert_eq!(json["body_sha256"], sha256_hex(&body));
    assert_eq!(json["upstream"], echo.addr.to_string());
    assert_eq!(echo.hits(), 1);
    let recorded = echo.last_request().expect("request was recorded");
    assert_eq!(recorded.head.header("X-TEST"), Some("first"));
    assert_eq!(recorded.body_sha256, sha256_hex(&body));
}

#[test]
fn echo_hashes_chunked_streamed_body() {
    let echo = EchoServer::start();
    // Odd size so the last chunk is partial.
    let len = 3 * 1024 * 1024 + 17;
    let mut reader = PatternReader::new(len);
    let mut resp = agent()
        .put(format!("http://{}/upload", echo.addr))
        .send(ureq::SendBody::from_reader(&mut reader))
        .expect("PUT chunked body to echo");
    assert_eq!(resp.status(), 200);
    let json = body_json(&mut resp);
    assert_eq!(json["method"], "PUT");
    assert_eq!(
        json["headers"]["transfer-encoding"],
        serde_json::json!(["chunked"])
    );
    assert!(json["headers"].get("content-length").is_none());
    assert_eq!(json["body_len"], len);
    assert_eq!(json["body_sha256"], pattern_sha256(len));
}

#[test]
fn pattern_sha_matches_materialised_bytes() {
    let len = 100_003u64;
    let mut bytes = Vec::new();
    PatternReader::new(len)
        .read_to_end(&mut bytes)
        .expect("read pattern");
    assert_eq!(bytes.len() as u64, len);
    assert_eq!(pattern_sha256(len), sha256_hex(&bytes));
    // The pattern must not be trivially constant.
    assert_ne!(bytes[0..251], bytes[251..502]);
}

#[test]
fn echo_keeps_connection_alive_and_parses_chunk_extensions() {
    let echo = EchoServer::start();
    let mut stream = raw_connect(echo.addr);
    // Two pipelined requests on one connection: a chunked body with a chunk
    // extension and a trailer, then a Content-Length body.
    stream
        .write_all(
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Multi: 1\r\nX-Multi: 2\r\n\r\n\
              5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n\
              GET /b?q HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        )
        .expect("write pipelined requests");
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));

    let resp = read_response(&mut reader).expect("first response");
    assert_eq!(resp.status, 200);
    assert!(resp.header("connection").is_none());
    let first = resp.json();
    assert_eq!(first["path"], "/a");
    assert_eq!(first["body_len"], 11);
    assert_eq!(first["body_sha256"], sha256_hex(b"hello world"));
    assert_eq!(first["headers"]["x-multi"], serde_json::json!(["1", "2"]));

    let resp = read_response(&mut reader).expect("second response");
    assert_eq!(resp.status, 200);
    let second = resp.json();
    assert_eq!(second["method"], "GET");
    assert_eq!(second["path"], "/b?q");
    assert_eq!(second["body_sha256"], sha256_hex(b"abc"));
    assert_eq!(echo.hits(), 2);
    assert_eq!(echo.open_connections(), 1);

    // A third request with Connection: close gets answered, then EOF.
    stream
        .write_all(b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write closing request");
    let resp = read_response(&mut reader).expect("third response");
    assert_eq!(resp.status, 200);
    assert!(resp
        .header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close")));
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty(), "no bytes after the close response");
    assert_eq!(echo.hits(), 3);
}

#[test]
fn echo_rejects_malformed_request_line() {
    let echo = EchoServer::start();
    let mut stream = raw_connect(echo.addr);
    stream
        .write_all(b"NOT-HTTP\r\n\r\n")
        .expect("write garbage");
    let mut reader = BufReader::new(stream);
    let resp = read_response(&mut reader).expect("error response");
    assert_eq!(resp.status, 400);
    assert_eq!(echo.hits(), 0);
}

#[test]
fn echo_rejects_oversized_head() {
    let echo = EchoServer::start();
    let mut stream = raw_connect(echo.addr);
    let big = format!(
        "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(MAX_HEAD_BYTES + 10)
    );
    // The server may close before we finish writing; that's fine.
    let _ = stream.write_all(big.as_bytes());
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    let _ = reader.read_line(&mut status);
    assert!(
        status.is_empty() || status.starts_with("HTTP/1.1 400"),
        "got {status:?}"
    );
    assert_eq!(echo.hits(), 0);
}

#[test]
fn stream_first_line_arrives_before_last_is_written() {
    let chunks = 5;
    let streamer = StreamServer::start(chunks, Duration::from_millis(100));
    let mut resp = agent()
        .post(format!("http://{}/api/generate", streamer.addr))
        .send(r#"{"model":"test"}"#)
        .expect("POST to streamer");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-ndjson")
    );
    let lines = read_lines_timed(resp.body_mut().as_reader());
    let expected: Vec<String> = (0..chunks)
        .map(|i| StreamFormat::Ndjson.chunk(i, chunks).trim_end().to_string())
        .collect();
    let got: Vec<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(got, expected);
    assert!(got[chunks - 1].contains(r#""done":true"#));

    let first_written = streamer
        .first_chunk_written_at()
        .expect("first chunk recorded");
    let last_written = streamer
        .last_chunk_written_at()
        .expect("last chunk recorded");
    assert!(first_written < last_written);
    assert!(
        lines[0].1 < last_written,
        "first line must be received before the last one is written"
    );
    // The server marks the record complete just after writing the last
    // chunk, which the client may already have read: wait for it.
    assert!(
        wait_until(Duration::from_secs(2), || streamer
            .records()
            .first()
            .is_some_and(|r| r.completed)),
        "{:?}",
        streamer.records()
    );
    assert_eq!(streamer.records().len(), 1);
    assert_eq!(streamer.aborted(), 0);
}

#[test]
fn sse_stream_delivers_events() {
    let streamer = StreamServer::start_sse(3, Duration::from_millis(10));
    let mut resp = agent()
        .get(format!("http://{}/v1/chat/completions", streamer.addr))
        .call()
        .expect("GET from SSE streamer");
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let body = resp.body_mut().read_to_string().expect("read SSE body");
    assert_eq!(body, streamer.expected_body());
    assert_eq!(body.matches("data: ").count(), 3);
}

#[test]
fn stream_abort_is_detected_when_client_disconnects() {
    let streamer = StreamServer::start(50, Duration::from_millis(20));
    let mut stream = raw_connect(streamer.addr);
    stream
        .write_all(b"GET /api/generate HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write request");
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut line = String::new();
    while !line.contains("tok0") {
        line.clear();
        let n = reader.read_line(&mut line).expect("read stream");
        assert!(n > 0, "stream ended before the first token");
    }
    drop(reader);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    while streamer.aborted() == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(streamer.aborted(), 1);
    assert!(streamer.last_chunk_written_at().is_none());
    assert!(!streamer.records()[0].completed);
}

#[test]
fn silent_server_never_answers() {
    let silent = SilentServer::start();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_millis(300)))
        .build()
        .into();
    let result = agent.get(format!("http://{}/", silent.addr)).call();
    assert!(
        matches!(result, Err(ureq::Error::Timeout(_))),
        "expected a timeout, got {result:?}"
    );
    assert_eq!(silent.hits(), 1);
}

#[test]
fn refused_addr_refuses_and_dropped_servers_stop_listening() {
    let refused = refused_addr();
    assert!(TcpStream::connect(refused).is_err());

    let echo = EchoServer::start();
    let addr = echo.addr;
    let idle = raw_connect(addr);
    // Make sure the connection was accepted before dropping the server.
    let deadline = Instant::now() + Duration::from_secs(5);
    while echo.open_connections() == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(echo.open_connections(), 1);
    drop(echo);
    assert!(TcpStream::connect(addr).is_err(), "listener closed on drop");
    // The idle keep-alive connection was shut down too: reads see EOF.
    let mut buf = [0u8; 1];
    let n = (&idle).read(&mut buf).expect("read after server drop");
    assert_eq!(n, 0);
}

#[test]
fn free_port_is_bindable() {
    let port = free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("free port can be bound");
}

/// Reads `n` responses of the recording server's fixed shape off `reader`.
fn read_ok_responses(reader: &mut impl BufRead, n: usize) {
    for i in 0..n {
        let resp = read_response(reader).unwrap_or_else(|e| panic!("response {i}: {e}"));
        assert_eq!(resp.status, 200, "response {i}");
        assert_eq!(resp.body, b"ok", "response {i}");
    }
}

#[test]
fn recording_server_records_bytes_and_answers_pipelined_requests() {
    let rec = RecordingServer::start();
    assert_eq!(rec.total_bytes(), 0);
    let mut s = raw_connect(rec.addr);
    let sent: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\nHost: x\nX_Under: 1\n\n\
POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    s.write_all(sent).expect("write requests");
    read_ok_responses(&mut BufReader::new(s.try_clone().expect("clone")), 3);
    assert_eq!(rec.request_count(), 3);
    assert_eq!(rec.connections(), vec![sent.to_vec()]);
    assert_eq!(rec.total_bytes(), sent.len());
    assert!(rec.received_contains(b"GET /b"));
    assert!(!rec.received_contains(b"GET /z"));
    let reqs = rec.requests();
    let targets: Vec<&str> = reqs.iter().map(|r| r.head.target.as_str()).collect();
    assert_eq!(targets, ["/a", "/b", "/c"]);
    assert_eq!(reqs[0].body, b"hello");
    assert!(reqs[0].raw_head.ends_with(b"Content-Length: 5\r\n\r\n"));
    assert_eq!(
        reqs[1].head.header("x_under"),
        Some("1"),
        "bare-LF head parsed"
    );
    assert_eq!(reqs[2].body, b"abc", "chunked body decoded");
    assert!(reqs.iter().all(|r| r.conn == 0));
}

#[test]
fn recording_server_surfaces_a_request_hidden_behind_an_odd_content_length() {
    let rec = RecordingServer::start();
    let mut s = raw_connect(rec.addr);
    let hidden = "GET /hidden HTTP/1.1\r\nHost: x\r\n\r\n";
    let sent = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {n}, {n}\r\n\r\n{hidden}",
        n = hidden.len()
    );
    s.write_all(sent.as_bytes()).expect("write requests");
    read_ok_responses(&mut BufReader::new(s.try_clone().expect("clone")), 2);
    let targets: Vec<String> = rec.requests().into_iter().map(|r| r.head.target).collect();
    assert_eq!(targets, ["/a", "/hidden"]);
    assert!(rec.requests()[0].body.is_empty());
}

#[test]
fn recording_server_counts_a_head_whose_body_never_arrives() {
    let rec = RecordingServer::start();
    let mut s = raw_connect(rec.addr);
    s.write_all(b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        .expect("write partial request");
    assert!(wait_until(Duration::from_secs(5), || rec.total_bytes() == 43));
    assert!(wait_until(Duration::from_secs(5), || rec.request_count() == 1));
    assert!(
        rec.requests().is_empty(),
        "body incomplete, nothing answered"
    );
}
