// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

// The key commands against a running gateway: `keygen` (usable within a
// second, alone and twenty at once), `keys revoke` (and `--delete`), and
// expiry at its moment. The key file itself (`keys hash`, its mode, reload
// on a rename, `keys list`, warnings) is in `key_file.rs`.
//
// Every test starts its own gateway (or none) in its own temp dir, and
// waits for things by polling with a deadline.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::*;

use serde_json::Value;

/// The promise for key changes: usable (or refused) within a second.
const WITHIN: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Runs `ai-gateway <args>` in `cwd` and returns its output and the instant
/// it exited (to within a millisecond). Killed after 30 s.
fn run_timed(args: &[&str], cwd: &Path) -> (CliOutput, Instant) {
    let out_dir = tempfile::tempdir().expect("temp dir for CLI output");
    let mut child = spawn_cli(args, cwd, out_dir.path(), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, exited) = loop {
        if let Some(status) = child.try_wait().expect("try_wait on CLI child") {
            break (status, Instant::now());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ai-gateway {args:?} did not exit within 30 s");
        }
        thread::sleep(Duration::from_millis(1));
    };
    (collect_output(status, out_dir.path(), 0), exited)
}

/// Spawns `ai-gateway <args>` with stdout/stderr going to files `<n>.out`
/// and `<n>.err` in `out_dir`.
fn spawn_cli(args: &[&str], cwd: &Path, out_dir: &Path, n: usize) -> Child {
    Command::new(gateway_bin())
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(fs::File::create(out_dir.join(format!("{n}.out"))).expect("create stdout file"))
        .stderr(fs::File::create(out_dir.join(format!("{n}.err"))).expect("create stderr file"))
        .spawn()
        .expect("spawn the ai-gateway binary")
}

fn collect_output(status: std::process::ExitStatus, out_dir: &Path, n: usize) -> CliOutput {
    let read = |name: String| {
        String::from_utf8_lossy(&fs::read(out_dir.join(name)).unwrap_or_default()).into_owned()
    };
    CliOutput {
        status,
        stdout: read(format!("{n}.out")),
        stderr: read(format!("{n}.err")),
    }
}

/// `keygen --user <user> --service chat --keys <file>`, returning the key
/// and the instant keygen exited.
fn keygen_keys(gw: &Gateway, user: &str, extra: &[&str]) -> (String, Instant) {
    let mut args = vec![
        "keygen",
        "--user",
        user,
        "--service",
        "chat",
        "--keys",
        s(&gw.keys_path),
    ];
    args.extend_from_slice(extra);
    let (out, exited) = run_timed(&args, gw.dir.path());
    (key_from_keygen(&out), exited)
}

/// `keys list --json` on `keys_path`, parsed.
fn list_json(keys_path: &Path, cwd: &Path) -> Vec<Value> {
    let out = run_cli(&["keys", "list", "--json", "--keys", s(keys_path)], cwd);
    assert_ok(&out, "keys list --json");
    match serde_json::from_str(&out.stdout) {
        Ok(Value::Array(rows)) => rows,
        other => panic!(
            "keys list --json is not a JSON array ({other:?}):\n{}",
            out.stdout
        ),
    }
}

fn row_for<'a>(rows: &'a [Value], key: &str) -> Option<&'a Value> {
    let id = key_id(key);
    rows.iter().find(|r| r["id"] == id.as_str())
}

// ---------------------------------------------------------------------------
// 1. keygen: usable within a second, with no signal
// ---------------------------------------------------------------------------

#[test]
fn keygen_key_works_within_a_second_without_a_signal() {
    let echo = EchoServer::start();
    let gw = Gateway::start(&key_tests_config(echo.addr), KeyFile::new());
    let agent = agent();

    let (key, exited) = keygen_keys(&gw, "ann", &[]);
    let deadline = exited + WITHIN;
    let mut last = (0, String::new());
    let accepted_at = poll_until(deadline, || {
        let r = ping_with_key(&agent, &gw, &key);
        let at = Instant::now();
        let ok = r.0 == 200;
        last = r;
        ok.then_some(at)
    });
    let Some(accepted_at) = accepted_at else {
        panic!(
            "the new key was not accepted within {WITHIN:?} of keygen's exit; last answer {} {:?}",
            last.0, last.1
        );
    };
    assert!(
        accepted_at - exited <= WITHIN,
        "accepted {:?} after keygen exited",
        accepted_at - exited
    );
    assert_eq!(echo.hits(), 1, "exactly the accepted request went upstream");
    let log = gw.log();
    assert!(log.contains("reload (file change)"), "log:\n{log}");
    assert!(
        !log.contains("SIGHUP"),
        "nothing sent a signal, yet:\n{log}"
    );
    assert!(!log.contains(&key), "the gateway logged the key");

    let text = fs::read_to_string(&gw.keys_path).unwrap();
    assert!(!text.contains(&key), "the key file holds the key:\n{text}");
    assert!(
        text.contains(&digest_name(&key)),
        "the key file lacks {}:\n{text}",
        digest_name(&key)
    );
    let entries = read_entries(&gw.keys_path);
    assert_eq!(entries.len(), 1, "{text}");
    let entry = &entries[&digest_name(&key)];
    assert_eq!(entry["user"], "ann");
    assert_eq!(entry["service"], "chat");
    let created = entry["created_at"]
        .as_str()
        .unwrap_or_else(|| panic!("no created_at string in {entry}"));
    let created = humantime::parse_rfc3339(created)
        .unwrap_or_else(|e| panic!("created_at {created:?} is not RFC 3339: {e}"));
    let age = SystemTime::now()
        .duration_since(created)
        .expect("created_at is in the future");
    assert!(age < Duration::from_secs(60), "created_at is {age:?} old");
    assert!(entry.get("expires_at").is_none(), "{entry}");
    assert_mode_0600(&gw.keys_path, "keygen");
}

