//! Keys across a cluster of instances sharing one Redis (`shared_state`):
//! `keys revoke --shared` refused everywhere within a second (and failing
//! without shared state), a key disabled by one instance's reload refused
//! by the others, and failed key checks on several instances adding up to
//! block an address everywhere.
//!
//! Every test runs real `ai-gateway` processes on loopback (see
//! `tests/common/cluster.rs`), all pointed at the same key file and the
//! same real `redis-server`, and talks to them over bare `TcpStream`s so
//! the exact status and body of each answer are checked. Tests wait by
//! polling, never by sleeping; no test waits a rate limit's window out.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::cluster::*;
use common::redis::RedisServer;
use common::*;

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
    let routes = Route::chat(echo.addr);
    let keys_json = KeyFile::of([
        Key::new(REVOKED_KEY, "rev").service("chat"),
        Key::new(KEPT_KEY, "kept").service("chat"),
    ]);
    let cluster = Cluster::start(
        &[
            shared(&redis, "local"),
            shared(&redis, "local"),
            shared(&redis, "local"),
        ],
        &routes,
        &keys_json,
    );
    for node in &cluster.nodes {
        for key in [REVOKED_KEY, KEPT_KEY] {
            assert_status(
                &get_keyed(node.addr(), "/chat/x", key, &[]),
                200,
                &format!("{key} on {} before the revocation", node.name),
            );
        }
    }
    let file_before = fs::read(&cluster.keys_path).expect("read the shared key file");

    // The CLI gets its own config and a copy of the key file, with the same
    // shared_state: the instances' key file never changes.
    let cli = GatewayFiles::write(
        shared(&redis, "local")
            .listen(loopback(free_port()))
            .route(routes.clone()),
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
            let r = get_keyed(node.addr(), "/chat/x", REVOKED_KEY, &[]);
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
            &get_keyed(node.addr(), "/chat/x", REVOKED_KEY, &[]),
            401,
            "api key revoked",
            &format!("the revoked key on {}, once more", node.name),
        );
        assert_status(
            &get_keyed(node.addr(), "/chat/x", KEPT_KEY, &[]),
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
    let keys_json = KeyFile::of([Key::new(REVOKED_KEY, "rev").service("chat")]).render();
    let files = GatewayFiles::write(
        GatewayConfig::new()
            .listen(loopback(free_port()))
            .route(Route::chat(refused_addr())),
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

/// A key newly `disabled` in the key file one instance reloads is refused
/// by the instances that have not reloaded (their copy of the file is
/// older): the reload publishes it.
#[test]
fn a_key_disabled_by_one_instances_reload_is_refused_by_the_others() {
    let _one = one_cluster();
    let redis = RedisServer::start();
    let echo = EchoServer::start();
    let routes = Route::chat(echo.addr);
    let keys_json = KeyFile::of([
        Key::new(REVOKED_KEY, "rev").service("chat"),
        Key::new(KEPT_KEY, "kept").service("chat"),
    ]);
    let cluster = Cluster::start(
        &[
            shared(&redis, "local"),
            shared(&redis, "local"),
            shared(&redis, "local"),
        ],
        &routes,
        &keys_json,
    );
    for node in &cluster.nodes {
        assert_status(
            &get_keyed(node.addr(), "/chat/x", REVOKED_KEY, &[]),
            200,
            "before",
        );
    }
    // Only A reloads the changed file (watch is off): B and C keep the
    // old key set.
    fs::write(
        &cluster.keys_path,
        KeyFile::of([
            Key::new(REVOKED_KEY, "rev").service("chat").disabled(true),
            Key::new(KEPT_KEY, "kept").service("chat"),
        ])
        .render(),
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
            get_keyed(node.addr(), "/chat/x", REVOKED_KEY, &[]).status == 401
        });
        assert!(
            refused,
            "instance {}: the key disabled on A is still served {PROPAGATION:?} after A published it",
            node.name
        );
        assert_status(
            &get_keyed(node.addr(), "/chat/x", KEPT_KEY, &[]),
            200,
            "the other key",
        );
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
// The failed-key throttle
// ---------------------------------------------------------------------------

const GOOD_KEY: &str = "cluster-good-key-0001";

/// A right key of another service: before the block a 403 (not a failed
/// key), during it the block's 429, as it never worked from the address.
const OTHER_SERVICE_KEY: &str = "cluster-tts-key-0002";

/// Failures spread over the instances add up in Redis: the one that
/// reaches `max_failures` blocks the address on every instance, although
/// none of them saw enough failures to block it alone. (The probe is a key
/// that never worked from the address: one that did stays served during a
/// block, see tests/throttle.rs.)
#[test]
fn failed_keys_on_several_instances_add_up_and_block_the_address_everywhere() {
    let _one = one_cluster();
    let redis = RedisServer::start();
    let echo = EchoServer::start();
    let routes = Route::chat(echo.addr);
    let keys_json = KeyFile::of([
        Key::new(GOOD_KEY, "ann").service("chat"),
        Key::new(OTHER_SERVICE_KEY, "tts").service("tts"),
    ]);
    let top = shared(&redis, "local").failed_key_throttle(Throttle::after(6, "60s", "30s"));
    let cluster = Cluster::start(&[top.clone(), top.clone(), top], &routes, &keys_json);
    // Two failures on each instance: six in all, two per instance.
    for i in 0..6 {
        let node = cluster.node(i % 3);
        let r = get_keyed(
            node.addr(),
            "/chat/x",
            &format!("cluster-wrong-key-{i:04}"),
            &[],
        );
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
            let r = get_keyed(node.addr(), "/chat/x", OTHER_SERVICE_KEY, &[]);
            if r.status == 429 {
                assert_refusal(
                    &r,
                    429,
                    "too many failed key attempts",
                    &format!("a right key new to the blocked address on {}", node.name),
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
                403,
                &format!("the other service's key on {} before the block", node.name),
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
    cluster.assert_logs_never_show(&[GOOD_KEY, OTHER_SERVICE_KEY, "cluster-wrong-key-0000"]);
}
