//! The status page: one server-rendered HTML document with inline SVG
//! charts and embedded CSS, nothing fetched from anywhere, readable
//! without JavaScript and on a phone. Tables sort on the server
//! (`?sort=<column>`, links in their headers).
//!
//! It reads a copy of the history ([`History::view`](crate::ops::History))
//! and the snapshot, counters and metrics as they are: rendering it costs
//! the admin listener's thread, never a serving thread.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use http::{Response, StatusCode};

use super::{reply, Admin};
use crate::keys::unix_millis;
use crate::ops::history::{Counts, HistoryView, SeriesView, NONE};

const CSS: &str = include_str!("page.css");

/// Users drawn as charts of their own (the rest are in the tables).
const CHARTED_USERS: usize = 8;
/// Keys listed as near their limits.
const NEAR_LIMITS: usize = 20;

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn when(secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .to_string()
}

fn span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// A bar chart of `values` (oldest first), `w` by `h`, with a title and
/// the largest value as its scale.
fn bars(title: &str, values: &[u64], stacked: Option<&[u64]>, label: &str) -> String {
    let (w, h) = (600.0_f64, 90.0_f64);
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    let n = values.len().max(1);
    #[allow(clippy::cast_precision_loss)]
    let bw = w / n as f64;
    let mut svg = format!(
        r#"<figure><figcaption>{} <span class="scale">max {max}{}</span></figcaption><svg viewBox="0 0 {w} {h}" preserveAspectRatio="none" role="img" aria-label="{}">"#,
        esc(title),
        esc(label),
        esc(title)
    );
    for (i, &v) in values.iter().enumerate() {
        if v == 0 {
            continue;
        }
        #[allow(clippy::cast_precision_loss)]
        let (x, bh) = (i as f64 * bw, v as f64 / max as f64 * h);
        let _ = write!(
            svg,
            r#"<rect class="a" x="{x:.2}" y="{:.2}" width="{:.2}" height="{bh:.2}"/>"#,
            h - bh,
            bw.max(0.5)
        );
        if let Some(Some(&r)) = stacked
            .map(|s| s.get(i))
            .filter(|r| r.is_some_and(|&r| r > 0))
        {
            #[allow(clippy::cast_precision_loss)]
            let rh = r.min(v) as f64 / max as f64 * h;
            let _ = write!(
                svg,
                r#"<rect class="b" x="{x:.2}" y="{:.2}" width="{:.2}" height="{rh:.2}"/>"#,
                h - rh,
                bw.max(0.5)
            );
        }
    }
    svg.push_str("</svg></figure>");
    svg
}

/// Totals of many series, bucket by bucket.
fn summed<'a>(series: impl Iterator<Item = &'a SeriesView>, daily: bool) -> Vec<Counts> {
    let mut out: Vec<Counts> = Vec::new();
    for s in series {
        let buckets = if daily { &s.daily } else { &s.fine };
        if out.len() < buckets.len() {
            out.resize(buckets.len(), Counts::default());
        }
        for (o, c) in out.iter_mut().zip(buckets) {
            o.requests += c.requests;
            o.prompt_tokens += c.prompt_tokens;
            o.completion_tokens += c.completion_tokens;
            for (r, n) in &c.refused {
                match o.refused.iter_mut().find(|(i, _)| i == r) {
                    Some((_, m)) => *m += n,
                    None => o.refused.push((*r, *n)),
                }
            }
        }
    }
    out
}

/// Requests (refused in the darker part) and tokens, per bucket.
fn charts(title: &str, buckets: &[Counts], unit: &str) -> String {
    let req: Vec<u64> = buckets.iter().map(|c| c.requests).collect();
    let refused: Vec<u64> = buckets.iter().map(Counts::refused_total).collect();
    let tokens: Vec<u64> = buckets
        .iter()
        .map(|c| c.prompt_tokens + c.completion_tokens)
        .collect();
    format!(
        "<div class=\"pair\">{}{}</div>",
        bars(
            &format!("{title}: requests per {unit} (refused darker)"),
            &req,
            Some(&refused),
            ""
        ),
        bars(&format!("{title}: tokens per {unit}"), &tokens, None, "")
    )
}

