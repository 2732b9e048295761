//! Routes: longest-prefix matching from a table built once at load, and each
//! route's upstream peers, built once with their timeouts.
//!
//! Prefixes are grouped by length. A lookup walks the distinct lengths from
//! longest to shortest and makes one hash lookup of the path's first `len`
//! bytes per length, so its cost depends on how many different prefix
//! lengths there are, not on how many routes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use pingora::upstreams::peer::HttpPeer;

use crate::config::{
    ApiKind, Balance, CorsSpec, HealthCheckSpec, IpRange, Limits, ModelAlias, ModelPattern,
    QueueSpec, RetrySpec, RouteSpec, UpstreamCa, UpstreamSpec,
};
use crate::keys::{ServiceId, ServiceTable};
use crate::state::{Lease, Member, UpstreamBook, UpstreamState, WaitQueue};

/// How long an idle upstream connection stays in the pool. Short enough to
/// stay below the idle timeouts that model servers' HTTP stacks use, so a
/// pooled connection is not closed under us as we reuse it.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub prefix: String,
    /// `None` allows every method.
    methods: Option<Box<[Method]>>,
    /// The `Allow` header for 405 answers, built once.
    allow: Option<HeaderValue>,
    pub service: ServiceId,
    pub service_name: String,
    /// What `upstream_target` removes from the front of the path.
    strip: Option<String>,
    /// Every upstream of the route, each address once.
    upstreams: Box<[Upstream]>,
    /// Groups of upstreams, by index into `upstreams`: the first is the
    /// route's `upstreams`, the others those of its `models` entries.
    pools: Box<[Pool]>,
    /// `models` entries: a pattern and its pool, in the order written.
    model_pools: Box<[(ModelPattern, usize)]>,
    health_check: Option<HealthCheckSpec>,
    /// Whether websocket upgrades may pass (`websocket: true`).
    pub websocket: bool,
    /// Whether paths with `;` parameters may pass (`allow_path_params`).
    pub allow_path_params: bool,
    /// The route's own limits (a key's own win; global ones fill the rest).
    pub limits: Limits,
    /// Client addresses allowed; `None` allows every address.
    pub allowed_clients: Option<Box<[IpRange]>>,
    pub cors: Option<Cors>,
    /// The API the upstreams speak; `None` for a plain proxy.
    pub api: Option<ApiKind>,
    /// Add `stream_options.include_usage` to streaming OpenAI requests.
    pub include_usage: bool,
    pub balance: Balance,
    /// How long a request may wait in a pool's queue (see [`Pool`]).
    pub queue: Option<QueueSpec>,
    pub retry: RetrySpec,
    /// Model names clients may ask for, and the model serving each
    /// (shared with the model lists that show them).
    pub aliases: Arc<[ModelAlias]>,
}

/// A group of a route's upstreams (by index into the route's `upstreams`).
#[derive(Debug)]
struct Pool {
    members: Box<[usize]>,
    /// `members`, each `weight` times, spread evenly: the round-robin order.
    rotation: Box<[usize]>,
    next: AtomicUsize,
    /// Requests waiting for a member below its cap (with `queue`).
    queue: Option<Arc<WaitQueue>>,
}

/// What [`Route::take_upstream`] found.
#[derive(Debug)]
pub enum Pick {
    /// A slot on an upstream.
    Got(Lease),
    /// Upstreams in rotation exist, and every one is at its
    /// `max_in_flight`.
    Full,
    /// No upstream to try (all left out by `avoid`).
    Nothing,
}

/// The default pool of a route: its `upstreams`.
pub const DEFAULT_POOL: usize = 0;

/// A route's CORS answers, built once.
#[derive(Debug)]
pub struct Cors {
    /// `*` was listed: every origin is allowed (and echoed back).
    any: bool,
    origins: Box<[Box<[u8]>]>,
    pub allow_methods: HeaderValue,
    pub allow_headers: HeaderValue,
    pub max_age: HeaderValue,
}

/// `Access-Control-Allow-Methods` of a route that allows every method.
const ALL_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";

