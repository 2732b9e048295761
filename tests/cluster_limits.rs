//! Per-key limits held across a cluster of instances sharing one Redis
//! (`shared_state`): a rate limit (and, without shared state, each
//! instance counting its own), a concurrency cap whose freed slot serves
//! another instance, and a token budget crossed on one instance refused on
//! the others within a second.
//!
//! Every test runs real `ai-gateway` processes on loopback (see
//! `tests/common/cluster.rs`), all pointed at the same key file and the
//! same real `redis-server`, and talks to them over bare `TcpStream`s so
//! the exact status and body of each answer are checked. Tests wait by
//! polling, never by sleeping; no test waits a rate limit's window out.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::cluster::*;
use common::redis::RedisServer;
use common::*;

// ---------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------

const RATE_KEY: &str = "cluster-rate-key-0001";

#[test]
fn a_rate_limit_holds_across_the_cluster_while_instances_without_shared_state_each_admit_it() {
    let _one = one_cluster();
    let redis = RedisServer::start();
    let echo = EchoServer::start();
    let routes = Route::chat(echo.addr);
    let keys_json = KeyFile::of([Key::new(RATE_KEY, "ann")
        .service("chat")
        .rate_limit("60/min")]);

    // Shared: 120 requests round-robin over three instances.
    let shared = Cluster::start(
        &[
            shared(&redis, "local"),
            shared(&redis, "local"),
            shared(&redis, "local"),
        ],
        &routes,
        &keys_json,
    );
    let started = Instant::now();
    let with_redis = round_robin(&shared, RATE_KEY, 120, "shared");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "120 requests took {took:?}: too close to the 60 s window to count one window"
    );
    assert_cluster_limit(
        &with_redis,
        60,
        "with shared_state, 120 requests round-robin",
    );
    let total_shared: usize = with_redis.iter().sum();
    assert_eq!(
        echo.hits(),
        total_shared,
        "the upstream saw other requests than the admitted ones"
    );
    let in_redis = redis.keys();
    assert!(
        !in_redis.is_empty(),
        "the cluster admitted {total_shared} requests but Redis holds no key: nothing was counted there"
    );
    assert!(
        in_redis.iter().all(|k| !k.contains(RATE_KEY)),
        "a Redis key name holds the API key itself: {in_redis:?}"
    );
    shared.assert_logs_never_show(&[RATE_KEY]);
    drop(shared);

    // The same without shared_state: each instance admits its own 60.
    let hits_before = echo.hits();
    let alone = Cluster::start(
        &[
            GatewayConfig::new(),
            GatewayConfig::new(),
            GatewayConfig::new(),
        ],
        &routes,
        &keys_json,
    );
    let without = round_robin(&alone, RATE_KEY, 240, "without shared_state");
    assert_eq!(
        without,
        vec![60, 60, 60],
        "without shared_state each instance counts its own 60/min"
    );
    assert_eq!(echo.hits() - hits_before, 180);
    eprintln!(
        "rate_limit 60/min: with shared_state {total_shared} of 120 admitted (per instance {with_redis:?}); without, 180 of 240 ({without:?})"
    );
}

// ---------------------------------------------------------------------------
// Concurrency caps
// ---------------------------------------------------------------------------

const CONC_KEY: &str = "cluster-conc-key-0001";

#[test]
fn max_concurrent_is_strict_across_the_cluster_and_a_slot_freed_on_one_instance_serves_another() {
    let _one = one_cluster();
    let redis = RedisServer::start();
    // 40 chunks 100 ms apart: about 4 s a stream.
    let up = StreamServer::start(40, Duration::from_millis(100));
    let cluster = Cluster::start(
        &[
            shared(&redis, "local"),
            shared(&redis, "local"),
            shared(&redis, "local"),
        ],
        &Route::stripped("s", "/s/", "chat", up.addr),
        &KeyFile::of([Key::new(CONC_KEY, "ann").service("chat").max_concurrent(2)]),
    );
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));

    let on_a = must_open(a.addr(), "/s/gen", CONC_KEY, "a stream on A");
    let on_b = must_open(b.addr(), "/s/gen", CONC_KEY, "a stream on B");
    assert_stream_refused_or(
        c.addr(),
        "/s/gen",
        CONC_KEY,
        "a third stream, on C, while A's and B's run",
        || redis_held(&redis),
    );
    assert_stream_refused_or(
        a.addr(),
        "/s/gen",
        CONC_KEY,
        "a third stream, on A, while A's and B's run",
        || redis_held(&redis),
    );
    assert_eq!(up.hits(), 2, "a refused request reached the upstream");

    // Both streams read to their end: their slots go back to Redis.
    assert_eq!(
        String::from_utf8_lossy(&on_a.finish()),
        up.expected_body(),
        "A's stream"
    );
    assert_eq!(
        String::from_utf8_lossy(&on_b.finish()),
        up.expected_body(),
        "B's stream"
    );
    let asked = Instant::now();
    let on_c = open_stream_within(
        c.addr(),
        "/s/gen",
        CONC_KEY,
        Duration::from_secs(2),
        "a stream on C after A's and B's ended",
    );
    let took = asked.elapsed();
    eprintln!("C admitted {took:?} after the streams on A and B ended");
    let again_a = open_stream_within(
        a.addr(),
        "/s/gen",
        CONC_KEY,
        Duration::from_secs(2),
        "a second stream, on A, beside C's",
    );
    // C's and A's are open: the cap holds again, everywhere.
    assert_stream_refused_or(
        b.addr(),
        "/s/gen",
        CONC_KEY,
        "a third stream, on B, beside C's and A's",
        || redis_held(&redis),
    );
    assert_stream_refused_or(
        c.addr(),
        "/s/gen",
        CONC_KEY,
        "a third stream, on C, beside C's and A's",
        || redis_held(&redis),
    );
    assert_eq!(up.hits(), 4, "a refused request reached the upstream");
    drop(on_c);
    drop(again_a);
}

