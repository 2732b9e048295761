//! The key file as a document to edit: read it keeping every entry, field
//! and the order they are in, change it, and write it back atomically.
//!
//! The daemon only ever reads the key file; the `keygen` and `keys`
//! commands write it. Writers hold an exclusive lock on a lock file beside
//! it for the whole read-modify-write, so concurrent commands never lose
//! each other's entries, and they replace the file by renaming a finished,
//! fsynced temporary file over it, so a reload never sees half a file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::digest::{KeyDigest, KeyId, DIGEST_PREFIX};
use super::store::{KeyStore, ServiceTable};
use crate::config::{yaml, LoadError};

/// The two syntaxes a key file can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    /// Written back without comments: YAML comments do not survive an edit.
    Yaml,
}

/// An open key file: its entries in file order.
#[derive(Debug)]
pub struct KeyFile {
    pub path: PathBuf,
    pub format: Format,
    pub entries: Map<String, Value>,
}

/// An exclusive lock on `<key file>.lock`, released on drop.
pub struct Lock {
    _file: File,
}

impl Lock {
    /// Blocks until no other writer holds the key file.
    pub fn acquire(keys_path: &Path) -> Result<Lock, LoadError> {
        let lock_path = lock_path(keys_path);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode_0600()
            .open(&lock_path)
            .map_err(|e| LoadError::io(&lock_path, e))?;
        file.lock().map_err(|e| LoadError::io(&lock_path, e))?;
        Ok(Lock { _file: file })
    }
}

/// The lock file beside `keys_path`.
pub fn lock_path(keys_path: &Path) -> PathBuf {
    let mut name = keys_path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    keys_path.with_file_name(name)
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

impl KeyFile {
    /// Reads the key file at `path`. A missing file is an empty one, so the
    /// first `keygen` can create it.
    pub fn open(path: &Path) -> Result<KeyFile, LoadError> {
        let format = format_of(path, "");
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(KeyFile {
                    path: path.to_path_buf(),
                    format,
                    entries: Map::new(),
                })
            }
            Err(e) => return Err(LoadError::io(path, e)),
        };
        let format = format_of(path, &text);
        let entries: Map<String, Value> = match format {
            Format::Json => {
                serde_json::from_str(&text).map_err(|e| LoadError::from_json(path, &e))?
            }
            Format::Yaml if text.trim().is_empty() => Map::new(),
            Format::Yaml => yaml::from_str_seed(path, &text, PhantomData)?,
        };
        Ok(KeyFile {
            path: path.to_path_buf(),
            format,
            entries,
        })
    }

    /// The file's text as it would be written.
    pub fn render(&self) -> Result<String, LoadError> {
        match self.format {
            Format::Json => serde_json::to_string_pretty(&self.entries)
                .map(|mut s| {
                    s.push('\n');
                    s
                })
                .map_err(|e| LoadError::invalid(&self.path, e.to_string())),
            Format::Yaml => yaml::to_string(&self.path, &self.entries),
        }
    }

    /// Checks that the daemon would accept the file, then replaces it
    /// atomically with mode 0600. A file the daemon would reject is never
    /// written.
    pub fn save(&self) -> Result<(), LoadError> {
        let text = self.render()?;
        KeyStore::parse(&self.path, &text, &ServiceTable::default())?;
        write_atomically(&self.path, text.as_bytes()).map_err(|e| LoadError::io(&self.path, e))
    }

    /// The entries whose key id starts with `prefix` (hex, any case).
    pub fn find_by_id(&self, prefix: &str) -> Vec<(String, KeyId)> {
        let prefix = prefix.to_ascii_lowercase();
        self.entries
            .keys()
            .map(|name| (name.clone(), entry_digest(name).id()))
            .filter(|(_, id)| id.to_string().starts_with(&prefix))
            .collect()
    }
}

/// The digest an entry name stands for, whether it is plaintext or digest.
pub fn entry_digest(name: &str) -> KeyDigest {
    match name
        .strip_prefix(DIGEST_PREFIX)
        .and_then(KeyDigest::from_hex)
    {
        Some(d) => d,
        None => KeyDigest::of(name.as_bytes()),
    }
}

/// Whether the entry name is a plaintext key (not `sha256:<hex>`).
pub fn is_plaintext(name: &str) -> bool {
    name.strip_prefix(DIGEST_PREFIX)
        .and_then(KeyDigest::from_hex)
        .is_none()
}

fn format_of(path: &Path, text: &str) -> Format {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext.eq_ignore_ascii_case("yaml") || ext.eq_ignore_ascii_case("yml") {
        return Format::Yaml;
    }
    if ext.eq_ignore_ascii_case("json")
        || text.trim().is_empty()
        || text.trim_start().starts_with('{')
    {
        Format::Json
    } else {
        Format::Yaml
    }
}

/// Writes `data` to `path` so that readers see the old file or the new
/// one, never a mix: a temporary file in the same folder, fsynced, renamed
/// over `path`, then the folder fsynced so the rename survives a crash.
pub fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".ai-gateway-")
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_keeps_order_and_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.json");
        std::fs::write(
            &p,
            r#"{"z": {"user": "z", "service": "a", "note": "keep me"}, "a": {"user": "a", "service": "b", "created_at": "x"}}"#,
        )
        .unwrap();
        let f = KeyFile::open(&p).unwrap();
        f.save().unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.find("\"z\"").unwrap() < text.find("\"a\"").unwrap());
        assert!(text.contains("keep me"));
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn refuses_to_write_what_the_daemon_would_reject() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.json");
        let mut f = KeyFile::open(&p).unwrap();
        f.entries
            .insert("k".into(), serde_json::json!({"user": "u"}));
        assert!(f.save().is_err());
        assert!(!p.exists());
    }

    #[test]
    fn yaml_files_stay_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.yaml");
        std::fs::write(&p, "k1:\n  user: a\n  service: chat\n").unwrap();
        let f = KeyFile::open(&p).unwrap();
        assert_eq!(f.format, Format::Yaml);
        f.save().unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("k1:"), "{text}");
    }

    #[test]
    fn find_by_id_prefix() {
        let mut f = KeyFile {
            path: "k.json".into(),
            format: Format::Json,
            entries: Map::new(),
        };
        f.entries.insert("abc".into(), Value::Null);
        let d = KeyDigest::of(b"x").to_hex();
        f.entries.insert(format!("sha256:{d}"), Value::Null);
        let hit = f.find_by_id(&d[..6].to_uppercase());
        assert_eq!(hit.len(), 1);
        assert_eq!(hit[0].0, format!("sha256:{d}"));
        assert!(is_plaintext("abc"));
        assert!(!is_plaintext(&format!("sha256:{d}")));
    }

    #[test]
    fn lock_path_is_beside_the_file() {
        assert_eq!(
            lock_path(Path::new("/a/b/keys.json")),
            Path::new("/a/b/keys.json.lock")
        );
    }
}
