//! The audit log: one JSON line per request, accepted or denied.
//!
//! Serving threads never write: they hand a record to a bounded channel and
//! move on, and under load they do not wake the writer either: it takes
//! the records in batches (see [`BATCH_INTERVAL`]). If the writer ever falls behind far enough to fill the channel,
//! records are dropped and counted (`agw_audit_dropped_total`) rather than
//! making clients wait. The writer reopens its file on request (SIGUSR1 or
//! SIGHUP), which is what logrotate's `postrotate` needs.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, SystemTime};

use log::error;
use prometheus::IntCounter;
use serde::Serialize;

use std::sync::Arc;

use super::history::{History, Seen};
use crate::config::AuditDest;

/// Records that may wait for the writer before new ones are dropped.
pub const QUEUE_LEN: usize = 65_536;

/// One request, as the audit log records it. Field names are part of the
/// log format; keys appear only as their id.
#[derive(Debug, Serialize)]
pub struct AuditRecord {
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    pub request_id: String,
    pub client: Option<ClientAddr>,
    pub method: String,
    pub path: String,
    pub route: Option<String>,
    pub key_id: Option<String>,
    pub user: Option<String>,
    /// The end user behind the key (its `end_user_header`); left out for
    /// keys that name none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_user: Option<String>,
    /// `accepted`, or why the request was denied.
    pub decision: &'static str,
    pub status: u16,
    pub upstream: Option<SocketAddr>,
    pub upstream_status: Option<u16>,
    #[serde(serialize_with = "millis")]
    pub latency_ms: Duration,
    #[serde(serialize_with = "opt_millis")]
    pub ttfb_ms: Option<Duration>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The model the answer (else the request) named, on routes with `api`.
    pub model: Option<String>,
    /// The alias the client asked for, when `model` is the model serving
    /// it (only then in the line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_model: Option<String>,
    /// Tries that failed and were retried elsewhere, in order, before the
    /// one `upstream` names (only in the line when there were some).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retried: Vec<FailedTry>,
    /// Tokens of the prompt and of the completion, when known.
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Of the prompt tokens, those written to and read from the prompt
    /// cache, when the answer said (Anthropic's Messages API; only then in
    /// the line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_creation_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_read_tokens: Option<u64>,
    /// Where the token counts come from: `reported`, `estimated`,
    /// `unknown`; null where the endpoint has no usage.
    pub usage: Option<&'static str>,
}

/// A try that failed and was retried on another upstream.
#[derive(Debug, Serialize)]
pub struct FailedTry {
    pub upstream: SocketAddr,
    /// `connect`, or the answer's status.
    pub failed: String,
}

/// Where a request came from: the socket's peer, or the client a trusted
/// proxy named in `X-Forwarded-For` (no port then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    Peer(SocketAddr),
    Forwarded(IpAddr),
}

impl ClientAddr {
    pub fn ip(self) -> IpAddr {
        match self {
            ClientAddr::Peer(a) => a.ip(),
            ClientAddr::Forwarded(ip) => ip,
        }
    }
}

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientAddr::Peer(a) => a.fmt(f),
            ClientAddr::Forwarded(ip) => ip.fmt(f),
        }
    }
}

impl Serialize for ClientAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0)
}

fn opt_millis<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => millis(d, s),
        None => s.serialize_none(),
    }
}

/// One action on the admin listener's key API, written among the request
/// lines: `decision` is `admin_create`, `admin_patch` or `admin_revoke`,
/// `key_id` and `user` are the admin key's, `target` the key acted on and
/// `change` what was written (never a key).
#[derive(Debug, Serialize)]
pub struct AdminRecord {
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    pub client: Option<ClientAddr>,
    pub method: String,
    pub path: String,
    pub key_id: String,
    pub user: String,
    pub decision: &'static str,
    pub status: u16,
    pub target: Option<String>,
    pub change: serde_json::Value,
}

enum Msg {
    Record(Box<AuditRecord>),
    Admin(Box<AdminRecord>),
    Reopen,
}

/// The handle serving threads log through.
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<Msg>,
    dropped: IntCounter,
}

/// The audit log's writer: it owns the file and runs on a thread of its
/// own, which the daemon starts (`AuditWriter::run`).
pub struct AuditWriter {
    dest: AuditDest,
    out: BufWriter<Box<dyn Write + Send>>,
    rx: Receiver<Msg>,
    history: Option<Arc<History>>,
}

impl AuditWriter {
    /// Writes records until every [`AuditLog`] handle is gone. Blocks.
    pub fn run(self) {
        writer(self.dest, self.out, self.rx, self.history);
    }

    /// Counts every request record into `history` as it is written (on
    /// this thread, so the serving threads pay nothing for it).
    pub fn feeding(mut self, history: Arc<History>) -> AuditWriter {
        self.history = Some(history);
        self
    }
}

impl AuditLog {
    /// Opens `dest`: the handle serving threads log through, and the
    /// writer to run on a thread. Fails if the file cannot be opened, so a
    /// bad path is a start-up error, not silence.
    pub fn open(dest: AuditDest, dropped: IntCounter) -> std::io::Result<(AuditLog, AuditWriter)> {
        let out = open(&dest)?;
        let (tx, rx) = sync_channel(QUEUE_LEN);
        Ok((
            AuditLog { tx, dropped },
            AuditWriter {
                dest,
                out,
                rx,
                history: None,
            },
        ))
    }

    /// Queues a record; never blocks.
    pub fn log(&self, record: AuditRecord) {
        match self.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }

    /// Queues an admin action's line; never blocks.
    pub fn log_admin(&self, record: AdminRecord) {
        if self.tx.try_send(Msg::Admin(Box::new(record))).is_err() {
            self.dropped.inc();
        }
    }

