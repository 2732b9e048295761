//! The request decision: key extraction (`presented_key`), then
//! `Snapshot::decide` (dot segments, longest-prefix route, method, key)
//! and `Route::upstream_target`, on a snapshot compiled once from a fixed
//! config and key file. Every outcome is compared with a brute-force model
//! of the same rules, written here independently of the gateway's code.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use ai_gateway::config::Config;
use ai_gateway::keys::{KeyDenial, KeyDigest};
use ai_gateway::policy::{presented_key, Credential, Refusal, Request, Snapshot};
use ai_gateway::state::Carried;
use http::{HeaderMap, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;

#[path = "decision_input.rs"]
mod decision_input;
use decision_input::{Input, KeyIn, MethodIn, Now, Scheme, KNOWN_KEYS, PATH_STARTS};

const CONFIG: &str = r#"
listen: "127.0.0.1:1"
keys_file: keys.json
routes:
  - {name: ollama-generate, path_prefix: /ollama/api/generate, methods: [POST], service: ollama, strip_prefix: /ollama, upstreams: ["127.0.0.1:2"]}
  - {name: ollama-chat, path_prefix: /ollama/api/chat, methods: [POST], service: ollama, strip_prefix: /ollama, upstreams: ["127.0.0.1:2"]}
  - {name: ollama-admin, path_prefix: /ollama/, service: ollama-admin, strip_prefix: true, upstreams: ["127.0.0.1:2"]}
  - {name: tts, path_prefix: /tts/, service: tts, strip_prefix: true, upstreams: ["127.0.0.1:3"]}
  - {name: tts-bare, path_prefix: /tts, service: tts, strip_prefix: true, upstreams: ["127.0.0.1:3"]}
  - {name: openai, path_prefix: /v1/, methods: [GET, POST], service: openai, upstreams: ["127.0.0.1:4", "127.0.0.1:5"]}
  - {name: root, path_prefix: /, methods: [GET], service: root, strip_prefix: true, upstreams: ["127.0.0.1:6"]}
"#;

/// The routes as the model sees them: name, prefix, methods, service,
/// strip prefix.
struct ModelRoute {
    name: &'static str,
    prefix: &'static str,
    methods: Option<&'static [&'static str]>,
    service: &'static str,
    strip: Option<&'static str>,
}

const ROUTES: &[ModelRoute] = &[
    ModelRoute {
        name: "ollama-generate",
        prefix: "/ollama/api/generate",
        methods: Some(&["POST"]),
        service: "ollama",
        strip: Some("/ollama"),
    },
    ModelRoute {
        name: "ollama-chat",
        prefix: "/ollama/api/chat",
        methods: Some(&["POST"]),
        service: "ollama",
        strip: Some("/ollama"),
    },
    ModelRoute {
        name: "ollama-admin",
        prefix: "/ollama/",
        methods: None,
        service: "ollama-admin",
        strip: Some("/ollama/"),
    },
    ModelRoute {
        name: "tts",
        prefix: "/tts/",
        methods: None,
        service: "tts",
        strip: Some("/tts/"),
    },
    ModelRoute {
        name: "tts-bare",
        prefix: "/tts",
        methods: None,
        service: "tts",
        strip: Some("/tts"),
    },
    ModelRoute {
        name: "openai",
        prefix: "/v1/",
        methods: Some(&["GET", "POST"]),
        service: "openai",
        strip: None,
    },
    ModelRoute {
        name: "root",
        prefix: "/",
        methods: Some(&["GET"]),
        service: "root",
        strip: Some("/"),
    },
];

/// 2027-01-01T00:00:00Z in Unix milliseconds: when `k-tts` expires.
const EXPIRY_MS: i64 = 1_798_761_600_000;

/// The keys as the model sees them: key, user, services (`None` for "*"),
/// expiry, disabled.
struct ModelKey {
    key: &'static str,
    user: &'static str,
    services: Option<&'static [&'static str]>,
    expires_at_ms: i64,
    disabled: bool,
}

