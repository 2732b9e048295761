//! The markdown tables: one per format, a row per stream count and target,
//! medians over rounds, ratios against nginx and delays against the
//! upstream alone.

use std::fmt::Write as _;
use std::time::Duration;

use crate::{Format, Measured, Target};

pub fn format_name(f: Format) -> &'static str {
    match f {
        Format::Ndjson => "ndjson",
        Format::Sse => "sse",
    }
}

pub fn target_name(t: Target) -> &'static str {
    match t {
        Target::Direct => "direct",
        Target::Nginx => "nginx",
        Target::Gateway => "gateway",
    }
}

pub fn parse_format(text: &str) -> Result<Format, String> {
    [Format::Ndjson, Format::Sse]
        .into_iter()
        .find(|f| format_name(*f) == text)
        .ok_or(format!("unknown format {text} (ndjson, sse)"))
}

pub fn parse_target(text: &str) -> Result<Target, String> {
    [Target::Direct, Target::Nginx, Target::Gateway]
        .into_iter()
        .find(|t| target_name(*t) == text)
        .ok_or(format!("unknown target {text} (direct, nginx, gateway)"))
}

/// The figures of one (stream count, target), medians over its rounds.
struct Row {
    completed: u32,
    broken: u32,
    chunks: u64,
    cpu: Option<f64>,
    idle_mb: f64,
    open_mb: f64,
    kb_per_stream: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v.get(n / 2).copied().unwrap_or(f64::NAN),
        n => {
            (v.get(n / 2 - 1).copied().unwrap_or(f64::NAN)
                + v.get(n / 2).copied().unwrap_or(f64::NAN))
                / 2.0
        }
    }
}

fn row(runs: &[&Measured]) -> Row {
    let m = |f: &dyn Fn(&Measured) -> f64| median(runs.iter().map(|r| f(r)).collect());
    Row {
        completed: runs.iter().map(|r| r.outcome.completed).min().unwrap_or(0),
        broken: runs.iter().map(|r| r.outcome.broken).sum(),
        chunks: runs.iter().map(|r| r.outcome.chunks).max().unwrap_or(0),
        cpu: runs
            .iter()
            .all(|r| r.cpu_us_per_chunk.is_some())
            .then(|| m(&|r| r.cpu_us_per_chunk.unwrap_or(0.0))),
        idle_mb: m(&|r| r.rss_idle_kib as f64 / 1024.0),
        open_mb: m(&|r| r.rss_open_kib as f64 / 1024.0),
        kb_per_stream: m(&|r| {
            (r.rss_open_kib.saturating_sub(r.rss_idle_kib)) as f64 * 1.024 / f64::from(r.n.max(1))
        }),
        p50_ms: m(&|r| r.outcome.quantile_us(0.50) as f64 / 1000.0),
        p99_ms: m(&|r| r.outcome.quantile_us(0.99) as f64 / 1000.0),
        max_ms: m(&|r| r.outcome.max_us as f64 / 1000.0),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "-".into(),
    }
}

pub fn render(
    tables: &[(Format, Vec<Measured>)],
    lines: u32,
    interval: Duration,
    fd_limit: u64,
    max_n: u32,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Each stream: {lines} lines {} ms apart plus a last one with usage, one chunk each; open-file limit {fd_limit}, so at most {max_n} streams.\n",
        interval.as_millis()
    );
    for (format, runs) in tables {
        let title = match format {
            Format::Ndjson => "Ollama NDJSON (`/api/generate`, `api: ollama` on the gateway)",
            Format::Sse => {
                "OpenAI SSE (`/v1/chat/completions`, `api: openai`, `include_usage` on the gateway)"
            }
        };
        let _ = writeln!(out, "### {title}\n");
        let _ = writeln!(out, "| streams | target | completed | broken | lines | CPU µs/line | vs nginx | RSS idle MB | RSS open MB | KB/stream | vs nginx | delay p50 ms | p99 ms | max ms | added p50 ms | added p99 ms |");
        let _ = writeln!(
            out,
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let mut ns: Vec<u32> = runs.iter().map(|r| r.n).collect();
        ns.dedup();
        for n in ns {
            let of = |t: Target| {
                let rs: Vec<&Measured> =
                    runs.iter().filter(|r| r.n == n && r.target == t).collect();
                (!rs.is_empty()).then(|| row(&rs))
            };
            let (direct, nginx) = (of(Target::Direct), of(Target::Nginx));
            for target in [Target::Direct, Target::Nginx, Target::Gateway] {
                let Some(r) = of(target) else { continue };
                let proxied = target != Target::Direct;
                let vs = |a: Option<f64>, b: Option<f64>| {
                    if target == Target::Gateway {
                        ratio(a, b)
                    } else {
                        "-".into()
                    }
                };
                let added = |mine: f64, base: Option<f64>| match (proxied, base) {
                    (true, Some(b)) => format!("{:.3}", mine - b),
                    _ => "-".into(),
                };
                let _ = writeln!(
                    out,
                    "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.3} | {:.3} | {:.1} | {} | {} |",
                    target_name(target),
                    r.completed,
                    r.broken,
                    r.chunks,
                    r.cpu.map_or("-".into(), |c| format!("{c:.2}")),
                    vs(r.cpu, nginx.as_ref().and_then(|x| x.cpu)),
                    if proxied { format!("{:.1}", r.idle_mb) } else { "-".into() },
                    if proxied { format!("{:.1}", r.open_mb) } else { "-".into() },
                    if proxied { format!("{:.1}", r.kb_per_stream) } else { "-".into() },
                    vs(Some(r.kb_per_stream), nginx.as_ref().map(|x| x.kb_per_stream)),
                    r.p50_ms,
                    r.p99_ms,
                    r.max_ms,
                    added(r.p50_ms, direct.as_ref().map(|d| d.p50_ms)),
                    added(r.p99_ms, direct.as_ref().map(|d| d.p99_ms)),
                );
            }
        }
        out.push('\n');
    }
    out
}