    /// Asks the writer to reopen its file (after logrotate moved it).
    pub fn reopen(&self) {
        // Blocking here is fine: this runs on the signal thread.
        let _ = self.tx.send(Msg::Reopen);
    }

    /// How many records were dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

fn open(dest: &AuditDest) -> std::io::Result<BufWriter<Box<dyn Write + Send>>> {
    let w: Box<dyn Write + Send> = match dest {
        AuditDest::Stderr => Box::new(std::io::stderr()),
        AuditDest::File(p) => Box::new(open_file(p)?),
    };
    Ok(BufWriter::with_capacity(64 * 1024, w))
}

fn open_file(p: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(p)
}

/// While records keep coming, the writer sleeps this long between
/// batches and then takes everything queued at once. A writer blocked in
/// `recv` is woken by the sender (a futex wake on a serving thread, per
/// record when the queue runs dry between requests); a sleeping one is
/// not. Records reach the file at most this much later.
const BATCH_INTERVAL: Duration = Duration::from_millis(10);

/// Appends `record` as one JSON line.
fn write_line(out: &mut impl Write, line: &mut Vec<u8>, record: &impl Serialize) {
    line.clear();
    if serde_json::to_writer(&mut *line, record).is_ok() {
        line.push(b'\n');
        if let Err(e) = out.write_all(line) {
            error!("audit log write failed: {e}");
        }
    }
}

/// What the history counts of a request record.
fn seen<'a>(r: &'a AuditRecord, upstream: Option<&'a str>) -> Seen<'a> {
    Seen {
        ts_s: r
            .ts
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        key_id: r.key_id.as_deref(),
        user: r.user.as_deref(),
        decision: r.decision,
        status: r.status,
        route: r.route.as_deref(),
        upstream,
        latency_us: u64::try_from(r.latency_ms.as_micros()).unwrap_or(u64::MAX),
        prompt_tokens: r.prompt_tokens.unwrap_or(0),
        completion_tokens: r.completion_tokens.unwrap_or(0),
    }
}

fn writer(
    dest: AuditDest,
    mut out: BufWriter<Box<dyn Write + Send>>,
    rx: Receiver<Msg>,
    history: Option<Arc<History>>,
) {
    let mut line = Vec::with_capacity(512);
    // Idle: block until something comes (one wake-up after a quiet spell).
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        loop {
            // Drain what is queued, then flush once.
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Record(r) => {
                        write_line(&mut out, &mut line, &*r);
                        if let Some(h) = &history {
                            let upstream = r.upstream.map(|u| u.to_string());
                            h.add(&seen(&r, upstream.as_deref()));
                        }
                    }
                    Msg::Admin(r) => write_line(&mut out, &mut line, &*r),
                    Msg::Reopen => {
                        let _ = out.flush();
                        match open(&dest) {
                            Ok(o) => out = o,
                            Err(e) => error!(
                                "cannot reopen the audit log: {e}; still writing to the old file"
                            ),
                        }
                    }
                }
                next = rx.try_recv().ok();
            }
            if let Err(e) = out.flush() {
                error!("audit log flush failed: {e}");
            }
            // Busy: let the next records gather without a wake-up each.
            std::thread::sleep(BATCH_INTERVAL);
            match rx.try_recv() {
                Ok(msg) => next = Some(msg),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str) -> AuditRecord {
        AuditRecord {
            ts: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            request_id: "r1".into(),
            client: Some(ClientAddr::Peer("127.0.0.1:5000".parse().unwrap())),
            method: "POST".into(),
            path: path.into(),
            route: Some("chat".into()),
            key_id: Some("0123456789ab".into()),
            user: Some("ann".into()),
            end_user: None,
            decision: "accepted",
            status: 200,
            upstream: Some("127.0.0.1:11434".parse().unwrap()),
            upstream_status: Some(200),
            latency_ms: Duration::from_micros(12_345),
            ttfb_ms: None,
            bytes_in: 10,
            bytes_out: 20,
            model: Some("llama3.2".into()),
            requested_model: None,
            retried: Vec::new(),
            prompt_tokens: Some(26),
            completion_tokens: None,
            cache_creation_tokens: None,
            cache_read_tokens: None,
            usage: Some("estimated"),
        }
    }

    fn wait_for(p: &Path, needle: &str) -> String {
        for _ in 0..200 {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            if text.contains(needle) {
                return text;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{needle} never appeared in {}", p.display());
    }

    #[test]
    fn writes_one_json_line_per_record_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let (log, writer) = AuditLog::open(
            AuditDest::File(p.clone()),
            IntCounter::new("d", "d").unwrap(),
        )
        .unwrap();
        std::thread::spawn(move || writer.run());
        log.log(record("/chat/a"));
        let text = wait_for(&p, "/chat/a");
        let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(v["ts"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["latency_ms"], 12.345);
        assert_eq!(v["ttfb_ms"], serde_json::Value::Null);
        assert_eq!(v["decision"], "accepted");
        assert_eq!(v["client"], "127.0.0.1:5000");
        assert_eq!(v["model"], "llama3.2");
        assert_eq!(v["prompt_tokens"], 26);
        assert_eq!(v["completion_tokens"], serde_json::Value::Null);
        assert_eq!(v["usage"], "estimated");

        let moved = dir.path().join("audit.log.1");
        std::fs::rename(&p, &moved).unwrap();
        log.reopen();
        log.log(record("/chat/b"));
        wait_for(&p, "/chat/b");
        assert!(!std::fs::read_to_string(&moved).unwrap().contains("/chat/b"));
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn unopenable_file_is_an_error() {
        assert!(AuditLog::open(
            AuditDest::File("/nonexistent-dir/a.log".into()),
            IntCounter::new("d", "d").unwrap()
        )
        .is_err());
    }
}