// ---------------------------------------------------------------------------
// 2. keys revoke, keys revoke --delete
// ---------------------------------------------------------------------------

#[test]
fn revoke_refuses_within_a_second_and_delete_removes_the_entry() {
    let echo = EchoServer::start();
    let gw = Gateway::start(&key_tests_config(echo.addr), KeyFile::new());
    let agent = agent();
    // keygen through --config, from an unrelated working directory: the key
    // file is found relative to the config, not to the cwd.
    let elsewhere = tempfile::tempdir().unwrap();
    let mut keys = Vec::new();
    for user in ["ann", "bob", "cy"] {
        let out = run_cli(
            &[
                "keygen",
                "--user",
                user,
                "--service",
                "chat",
                "--config",
                s(&gw.config_path),
            ],
            elsewhere.path(),
        );
        keys.push(key_from_keygen(&out));
        assert!(
            !out.stderr.contains("warning"),
            "chat is served, yet: {}",
            out.stderr
        );
    }
    assert_eq!(
        fs::read_dir(elsewhere.path()).unwrap().count(),
        0,
        "keygen --config wrote into the cwd"
    );
    assert_mode_0600(&gw.keys_path, "keygen --config");
    let (ann, bob, cy) = (&keys[0], &keys[1], &keys[2]);
    for k in &keys {
        let deadline = Instant::now() + Duration::from_secs(3);
        poll_status_change(&agent, &gw, k, 401, deadline, "new key accepted");
    }

    let rows = list_json(&gw.keys_path, gw.dir.path());
    assert_eq!(rows.len(), 3, "{rows:?}");
    let ann_id = row_for(&rows, ann).expect("ann's key in keys list")["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(ann_id, key_id(ann));
    assert_eq!(row_for(&rows, ann).unwrap()["state"], "active");

    // Revoke: refused within a second, with the revoked message.
    let (out, exited) = run_timed(
        &["keys", "revoke", &ann_id, "--keys", s(&gw.keys_path)],
        gw.dir.path(),
    );
    assert_ok(&out, "keys revoke");
    assert!(out.stderr.contains(&ann_id), "{}", out.stderr);
    let (status, body, at) = poll_status_change(
        &agent,
        &gw,
        ann,
        200,
        exited + WITHIN,
        "revoked key refused within a second",
    );
    assert!(
        at - exited <= WITHIN,
        "refused only after {:?}",
        at - exited
    );
    assert_eq!(status, 401, "{body}");
    assert_eq!(body, r#"{"error":"api key revoked"}"#);
    assert_mode_0600(&gw.keys_path, "keys revoke");
    let entries = read_entries(&gw.keys_path);
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[&digest_name(ann)]["disabled"], true);
    assert!(entries[&digest_name(ann)]["revoked_at"].is_string());
    let rows = list_json(&gw.keys_path, gw.dir.path());
    assert_eq!(row_for(&rows, ann).unwrap()["state"], "disabled");
    assert_eq!(
        ping_with_key(&agent, &gw, cy).0,
        200,
        "a bystander key stopped working"
    );

    // Revoke --delete (by an 8-digit prefix, through --config): the entry
    // goes, so the key is unknown.
    let bob_prefix = &key_id(bob)[..8];
    let (out, exited) = run_timed(
        &[
            "keys",
            "revoke",
            bob_prefix,
            "--delete",
            "--config",
            s(&gw.config_path),
        ],
        elsewhere.path(),
    );
    assert_ok(&out, "keys revoke --delete");
    let (status, body, at) = poll_status_change(
        &agent,
        &gw,
        bob,
        200,
        exited + WITHIN,
        "deleted key refused within a second",
    );
    assert!(
        at - exited <= WITHIN,
        "refused only after {:?}",
        at - exited
    );
    assert_eq!(status, 401, "{body}");
    assert_eq!(body, r#"{"error":"invalid api key"}"#);
    assert_mode_0600(&gw.keys_path, "keys revoke --delete");
    let text = fs::read_to_string(&gw.keys_path).unwrap();
    assert!(!text.contains(&sha256_hex(bob.as_bytes())), "{text}");
    let rows = list_json(&gw.keys_path, gw.dir.path());
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(row_for(&rows, bob).is_none());
    assert_eq!(
        ping_with_key(&agent, &gw, cy).0,
        200,
        "a bystander key stopped working"
    );
    assert_eq!(
        ping_with_key(&agent, &gw, ann).0,
        401,
        "the revoked key came back"
    );

    // Unknown and ambiguous-looking ids fail without touching the file.
    let before = fs::read(&gw.keys_path).unwrap();
    let out = run_cli(
        &["keys", "revoke", &key_id(bob), "--keys", s(&gw.keys_path)],
        gw.dir.path(),
    );
    assert!(!out.status.success(), "revoking a deleted key succeeded");
    assert_eq!(fs::read(&gw.keys_path).unwrap(), before);
}

// ---------------------------------------------------------------------------
// 3. Expiry at its moment, without a reload
// ---------------------------------------------------------------------------

#[test]
fn key_stops_working_at_its_expiry_without_a_reload() {
    let echo = EchoServer::start();
    let gw = Gateway::start(&key_tests_config(echo.addr), KeyFile::new());
    let agent = agent();

    let (key, exited) = keygen_keys(&gw, "eve", &["--expires", "3s"]);
    let entries = read_entries(&gw.keys_path);
    let expires_at = entries[&digest_name(&key)]["expires_at"]
        .as_str()
        .expect("keygen --expires stored expires_at")
        .to_string();
    let expiry = humantime::parse_rfc3339(&expires_at)
        .unwrap_or_else(|e| panic!("expires_at {expires_at:?} is not RFC 3339: {e}"));
    let ahead = expiry
        .duration_since(SystemTime::now())
        .unwrap_or_else(|_| panic!("expires_at {expires_at} is already past"));
    assert!(
        ahead > Duration::from_millis(1500) && ahead <= Duration::from_secs(4),
        "--expires 3s gave an expiry {ahead:?} ahead"
    );

    // Works before: the reload picks it up well ahead of the expiry.
    let (status, body, _) = poll_status_change(
        &agent,
        &gw,
        &key,
        401,
        exited + WITHIN,
        "expiring key accepted before its expiry",
    );
    assert_eq!(status, 200, "{body}");
    assert!(SystemTime::now() < expiry);
    let reloads = reload_count(&gw);
    assert!(reloads >= 1, "the key works without a reload?");

    // Stops at the moment: every acceptance is before it, the first refusal
    // at or after it and promptly.
    let give_up = expiry + Duration::from_secs(3);
    let mut accepted = 0;
    let (refused_sent, refused_received, body) = loop {
        let sent = SystemTime::now();
        let (status, body) = ping_with_key(&agent, &gw, &key);
        let received = SystemTime::now();
        match status {
            200 => {
                accepted += 1;
                assert!(
                    sent < expiry,
                    "accepted a request sent {:?} after the expiry",
                    sent.duration_since(expiry).unwrap()
                );
            }
            401 => break (sent, received, body),
            other => panic!("unexpected {other} {body:?}"),
        }
        assert!(
            received < give_up,
            "still accepted 3 s after the expiry {expires_at}"
        );
        thread::sleep(POLL);
    };
    assert!(
        accepted > 0,
        "never saw the key accepted in the last stretch"
    );
    assert_eq!(body, r#"{"error":"api key expired"}"#);
    assert!(
        refused_received >= expiry,
        "refused {:?} before the expiry",
        expiry.duration_since(refused_received).unwrap()
    );
    let late = refused_sent.duration_since(expiry).unwrap_or_default();
    assert!(
        late <= Duration::from_millis(1500),
        "refused only {late:?} after the expiry"
    );
    for _ in 0..3 {
        assert_eq!(
            ping_with_key(&agent, &gw, &key).0,
            401,
            "an expired key came back"
        );
    }
    assert_eq!(
        reload_count(&gw),
        reloads,
        "a reload happened around the expiry; log:\n{}",
        gw.log()
    );
    let rows = list_json(&gw.keys_path, gw.dir.path());
    assert_eq!(row_for(&rows, &key).unwrap()["state"], "expired");
    assert_eq!(
        row_for(&rows, &key).unwrap()["expires_at"],
        expires_at.as_str()
    );
}

#[test]
fn keygen_expires_duration_is_never_shorter_than_asked() {
    // Only the key file is used.
    let files = GatewayFiles::write(GatewayConfig::new(), KeyFile::new());
    let kp = s(&files.keys_path);
    for _ in 0..3 {
        let asked_at = SystemTime::now();
        let out = run_cli(
            &[
                "keygen",
                "--user",
                "eve",
                "--service",
                "chat",
                "--expires",
                "3s",
                "--keys",
                kp,
            ],
            files.dir.path(),
        );
        let key = key_from_keygen(&out);
        let entries = read_entries(&files.keys_path);
        let expires_at = entries[&digest_name(&key)]["expires_at"]
            .as_str()
            .expect("expires_at")
            .to_string();
        let expiry = humantime::parse_rfc3339(&expires_at).unwrap();
        let asked = asked_at + Duration::from_secs(3);
        assert!(
            expiry >= asked,
            "--expires 3s at {} gave expires_at {expires_at}, {:?} short of 3 s",
            humantime::format_rfc3339_millis(asked_at),
            asked.duration_since(expiry).unwrap()
        );
    }
}

// ---------------------------------------------------------------------------
// 5. Concurrent keygen
// ---------------------------------------------------------------------------

#[test]
fn twenty_concurrent_keygens_all_land_and_work() {
    const N: usize = 20;
    let seed = "seed-key-for-concurrency-91c2";
    let keys = KeyFile::of([Key::new(&digest_name(seed), "seed").service("chat")]);
    let echo = EchoServer::start();
    // Polls until each new key works: 401s meanwhile must not get the
    // poller blocked by the failed-key throttle.
    let gw = Gateway::start(
        &key_tests_config(echo.addr).failed_key_throttle(Throttle::off()),
        &keys,
    );
    let agent = agent();
    assert_eq!(ping_with_key(&agent, &gw, seed).0, 200);

    let out_dir = tempfile::tempdir().unwrap();
    let users: Vec<String> = (0..N).map(|i| format!("user{i:02}")).collect();
    let mut children: Vec<Option<Child>> = users
        .iter()
        .enumerate()
        .map(|(i, user)| {
            // Half name the key file directly, half through the config.
            let target = if i % 2 == 0 {
                ["--keys", s(&gw.keys_path)]
            } else {
                ["--config", s(&gw.config_path)]
            };
            let mut args = vec!["keygen", "--user", user, "--service", "chat"];
            args.extend_from_slice(&target);
            Some(spawn_cli(&args, gw.dir.path(), out_dir.path(), i))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut outputs: Vec<Option<CliOutput>> = (0..N).map(|_| None).collect();
    while outputs.iter().any(Option::is_none) {
        for (i, slot) in children.iter_mut().enumerate() {
            if let Some(child) = slot {
                if let Some(status) = child.try_wait().expect("try_wait on keygen") {
                    outputs[i] = Some(collect_output(status, out_dir.path(), i));
                    *slot = None;
                }
            }
        }
        if Instant::now() >= deadline {
            for child in children.iter_mut().flatten() {
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!("not every keygen exited within 60 s");
        }
        thread::sleep(POLL);
    }
    let keys: Vec<String> = outputs
        .iter()
        .map(|o| key_from_keygen(o.as_ref().unwrap()))
        .collect();
    let mut distinct = keys.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), N, "keygen printed duplicate keys");

    let entries = read_entries(&gw.keys_path);
    assert_eq!(
        entries.len(),
        N + 1,
        "the key file has {} entries, expected {}: keygens lost each other's writes",
        entries.len(),
        N + 1
    );
    assert!(entries.contains_key(&digest_name(seed)));
    for (key, user) in keys.iter().zip(&users) {
        let e = entries
            .get(&digest_name(key))
            .unwrap_or_else(|| panic!("{user}'s key is not in the file"));
        assert_eq!(e["user"], user.as_str());
    }
    assert_mode_0600(&gw.keys_path, "20 concurrent keygens");
    assert!(
        !leftover_temp_files(gw.dir.path())
            .iter()
            .any(|n| n.starts_with(".ai-gateway-")),
        "temp files left: {:?}",
        leftover_temp_files(gw.dir.path())
    );

    // Every printed key works through the running gateway.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut pending: Vec<&String> = keys.iter().collect();
    let done = poll_until(deadline, || {
        pending.retain(|k| ping_with_key(&agent, &gw, k).0 != 200);
        pending.is_empty().then_some(())
    });
    assert!(
        done.is_some(),
        "{} of the {N} keys never worked; log:\n{}",
        pending.len(),
        gw.log()
    );
    assert_eq!(
        ping_with_key(&agent, &gw, seed).0,
        200,
        "the seed key stopped working"
    );
}
