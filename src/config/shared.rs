//! `shared_state`: the Redis (or Valkey) that several gateway instances
//! count their per-key limits in, and what to do when it cannot be reached.
//!
//! Only the settings live here; connecting and counting are the `cluster`
//! layer's. The URL is checked for its form (scheme, host, port, database)
//! without connecting, so `check` can run on a machine that cannot reach
//! Redis. The CA file (`ca`) is read by the compile step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use super::error::{LoadError, Location};
use super::values::{parsed, Timeout};
use super::yaml::location;

/// How long one Redis call may take before the request goes on without it.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(100);

/// The validated `shared_state` setting.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedStateSpec {
    pub redis: RedisUrl,
    pub on_error: OnRedisError,
    /// The bound on each Redis call a request waits for.
    pub timeout: Duration,
    /// The CA certificates a `rediss://` server is verified against,
    /// instead of the system's.
    pub ca: Option<RedisCa>,
}

/// `shared_state.ca`: the file, and its PEM text (checked to hold
/// certificates), which the Redis client takes as it is.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisCa {
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

impl std::fmt::Debug for SharedStateSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStateSpec")
            .field("redis", &self.redis.redacted())
            .field("on_error", &self.on_error)
            .field("timeout", &self.timeout)
            .field("ca", &self.ca.as_ref().map(|c| &c.path))
            .finish()
    }
}

/// What a request whose key has limits gets while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisError {
    /// Each instance counts on its own (a cluster of N then admits up to N
    /// times a limit), never unlimited.
    #[default]
    Local,
    /// Refuse with 503 until Redis is back.
    Deny,
}

impl OnRedisError {
    pub fn name(self) -> &'static str {
        match self {
            OnRedisError::Local => "local",
            OnRedisError::Deny => "deny",
        }
    }
}

/// A Redis URL (`redis://[:password@]host:port[/db]`, `rediss://` for TLS,
/// `redis+unix:///path`) whose form has been checked. It may hold a
/// password, so it is never printed whole: see [`RedisUrl::redacted`].
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Checks the URL's form, without connecting. An error quotes the
    /// part after any credentials (so it can be located in the file, and
    /// never shows a password).
    pub fn parse(s: &str) -> Result<RedisUrl, String> {
        let shown = s.rsplit_once('@').map_or(s, |(_, host)| host);
        let scheme = s.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("redis" | "rediss" | "redis+unix" | "unix")) {
            return Err(format!(
                "shared_state.redis {shown:?} must be a redis://, rediss:// or redis+unix:// URL"
            ));
        }
        redis::Client::open(s)
            .map(|_| RedisUrl(s.to_string()))
            .map_err(|e| {
                format!(
                    "shared_state.redis {shown:?} is not a usable Redis URL: {}",
                    e.detail().unwrap_or("it does not parse")
                )
            })
    }

    /// The URL itself, for the client that connects. Never log it.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// The URL without user name or password, for logs and `check`.
    pub fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return "redis".to_string();
        };
        let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{rest}")
    }
}

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, RedisUrl::parse)
    }
}

/// `shared_state:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSharedState {
    redis: RedisUrl,
    #[serde(default)]
    on_redis_error: OnRedisError,
    #[serde(default)]
    timeout: Option<RedisTimeout>,
    #[serde(default)]
    ca: Option<Spanned<PathBuf>>,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A call timeout: at most 10 s, so a slow Redis never holds a request
/// longer than that.
#[derive(Debug)]
struct RedisTimeout(Duration);

impl<'de> Deserialize<'de> for RedisTimeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let Timeout(t) = Timeout::parse(&s).map_err(serde::de::Error::custom)?;
        if t > Duration::from_secs(10) {
            return Err(serde::de::Error::custom(format!(
                "shared_state.timeout {s:?} is over 10s: a request may wait this long for Redis"
            )));
        }
        Ok(RedisTimeout(t))
    }
}

/// `shared_state`, checked; the CA file not read yet.
#[derive(Debug)]
pub(super) struct CheckedSharedState {
    pub(super) redis: RedisUrl,
    pub(super) on_error: OnRedisError,
    pub(super) timeout: Duration,
    /// `ca` (relative to the config's folder) and where it is written.
    pub(super) ca: Option<(PathBuf, Location)>,
}

impl FileSharedState {
    /// Fills in the defaults; `base` is the config's folder. Errors are
    /// about `path`, the config.
    pub(super) fn check(self, path: &Path, base: &Path) -> Result<CheckedSharedState, LoadError> {
        let ca = match self.ca {
            None => None,
            Some(ca) if !self.redis.secret().starts_with("rediss://") => {
                return Err(LoadError::at(
                    path,
                    location(&ca),
                    "shared_state.ca is set but shared_state.redis is not a rediss:// (TLS) URL",
                ))
            }
            Some(ca) => Some((base.join(&ca.value), location(&ca))),
        };
        Ok(CheckedSharedState {
            redis: self.redis,
            on_error: self.on_redis_error,
            timeout: self.timeout.map_or(DEFAULT_REDIS_TIMEOUT, |t| t.0),
            ca,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_connecting_and_never_shown_with_a_password() {
        let url = RedisUrl::parse("redis://:hunter2@10.0.0.9:6380/2").unwrap();
        assert_eq!(url.redacted(), "redis://10.0.0.9:6380/2");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert!(RedisUrl::parse("rediss://cache.example:6379").is_ok());
        assert!(
            RedisUrl::parse("redis://127.0.0.1:1").is_ok(),
            "nothing listens: fine"
        );
        for bad in ["http://x", "127.0.0.1:6379", "redis://:99999999", ""] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
