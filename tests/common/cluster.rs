//! A cluster of gateway instances sharing per-key limits through one Redis
//! (`shared_state`), for the `cluster_*` tests: three real `ai-gateway`
//! processes on loopback, each with its own port and admin port, all
//! pointed at the same key file and the same real `redis-server` (see
//! [`super::redis`]), with helpers to drive them round-robin and read
//! their shared-state metrics.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tempfile::TempDir;

use super::config::{GatewayConfig, KeyFile, Route, SharedState};
use super::gateway::Gateway;
use super::metrics::{metrics_text, sample};
use super::raw_client::{assert_refusal, get_keyed, retry_after, send};
use super::raw_http::RawResponse;
use super::redis::RedisServer;
use super::util::wait_until;

/// Three gateways, a Redis and the upstreams per test on a small machine:
/// the tests that measure propagation ("within 1 s") must not run beside
/// another cluster test. Each test holds this while its cluster runs.
pub static ONE_CLUSTER: Mutex<()> = Mutex::new(());

pub fn one_cluster() -> MutexGuard<'static, ()> {
    ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long an instance may take to see Redis come (back) up or go away:
/// it re-probes about every 250 ms; the rest is slack for a busy machine.
pub const REDIS_STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// The bound the issue sets on propagation: a token total, a revocation.
pub const PROPAGATION: Duration = Duration::from_secs(1);

/// The `shared_state` of an instance using `redis`, falling back to `mode`
/// (`local` or `deny`) when it is unreachable.
pub fn shared_state(redis: &RedisServer, mode: &str) -> SharedState {
    SharedState::new(&redis.url()).on_redis_error(mode)
}

/// An instance's own settings: [`shared_state`] only.
pub fn shared(redis: &RedisServer, mode: &str) -> GatewayConfig {
    GatewayConfig::new().shared_state(shared_state(redis, mode))
}

/// One gateway instance of a cluster.
pub struct Node {
    /// `A`, `B` or `C`, for messages.
    pub name: &'static str,
    pub gw: Gateway,
    /// Its admin listener (`/metrics`, `/readyz`).
    pub admin: SocketAddr,
}

impl Node {
    pub fn addr(&self) -> SocketAddr {
        self.gw.addr()
    }
}

/// Gateway instances sharing one key file (and, through their
/// `shared_state`, one Redis).
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// The one key file every instance reads (outside their own dirs).
    pub keys_path: PathBuf,
    _keys_dir: TempDir,
}

const NAMES: [&str; 3] = ["A", "B", "C"];

/// The config of an instance: `top` (its own settings, e.g. [`shared`]),
/// the shared key file, one thread, no file watching (a key file change
/// must not be how a revocation arrives), an admin listener and `route`.
fn instance_config(keys_file: &Path, top: &GatewayConfig, route: &Route) -> GatewayConfig {
    top.clone()
        .keys_file(keys_file)
        .threads(1)
        .watch(false)
        .with_admin()
        .route(route.clone())
}

