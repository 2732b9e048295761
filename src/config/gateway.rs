//! The YAML configuration: what users write, and the validated form the
//! gateway runs on.
//!
//! Parsing is strict (`deny_unknown_fields`), so a misspelt setting is an
//! error instead of a silently ignored line. Every value that can be checked
//! on its own is checked while deserializing, so its error carries the line
//! and column; checks that span entries (duplicates, name resolution) run
//! afterwards and name the route they are about.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::clients::{parse_timeout, ClientLimits, ClientSettings};
use super::error::{LoadError, Location};
use super::listen::{check_listeners, FileListenList, ListenSpec};
use super::shared::{FileSharedState, SharedStateSpec};
use super::values::{ByteSize, IpRange, ModelPattern, Rate, TokenRate};

/// Where audit lines go: a file the gateway appends to, or its stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditDest {
    Stderr,
    File(PathBuf),
}

/// How long a TCP connect to an upstream may take unless a route says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the gateway waits for each read from an upstream (which includes
/// the wait for the response header, i.e. model loading and the first token).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(300);
/// How often an active health check runs unless the route says otherwise.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How long an active health check may take.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Where a running gateway hands its listening sockets to `run --upgrade`.
pub const DEFAULT_UPGRADE_SOCK: &str = "/tmp/ai-gateway-upgrade.sock";
/// How long SIGTERM waits for requests in flight before exiting anyway.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The configuration file exactly as users write it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: FileListenList,
    keys_file: PathBuf,
    #[serde(default)]
    shutdown_grace: Option<Timeout>,
    #[serde(default)]
    threads: Option<NonZeroUsize>,
    #[serde(default)]
    client_header_timeout: Option<String>,
    #[serde(default)]
    client_idle_timeout: Option<String>,
    #[serde(default)]
    client_body_timeout: Option<String>,
    #[serde(default)]
    max_connections: Option<u64>,
    #[serde(default = "yes")]
    watch: bool,
    #[serde(default)]
    audit_log: Option<PathBuf>,
    #[serde(default)]
    admin_listen: Option<String>,
    #[serde(default)]
    metrics_per_user: bool,
    #[serde(default)]
    upgrade_sock: Option<PathBuf>,
    #[serde(default)]
    underscores_in_headers: bool,
    #[serde(default)]
    rate_limit: Option<Rate>,
    #[serde(default)]
    max_concurrent: Option<NonZeroU32>,
    #[serde(default)]
    max_body_size: Option<ByteSize>,
    #[serde(default)]
    token_limit: Option<TokenRate>,
    #[serde(default)]
    allow: Option<Vec<IpRange>>,
    #[serde(default)]
    trusted_proxies: Vec<IpRange>,
    #[serde(default)]
    failed_key_throttle: Option<FileThrottle>,
    #[serde(default)]
    shared_state: Option<FileSharedState>,
    routes: Vec<FileRoute>,
}

/// `failed_key_throttle: {enabled, max_failures, window, cooldown}` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileThrottle {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    max_failures: Option<NonZeroU32>,
    #[serde(default)]
    window: Option<Timeout>,
    #[serde(default)]
    cooldown: Option<Timeout>,
}

/// `cors: {origins, max_age, headers}` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCors {
    origins: Vec<Origin>,
    #[serde(default)]
    max_age: Option<Timeout>,
    #[serde(default)]
    headers: Option<Vec<NonEmpty>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    name: NonEmpty,
    path_prefix: PathPrefix,
    #[serde(default)]
    methods: Option<Vec<MethodName>>,
    service: NonEmpty,
    #[serde(default)]
    strip_prefix: StripSetting,
    upstreams: Vec<UpstreamAddr>,
    #[serde(default)]
    upstream_ca: Option<PathBuf>,
    #[serde(default)]
    connect_timeout: Option<Timeout>,
    #[serde(default)]
    read_timeout: Option<Timeout>,
    #[serde(default)]
    health_check: Option<FileHealthCheck>,
    #[serde(default)]
    websocket: bool,
    #[serde(default)]
    allow_path_params: bool,
    #[serde(default)]
    rate_limit: Option<Rate>,
    #[serde(default)]
    max_concurrent: Option<NonZeroU32>,
    #[serde(default)]
    max_body_size: Option<ByteSize>,
    #[serde(default)]
    token_limit: Option<TokenRate>,
    #[serde(default)]
    allow: Option<Vec<IpRange>>,
    #[serde(default)]
    cors: Option<FileCors>,
    #[serde(default)]
    api: Option<ApiKind>,
    #[serde(default)]
    include_usage: bool,
    #[serde(default)]
    models: Option<ModelRoutes>,
}

/// The API a route's upstream speaks, which lets the gateway read models
/// from requests and token usage from answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiKind {
    /// Ollama's own API (`/api/generate`, `/api/chat`, `/api/embed`,
    /// `/api/tags`, ...) and the OpenAI-compatible one it also serves
    /// under `/v1/`.
    Ollama,
    /// An OpenAI-compatible server (`/v1/chat/completions`,
    /// `/v1/completions`, `/v1/embeddings`, `/v1/models`).
    Openai,
}

impl ApiKind {
    pub fn name(self) -> &'static str {
        match self {
            ApiKind::Ollama => "ollama",
            ApiKind::Openai => "openai",
        }
    }
}

/// `models: {"llama3*": ["127.0.0.1:11434"], ...}` as written, in order.
#[derive(Debug, Default)]
struct ModelRoutes(Vec<(ModelPattern, Vec<UpstreamAddr>)>);

impl<'de> Deserialize<'de> for ModelRoutes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ModelRoutes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"a map of model patterns to upstream lists, such as {"llama3*": ["127.0.0.1:11434"]}"#)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ModelRoutes, A::Error> {
                let mut out: Vec<(ModelPattern, Vec<UpstreamAddr>)> = Vec::new();
                while let Some(pattern) = map.next_key::<ModelPattern>()? {
                    if out.iter().any(|(p, _)| p == &pattern) {
                        return Err(serde::de::Error::custom(format!(
                            "model pattern {:?} is listed twice",
                            pattern.as_str()
                        )));
                    }
                    let ups: Vec<UpstreamAddr> = map.next_value()?;
                    if ups.is_empty() {
                        return Err(serde::de::Error::custom(format!(
                            "model pattern {:?} has no upstreams",
                            pattern.as_str()
                        )));
                    }
                    out.push((pattern, ups));
                }
                Ok(ModelRoutes(out))
            }
        }
        d.deserialize_map(V)
    }
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

