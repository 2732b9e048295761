//! The admin listener's status page and key API (issue 24): admin keys
//! (401 without, 403 for another key, throttled after failures), the key
//! API's changes live on return and recorded in the audit log, the CLI and
//! the API editing the key file at once, and the page as headless
//! Chromium renders it after a known mix of traffic, before and after a
//! restart.
//!
//! Against the real binary, the mock model server of
//! `tests/common/ai_upstream.rs` and Debian's `chromium`.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use common::ai_gateway::*;
use common::ai_upstream::{AiOptions, AiServer};
use common::audit::audit_lines;
use common::key_files::key_id;
use common::tls::TestCa;
use common::*;

const ADMIN: &str = "agw_admin-test-key-0000000000000001";
const USER: &str = "status-test-user-key-1";

fn admin_entry() -> Key {
    Key::new(ADMIN, "root").field("admin", true)
}

/// An admin API call with `Authorization: Bearer <key>`: (status, JSON).
fn api(
    admin: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let url = format!("http://{admin}{path}");
    let mut req = ureq::http::Request::builder().method(method).uri(&url);
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let text = body.map(Value::to_string).unwrap_or_default();
    if body.is_some() {
        req = req.header("Content-Type", "application/json");
    }
    let mut resp = agent()
        .run(req.body(text).expect("request"))
        .expect("admin API answers");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// `GET /` with HTTP Basic (any user, the key as password): (status,
/// WWW-Authenticate, body).
fn page(admin: SocketAddr, key: Option<&str>) -> (u16, String, String) {
    let mut req = agent().get(format!("http://{admin}/"));
    if let Some(k) = key {
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("anyone:{k}"));
        req = req.header("Authorization", format!("Basic {cred}"));
    }
    let mut resp = req.call().expect("page answers");
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let status = resp.status().as_u16();
    (
        status,
        challenge,
        resp.body_mut().read_to_string().unwrap_or_default(),
    )
}

fn proxy_status(gw: &Gateway, key: &str) -> u16 {
    agent()
        .get(gw.url("/chat/ping"))
        .header("X-API-Key", key)
        .call()
        .expect("proxy answers")
        .status()
        .as_u16()
}