impl Cors {
    fn build(spec: &CorsSpec, methods: Option<&[Method]>) -> Option<Cors> {
        let allow_methods = match methods {
            Some(ms) => method_list(ms)?,
            None => HeaderValue::from_static(ALL_METHODS),
        };
        Some(Cors {
            any: spec.origins.iter().any(|o| o == "*"),
            origins: spec.origins.iter().map(|o| o.as_bytes().into()).collect(),
            allow_methods,
            allow_headers: HeaderValue::from_str(&spec.headers.join(", ")).ok()?,
            max_age: HeaderValue::from(spec.max_age.as_secs()),
        })
    }

    /// Whether a page from `origin` may call the route.
    #[inline]
    pub fn allows(&self, origin: &[u8]) -> bool {
        self.any || self.origins.iter().any(|o| **o == *origin)
    }
}

/// One upstream of a route: its peer, built once with the route's
/// timeouts, and its health and load (which outlive the snapshot: see
/// `state`).
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// How it was written (`https://name:port` or `host:port`), for logs.
    pub spec: UpstreamSpec,
    pub peer: HttpPeer,
    pub state: Arc<UpstreamState>,
}

impl Upstream {
    /// Whether it is below its `max_in_flight`.
    #[inline]
    fn has_room(&self) -> bool {
        self.spec
            .max_in_flight
            .is_none_or(|cap| self.state.load.in_flight() < cap.get())
    }

    fn cap(&self) -> Option<NonZeroU32> {
        self.spec.max_in_flight
    }
}

/// `POST, GET`: an `Allow` or `Access-Control-Allow-Methods` value. Method
/// tokens are always valid header text.
fn method_list(methods: &[Method]) -> Option<HeaderValue> {
    let names: Vec<&str> = methods.iter().map(Method::as_str).collect();
    HeaderValue::from_str(&names.join(", ")).ok()
}

/// The indexes of `ups` in `upstreams`, adding those not there yet
/// (each address once per route).
fn members_of(
    ups: &[UpstreamSpec],
    upstreams: &mut Vec<Upstream>,
    make: &dyn Fn(&UpstreamSpec) -> Upstream,
) -> Vec<usize> {
    let mut members: Vec<usize> = Vec::new();
    for up in ups {
        let i = match upstreams.iter().position(|u| u.addr == up.addr) {
            Some(i) => i,
            None => {
                upstreams.push(make(up));
                upstreams.len() - 1
            }
        };
        if !members.contains(&i) {
            members.push(i);
        }
    }
    members
}

fn make_upstream(
    spec: &RouteSpec,
    up: &UpstreamSpec,
    ca: Option<&Arc<pingora::protocols::tls::CaType>>,
    book: &UpstreamBook,
) -> Upstream {
    Upstream {
        addr: up.addr,
        peer: make_peer(up, ca, spec.connect_timeout, spec.read_timeout),
        state: book.entry(up.addr),
        spec: up.clone(),
    }
}

impl Pool {
    /// Where this request's walk over `n` entries starts: the next in
    /// turn (no shared write when there is only one).
    #[inline]
    fn turn(&self, n: usize) -> usize {
        if n > 1 {
            self.next.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        }
    }

    fn build(members: Vec<usize>, upstreams: &[Upstream], queue: Option<QueueSpec>) -> Pool {
        let weights: Vec<u32> = members
            .iter()
            .map(|i| upstreams.get(*i).map_or(1, |u| u.spec.weight.get()))
            .collect();
        let queue = queue.map(|q| {
            let waiters = members
                .iter()
                .filter_map(|i| {
                    let up = upstreams.get(*i)?;
                    Some(Member {
                        state: Arc::clone(&up.state),
                        cap: up.cap(),
                        tag: *i,
                    })
                })
                .collect();
            WaitQueue::new(q.max, waiters)
        });
        Pool {
            rotation: rotation(&members, &weights),
            members: members.into_boxed_slice(),
            next: AtomicUsize::new(0),
            queue,
        }
    }
}

