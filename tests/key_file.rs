// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

// The key file against a running gateway: `keys hash` (in place and with a
// backup), mode 0600 after every write, reload on an editor-style rename
// (and `watch: false`), `keys list`, the warning about a readable file and
// a key present twice. The key commands are in `keys.rs`.
//
// Every test starts its own gateway (or none) in its own temp dir, and
// waits for things by polling with a deadline.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

use serde_json::{json, Map, Value};

/// The promise for key changes: usable (or refused) within a second.
const WITHIN: Duration = Duration::from_secs(1);

/// Starts a gateway whose key file has `mode` before the daemon starts.
fn start_with_mode(config: &GatewayConfig, keys: &KeyFile, mode: u32) -> Gateway {
    let port = free_port();
    let files = GatewayFiles::write(config.clone().listen(loopback(port)), keys);
    chmod(&files.keys_path, mode);
    let mut gw = Gateway::spawn(files, port);
    if let Err(msg) = gw.wait_ready(READY_TIMEOUT) {
        panic!("{msg}");
    }
    gw
}

// ---------------------------------------------------------------------------
// 4. keys hash
// ---------------------------------------------------------------------------

const PLAIN: [&str; 3] = [
    "plain-secret-alpha-7f3a9c",
    "plain-secret-beta-51d0e2",
    "plain-secret-gamma-c88b14",
];

const ALREADY_HASHED: &str = "hashed-secret-delta-0a9e77";

/// A key file of three plaintext keys around one digest entry, with fields
/// the gateway does not know. Returns (file, keys in file order).
fn plaintext_fixture() -> (KeyFile, Vec<&'static str>) {
    let file = KeyFile::of([
        Key::new(PLAIN[0], "alice")
            .service("chat")
            .field("note", "laptop")
            .field("team", json!({"name": "x", "n": 1})),
        Key::new(&digest_name(ALREADY_HASHED), "dave")
            .service("chat")
            .field("note", "already hashed"),
        Key::new(PLAIN[1], "bob")
            .services(["chat", "tts"])
            .created_at("2024-01-01T00:00:00Z")
            .field("note", "ci"),
        Key::new(PLAIN[2], "carol")
            .service("chat")
            .field("tags", json!(["a", "b"]))
            .expires_at("2099-01-01T00:00:00Z"),
    ]);
    (file, vec![PLAIN[0], ALREADY_HASHED, PLAIN[1], PLAIN[2]])
}

/// Runs `keys hash` (with `extra` args) on a running gateway's plaintext
/// key file and checks everything that must hold whether or not a backup
/// was asked for. Returns the gateway, the original text and hash's output.
fn hash_running(extra: &[&str]) -> (EchoServer, Gateway, String, CliOutput) {
    let (original, keys) = plaintext_fixture();
    let echo = EchoServer::start();
    let gw = start_with_mode(&key_tests_config(echo.addr), &original, 0o644);
    let original = original.render();
    let agent = agent();
    for k in &keys {
        assert_eq!(ping_with_key(&agent, &gw, k).0, 200, "{k} before hashing");
    }
    assert_eq!(reload_count(&gw), 0);

    let mut args = vec!["keys", "hash", "--keys", s(&gw.keys_path)];
    args.extend_from_slice(extra);
    let out = run_cli(&args, gw.dir.path());
    assert_ok(&out, "keys hash");
    assert!(
        out.stderr
            .contains("3 key(s) hashed, 1 already stored as digests"),
        "{}",
        out.stderr
    );
    for k in &keys {
        assert!(!out.stderr.contains(k) && !out.stdout.contains(k));
    }

    // The file: no plaintext key, every digest, same order, same fields.
    let text = fs::read_to_string(&gw.keys_path).unwrap();
    for k in PLAIN {
        assert!(!text.contains(k), "{k} is still in the key file:\n{text}");
    }
    let before: Map<String, Value> = serde_json::from_str(&original).unwrap();
    let after = read_entries(&gw.keys_path);
    let names: Vec<&String> = after.keys().collect();
    let expected: Vec<String> = keys.iter().map(|k| digest_name(k)).collect();
    assert_eq!(
        names,
        expected.iter().collect::<Vec<_>>(),
        "order changed:\n{text}"
    );
    for (old, new) in before.values().zip(after.values()) {
        assert_eq!(old, new, "an entry's fields changed");
    }
    assert_mode_0600(&gw.keys_path, "keys hash");

    // The running gateway picks the change up by itself; every old key
    // still works afterwards, and a wrong one still does not.
    assert!(
        gw.wait_log_contains("reload (file change)", Duration::from_secs(3)),
        "no reload after keys hash; log:\n{}",
        gw.log()
    );
    let log = gw.log();
    let reload_line = log
        .lines()
        .find(|l| l.contains("reload (file change)"))
        .unwrap();
    assert!(
        reload_line.contains("generation 2,") && reload_line.contains(" 4 keys"),
        "{reload_line}"
    );
    for k in &keys {
        assert_eq!(ping_with_key(&agent, &gw, k).0, 200, "{k} after hashing");
    }
    assert_eq!(ping_with_key(&agent, &gw, "plain-secret-wrong").0, 401);
    assert!(!leftover_temp_files(gw.dir.path())
        .iter()
        .any(|n| n.starts_with(".ai-gateway-")));
    (echo, gw, original, out)
}

