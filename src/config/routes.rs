//! `routes`: which requests go where. Each route has a name, a path
//! prefix, the methods it allows, the service keys must grant, its
//! upstreams (resolved by the compile step, their CA file read there too),
//! timeouts, an active health check, websocket and path-parameter
//! switches, CORS, its own limits and allow list (see `limits.rs`), and
//! its AI settings (see `ai.rs`).

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use super::ai::{self, ApiKind, ModelRoutes, ModelUpstreams};
use super::error::{LoadError, Location};
use super::fleet::{
    self, Balance, FileAliases, FileFleet, FileQueue, FileRetry, ModelAlias, QueueSpec, RetrySpec,
    UpstreamEntry,
};
use super::limits::{non_empty_allow, Limits};
use super::values::{ByteSize, IpRange, ModelPattern, Positive, Rate, Timeout, TokenRate};
use super::yaml::location;

/// How long a TCP connect to an upstream may take unless a route says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the gateway waits for each read from an upstream (which includes
/// the wait for the response header, i.e. model loading and the first token).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(300);
/// How often an active health check runs unless the route says otherwise.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How long an active health check may take.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// The request headers a browser page may send by default: the two ways to
/// present a key, and JSON bodies.
pub const DEFAULT_CORS_HEADERS: [&str; 3] = ["authorization", "content-type", "x-api-key"];
/// How long a browser may cache a preflight answer unless a route says.
pub const DEFAULT_CORS_MAX_AGE: Duration = Duration::from_secs(600);

/// One route as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    name: Spanned<NonEmpty>,
    path_prefix: Spanned<PathPrefix>,
    #[serde(default)]
    methods: Option<Spanned<Vec<MethodName>>>,
    service: NonEmpty,
    #[serde(default)]
    strip_prefix: Option<Spanned<StripSetting>>,
    upstreams: Spanned<Vec<Spanned<UpstreamEntry>>>,
    #[serde(default)]
    balance: Option<Balance>,
    #[serde(default)]
    queue: Option<Spanned<FileQueue>>,
    #[serde(default)]
    retry: Option<Spanned<FileRetry>>,
    #[serde(default)]
    aliases: Option<Spanned<FileAliases>>,
    #[serde(default)]
    upstream_ca: Option<Spanned<PathBuf>>,
    #[serde(default)]
    connect_timeout: Option<Timeout>,
    #[serde(default)]
    read_timeout: Option<Timeout>,
    #[serde(default)]
    health_check: Option<Spanned<FileHealthCheck>>,
    #[serde(default)]
    websocket: bool,
    #[serde(default)]
    allow_path_params: bool,
    #[serde(default)]
    rate_limit: Option<Rate>,
    #[serde(default)]
    max_concurrent: Option<Positive<std::num::NonZeroU32>>,
    #[serde(default)]
    max_body_size: Option<ByteSize>,
    #[serde(default)]
    token_limit: Option<TokenRate>,
    #[serde(default)]
    allow: Option<Spanned<Vec<IpRange>>>,
    #[serde(default)]
    cors: Option<FileCors>,
    #[serde(default)]
    api: Option<ApiKind>,
    #[serde(default)]
    include_usage: Option<Spanned<bool>>,
    #[serde(default)]
    models: Option<Spanned<ModelRoutes>>,
}

/// `health_check: {path: /, interval: 5s, timeout: 1s}` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealthCheck {
    path: PathPrefix,
    #[serde(default)]
    interval: Option<Timeout>,
    #[serde(default)]
    timeout: Option<Timeout>,
}

/// An active health check: `GET path` every `interval`; an HTTP answer
/// below 500 within `timeout` keeps the upstream in rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSpec {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
}

/// `cors: {origins, max_age, headers}` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCors {
    origins: Vec<Origin>,
    #[serde(default)]
    max_age: Option<Timeout>,
    #[serde(default)]
    headers: Option<Vec<CorsHeader>>,
}

/// CORS for a route: which browser origins may call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsSpec {
    /// Exact origins (`https://chat.example`), or `*` for any.
    pub origins: Vec<String>,
    pub max_age: Duration,
    /// Request headers a page may send (`Access-Control-Allow-Headers`).
    pub headers: Vec<String>,
}