const KEYS: &[ModelKey] = &[
    ModelKey {
        key: "k-ollama",
        user: "olly",
        services: Some(&["ollama"]),
        expires_at_ms: i64::MAX,
        disabled: false,
    },
    ModelKey {
        key: "k-admin",
        user: "root",
        services: None,
        expires_at_ms: i64::MAX,
        disabled: false,
    },
    ModelKey {
        key: "k-tts",
        user: "talker",
        services: Some(&["tts"]),
        expires_at_ms: EXPIRY_MS,
        disabled: false,
    },
    ModelKey {
        key: "k-off",
        user: "gone",
        services: None,
        expires_at_ms: i64::MAX,
        disabled: true,
    },
    ModelKey {
        key: "k-openai",
        user: "oai",
        services: Some(&["openai", "tts"]),
        expires_at_ms: i64::MAX,
        disabled: false,
    },
    ModelKey {
        key: "k-root",
        user: "rooty",
        services: Some(&["root"]),
        expires_at_ms: i64::MAX,
        disabled: false,
    },
    ModelKey {
        key: "k-ghost",
        user: "ghost",
        services: Some(&["no-such-service"]),
        expires_at_ms: i64::MAX,
        disabled: false,
    },
];

fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let config = Config::parse(Path::new("/fuzz/gateway.yaml"), CONFIG).expect("config");
        let openai = KeyDigest::of(b"k-openai").to_hex();
        let keys = format!(
            r#"{{
  "k-ollama": {{"user": "olly", "service": "ollama"}},
  "k-admin": {{"user": "root", "service": "*"}},
  "k-tts": {{"user": "talker", "services": ["tts"], "expires_at": "2027-01-01T00:00:00Z"}},
  "k-off": {{"user": "gone", "service": "*", "disabled": true}},
  "sha256:{openai}": {{"user": "oai", "services": ["openai", "tts"]}},
  "k-root": {{"user": "rooty", "service": "root"}},
  "k-ghost": {{"user": "ghost", "service": "no-such-service"}}
}}"#
        );
        let snapshot = Snapshot::compile(config, &keys, 1, &Carried::default()).expect("snapshot");
        assert_eq!(snapshot.router.len(), ROUTES.len());
        assert_eq!(snapshot.keys.len(), KEYS.len());
        assert!(KNOWN_KEYS.iter().all(|k| KEYS.iter().any(|m| m.key == *k)));
        snapshot
    })
}

fn key_bytes<'a>(k: &KeyIn<'a>) -> &'a [u8] {
    match k {
        KeyIn::Known(i) => KNOWN_KEYS[usize::from(*i) % KNOWN_KEYS.len()].as_bytes(),
        KeyIn::Raw(b) => b,
    }
}

fn pad(n: u8) -> &'static [u8] {
    [&b""[..], b" ", b"\t", b"  \t "][usize::from(n) % 4]
}

/// The model's key extraction: `X-API-Key` trimmed (unless it is empty
/// and there is an `Authorization` header), else the token of
/// `Authorization: Bearer`, without surrounding whitespace.
/// The model's credential: `None` for none, `Some(Err(()))` for two
/// different keys, `Some(Ok(key))` for one.
type ModelCredential = Option<Result<Vec<u8>, ()>>;

fn model_key(headers: &HeaderMap) -> ModelCredential {
    let trim = |v: &[u8]| -> Vec<u8> {
        match v.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(first) => {
                let last = v.iter().rposition(|b| !b.is_ascii_whitespace()).unwrap();
                v[first..=last].to_vec()
            }
            None => Vec::new(),
        }
    };
    let mut keys: Vec<Vec<u8>> = Vec::new();
    if let Some(v) = headers.get("x-api-key") {
        keys.push(trim(v.as_bytes()));
    }
    if let Some(auth) = headers.get("authorization").map(|a| a.as_bytes()) {
        if auth.len() >= 7 && auth[..7].eq_ignore_ascii_case(b"bearer ") {
            keys.push(trim(&auth[7..]));
        }
    }
    keys.retain(|k| !k.is_empty());
    keys.dedup();
    match keys.len() {
        0 => None,
        1 => Some(Ok(keys.remove(0))),
        _ => Some(Err(())),
    }
}

