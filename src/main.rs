use std::process::ExitCode;
use std::time::SystemTime;

use clap::Parser;

use ai_gateway::cli::{Cli, Command, KeysCommand, KeysTarget};
use ai_gateway::keytool::{self, KeyToolError, NewKey, Revoked};
use ai_gateway::snapshot::Snapshot;

fn main() -> ExitCode {
    // Before anything else: a SIGHUP from here on is queued for the reloader
    // instead of killing the process (its default action).
    let signals = ai_gateway::daemon::catch_signals();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match Cli::parse().command {
        Command::Run(args) => signals
            .map_err(ai_gateway::daemon::StartError::Signals)
            .and_then(|s| ai_gateway::daemon::run(&args.config.config, args.upgrade, s))
            .map_err(|e| e.to_string()),
        Command::Check(args) => check(&args.config),
        Command::Keygen(a) => keygen(&a).map_err(|e| e.to_string()),
        Command::Keys { command } => keys(command).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(config: &std::path::Path) -> Result<(), String> {
    let snapshot = Snapshot::load(config, 1).map_err(|e| e.to_string())?;
    for w in &snapshot.warnings {
        eprintln!("warning: {w}");
    }
    println!("{}: ok, {}", config.display(), snapshot.summary());
    Ok(())
}

fn target(t: &KeysTarget) -> Result<std::path::PathBuf, KeyToolError> {
    keytool::resolve_keys_file(t.keys.as_deref(), &t.config.config).map(|(p, _)| p)
}

fn keygen(a: &ai_gateway::cli::KeygenArgs) -> Result<(), KeyToolError> {
    let (path, config) =
        keytool::resolve_keys_file(a.target.keys.as_deref(), &a.target.config.config)?;
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
    };
    let (key, digest) = keytool::keygen(&path, &req, SystemTime::now())?;
    println!("{key}");
    eprintln!(
        "created key {} for user {:?} in {} (only its sha256 is stored: copy the key now)",
        digest.id(),
        a.user,
        path.display()
    );
    Ok(())
}

fn keys(command: KeysCommand) -> Result<(), KeyToolError> {
    match command {
        KeysCommand::List { json, target: t } => {
            let rows = keytool::list(&target(&t)?, SystemTime::now())?;
            if json {
                let text = serde_json::to_string_pretty(&rows)
                    .map_err(|e| KeyToolError::Usage(e.to_string()))?;
                println!("{text}");
            } else {
                print!("{}", keytool::render_table(&rows));
                let plain = rows.iter().filter(|r| r.plaintext).count();
                if plain > 0 {
                    eprintln!("{plain} key(s) stored in plaintext: `ai-gateway keys hash` replaces them by digests");
                }
            }
        }
        KeysCommand::Revoke {
            id,
            delete,
            target: t,
        } => {
            let path = target(&t)?;
            match keytool::revoke(&path, &id, delete, SystemTime::now())? {
                Revoked::Disabled(id) => eprintln!("key {id} disabled in {}", path.display()),
                Revoked::Deleted(id) => eprintln!("key {id} deleted from {}", path.display()),
            }
        }
        KeysCommand::Hash { backup, target: t } => {
            let path = target(&t)?;
            let r = keytool::hash_in_place(&path, backup)?;
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
