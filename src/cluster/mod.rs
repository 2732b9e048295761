//! Several gateway instances sharing per-key limits, token budgets, the
//! failed-key throttle and revocations through one Redis (or Valkey).
//!
//! The hot path does not wait on Redis while a key is far from its limits:
//! an instance takes requests and concurrency slots from Redis in leases
//! (an eighth of what is left, so leases shrink to one near the limit) and
//! spends them locally; token totals come back with every update and are
//! pushed to every instance over pub/sub. What Redis counts is always at
//! least what was admitted, so a limit of N per window admits at most N
//! across the cluster while Redis answers; what a lease holds unused is
//! refused elsewhere until it is spent, returned (slots, within
//! [`sync::SYNC_EVERY`]) or its window ends (requests).
//!
//! When Redis cannot be reached, `on_redis_error` decides: `local` counts
//! on each instance alone (never unlimited), `deny` refuses limited keys
//! with 503. The sync task probes Redis and sharing resumes by itself.
//!
//! Owns: the Redis link ([`link`]), the scripts and key names
//! ([`scripts`]), admission against shared counts ([`Cluster::admit`]),
//! revocations heard from other instances, the sync task ([`sync`]).
//!
//! It spawns tasks, never threads: the sync task, the pub/sub listener and
//! the Redis calls made off the request path run on the runtime that the
//! daemon starts for the cluster on a thread of its own.
//!
//! May import: `config`, `keys`, `state`, `policy`, `ops`.

mod link;
mod scripts;
mod sync;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;
use log::warn;

use crate::config::{Limits, OnRedisError, SharedStateSpec, ThrottleSpec, TokenRate};
use crate::keys::KeyId;
use crate::ops::Metrics;
use crate::policy::{admit_locally, whole_seconds, Admission, Refusal};
use crate::state::{Carried, CounterId, KeyCounter, SharedShare, TokenMeter};

use link::{Link, Unavailable};
pub use scripts::{EVENTS, REVOKED};

/// The largest lease of requests one call takes.
const MOST_REQUESTS: u32 = 256;
/// The largest grant of concurrency slots one call takes.
const MOST_SLOTS: u32 = 16;

/// This instance's side of the shared state.
pub struct Cluster {
    link: Link,
    /// A random name for this instance, under which it holds slots.
    instance: String,
    on_error: OnRedisError,
    metrics: Arc<Metrics>,
    carried: Arc<Carried>,
    /// The zero of the monotonic clock the proxy passes as `now_ms`.
    epoch: Instant,
    /// Keys holding concurrency slots, for the sync task to return the
    /// unused ones.
    holding: Mutex<HashMap<CounterId, Arc<KeyCounter>>>,
    /// Keys with a token budget this instance has heard about, with the
    /// budget: the sync task sends their tokens, pub/sub updates them.
    metered: Mutex<HashMap<CounterId, (Arc<KeyCounter>, TokenRate)>>,
    /// Key ids revoked through Redis.
    revoked: ArcSwap<HashSet<KeyId>>,
    any_revoked: AtomicBool,
}

/// Why a shared admission could not be made, before falling back.
enum Shortfall {
    Refused(Refusal),
    Unavailable,
}

impl From<Refusal> for Shortfall {
    fn from(r: Refusal) -> Self {
        Shortfall::Refused(r)
    }
}

impl From<Unavailable> for Shortfall {
    fn from(_: Unavailable) -> Self {
        Shortfall::Unavailable
    }
}