/// "rate_limited 3, missing_key 1"
fn reasons(c: &Counts, names: &[String]) -> String {
    let mut list: Vec<(&str, u64)> = c
        .refused
        .iter()
        .map(|(r, n)| (names.get(usize::from(*r)).map_or("?", String::as_str), *n))
        .collect();
    list.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    list.iter()
        .map(|(r, n)| format!("{} {n}", esc(r)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The columns a table sorts by.
const COLUMNS: [(&str, &str); 9] = [
    ("name", "name"),
    ("req24", "requests 24 h"),
    ("ref24", "refused 24 h"),
    ("prompt24", "prompt tokens 24 h"),
    ("completion24", "completion tokens 24 h"),
    ("req30", "requests 30 d"),
    ("ref30", "refused 30 d"),
    ("prompt30", "prompt tokens 30 d"),
    ("completion30", "completion tokens 30 d"),
];

/// One table row: a name, the 24-hour and 30-day counts.
struct Row {
    name: String,
    extra: String,
    day: Counts,
    month: Counts,
}

fn sort_rows(rows: &mut [Row], by: &str) {
    let key = |r: &Row| -> u64 {
        match by {
            "ref24" => r.day.refused_total(),
            "prompt24" => r.day.prompt_tokens,
            "completion24" => r.day.completion_tokens,
            "req30" => r.month.requests,
            "ref30" => r.month.refused_total(),
            "prompt30" => r.month.prompt_tokens,
            "completion30" => r.month.completion_tokens,
            _ => r.day.requests,
        }
    };
    if by == "name" {
        rows.sort_by(|a, b| a.name.cmp(&b.name));
    } else {
        rows.sort_by(|a, b| key(b).cmp(&key(a)).then(a.name.cmp(&b.name)));
    }
}

fn table(id: &str, first: &str, rows: &[Row], names: &[String]) -> String {
    let mut t = format!("<div class=\"scroll\"><table id=\"{id}\"><thead><tr>");
    for (i, (col, label)) in COLUMNS.iter().enumerate() {
        let label = if i == 0 { first } else { label };
        let _ = write!(
            t,
            "<th><a href=\"?sort={col}#{id}\">{}</a></th>",
            esc(label)
        );
    }
    t.push_str("<th>refusals by reason (24 h)</th></tr></thead><tbody>");
    for r in rows {
        let (d, m) = (&r.day, &r.month);
        let _ = write!(
            t,
            "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.name),
            r.extra,
            d.requests,
            d.refused_total(),
            d.prompt_tokens,
            d.completion_tokens,
            m.requests,
            m.refused_total(),
            m.prompt_tokens,
            m.completion_tokens,
            reasons(d, names)
        );
    }
    t.push_str("</tbody></table></div>");
    t
}

/// The per-user and per-key sections.
fn usage_sections(v: &HistoryView, sort: &str) -> String {
    let mut out = String::new();
    let fine = summed(v.series.iter(), false);
    let daily = summed(v.series.iter(), true);
    out.push_str("<section id=\"traffic\"><h2>Traffic</h2>");
    out.push_str(&charts("All", &fine, "5 min, last 24 h"));
    out.push_str(&charts("All", &daily, "day, last 30 days"));
    let mut users: BTreeMap<&str, Vec<&SeriesView>> = BTreeMap::new();
    for s in &v.series {
        users.entry(s.user.as_str()).or_default().push(s);
    }
    let mut user_rows: Vec<Row> = users
        .iter()
        .map(|(u, list)| Row {
            name: (*u).to_string(),
            extra: String::new(),
            day: summed_one(list.iter().map(|s| &s.day)),
            month: summed_one(list.iter().map(|s| &s.month)),
        })
        .collect();
    sort_rows(&mut user_rows, sort);
    out.push_str("</section><section id=\"users\"><h2>Per user</h2>");
    out.push_str(&table("by-user", "user", &user_rows, &v.reasons));
    let mut charted: Vec<&Row> = user_rows.iter().filter(|r| r.name != NONE).collect();
    charted.sort_by(|a, b| {
        let t = |r: &Row| r.day.requests + r.day.prompt_tokens + r.day.completion_tokens;
        t(b).cmp(&t(a))
    });
    for r in charted.iter().take(CHARTED_USERS) {
        let list = users.get(r.name.as_str()).map_or(&[][..], Vec::as_slice);
        out.push_str(&format!("<h3>{}</h3>", esc(&r.name)));
        out.push_str(&charts(
            &r.name,
            &summed(list.iter().copied(), false),
            "5 min",
        ));
        out.push_str(&charts(&r.name, &summed(list.iter().copied(), true), "day"));
    }
    let mut key_rows: Vec<Row> = v
        .series
        .iter()
        .map(|s| Row {
            name: s.key_id.clone(),
            extra: format!(" <small>({})</small>", esc(&s.user)),
            day: s.day.clone(),
            month: s.month.clone(),
        })
        .collect();
    sort_rows(&mut key_rows, sort);
    out.push_str("</section><section id=\"keys\"><h2>Per key</h2>");
    out.push_str(&table("by-key", "key id (user)", &key_rows, &v.reasons));
    out.push_str("</section>");
    out
}

fn summed_one<'a>(list: impl Iterator<Item = &'a Counts>) -> Counts {
    let mut c = Counts::default();
    for x in list {
        c.requests += x.requests;
        c.prompt_tokens += x.prompt_tokens;
        c.completion_tokens += x.completion_tokens;
        for (r, n) in &x.refused {
            match c.refused.iter_mut().find(|(i, _)| i == r) {
                Some((_, m)) => *m += n,
                None => c.refused.push((*r, *n)),
            }
        }
    }
    c
}

/// Keys whose entries are refused (expired or revoked) but that clients
/// still present.
fn still_tried(v: &HistoryView) -> String {
    let words = ["expired_key", "disabled_key"];
    let mut rows = String::new();
    for s in &v.series {
        let n: u64 = s
            .day
            .refused
            .iter()
            .filter(|(r, _)| {
                v.reasons
                    .get(usize::from(*r))
                    .is_some_and(|w| words.contains(&w.as_str()))
            })
            .map(|(_, n)| n)
            .sum();
        if n > 0 && s.key_id != NONE {
            let _ = write!(
                rows,
                "<tr><td>{}</td><td>{n}</td><td>{}</td><td>{}</td></tr>",
                esc(&s.key_id),
                reasons(&s.day, &v.reasons),
                when(s.last_seen_s)
            );
        }
    }
    if rows.is_empty() {
        return "<section id=\"tried\"><h2>Expired or revoked keys still tried</h2><p>None in the last 24 hours.</p></section>".into();
    }
    format!("<section id=\"tried\"><h2>Expired or revoked keys still tried</h2><div class=\"scroll\"><table><thead><tr><th>key id</th><th>refused (24 h)</th><th>why</th><th>last tried</th></tr></thead><tbody>{rows}</tbody></table></div></section>")
}

impl Admin {
    /// The status page.
    pub(super) fn page(&self, query: Option<&str>) -> Response<Vec<u8>> {
        let sort = query
            .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("sort=")))
            .filter(|s| COLUMNS.iter().any(|(c, _)| c == s))
            .unwrap_or("req24");
        let now = SystemTime::now();
        let view = self
            .history
            .as_ref()
            .map(|h| h.view(unix_s(now)))
            .unwrap_or_default();
        let mut body = String::with_capacity(64 * 1024);
        let _ = write!(
            body,
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>ai-gateway status</title><style>{CSS}</style></head><body><header><h1>ai-gateway status</h1><p>{} · every time is UTC · <a href=\"?sort={sort}\">refresh</a></p></header><main>",
            esc(&when(unix_s(now)))
        );
        // The short sections that call for action first, then the
        // traffic and its long tables.
        body.push_str(&self.overview(now));
        body.push_str(&self.routes(now, &view));
        body.push_str(&self.tls_section(now));
        body.push_str(&self.near_limits(now));
        if self.history.is_some() {
            body.push_str(&still_tried(&view));
            body.push_str(&usage_sections(&view, sort));
        } else {
            body.push_str("<section><h2>Traffic</h2><p>History needs <code>audit_log</code> set to a file: the page's counts come from the audit log.</p></section>");
        }
        body.push_str("</main></body></html>");
        reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            body.into_bytes(),
        )
    }

    /// Version, uptime, snapshot, last reload, shared state, history.
    fn overview(&self, now: SystemTime) -> String {
        let live = self.live.load();
        let snap = &live.snapshot;
        let uptime = now.duration_since(self.started).unwrap_or_default();
        let reload = match self.reloads.last() {
            None => "none since start".to_string(),
            Some(r) => match &r.result {
                Ok(g) => format!(
                    "<span class=\"ok\">ok</span>, generation {g} ({}, {})",
                    esc(&r.why),
                    when(unix_s(r.at))
                ),
                Err(e) => format!(
                    "<span class=\"bad\">failed</span> ({}, {}): {}",
                    esc(&r.why),
                    when(unix_s(r.at)),
                    esc(e)
                ),
            },
        };
        let redis = match &snap.config.shared_state {
            None => "not configured (limits are counted on this instance)".to_string(),
            Some(spec) => {
                let up = self.metrics.shared_state_up.get() == 1;
                format!(
                    "{} {} (on_redis_error: {}, {} failed calls)",
                    esc(&spec.redis.redacted().to_string()),
                    if up {
                        "<span class=\"ok\">up</span>"
                    } else {
                        "<span class=\"bad\">down</span>"
                    },
                    spec.on_error.name(),
                    self.metrics.shared_state_errors.get()
                )
            }
        };
        let history = match (&self.history, self.rebuild.get()) {
            (None, _) => "off (no audit_log file)".to_string(),
            (Some(_), None) => "rebuilding from the audit log…".to_string(),
            (Some(_), Some(r)) => match r.error {
                None => format!(
                    "rebuilt from the audit log at start: {} lines in {} ms",
                    r.lines,
                    r.took.as_millis()
                ),
                Some(e) => format!("the audit log could not be read at start: {}", esc(&e)),
            },
        };
        format!(
            "<section id=\"overview\"><h2>Gateway</h2><dl><dt>version</dt><dd>{}</dd><dt>up for</dt><dd>{} (since {})</dd><dt>config</dt><dd>generation {}: {}</dd><dt>last reload</dt><dd id=\"last-reload\">{reload}</dd><dt>in flight</dt><dd>{}</dd><dt>shared state (Redis)</dt><dd id=\"redis\">{redis}</dd><dt>history</dt><dd>{history}</dd></dl></section>",
            env!("CARGO_PKG_VERSION"),
            span(uptime),
            when(unix_s(self.started)),
            snap.generation,
            esc(&snap.summary()),
            self.metrics.in_flight.get()
        )
    }

    /// Keys with limits of their own, by the share used.
    fn near_limits(&self, now: SystemTime) -> String {
        let live = self.live.load();
        let snap = &live.snapshot;
        let mono_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let now_ms = unix_millis(now);
        let mut rows: Vec<(f64, String)> = Vec::new();
        for k in snap.keys.entries() {
            if k.disabled || k.expires_at_ms <= now_ms {
                continue;
            }
            let Some(counter) = snap.key_counter(k.ordinal) else {
                continue;
            };
            let mut add = |what: &str, used: u64, limit: u64, left: Duration| {
                #[allow(clippy::cast_precision_loss)]
                let pct = used as f64 * 100.0 / limit.max(1) as f64;
                let row = format!(
                    "<tr><td>{}</td><td>{}</td><td>{what}</td><td>{used} of {limit}</td><td>{pct:.0}%</td><td>in {}</td></tr>",
                    k.id,
                    esc(k.user),
                    span(left)
                );
                rows.push((pct, row));
            };
            if let Some(rate) = k.limits.rate {
                if let Some((used, left)) = counter.rate_window(rate, mono_ms) {
                    add("requests", used, u64::from(rate.count.get()), left);
                }
            }
            if let Some(budget) = k.limits.tokens {
                if let Some((used, left)) = counter.token_window(budget, mono_ms) {
                    add("tokens", used, budget.count.get(), left);
                }
            }
        }
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        if rows.is_empty() {
            return "<section id=\"limits\"><h2>Keys near their limits</h2><p>No key with limits of its own has an open window.</p></section>".into();
        }
        let body: String = rows.into_iter().take(NEAR_LIMITS).map(|(_, r)| r).collect();
        format!("<section id=\"limits\"><h2>Keys near their limits</h2><p>Counted on this instance.</p><div class=\"scroll\"><table><thead><tr><th>key id</th><th>user</th><th>limit</th><th>used</th><th>%</th><th>window ends</th></tr></thead><tbody>{body}</tbody></table></div></section>")
    }

    /// Routes and their upstreams: health now, answers, errors and latency
    /// over the last hour.
    fn routes(&self, now: SystemTime, v: &HistoryView) -> String {
        let live = self.live.load();
        let now_ms = unix_millis(now);
        let mut rows = String::new();
        for r in live.snapshot.router.routes() {
            for u in r.upstreams() {
                let addr = u.addr.to_string();
                let seen = v
                    .upstreams
                    .iter()
                    .find(|x| x.route == r.name && x.upstream == addr);
                let ms = |p: Option<f64>| p.map_or("–".to_string(), |p| format!("≤ {p:.1} ms"));
                let up = u.state.health.is_up(now_ms);
                let cap = u
                    .spec
                    .max_in_flight
                    .map_or(String::new(), |c| format!(" of {c}"));
                let _ = write!(
                    rows,
                    "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}{cap}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    if up { "up" } else { "down" },
                    esc(&r.name),
                    esc(&addr),
                    if up { "<span class=\"ok\">up</span>" } else { "<span class=\"bad\">down</span>" },
                    u.state.load.in_flight(),
                    u.state.load.queued(),
                    seen.map_or(0, |s| s.answers),
                    seen.map_or(0, |s| s.errors),
                    ms(seen.and_then(|s| s.p50_ms)),
                    ms(seen.and_then(|s| s.p99_ms)),
                );
            }
        }
        format!("<section id=\"upstreams\"><h2>Routes and upstreams</h2><p>Answers, errors (5xx) and latency over the last hour.</p><div class=\"scroll\"><table><thead><tr><th>route</th><th>upstream</th><th>health</th><th>in flight</th><th>queued</th><th>answers</th><th>errors</th><th>p50</th><th>p99</th></tr></thead><tbody>{rows}</tbody></table></div></section>")
    }

    /// TLS listeners, their certificates' expiry and ACME orders.
    fn tls_section(&self, now: SystemTime) -> String {
        let live = self.live.load();
        let mut expiry: BTreeMap<String, i64> = BTreeMap::new();
        let mut acme: BTreeMap<String, f64> = BTreeMap::new();
        for f in self.metrics.gather() {
            for m in f.get_metric() {
                let label = |n: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == n)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                match f.name() {
                    "agw_tls_cert_expiry_timestamp_seconds" => {
                        #[allow(clippy::cast_possible_truncation)]
                        let v = m.get_gauge().get_value() as i64;
                        expiry.insert(label("listener"), v);
                    }
                    "agw_acme_orders_total" => {
                        acme.insert(label("result"), m.get_counter().get_value());
                    }
                    _ => {}
                }
            }
        }
        let mut rows = String::new();
        for l in live.snapshot.config.listeners.iter().filter(|l| l.is_tls()) {
            let url = l.url();
            let cert = match expiry.get(&url).and_then(|s| u64::try_from(*s).ok()) {
                Some(at) => {
                    let left = Duration::from_secs(at.saturating_sub(unix_s(now)));
                    format!("{} (in {})", when(at), span(left))
                }
                None => "no certificate yet".to_string(),
            };
            let _ = write!(rows, "<tr><td>{}</td><td>{}</td></tr>", esc(&url), cert);
        }
        if rows.is_empty() {
            return "<section id=\"tls\"><h2>TLS</h2><p>No TLS listener.</p></section>".into();
        }
        format!(
            "<section id=\"tls\"><h2>TLS</h2><div class=\"scroll\"><table><thead><tr><th>listener</th><th>certificate expires</th></tr></thead><tbody>{rows}</tbody></table></div><p>ACME orders since start: {} ok, {} failed.</p></section>",
            acme.get("ok").copied().unwrap_or(0.0),
            acme.get("error").copied().unwrap_or(0.0)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn bars_scale_to_the_largest() {
        let svg = bars("t", &[0, 5, 10], Some(&[0, 5, 0]), "");
        assert_eq!(svg.matches("class=\"a\"").count(), 2);
        assert_eq!(svg.matches("class=\"b\"").count(), 1);
        assert!(svg.contains("max 10"));
        assert!(svg.contains("height=\"90.00\""));
    }

    #[test]
    fn rows_sort_by_the_column_asked() {
        let row = |name: &str, req: u64, tok: u64| Row {
            name: name.into(),
            extra: String::new(),
            day: Counts {
                requests: req,
                prompt_tokens: tok,
                ..Counts::default()
            },
            month: Counts::default(),
        };
        let mut rows = vec![row("a", 1, 9), row("b", 5, 1)];
        sort_rows(&mut rows, "req24");
        assert_eq!(rows[0].name, "b");
        sort_rows(&mut rows, "prompt24");
        assert_eq!(rows[0].name, "a");
        sort_rows(&mut rows, "name");
        assert_eq!(rows[0].name, "a");
    }
}
