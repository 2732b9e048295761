//! Several model servers behind one route (issue 22): `least_busy` under
//! 40 concurrent streams to a fast and a five times slower upstream, caps
//! (`max_in_flight`) held as the upstreams themselves count, the bounded
//! queue (order, full, timeout, a client that leaves), fallback to another
//! upstream before the first byte (and never after), model aliases, and
//! in-flight counts across a reload.
//!
//! The upstreams are `tests/common/fleet.rs`: each records the requests it
//! saw, in order, and the most it served at once. Every wait is a poll of
//! the gateway's metrics or of an upstream's records.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::ai_gateway::{ai_get, ai_post, ai_request, error_of};
use common::fleet::*;
use common::reliability::{read_all, End};
use common::*;

const KEY: &str = "fleet-test-key-0001";

/// How long a state the test waits for may take to show.
const SOON: Duration = Duration::from_secs(10);

fn keys() -> KeyFile {
    KeyFile::of([Key::new(KEY, "fleet").service("chat")])
}

/// Two worker threads, the admin listener, the audit log, and `routes`.
fn config(routes: impl IntoIterator<Item = Route>) -> GatewayConfig {
    GatewayConfig::new()
        .threads(2)
        .with_admin()
        .audit_log("audit.log")
        .routes(routes)
}

/// A route at `/<name>/` (prefix stripped) for the key's service; its
/// upstreams still to add.
fn route(name: &str) -> Route {
    Route::new(name, &format!("/{name}/"), "chat").strip_prefix(true)
}

/// Sends a request with the key on a new connection (`Content-Length`
/// framed, `Connection: close`) and returns the connection, to read the
/// answer from (or to close early).
fn send(gw: &Gateway, method: &str, path: &str, rid: &str, body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(gw.addr()).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\nX-Request-Id: {rid}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send the head");
    // The gateway may answer (and close) before it has read the body.
    let _ = s.write_all(body);
    s
}

/// The whole answer on `s`.
fn answer(s: TcpStream) -> RawResponse {
    read_response(&mut BufReader::new(s)).expect("an answer")
}

fn request(gw: &Gateway, method: &str, path: &str, rid: &str, body: &[u8]) -> RawResponse {
    answer(send(gw, method, path, rid, body))
}

/// The series `name{upstream="addr"}`.
fn per_upstream(name: &str, addr: SocketAddr) -> String {
    format!("{name}{{upstream=\"{addr}\"}}")
}

/// Polls `/metrics` until `agw_upstream_<gauge>` of `addr` is `want`.
fn wait_gauge(gw: &Gateway, gauge: &str, addr: SocketAddr, want: f64) {
    let series = per_upstream(&format!("agw_upstream_{gauge}"), addr);
    let mut last = None;
    let reached = wait_until(SOON, || {
        last = sample(&metrics_text(gw.admin()), &series);
        last == Some(want)
    });
    assert!(reached, "{series} is {last:?}, not {want}:\n{}", gw.log());
}

/// The 503 of a full route: JSON, `Retry-After`, label `upstreams_busy`.
fn assert_busy(gw: &Gateway, r: &RawResponse, rid: &str) {
    assert_eq!(r.status, 503, "{rid}: {}", r.text());
    assert_eq!(r.json(), json!({"error": "all upstreams busy"}), "{rid}");
    assert_eq!(r.header("retry-after"), Some("1"), "{rid}: {:?}", r.headers);
    assert_eq!(audit_of(gw, rid)["decision"], "upstreams_busy", "{rid}");
}

