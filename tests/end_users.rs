//! End users behind one key (`end_user_header`, `end_user_limits`) and
//! budget alerts (`alerts`): against the real binary, the mock model
//! server of `tests/common/ai_upstream.rs` (each Ollama chat is 11 prompt
//! and 4 completion tokens, 15 in all), webhook receivers written here,
//! and a real `redis-server` for the shared part.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use common::ai_gateway::*;
use common::cluster::{one_cluster, shared_state, Cluster};
use common::redis::RedisServer;
use common::webhook::{Answer, WebhookReceiver};
use common::*;

const HDR: &str = "X-OpenWebUI-User-Id";
/// Names its end users: 30 tokens a minute each, 3 requests a minute.
const TEAM: &str = "end-users-team-key";
/// Names its end users: 3 requests a minute and 1 at a time each.
const TEAM2: &str = "end-users-team2-key";
/// Names none.
const PLAIN: &str = "end-users-plain-key";

const WAIT: Duration = Duration::from_secs(20);

fn chat(gw: &Gateway, path: &str, key: &str, rid: &str, end_user: Option<&str>) -> RawResponse {
    let body = json!({"model": "llama3.2", "messages": [], "stream": true}).to_string();
    let headers = end_user.map_or(String::new(), |u| format!("{HDR}: {u}\r\n"));
    ai_request(gw, "POST", path, key, rid, body.as_bytes(), &headers)
}

fn key_id(key: &str) -> String {
    sha256_hex(key.as_bytes())[..12].to_string()
}

fn keys() -> KeyFile {
    KeyFile::of([
        Key::new(TEAM, "webui")
            .service("ai")
            .end_users(HDR, Limits::new().rate_limit("3/min").token_limit("30/min")),
        Key::new(TEAM2, "webui2")
            .service("ai")
            .end_users(HDR, Limits::new().rate_limit("3/min").max_concurrent(1)),
        Key::new(PLAIN, "plain").service("ai").token_limit("1M/day"),
    ])
}

