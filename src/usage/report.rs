//! `ai-gateway usage`: requests, tokens and errors per user, key, model,
//! route or day, read from the audit log and its rotated files.
//!
//! Files read: `PATH`, and beside it the rotated ones logrotate makes:
//! `PATH.1`, `PATH.2`, ... and `PATH.2.gz`, ... (`compress`), and
//! `PATH-20261125`, `PATH-20261125.gz` (`dateext`). Lines that are not
//! audit records (a line cut by a crash, say) are counted and skipped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// What requests are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    User,
    Key,
    Model,
    /// The model clients asked for: the alias where they named one,
    /// else the model.
    RequestedModel,
    Route,
    Day,
    /// The end user behind a key (keys with `end_user_header`).
    EndUser,
}

impl GroupBy {
    pub fn parse(s: &str) -> Result<GroupBy, String> {
        Ok(match s {
            "user" => GroupBy::User,
            "key" => GroupBy::Key,
            "model" => GroupBy::Model,
            "requested_model" => GroupBy::RequestedModel,
            "route" => GroupBy::Route,
            "day" => GroupBy::Day,
            "end_user" => GroupBy::EndUser,
            _ => {
                return Err(format!(
                    "--by {s:?}: use user, key, model, requested_model, route, day or end_user"
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GroupBy::User => "user",
            GroupBy::Key => "key",
            GroupBy::Model => "model",
            GroupBy::RequestedModel => "requested_model",
            GroupBy::Route => "route",
            GroupBy::Day => "day",
            GroupBy::EndUser => "end_user",
        }
    }
}

/// The group of requests that have none (a refused request has no user).
pub const NO_GROUP: &str = "-";

/// The fields of an audit line the report reads.
#[derive(Debug, Deserialize)]
struct Line {
    ts: String,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    key_id: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    end_user: Option<String>,
    #[serde(default)]
    status: u16,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    requested_model: Option<String>,
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_tokens: Option<u64>,
    #[serde(default)]
    cache_read_tokens: Option<u64>,
    #[serde(default)]
    usage: Option<String>,
    #[serde(default)]
    decision: Option<String>,
}

/// Counts for one group (or all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub requests: u64,
    /// Answers with a status of 400 or more (the gateway's refusals
    /// included).
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Of the prompt tokens, those written to and read from the prompt
    /// cache (answers of Anthropic's Messages API that report them).
    pub cache_creation_tokens: u64,
    pub cache_read_tokens: u64,
    /// Requests whose completion tokens were estimated (a stream without
    /// usage, or cut short).
    pub estimated: u64,
    /// Requests to endpoints with usage whose usage could not be read.
    pub unknown: u64,
}

impl Totals {
    fn add(&mut self, l: &Line) {
        self.requests += 1;
        if l.status >= 400 {
            self.errors += 1;
        }
        let p = l.prompt_tokens.unwrap_or(0);
        let c = l.completion_tokens.unwrap_or(0);
        self.prompt_tokens = self.prompt_tokens.saturating_add(p);
        self.completion_tokens = self.completion_tokens.saturating_add(c);
        self.total_tokens = self.total_tokens.saturating_add(p.saturating_add(c));
        let (cw, cr) = (l.cache_creation_tokens, l.cache_read_tokens);
        self.cache_creation_tokens = self.cache_creation_tokens.saturating_add(cw.unwrap_or(0));
        self.cache_read_tokens = self.cache_read_tokens.saturating_add(cr.unwrap_or(0));
        match l.usage.as_deref() {
            Some("estimated") => self.estimated += 1,
            Some("unknown") => self.unknown += 1,
            _ => {}
        }
    }
}

/// The report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub by: &'static str,
    /// Only requests at or after this time (RFC 3339), if given.
    pub since: Option<String>,
    /// Only requests of keys whose id starts with this, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub files: Vec<PathBuf>,
    pub groups: BTreeMap<String, Totals>,
    pub total: Totals,
    /// Lines that were not audit records.
    pub skipped_lines: u64,
}

/// The audit log at `path` and its rotated files that exist, oldest
/// first (numbered ones from the highest number; dated ones by date).
pub fn audit_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::other(format!("{}: not a file name", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut numbered: Vec<(u64, PathBuf)> = Vec::new();
    let mut dated: Vec<(String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let Some(file) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some(rest) = file.strip_prefix(name) else {
            continue;
        };
        let stem = rest.strip_suffix(".gz").unwrap_or(rest);
        if let Some(n) = stem.strip_prefix('.').and_then(|n| n.parse::<u64>().ok()) {
            numbered.push((n, entry.path()));
        } else if let Some(date) = stem.strip_prefix('-') {
            if !date.is_empty() && date.bytes().all(|b| b.is_ascii_digit()) {
                dated.push((date.to_string(), entry.path()));
            }
        }
    }
    numbered.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    dated.sort();
    let mut files: Vec<PathBuf> = dated.into_iter().map(|(_, p)| p).collect();
    files.extend(numbered.into_iter().map(|(_, p)| p));
    if path.exists() {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

/// `--since`: a duration back from `now` (`7d`, `12h`), an RFC 3339 time,
/// or a date (`2026-11-01`, midnight UTC).
pub fn parse_since(s: &str, now: SystemTime) -> Result<SystemTime, String> {
    let s = s.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        return now
            .checked_sub(d)
            .ok_or_else(|| format!("--since {s:?} is before 1970"));
    }
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_string()
    };
    humantime::parse_rfc3339_weak(&full).map_err(|_| {
        format!("--since {s:?}: give a duration (7d, 12h), a date (2026-11-01) or an RFC 3339 time")
    })
}

/// Reads `files` and totals their requests by `by`, keeping those at or
/// after `since`.
pub fn build(files: &[PathBuf], by: GroupBy, since: Option<SystemTime>) -> std::io::Result<Report> {
    build_for_key(files, by, since, None)
}

/// [`build`], keeping only the requests of the key whose id starts with
/// `key` (`--key`, as `keys list` shows ids), when given.
pub fn build_for_key(
    files: &[PathBuf],
    by: GroupBy,
    since: Option<SystemTime>,
    key: Option<&str>,
) -> std::io::Result<Report> {
    let mut report = Report {
        by: by.name(),
        since: since.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        key: key.map(str::to_owned),
        files: files.to_vec(),
        groups: BTreeMap::new(),
        total: Totals::default(),
        skipped_lines: 0,
    };
    for path in files {
        let file = File::open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let mut reader = BufReader::new(reader);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            let n = reader
                .read_until(b'\n', &mut raw)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            if n == 0 {
                break;
            }
            if raw.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(line) = serde_json::from_slice::<Line>(&raw) else {
                report.skipped_lines += 1;
                continue;
            };
            let Ok(ts) = humantime::parse_rfc3339_weak(&line.ts) else {
                report.skipped_lines += 1;
                continue;
            };
            // Admin actions (the key API) are no requests to a service.
            if since.is_some_and(|s| ts < s)
                || line
                    .decision
                    .as_deref()
                    .is_some_and(|d| d.starts_with("admin_"))
            {
                continue;
            }
            if key.is_some_and(|k| !line.key_id.as_deref().is_some_and(|id| id.starts_with(k))) {
                continue;
            }
            let group = match by {
                GroupBy::User => line.user.clone(),
                GroupBy::Key => line.key_id.clone(),
                GroupBy::Model => line.model.clone(),
                GroupBy::RequestedModel => line.requested_model.clone().or(line.model.clone()),
                GroupBy::Route => line.route.clone(),
                GroupBy::Day => line.ts.get(..10).map(str::to_owned),
                GroupBy::EndUser => line.end_user.clone(),
            }
            .unwrap_or_else(|| NO_GROUP.to_string());
            report.groups.entry(group).or_default().add(&line);
            report.total.add(&line);
        }
    }
    Ok(report)
}

/// The report as a table people read.
pub fn render_table(r: &Report) -> String {
    use std::fmt::Write as _;
    let head = [
        r.by.to_ascii_uppercase(),
        "REQUESTS".into(),
        "ERRORS".into(),
        "PROMPT".into(),
        "COMPLETION".into(),
        "TOTAL".into(),
    ];
    let row = |name: &str, t: &Totals| {
        [
            name.to_string(),
            t.requests.to_string(),
            t.errors.to_string(),
            t.prompt_tokens.to_string(),
            t.completion_tokens.to_string(),
            t.total_tokens.to_string(),
        ]
    };
    let mut rows = vec![head];
    rows.extend(r.groups.iter().map(|(g, t)| row(g, t)));
    rows.push(row("total", &r.total));
    let widths: Vec<usize> = (0..6)
        .map(|c| {
            rows.iter()
                .map(|row| row.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let w = widths.get(c).copied().unwrap_or(0);
            if c == 0 {
                let _ = write!(line, "{cell:<w$}");
            } else {
                let _ = write!(line, "  {cell:>w$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let mut notes = Vec::new();
    let t = &r.total;
    if t.cache_creation_tokens > 0 || t.cache_read_tokens > 0 {
        notes.push(format!(
            "of the prompt tokens, {} written to and {} read from the prompt cache",
            t.cache_creation_tokens, t.cache_read_tokens
        ));
    }
    if r.total.estimated > 0 {
        notes.push(format!(
            "{} request(s) with estimated completion tokens (streams without usage)",
            r.total.estimated
        ));
    }
    if r.total.unknown > 0 {
        notes.push(format!("{} request(s) with unknown usage", r.total.unknown));
    }
    if r.skipped_lines > 0 {
        notes.push(format!(
            "{} line(s) that are not audit records skipped",
            r.skipped_lines
        ));
    }
    for n in notes {
        let _ = writeln!(out, "{n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn line(
        ts: &str,
        user: &str,
        model: &str,
        status: u16,
        p: Option<u64>,
        c: Option<u64>,
        usage: &str,
    ) -> String {
        serde_json::json!({
            "ts": ts, "user": user, "key_id": format!("key-{user}"), "route": "chat",
            "model": model, "status": status, "prompt_tokens": p, "completion_tokens": c,
            "usage": usage, "decision": "accepted"
        })
        .to_string()
            + "\n"
    }

    #[test]
    fn totals_by_group_over_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        std::fs::write(
            &log,
            line(
                "2026-11-25T10:00:00.000Z",
                "ann",
                "llama3.2",
                200,
                Some(10),
                Some(20),
                "reported",
            ) + &line(
                "2026-11-25T10:01:00.000Z",
                "bob",
                "qwen2",
                429,
                None,
                None,
                "",
            ) + "not json\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("audit.log.1"),
            line(
                "2026-11-24T10:00:00.000Z",
                "ann",
                "qwen2",
                200,
                None,
                Some(7),
                "estimated",
            ),
        )
        .unwrap();
        let gz = File::create(dir.path().join("audit.log.2.gz")).unwrap();
        let mut enc = flate2::write::GzEncoder::new(gz, flate2::Compression::default());
        enc.write_all(
            line(
                "2026-11-20T10:00:00.000Z",
                "ann",
                "llama3.2",
                200,
                Some(1),
                Some(2),
                "reported",
            )
            .as_bytes(),
        )
        .unwrap();
        enc.finish().unwrap();
        std::fs::write(dir.path().join("audit.log.bak"), "ignored").unwrap();
        std::fs::write(dir.path().join("other.log.1"), "ignored").unwrap();

        let files = audit_files(&log).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["audit.log.2.gz", "audit.log.1", "audit.log"]);

        let r = build(&files, GroupBy::User, None).unwrap();
        let ann = &r.groups["ann"];
        assert_eq!(
            (
                ann.requests,
                ann.prompt_tokens,
                ann.completion_tokens,
                ann.total_tokens
            ),
            (3, 11, 29, 40)
        );
        assert_eq!(ann.estimated, 1);
        assert_eq!((r.groups["bob"].requests, r.groups["bob"].errors), (1, 1));
        assert_eq!(r.total.requests, 4);
        assert_eq!(r.skipped_lines, 1);

        let by_model = build(&files, GroupBy::Model, None).unwrap();
        assert_eq!(by_model.groups["llama3.2"].total_tokens, 33);
        let by_day = build(&files, GroupBy::Day, None).unwrap();
        assert_eq!(
            by_day.groups.keys().collect::<Vec<_>>(),
            ["2026-11-20", "2026-11-24", "2026-11-25"]
        );

        let since = parse_since("2026-11-24", SystemTime::now()).unwrap();
        let recent = build(&files, GroupBy::Key, Some(since)).unwrap();
        assert_eq!(recent.total.requests, 3);
        assert_eq!(recent.groups["key-ann"].total_tokens, 37);

        let table = render_table(&r);
        let first: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            first,
            [
                "USER",
                "REQUESTS",
                "ERRORS",
                "PROMPT",
                "COMPLETION",
                "TOTAL"
            ]
        );
        assert!(
            table
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == ["total", "4", "1", "11", "29", "40"]),
            "{table}"
        );
        assert!(table.contains("1 request(s) with estimated"), "{table}");
    }

    #[test]
    fn cache_tokens_are_totalled_apart_and_noted() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let cached = serde_json::json!({
            "ts": "2026-11-25T10:00:00.000Z", "user": "ann", "route": "anthropic",
            "model": "claude-x", "status": 200, "prompt_tokens": 145, "completion_tokens": 15,
            "cache_creation_tokens": 100, "cache_read_tokens": 20, "usage": "reported"
        });
        let plain = line(
            "2026-11-25T10:01:00.000Z",
            "ann",
            "m",
            200,
            Some(5),
            Some(1),
            "reported",
        );
        std::fs::write(&log, format!("{cached}\n{plain}")).unwrap();
        let r = build(&[log], GroupBy::User, None).unwrap();
        let ann = &r.groups["ann"];
        assert_eq!(
            (ann.prompt_tokens, ann.total_tokens),
            (150, 166),
            "the cache counts are in the prompt already"
        );
        assert_eq!(
            (ann.cache_creation_tokens, ann.cache_read_tokens),
            (100, 20)
        );
        let table = render_table(&r);
        assert!(
            table
                .contains("of the prompt tokens, 100 written to and 20 read from the prompt cache"),
            "{table}"
        );
    }

    #[test]
    fn since_takes_durations_dates_and_times() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            parse_since("1d", now).unwrap(),
            now - Duration::from_secs(86_400)
        );
        assert_eq!(
            parse_since("1970-01-02", now).unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(86_400)
        );
        assert_eq!(
            parse_since("1970-01-01T00:01:00Z", now).unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(60)
        );
        assert!(parse_since("last tuesday", now).is_err());
        assert!(GroupBy::parse("colour").is_err());
    }
}