impl From<FileCors> for CorsSpec {
    fn from(c: FileCors) -> CorsSpec {
        CorsSpec {
            origins: c.origins.into_iter().map(|o| o.0).collect(),
            max_age: c.max_age.map_or(DEFAULT_CORS_MAX_AGE, |t| t.0),
            headers: c.headers.map_or_else(
                || DEFAULT_CORS_HEADERS.map(String::from).to_vec(),
                |h| h.into_iter().map(|n| n.0).collect(),
            ),
        }
    }
}

/// One upstream of a route: its address (resolved at load) and, for an
/// `https://` upstream, the host name its certificate must carry (sent as
/// SNI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    pub addr: SocketAddr,
    pub tls: Option<String>,
    /// At most this many requests sent to it at once.
    pub max_in_flight: Option<NonZeroU32>,
    /// Its share of the route's requests (1 to [`MAX_WEIGHT`](super::fleet::MAX_WEIGHT)).
    pub weight: NonZeroU32,
}

impl UpstreamSpec {
    /// A plain-HTTP upstream without a cap, of weight 1.
    pub fn plain(addr: SocketAddr) -> UpstreamSpec {
        UpstreamSpec {
            addr,
            tls: None,
            max_in_flight: None,
            weight: NonZeroU32::MIN,
        }
    }
}

impl fmt::Display for UpstreamSpec {
    /// `https://name:port` (name as written) or `host:port`, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tls {
            Some(name) if name.contains(':') => {
                write!(f, "https://[{name}]:{} ({})", self.addr.port(), self.addr)
            }
            Some(name) => write!(f, "https://{name}:{} ({})", self.addr.port(), self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// `upstream_ca`: the file and the DER certificates read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamCa {
    pub path: PathBuf,
    pub certs: Vec<Vec<u8>>,
}

/// One route, compiled: what the route table is built from.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub name: String,
    pub path_prefix: String,
    /// `None` allows every method.
    pub methods: Option<Vec<Method>>,
    pub service: String,
    /// The leading part of the path removed before going upstream: the
    /// whole `path_prefix` (`strip_prefix: true`) or a shorter one
    /// (`strip_prefix: /ollama`); `None` keeps the path.
    pub strip_prefix: Option<String>,
    pub upstreams: Vec<UpstreamSpec>,
    /// The CA certificates that `https://` upstreams must chain to
    /// (`upstream_ca`); the system's roots when `None`.
    pub upstream_ca: Option<UpstreamCa>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub health_check: Option<HealthCheckSpec>,
    /// Whether websocket upgrades may pass: the connection then becomes a
    /// tunnel carrying the identity of the key that opened it.
    pub websocket: bool,
    /// Whether `;` (literal or `%3B`) may appear in the path: matrix
    /// parameters, which servlet-style upstreams strip from each segment.
    /// Off, such paths are refused (400) so that `/w/admin;/x` cannot
    /// reach an upstream that reads it as `/w/admin/x`.
    pub allow_path_params: bool,
    /// This route's defaults (over the global ones, under a key's own).
    pub limits: Limits,
    /// Client addresses allowed on this route; `None` allows every address.
    pub allow: Option<Vec<IpRange>>,
    pub cors: Option<CorsSpec>,
    /// The API the upstreams speak; `None` proxies without reading bodies.
    pub api: Option<ApiKind>,
    /// Ask OpenAI-compatible upstreams for usage on streams
    /// (`stream_options.include_usage`) when the client did not.
    pub include_usage: bool,
    /// Upstreams by model, in the order written: the first pattern that
    /// matches the request's model wins; other models go to `upstreams`.
    pub model_upstreams: Vec<(ModelPattern, Vec<UpstreamSpec>)>,
    pub balance: Balance,
    pub queue: Option<QueueSpec>,
    pub retry: RetrySpec,
    /// Model names clients may ask for, and the model that serves each:
    /// the request body's `model` is rewritten before it goes upstream.
    pub aliases: Vec<ModelAlias>,
}

/// One route, checked: everything but its upstreams' addresses and its CA
/// file, which the compile step resolves and reads.
#[derive(Debug)]
pub(super) struct CheckedRoute {
    pub(super) name: String,
    pub(super) path_prefix: String,
    pub(super) methods: Option<Vec<Method>>,
    pub(super) service: String,
    pub(super) strip_prefix: Option<String>,
    pub(super) upstreams: Vec<Spanned<UpstreamEntry>>,
    /// The CA file (relative to the config's folder) and where it is written.
    pub(super) upstream_ca: Option<(PathBuf, Location)>,
    pub(super) connect_timeout: Duration,
    pub(super) read_timeout: Duration,
    pub(super) health_check: Option<HealthCheckSpec>,
    pub(super) websocket: bool,
    pub(super) allow_path_params: bool,
    pub(super) limits: Limits,
    pub(super) allow: Option<Vec<IpRange>>,
    pub(super) cors: Option<CorsSpec>,
    pub(super) api: Option<ApiKind>,
    pub(super) include_usage: bool,
    pub(super) models: ModelUpstreams,
    pub(super) fleet: fleet::CheckedFleet,
}

