//! The one error type for loading configuration and key files.
//!
//! Every variant names the file it is about, so an operator reading a log
//! line or a `check` failure knows which file to open; parse errors also
//! carry the line and column when the parser knows them. None of them ever
//! holds a key: entries are referred to by their key id.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why a configuration or key file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read at all.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but its content is wrong: bad syntax, an unknown
    /// field, a value out of range, an inconsistency between entries.
    #[error("{}{location}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        location: Location,
        message: String,
    },
}

impl LoadError {
    /// An error about `path` with no known position (a cross-entry check).
    pub fn invalid(path: &Path, message: impl Into<String>) -> Self {
        LoadError::Invalid {
            path: path.to_path_buf(),
            location: Location::default(),
            message: message.into(),
        }
    }

    /// An error at a known position in `path`.
    pub fn at(path: &Path, location: Location, message: impl Into<String>) -> Self {
        LoadError::Invalid {
            path: path.to_path_buf(),
            location,
            message: message.into(),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        LoadError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Wraps a serde_json error, keeping its line and column.
    pub fn from_json(path: &Path, err: &serde_json::Error) -> Self {
        let location = if err.line() > 0 {
            Location::new(err.line(), err.column())
        } else {
            Location::default()
        };
        LoadError::at(path, location, strip_json_position(&err.to_string()))
    }
}

/// A 1-based line and column, printed the way compilers print them
/// (`file:line:col`), so editors can jump to it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl Location {
    pub fn new(line: usize, column: usize) -> Self {
        Location {
            line: Some(line),
            column: Some(column),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, ":{l}:{c}"),
            (Some(l), None) => write!(f, ":{l}"),
            _ => Ok(()),
        }
    }
}

/// serde_json appends " at line X column Y" to its messages; the position
/// is printed once, up front, instead.
fn strip_json_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg.get(..i).unwrap_or(msg).to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_puts_position_after_the_file() {
        let e = LoadError::at(Path::new("conf/g.yaml"), Location::new(3, 7), "bad");
        assert_eq!(e.to_string(), "conf/g.yaml:3:7: bad");
        let e = LoadError::invalid(Path::new("k.json"), "dup");
        assert_eq!(e.to_string(), "k.json: dup");
    }

    #[test]
    fn position_suffix_is_stripped_once() {
        assert_eq!(
            strip_json_position("unknown field `x` at line 3 column 5"),
            "unknown field `x`"
        );
        assert_eq!(strip_json_position("plain"), "plain");
    }
}
