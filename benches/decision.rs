//! Micro-benchmarks of the per-request decision, without the network:
//! the key check, longest-prefix routing, and the whole decision
//! (`Request::from_head` + `Snapshot::decide`) as the proxy makes it; and
//! what usage accounting adds per answer on routes with `api`.
//!
//! Run: `cargo bench --bench decision` (about two to three minutes on two
//! cores). Benchmark ids put the size last, so `keys/hit/10` and
//! `keys/hit/1000000` sit next to each other: the point of the key store
//! is that they cost the same. `keys/hit` presents one key over and over
//! (its table entry stays in cache); `keys/hit_spread` cycles through many
//! keys, where a large table pays for cache misses.
//!
//! Key sets are built in memory as key file text (`sha256:<hex>` entries,
//! as `ai-gateway keys hash` writes them) and parsed once per size, outside
//! the timed loops.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue, Method, Version};

use ai_gateway::config::Config;

/// The client address of benched requests.
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
use ai_gateway::keys::{unix_millis, KeyDigest, KeyStore, ServiceTable};
use ai_gateway::policy::{Request, Router, Snapshot};
use ai_gateway::state::{Carried, UpstreamBook};

/// Key-set sizes for the key check, and the subset for the whole decision.
const KEY_SIZES: [usize; 3] = [10, 10_000, 1_000_000];
const DECIDE_SIZES: [usize; 2] = [10, 1_000_000];
/// How many distinct keys `keys/hit_spread` cycles through (at most).
const SPREAD_KEYS: usize = 65_536;
/// Route-table sizes.
const ROUTE_SIZES: [usize; 2] = [5, 500];

/// The length of a `keygen` key, and of the bench keys.
const KEY_LEN: usize = 36;

/// The plaintext key number `i`: the shape `keygen` produces (`agw_` and
/// 32 characters), deterministic so the benches can present it.
fn key(i: usize) -> String {
    format!("agw_bench{i:027}")
}

/// A key file of `n` digest entries, all for service `ollama`, spread over
/// 100 users (so users are shared, as in a real file).
fn key_file_text(n: usize) -> String {
    let mut s = String::with_capacity(n * 110 + 2);
    s.push('{');
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        let hex = KeyDigest::of(key(i).as_bytes()).to_hex();
        s.push_str(&format!(
            "\n\"sha256:{hex}\":{{\"user\":\"user{}\",\"service\":\"ollama\"}}",
            i % 100
        ));
    }
    s.push_str("\n}\n");
    s
}

/// A gateway config with the two services the key benches need: `ollama`
/// (granted to every key) and `tts` (granted to none).
const GATEWAY_YAML: &str = r#"
listen: "127.0.0.1:8080"
keys_file: keys.json
watch: false
routes:
  - {name: ollama-generate, path_prefix: /ollama/api/generate, methods: [POST], service: ollama, strip_prefix: true, upstreams: ["127.0.0.1:11434"]}
  - {name: ollama-chat, path_prefix: /ollama/api/chat, methods: [POST], service: ollama, strip_prefix: true, upstreams: ["127.0.0.1:11434"]}
  - {name: ollama-admin, path_prefix: /ollama/, service: ollama-admin, strip_prefix: true, upstreams: ["127.0.0.1:11434"]}
  - {name: tts, path_prefix: /tts/, service: tts, strip_prefix: true, upstreams: ["127.0.0.1:5002"]}
  - {name: openai, path_prefix: /v1/, service: openai, upstreams: ["127.0.0.1:8000"]}
"#;

fn gateway_config() -> Config {
    Config::parse(Path::new("/bench/gateway.yaml"), GATEWAY_YAML).expect("bench config parses")
}

/// A snapshot holding `n` keys (parsed from key file text, as at load).
fn snapshot_with_keys(n: usize) -> Snapshot {
    let text = key_file_text(n);
    let snap = Snapshot::compile(gateway_config(), &text, 1, &Carried::default())
        .expect("bench snapshot compiles");
    assert_eq!(snap.keys.len(), n);
    snap
}