/// `/readyz`'s entry for `addr`.
fn readyz_upstream(gw: &Gateway, addr: SocketAddr) -> Value {
    let mut resp = agent()
        .get(format!("http://{}/readyz", gw.admin()))
        .call()
        .expect("GET /readyz");
    assert_eq!(resp.status(), 200);
    let ready = body_json(&mut resp);
    ready["upstreams"]
        .as_array()
        .and_then(|all| all.iter().find(|u| u["address"] == addr.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("{addr} in /readyz: {ready}"))
}

/// The lines of a held stream's body.
fn held_lines(r: &RawResponse) -> Vec<String> {
    r.text().lines().map(str::to_string).collect()
}

// ---------------------------------------------------------------------------
// least_busy and max_in_flight
// ---------------------------------------------------------------------------

/// A fast upstream and one five times slower, both streaming 5 lines
/// (10 ms and 50 ms apart).
fn two_speeds() -> (FleetServer, FleetServer) {
    let streaming = |ms| {
        FleetServer::start(Answer::Stream {
            chunks: 5,
            delay: Duration::from_millis(ms),
        })
    };
    (streaming(10), streaming(50))
}

/// 40 concurrent streams over a fast upstream and one five times slower,
/// each capped at 6, with a queue: every client gets its whole stream, the
/// fast one serves clearly more, neither ever had more than 6 at once (by
/// its own count), and nothing is left in flight afterwards.
#[test]
fn least_busy_sends_more_to_the_faster_upstream_within_its_cap() {
    let (fast, slow) = two_speeds();
    let gw = Gateway::start(
        &config([route("gpu")
            .upstream_capped(fast.addr, 6)
            .upstream_capped(slow.addr, 6)
            .balance("least_busy")
            .queue(64, "20s")]),
        keys(),
    );
    let agent = agent();
    let answers: Vec<(u16, String)> = thread::scope(|s| {
        let clients: Vec<_> = (0..40)
            .map(|i| {
                let (agent, gw) = (&agent, &gw);
                s.spawn(move || {
                    let mut resp = agent
                        .get(gw.url(&format!("/gpu/stream/{i}")))
                        .header("Authorization", format!("Bearer {KEY}"))
                        .call()
                        .expect("GET a stream");
                    let status = resp.status().as_u16();
                    (status, resp.body_mut().read_to_string().unwrap_or_default())
                })
            })
            .collect();
        clients
            .into_iter()
            .map(|c| c.join().expect("client thread"))
            .collect()
    });
    let whole = stream_body(5);
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(
            (*status, body.as_str()),
            (200, whole.as_str()),
            "client {i}"
        );
    }
    let (f, s) = (fast.served(), slow.served());
    eprintln!(
        "fast served {f} (at most {} at once), slow {s} (at most {} at once)",
        fast.max_seen(),
        slow.max_seen()
    );
    assert_eq!(f + s, 40);
    assert!(fast.max_seen() <= 6, "fast had {} at once", fast.max_seen());
    assert!(slow.max_seen() <= 6, "slow had {} at once", slow.max_seen());
    assert!(
        2 * f >= 3 * s,
        "fast served {f}, slow {s}: not clearly more"
    );

    for up in [&fast, &slow] {
        wait_gauge(&gw, "in_flight", up.addr, 0.0);
        wait_gauge(&gw, "queued", up.addr, 0.0);
        let text = metrics_text(gw.admin());
        let answered = per_upstream("agw_upstream_answered_total", up.addr);
        let latency = per_upstream("agw_upstream_latency_seconds_count", up.addr);
        assert_eq!(
            sample(&text, &answered),
            Some(up.served() as f64),
            "{answered}"
        );
        assert_eq!(
            sample(&text, &latency),
            Some(up.served() as f64),
            "{latency}"
        );
        let ready = readyz_upstream(&gw, up.addr);
        assert_eq!(
            (&ready["state"], &ready["in_flight"], &ready["queued"]),
            (&json!("up"), &json!(0), &json!(0)),
            "{ready}"
        );
    }
}

/// Streams from 8 clients, each asking again as soon as its answer ended,
/// 5 times, on `route` (GET `/<route>/...`).
fn closed_loop(gw: &Gateway, route: &str) {
    let agent = agent();
    thread::scope(|s| {
        for c in 0..8 {
            let agent = &agent;
            s.spawn(move || {
                for i in 0..5 {
                    let mut resp = agent
                        .get(gw.url(&format!("/{route}/{c}/{i}")))
                        .header("Authorization", format!("Bearer {KEY}"))
                        .call()
                        .expect("GET a stream");
                    assert_eq!(resp.status(), 200);
                    let body = resp.body_mut().read_to_string().expect("the stream");
                    assert_eq!(body, stream_body(5));
                }
            });
        }
    });
}

