//! Address allow lists, per route and global, IPv4 and IPv6, checked
//! before the key (so a refused address is no failed key attempt), with
//! `X-Forwarded-For` read from trusted proxies only, right to left.
//!
//! Every test runs the real binary on loopback in front of real upstreams
//! and talks to it over bare `TcpStream`s, so the exact status, headers
//! and body of each answer are checked. Tests wait by polling.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::net::{SocketAddr, TcpListener};

use common::*;

const ALLOW_KEY: &str = "prot-allow-key-0001";

fn allow_keys() -> KeyFile {
    KeyFile::of([Key::new(ALLOW_KEY, "ann").service("chat")])
}

#[test]
fn an_address_outside_allow_gets_403_before_the_key_check_and_it_is_no_failed_attempt() {
    let up = RecordingServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .failed_key_throttle(Throttle::after(3, "60s", "60s"))
            .route(Route::stripped("private", "/private/", "chat", up.addr).allow(["10.0.0.0/8"]))
            .route(Route::stripped("open", "/open/", "chat", up.addr)),
        allow_keys(),
    );
    for i in 1..=5 {
        let r = get_keyed(&gw, "/private/x", "prot-allow-wrong-key", &[]);
        assert_refusal(
            &r,
            403,
            "address not allowed",
            &format!("invalid key {i} from 127.0.0.1"),
        );
    }
    let r = send(gw.addr(), "GET", "/private/x", &[], b"");
    assert_refusal(&r, 403, "address not allowed", "no key from 127.0.0.1");
    let r = get_keyed(&gw, "/private/x", ALLOW_KEY, &[]);
    assert_refusal(
        &r,
        403,
        "address not allowed",
        "the valid key from 127.0.0.1",
    );
    assert_eq!(
        up.total_bytes(),
        0,
        "the upstream received: {}",
        up.received_text()
    );

    // The six refused invalid keys were no failed key attempts (the limit is
    // 3): the address is not throttled elsewhere.
    assert_status(
        &get_keyed(&gw, "/open/x", ALLOW_KEY, &[]),
        200,
        "the valid key on /open/",
    );
    assert_refusal(
        &get_keyed(&gw, "/open/x", "prot-allow-wrong-key", &[]),
        401,
        "invalid api key",
        "the first real failure",
    );
}

#[test]
fn a_global_allow_list_applies_to_every_route_and_loopback_in_it_works() {
    let echo = EchoServer::start();
    let closed = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .allow(["10.0.0.0/8"])
            .route(Route::chat(echo.addr)),
        allow_keys(),
    );
    let r = get_keyed(&closed, "/chat/x", "prot-allow-wrong-key", &[]);
    assert_refusal(
        &r,
        403,
        "address not allowed",
        "an invalid key, global allow without loopback",
    );
    assert_eq!(echo.hits(), 0);

    let open = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .allow(["127.0.0.1"])
            .route(Route::chat(echo.addr)),
        allow_keys(),
    );
    assert_status(
        &get_keyed(&open, "/chat/x", ALLOW_KEY, &[]),
        200,
        "127.0.0.1 allowed",
    );
    assert_refusal(
        &get_keyed(&open, "/chat/x", "prot-allow-wrong-key", &[]),
        401,
        "invalid api key",
        "an allowed address still needs a valid key",
    );
    assert_eq!(echo.hits(), 1);
}

#[test]
fn x_forwarded_for_counts_only_from_trusted_proxies() {
    let echo = EchoServer::start();
    let route_line = Route::chat(echo.addr);
    let trusting = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1"])
            .allow(["192.0.2.0/24"])
            .route(route_line.clone()),
        allow_keys(),
    );
    assert_status(
        &get_keyed(
            &trusting,
            "/chat/x",
            ALLOW_KEY,
            &[("X-Forwarded-For", "192.0.2.7")],
        ),
        200,
        "XFF 192.0.2.7 from a trusted proxy",
    );
    assert_refusal(
        &get_keyed(
            &trusting,
            "/chat/x",
            ALLOW_KEY,
            &[("X-Forwarded-For", "198.51.100.7")],
        ),
        403,
        "address not allowed",
        "XFF outside the list from a trusted proxy",
    );
    assert_refusal(
        &get_keyed(&trusting, "/chat/x", ALLOW_KEY, &[]),
        403,
        "address not allowed",
        "the proxy itself (no XFF) is not in the list",
    );

    // Without trusted_proxies, a direct client's XFF is ignored.
    let direct = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .allow(["192.0.2.0/24"])
            .route(route_line),
        allow_keys(),
    );
    assert_refusal(
        &get_keyed(
            &direct,
            "/chat/x",
            ALLOW_KEY,
            &[("X-Forwarded-For", "192.0.2.7")],
        ),
        403,
        "address not allowed",
        "XFF from an untrusted direct client",
    );
    assert_eq!(echo.hits(), 1);
}