#[test]
fn admin_keys_guard_the_page_and_the_key_api_whose_changes_are_live_on_return() {
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .with_admin()
            .audit_log("audit.log")
            .failed_key_throttle(Throttle::after(4, "60s", "60s"))
            .route(Route::chat(echo.addr)),
        KeyFile::of([admin_entry(), Key::new(USER, "ann").service("chat")]),
    );
    let admin = gw.admin();

    // No key, another key, and what needs no key.
    let (status, challenge, _) = page(admin, None);
    assert_eq!(status, 401);
    assert!(
        challenge.starts_with("Basic realm=\"ai-gateway\""),
        "{challenge}"
    );
    assert_eq!(api(admin, "GET", "/api/keys", None, None).0, 401);
    assert_eq!(
        page(admin, Some(USER)).0,
        403,
        "a proxy key is no admin key"
    );
    let (status, body) = api(admin, "GET", "/api/keys", Some(USER), None);
    assert_eq!(status, 403, "{body}");
    for p in ["/metrics", "/healthz", "/readyz"] {
        let s = agent()
            .get(format!("http://{admin}{p}"))
            .call()
            .unwrap()
            .status();
        assert_eq!(s.as_u16(), 200, "{p}");
    }
    assert_eq!(proxy_status(&gw, ADMIN), 403, "an admin key opens no route");
    let (status, _, html) = page(admin, Some(ADMIN));
    assert_eq!(status, 200);
    assert!(html.contains("ai-gateway status"), "{html}");

    // A form from another site cannot post: JSON bodies only.
    let resp = agent()
        .post(format!("http://{admin}/api/keys"))
        .header("Authorization", format!("Bearer {ADMIN}"))
        .header("Content-Type", "text/plain")
        .send(r#"{"user":"x","services":["chat"]}"#)
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);

    // Create: the key works on the proxy at once.
    let (status, made) = api(
        admin,
        "POST",
        "/api/keys",
        Some(ADMIN),
        Some(&json!({"user": "dave", "services": ["chat"], "note": "laptop"})),
    );
    assert_eq!(status, 201, "{made}");
    let new_key = made["key"].as_str().expect("the key, once").to_string();
    let id = made["id"].as_str().unwrap().to_string();
    assert_eq!(id, key_id(&new_key));
    assert_eq!(proxy_status(&gw, &new_key), 200, "live on return");

    // Listed with its fields, never a key or a digest.
    let (status, list) = api(admin, "GET", "/api/keys", Some(ADMIN), None);
    assert_eq!(status, 200);
    let text = list.to_string();
    assert!(!text.contains(&new_key) && !text.contains("sha256:") && !text.contains(ADMIN));
    let row = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .expect("the new key is listed")
        .clone();
    assert_eq!(row["user"], "dave");
    assert_eq!(row["note"], "laptop");
    assert_eq!(row["state"], "active");

    // Patch a limit: enforced at once.
    let (status, body) = api(
        admin,
        "PATCH",
        &format!("/api/keys/{id}"),
        Some(ADMIN),
        Some(&json!({"rate_limit": "2/min", "note": null})),
    );
    assert_eq!(status, 200, "{body}");
    let statuses: Vec<u16> = (0..3).map(|_| proxy_status(&gw, &new_key)).collect();
    assert_eq!(statuses, [200, 200, 429], "the new limit holds at once");
    let (status, body) = api(
        admin,
        "PATCH",
        &format!("/api/keys/{id}"),
        Some(ADMIN),
        Some(&json!({"rate_limit": "lots"})),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        api(
            admin,
            "PATCH",
            "/api/keys/000000000000",
            Some(ADMIN),
            Some(&json!({}))
        )
        .0,
        404
    );

    // Revoke: refused at once; shared=true needs shared_state.
    let path = format!("/api/keys/{id}");
    assert_eq!(
        api(
            admin,
            "DELETE",
            &format!("{path}?shared=true"),
            Some(ADMIN),
            None
        )
        .0,
        400
    );
    let (status, body) = api(admin, "DELETE", &path, Some(ADMIN), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(proxy_status(&gw, &new_key), 401, "revoked on return");

    // The file stays valid for the CLI; the audit log names each change.
    let check = run_cli(
        &["check", "--config", gw.config_path.to_str().unwrap()],
        gw.dir.path(),
    );
    assert!(check.status.success(), "{}", check.stderr);
    let entries = std::fs::read_to_string(&gw.keys_path).unwrap();
    assert!(
        entries.contains("\"disabled\": true") && entries.contains("\"rate_limit\": \"2/min\"")
    );
    assert!(!entries.contains(&new_key));
    let audit = gw.dir.path().join("audit.log");
    let admin_lines: Vec<Value> = poll(Duration::from_secs(5), "admin audit lines", || {
        let lines: Vec<Value> = audit_lines(&audit)
            .into_iter()
            .filter(|l| {
                l["decision"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("admin_"))
            })
            .collect();
        (lines.len() >= 3).then_some(lines)
    });
    let decisions: Vec<&str> = admin_lines
        .iter()
        .filter_map(|l| l["decision"].as_str())
        .collect();
    assert_eq!(decisions, ["admin_create", "admin_patch", "admin_revoke"]);
    for l in &admin_lines {
        assert_eq!(l["key_id"], key_id(ADMIN).as_str(), "{l}");
        assert_eq!(l["target"], id.as_str(), "{l}");
    }
    assert_eq!(admin_lines[1]["change"]["rate_limit"], "2/min");
    assert!(!std::fs::read_to_string(&audit).unwrap().contains(&new_key));

    // Failed admin attempts count toward the throttle (4 failures): then
    // any key but one that worked from this address gets 429.
    // (The revoked key tried on the proxy above was the first failure.)
    let statuses: Vec<u16> = (0..5)
        .map(|_| api(admin, "GET", "/api/keys", Some("agw_wrong"), None).0)
        .collect();
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
    assert_eq!(page(admin, Some("agw_other_wrong")).0, 429);
    assert_eq!(
        api(admin, "GET", "/api/keys", Some(ADMIN), None).0,
        200,
        "an admin key that worked from this address still works"
    );
    assert_eq!(
        proxy_status(&gw, "agw_wrong_on_proxy"),
        429,
        "one throttle for both listeners"
    );
}

