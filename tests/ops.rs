// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

// Operations: the audit log (fields, secrecy, reopen), Prometheus metrics,
// health and readiness, request ids, graceful shutdown during a stream and
// graceful upgrade, each against the real binary and real upstreams.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

// ---------------------------------------------------------------------------
// Keys and configs
// ---------------------------------------------------------------------------

/// Granted `chat` (the only route's service).
const ANN_KEY: &str = "sk-test-SECRET-abc123";
/// Granted `tts` only: a 403 on `/chat/`.
const BOB_KEY: &str = "sk-test-SECRET-bob456";
/// In no key file: a 401.
const WRONG_KEY: &str = "sk-test-SECRET-wrong789";
/// A substring of every test key: it must never show up in logs or metrics.
const KEY_MARK: &str = "SECRET";

fn keys_json() -> String {
    format!(
        r#"{{"{ANN_KEY}": {{"user": "ann", "service": "chat"}}, "{BOB_KEY}": {{"user": "bob", "service": "tts"}}}}"#
    )
}

/// How a test gateway is configured (besides `listen` and `keys_file`).
struct Setup<'a> {
    upstream: SocketAddr,
    /// Extra top-level settings, each line ending in `\n`.
    extra: &'a str,
    shutdown_grace: &'a str,
    admin: bool,
}

impl<'a> Setup<'a> {
    fn new(upstream: SocketAddr, extra: &'a str) -> Self {
        Setup {
            upstream,
            extra,
            shutdown_grace: "5s",
            admin: false,
        }
    }

    fn with_admin(mut self) -> Self {
        self.admin = true;
        self
    }

    fn config(&self, port: u16, admin_port: Option<u16>) -> String {
        let admin = admin_port
            .map(|p| format!("admin_listen: \"127.0.0.1:{p}\"\n"))
            .unwrap_or_default();
        format!(
            "listen: \"127.0.0.1:{port}\"\nkeys_file: keys.json\nthreads: 2\nshutdown_grace: {}\n{admin}{}routes:\n  - {{name: chat, path_prefix: \"/chat/\", service: chat, strip_prefix: true, upstreams: [\"{}\"]}}\n",
            self.shutdown_grace, self.extra, self.upstream
        )
    }
}

/// A started gateway and its admin address (when configured).
struct Launched {
    gw: Gateway,
    admin: Option<SocketAddr>,
}

impl Launched {
    fn admin(&self) -> SocketAddr {
        self.admin.expect("this gateway has an admin listener")
    }
}

/// Starts a gateway for `setup` on fresh ports and waits until it answers
/// HTTP; retries with other ports if one was taken in the meantime.
fn launch(setup: &Setup, keys: &str) -> Launched {
    for attempt in 1.. {
        let port = free_port();
        let admin_port = setup.admin.then(free_port);
        let files = GatewayFiles::write(&setup.config(port, admin_port), keys);
        let mut gw = Gateway::spawn(files, port);
        match gw.wait_ready(READY_TIMEOUT) {
            Ok(()) => {
                return Launched {
                    gw,
                    admin: admin_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
                }
            }
            Err(msg) => {
                if !(msg.to_ascii_lowercase().contains("in use") && attempt < 3) {
                    panic!("{msg}");
                }
            }
        }
    }
    unreachable!()
}

// ---------------------------------------------------------------------------
// A raw HTTP/1.1 client: exact control over what is sent (malformed request
// ids, no connection reuse), one connection per request.
// ---------------------------------------------------------------------------

/// Sends one request on a new connection (`Connection: close`) and reads
/// the whole response.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<RawResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.set_write_timeout(Some(Duration::from_secs(15)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes)?;
    read_response(&mut BufReader::new(s))
}

/// A request to the gateway's chat route that must get an HTTP answer.
fn chat(
    gw: &Gateway,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    http(gw.addr(), method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} through the gateway failed: {e}"))
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Polls `f` every 20 ms until it returns `Some`, or panics with `what`.
fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Audit log helpers
// ---------------------------------------------------------------------------

const AUDIT_FIELDS: [&str; 20] = [
    "ts",
    "request_id",
    "client",
    "method",
    "path",
    "route",
    "key_id",
    "user",
    "decision",
    "status",
    "upstream",
    "upstream_status",
    "latency_ms",
    "ttfb_ms",
    "bytes_in",
    "bytes_out",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "usage",
];

/// The complete lines of an audit file (a line still being written is
/// ignored), each parsed as JSON and checked to have exactly the
/// documented fields.
fn audit_lines(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l:?}"));
            assert_audit_shape(&v, l);
            v
        })
        .collect()
}

