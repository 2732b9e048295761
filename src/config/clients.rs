//! The limits on client connections: how long a client may take over a
//! request head, how long a keep-alive connection may wait for its next
//! request, how long each read of a request body may wait, and how many
//! connections may be open at once.
//!
//! All four are read when a connection is accepted (the cap, the first
//! head's deadline) or when a request starts (the later deadlines), from
//! the snapshot in service at that moment: a reload changes them for new
//! connections and new requests, without a restart.

use std::time::Duration;

/// How long a client has to send a whole request head (request line and
/// headers).
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a keep-alive connection may wait for its next request.
pub const DEFAULT_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest wait for each read of a request body.
pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Descriptors set aside for everything that is neither a client
/// connection nor an upstream connection: stdio, the listeners, the admin
/// listener and its connections, each runtime's epoll and wake-up fds, the
/// signal pipe, the file watcher, the audit log, the config and key files
/// while a reload reads them, health-check connections.
pub const RESERVED_FDS: u64 = 64;
/// Idle upstream connections Pingora may keep pooled per worker thread
/// (`upstream_keepalive_pool_size`, 128 by default; the pool holds up to
/// this many times the number of threads).
pub const UPSTREAM_POOL_PER_THREAD: u64 = 128;

/// The validated client limits; every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    /// Open client connections allowed on the proxy listeners; one more is
    /// refused at once.
    pub max_connections: usize,
    /// Where `max_connections` comes from.
    pub max_connections_from: CapSource,
}

/// Where the connection cap comes from, for `check` and the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapSource {
    /// `max_connections` in the config.
    Configured,
    /// Derived from this soft `RLIMIT_NOFILE` (see [`cap_for_open_files`]).
    OpenFileLimit(u64),
}

/// The four settings as written in the config file.
#[derive(Debug, Default)]
pub struct ClientSettings<'a> {
    pub header_timeout: Option<&'a str>,
    pub idle_timeout: Option<&'a str>,
    pub body_timeout: Option<&'a str>,
    pub max_connections: Option<u64>,
}

/// A setting with a value that is not allowed; the caller turns it into a
/// [`super::LoadError`] at the setting's line.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SettingError {
    pub key: &'static str,
    /// The value as written, to find its line.
    pub value: String,
    pub message: String,
}

impl ClientLimits {
    /// Validates the settings and fills in the defaults; `threads` is the
    /// proxy's worker count (the upstream pool grows with it).
    pub fn from_settings(
        s: &ClientSettings<'_>,
        threads: usize,
    ) -> Result<ClientLimits, SettingError> {
        let timeout = |key: &'static str, value: Option<&str>, default: Duration| match value {
            None => Ok(default),
            Some(v) => parse_timeout(v).map_err(|message| SettingError {
                key,
                value: v.to_string(),
                message,
            }),
        };
        let (max_connections, max_connections_from) = match s.max_connections {
            Some(0) => {
                return Err(SettingError {
                    key: "max_connections",
                    value: "0".into(),
                    message: "must be at least 1 (leave it out for the default, derived from the open-file limit)".into(),
                })
            }
            Some(n) => (
                usize::try_from(n).unwrap_or(usize::MAX),
                CapSource::Configured,
            ),
            None => {
                let soft = open_file_limit();
                (
                    cap_for_open_files(soft, threads),
                    CapSource::OpenFileLimit(soft),
                )
            }
        };
        Ok(ClientLimits {
            header_timeout: timeout(
                "client_header_timeout",
                s.header_timeout,
                DEFAULT_CLIENT_HEADER_TIMEOUT,
            )?,
            idle_timeout: timeout(
                "client_idle_timeout",
                s.idle_timeout,
                DEFAULT_CLIENT_IDLE_TIMEOUT,
            )?,
            body_timeout: timeout(
                "client_body_timeout",
                s.body_timeout,
                DEFAULT_CLIENT_BODY_TIMEOUT,
            )?,
            max_connections,
            max_connections_from,
        })
    }

    /// One line for `check` and the start-up log: the effective values and
    /// where the cap comes from.
    pub fn describe(&self) -> String {
        let from = match self.max_connections_from {
            CapSource::Configured => "set by max_connections".to_string(),
            CapSource::OpenFileLimit(soft) => format!("derived from the open-file limit {soft}"),
        };
        format!(
            "client connections: at most {} ({from}); header timeout {}, idle timeout {}, body timeout {}",
            self.max_connections,
            humantime::format_duration(self.header_timeout),
            humantime::format_duration(self.idle_timeout),
            humantime::format_duration(self.body_timeout),
        )
    }
}

