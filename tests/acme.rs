//! ACME end to end: the real gateway against Pebble, the RFC 8555 test
//! server, started here on loopback ports (`apt-get install pebble`).
//!
//! Pebble issues certificates valid for 30 s, so the gateway renews them
//! (a third of the lifetime left) within the test, which takes about 80 s.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::pebble::Pebble;
use common::tls::*;
use common::*;

const DOMAIN: &str = "gw.acme.test";
fn keys() -> KeyFile {
    KeyFile::of([Key::new("acme-test-key", "ann").service("chat")])
}
/// Lifetime of the certificates Pebble issues here, in seconds.
const VALIDITY: u64 = 30;

/// The route every config here has: its upstream is never reached.
fn chat_route() -> Route {
    Route::new("chat", "/chat/", "chat").upstream("127.0.0.1:9")
}

fn config(plain: u16, tls: u16, admin: u16, pebble: &Pebble, cache: &Path) -> GatewayConfig {
    GatewayConfig::new()
        .listen(loopback(plain))
        .listen_acme(
            loopback(tls),
            Acme::new([DOMAIN], &pebble.directory, cache)
                .email("admin@acme.test")
                .ca(&pebble.ca_file),
        )
        .admin_listen(loopback(admin))
        .shutdown_grace("2s")
        .route(chat_route())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn certificates_are_obtained_cached_renewed_and_kept_when_the_server_fails() {
    let plain = free_port();
    let tls = free_port();
    let admin = free_port();
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], tls));
    let mut pebble = Pebble::start(plain, VALIDITY);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("acme");
    let config = config(plain, tls, admin, &pebble, &cache);
    let ok = r#"agw_acme_orders_total{result="ok"}"#;
    let failed = r#"agw_acme_orders_total{result="error"}"#;

    // 1. From an empty cache: a certificate issued under Pebble's root.
    let gw = Gateway::start(&config, keys());
    let root = pebble.root();
    assert!(
        wait_until(Duration::from_secs(60), || served_leaf(
            tls_addr,
            DOMAIN,
            &[&root]
        )
        .is_ok()),
        "no certificate from Pebble; gateway log:\n{}\npebble log:\n{}",
        gw.log(),
        pebble.log()
    );
    let first = served_leaf(tls_addr, DOMAIN, &[&root]).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&first).unwrap();
    let names: Vec<String> = parsed
        .subject_alternative_name()
        .unwrap()
        .expect("SAN")
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, [format!("DNSName({DOMAIN})")]);
    assert_eq!(metric_at(local_admin(admin), ok), 1.0);
    // Requests over it are served (and key-checked).
    let (status, body) = https_raw(
        tls_addr,
        DOMAIN,
        &[&root],
        "GET /chat/x HTTP/1.1\r\nHost: gw.acme.test\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        (status, body.as_str()),
        (401, r#"{"error":"missing api key"}"#)
    );
    // The cache: the account key and the certificate, readable by the
    // owner only.
    assert_eq!(mode(&cache), 0o700);
    let mut files: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(files[0].starts_with("account-") && files[0].ends_with(".json"));
    assert_eq!(&files[1..], ["cert.pem", "key.pem"]);
    for f in &files {
        assert_eq!(mode(&cache.join(f)), 0o600, "{f}");
    }
    drop(gw);

    // 2. A second start reuses the cache: Pebble is stopped (paused: it
    //    would answer nothing), and the cached certificate is served.
    pebble.pause();
    let gw = Gateway::start(&config, keys());
    assert!(
        wait_until(Duration::from_secs(5), || served_leaf(
            tls_addr,
            DOMAIN,
            &[&root]
        )
        .is_ok_and(|d| d == first)),
        "the cached certificate is served; log:\n{}",
        gw.log()
    );
    assert!(gw.log().contains("from the cache"), "{}", gw.log());
    assert!(
        !gw.log().contains("acme: ordering"),
        "Pebble was contacted:\n{}",
        gw.log()
    );
    pebble.resume();

    // 3. Renewal (a third of the lifetime left) without a restart.
    assert!(
        wait_until(Duration::from_secs(VALIDITY + 20), || served_leaf(
            tls_addr,
            DOMAIN,
            &[&root]
        )
        .is_ok_and(|d| d != first)),
        "no renewal; log:\n{}\npebble log:\n{}",
        gw.log(),
        pebble.log()
    );
    let second = served_leaf(tls_addr, DOMAIN, &[&root]).unwrap();
    assert_ne!(serial_of(&second), serial_of(&first));
    assert_eq!(
        metric_at(local_admin(admin), ok),
        1.0,
        "this process's one order"
    );
    assert!(gw.log().contains("(renewal)"), "{}", gw.log());

    // 4. Pebble gone at the next renewal: the error is logged and counted,
    //    and the renewed certificate stays in service.
    pebble.stop();
    assert!(
        wait_until(Duration::from_secs(VALIDITY + 20), || metric_at(
            local_admin(admin),
            failed
        ) >= 1.0),
        "no failed renewal counted; log:\n{}",
        gw.log()
    );
    assert_eq!(served_leaf(tls_addr, DOMAIN, &[&root]).unwrap(), second);
    let log = gw.log();
    assert!(
        log.contains("acme: renewal for gw.acme.test")
            && log.contains("still serving the certificate valid until"),
        "{log}"
    );
    assert!(log.contains("next try in 30s"), "{log}");

    // 5. A new Pebble on the same address (new roots, the account
    //    forgotten): the next try makes a new account and gets a new
    //    certificate, still without a restart.
    pebble.restart();
    let new_root = pebble.root();
    assert_ne!(new_root, root);
    assert!(
        wait_until(Duration::from_secs(90), || served_leaf(
            tls_addr,
            DOMAIN,
            &[&new_root]
        )
        .is_ok()),
        "no certificate from the restarted Pebble; log:\n{}\npebble log:\n{}",
        gw.log(),
        pebble.log()
    );
    assert!(
        gw.log().contains("does not know the cached account"),
        "{}",
        gw.log()
    );
    assert_eq!(metric_at(local_admin(admin), ok), 2.0);
}