#[test]
fn keys_hash_in_place_keeps_every_key_working() {
    let (_echo, gw, _original, _out) = hash_running(&[]);
    let bak = gw.dir.path().join("keys.json.bak");
    assert!(
        !bak.exists(),
        "keys hash without --backup left {}",
        bak.display()
    );

    // Hashing a fully hashed file changes nothing.
    let before = fs::read(&gw.keys_path).unwrap();
    let out = run_cli(&["keys", "hash", "--keys", s(&gw.keys_path)], gw.dir.path());
    assert_ok(&out, "second keys hash");
    assert!(
        out.stderr.contains("0 key(s) hashed, 4 already"),
        "{}",
        out.stderr
    );
    assert_eq!(fs::read(&gw.keys_path).unwrap(), before);
    assert!(!bak.exists());
}

#[test]
fn keys_hash_backup_keeps_the_original_with_mode_0600() {
    let (_echo, gw, original, out) = hash_running(&["--backup"]);
    let bak = gw.dir.path().join("keys.json.bak");
    assert!(out.stderr.contains(s(&bak)), "{}", out.stderr);
    assert_eq!(
        fs::read_to_string(&bak).expect("keys.json.bak exists"),
        original,
        "the backup is not the original file"
    );
    assert_mode_0600(&bak, "keys hash --backup (the backup)");
}

// ---------------------------------------------------------------------------
// 6. Mode 0600 after every write, even when the file was 0644
// ---------------------------------------------------------------------------

