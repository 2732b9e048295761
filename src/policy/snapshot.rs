//! The snapshot: configuration, routes and keys compiled together into one
//! immutable value, and the request decision made against it.
//!
//! The proxy holds the current snapshot in an `ArcSwap`. A request loads it
//! once and keeps that `Arc` to its end, so a reload never changes the rules
//! under a request in flight, and the hot path takes no lock.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::credentials::Credential;
use super::path::{has_path_params, is_ambiguous_path, without_path_params};
use super::refusal::Refusal;
use super::request::{Request, Upgrade};
use super::routes::{Route, Router};
use crate::config::{any_contains, any_model_matches, Config, Limits, LoadError, ModelPattern};
use crate::keys::{KeyExtras, KeyStore, Principal, ServiceTable};
use crate::state::{Carried, EndUserTable, InFlightGuard, KeyCounter, TokenMeter};
use crate::usage::NamedModel;

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
    /// Per-key rate and concurrency counters by key ordinal, taken from
    /// [`Carried`] so they outlive the snapshot; empty when no limit is set
    /// anywhere.
    key_counters: Box<[Arc<KeyCounter>]>,
    /// End user tables by [`KeyExtras::slot`], taken from [`Carried`] too.
    end_user_tables: Box<[Option<Arc<EndUserTable>>]>,
}