fn assert_audit_shape(v: &Value, line: &str) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("audit line is not an object: {line}"));
    let got: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = AUDIT_FIELDS.into_iter().collect();
    assert_eq!(got, want, "audit line fields: {line}");
}

fn by_rid<'a>(lines: &'a [Value], rid: &str) -> Option<&'a Value> {
    lines.iter().find(|v| v["request_id"] == rid)
}

/// Polls the audit file until it has a line for every id in `rids`.
fn wait_audit(path: &Path, rids: &[&str], timeout: Duration) -> Vec<Value> {
    let what = format!("audit lines {rids:?} in {}", path.display());
    poll(timeout, &what, || {
        let lines = audit_lines(path);
        rids.iter()
            .all(|r| by_rid(&lines, r).is_some())
            .then_some(lines)
    })
}

// ---------------------------------------------------------------------------
// 1-3. Audit log
// ---------------------------------------------------------------------------

#[test]
fn audit_log_records_every_decision_and_never_a_key() {
    let echo = EchoServer::start();
    let l = launch(
        &Setup::new(echo.addr, "audit_log: audit.log\n"),
        &keys_json(),
    );
    let gw = &l.gw;
    let audit = gw.dir.path().join("audit.log");

    let body = br#"{"prompt":"hi"}"#;
    let ok = chat(
        gw,
        "POST",
        "/chat/api/generate?x=1",
        &[("X-API-Key", ANN_KEY), ("X-Request-Id", "test-rid-1")],
        body,
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    let unknown = chat(
        gw,
        "POST",
        "/chat/api/generate",
        &[
            ("Authorization", &format!("Bearer {WRONG_KEY}")),
            ("X-Request-Id", "test-rid-2"),
        ],
        body,
    );
    assert_eq!(unknown.status, 401, "{}", unknown.text());
    let wrong_service = chat(
        gw,
        "POST",
        "/chat/api/generate",
        &[("X-API-Key", BOB_KEY), ("X-Request-Id", "test-rid-3")],
        body,
    );
    assert_eq!(wrong_service.status, 403, "{}", wrong_service.text());
    let no_route = chat(
        gw,
        "GET",
        "/nothing/here",
        &[("X-API-Key", ANN_KEY), ("X-Request-Id", "test-rid-4")],
        b"",
    );
    assert_eq!(no_route.status, 404, "{}", no_route.text());

    let rids = ["test-rid-1", "test-rid-2", "test-rid-3", "test-rid-4"];
    let lines = wait_audit(&audit, &rids, Duration::from_secs(10));
    // Our 4 requests, plus the harness's readiness probe (a 404).
    let ours: Vec<&Value> = lines
        .iter()
        .filter(|v| rids.contains(&v["request_id"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(ours.len(), 4, "one line per request: {lines:#?}");
    assert!(
        lines.len() <= 6,
        "unexpected extra audit lines (probe + 4 expected): {lines:#?}"
    );

    // The accepted request.
    let a = by_rid(&lines, "test-rid-1").unwrap();
    assert_eq!(a["decision"], "accepted", "{a}");
    assert_eq!(a["status"], 200, "{a}");
    assert_eq!(a["method"], "POST", "{a}");
    assert_eq!(a["path"], "/chat/api/generate", "path without query: {a}");
    assert_eq!(a["route"], "chat", "{a}");
    assert_eq!(a["upstream"], echo.addr.to_string(), "{a}");
    assert_eq!(a["upstream_status"], 200, "{a}");
    assert_eq!(a["key_id"], sha256_hex(ANN_KEY.as_bytes())[..12], "{a}");
    assert_eq!(a["user"], "ann", "{a}");
    assert_eq!(a["bytes_in"], body.len() as u64, "{a}");
    assert_eq!(a["bytes_out"], ok.body.len() as u64, "{a}");
    assert!(a["bytes_out"].as_u64().unwrap() > 0, "{a}");
    let latency = a["latency_ms"].as_f64().expect("latency_ms is a number");
    let ttfb = a["ttfb_ms"]
        .as_f64()
        .expect("ttfb_ms is a number when accepted");
    assert!(
        latency >= 0.0 && ttfb >= 0.0 && ttfb <= latency,
        "ttfb {ttfb} must be within latency {latency}: {a}"
    );
    assert!(
        a["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{a}"
    );
    let ts = a["ts"].as_str().expect("ts is a string");
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "ts is RFC 3339 UTC with millis: {ts}"
    );

    // The denials.
    for (rid, decision, status, route) in [
        ("test-rid-2", "unknown_key", 401, Value::from("chat")),
        ("test-rid-3", "wrong_service", 403, Value::from("chat")),
        ("test-rid-4", "no_route", 404, Value::Null),
    ] {
        let d = by_rid(&lines, rid).unwrap();
        assert_eq!(d["decision"], decision, "{d}");
        assert_eq!(d["status"], status, "{d}");
        assert_eq!(d["route"], route, "{d}");
        assert_eq!(d["upstream"], Value::Null, "{d}");
        assert_eq!(d["upstream_status"], Value::Null, "{d}");
        assert_eq!(d["ttfb_ms"], Value::Null, "{d}");
        assert_eq!(d["key_id"], Value::Null, "{d}");
        assert_eq!(d["user"], Value::Null, "{d}");
        assert!(d["latency_ms"].as_f64().is_some(), "{d}");
    }
    assert_eq!(echo.hits(), 1, "only the accepted request went upstream");

    // No key, not even the unknown one, in the audit file or the log.
    let audit_text = fs::read_to_string(&audit).unwrap();
    let log = gw.log();
    for key in [ANN_KEY, BOB_KEY, WRONG_KEY, KEY_MARK] {
        assert!(
            !audit_text.contains(key),
            "audit log leaks {key}:\n{audit_text}"
        );
        assert!(!log.contains(key), "gateway log leaks {key}:\n{log}");
    }
}

#[test]
fn audit_log_dash_writes_to_stderr() {
    let echo = EchoServer::start();
    let l = launch(&Setup::new(echo.addr, "audit_log: \"-\"\n"), &keys_json());
    let gw = &l.gw;
    let r = chat(
        gw,
        "POST",
        "/chat/x",
        &[("X-API-Key", ANN_KEY), ("X-Request-Id", "stderr-rid-1")],
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        gw.wait_log_contains(r#""request_id":"stderr-rid-1""#, Duration::from_secs(10)),
        "no audit line on stderr:\n{}",
        gw.log()
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains(r#""request_id":"stderr-rid-1""#))
        .unwrap();
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("the audit line on stderr is a whole JSON line ({e}): {line:?}")
    });
    assert_audit_shape(&v, line);
    assert_eq!(v["decision"], "accepted");
    assert_eq!(v["user"], "ann");
    assert!(
        !gw.dir.path().join("-").exists(),
        "\"-\" means stderr, not a file named -"
    );
    assert!(!log.contains(KEY_MARK), "log leaks a key:\n{log}");
}

#[test]
fn audit_log_reopens_on_sigusr1_and_sighup() {
    let echo = EchoServer::start();
    let l = launch(
        &Setup::new(echo.addr, "audit_log: audit.log\n"),
        &keys_json(),
    );
    let gw = &l.gw;
    let dir = gw.dir.path();
    let audit = dir.join("audit.log");
    let send = |rid: &str| {
        let r = chat(
            gw,
            "GET",
            "/chat/x",
            &[("X-API-Key", ANN_KEY), ("X-Request-Id", rid)],
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.text());
    };

    send("before-rotate");
    wait_audit(&audit, &["before-rotate"], Duration::from_secs(10));

    for (signal, rotated, rid) in [
        ("USR1", "audit.log.1", "after-usr1"),
        ("HUP", "audit.log.2", "after-hup"),
    ] {
        let rotated = dir.join(rotated);
        fs::rename(&audit, &rotated).unwrap();
        gw.signal(signal);
        // The writer creates the file again when it reopens.
        poll(
            Duration::from_secs(10),
            &format!("audit.log to be reopened after SIG{signal}"),
            || audit.exists().then_some(()),
        );
        send(rid);
        let lines = wait_audit(&audit, &[rid], Duration::from_secs(10));
        assert!(
            by_rid(&lines, "before-rotate").is_none(),
            "the new file starts empty"
        );
        let old = fs::read_to_string(&rotated).unwrap();
        assert!(
            !old.contains(rid),
            "{rid} went to the rotated file {}:\n{old}",
            rotated.display()
        );
    }
    let first = fs::read_to_string(dir.join("audit.log.1")).unwrap();
    assert!(first.contains("before-rotate"), "{first}");
    assert!(
        gw.wait_log_contains("reload (SIGHUP)", Duration::from_secs(10)),
        "SIGHUP also reloads:\n{}",
        gw.log()
    );
}

// ---------------------------------------------------------------------------
// 4. Metrics
// ---------------------------------------------------------------------------

/// One sample of the Prometheus text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')) =>
        {
            s.parse().ok()
        }
        _ => None,
    }
}

/// Parses `{k="v",...}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    let mut labels = BTreeMap::new();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} value is not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name} value is not terminated")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape in label {name}: {other:?}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} given twice"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("labels must be separated by ,".into());
        }
    }
}

