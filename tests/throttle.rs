//! The failed-key throttle against key guessing: an address with too many
//! failed key checks is blocked (even with a valid key, unless that key
//! worked from it before) until its cool-down ends; the defaults, turning
//! it off, the window; and 100,000 guessing addresses in bounded memory.
//!
//! Every test runs the real binary on loopback in front of real upstreams
//! and talks to it over bare `TcpStream`s, so the exact status, headers
//! and body of each answer are checked. Tests wait by polling (clients named by
//! `X-Forwarded-For` through the trusted proxy 127.0.0.1); the only sleeps
//! wait out a `Retry-After` or a failed-key window, because that is the
//! behaviour under test.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The 100,000-address test keeps both CPUs busy on purpose; tests that
/// measure time (a burst against a per-second limit, an answer "at once",
/// a 2 s cool-down) must not run beside it. Every other test holds this
/// shared, the load test holds it exclusively.
static LOAD: RwLock<()> = RwLock::new(());

/// Taken first by every test but the load test.
fn shared() -> RwLockReadGuard<'static, ()> {
    LOAD.read().unwrap_or_else(|e| e.into_inner())
}

/// Taken first by the load test.
fn exclusive() -> RwLockWriteGuard<'static, ()> {
    LOAD.write().unwrap_or_else(|e| e.into_inner())
}

const GOOD: &str = "prot-guess-good-0001";

const REVOKED: &str = "prot-guess-revoked-0002";

const EXPIRED: &str = "prot-guess-expired-0003";

const OTHER_SERVICE: &str = "prot-guess-tts-0004";

fn guess_keys() -> KeyFile {
    KeyFile::of([
        Key::new(GOOD, "ann").service("chat"),
        Key::new(REVOKED, "rev").service("chat").disabled(true),
        Key::new(EXPIRED, "old")
            .service("chat")
            .expires_at("2020-01-01T00:00:00Z"),
        Key::new(OTHER_SERVICE, "tts").service("tts"),
    ])
}

/// `GET /chat/x` as client `ip` (through the trusted proxy 127.0.0.1),
/// with `key` if any.
fn get_as(gw: &Gateway, ip: &str, key: Option<&str>) -> RawResponse {
    let mut headers = vec![("X-Forwarded-For", ip)];
    if let Some(k) = key {
        headers.push(("X-API-Key", k));
    }
    send(gw.addr(), "GET", "/chat/x", &headers, b"")
}

#[test]
fn failed_key_throttle_blocks_an_address_even_with_a_valid_key_then_lifts_after_cooldown() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .failed_key_throttle(Throttle::after(5, "60s", "2s"))
            .route(Route::chat(echo.addr)),
        guess_keys(),
    );
    let guesser = "203.0.113.10";
    let other = "203.0.113.20";
    let log_start = gw.log().len();

    // Every kind of failed key check counts: missing, unknown, revoked,
    // expired.
    let failures: [(Option<&str>, &str); 5] = [
        (None, "missing api key"),
        (Some("prot-guess-unknown-0001"), "invalid api key"),
        (Some(REVOKED), "api key revoked"),
        (Some(EXPIRED), "api key expired"),
        (Some("prot-guess-unknown-0002"), "invalid api key"),
    ];
    for (i, (key, error)) in failures.iter().enumerate() {
        assert_refusal(
            &get_as(&gw, guesser, *key),
            401,
            error,
            &format!("failure {}", i + 1),
        );
    }

    // The 6th request is refused before any key is checked.
    let blocked = get_as(&gw, guesser, Some(GOOD));
    let blocked_at = Instant::now();
    assert_refusal(
        &blocked,
        429,
        "too many failed key attempts",
        "a valid key after 5 failures",
    );
    let wait = retry_after(&blocked);
    assert!(wait <= 2, "Retry-After {wait} for a 2 s cool-down");
    assert_eq!(echo.hits(), 0, "a throttled request reached the upstream");

    // Another address behind the same proxy is not affected.
    assert_status(
        &get_as(&gw, other, Some(GOOD)),
        200,
        "another address, valid key",
    );

    // Ten more throttled requests; the block is logged once, not per request.
    let mut last = (blocked_at, wait);
    for i in 0..10 {
        let r = get_as(&gw, guesser, Some(GOOD));
        assert_refusal(
            &r,
            429,
            "too many failed key attempts",
            &format!("throttled request {i}"),
        );
        last = (Instant::now(), retry_after(&r));
    }
    // For the implementer: the block line is found by the client address
    // and "throttl" (as in "throttled"); adjust this substring to what the
    // gateway logs, but keep it one line per block.
    let block_lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains(guesser) && l.to_ascii_lowercase().contains("throttl"))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(5), || block_lines(
            &gw.log()[log_start..]
        ) >= 1),
        "no log line about throttling {guesser}: {}",
        gw.log()
    );
    assert_eq!(
        block_lines(&gw.log()[log_start..]),
        1,
        "one log line per block, not per request: {}",
        gw.log()
    );

    // After the cool-down announced by the last refusal, the valid key works.
    wait_retry_after(last.0, last.1);
    assert_status(
        &get_as(&gw, guesser, Some(GOOD)),
        200,
        "the valid key after the cool-down",
    );
    assert_eq!(echo.hits(), 2);
}

