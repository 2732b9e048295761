//! The request path before an upstream is chosen, as named phases, each a
//! function of explicit inputs. `Gateway::request_filter` calls them in
//! this order (and `upstream_peer` makes the last choice):
//!
//! ```text
//!  admission   client address (peer, or trusted proxies' X-Forwarded-For),
//!              the throttle's word on it                  [`admission`]
//!  head        framing, host, size                        (`framing::check_head`)
//!  decision    allow lists, path, route, method, upgrade, credential, key
//!                                                         (`Snapshot::decide`)
//!  key         the throttle's verdict on the key, failures counted,
//!              revocations from other instances            [`key`]
//!  end user    the end user behind the key, for keys that name
//!              them, and their counter              (`end_users::find`)
//!  limits      rate, concurrency, tokens (the end user's, then the
//!              key's): here or in Redis                    [`limits`]
//!  AI body     the model read from the body, on routes with `api`
//!                                                         (`ai`)
//!  upstream    the pool's next healthy upstream            (`upstream_peer`)
//! ```
//!
//! A phase that refuses returns the [`Refusal`]; one that fails (the
//! client went away mid-read) returns Pingora's error; [`Stop`] carries
//! either, so the phases chain with `?` and the hook decodes one value.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::HeaderMap;
use log::warn;
use pingora::prelude::*;

use crate::cluster::Cluster;
use crate::config::{Limits, ThrottleSpec};
use crate::keys::{KeyDenial, Principal};
use crate::ops::ClientAddr;
use crate::policy::{client_ip, Refusal};
use crate::state::{AddrTag, CounterId, FailedKeys, KeyCounter};

/// The address taken for a client whose socket has none (a Unix socket).
pub const UNKNOWN_CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// Why the request path stopped before the upstream.
#[derive(Debug)]
pub enum Stop {
    /// The gateway answers the request itself.
    Refuse(Refusal),
    /// Pingora failed (a read of the body): its error handling takes over.
    Fail(Box<Error>),
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Stop {
        Stop::Refuse(r)
    }
}

impl From<Box<Error>> for Stop {
    fn from(e: Box<Error>) -> Stop {
        Stop::Fail(e)
    }
}

/// The clocks a request is judged by, read once.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Unix milliseconds (key expiry, health).
    pub unix_ms: i64,
    /// Unix seconds (the throttle).
    pub unix_s: u32,
    /// Milliseconds of the gateway's monotonic clock (rate windows).
    pub mono_ms: u64,
}

/// What the failed-key throttle says of the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// The throttle is off.
    Off,
    /// Not blocked; failures and successes are counted for the address.
    Open(AddrTag),
    /// Blocked: only keys known to work from the address pass.
    Blocked { addr: AddrTag, retry_after_s: u32 },
}

/// The client, as the allow lists, the throttle and the audit line see
/// it.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub ip: IpAddr,
    /// The socket's peer, or the address a trusted proxy named.
    pub addr: Option<ClientAddr>,
    pub throttle: Throttle,
}

/// Admission: who the client is, and whether its address is blocked.
pub fn admission(
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    trusted_proxies: &[crate::config::IpRange],
    spec: &ThrottleSpec,
    failed_keys: &FailedKeys,
    now_s: u32,
) -> Client {
    let ip = peer.map_or(UNKNOWN_CLIENT, |p| {
        client_ip(p.ip(), headers, trusted_proxies)
    });
    let addr = peer.map(|p| {
        if p.ip() == ip {
            ClientAddr::Peer(p)
        } else {
            ClientAddr::Forwarded(ip)
        }
    });
    let throttle = if spec.enabled {
        let tag = failed_keys.tag(ip);
        match failed_keys.blocked(tag, now_s) {
            Some(retry_after_s) => Throttle::Blocked {
                addr: tag,
                retry_after_s,
            },
            None => Throttle::Open(tag),
        }
    } else {
        Throttle::Off
    };
    Client { ip, addr, throttle }
}

/// What the key phase needs besides the decision's verdict.
pub struct KeyCheck<'a> {
    pub client: &'a Client,
    pub spec: &'a ThrottleSpec,
    pub failed_keys: &'a FailedKeys,
    pub cluster: Option<&'a Arc<Cluster>>,
    pub now_s: u32,
}

/// Key: the decision's verdict, judged by the throttle. A key revoked on
/// another instance counts as revoked here, first, so no path (a block
/// included) serves it. A blocked address is served only for keys that
/// worked from it before (each use keeps them known); anything else,
/// right key or wrong, gets the same 429. Failed keys are counted (here
/// and, with shared state, across instances); a key that passes is
/// remembered for the address.
pub fn key<'s>(
    verdict: Result<Principal<'s>, Refusal>,
    check: &KeyCheck<'_>,
) -> Result<Principal<'s>, Refusal> {
    let verdict = verdict.and_then(|p| match check.cluster {
        Some(c) if c.is_revoked(p.id) => Err(Refusal::Key(KeyDenial::Disabled)),
        _ => Ok(p),
    });
    let addr = match check.client.throttle {
        Throttle::Blocked {
            addr,
            retry_after_s,
        } => {
            return match verdict {
                Ok(p) if check.failed_keys.known(addr, p.id, check.now_s) => {
                    check.failed_keys.succeeded(addr, p.id, check.now_s);
                    Ok(p)
                }
                _ => Err(Refusal::KeyThrottled { retry_after_s }),
            };
        }
        Throttle::Open(addr) => Some(addr),
        Throttle::Off => None,
    };
    let principal = verdict.inspect_err(|r| {
        if r.is_failed_key() && addr.is_some() {
            count_failure(check.client.ip, check);
        }
    })?;
    if let Some(addr) = addr {
        check.failed_keys.succeeded(addr, principal.id, check.now_s);
    }
    Ok(principal)
}