/// The validated configuration: every address resolved, every path absolute,
/// every default filled in.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from; reloads read it again.
    pub path: PathBuf,
    /// The listen addresses, in the order written (the same as `listeners`).
    pub listen: Vec<SocketAddr>,
    /// Each listen address with what it speaks (plain, redirect, TLS).
    pub listeners: Vec<ListenSpec>,
    pub keys_file: PathBuf,
    pub shutdown_grace: Duration,
    /// Worker threads for the proxy service.
    pub threads: usize,
    /// Client timeouts and the connection cap (reloadable).
    pub clients: ClientLimits,
    /// Reload when the config or key file changes (besides on SIGHUP).
    pub watch: bool,
    /// Where audit lines go; `None` for no audit log.
    pub audit_log: Option<AuditDest>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub admin_listen: Option<SocketAddr>,
    /// Count requests per user in metrics (a label per user: opt-in).
    pub metrics_per_user: bool,
    /// The socket a new process (`run --upgrade`) takes the listeners from.
    pub upgrade_sock: PathBuf,
    /// Forward client headers whose names contain `_` (nginx's
    /// `underscores_in_headers`). Off by default: CGI-style servers read
    /// `X_Gateway_User` and `X-Gateway-User` as the same variable.
    pub underscores_in_headers: bool,
    /// Defaults for every route; a route's own and a key's own win.
    pub limits: Limits,
    /// Client addresses allowed at all; `None` allows every address.
    pub allow: Option<Vec<IpRange>>,
    /// Peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<IpRange>,
    pub failed_key_throttle: ThrottleSpec,
    /// The Redis that instances share per-key limits through; `None`
    /// counts on this machine alone.
    pub shared_state: Option<SharedStateSpec>,
    pub routes: Vec<RouteSpec>,
}

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

/// CORS for a route: which browser origins may call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsSpec {
    /// Exact origins (`https://chat.example`), or `*` for any.
    pub origins: Vec<String>,
    pub max_age: Duration,
    /// Request headers a page may send (`Access-Control-Allow-Headers`).
    pub headers: Vec<String>,
}

/// The request headers a browser page may send by default: the two ways to
/// present a key, and JSON bodies.
pub const DEFAULT_CORS_HEADERS: [&str; 3] = ["authorization", "content-type", "x-api-key"];
/// How long a browser may cache a preflight answer unless a route says.
pub const DEFAULT_CORS_MAX_AGE: Duration = Duration::from_secs(600);

/// One upstream of a route: its address (resolved at load) and, for an
/// `https://` upstream, the host name its certificate must carry (sent as
/// SNI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    pub addr: SocketAddr,
    pub tls: Option<String>,
}

impl UpstreamSpec {
    /// A plain-HTTP upstream.
    pub fn plain(addr: SocketAddr) -> UpstreamSpec {
        UpstreamSpec { addr, tls: None }
    }
}

impl std::fmt::Display for UpstreamSpec {
    /// `https://name:port` (name as written) or `host:port`, for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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

/// One route, validated.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub name: String,
    pub path_prefix: String,
    /// `None` allows every method.
    pub methods: Option<Vec<String>>,
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
}

impl Config {
    /// Reads, parses and validates the configuration at `path`.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text` as if it had been read from `path`
    /// (relative paths inside resolve against `path`'s folder).
    pub fn parse(path: &Path, text: &str) -> Result<Config, LoadError> {
        let file: FileConfig =
            serde_yaml::from_str(text).map_err(|e| LoadError::from_yaml_in(path, &e, text))?;
        file.validate(path, text)
    }

    /// The settings that only take effect at start-up; a reload that changes
    /// them logs that a restart is needed.
    pub fn restart_only_differences(&self, other: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let same_listeners = self.listeners.len() == other.listeners.len()
            && self
                .listeners
                .iter()
                .zip(&other.listeners)
                .all(|(a, b)| a.same_setup(b));
        if !same_listeners {
            changed.push("listen");
        }
        if self.threads != other.threads {
            changed.push("threads");
        }
        if self.shutdown_grace != other.shutdown_grace {
            changed.push("shutdown_grace");
        }
        if self.audit_log != other.audit_log {
            changed.push("audit_log");
        }
        if self.admin_listen != other.admin_listen {
            changed.push("admin_listen");
        }
        if self.upgrade_sock != other.upgrade_sock {
            changed.push("upgrade_sock");
        }
        if self.shared_state != other.shared_state {
            changed.push("shared_state");
        }
        changed
    }
}