impl Snapshot {
    /// Reads the config at `config_path` and the key file it names, and
    /// compiles both. Nothing of a previous snapshot is changed, so a
    /// failure here leaves the running one untouched; upstream health is
    /// taken from `health`, where it outlives snapshots.
    pub fn load(
        config_path: &Path,
        generation: u64,
        carried: &Carried,
    ) -> Result<Snapshot, LoadError> {
        let config = Config::load(config_path)?;
        let keys_text = std::fs::read_to_string(&config.keys_file)
            .map_err(|e| LoadError::io(&config.keys_file, e))?;
        let mut snapshot = Snapshot::compile(config, &keys_text, generation, carried)?;
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
        carried: &Carried,
    ) -> Result<Snapshot, LoadError> {
        let mut services = ServiceTable::default();
        let router = Router::build(&config.routes, &mut services, &carried.upstreams);
        let keys = KeyStore::parse(&config.keys_file, keys_text, &services)?;
        let warnings = unserved_warnings(&config, &keys);
        let any_limit = config.limits.counted()
            || config.routes.iter().any(|r| r.limits.counted())
            || keys.any_own_limits();
        let key_counters = if any_limit {
            let mut by_ordinal: Vec<_> = keys.ids().collect();
            by_ordinal.sort_unstable_by_key(|(_, ordinal)| *ordinal);
            carried
                .keys
                .handles(by_ordinal.into_iter().map(|(id, _)| id))
                .into_boxed_slice()
        } else {
            carried.keys.handles(std::iter::empty());
            Box::default()
        };
        let end_user_tables = carried.end_users.handles(&keys.end_user_keys());
        Ok(Snapshot {
            config,
            router,
            keys,
            services,
            generation,
            warnings,
            key_counters,
            end_user_tables,
        })
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

    /// Decides a request: path, route, method, upgrade, then key. `now_ms`
    /// is the current time in Unix milliseconds, against which expiry is
    /// checked. The route is part of the answer even when the request is
    /// refused, so callers never look it up again.
    #[inline]
    pub fn decide(&self, req: &Request<'_>, now_ms: i64) -> Decision<'_> {
        if let Some(allow) = &self.config.allow {
            if !any_contains(allow, req.client) {
                return Decision::refused(None, Refusal::IpNotAllowed);
            }
        }
        if is_ambiguous_path(req.path) {
            return Decision::refused(None, Refusal::BadPath);
        }
        let Some(found) = self.router.find(req.path) else {
            return Decision::refused(None, Refusal::NoRoute);
        };
        let (_, route) = found;
        if has_path_params(req.path) && !self.params_route_the_same(req.path, found.0, route) {
            return Decision::refused(None, Refusal::BadPath);
        }
        if let Some(allow) = &route.allowed_clients {
            if !any_contains(allow, req.client) {
                return Decision::refused(Some(found), Refusal::IpNotAllowed);
            }
        }
        if req.preflight && route.cors_origin(req.origin).is_some() {
            return Decision::refused(Some(found), Refusal::Preflight);
        }
        if !route.allows_method(req.method) {
            return Decision::refused(Some(found), Refusal::MethodNotAllowed);
        }
        match req.upgrade {
            None => {}
            Some(Upgrade::Websocket) if route.websocket => {}
            Some(_) => return Decision::refused(Some(found), Refusal::UpgradeNotAllowed),
        }
        let key = match req.credential {
            Credential::Conflicting => {
                return Decision::refused(Some(found), Refusal::ConflictingKeys)
            }
            Credential::Absent => None,
            Credential::Key(k) => Some(k),
        };
        let verdict = match self.keys.check(key, route.service, now_ms) {
            Err(denial) => Err(Refusal::Key(denial)),
            Ok(principal) => {
                let max_body = route.limits.max_body.or(self.config.limits.max_body);
                if req
                    .content_length
                    .zip(max_body)
                    .is_some_and(|(n, max)| n > max)
                {
                    Err(Refusal::BodyTooLarge)
                } else {
                    Ok(principal)
                }
            }
        };
        Decision {
            route: Some(found),
            verdict,
        }
    }

    /// Whether a path with segment parameters may pass on the route it
    /// matched (`index`): only where the route allows them, and only when
    /// the path without them (as servlet-style upstreams read it) is that
    /// route's too, so no stricter route can be slipped past.
    #[cold]
    fn params_route_the_same(&self, path: &str, index: usize, route: &Route) -> bool {
        route.allow_path_params
            && self
                .router
                .find(&without_path_params(path))
                .is_some_and(|(i, _)| i == index)
    }

    /// The limits that apply to `principal` on `route`: the key's own, else
    /// the route's, else the global ones.
    #[inline]
    pub fn limits_for(&self, principal: &Principal<'_>, route: &Route) -> Limits {
        principal.limits.or(route.limits).or(self.config.limits)
    }

    /// The limits counted per key that apply to `principal` on `route`
    /// (a token budget only on routes with `api`), with the key's
    /// counters; `None` when nothing is counted for it.
    #[inline]
    pub fn counted<'s>(
        &'s self,
        principal: &Principal<'_>,
        route: &Route,
    ) -> Option<(Limits, &'s Arc<KeyCounter>)> {
        let mut limits = self.limits_for(principal, route);
        if route.api.is_none() {
            limits.tokens = None;
        }
        if !limits.counted() {
            return None;
        }
        let counter = self.key_counters.get(principal.ordinal as usize)?;
        Some((limits, counter))
    }

    /// The end user table of a key with end users.
    #[inline]
    pub fn end_user_table(&self, extras: &KeyExtras) -> Option<&Arc<EndUserTable>> {
        self.end_user_tables.get(extras.slot as usize)?.as_ref()
    }

    /// Takes what an admitted request uses of its key's limits at `now_ms`
    /// (a monotonic clock), counted on this instance alone: one request of
    /// the rate, and a slot among the concurrent ones, held by the guard
    /// until the request ends. A key whose token budget is used up is
    /// refused; the meter counts the request's tokens into it when it ends.
    pub fn admit(
        &self,
        principal: &Principal<'_>,
        route: &Route,
        now_ms: u64,
    ) -> Result<Admission, Refusal> {
        match self.counted(principal, route) {
            None => Ok(Admission::default()),
            Some((limits, counter)) => admit_locally(limits, counter, now_ms),
        }
    }

    /// Every upstream address the routes name, for carrying state over.
    /// The per-key counters of the key numbered `ordinal` (for the status
    /// page); `None` when no key has limits.
    pub fn key_counter(&self, ordinal: u32) -> Option<&Arc<KeyCounter>> {
        self.key_counters.get(ordinal as usize)
    }

    pub fn upstream_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.router
            .routes()
            .iter()
            .flat_map(|r| r.upstreams().iter().map(|u| u.addr))
            .collect()
    }
}

/// [`Snapshot::admit`] for limits and a counter already found (also what
/// a cluster falls back to while Redis is unreachable).
pub fn admit_locally(
    limits: Limits,
    counter: &Arc<KeyCounter>,
    now_ms: u64,
) -> Result<Admission, Refusal> {
    if let Some(budget) = limits.tokens {
        counter
            .tokens_left(budget, now_ms)
            .map_err(|wait| Refusal::TokenBudgetExceeded {
                retry_after_s: whole_seconds(wait),
            })?;
    }
    if let Some(rate) = limits.rate {
        counter
            .take(rate, now_ms)
            .map_err(|wait| Refusal::RateLimited {
                retry_after_s: whole_seconds(wait),
            })?;
    }
    let slot = match limits.max_concurrent {
        None => None,
        Some(max) => Some(counter.enter(max.get()).ok_or(Refusal::TooManyConcurrent)?),
    };
    Ok(Admission {
        slot,
        tokens: limits
            .tokens
            .map(|budget| TokenMeter::new(Arc::clone(counter), budget)),
        ..Admission::default()
    })
}

