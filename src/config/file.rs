//! The configuration file as users write it ([`FileConfig`]), and its
//! checked form ([`CheckedConfig`]).
//!
//! Parsing is strict (`deny_unknown_fields` on every mapping), so a
//! misspelt setting is an error instead of a silently ignored line. Every
//! value that can be checked on its own is checked while deserializing, so
//! its error carries the line and column; the checks that span settings
//! (duplicate routes, `include_usage` without `api`) run in
//! [`FileConfig::check`], which is pure: no file, no name lookup, no
//! system call. Each value keeps its position (`Spanned`), so those errors,
//! and those of the compile step (`compile.rs`), point at their line too.
//!
//! The file is one flat mapping (serde cannot combine flattened sections
//! with `deny_unknown_fields`); its settings are grouped below by the
//! section file that checks them.

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::admin::{AdminAddr, FileOperations, Operations};
use super::alerts::AlertSettings;
use super::clients::ClientSettings;
use super::error::LoadError;
use super::key_file::KeysFile;
use super::limits::{non_empty_allow, FileThrottle, Limits, ThrottleSpec};
use super::listen::{self, CheckedListener, FileListenList};
use super::routes::{self, CheckedRoute, FileRoute};
use super::shared::{CheckedSharedState, FileSharedState};
use super::values::{ByteSize, IpRange, Positive, Rate, Timeout, TokenRate};

/// The configuration file exactly as users write it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    // listen.rs
    listen: Spanned<FileListenList>,
    // key_file.rs
    keys_file: KeysFile,
    // clients.rs
    #[serde(default)]
    client_header_timeout: Option<Timeout>,
    #[serde(default)]
    client_idle_timeout: Option<Timeout>,
    #[serde(default)]
    client_body_timeout: Option<Timeout>,
    #[serde(default)]
    max_connections: Option<Positive<NonZeroU64>>,
    #[serde(default)]
    underscores_in_headers: bool,
    // limits.rs
    #[serde(default)]
    rate_limit: Option<Rate>,
    #[serde(default)]
    max_concurrent: Option<Positive<NonZeroU32>>,
    #[serde(default)]
    max_body_size: Option<ByteSize>,
    #[serde(default)]
    token_limit: Option<TokenRate>,
    #[serde(default)]
    allow: Option<Spanned<Vec<IpRange>>>,
    #[serde(default)]
    trusted_proxies: Vec<IpRange>,
    #[serde(default)]
    failed_key_throttle: Option<FileThrottle>,
    // shared.rs
    #[serde(default)]
    shared_state: Option<FileSharedState>,
    // alerts.rs
    #[serde(default)]
    alerts: Option<AlertSettings>,
    // admin.rs
    #[serde(default)]
    audit_log: Option<PathBuf>,
    #[serde(default)]
    admin_listen: Option<Spanned<AdminAddr>>,
    #[serde(default)]
    metrics_per_user: bool,
    #[serde(default)]
    upgrade_sock: Option<PathBuf>,
    #[serde(default)]
    threads: Option<Positive<NonZeroUsize>>,
    #[serde(default = "yes")]
    watch: bool,
    #[serde(default)]
    shutdown_grace: Option<Timeout>,
    // routes.rs (and ai.rs for each route's AI settings)
    routes: Spanned<Vec<FileRoute>>,
}

fn yes() -> bool {
    true
}

/// The configuration, checked: every value valid on its own and with the
/// others, every default that needs no system filled in, every relative
/// path resolved against the config's folder. What is left for the
/// compile step: resolving addresses, reading CA files, the default thread
/// count and the open-file limit.
#[derive(Debug)]
pub struct CheckedConfig {
    pub(super) path: PathBuf,
    pub(super) listeners: Vec<CheckedListener>,
    pub(super) keys_file: PathBuf,
    pub(super) clients: ClientSettings,
    pub(super) underscores_in_headers: bool,
    pub(super) limits: Limits,
    pub(super) allow: Option<Vec<IpRange>>,
    pub(super) trusted_proxies: Vec<IpRange>,
    pub(super) failed_key_throttle: ThrottleSpec,
    pub(super) shared_state: Option<CheckedSharedState>,
    pub(super) alerts: Option<AlertSettings>,
    pub(super) operations: Operations,
    pub(super) routes: Vec<CheckedRoute>,
}

impl FileConfig {
    /// Checks the settings against each other, section by section; `path`
    /// is the file they were read from (errors name it, relative paths are
    /// resolved against its folder). Pure: reads nothing, resolves nothing.
    pub fn check(self, path: &Path) -> Result<CheckedConfig, LoadError> {
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let listeners = listen::check(path, self.listen, base)?;
        let routes = routes::check(path, self.routes, base)?;
        let operations = FileOperations {
            audit_log: self.audit_log,
            admin_listen: self.admin_listen,
            metrics_per_user: self.metrics_per_user,
            upgrade_sock: self.upgrade_sock,
            threads: self.threads,
            watch: self.watch,
            shutdown_grace: self.shutdown_grace,
        }
        .check(base);
        Ok(CheckedConfig {
            path: path.to_path_buf(),
            listeners,
            keys_file: self.keys_file.path(base),
            clients: ClientSettings {
                header_timeout: self.client_header_timeout.map(|t| t.0),
                idle_timeout: self.client_idle_timeout.map(|t| t.0),
                body_timeout: self.client_body_timeout.map(|t| t.0),
                max_connections: self.max_connections.map(|n| n.0),
            },
            underscores_in_headers: self.underscores_in_headers,
            limits: Limits::written(
                self.rate_limit,
                self.max_concurrent,
                self.max_body_size,
                self.token_limit,
            ),
            allow: non_empty_allow(path, "allow", self.allow)?,
            trusted_proxies: self.trusted_proxies,
            failed_key_throttle: FileThrottle::spec(self.failed_key_throttle),
            shared_state: self.shared_state.map(|s| s.check(path, base)).transpose()?,
            alerts: self.alerts,
            operations,
            routes,
        })
    }
}
