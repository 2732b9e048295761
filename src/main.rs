use std::process::ExitCode;

use clap::Parser;

use ai_gateway::cli::{Cli, Command};
use ai_gateway::snapshot::Snapshot;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => match ai_gateway::daemon::run(&args.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check(args) => match Snapshot::load(&args.config, 1) {
            Ok(snapshot) => {
                for w in snapshot.warnings() {
                    eprintln!("warning: {w}");
                }
                println!("{}: ok, {}", args.config.display(), snapshot.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