/// A literal backslash; a `.`/`..` segment, also before `;` parameters
/// (literal or `%3b`); or a percent-escape that is malformed or decodes to
/// an unreserved character, a (back)slash or a control character, or `%25`
/// before two hex digits (double encoding).
fn model_dot_segment(path: &str) -> bool {
    if path.contains('\\') {
        return true;
    }
    let dot = |seg: &str| {
        let lower = seg.to_ascii_lowercase();
        let end = [lower.find(';'), lower.find("%3b")]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(seg.len());
        matches!(&seg[..end], "." | "..")
    };
    if path.split('/').any(dot) {
        return true;
    }
    let b = path.as_bytes();
    let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            match (hex(b.get(i + 1)), hex(b.get(i + 2))) {
                (Some(h), Some(l)) => {
                    let c = (h * 16 + l) as u8;
                    if c.is_ascii_alphanumeric() || c.is_ascii_control() || b"-._~/\\".contains(&c)
                    {
                        return true;
                    }
                    if c == b'%' && hex(b.get(i + 3)).is_some() && hex(b.get(i + 4)).is_some() {
                        return true;
                    }
                    i += 3;
                    continue;
                }
                _ => return true,
            }
        }
        i += 1;
    }
    false
}

#[derive(Debug, PartialEq)]
enum Expect {
    Admit {
        route: &'static str,
        user: &'static str,
    },
    BadPath,
    NoRoute,
    MethodNotAllowed {
        route: &'static str,
    },
    ConflictingKeys,
    Key(KeyDenial),
}

fn model_decide(method: &Method, path: &str, key: &ModelCredential, now: i64) -> Expect {
    if model_dot_segment(path) {
        return Expect::BadPath;
    }
    // Segment parameters: no route here allows them (`allow_path_params`),
    // and every path reaches a route (`/` is one).
    if path.contains(';') || path.to_ascii_lowercase().contains("%3b") {
        return Expect::BadPath;
    }
    let Some(route) = ROUTES
        .iter()
        .filter(|r| path.starts_with(r.prefix))
        .max_by_key(|r| r.prefix.len())
    else {
        return Expect::NoRoute;
    };
    if let Some(ms) = route.methods {
        if !ms.contains(&method.as_str()) {
            return Expect::MethodNotAllowed { route: route.name };
        }
    }
    let key = match key {
        Some(Err(())) => return Expect::ConflictingKeys,
        None => return Expect::Key(KeyDenial::Missing),
        Some(Ok(k)) => k.as_slice(),
    };
    let Some(k) = KEYS.iter().find(|k| k.key.as_bytes() == key) else {
        return Expect::Key(KeyDenial::Unknown);
    };
    if k.disabled {
        return Expect::Key(KeyDenial::Disabled);
    }
    if now >= k.expires_at_ms {
        return Expect::Key(KeyDenial::Expired);
    }
    if k.services.is_some_and(|s| !s.contains(&route.service)) {
        return Expect::Key(KeyDenial::WrongService);
    }
    Expect::Admit {
        route: route.name,
        user: k.user,
    }
}

/// The model's upstream path: the strip prefix removed; a stripped
/// trailing `/` stays as the leading one, and a missing one is added.
fn model_target(strip: &str, path: &str, query: Option<&str>) -> Vec<u8> {
    let after = path.strip_prefix(strip).expect("the route matched");
    let mut out = String::new();
    if strip.ends_with('/') || !after.starts_with('/') {
        out.push('/');
    }
    out.push_str(after);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out.into_bytes()
}

