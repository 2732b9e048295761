//! The `ai-gateway` binary: logging, arguments, then the command.

use std::process::ExitCode;

use clap::Parser;

use ai_gateway::cli::{self, Cli};

/// mimalloc instead of glibc's malloc: a proxied request allocates and
/// frees dozens of small blocks (header maps, boxed futures, buffers);
/// callgrind counted 13% fewer instructions per request with it, and the
/// A/B under load 3-4 µs less user CPU per request (benches/RESULTS.md).
/// Its memory is kept in check by `daemon::memory` (no eager commit, a
/// collection after each key file load).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's options are set by an ELF constructor, which runs before the
/// Rust runtime allocates anything: set in `main`, they would come after
/// mimalloc had reserved (and committed) its first arena.
#[used]
#[link_section = ".init_array"]
static CONFIGURE_ALLOCATOR: extern "C" fn() = {
    extern "C" fn configure() {
        ai_gateway::daemon::configure_allocator();
    }
    configure
};

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
