//! The command line: its arguments, and running each command.
//!
//! The top of the crate: it may import every layer.

use std::path::PathBuf;
use std::time::SystemTime;

use clap::{Args, Parser, Subcommand};

use crate::cluster;
use crate::config::{AuditDest, Config};
use crate::daemon;
use crate::keys::{self, KeyId, KeyToolError, NewKey, Revoked};
use crate::policy::Snapshot;
use crate::state::Carried;
use crate::usage::report;

/// A self-hosted API-key gateway for AI services: checks a key on every
/// request, routes by path, and streams answers back untouched.
#[derive(Debug, Parser)]
#[command(name = "ai-gateway", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway in the foreground (logs go to stderr; set RUST_LOG to
    /// change the level). SIGHUP or a change to the config or key file
    /// reloads them; SIGTERM drains requests in flight and exits.
    Run(RunArgs),
    /// Load and validate the config and the key file without serving; exit 0
    /// with a summary, or non-zero with the file, line and reason.
    Check(ConfigArg),
    /// Create a key: printed once on stdout, stored only as its SHA-256.
    Keygen(KeygenArgs),
    /// List, revoke and hash the keys in the key file.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Requests, tokens and errors per user, key, model, route, day or end user,
    /// from the audit log and its rotated files (PATH.1, PATH.2.gz, ...).
    Usage(UsageArgs),
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The audit log (default: the config's `audit_log`).
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    /// Only requests since then: a duration back from now (7d, 12h), a
    /// date (2026-11-01) or an RFC 3339 time.
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// What to total by: user, key, model, requested_model (the alias
    /// asked for, else the model), route, day or end_user (the end users
    /// behind keys with end_user_header).
    #[arg(long, value_name = "GROUP", default_value = "user")]
    pub by: String,
    /// Only the requests of this key (its id as `keys list` shows it, or
    /// the start of it).
    #[arg(long, value_name = "ID")]
    pub key: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Take over the listening sockets of a running gateway (graceful
    /// upgrade): start this, then send SIGQUIT to the old process.
    #[arg(long, short = 'u')]
    pub upgrade: bool,
}

/// Where the config is looked for: the shipped one, from the repository root.
pub const DEFAULT_CONFIG: &str = "conf/gateway.yaml";

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The gateway's YAML configuration (key commands use its `keys_file`).
    #[arg(
        long,
        short = 'c',
        value_name = "PATH",
        default_value = DEFAULT_CONFIG
    )]
    pub config: PathBuf,
}

/// Which key file a key command edits.
#[derive(Debug, Args)]
pub struct KeysTarget {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The key file itself (instead of going through --config).
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    pub keys: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Who holds the key; sent upstream as X-Gateway-User.
    #[arg(long)]
    pub user: String,
    /// A service the key may use (repeat for several; "*" for all).
    #[arg(
        long = "service",
        value_name = "SVC",
        required_unless_present = "admin"
    )]
    pub services: Vec<String>,
    /// An admin key: opens the status page and the key API on
    /// `admin_listen`, and no route (so it takes no --service).
    #[arg(long, conflicts_with = "services")]
    pub admin: bool,
    /// When the key stops working: an RFC 3339 time or a duration such as 30d.
    #[arg(long, value_name = "WHEN")]
    pub expires: Option<String>,
    /// A free-text note stored with the entry.
    #[arg(long, value_name = "TEXT")]
    pub note: Option<String>,
    /// The key's request rate, such as 60/min or 5/s (over it: 429).
    #[arg(long, value_name = "N/UNIT")]
    pub rate_limit: Option<String>,
    /// How many requests the key may have in flight at once (over it: 429).
    #[arg(long, value_name = "N")]
    pub max_concurrent: Option<std::num::NonZeroU32>,
    /// The key's token budget on routes with `api`, such as 200k/day or
    /// 1.5M/day (over it: 429 until the window ends).
    #[arg(long, value_name = "N/UNIT")]
    pub token_limit: Option<String>,
    /// A model the key may use, such as llama3.2 or "qwen*" (repeat for
    /// several; without it, every model).
    #[arg(long = "model", value_name = "MODEL")]
    pub models: Vec<String>,
    /// The header that names the end users behind the key, such as
    /// X-OpenWebUI-User-Id: usage is then reported per end user, and the
    /// --end-user-* limits apply to each.
    #[arg(long, value_name = "HEADER")]
    pub end_user_header: Option<String>,
    /// Each end user's request rate, such as 10/min.
    #[arg(long, value_name = "N/UNIT", requires = "end_user_header")]
    pub end_user_rate_limit: Option<String>,
    /// How many requests each end user may have in flight at once.
    #[arg(long, value_name = "N", requires = "end_user_header")]
    pub end_user_max_concurrent: Option<std::num::NonZeroU32>,
    /// Each end user's token budget, such as 50k/day.
    #[arg(long, value_name = "N/UNIT", requires = "end_user_header")]
    pub end_user_token_limit: Option<String>,
    #[command(flatten)]
    pub target: KeysTarget,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Show id, user, services, created, expires and state of every key
    /// (never a key itself).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: KeysTarget,
    },
    /// Disable a key (or delete its entry with --delete).
    Revoke {
        /// The key id as `keys list` shows it (at least 4 hex digits).
        id: String,
        /// Remove the entry instead of marking it disabled.
        #[arg(long)]
        delete: bool,
        /// Also publish the revocation through the config's shared_state
        /// Redis: every running instance refuses the key within a second,
        /// before its copy of the key file changes.
        #[arg(long, conflicts_with = "keys")]
        shared: bool,
        #[command(flatten)]
        target: KeysTarget,
    },
    /// Replace every plaintext key in the file by its sha256 digest, in place.
    Hash {
        /// Keep the original file as <file>.bak (it holds the plaintext keys).
        #[arg(long)]
        backup: bool,
        #[command(flatten)]
        target: KeysTarget,
    },
}

