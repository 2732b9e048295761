//! CORS: a preflight from an allowed origin is answered by the gateway
//! (204, no key, no upstream), every answer to an allowed origin carries
//! the headers (refusals included), a disallowed origin gets nothing, and
//! routes without `cors` are unchanged.
//!
//! Every test runs the real binary on loopback in front of real upstreams
//! and talks to it over bare `TcpStream`s, so the exact status, headers
//! and body of each answer are checked. Tests wait by polling.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use common::*;

const ORIGIN: &str = "https://chat.example";

const EVIL: &str = "https://evil.example";

const CORS_KEY: &str = "prot-cors-key-0001";

const CORS_LIMITED: &str = "prot-cors-limited-0002";

const CORS_TTS: &str = "prot-cors-tts-0003";

fn cors_gateway(echo: &EchoServer) -> Gateway {
    Gateway::start(
        &GatewayConfig::new()
            .threads(2)
            .route(Route::chat(echo.addr).cors(Cors::new([ORIGIN])))
            .route(
                Route::stripped("custom", "/custom/", "chat", echo.addr).cors(
                    Cors::new([ORIGIN])
                        .max_age("60s")
                        .headers(["authorization", "x-custom"]),
                ),
            )
            .route(Route::stripped("plain", "/plain/", "chat", echo.addr)),
        KeyFile::of([
            Key::new(CORS_KEY, "ann").service("chat"),
            Key::new(CORS_LIMITED, "lim")
                .service("chat")
                .rate_limit("1/min"),
            Key::new(CORS_TTS, "tts").service("tts"),
        ]),
    )
}

/// Whether any `Vary` header lists `Origin`.
fn varies_on_origin(r: &RawResponse) -> bool {
    r.headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("vary"))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("origin"))
}

/// The `Access-Control-*` headers of an answer.
fn cors_headers(r: &RawResponse) -> Vec<(String, String)> {
    r.headers
        .iter()
        .filter(|(n, _)| n.to_ascii_lowercase().starts_with("access-control-"))
        .cloned()
        .collect()
}

fn assert_no_cors(r: &RawResponse, what: &str) {
    let found = cors_headers(r);
    assert!(
        found.is_empty(),
        "{what}: CORS headers {found:?} on {}",
        show(r)
    );
}

/// A comma-separated header value as a set of lower-case tokens.
fn token_set(v: &str) -> Vec<String> {
    let mut t: Vec<String> = v
        .split(',')
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    t.sort();
    t.dedup();
    t
}

fn assert_allows_origin(r: &RawResponse, what: &str) {
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(ORIGIN),
        "{what}: {}",
        show(r)
    );
    assert_eq!(r.header_count("access-control-allow-origin"), 1, "{what}");
    assert!(varies_on_origin(r), "{what}: no Vary: Origin: {}", show(r));
}

#[test]
fn cors_preflight_from_an_allowed_origin_is_answered_204_without_a_key_or_the_upstream() {
    let echo = EchoServer::start();
    let gw = cors_gateway(&echo);

    let r = preflight(&gw, "/chat/v1/chat/completions", ORIGIN, &[]);
    assert_status(&r, 204, "preflight from the allowed origin");
    assert!(r.body.is_empty(), "a 204 with a body: {}", show(&r));
    assert_allows_origin(&r, "preflight");
    let methods = r
        .header("access-control-allow-methods")
        .unwrap_or_else(|| panic!("no Access-Control-Allow-Methods: {}", show(&r)));
    assert!(
        token_set(methods).contains(&"post".to_string()),
        "the requested POST is not allowed: {methods:?}"
    );
    assert_eq!(
        r.header("access-control-allow-headers").map(token_set),
        Some(token_set("authorization, content-type, x-api-key")),
        "default allowed headers: {}",
        show(&r)
    );
    assert_eq!(
        r.header("access-control-max-age"),
        Some("600"),
        "{}",
        show(&r)
    );

    let r = preflight(&gw, "/custom/x", ORIGIN, &[]);
    assert_status(&r, 204, "preflight on the route with custom settings");
    assert_allows_origin(&r, "custom preflight");
    assert_eq!(
        r.header("access-control-allow-headers").map(token_set),
        Some(token_set("authorization, x-custom")),
        "configured allowed headers: {}",
        show(&r)
    );
    assert_eq!(
        r.header("access-control-max-age"),
        Some("60"),
        "{}",
        show(&r)
    );

    assert_eq!(echo.hits(), 0, "a preflight reached the upstream");

    // OPTIONS without Access-Control-Request-Method is no preflight: it
    // needs a key like any request (and still carries the CORS headers).
    let r = send(gw.addr(), "OPTIONS", "/chat/x", &[("Origin", ORIGIN)], b"");
    assert_refusal(
        &r,
        401,
        "missing api key",
        "OPTIONS without Access-Control-Request-Method",
    );
    assert_allows_origin(&r, "OPTIONS without Access-Control-Request-Method");
    assert_eq!(echo.hits(), 0);
}