/// Counts a failed key check from `ip`; logs the block it causes, once.
#[cold]
fn count_failure(ip: IpAddr, check: &KeyCheck<'_>) {
    let spec = check.spec;
    if let Some(cluster) = check.cluster {
        cluster.key_failed(ip, spec);
    }
    if check.failed_keys.failed(ip, check.now_s, spec) {
        warn!(
            "client {ip} throttled: blocked for {}s after {} failed key checks",
            spec.cooldown.as_secs(),
            spec.max_failures
        );
    }
}

/// Where a request's per-key limits are counted.
pub enum Limited {
    /// Nothing is counted for this key on this route.
    Free,
    /// Counted on this instance alone.
    Here(Limits, Arc<KeyCounter>),
    /// Counted across instances, in Redis (under the key's id, or its
    /// end user's).
    Shared(CounterId, Limits, Arc<KeyCounter>),
}

/// Limits: which counters the request is held to (the taking itself is
/// `policy::admit_locally` or `Cluster::admit`).
pub fn limits(counted: Option<(Limits, &Arc<KeyCounter>)>, id: CounterId, shared: bool) -> Limited {
    match counted {
        None => Limited::Free,
        Some((l, c)) if shared => Limited::Shared(id, l, Arc::clone(c)),
        Some((l, c)) => Limited::Here(l, Arc::clone(c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyStore, ServiceId, ServiceTable};
    use std::num::NonZeroU32;
    use std::path::Path;
    use std::time::Duration;

    fn spec(max_failures: u32) -> ThrottleSpec {
        ThrottleSpec {
            enabled: true,
            max_failures: NonZeroU32::new(max_failures).unwrap(),
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(30),
        }
    }

    fn store() -> (KeyStore, ServiceId) {
        let mut services = ServiceTable::default();
        let chat = services.intern("chat");
        let keys = KeyStore::parse(
            Path::new("k.json"),
            r#"{"team-key": {"user": "ann", "service": "chat"}, "new-key": {"user": "bob", "service": "chat"}}"#,
            &services,
        )
        .unwrap();
        (keys, chat)
    }

    fn client(ip: &str, failed: &FailedKeys, spec: &ThrottleSpec, now_s: u32) -> Client {
        let peer = SocketAddr::new(ip.parse().unwrap(), 4000);
        admission(Some(peer), &HeaderMap::new(), &[], spec, failed, now_s)
    }

    #[test]
    fn admission_reads_the_address_and_the_throttle() {
        let failed = FailedKeys::default();
        let off = ThrottleSpec {
            enabled: false,
            ..spec(1)
        };
        let c = client("192.0.2.1", &failed, &off, 0);
        assert_eq!(c.throttle, Throttle::Off);
        assert!(matches!(c.addr, Some(ClientAddr::Peer(_))));
        let c = client("192.0.2.1", &failed, &spec(1), 0);
        assert!(matches!(c.throttle, Throttle::Open(_)));
        failed.failed(c.ip, 0, &spec(1));
        let c = client("192.0.2.1", &failed, &spec(1), 1);
        assert!(matches!(
            c.throttle,
            Throttle::Blocked {
                retry_after_s: 29,
                ..
            }
        ));
        // Behind a trusted proxy, the address it names.
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "198.51.100.9".parse().unwrap());
        let trusted = [crate::config::IpRange::parse("127.0.0.1").unwrap()];
        let peer = SocketAddr::new("127.0.0.1".parse().unwrap(), 1);
        let c = admission(Some(peer), &headers, &trusted, &spec(3), &failed, 0);
        assert_eq!(c.ip, "198.51.100.9".parse::<IpAddr>().unwrap());
        assert!(matches!(c.addr, Some(ClientAddr::Forwarded(_))));
    }

    #[test]
    fn the_key_phase_counts_failures_blocks_and_spares_known_keys() {
        let (keys, chat) = store();
        let failed = FailedKeys::default();
        let spec = spec(2);
        let check = |c: &Client, presented: &[u8], now_s| {
            let verdict = keys.check(Some(presented), chat, 0).map_err(Refusal::Key);
            let kc = KeyCheck {
                client: c,
                spec: &spec,
                failed_keys: &failed,
                cluster: None,
                now_s,
            };
            key(verdict, &kc).map(|p| p.user.name.to_string())
        };
        let c = client("192.0.2.9", &failed, &spec, 100);
        assert_eq!(check(&c, b"team-key", 100).unwrap(), "ann");
        for _ in 0..2 {
            assert_eq!(
                check(&c, b"stale", 100).unwrap_err(),
                Refusal::Key(KeyDenial::Unknown)
            );
        }
        let c = client("192.0.2.9", &failed, &spec, 101);
        assert!(matches!(c.throttle, Throttle::Blocked { .. }));
        assert_eq!(check(&c, b"team-key", 101).unwrap(), "ann");
        let refused = Refusal::KeyThrottled { retry_after_s: 29 };
        assert_eq!(check(&c, b"new-key", 101).unwrap_err(), refused);
        assert_eq!(check(&c, b"stale", 101).unwrap_err(), refused);
    }
}