/// The family a sample belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for (suffix, kinds) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|t| kinds.contains(&t.as_str())) {
                return Some(base);
            }
        }
    }
    None
}

/// A small checker of the Prometheus text format (0.0.4): every line is a
/// comment (`# HELP`/`# TYPE` well formed, each TYPE once, a known type) or
/// `name{k="v",...} value [timestamp]` with valid names, quoted label values
/// and a float value, belonging to a declared family; a histogram's
/// `+Inf` bucket equals its count.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = |msg: String| format!("line {}: {msg}: {line:?}", i + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim_start();
            if let Some(r) = comment.strip_prefix("TYPE ") {
                let parts: Vec<&str> = r.split(' ').collect();
                let [name, kind] = parts[..] else {
                    return Err(at("TYPE needs a name and a type".into()));
                };
                if !valid_metric_name(name) {
                    return Err(at(format!("bad metric name {name:?}")));
                }
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(at(format!("unknown type {kind:?}")));
                }
                if samples.iter().any(|s: &Sample| s.name == name) {
                    return Err(at(format!("TYPE of {name} after its samples")));
                }
                if types.insert(name.to_string(), kind.to_string()).is_some() {
                    return Err(at(format!("TYPE of {name} given twice")));
                }
            } else if let Some(r) = comment.strip_prefix("HELP ") {
                let name = r.split(' ').next().unwrap_or("");
                if !valid_metric_name(name) {
                    return Err(at(format!("bad metric name {name:?}")));
                }
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| at("sample without value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("a space must precede the value".into()))?;
        let mut fields = rest.split(' ');
        let value = fields
            .next()
            .and_then(parse_float)
            .ok_or_else(|| at("bad value".into()))?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| at(format!("bad timestamp {ts:?}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        if family_of(name, &types).is_none() {
            return Err(at(format!("sample {name} has no # TYPE")));
        }
        if name.ends_with("_bucket") && !labels.contains_key("le") {
            return Err(at("bucket without le".into()));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    for count in samples.iter().filter(|s| s.name.ends_with("_count")) {
        let base = count.name.trim_end_matches("_count");
        if types.get(base).map(String::as_str) != Some("histogram") {
            continue;
        }
        let inf = samples.iter().find(|s| {
            s.name == format!("{base}_bucket")
                && s.labels.get("le").map(String::as_str) == Some("+Inf")
                && s.labels
                    .iter()
                    .filter(|(k, _)| *k != "le")
                    .eq(count.labels.iter())
        });
        match inf {
            Some(b) if b.value == count.value => {}
            _ => return Err(format!("{base}{:?}: +Inf bucket != count", count.labels)),
        }
    }
    Ok(samples)
}

/// The value of the series `name` with exactly `labels`.
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

/// GET /metrics: the exposition text and its samples (checked).
fn scrape(admin: SocketAddr) -> (String, Vec<Sample>) {
    let r = http(admin, "GET", "/metrics", &[], b"").expect("GET /metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
    let text = r.text();
    let samples = parse_exposition(&text)
        .unwrap_or_else(|e| panic!("not valid Prometheus text: {e}\n{text}"));
    (text, samples)
}

/// Polls /metrics until `name{labels}` is at least `want`, then returns the
/// samples (so the caller can assert the exact value).
fn wait_metric_at_least(
    admin: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) -> Vec<Sample> {
    poll(
        Duration::from_secs(10),
        &format!("{name}{labels:?} >= {want}"),
        || {
            let (_, s) = scrape(admin);
            (metric(&s, name, labels).unwrap_or(0.0) >= want).then_some(s)
        },
    )
}

#[test]
fn prometheus_checker_rejects_malformed_text() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"a\\\"b\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
    let s = parse_exposition(good).unwrap();
    assert_eq!(
        metric(&s, "a_total", &[("x", "1"), ("y", "a\"b")]),
        Some(3.0)
    );
    assert_eq!(metric(&s, "h_count", &[]), Some(2.0));
    for bad in [
        "# TYPE a_total countr\na_total 1\n",
        "# TYPE a_total counter\na_total one\n",
        "# TYPE a_total counter\na_total{x=1} 1\n",
        "# TYPE a_total counter\na_total{x=\"1\" 1\n",
        "# TYPE a_total counter\na_total{1x=\"1\"} 1\n",
        "# TYPE a_total counter\na_total{x=\"1\",x=\"2\"} 1\n",
        "# TYPE a_total counter\na-total 1\n",
        "# TYPE a_total counter\na_total  1\n",
        "# TYPE a_total counter\na_total 1 2 3\n",
        "b_total 1\n",
        "# TYPE a counter\n# TYPE a gauge\na 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn metrics_count_requests_denials_and_reloads() {
    let echo = EchoServer::start();
    let l = launch(&Setup::new(echo.addr, "").with_admin(), &keys_json());
    let (gw, admin) = (&l.gw, l.admin());

    let ok200 = [("route", "chat"), ("status", "200")];
    let denied401 = [("route", "chat"), ("status", "401")];
    let unknown = [("reason", "unknown_key")];
    let duration = [("route", "chat")];

    let (_, before) = scrape(admin);
    let ok_before = metric(&before, "agw_requests_total", &ok200).unwrap_or(0.0);
    let denied_before = metric(&before, "agw_requests_total", &denied401).unwrap_or(0.0);
    let unknown_before = metric(&before, "agw_auth_failures_total", &unknown)
        .expect("auth failure reasons are exported from the start");
    let duration_before =
        metric(&before, "agw_request_duration_seconds_count", &duration).unwrap_or(0.0);
    assert_eq!(metric(&before, "agw_keys_loaded", &[]), Some(2.0));
    assert_eq!(metric(&before, "agw_routes_loaded", &[]), Some(1.0));
    assert_eq!(metric(&before, "agw_snapshot_generation", &[]), Some(1.0));
    assert_eq!(
        metric(&before, "agw_reloads_total", &[("result", "ok")]),
        Some(0.0)
    );

    const OK: usize = 5;
    const DENIED: usize = 2;
    for i in 0..OK {
        let r = chat(
            gw,
            "POST",
            &format!("/chat/private-path-{i}?q=secret-query"),
            &[("X-API-Key", ANN_KEY)],
            b"{}",
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for _ in 0..DENIED {
        let r = chat(
            gw,
            "POST",
            "/chat/private-path-denied",
            &[("X-API-Key", WRONG_KEY)],
            b"{}",
        );
        assert_eq!(r.status, 401, "{}", r.text());
    }

    wait_metric_at_least(admin, "agw_requests_total", &ok200, ok_before + OK as f64);
    let after = wait_metric_at_least(
        admin,
        "agw_request_duration_seconds_count",
        &duration,
        duration_before + (OK + DENIED) as f64,
    );
    assert_eq!(
        metric(&after, "agw_requests_total", &ok200),
        Some(ok_before + OK as f64),
        "exactly one count per accepted request"
    );
    assert_eq!(
        metric(&after, "agw_requests_total", &denied401),
        Some(denied_before + DENIED as f64)
    );
    assert_eq!(
        metric(&after, "agw_auth_failures_total", &unknown),
        Some(unknown_before + DENIED as f64)
    );
    assert_eq!(
        metric(&after, "agw_request_duration_seconds_count", &duration),
        Some(duration_before + (OK + DENIED) as f64),
        "every request on the route is timed"
    );
    assert_eq!(metric(&after, "agw_requests_in_flight", &[]), Some(0.0));
    assert!(
        !after.iter().any(|s| s.name == "agw_user_requests_total"),
        "per-user series without metrics_per_user"
    );

    gw.signal("HUP");
    // The gauge is set just before the counter: wait for both.
    let reloaded = poll(Duration::from_secs(10), "generation 2 after SIGHUP", || {
        let (_, s) = scrape(admin);
        let done = metric(&s, "agw_snapshot_generation", &[]) >= Some(2.0)
            && metric(&s, "agw_reloads_total", &[("result", "ok")]) >= Some(1.0);
        done.then_some(s)
    });
    assert_eq!(metric(&reloaded, "agw_snapshot_generation", &[]), Some(2.0));
    assert_eq!(
        metric(&reloaded, "agw_reloads_total", &[("result", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&reloaded, "agw_reloads_total", &[("result", "error")]),
        Some(0.0)
    );
    assert_eq!(metric(&reloaded, "agw_keys_loaded", &[]), Some(2.0));

    let (text, _) = scrape(admin);
    for secret in [
        ANN_KEY,
        WRONG_KEY,
        KEY_MARK,
        "private-path",
        "secret-query",
        "/chat/",
        "__probe__",
    ] {
        assert!(
            !text.contains(secret),
            "exposition contains {secret:?}:\n{text}"
        );
    }
}

#[test]
fn metrics_per_user_adds_a_user_series() {
    let echo = EchoServer::start();
    let l = launch(
        &Setup::new(echo.addr, "metrics_per_user: true\n").with_admin(),
        &keys_json(),
    );
    let (gw, admin) = (&l.gw, l.admin());
    for _ in 0..3 {
        let r = chat(gw, "GET", "/chat/x", &[("X-API-Key", ANN_KEY)], b"");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = chat(gw, "GET", "/chat/x", &[("X-API-Key", BOB_KEY)], b"");
    assert_eq!(r.status, 403, "{}", r.text());
    let r = chat(gw, "GET", "/chat/x", &[("X-API-Key", WRONG_KEY)], b"");
    assert_eq!(r.status, 401, "{}", r.text());

    let ann = [("user", "ann")];
    let s = wait_metric_at_least(admin, "agw_user_requests_total", &ann, 3.0);
    assert_eq!(metric(&s, "agw_user_requests_total", &ann), Some(3.0));
    let users: Vec<&Sample> = s
        .iter()
        .filter(|s| s.name == "agw_user_requests_total")
        .collect();
    assert_eq!(
        users.len(),
        1,
        "only accepted requests count per user: {users:?}"
    );
}

// ---------------------------------------------------------------------------
// 5. Health and readiness
// ---------------------------------------------------------------------------

/// The status `/readyz` answers, or `None` if the admin listener does not
/// answer at all.
fn readyz_status(admin: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .ok()?;
    read_response(&mut BufReader::new(s)).ok().map(|r| r.status)
}

#[test]
fn healthz_and_readyz_and_ready_only_once_serving() {
    let echo = EchoServer::start();
    let setup = Setup::new(echo.addr, "");
    let port = free_port();
    let admin_port = free_port();
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    let files = GatewayFiles::write(&setup.config(port, Some(admin_port)), &keys_json());
    let mut gw = Gateway::spawn(files, port);
    let main = gw.addr();

    let accepts =
        |addr: SocketAddr| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();

    // A 200 is allowed only once the main listener accepts: checked right
    // after each answer (a listener, once up, stays up).
    let mut not_ready_seen = 0;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        assert!(gw.is_running(), "gateway exited:\n{}", gw.log());
        let answer = readyz_status(admin);
        let main_up = accepts(main);
        match answer {
            Some(200) => {
                assert!(
                    main_up,
                    "/readyz said 200 while the main listener refused connections"
                );
                break;
            }
            Some(503) | None => not_ready_seen += 1,
            Some(other) => panic!("/readyz answered {other}"),
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", gw.log());
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        not_ready_seen > 0,
        "the first probe, right after spawn, cannot have been ready"
    );

    let ready = http(admin, "GET", "/readyz", &[], b"").unwrap();
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready", "{}", ready.text());
    assert_eq!(ready.json()["generation"], 1, "{}", ready.text());

    let health = http(admin, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(health.header("content-type"), Some("application/json"));
    assert_eq!(health.json(), serde_json::json!({"status": "ok"}));

    let missing = http(admin, "GET", "/nope", &[], b"").unwrap();
    assert_eq!(missing.status, 404, "{}", missing.text());

    // And the gateway does serve.
    let r = chat(&gw, "GET", "/chat/x", &[("X-API-Key", ANN_KEY)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------
// 6. Request ids
// ---------------------------------------------------------------------------

/// The `x-request-id` values the echo upstream reports having received.
fn upstream_ids(echo_response: &RawResponse) -> Vec<String> {
    let v = echo_response.json();
    v["headers"]["x-request-id"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn request_ids_are_kept_when_well_formed_and_made_otherwise() {
    let echo = EchoServer::start();
    let l = launch(
        &Setup::new(echo.addr, "audit_log: audit.log\n"),
        &keys_json(),
    );
    let gw = &l.gw;
    let audit = gw.dir.path().join("audit.log");

    // Well formed: kept, sent upstream once, returned.
    let good = "client-id_1.2:3";
    let r = chat(
        gw,
        "POST",
        "/chat/x",
        &[("X-API-Key", ANN_KEY), ("X-Request-Id", good)],
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some(good));
    assert_eq!(r.header_count("x-request-id"), 1);
    assert_eq!(upstream_ids(&r), vec![good.to_string()]);

    // Malformed (spaces; too long): replaced by a generated id, the same
    // in the response, upstream and the audit line.
    let too_long = "a".repeat(129);
    let mut generated = Vec::new();
    for bad in ["bad id with spaces", too_long.as_str()] {
        let r = chat(
            gw,
            "POST",
            "/chat/bad-id",
            &[("X-API-Key", ANN_KEY), ("X-Request-Id", bad)],
            b"{}",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let id = r.header("x-request-id").expect("a request id").to_string();
        assert!(is_hex32(&id), "generated id {id:?} is 32 hex digits");
        assert_eq!(r.header_count("x-request-id"), 1);
        assert_eq!(upstream_ids(&r), vec![id.clone()], "upstream's view");
        let lines = wait_audit(&audit, &[&id], Duration::from_secs(10));
        let line = by_rid(&lines, &id).unwrap();
        assert_eq!(line["path"], "/chat/bad-id", "{line}");
        assert!(
            !lines.iter().any(|v| v["request_id"] == bad),
            "the malformed id was logged"
        );
        generated.push(id);
    }
    assert_ne!(generated[0], generated[1], "generated ids are unique");

    // Denials carry an id too: generated, or the client's.
    let r = chat(gw, "GET", "/chat/x", &[("X-API-Key", WRONG_KEY)], b"");
    assert_eq!(r.status, 401, "{}", r.text());
    let id = r.header("x-request-id").expect("a 401 has an X-Request-Id");
    assert!(is_hex32(id), "{id:?}");
    let r = chat(
        gw,
        "GET",
        "/chat/x",
        &[("X-API-Key", WRONG_KEY), ("X-Request-Id", "rid-401")],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("rid-401"));
    let r = chat(gw, "GET", "/elsewhere", &[], b"");
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.header("x-request-id").is_some_and(is_hex32), "{r:?}");
    assert_eq!(echo.hits(), 3, "only accepted requests went upstream");
}

// ---------------------------------------------------------------------------
// 7. SIGTERM during a stream
// ---------------------------------------------------------------------------

#[test]
fn sigterm_lets_a_stream_finish_then_exits_0() {
    const CHUNKS: usize = 8;
    let stream = StreamServer::start(CHUNKS, Duration::from_millis(300));
    let mut setup = Setup::new(stream.addr, "").with_admin();
    setup.shutdown_grace = "30s";
    let mut l = launch(&setup, &keys_json());
    let addr = l.gw.addr();

    let agent = agent();
    let resp = agent
        .post(l.gw.url("/chat/api/generate"))
        .header("X-API-Key", ANN_KEY)
        .send(r#"{"prompt":"slow"}"#)
        .expect("start the stream");
    assert_eq!(resp.status(), 200);
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).expect("first line");
    assert_eq!(first, stream.format.chunk(0, CHUNKS));

    let term_at = Instant::now();
    l.gw.signal("TERM");
    let rest = thread::spawn(move || {
        let lines = read_lines_timed(reader);
        (lines, Instant::now())
    });

    // While the stream is still running, new connections are refused.
    let refused_at = poll(
        Duration::from_secs(5),
        "the listener to close after SIGTERM",
        || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                .is_err()
                .then(Instant::now)
        },
    );

    let ready = readyz_status(l.admin());
    assert_ne!(ready, Some(200), "/readyz is 200 while shutting down");
    let still_streaming = !rest.is_finished();

    let (lines, done_at) = rest.join().expect("stream reader thread");
    let mut got = vec![first.trim_end().to_string()];
    got.extend(lines.into_iter().map(|(l, _)| l));
    let want: Vec<String> = (0..CHUNKS)
        .map(|i| stream.format.chunk(i, CHUNKS).trim_end().to_string())
        .collect();
    assert_eq!(got, want, "the stream completed intact");
    let last: Value = serde_json::from_str(got.last().unwrap()).unwrap();
    assert_eq!(last["done"], true);
    assert!(
        refused_at < done_at && still_streaming,
        "the listener closed only after the stream ended"
    );

    let status =
        l.gw.wait_exit(Duration::from_secs(15))
            .unwrap_or_else(|| panic!("still running 15 s after SIGTERM:\n{}", l.gw.log()));
    let exited_after = term_at.elapsed();
    assert!(status.success(), "exit status {status}:\n{}", l.gw.log());
    assert!(
        exited_after < Duration::from_secs(15),
        "exited {exited_after:?} after SIGTERM, not once the stream was done"
    );
    assert!(
        done_at.elapsed() < Duration::from_secs(10),
        "exit came long after the stream ended"
    );
}

// ---------------------------------------------------------------------------
// 8. Graceful upgrade
// ---------------------------------------------------------------------------

/// A second gateway process started with `run --upgrade` in another
/// gateway's directory; killed on drop.
struct Upgraded {
    child: Child,
    log_path: PathBuf,
}

impl Upgraded {
    fn spawn(config: &Path, dir: &Path) -> Upgraded {
        let log_path = dir.join("gateway-b.log");
        let log = fs::File::create(&log_path).expect("create gateway-b.log");
        let child = Command::new(gateway_bin())
            .args(["run", "--upgrade", "--config"])
            .arg(config)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn ai-gateway run --upgrade");
        Upgraded { child, log_path }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let what = format!("{needle:?} in the new gateway's log");
        poll(timeout, &what, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("new gateway exited ({status}):\n{}", self.log());
            }
            self.log().contains(needle).then_some(())
        });
    }
}

impl Drop for Upgraded {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("---- new gateway log ----\n{}\n---- end ----", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Outcome {
    at: Instant,
    result: Result<u16, String>,
}

#[test]
fn graceful_upgrade_loses_no_request() {
    let echo = EchoServer::start();
    let l = launch(
        &Setup::new(echo.addr, "upgrade_sock: up.sock\n").with_admin(),
        &keys_json(),
    );
    let mut a = l.gw;
    let admin = l.admin.unwrap();
    let addr = a.addr();

    // The client: one request per new connection, every result kept.
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let client = {
        let (stop, outcomes) = (Arc::clone(&stop), Arc::clone(&outcomes));
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let result = http(addr, "GET", "/chat/ping", &[("X-API-Key", ANN_KEY)], b"")
                    .map(|r| r.status)
                    .map_err(|e| e.to_string());
                outcomes.lock().unwrap().push(Outcome {
                    at: Instant::now(),
                    result,
                });
                thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let count = || outcomes.lock().unwrap().len();
    poll(
        Duration::from_secs(10),
        "the client loop to get going",
        || (count() >= 10).then_some(()),
    );

    let sock = a.dir.path().join("up.sock");
    let mut b = Upgraded::spawn(&a.config_path, a.dir.path());
    b.wait_log("Bootstrap starting", Duration::from_secs(10));
    poll(Duration::from_secs(5), "B to create up.sock", || {
        sock.exists().then_some(())
    });
    a.signal("QUIT");
    b.wait_log("Bootstrap done", Duration::from_secs(10));
    b.wait_log("Starting service: ai-gateway", Duration::from_secs(10));

    // A waits 5 s after handing over, then drains (idle) and exits.
    let status = a
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("old gateway still running:\n{}", a.log()));
    let a_exited = Instant::now();
    assert!(status.success(), "old gateway exit {status}:\n{}", a.log());

    let at_exit = count();
    poll(
        Duration::from_secs(15),
        "requests after the old gateway exited",
        || {
            (count() >= at_exit + 30 && a_exited.elapsed() > Duration::from_millis(1500))
                .then_some(())
        },
    );
    stop.store(true, Ordering::SeqCst);
    client.join().expect("client thread");

    let outcomes = outcomes.lock().unwrap();
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| o.result != Ok(200)).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the upgrade: {failures:?}\nold log:\n{}",
        failures.len(),
        outcomes.len(),
        a.log()
    );
    assert!(outcomes.len() > 50, "only {} requests made", outcomes.len());
    let after = outcomes.iter().filter(|o| o.at > a_exited).count();
    assert!(after >= 30, "{after} requests after the old gateway exited");

    // Those were served by B: it is alive and counted them.
    assert!(
        b.child.try_wait().unwrap().is_none(),
        "the new gateway died:\n{}",
        b.log()
    );
    let (_, samples) = scrape(admin);
    let served = metric(
        &samples,
        "agw_requests_total",
        &[("route", "chat"), ("status", "200")],
    )
    .unwrap_or(0.0);
    assert!(
        served >= after as f64,
        "the new gateway served {served} requests, fewer than the {after} made after the old one exited"
    );
    assert!(a.log().contains("listener sockets sent"), "{}", a.log());
}