/// Without caps or a queue (so only the choice of upstream differs): 8
/// clients asking again as soon as they are answered split evenly under
/// `round_robin`, and favour the fast upstream under `least_busy` (it
/// has fewer in flight whenever a request arrives).
#[test]
fn least_busy_beats_round_robin_on_the_two_speed_pair() {
    let (rr_fast, rr_slow) = two_speeds();
    let (lb_fast, lb_slow) = two_speeds();
    let gw = Gateway::start(
        &config([
            route("rr").upstream(rr_fast.addr).upstream(rr_slow.addr),
            route("lb")
                .upstream(lb_fast.addr)
                .upstream(lb_slow.addr)
                .balance("least_busy"),
        ]),
        keys(),
    );
    closed_loop(&gw, "rr");
    closed_loop(&gw, "lb");
    let (rf, rs, lf, ls) = (
        rr_fast.served(),
        rr_slow.served(),
        lb_fast.served(),
        lb_slow.served(),
    );
    eprintln!("round_robin: fast {rf}, slow {rs}; least_busy: fast {lf}, slow {ls}");
    assert_eq!((rf, rs), (20, 20), "round robin takes turns");
    assert_eq!(lf + ls, 40);
    assert!(2 * lf >= 3 * ls, "least_busy: fast {lf}, slow {ls}");
}

// ---------------------------------------------------------------------------
// The queue
// ---------------------------------------------------------------------------

/// One upstream that takes one request at a time and holds each until
/// released, `queue: {max: 2, timeout: 2s}`: waiting requests go through
/// in order, one more than `max` is answered 503 at once, one that waits
/// past `timeout` 503 then, and a client that leaves is gone from the
/// queue (the upstream never sees its request).
#[test]
fn the_queue_serves_in_order_bounds_waits_and_forgets_clients_that_leave() {
    let up = FleetServer::start(Answer::Held);
    let gw = Gateway::start(
        &config([route("q").upstream_capped(up.addr, 1).queue(2, "2s")]),
        keys(),
    );
    let queued = |n: f64| wait_gauge(&gw, "queued", up.addr, n);

    let a = send(&gw, "POST", "/q/a", "q-a", b"{\"n\":1}");
    poll(SOON, "a at the upstream", || {
        (up.paths() == ["/a"]).then_some(())
    });
    let b = send(&gw, "POST", "/q/b", "q-b", b"{\"n\":2}");
    queued(1.0);
    let c = send(&gw, "GET", "/q/c", "q-c", b"");
    queued(2.0);
    let started = Instant::now();
    let d = request(&gw, "GET", "/q/d", "q-d", b"");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a full queue answers at once, not after its timeout: {:?}",
        started.elapsed()
    );
    assert_busy(&gw, &d, "q-d");
    assert_eq!(readyz_upstream(&gw, up.addr)["queued"], 2);

    up.release(1);
    poll(SOON, "b at the upstream", || {
        (up.paths() == ["/a", "/b"]).then_some(())
    });
    up.release(1);
    poll(SOON, "c at the upstream", || {
        (up.paths() == ["/a", "/b", "/c"]).then_some(())
    });
    for (rid, s) in [("q-a", a), ("q-b", b)] {
        let r = answer(s);
        assert_eq!(r.status, 200, "{rid}");
        assert_eq!(held_lines(&r).last().map(String::as_str), Some(HELD_DONE));
    }

    // c holds the slot: e waits past the timeout.
    let started = Instant::now();
    let e = request(&gw, "GET", "/q/e", "q-e", b"");
    let waited = started.elapsed();
    assert_busy(&gw, &e, "q-e");
    assert!(waited >= Duration::from_millis(1900), "e waited {waited:?}");

    // f (its body in) and then g (no body) leave while queued: each is
    // gone from the queue at once, recorded as a client that left.
    for (method, path, rid, body) in [
        ("POST", "/q/f", "q-f", &[b'f'; 100][..]),
        ("GET", "/q/g", "q-g", &[][..]),
    ] {
        let s = send(&gw, method, path, rid, body);
        queued(1.0);
        let left = Instant::now();
        s.shutdown(Shutdown::Both).expect("close");
        drop(s);
        queued(0.0);
        let line = audit_of(&gw, rid);
        assert!(
            left.elapsed() < Duration::from_secs(2),
            "{rid} left the queue only after its timeout: {line}"
        );
        assert_eq!(line["decision"], "client_closed", "{rid}: {line}");
    }

    up.release(1);
    let c = answer(c);
    assert_eq!(c.status, 200);
    assert_eq!(held_lines(&c).last().map(String::as_str), Some(HELD_DONE));
    wait_gauge(&gw, "in_flight", up.addr, 0.0);
    // The slot is free again, for a request sent after.
    up.release(1);
    assert_eq!(request(&gw, "GET", "/q/h", "q-h", b"").status, 200);
    assert_eq!(
        up.paths(),
        ["/a", "/b", "/c", "/h"],
        "d, e, f and g never reached the upstream"
    );
    wait_gauge(&gw, "in_flight", up.addr, 0.0);
}

