//! The Prometheus text exposition of the admin listener's `/metrics`,
//! parsed and checked strictly (names, labels, types, histograms), and
//! read by series and labels.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use super::raw_client::try_send;
use super::util::poll;

// ---------------------------------------------------------------------------
// 4. Metrics
// ---------------------------------------------------------------------------

/// One sample of the Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
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
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
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
pub fn series_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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
pub fn scrape(admin: SocketAddr) -> (String, Vec<Sample>) {
    let r = try_send(admin, "GET", "/metrics", &[], b"").expect("GET /metrics");
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
pub fn wait_metric_at_least(
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
            (series_value(&s, name, labels).unwrap_or(0.0) >= want).then_some(s)
        },
    )
}