/// `members`, each as many times as its weight, spread evenly (the smooth
/// weighted round-robin order: weights 5, 1, 1 give a a b a c a a).
fn rotation(members: &[usize], weights: &[u32]) -> Box<[usize]> {
    if weights.iter().all(|w| *w == 1) {
        return members.into();
    }
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    let mut current = vec![0i64; members.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(weights) {
            *c += i64::from(*w);
        }
        let Some((j, _)) = current
            .iter()
            .enumerate()
            .max_by_key(|(j, c)| (**c, std::cmp::Reverse(*j)))
        else {
            break;
        };
        if let (Some(c), Some(m)) = (current.get_mut(j), members.get(j)) {
            *c -= total;
            out.push(*m);
        }
    }
    out.into_boxed_slice()
}

impl Route {
    fn build(spec: &RouteSpec, services: &mut ServiceTable, book: &UpstreamBook) -> Route {
        let methods: Option<Box<[Method]>> = spec.methods.as_deref().map(Box::from);
        let allow = spec.methods.as_deref().and_then(method_list);
        let ca = spec.upstream_ca.as_ref().and_then(ca_list);
        let mut upstreams: Vec<Upstream> = Vec::new();
        let mut member_lists = vec![members_of(&spec.upstreams, &mut upstreams, &|up| {
            make_upstream(spec, up, ca.as_ref(), book)
        })];
        let mut model_pools = Vec::with_capacity(spec.model_upstreams.len());
        for (pattern, addrs) in &spec.model_upstreams {
            member_lists.push(members_of(addrs, &mut upstreams, &|up| {
                make_upstream(spec, up, ca.as_ref(), book)
            }));
            model_pools.push((pattern.clone(), member_lists.len() - 1));
        }
        let pools = member_lists
            .into_iter()
            .map(|members| Pool::build(members, &upstreams, spec.queue))
            .collect();
        Route {
            name: spec.name.clone(),
            prefix: spec.path_prefix.clone(),
            methods,
            allow,
            service: services.intern(&spec.service),
            service_name: spec.service.clone(),
            strip: spec.strip_prefix.clone(),
            upstreams: upstreams.into_boxed_slice(),
            pools,
            model_pools: model_pools.into_boxed_slice(),
            health_check: spec.health_check.clone(),
            websocket: spec.websocket,
            allow_path_params: spec.allow_path_params,
            limits: spec.limits,
            allowed_clients: spec.allow.as_deref().map(Box::from),
            cors: spec
                .cors
                .as_ref()
                .and_then(|c| Cors::build(c, spec.methods.as_deref())),
            api: spec.api,
            include_usage: spec.include_usage,
            balance: spec.balance,
            queue: spec.queue,
            retry: spec.retry.clone(),
            aliases: spec.aliases.iter().cloned().collect(),
        }
    }

    /// The pool that serves `model`: that of the first `models` pattern
    /// that matches it, else the route's `upstreams`.
    pub fn pool_for(&self, model: Option<&str>) -> usize {
        model
            .and_then(|m| self.model_pools.iter().find(|(p, _)| p.matches(m)))
            .map_or(DEFAULT_POOL, |(_, pool)| *pool)
    }

    /// Whether the route sends some models to upstreams of their own.
    pub fn routes_by_model(&self) -> bool {
        !self.model_pools.is_empty()
    }