impl FileConfig {
    fn validate(self, path: &Path, text: &str) -> Result<Config, LoadError> {
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let listen_entries = self.listen.0;
        if listen_entries.is_empty() {
            return Err(LoadError::invalid(
                path,
                "listen: at least one address is needed",
            ));
        }
        let mut listen = Vec::with_capacity(listen_entries.len());
        let mut listeners = Vec::with_capacity(listen_entries.len());
        for entry in listen_entries {
            let l = entry.address().to_string();
            let addr = resolve(&l)
                .map_err(|why| LoadError::invalid(path, format!("listen {l:?}: {why}")))?;
            if listen.contains(&addr) {
                return Err(LoadError::invalid(
                    path,
                    format!("listen {l:?} is listed twice"),
                ));
            }
            listen.push(addr);
            listeners.push(
                entry
                    .validate(addr, base)
                    .map_err(|why| LoadError::invalid(path, format!("listen {l:?}: {why}")))?,
            );
        }
        check_listeners(&listeners).map_err(|why| LoadError::invalid(path, why))?;

        if self.routes.is_empty() {
            return Err(LoadError::invalid(
                path,
                "routes: at least one route is needed",
            ));
        }
        let mut names = HashSet::new();
        let mut prefixes = HashSet::new();
        let mut routes = Vec::with_capacity(self.routes.len());
        for r in self.routes {
            let name = r.name.0;
            if !names.insert(name.clone()) {
                return Err(LoadError::at(
                    path,
                    locate(text, "name", &name, 1),
                    format!("route {name:?}: a route with this name already exists"),
                ));
            }
            if !prefixes.insert(r.path_prefix.0.clone()) {
                return Err(LoadError::at(
                    path,
                    locate(text, "path_prefix", &r.path_prefix.0, 1),
                    format!(
                        "route {name:?}: path_prefix {:?} is already used by another route",
                        r.path_prefix.0
                    ),
                ));
            }
            if r.upstreams.is_empty() {
                return Err(LoadError::invalid(
                    path,
                    format!("route {name:?}: upstreams is empty"),
                ));
            }
            let mut upstreams = Vec::with_capacity(r.upstreams.len());
            for u in &r.upstreams {
                let addr = resolve(&u.host_port).map_err(|why| {
                    LoadError::invalid(
                        path,
                        format!("route {name:?}: upstream {:?}: {why}", u.written),
                    )
                })?;
                upstreams.push(UpstreamSpec {
                    addr,
                    tls: u.tls_name.clone(),
                });
            }
            let any_tls = upstreams.iter().any(|u| u.tls.is_some());
            if any_tls && r.health_check.is_some() {
                return Err(LoadError::invalid(
                    path,
                    format!("route {name:?}: health_check is not available for https:// upstreams (it speaks plain HTTP); leave it out"),
                ));
            }
            let upstream_ca = match r.upstream_ca {
                None => None,
                Some(_) if !any_tls => {
                    return Err(LoadError::invalid(
                        path,
                        format!("route {name:?}: upstream_ca is set but no upstream is https://"),
                    ))
                }
                Some(ca) => {
                    let ca_path = base.join(ca);
                    let certs = super::pem::read_certificates(&ca_path)?;
                    Some(UpstreamCa {
                        path: ca_path,
                        certs,
                    })
                }
            };
            let methods = match r.methods {
                Some(m) if m.is_empty() => {
                    return Err(LoadError::invalid(
                        path,
                        format!(
                            "route {name:?}: methods is empty (leave it out to allow every method)"
                        ),
                    ))
                }
                Some(m) => {
                    let mut v: Vec<String> = Vec::with_capacity(m.len());
                    for MethodName(x) in m {
                        if !v.contains(&x) {
                            v.push(x);
                        }
                    }
                    Some(v)
                }
                None => None,
            };
            let strip_prefix = match r.strip_prefix {
                StripSetting::Keep => None,
                StripSetting::Whole => Some(r.path_prefix.0.clone()),
                StripSetting::Part(p) if r.path_prefix.0.starts_with(&p) => Some(p),
                StripSetting::Part(p) => {
                    return Err(LoadError::invalid(
                        path,
                        format!(
                        "route {name:?}: strip_prefix {p:?} is not the start of path_prefix {:?}",
                        r.path_prefix.0
                    ),
                    ))
                }
            };
            let allow = non_empty_allow(path, &format!("route {name:?}: allow"), r.allow)?;
            let cors = cors_headers_valid(path, &name, r.cors)?;
            if r.api.is_none() && (r.include_usage || r.models.is_some()) {
                let what = if r.include_usage {
                    "include_usage"
                } else {
                    "models"
                };
                return Err(LoadError::invalid(
                    path,
                    format!("route {name:?}: {what} needs `api: ollama` or `api: openai` (the gateway reads models and usage only from APIs it knows)"),
                ));
            }
            let mut model_upstreams = Vec::new();
            for (pattern, ups) in r.models.map(|m| m.0).unwrap_or_default() {
                let mut addrs = Vec::with_capacity(ups.len());
                for u in &ups {
                    let addr = resolve(&u.host_port).map_err(|why| {
                        LoadError::invalid(
                            path,
                            format!(
                                "route {name:?}: models {:?}: upstream {:?}: {why}",
                                pattern.as_str(),
                                u.written
                            ),
                        )
                    })?;
                    addrs.push(UpstreamSpec {
                        addr,
                        tls: u.tls_name.clone(),
                    });
                }
                model_upstreams.push((pattern, addrs));
            }
            routes.push(RouteSpec {
                name,
                path_prefix: r.path_prefix.0,
                methods,
                service: r.service.0,
                strip_prefix,
                upstreams,
                upstream_ca,
                connect_timeout: r.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |t| t.0),
                read_timeout: r.read_timeout.map_or(DEFAULT_READ_TIMEOUT, |t| t.0),
                health_check: r.health_check.map(|h| HealthCheckSpec {
                    path: h.path.0,
                    interval: h.interval.map_or(DEFAULT_CHECK_INTERVAL, |t| t.0),
                    timeout: h.timeout.map_or(DEFAULT_CHECK_TIMEOUT, |t| t.0),
                }),
                websocket: r.websocket,
                allow_path_params: r.allow_path_params,
                limits: Limits {
                    rate: r.rate_limit,
                    max_concurrent: r.max_concurrent,
                    max_body: r.max_body_size.map(|b| b.0),
                    tokens: r.token_limit,
                },
                allow,
                cors: cors.map(|c| CorsSpec {
                    origins: c.origins.into_iter().map(|o| o.0).collect(),
                    max_age: c.max_age.map_or(DEFAULT_CORS_MAX_AGE, |t| t.0),
                    headers: c.headers.map_or_else(
                        || DEFAULT_CORS_HEADERS.map(String::from).to_vec(),
                        |h| h.into_iter().map(|n| n.0.to_ascii_lowercase()).collect(),
                    ),
                }),
                api: r.api,
                include_usage: r.include_usage,
                model_upstreams,
            });
        }

        let admin_listen =
            match &self.admin_listen {
                None => None,
                Some(a) => Some(admin_addr(a).map_err(|why| {
                    LoadError::invalid(path, format!("admin_listen {a:?}: {why}"))
                })?),
            };
        if let Some(a) = admin_listen {
            if listen.contains(&a) {
                return Err(LoadError::invalid(
                    path,
                    format!("admin_listen {a} is also a listen address"),
                ));
            }
        }
        let audit_log = self.audit_log.map(|p| {
            if p.as_os_str() == "-" {
                AuditDest::Stderr
            } else {
                AuditDest::File(base.join(p))
            }
        });

