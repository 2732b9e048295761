//! Property tests (proptest): digests, key files, longest-prefix routing,
//! upstream targets and dot segments, parsers that must never panic, and
//! AI API bodies read in pieces split anywhere.
//! They run in the ordinary `cargo test`, with proptest's default 256 cases
//! each (`PROPTEST_CASES=5000 cargo test --test properties` for a longer run).
//!
//! The fuzz targets in `fuzz/` cover the same ground with unstructured
//! input; these properties pin down exact expected answers from brute-force
//! reference implementations.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use ai_gateway::config::Config;
use ai_gateway::keys::{KeyDenial, KeyDigest, KeyStore, ServiceTable};
use ai_gateway::policy::{presented_key, Credential, Refusal, Request, Router, Snapshot};
use ai_gateway::state::{Carried, UpstreamBook};
use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------------------
// Digests and key ids.

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

proptest! {
    #[test]
    fn digest_hex_round_trips(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let d = KeyDigest::of(&bytes);
        let hex = d.to_hex();
        prop_assert_eq!(hex.len(), 64);
        prop_assert!(is_lower_hex(&hex), "{}", hex);
        prop_assert_eq!(KeyDigest::from_hex(&hex), Some(d));
        prop_assert_eq!(KeyDigest::from_hex(&hex.to_ascii_uppercase()), Some(d));
        let id = d.id().to_string();
        prop_assert_eq!(id.len(), 12);
        prop_assert!(is_lower_hex(&id), "{}", id);
        prop_assert_eq!(&id[..], &hex[..12]);
    }

    #[test]
    fn from_hex_takes_exactly_64_hex_digits(s in "[0-9a-fA-Fg:x ]{60,68}|\\PC{0,70}") {
        let valid = s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        prop_assert_eq!(KeyDigest::from_hex(&s).is_some(), valid);
        if let Some(d) = KeyDigest::from_hex(&s) {
            prop_assert_eq!(d.to_hex(), s.to_ascii_lowercase());
        }
    }
}

// ---------------------------------------------------------------------------
// Key files.

/// The services that routes serve. `NEVER` is never granted by name, so
/// every key but a `*` one is refused for it.
const SERVICES: [&str; 5] = ["chat", "tts", "ollama", "openai", "embed"];
const NEVER: &str = "never-granted";
/// When keys are checked: 2027-01-15.
const NOW_MS: i64 = 1_800_000_000_000;

fn service_table() -> ServiceTable {
    let mut t = ServiceTable::default();
    for s in SERVICES.iter().chain([&NEVER]) {
        t.intern(s);
    }
    t
}

#[derive(Debug, Clone)]
struct Entry {
    user: String,
    /// `None` for "*".
    services: Option<Vec<&'static str>>,
    /// Write a single service as `service` instead of `services: [..]`.
    single_field: bool,
    /// Seconds since the epoch.
    expires_at: Option<i64>,
    disabled: bool,
    /// Write the digest in upper case in the `sha256:` form.
    upper_hex: bool,
}

fn entry() -> impl Strategy<Value = Entry> {
    let grant = prop_oneof![
        1 => Just(None),
        6 => prop::sample::subsequence(SERVICES.to_vec(), 1..=SERVICES.len()).prop_map(Some),
    ];
    (
        "[A-Za-z0-9][A-Za-z0-9 ._@-]{0,15}",
        grant,
        any::<bool>(),
        prop::option::weighted(0.3, 0i64..4_102_444_800),
        prop::bool::weighted(0.15),
        any::<bool>(),
    )
        .prop_map(
            |(user, services, single_field, expires_at, disabled, upper_hex)| Entry {
                user,
                services,
                single_field,
                expires_at,
                disabled,
                upper_hex,
            },
        )
}