    /// The model names (without `*`) the route's `models` map names.
    pub fn named_models(&self) -> impl Iterator<Item = &ModelPattern> + '_ {
        self.model_pools
            .iter()
            .map(|(p, _)| p)
            .filter(|p| p.is_exact())
    }

    /// How many upstreams a pool has.
    pub fn pool_len(&self, pool: usize) -> usize {
        self.pools.get(pool).map_or(0, |p| p.members.len())
    }

    /// The request's origin, if the route has CORS and allows it.
    #[inline]
    pub fn cors_origin<'o>(&self, origin: Option<&'o HeaderValue>) -> Option<&'o HeaderValue> {
        let cors = self.cors.as_ref()?;
        origin.filter(|o| cors.allows(o.as_bytes()))
    }

    #[inline]
    pub fn allows_method(&self, method: &Method) -> bool {
        self.methods.as_ref().is_none_or(|ms| ms.contains(method))
    }

    /// The value of the `Allow` header for a 405 from this route.
    pub fn allow_header(&self) -> Option<&HeaderValue> {
        self.allow.as_ref()
    }

    /// Takes a slot on the next upstream of `pool` by the route's
    /// `balance`: one in rotation, not in `avoid` (upstreams this request
    /// failed on), below its cap. When no upstream is in rotation, one out
    /// of it is tried anyway (it may be back); when some are in rotation
    /// but all are full, the answer is [`Pick::Full`]: the request waits
    /// or is refused, and does not go to one that is down.
    pub fn take_upstream(&self, pool: usize, now_ms: i64, avoid: &[SocketAddr]) -> Pick {
        let Some(pool) = self.pools.get(pool) else {
            return Pick::Nothing;
        };
        for healthy_only in [true, false] {
            let mut eligible = false;
            // Another request may take the slot between the look and the
            // take: look again, a few times.
            for _ in 0..3 {
                let (found, any) = match self.balance {
                    Balance::RoundRobin => self.in_turn(pool, now_ms, avoid, healthy_only),
                    Balance::LeastBusy => self.least_busy(pool, now_ms, avoid, healthy_only),
                };
                eligible |= any;
                let Some(i) = found else { break };
                if let Some(up) = self.upstreams.get(i) {
                    if let Some(lease) = Lease::take(&up.state, up.cap(), i) {
                        return Pick::Got(lease);
                    }
                }
            }
            if eligible {
                return Pick::Full;
            }
        }
        Pick::Nothing
    }

    /// Whether `up` may be tried now.
    #[inline]
    fn eligible(up: &Upstream, now_ms: i64, avoid: &[SocketAddr], healthy_only: bool) -> bool {
        !avoid.contains(&up.addr) && (!healthy_only || up.state.health.is_up(now_ms))
    }

    /// The next eligible upstream with room in the pool's weighted
    /// rotation, and whether any was eligible.
    fn in_turn(
        &self,
        pool: &Pool,
        now_ms: i64,
        avoid: &[SocketAddr],
        healthy_only: bool,
    ) -> (Option<usize>, bool) {
        let n = pool.rotation.len();
        let start = pool.turn(n);
        let mut any = false;
        for k in 0..n {
            let Some(&i) = pool.rotation.get(start.wrapping_add(k) % n) else {
                continue;
            };
            let Some(up) = self.upstreams.get(i) else {
                continue;
            };
            if Self::eligible(up, now_ms, avoid, healthy_only) {
                any = true;
                if up.has_room() {
                    return (Some(i), true);
                }
            }
        }
        (None, any)
    }

    /// The eligible upstream with room and the fewest requests in flight
    /// per unit of weight (ties: the first in turn), and whether any was
    /// eligible.
    fn least_busy(
        &self,
        pool: &Pool,
        now_ms: i64,
        avoid: &[SocketAddr],
        healthy_only: bool,
    ) -> (Option<usize>, bool) {
        let n = pool.members.len();
        let start = pool.turn(n);
        let mut any = false;
        let mut best: Option<(usize, u64, u64)> = None;
        for k in 0..n {
            let Some(&i) = pool.members.get(start.wrapping_add(k) % n) else {
                continue;
            };
            let Some(up) = self.upstreams.get(i) else {
                continue;
            };
            if !Self::eligible(up, now_ms, avoid, healthy_only) {
                continue;
            }
            any = true;
            if !up.has_room() {
                continue;
            }
            let load = u64::from(up.state.load.in_flight());
            let weight = u64::from(up.spec.weight.get());
            // load / weight < best_load / best_weight, without division.
            if best.is_none_or(|(_, bl, bw)| load * bw < bl * weight) {
                best = Some((i, load, weight));
            }
        }
        (best.map(|(i, _, _)| i), any)
    }

    /// The queue of `pool`, with how long a request may wait in it.
    pub fn queue(&self, pool: usize) -> Option<(&Arc<WaitQueue>, std::time::Duration)> {
        let spec = self.queue?;
        let queue = self.pools.get(pool)?.queue.as_ref()?;
        Some((queue, spec.timeout))
    }

    /// The upstream a lease is for.
    #[inline]
    pub fn leased(&self, lease: &Lease) -> Option<&Upstream> {
        self.upstreams.get(lease.tag)
    }

    /// The alias `model` is, if it is one.
    pub fn alias(&self, model: &str) -> Option<&ModelAlias> {
        self.aliases.iter().find(|a| a.name.matches(model))
    }

    /// The upstream with this address.
    pub fn upstream(&self, addr: SocketAddr) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.addr == addr)
    }

    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    pub fn health_check(&self) -> Option<&HealthCheckSpec> {
        self.health_check.as_ref()
    }

    /// The path the upstream sees for `path` (which this route matched),
    /// without the leading `/` a stripped path gets: enough to tell which
    /// endpoint a request is for, without building the target.
    pub fn upstream_path<'p>(&self, path: &'p str) -> &'p str {
        let Some(strip) = self.strip.as_deref() else {
            return path;
        };
        let cut = if strip.ends_with('/') {
            strip.len() - 1
        } else {
            strip.len()
        };
        path.get(cut..).unwrap_or("")
    }

    /// The request target to send upstream for `path` (which this route
    /// matched) and `query`, or `None` when it is unchanged.
    ///
    /// With `strip_prefix`, `/chat/api/generate` on prefix `/chat/` goes
    /// upstream as `/api/generate`; the result always starts with `/`.
    pub fn upstream_target(&self, path: &str, query: Option<&str>) -> Option<Vec<u8>> {
        let strip = self.strip.as_deref()?;
        // Keep the stripped part's trailing slash as the new path's leading one.
        let cut = if strip.ends_with('/') {
            strip.len() - 1
        } else {
            strip.len()
        };
        let rest = path.get(cut..).unwrap_or("");
        let mut out = Vec::with_capacity(rest.len() + 2 + query.map_or(0, |q| q.len() + 1));
        if !rest.starts_with('/') {
            out.push(b'/');
        }
        out.extend_from_slice(rest.as_bytes());
        if let Some(q) = query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
        Some(out)
    }
}

