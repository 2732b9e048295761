//! The limits on client connections: how long a client may take over a
//! request head, how long a keep-alive connection may wait for its next
//! request, how long each read of a request body may wait, and how many
//! connections may be open at once.
//!
//! All four are read when a connection is accepted (the cap, the first
//! head's deadline) or when a request starts (the later deadlines), from
//! the snapshot in service at that moment: a reload changes them for new
//! connections and new requests, without a restart.
//!
//! Also in this section: `underscores_in_headers`, which header names a
//! client may send on.
//!
//! The connection cap's default depends on the process's open-file limit,
//! which the compile step reads (`compile.rs`); everything here is pure.

use std::num::NonZeroU64;
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
/// The fewest idle upstream connections each worker thread keeps pooled
/// (Pingora's `upstream_keepalive_pool_size` default).
pub const UPSTREAM_POOL_MIN_PER_THREAD: u64 = 128;
/// The most: enough for the requests in flight when HTTP/2 clients
/// multiplex (64 connections of 10 streams each on 2 threads need 320 per
/// thread). A request that finds the pool full when it ends closes its
/// upstream connection, and the next one connects anew: with 128 per
/// thread, 640 requests in flight made a new upstream connection for ~30%
/// of requests, ~11% of the gateway's CPU in `connect` alone
/// (benches/RESULTS.md, "HTTPS and HTTP/2").
pub const UPSTREAM_POOL_MAX_PER_THREAD: u64 = 1024;

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
    /// Idle upstream connections each proxy thread keeps pooled (see
    /// [`upstream_pool_per_thread`]); set at start.
    pub upstream_pool_per_thread: usize,
}

/// Where the connection cap comes from, for `check` and the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapSource {
    /// `max_connections` in the config.
    Configured,
    /// Derived from this soft `RLIMIT_NOFILE` (see [`cap_for_open_files`]).
    OpenFileLimit(u64),
}

/// The four settings, checked (each timeout above zero, the cap at least
/// one); `None` where the config leaves the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientSettings {
    pub header_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub body_timeout: Option<Duration>,
    pub max_connections: Option<NonZeroU64>,
}

