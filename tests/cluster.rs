//! Several gateway instances sharing per-key limits through one Redis
//! (`shared_state`, issue 16): a rate limit, a concurrency cap, a token
//! budget and a revocation hold across the whole cluster; without Redis,
//! `on_redis_error: local` instances count alone and `deny` ones refuse
//! limited keys; when Redis comes back, all of it resumes by itself.
//!
//! Every test runs three real `ai-gateway` processes on loopback, each with
//! its own port and admin port, all pointed at the same key file and the
//! same real `redis-server` (see `tests/common/redis.rs`), and talks to
//! them over bare `TcpStream`s so the exact status and body of each answer
//! are checked. Tests wait by polling, never by sleeping; no test waits a
//! rate limit's window out.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

use common::redis::RedisServer;
use common::*;

// ---------------------------------------------------------------------------
// One cluster at a time
// ---------------------------------------------------------------------------

/// Three gateways, a Redis and the upstreams per test on a small machine:
/// the tests that measure propagation ("within 1 s") must not run beside
/// another cluster test. Each test holds this while its cluster runs.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

fn one_cluster() -> MutexGuard<'static, ()> {
    ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Configs and keys
// ---------------------------------------------------------------------------

/// How long an instance may take to see Redis come (back) up or go away:
/// it re-probes about every 250 ms; the rest is slack for a busy machine.
const REDIS_STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// The bound the issue sets on propagation: a token total, a revocation.
const PROPAGATION: Duration = Duration::from_secs(1);

/// The `shared_state` block of an instance using `redis`, falling back
/// to `mode` (`local` or `deny`) when it is unreachable.
fn shared_state(redis: &RedisServer, mode: &str) -> String {
    format!(
        "shared_state:\n  redis: \"{}\"\n  on_redis_error: {mode}\n",
        redis.url()
    )
}

/// One route in YAML flow style, prefix stripped; `extra` goes inside the
/// mapping (e.g. `", api: ollama"`).
fn route(name: &str, prefix: &str, service: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "  - {{name: {name}, path_prefix: \"{prefix}\", service: {service}, strip_prefix: true, upstreams: [\"{upstream}\"]{extra}}}\n"
    )
}

// ---------------------------------------------------------------------------
// Three instances
// ---------------------------------------------------------------------------

/// One gateway instance of a cluster.
struct Node {
    /// `A`, `B` or `C`, for messages.
    name: &'static str,
    gw: Gateway,
    /// Its admin listener (`/metrics`, `/readyz`).
    admin: SocketAddr,
}

impl Node {
    fn addr(&self) -> SocketAddr {
        self.gw.addr()
    }
}

/// Gateway instances sharing one key file (and, through their
/// `shared_state`, one Redis).
struct Cluster {
    nodes: Vec<Node>,
    /// The one key file every instance reads (outside their own dirs).
    keys_path: PathBuf,
    _keys_dir: TempDir,
}

const NAMES: [&str; 3] = ["A", "B", "C"];

/// The complete config of an instance: its own listener and admin
/// listener, the shared key file, no file watching (a key file change
/// must not be how a revocation arrives), `top` (e.g. a `shared_state`
/// block) and `routes`.
fn instance_config(
    port: u16,
    admin_port: u16,
    keys_file: &Path,
    top: &str,
    routes: &str,
) -> String {
    format!(
        "listen: \"127.0.0.1:{port}\"\nkeys_file: \"{}\"\nshutdown_grace: 5s\nthreads: 1\nwatch: false\nadmin_listen: \"127.0.0.1:{admin_port}\"\n{top}routes:\n{routes}",
        keys_file.display()
    )
}

impl Cluster {
    /// Writes `keys_json` once and starts one instance per entry of `tops`
    /// (the top-level settings of each, e.g. [`shared_state`] or nothing),
    /// all with `routes`. Waits until each answers HTTP and, for those with
    /// `shared_state`, until `agw_shared_state_up` is 1.
    fn start(tops: &[String], routes: &str, keys_json: &str) -> Cluster {
        let keys_dir = tempfile::Builder::new()
            .prefix("ai-gateway-cluster-keys-")
            .tempdir()
            .expect("create the shared key dir");
        let keys_path = keys_dir.path().join("keys.json");
        fs::write(&keys_path, keys_json).expect("write the shared key file");
        fs::set_permissions(&keys_path, fs::Permissions::from_mode(0o600))
            .expect("chmod 600 the shared key file");
        let nodes = tops
            .iter()
            .zip(NAMES)
            .map(|(top, name)| start_node(name, &keys_path, top, routes))
            .collect::<Vec<_>>();
        for (node, top) in nodes.iter().zip(tops) {
            if top.contains("shared_state:") {
                let up = wait_until(REDIS_STATE_TIMEOUT, || {
                    sample(&metrics(node.admin), "agw_shared_state_up") == Some(1.0)
                });
                assert!(
                    up,
                    "instance {}: agw_shared_state_up is not 1 after {REDIS_STATE_TIMEOUT:?} with Redis up; metrics:\n{}\nlog:\n{}",
                    node.name,
                    shared_metrics(node.admin),
                    node.gw.log()
                );
            }
        }
        Cluster {
            nodes,
            keys_path,
            _keys_dir: keys_dir,
        }
    }

    fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Asserts that no instance logged any of `secrets` (keys).
    fn assert_logs_never_show(&self, secrets: &[&str]) {
        for node in &self.nodes {
            let log = node.gw.log();
            for secret in secrets {
                assert!(
                    !log.contains(secret),
                    "instance {}'s log shows the key {secret:?}:\n{log}",
                    node.name
                );
            }
        }
    }
}

