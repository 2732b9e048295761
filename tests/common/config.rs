//! Typed gateway configs for tests: [`GatewayConfig`] with its [`Route`]s,
//! listeners and settings, rendered to the YAML the gateway reads.
//!
//! ```ignore
//! let config = GatewayConfig::new()
//!     .threads(2)
//!     .rate_limit("2/min")
//!     .route(Route::chat(echo.addr).max_body_size("1KB"))
//!     .route(Route::new("v1", "/v1/", "ai").api("openai").upstream(model.addr));
//! let gw = Gateway::start(&config, &KeyFile::of([Key::new(KEY, "ann").service("chat")]));
//! ```
//!
//! Values are the strings users write (`"2/min"`, `"1s"`, `"10MB"`), so a
//! test reads like the config it stands for. Rendering: each top-level
//! setting on its own line, its value in JSON (flow) style, one route per
//! line; JSON is valid YAML, and nothing here needs YAML's quoting rules.
//!
//! [`GatewayConfig::new`] holds what almost every test wants:
//! `keys_file: keys.json` (the key file in the gateway's temp dir) and
//! `shutdown_grace: 5s`. [`Gateway::start`](super::Gateway::start)
//! adds a listener on a free loopback port when the config has none, and
//! a free admin port for [`GatewayConfig::with_admin`].
//!
//! Tests whose subject is parsing (a misspelt field, a value in the wrong
//! place, line numbers in errors) write YAML text themselves, or add it to
//! a built config with [`GatewayConfig::extra_yaml`].

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::{Map, Value};

/// Strings for a path setting (`keys_file`, `audit_log`, ...).
fn path_value(p: impl AsRef<Path>) -> Value {
    Value::String(p.as_ref().display().to_string())
}

fn strings<S: ToString>(items: impl IntoIterator<Item = S>) -> Value {
    Value::Array(
        items
            .into_iter()
            .map(|s| Value::String(s.to_string()))
            .collect(),
    )
}

/// Renders `v` in JSON flow style with a space after `:` and `,` (the
/// form YAML parsers read without doubt, and people read easily).
fn flow(v: &Value) -> String {
    struct Spaced;
    impl serde_json::ser::Formatter for Spaced {
        fn begin_array_value<W: ?Sized + io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Spaced);
    serde::Serialize::serialize(v, &mut ser).expect("a JSON value serializes");
    String::from_utf8(out).expect("JSON is UTF-8")
}

// ---------------------------------------------------------------------------
// Listeners
// ---------------------------------------------------------------------------

/// One `listen` entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Listen {
    /// Plain HTTP: `"127.0.0.1:8080"`.
    Plain(String),
    /// `{address, redirect_https: true}`: a 308 to https for everything but
    /// ACME challenges.
    Redirect(String),
    /// `{address, tls: {cert, key}}`.
    Tls {
        address: String,
        cert: String,
        key: String,
    },
    /// `{address, tls: {acme: {...}}}`.
    Acme { address: String, acme: Acme },
}

impl Listen {
    fn address(&self) -> &str {
        match self {
            Listen::Plain(a) | Listen::Redirect(a) => a,
            Listen::Tls { address, .. } | Listen::Acme { address, .. } => address,
        }
    }

    fn value(&self) -> Value {
        let mut m = Map::new();
        m.insert("address".into(), Value::String(self.address().into()));
        match self {
            Listen::Plain(a) => return Value::String(a.clone()),
            Listen::Redirect(_) => {
                m.insert("redirect_https".into(), Value::Bool(true));
            }
            Listen::Tls { cert, key, .. } => {
                let mut tls = Map::new();
                tls.insert("cert".into(), Value::String(cert.clone()));
                tls.insert("key".into(), Value::String(key.clone()));
                m.insert("tls".into(), Value::Object(tls));
            }
            Listen::Acme { acme, .. } => {
                let mut tls = Map::new();
                tls.insert("acme".into(), Value::Object(acme.0.clone()));
                m.insert("tls".into(), Value::Object(tls));
            }
        }
        Value::Object(m)
    }
}

/// `tls: {acme: {domains, email, directory, cache, ca}}` of a listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Acme(Map<String, Value>);

