//! What users write: the YAML configuration, its validated form, and the
//! errors that point at a file, line and column.
//!
//! Owns: parsing and validating `gateway.yaml` ([`Config`], [`RouteSpec`]),
//! and [`LoadError`], the error of every file the gateway reads (the key
//! file's parser in `keys` reports through it too).
//!
//! May import: nothing else of this crate. It is the bottom layer, and it
//! holds no runtime types: what the settings turn into lives above it.

mod clients;
mod error;
mod gateway;
mod listen;
mod pem;
mod shared;
mod values;

pub use clients::{
    cap_for_open_files, open_file_limit, CapSource, ClientLimits, ClientSettings,
    DEFAULT_CLIENT_BODY_TIMEOUT, DEFAULT_CLIENT_HEADER_TIMEOUT, DEFAULT_CLIENT_IDLE_TIMEOUT,
};
pub use error::{LoadError, Location};
pub use gateway::{
    ApiKind, AuditDest, Config, CorsSpec, FileConfig, HealthCheckSpec, Limits, RouteSpec,
    ThrottleSpec, UpstreamCa, UpstreamSpec, DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_CORS_HEADERS, DEFAULT_CORS_MAX_AGE, DEFAULT_READ_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE, DEFAULT_UPGRADE_SOCK,
};
pub use listen::{https_port, AcmeSpec, ListenKind, ListenSpec, TlsSource};
pub use pem::{parse_certificates, parse_private_key, read_certificates};
pub use shared::{OnRedisError, RedisCa, RedisUrl, SharedStateSpec, DEFAULT_REDIS_TIMEOUT};
pub use values::{
    any_contains, any_model_matches, ByteSize, IpRange, ModelPattern, Rate, TokenRate,
    MAX_MODEL_NAME, MAX_TOKEN_BUDGET,
};
