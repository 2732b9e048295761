//! The configuration the gateway runs on ([`Config`]), and the way to it:
//! parse (`file.rs`, each section in its own file), check (pure), compile
//! (`compile.rs`, all the I/O).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::admin::AuditDest;
use super::alerts::AlertSettings;
use super::clients::ClientLimits;
use super::error::LoadError;
use super::file::{CheckedConfig, FileConfig};
use super::limits::{Limits, ThrottleSpec};
use super::listen::ListenSpec;
use super::routes::RouteSpec;
use super::shared::SharedStateSpec;
use super::values::IpRange;

/// The compiled configuration: every address resolved, every path absolute,
/// every default filled in, every CA file read.
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
    /// Budget alerts for every key with a token budget (a key file entry
    /// may override them); `None` for none.
    pub alerts: Option<AlertSettings>,
    pub routes: Vec<RouteSpec>,
}

impl Config {
    /// Reads, parses, checks and compiles the configuration at `path`.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        Config::parse(path, &text)
    }

    /// Parses, checks and compiles `text` as if it had been read from
    /// `path` (relative paths inside resolve against `path`'s folder).
    pub fn parse(path: &Path, text: &str) -> Result<Config, LoadError> {
        Config::check(path, text)?.compile()
    }

    /// Parses and checks `text` as if it had been read from `path`, without
    /// any I/O: names are not resolved, files not read (see
    /// [`CheckedConfig::compile`] for that).
    pub fn check(path: &Path, text: &str) -> Result<CheckedConfig, LoadError> {
        let file: FileConfig = super::yaml::from_str(path, text)?;
        file.check(path)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;
    use http::Method;

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
        assert_eq!(chat.methods, Some(vec![Method::POST, Method::GET]));
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
        assert!(
            e.starts_with(r#"/etc/agw/gateway.yaml:2:9: listen: "127.0.0.1" is not host:port"#),
            "{e}"
        );
        let e = err(&GOOD.replace(r#""127.0.0.1:8080""#, "[]"));
        assert!(
            e.starts_with("/etc/agw/gateway.yaml:2:9: listen: at least one address"),
            "{e}"
        );
        // Found by the compile step (two spellings of one address), still
        // at the second entry.
        let e = err(&GOOD.replace(
            r#""127.0.0.1:8080""#,
            "\n  - \"127.0.0.1:1\"\n  - \"localhost:1\"",
        ));
        assert!(e.starts_with("/etc/agw/gateway.yaml:4:5: "), "{e}");
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
        // At the second value, from the parser's positions.
        let e = err(&GOOD.replace("name: tts", "name: chat"));
        assert!(e.starts_with("/etc/agw/gateway.yaml:12:11: "), "{e}");
        let e = err(&GOOD.replace("path_prefix: /tts/", "path_prefix: /chat/"));
        assert!(e.starts_with("/etc/agw/gateway.yaml:13:18: "), "{e}");
        let flow = "listen: 127.0.0.1:1\nkeys_file: k\nroutes:\n  - {name: a, path_prefix: /a/, service: s, upstreams: [\"127.0.0.1:2\"]}\n  - {name: \"a\", path_prefix: /b/, service: s, upstreams: [\"127.0.0.1:2\"]}\n";
        assert!(
            err(flow).starts_with("/etc/agw/gateway.yaml:5:12: "),
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
            ClientLimits::from_settings(&ClientSettings::default(), c.threads, open_file_limit())
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
        let anthropic =
            parse(&GOOD.replace("    connect_timeout: 2s", "    api: anthropic")).unwrap();
        assert_eq!(anthropic.routes[0].api, Some(ApiKind::Anthropic));

        let e = err(&GOOD.replace("    connect_timeout: 2s", "    include_usage: true"));
        assert!(
            e.contains("include_usage needs `api: ollama`, `api: openai` or `api: anthropic`"),
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
        assert!(
            e.starts_with(
                r#"/etc/agw/gateway.yaml:11:18: route "chat": upstream_ca: /no/such/ca.pem: cannot read"#
            ),
            "{e}"
        );
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
    fn check_is_pure_and_compile_reports_what_it_could_not_do() {
        // A name nobody can resolve, CA files that do not exist, an admin
        // address on a name: all fine for the check, which reads nothing.
        let text = GOOD
            .replace("\"127.0.0.1:11434\"]", "\"https://no-such-host.invalid:1\"]\n    upstream_ca: /no/such/ca.pem")
            + "admin_listen: \"no-such-host.invalid:9\"\nshared_state: {redis: \"rediss://h:1\", ca: /no/such/redis-ca.pem}\n";
        let path = Path::new("/etc/agw/gateway.yaml");
        assert!(Config::check(path, &text).is_ok());
        // The compile step reports each, at its line and column.
        let only = |keep: &str| {
            let mut t = text.clone();
            for (bad, good) in [
                ("https://no-such-host.invalid:1", "https://127.0.0.1:1"),
                ("    upstream_ca: /no/such/ca.pem\n", ""),
                ("admin_listen: \"no-such-host.invalid:9\"\n", ""),
                (", ca: /no/such/redis-ca.pem", ""),
            ] {
                if !bad.contains(keep) {
                    t = t.replace(bad, good);
                }
            }
            Config::check(path, &t)
                .unwrap()
                .compile()
                .unwrap_err()
                .to_string()
        };
        let e = only("https://no-such-host");
        assert!(
            e.starts_with(r#"/etc/agw/gateway.yaml:10:17: route "chat": upstream "https://no-such-host.invalid:1": cannot resolve"#),
            "{e}"
        );
        let e = only("upstream_ca");
        assert!(
            e.starts_with(r#"/etc/agw/gateway.yaml:11:18: route "chat": upstream_ca: /no/such/ca.pem: cannot read"#),
            "{e}"
        );
        let e = only("admin_listen");
        assert!(
            e.starts_with(r#"/etc/agw/gateway.yaml:16:15: admin_listen "no-such-host.invalid:9": cannot resolve"#),
            "{e}"
        );
        let e = only("redis-ca");
        assert!(
            e.starts_with(
                "/etc/agw/gateway.yaml:16:43: shared_state.ca: /no/such/redis-ca.pem: cannot read"
            ),
            "{e}"
        );
    }

    #[test]
    fn checks_across_settings_are_located() {
        for (from, to, at) in [
            ("upstreams: [\"127.0.0.1:11434\"]", "upstreams: []", "10:16"),
            ("methods: [post, GET]", "methods: []", "7:14"),
            ("strip_prefix: true", "strip_prefix: /tts", "9:19"),
            ("connect_timeout: 2s", "include_usage: true", "11:20"),
            ("connect_timeout: 2s", "allow: []", "11:12"),
            (
                "connect_timeout: 2s",
                "models: {\"a\": [\"127.0.0.1:1\"]}",
                "11:13",
            ),
        ] {
            let e = err(&GOOD.replace(from, to));
            assert!(
                e.starts_with(&format!("/etc/agw/gateway.yaml:{at}: route \"chat\": ")),
                "{to}: {e}"
            );
        }
        let e = err("listen: 127.0.0.1:1\nkeys_file: k\nroutes: []\n");
        assert!(
            e.starts_with("/etc/agw/gateway.yaml:3:9: routes: at least one route"),
            "{e}"
        );
    }

    #[test]
    fn counts_name_what_was_written() {
        for (bad, why) in [
            ("threads: 0", "threads: must be at least 1"),
            ("threads: lots", r#"threads: invalid type: string "lots""#),
            (
                "max_concurrent: 2.5",
                "max_concurrent: invalid type: floating point `2.5`",
            ),
            (
                "max_concurrent: 5000000000",
                "max_concurrent: 5000000000 is too large",
            ),
            ("watch: yes", "watch: "),
            (
                "failed_key_throttle: {max_failures: -1}",
                "failed_key_throttle.max_failures: invalid type: integer `-1`",
            ),
        ] {
            let e = err(&format!("{GOOD}{bad}\n"));
            assert!(e.starts_with("/etc/agw/gateway.yaml:16:"), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
        let c = parse(&format!("{GOOD}threads: 3\nmax_concurrent: 4\n")).unwrap();
        assert_eq!(
            (c.threads, c.limits.max_concurrent.map(|n| n.get())),
            (3, Some(4))
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