impl Acme {
    /// Certificates for `domains` from the ACME server at `directory`, its
    /// account and certificates kept in the folder `cache`.
    pub fn new<S: ToString>(
        domains: impl IntoIterator<Item = S>,
        directory: &str,
        cache: impl AsRef<Path>,
    ) -> Acme {
        let mut m = Map::new();
        m.insert("domains".into(), strings(domains));
        m.insert("directory".into(), Value::String(directory.into()));
        m.insert("cache".into(), path_value(cache));
        Acme(m)
    }

    pub fn email(mut self, email: &str) -> Acme {
        self.0.insert("email".into(), Value::String(email.into()));
        self
    }

    /// A PEM CA to trust for the directory.
    pub fn ca(mut self, path: impl AsRef<Path>) -> Acme {
        self.0.insert("ca".into(), path_value(path));
        self
    }
}

// ---------------------------------------------------------------------------
// Top-level sections
// ---------------------------------------------------------------------------

/// `failed_key_throttle: {enabled, max_failures, window, cooldown}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Throttle(Map<String, Value>);

impl Throttle {
    /// The throttle with only the settings given.
    pub fn new() -> Throttle {
        Throttle::default()
    }

    /// `{max_failures, window, cooldown}`, the usual test form.
    pub fn after(max_failures: u32, window: &str, cooldown: &str) -> Throttle {
        Throttle::new()
            .max_failures(max_failures)
            .window(window)
            .cooldown(cooldown)
    }

    /// `{enabled: false}`.
    pub fn off() -> Throttle {
        Throttle::new().enabled(false)
    }

    pub fn enabled(mut self, on: bool) -> Throttle {
        self.0.insert("enabled".into(), Value::Bool(on));
        self
    }

    pub fn max_failures(mut self, n: u32) -> Throttle {
        self.0.insert("max_failures".into(), n.into());
        self
    }

    pub fn window(mut self, d: &str) -> Throttle {
        self.0.insert("window".into(), Value::String(d.into()));
        self
    }

    pub fn cooldown(mut self, d: &str) -> Throttle {
        self.0.insert("cooldown".into(), Value::String(d.into()));
        self
    }
}

/// `shared_state: {redis, on_redis_error, timeout, ca}`.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedState(Map<String, Value>);

impl SharedState {
    /// The Redis at `url` (`redis://` or `rediss://`).
    pub fn new(url: &str) -> SharedState {
        let mut m = Map::new();
        m.insert("redis".into(), Value::String(url.into()));
        SharedState(m)
    }

    /// `local` or `deny`.
    pub fn on_redis_error(mut self, mode: &str) -> SharedState {
        self.0
            .insert("on_redis_error".into(), Value::String(mode.into()));
        self
    }

    pub fn timeout(mut self, d: &str) -> SharedState {
        self.0.insert("timeout".into(), Value::String(d.into()));
        self
    }

    /// A PEM CA to trust for `rediss://`.
    pub fn ca(mut self, path: impl AsRef<Path>) -> SharedState {
        self.0.insert("ca".into(), path_value(path));
        self
    }
}

/// `cors: {origins, max_age, headers}` of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct Cors(Map<String, Value>);

impl Cors {
    pub fn new<S: ToString>(origins: impl IntoIterator<Item = S>) -> Cors {
        let mut m = Map::new();
        m.insert("origins".into(), strings(origins));
        Cors(m)
    }

    pub fn max_age(mut self, d: &str) -> Cors {
        self.0.insert("max_age".into(), Value::String(d.into()));
        self
    }

    pub fn headers<S: ToString>(mut self, headers: impl IntoIterator<Item = S>) -> Cors {
        self.0.insert("headers".into(), strings(headers));
        self
    }
}

/// `health_check: {path, interval, timeout}` of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck(Map<String, Value>);

impl HealthCheck {
    /// `GET path` on every upstream, at the gateway's default interval and
    /// timeout unless set.
    pub fn new(path: &str) -> HealthCheck {
        let mut m = Map::new();
        m.insert("path".into(), Value::String(path.into()));
        HealthCheck(m)
    }