/// One address is often many people (a team behind a NAT, the users of a
/// front end): a key that worked from it before the block is still served
/// during the block, while every other key, right or wrong, gets the same
/// 429 (so the block tells a guesser nothing).
#[test]
fn a_blocked_address_is_still_served_for_keys_that_worked_from_it_before() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .failed_key_throttle(Throttle::after(3, "60s", "60s"))
            .route(Route::chat(echo.addr)),
        guess_keys(),
    );
    let nat = "203.0.113.77";
    assert_status(&get_as(&gw, nat, Some(GOOD)), 200, "the team's key, before");
    for i in 1..=3 {
        assert_refusal(
            &get_as(&gw, nat, Some("prot-guess-stale-key")),
            401,
            "invalid api key",
            &format!("the stale key, failure {i}"),
        );
    }
    // Blocked: the stale key and a right key never used from here get the
    // same answer, and neither reaches the upstream.
    let hits = echo.hits();
    let stale = get_as(&gw, nat, Some("prot-guess-stale-key"));
    assert_refusal(
        &stale,
        429,
        "too many failed key attempts",
        "the stale key, blocked",
    );
    let fresh = get_as(&gw, nat, Some(OTHER_SERVICE));
    assert_refusal(
        &fresh,
        429,
        "too many failed key attempts",
        "a right key new to the address",
    );
    assert_eq!(
        stale.body, fresh.body,
        "a right key is refused like a wrong one"
    );
    assert!(retry_after(&fresh) > 50, "the block lasts its cool-down");
    assert_eq!(
        echo.hits(),
        hits,
        "a throttled request reached the upstream"
    );
    // The team's key goes on working during the block.
    for i in 0..5 {
        assert_status(
            &get_as(&gw, nat, Some(GOOD)),
            200,
            &format!("the team's key during the block, request {i}"),
        );
    }
    assert_eq!(echo.hits(), hits + 5);
    // Known per address: the same key first seen from another blocked
    // address is refused there.
    let other = "203.0.113.78";
    for _ in 0..3 {
        get_as(&gw, other, Some("prot-guess-stale-key"));
    }
    assert_refusal(
        &get_as(&gw, other, Some(GOOD)),
        429,
        "too many failed key attempts",
        "the team's key from an address it never worked from",
    );
}

#[test]
fn failed_key_throttle_is_on_by_default_with_20_failures_and_a_300s_cooldown() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .route(Route::chat(echo.addr)),
        guess_keys(),
    );
    let guesser = "198.51.100.7";
    for i in 1..=20 {
        assert_refusal(
            &get_as(&gw, guesser, Some("prot-default-unknown")),
            401,
            "invalid api key",
            &format!("failure {i}"),
        );
    }
    let r = get_as(&gw, guesser, Some(GOOD));
    assert_refusal(&r, 429, "too many failed key attempts", "after 20 failures");
    let wait = retry_after(&r);
    assert!(
        (290..=300).contains(&wait),
        "Retry-After {wait} for the default 300 s cool-down"
    );
    assert_status(
        &get_as(&gw, "198.51.100.8", Some(GOOD)),
        200,
        "another address",
    );
}

#[test]
fn failed_key_throttle_can_be_turned_off() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .failed_key_throttle(Throttle::off())
            .route(Route::chat(echo.addr)),
        guess_keys(),
    );
    let guesser = "198.51.100.9";
    for i in 1..=30 {
        assert_refusal(
            &get_as(&gw, guesser, Some("prot-off-unknown")),
            401,
            "invalid api key",
            &format!("failure {i}"),
        );
    }
    assert_status(
        &get_as(&gw, guesser, Some(GOOD)),
        200,
        "the valid key after 30 failures",
    );
}