/// Criterion settings that keep the whole run to a few minutes on two cores
/// (about 3 s per benchmark, 25 benchmarks, plus building the key sets).
fn configure() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(800))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
        .without_plots()
}

/// `KeyStore::check`: hit, unknown key, and a valid key on a service it is
/// not granted, at each key-set size. The store under test is the one
/// `Snapshot::compile` builds (`KeyStore::parse` of the text).
fn bench_keys(c: &mut Criterion) {
    let now = unix_millis(SystemTime::now());
    for &n in &KEY_SIZES {
        let mut services = ServiceTable::default();
        let ollama = services.intern("ollama");
        let tts = services.intern("tts");
        let store = {
            let text = key_file_text(n);
            KeyStore::parse(Path::new("/bench/keys.json"), &text, &services)
                .expect("bench key file parses")
        };
        assert_eq!(store.len(), n);
        // A key from the middle of the file, an unknown key of the same shape.
        let hit = key(n / 2);
        let miss = key(n + 12_345);
        assert!(store.check(Some(hit.as_bytes()), ollama, now).is_ok());
        assert!(store.check(Some(miss.as_bytes()), ollama, now).is_err());
        assert!(store.check(Some(hit.as_bytes()), tts, now).is_err());

        let mut g = c.benchmark_group("keys");
        g.bench_with_input(BenchmarkId::new("hit", n), &n, |b, _| {
            b.iter(|| black_box(store.check(black_box(Some(hit.as_bytes())), ollama, now)).is_ok())
        });
        // The same key every time stays in cache; real traffic spreads over
        // many keys. Cycle through up to 65,536 keys spaced across the file
        // (a few MB of table entries), so a large store's cache misses show.
        // The keys are kept contiguous, so reading them adds few misses of
        // its own.
        let spread: Vec<[u8; KEY_LEN]> = {
            let m = n.min(SPREAD_KEYS);
            (0..m)
                .map(|j| {
                    key(j * (n / m))
                        .into_bytes()
                        .try_into()
                        .expect("key length")
                })
                .collect()
        };
        g.bench_with_input(BenchmarkId::new("hit_spread", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i += 1;
                if i == spread.len() {
                    i = 0;
                }
                let k = spread.get(i).map(|k| &k[..]);
                black_box(store.check(black_box(k), ollama, now)).is_ok()
            })
        });
        g.bench_with_input(BenchmarkId::new("miss_unknown", n), &n, |b, _| {
            b.iter(|| {
                black_box(store.check(black_box(Some(miss.as_bytes())), ollama, now)).is_err()
            })
        });
        g.bench_with_input(BenchmarkId::new("wrong_service", n), &n, |b, _| {
            b.iter(|| black_box(store.check(black_box(Some(hit.as_bytes())), tts, now)).is_err())
        });
        g.finish();
        drop(store);
    }
    // The cost floor of every check: one SHA-256 of a 36-byte key.
    let k = key(7);
    c.bench_function("keys/sha256_only", |b| {
        b.iter(|| black_box(KeyDigest::of(black_box(k.as_bytes()))))
    });
}

/// The prefix of route `i`: a mix of shapes and lengths, as a gateway in
/// front of many services would have (`/svc7/`, `/svc7/api/v1/`,
/// `/svc7/api/generate`, `/svc7/v1/chat/completions`, ...).
fn route_prefix(i: usize) -> String {
    match i % 5 {
        0 => format!("/svc{i}/"),
        1 => format!("/svc{i}/api/v1/"),
        2 => format!("/svc{i}/api/generate"),
        3 => format!("/svc{i}/v1/chat/completions"),
        _ => format!("/svc{i}/api/v2/audio/speech/"),
    }
}