    pub fn interval(mut self, d: &str) -> HealthCheck {
        self.0.insert("interval".into(), Value::String(d.into()));
        self
    }

    pub fn timeout(mut self, d: &str) -> HealthCheck {
        self.0.insert("timeout".into(), Value::String(d.into()));
        self
    }
}

// ---------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------

/// One entry of `routes`.
#[derive(Debug, Clone, PartialEq)]
pub struct Route(Map<String, Value>);

impl Route {
    /// `{name, path_prefix, service}`: upstreams and the rest still to set.
    pub fn new(name: &str, path_prefix: &str, service: &str) -> Route {
        let mut m = Map::new();
        m.insert("name".into(), Value::String(name.into()));
        m.insert("path_prefix".into(), Value::String(path_prefix.into()));
        m.insert("service".into(), Value::String(service.into()));
        Route(m)
    }

    /// The common test route: the prefix stripped, one upstream.
    pub fn stripped(
        name: &str,
        path_prefix: &str,
        service: &str,
        upstream: impl fmt::Display,
    ) -> Route {
        Route::new(name, path_prefix, service)
            .strip_prefix(true)
            .upstream(upstream)
    }

    /// `{name: chat, path_prefix: /chat/, service: chat, strip_prefix:
    /// true, upstreams: [upstream]}`.
    pub fn chat(upstream: impl fmt::Display) -> Route {
        Route::stripped("chat", "/chat/", "chat", upstream)
    }

    /// `strip_prefix: true` (the whole `path_prefix`) or `false`.
    pub fn strip_prefix(mut self, strip: bool) -> Route {
        self.0.insert("strip_prefix".into(), Value::Bool(strip));
        self
    }

    /// `strip_prefix: <part>`: only this start of `path_prefix`.
    pub fn strip_prefix_part(mut self, part: &str) -> Route {
        self.0
            .insert("strip_prefix".into(), Value::String(part.into()));
        self
    }

    /// Adds one upstream (`host:port` or `https://host:port`).
    pub fn upstream(mut self, upstream: impl fmt::Display) -> Route {
        let list = self
            .0
            .entry("upstreams")
            .or_insert_with(|| Value::Array(Vec::new()));
        list.as_array_mut()
            .expect("upstreams is a list")
            .push(Value::String(upstream.to_string()));
        self
    }

    /// Adds each of `upstreams`; with none, writes `upstreams: []`.
    pub fn upstreams<S: fmt::Display>(mut self, upstreams: impl IntoIterator<Item = S>) -> Route {
        self.0
            .entry("upstreams")
            .or_insert_with(|| Value::Array(Vec::new()));
        for u in upstreams {
            self = self.upstream(u);
        }
        self
    }

    pub fn methods<S: ToString>(mut self, methods: impl IntoIterator<Item = S>) -> Route {
        self.0.insert("methods".into(), strings(methods));
        self
    }

    pub fn upstream_ca(mut self, path: impl AsRef<Path>) -> Route {
        self.0.insert("upstream_ca".into(), path_value(path));
        self
    }

    pub fn connect_timeout(mut self, d: &str) -> Route {
        self.0
            .insert("connect_timeout".into(), Value::String(d.into()));
        self
    }

    pub fn read_timeout(mut self, d: &str) -> Route {
        self.0
            .insert("read_timeout".into(), Value::String(d.into()));
        self
    }

    pub fn health_check(mut self, check: HealthCheck) -> Route {
        self.0.insert("health_check".into(), Value::Object(check.0));
        self
    }

    pub fn websocket(mut self, on: bool) -> Route {
        self.0.insert("websocket".into(), Value::Bool(on));
        self
    }

    pub fn allow_path_params(mut self, on: bool) -> Route {
        self.0.insert("allow_path_params".into(), Value::Bool(on));
        self
    }

    /// `"5/s"`, `"60/min"`, ...
    pub fn rate_limit(mut self, rate: &str) -> Route {
        self.0
            .insert("rate_limit".into(), Value::String(rate.into()));
        self
    }

    pub fn max_concurrent(mut self, n: u32) -> Route {
        self.0.insert("max_concurrent".into(), n.into());
        self
    }