// ---------------------------------------------------------------------------
// Fallback before the first byte
// ---------------------------------------------------------------------------

/// The `retried` entries of an audit line: `(upstream, failed)`.
fn retried(line: &Value) -> Vec<(String, String)> {
    line["retried"]
        .as_array()
        .map(|tries| {
            tries
                .iter()
                .map(|t| {
                    (
                        t["upstream"].as_str().unwrap_or_default().to_string(),
                        t["failed"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One upstream refusing connections and one answering 503 to every other
/// request: every POST gets a 200 from the second, which got its body
/// intact each time; the audit lists the failed tries and the metrics
/// count them.
#[test]
fn every_client_gets_a_200_past_a_refusing_and_a_failing_upstream() {
    let refused = refused_addr();
    let flaky = FleetServer::start(Answer::Alternate);
    let gw = Gateway::start(
        &config([route("r")
            .upstream(refused)
            .upstream(flaky.addr)
            .retry(3, &["connect", "503"])]),
        keys(),
    );
    let bodies: Vec<Vec<u8>> = (0..10)
        .map(|i| format!("request {i}; ").repeat(300 + 40 * i).into_bytes())
        .collect();
    let mut tries = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let rid = format!("r-{i}");
        let r = request(&gw, "POST", &format!("/r/{i}"), &rid, body);
        assert_eq!(r.status, 200, "{rid}: {}", r.text());
        assert_eq!(r.json()["body_sha256"], sha256_hex(body), "{rid}");
        let line = audit_of(&gw, &rid);
        assert_eq!(line["upstream"], flaky.addr.to_string(), "{rid}: {line}");
        assert_eq!(line["status"], 200, "{line}");
        tries.extend(retried(&line));
    }
    for seen in flaky.seen() {
        let i: usize = seen
            .path
            .trim_start_matches('/')
            .parse()
            .expect("a path /i");
        assert_eq!(seen.body_sha256, sha256_hex(&bodies[i]), "{seen:?}");
    }
    let refusals = tries
        .iter()
        .filter(|t| *t == &(refused.to_string(), "connect".to_string()))
        .count();
    let answered_503 = flaky.seen().iter().filter(|s| s.status == 503).count();
    eprintln!("tries retried: {tries:?}; the flaky upstream answered 503 {answered_503} times");
    assert!(refusals >= 1, "no refused connect in the audit: {tries:?}");
    assert!(answered_503 >= 4, "503s: {answered_503}");
    assert_eq!(
        tries.len(),
        refusals + answered_503,
        "each failed try once: {tries:?}"
    );
    assert!(tries
        .iter()
        .all(|(u, f)| (u == &refused.to_string()) == (f == "connect")));
    let text = metrics_text(gw.admin());
    assert_eq!(
        sample(&text, "agw_upstream_retries_total{route=\"r\"}"),
        Some(tries.len() as f64)
    );
    let failed = per_upstream("agw_upstream_failed_total", refused);
    assert_eq!(sample(&text, &failed), Some(refusals as f64), "{failed}");
    let flaky_failed = per_upstream("agw_upstream_failed_total", flaky.addr);
    assert_eq!(sample(&text, &flaky_failed), Some(answered_503 as f64));
    let answered = per_upstream("agw_upstream_answered_total", flaky.addr);
    assert_eq!(sample(&text, &answered), Some(10.0), "{answered}");
    wait_gauge(&gw, "in_flight", flaky.addr, 0.0);
}

/// An upstream that sends a 200 head and part of the body, then closes:
/// the client gets that broken answer, not a retry on the other upstream
/// (each request reached exactly one upstream), for GET and POST alike.
#[test]
fn nothing_is_retried_once_a_byte_was_sent() {
    let breaks = FleetServer::start(Answer::BreakOff);
    let good = FleetServer::start(Answer::Status(200));
    let gw = Gateway::start(
        &config([route("b")
            .upstream(breaks.addr)
            .upstream(good.addr)
            .retry(3, &["connect", "502", "503"])]),
        keys(),
    );
    let count = |up: &FleetServer, path: &str| up.paths().iter().filter(|p| *p == path).count();
    for i in 0..4 {
        let (method, body): (&str, &[u8]) = if i % 2 == 0 {
            ("GET", b"")
        } else {
            ("POST", b"{\"prompt\":\"hi\"}")
        };
        let rid = format!("b-{i}");
        let ex = read_all(
            send(&gw, method, &format!("/b/{i}"), &rid, body),
            Duration::from_secs(10),
        );
        let path = format!("/{i}");
        let line = audit_of(&gw, &rid);
        let (broken, whole) = (count(&breaks, &path), count(&good, &path));
        assert_eq!(
            broken + whole,
            1,
            "{method} {path} reached one upstream: {line}"
        );
        assert_ne!(ex.end, End::TimedOut, "{rid}");
        assert_eq!(ex.status(), Some(200), "{rid}: {}", ex.text());
        let text = ex.text();
        let got = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        if broken == 1 {
            assert!(
                got.len() < 1000 && got.bytes().all(|b| b == b'x'),
                "{rid}: a short answer, no more: {text}"
            );
            assert!(line.get("retried").is_none(), "{line}");
        } else {
            assert!(got.contains("body_sha256"), "{rid}: {text}");
        }
    }
    assert_eq!(breaks.heads(), 2, "round robin sends every other one");
    assert_eq!(good.heads(), 2);
    let retries = metric_at(gw.admin(), "agw_upstream_retries_total{route=\"b\"}");
    assert_eq!(retries, 0.0);
}

/// Two upstreams answering 503, `retry: {attempts: 2, on: [503]}`: a small
/// body is tried on both (the client gets the second 503); a body larger
/// than Pingora's 64 KiB retry buffer is not retried.
#[test]
fn a_503_is_not_retried_once_the_body_outgrew_the_retry_buffer() {
    let one = FleetServer::start(Answer::Status(503));
    let two = FleetServer::start(Answer::Status(503));
    let gw = Gateway::start(
        &config([route("l")
            .upstream(one.addr)
            .upstream(two.addr)
            .retry(2, &["503"])]),
        keys(),
    );
    let heads = || one.heads() + two.heads();
    let small = vec![b's'; 1024];
    let r = request(&gw, "POST", "/l/small", "l-small", &small);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.json()["body_sha256"],
        sha256_hex(&small),
        "the upstream's 503"
    );
    assert_eq!(heads(), 2, "tried on both");
    assert_eq!((one.heads(), two.heads()), (1, 1));
    let line = audit_of(&gw, "l-small");
    assert_eq!(retried(&line).len(), 1, "{line}");
    assert_eq!(retried(&line)[0].1, "503", "{line}");

    let large = vec![b'L'; 100 * 1024];
    let r = request(&gw, "POST", "/l/large", "l-large", &large);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.json()["body_sha256"],
        sha256_hex(&large),
        "the upstream's 503"
    );
    assert_eq!(
        heads(),
        3,
        "not retried: {:?} {:?}",
        one.paths(),
        two.paths()
    );
    let line = audit_of(&gw, "l-large");
    assert!(line.get("retried").is_none(), "{line}");
    assert_eq!(line["upstream_status"], 503, "{line}");
    let retries = metric_at(gw.admin(), "agw_upstream_retries_total{route=\"l\"}");
    assert_eq!(retries, 1.0);
}

// ---------------------------------------------------------------------------
// Model aliases
// ---------------------------------------------------------------------------

const ALIAS_KEY: &str = "fleet-alias-key-0001";
const TARGET_KEY: &str = "fleet-target-key-0001";

/// `aliases: {gpt-4o: llama3.2}` with `llama3.2` served by its own
/// upstream: a request for gpt-4o reaches it with the body rewritten (and
/// a `Content-Length` to match); scoping judges the name asked for; the
/// audit, the usage report and the model list carry the right names; a
/// body too large to rewrite is refused and never sent.
#[test]
fn an_alias_reaches_its_target_rewritten_and_is_scoped_counted_and_listed() {
    let default = AiServer::start(AiOptions::default());
    let target = AiServer::start(AiOptions::default());
    let gw = Gateway::start(
        &config([Route::new("openai", "/v1/", "ai")
            .api("openai")
            .upstream(default.addr)
            .model("llama3.2", [target.addr])
            .aliases(&[("gpt-4o", "llama3.2")])]),
        KeyFile::of([
            Key::new(ALIAS_KEY, "ann").service("ai").models(["gpt-4o"]),
            Key::new(TARGET_KEY, "bob")
                .service("ai")
                .models(["llama3.2"]),
        ]),
    );
    let asked = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": false
    });
    let r = ai_post(&gw, "/v1/chat/completions", ALIAS_KEY, "al-1", &asked);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["model"],
        "llama3.2",
        "the answer as the server wrote it"
    );
    assert_eq!(default.heads(), 0, "routing by model used the target");
    let got = target.requests();
    assert_eq!(got.len(), 1);
    let mut want = asked.clone();
    want["model"] = json!("llama3.2");
    assert_eq!(got[0].json(), want, "the body with the target's name");
    assert_eq!(
        got[0].head.header("content-length"),
        Some(got[0].body.len().to_string().as_str()),
        "Content-Length of the rewritten body"
    );
    let line = audit_of(&gw, "al-1");
    assert_eq!(
        (&line["model"], &line["requested_model"]),
        (&json!("llama3.2"), &json!("gpt-4o")),
        "{line}"
    );

    // Scoping judges the name asked for.
    let r = ai_post(&gw, "/v1/chat/completions", TARGET_KEY, "al-2", &asked);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(audit_of(&gw, "al-2")["decision"], "model_not_allowed");
    let direct = json!({"model": "llama3.2", "messages": [], "stream": false});
    let r = ai_post(&gw, "/v1/chat/completions", TARGET_KEY, "al-3", &direct);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(audit_of(&gw, "al-3").get("requested_model").is_none());
    assert_eq!(target.heads(), 2);

    // The model lists show the aliases a key may use.
    let ids = |key: &str, rid: &str| -> Vec<String> {
        let r = ai_get(&gw, "/v1/models", key, rid);
        assert_eq!(r.status, 200, "{}", r.text());
        let list = r.json();
        list["data"]
            .as_array()
            .unwrap_or_else(|| panic!("a model list: {list}"))
            .iter()
            .map(|m| m["id"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(ids(ALIAS_KEY, "al-4"), ["gpt-4o"]);
    let bobs = ids(TARGET_KEY, "al-5");
    assert!(!bobs.iter().any(|m| m == "gpt-4o"), "{bobs:?}");
    assert!(bobs.iter().any(|m| m.starts_with("llama3.2")), "{bobs:?}");

    // A body too large to rewrite is refused, never sent with the alias.
    let large = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(100 * 1024)
    );
    let r = ai_request(
        &gw,
        "POST",
        "/v1/chat/completions",
        ALIAS_KEY,
        "al-6",
        large.as_bytes(),
        "",
    );
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(error_of(&r).contains("alias"), "{}", r.text());
    assert_eq!(audit_of(&gw, "al-6")["decision"], "alias_body_too_large");
    assert_eq!(
        (target.heads(), default.heads()),
        (2, 2),
        "only the two model lists went to the default upstream"
    );

    // The usage report by the name asked for.
    let out = run_cli(
        &[
            "usage",
            "--json",
            "--config",
            gw.config_path.to_str().expect("utf-8"),
            "--by",
            "requested_model",
        ],
        gw.dir.path(),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let report: Value = serde_json::from_str(&out.stdout).expect("usage JSON");
    let sent = target.sent();
    let first = sent.first().expect("the target answered");
    let group = &report["groups"]["gpt-4o"];
    assert_eq!(
        (&group["prompt_tokens"], &group["completion_tokens"]),
        (&json!(first.prompt_tokens), &json!(first.completion_tokens)),
        "{report}"
    );
}

// ---------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------

/// Two long streams hold both slots of an upstream (`max_in_flight: 2`)
/// while the config is reloaded: a third request is still refused, the
/// count is still 2, and it goes back to 0 as the streams end, one of
/// them by its client leaving mid-stream.
#[test]
fn in_flight_counts_survive_a_reload_and_return_to_zero() {
    let up = FleetServer::start(Answer::Held);
    let other = FleetServer::start(Answer::Status(200));
    let gw = Gateway::start(&config([route("h").upstream_capped(up.addr, 2)]), keys());
    let mut one = send(&gw, "GET", "/h/1", "h-1", b"");
    let two = send(&gw, "GET", "/h/2", "h-2", b"");
    poll(SOON, "both streams at the upstream", || {
        (up.current() == 2).then_some(())
    });
    wait_gauge(&gw, "in_flight", up.addr, 2.0);

    gw.write_config(gw.config().clone().route(route("new").upstream(other.addr)));
    gw.signal("HUP");
    assert!(
        gw.wait_log_contains("reload (SIGHUP): generation 2", SOON),
        "{}",
        gw.log()
    );
    let r = request(&gw, "GET", "/new/x", "h-new", b"");
    assert_eq!(r.status, 200, "the new route serves: {}", r.text());
    assert_busy(&gw, &request(&gw, "GET", "/h/3", "h-3", b""), "h-3");
    wait_gauge(&gw, "in_flight", up.addr, 2.0);
    assert_eq!(readyz_upstream(&gw, up.addr)["in_flight"], 2);

    // The first client leaves mid-stream.
    let mut some = [0u8; 64];
    let n = one.read(&mut some).expect("the stream began");
    assert!(n > 0);
    one.shutdown(Shutdown::Both).expect("close");
    drop(one);
    wait_gauge(&gw, "in_flight", up.addr, 1.0);
    let line = audit_of(&gw, "h-1");
    assert_eq!(line["decision"], "client_closed", "{line}");
    poll(SOON, "the upstream's first stream ended", || {
        (up.current() == 1).then_some(())
    });

    up.release(1);
    let two = answer(two);
    assert_eq!(two.status, 200);
    assert_eq!(held_lines(&two).last().map(String::as_str), Some(HELD_DONE));
    wait_gauge(&gw, "in_flight", up.addr, 0.0);
    let mut paths = up.paths();
    paths.sort();
    assert_eq!(paths, ["/1", "/2"], "the refused one never reached it");
}
