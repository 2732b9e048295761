//! What users write: the YAML configuration, its checked and compiled
//! forms, and the errors that point at a file, line and column.
//!
//! Owns: reading `gateway.yaml` into [`Config`], in three steps. Parsing
//! (`yaml.rs`, `file.rs`) checks each value on its own, strictly
//! (`deny_unknown_fields` everywhere) and keeps its position; checking
//! ([`Config::check`]) relates the settings, section by section, one file
//! per section of the file: `listen.rs` (listen, TLS), `key_file.rs`,
//! `clients.rs`, `limits.rs` (limits, allow lists, trusted proxies, the
//! failed-key throttle), `routes.rs`, `ai.rs` (api, include_usage,
//! models), `shared.rs` (shared_state), `alerts.rs` (alerts), `admin.rs` (audit_log,
//! admin_listen, metrics_per_user, upgrade_sock, threads, watch,
//! shutdown_grace); compiling ([`CheckedConfig::compile`]) gives the
//! runtime form. Also [`LoadError`], the error of every file the gateway
//! reads (the key file's parser in `keys` reports through it too, and
//! reads YAML with `yaml.rs`), and the setting values shared with the key
//! file (`values.rs`).
//!
//! Where the I/O is: only in `compile.rs`, which resolves host names,
//! reads CA files and the CPU count and open-file limit; and
//! [`Config::load`], which reads the config file. Parsing and checking
//! touch neither files, nor DNS, nor system calls. (`pem.rs`'s
//! [`read_certificates`] reads a file for the `tls` layer; TLS certificate
//! files and the ACME cache are read there, not here.)
//!
//! May import: nothing else of this crate. It is the bottom layer: what
//! the settings turn into at run time (route tables, listeners, counters)
//! lives above it.

mod address;
mod admin;
mod ai;
mod alerts;
mod clients;
mod compile;
mod error;
mod file;
mod fleet;
mod gateway;
mod key_file;
mod limits;
mod listen;
mod pem;
mod routes;
mod shared;
mod values;
pub(crate) mod yaml;

pub use admin::{AuditDest, DEFAULT_SHUTDOWN_GRACE, DEFAULT_UPGRADE_SOCK};
pub use ai::ApiKind;
pub use alerts::{AlertSettings, Alerting, Thresholds, Webhook, DEFAULT_ALERT_AT};
pub use clients::{
    cap_for_open_files, CapSource, ClientLimits, ClientSettings, DEFAULT_CLIENT_BODY_TIMEOUT,
    DEFAULT_CLIENT_HEADER_TIMEOUT, DEFAULT_CLIENT_IDLE_TIMEOUT,
};
pub use compile::open_file_limit;
pub use error::{LoadError, Location};
pub use file::{CheckedConfig, FileConfig};
pub use fleet::{Balance, ModelAlias, QueueSpec, RetrySpec, MAX_ATTEMPTS, MAX_QUEUE, MAX_WEIGHT};
pub use gateway::Config;
pub use limits::{Limits, ThrottleSpec};
pub use listen::{https_port, AcmeSpec, ListenKind, ListenSpec, TlsSource};
pub use pem::{parse_certificates, parse_private_key, read_certificates};
pub use routes::{
    CorsSpec, HealthCheckSpec, RouteSpec, UpstreamCa, UpstreamSpec, DEFAULT_CHECK_INTERVAL,
    DEFAULT_CHECK_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_CORS_HEADERS, DEFAULT_CORS_MAX_AGE,
    DEFAULT_READ_TIMEOUT,
};
pub use shared::{OnRedisError, RedisCa, RedisUrl, SharedStateSpec, DEFAULT_REDIS_TIMEOUT};
pub use values::{
    any_contains, any_model_matches, ByteSize, IpRange, ModelPattern, Rate, Timeout, TokenRate,
    MAX_MODEL_NAME, MAX_TOKEN_BUDGET,
};