/// Pingora's form of a route's `upstream_ca` (built once per load). The
/// certificates were checked to parse when the config was loaded; a list
/// that came out empty anyway is left out (Pingora refuses an empty one).
fn ca_list(ca: &UpstreamCa) -> Option<Arc<pingora::protocols::tls::CaType>> {
    use pingora::utils::tls::{parse_x509, WrappedX509};
    let certs: Vec<WrappedX509> = ca
        .certs
        .iter()
        .filter(|der| x509_parser::parse_x509_certificate(der).is_ok())
        .map(|der| WrappedX509::new(der.clone(), parse_x509))
        .collect();
    (!certs.is_empty()).then(|| Arc::from(certs))
}

/// A peer for one upstream: plain HTTP, or TLS verified against the
/// route's CA (or the system's roots) for the name it was written with.
fn make_peer(
    up: &UpstreamSpec,
    ca: Option<&Arc<pingora::protocols::tls::CaType>>,
    connect: Duration,
    read: Duration,
) -> HttpPeer {
    let mut peer = match &up.tls {
        Some(name) => {
            let mut peer = HttpPeer::new(up.addr, true, name.clone());
            peer.options.verify_cert = true;
            peer.options.verify_hostname = true;
            peer.options.ca = ca.cloned();
            peer
        }
        None => HttpPeer::new(up.addr, false, String::new()),
    };
    peer.options.connection_timeout = Some(connect);
    peer.options.total_connection_timeout = Some(connect);
    peer.options.read_timeout = Some(read);
    peer.options.write_timeout = Some(read);
    peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
    peer
}

/// Prefixes of one length, mapped to their route's index.
type PrefixTable = HashMap<Box<[u8]>, usize>;

/// All routes, and the longest-prefix index over them.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    /// One table per distinct prefix length, longest first.
    by_len: Vec<(usize, PrefixTable)>,
}

