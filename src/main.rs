//! The `ai-gateway` binary: logging, arguments, then the command.

use std::process::ExitCode;

use clap::Parser;

use ai_gateway::cli::{self, Cli};

fn main() -> ExitCode {
    // Before anything else: a SIGHUP from here on is queued for the reloader
    // instead of killing the process (its default action).
    let signals = ai_gateway::daemon::catch_signals();
    ai_gateway::ops::logs::init();
    match cli::execute(Cli::parse().command, signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
