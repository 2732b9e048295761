//! The process log (stderr), with Pingora's verbose targets capped.
//!
//! Below `info`, some of Pingora's own lines print what a client sent: a
//! malformed request head (with its `X-API-Key`), the request line with its
//! query string (which may carry a key), the headers sent upstream. A key
//! must never reach a log at any level, so those targets are capped at
//! `info` whatever `RUST_LOG` asks; the gateway's own lines never print a
//! header value or a query.

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Targets (and their submodules) that may not log below `info`.
const CAPPED: [&str; 3] = [
    "pingora_proxy",
    "pingora_core::protocols::http",
    "pingora_core::apps",
];

/// `env_logger` with the caps above; `RUST_LOG` sets the level (default
/// `info`).
struct Capped(env_logger::Logger);

fn over_cap(metadata: &Metadata<'_>) -> bool {
    metadata.level() > Level::Info
        && CAPPED.iter().any(|t| {
            metadata
                .target()
                .strip_prefix(t)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

impl Log for Capped {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        !over_cap(metadata) && self.0.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !over_cap(record.metadata()) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// The filter without `RUST_LOG`: `info`, but rustls at `error`. rustls
/// warns once per handshake about what a client sent (an IP address as
/// the server name, as wrk and `curl https://127.0.0.1` do): a line per
/// connection, unbounded, about nothing the operator can fix.
const DEFAULT_FILTER: &str = "info,rustls=error";

/// Installs the process logger. Call once, first thing.
pub fn init() {
    let logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(DEFAULT_FILTER))
            .build();
    let max: LevelFilter = logger.filter();
    if log::set_boxed_logger(Box::new(Capped(logger))).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(target: &str, level: Level) -> bool {
        over_cap(&Metadata::builder().target(target).level(level).build())
    }

    #[test]
    fn pingoras_verbose_lines_are_capped_and_ours_are_not() {
        assert!(meta("pingora_proxy", Level::Debug));
        assert!(meta("pingora_proxy::proxy_h1", Level::Trace));
        assert!(meta(
            "pingora_core::protocols::http::v1::server",
            Level::Debug
        ));
        assert!(!meta("pingora_proxy", Level::Info));
        assert!(!meta("pingora_proxy::proxy_h1", Level::Error));
        assert!(!meta("pingora_core::server", Level::Debug));
        assert!(!meta("pingora_proxyx", Level::Debug));
        assert!(!meta("ai_gateway::proxy", Level::Debug));
    }
}