    /// `"10MB"`, `"1KiB"`, or a bare number of bytes (`512`).
    pub fn max_body_size(mut self, size: impl Into<Value>) -> Route {
        self.0.insert("max_body_size".into(), size.into());
        self
    }

    /// `"10/h"`, ...
    pub fn token_limit(mut self, rate: &str) -> Route {
        self.0
            .insert("token_limit".into(), Value::String(rate.into()));
        self
    }

    /// Addresses and ranges (`"10.0.0.0/8"`, `"::1"`).
    pub fn allow<S: ToString>(mut self, ranges: impl IntoIterator<Item = S>) -> Route {
        self.0.insert("allow".into(), strings(ranges));
        self
    }

    pub fn cors(mut self, cors: Cors) -> Route {
        self.0.insert("cors".into(), Value::Object(cors.0));
        self
    }

    /// `ollama` or `openai`.
    pub fn api(mut self, api: &str) -> Route {
        self.0.insert("api".into(), Value::String(api.into()));
        self
    }

    pub fn include_usage(mut self, on: bool) -> Route {
        self.0.insert("include_usage".into(), Value::Bool(on));
        self
    }

    /// Adds `pattern: [upstreams]` to `models`.
    pub fn model<S: fmt::Display>(
        mut self,
        pattern: &str,
        upstreams: impl IntoIterator<Item = S>,
    ) -> Route {
        let models = self
            .0
            .entry("models")
            .or_insert_with(|| Value::Object(Map::new()));
        models.as_object_mut().expect("models is a map").insert(
            pattern.into(),
            strings(upstreams.into_iter().map(|u| u.to_string())),
        );
        self
    }

    /// Any field, as is: for tests of config errors (a misspelt field, a
    /// value of the wrong type).
    pub fn field(mut self, name: &str, value: impl Into<Value>) -> Route {
        self.0.insert(name.into(), value.into());
        self
    }
}

// ---------------------------------------------------------------------------
// The whole config
// ---------------------------------------------------------------------------

/// Where the admin listener goes.
#[derive(Debug, Clone, PartialEq)]
enum Admin {
    /// A free loopback port, chosen by `Gateway::start`.
    FreePort,
    At(String),
}

/// A gateway config file (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    listen: Vec<Listen>,
    admin: Option<Admin>,
    /// Every other top-level setting but `routes`, in the order set.
    settings: Map<String, Value>,
    routes: Vec<Route>,
    extra_yaml: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig::new()
    }
}

impl GatewayConfig {
    /// `keys_file: keys.json`, `shutdown_grace: 5s`, no listener (see
    /// [`Gateway::start`](super::Gateway::start)) and no routes yet.
    pub fn new() -> GatewayConfig {
        GatewayConfig::bare()
            .keys_file("keys.json")
            .shutdown_grace("5s")
    }

    /// Nothing set at all, not even `keys_file`.
    pub fn bare() -> GatewayConfig {
        GatewayConfig {
            listen: Vec::new(),
            admin: None,
            settings: Map::new(),
            routes: Vec::new(),
            extra_yaml: String::new(),
        }
    }

    fn set(mut self, name: &str, value: impl Into<Value>) -> GatewayConfig {
        self.settings.insert(name.into(), value.into());
        self
    }

    /// Whether the top-level setting `name` is set.
    pub fn has(&self, name: &str) -> bool {
        self.settings.contains_key(name) || (name == "admin_listen" && self.admin.is_some())
    }

    /// Removes a top-level setting (e.g. `shutdown_grace`, to run on the
    /// gateway's default).
    pub fn unset(mut self, name: &str) -> GatewayConfig {
        self.settings.shift_remove(name);
        if name == "admin_listen" {
            self.admin = None;
        }
        self
    }

    // -- listeners --------------------------------------------------------

    /// Adds a plain HTTP listener.
    pub fn listen(mut self, addr: impl fmt::Display) -> GatewayConfig {
        self.listen.push(Listen::Plain(addr.to_string()));
        self
    }