/// Valid keys: no whitespace or control characters, never `sha256:...`
/// (no `:` at all).
const KEY_RE: &str = "[A-Za-z0-9_.~+/=-]{1,40}";

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The key file as a JSON value; names are plaintext keys or their digests.
fn key_file(entries: &BTreeMap<String, Entry>, digests: bool) -> serde_json::Value {
    let mut file = serde_json::Map::new();
    for (key, e) in entries {
        let mut v = serde_json::Map::new();
        v.insert("user".into(), e.user.clone().into());
        match &e.services {
            None => {
                v.insert("service".into(), "*".into());
            }
            Some(list) if list.len() == 1 && e.single_field => {
                v.insert("service".into(), list[0].into());
            }
            Some(list) => {
                v.insert("services".into(), list.clone().into());
            }
        }
        if let Some(t) = e.expires_at {
            v.insert("expires_at".into(), rfc3339(t).into());
        }
        if e.disabled {
            v.insert("disabled".into(), true.into());
        }
        v.insert("note".into(), "ignored".into());
        let name = if digests {
            let hex = KeyDigest::of(key.as_bytes()).to_hex();
            let hex = if e.upper_hex {
                hex.to_ascii_uppercase()
            } else {
                hex
            };
            format!("sha256:{hex}")
        } else {
            key.clone()
        };
        file.insert(name, v.into());
    }
    file.into()
}

/// What checking `key` for `service` must give, from the entry alone.
fn expected(e: &Entry, service: &str) -> Result<String, KeyDenial> {
    if e.disabled {
        return Err(KeyDenial::Disabled);
    }
    if e.expires_at.is_some_and(|t| NOW_MS >= t * 1000) {
        return Err(KeyDenial::Expired);
    }
    match &e.services {
        Some(list) if !list.contains(&service) => Err(KeyDenial::WrongService),
        _ => Ok(e.user.clone()),
    }
}

fn outcome(store: &KeyStore, key: &[u8], service: u16) -> Result<String, KeyDenial> {
    store
        .check(Some(key), service, NOW_MS)
        .map(|p| p.user.name.to_string())
}

proptest! {
    #[test]
    fn generated_key_files_parse_and_grant_exactly(
        entries in prop::collection::btree_map(KEY_RE, entry(), 1..10),
        other in KEY_RE,
    ) {
        prop_assume!(!entries.contains_key(&other));
        let services = service_table();
        let plain = KeyStore::parse(
            Path::new("keys.json"),
            &key_file(&entries, false).to_string(),
            &services,
        );
        let plain = match plain {
            Ok(s) => s,
            Err(e) => return Err(TestCaseError::fail(format!("plaintext file: {e}"))),
        };
        let hashed_text = serde_json::to_string_pretty(&key_file(&entries, true)).unwrap();
        let hashed = KeyStore::parse(Path::new("keys.json"), &hashed_text, &services)
            .map_err(|e| TestCaseError::fail(format!("sha256 file: {e}")))?;
        let yaml_text = serde_yaml::to_string(&key_file(&entries, true)).unwrap();
        let yaml = KeyStore::parse(Path::new("keys.yaml"), &yaml_text, &services)
            .map_err(|e| TestCaseError::fail(format!("YAML file: {e}\n{yaml_text}")))?;

        prop_assert_eq!(plain.len(), entries.len());
        prop_assert_eq!(hashed.len(), entries.len());
        prop_assert_eq!(yaml.len(), entries.len());
        prop_assert_eq!(plain.plaintext_entries, entries.len());
        prop_assert_eq!(hashed.plaintext_entries, 0);
        prop_assert!(plain.unserved_services.is_empty());

        for (key, e) in &entries {
            for name in SERVICES.iter().chain([&NEVER]) {
                let id = services.get(name).unwrap();
                let want = expected(e, name);
                for (what, store) in [("plain", &plain), ("sha256", &hashed), ("yaml", &yaml)] {
                    prop_assert_eq!(
                        outcome(store, key.as_bytes(), id),
                        want.clone(),
                        "{} store, key {:?}, service {}", what, key, name
                    );
                }
            }
            let p = plain.check(Some(key.as_bytes()), 0, 0);
            if let Ok(p) = p {
                prop_assert_eq!(p.id, KeyDigest::of(key.as_bytes()).id());
                prop_assert_eq!(p.user.header.as_bytes(), e.user.as_bytes());
            }
        }
        for store in [&plain, &hashed, &yaml] {
            prop_assert_eq!(
                store.check(Some(other.as_bytes()), 0, NOW_MS).unwrap_err(),
                KeyDenial::Unknown
            );
            prop_assert_eq!(store.check(None, 0, NOW_MS).unwrap_err(), KeyDenial::Missing);
        }
    }
}

// ---------------------------------------------------------------------------
// Routing.

