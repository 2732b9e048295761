//! The history rebuilt at start from the audit log, so the page shows the
//! same 24 hours and 30 days after a restart.
//!
//! Bounded in what it reads: rotated files last changed more than 30 days
//! ago are not opened; in an uncompressed file, the first line of the 30
//! days is found by bisecting on the lines' timestamps, and reading starts
//! there; the current file is read only up to its length at start (what
//! the writer appends after that, it counts itself). Bounded in memory:
//! the history keeps buckets, not lines, one line is held at a time.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use crate::ops::history::{Seen, DAYS, DAY_S};
use crate::ops::History;
use crate::usage::report::audit_files;

/// Below this span, bisecting stops and reading begins.
const BISECT_STOP: u64 = 64 * 1024;

/// What the rebuild did, for the page and the log.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    pub lines: u64,
    pub bytes: u64,
    pub took: Duration,
    pub error: Option<String>,
}

/// Whether the rebuild has finished.
#[derive(Debug, Default)]
pub struct RebuildState {
    done: Mutex<Option<Rebuilt>>,
}

impl RebuildState {
    pub fn set(&self, r: Rebuilt) {
        *self.done.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
    }

    pub fn get(&self) -> Option<Rebuilt> {
        self.done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The fields of an audit line the history counts.
#[derive(Debug, Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    ts: Cow<'a, str>,
    #[serde(default, borrow)]
    key_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    decision: Cow<'a, str>,
    #[serde(default)]
    status: u16,
    #[serde(default, borrow)]
    route: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    upstream: Option<Cow<'a, str>>,
    #[serde(default)]
    latency_ms: f64,
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The Unix seconds of a line's `ts`, read without parsing the rest.
fn line_ts(raw: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(raw, br#""ts":""#)? + 6;
    let rest = raw.get(at..)?;
    let end = memchr::memchr(b'"', rest)?;
    let text = std::str::from_utf8(rest.get(..end)?).ok()?;
    humantime::parse_rfc3339_weak(text).ok().map(unix_s)
}

/// Counts one line into `history`; whether it was an audit record.
fn count(history: &History, raw: &[u8], from_s: u64) -> bool {
    let Ok(l) = serde_json::from_slice::<Line<'_>>(raw) else {
        return false;
    };
    let Ok(ts) = humantime::parse_rfc3339_weak(&l.ts) else {
        return false;
    };
    let ts_s = unix_s(ts);
    if ts_s < from_s || l.decision.starts_with("admin_") {
        return true;
    }
    // Whole microseconds of a non-negative latency.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let latency_us = (l.latency_ms.max(0.0) * 1000.0) as u64;
    history.add(&Seen {
        ts_s,
        key_id: l.key_id.as_deref(),
        user: l.user.as_deref(),
        decision: &l.decision,
        status: l.status,
        route: l.route.as_deref(),
        upstream: l.upstream.as_deref(),
        latency_us,
        prompt_tokens: l.prompt_tokens.unwrap_or(0),
        completion_tokens: l.completion_tokens.unwrap_or(0),
    });
    true
}

/// The offset in `file` (of `len` bytes) at or before the first line
/// written at or after `from_s`, found by bisecting on timestamps.
fn first_recent(file: &mut File, len: u64, from_s: u64) -> std::io::Result<u64> {
    let (mut lo, mut hi) = (0u64, len);
    let mut line = Vec::new();
    while hi - lo > BISECT_STOP {
        let mid = lo + (hi - lo) / 2;
        file.seek(SeekFrom::Start(mid))?;
        let mut r = BufReader::new(&mut *file);
        line.clear();
        let skipped = r.read_until(b'\n', &mut line)? as u64;
        line.clear();
        r.read_until(b'\n', &mut line)?;
        match line_ts(&line) {
            Some(ts) if ts < from_s => lo = (mid + skipped).min(hi),
            Some(_) => hi = mid,
            // Not a record: look earlier, never skip past lines unread.
            None => hi = mid,
        }
    }
    Ok(lo)
}

/// Reads the audit log at `path` and its rotated files into `history`:
/// the lines of the 30 days before `now`, the current file up to
/// `current_len` bytes. Returns the lines read and the bytes read.
pub fn rebuild(
    history: &History,
    path: &Path,
    now: SystemTime,
    current_len: u64,
) -> std::io::Result<(u64, u64)> {
    let from_s = (unix_s(now) / DAY_S).saturating_sub(DAYS - 1) * DAY_S;
    let from = SystemTime::UNIX_EPOCH + Duration::from_secs(from_s);
    let (mut lines, mut bytes) = (0u64, 0u64);
    for f in audit_files(path)? {
        let meta = std::fs::metadata(&f)?;
        if meta.modified().is_ok_and(|m| m < from) {
            continue;
        }
        let mut file = File::open(&f)?;
        let reader: Box<dyn Read> = if f.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else {
            let len = if f == path {
                current_len.min(meta.len())
            } else {
                meta.len()
            };
            let start = first_recent(&mut file, len, from_s)?;
            file.seek(SeekFrom::Start(start))?;
            Box::new(file.take(len - start))
        };
        let mut reader = BufReader::with_capacity(256 * 1024, reader);
        let mut raw = Vec::with_capacity(1024);
        loop {
            raw.clear();
            let n = reader.read_until(b'\n', &mut raw)?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            if count(history, &raw, from_s) {
                lines += 1;
            }
        }
    }
    Ok((lines, bytes))
}

/// [`rebuild`], timed and recorded in `state` (run on a thread the daemon
/// starts, so the gateway serves meanwhile).
pub fn rebuild_into(history: &History, path: &Path, current_len: u64, state: &RebuildState) {
    let start = Instant::now();
    let result = rebuild(history, path, SystemTime::now(), current_len);
    let took = start.elapsed();
    let r = match result {
        Ok((lines, bytes)) => {
            log::info!(
                "history: rebuilt from {} in {} ms ({lines} lines, {bytes} bytes read)",
                path.display(),
                took.as_millis()
            );
            Rebuilt {
                lines,
                bytes,
                took,
                error: None,
            }
        }
        Err(e) => {
            log::warn!(
                "history: cannot read {}: {e}; the page shows what comes from now on",
                path.display()
            );
            Rebuilt {
                lines: 0,
                bytes: 0,
                took,
                error: Some(e.to_string()),
            }
        }
    };
    state.set(r);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_only_the_last_30_days_and_up_to_the_length_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let now = SystemTime::now();
        let mut f = File::create(&p).unwrap();
        let line = |t: SystemTime, key: &str, tokens: u64| {
            format!(
                r#"{{"ts":"{}","key_id":"{key}","user":"ann","decision":"accepted","status":200,"route":"r","upstream":"127.0.0.1:1","latency_ms":1.5,"prompt_tokens":{tokens},"completion_tokens":1}}"#,
                humantime::format_rfc3339_millis(t)
            )
        };
        // 40 days of old lines (many, so the bisection has work), then today.
        for i in 0..20_000u64 {
            let t = now - Duration::from_secs(40 * DAY_S) + Duration::from_secs(i);
            writeln!(f, "{}", line(t, "old", 1)).unwrap();
        }
        writeln!(f, "not json").unwrap();
        writeln!(f, "{}", line(now - Duration::from_secs(60), "new", 7)).unwrap();
        writeln!(
            f,
            r#"{{"ts":"{}","decision":"admin_create","status":201}}"#,
            humantime::format_rfc3339_millis(now)
        )
        .unwrap();
        let len = f.metadata().unwrap().len();
        writeln!(f, "{}", line(now, "after", 5)).unwrap();
        let h = History::default();
        let (lines, bytes) = rebuild(&h, &p, now, len).unwrap();
        assert!(bytes < len / 4, "bisected: read {bytes} of {len}");
        assert!(lines >= 2, "{lines}");
        let v = h.view(unix_s(now));
        let keys: Vec<&str> = v.series.iter().map(|s| s.key_id.as_str()).collect();
        assert_eq!(keys, ["new"], "old, admin and later lines are not counted");
        assert_eq!(v.series[0].day.prompt_tokens, 7);
    }
}