impl ClientLimits {
    /// The limits `s` asks for, defaults filled in. `threads` is the
    /// proxy's worker count (the upstream pool grows with it); `open_files`
    /// the soft open-file limit, which the default cap is derived from.
    pub fn from_settings(s: &ClientSettings, threads: usize, open_files: u64) -> ClientLimits {
        let (max_connections, max_connections_from) = match s.max_connections {
            Some(n) => (
                usize::try_from(n.get()).unwrap_or(usize::MAX),
                CapSource::Configured,
            ),
            None => (
                cap_for_open_files(open_files, threads),
                CapSource::OpenFileLimit(open_files),
            ),
        };
        ClientLimits {
            header_timeout: s.header_timeout.unwrap_or(DEFAULT_CLIENT_HEADER_TIMEOUT),
            idle_timeout: s.idle_timeout.unwrap_or(DEFAULT_CLIENT_IDLE_TIMEOUT),
            body_timeout: s.body_timeout.unwrap_or(DEFAULT_CLIENT_BODY_TIMEOUT),
            max_connections,
            max_connections_from,
            upstream_pool_per_thread: upstream_pool_per_thread(open_files, threads),
        }
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

/// Idle upstream connections each of `threads` proxy threads keeps
/// pooled under a soft open-file limit of `soft`: all threads together an
/// eighth of what the gateway's own files leave, each between
/// [`UPSTREAM_POOL_MIN_PER_THREAD`] (so a limit of 1,024 keeps the pool
/// and the cap it always had) and [`UPSTREAM_POOL_MAX_PER_THREAD`].
pub fn upstream_pool_per_thread(soft: u64, threads: usize) -> usize {
    let share = soft.saturating_sub(RESERVED_FDS) / (8 * threads.max(1) as u64);
    let pool = share.clamp(UPSTREAM_POOL_MIN_PER_THREAD, UPSTREAM_POOL_MAX_PER_THREAD);
    usize::try_from(pool).unwrap_or(usize::MAX)
}

/// The default connection cap for a soft open-file limit of `soft`, so the
/// gateway never runs out of descriptors:
///
/// ```text
/// max_connections = (soft − RESERVED_FDS − upstream_pool_per_thread × threads) / 2
/// ```
///
/// The reserve covers the process's own files and the idle upstream pool;
/// what is left is halved because every client connection can hold one
/// upstream connection while its request is proxied (as nginx counts
/// `worker_connections`). With `LimitNOFILE=65536` (the shipped systemd
/// unit) and 2 threads that is 31,712 (a pool of 1,024 per thread); with
/// the common shell default of 1,024 it is 352 (128 per thread). At
/// least 1.
pub fn cap_for_open_files(soft: u64, threads: usize) -> usize {
    let pool =
        (upstream_pool_per_thread(soft, threads) as u64).saturating_mul(threads.max(1) as u64);
    let spare = soft.saturating_sub(RESERVED_FDS).saturating_sub(pool) / 2;
    usize::try_from(spare).unwrap_or(usize::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_for_upstreams_and_files() {
        assert_eq!(cap_for_open_files(65_536, 2), 31_712);
        assert_eq!(cap_for_open_files(20_000, 2), 8_944);
        assert_eq!(cap_for_open_files(1_024, 2), 352);
        assert_eq!(cap_for_open_files(1_024, 1), 416);
        // Clients plus as many upstreams plus the reserve fit in the limit.
        for (soft, threads) in [(1_024u64, 4usize), (20_000, 2), (1 << 20, 16)] {
            let cap = cap_for_open_files(soft, threads) as u64;
            assert!(
                2 * cap
                    + RESERVED_FDS
                    + upstream_pool_per_thread(soft, threads) as u64 * threads as u64
                    <= soft,
                "{soft} {threads}"
            );
        }
        assert_eq!(cap_for_open_files(100, 2), 1, "never zero");
        assert!(cap_for_open_files(u64::MAX, 2) > 1 << 40);
    }

    #[test]
    fn the_upstream_pool_grows_with_the_open_file_limit() {
        assert_eq!(upstream_pool_per_thread(1_024, 2), 128, "Pingora's default");
        assert_eq!(upstream_pool_per_thread(1_024, 1), 128);
        assert_eq!(upstream_pool_per_thread(10_000, 2), 621);
        assert_eq!(upstream_pool_per_thread(20_000, 2), 1_024);
        assert_eq!(upstream_pool_per_thread(65_536, 16), 511);
        assert_eq!(upstream_pool_per_thread(u64::MAX, 2), 1_024);
        assert_eq!(upstream_pool_per_thread(0, 0), 128);
    }

    #[test]
    fn defaults_and_configured_values() {
        let d = ClientLimits::from_settings(&ClientSettings::default(), 2, 1_024);
        assert_eq!(d.header_timeout, DEFAULT_CLIENT_HEADER_TIMEOUT);
        assert_eq!(d.idle_timeout, DEFAULT_CLIENT_IDLE_TIMEOUT);
        assert_eq!(d.body_timeout, DEFAULT_CLIENT_BODY_TIMEOUT);
        assert_eq!(d.max_connections_from, CapSource::OpenFileLimit(1_024));
        assert_eq!(d.max_connections, cap_for_open_files(1_024, 2));
        let c = ClientLimits::from_settings(
            &ClientSettings {
                header_timeout: Some(Duration::from_secs(2)),
                idle_timeout: Some(Duration::from_secs(3)),
                body_timeout: Some(Duration::from_secs(4)),
                max_connections: NonZeroU64::new(7),
            },
            2,
            1_024,
        );
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.max_connections_from, CapSource::Configured);
        assert_eq!(
            c.describe(),
            "client connections: at most 7 (set by max_connections); header timeout 2s, idle timeout 3s, body timeout 4s"
        );
    }
}
