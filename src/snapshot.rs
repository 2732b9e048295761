//! The snapshot: configuration, routes and keys compiled together into one
//! immutable value, and the request decision made against it.
//!
//! The proxy holds the current snapshot in an `ArcSwap`. A request loads it
//! once and keeps that `Arc` to its end, so a reload never changes the rules
//! under a request in flight, and the hot path takes no lock.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{HeaderMap, Method};

use crate::config::Config;
use crate::error::LoadError;
use crate::keys::{KeyDenial, KeyStore, Principal, ServiceTable};
use crate::metrics::{Metrics, RouteMetrics, NO_ROUTE};
use crate::routes::{Route, Router};

/// The current snapshot, shared by the proxy and the reloader.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// Everything a request decision needs, built once per load.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub router: Router,
    pub keys: KeyStore,
    pub services: ServiceTable,
    /// Counts loads: 1 at start, +1 per successful reload.
    pub generation: u64,
    /// Things worth an operator's attention that did not stop the load.
    pub warnings: Vec<String>,
    /// Metric handles per route (same order as the routes), and for
    /// requests that matched none; empty until [`Snapshot::with_metrics`].
    pub route_metrics: Vec<Arc<RouteMetrics>>,
    pub unrouted_metrics: Option<Arc<RouteMetrics>>,
}

impl Snapshot {
    /// Reads the config at `config_path` and the key file it names, and
    /// compiles both. Nothing is shared with a previous snapshot, so a
    /// failure here leaves the running one untouched.
    pub fn load(config_path: &Path, generation: u64) -> Result<Snapshot, LoadError> {
        let config = Config::load(config_path)?;
        let keys_text = std::fs::read_to_string(&config.keys_file)
            .map_err(|e| LoadError::io(&config.keys_file, e))?;
        let mut snapshot = Snapshot::compile(config, &keys_text, generation)?;
        if let Some(w) = permission_warning(&snapshot.config.keys_file) {
            snapshot.warnings.insert(0, w);
        }
        Ok(snapshot)
    }

    /// Compiles a parsed config and the key file's text.
    pub fn compile(
        config: Config,
        keys_text: &str,
        generation: u64,
    ) -> Result<Snapshot, LoadError> {
        let mut services = ServiceTable::default();
        let router = Router::build(&config.routes, &mut services);
        let keys = KeyStore::parse(&config.keys_file, keys_text, &services)?;
        let warnings = unserved_warnings(&config, &keys);
        Ok(Snapshot {
            config,
            router,
            keys,
            services,
            generation,
            warnings,
            route_metrics: Vec::new(),
            unrouted_metrics: None,
        })
    }

    /// Resolves each route's metric handles once, so recording a request
    /// touches only atomics, and publishes the snapshot's gauges.
    pub fn with_metrics(mut self, metrics: &Metrics) -> Snapshot {
        self.route_metrics = self
            .router
            .routes()
            .iter()
            .map(|r| metrics.route(&r.name))
            .collect();
        self.unrouted_metrics = Some(metrics.route(NO_ROUTE));
        metrics
            .keys_loaded
            .set(i64::try_from(self.keys.len()).unwrap_or(i64::MAX));
        metrics
            .routes_loaded
            .set(i64::try_from(self.router.len()).unwrap_or(i64::MAX));
        metrics
            .generation
            .set(i64::try_from(self.generation).unwrap_or(i64::MAX));
        self
    }

    /// The metric handles for a route index, or for unrouted requests.
    #[inline]
    pub fn metrics_for(&self, route_index: Option<usize>) -> Option<&RouteMetrics> {
        match route_index {
            Some(i) => self.route_metrics.get(i).map(|m| &**m),
            None => self.unrouted_metrics.as_deref(),
        }
    }

    /// A one-line summary for logs and `check`.
    pub fn summary(&self) -> String {
        let plural =
            |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        format!(
            "{}, {}",
            plural(self.router.len(), "route", "routes"),
            plural(self.keys.len(), "key", "keys")
        )
    }

