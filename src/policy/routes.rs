//! Routes: longest-prefix matching from a table built once at load, and each
//! route's upstream peers, built once with their timeouts.
//!
//! Prefixes are grouped by length. A lookup walks the distinct lengths from
//! longest to shortest and makes one hash lookup of the path's first `len`
//! bytes per length, so its cost depends on how many different prefix
//! lengths there are, not on how many routes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use pingora::upstreams::peer::HttpPeer;

use crate::config::{
    ApiKind, CorsSpec, HealthCheckSpec, IpRange, Limits, ModelPattern, RouteSpec, UpstreamCa,
    UpstreamSpec,
};
use crate::keys::{ServiceId, ServiceTable};
use crate::state::{HealthBook, UpstreamHealth};

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
}

/// A group of a route's upstreams, used round-robin.
#[derive(Debug)]
struct Pool {
    members: Box<[usize]>,
    next: AtomicUsize,
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
/// timeouts, and its health (which outlives the snapshot: see `state`).
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// How it was written (`https://name:port` or `host:port`), for logs.
    pub spec: UpstreamSpec,
    pub peer: HttpPeer,
    pub health: Arc<UpstreamHealth>,
}

/// `POST, GET`: an `Allow` or `Access-Control-Allow-Methods` value. Method
/// tokens are always valid header text.
fn method_list(methods: &[Method]) -> Option<HeaderValue> {
    let names: Vec<&str> = methods.iter().map(Method::as_str).collect();
    HeaderValue::from_str(&names.join(", ")).ok()
}

impl Route {
    fn build(spec: &RouteSpec, services: &mut ServiceTable, health: &HealthBook) -> Route {
        let methods: Option<Box<[Method]>> = spec.methods.as_deref().map(Box::from);
        let allow = spec.methods.as_deref().and_then(method_list);
        let ca = spec.upstream_ca.as_ref().and_then(ca_list);
        let mut upstreams: Vec<Upstream> = Vec::new();
        let mut pool_of = |ups: &mut dyn Iterator<Item = UpstreamSpec>| {
            let mut members: Vec<usize> = Vec::new();
            for up in ups {
                let i = match upstreams.iter().position(|u| u.spec == up) {
                    Some(i) => i,
                    None => {
                        upstreams.push(Upstream {
                            addr: up.addr,
                            peer: make_peer(
                                &up,
                                ca.as_ref(),
                                spec.connect_timeout,
                                spec.read_timeout,
                            ),
                            health: health.entry(up.addr),
                            spec: up,
                        });
                        upstreams.len() - 1
                    }
                };
                if !members.contains(&i) {
                    members.push(i);
                }
            }
            Pool {
                members: members.into_boxed_slice(),
                next: AtomicUsize::new(0),
            }
        };
        let mut pools = vec![pool_of(&mut spec.upstreams.iter().cloned())];
        let mut model_pools = Vec::with_capacity(spec.model_upstreams.len());
        for (pattern, addrs) in &spec.model_upstreams {
            pools.push(pool_of(&mut addrs.iter().cloned()));
            model_pools.push((pattern.clone(), pools.len() - 1));
        }
        Route {
            name: spec.name.clone(),
            prefix: spec.path_prefix.clone(),
            methods,
            allow,
            service: services.intern(&spec.service),
            service_name: spec.service.clone(),
            strip: spec.strip_prefix.clone(),
            upstreams: upstreams.into_boxed_slice(),
            pools: pools.into_boxed_slice(),
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

    /// The next upstream of the route's default pool (see
    /// [`Route::next_upstream_in`]).
    #[inline]
    pub fn next_upstream(&self, now_ms: i64, exclude: Option<SocketAddr>) -> Option<&Upstream> {
        self.next_upstream_in(DEFAULT_POOL, now_ms, exclude)
    }

    /// The next upstream of `pool` in round-robin order, skipping those
    /// out of rotation and `exclude` (the one a retry just failed on). When
    /// every upstream is out, the round-robin one is tried anyway: it may
    /// be back.
    #[inline]
    pub fn next_upstream_in(
        &self,
        pool: usize,
        now_ms: i64,
        exclude: Option<SocketAddr>,
    ) -> Option<&Upstream> {
        let pool = self.pools.get(pool)?;
        let n = pool.members.len();
        let member = |i: Option<&usize>| i.and_then(|i| self.upstreams.get(*i));
        if n == 1 {
            return member(pool.members.first());
        }
        let start = pool.next.fetch_add(1, Ordering::Relaxed);
        let nth = |k: usize| member(pool.members.get(start.wrapping_add(k) % n.max(1)));
        (0..n)
            .filter_map(nth)
            .find(|u| Some(u.addr) != exclude && u.health.is_up(now_ms))
            .or_else(|| (0..n).filter_map(nth).find(|u| Some(u.addr) != exclude))
            .or_else(|| nth(0))
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
    /// each upstream's health from `health`.
    pub fn build(specs: &[RouteSpec], services: &mut ServiceTable, health: &HealthBook) -> Router {
        let routes: Vec<Route> = specs
            .iter()
            .map(|s| Route::build(s, services, health))
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
        }
    }

    fn router(specs: &[RouteSpec]) -> Router {
        Router::build(specs, &mut ServiceTable::default(), &HealthBook::default())
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
        let a = route.next_upstream(0, None).unwrap().addr;
        let b = route.next_upstream(0, None).unwrap().addr;
        let c = route.next_upstream(0, None).unwrap().addr;
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
            .health
            .connect_failed(0, false);
        for _ in 0..4 {
            assert_eq!(route.next_upstream(1, None).unwrap().addr, second);
        }
        assert_eq!(route.next_upstream(1, Some(second)).unwrap().addr, first);
        route
            .upstream(second)
            .unwrap()
            .health
            .connect_failed(0, false);
        // Every upstream out: still something to try.
        assert!(route.next_upstream(1, None).is_some());
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
            route.next_upstream_in(pool, 0, None).unwrap().addr
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
        let p = &r.get(0).unwrap().next_upstream(0, None).unwrap().peer;
        assert_eq!(p.options.connection_timeout, Some(Duration::from_secs(1)));
        assert_eq!(p.options.read_timeout, Some(Duration::from_secs(2)));
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