/// A duration such as `5s`, `300ms` or `2m`, as every timeout of the
/// config is written; zero is refused (it would fail every request).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); write it like 5s, 300ms or 2m"))?;
    if d.is_zero() {
        return Err("a timeout of zero is not allowed".into());
    }
    Ok(d)
}

/// The default connection cap for a soft open-file limit of `soft`, so the
/// gateway never runs out of descriptors:
///
/// ```text
/// max_connections = (soft − RESERVED_FDS − UPSTREAM_POOL_PER_THREAD × threads) / 2
/// ```
///
/// The reserve covers the process's own files and the idle upstream pool;
/// what is left is halved because every client connection can hold one
/// upstream connection while its request is proxied (as nginx counts
/// `worker_connections`). With `LimitNOFILE=65536` (the shipped systemd
/// unit) and 2 threads that is 32,608; with the common shell default of
/// 1,024 it is 352. At least 1.
pub fn cap_for_open_files(soft: u64, threads: usize) -> usize {
    let pool = UPSTREAM_POOL_PER_THREAD.saturating_mul(threads.max(1) as u64);
    let spare = soft.saturating_sub(RESERVED_FDS).saturating_sub(pool) / 2;
    usize::try_from(spare).unwrap_or(usize::MAX).max(1)
}

/// This process's soft `RLIMIT_NOFILE` (`ulimit -n`); `RLIM_INFINITY` is
/// reported as `u64::MAX`. If the limit cannot be read, 1,024 (the usual
/// default) is assumed.
pub fn open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return 1024;
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        // rlim_t is narrower than u64 on some targets.
        #[allow(clippy::unnecessary_cast)]
        let soft = lim.rlim_cur as u64;
        soft
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_for_upstreams_and_files() {
        assert_eq!(cap_for_open_files(65_536, 2), 32_608);
        assert_eq!(cap_for_open_files(1_024, 2), 352);
        assert_eq!(cap_for_open_files(1_024, 1), 416);
        // Clients plus as many upstreams plus the reserve fit in the limit.
        for (soft, threads) in [(1_024u64, 4usize), (20_000, 2), (1 << 20, 16)] {
            let cap = cap_for_open_files(soft, threads) as u64;
            assert!(
                2 * cap + RESERVED_FDS + UPSTREAM_POOL_PER_THREAD * threads as u64 <= soft,
                "{soft} {threads}"
            );
        }
        assert_eq!(cap_for_open_files(100, 2), 1, "never zero");
        assert!(cap_for_open_files(u64::MAX, 2) > 1 << 40);
    }

    #[test]
    fn defaults_and_configured_values() {
        let d = ClientLimits::from_settings(&ClientSettings::default(), 2).unwrap();
        assert_eq!(d.header_timeout, DEFAULT_CLIENT_HEADER_TIMEOUT);
        assert_eq!(d.idle_timeout, DEFAULT_CLIENT_IDLE_TIMEOUT);
        assert_eq!(d.body_timeout, DEFAULT_CLIENT_BODY_TIMEOUT);
        let soft = open_file_limit();
        assert_eq!(d.max_connections_from, CapSource::OpenFileLimit(soft));
        assert_eq!(d.max_connections, cap_for_open_files(soft, 2));
        let c = ClientLimits::from_settings(
            &ClientSettings {
                header_timeout: Some("2s"),
                idle_timeout: Some(" 3s "),
                body_timeout: Some("4000ms"),
                max_connections: Some(7),
            },
            2,
        )
        .unwrap();
        assert_eq!(c.header_timeout, Duration::from_secs(2));
        assert_eq!(c.idle_timeout, Duration::from_secs(3));
        assert_eq!(c.body_timeout, Duration::from_secs(4));
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.max_connections_from, CapSource::Configured);
        assert_eq!(
            c.describe(),
            "client connections: at most 7 (set by max_connections); header timeout 2s, idle timeout 3s, body timeout 4s"
        );
        let e = ClientLimits::from_settings(
            &ClientSettings {
                idle_timeout: Some("0ms"),
                ..ClientSettings::default()
            },
            2,
        )
        .unwrap_err();
        assert_eq!(
            (e.key, e.value.as_str(), e.to_string().as_str()),
            (
                "client_idle_timeout",
                "0ms",
                "client_idle_timeout: a timeout of zero is not allowed"
            )
        );
    }
}