/// Checks `routes`: at least one, names and path prefixes each used once,
/// and each route on its own (see [`FileRoute::check`]); `base` is the
/// config's folder. Errors are about `path`.
pub(super) fn check(
    path: &Path,
    routes: Spanned<Vec<FileRoute>>,
    base: &Path,
) -> Result<Vec<CheckedRoute>, LoadError> {
    if routes.value.is_empty() {
        return Err(LoadError::at(
            path,
            location(&routes),
            "routes: at least one route is needed",
        ));
    }
    let mut names = HashSet::new();
    let mut prefixes = HashSet::new();
    let mut out = Vec::with_capacity(routes.value.len());
    for r in routes.value {
        let name = &r.name.value.0;
        if !names.insert(name.clone()) {
            return Err(LoadError::at(
                path,
                location(&r.name),
                format!("route {name:?}: a route with this name already exists"),
            ));
        }
        let prefix = &r.path_prefix.value.0;
        if !prefixes.insert(prefix.clone()) {
            return Err(LoadError::at(
                path,
                location(&r.path_prefix),
                format!("route {name:?}: path_prefix {prefix:?} is already used by another route"),
            ));
        }
        out.push(r.check(path, base)?);
    }
    Ok(out)
}

impl FileRoute {
    /// Checks the route on its own and fills in its defaults.
    fn check(self, path: &Path, base: &Path) -> Result<CheckedRoute, LoadError> {
        let name = self.name.value.0;
        let route =
            |at: Location, why: String| LoadError::at(path, at, format!("route {name:?}: {why}"));
        if self.upstreams.value.is_empty() {
            return Err(route(
                location(&self.upstreams),
                "upstreams is empty".into(),
            ));
        }
        let any_tls = self
            .upstreams
            .value
            .iter()
            .any(|u| u.value.addr.tls_name.is_some());
        if let (true, Some(h)) = (any_tls, &self.health_check) {
            return Err(route(location(h), "health_check is not available for https:// upstreams (it speaks plain HTTP); leave it out".into()));
        }
        let upstream_ca = match self.upstream_ca {
            Some(ca) if !any_tls => {
                return Err(route(
                    location(&ca),
                    "upstream_ca is set but no upstream is https://".into(),
                ))
            }
            ca => ca.map(|c| (base.join(&c.value), location(&c))),
        };
        let methods = match self.methods {
            Some(m) if m.value.is_empty() => {
                return Err(route(
                    location(&m),
                    "methods is empty (leave it out to allow every method)".into(),
                ))
            }
            m => m.map(|m| distinct(m.value.into_iter().map(|x| x.0))),
        };
        let prefix = self.path_prefix.value.0;
        let strip_prefix = match self.strip_prefix {
            None => None,
            Some(s) => {
                let at = location(&s);
                s.value.strip(&prefix).map_err(|why| route(at, why))?
            }
        };
        let allow = non_empty_allow(path, &format!("route {name:?}: allow"), self.allow)?;
        let any_cap = self
            .upstreams
            .value
            .iter()
            .any(|u| u.value.max_in_flight.is_some())
            || self.models.as_ref().is_some_and(|m| m.value.any_cap());
        let fleet = fleet::check(
            path,
            &name,
            FileFleet {
                balance: self.balance,
                queue: self.queue,
                retry: self.retry,
                aliases: self.aliases,
            },
            any_cap,
            self.api.is_some(),
        )?;
        let ai = ai::check(path, &name, self.api, self.include_usage, self.models)?;
        Ok(CheckedRoute {
            path_prefix: prefix,
            methods,
            service: self.service.0,
            strip_prefix,
            upstreams: self.upstreams.value,
            upstream_ca,
            connect_timeout: self
                .connect_timeout
                .map_or(DEFAULT_CONNECT_TIMEOUT, |t| t.0),
            read_timeout: self.read_timeout.map_or(DEFAULT_READ_TIMEOUT, |t| t.0),
            health_check: self.health_check.map(|h| HealthCheckSpec {
                path: h.value.path.0,
                interval: h.value.interval.map_or(DEFAULT_CHECK_INTERVAL, |t| t.0),
                timeout: h.value.timeout.map_or(DEFAULT_CHECK_TIMEOUT, |t| t.0),
            }),
            websocket: self.websocket,
            allow_path_params: self.allow_path_params,
            limits: Limits::written(
                self.rate_limit,
                self.max_concurrent,
                self.max_body_size,
                self.token_limit,
            ),
            allow,
            cors: self.cors.map(CorsSpec::from),
            api: ai.api,
            include_usage: ai.include_usage,
            models: ai.models,
            fleet,
            name,
        })
    }
}