/// Runs a parsed command. `signals` is what `main` caught before anything
/// else, for the daemon's reloader.
pub fn execute(
    command: Command,
    signals: std::io::Result<signal_hook::iterator::Signals>,
) -> Result<(), String> {
    match command {
        Command::Run(args) => signals
            .map_err(daemon::StartError::Signals)
            .and_then(|s| daemon::run(&args.config.config, args.upgrade, s))
            .map_err(|e| e.to_string()),
        Command::Check(args) => check(&args.config),
        Command::Keygen(a) => keygen(&a).map_err(|e| e.to_string()),
        Command::Keys { command } => keys_command(command).map_err(|e| e.to_string()),
        Command::Usage(a) => usage(&a),
    }
}

fn usage(a: &UsageArgs) -> Result<(), String> {
    let by = report::GroupBy::parse(&a.by)?;
    let since = a
        .since
        .as_deref()
        .map(|s| report::parse_since(s, SystemTime::now()))
        .transpose()?;
    let path = match &a.audit_log {
        Some(p) => p.clone(),
        None => {
            let c = Config::load(&a.config.config).map_err(|e| e.to_string())?;
            match c.audit_log {
                Some(AuditDest::File(p)) => p,
                Some(AuditDest::Stderr) => {
                    return Err(format!(
                        "{}: audit_log is \"-\" (stderr); give the file with --audit-log",
                        c.path.display()
                    ))
                }
                None => {
                    return Err(format!(
                        "{}: no audit_log is set; give the file with --audit-log",
                        c.path.display()
                    ))
                }
            }
        }
    };
    let files = report::audit_files(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if files.is_empty() {
        return Err(format!(
            "{}: no audit log there (nor rotated files)",
            path.display()
        ));
    }
    let key = a.key.as_deref().map(str::to_ascii_lowercase);
    let r = report::build_for_key(&files, by, since, key.as_deref()).map_err(|e| e.to_string())?;
    if a.json {
        let text = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        print!("{}", report::render_table(&r));
    }
    Ok(())
}

fn check(config: &std::path::Path) -> Result<(), String> {
    let snapshot = Snapshot::load(config, 1, &Carried::default()).map_err(|e| e.to_string())?;
    let tls_lines = check_tls(&snapshot.config)?;
    for w in snapshot.warnings.iter().chain(&tls_lines.warnings) {
        eprintln!("warning: {w}");
    }
    println!("{}: ok, {}", config.display(), snapshot.summary());
    println!("{}", snapshot.config.clients.describe());
    for line in &tls_lines.lines {
        println!("{line}");
    }
    if let Some(shared) = &snapshot.config.shared_state {
        // The URL's form was checked when the config was parsed; Redis is
        // not contacted.
        println!(
            "shared state: redis {} (not contacted), on_redis_error: {}, timeout {:?}{}",
            shared.redis.redacted(),
            shared.on_error.name(),
            shared.timeout,
            shared.ca.as_ref().map_or(String::new(), |ca| format!(
                ", server verified against {}",
                ca.path.display()
            ))
        );
    }
    Ok(())
}

/// What `check` says about the TLS listeners.
#[derive(Default)]
struct TlsCheck {
    lines: Vec<String>,
    warnings: Vec<String>,
}

/// Checks each TLS listener's certificate without serving: the files exist
/// and parse, the key matches, the dates are good (a warning under 14
/// days); ACME settings without contacting the server.
fn check_tls(config: &crate::config::Config) -> Result<TlsCheck, String> {
    use crate::config::{ListenKind, TlsSource};
    let now = std::time::SystemTime::now();
    let mut out = TlsCheck::default();
    for l in &config.listeners {
        match &l.kind {
            ListenKind::Tls(TlsSource::Files { cert, key }) => {
                let c = crate::tls::LoadedCert::load(cert, key).map_err(|e| e.to_string())?;
                if let Some(w) = c.check_dates(cert, now).map_err(|e| e.to_string())? {
                    out.warnings.push(w);
                }
                out.lines.push(format!(
                    "{}: certificate {} for {} (serial {}), valid until {}",
                    l.url(),
                    cert.display(),
                    if c.names.is_empty() {
                        "no DNS name".to_string()
                    } else {
                        c.names.join(", ")
                    },
                    c.serial,
                    humantime::format_rfc3339_seconds(c.not_after)
                ));
            }
            ListenKind::Tls(TlsSource::Acme(spec)) => {
                let line = crate::tls::acme::check_spec(spec, &config.path, now)
                    .map_err(|e| e.to_string())?;
                out.lines.push(format!("{}: {line}", l.url()));
            }
            ListenKind::Redirect => out.lines.push(format!("{}: redirects to https", l.url())),
            ListenKind::Plain => {}
        }
    }
    Ok(out)
}

fn target(t: &KeysTarget) -> Result<std::path::PathBuf, KeyToolError> {
    keys::resolve_keys_file(t.keys.as_deref(), &t.config.config).map(|(p, _)| p)
}

fn keygen(a: &KeygenArgs) -> Result<(), KeyToolError> {
    let (path, config) =
        keys::resolve_keys_file(a.target.keys.as_deref(), &a.target.config.config)?;
    if let Some(c) = &config {
        for s in a.services.iter().filter(|s| *s != "*") {
            if !c.routes.iter().any(|r| &r.service == s) {
                eprintln!(
                    "warning: no route in {} serves service {s:?}",
                    c.path.display()
                );
            }
        }
    }
    let req = NewKey {
        user: &a.user,
        services: &a.services,
        expires: a.expires.as_deref(),
        note: a.note.as_deref(),
        rate_limit: a.rate_limit.as_deref(),
        max_concurrent: a.max_concurrent,
        token_limit: a.token_limit.as_deref(),
        models: &a.models,
        end_users: a
            .end_user_header
            .as_deref()
            .map(|header| keys::NewEndUsers {
                header,
                rate_limit: a.end_user_rate_limit.as_deref(),
                max_concurrent: a.end_user_max_concurrent,
                token_limit: a.end_user_token_limit.as_deref(),
            }),
        admin: a.admin,
    };
    let (key, digest) = keys::keygen(&path, &req, SystemTime::now())?;
    println!("{key}");
    eprintln!(
        "created key {} for user {:?} in {} (only its sha256 is stored: copy the key now)",
        digest.id(),
        a.user,
        path.display()
    );
    Ok(())
}

fn keys_command(command: KeysCommand) -> Result<(), KeyToolError> {
    match command {
        KeysCommand::List { json, target: t } => {
            let rows = keys::list(&target(&t)?, SystemTime::now())?;
            if json {
                let text = serde_json::to_string_pretty(&rows)
                    .map_err(|e| KeyToolError::Usage(e.to_string()))?;
                println!("{text}");
            } else {
                print!("{}", keys::render_table(&rows));
                let plain = rows.iter().filter(|r| r.plaintext).count();
                if plain > 0 {
                    eprintln!("{plain} key(s) stored in plaintext: `ai-gateway keys hash` replaces them by digests");
                }
            }
        }
        KeysCommand::Revoke {
            id,
            delete,
            shared,
            target: t,
        } => {
            let (path, config) = keys::resolve_keys_file(t.keys.as_deref(), &t.config.config)?;
            let spec = match (shared, config.and_then(|c| c.shared_state)) {
                (false, _) => None,
                (true, Some(spec)) => Some(spec),
                (true, None) => {
                    return Err(KeyToolError::Usage(format!(
                    "keys revoke --shared: {} has no shared_state (the Redis to publish through)",
                    t.config.config.display()
                )))
                }
            };
            let id = match keys::revoke(&path, &id, delete, SystemTime::now())? {
                Revoked::Disabled(id) => {
                    eprintln!("key {id} disabled in {}", path.display());
                    id
                }
                Revoked::Deleted(id) => {
                    eprintln!("key {id} deleted from {}", path.display());
                    id
                }
            };
            if let Some(spec) = spec {
                let key_id = KeyId::parse_hex(&id)
                    .ok_or_else(|| KeyToolError::Usage(format!("not a key id: {id}")))?;
                cluster::publish_revocations(&spec, &[key_id]).map_err(|e| {
                    KeyToolError::Usage(format!(
                        "key {id} revoked in {} but not published: {e}",
                        path.display()
                    ))
                })?;
                eprintln!(
                    "key {id} revoked on every instance sharing redis {}",
                    spec.redis.redacted()
                );
            }
        }
        KeysCommand::Hash { backup, target: t } => {
            let path = target(&t)?;
            let r = keys::hash_in_place(&path, backup)?;
            eprintln!(
                "{}: {} key(s) hashed, {} already stored as digests",
                path.display(),
                r.hashed,
                r.already
            );
            if let Some(b) = r.backup {
                eprintln!("the original (with plaintext keys) is in {}: delete it once you no longer need it", b.display());
            }
        }
    }
    Ok(())
}