fn routes_yaml(n: usize) -> String {
    let mut s = String::from("listen: \"127.0.0.1:8080\"\nkeys_file: keys.json\nroutes:\n");
    for i in 0..n {
        s.push_str(&format!(
            "  - {{name: r{i}, path_prefix: \"{}\", service: s{}, strip_prefix: true, upstreams: [\"127.0.0.1:{}\"]}}\n",
            route_prefix(i),
            i % 20,
            10_000 + i
        ));
    }
    s
}

/// `Router::find` with 5 and 500 routes: a hit on the longest prefix (found
/// in the first length table), a hit on the shortest (walks every distinct
/// length first), and a miss (walks them all).
fn bench_routes(c: &mut Criterion) {
    for &n in &ROUTE_SIZES {
        let config = Config::parse(Path::new("/bench/gateway.yaml"), &routes_yaml(n))
            .expect("bench routes parse");
        let router = Router::build(
            &config.routes,
            &mut ServiceTable::default(),
            &UpstreamBook::default(),
        );
        assert_eq!(router.len(), n);

        let longest = (0..n)
            .max_by_key(|&i| route_prefix(i).len())
            .expect("routes");
        let shortest = (0..n)
            .min_by_key(|&i| route_prefix(i).len())
            .expect("routes");
        let hit_long = format!("{}x/y", route_prefix(longest));
        let hit_short = format!("{}api/tags", route_prefix(shortest));
        let miss = "/nosuchservice/api/v1/chat/completions/extra".to_string();
        assert_eq!(router.find(&hit_long).map(|(i, _)| i), Some(longest));
        assert_eq!(router.find(&hit_short).map(|(i, _)| i), Some(shortest));
        assert!(router.find(&miss).is_none());

        let mut g = c.benchmark_group("routes");
        g.bench_with_input(BenchmarkId::new("hit_longest", n), &n, |b, _| {
            b.iter(|| black_box(router.find(black_box(&hit_long))).is_some())
        });
        g.bench_with_input(BenchmarkId::new("hit_shortest", n), &n, |b, _| {
            b.iter(|| black_box(router.find(black_box(&hit_short))).is_some())
        });
        g.bench_with_input(BenchmarkId::new("miss", n), &n, |b, _| {
            b.iter(|| black_box(router.find(black_box(&miss))).is_none())
        });
        g.finish();
    }
}

/// The headers of a typical client request.
fn request_headers(api_key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("gateway.example:8080"));
    h.insert(
        "user-agent",
        HeaderValue::from_static("python-httpx/0.27.0"),
    );
    h.insert("accept", HeaderValue::from_static("*/*"));
    h.insert("accept-encoding", HeaderValue::from_static("gzip, deflate"));
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert("content-length", HeaderValue::from_static("52"));
    h.insert(
        "x-api-key",
        HeaderValue::from_str(api_key).expect("key is a header value"),
    );
    h
}

/// The whole decision as the proxy makes it per request: the clock read,
/// `Request::from_head` (the key from the headers), then `Snapshot::decide` (dot-segment
/// check, route, method, key).
fn bench_decide(c: &mut Criterion) {
    const PATH: &str = "/ollama/api/generate";
    for &n in &DECIDE_SIZES {
        let snap = snapshot_with_keys(n);
        let allowed = request_headers(&key(n / 2));
        let unknown = request_headers(&key(n + 12_345));
        let mut no_key = request_headers("x");
        no_key.remove("x-api-key");
        let now = unix_millis(SystemTime::now());
        assert!(snap
            .decide(
                &Request::from_head(&Method::POST, PATH, Version::HTTP_11, &allowed, CLIENT),
                now
            )
            .verdict
            .is_ok());
        assert!(snap
            .decide(
                &Request::from_head(&Method::POST, PATH, Version::HTTP_11, &unknown, CLIENT),
                now
            )
            .verdict
            .is_err());

        let mut g = c.benchmark_group("decide");
        for (case, headers) in [
            ("allow", &allowed),
            ("deny_unknown", &unknown),
            ("deny_missing", &no_key),
        ] {
            g.bench_with_input(BenchmarkId::new(case, n), &n, |b, _| {
                b.iter(|| {
                    let now = unix_millis(SystemTime::now());
                    let req = Request::from_head(
                        &Method::POST,
                        black_box(PATH),
                        Version::HTTP_11,
                        black_box(headers),
                        CLIENT,
                    );
                    black_box(snap.decide(&req, now)).verdict.is_ok()
                })
            });
        }
        g.finish();
    }
}

