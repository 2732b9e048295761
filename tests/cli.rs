//! The command line: `check` on good and bad configurations, and `--help`.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::path::Path;

use common::*;

const KEYS: &str = r#"{
  "cli-key-0001": {"user": "ann", "service": "chat"},
  "cli-key-0002": {"user": "bob", "services": ["chat", "tts"]},
  "cli-key-0003": {"user": "root", "service": "*"}
}"#;

/// Two routes, written block style so every field has its own line.
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

fn config(routes: &str) -> String {
    default_config(free_port(), routes)
}

/// Writes `config_yaml` and `keys` to a temp dir and runs
/// `check --config <path>` from there.
fn check(config_yaml: &str, keys: &str) -> (GatewayFiles, CliOutput) {
    let files = GatewayFiles::write(config_yaml, keys);
    let path = files.config_path.to_str().expect("UTF-8 temp path");
    let out = run_cli(&["check", "--config", path], files.dir.path());
    (files, out)
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

/// The line number printed after `file:` in `err`.
fn reported_line(err: &str, file: &Path) -> usize {
    let name = format!("{}:", file.display());
    let at = err.find(&name).expect("file named") + name.len();
    err[at..]
        .split(':')
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no line number: {err}"))
}

#[test]
fn check_good_config_prints_summary() {
    let (files, out) = check(&config(ROUTES), KEYS);
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
    let (files, out) = check(&yaml, KEYS);
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
        let (files, out) = check(&yaml, KEYS);
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
    let routes = ROUTES.replace("127.0.0.1:5002", "no-such-host.invalid:5002");
    let (files, out) = check(&config(&routes), KEYS);
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

#[test]
fn check_rejects_duplicate_route_name() {
    let (files, out) = check(&config(DUPLICATE_NAME), KEYS);
    assert!(!out.status.success());
    let err = &out.stderr;
    assert!(
        err.contains(&files.config_path.display().to_string()),
        "{err}"
    );
    assert!(err.contains("\"chat\""), "names the route: {err}");
    assert!(err.contains("already exists"), "{err}");
}

/// Duplicate names are found after parsing, and located in the text.
#[test]
fn check_duplicate_route_name_has_position() {
    let (files, out) = check(&config(DUPLICATE_NAME), KEYS);
    assert_fails_at(&out, &files.config_path);
}

#[test]
fn check_rejects_missing_key_file() {
    let yaml = config(ROUTES).replace("keys_file: \"keys.json\"", "keys_file: \"nope.json\"");
    assert!(yaml.contains("nope.json"));
    let (files, out) = check(&yaml, KEYS);
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
    let (files, out) = check(&config(ROUTES), keys);
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