#[test]
fn the_cli_and_the_api_editing_at_once_lose_nothing() {
    let echo = EchoServer::start();
    let gw = Gateway::start(
        &GatewayConfig::new()
            .with_admin()
            .route(Route::chat(echo.addr)),
        KeyFile::of([admin_entry()]),
    );
    let admin = gw.admin();
    let keys = gw.keys_path.to_str().unwrap().to_string();
    let dir = gw.dir.path().to_path_buf();
    const ROUNDS: usize = 12;
    let cli = std::thread::spawn(move || {
        (0..ROUNDS)
            .map(|i| {
                let out = run_cli(
                    &[
                        "keygen",
                        "--user",
                        &format!("cli{i}"),
                        "--service",
                        "chat",
                        "--keys",
                        &keys,
                    ],
                    &dir,
                );
                assert!(out.status.success(), "{}", out.stderr);
                out.stdout.trim().to_string()
            })
            .collect::<Vec<String>>()
    });
    let mut made = Vec::new();
    for i in 0..ROUNDS {
        let (status, body) = api(
            admin,
            "POST",
            "/api/keys",
            Some(ADMIN),
            Some(&json!({"user": format!("api{i}"), "service": "chat", "token_limit": "1M/day"})),
        );
        assert_eq!(status, 201, "{body}");
        let key = body["key"].as_str().unwrap().to_string();
        assert_eq!(proxy_status(&gw, &key), 200, "round {i}: live on return");
        made.push(key);
    }
    let from_cli = cli.join().expect("the CLI loop");
    let check = run_cli(
        &["check", "--config", gw.config_path.to_str().unwrap()],
        gw.dir.path(),
    );
    assert!(check.status.success(), "{}", check.stderr);
    let listed = run_cli(
        &[
            "keys",
            "list",
            "--json",
            "--keys",
            &gw.keys_path.display().to_string(),
        ],
        gw.dir.path(),
    );
    let rows: Value = serde_json::from_str(&listed.stdout).expect("keys list --json");
    let ids: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 1 + 2 * ROUNDS, "{ids:?}");
    for k in made.iter().chain(&from_cli) {
        assert!(ids.contains(&key_id(k).as_str()), "{k} lost");
    }
    // The file watcher takes the CLI's last keys too.
    let last = from_cli.last().unwrap();
    poll(Duration::from_secs(10), "the CLI's keys served", || {
        (proxy_status(&gw, last) == 200).then_some(())
    });
}

/// `chromium`, or a failure saying how to install it.
fn chromium() -> PathBuf {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "chromium not found: install it with `sudo apt-get install chromium` (tests/run.sh does)"
    );
}

/// Runs headless Chromium on `url` with `args`; its stdout.
fn headless(args: &[&str], url: &str, profile: &Path) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--window-size=1200,2400",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the table row whose first cell is `name` in the table
/// `table_id` of `dom`, cells separated by `|`.
fn row_cells(dom: &str, table_id: &str, name: &str) -> Option<Vec<String>> {
    let start = dom.find(&format!("id=\"{table_id}\""))?;
    let table = &dom[start..start + dom[start..].find("</table>")?];
    table.split("<tr>").find_map(|row| {
        let cells: Vec<String> = row
            .split("<td>")
            .skip(1)
            .map(|c| {
                let c = c.split("</td>").next().unwrap_or("");
                c.split('<').next().unwrap_or("").trim().to_string()
            })
            .collect();
        (cells.first().map(String::as_str) == Some(name)).then_some(cells)
    })
}

/// The gateway of the page test: its files live in `dir`, so a restart
/// reads the same audit log and key file.
fn page_gateway(dir: &Path, ollama: SocketAddr, tls: u16, plain: u16, admin: u16) -> Gateway {
    let cfg = GatewayConfig::new()
        .listen(loopback(plain))
        .listen_tls(loopback(tls), dir.join("cert.pem"), dir.join("key.pem"))
        .admin_listen(loopback(admin))
        .audit_log(dir.join("audit.log"))
        .keys_file(dir.join("keys.json"))
        .route(ollama_route(ollama))
        .route(
            Route::new("gpu2", "/gpu2/", "ai")
                .upstream(refused_addr())
                .health_check(HealthCheck::new("/").interval("1s").timeout("500ms")),
        );
    Gateway::start(&cfg, KeyFile::new())
}

