//! The cluster's background work, on its own runtime: keeping this
//! instance alive in Redis, returning concurrency slots it no longer uses,
//! sending the tokens it counted, probing Redis while it is down, and
//! listening on the events channel (revocations, token totals, blocked
//! addresses).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use log::{debug, info};

use super::link::{Link, Unavailable};
use super::scripts::{self, EVENTS, REVOKED};
use super::{lock, Cluster};
use crate::config::TokenRate;
use crate::keys::{unix_millis, KeyId};
use crate::state::{CounterId, Crossing, KeyCounter};

/// How often unused slots go back and counted tokens go out.
pub const SYNC_EVERY: Duration = Duration::from_millis(100);
/// Every this many syncs, the liveness key and every held slot count are
/// written again (which also restores them after Redis restarted empty).
const REFRESH_EVERY: u64 = 10;
/// The wait before the pub/sub connection is made again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(250);

/// Runs until the process ends.
pub(super) async fn run(cluster: Arc<Cluster>) {
    tokio::spawn(listen(Arc::clone(&cluster)));
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n = n.wrapping_add(1);
        if !cluster.link.is_up() {
            // Probing every other tick: a recovered Redis is back in use
            // within about 200 ms.
            if n.is_multiple_of(2) && cluster.link.probe().await {
                refresh(&cluster).await;
            }
            continue;
        }
        if n.is_multiple_of(REFRESH_EVERY) {
            refresh(&cluster).await;
        } else {
            return_slots(&cluster, false).await;
        }
        send_tokens(&cluster).await;
    }
}

/// Writes this instance's liveness and every slot count it holds.
pub(super) async fn refresh(cluster: &Cluster) {
    let alive = scripts::alive_key(&cluster.instance);
    let wrote = cluster
        .link
        .background(move |mut c| async move {
            redis::cmd("SET")
                .arg(alive)
                .arg(1)
                .arg("PX")
                .arg(scripts::ALIVE_MS)
                .query_async::<()>(&mut c)
                .await
        })
        .await;
    if wrote.is_ok() {
        return_slots(cluster, true).await;
    }
}

/// Gives back the slots each key holds and does not use; with `all`,
/// writes every key's count even when nothing was given back.
async fn return_slots(cluster: &Cluster, all: bool) {
    let holding: Vec<_> = lock(&cluster.holding)
        .iter()
        .map(|(id, c)| (*id, Arc::clone(c)))
        .collect();
    for (id, counter) in holding {
        let Ok(_one_call) = counter.shared().calls.try_lock() else {
            continue;
        };
        let (released, held) = counter.shared().release_unused();
        if released == 0 && !all {
            continue;
        }
        let key = scripts::slots_key(&id.to_string());
        let instance = cluster.instance.clone();
        let wrote = cluster
            .link
            .background(move |mut c| async move {
                if held == 0 {
                    redis::cmd("HDEL")
                        .arg(key)
                        .arg(instance)
                        .query_async::<()>(&mut c)
                        .await
                } else {
                    redis::cmd("HSET")
                        .arg(key)
                        .arg(instance)
                        .arg(held)
                        .query_async::<()>(&mut c)
                        .await
                }
            })
            .await;
        if wrote.is_ok() && held == 0 {
            let mut holding = lock(&cluster.holding);
            if counter.shared().held() == 0 {
                holding.remove(&id);
            }
        }
    }
}