        let threads = match self.threads {
            Some(n) => n.get(),
            None => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        };
        let settings = ClientSettings {
            header_timeout: self.client_header_timeout.as_deref(),
            idle_timeout: self.client_idle_timeout.as_deref(),
            body_timeout: self.client_body_timeout.as_deref(),
            max_connections: self.max_connections,
        };
        let clients = ClientLimits::from_settings(&settings, threads)
            .map_err(|e| LoadError::at(path, locate(text, e.key, &e.value, 0), e.to_string()))?;

        Ok(Config {
            path: path.to_path_buf(),
            listen,
            listeners,
            keys_file: base.join(self.keys_file),
            shutdown_grace: self.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |t| t.0),
            threads,
            clients,
            watch: self.watch,
            audit_log,
            admin_listen,
            metrics_per_user: self.metrics_per_user,
            upgrade_sock: self
                .upgrade_sock
                .map_or_else(|| PathBuf::from(DEFAULT_UPGRADE_SOCK), |p| base.join(p)),
            underscores_in_headers: self.underscores_in_headers,
            limits: Limits {
                rate: self.rate_limit,
                max_concurrent: self.max_concurrent,
                max_body: self.max_body_size.map(|b| b.0),
                tokens: self.token_limit,
            },
            allow: non_empty_allow(path, "allow", self.allow)?,
            trusted_proxies: self.trusted_proxies,
            failed_key_throttle: self
                .failed_key_throttle
                .map_or_else(ThrottleSpec::default, |t| {
                    let d = ThrottleSpec::default();
                    ThrottleSpec {
                        enabled: t.enabled,
                        max_failures: t.max_failures.unwrap_or(d.max_failures),
                        window: t.window.map_or(d.window, |w| w.0),
                        cooldown: t.cooldown.map_or(d.cooldown, |c| c.0),
                    }
                }),
            shared_state: self
                .shared_state
                .map(|s| s.validate(path, base))
                .transpose()?,
            routes,
        })
    }
}

/// The admin address: `host:port`, or just a port (`9090`, `:9090`),
/// which means loopback: metrics and health need no key, so they are not
/// exposed beyond the machine unless the config says so.
fn admin_addr(s: &str) -> Result<SocketAddr, String> {
    let port_only = s.strip_prefix(':').unwrap_or(s);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    resolve(s)
}

fn yes() -> bool {
    true
}

/// Where the `nth` (from 0) `key: value` pair is in `text`. serde cannot
/// place errors that span entries (a duplicate name), so they are found by
/// looking for the text; block (`key: value`) and flow (`{key: value}`)
/// styles, quoted or not, are recognised.
fn locate(text: &str, key: &str, value: &str, nth: usize) -> Location {
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        let mut from = 0;
        while let Some(found) = line.get(from..).and_then(|rest| rest.find(key)) {
            let col = from + found;
            from = col + key.len();
            let before_ok = line
                .get(..col)
                .and_then(|b| b.chars().last())
                .is_none_or(|c| c == ' ' || c == '{' || c == ',' || c == '-');
            let after = line.get(from..).unwrap_or("").trim_start();
            let Some(after) = after.strip_prefix(':') else {
                continue;
            };
            let v = after.trim_start();
            let v = v.strip_prefix(['"', '\'']).unwrap_or(v);
            let matches = v.strip_prefix(value).is_some_and(|tail| {
                tail.is_empty() || tail.starts_with(['"', '\'', ',', '}', ' ', '#'])
            });
            if before_ok && matches {
                if seen == nth {
                    return Location::new(i + 1, col + 1);
                }
                seen += 1;
            }
        }
    }
    Location::default()
}

/// CORS header names must be header names: they are sent back verbatim.
fn cors_headers_valid(
    path: &Path,
    route: &str,
    cors: Option<FileCors>,
) -> Result<Option<FileCors>, LoadError> {
    if let Some(bad) = cors
        .as_ref()
        .and_then(|c| c.headers.as_ref())
        .and_then(|h| {
            h.iter()
                .find(|n| http::HeaderName::from_bytes(n.0.as_bytes()).is_err())
        })
    {
        return Err(LoadError::invalid(
            path,
            format!(
                "route {route:?}: cors header {:?} is not a header name",
                bad.0
            ),
        ));
    }
    Ok(cors)
}

/// An `allow` list, which must name someone: an empty one would lock
/// everybody out, which is never what was meant.
fn non_empty_allow(
    path: &Path,
    what: &str,
    allow: Option<Vec<IpRange>>,
) -> Result<Option<Vec<IpRange>>, LoadError> {
    match allow {
        Some(list) if list.is_empty() => Err(LoadError::invalid(
            path,
            format!("{what} is empty: nobody could connect; leave it out to allow every address"),
        )),
        other => Ok(other),
    }
}

/// Resolves `host:port` once, at load, so the request path never touches DNS.
/// When a name has several addresses an IPv4 one is preferred: local model
/// servers (Ollama among them) listen on 127.0.0.1 by default while
/// `localhost` often resolves to `::1` first.
fn resolve(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| "the name has no addresses".to_string())
}

/// A duration such as `5s`, `300s` or `2m`; zero is rejected because a zero
/// timeout would fail every request.
#[derive(Debug, Clone, Copy)]
struct Timeout(Duration);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_timeout(&s)
            .map(Timeout)
            .map_err(serde::de::Error::custom)
    }
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
#[derive(Debug, Default)]
enum StripSetting {
    #[default]
    Keep,
    Whole,
    Part(String),
}

impl<'de> Deserialize<'de> for StripSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = StripSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
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

/// An HTTP method token, stored upper-case.
#[derive(Debug)]
struct MethodName(String);

impl<'de> Deserialize<'de> for MethodName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let is_token = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !is_token {
            return Err(serde::de::Error::custom(format!(
                "{s:?} is not an HTTP method"
            )));
        }
        Ok(MethodName(s.to_ascii_uppercase()))
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

/// `host:port` or `https://host:port` as written; resolved during
/// validation.
#[derive(Debug)]
struct UpstreamAddr {
    written: String,
    /// `host:port`, without the scheme.
    host_port: String,
    /// For `https://`: the host name (brackets of an IPv6 address removed).
    tls_name: Option<String>,
}