/// A wait as the whole seconds of a `Retry-After` (rounded up, at least 1).
pub fn whole_seconds(wait: std::time::Duration) -> u32 {
    u32::try_from(wait.as_millis().div_ceil(1000))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// What an admitted request holds of its key's limits (and its end
/// user's) until it ends.
#[derive(Debug, Default)]
pub struct Admission {
    /// Its place among the key's concurrent requests.
    pub slot: Option<InFlightGuard>,
    /// Where its tokens are counted, when a budget applies.
    pub tokens: Option<TokenMeter>,
    /// Its place among its end user's concurrent requests.
    pub end_user_slot: Option<InFlightGuard>,
    /// Where its tokens are counted for its end user.
    pub end_user_tokens: Option<TokenMeter>,
}

impl Admission {
    /// The key's admission with what the end user's holds.
    pub fn with_end_user(mut self, end_user: Option<Admission>) -> Admission {
        if let Some(e) = end_user {
            self.end_user_slot = e.slot;
            self.end_user_tokens = e.tokens;
        }
        self
    }
}

/// Judges the models a request names (`model`, and Ollama's `name`) for a
/// key that may use only `allowed`: every one must be allowed, so that
/// whichever the upstream acts on is (JSON decoders differ on a repeated
/// member: Go's takes the last, matching names in any case). `named` may
/// be the models found since the last verdict; `ended_without_model` says
/// the whole body has been read and named none.
pub fn judge_models(
    allowed: &[ModelPattern],
    named: &[NamedModel],
    single_object: bool,
    ended_without_model: bool,
) -> Result<(), Refusal> {
    if !single_object {
        return Err(Refusal::ModelUnreadable);
    }
    for m in named {
        match m {
            NamedModel::Name(name) if any_model_matches(allowed, name) => {}
            NamedModel::Name(_) => return Err(Refusal::ModelNotAllowed),
            NamedModel::Unreadable => return Err(Refusal::ModelUnreadable),
        }
    }
    if ended_without_model && named.is_empty() {
        return Err(Refusal::ModelUnreadable);
    }
    Ok(())
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

/// The answer to a request: the route it matched, if any (with its index),
/// and who it is admitted as, or why not.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'a> {
    pub route: Option<(usize, &'a Route)>,
    pub verdict: Result<Principal<'a>, Refusal>,
}

impl<'a> Decision<'a> {
    fn refused(route: Option<(usize, &'a Route)>, why: Refusal) -> Self {
        Decision {
            route,
            verdict: Err(why),
        }
    }
}

/// Loads a snapshot and times it; used at start and on every reload.
pub fn load_timed(
    config_path: &Path,
    generation: u64,
    carried: &Carried,
) -> Result<(Snapshot, std::time::Duration), LoadError> {
    let start = Instant::now();
    let snap = Snapshot::load(config_path, generation, carried)?;
    Ok((snap, start.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyDenial, KeyDigest};
    use http::Method;

    fn ask<'a>(m: &'a Method, path: &'a str, key: Option<&'a [u8]>) -> Request<'a> {
        Request::plain(m, path, key.map_or(Credential::Absent, Credential::Key))
    }

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
        Snapshot::compile(cfg, &keys, 1, &Carried::default()).unwrap()
    }

    #[test]
    fn decision_order_route_method_key() {
        let s = snapshot();
        let now = 0;
        assert_eq!(
            s.decide(&ask(&Method::GET, "/nope", Some(b"ro")), now)
                .verdict
                .unwrap_err(),
            Refusal::NoRoute
        );
        let d = s.decide(&ask(&Method::GET, "/ollama/api/generate", None), now);
        assert_eq!(d.verdict.unwrap_err(), Refusal::MethodNotAllowed);
        assert_eq!(
            d.route.unwrap().1.name,
            "gen",
            "the route comes with the refusal"
        );
        assert_eq!(
            s.decide(&ask(&Method::POST, "/ollama/api/generate", None), now)
                .verdict
                .unwrap_err(),
            Refusal::Key(KeyDenial::Missing)
        );
        let ok = s.decide(
            &ask(&Method::POST, "/ollama/api/generate", Some(b"ro")),
            now,
        );
        assert_eq!(ok.route.unwrap().1.name, "gen");
        assert_eq!(&*ok.verdict.unwrap().user.name, "reader");
        assert_eq!(
            s.decide(&ask(&Method::POST, "/ollama/api/pull", Some(b"ro")), now)
                .verdict
                .unwrap_err(),
            Refusal::Key(KeyDenial::WrongService)
        );
        assert!(s
            .decide(&ask(&Method::POST, "/ollama/api/pull", Some(b"admin")), now)
            .verdict
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
                s.decide(&ask(&Method::POST, p, Some(b"ro")), 0)
                    .verdict
                    .unwrap_err(),
                Refusal::BadPath,
                "{p}"
            );
        }
        for ok in [
            "/ollama/api/generate/..x/.y",
            "/ollama/api/generate/a%20b%3F%25",
        ] {
            assert!(
                s.decide(&ask(&Method::POST, ok, Some(b"ro")), 0)
                    .verdict
                    .is_ok(),
                "{ok}"
            );
        }
    }

    #[test]
    fn segment_parameters_are_refused_unless_the_route_allows_them() {
        let cfg = Config::parse(
            Path::new("/t/g.yaml"),
            r#"
listen: "127.0.0.1:1"
keys_file: k.json
routes:
  - {name: w, path_prefix: /w/, service: s, upstreams: ["127.0.0.1:2"]}
  - {name: admin, path_prefix: /w/admin/, service: admin, upstreams: ["127.0.0.1:2"]}
  - {name: m, path_prefix: /m/, service: s, upstreams: ["127.0.0.1:2"], allow_path_params: true}
  - {name: madmin, path_prefix: /m/admin/, service: admin, upstreams: ["127.0.0.1:2"]}
"#,
        )
        .unwrap();
        let s = Snapshot::compile(
            cfg,
            r#"{"k": {"user": "u", "service": "s"}}"#,
            1,
            &Carried::default(),
        )
        .unwrap();
        let verdict = |p: &str| s.decide(&ask(&Method::GET, p, Some(b"k")), 0).verdict;
        for p in [
            "/w/admin;/x",
            "/w/a;b=1",
            "/w/admin%3B/x",
            "/m/admin;/x",
            "/m/admin%3b/x",
        ] {
            assert_eq!(verdict(p).unwrap_err(), Refusal::BadPath, "{p}");
        }
        for p in ["/m/a;b=1/c", "/m/x;jsessionid=2", "/w/admin-x/y"] {
            assert!(verdict(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn upgrades_and_conflicting_keys_are_refused_after_routing() {
        let s = snapshot();
        let mut req = ask(&Method::POST, "/ollama/api/generate", Some(b"ro"));
        req.upgrade = Some(Upgrade::Websocket);
        let d = s.decide(&req, 0);
        assert_eq!(d.verdict.unwrap_err(), Refusal::UpgradeNotAllowed);
        assert_eq!(d.route.unwrap().1.name, "gen");
        let req = Request::plain(
            &Method::POST,
            "/ollama/api/generate",
            Credential::Conflicting,
        );
        assert_eq!(
            s.decide(&req, 0).verdict.unwrap_err(),
            Refusal::ConflictingKeys
        );
    }

    #[test]
    fn every_model_named_must_be_allowed() {
        let allowed: Vec<ModelPattern> = ["llama3.2", "qwen*"]
            .iter()
            .map(|p| ModelPattern::parse(p).unwrap())
            .collect();
        let name = |s: &str| NamedModel::Name(s.into());
        assert_eq!(judge_models(&allowed, &[name("qwen2")], true, true), Ok(()));
        assert_eq!(
            judge_models(
                &allowed,
                &[name("llama3.2:latest"), name("qwen2")],
                true,
                true
            ),
            Ok(())
        );
        assert_eq!(
            judge_models(&allowed, &[name("qwen2"), name("mistral")], true, true),
            Err(Refusal::ModelNotAllowed)
        );
        assert_eq!(
            judge_models(&allowed, &[NamedModel::Unreadable], true, false),
            Err(Refusal::ModelUnreadable)
        );
        assert_eq!(
            judge_models(&allowed, &[], true, false),
            Ok(()),
            "not read yet"
        );
        assert_eq!(
            judge_models(&allowed, &[], true, true),
            Err(Refusal::ModelUnreadable)
        );
        assert_eq!(
            judge_models(&allowed, &[name("qwen2")], false, false),
            Err(Refusal::ModelUnreadable)
        );
    }

    #[test]
    fn summary_and_warnings() {
        let s = snapshot();
        assert_eq!(s.summary(), "2 routes, 2 keys");
        assert!(s.warnings.is_empty());
    }
}