/// What a route with `api: ollama` adds per answer: reading a streamed
/// answer for usage (the 10 NDJSON lines of `bench_upstream --mode ndjson`,
/// fed line by line as they arrive), and counting its tokens in metrics.
fn bench_usage(c: &mut Criterion) {
    use ai_gateway::ops::Metrics;
    use ai_gateway::usage::AnswerMeter;
    let lines: Vec<String> = (0..10)
        .map(|i| {
            if i == 9 {
                r#"{"model":"llama3.2:1b","created_at":"2026-11-25T12:00:00Z","response":"","done":true,"done_reason":"stop","prompt_eval_count":26,"eval_count":9}"#.to_string() + "\n"
            } else {
                format!(r#"{{"model":"llama3.2:1b","created_at":"2026-11-25T12:00:00Z","response":"token{i} ","done":false}}"#) + "\n"
            }
        })
        .collect();
    c.bench_function("usage/ndjson_answer_10_lines", |b| {
        b.iter(|| {
            let mut m = AnswerMeter::new(Some(b"application/x-ndjson"), None);
            for l in &lines {
                m.feed(black_box(l.as_bytes()));
            }
            black_box(m.usage())
        })
    });
    let metrics = Metrics::new();
    c.bench_function("usage/count_tokens_in_metrics", |b| {
        b.iter(|| {
            metrics.tokens(
                black_box("fast-ai"),
                black_box(Some("llama3.2:1b")),
                "reported",
                Some(26),
                Some(9),
                None,
            )
        })
    });
}

/// What end users add to a request's limits: `limits/key_rate` is the
/// key's own rate check (one compare-and-swap), the reference;
/// `limits/end_user_find_then_rate` finds an end user already known among
/// 4,096 in the key's table (a shard's read lock) and takes from their
/// rate; `limits/end_user_find_4_threads` is the same from four threads
/// at once on one table (per call), for the lock's contention.
fn bench_end_users(c: &mut Criterion) {
    use ai_gateway::config::Rate;
    use ai_gateway::state::{EndUserTable, KeyCounter, MAX_END_USERS};
    let rate = Rate::parse("1000000000/day").expect("rate");
    let key = KeyCounter::default();
    c.bench_function("limits/key_rate", |b| {
        b.iter(|| black_box(key.take(rate, black_box(1_000))))
    });
    let table = EndUserTable::default();
    let names: Vec<String> = (0..MAX_END_USERS)
        .map(|i| format!("0b5c7a1e-user-{i:05}"))
        .collect();
    for n in &names {
        table.find(n, 1);
    }
    let mut i = 0;
    c.bench_function("limits/end_user_find_then_rate", |b| {
        b.iter(|| {
            i = (i + 1) % names.len();
            let h = table.find(black_box(&names[i]), 1_000).expect("known");
            black_box(h.counter.take(rate, 1_000))
        })
    });
    c.bench_function("limits/end_user_find_4_threads", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for t in 0..4 {
                    let (table, names) = (&table, &names);
                    s.spawn(move || {
                        for j in 0..iters as usize {
                            let n = &names[(j * 7 + t * 1_024) % names.len()];
                            black_box(table.find(n, 1_000));
                        }
                    });
                }
            });
            start.elapsed() / 4
        })
    });
}

criterion_group! {
    name = benches;
    config = configure();
    targets = bench_keys, bench_routes, bench_decide, bench_usage, bench_end_users
}
criterion_main!(benches);