impl Router {
    /// Compiles `specs`, numbering their services in `services` and taking
    /// each upstream's health and load from `book`.
    pub fn build(specs: &[RouteSpec], services: &mut ServiceTable, book: &UpstreamBook) -> Router {
        let routes: Vec<Route> = specs
            .iter()
            .map(|s| Route::build(s, services, book))
            .collect();
        let mut groups: HashMap<usize, PrefixTable> = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            groups
                .entry(r.prefix.len())
                .or_default()
                .insert(r.prefix.as_bytes().into(), i);
        }
        let mut by_len: Vec<_> = groups.into_iter().collect();
        by_len.sort_unstable_by_key(|(len, _)| std::cmp::Reverse(*len));
        Router { routes, by_len }
    }

    /// The route with the longest prefix of `path`, with its index.
    #[inline]
    pub fn find(&self, path: &str) -> Option<(usize, &Route)> {
        let bytes = path.as_bytes();
        for (len, table) in &self.by_len {
            let Some(head) = bytes.get(..*len) else {
                continue;
            };
            if let Some(&i) = table.get(head) {
                return self.routes.get(i).map(|r| (i, r));
            }
        }
        None
    }

    pub fn get(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, prefix: &str, strip: bool) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            path_prefix: prefix.into(),
            methods: None,
            service: name.into(),
            strip_prefix: strip.then(|| prefix.to_string()),
            upstreams: vec![
                UpstreamSpec::plain("127.0.0.1:1".parse().unwrap()),
                UpstreamSpec::plain("127.0.0.1:2".parse().unwrap()),
            ],
            upstream_ca: None,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(2),
            health_check: None,
            websocket: false,
            allow_path_params: false,
            limits: Default::default(),
            allow: None,
            cors: None,
            api: None,
            include_usage: false,
            model_upstreams: Vec::new(),
            balance: Balance::RoundRobin,
            queue: None,
            retry: RetrySpec::default(),
            aliases: Vec::new(),
        }
    }

    fn router(specs: &[RouteSpec]) -> Router {
        Router::build(
            specs,
            &mut ServiceTable::default(),
            &UpstreamBook::default(),
        )
    }

    /// The address of a slot taken on `pool` (the slot is given back).
    fn pick(route: &Route, pool: usize, now_ms: i64, avoid: &[SocketAddr]) -> Option<SocketAddr> {
        match route.take_upstream(pool, now_ms, avoid) {
            Pick::Got(lease) => route.leased(&lease).map(|u| u.addr),
            _ => None,
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let r = router(&[
            spec("all", "/ollama/", true),
            spec("gen", "/ollama/api/generate", true),
            spec("root", "/", false),
        ]);
        assert_eq!(r.find("/ollama/api/generate").unwrap().1.name, "gen");
        assert_eq!(r.find("/ollama/api/generatex").unwrap().1.name, "gen");
        assert_eq!(r.find("/ollama/api/pull").unwrap().1.name, "all");
        assert_eq!(r.find("/other").unwrap().1.name, "root");
        assert_eq!(r.find("/").unwrap().1.name, "root");
    }

    #[test]
    fn no_match() {
        let r = router(&[spec("chat", "/chat/", true)]);
        assert!(r.find("/chat").is_none());
        assert!(r.find("/tts/x").is_none());
        assert!(r.find("").is_none());
        // A multi-byte character straddling the prefix length must not panic.
        assert!(r.find("/cha\u{e9}t/").is_none());
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash_and_the_query() {
        let r = router(&[
            spec("chat", "/chat/", true),
            spec("tts", "/tts", true),
            spec("keep", "/keep/", false),
        ]);
        let chat = r.find("/chat/api/generate").unwrap().1;
        assert_eq!(
            chat.upstream_target("/chat/api/generate", None).unwrap(),
            b"/api/generate"
        );
        assert_eq!(
            chat.upstream_target("/chat/", Some("a=1")).unwrap(),
            b"/?a=1"
        );
        let tts = r.find("/tts/speak").unwrap().1;
        assert_eq!(
            tts.upstream_target("/tts/speak", Some("v=2")).unwrap(),
            b"/speak?v=2"
        );
        assert_eq!(tts.upstream_target("/tts", None).unwrap(), b"/");
        assert_eq!(tts.upstream_target("/ttsx", None).unwrap(), b"/x");
        assert_eq!(chat.upstream_path("/chat/api/generate"), "/api/generate");
        assert_eq!(tts.upstream_path("/ttsx"), "x");
        let keep = r.find("/keep/a").unwrap().1;
        assert_eq!(keep.upstream_path("/keep/a"), "/keep/a");
        assert!(keep.upstream_target("/keep/a", None).is_none());
        let mut part = spec("gen", "/ollama/api/generate", false);
        part.strip_prefix = Some("/ollama".into());
        let r = router(&[part]);
        let gen = r.find("/ollama/api/generate").unwrap().1;
        assert_eq!(
            gen.upstream_target("/ollama/api/generate", Some("x=1"))
                .unwrap(),
            b"/api/generate?x=1"
        );
    }

    #[test]
    fn round_robin_cycles_upstreams() {
        let r = router(&[spec("chat", "/chat/", true)]);
        let route = r.get(0).unwrap();
        let a = pick(route, DEFAULT_POOL, 0, &[]).unwrap();
        let b = pick(route, DEFAULT_POOL, 0, &[]).unwrap();
        let c = pick(route, DEFAULT_POOL, 0, &[]).unwrap();
        assert_ne!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn unhealthy_and_excluded_upstreams_are_skipped() {
        let r = router(&[spec("chat", "/chat/", true)]);
        let route = r.get(0).unwrap();
        let first = route.upstreams()[0].addr;
        let second = route.upstreams()[1].addr;
        route
            .upstream(first)
            .unwrap()
            .state
            .health
            .connect_failed(0, false);
        for _ in 0..4 {
            assert_eq!(pick(route, DEFAULT_POOL, 1, &[]), Some(second));
        }
        assert_eq!(pick(route, DEFAULT_POOL, 1, &[second]), Some(first));
        assert!(pick(route, DEFAULT_POOL, 1, &[first, second]).is_none());
        route
            .upstream(second)
            .unwrap()
            .state
            .health
            .connect_failed(0, false);
        // Every upstream out: still something to try.
        assert!(pick(route, DEFAULT_POOL, 1, &[]).is_some());
    }

    #[test]
    fn models_choose_their_pool_and_others_the_default() {
        let mut s = spec("chat", "/v1/", false);
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let up = |p: u16| UpstreamSpec::plain(addr(p));
        s.api = Some(ApiKind::Openai);
        s.model_upstreams = vec![
            (ModelPattern::parse("llama3*").unwrap(), vec![up(11434)]),
            (
                ModelPattern::parse("qwen*").unwrap(),
                vec![up(11435), up(2)],
            ),
            (ModelPattern::parse("qwen2.5").unwrap(), vec![up(9)]),
        ];
        let r = router(&[s]);
        let route = r.get(0).unwrap();
        assert!(route.routes_by_model());
        assert_eq!(route.upstreams().len(), 5, "each address once");
        let pick = |m: Option<&str>| {
            let pool = route.pool_for(m);
            pick(route, pool, 0, &[]).unwrap()
        };
        assert_eq!(pick(Some("llama3.2:latest")), addr(11434));
        assert_eq!(pick(Some("LLAMA3.1")), addr(11434));
        let qwen: Vec<_> = (0..2).map(|_| pick(Some("qwen2.5"))).collect();
        assert!(
            qwen.contains(&addr(11435)) && qwen.contains(&addr(2)),
            "the first match wins, round-robin"
        );
        let default: Vec<_> = (0..2).map(|_| pick(Some("mistral"))).collect();
        assert!(default.contains(&addr(1)) && default.contains(&addr(2)));
        assert!([addr(1), addr(2)].contains(&pick(None)));
        assert_eq!(route.pool_len(route.pool_for(Some("llama3"))), 1);
        let named: Vec<&str> = route.named_models().map(|m| m.as_str()).collect();
        assert_eq!(named, ["qwen2.5"]);
    }

    #[test]
    fn peers_carry_the_route_timeouts() {
        let r = router(&[spec("chat", "/chat/", true)]);
        let p = &r.get(0).unwrap().upstreams()[0].peer;
        assert_eq!(p.options.connection_timeout, Some(Duration::from_secs(1)));
        assert_eq!(p.options.read_timeout, Some(Duration::from_secs(2)));
    }

    fn capped(port: u16, cap: u32, weight: u32) -> UpstreamSpec {
        UpstreamSpec {
            max_in_flight: NonZeroU32::new(cap),
            weight: NonZeroU32::new(weight).unwrap(),
            ..UpstreamSpec::plain(SocketAddr::from(([127, 0, 0, 1], port)))
        }
    }

    #[test]
    fn least_busy_takes_the_emptiest_per_weight_and_caps_hold() {
        let mut s = spec("gpu", "/v1/", false);
        s.balance = Balance::LeastBusy;
        s.upstreams = vec![capped(1, 2, 1), capped(2, 0, 3)];
        let r = router(&[s]);
        let route = r.get(0).unwrap();
        let take = || match route.take_upstream(DEFAULT_POOL, 0, &[]) {
            Pick::Got(l) => l,
            other => panic!("{other:?}"),
        };
        let port = |l: &Lease| route.leased(l).unwrap().addr.port();
        // Both empty: a tie, broken in turn. Then the weight-3 upstream
        // takes three for each one of the other.
        let held: Vec<Lease> = (0..8).map(|_| take()).collect();
        let on_first = held.iter().filter(|l| port(l) == 1).count();
        assert_eq!(on_first, 2, "the first is at its cap of 2");
        assert_eq!(route.upstreams()[1].state.load.in_flight(), 6);
        drop(held);
        assert_eq!(route.upstreams()[0].state.load.in_flight(), 0);
    }

    #[test]
    fn full_upstreams_are_full_not_nothing() {
        let mut s = spec("gpu", "/v1/", false);
        s.upstreams = vec![capped(1, 1, 1), capped(2, 1, 1)];
        let r = router(&[s]);
        let route = r.get(0).unwrap();
        let a = route.take_upstream(DEFAULT_POOL, 0, &[]);
        let b = route.take_upstream(DEFAULT_POOL, 0, &[]);
        assert!(matches!((&a, &b), (Pick::Got(_), Pick::Got(_))));
        assert!(matches!(
            route.take_upstream(DEFAULT_POOL, 0, &[]),
            Pick::Full
        ));
        drop(a);
        assert!(matches!(
            route.take_upstream(DEFAULT_POOL, 0, &[]),
            Pick::Got(_)
        ));
    }

    #[test]
    fn weights_spread_the_rotation() {
        assert_eq!(&*rotation(&[0, 1, 2], &[5, 1, 1]), &[0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(&*rotation(&[4, 9], &[1, 1]), &[4, 9]);
        let mut s = spec("gpu", "/v1/", false);
        s.upstreams = vec![capped(1, 0, 3), capped(2, 0, 1)];
        let r = router(&[s]);
        let route = r.get(0).unwrap();
        let firsts = (0..8)
            .filter(|_| pick(route, DEFAULT_POOL, 0, &[]).map(|a| a.port()) == Some(1))
            .count();
        assert_eq!(firsts, 6);
    }

    #[test]
    fn methods_and_allow_header() {
        let mut s = spec("chat", "/chat/", true);
        s.methods = Some(vec![Method::POST, Method::GET]);
        let r = router(&[s]);
        let route = r.get(0).unwrap();
        assert!(route.allows_method(&Method::POST));
        assert!(!route.allows_method(&Method::DELETE));
        assert_eq!(route.allow_header().unwrap(), "POST, GET");
        let open = router(&[spec("x", "/x/", false)]);
        assert!(open.get(0).unwrap().allows_method(&Method::DELETE));
    }
}