impl<'de> Deserialize<'de> for UpstreamAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (host_port, tls) = match s.split_once("://") {
            None => (s.as_str(), false),
            Some(("https", rest)) => (rest.strip_suffix('/').unwrap_or(rest), true),
            Some(_) => {
                return Err(serde::de::Error::custom(format!(
                    "upstream {s:?} must be host:port (plain HTTP) or https://host:port (TLS)"
                )))
            }
        };
        let host = host_port.rsplit_once(':').and_then(|(host, port)| {
            let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
            (port_ok && !host.is_empty() && !host.contains('/')).then_some(host)
        });
        let Some(host) = host else {
            return Err(serde::de::Error::custom(format!(
                "upstream {s:?} must be host:port with a non-zero port (https://host:port for TLS)"
            )));
        };
        let tls_name = tls.then(|| {
            host.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host)
                .to_ascii_lowercase()
        });
        Ok(UpstreamAddr {
            host_port: host_port.to_string(),
            written: s,
            tls_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OnRedisError, DEFAULT_REDIS_TIMEOUT};

    const GOOD: &str = r#"
listen: "127.0.0.1:8080"
keys_file: "../keys/apikeys.json"
routes:
  - name: chat
    path_prefix: /chat/
    methods: [post, GET]
    service: chat
    strip_prefix: true
    upstreams: ["127.0.0.1:11434"]
    connect_timeout: 2s
  - name: tts
    path_prefix: /tts/
    service: tts
    upstreams: ["localhost:5002", "[::1]:5003"]
"#;

    fn parse(text: &str) -> Result<Config, LoadError> {
        Config::parse(Path::new("/etc/agw/gateway.yaml"), text)
    }

    fn err(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn good_config_fills_defaults_and_resolves() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(c.keys_file, Path::new("/etc/agw/../keys/apikeys.json"));
        assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert!(c.watch);
        assert!(!parse(&format!("{GOOD}watch: false\n")).unwrap().watch);
        assert_eq!(c.routes.len(), 2);
        let chat = &c.routes[0];
        assert_eq!(
            chat.methods.as_deref(),
            Some(&["POST".to_string(), "GET".to_string()][..])
        );
        assert_eq!(chat.connect_timeout, Duration::from_secs(2));
        assert_eq!(chat.read_timeout, DEFAULT_READ_TIMEOUT);
        assert_eq!(chat.strip_prefix.as_deref(), Some("/chat/"));
        let tts = &c.routes[1];
        assert!(tts.strip_prefix.is_none());
        assert!(tts.methods.is_none());
        assert_eq!(tts.upstreams[0].addr, "127.0.0.1:5002".parse().unwrap());
        assert_eq!(tts.upstreams[1].addr, "[::1]:5003".parse().unwrap());
        assert!(tts.upstreams[0].tls.is_none());
    }

    #[test]
    fn health_checks() {
        let c = parse(&GOOD.replace(
            "    connect_timeout: 2s",
            "    connect_timeout: 2s\n    health_check: {path: /api/tags, interval: 2s}",
        ))
        .unwrap();
        assert_eq!(
            c.routes[0].health_check,
            Some(HealthCheckSpec {
                path: "/api/tags".into(),
                interval: Duration::from_secs(2),
                timeout: DEFAULT_CHECK_TIMEOUT
            })
        );
        assert!(c.routes[1].health_check.is_none());
        let e = err(&GOOD.replace(
            "    connect_timeout: 2s",
            "    connect_timeout: 2s\n    health_check: {path: /, every: 2s}",
        ));
        assert!(e.contains("unknown field `every`"), "{e}");
        let e = err(&GOOD.replace(
            "    connect_timeout: 2s",
            "    connect_timeout: 2s\n    health_check: {path: x}",
        ));
        assert!(e.contains("must start with '/'"), "{e}");
    }

    #[test]
    fn listen_takes_a_list() {
        let c = parse(&GOOD.replace(
            r#""127.0.0.1:8080""#,
            r#"["127.0.0.1:8080", "127.0.0.1:8081"]"#,
        ))
        .unwrap();
        assert_eq!(c.listen.len(), 2);
    }

    #[test]
    fn unknown_field_names_line_and_column() {
        let e = err(&GOOD.replace("    strip_prefix: true", "    strip_prefx: true"));
        assert!(e.starts_with("/etc/agw/gateway.yaml:9:5: "), "{e}");
        assert!(e.contains("unknown field `strip_prefx`"), "{e}");
    }

    #[test]
    fn strip_prefix_takes_a_leading_part() {
        let c = parse(&GOOD.replace("strip_prefix: true", "strip_prefix: /chat")).unwrap();
        assert_eq!(c.routes[0].strip_prefix.as_deref(), Some("/chat"));
        let e = err(&GOOD.replace("strip_prefix: true", "strip_prefix: /tts"));
        assert!(e.contains("is not the start of path_prefix"), "{e}");
        let e = err(&GOOD.replace("strip_prefix: true", "strip_prefix: chat"));
        assert!(e.contains("must start with '/'"), "{e}");
        let e = err(&GOOD.replace("strip_prefix: true", "strip_prefix: 3"));
        assert!(e.contains("true, false, or the leading part"), "{e}");
    }

    #[test]
    fn unknown_top_level_field() {
        let e = err(&format!("{GOOD}\nlisten_port: 3\n"));
        assert!(e.contains("unknown field `listen_port`"), "{e}");
    }

    #[test]
    fn syntax_error_names_line() {
        let e = err("listen: [\"a\"\nroutes: {");
        assert!(e.starts_with("/etc/agw/gateway.yaml:"), "{e}");
        assert!(e.contains(':'), "{e}");
    }

    #[test]
    fn no_routes() {
        assert!(err("listen: 127.0.0.1:1\nkeys_file: k.json\nroutes: []\n")
            .contains("at least one route"));
    }

    #[test]
    fn missing_routes_field() {
        assert!(err("listen: 127.0.0.1:1\nkeys_file: k.json\n").contains("missing field `routes`"));
    }

    #[test]
    fn empty_upstreams() {
        let e = err(&GOOD.replace(r#"upstreams: ["127.0.0.1:11434"]"#, "upstreams: []"));
        assert!(e.contains(r#"route "chat": upstreams is empty"#), "{e}");
    }

    #[test]
    fn unparsable_upstream() {
        let e = err(&GOOD.replace("127.0.0.1:11434", "127.0.0.1"));
        assert!(e.contains("must be host:port"), "{e}");
        assert!(e.starts_with("/etc/agw/gateway.yaml:10:"), "{e}");
        let e = err(&GOOD.replace("127.0.0.1:11434", "http://127.0.0.1:11434"));
        assert!(e.contains("https://host:port (TLS)"), "{e}");
        let e = err(&GOOD.replace("127.0.0.1:11434", "127.0.0.1:0"));
        assert!(e.contains("non-zero port"), "{e}");
    }

    #[test]
    fn unresolvable_upstream() {
        let e = err(&GOOD.replace("127.0.0.1:11434", "no-such-host.invalid:11434"));
        assert!(
            e.contains(r#"upstream "no-such-host.invalid:11434": cannot resolve"#),
            "{e}"
        );
    }

    #[test]
    fn bad_listen() {
        let e = err(&GOOD.replace(r#""127.0.0.1:8080""#, r#""127.0.0.1""#));
        assert!(e.contains("listen \"127.0.0.1\""), "{e}");
        let e = err(&GOOD.replace(r#""127.0.0.1:8080""#, "[]"));
        assert!(e.contains("at least one address"), "{e}");
        let e = err(&GOOD.replace(r#""127.0.0.1:8080""#, r#"["127.0.0.1:1", "127.0.0.1:1"]"#));
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn duplicate_route_name() {
        let e = err(&GOOD.replace("name: tts", "name: chat"));
        assert!(
            e.contains(r#"route "chat": a route with this name already exists"#),
            "{e}"
        );
    }

    #[test]
    fn duplicates_are_located() {
        let e = err(&GOOD.replace("name: tts", "name: chat"));
        assert!(e.starts_with("/etc/agw/gateway.yaml:12:5: "), "{e}");
        let e = err(&GOOD.replace("path_prefix: /tts/", "path_prefix: /chat/"));
        assert!(e.starts_with("/etc/agw/gateway.yaml:13:5: "), "{e}");
        let flow = "listen: 127.0.0.1:1\nkeys_file: k\nroutes:\n  - {name: a, path_prefix: /a/, service: s, upstreams: [\"127.0.0.1:2\"]}\n  - {name: \"a\", path_prefix: /b/, service: s, upstreams: [\"127.0.0.1:2\"]}\n";
        assert!(
            err(flow).starts_with("/etc/agw/gateway.yaml:5:6: "),
            "{}",
            err(flow)
        );
    }

    #[test]
    fn duplicate_prefix() {
        let e = err(&GOOD.replace("path_prefix: /tts/", "path_prefix: /chat/"));
        assert!(e.contains(r#"path_prefix "/chat/" is already used"#), "{e}");
    }

    #[test]
    fn prefix_must_start_with_slash() {
        let e = err(&GOOD.replace("path_prefix: /tts/", "path_prefix: tts/"));
        assert!(e.contains("must start with '/'"), "{e}");
        // The error points at the bad value itself.
        assert!(
            e.starts_with("/etc/agw/gateway.yaml:13:18: routes[1]"),
            "{e}"
        );
        let e = err(&GOOD.replace("path_prefix: /tts/", "path_prefix: /tts?x"));
        assert!(e.contains("must not contain"), "{e}");
    }

    #[test]
    fn zero_and_malformed_timeouts() {
        let e = err(&GOOD.replace("connect_timeout: 2s", "connect_timeout: 0s"));
        assert!(e.contains("timeout of zero"), "{e}");
        let e = err(&GOOD.replace("connect_timeout: 2s", "connect_timeout: soon"));
        assert!(e.contains("invalid duration"), "{e}");
        let e = err(&format!("{GOOD}shutdown_grace: 0s\n"));
        assert!(e.contains("timeout of zero"), "{e}");
    }

    #[test]
    fn bad_methods() {
        let e = err(&GOOD.replace("methods: [post, GET]", "methods: [\"PO ST\"]"));
        assert!(e.contains("is not an HTTP method"), "{e}");
        let e = err(&GOOD.replace("methods: [post, GET]", "methods: []"));
        assert!(e.contains("methods is empty"), "{e}");
    }

    #[test]
    fn empty_names_and_services() {
        let e = err(&GOOD.replace("service: tts", "service: \"  \""));
        assert!(e.contains("must not be empty"), "{e}");
        let e = err(&GOOD.replace("name: tts", "name: \"\""));
        assert!(e.contains("must not be empty"), "{e}");
    }

    #[test]
    fn zero_threads_rejected() {
        let e = err(&format!("{GOOD}threads: 0\n"));
        assert!(e.contains("threads"), "{e}");
    }

    #[test]
    fn operations_settings() {
        let c = parse(GOOD).unwrap();
        assert!(c.audit_log.is_none() && c.admin_listen.is_none() && !c.metrics_per_user);
        assert_eq!(c.upgrade_sock, Path::new(DEFAULT_UPGRADE_SOCK));
        let c = parse(&format!("{GOOD}audit_log: audit.log\nadmin_listen: \"9090\"\nmetrics_per_user: true\nupgrade_sock: u.sock\n")).unwrap();
        assert_eq!(
            c.audit_log,
            Some(AuditDest::File("/etc/agw/audit.log".into()))
        );
        assert_eq!(c.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert!(c.metrics_per_user);
        assert_eq!(c.upgrade_sock, Path::new("/etc/agw/u.sock"));
        let c = parse(&format!(
            "{GOOD}audit_log: \"-\"\nadmin_listen: \"0.0.0.0:9100\"\n"
        ))
        .unwrap();
        assert_eq!(c.audit_log, Some(AuditDest::Stderr));
        assert_eq!(c.admin_listen, Some("0.0.0.0:9100".parse().unwrap()));
        let e = err(&format!("{GOOD}admin_listen: \"127.0.0.1:8080\"\n"));
        assert!(e.contains("also a listen address"), "{e}");
        let e = err(&format!("{GOOD}admin_listen: \"nope\"\n"));
        assert!(e.contains("admin_listen"), "{e}");
    }

    #[test]
    fn shared_state_settings() {
        assert!(parse(GOOD).unwrap().shared_state.is_none());
        let c = parse(&format!(
            "{GOOD}shared_state: {{redis: \"redis://:pw@10.0.0.5:6379/1\", on_redis_error: deny, timeout: 50ms}}\n"
        ))
        .unwrap();
        let s = c.shared_state.unwrap();
        assert_eq!(s.on_error, OnRedisError::Deny);
        assert_eq!(s.timeout, Duration::from_millis(50));
        assert_eq!(s.redis.redacted(), "redis://10.0.0.5:6379/1");
        let c = parse(&format!(
            "{GOOD}shared_state:\n  redis: redis://127.0.0.1:6379\n"
        ))
        .unwrap();
        let s = c.shared_state.unwrap();
        assert_eq!(
            (s.on_error, s.timeout),
            (OnRedisError::Local, DEFAULT_REDIS_TIMEOUT)
        );
        let text = format!("{GOOD}shared_state:\n  redis: \"http://x\"\n");
        let e = err(&text);
        let line = text.lines().count();
        assert!(
            e.contains(&format!(":{line}:")) && e.contains("redis"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}shared_state: {{redis: \"redis://:pw@h:99999999\"}}\n"
        ));
        assert!(
            e.contains("shared_state.redis") && !e.contains("pw@"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}shared_state: {{redis: \"redis://h:1\", ca: ca.pem}}\n"
        ));
        assert!(e.contains("not a rediss://"), "{e}");
        let e = err(&format!(
            "{GOOD}shared_state: {{redis: \"rediss://h:1\", ca: /no/such/ca.pem}}\n"
        ));
        assert!(e.contains("/no/such/ca.pem"), "{e}");
        for bad in ["on_redis_error: maybe", "timeout: 11s", "retries: 3"] {
            let e = err(&format!(
                "{GOOD}shared_state:\n  redis: redis://h:1\n  {bad}\n"
            ));
            let block = GOOD.lines().count() + 1..=GOOD.lines().count() + 3;
            assert!(
                block
                    .clone()
                    .any(|line| e.contains(&format!("gateway.yaml:{line}:"))),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn client_limits() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.clients,
            ClientLimits::from_settings(&ClientSettings::default(), c.threads).unwrap()
        );
        let c = parse(&format!(
            "{GOOD}client_header_timeout: 2s\nclient_idle_timeout: 500ms\nclient_body_timeout: 1m\nmax_connections: 3\n"
        ))
        .unwrap();
        assert_eq!(c.clients.header_timeout, Duration::from_secs(2));
        assert_eq!(c.clients.idle_timeout, Duration::from_millis(500));
        assert_eq!(c.clients.body_timeout, Duration::from_secs(60));
        assert_eq!(c.clients.max_connections, 3);
        // Each error names the setting and its line (16: the first line
        // after GOOD).
        for (bad, why) in [
            ("max_connections: 0", "max_connections: must be at least 1"),
            ("max_connections: -5", "max_connections: invalid type"),
            ("max_connections: lots", "max_connections: invalid type"),
            (
                "client_header_timeout: 0s",
                "client_header_timeout: a timeout of zero",
            ),
            (
                "client_idle_timeout: forever",
                "client_idle_timeout: invalid duration",
            ),
            (
                "client_body_timeout: \"-1s\"",
                "client_body_timeout: invalid duration",
            ),
            (
                "client_body_timeout: 5",
                "client_body_timeout: invalid duration \"5\" (time unit needed",
            ),
        ] {
            let e = err(&format!("{GOOD}{bad}\n"));
            assert!(e.starts_with("/etc/agw/gateway.yaml:16:"), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
        // Reloadable: never reported as needing a restart.
        let d = parse(&format!(
            "{GOOD}max_connections: 9\nclient_body_timeout: 1s\n"
        ))
        .unwrap();
        assert!(parse(GOOD).unwrap().restart_only_differences(&d).is_empty());
    }

    #[test]
    fn ai_settings() {
        let c = parse(&(GOOD.replace(
            "    connect_timeout: 2s",
            "    connect_timeout: 2s\n    api: openai\n    include_usage: true\n    token_limit: 200k/day\n    models: {\"llama3*\": [\"127.0.0.1:11434\"], \"qwen*\": [\"127.0.0.1:11435\", \"127.0.0.1:11436\"]}",
        ) + "token_limit: 1M/day\n"))
        .unwrap();
        let chat = &c.routes[0];
        assert_eq!(chat.api, Some(ApiKind::Openai));
        assert!(chat.include_usage);
        assert_eq!(chat.limits.tokens.unwrap().count.get(), 200_000);
        assert_eq!(c.limits.tokens.unwrap().count.get(), 1_000_000);
        let names: Vec<&str> = chat
            .model_upstreams
            .iter()
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(names, ["llama3*", "qwen*"], "in the order written");
        assert_eq!(chat.model_upstreams[1].1.len(), 2);
        assert_eq!(c.routes[1].api, None);
        assert!(c.routes[1].model_upstreams.is_empty());
        let ollama = parse(&GOOD.replace("    connect_timeout: 2s", "    api: ollama")).unwrap();
        assert_eq!(ollama.routes[0].api, Some(ApiKind::Ollama));

        let e = err(&GOOD.replace("    connect_timeout: 2s", "    include_usage: true"));
        assert!(
            e.contains("include_usage needs `api: ollama` or `api: openai`"),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "    connect_timeout: 2s",
            "    models: {\"a\": [\"127.0.0.1:1\"]}",
        ));
        assert!(e.contains("models needs `api"), "{e}");
        let e = err(&GOOD.replace("    connect_timeout: 2s", "    api: grpc"));
        assert!(e.contains("unknown variant `grpc`"), "{e}");
        let e = err(&GOOD.replace(
            "    connect_timeout: 2s",
            "    api: ollama\n    models: {\"a\": []}",
        ));
        assert!(e.contains("has no upstreams"), "{e}");
        let e = err(&GOOD.replace(
            "    connect_timeout: 2s",
            "    api: ollama\n    models: {\"a b\": [\"127.0.0.1:1\"]}",
        ));
        assert!(e.contains("must not contain spaces"), "{e}");
        let e = err(&GOOD.replace(
            "    connect_timeout: 2s",
            "    api: ollama\n    models: {\"a\": [\"no-such-host.invalid:1\"]}",
        ));
        assert!(
            e.contains(r#"models "a": upstream "no-such-host.invalid:1""#),
            "{e}"
        );
        let e = err(&format!("{GOOD}token_limit: 5/fortnight\n"));
        assert!(e.contains("invalid token limit"), "{e}");
    }

    #[test]
    fn listeners_plain_tls_redirect_and_acme() {
        use crate::config::{ListenKind, TlsSource};
        let listen = r#"
  - "127.0.0.1:8080"
  - {address: "0.0.0.0:80", redirect_https: true}
  - {address: "0.0.0.0:443", tls: {cert: tls/c.pem, key: /k.pem}}
  - address: "127.0.0.1:8443"
    tls:
      acme: {domains: [AI.example.com, ai.example.com], email: a@b.c, directory: "https://acme.test/dir", cache: acme, ca: ca.pem}"#;
        let c = parse(&GOOD.replace(r#"listen: "127.0.0.1:8080""#, &format!("listen:{listen}")))
            .unwrap();
        assert_eq!(c.listen.len(), 4);
        assert_eq!(c.listeners[0].kind, ListenKind::Plain);
        assert_eq!(c.listeners[1].kind, ListenKind::Redirect);
        assert_eq!(
            c.listeners[2].kind,
            ListenKind::Tls(TlsSource::Files {
                cert: "/etc/agw/tls/c.pem".into(),
                key: "/k.pem".into()
            })
        );
        let ListenKind::Tls(TlsSource::Acme(a)) = &c.listeners[3].kind else {
            panic!("acme listener expected");
        };
        assert_eq!(a.domains, ["ai.example.com"]);
        assert_eq!(a.cache, Path::new("/etc/agw/acme"));
        assert_eq!(a.ca.as_deref(), Some(Path::new("/etc/agw/ca.pem")));
        assert_eq!(crate::config::https_port(&c.listeners), Some(443));

        let with =
            |l: &str| err(&GOOD.replace(r#"listen: "127.0.0.1:8080""#, &format!("listen: {l}")));
        let e = with(r#"[{address: "127.0.0.1:80", redirect_https: true}]"#);
        assert!(e.contains("redirect_https needs a TLS listener"), "{e}");
        let e =
            with(r#"[{address: "127.0.0.1:443", tls: {cert: c, key: k}, redirect_https: true}]"#);
        assert!(e.contains("redirect_https is for plain listeners"), "{e}");
        let e = with(r#"{address: "127.0.0.1:443", tls: {cert: c}}"#);
        assert!(e.contains("cert is given without key"), "{e}");
        let e = with(r#"{address: "127.0.0.1:443", tls: {}}"#);
        assert!(e.contains("give cert and key"), "{e}");
        let e = with(r#"{address: "127.0.0.1:443", tls: {certs: c}}"#);
        assert!(e.contains("unknown field `certs`"), "{e}");
        let e = with(
            r#"{address: "127.0.0.1:443", tls: {acme: {domains: [a.b], directory: "https://x/d", cache: c}}}"#,
        );
        assert!(e.contains("needs a plain listener"), "{e}");
        let e = with(
            r#"["127.0.0.1:80", {address: "127.0.0.1:443", tls: {acme: {domains: [a.b], directory: "https://x/d", cache: c, email: nope}}}]"#,
        );
        assert!(e.contains("not an email address"), "{e}");
        let e = with(r#"{adress: "127.0.0.1:443"}"#);
        assert!(e.contains("unknown field `adress`"), "{e}");
    }

    #[test]
    fn certificate_paths_reload_and_listener_changes_need_a_restart() {
        let tls = |cert: &str| {
            parse(&GOOD.replace(
                r#"listen: "127.0.0.1:8080""#,
                &format!(r#"listen: ["127.0.0.1:8080", {{address: "127.0.0.1:8443", tls: {{cert: {cert}, key: k.pem}}}}]"#),
            ))
            .unwrap()
        };
        assert!(tls("a.pem")
            .restart_only_differences(&tls("b.pem"))
            .is_empty());
        assert_eq!(
            tls("a.pem").restart_only_differences(&parse(GOOD).unwrap()),
            vec!["listen"]
        );
    }

    #[test]
    fn https_upstreams_and_their_ca() {
        let c = parse(&GOOD.replace(
            "\"127.0.0.1:11434\"",
            "\"https://LocalHost:11434\", \"https://[::1]:8443/\"",
        ))
        .unwrap();
        let ups = &c.routes[0].upstreams;
        assert_eq!(ups[0].tls.as_deref(), Some("localhost"));
        assert_eq!(ups[0].addr, "127.0.0.1:11434".parse().unwrap());
        assert_eq!(ups[1].tls.as_deref(), Some("::1"));
        assert_eq!(
            ups[0].to_string(),
            "https://localhost:11434 (127.0.0.1:11434)"
        );
        let e = err(&GOOD.replace("\"127.0.0.1:11434\"", "\"ftp://127.0.0.1:11434\""));
        assert!(e.contains("https://host:port (TLS)"), "{e}");
        let e = err(&GOOD.replace(
            "\"127.0.0.1:11434\"]",
            "\"127.0.0.1:11434\"]\n    upstream_ca: ca.pem",
        ));
        assert!(
            e.contains("upstream_ca is set but no upstream is https://"),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "\"127.0.0.1:11434\"]",
            "\"https://127.0.0.1:11434\"]\n    upstream_ca: /no/such/ca.pem",
        ));
        assert!(e.starts_with("/no/such/ca.pem: cannot read"), "{e}");
        let e = err(&GOOD.replace(
            "\"127.0.0.1:11434\"]",
            "\"https://127.0.0.1:11434\"]\n    health_check: {path: /}",
        ));
        assert!(
            e.contains("health_check is not available for https://"),
            "{e}"
        );
    }

    #[test]
    fn restart_only_settings_are_reported() {
        let a = parse(GOOD).unwrap();
        let b = parse(&GOOD.replace("8080", "8081")).unwrap();
        assert_eq!(a.restart_only_differences(&b), vec!["listen"]);
        assert!(a.restart_only_differences(&a.clone()).is_empty());
    }
}
