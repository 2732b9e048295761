//! A route's settings for several model servers: upstream entries with a
//! cap and a weight, how the next upstream is chosen (`balance`), the
//! bounded wait when every upstream is at its cap (`queue`), which
//! failures go to another upstream (`retry`), and model `aliases`.

use std::fmt;
use std::num::{NonZeroU32, NonZeroU8};
use std::path::Path;
use std::time::Duration;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use super::address::UpstreamAddr;
use super::error::LoadError;
use super::values::{ModelPattern, Positive, Timeout, MAX_MODEL_NAME};
use super::yaml::location;

/// The largest `weight`: weights are ratios, and a round-robin rotation
/// holds each upstream `weight` times.
pub const MAX_WEIGHT: u32 = 100;
/// The most `retry.attempts` (Pingora's own limit on tries is 16).
pub const MAX_ATTEMPTS: u8 = 10;
/// The most requests a route's `queue` may hold.
pub const MAX_QUEUE: u32 = 100_000;

/// One entry of `upstreams`: `"host:port"`, or
/// `{address: "host:port", max_in_flight: 2, weight: 1}`.
#[derive(Debug, Clone)]
pub struct UpstreamEntry {
    pub addr: UpstreamAddr,
    /// At most this many requests sent to the upstream at once.
    pub max_in_flight: Option<NonZeroU32>,
    /// Its share of requests, relative to the route's other upstreams.
    pub weight: NonZeroU32,
}

/// The object form, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryObject {
    address: UpstreamAddr,
    #[serde(default)]
    max_in_flight: Option<Positive<NonZeroU32>>,
    #[serde(default)]
    weight: Option<Positive<NonZeroU32>>,
}

impl<'de> Deserialize<'de> for UpstreamEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UpstreamEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"an upstream: "host:port", "https://host:port", or {address: "host:port", max_in_flight: 2, weight: 1}"#)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<UpstreamEntry, E> {
                let addr = UpstreamAddr::parse(s).map_err(E::custom)?;
                Ok(UpstreamEntry {
                    addr,
                    max_in_flight: None,
                    weight: NonZeroU32::MIN,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<UpstreamEntry, A::Error> {
                let o =
                    EntryObject::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                let weight = o.weight.map_or(NonZeroU32::MIN, |w| w.0);
                if weight.get() > MAX_WEIGHT {
                    return Err(serde::de::Error::custom(format!(
                        "weight {weight} is more than {MAX_WEIGHT} (weights are ratios: 1 and 3 send three times as much to the second)"
                    )));
                }
                Ok(UpstreamEntry {
                    addr: o.address,
                    max_in_flight: o.max_in_flight.map(|m| m.0),
                    weight,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `balance`: how a route chooses among its upstreams in rotation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each in turn (`weight` times each).
    #[default]
    RoundRobin,
    /// The one with the fewest requests in flight through this gateway,
    /// divided by its `weight`; ties in turn.
    LeastBusy,
}

/// `queue: {max: 100, timeout: 30s}` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileQueue {
    max: Positive<NonZeroU32>,
    timeout: Timeout,
}

/// A route's bounded wait for a free upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSpec {
    /// Requests waiting at most; one more is answered 503 at once.
    pub max: u32,
    /// How long a request waits before it is answered 503.
    pub timeout: Duration,
}

/// One entry of `retry.on`: `connect`, or an upstream status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RetryOn {
    Connect,
    Status(u16),
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RetryOn;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`connect` or a status from 429 to 599, such as 502")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RetryOn, E> {
                match s.trim() {
                    "connect" => Ok(RetryOn::Connect),
                    other => match other.parse::<u64>() {
                        Ok(n) => self.visit_u64(n),
                        Err(_) => Err(E::custom(format!(
                            "retry on {s:?}: write `connect` or a status such as 502"
                        ))),
                    },
                }
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<RetryOn, E> {
                match u16::try_from(n) {
                    Ok(s @ (429 | 500..=599)) => Ok(RetryOn::Status(s)),
                    _ => Err(E::custom(format!(
                        "retry on {n}: only 429 and statuses from 500 to 599 are failures worth another upstream"
                    ))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<RetryOn, E> {
                self.visit_u64(u64::try_from(n).unwrap_or(0))
            }
        }
        d.deserialize_any(V)
    }
}

/// `retry: {attempts: 2, on: [connect, 502, 503, 504]}` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRetry {
    attempts: Positive<NonZeroU8>,
    #[serde(default)]
    on: Option<Vec<RetryOn>>,
}

/// Which failures send a request to another upstream, and how many tries
/// it gets in all. A status is retried only before any byte of the answer
/// went to the client, and only while the request body is still in
/// Pingora's retry buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySpec {
    /// Tries in all, the first included.
    pub attempts: u8,
    pub on_connect: bool,
    pub on_status: Box<[u16]>,
}

impl Default for RetrySpec {
    /// Without `retry`: a failed connect is tried once more on another
    /// upstream (nothing was sent, so this is safe for every method).
    fn default() -> RetrySpec {
        RetrySpec {
            attempts: 2,
            on_connect: true,
            on_status: Box::new([]),
        }
    }
}

impl RetrySpec {
    /// Whether an answer with `status` goes to another upstream.
    #[inline]
    pub fn on(&self, status: u16) -> bool {
        self.on_status.contains(&status)
    }
}

/// A model name clients may ask for, and the model that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelAlias {
    /// As clients name it (exact; compared as model names are: case and
    /// `:latest` aside).
    pub name: ModelPattern,
    /// As the upstream knows it: what the request body's `model` becomes.
    pub target: ModelPattern,
}

