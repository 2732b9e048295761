//! The limits and the client filters: `rate_limit`, `max_concurrent`,
//! `max_body_size` and `token_limit` (globally and per route; a key's own
//! win over both), `allow` (globally and per route), `trusted_proxies`,
//! and `failed_key_throttle`.

use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::error::LoadError;
use super::values::{ByteSize, IpRange, Positive, Rate, Timeout, TokenRate};
use super::yaml::location;

/// Per-request limits at one level (global, route or key); `None` leaves
/// the choice to the level below.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rate: Option<Rate>,
    pub max_concurrent: Option<NonZeroU32>,
    /// The largest request body, in bytes.
    pub max_body: Option<u64>,
    /// Tokens (prompt and completion) per period, on routes with `api`.
    pub tokens: Option<TokenRate>,
}

impl Limits {
    /// The limits as the four settings give them.
    pub(super) fn written(
        rate: Option<Rate>,
        max_concurrent: Option<Positive<NonZeroU32>>,
        max_body: Option<ByteSize>,
        tokens: Option<TokenRate>,
    ) -> Limits {
        Limits {
            rate,
            max_concurrent: max_concurrent.map(|n| n.0),
            max_body: max_body.map(|b| b.0),
            tokens,
        }
    }

    /// `self` where it says something, else `fallback`.
    pub fn or(self, fallback: Limits) -> Limits {
        Limits {
            rate: self.rate.or(fallback.rate),
            max_concurrent: self.max_concurrent.or(fallback.max_concurrent),
            max_body: self.max_body.or(fallback.max_body),
            tokens: self.tokens.or(fallback.tokens),
        }
    }

    /// Whether a per-key counter is needed to enforce these.
    pub fn counted(&self) -> bool {
        self.rate.is_some() || self.max_concurrent.is_some() || self.tokens.is_some()
    }
}

/// Blocking client addresses that keep presenting bad keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSpec {
    pub enabled: bool,
    /// Failed key checks allowed within `window`; the next request is 429.
    pub max_failures: NonZeroU32,
    pub window: Duration,
    /// How long a blocked address stays blocked.
    pub cooldown: Duration,
}

impl Default for ThrottleSpec {
    /// 20 failures a minute is far more than a person retyping a key makes.
    fn default() -> Self {
        ThrottleSpec {
            enabled: true,
            max_failures: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(300),
        }
    }
}

/// `failed_key_throttle: {enabled, max_failures, window, cooldown}` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileThrottle {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    max_failures: Option<Positive<NonZeroU32>>,
    #[serde(default)]
    window: Option<Timeout>,
    #[serde(default)]
    cooldown: Option<Timeout>,
}

fn yes() -> bool {
    true
}

impl FileThrottle {
    /// The throttle `written` asks for, defaults filled in.
    pub(super) fn spec(written: Option<FileThrottle>) -> ThrottleSpec {
        let d = ThrottleSpec::default();
        match written {
            None => d,
            Some(t) => ThrottleSpec {
                enabled: t.enabled,
                max_failures: t.max_failures.map_or(d.max_failures, |n| n.0),
                window: t.window.map_or(d.window, |w| w.0),
                cooldown: t.cooldown.map_or(d.cooldown, |c| c.0),
            },
        }
    }
}

/// An `allow` list, which must name someone: an empty one would lock
/// everybody out, which is never what was meant. `what` names the list in
/// the error (`allow`, `route "chat": allow`).
pub(super) fn non_empty_allow(
    path: &Path,
    what: &str,
    allow: Option<Spanned<Vec<IpRange>>>,
) -> Result<Option<Vec<IpRange>>, LoadError> {
    match allow {
        Some(list) if list.value.is_empty() => Err(LoadError::at(
            path,
            location(&list),
            format!("{what} is empty: nobody could connect; leave it out to allow every address"),
        )),
        other => Ok(other.map(|l| l.value)),
    }
}