#[test]
fn failed_key_attempts_older_than_the_window_are_forgotten_and_a_wrong_service_is_not_a_failure() {
    let _load = shared();
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .failed_key_throttle(Throttle::after(3, "1s", "60s"))
            .route(Route::chat(echo.addr)),
        guess_keys(),
    );
    let guesser = "198.51.100.10";
    // A valid key of another service is refused (403) but is no failed key
    // check: any number of them leaves the address unthrottled.
    for i in 1..=5 {
        assert_refusal(
            &get_as(&gw, guesser, Some(OTHER_SERVICE)),
            403,
            "api key not allowed for this service",
            &format!("wrong service {i}"),
        );
    }
    for i in 1..=2 {
        assert_refusal(
            &get_as(&gw, guesser, Some("prot-window-unknown")),
            401,
            "invalid api key",
            &format!("early failure {i}"),
        );
    }
    // Wait out the 1 s window: the two early failures no longer count.
    thread::sleep(Duration::from_millis(1500));
    for i in 1..=2 {
        assert_refusal(
            &get_as(&gw, guesser, Some("prot-window-unknown")),
            401,
            "invalid api key",
            &format!("late failure {i} (the early ones must have expired)"),
        );
    }
    assert_status(
        &get_as(&gw, guesser, Some(GOOD)),
        200,
        "2 failures in the window",
    );
    // A third failure within the window: the address is blocked.
    assert_refusal(
        &get_as(&gw, guesser, Some("prot-window-unknown")),
        401,
        "invalid api key",
        "the third failure in the window",
    );
    assert_refusal(
        &get_as(&gw, guesser, Some("prot-window-unknown")),
        429,
        "too many failed key attempts",
        "after 3 failures in the window",
    );
    // GOOD worked from this address before the block, so it still does.
    assert_status(
        &get_as(&gw, guesser, Some(GOOD)),
        200,
        "a key known to work from the blocked address",
    );
}

/// VmRSS of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Sends one bad-key guess from each address `first..first + count`
/// (through the trusted proxy 127.0.0.1) on `threads` keep-alive
/// connections. Returns the statuses seen, with their counts (0 stands for
/// a request that got no answer even on a new connection).
fn guess_from_addresses(
    addr: SocketAddr,
    first: u32,
    count: u32,
    threads: u32,
    deadline: Instant,
) -> BTreeMap<u16, usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, usize>::new()));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let next = Arc::clone(&next);
            let statuses = Arc::clone(&statuses);
            thread::spawn(move || {
                let mut conn: Option<BufReader<TcpStream>> = None;
                let mut local = BTreeMap::<u16, usize>::new();
                loop {
                    let i = next.fetch_add(64, Ordering::Relaxed) as u32;
                    if i >= count || Instant::now() > deadline {
                        break;
                    }
                    for j in i..(i + 64).min(count) {
                        let ip = Ipv4Addr::from(first + j);
                        let req = format!(
                            "GET /chat/x HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: prot-guess-{j}\r\nX-Forwarded-For: {ip}\r\n\r\n"
                        );
                        let mut status = 0;
                        for _attempt in 0..2 {
                            let reader = conn.get_or_insert_with(|| BufReader::new(connect(addr)));
                            if reader.get_mut().write_all(req.as_bytes()).is_err() {
                                conn = None;
                                continue;
                            }
                            match read_response(reader) {
                                Ok(r) => {
                                    status = r.status;
                                    let close = r
                                        .header("connection")
                                        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                                    if close {
                                        conn = None;
                                    }
                                    break;
                                }
                                Err(_) => conn = None,
                            }
                        }
                        *local.entry(status).or_default() += 1;
                    }
                }
                let mut all = statuses.lock().unwrap();
                for (k, v) in local {
                    *all.entry(k).or_default() += v;
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("guessing thread panicked");
    }
    let all = statuses.lock().unwrap().clone();
    all
}

#[test]
fn a_hundred_thousand_guessing_addresses_keep_the_gateway_serving_in_bounded_memory() {
    let _load = exclusive();
    const ADDRESSES: u32 = 100_000;
    const RSS_BOUND_KIB: u64 = 64 * 1024;
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .route(Route::chat(echo.addr)),
        guess_keys(),
    );
    let deadline = Instant::now() + Duration::from_secs(240);
    let base_warm = u32::from(Ipv4Addr::new(172, 16, 0, 0));
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));

    // Warm up (buffers, thread pools, connection state) with other addresses.
    let warm = guess_from_addresses(gw.addr(), base_warm, 2_000, 4, deadline);
    assert_eq!(warm.get(&401), Some(&2_000), "warm-up statuses: {warm:?}");
    let rss_before = rss_kib(gw.pid());

    let started = Instant::now();
    let seen = guess_from_addresses(gw.addr(), base, ADDRESSES, 6, deadline);
    let took = started.elapsed();
    let rss_after = rss_kib(gw.pid());
    eprintln!(
        "{ADDRESSES} guessing addresses in {took:?}: gateway VmRSS {rss_before} KiB before, {rss_after} KiB after ({:+} KiB)",
        rss_after as i64 - rss_before as i64
    );
    assert_eq!(
        seen.get(&401),
        Some(&(ADDRESSES as usize)),
        "every guess from a new address is a plain 401 (statuses: {seen:?}, in {took:?})"
    );
    assert!(
        rss_after < rss_before + RSS_BOUND_KIB,
        "VmRSS grew from {rss_before} KiB to {rss_after} KiB over {ADDRESSES} addresses"
    );

    // Still serving: a valid key, from the proxy itself and from a new address.
    assert_status(
        &send(gw.addr(), "GET", "/chat/x", &[("X-API-Key", GOOD)], b""),
        200,
        "the valid key, direct",
    );
    assert_status(
        &get_as(&gw, "192.0.2.200", Some(GOOD)),
        200,
        "the valid key, new address",
    );
}