    /// Decides a request: route, method, then key. `now_ms` is the current
    /// time in Unix milliseconds, against which expiry is checked.
    #[inline]
    pub fn decide(
        &self,
        method: &Method,
        path: &str,
        key: Option<&[u8]>,
        now_ms: i64,
    ) -> Result<Admitted<'_>, Denial> {
        if is_ambiguous_path(path) {
            return Err(Denial::BadPath);
        }
        let (route_index, route) = self.router.find(path).ok_or(Denial::NoRoute)?;
        if !route.allows_method(method) {
            return Err(Denial::MethodNotAllowed { route_index });
        }
        let principal = self
            .keys
            .check(key, route.service, now_ms)
            .map_err(Denial::Key)?;
        Ok(Admitted {
            route_index,
            route,
            principal,
        })
    }
}

/// Keys that name services no route serves: most likely typos.
fn unserved_warnings(config: &Config, keys: &KeyStore) -> Vec<String> {
    keys.unserved_services
        .iter()
        .map(|(service, n)| {
            format!(
                "{}: service {service:?} (named by {n} key(s)) is not served by any route",
                config.keys_file.display()
            )
        })
        .collect()
}

/// A key file that others can read leaks every plaintext key in it, and
/// lets anyone with a digest test guesses offline.
fn permission_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{}: the key file is readable by group or others (mode {mode:04o}); fix: chmod 600 {}",
            path.display(),
            path.display()
        )
    })
}

/// A request that may go upstream.
#[derive(Debug, Clone, Copy)]
pub struct Admitted<'a> {
    pub route_index: usize,
    pub route: &'a Route,
    pub principal: Principal<'a>,
}

/// Why a request is answered by the gateway itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The path has `.` or `..` segments or an escape the upstream may
    /// decode differently: refused so that a prefix such as
    /// `/ollama/api/generate` cannot be escaped into another endpoint.
    BadPath,
    NoRoute,
    MethodNotAllowed {
        route_index: usize,
    },
    Key(KeyDenial),
}

/// The key a request presents: `X-API-Key`, else `Authorization: Bearer`.
#[inline]
pub fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("x-api-key") {
        let v = trim_ascii(v.as_bytes());
        // An empty X-API-Key (a client default) does not hide a Bearer token.
        if !v.is_empty() || !headers.contains_key("authorization") {
            return Some(v);
        }
    }
    let auth = headers.get("authorization")?.as_bytes();
    let (scheme, rest) = (auth.get(..7)?, auth.get(7..)?);
    if scheme.eq_ignore_ascii_case(b"bearer ") {
        Some(trim_ascii(rest))
    } else {
        None
    }
}

