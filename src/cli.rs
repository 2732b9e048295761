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
    /// change the level). SIGHUP reloads the config and the key file;
    /// SIGTERM drains requests in flight and exits.
    Run(ConfigArg),
    /// Load and validate the config and the key file without serving; exit 0
    /// with a summary, or non-zero with the file, line and reason.
    Check(ConfigArg),
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The gateway's YAML configuration.
    #[arg(
        long,
        short = 'c',
        value_name = "PATH",
        default_value = "conf/gateway.yaml"
    )]
    pub config: PathBuf,
}
