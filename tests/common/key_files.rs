//! Key files written by tests, and the names the gateway gives keys.

use std::path::Path;

use super::util::sha256_hex;

/// A key file (JSON) from `(key, fields)` pairs; `fields` is the inside of
/// the entry's object, e.g. `"user": "ann", "service": "chat"`.
pub fn keys(entries: &[(&str, &str)]) -> String {
    let body: Vec<String> = entries
        .iter()
        .map(|(k, fields)| format!("  \"{k}\": {{{fields}}}"))
        .collect();
    format!("{{\n{}\n}}\n", body.join(",\n"))
}

/// A key's id as logs, `keys list` and `keys revoke` know it: the first 12
/// hex digits of its SHA-256.
pub fn key_id(key: &str) -> String {
    sha256_hex(key.as_bytes())[..12].to_string()
}

/// A temp path as a `&str` for a command line.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}
