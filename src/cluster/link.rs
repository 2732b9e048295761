//! The connection to Redis.
//!
//! One multiplexed connection, kept (and re-made after a failure) by
//! redis-rs's `ConnectionManager`, driven by a runtime of the cluster's own:
//! a request on any proxy thread hands its call to that runtime and waits
//! for the answer at most `shared_state.timeout`. A failed call marks Redis
//! down, and while it is down requests do not call it at all (they fall
//! back at once); the sync task probes it and marks it up again.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use log::{info, warn};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, RedisResult};
use tokio::runtime::Handle;

use crate::config::{OnRedisError, SharedStateSpec};
use crate::ops::Metrics;

/// At most one "still unreachable" line per this many seconds.
const LOG_EVERY_S: u64 = 10;

/// Why a call gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Redis is known to be down: not called.
    Down,
    /// The call failed or timed out (and Redis is now marked down if the
    /// connection was at fault).
    Failed,
}

/// The Redis connection, its health and its error reporting.
pub struct Link {
    runtime: Handle,
    conn: ConnectionManager,
    client: redis::Client,
    timeout: Duration,
    up: AtomicBool,
    metrics: Arc<Metrics>,
    /// Unix seconds of the last line logged about failures.
    last_logged: AtomicU64,
    /// Failures since that line.
    unlogged: AtomicU64,
    /// The URL without credentials, for log lines.
    place: String,
    mode: OnRedisError,
}

impl Link {
    /// A link whose connection is made on first use, so a gateway starts
    /// (and falls back as configured) while Redis is down. `runtime` runs
    /// the connection's tasks.
    pub fn new(
        spec: &SharedStateSpec,
        metrics: Arc<Metrics>,
        runtime: Handle,
    ) -> RedisResult<Link> {
        let client = client(spec)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(spec.timeout))
            .set_connection_timeout(Some(spec.timeout.max(Duration::from_millis(250))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(250));
        let conn = {
            let _on = runtime.enter();
            ConnectionManager::new_lazy_with_config(client.clone(), config)?
        };
        metrics.shared_state_up.set(0);
        Ok(Link {
            runtime,
            conn,
            client,
            timeout: spec.timeout,
            up: AtomicBool::new(false),
            metrics,
            last_logged: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
            place: spec.redis.redacted(),
            mode: spec.on_error,
        })
    }

    /// Whether the last call or probe got an answer.
    #[inline]
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The Redis client, for the pub/sub connection.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `call` on the cluster's runtime with a clone of the connection,
    /// from a request: not at all while Redis is down, and for at most the
    /// timeout (then the call is abandoned).
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        if !self.is_up() {
            return Err(Unavailable::Down);
        }
        let task = self.runtime.spawn(call(self.conn.clone()));
        let abandon = task.abort_handle();
        let answer = self
            .bounded(async move {
                task.await.unwrap_or_else(|_| {
                    Err(RedisError::from((ErrorKind::Io, "the call's task ended")))
                })
            })
            .await;
        if answer.is_err() {
            abandon.abort();
        }
        answer
    }

    /// Runs `call` from the cluster's own tasks: whether Redis is marked up
    /// or not, for at most the timeout.
    pub async fn background<T, F, Fut>(&self, call: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.bounded(call(self.conn.clone())).await
    }

    /// Awaits `answer` for at most the timeout; a failure is counted,
    /// logged, and (a connection's) marks Redis down.
    async fn bounded<T>(
        &self,
        answer: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.failed(&e);
                Err(Unavailable::Failed)
            }
            Err(_) => {
                self.failed_because(&format!("no answer within {:?}", self.timeout), true);
                Err(Unavailable::Failed)
            }
        }
    }

    /// Runs `task` on the cluster's runtime, without waiting for it.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(task);
    }

    /// Asks Redis for a `PONG`; marks it up when it answers.
    pub async fn probe(&self) -> bool {
        let answered = self
            .background(
                |mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await },
            )
            .await
            .is_ok();
        if answered {
            self.mark_up();
        }
        answered
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            self.metrics.shared_state_up.set(1);
            info!(
                "shared state: redis {} answers; limits are counted across instances",
                self.place
            );
        }
    }

    fn failed(&self, e: &RedisError) {
        let connection = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error();
        self.failed_because(&describe(e), connection);
    }

    /// Counts a failure; a connection failure marks Redis down. Logs the
    /// first failure after an answer at once, then at most one line per
    /// [`LOG_EVERY_S`].
    fn failed_because(&self, why: &str, connection: bool) {
        self.metrics.shared_state_errors.inc();
        let was_up = connection && self.up.swap(false, Ordering::Relaxed);
        if was_up {
            self.metrics.shared_state_up.set(0);
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_logged.load(Ordering::Relaxed);
        if !was_up && now.saturating_sub(last) < LOG_EVERY_S {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self
            .last_logged
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let before = self.unlogged.swap(0, Ordering::Relaxed);
        let then = match self.mode {
            OnRedisError::Local => "limits are counted on this instance alone",
            OnRedisError::Deny => "requests of keys with limits are refused (503)",
        };
        if before > 0 {
            warn!(
                "shared state: redis {} failing ({why}; {before} more failed calls since the last line): {then} until it answers",
                self.place
            );
        } else {
            warn!(
                "shared state: redis {} failing ({why}): {then} until it answers",
                self.place
            );
        }
    }
}

/// A Redis client for `spec` (not connected): verifying a `rediss://`
/// server against `ca` when it is set, else against the system's roots.
pub fn client(spec: &SharedStateSpec) -> RedisResult<redis::Client> {
    match &spec.ca {
        None => redis::Client::open(spec.redis.secret()),
        Some(ca) => redis::Client::build_with_tls(
            spec.redis.secret(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.pem.clone()),
            },
        ),
    }
}

/// A Redis error in words, without anything a URL could put in it.
fn describe(e: &RedisError) -> String {
    if e.is_connection_refusal() {
        "connection refused".to_string()
    } else if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connection_dropped() {
        "connection dropped".to_string()
    } else if e.is_io_error() {
        "I/O error".to_string()
    } else {
        format!("{:?}", e.kind())
    }
}