#[test]
fn x_forwarded_for_is_read_from_the_right_skipping_trusted_hops() {
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .trusted_proxies(["127.0.0.1", "10.0.0.0/8"])
            .allow(["192.0.2.0/24"])
            .route(Route::chat(echo.addr)),
        allow_keys(),
    );
    assert_status(
        &get_keyed(
            &gw,
            "/chat/x",
            ALLOW_KEY,
            &[("X-Forwarded-For", "192.0.2.7, 10.1.2.3")],
        ),
        200,
        "client 192.0.2.7 behind a trusted hop 10.1.2.3",
    );
    // A client that prepends an allowed address: the rightmost untrusted
    // address (203.0.113.5) is the client.
    assert_refusal(
        &get_keyed(
            &gw,
            "/chat/x",
            ALLOW_KEY,
            &[("X-Forwarded-For", "192.0.2.7, 203.0.113.5")],
        ),
        403,
        "address not allowed",
        "a spoofed 192.0.2.7 left of the real client 203.0.113.5",
    );
    assert_refusal(
        &get_keyed(
            &gw,
            "/chat/x",
            ALLOW_KEY,
            &[("X-Forwarded-For", "192.0.2.7, 203.0.113.5, 10.9.9.9")],
        ),
        403,
        "address not allowed",
        "a spoofed 192.0.2.7, the client 203.0.113.5, a trusted hop",
    );
    assert_eq!(echo.hits(), 1);
}

#[test]
fn allow_lists_match_ipv6_addresses_and_ranges() {
    let echo = EchoServer::start();
    // Direct IPv6 clients: a second listener on [::1].
    let v6_listener = match TcpListener::bind("[::1]:0") {
        Ok(l) => l,
        Err(e) => panic!("this test needs IPv6 loopback ([::1]): {e}"),
    };
    let v6_port = v6_listener.local_addr().expect("local_addr").port();
    drop(v6_listener);
    let port = free_port();
    let config = GatewayConfig::new()
        .listen(loopback(port))
        .listen(format!("[::1]:{v6_port}"))
        .threads(2)
        .trusted_proxies(["127.0.0.1"])
        .route(Route::stripped("v6", "/v6/", "chat", echo.addr).allow(["::1", "192.0.2.0/24"]))
        .route(
            Route::stripped("mixed", "/mixed/", "chat", echo.addr).allow([
                "fe80::/10",
                "127.0.0.0/8",
                "2001:db8::/32",
            ]),
        );
    let gw = Gateway::start(&config, allow_keys());
    let v4 = gw.addr();
    let v6 = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], v6_port));
    let k = [("X-API-Key", ALLOW_KEY)];

    assert_status(
        &send(v6, "GET", "/v6/x", &k, b""),
        200,
        "::1 on a route allowing ::1",
    );
    assert_refusal(
        &send(v4, "GET", "/v6/x", &k, b""),
        403,
        "address not allowed",
        "127.0.0.1 on a route allowing ::1 and 192.0.2.0/24",
    );
    assert_status(
        &send(v4, "GET", "/mixed/x", &k, b""),
        200,
        "127.0.0.1 in 127.0.0.0/8",
    );
    assert_refusal(
        &send(v6, "GET", "/mixed/x", &k, b""),
        403,
        "address not allowed",
        "::1 is not in fe80::/10",
    );
    // IPv6 clients named by a trusted proxy.
    let xff = |ip: &'static str| [("X-API-Key", ALLOW_KEY), ("X-Forwarded-For", ip)];
    assert_status(
        &send(v4, "GET", "/mixed/x", &xff("2001:db8::7"), b""),
        200,
        "2001:db8::7",
    );
    assert_status(
        &send(v4, "GET", "/mixed/x", &xff("fe80::1"), b""),
        200,
        "fe80::1",
    );
    assert_refusal(
        &send(v4, "GET", "/mixed/x", &xff("2001:db9::1"), b""),
        403,
        "address not allowed",
        "2001:db9::1 is in no range",
    );
    assert_eq!(echo.hits(), 4);
}