/// A router from `(path_prefix, strip_prefix)` pairs, through the config
/// parser (so the routes are what a config file gives). A strip prefix of
/// `"true"` is written as `true` (strip the whole prefix).
fn router(routes: &[(&str, Option<&str>)]) -> Router {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let mut text = String::from("listen: \"127.0.0.1:1\"\nkeys_file: k.json\nroutes:\n");
    for (i, (prefix, strip)) in routes.iter().enumerate() {
        text.push_str(&format!(
            "  - {{name: r{i}, path_prefix: {}, service: s{i}, upstreams: [\"127.0.0.1:1\"], strip_prefix: {}}}\n",
            q(prefix),
            match strip {
                None => "false".to_string(),
                Some("true") => "true".to_string(),
                Some(s) => q(s),
            },
        ));
    }
    let config = Config::parse(Path::new("/props/gateway.yaml"), &text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    Router::build(
        &config.routes,
        &mut ServiceTable::default(),
        &UpstreamBook::default(),
    )
}

/// Paths: mostly one of the prefixes plus a tail, the rest anything.
fn paths(prefixes: Vec<String>) -> impl Strategy<Value = (Vec<String>, Vec<String>)> {
    let path = (any::<Index>(), any::<bool>(), "[ab/é.]{0,5}");
    prop::collection::vec(path, 1..10).prop_map(move |picks| {
        let paths = picks
            .into_iter()
            .map(|(i, extend, tail)| {
                if extend {
                    format!("{}{tail}", i.get(&prefixes))
                } else {
                    tail
                }
            })
            .collect();
        (prefixes.clone(), paths)
    })
}

proptest! {
    #[test]
    fn find_returns_the_longest_matching_prefix(
        (prefixes, paths) in prop::collection::hash_set("/[ab/é]{0,4}", 1..8)
            .prop_map(|s| s.into_iter().collect::<Vec<_>>())
            .prop_flat_map(paths)
    ) {
        let routes: Vec<(&str, Option<&str>)> = prefixes.iter().map(|p| (p.as_str(), None)).collect();
        let router = router(&routes);
        for path in &paths {
            let want = prefixes
                .iter()
                .filter(|p| path.starts_with(p.as_str()))
                .max_by_key(|p| p.len());
            let got = router.find(path);
            prop_assert_eq!(
                got.map(|(_, r)| &r.prefix),
                want,
                "path {:?} among {:?}", path, prefixes
            );
            if let Some((i, r)) = got {
                prop_assert!(std::ptr::eq(router.get(i).unwrap(), r));
            }
        }
    }
}

/// What `upstream_target` must send: the strip prefix removed; a stripped
/// trailing `/` stays as the leading one, and a missing one is added.
fn reference_target(strip: &str, path: &str, query: Option<&str>) -> Vec<u8> {
    let after = path.strip_prefix(strip).unwrap();
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

proptest! {
    #[test]
    fn upstream_target_starts_with_a_slash_and_keeps_the_query(
        prefix in "/[a-z/é]{0,6}",
        strip in prop_oneof![Just(None), Just(Some(None)), (1usize..8).prop_map(|n| Some(Some(n)))],
        tail in "[a-z/?%.é]{0,8}",
        query in prop::option::of("[a-z=&%/?]{0,8}"),
    ) {
        // None: `strip_prefix: false`; Some(None): `true`; Some(Some(n)):
        // the prefix's first n bytes (cut back to a character boundary).
        let part = |n: usize| {
            let mut n = n.min(prefix.len());
            while !prefix.is_char_boundary(n) {
                n -= 1;
            }
            prefix[..n.max(1)].to_string()
        };
        let (written, strip) = match strip {
            None => (None, None),
            Some(None) => (Some("true".to_string()), Some(prefix.clone())),
            Some(Some(n)) => (Some(part(n)), Some(part(n))),
        };
        let router = router(&[(&prefix, written.as_deref())]);
        let path = format!("{prefix}{tail}");
        let (_, route) = router.find(&path).unwrap();
        let target = route.upstream_target(&path, query.as_deref());
        match &strip {
            None => prop_assert!(target.is_none()),
            Some(s) => {
                let target = target.unwrap();
                prop_assert!(target.starts_with(b"/"));
                if let Some(q) = &query {
                    let tail = format!("?{q}");
                    prop_assert!(target.ends_with(tail.as_bytes()));
                }
                prop_assert_eq!(target, reference_target(s, &path, query.as_deref()));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The decision: dot segments and key extraction.

fn scoped_snapshot() -> Snapshot {
    let config = Config::parse(
        Path::new("/props/gateway.yaml"),
        r#"
listen: "127.0.0.1:1"
keys_file: keys.json
routes:
  - {name: gen, path_prefix: /ollama/api/generate, service: ollama, strip_prefix: /ollama, upstreams: ["127.0.0.1:2"]}
  - {name: admin, path_prefix: /ollama/, service: admin, strip_prefix: true, upstreams: ["127.0.0.1:2"]}
"#,
    )
    .unwrap();
    Snapshot::compile(
        config,
        r#"{"k": {"user": "u", "service": "*"}}"#,
        1,
        &Carried::default(),
    )
    .unwrap()
}

const SEGMENTS: &[&str] = &[
    ".",
    "..",
    "%2e",
    "%2E",
    ".%2e",
    "%2e.",
    "%2E%2e",
    "a",
    "..a",
    ".a",
    "a.",
    "...",
    "%2e%2e%2e",
    "%2",
    "%",
    "%zz",
    "..%2Fpull",
    "%2f",
    "%5C",
    "gener%61te",
    "a%20b",
    "%3F",
    "",
    "api",
    "generate",
    "..;",
    ".;x",
    "..%3b",
    "..%3Bx",
    "x;..",
    "a;b=1",
    "%252e",
    "%2525",
    "%25",
    "%25zz",
    "%00",
    "%0a",
    "%7F",
    "a\\b",
];

/// The reference: a literal backslash; segment parameters (`;`, literal
/// or `%3b`), which these routes do not allow; a `.`/`..` segment; or an
/// escape that is malformed, decodes to an unreserved character, a
/// (back)slash or a control character, or is `%25` followed by two hex
/// digits (double encoding).
fn is_ambiguous(path: &str) -> bool {
    if path.contains('\\') || path.contains(';') || path.to_ascii_lowercase().contains("%3b") {
        return true;
    }
    let dot = |seg: &str| {
        let name = seg.split(';').next().unwrap_or("");
        let name = match name.to_ascii_lowercase().find("%3b") {
            Some(i) => name[..i].to_string(),
            None => name.to_string(),
        };
        name == "." || name == ".."
    };
    if path.split('/').any(dot) {
        return true;
    }
    let hex = |h: Option<&str>| h.and_then(|h| u8::from_str_radix(h, 16).ok());
    let mut rest = path;
    while let Some(i) = rest.find('%') {
        match hex(rest.get(i + 1..i + 3)) {
            None => return true,
            Some(c)
                if c.is_ascii_alphanumeric() || c.is_ascii_control() || b"-._~/\\".contains(&c) =>
            {
                return true
            }
            Some(b'%') if hex(rest.get(i + 3..i + 5)).is_some() => return true,
            Some(_) => rest = &rest[i + 3..],
        }
    }
    false
}

proptest! {
    #[test]
    fn ambiguous_paths_are_refused_and_nothing_else(
        segs in prop::collection::vec(prop::sample::select(SEGMENTS), 0..6),
        base in prop::sample::select(&["/ollama/api/generate/", "/ollama/"][..]),
    ) {
        let s = scoped_snapshot();
        let path = format!("{base}{}", segs.join("/"));
        let got = s.decide(&Request::plain(&Method::POST, &path, Credential::Key(b"k")), 0);
        if is_ambiguous(&path) {
            prop_assert_eq!(got.verdict.unwrap_err(), Refusal::BadPath, "{}", path);
        } else {
            got.verdict.map_err(|e| TestCaseError::fail(format!("{path}: {e:?}")))?;
            let (_, route) = got.route.ok_or_else(|| TestCaseError::fail("no route"))?;
            prop_assert!(path.starts_with(&route.prefix));
        }
    }

    #[test]
    fn bearer_token_is_presented_without_padding(
        scheme in prop::sample::select(&["Bearer ", "bearer ", "BEARER ", "bEaReR "][..]),
        before in "[ \t]{0,3}",
        token in "[!-~]{1,20}",
        after in "[ \t]{0,3}",
    ) {
        let mut h = HeaderMap::new();
        let value = format!("{scheme}{before}{token}{after}");
        h.insert("authorization", HeaderValue::from_str(&value).unwrap());
        prop_assert_eq!(presented_key(&h), Credential::Key(token.as_bytes()));
        // The same key in X-API-Key agrees with it.
        h.insert("x-api-key", HeaderValue::from_str(&token).unwrap());
        prop_assert_eq!(presented_key(&h), Credential::Key(token.as_bytes()));
        // A different one conflicts.
        h.insert("x-api-key", HeaderValue::from_str(&format!("{token}x")).unwrap());
        prop_assert_eq!(presented_key(&h), Credential::Conflicting);
    }
}

// ---------------------------------------------------------------------------
// Parsers never panic.

/// Lines that look like a config, so the generated text gets past the YAML
/// parser into validation. Only IP literals and `localhost` (from
/// /etc/hosts): no DNS.
const CONFIG_LINES: &[&str] = &[
    "listen: \"127.0.0.1:8080\"",
    "listen: [\"127.0.0.1:1\", \"127.0.0.1:1\"]",
    "listen: []",
    "keys_file: k.json",
    "keys_file: /abs/k.yaml",
    "routes:",
    "routes: []",
    "  - name: a",
    "  - name: \"\"",
    "  - {name: b, path_prefix: /, service: s, upstreams: [\"[::1]:9\"]}",
    "    name: a",
    "    path_prefix: /a/",
    "    path_prefix: a",
    "    path_prefix: \"/a b\"",
    "    service: s",
    "    service: \" \"",
    "    upstreams: [\"127.0.0.1:2\"]",
    "    upstreams: [\"localhost:2\", \"127.0.0.1:0\", \"http://x:1\"]",
    "    upstreams: []",
    "    strip_prefix: /a",
    "    strip_prefix: /b",
    "    strip_prefix: true",
    "    strip_prefix: 3",
    "    methods: [GET, post]",
    "    methods: [\"P OST\"]",
    "    methods: []",
    "    connect_timeout: 0s",
    "    read_timeout: 5 parsecs",
    "    read_timeout: 18446744073709551615s",
    "admin_listen: \":65536\"",
    "admin_listen: \"9090\"",
    "admin_listen: \"127.0.0.1:8080\"",
    "audit_log: \"-\"",
    "threads: 0",
    "threads: 99999999999999999999",
    "watch: maybe",
    "shutdown_grace: 1ns",
    "upgrade_sock: ~",
    "extra: 1",
    "&a x: *a",
    "<<: *b",
    "!!binary aGk=",
    "---",
    "...",
    "{",
    "- ",
    "\t",
    "# comment",
];

/// Fragments of key files, JSON and YAML.
const KEY_FRAGMENTS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"k\"",
    "\"sha256:",
    "\"user\": \"u\"",
    "\"service\": \"*\"",
    "\"services\": []",
    "\"services\": [\"chat\"]",
    "\"expires_at\": \"2027-01-01T00:00:00Z\"",
    "\"expires_at\": \"9999-99-99\"",
    "\"disabled\": true",
    "\"disabled\": 1",
    "k:\n",
    "  user: a\n",
    "  service: tts\n",
    "null",
    "\n",
    " ",
    "\\u0000",
    "\"",
    "&a",
    "*a",
    "---\n",
    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
];

fn config_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        prop::collection::vec(prop::sample::select(CONFIG_LINES), 0..16).prop_map(|l| l.join("\n")),
        (
            prop::collection::vec(prop::sample::select(CONFIG_LINES), 0..16),
            "\\PC{0,3}",
            any::<Index>()
        )
            .prop_map(|(l, noise, at)| {
                let mut text = l.join("\n");
                let mut i = at.index(text.len() + 1);
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                text.insert_str(i, &noise);
                text
            }),
    ]
}

fn key_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        prop::collection::vec(prop::sample::select(KEY_FRAGMENTS), 0..24).prop_map(|f| f.concat()),
    ]
}

proptest! {
    #[test]
    fn config_parse_returns_ok_or_err(text in config_text()) {
        let _ = Config::parse(Path::new("/props/gateway.yaml"), &text);
    }

    #[test]
    fn key_parse_returns_ok_or_err(text in key_text()) {
        let services = service_table();
        for name in ["/props/keys.json", "/props/keys.yaml"] {
            if let Ok(store) = KeyStore::parse(Path::new(name), &text, &services) {
                prop_assert!(store.plaintext_entries <= store.len());
                let _ = store.check(Some(b"k"), 0, NOW_MS);
            }
        }
    }
}

/// The fixed sets above have no duplicates (a copy-paste slip would only
/// weaken the generators, so say so).
#[test]
fn fragment_tables_are_distinct() {
    for table in [CONFIG_LINES, KEY_FRAGMENTS, SEGMENTS] {
        let set: HashSet<_> = table.iter().collect();
        assert_eq!(set.len(), table.len());
    }
}

// ---------------------------------------------------------------------------
// Reading AI API bodies in pieces: whatever the split, the same reading.

use ai_gateway::config::ApiKind;
use ai_gateway::usage::{AnswerMeter, NamedModel, RequestInspector, Scanner, SseHider};

const SCAN_WANTED: &[(&str, usize)] = &[("model", 32), ("usage", 64), ("done", 8)];

/// Every event of `input` fed in the pieces `cuts` makes, as text.
fn scan_events(input: &[u8], cuts: &[Index]) -> Vec<String> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
    points.sort_unstable();
    let mut s = Scanner::new(SCAN_WANTED);
    let mut out = Vec::new();
    let mut from = 0;
    for p in points.into_iter().chain([input.len()]) {
        s.feed(&input[from..p], &mut |e| out.push(format!("{e:?}")));
        from = p;
    }
    s.finish(&mut |e| out.push(format!("{e:?}")));
    out
}

