//! The command line: `check` on good and bad configurations, and `--help`.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::path::Path;

use common::*;

fn keys() -> KeyFile {
    KeyFile::of([
        Key::new("cli-key-0001", "ann").service("chat"),
        Key::new("cli-key-0002", "bob").services(["chat", "tts"]),
        Key::new("cli-key-0003", "root").service("*"),
    ])
}

/// Two routes to `127.0.0.1:11434` and `tts_upstream`.
fn two_routes(tts_upstream: &str) -> GatewayConfig {
    GatewayConfig::new()
        .listen(loopback(free_port()))
        .route(Route::stripped("chat", "/chat/", "chat", "127.0.0.1:11434"))
        .route(Route::new("tts", "/tts/", "tts").upstream(tts_upstream))
}

/// The routes of [`two_routes`] written block style, so every field has
/// its own line, for the tests of error positions.
const ROUTES: &str = r#"routes:
  - name: chat
    path_prefix: /chat/
    service: chat
    strip_prefix: true
    upstreams: ["127.0.0.1:11434"]
  - name: tts
    path_prefix: /tts/
    service: tts
    upstreams: ["127.0.0.1:5002"]
"#;

/// A config with `routes` written as YAML text.
fn config(routes: &str) -> String {
    GatewayConfig::new()
        .listen(loopback(free_port()))
        .extra_yaml(routes)
        .render()
}

/// Asserts a failed `check` whose stderr names `file` followed by
/// `:line:col`, and returns stderr.
fn assert_fails_at(out: &CliOutput, file: &Path) -> String {
    assert!(
        !out.status.success(),
        "check should fail; stdout: {}",
        out.stdout
    );
    let name = file.display().to_string();
    let err = &out.stderr;
    let at = err
        .find(&format!("{name}:"))
        .unwrap_or_else(|| panic!("stderr does not name {name}: {err}"));
    let rest = &err[at + name.len()..];
    let mut parts = rest.splitn(4, ':');
    let (_, line, col) = (parts.next(), parts.next(), parts.next());
    let is_num =
        |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    assert!(
        is_num(line) && is_num(col),
        "no :line:col after the file name: {err}"
    );
    err.clone()
}

#[test]
fn check_good_config_prints_summary() {
    let (files, out) = run_check(two_routes("127.0.0.1:5002"), keys());
    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert!(
        out.stdout.contains("ok, 2 routes, 3 keys"),
        "stdout: {}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains(&files.config_path.display().to_string()),
        "stdout: {}",
        out.stdout
    );
    // Keys are never printed.
    assert!(!out.stdout.contains("cli-key-") && !out.stderr.contains("cli-key-"));
}

#[test]
fn check_rejects_unknown_field_with_position() {
    let typo = ROUTES.replace("    strip_prefix: true", "    strip_prefx: true");
    let yaml = config(&typo);
    let (files, out) = run_check(&yaml, keys());
    let err = assert_fails_at(&out, &files.config_path);
    assert!(err.contains("strip_prefx"), "{err}");
    let expected_line = yaml
        .lines()
        .position(|l| l.contains("strip_prefx"))
        .expect("typo line")
        + 1;
    assert_eq!(
        reported_line(&err, &files.config_path),
        expected_line,
        "{err}"
    );
}

#[test]
fn check_rejects_bad_upstreams_with_position() {
    for bad in ["http://127.0.0.1:5002", "127.0.0.1", "127.0.0.1:0", ":5002"] {
        let routes = ROUTES.replace("\"127.0.0.1:5002\"", &format!("\"{bad}\""));
        let yaml = config(&routes);
        let (files, out) = run_check(&yaml, keys());
        let err = assert_fails_at(&out, &files.config_path);
        assert!(err.contains(bad), "{bad}: {err}");
        let expected_line = yaml
            .lines()
            .position(|l| l.contains(&format!("\"{bad}\"")))
            .expect("bad line")
            + 1;
        assert_eq!(
            reported_line(&err, &files.config_path),
            expected_line,
            "{bad}: {err}"
        );
    }
}

