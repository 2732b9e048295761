//! `keys_file`: where the API keys are.
//!
//! Only the path is settled here, relative to the config's folder. The
//! `keys` layer reads and compiles the file, at start and on every reload,
//! and reports its errors against that file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// `keys_file` as written: a path, not empty (an empty one would name the
/// config's folder).
#[derive(Debug)]
pub(super) struct KeysFile(PathBuf);

impl KeysFile {
    /// The file, relative paths resolved against `base`, the config's folder.
    pub(super) fn path(self, base: &Path) -> PathBuf {
        base.join(self.0)
    }
}

impl<'de> Deserialize<'de> for KeysFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let p = PathBuf::deserialize(d)?;
        if p.as_os_str().is_empty() {
            return Err(serde::de::Error::custom(
                "must name the key file (such as keys/apikeys.json)",
            ));
        }
        Ok(KeysFile(p))
    }
}