/// Sends the tokens counted since the last sync and hears back the totals.
async fn send_tokens(cluster: &Cluster) {
    let metered: Vec<_> = {
        let mut metered = lock(&cluster.metered);
        // A key gone from every snapshot (and no request holding its
        // counter) is forgotten once its tokens are out.
        metered.retain(|_, (c, _)| Arc::strong_count(c) > 1 || c.shared().has_unsent());
        metered
            .iter()
            .map(|(id, (c, budget))| (*id, Arc::clone(c), *budget))
            .collect()
    };
    for (id, counter, budget) in metered {
        let n = counter.shared().take_unsent();
        if n == 0 {
            continue;
        }
        let key = scripts::tokens_key(&id.to_string(), budget.period.as_secs());
        let period_ms = u64::try_from(budget.period.as_millis()).unwrap_or(u64::MAX);
        let name = id.to_string();
        let sent = cluster.now_ms();
        let total: Result<(u64, u64), _> = cluster
            .link
            .background(move |mut c| async move {
                scripts::ADD_TOKENS
                    .key(key)
                    .arg(n)
                    .arg(period_ms)
                    .arg(name)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        match total {
            Ok((used, ttl_ms)) => {
                counter
                    .shared()
                    .hear_tokens(used, sent.saturating_add(ttl_ms));
                alert_crossings(cluster, &counter, budget, n, used, ttl_ms);
            }
            Err(_) => counter.shared().keep_unsent(n),
        }
    }
}

/// Queues the alerts for the thresholds that adding `n` tokens crossed
/// in Redis (now `used`): one `INCRBY` per send, so exactly one instance
/// sees each crossing of a window.
fn alert_crossings(
    cluster: &Cluster,
    counter: &KeyCounter,
    budget: TokenRate,
    n: u64,
    used: u64,
    ttl_ms: u64,
) {
    let Some(target) = counter.shared().alert_target() else {
        return;
    };
    let now = unix_millis(std::time::SystemTime::now());
    let crossing = Crossing {
        key_id: target.key_id,
        user: &target.user,
        end_user: target.end_user.as_deref(),
        limit: budget.count.get(),
        before: used.saturating_sub(n),
        after: used,
        window_end_unix_ms: now.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX)),
    };
    let dropped = cluster
        .carried
        .alerts
        .crossed(&target.alerting(), &crossing);
    cluster.metrics.alerts_dropped(dropped);
}

/// Listens on the events channel, connecting again whenever the
/// connection is lost. Each (re)subscription reads the revoked set and
/// forgets the token totals heard, since messages may have been missed.
async fn listen(cluster: Arc<Cluster>) {
    loop {
        if let Ok(Ok(mut pubsub)) =
            tokio::time::timeout(cluster.link.timeout().max(Duration::from_secs(1)), async {
                cluster.link.client().get_async_pubsub().await
            })
            .await
        {
            if pubsub.subscribe(EVENTS).await.is_ok() {
                let revoked: Result<Vec<String>, _> = cluster
                    .link
                    .background(|mut c| async move {
                        redis::cmd("SMEMBERS")
                            .arg(REVOKED)
                            .query_async(&mut c)
                            .await
                    })
                    .await;
                if let Ok(ids) = revoked {
                    cluster.hear_revoked(ids.iter().filter_map(|id| KeyId::parse_hex(id)));
                }
                for (counter, _) in lock(&cluster.metered).values() {
                    counter.shared().forget_tokens();
                }
                debug!("shared state: listening on {EVENTS}");
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(text) = std::str::from_utf8(msg.get_payload_bytes()) {
                        hear(&cluster, text);
                    }
                }
                debug!("shared state: {EVENTS} connection lost");
            }
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

/// One event from another instance (or this one).
fn hear(cluster: &Cluster, event: &str) {
    let mut words = event.split(' ');
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("r"), Some(id), None, None) => {
            if let Some(id) = KeyId::parse_hex(id) {
                if !cluster.is_revoked(id) {
                    info!("shared state: key {id} revoked on every instance");
                }
                cluster.hear_revoked([id]);
            }
        }
        (Some("t"), Some(id), Some(used), Some(ttl_ms)) => {
            let (Some(id), Ok(used), Ok(ttl_ms)) = (
                CounterId::parse(id),
                used.parse::<u64>(),
                ttl_ms.parse::<u64>(),
            ) else {
                return;
            };
            if let Some((counter, _)) = lock(&cluster.metered).get(&id) {
                counter
                    .shared()
                    .hear_tokens(used, cluster.now_ms().saturating_add(ttl_ms));
            }
        }
        (Some("b"), Some(ip), Some(ms), None) => {
            let (Ok(ip), Ok(ms)) = (ip.parse::<IpAddr>(), ms.parse::<u64>()) else {
                return;
            };
            let now_s = unix_millis(std::time::SystemTime::now()) / 1000;
            let now_s = u32::try_from(now_s).unwrap_or(u32::MAX);
            let secs = u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX);
            cluster.carried.failed_keys.block_for(ip, now_s, secs);
        }
        _ => debug!("shared state: ignored an event of an unknown form"),
    }
}

/// Adds revoked ids to the set and announces each.
pub(super) async fn publish_revoked(link: &Link, ids: &[KeyId]) -> Result<(), Unavailable> {
    let pipe = scripts::revocations(ids);
    link.background(move |mut c| async move { pipe.query_async::<()>(&mut c).await })
        .await
}
