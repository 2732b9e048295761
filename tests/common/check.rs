//! `ai-gateway check` on a config and key file, and reading the position
//! its errors report.

use std::fmt::Display;
use std::path::Path;

use super::config::ConfigText;
use super::gateway::{run_cli, CliOutput, GatewayFiles};

/// Writes `config` (built, or text for tests of config errors) and `keys`
/// to a temp dir and runs `check --config <path>` from there.
pub fn run_check(config: impl ConfigText, keys: impl Display) -> (GatewayFiles, CliOutput) {
    let files = GatewayFiles::write(config, keys);
    let path = files.config_path.to_str().expect("UTF-8 temp path");
    let out = run_cli(&["check", "--config", path], files.dir.path());
    (files, out)
}

/// The 1-based number of the first line of `text` containing `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"))
        + 1
}

/// The line number printed after `file:` in `err`.
pub fn reported_line(err: &str, file: &Path) -> usize {
    let name = format!("{}:", file.display());
    let at = err.find(&name).expect("file named") + name.len();
    err[at..]
        .split(':')
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no line number: {err}"))
}