#[test]
fn every_write_leaves_the_key_file_0600_even_from_0644() {
    let echo = EchoServer::start();
    let port = free_port();
    let files = GatewayFiles::write(
        key_tests_config(echo.addr).listen(loopback(port)),
        one_key(PLAIN[0], "alice"),
    );
    let dir = files.dir.path().to_path_buf();
    let keys_path = files.keys_path.clone();
    let kp = s(&keys_path);

    chmod(&keys_path, 0o644);
    let out = run_cli(
        &["keygen", "--user", "ann", "--service", "chat", "--keys", kp],
        &dir,
    );
    let ann = key_from_keygen(&out);
    assert_mode_0600(&keys_path, "keygen on a 0644 file");

    let out = run_cli(
        &["keygen", "--user", "bob", "--service", "chat", "--keys", kp],
        &dir,
    );
    let bob = key_from_keygen(&out);

    chmod(&keys_path, 0o644);
    assert_ok(
        &run_cli(&["keys", "revoke", &key_id(&ann), "--keys", kp], &dir),
        "keys revoke",
    );
    assert_mode_0600(&keys_path, "keys revoke on a 0644 file");

    chmod(&keys_path, 0o644);
    assert_ok(
        &run_cli(
            &["keys", "revoke", &key_id(&bob), "--delete", "--keys", kp],
            &dir,
        ),
        "keys revoke --delete",
    );
    assert_mode_0600(&keys_path, "keys revoke --delete on a 0644 file");

    chmod(&keys_path, 0o644);
    assert_ok(
        &run_cli(&["keys", "hash", "--backup", "--keys", kp], &dir),
        "keys hash --backup",
    );
    assert_mode_0600(&keys_path, "keys hash on a 0644 file");
    assert_mode_0600(
        &dir.join("keys.json.bak"),
        "keys hash --backup (the backup)",
    );
    let lock = dir.join("keys.json.lock");
    assert_eq!(
        mode(&lock) & 0o077,
        0,
        "the lock file is group/other accessible"
    );
    assert!(
        leftover_temp_files(&dir).is_empty(),
        "temp files left: {:?}",
        leftover_temp_files(&dir)
    );
    let text = fs::read_to_string(&keys_path).unwrap();
    assert!(!text.contains(PLAIN[0]), "{text}");

    // The daemon is happy with what the tools wrote: no permission warning,
    // the revoked key refused, the hashed plaintext key accepted.
    let mut gw = Gateway::spawn(files, port);
    if let Err(msg) = gw.wait_ready(READY_TIMEOUT) {
        panic!("{msg}");
    }
    assert!(gw.wait_log_contains("loaded ", Duration::from_secs(5)));
    assert!(
        !gw.log().contains("readable by group or others"),
        "{}",
        gw.log()
    );
    let agent = agent();
    assert_eq!(ping_with_key(&agent, &gw, PLAIN[0]).0, 200);
    assert_eq!(
        ping_with_key(&agent, &gw, &ann),
        (401, r#"{"error":"api key revoked"}"#.to_string())
    );
    assert_eq!(
        ping_with_key(&agent, &gw, &bob),
        (401, r#"{"error":"invalid api key"}"#.to_string())
    );
}

// ---------------------------------------------------------------------------
// 7. Reload on an editor-style rename; watch: false
// ---------------------------------------------------------------------------

fn one_key(key: &str, user: &str) -> KeyFile {
    KeyFile::of([Key::new(key, user).service("chat")])
}

#[test]
fn rename_over_the_key_file_is_picked_up_without_a_signal() {
    let (old, new) = ("rename-old-key-3e1f", "rename-new-key-77ac");
    let echo = EchoServer::start();
    let gw = Gateway::start(&key_tests_config(echo.addr), one_key(old, "old"));
    let agent = agent();
    assert_eq!(ping_with_key(&agent, &gw, old).0, 200);
    assert_eq!(ping_with_key(&agent, &gw, new).0, 401);

    let written = Instant::now();
    gw.write_keys(one_key(new, "new"));
    let (status, body, at) = poll_status_change(
        &agent,
        &gw,
        new,
        401,
        written + WITHIN,
        "key written by rename accepted within a second",
    );
    assert_eq!(status, 200, "{body}");
    assert!(at - written <= WITHIN);
    assert_eq!(
        ping_with_key(&agent, &gw, old),
        (401, r#"{"error":"invalid api key"}"#.to_string())
    );
    let log = gw.log();
    assert!(log.contains("reload (file change)"), "{log}");
    assert!(!log.contains("SIGHUP"), "{log}");
}

#[test]
fn with_watch_false_changes_wait_for_sighup() {
    let (old, new) = ("nowatch-old-key-4b2d", "nowatch-new-key-90fe");
    let echo = EchoServer::start();
    // The poll below presents a key that is not valid yet, many times: the
    // failed-key throttle (tested in protection.rs) would block the poller.
    let gw = Gateway::start(
        &key_tests_config(echo.addr)
            .failed_key_throttle(Throttle::off())
            .watch(false),
        one_key(old, "old"),
    );
    let agent = agent();
    assert_eq!(ping_with_key(&agent, &gw, old).0, 200);

    gw.write_keys(one_key(new, "new"));
    // Also a plain in-place write, in case only renames were ignored.
    fs::write(&gw.keys_path, one_key(new, "new").render()).unwrap();
    let until = Instant::now() + Duration::from_millis(1500);
    let mut polls = 0;
    while Instant::now() < until {
        assert_eq!(
            ping_with_key(&agent, &gw, old).0,
            200,
            "watch: false, yet the old key stopped working; log:\n{}",
            gw.log()
        );
        assert_eq!(
            ping_with_key(&agent, &gw, new).0,
            401,
            "watch: false, yet the new key works"
        );
        polls += 1;
        thread::sleep(Duration::from_millis(50));
    }
    assert!(polls > 5);
    let log = gw.log();
    assert!(!log.contains("file change"), "{log}");
    assert!(!log.contains("reload ("), "{log}");

    gw.signal("HUP");
    let (status, body, _) = poll_status_change(
        &agent,
        &gw,
        new,
        401,
        Instant::now() + Duration::from_secs(3),
        "new key after SIGHUP",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(ping_with_key(&agent, &gw, old).0, 401);
    let log = gw.log();
    assert!(log.contains("reload (SIGHUP)"), "{log}");
    assert!(!log.contains("file change"), "{log}");
}

// ---------------------------------------------------------------------------
// 8. keys list
// ---------------------------------------------------------------------------

#[test]
fn keys_list_shows_ids_and_states_but_never_a_key() {
    let disabled = "list-disabled-secret-1d5c";
    let expired = "list-expired-secret-9a0b";
    let hashed = "list-hashed-secret-62ee";
    let keys = KeyFile::of([
        Key::new(PLAIN[0], "alice")
            .service("chat")
            .created_at("2024-05-01T10:00:00Z"),
        Key::new(&digest_name(hashed), "hank")
            .services(["chat", "tts"])
            .expires_at("2099-01-01T00:00:00Z"),
        Key::new(expired, "erin")
            .service("chat")
            .expires_at("2001-01-01T00:00:00Z"),
        Key::new(disabled, "dina").service("chat").disabled(true),
    ]);
    let echo = EchoServer::start();
    let gw = Gateway::start(&key_tests_config(echo.addr), &keys);
    let secrets = [PLAIN[0], hashed, expired, disabled];

    let out = run_cli(
        &["keys", "list", "--config", s(&gw.config_path)],
        gw.dir.path(),
    );
    assert_ok(&out, "keys list");
    for k in secrets {
        assert!(
            !out.stdout.contains(k) && !out.stderr.contains(k),
            "keys list showed {k}:\n{}{}",
            out.stdout,
            out.stderr
        );
    }
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", out.stdout);
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "USER", "SERVICES", "CREATED", "EXPIRES", "STATE"],
        "{}",
        out.stdout
    );
    let expect = [
        (PLAIN[0], "alice", "chat", "active (plaintext)"),
        (hashed, "hank", "chat,tts", "active"),
        (expired, "erin", "chat", "expired (plaintext)"),
        (disabled, "dina", "chat", "disabled (plaintext)"),
    ];
    for (line, (k, user, services, state)) in lines[1..].iter().zip(expect) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[0], key_id(k), "{line}");
        assert_eq!(cols[1], user, "{line}");
        assert_eq!(cols[2], services, "{line}");
        assert!(line.ends_with(state), "{line:?} should end with {state:?}");
    }
    assert!(lines[1].contains("2024-05-01T10:00:00Z") && lines[1].contains("never"));
    assert!(
        out.stderr.contains("3 key(s) stored in plaintext"),
        "{}",
        out.stderr
    );

    let out = run_cli(
        &["keys", "list", "--json", "--keys", s(&gw.keys_path)],
        gw.dir.path(),
    );
    assert_ok(&out, "keys list --json");
    for k in secrets {
        assert!(!out.stdout.contains(k), "keys list --json showed {k}");
    }
    let rows: Vec<Value> = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("keys list --json is not JSON ({e}):\n{}", out.stdout));
    assert_eq!(rows.len(), 4);
    for row in &rows {
        for field in [
            "id",
            "user",
            "services",
            "created_at",
            "expires_at",
            "state",
        ] {
            assert!(row.get(field).is_some(), "{field} missing from {row}");
        }
    }
    assert_eq!(rows[0]["id"], key_id(PLAIN[0]).as_str());
    assert_eq!(rows[0]["user"], "alice");
    assert_eq!(rows[0]["services"], json!(["chat"]));
    assert_eq!(rows[0]["created_at"], "2024-05-01T10:00:00Z");
    assert_eq!(rows[0]["expires_at"], Value::Null);
    assert_eq!(rows[0]["state"], "active");
    assert_eq!(rows[1]["id"], key_id(hashed).as_str());
    assert_eq!(rows[1]["services"], json!(["chat", "tts"]));
    assert_eq!(rows[1]["created_at"], Value::Null);
    assert_eq!(rows[1]["expires_at"], "2099-01-01T00:00:00Z");
    assert_eq!(rows[2]["state"], "expired");
    assert_eq!(rows[3]["state"], "disabled");

    // The daemon agrees with the listed states.
    let agent = agent();
    assert_eq!(ping_with_key(&agent, &gw, PLAIN[0]).0, 200);
    assert_eq!(ping_with_key(&agent, &gw, hashed).0, 200);
    assert_eq!(
        ping_with_key(&agent, &gw, expired).1,
        r#"{"error":"api key expired"}"#
    );
    assert_eq!(
        ping_with_key(&agent, &gw, disabled).1,
        r#"{"error":"api key revoked"}"#
    );
}