    /// Adds a TLS listener with PEM files.
    pub fn listen_tls(
        mut self,
        addr: impl fmt::Display,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> GatewayConfig {
        self.listen.push(Listen::Tls {
            address: addr.to_string(),
            cert: cert.as_ref().display().to_string(),
            key: key.as_ref().display().to_string(),
        });
        self
    }

    /// Adds a listener that redirects to https.
    pub fn listen_redirect(mut self, addr: impl fmt::Display) -> GatewayConfig {
        self.listen.push(Listen::Redirect(addr.to_string()));
        self
    }

    /// Adds a TLS listener whose certificate comes from ACME.
    pub fn listen_acme(mut self, addr: impl fmt::Display, acme: Acme) -> GatewayConfig {
        self.listen.push(Listen::Acme {
            address: addr.to_string(),
            acme,
        });
        self
    }

    /// The listeners set so far.
    pub fn listeners(&self) -> &[Listen] {
        &self.listen
    }

    /// The admin listener on a free loopback port, chosen when the gateway
    /// starts (see `Gateway::admin`).
    pub fn with_admin(mut self) -> GatewayConfig {
        self.admin = Some(Admin::FreePort);
        self
    }

    /// `admin_listen: <addr>`.
    pub fn admin_listen(mut self, addr: impl fmt::Display) -> GatewayConfig {
        self.admin = Some(Admin::At(addr.to_string()));
        self
    }

    /// The admin address, once it is known (not for [`with_admin`] before
    /// the start).
    ///
    /// [`with_admin`]: GatewayConfig::with_admin
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        match &self.admin {
            Some(Admin::At(a)) => a.parse().ok(),
            _ => None,
        }
    }

    /// Whether the admin port is still to be chosen.
    pub fn wants_free_admin_port(&self) -> bool {
        self.admin == Some(Admin::FreePort)
    }

    // -- top-level settings -----------------------------------------------

    pub fn keys_file(self, path: impl AsRef<Path>) -> GatewayConfig {
        self.set("keys_file", path_value(path))
    }

    pub fn shutdown_grace(self, d: &str) -> GatewayConfig {
        self.set("shutdown_grace", d)
    }

    pub fn threads(self, n: usize) -> GatewayConfig {
        self.set("threads", n)
    }

    pub fn client_header_timeout(self, d: &str) -> GatewayConfig {
        self.set("client_header_timeout", d)
    }

    pub fn client_idle_timeout(self, d: &str) -> GatewayConfig {
        self.set("client_idle_timeout", d)
    }

    pub fn client_body_timeout(self, d: &str) -> GatewayConfig {
        self.set("client_body_timeout", d)
    }

    pub fn max_connections(self, n: u64) -> GatewayConfig {
        self.set("max_connections", n)
    }

    pub fn watch(self, on: bool) -> GatewayConfig {
        self.set("watch", on)
    }

    /// A file (relative to the config's folder) or `-` for stderr.
    pub fn audit_log(self, path: impl AsRef<Path>) -> GatewayConfig {
        self.set("audit_log", path_value(path))
    }

    pub fn metrics_per_user(self, on: bool) -> GatewayConfig {
        self.set("metrics_per_user", on)
    }

    pub fn upgrade_sock(self, path: impl AsRef<Path>) -> GatewayConfig {
        self.set("upgrade_sock", path_value(path))
    }

    pub fn underscores_in_headers(self, on: bool) -> GatewayConfig {
        self.set("underscores_in_headers", on)
    }

    /// The global per-key default, `"2/min"`, ...
    pub fn rate_limit(self, rate: &str) -> GatewayConfig {
        self.set("rate_limit", rate)
    }

    pub fn max_concurrent(self, n: u32) -> GatewayConfig {
        self.set("max_concurrent", n)
    }

    /// `"10MB"`, `"1KiB"`, or a bare number of bytes.
    pub fn max_body_size(self, size: impl Into<Value>) -> GatewayConfig {
        self.set("max_body_size", size)
    }

    pub fn token_limit(self, rate: &str) -> GatewayConfig {
        self.set("token_limit", rate)
    }

    /// The global allow list.
    pub fn allow<S: ToString>(self, ranges: impl IntoIterator<Item = S>) -> GatewayConfig {
        self.set("allow", strings(ranges))
    }