#[test]
fn check_validates_acme_settings_without_contacting_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let write = |acme: Acme| {
        let config = GatewayConfig::new()
            .unset("shutdown_grace")
            .listen("127.0.0.1:1")
            .listen_acme("127.0.0.1:2", acme)
            .route(chat_route());
        std::fs::write(dir.path().join("gateway.yaml"), config.render()).unwrap();
        std::fs::write(dir.path().join("keys.json"), keys().render()).unwrap();
        run_cli(&["check", "--config", "gateway.yaml"], dir.path())
    };
    // Nothing listens at this directory: check never contacts it.
    let out = write(Acme::new(
        ["ai.example.com"],
        "https://127.0.0.1:9/dir",
        "acme",
    ));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains(
            "acme for ai.example.com from https://127.0.0.1:9/dir: no certificate cached yet"
        ),
        "{}",
        out.stdout
    );
    let out = write(Acme::new(
        ["*.example.com"],
        "https://127.0.0.1:9/dir",
        "acme",
    ));
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("wildcards need the DNS-01 challenge"),
        "{}",
        out.stderr
    );
    let out = write(Acme::new(
        ["ai.example.com"],
        "http://127.0.0.1:9/dir",
        "acme",
    ));
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("must be an https:// URL"),
        "{}",
        out.stderr
    );
    let out =
        write(Acme::new(["ai.example.com"], "https://127.0.0.1:9/dir", "acme").ca("missing.pem"));
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("missing.pem: cannot read"),
        "{}",
        out.stderr
    );
    let out = write(Acme::new(
        Vec::<&str>::new(),
        "https://127.0.0.1:9/dir",
        "acme",
    ));
    assert!(!out.status.success());
    assert!(out.stderr.contains("at least one domain"), "{}", out.stderr);
}