impl Cluster {
    /// Writes `keys` once and starts one instance per entry of `tops` (the
    /// top-level settings of each, e.g. [`shared`] or nothing), all with
    /// `route`. Waits until each answers HTTP and, for those with
    /// `shared_state`, until `agw_shared_state_up` is 1.
    pub fn start(tops: &[GatewayConfig], route: &Route, keys: &KeyFile) -> Cluster {
        let keys_dir = tempfile::Builder::new()
            .prefix("ai-gateway-cluster-keys-")
            .tempdir()
            .expect("create the shared key dir");
        let keys_path = keys_dir.path().join("keys.json");
        fs::write(&keys_path, keys.render()).expect("write the shared key file");
        fs::set_permissions(&keys_path, fs::Permissions::from_mode(0o600))
            .expect("chmod 600 the shared key file");
        let nodes = tops
            .iter()
            .zip(NAMES)
            .map(|(top, name)| start_node(name, &keys_path, top, route))
            .collect::<Vec<_>>();
        for (node, top) in nodes.iter().zip(tops) {
            if top.has("shared_state") {
                let up = wait_until(REDIS_STATE_TIMEOUT, || {
                    sample(&metrics_text(node.admin), "agw_shared_state_up") == Some(1.0)
                });
                assert!(
                    up,
                    "instance {}: agw_shared_state_up is not 1 after {REDIS_STATE_TIMEOUT:?} with Redis up; metrics:\n{}\nlog:\n{}",
                    node.name,
                    shared_metrics(node.admin),
                    node.gw.log()
                );
            }
        }
        Cluster {
            nodes,
            keys_path,
            _keys_dir: keys_dir,
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Asserts that no instance logged any of `secrets` (keys).
    pub fn assert_logs_never_show(&self, secrets: &[&str]) {
        for node in &self.nodes {
            let log = node.gw.log();
            for secret in secrets {
                assert!(
                    !log.contains(secret),
                    "instance {}'s log shows the key {secret:?}:\n{log}",
                    node.name
                );
            }
        }
    }
}

/// Starts one instance (see [`instance_config`]). Its own dir holds its
/// config and log (and an unused empty `keys.json`: the config names the
/// shared key file).
pub fn start_node(
    name: &'static str,
    keys_file: &Path,
    top: &GatewayConfig,
    route: &Route,
) -> Node {
    let gw = Gateway::start(&instance_config(keys_file, top, route), KeyFile::new());
    let admin = gw.admin();
    Node { name, gw, admin }
}

/// The `agw_shared_state_*` and `agw_refused_total` lines, for messages.
pub fn shared_metrics(admin: SocketAddr) -> String {
    metrics_text(admin)
        .lines()
        .filter(|l| l.starts_with("agw_shared_state") || l.starts_with("agw_refused_total"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub const UP: &str = "agw_shared_state_up";

pub const ERRORS: &str = "agw_shared_state_errors_total";

pub const FALLBACK_LOCAL: &str = "agw_shared_state_fallback_total{mode=\"local\"}";

pub const FALLBACK_DENY: &str = "agw_shared_state_fallback_total{mode=\"deny\"}";

pub const REFUSED_UNAVAILABLE: &str = "agw_refused_total{reason=\"shared_state_unavailable\"}";

/// Every key in `redis` with its type, value and time to live, for
/// failure messages.
pub fn redis_dump(redis: &RedisServer) -> String {
    let mut out = String::new();
    for k in redis.keys() {
        let kind = redis.command(&["TYPE", &k]);
        let value = match kind.trim_end() {
            "+string" => redis.command(&["GET", &k]),
            "+hash" => redis.command(&["HGETALL", &k]),
            "+set" => redis.command(&["SMEMBERS", &k]),
            other => other.to_string(),
        };
        let ttl = redis.command(&["PTTL", &k]);
        out.push_str(&format!(
            "  {k} ({}, pttl {}): {}\n",
            kind.trim(),
            ttl.trim(),
            value.trim().replace("\r\n", " ")
        ));
    }
    out
}

/// `; Redis then held:` and [`redis_dump`], to add to a failure message.
pub fn redis_held(redis: &RedisServer) -> String {
    format!("; Redis then held:\n{}", redis_dump(redis))
}

/// `GET /readyz` on an admin listener.
pub fn readyz(admin: SocketAddr) -> RawResponse {
    send(admin, "GET", "/readyz", &[], b"")
}

/// Sends `n` requests with `key`, request `i` to instance `i % 3`; every
/// answer must be a 200 or the rate-limit 429. Returns the number admitted
/// per instance.
pub fn round_robin(cluster: &Cluster, key: &str, n: usize, what: &str) -> Vec<usize> {
    let mut admitted = vec![0; cluster.nodes.len()];
    for i in 0..n {
        let k = i % cluster.nodes.len();
        let node = cluster.node(k);
        let r = get_keyed(node.addr(), "/chat/x", key, &[]);
        if r.status == 200 {
            admitted[k] += 1;
        } else {
            let what = format!("{what}: request {} (on {})", i + 1, node.name);
            assert_refusal(&r, 429, "rate limit exceeded", &what);
            let wait = retry_after(&r);
            assert!(
                wait <= 60,
                "{what}: Retry-After {wait} for a per-minute limit"
            );
        }
    }
    admitted
}

/// Asserts the number of requests the cluster admitted for a limit of `n`
/// per window: never more than `n`, and at most 3 per instance short of it
/// (quota leased in batches and left unused).
pub fn assert_cluster_limit(admitted: &[usize], n: usize, what: &str) {
    let total: usize = admitted.iter().sum();
    let floor = n - 3 * admitted.len();
    assert!(
        total <= n,
        "{what}: {total} admitted for a limit of {n} across the cluster (per instance {admitted:?}): the limit was overshot"
    );
    assert!(
        total >= floor,
        "{what}: only {total} admitted for a limit of {n} (per instance {admitted:?}); at least {floor} expected"
    );
}