/// Starts one instance, retrying on fresh ports if one was taken in the
/// meantime. Its own dir holds its config and log (and an unused empty
/// `keys.json`: the config names the shared key file).
fn start_node(name: &'static str, keys_file: &Path, top: &str, routes: &str) -> Node {
    for attempt in 1.. {
        let port = free_port();
        let admin_port = free_port();
        let files = GatewayFiles::write(
            &instance_config(port, admin_port, keys_file, top, routes),
            "{}\n",
        );
        let mut gw = Gateway::spawn(files, port);
        match gw.wait_ready(READY_TIMEOUT) {
            Ok(()) => {
                return Node {
                    name,
                    gw,
                    admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
                }
            }
            Err(msg) => {
                if !(msg.to_ascii_lowercase().contains("in use") && attempt < 3) {
                    panic!("instance {name}: {msg}");
                }
            }
        }
    }
    unreachable!()
}

// ---------------------------------------------------------------------------
// A raw HTTP/1.1 client
// ---------------------------------------------------------------------------

/// Sends one request on a new connection (in one write) and reads the
/// whole answer; panics if there is none.
fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut s = connect(addr);
    // The gateway may refuse (and close) before it read the body.
    let _ = s.write_all(&request_bytes(addr, method, path, headers, body));
    read_response(&mut BufReader::new(s))
        .unwrap_or_else(|e| panic!("{method} {path} {headers:?}: no answer from {addr}: {e}"))
}

/// `GET path` with `X-API-Key: key`.
fn get(addr: SocketAddr, path: &str, key: &str) -> RawResponse {
    send(addr, "GET", path, &[("X-API-Key", key)], b"")
}

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

