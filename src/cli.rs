//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    #[arg(long = "service", value_name = "SVC", required = true)]
    pub services: Vec<String>,
    /// When the key stops working: an RFC 3339 time or a duration such as 30d.
    #[arg(long, value_name = "WHEN")]
    pub expires: Option<String>,
    /// A free-text note stored with the entry.
    #[arg(long, value_name = "TEXT")]
    pub note: Option<String>,
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