/// `aliases: {"gpt-4o": "llama3.2"}` as written, in order.
#[derive(Debug, Default)]
pub(super) struct FileAliases(Vec<ModelAlias>);

impl<'de> Deserialize<'de> for FileAliases {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FileAliases;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a map of model names to the models that serve them, such as {"gpt-4o": "llama3.2"}"#)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FileAliases, A::Error> {
                let mut out: Vec<ModelAlias> = Vec::new();
                while let Some((alias, target)) = map.next_entry::<String, String>()? {
                    let checked = check_alias(&out, &alias, &target);
                    out.push(checked.map_err(serde::de::Error::custom)?);
                }
                Ok(FileAliases(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// An alias and its target: exact model names, the alias new, not a
/// target itself (aliases are not chained).
fn check_alias(seen: &[ModelAlias], alias: &str, target: &str) -> Result<ModelAlias, String> {
    let exact = |name: &str| {
        ModelPattern::parse(name)
            .ok()
            .filter(ModelPattern::is_exact)
            .ok_or_else(|| {
                format!("alias {alias:?} -> {target:?}: model names are exact (no `*`), not empty, without spaces, at most {MAX_MODEL_NAME} bytes")
            })
    };
    let (name, target_pattern) = (exact(alias)?, exact(target)?);
    if seen.iter().any(|a| a.name.matches(alias)) {
        return Err(format!("alias {alias:?} is listed twice"));
    }
    let chained = name.matches(target)
        || seen
            .iter()
            .any(|a| a.target.matches(alias) || a.name.matches(target));
    if chained {
        return Err(format!(
            "alias {alias:?} -> {target:?}: an alias's target cannot be an alias (aliases are not chained)"
        ));
    }
    Ok(ModelAlias {
        name,
        target: target_pattern,
    })
}

/// A route's fleet settings, checked.
#[derive(Debug, Default)]
pub(super) struct CheckedFleet {
    pub(super) balance: Balance,
    pub(super) queue: Option<QueueSpec>,
    pub(super) retry: RetrySpec,
    pub(super) aliases: Vec<ModelAlias>,
}

/// The fleet settings of a route, as written.
pub(super) struct FileFleet {
    pub(super) balance: Option<Balance>,
    pub(super) queue: Option<Spanned<FileQueue>>,
    pub(super) retry: Option<Spanned<FileRetry>>,
    pub(super) aliases: Option<Spanned<FileAliases>>,
}

/// Checks the fleet settings of route `route`: a `queue` needs an upstream
/// with `max_in_flight` (nothing else is ever full), `aliases` need `api`.
/// Errors are about `path`.
pub(super) fn check(
    path: &Path,
    route: &str,
    f: FileFleet,
    any_cap: bool,
    has_api: bool,
) -> Result<CheckedFleet, LoadError> {
    let err = |at, why: String| LoadError::at(path, at, format!("route {route:?}: {why}"));
    let queue = match f.queue {
        Some(q) if !any_cap => {
            return Err(err(location(&q), "queue needs max_in_flight on an upstream (without a cap no upstream is ever full, so nothing would wait)".into()));
        }
        Some(q) if q.value.max.0.get() > MAX_QUEUE => {
            return Err(err(
                location(&q),
                format!("queue max is more than {MAX_QUEUE}"),
            ));
        }
        q => q.map(|q| QueueSpec {
            max: q.value.max.0.get(),
            timeout: q.value.timeout.0,
        }),
    };
    let retry = match f.retry {
        None => RetrySpec::default(),
        Some(r) => {
            let at = location(&r);
            let FileRetry { attempts, on } = r.value;
            if attempts.0.get() > MAX_ATTEMPTS {
                return Err(err(
                    at,
                    format!("retry attempts is more than {MAX_ATTEMPTS}"),
                ));
            }
            let on = on.unwrap_or_else(|| vec![RetryOn::Connect]);
            RetrySpec {
                attempts: attempts.0.get(),
                on_connect: on.contains(&RetryOn::Connect),
                on_status: on
                    .iter()
                    .filter_map(|o| match o {
                        RetryOn::Status(s) => Some(*s),
                        RetryOn::Connect => None,
                    })
                    .collect(),
            }
        }
    };
    let aliases = match f.aliases {
        Some(a) if !has_api => {
            return Err(err(location(&a), "aliases needs `api` (the gateway rewrites the model in request bodies of APIs it knows)".into()));
        }
        a => a.map(|a| a.value.0).unwrap_or_default(),
    };
    Ok(CheckedFleet {
        balance: f.balance.unwrap_or_default(),
        queue,
        retry,
        aliases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_exact_unique_and_not_chained() {
        let seen = vec![check_alias(&[], "gpt-4o", "llama3.2").unwrap()];
        assert!(check_alias(&seen, "GPT-4O", "qwen")
            .unwrap_err()
            .contains("twice"));
        assert!(check_alias(&seen, "x", "gpt-4o")
            .unwrap_err()
            .contains("chained"));
        assert!(check_alias(&seen, "llama3.2", "y")
            .unwrap_err()
            .contains("chained"));
        assert!(check_alias(&[], "a", "A").unwrap_err().contains("chained"));
        assert!(check_alias(&[], "gpt*", "y").is_err());
        assert!(check_alias(&[], "", "y").is_err());
    }

    #[test]
    fn retry_statuses() {
        let spec = RetrySpec {
            attempts: 2,
            on_connect: false,
            on_status: Box::new([502, 503]),
        };
        assert!(spec.on(503) && !spec.on(500));
        assert!(RetrySpec::default().on_connect);
    }
}