    pub fn trusted_proxies<S: ToString>(
        self,
        ranges: impl IntoIterator<Item = S>,
    ) -> GatewayConfig {
        self.set("trusted_proxies", strings(ranges))
    }

    pub fn failed_key_throttle(self, throttle: Throttle) -> GatewayConfig {
        self.set("failed_key_throttle", Value::Object(throttle.0))
    }

    pub fn shared_state(self, shared: SharedState) -> GatewayConfig {
        self.set("shared_state", Value::Object(shared.0))
    }

    pub fn alerts(self, alerts: Alerts) -> GatewayConfig {
        self.set("alerts", Value::Object(alerts.0))
    }

    /// Any top-level setting, as is: for tests of config errors.
    pub fn setting(self, name: &str, value: impl Into<Value>) -> GatewayConfig {
        self.set(name, value)
    }

    // -- routes -------------------------------------------------------------

    pub fn route(mut self, route: Route) -> GatewayConfig {
        self.routes.push(route);
        self
    }

    pub fn routes(mut self, routes: impl IntoIterator<Item = Route>) -> GatewayConfig {
        self.routes.extend(routes);
        self
    }

    /// YAML text added at the end of the file, as written: ONLY for tests
    /// whose subject is config parsing or validation (broken or unusual
    /// YAML). With no routes built, `routes:` is left to this text.
    pub fn extra_yaml(mut self, yaml: &str) -> GatewayConfig {
        self.extra_yaml.push_str(yaml);
        if !self.extra_yaml.ends_with('\n') {
            self.extra_yaml.push('\n');
        }
        self
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        match self.listen.as_slice() {
            [] => {}
            [Listen::Plain(a)] => {
                out.push_str(&format!("listen: {}\n", flow(&Value::String(a.clone()))))
            }
            all => {
                out.push_str("listen:\n");
                for l in all {
                    out.push_str(&format!("  - {}\n", flow(&l.value())));
                }
            }
        }
        for (name, value) in &self.settings {
            out.push_str(&format!("{name}: {}\n", flow(value)));
        }
        match &self.admin {
            Some(Admin::At(a)) => out.push_str(&format!(
                "admin_listen: {}\n",
                flow(&Value::String(a.clone()))
            )),
            Some(Admin::FreePort) => panic!("render: the admin port is chosen by Gateway::start"),
            None => {}
        }
        if !self.routes.is_empty() || self.extra_yaml.is_empty() {
            if self.routes.is_empty() {
                out.push_str("routes: []\n");
            } else {
                out.push_str("routes:\n");
                for r in &self.routes {
                    out.push_str(&format!("  - {}\n", flow(&Value::Object(r.0.clone()))));
                }
            }
        }
        out.push_str(&self.extra_yaml);
        out
    }
}

impl fmt::Display for GatewayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// What [`GatewayFiles::write`](super::GatewayFiles::write) and friends
/// accept as the config file: a built [`GatewayConfig`], or text (for
/// shipped configs and tests of config errors).
pub trait ConfigText {
    fn config_text(&self) -> String;
}

impl ConfigText for GatewayConfig {
    fn config_text(&self) -> String {
        self.render()
    }
}

impl ConfigText for str {
    fn config_text(&self) -> String {
        self.to_string()
    }
}

impl ConfigText for String {
    fn config_text(&self) -> String {
        self.clone()
    }
}

impl<T: ConfigText + ?Sized> ConfigText for &T {
    fn config_text(&self) -> String {
        (**self).config_text()
    }
}

// ---------------------------------------------------------------------------
// Key files
// ---------------------------------------------------------------------------

/// One key file entry: the key and its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    key: String,
    fields: Map<String, Value>,
}

impl Key {
    /// `"<key>": {"user": <user>}`; services and the rest still to set.
    pub fn new(key: &str, user: &str) -> Key {
        let mut fields = Map::new();
        fields.insert("user".into(), Value::String(user.into()));
        Key {
            key: key.into(),
            fields,
        }
    }

    /// The key (plaintext or `sha256:` digest) this entry stands for.
    pub fn key(&self) -> &str {
        &self.key
    }