fuzz_target!(|input: Input| {
    let snapshot = snapshot();

    let method = match input.method {
        MethodIn::Get => Method::GET,
        MethodIn::Post => Method::POST,
        MethodIn::Delete => Method::DELETE,
        MethodIn::Raw(m) => match Method::from_bytes(m.as_bytes()) {
            Ok(m) => m,
            Err(_) => return,
        },
    };
    let start = PATH_STARTS[usize::from(input.path_start) % PATH_STARTS.len()];
    let path = format!("{start}{}", input.path_tail);
    let now = match input.now {
        Now::Before => EXPIRY_MS - 1,
        Now::AtExpiry => EXPIRY_MS,
        Now::After => EXPIRY_MS + 86_400_000,
        Now::Any(t) => t,
    };

    let mut headers = HeaderMap::new();
    if let Some(k) = &input.x_api_key {
        // Invalid header values cannot arrive in a request: skip them.
        if let Ok(v) = HeaderValue::from_bytes(key_bytes(k)) {
            headers.insert("x-api-key", v);
        }
    }
    if let Some(a) = &input.authorization {
        let mut value = match &a.scheme {
            Scheme::Bearer => b"Bearer ".to_vec(),
            Scheme::LowerBearer => b"bearer ".to_vec(),
            Scheme::Basic => b"Basic ".to_vec(),
            Scheme::Raw(s) => s.to_vec(),
        };
        value.extend_from_slice(pad(a.pad_before));
        value.extend_from_slice(key_bytes(&a.key));
        value.extend_from_slice(pad(a.pad_after));
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            headers.insert("authorization", v);
        }
    }

    let credential = presented_key(&headers);
    let model_credential = model_key(&headers);
    let seen: ModelCredential = match credential {
        Credential::Absent => None,
        Credential::Key(k) => Some(Ok(k.to_vec())),
        Credential::Conflicting => Some(Err(())),
    };
    assert_eq!(seen, model_credential, "{headers:?}");
    let key = credential.key();

    let decision = snapshot.decide(&Request::plain(&method, &path, credential), now);
    let got = match decision.verdict {
        Ok(principal) => {
            let (route_index, route) = decision.route.expect("an admitted request has a route");
            // The invariants the gateway's safety rests on, checked
            // directly as well as through the model.
            assert!(path.starts_with(&route.prefix), "{path:?}");
            assert!(!model_dot_segment(&path), "dot segment admitted: {path:?}");
            assert_eq!(principal.id, KeyDigest::of(key.unwrap()).id());
            assert!(std::ptr::eq(
                route,
                snapshot.router.get(route_index).unwrap()
            ));
            let model = ROUTES.iter().find(|r| r.name == route.name).unwrap();
            match route.upstream_target(&path, input.query) {
                Some(target) => {
                    assert!(target.starts_with(b"/"), "{target:?}");
                    let strip = model.strip.expect("a route without strip_prefix");
                    assert_eq!(target, model_target(strip, &path, input.query));
                }
                None => assert!(model.strip.is_none()),
            }
            Expect::Admit {
                route: model.name,
                user: KEYS
                    .iter()
                    .find(|k| *k.user == *principal.user.name)
                    .unwrap()
                    .user,
            }
        }
        Err(Refusal::BadPath) => Expect::BadPath,
        Err(Refusal::NoRoute) => Expect::NoRoute,
        Err(Refusal::MethodNotAllowed) => Expect::MethodNotAllowed {
            route: ROUTES
                .iter()
                .find(|r| r.name == decision.route.expect("a 405 has its route").1.name)
                .unwrap()
                .name,
        },
        Err(Refusal::ConflictingKeys) => Expect::ConflictingKeys,
        Err(Refusal::Key(d)) => Expect::Key(d),
        Err(other) => panic!("the decision never answers {other:?}"),
    };
    assert_eq!(
        got,
        model_decide(&method, &path, &model_credential, now),
        "{method} {path:?} key {key:?} at {now}"
    );

    // upstream_target on every route whose prefix the path has, admitted
    // or not: the result always starts with '/' and keeps the query.
    for route in snapshot.router.routes() {
        if !path.starts_with(&route.prefix) {
            continue;
        }
        if let Some(target) = route.upstream_target(&path, input.query) {
            assert!(target.starts_with(b"/"), "{target:?}");
            if let Some(q) = input.query {
                assert!(target.ends_with(format!("?{q}").as_bytes()));
            }
        }
    }
});
