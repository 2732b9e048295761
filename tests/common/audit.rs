//! Reading the gateway's audit log (one JSON object a line).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::gateway::Gateway;
use super::util::wait_until;

/// `audit.log` in the gateway's dir: where `audit_log: audit.log` writes.
pub fn audit_file(gw: &Gateway) -> PathBuf {
    gw.dir.path().join("audit.log")
}

/// The complete lines of the audit file at `path`, parsed (a line still
/// being written is left out; none yet when the file is missing). Panics
/// on a complete line that is not JSON.
pub fn audit_lines(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l:?}"))
        })
        .collect()
}

/// The line of request id `rid` among `lines`.
pub fn by_rid<'a>(lines: &'a [Value], rid: &str) -> Option<&'a Value> {
    lines.iter().find(|v| v["request_id"] == rid)
}

/// Polls the audit file at `path` until it has a line for every id in
/// `rids`; returns all its lines. Panics after `timeout`.
pub fn wait_audit(path: &Path, rids: &[&str], timeout: Duration) -> Vec<Value> {
    let mut lines = Vec::new();
    let complete = wait_until(timeout, || {
        lines = audit_lines(path);
        rids.iter().all(|r| by_rid(&lines, r).is_some())
    });
    assert!(
        complete,
        "audit lines {rids:?} in {} after {timeout:?}; have: {lines:?}",
        path.display()
    );
    lines
}

/// The audit line of request `rid` in the gateway's `audit.log`, once
/// written (within 10 s).
pub fn audit_of(gw: &Gateway, rid: &str) -> Value {
    let path = audit_file(gw);
    let mut found = None;
    let ok = wait_until(Duration::from_secs(10), || {
        found = by_rid(&audit_lines(&path), rid).cloned();
        found.is_some()
    });
    assert!(ok, "no audit line for {rid}:\n{}", gw.log());
    found.unwrap_or(Value::Null)
}