    fn set(mut self, name: &str, value: impl Into<Value>) -> Key {
        self.fields.insert(name.into(), value.into());
        self
    }

    pub fn service(self, service: &str) -> Key {
        self.set("service", service)
    }

    pub fn services<S: ToString>(self, services: impl IntoIterator<Item = S>) -> Key {
        self.set("services", strings(services))
    }

    pub fn rate_limit(self, rate: &str) -> Key {
        self.set("rate_limit", rate)
    }

    pub fn max_concurrent(self, n: u32) -> Key {
        self.set("max_concurrent", n)
    }

    pub fn token_limit(self, rate: &str) -> Key {
        self.set("token_limit", rate)
    }

    pub fn models<S: ToString>(self, models: impl IntoIterator<Item = S>) -> Key {
        self.set("models", strings(models))
    }

    /// RFC 3339, e.g. `"2001-01-01T00:00:00Z"`.
    pub fn expires_at(self, at: &str) -> Key {
        self.set("expires_at", at)
    }

    pub fn created_at(self, at: &str) -> Key {
        self.set("created_at", at)
    }

    pub fn disabled(self, disabled: bool) -> Key {
        self.set("disabled", disabled)
    }

    /// `end_user_header` and, when not empty, `end_user_limits`.
    pub fn end_users(self, header: &str, limits: Limits) -> Key {
        let k = self.set("end_user_header", header);
        if limits.0.is_empty() {
            return k;
        }
        k.set("end_user_limits", Value::Object(limits.0))
    }

    /// The key's own `alerts` (over the config's).
    pub fn alerts(self, alerts: Alerts) -> Key {
        self.set("alerts", Value::Object(alerts.0))
    }

    /// Any field, as is: for tests of key-file errors.
    pub fn field(self, name: &str, value: impl Into<Value>) -> Key {
        self.set(name, value)
    }
}

/// `end_user_limits: {rate_limit, max_concurrent, token_limit}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits(Map<String, Value>);

impl Limits {
    pub fn new() -> Limits {
        Limits::default()
    }

    pub fn rate_limit(mut self, rate: &str) -> Limits {
        self.0.insert("rate_limit".into(), rate.into());
        self
    }

    pub fn max_concurrent(mut self, n: u32) -> Limits {
        self.0.insert("max_concurrent".into(), n.into());
        self
    }

    pub fn token_limit(mut self, rate: &str) -> Limits {
        self.0.insert("token_limit".into(), rate.into());
        self
    }
}

/// `alerts: {webhook, at, timeout}`, at the top of the config or in a key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Alerts(Map<String, Value>);

impl Alerts {
    pub fn new() -> Alerts {
        Alerts::default()
    }

    pub fn webhook(mut self, url: &str) -> Alerts {
        self.0.insert("webhook".into(), url.into());
        self
    }

    pub fn at(mut self, thresholds: &[f64]) -> Alerts {
        self.0
            .insert("at".into(), thresholds.iter().copied().collect());
        self
    }

    pub fn timeout(mut self, d: &str) -> Alerts {
        self.0.insert("timeout".into(), d.into());
        self
    }
}

/// A key file (JSON), entries in the order added.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyFile(Vec<Key>);

impl KeyFile {
    /// No keys: `{}`.
    pub fn new() -> KeyFile {
        KeyFile::default()
    }

    pub fn of(keys: impl IntoIterator<Item = Key>) -> KeyFile {
        KeyFile(keys.into_iter().collect())
    }

    pub fn key(mut self, key: Key) -> KeyFile {
        self.0.push(key);
        self
    }

    /// The file's text: pretty JSON, one field a line.
    pub fn render(&self) -> String {
        let mut m = Map::new();
        for k in &self.0 {
            m.insert(k.key.clone(), Value::Object(k.fields.clone()));
        }
        let mut text =
            serde_json::to_string_pretty(&Value::Object(m)).expect("a JSON value serializes");
        text.push('\n');
        text
    }
}

impl fmt::Display for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl From<Key> for KeyFile {
    fn from(k: Key) -> KeyFile {
        KeyFile(vec![k])
    }
}
