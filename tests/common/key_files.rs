//! Key files written by tests, the names the gateway gives keys, and the
//! helpers of the key-lifecycle tests (`keys.rs`, `key_file.rs`): polling
//! a key's status, checking `keygen` output and the key file's mode.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::config::{GatewayConfig, Route};
use super::gateway::{CliOutput, Gateway};
use super::util::sha256_hex;

/// How often the key-lifecycle tests poll.
pub const POLL: Duration = Duration::from_millis(10);

/// The gateway the key-lifecycle tests run: `/chat/` for service `chat`
/// (prefix kept) to `upstream`.
pub fn key_tests_config(upstream: SocketAddr) -> GatewayConfig {
    GatewayConfig::new().route(Route::new("chat", "/chat/", "chat").upstream(upstream))
}

/// A key's id as logs, `keys list` and `keys revoke` know it: the first 12
/// hex digits of its SHA-256.
pub fn key_id(key: &str) -> String {
    sha256_hex(key.as_bytes())[..12].to_string()
}

/// A temp path as a `&str` for a command line.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

pub fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

pub fn assert_mode_0600(path: &Path, after: &str) {
    let m = mode(path);
    assert_eq!(
        m,
        0o600,
        "{} has mode {m:04o} after {after}, expected 0600",
        path.display()
    );
}

/// The entry name `keygen`/`keys hash` store for a key.
pub fn digest_name(key: &str) -> String {
    format!("sha256:{}", sha256_hex(key.as_bytes()))
}

/// `GET /chat/ping` with `X-API-Key: key`: (status, body).
pub fn ping_with_key(agent: &ureq::Agent, gw: &Gateway, key: &str) -> (u16, String) {
    let mut resp = agent
        .get(gw.url("/chat/ping"))
        .header("X-API-Key", key)
        .call()
        .expect("request to the gateway");
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    (status, body)
}

/// Calls `f` every [`POLL`] until it returns `Some`, or `deadline` passes.
pub fn poll_until<T>(deadline: Instant, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Polls until `key` gets a status other than `not`; returns (status, body,
/// when) or panics with the last answer once `deadline` passes.
pub fn poll_status_change(
    agent: &ureq::Agent,
    gw: &Gateway,
    key: &str,
    not: u16,
    deadline: Instant,
    what: &str,
) -> (u16, String, Instant) {
    let mut last = (0, String::new());
    poll_until(deadline, || {
        let (status, body) = ping_with_key(agent, gw, key);
        let at = Instant::now();
        if status == not {
            last = (status, body);
            None
        } else {
            Some((status, body, at))
        }
    })
    .unwrap_or_else(|| panic!("{what}: still {} {:?} at the deadline", last.0, last.1))
}

pub fn assert_ok(out: &CliOutput, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        out.stdout,
        out.stderr
    );
}

/// Checks keygen's output (stdout is exactly the key and a newline; stderr
/// names the id, not the key) and returns the key.
pub fn key_from_keygen(out: &CliOutput) -> String {
    assert_ok(out, "keygen");
    let key = out
        .stdout
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("keygen stdout does not end in a newline: {:?}", out.stdout));
    assert!(
        !key.contains('\n') && !key.contains('\r'),
        "keygen stdout is not exactly one line: {:?}",
        out.stdout
    );
    assert!(key.starts_with("agw_"), "key {key:?} lacks the agw_ prefix");
    assert_eq!(key.len(), 36, "key {key:?} is not 36 characters");
    assert!(
        key[4..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "key {key:?} has characters outside URL-safe base64"
    );
    assert!(
        out.stderr.contains(&key_id(key)),
        "keygen stderr does not name the key id {}: {:?}",
        key_id(key),
        out.stderr
    );
    assert!(
        !out.stderr.contains(key),
        "keygen printed the key on stderr"
    );
    key.to_string()
}

pub fn read_entries(path: &Path) -> Map<String, Value> {
    let text = fs::read_to_string(path).expect("read key file");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("key file is not a JSON object ({e}):\n{text}"))
}

/// Files the tools' atomic writes leave behind if they fail half-way.
pub fn leftover_temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .expect("read temp dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

pub fn reload_count(gw: &Gateway) -> usize {
    gw.log().matches("reload (").count()
}