fn trim_ascii(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

/// True if `path` could mean something different to the upstream than
/// to the router: a `.` or `..` segment, or a percent-escape that decodes
/// to an unreserved character or a (back)slash. Such escapes are never
/// needed (RFC 3986 says to decode unreserved ones), and an upstream that
/// decodes them could otherwise be reached on a path no route allowed:
/// `/v1/%61dmin/` or `/v1/admin%2Fx` past a stricter `/v1/admin/` route,
/// `/ollama/api/generate/..%2Fpull` past a narrower prefix. A malformed
/// escape is refused too.
fn is_ambiguous_path(path: &str) -> bool {
    let b = path.as_bytes();
    let mut i = 0;
    while let Some(off) = b
        .get(i..)
        .and_then(|rest| rest.iter().position(|c| *c == b'%'))
    {
        let at = i + off;
        let decoded = match (
            b.get(at + 1).copied().and_then(hex_digit),
            b.get(at + 2).copied().and_then(hex_digit),
        ) {
            (Some(hi), Some(lo)) => hi << 4 | lo,
            _ => return true,
        };
        if decoded.is_ascii_alphanumeric()
            || matches!(decoded, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\')
        {
            return true;
        }
        i = at + 3;
    }
    path.split('/').any(|seg| seg == "." || seg == "..")
}

fn hex_digit(c: u8) -> Option<u8> {
    char::from(c)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Loads a snapshot and times it; used at start and on every reload.
pub fn load_timed(
    config_path: &Path,
    generation: u64,
) -> Result<(Snapshot, std::time::Duration), LoadError> {
    let start = Instant::now();
    let snap = Snapshot::load(config_path, generation)?;
    Ok((snap, start.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyDigest;
    use http::HeaderValue;

    fn snapshot() -> Snapshot {
        let cfg = Config::parse(
            Path::new("/t/g.yaml"),
            r#"
listen: "127.0.0.1:1"
keys_file: k.json
routes:
  - {name: ollama, path_prefix: /ollama/, service: ollama-admin, strip_prefix: true, upstreams: ["127.0.0.1:2"]}
  - {name: gen, path_prefix: /ollama/api/generate, service: ollama, strip_prefix: true, upstreams: ["127.0.0.1:2"], methods: [POST]}
"#,
        )
        .unwrap();
        let ro = KeyDigest::of(b"ro").to_hex();
        let keys = format!(
            r#"{{"sha256:{ro}": {{"user": "reader", "service": "ollama"}}, "admin": {{"user": "root", "service": "*"}}}}"#
        );
        Snapshot::compile(cfg, &keys, 1).unwrap()
    }

    #[test]
    fn decision_order_route_method_key() {
        let s = snapshot();
        let now = 0;
        assert_eq!(
            s.decide(&Method::GET, "/nope", Some(b"ro"), now)
                .unwrap_err(),
            Denial::NoRoute
        );
        assert!(matches!(
            s.decide(&Method::GET, "/ollama/api/generate", None, now)
                .unwrap_err(),
            Denial::MethodNotAllowed { .. }
        ));
        assert_eq!(
            s.decide(&Method::POST, "/ollama/api/generate", None, now)
                .unwrap_err(),
            Denial::Key(KeyDenial::Missing)
        );
        let ok = s
            .decide(&Method::POST, "/ollama/api/generate", Some(b"ro"), now)
            .unwrap();
        assert_eq!(ok.route.name, "gen");
        assert_eq!(&*ok.principal.user.name, "reader");
        assert_eq!(
            s.decide(&Method::POST, "/ollama/api/pull", Some(b"ro"), now)
                .unwrap_err(),
            Denial::Key(KeyDenial::WrongService)
        );
        assert!(s
            .decide(&Method::POST, "/ollama/api/pull", Some(b"admin"), now)
            .is_ok());
    }

    #[test]
    fn dot_segments_cannot_escape_a_scoped_prefix() {
        let s = snapshot();
        for p in [
            "/ollama/api/generate/../pull",
            "/ollama/api/generate/%2e%2e/pull",
            "/ollama/api/generate/.%2E/pull",
            "/ollama/api/generate/%2e./pull",
            "/ollama/api/generate/./x",
            "/ollama/api/generate/%2E",
            "/ollama/api/generate/..%2Fpull",
            "/ollama/api/generate/..%5cpull",
            "/ollama/api%2Fgenerate",
            "/ollama/api/gener%61te",
            "/ollama/api/generate/%zz",
            "/ollama/api/generate/%2",
        ] {
            assert_eq!(
                s.decide(&Method::POST, p, Some(b"ro"), 0).unwrap_err(),
                Denial::BadPath,
                "{p}"
            );
        }
        for ok in [
            "/ollama/api/generate/..x/.y",
            "/ollama/api/generate/a%20b%3F%25",
        ] {
            assert!(s.decide(&Method::POST, ok, Some(b"ro"), 0).is_ok(), "{ok}");
        }
    }

    #[test]
    fn key_extraction() {
        let mut h = HeaderMap::new();
        assert!(presented_key(&h).is_none());
        h.insert("authorization", HeaderValue::from_static("Bearer  abc "));
        assert_eq!(presented_key(&h), Some(&b"abc"[..]));
        h.insert("authorization", HeaderValue::from_static("bearer xyz"));
        assert_eq!(presented_key(&h), Some(&b"xyz"[..]));
        h.insert("authorization", HeaderValue::from_static("Basic eHl6"));
        assert!(presented_key(&h).is_none());
        h.insert("authorization", HeaderValue::from_static("Bear"));
        assert!(presented_key(&h).is_none());
        h.insert("x-api-key", HeaderValue::from_static("k1"));
        assert_eq!(presented_key(&h), Some(&b"k1"[..]));
        h.insert("authorization", HeaderValue::from_static("Bearer tok"));
        h.insert("x-api-key", HeaderValue::from_static(""));
        assert_eq!(presented_key(&h), Some(&b"tok"[..]));
        h.remove("authorization");
        assert_eq!(presented_key(&h), Some(&b""[..]));
    }

    #[test]
    fn summary_and_warnings() {
        let s = snapshot();
        assert_eq!(s.summary(), "2 routes, 2 keys");
        assert!(s.warnings.is_empty());
    }
}