#[test]
fn cors_headers_are_on_every_answer_to_an_allowed_origin_including_refusals() {
    let echo = EchoServer::start();
    let gw = cors_gateway(&echo);
    let origin = [("Origin", ORIGIN)];

    let r = get_keyed(&gw, "/chat/x", CORS_KEY, &origin);
    assert_status(&r, 200, "a keyed request");
    assert_allows_origin(&r, "the upstream's 200");

    let r = send(gw.addr(), "POST", "/chat/x", &origin, b"{}");
    assert_refusal(&r, 401, "missing api key", "no key");
    assert_allows_origin(&r, "the gateway's 401");

    let r = get_keyed(&gw, "/chat/x", CORS_TTS, &origin);
    assert_refusal(
        &r,
        403,
        "api key not allowed for this service",
        "another service's key",
    );
    assert_allows_origin(&r, "the gateway's 403");

    assert_status(
        &get_keyed(&gw, "/chat/x", CORS_LIMITED, &origin),
        200,
        "limited key, request 1",
    );
    let r = get_keyed(&gw, "/chat/x", CORS_LIMITED, &origin);
    assert_refusal(&r, 429, "rate limit exceeded", "limited key, request 2");
    assert_allows_origin(&r, "the gateway's 429");
}

#[test]
fn cors_gives_a_disallowed_origin_nothing_and_routes_without_cors_are_unchanged() {
    let echo = EchoServer::start();
    let gw = cors_gateway(&echo);

    // A disallowed origin: no Access-Control-* on a real request...
    for origin in [
        EVIL,
        "https://chat.example.evil.example",
        "http://chat.example",
    ] {
        let r = get_keyed(&gw, "/chat/x", CORS_KEY, &[("Origin", origin)]);
        assert_status(&r, 200, &format!("a keyed request from {origin}"));
        assert_no_cors(&r, origin);
    }
    // ...and its preflight takes the normal path: a key is needed...
    let hits = echo.hits();
    let r = preflight(&gw, "/chat/x", EVIL, &[]);
    assert_refusal(
        &r,
        401,
        "missing api key",
        "a preflight from a disallowed origin",
    );
    assert_no_cors(&r, "the 401 to a disallowed origin's preflight");
    // ...and with one it reaches the upstream.
    let r = preflight(&gw, "/chat/x", EVIL, &[("X-API-Key", CORS_KEY)]);
    assert_status(&r, 200, "a keyed preflight from a disallowed origin");
    assert_no_cors(
        &r,
        "the upstream's answer to a disallowed origin's preflight",
    );
    assert_eq!(echo.hits(), hits + 1, "the keyed OPTIONS went upstream");
    assert_eq!(
        echo.last_request().expect("recorded").head.method,
        "OPTIONS"
    );

    // A route without cors: the allowed origin changes nothing either.
    let r = preflight(&gw, "/plain/x", ORIGIN, &[]);
    assert_refusal(
        &r,
        401,
        "missing api key",
        "a preflight on a route without cors",
    );
    assert_no_cors(&r, "a preflight on a route without cors");
    let r = get_keyed(&gw, "/plain/x", CORS_KEY, &[("Origin", ORIGIN)]);
    assert_status(&r, 200, "a keyed request on a route without cors");
    assert_no_cors(&r, "a keyed request on a route without cors");
    assert!(
        !varies_on_origin(&r),
        "Vary: Origin on a route without cors: {}",
        show(&r)
    );
}