// ---------------------------------------------------------------------------
// 9. Permission warning at start; duplicate key rejected by check
// ---------------------------------------------------------------------------

#[test]
fn daemon_warns_at_start_when_the_key_file_is_group_readable() {
    let echo = EchoServer::start();
    let gw = start_with_mode(
        &key_tests_config(echo.addr),
        &one_key(PLAIN[0], "alice"),
        0o644,
    );
    assert!(
        gw.wait_log_contains("readable by group or others", Duration::from_secs(5)),
        "no permission warning; log:\n{}",
        gw.log()
    );
    assert!(gw.log().contains("0644"), "{}", gw.log());
    assert!(!gw.log().contains(PLAIN[0]), "the warning leaks the key");
    // A warning, not a refusal.
    assert_eq!(ping_with_key(&agent(), &gw, PLAIN[0]).0, 200);

    let quiet = start_with_mode(
        &key_tests_config(echo.addr),
        &one_key(PLAIN[0], "alice"),
        0o600,
    );
    assert!(quiet.wait_log_contains("loaded ", Duration::from_secs(5)));
    assert!(
        !quiet.log().contains("readable by group or others"),
        "warned about a 0600 file:\n{}",
        quiet.log()
    );
}

#[test]
fn same_key_in_plaintext_and_as_digest_is_rejected_naming_both_users() {
    let key = "duplicate-secret-key-5f8e21";
    let keys_json = KeyFile::of([
        Key::new(key, "erin").service("chat"),
        Key::new(&digest_name(key), "frank").service("chat"),
    ])
    .render();
    let echo = EchoServer::start();
    let port = free_port();
    let files = GatewayFiles::write(
        key_tests_config(echo.addr).listen(loopback(port)),
        &keys_json,
    );

    let out = run_cli(
        &["check", "--config", s(&files.config_path)],
        files.dir.path(),
    );
    assert!(
        !out.status.success(),
        "check accepted a duplicate key:\n{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("erin") && out.stderr.contains("frank"),
        "the error does not name both users: {}",
        out.stderr
    );
    assert!(out.stderr.contains(&key_id(key)), "{}", out.stderr);
    assert!(
        !out.stderr.contains(key) && !out.stdout.contains(key),
        "the error shows the key"
    );

    // keys hash refuses the file without touching it or showing the key.
    let out = run_cli(
        &["keys", "hash", "--backup", "--keys", s(&files.keys_path)],
        files.dir.path(),
    );
    assert!(!out.status.success(), "keys hash merged a duplicate");
    assert!(!out.stderr.contains(key), "{}", out.stderr);
    assert_eq!(fs::read_to_string(&files.keys_path).unwrap(), keys_json);
    assert!(!files.dir.path().join("keys.json.bak").exists());

    // Nor does the daemon start on it.
    let mut gw = Gateway::spawn(files, port);
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .expect("the gateway kept running on a key file with a duplicate key");
    assert!(!status.success());
    let log = gw.log();
    assert!(log.contains("erin") && log.contains("frank"), "{log}");
    assert!(!log.contains(key), "{log}");
}