#[test]
fn the_page_shows_the_traffic_in_chromium_and_after_a_restart() {
    let profile = tempfile::tempdir().unwrap();
    let blank_png = profile.path().join("blank.png");
    headless(
        &[&format!("--screenshot={}", blank_png.display())],
        "about:blank",
        profile.path(),
    );

    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("status CA");
    ca.leaf(&["localhost"], 7, 30)
        .write(&dir.path().join("cert.pem"), &dir.path().join("key.pem"));
    let (ann1, ann2, bob1) = ("ann-key-one-0001", "ann-key-two-0002", "bob-key-one-0003");
    std::fs::write(
        dir.path().join("keys.json"),
        KeyFile::of([
            admin_entry(),
            Key::new(ann1, "ann").service("ai"),
            Key::new(ann2, "ann").service("ai"),
            Key::new(bob1, "bob").service("ai").rate_limit("2/min"),
            Key::new("gone-key-0004", "carol")
                .service("ai")
                .disabled(true),
        ])
        .to_string(),
    )
    .unwrap();
    let ollama = AiServer::start(AiOptions {
        delay: Duration::ZERO,
        ..AiOptions::default()
    });
    let (tls, plain, admin_port) = (free_port(), free_port(), free_port());
    let mut gw = page_gateway(dir.path(), ollama.addr, tls, plain, admin_port);
    let admin = loopback(admin_port);

    // Known traffic: ann with two keys, bob with one (rate-limited), a
    // revoked key still tried, a missing key, and the down upstream.
    let body = json!({"model": "llama3.2", "prompt": "hi", "stream": false});
    for (i, key) in [ann1, ann1, ann2, bob1, bob1, bob1, "gone-key-0004", ""]
        .iter()
        .enumerate()
    {
        let r = ai_post(&gw, "/ollama/api/generate", key, &format!("t{i}"), &body);
        assert!(matches!(r.status, 200 | 401 | 429), "{}", r.status);
    }
    let down = ai_post(&gw, "/gpu2/api/generate", ann1, "down", &body);
    assert!(down.status >= 500, "{}", down.status);

    let usage = || {
        let out = run_cli(
            &[
                "usage",
                "--by",
                "user",
                "--json",
                "--config",
                gw.config_path.to_str().unwrap(),
            ],
            dir.path(),
        );
        assert!(out.status.success(), "{}", out.stderr);
        serde_json::from_str::<Value>(&out.stdout).expect("usage --json")
    };
    // Nine requests, and the harness's readiness probe (no route).
    let report = poll(Duration::from_secs(10), "the audit lines", || {
        let r = usage();
        (r["total"]["requests"].as_u64() == Some(10)).then_some(r)
    });
    let expiry = {
        let m = metrics_text(admin);
        let secs = metric_u64(
            &m,
            &format!(
                "agw_tls_cert_expiry_timestamp_seconds{{listener=\"https://127.0.0.1:{tls}\"}}"
            ),
        );
        assert!(secs > 0, "{m}");
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs))
            .to_string()
    };

    let url = format!("http://root:{ADMIN}@127.0.0.1:{admin_port}/");
    let dom_of = || {
        poll(
            Duration::from_secs(15),
            "the page with the down upstream",
            || {
                let dom = headless(&["--dump-dom"], &url, profile.path());
                (dom.contains("class=\"down\"") && dom.contains("gpu2")).then_some(dom)
            },
        )
    };
    let dom = dom_of();
    for user in ["ann", "bob"] {
        let cells =
            row_cells(&dom, "by-user", user).unwrap_or_else(|| panic!("{user} row in {dom}"));
        let g = &report["groups"][user];
        assert_eq!(
            cells[1],
            g["requests"].to_string(),
            "{user} requests: {cells:?}"
        );
        assert_eq!(
            cells[3],
            g["prompt_tokens"].to_string(),
            "{user} prompt: {cells:?}"
        );
        assert_eq!(
            cells[4],
            g["completion_tokens"].to_string(),
            "{user} completion: {cells:?}"
        );
    }
    let bob = row_cells(&dom, "by-key", &key_id(bob1)).expect("bob's key row");
    assert_eq!(bob[2], "1", "one refusal: {bob:?}");
    assert!(bob[9].contains("rate_limited 1"), "{bob:?}");
    assert!(
        dom.contains(&key_id("gone-key-0004")),
        "a revoked key still tried"
    );
    assert!(dom.contains(&expiry), "certificate expiry {expiry}");
    assert!(row_cells(&dom, "by-user", "-").is_some_and(|c| c[9].contains("missing_key 1")));

    let shot = profile.path().join("page.png");
    headless(
        &[&format!("--screenshot={}", shot.display())],
        &url,
        profile.path(),
    );
    let png = std::fs::read(&shot).expect("the screenshot");
    let blank = std::fs::read(&blank_png).expect("the blank screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[16..24], &[0, 0, 4, 176, 0, 0, 9, 96], "1200 x 2400");
    let distinct = png.iter().collect::<std::collections::BTreeSet<_>>().len();
    assert!(
        png.len() > 4 * blank.len() && distinct > 200,
        "{} bytes ({distinct} distinct) against {} for a blank page",
        png.len(),
        blank.len()
    );

    // After a restart: the same 24-hour totals.
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)).is_some());
    drop(gw);
    let gw = page_gateway(dir.path(), ollama.addr, tls, plain, admin_port);
    let again = poll(Duration::from_secs(15), "the rebuilt page", || {
        let dom = headless(&["--dump-dom"], &url, profile.path());
        dom.contains("rebuilt from the audit log").then_some(dom)
    });
    for user in ["ann", "bob"] {
        assert_eq!(
            row_cells(&again, "by-user", user),
            row_cells(&dom, "by-user", user),
            "{user}"
        );
    }
    assert_eq!(row_cells(&again, "by-key", &key_id(bob1)), Some(bob));
    assert!(
        dom_of().contains("gpu2"),
        "the health check finds it down again"
    );
    drop(gw);
}