#[test]
fn check_rejects_unresolvable_upstream() {
    let (files, out) = run_check(two_routes("no-such-host.invalid:5002"), keys());
    assert!(!out.status.success());
    assert!(
        out.stderr
            .contains(&files.config_path.display().to_string()),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("no-such-host.invalid"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("tts"),
        "names the route: {}",
        out.stderr
    );
}

/// Two routes named `chat`.
fn duplicate_name() -> GatewayConfig {
    GatewayConfig::new()
        .listen(loopback(free_port()))
        .route(Route::new("chat", "/chat/", "chat").upstream("127.0.0.1:11434"))
        .route(Route::new("chat", "/chat2/", "chat").upstream("127.0.0.1:11434"))
}

#[test]
fn check_rejects_duplicate_route_name() {
    let (files, out) = run_check(duplicate_name(), keys());
    assert!(!out.status.success());
    let err = &out.stderr;
    assert!(
        err.contains(&files.config_path.display().to_string()),
        "{err}"
    );
    assert!(err.contains("\"chat\""), "names the route: {err}");
    assert!(err.contains("already exists"), "{err}");
}

/// [`duplicate_name`] written block style.
const DUPLICATE_NAME: &str = r#"routes:
  - name: chat
    path_prefix: /chat/
    service: chat
    upstreams: ["127.0.0.1:11434"]
  - name: chat
    path_prefix: /chat2/
    service: chat
    upstreams: ["127.0.0.1:11434"]
"#;

/// Duplicate names are found after parsing, and located in the text.
#[test]
fn check_duplicate_route_name_has_position() {
    let (files, out) = run_check(config(DUPLICATE_NAME), keys());
    assert_fails_at(&out, &files.config_path);
}

#[test]
fn check_rejects_missing_key_file() {
    let config = two_routes("127.0.0.1:5002").keys_file("nope.json");
    assert!(config.render().contains("nope.json"));
    let (files, out) = run_check(&config, keys());
    assert!(!out.status.success());
    let missing = files.dir.path().join("nope.json");
    assert!(
        out.stderr.contains(&missing.display().to_string()),
        "names the key file: {}",
        out.stderr
    );
}

#[test]
fn check_rejects_invalid_key_file_with_line() {
    let keys = "{\n  \"cli-key-0001\": {\"user\": \"ann\", \"service\": \"chat\"},\n  oops\n}\n";
    let (files, out) = run_check(two_routes("127.0.0.1:5002"), keys);
    let err = assert_fails_at(&out, &files.keys_path);
    assert_eq!(reported_line(&err, &files.keys_path), 3, "{err}");
    assert!(!err.contains("cli-key-0001"), "leaks the key: {err}");
}

#[test]
fn help_works_everywhere() {
    let dir = tempfile::tempdir().expect("temp dir");
    let top = run_cli(&["--help"], dir.path());
    assert!(top.status.success(), "{}", top.stderr);
    for word in ["Usage", "run", "check"] {
        assert!(
            top.stdout.contains(word),
            "top-level help lacks {word}: {}",
            top.stdout
        );
    }
    for sub in ["run", "check"] {
        let out = run_cli(&[sub, "--help"], dir.path());
        assert!(out.status.success(), "{sub}: {}", out.stderr);
        assert!(out.stdout.contains("Usage"), "{sub}: {}", out.stdout);
        assert!(out.stdout.contains("--config"), "{sub}: {}", out.stdout);
    }
    // No subcommand at all is a usage error, not a crash.
    let none = run_cli(&[], dir.path());
    assert!(!none.status.success());
    assert!(none.stderr.contains("Usage"), "{}", none.stderr);
}

#[test]
fn check_shipped_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run_cli(&["check", "--config", "conf/gateway.yaml"], root);
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("conf/gateway.yaml: ok, "),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains(" routes, "), "{}", out.stdout);
}