// ---------------------------------------------------------------------------
// Token budgets
// ---------------------------------------------------------------------------

const TOKEN_KEY: &str = "cluster-token-key-0001";

/// `POST path` with `X-API-Key: key` and a JSON body.
fn post(addr: SocketAddr, path: &str, key: &str, body: &Value) -> RawResponse {
    send(
        addr,
        "POST",
        path,
        &[("X-API-Key", key), ("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// Polls `node` with `chat` requests until one is refused 429 `token
/// budget exceeded`; a request sent later than `deadline` fails the test.
/// Requests admitted meanwhile must complete. Returns how many were
/// admitted and when the refused one was sent.
fn poll_until_budget_refused(node: &Node, chat: &Value, deadline: Instant) -> (usize, Instant) {
    let mut admitted = 0;
    loop {
        let sent = Instant::now();
        assert!(
            sent <= deadline,
            "instance {}: still admitting the key after its budget was crossed on A ({admitted} admitted while polling); metrics:\n{}",
            node.name,
            shared_metrics(node.admin)
        );
        let r = post(node.addr(), "/ollama/api/chat", TOKEN_KEY, chat);
        if r.status == 429 {
            let what = format!("on {} after the budget was crossed", node.name);
            assert_refusal(&r, 429, "token budget exceeded", &what);
            let wait = retry_after(&r);
            assert!(wait <= 60, "{what}: Retry-After {wait} for a 20/min budget");
            return (admitted, sent);
        }
        assert_status(
            &r,
            200,
            &format!("a request on {} while polling", node.name),
        );
        admitted += 1;
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_token_budget_crossed_on_one_instance_is_refused_on_the_others_within_a_second() {
    let _one = one_cluster();
    let redis = RedisServer::start();
    // Each chat: 11 prompt + 4 completion = 15 tokens; the key may use 20 a
    // minute, so the second chat crosses the budget.
    let model = AiServer::start(AiOptions::default());
    let cluster = Cluster::start(
        &[
            shared(&redis, "local"),
            shared(&redis, "local"),
            shared(&redis, "local"),
        ],
        &Route::stripped("ollama", "/ollama/", "ai", model.addr).api("ollama"),
        &KeyFile::of([Key::new(TOKEN_KEY, "tok")
            .service("ai")
            .token_limit("20/min")]),
    );
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let chat = json!({"model": "llama3.2", "messages": [], "stream": true});

    let first = post(a.addr(), "/ollama/api/chat", TOKEN_KEY, &chat);
    assert_status(&first, 200, "the first chat on A (15 of 20 tokens)");
    let crossing = post(a.addr(), "/ollama/api/chat", TOKEN_KEY, &chat);
    let ended = Instant::now();
    assert_status(&crossing, 200, "the second chat on A (15 of 20 used)");
    assert_eq!(
        crossing.text().lines().count(),
        5,
        "the stream that crosses the budget is not cut: {}",
        crossing.text()
    );

    let deadline = ended + PROPAGATION;
    let mut admitted = 0;
    for node in [b, c, a] {
        let (n, refused_at) = poll_until_budget_refused(node, &chat, deadline);
        eprintln!(
            "instance {}: refused {:?} after the crossing chat ended ({n} admitted before)",
            node.name,
            refused_at - ended
        );
        admitted += n;
    }
    assert_eq!(
        model.requests().len(),
        2 + admitted,
        "a refused request reached the upstream"
    );
    // Refused on every instance, and it stays so.
    for node in &cluster.nodes {
        let r = post(node.addr(), "/ollama/api/chat", TOKEN_KEY, &chat);
        assert_refusal(
            &r,
            429,
            "token budget exceeded",
            &format!("on {} once more", node.name),
        );
    }
}