/// A JSON value: scalars, strings with escapes and brackets, nesting.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        "[a-z{}\\[\\]\"\\\\:, \u{e9}\u{1f600}]{0,12}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn the_scanner_reads_the_same_whatever_the_pieces(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        cuts in prop::collection::vec(any::<Index>(), 0..12),
    ) {
        prop_assert_eq!(scan_events(&bytes, &cuts), scan_events(&bytes, &[]));
    }

    #[test]
    fn the_model_is_found_among_any_members_in_any_pieces(
        members in prop::collection::vec(("[a-z_]{1,8}", json_value()), 0..6),
        at in any::<Index>(),
        model in "[a-z0-9.:-]{1,20}",
        cuts in prop::collection::vec(any::<Index>(), 0..10),
        pretty in any::<bool>(),
    ) {
        let mut map = serde_json::Map::new();
        let pos = at.index(members.len() + 1);
        for (i, (k, v)) in members.into_iter().enumerate() {
            if i == pos {
                map.insert("model".into(), model.clone().into());
            }
            if k != "model" && k != "name" {
                map.insert(k, v);
            }
        }
        map.entry("model").or_insert_with(|| model.clone().into());
        let doc = serde_json::Value::Object(map);
        let body = if pretty { serde_json::to_vec_pretty(&doc) } else { serde_json::to_vec(&doc) }.unwrap();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(body.len() + 1)).collect();
        points.sort_unstable();
        let mut r = RequestInspector::new(ApiKind::Ollama);
        let mut from = 0;
        for p in points.into_iter().chain([body.len()]) {
            r.feed(&body[from..p]);
            from = p;
        }
        prop_assert_eq!(r.models.clone(), vec![NamedModel::Name(model)]);
        prop_assert!(r.complete());
    }

    #[test]
    fn the_usage_event_is_hidden_and_every_other_byte_kept(
        chunks in prop::collection::vec("[a-zA-Z \u{e9}]{0,8}", 0..8),
        with_usage in any::<bool>(),
        crlf in any::<bool>(),
        cuts in prop::collection::vec(any::<Index>(), 0..16),
    ) {
        let nl = if crlf { "\r\n" } else { "\n" };
        let event = |data: String| format!("data: {data}{nl}{nl}");
        let shown: Vec<String> = chunks
            .iter()
            .map(|c| event(serde_json::json!({"choices": [{"delta": {"content": c}}], "usage": null}).to_string()))
            .collect();
        let usage = event(r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3}}"#.to_string());
        let done = event("[DONE]".to_string());
        let mut body = shown.concat();
        if with_usage {
            body.push_str(&usage);
        }
        body.push_str(&done);
        let want = shown.concat() + &done;
        let bytes = body.as_bytes();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        points.dedup();
        let mut meter = AnswerMeter::new(Some(b"text/event-stream"), None);
        let mut hider = SseHider::default();
        let mut got = Vec::new();
        let mut from = 0;
        let ends: Vec<usize> = points.into_iter().chain([bytes.len()]).collect();
        for (i, p) in ends.iter().enumerate() {
            got.extend_from_slice(&hider.filter(&bytes[from..*p], i + 1 == ends.len(), &mut meter));
            from = *p;
        }
        prop_assert_eq!(String::from_utf8(got).unwrap(), want);
        let u = meter.usage();
        if with_usage {
            prop_assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(9), Some(3)));
        } else if !chunks.is_empty() {
            prop_assert_eq!(u.completion_tokens, Some(chunks.len() as u64));
        }
    }
}
