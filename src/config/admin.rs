//! How the gateway is run and watched: `audit_log`, `admin_listen`,
//! `metrics_per_user`, `upgrade_sock`, `threads`, `watch` and
//! `shutdown_grace`. All but `watch` and `metrics_per_user` take effect at
//! start only (see `Config::restart_only_differences`).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use super::address::HostPort;
use super::error::Location;
use super::values::{Positive, Timeout};
use super::yaml::location;

/// Where a running gateway hands its listening sockets to `run --upgrade`.
pub const DEFAULT_UPGRADE_SOCK: &str = "/tmp/ai-gateway-upgrade.sock";
/// How long SIGTERM waits for requests in flight before exiting anyway.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Where audit lines go: a file the gateway appends to, or its stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditDest {
    Stderr,
    File(PathBuf),
}

impl AuditDest {
    /// `-` for stderr, else a file (relative to `base`, the config's folder).
    fn written(p: PathBuf, base: &Path) -> AuditDest {
        if p.as_os_str() == "-" {
            AuditDest::Stderr
        } else {
            AuditDest::File(base.join(p))
        }
    }
}

/// The admin address: `host:port`, or just a port (`9090`, `:9090`),
/// which means loopback: metrics and health need no key, so they are not
/// exposed beyond the machine unless the config says so.
#[derive(Debug)]
pub(super) struct AdminAddr(HostPort);

impl<'de> Deserialize<'de> for AdminAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let port_only = s.strip_prefix(':').unwrap_or(&s);
        if let Ok(port) = port_only.parse::<u16>() {
            return Ok(AdminAddr(HostPort::loopback(&s, port)));
        }
        HostPort::parse(&s)
            .map(AdminAddr)
            .map_err(serde::de::Error::custom)
    }
}

/// The operations settings as written (each optional in the file).
pub(super) struct FileOperations {
    pub(super) audit_log: Option<PathBuf>,
    pub(super) admin_listen: Option<Spanned<AdminAddr>>,
    pub(super) metrics_per_user: bool,
    pub(super) upgrade_sock: Option<PathBuf>,
    pub(super) threads: Option<Positive<NonZeroUsize>>,
    pub(super) watch: bool,
    pub(super) shutdown_grace: Option<Timeout>,
}

/// The operations settings, checked; `admin_listen` is resolved and the
/// default thread count read by the compile step.
#[derive(Debug)]
pub(super) struct Operations {
    pub(super) audit_log: Option<AuditDest>,
    /// The address and where it is written.
    pub(super) admin_listen: Option<(HostPort, Location)>,
    pub(super) metrics_per_user: bool,
    pub(super) upgrade_sock: PathBuf,
    /// `None`: one per CPU the process may use.
    pub(super) threads: Option<NonZeroUsize>,
    pub(super) watch: bool,
    pub(super) shutdown_grace: Duration,
}

impl FileOperations {
    /// Fills in the defaults; relative paths are resolved against `base`,
    /// the config's folder.
    pub(super) fn check(self, base: &Path) -> Operations {
        Operations {
            audit_log: self.audit_log.map(|p| AuditDest::written(p, base)),
            admin_listen: self.admin_listen.map(|a| {
                let at = location(&a);
                (a.value.0, at)
            }),
            metrics_per_user: self.metrics_per_user,
            upgrade_sock: self
                .upgrade_sock
                .map_or_else(|| PathBuf::from(DEFAULT_UPGRADE_SOCK), |p| base.join(p)),
            threads: self.threads.map(|n| n.0),
            watch: self.watch,
            shutdown_grace: self.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |t| t.0),
        }
    }
}