/// Asserts a gateway refusal with `status` whose body is JSON
/// `{"error": "<some text>"}` (the wording is the implementation's).
fn assert_json_error(r: &RawResponse, status: u16, what: &str) {
    let body: Option<Value> = serde_json::from_slice(&r.body).ok();
    let error_ok = body
        .as_ref()
        .and_then(|b| b.as_object())
        .is_some_and(|o| o.len() == 1 && o["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(
        r.status == status && error_ok && r.header("content-type") == Some("application/json"),
        "{what}: want {status} with a JSON {{\"error\": ...}} body, got {}",
        show(r)
    );
}

// ---------------------------------------------------------------------------
// Streams held open
// ---------------------------------------------------------------------------

/// [`open_stream`] that must succeed.
fn must_open(addr: SocketAddr, path: &str, key: &str, what: &str) -> OpenStream {
    open_stream(addr, path, key)
        .unwrap_or_else(|r| panic!("{what}: the stream was refused: {}", show(&r)))
}

/// Asserts that a stream request is refused with 429 `too many concurrent
/// requests` (reading only the answer's head if it is a stream); `redis`
/// is dumped into the failure message.
fn assert_stream_refused(addr: SocketAddr, path: &str, key: &str, redis: &RedisServer, what: &str) {
    match open_stream(addr, path, key) {
        Ok(st) => {
            let state = redis_dump(redis);
            drop(st);
            panic!("{what}: the stream opened (200) instead of a 429; Redis then held:\n{state}");
        }
        Err(r) => assert_refusal(&r, 429, "too many concurrent requests", what),
    }
}

/// Retries [`open_stream`] until it succeeds, refused meanwhile only with
/// 429 `too many concurrent requests`; returns the stream and how long it
/// took.
fn open_stream_within(
    addr: SocketAddr,
    path: &str,
    key: &str,
    timeout: Duration,
    what: &str,
) -> (OpenStream, Duration) {
    let start = Instant::now();
    loop {
        match open_stream(addr, path, key) {
            Ok(st) => return (st, start.elapsed()),
            Err(r) => {
                assert_refusal(&r, 429, "too many concurrent requests", what);
                if start.elapsed() >= timeout {
                    panic!("{what}: still 429 after {timeout:?}: the freed slot never reached this instance");
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Metrics and readiness
// ---------------------------------------------------------------------------

/// The Prometheus text of an admin listener.
fn metrics(admin: SocketAddr) -> String {
    let r = send(admin, "GET", "/metrics", &[], b"");
    assert_status(&r, 200, "GET /metrics");
    r.text()
}

/// The `agw_shared_state_*` and `agw_refused_total` lines, for messages.
fn shared_metrics(admin: SocketAddr) -> String {
    metrics(admin)
        .lines()
        .filter(|l| l.starts_with("agw_shared_state") || l.starts_with("agw_refused_total"))
        .collect::<Vec<_>>()
        .join("\n")
}

const UP: &str = "agw_shared_state_up";
const ERRORS: &str = "agw_shared_state_errors_total";
const FALLBACK_LOCAL: &str = "agw_shared_state_fallback_total{mode=\"local\"}";
const FALLBACK_DENY: &str = "agw_shared_state_fallback_total{mode=\"deny\"}";
const REFUSED_UNAVAILABLE: &str = "agw_refused_total{reason=\"shared_state_unavailable\"}";

/// Every key in `redis` with its type, value and time to live, for
/// failure messages.
fn redis_dump(redis: &RedisServer) -> String {
    let mut out = String::new();
    for k in redis.keys() {
        let kind = redis.command(&["TYPE", &k]);
        let value = match kind.trim_end() {
            "+string" => redis.command(&["GET", &k]),
            "+hash" => redis.command(&["HGETALL", &k]),
            "+set" => redis.command(&["SMEMBERS", &k]),
            other => other.to_string(),
        };
        let ttl = redis.command(&["PTTL", &k]);
        out.push_str(&format!(
            "  {k} ({}, pttl {}): {}\n",
            kind.trim(),
            ttl.trim(),
            value.trim().replace("\r\n", " ")
        ));
    }
    out
}

/// `GET /readyz` on an admin listener.
fn readyz(admin: SocketAddr) -> RawResponse {
    send(admin, "GET", "/readyz", &[], b"")
}

// ---------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------

/// Sends `n` requests with `key`, request `i` to instance `i % 3`; every
/// answer must be a 200 or the rate-limit 429. Returns the number admitted
/// per instance.
fn round_robin(cluster: &Cluster, key: &str, n: usize, what: &str) -> Vec<usize> {
    let mut admitted = vec![0; cluster.nodes.len()];
    for i in 0..n {
        let k = i % cluster.nodes.len();
        let node = cluster.node(k);
        let r = get(node.addr(), "/chat/x", key);
        if r.status == 200 {
            admitted[k] += 1;
        } else {
            let what = format!("{what}: request {} (on {})", i + 1, node.name);
            assert_refusal(&r, 429, "rate limit exceeded", &what);
            let wait = retry_after(&r);
            assert!(
                wait <= 60,
                "{what}: Retry-After {wait} for a per-minute limit"
            );
        }
    }
    admitted
}

/// Asserts the number of requests the cluster admitted for a limit of `n`
/// per window: never more than `n`, and at most 3 per instance short of it
/// (quota leased in batches and left unused).
fn assert_cluster_limit(admitted: &[usize], n: usize, what: &str) {
    let total: usize = admitted.iter().sum();
    let floor = n - 3 * admitted.len();
    assert!(
        total <= n,
        "{what}: {total} admitted for a limit of {n} across the cluster (per instance {admitted:?}): the limit was overshot"
    );
    assert!(
        total >= floor,
        "{what}: only {total} admitted for a limit of {n} (per instance {admitted:?}); at least {floor} expected"
    );
}

const RATE_KEY: &str = "cluster-rate-key-0001";

#[test]
fn a_rate_limit_holds_across_the_cluster_while_instances_without_shared_state_each_admit_it() {
    let _one = one_cluster();
    let redis = RedisServer::start();
    let echo = EchoServer::start();
    let routes = route("chat", "/chat/", "chat", echo.addr, "");
    let keys_json = keys(&[(
        RATE_KEY,
        r#""user": "ann", "service": "chat", "rate_limit": "60/min""#,
    )]);

    // Shared: 120 requests round-robin over three instances.
    let shared = Cluster::start(
        &[
            shared_state(&redis, "local"),
            shared_state(&redis, "local"),
            shared_state(&redis, "local"),
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
        &[String::new(), String::new(), String::new()],
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
            shared_state(&redis, "local"),
            shared_state(&redis, "local"),
            shared_state(&redis, "local"),
        ],
        &route("s", "/s/", "chat", up.addr, ""),
        &keys(&[(
            CONC_KEY,
            r#""user": "ann", "service": "chat", "max_concurrent": 2"#,
        )]),
    );
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));

    let on_a = must_open(a.addr(), "/s/gen", CONC_KEY, "a stream on A");
    let on_b = must_open(b.addr(), "/s/gen", CONC_KEY, "a stream on B");
    assert_stream_refused(
        c.addr(),
        "/s/gen",
        CONC_KEY,
        &redis,
        "a third stream, on C, while A's and B's run",
    );
    assert_stream_refused(
        a.addr(),
        "/s/gen",
        CONC_KEY,
        &redis,
        "a third stream, on A, while A's and B's run",
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
    let (on_c, took) = open_stream_within(
        c.addr(),
        "/s/gen",
        CONC_KEY,
        Duration::from_secs(2),
        "a stream on C after A's and B's ended",
    );
    eprintln!("C admitted {took:?} after the streams on A and B ended");
    let (again_a, _) = open_stream_within(
        a.addr(),
        "/s/gen",
        CONC_KEY,
        Duration::from_secs(2),
        "a second stream, on A, beside C's",
    );
    // C's and A's are open: the cap holds again, everywhere.
    assert_stream_refused(
        b.addr(),
        "/s/gen",
        CONC_KEY,
        &redis,
        "a third stream, on B, beside C's and A's",
    );
    assert_stream_refused(
        c.addr(),
        "/s/gen",
        CONC_KEY,
        &redis,
        "a third stream, on C, beside C's and A's",
    );
    assert_eq!(up.hits(), 4, "a refused request reached the upstream");
    drop(on_c);
    drop(again_a);
}

// ---------------------------------------------------------------------------
// Token budgets
// ---------------------------------------------------------------------------

const TOKEN_KEY: &str = "cluster-token-key-0001";

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
            shared_state(&redis, "local"),
            shared_state(&redis, "local"),
            shared_state(&redis, "local"),
        ],
        &route("ollama", "/ollama/", "ai", model.addr, ", api: ollama"),
        &keys(&[(
            TOKEN_KEY,
            r#""user": "tok", "service": "ai", "token_limit": "20/min""#,
        )]),
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

// ---------------------------------------------------------------------------
// Revocation
// ---------------------------------------------------------------------------

const REVOKED_KEY: &str = "cluster-revoke-key-0001";
const KEPT_KEY: &str = "cluster-keep-key-0002";

#[test]
fn keys_revoke_shared_is_refused_on_every_instance_within_a_second_without_a_key_file_change() {
    let _one = one_cluster();
    let redis = RedisServer::start();
    let echo = EchoServer::start();
    let routes = route("chat", "/chat/", "chat", echo.addr, "");
    let keys_json = keys(&[
        (REVOKED_KEY, r#""user": "rev", "service": "chat""#),
        (KEPT_KEY, r#""user": "kept", "service": "chat""#),
    ]);
    let cluster = Cluster::start(
        &[
            shared_state(&redis, "local"),
            shared_state(&redis, "local"),
            shared_state(&redis, "local"),
        ],
        &routes,
        &keys_json,
    );
    for node in &cluster.nodes {
        for key in [REVOKED_KEY, KEPT_KEY] {
            assert_status(
                &get(node.addr(), "/chat/x", key),
                200,
                &format!("{key} on {} before the revocation", node.name),
            );
        }
    }
    let file_before = fs::read(&cluster.keys_path).expect("read the shared key file");

    // The CLI gets its own config and a copy of the key file, with the same
    // shared_state: the instances' key file never changes.
    let cli = GatewayFiles::write(
        &default_config(
            free_port(),
            &format!("{}routes:\n{routes}", shared_state(&redis, "local")),
        ),
        &keys_json,
    );
    let out = run_cli(
        &[
            "keys",
            "revoke",
            &key_id(REVOKED_KEY),
            "--shared",
            "--config",
            s(&cli.config_path),
        ],
        cli.dir.path(),
    );
    let exited = Instant::now();
    assert!(
        out.status.success(),
        "keys revoke --shared: {}{}",
        out.stdout,
        out.stderr
    );

    let deadline = exited + PROPAGATION;
    for node in &cluster.nodes {
        loop {
            let sent = Instant::now();
            assert!(
                sent <= deadline,
                "instance {}: the revoked key is still served {PROPAGATION:?} after `keys revoke --shared` exited; log:\n{}",
                node.name,
                node.gw.log()
            );
            let r = get(node.addr(), "/chat/x", REVOKED_KEY);
            if r.status == 401 {
                assert_refusal(
                    &r,
                    401,
                    "api key revoked",
                    &format!("the revoked key on {}", node.name),
                );
                eprintln!(
                    "instance {}: refused {:?} after the CLI exited",
                    node.name,
                    sent - exited
                );
                break;
            }
            assert_status(
                &r,
                200,
                &format!("the key on {} before it is refused", node.name),
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
    for node in &cluster.nodes {
        assert_refusal(
            &get(node.addr(), "/chat/x", REVOKED_KEY),
            401,
            "api key revoked",
            &format!("the revoked key on {}, once more", node.name),
        );
        assert_status(
            &get(node.addr(), "/chat/x", KEPT_KEY),
            200,
            &format!("another key on {}", node.name),
        );
    }

    // Nothing reached the instances through their key file...
    assert_eq!(
        fs::read(&cluster.keys_path).expect("read the shared key file"),
        file_before,
        "the instances' key file changed"
    );
    // ... while the CLI revoked the key in the file its config names.
    let copy: Value = serde_json::from_slice(&fs::read(&cli.keys_path).expect("read the copy"))
        .expect("the CLI's key file is JSON");
    assert_eq!(
        copy[REVOKED_KEY]["disabled"],
        Value::Bool(true),
        "the CLI's key file: {copy}"
    );
    assert!(
        copy[KEPT_KEY].get("disabled").is_none(),
        "the CLI's key file: {copy}"
    );
    cluster.assert_logs_never_show(&[REVOKED_KEY, KEPT_KEY]);
}

#[test]
fn keys_revoke_shared_without_shared_state_fails_naming_it_and_changes_nothing() {
    let keys_json = keys(&[(REVOKED_KEY, r#""user": "rev", "service": "chat""#)]);
    let files = GatewayFiles::write(
        &default_config(
            free_port(),
            &format!(
                "routes:\n{}",
                route("chat", "/chat/", "chat", refused_addr(), "")
            ),
        ),
        &keys_json,
    );
    let out = run_cli(
        &[
            "keys",
            "revoke",
            &key_id(REVOKED_KEY),
            "--shared",
            "--config",
            s(&files.config_path),
        ],
        files.dir.path(),
    );
    assert!(
        !out.status.success(),
        "keys revoke --shared with a config without shared_state succeeded: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("shared_state"),
        "the error does not name shared_state: {}",
        out.stderr
    );
    assert_eq!(
        fs::read_to_string(&files.keys_path).expect("read the key file"),
        keys_json,
        "the failed command changed the key file"
    );
}

// ---------------------------------------------------------------------------
// Redis going away and coming back
// ---------------------------------------------------------------------------

/// Rate limit 5/min, used only once Redis is down (on A, then on B).
const DOWN_LOCAL_KEY: &str = "cluster-down-local-0001";
/// Rate limit 5/min, on the `deny` instance C.
const DOWN_DENY_KEY: &str = "cluster-down-deny-0002";
/// No limit at all.
const DOWN_PLAIN_KEY: &str = "cluster-down-plain-0003";
/// Rate limit 30/min, used only once Redis is back.
const DOWN_AFTER_KEY: &str = "cluster-down-after-0004";

/// Sends `n` requests with `key` to `node`: 200s or the rate-limit 429.
/// Returns the number admitted.
fn admitted_on(node: &Node, key: &str, n: usize, what: &str) -> usize {
    let mut admitted = 0;
    for i in 1..=n {
        let r = get(node.addr(), "/chat/x", key);
        if r.status == 200 {
            admitted += 1;
        } else {
            assert_refusal(
                &r,
                429,
                "rate limit exceeded",
                &format!("{what}: request {i} on {}", node.name),
            );
        }
    }
    admitted
}

#[test]
fn without_redis_local_instances_count_alone_and_deny_refuses_then_both_recover_when_it_returns() {
    let _one = one_cluster();
    let mut redis = RedisServer::start();
    let echo = EchoServer::start();
    let all_keys = [
        DOWN_LOCAL_KEY,
        DOWN_DENY_KEY,
        DOWN_PLAIN_KEY,
        DOWN_AFTER_KEY,
    ];
    let cluster = Cluster::start(
        &[
            shared_state(&redis, "local"),
            shared_state(&redis, "local"),
            shared_state(&redis, "deny"),
        ],
        &route("chat", "/chat/", "chat", echo.addr, ""),
        &keys(&[
            (
                DOWN_LOCAL_KEY,
                r#""user": "loc", "service": "chat", "rate_limit": "5/min""#,
            ),
            (
                DOWN_DENY_KEY,
                r#""user": "den", "service": "chat", "rate_limit": "5/min""#,
            ),
            (DOWN_PLAIN_KEY, r#""user": "pla", "service": "chat""#),
            (
                DOWN_AFTER_KEY,
                r#""user": "aft", "service": "chat", "rate_limit": "30/min""#,
            ),
        ]),
    );
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));

    // Healthy: everything served, every instance ready.
    assert_status(
        &get(c.addr(), "/chat/x", DOWN_DENY_KEY),
        200,
        "the limited key on the deny instance C with Redis up",
    );
    for node in &cluster.nodes {
        assert_status(
            &readyz(node.admin),
            200,
            &format!("/readyz on {} with Redis up", node.name),
        );
    }
    let errors_before: Vec<f64> = cluster
        .nodes
        .iter()
        .map(|n| metric_at(n.admin, ERRORS))
        .collect();
    let local_before = metric_at(a.admin, FALLBACK_LOCAL);
    let deny_before = metric_at(c.admin, FALLBACK_DENY);
    let unavailable_before = metric_at(c.admin, REFUSED_UNAVAILABLE);

    redis.stop();

    // `local`: A counts the limited key alone, to its own 5; so does B.
    let on_a = admitted_on(a, DOWN_LOCAL_KEY, 8, "Redis down, local");
    assert_eq!(
        on_a,
        5,
        "A (on_redis_error: local) with Redis down: a 5/min key should be served and limited at 5 locally; metrics:\n{}\nlog:\n{}",
        shared_metrics(a.admin),
        a.gw.log()
    );
    let on_b = admitted_on(b, DOWN_LOCAL_KEY, 8, "Redis down, local");
    assert_eq!(
        on_b,
        5,
        "B (on_redis_error: local) with Redis down counts alone too; metrics:\n{}",
        shared_metrics(b.admin)
    );
    assert_status(
        &get(a.addr(), "/chat/x", DOWN_PLAIN_KEY),
        200,
        "a key without limits on A with Redis down",
    );

    // `deny`: C refuses limited keys with a 503 JSON error; others pass.
    let mut refused_on_c = 0.0;
    for key in [DOWN_DENY_KEY, DOWN_LOCAL_KEY] {
        let r = get(c.addr(), "/chat/x", key);
        assert_json_error(
            &r,
            503,
            &format!("a limited key on C (on_redis_error: deny) with Redis down ({key})"),
        );
        refused_on_c += 1.0;
    }
    assert_status(
        &get(c.addr(), "/chat/x", DOWN_PLAIN_KEY),
        200,
        "a key without limits on C (deny) with Redis down",
    );

    // The gauges and counters say so.
    for (node, before) in cluster.nodes.iter().zip(&errors_before) {
        let seen = wait_until(REDIS_STATE_TIMEOUT, || {
            let m = metrics(node.admin);
            sample(&m, UP) == Some(0.0) && sample(&m, ERRORS).unwrap_or(0.0) > *before
        });
        assert!(
            seen,
            "instance {}: with Redis down, want {UP} 0 and {ERRORS} above {before}; got:\n{}",
            node.name,
            shared_metrics(node.admin)
        );
    }
    let local_now = metric_at(a.admin, FALLBACK_LOCAL);
    assert!(
        local_now > local_before,
        "A: {FALLBACK_LOCAL} {local_before} -> {local_now}"
    );
    let deny_now = metric_at(c.admin, FALLBACK_DENY);
    assert!(
        deny_now > deny_before,
        "C: {FALLBACK_DENY} {deny_before} -> {deny_now}"
    );
    let unavailable_now = metric_at(c.admin, REFUSED_UNAVAILABLE);
    assert_eq!(
        unavailable_now - unavailable_before,
        refused_on_c,
        "C: {REFUSED_UNAVAILABLE} should count each 503"
    );

    // Readiness: `deny` is not ready without Redis, `local` is.
    let not_ready = wait_until(REDIS_STATE_TIMEOUT, || readyz(c.admin).status == 503);
    let r = readyz(c.admin);
    assert!(
        not_ready && r.status == 503,
        "/readyz on C (deny) with Redis down: {}",
        show(&r)
    );
    assert!(
        r.text().to_ascii_lowercase().contains("redis"),
        "/readyz on C does not say Redis is the reason: {}",
        show(&r)
    );
    assert_status(
        &readyz(a.admin),
        200,
        "/readyz on A (local) with Redis down",
    );

    // The log says why, once the address is unreachable.
    for node in [a, c] {
        assert!(
            node.gw
                .wait_log_contains("shared state", REDIS_STATE_TIMEOUT),
            "instance {}: no log line about the shared state with Redis down:\n{}",
            node.name,
            node.gw.log()
        );
    }

    // Redis back on the same port; no gateway is restarted.
    redis.restart();
    let restarted = Instant::now();
    for node in &cluster.nodes {
        let up = wait_until(REDIS_STATE_TIMEOUT, || {
            sample(&metrics(node.admin), UP) == Some(1.0)
        });
        assert!(
            up,
            "instance {}: {UP} not back to 1 {REDIS_STATE_TIMEOUT:?} after Redis returned:\n{}",
            node.name,
            shared_metrics(node.admin)
        );
    }
    eprintln!(
        "every instance saw Redis back after {:?}",
        restarted.elapsed()
    );
    assert!(
        wait_until(REDIS_STATE_TIMEOUT, || readyz(c.admin).status == 200),
        "/readyz on C after Redis returned: {}",
        show(&readyz(c.admin))
    );
    let mut last = None;
    let served = wait_until(REDIS_STATE_TIMEOUT, || {
        let r = get(c.addr(), "/chat/x", DOWN_DENY_KEY);
        let ok = r.status == 200;
        last = Some(r);
        ok
    });
    assert!(
        served,
        "C (deny) still refuses the limited key after Redis returned: {}",
        last.as_ref().map(show).unwrap_or_default()
    );

    // Shared counting resumed: a fresh 30/min key holds across the cluster,
    // counted in the new (empty) Redis.
    let resumed = round_robin(&cluster, DOWN_AFTER_KEY, 60, "after Redis returned");
    assert_cluster_limit(
        &resumed,
        30,
        "after Redis returned, 60 requests round-robin",
    );
    let in_redis = redis.keys();
    assert!(
        !in_redis.is_empty(),
        "after Redis returned, the cluster counted nothing in it"
    );
    assert!(
        in_redis
            .iter()
            .all(|k| all_keys.iter().all(|key| !k.contains(key))),
        "a Redis key name holds an API key: {in_redis:?}"
    );
    cluster.assert_logs_never_show(&all_keys);
}

// ---------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------

const CHECK_KEYS: &str = r#"{"cluster-check-key-0001": {"user": "ann", "service": "chat"}}"#;

/// A complete config with `shared_state_block` (top level) and one route.
fn check_config(shared_state_block: &str) -> String {
    default_config(
        free_port(),
        &format!(
            "{shared_state_block}routes:\n  - name: chat\n    path_prefix: /chat/\n    service: chat\n    upstreams: [\"127.0.0.1:9\"]\n"
        ),
    )
}

/// Writes `config_yaml` (complete) and a key file, runs `check` on them.
fn check(config_yaml: &str) -> (GatewayFiles, CliOutput) {
    let files = GatewayFiles::write(config_yaml, CHECK_KEYS);
    let out = run_cli(
        &["check", "--config", s(&files.config_path)],
        files.dir.path(),
    );
    (files, out)
}

/// The 1-based number of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"))
        + 1
}

/// Asserts a failed `check` whose stderr names `file`, then `line` (as
/// `file:line:`), then a reason.
fn assert_check_fails_at(out: &CliOutput, file: &Path, line: usize, what: &str) {
    assert!(
        !out.status.success(),
        "{what}: check should fail; stdout: {} stderr: {}",
        out.stdout,
        out.stderr
    );
    let name = format!("{}:", file.display());
    let err = &out.stderr;
    let at = err
        .find(&name)
        .unwrap_or_else(|| panic!("{what}: stderr does not name {}: {err}", file.display()));
    let after = &err[at + name.len()..];
    let reported = after
        .split(':')
        .next()
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("{what}: no line number after the file name: {err}"));
    assert_eq!(reported, line, "{what}: the wrong line: {err}");
    let reason: String = after
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphabetic())
        .collect();
    assert!(
        reason.len() >= 5,
        "{what}: no reason after {}:{line}: {err}",
        file.display()
    );
}

#[test]
fn check_names_the_file_and_line_of_a_bad_redis_url_and_passes_a_good_one_without_connecting() {
    // The bad URL first in its mapping, then after another setting: the
    // error names the URL's own line either way.
    for bad in ["http://x", "redis://127.0.0.1:99999999/0", "not a url"] {
        for block in [
            format!("shared_state:\n  redis: \"{bad}\"\n  on_redis_error: deny\n"),
            format!(
                "shared_state:\n  on_redis_error: deny\n  timeout: 100ms\n  redis: \"{bad}\"\n"
            ),
        ] {
            let text = check_config(&block);
            let (files, out) = check(&text);
            assert_check_fails_at(
                &out,
                &files.config_path,
                line_of(&text, bad),
                &format!("redis: {bad:?} in\n{block}"),
            );
        }
    }
    let text = check_config(
        "shared_state:\n  redis: \"redis://127.0.0.1:6379/0\"\n  on_redis_error: maybe\n",
    );
    let (files, out) = check(&text);
    assert_check_fails_at(
        &out,
        &files.config_path,
        line_of(&text, "maybe"),
        "on_redis_error: maybe",
    );

    // Good URLs to a port that accepts connections but is never served:
    // `check` passes and never connects.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a listener nobody serves");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let port = listener.local_addr().expect("listener address").port();
    for block in [
        format!("shared_state:\n  redis: \"redis://127.0.0.1:{port}/0\"\n"),
        format!(
            "shared_state:\n  redis: \"redis://:pw@127.0.0.1:{port}/2\"\n  on_redis_error: deny\n  timeout: 250ms\n"
        ),
        format!(
            "shared_state:\n  redis: \"rediss://user:pw@localhost:{port}/0\"\n  on_redis_error: local\n  timeout: 1s\n"
        ),
    ] {
        let (_files, out) = check(&check_config(&block));
        assert!(
            out.status.success(),
            "check refused a good shared_state:\n{block}stderr: {}",
            out.stderr
        );
    }
    match listener.accept() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("`check` connected to the Redis address (from {peer})"),
        Err(e) => panic!("accept on the unserved listener: {e}"),
    }
    // A port where nothing listens at all passes too.
    let nothing = refused_addr();
    let (_files, out) = check(&check_config(&format!(
        "shared_state:\n  redis: \"redis://{nothing}/0\"\n  on_redis_error: deny\n"
    )));
    assert!(
        out.status.success(),
        "check refused a Redis address where nothing listens: {}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------
// The failed-key throttle and revocations by reload
// ---------------------------------------------------------------------------

const GOOD_KEY: &str = "cluster-good-key-0001";

/// Failures spread over the instances add up in Redis: the one that
/// reaches `max_failures` blocks the address on every instance, although
/// none of them saw enough failures to block it alone.
#[test]
fn failed_keys_on_several_instances_add_up_and_block_the_address_everywhere() {
    let _one = one_cluster();
    let redis = RedisServer::start();
    let echo = EchoServer::start();
    let routes = route("chat", "/chat/", "chat", echo.addr, "");
    let keys_json = keys(&[(GOOD_KEY, r#""user": "ann", "service": "chat""#)]);
    let top = format!(
        "{}failed_key_throttle: {{max_failures: 6, window: 60s, cooldown: 30s}}\n",
        shared_state(&redis, "local")
    );
    let cluster = Cluster::start(&[top.clone(), top.clone(), top], &routes, &keys_json);
    // Two failures on each instance: six in all, two per instance.
    for i in 0..6 {
        let node = cluster.node(i % 3);
        let r = get(node.addr(), "/chat/x", &format!("cluster-wrong-key-{i:04}"));
        assert_refusal(
            &r,
            401,
            "invalid api key",
            &format!("wrong key {i} on {}", node.name),
        );
    }
    for node in &cluster.nodes {
        let deadline = Instant::now() + PROPAGATION;
        loop {
            let r = get(node.addr(), "/chat/x", GOOD_KEY);
            if r.status == 429 {
                assert_refusal(
                    &r,
                    429,
                    "too many failed key attempts",
                    &format!("the good key from the blocked address on {}", node.name),
                );
                let wait = retry_after(&r);
                assert!(
                    (1..=30).contains(&wait),
                    "Retry-After {wait} for a 30 s block"
                );
                break;
            }
            assert_status(
                &r,
                200,
                &format!("the good key on {} before the block", node.name),
            );
            assert!(
                Instant::now() < deadline,
                "instance {}: the address is not blocked {PROPAGATION:?} after six failures across the cluster; log:\n{}",
                node.name,
                node.gw.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
    let blocked_lines: usize = cluster
        .nodes
        .iter()
        .map(|n| n.gw.log().matches("throttled on every instance").count())
        .sum();
    assert_eq!(blocked_lines, 1, "one instance logs the block it made");
    cluster.assert_logs_never_show(&[GOOD_KEY, "cluster-wrong-key-0000"]);
}

/// A key newly `disabled` in the key file one instance reloads is refused
/// by the instances that have not reloaded (their copy of the file is
/// older): the reload publishes it.
#[test]
fn a_key_disabled_by_one_instances_reload_is_refused_by_the_others() {
    let _one = one_cluster();
    let redis = RedisServer::start();
    let echo = EchoServer::start();
    let routes = route("chat", "/chat/", "chat", echo.addr, "");
    let keys_json = keys(&[
        (REVOKED_KEY, r#""user": "rev", "service": "chat""#),
        (KEPT_KEY, r#""user": "kept", "service": "chat""#),
    ]);
    let cluster = Cluster::start(
        &[
            shared_state(&redis, "local"),
            shared_state(&redis, "local"),
            shared_state(&redis, "local"),
        ],
        &routes,
        &keys_json,
    );
    for node in &cluster.nodes {
        assert_status(&get(node.addr(), "/chat/x", REVOKED_KEY), 200, "before");
    }
    // Only A reloads the changed file (watch is off): B and C keep the
    // old key set.
    fs::write(
        &cluster.keys_path,
        keys(&[
            (
                REVOKED_KEY,
                r#""user": "rev", "service": "chat", "disabled": true"#,
            ),
            (KEPT_KEY, r#""user": "kept", "service": "chat""#),
        ]),
    )
    .expect("rewrite the key file");
    let a = cluster.node(0);
    a.gw.signal("HUP");
    assert!(
        a.gw.wait_log_contains("newly disabled, published", Duration::from_secs(10)),
        "A did not publish the disabled key; log:\n{}",
        a.gw.log()
    );
    let published = Instant::now();
    for node in &cluster.nodes {
        let refused = wait_until(PROPAGATION, || {
            get(node.addr(), "/chat/x", REVOKED_KEY).status == 401
        });
        assert!(
            refused,
            "instance {}: the key disabled on A is still served {PROPAGATION:?} after A published it",
            node.name
        );
        assert_status(&get(node.addr(), "/chat/x", KEPT_KEY), 200, "the other key");
    }
    eprintln!(
        "refused everywhere {:?} after A's reload published it",
        published.elapsed()
    );
    for node in &cluster.nodes[1..] {
        assert!(
            !node.gw.log().contains("reload ("),
            "instance {} reloaded: the refusal must come from Redis",
            node.name
        );
    }
    assert!(
        redis
            .command(&["SISMEMBER", "agw:revoked", &key_id(REVOKED_KEY)])
            .contains(":1"),
        "the id is kept in agw:revoked for instances started later"
    );
}

// ---------------------------------------------------------------------------
// A password and TLS to Redis
// ---------------------------------------------------------------------------

const TLS_KEY: &str = "cluster-tls-key-0001";
const REDIS_PASSWORD: &str = "s3cret-redis-pw";

/// `shared_state` for a TLS Redis with a password, verified against `ca`.
fn tls_shared_state(port: u16, password: &str, ca: &Path) -> String {
    format!(
        "shared_state:\n  redis: \"rediss://:{password}@localhost:{port}/0\"\n  ca: \"{}\"\n",
        ca.display()
    )
}

/// The password and TLS come from the URL (and `ca` for a private CA):
/// counting is shared over them, the password never shows in a log, and a
/// wrong password or a CA that did not sign Redis's certificate leaves the
/// instance counting locally, saying so.
#[test]
fn a_password_and_tls_to_redis_are_used_and_the_password_never_logged() {
    let _one = one_cluster();
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = common::tls::TestCa::new("redis test CA");
    let leaf = ca.leaf(&["localhost", "127.0.0.1"], 7, 30);
    let (cert, key, ca_file) = (
        dir.path().join("redis.crt"),
        dir.path().join("redis.key"),
        dir.path().join("ca.pem"),
    );
    leaf.write(&cert, &key);
    fs::write(&ca_file, &ca.pem).expect("write the CA");
    let other_ca_file = dir.path().join("other-ca.pem");
    fs::write(&other_ca_file, common::tls::TestCa::new("another CA").pem).expect("write");
    let tls_port = free_port();
    let tls_port_arg = tls_port.to_string();
    let redis = RedisServer::start_with(&[
        "--requirepass",
        REDIS_PASSWORD,
        "--tls-port",
        &tls_port_arg,
        "--tls-cert-file",
        s(&cert),
        "--tls-key-file",
        s(&key),
        "--tls-ca-cert-file",
        s(&ca_file),
        "--tls-auth-clients",
        "no",
    ]);
    let echo = EchoServer::start();
    let routes = route("chat", "/chat/", "chat", echo.addr, "");
    let keys_json = keys(&[(
        TLS_KEY,
        r#""user": "ann", "service": "chat", "rate_limit": "10/min""#,
    )]);
    let good = tls_shared_state(tls_port, REDIS_PASSWORD, &ca_file);
    let cluster = Cluster::start(&[good.clone(), good], &routes, &keys_json);
    let admitted = round_robin(&cluster, TLS_KEY, 20, "over TLS with a password");
    assert_cluster_limit(&admitted, 10, "10/min over TLS, two instances");
    assert!(
        redis.command(&["AUTH", REDIS_PASSWORD]).starts_with("+OK"),
        "the test's own check of the password"
    );

    // A wrong password, and a CA that did not sign the server's
    // certificate: never up, errors counted, requests served locally.
    let wrong_pw = start_node(
        "wrong password",
        &cluster.keys_path,
        &tls_shared_state(tls_port, "not-the-password", &ca_file),
        &routes,
    );
    let wrong_ca = start_node(
        "wrong CA",
        &cluster.keys_path,
        &tls_shared_state(tls_port, REDIS_PASSWORD, &other_ca_file),
        &routes,
    );
    for node in [&wrong_pw, &wrong_ca] {
        let errors = wait_until(REDIS_STATE_TIMEOUT, || metric_at(node.admin, ERRORS) >= 1.0);
        assert!(
            errors,
            "{}: no shared-state error counted; metrics:\n{}",
            node.name,
            shared_metrics(node.admin)
        );
        assert_eq!(metric_at(node.admin, UP), 0.0, "{}: up", node.name);
        assert_status(
            &get(node.addr(), "/chat/x", TLS_KEY),
            200,
            &format!("{}: counted locally, its own 10/min", node.name),
        );
        assert!(
            wait_until(REDIS_STATE_TIMEOUT, || node
                .gw
                .log()
                .contains("shared state")),
            "{}: nothing logged about Redis; log:\n{}",
            node.name,
            node.gw.log()
        );
    }
    for log in cluster
        .nodes
        .iter()
        .map(|n| n.gw.log())
        .chain([wrong_pw.gw.log(), wrong_ca.gw.log()])
    {
        assert!(
            !log.contains(REDIS_PASSWORD),
            "a log shows the password:\n{log}"
        );
        assert!(
            !log.contains("not-the-password"),
            "a log shows the password:\n{log}"
        );
        assert!(!log.contains(TLS_KEY), "a log shows the key:\n{log}");
    }
}

// ---------------------------------------------------------------------------
// A slow Redis
// ---------------------------------------------------------------------------

const SLOW_KEY: &str = "cluster-slow-key-0001";

/// A Redis that stops answering (busy for 3 s: `DEBUG SLEEP`) holds a
/// request no longer than `shared_state.timeout`: the request is decided
/// locally (`local`), the error counted, and sharing resumes once Redis
/// answers again.
#[test]
fn a_slow_redis_holds_a_request_no_longer_than_the_timeout() {
    let _one = one_cluster();
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let echo = EchoServer::start();
    let top = format!("{}  timeout: 200ms\n", shared_state(&redis, "local"));
    let cluster = Cluster::start(
        &[top],
        &route("chat", "/chat/", "chat", echo.addr, ""),
        &keys(&[(
            SLOW_KEY,
            r#""user": "slo", "service": "chat", "rate_limit": "100/min""#,
        )]),
    );
    let node = cluster.node(0);
    // Redis is single-threaded: while it sleeps, nothing is answered.
    let port = redis.port();
    let sleeper = thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
        s.write_all(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$1\r\n3\r\n")
            .expect("send DEBUG SLEEP");
        let mut reply = [0u8; 16];
        let n = s.read(&mut reply).unwrap_or(0);
        String::from_utf8_lossy(&reply[..n]).into_owned()
    });
    // Until Redis stops answering PING, it has not started sleeping.
    assert!(
        wait_until(Duration::from_secs(2), || {
            TcpStream::connect(("127.0.0.1", port))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_millis(100)))?;
                    s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
                    let mut b = [0u8; 8];
                    s.read(&mut b)
                })
                .is_err()
        }),
        "redis never started sleeping"
    );
    // The key's first request needs a lease from Redis.
    let sent = Instant::now();
    let r = get(node.addr(), "/chat/x", SLOW_KEY);
    let took = sent.elapsed();
    assert_status(
        &r,
        200,
        "the limited key while Redis sleeps (counted locally)",
    );
    assert!(
        took < Duration::from_millis(1500),
        "the request waited {took:?} for a sleeping Redis (timeout 200ms)"
    );
    assert!(
        metric_at(node.admin, ERRORS) >= 1.0,
        "the timeout is counted"
    );
    assert!(
        metric_at(node.admin, FALLBACK_LOCAL) >= 1.0,
        "decided locally"
    );
    // Later requests do not wait at all: Redis is marked down.
    let sent = Instant::now();
    assert_status(&get(node.addr(), "/chat/x", SLOW_KEY), 200, "again");
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(sleeper.join().expect("the sleeper"), "+OK\r\n");
    assert!(
        wait_until(REDIS_STATE_TIMEOUT, || metric_at(node.admin, UP) == 1.0),
        "Redis answers again: up; metrics:\n{}",
        shared_metrics(node.admin)
    );
    assert!(
        node.gw.log().contains("shared state: redis"),
        "the slow Redis is logged"
    );
}