/// `items` without repeats, in the order first written.
fn distinct<T: PartialEq>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for x in items {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// A path prefix: it must start with `/` because it is matched against the
/// request path, which always does.
#[derive(Debug)]
struct PathPrefix(String);

impl<'de> Deserialize<'de> for PathPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.starts_with('/') {
            return Err(serde::de::Error::custom(format!(
                "{s:?} must start with '/'"
            )));
        }
        if s.bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'?' || b == b'#')
        {
            return Err(serde::de::Error::custom(format!(
                "path_prefix {s:?} must not contain spaces, control characters, '?' or '#'"
            )));
        }
        Ok(PathPrefix(s))
    }
}

/// `strip_prefix`: `false`, `true` (the whole `path_prefix`), or the
/// leading part of the prefix to remove (`/ollama` for a route on
/// `/ollama/api/generate`, so Ollama sees `/api/generate`).
#[derive(Debug)]
enum StripSetting {
    Keep,
    Whole,
    Part(String),
}

impl StripSetting {
    /// What to remove from paths under `prefix`.
    fn strip(self, prefix: &str) -> Result<Option<String>, String> {
        match self {
            StripSetting::Keep => Ok(None),
            StripSetting::Whole => Ok(Some(prefix.to_string())),
            StripSetting::Part(p) if prefix.starts_with(&p) => Ok(Some(p)),
            StripSetting::Part(p) => Err(format!(
                "strip_prefix {p:?} is not the start of path_prefix {prefix:?}"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for StripSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = StripSetting;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "true, false, or the leading part of path_prefix to remove (such as /ollama)",
                )
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<StripSetting, E> {
                Ok(if b {
                    StripSetting::Whole
                } else {
                    StripSetting::Keep
                })
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<StripSetting, E> {
                if !s.starts_with('/') {
                    return Err(E::custom(format!(
                        "strip_prefix {s:?} must start with '/' (or be true or false)"
                    )));
                }
                Ok(StripSetting::Part(s.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// An HTTP method, parsed once here in upper case: the route table takes
/// it as it is.
#[derive(Debug)]
struct MethodName(Method);

impl<'de> Deserialize<'de> for MethodName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Method::from_bytes(s.to_ascii_uppercase().as_bytes())
            .map(MethodName)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an HTTP method")))
    }
}

/// A CORS origin: `*`, or `scheme://host[:port]` exactly as browsers send
/// it in `Origin` (no path, no trailing slash).
#[derive(Debug)]
struct Origin(String);

impl<'de> Deserialize<'de> for Origin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim();
        let ok = t == "*"
            || t.split_once("://").is_some_and(|(scheme, rest)| {
                !scheme.is_empty() && !rest.is_empty() && !rest.contains('/')
            });
        if !ok {
            return Err(serde::de::Error::custom(format!(
                "origin {s:?} must be * or scheme://host[:port], such as https://chat.example"
            )));
        }
        Ok(Origin(t.to_string()))
    }
}

/// A request header name a page may send, in lower case; it is sent back
/// verbatim in `Access-Control-Allow-Headers`, so it must be a header name.
#[derive(Debug)]
struct CorsHeader(String);

impl<'de> Deserialize<'de> for CorsHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let NonEmpty(s) = NonEmpty::deserialize(d)?;
        match HeaderName::from_bytes(s.as_bytes()) {
            Ok(_) => Ok(CorsHeader(s.to_ascii_lowercase())),
            Err(_) => Err(serde::de::Error::custom(format!(
                "cors header {s:?} is not a header name"
            ))),
        }
    }
}

/// A non-empty, trimmed string (route names, services).
#[derive(Debug)]
struct NonEmpty(String);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim();
        if t.is_empty() {
            return Err(serde::de::Error::custom("must not be empty"));
        }
        Ok(NonEmpty(t.to_string()))
    }
}