impl Cluster {
    /// The cluster's side of the shared state. `runtime` runs the Redis
    /// connection's tasks; the daemon runs [`Cluster::background`] on it.
    pub fn new(
        spec: &SharedStateSpec,
        metrics: Arc<Metrics>,
        carried: Arc<Carried>,
        epoch: Instant,
        runtime: tokio::runtime::Handle,
    ) -> Result<Arc<Cluster>, String> {
        let link = Link::new(spec, Arc::clone(&metrics), runtime)
            .map_err(|e| format!("shared_state.redis: {:?}", e.kind()))?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| e.to_string())?;
        Ok(Arc::new(Cluster {
            link,
            instance: id.iter().map(|b| format!("{b:02x}")).collect(),
            on_error: spec.on_error,
            metrics,
            carried,
            epoch,
            holding: Mutex::default(),
            metered: Mutex::default(),
            revoked: ArcSwap::default(),
            any_revoked: AtomicBool::new(false),
        }))
    }

    /// Probes Redis once, so the first requests know whether it answers,
    /// and says so in the log.
    pub async fn first_probe(&self) {
        if self.link.probe().await {
            // Alive before the first request: another instance taking
            // slots drops those of instances it does not see alive.
            sync::refresh(self).await;
        } else {
            warn!(
                "shared state: redis does not answer at start: {}; retrying in the background",
                match self.on_error {
                    OnRedisError::Local => "limits are counted on this instance alone meanwhile",
                    OnRedisError::Deny => "requests of keys with limits are refused meanwhile",
                }
            );
        }
    }

    /// The background work (liveness, slot returns, token sends, probes,
    /// the events channel); runs until the process ends.
    pub async fn background(self: Arc<Self>) {
        sync::run(self).await;
    }

    /// Milliseconds of the clock requests are admitted by.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the key was revoked through Redis (`keys revoke --shared`,
    /// or disabled in another instance's key file).
    #[inline]
    pub fn is_revoked(&self, id: KeyId) -> bool {
        self.any_revoked.load(Ordering::Relaxed) && self.revoked.load().contains(&id)
    }

    fn hear_revoked(&self, ids: impl IntoIterator<Item = KeyId>) {
        let mut next = HashSet::clone(&self.revoked.load());
        let before = next.len();
        next.extend(ids);
        if next.len() != before {
            self.revoked.store(Arc::new(next));
            self.any_revoked.store(true, Ordering::Relaxed);
        }
    }

    /// Takes what a request uses of its key's limits, counted across the
    /// cluster: waits on Redis only when this instance's lease is spent
    /// or the key's token total was never heard. While Redis cannot be
    /// reached, counts locally or refuses, as `on_redis_error` says.
    pub async fn admit(
        &self,
        id: CounterId,
        limits: Limits,
        counter: &Arc<KeyCounter>,
        now_ms: u64,
    ) -> Result<Admission, Refusal> {
        match self.admit_shared(id, limits, counter, now_ms).await {
            Ok(admission) => Ok(admission),
            Err(Shortfall::Refused(r)) => Err(r),
            Err(Shortfall::Unavailable) => match self.on_error {
                OnRedisError::Local => {
                    self.metrics.shared_state_fallback(false);
                    admit_locally(limits, counter, now_ms)
                }
                OnRedisError::Deny => {
                    self.metrics.shared_state_fallback(true);
                    Err(Refusal::SharedStateUnavailable)
                }
            },
        }
    }

    async fn admit_shared(
        &self,
        id: CounterId,
        limits: Limits,
        counter: &Arc<KeyCounter>,
        now_ms: u64,
    ) -> Result<Admission, Shortfall> {
        let share = counter.shared();
        if let Some(budget) = limits.tokens {
            let (used, ends_ms) = match share.tokens(now_ms) {
                Some(heard) => heard,
                None => self.hear_tokens(id, counter, budget, now_ms).await?,
            };
            if used >= budget.count.get() && now_ms < ends_ms {
                return Err(Refusal::TokenBudgetExceeded {
                    retry_after_s: whole_seconds(std::time::Duration::from_millis(
                        ends_ms - now_ms,
                    )),
                }
                .into());
            }
        }
        if let Some(rate) = limits.rate {
            if !share.take_leased(now_ms) {
                self.lease_requests(id, share, rate, now_ms).await?;
            }
        }
        let slot = match limits.max_concurrent {
            None => None,
            Some(max) => Some(match SharedShare::enter_held(counter) {
                Some(slot) => slot,
                None => self.take_slot(id, counter, max.get()).await?,
            }),
        };
        Ok(Admission {
            slot,
            tokens: limits
                .tokens
                .map(|budget| TokenMeter::shared(Arc::clone(counter), budget)),
            ..Admission::default()
        })
    }

    /// Takes a new lease of requests (the current one is spent or over)
    /// and one request of it.
    async fn lease_requests(
        &self,
        id: CounterId,
        share: &SharedShare,
        rate: crate::config::Rate,
        now_ms: u64,
    ) -> Result<(), Shortfall> {
        let _one_call = share.calls.lock().await;
        if share.take_leased(now_ms) {
            return Ok(());
        }
        let period_ms = u64::try_from(rate.period.as_millis()).unwrap_or(u64::MAX);
        let key = scripts::rate_key(&id.to_string(), period_ms);
        let limit = rate.count.get();
        let (granted, ttl_ms): (u32, u64) = self
            .link
            .call(move |mut c| async move {
                scripts::LEASE_REQUESTS
                    .key(key)
                    .arg(limit)
                    .arg(period_ms)
                    .arg(MOST_REQUESTS)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if granted == 0 {
            return Err(Refusal::RateLimited {
                retry_after_s: whole_seconds(std::time::Duration::from_millis(ttl_ms)),
            }
            .into());
        }
        // The lease ends no later than Redis's window: `now_ms` was read
        // before the call.
        share.set_lease(now_ms.saturating_add(ttl_ms), granted - 1);
        Ok(())
    }

    /// Takes concurrency slots from the cluster and uses one.
    async fn take_slot(
        &self,
        id: CounterId,
        counter: &Arc<KeyCounter>,
        max: u32,
    ) -> Result<crate::state::InFlightGuard, Shortfall> {
        let share = counter.shared();
        let _one_call = share.calls.lock().await;
        if let Some(slot) = SharedShare::enter_held(counter) {
            return Ok(slot);
        }
        let key = scripts::slots_key(&id.to_string());
        let instance = self.instance.clone();
        let granted: u32 = self
            .link
            .call(move |mut c| async move {
                scripts::TAKE_SLOTS
                    .key(key)
                    .arg(instance)
                    .arg(max)
                    .arg(MOST_SLOTS)
                    .arg(scripts::alive_key(""))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if granted == 0 {
            return Err(Refusal::TooManyConcurrent.into());
        }
        lock(&self.holding).insert(id, Arc::clone(counter));
        Ok(SharedShare::hold_and_enter(counter, granted))
    }

    /// Reads the key's token total from Redis (the first request of the
    /// key on this instance, or after pub/sub was lost) and remembers the
    /// key for the sync task.
    async fn hear_tokens(
        &self,
        id: CounterId,
        counter: &Arc<KeyCounter>,
        budget: TokenRate,
        now_ms: u64,
    ) -> Result<(u64, u64), Shortfall> {
        let share = counter.shared();
        let _one_call = share.calls.lock().await;
        if let Some(heard) = share.tokens(now_ms) {
            return Ok(heard);
        }
        let key = scripts::tokens_key(&id.to_string(), budget.period.as_secs());
        let (used, ttl_ms): (u64, i64) =
            self.link
                .call(move |mut c| async move {
                    scripts::READ_TOKENS.key(key).invoke_async(&mut c).await
                })
                .await?;
        let ends_ms = match u64::try_from(ttl_ms) {
            Ok(ttl) => now_ms.saturating_add(ttl),
            // No window yet: nothing used; one opens with the first tokens.
            Err(_) => now_ms.saturating_add(1),
        };
        share.hear_tokens(used, ends_ms.max(now_ms.saturating_add(1)));
        lock(&self.metered).insert(id, (Arc::clone(counter), budget));
        Ok(share.tokens(now_ms).unwrap_or((used, ends_ms)))
    }

    /// Counts a failed key check from `ip` across the cluster; the
    /// instance whose failure reaches the limit blocks the address on
    /// every instance (over pub/sub). Does not wait.
    pub fn key_failed(self: &Arc<Self>, ip: IpAddr, throttle: &ThrottleSpec) {
        if !self.link.is_up() {
            return;
        }
        let this = Arc::clone(self);
        let max = throttle.max_failures.get();
        let window_ms = u64::try_from(throttle.window.as_millis()).unwrap_or(u64::MAX);
        let block_ms = u64::try_from(throttle.cooldown.as_millis()).unwrap_or(u64::MAX);
        let cooldown_s = throttle.cooldown.as_secs();
        self.link.spawn(async move {
            let addr = ip.to_string();
            let key = scripts::failures_key(&addr);
            let blocked: Result<u32, _> = this
                .link
                .background(move |mut c| async move {
                    scripts::KEY_FAILED
                        .key(key)
                        .arg(max)
                        .arg(window_ms)
                        .arg(block_ms)
                        .arg(addr)
                        .invoke_async(&mut c)
                        .await
                })
                .await;
            if blocked == Ok(1) {
                warn!(
                    "client {ip} throttled on every instance: blocked for {cooldown_s}s after {max} failed key checks across the cluster"
                );
            }
        });
    }

    /// Publishes revoked key ids to every instance, and records them so
    /// instances started later refuse them too. Does not wait.
    pub fn publish_revoked(self: &Arc<Self>, ids: Vec<KeyId>) {
        if ids.is_empty() {
            return;
        }
        self.hear_revoked(ids.iter().copied());
        let this = Arc::clone(self);
        self.link.spawn(async move {
            if let Err(e) = sync::publish_revoked(&this.link, &ids).await {
                warn!(
                    "shared state: revocation of {} key(s) not published ({e:?}); instances with the old key file still accept them",
                    ids.len()
                );
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Publishes key revocations through the Redis `spec` names, for `keys
/// revoke --shared`: adds the ids to the revoked set (so instances started
/// later refuse them too) and tells every running instance.
pub fn publish_revocations(spec: &SharedStateSpec, ids: &[KeyId]) -> Result<(), String> {
    let client = link::client(spec).map_err(|e| format!("shared_state.redis: {:?}", e.kind()))?;
    let timeout = spec.timeout.max(std::time::Duration::from_secs(2));
    let mut conn = client
        .get_connection_with_timeout(timeout)
        .map_err(|e| format!("cannot reach redis {}: {e}", spec.redis.redacted()))?;
    scripts::revocations(ids)
        .query::<()>(&mut conn)
        .map_err(|e| format!("redis {}: {e}", spec.redis.redacted()))
}