#[test]
fn end_users_are_held_to_their_own_limits_within_their_key() {
    let ollama = AiServer::start(AiOptions::default());
    let slow = AiServer::start(AiOptions {
        chunks: 2,
        delay: Duration::from_millis(1500),
        ..AiOptions::default()
    });
    let gw = Gateway::start(
        &GatewayConfig::new()
            .with_admin()
            .audit_log("audit.log")
            .route(ollama_route(ollama.addr))
            .route(Route::stripped("slow", "/slow/", "ai", slow.addr).api("ollama")),
        keys(),
    );
    let gw = &gw;
    let ok = |r: &RawResponse, what: &str| assert_eq!(r.status, 200, "{what}: {}", r.text());

    // Tokens: alice's second chat takes her to 30; the third is refused,
    // bob keeps working.
    ok(
        &chat(gw, "/ollama/api/chat", TEAM, "a-1", Some("alice")),
        "a-1",
    );
    ok(
        &chat(gw, "/ollama/api/chat", TEAM, "a-2", Some("alice")),
        "a-2",
    );
    assert_eq!(audit_of(gw, "a-2")["end_user"], "alice");
    let r = chat(gw, "/ollama/api/chat", TEAM, "a-3", Some("alice"));
    assert_eq!(
        (r.status, error_of(&r).as_str()),
        (429, "token budget exceeded")
    );
    assert!(r.header("retry-after").is_some());
    assert_eq!(audit_of(gw, "a-3")["decision"], "token_budget_exceeded");
    ok(
        &chat(gw, "/ollama/api/chat", TEAM, "b-1", Some("bob")),
        "bob",
    );
    let last = ollama.requests().pop().expect("bob's request");
    assert_eq!(
        last.head.header(&HDR.to_ascii_lowercase()),
        Some("bob"),
        "the header goes upstream unchanged"
    );

    // Concurrency, then rate: dave holds his one slot with a slow answer;
    // his second request waits for nothing and is refused, erin's passes.
    let held = std::thread::scope(|s| {
        let first = s.spawn(|| chat(gw, "/slow/api/chat", TEAM2, "d-1", Some("dave")));
        poll(WAIT, "dave's slow request upstream", || {
            (slow.heads() == 1).then_some(())
        });
        let r = chat(gw, "/ollama/api/chat", TEAM2, "d-2", Some("dave"));
        assert_eq!(
            (r.status, error_of(&r).as_str()),
            (429, "too many concurrent requests")
        );
        ok(
            &chat(gw, "/ollama/api/chat", TEAM2, "e-1", Some("erin")),
            "erin beside dave",
        );
        first.join().expect("dave's first request")
    });
    ok(&held, "d-1");
    // The client has the whole answer a moment before the gateway lets go
    // of the request (its slot goes with the request's context, just
    // before the in-flight gauge): wait for that, not for a time.
    poll(WAIT, "dave's first request to end in the gateway", || {
        (metric_at(gw.admin(), "agw_requests_in_flight") == 0.0).then_some(())
    });
    ok(
        &chat(gw, "/ollama/api/chat", TEAM2, "d-3", Some("dave")),
        "d-3, dave's third of 3/min",
    );
    let r = chat(gw, "/ollama/api/chat", TEAM2, "d-4", Some("dave"));
    assert_eq!(
        (r.status, error_of(&r).as_str()),
        (429, "rate limit exceeded")
    );
    ok(
        &chat(gw, "/ollama/api/chat", TEAM2, "e-2", Some("erin")),
        "erin",
    );

    // Values that are no end user's name: 400, said why.
    for (rid, value) in [("x-1", "has space".to_string()), ("x-2", "u".repeat(129))] {
        let r = chat(gw, "/ollama/api/chat", TEAM, rid, Some(&value));
        assert_eq!(r.status, 400, "{value:?}");
        assert!(error_of(&r).contains("end user header"), "{}", r.text());
        assert_eq!(audit_of(gw, rid)["decision"], "bad_end_user");
    }
    // A key that names no end users ignores the header.
    let odd = format!("has space {}", "u".repeat(200));
    ok(
        &chat(gw, "/ollama/api/chat", PLAIN, "p-1", Some(&odd)),
        "plain key",
    );
    assert!(audit_of(gw, "p-1").get("end_user").is_none());
    let last = ollama.requests().pop().expect("the plain key's request");
    assert_eq!(
        last.head.header(&HDR.to_ascii_lowercase()),
        Some(odd.as_str())
    );

    // A reload (a key added) keeps every end user's counters.
    let mut more = keys();
    more = more.key(Key::new("end-users-new-key", "new").service("ai"));
    gw.write_keys(more);
    assert!(gw.wait_log_contains("generation 2", WAIT), "{}", gw.log());
    let r = chat(gw, "/ollama/api/chat", TEAM, "a-4", Some("alice"));
    assert_eq!(r.status, 429, "alice's budget outlived the reload");
    let r = chat(gw, "/ollama/api/chat", TEAM2, "d-5", Some("dave"));
    assert_eq!(r.status, 429, "dave's rate outlived the reload");
    ok(
        &chat(gw, "/ollama/api/chat", TEAM, "b-2", Some("bob")),
        "bob after the reload",
    );
    audit_of(gw, "b-2");

    // `usage --by end_user --key`: the totals the upstream reported, per
    // end user of the one key.
    let mut reported: std::collections::BTreeMap<String, u64> = Default::default();
    for (req, sent) in ollama.requests().iter().zip(ollama.sent()) {
        let Some(who) = req.head.header(&HDR.to_ascii_lowercase()) else {
            continue;
        };
        if req.head.header("x-gateway-user") == Some("webui") {
            *reported.entry(who.to_string()).or_default() +=
                sent.prompt_tokens + sent.completion_tokens;
        }
    }
    assert_eq!(reported.get("alice"), Some(&30), "{reported:?}");
    let out = run_cli(
        &[
            "usage",
            "--by",
            "end_user",
            "--key",
            &key_id(TEAM),
            "--json",
            "--audit-log",
            "audit.log",
        ],
        gw.dir.path(),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let report: Value = serde_json::from_str(&out.stdout).expect("JSON report");
    let groups = report["groups"].as_object().expect("groups");
    for (who, tokens) in &reported {
        assert_eq!(groups[who]["total_tokens"], *tokens, "{who}: {report:#}");
    }
    assert_eq!(groups["alice"]["requests"], 4, "{report:#}");
    assert!(
        !groups.contains_key("dave"),
        "another key's end user: {report:#}"
    );
    let m = metrics_text(gw.admin());
    assert!(
        !m.contains("alice") && !m.contains("bob"),
        "no end user in metrics"
    );
}

/// One alert as expected: (end user, threshold, used, limit).
type Expected = (Option<&'static str>, f64, u64, u64);

fn assert_alert(got: &Value, key: &str, user: &str, want: Expected) {
    let (end_user, threshold, used, limit) = want;
    let summary = format!("{got}");
    assert_eq!(got["key_id"], key_id(key), "{summary}");
    assert_eq!(got["user"], user, "{summary}");
    assert_eq!(
        got["end_user"],
        end_user.map_or(Value::Null, Value::from),
        "{summary}"
    );
    assert_eq!(got["threshold"], threshold, "{summary}");
    assert_eq!(
        (got["used"].as_u64(), got["limit"].as_u64()),
        (Some(used), Some(limit)),
        "{summary}"
    );
    let end = humantime::parse_rfc3339(got["window_end"].as_str().expect("window_end"))
        .expect("RFC 3339");
    let now = SystemTime::now();
    assert!(
        end > now - Duration::from_secs(1) && end <= now + Duration::from_secs(62),
        "{summary}: the window of a minute that began with the first tokens"
    );
}

#[test]
fn one_alert_per_threshold_crossed_also_after_crossing_and_across_a_reload() {
    const ALERTED: &str = "alerts-team-key";
    const SENTINEL: &str = "alerts-sentinel-key";
    let ollama = AiServer::start(AiOptions::default());
    let hook = WebhookReceiver::start(Answer::Ok);
    let keys = || {
        KeyFile::of([
            Key::new(ALERTED, "webui")
                .service("ai")
                .token_limit("100/min")
                .end_users(HDR, Limits::new().token_limit("60/min")),
            Key::new(SENTINEL, "sentinel")
                .service("ai")
                .token_limit("15/min"),
        ])
    };
    let gw = Gateway::start(
        &GatewayConfig::new()
            .with_admin()
            .audit_log("audit.log")
            .alerts(Alerts::new().webhook(&hook.url()).at(&[0.2, 0.5]))
            .route(ollama_route(ollama.addr)),
        keys(),
    );
    let send = |rid: &str, who: &str| {
        let r = chat(&gw, "/ollama/api/chat", ALERTED, rid, Some(who));
        assert_eq!(r.status, 200, "{rid}: {}", r.text());
        audit_of(&gw, rid);
    };
    send("r-1", "alice");
    send("r-2", "alice");
    send("r-3", "alice");
    gw.write_keys(keys().key(Key::new("alerts-new-key", "new").service("ai")));
    assert!(gw.wait_log_contains("generation 2", WAIT), "{}", gw.log());
    send("r-4", "bob");
    send("r-5", "bob");
    send("r-6", "alice");
    // The sentinel's two alerts come after every earlier one (one queue,
    // one sender, in order): then nothing else is on its way.
    let r = chat(&gw, "/ollama/api/chat", SENTINEL, "s-1", None);
    assert_eq!(r.status, 200);
    let alerts = hook.wait_alerts(8, WAIT);
    let expected: [Expected; 6] = [
        (Some("alice"), 0.2, 15, 60),
        (None, 0.2, 30, 100),
        (Some("alice"), 0.5, 30, 60),
        (None, 0.5, 60, 100),
        (Some("bob"), 0.2, 15, 60),
        (Some("bob"), 0.5, 30, 60),
    ];
    assert_eq!(alerts.len(), 8, "{alerts:#?}");
    for (got, want) in alerts.iter().zip(expected) {
        assert_alert(got, ALERTED, "webui", want);
    }
    assert_alert(&alerts[6], SENTINEL, "sentinel", (None, 0.2, 15, 15));
    assert_alert(&alerts[7], SENTINEL, "sentinel", (None, 0.5, 15, 15));
    for (target, _) in hook.received() {
        assert_eq!(target, "POST /hooks/budget");
    }
    assert_eq!(metric_at(gw.admin(), "agw_alerts_sent_total"), 8.0);
    assert!(!gw.log().contains(ALERTED), "a key in the log");
}

#[test]
fn a_webhook_that_is_down_or_hangs_delays_no_request_and_its_failures_are_counted() {
    const CLOSED: &str = "alerts-closed-key";
    const HUNG: &str = "alerts-hung-key";
    let ollama = AiServer::start(AiOptions::default());
    let hang = WebhookReceiver::start(Answer::Hang);
    let closed = format!("http://{}/secret-path-1", refused_addr());
    let gw = Gateway::start(
        &GatewayConfig::new()
            .with_admin()
            .alerts(Alerts::new().webhook(&closed).at(&[0.5]).timeout("5s"))
            .route(ollama_route(ollama.addr)),
        KeyFile::of([
            Key::new(CLOSED, "c").service("ai").token_limit("20/min"),
            Key::new(HUNG, "h")
                .service("ai")
                .token_limit("100/min")
                .alerts(Alerts::new().webhook(&hang.url()).at(&[0.1])),
        ]),
    );
    let admin = gw.admin();
    let r = chat(&gw, "/ollama/api/chat", CLOSED, "c-1", None);
    assert_eq!(r.status, 200);
    poll(WAIT, "a failed attempt to the closed port", || {
        (metric_at(admin, "agw_alert_failures_total") >= 1.0).then_some(())
    });
    let r = chat(&gw, "/ollama/api/chat", HUNG, "h-1", None);
    assert_eq!(r.status, 200);
    // The closed port's three attempts end first (1 s and 2 s apart).
    poll(WAIT, "the hanging webhook holding the alert", || {
        (hang.holding() == 1).then_some(())
    });
    let r = chat(&gw, "/ollama/api/chat", HUNG, "h-2", None);
    assert_eq!(r.status, 200, "answered while the webhook hangs");
    assert_eq!(
        hang.holding(),
        1,
        "the webhook still held the alert's connection"
    );
    assert_eq!(hang.alerts().len(), 1);
    poll(WAIT, "the closed port's alert given up", || {
        (metric_at(admin, r#"agw_alerts_dropped_total{reason="failed"}"#) >= 1.0).then_some(())
    });
    poll(WAIT, "the hanging webhook's attempt timed out", || {
        (metric_at(admin, "agw_alert_failures_total") >= 4.0).then_some(())
    });
    let log = gw.log();
    assert!(log.contains("budget alerts:"), "{log}");
    for secret in [CLOSED, HUNG, "secret-path-1"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[test]
fn with_shared_state_two_instances_share_an_end_users_limits_and_alert_once() {
    let _one = one_cluster();
    let redis = RedisServer::start();
    let hook = WebhookReceiver::start(Answer::Ok);
    let ollama = AiServer::start(AiOptions::default());
    // A patient Redis timeout: this test is about sharing, and on a loaded
    // machine a call past the default 100 ms falls back to local counts.
    let top = || {
        GatewayConfig::new()
            .shared_state(shared_state(&redis, "local").timeout("2s"))
            .alerts(Alerts::new().webhook(&hook.url()).at(&[0.2]))
    };
    let cluster = Cluster::start(
        &[top(), top()],
        &ollama_route(ollama.addr),
        &KeyFile::of([
            Key::new(TEAM, "webui").service("ai").end_users(
                HDR,
                Limits::new().rate_limit("3/min").token_limit("100/min"),
            ),
            Key::new("shared-sentinel-a", "sa")
                .service("ai")
                .token_limit("15/min"),
            Key::new("shared-sentinel-b", "sb")
                .service("ai")
                .token_limit("15/min"),
        ]),
    );
    let (a, b) = (&cluster.node(0).gw, &cluster.node(1).gw);
    for (i, gw) in [a, b, a].into_iter().enumerate() {
        let r = chat(
            gw,
            "/ollama/api/chat",
            TEAM,
            &format!("sh-{i}"),
            Some("alice"),
        );
        assert_eq!(r.status, 200, "alice's request {i}: {}", r.text());
    }
    let r = chat(b, "/ollama/api/chat", TEAM, "sh-3", Some("alice"));
    assert_eq!(
        (r.status, error_of(&r).as_str()),
        (429, "rate limit exceeded"),
        "the 4th across both"
    );
    let r = chat(b, "/ollama/api/chat", TEAM, "sh-4", Some("bob"));
    assert_eq!(r.status, 200, "bob keeps working");

    // Redis names the end user by a tag of its name, never the name.
    let names = redis.keys();
    let id = key_id(TEAM);
    assert!(
        names
            .iter()
            .any(|k| k.starts_with(&format!("agw:rate:{id}."))),
        "{names:?}"
    );
    assert!(names.iter().all(|k| !k.contains("alice")), "{names:?}");
    // Every token sent: alice's 45 of 100 crossed 0.2 once, on one
    // instance; then each sentinel's alert comes after it.
    poll(WAIT, "alice's 45 tokens in redis", || {
        let key = redis
            .keys()
            .into_iter()
            .find(|k| k.starts_with(&format!("agw:tokens:{id}.")))?;
        redis.command(&["GET", &key]).contains("45").then_some(())
    });
    assert_eq!(
        chat(a, "/ollama/api/chat", "shared-sentinel-a", "s-a", None).status,
        200
    );
    assert_eq!(
        chat(b, "/ollama/api/chat", "shared-sentinel-b", "s-b", None).status,
        200
    );
    let alerts = hook.wait_alerts(3, WAIT);
    let alice: Vec<&Value> = alerts.iter().filter(|v| v["end_user"] == "alice").collect();
    assert_eq!(alice.len(), 1, "{alerts:#?}");
    assert_eq!(alice[0]["threshold"], 0.2);
    assert_eq!(alice[0]["limit"], 100);
    assert!(
        alice[0]["used"]
            .as_u64()
            .is_some_and(|u| (20..=45).contains(&u)),
        "{alerts:#?}"
    );
    assert_eq!(alerts.len(), 3, "{alerts:#?}");
}
