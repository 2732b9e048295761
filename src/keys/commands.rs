//! The key management commands: `keygen`, `keys list`, `keys revoke` and
//! `keys hash`. Each is one locked read-modify-write of the key file, which
//! the daemon then picks up by itself (file watching) or on SIGHUP.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::{json, Value};

use super::digest::{KeyDigest, KeyId, DIGEST_PREFIX};
use super::file::{entry_digest, is_plaintext, write_atomically, KeyFile, Lock};
use super::store::{parse_timestamp, unix_millis};
use crate::config::LoadError;
use crate::config::{Config, ModelPattern, Rate, TokenRate};

/// Every generated key starts with this, so secret scanners and people can
/// tell what a leaked string is.
pub const KEY_PREFIX: &str = "agw_";
/// Random bytes per key: 192 bits, well over the 128 a key needs.
const KEY_BYTES: usize = 24;

/// Why a key command failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyToolError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0}")]
    Usage(String),
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
}

/// Where the key file is: named directly, or through the config.
pub fn resolve_keys_file(
    keys: Option<&Path>,
    config: &Path,
) -> Result<(PathBuf, Option<Config>), KeyToolError> {
    match keys {
        Some(k) => Ok((k.to_path_buf(), None)),
        None => {
            let c = Config::load(config)?;
            Ok((c.keys_file.clone(), Some(c)))
        }
    }
}

/// A new key from the OS CSPRNG: `agw_` and 32 URL-safe characters.
pub fn generate_key() -> Result<String, KeyToolError> {
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| KeyToolError::Random(e.to_string()))?;
    let mut key = String::from(KEY_PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes, &mut key);
    Ok(key)
}

/// What `keygen` was asked for.
pub struct NewKey<'a> {
    pub user: &'a str,
    pub services: &'a [String],
    /// RFC 3339, or a duration from now such as `30d`.
    pub expires: Option<&'a str>,
    pub note: Option<&'a str>,
    /// `60/min`, `5/s`, ...
    pub rate_limit: Option<&'a str>,
    pub max_concurrent: Option<std::num::NonZeroU32>,
    /// `200k/day`, `1.5M/day`, ...
    pub token_limit: Option<&'a str>,
    /// Models the key may use (`llama3.2`, `qwen*`); empty for all.
    pub models: &'a [String],
    /// An admin key (the admin listener's page and key API), granted no
    /// service: `services` must then be empty.
    pub admin: bool,
    /// The header naming the key's end users, and their limits.
    pub end_users: Option<NewEndUsers<'a>>,
}

/// `end_user_header` and `end_user_limits` of a new key.
#[derive(Clone, Copy)]
pub struct NewEndUsers<'a> {
    pub header: &'a str,
    pub rate_limit: Option<&'a str>,
    pub max_concurrent: Option<std::num::NonZeroU32>,
    pub token_limit: Option<&'a str>,
}

impl NewEndUsers<'_> {
    /// The entry's settings, checked as the key file's reader checks them.
    fn entry(&self) -> Result<(String, serde_json::Map<String, serde_json::Value>), KeyToolError> {
        let usage = |flag: &str, e: String| KeyToolError::Usage(format!("{flag}: {e}"));
        let header = http::HeaderName::from_bytes(self.header.trim().as_bytes()).map_err(|_| {
            usage(
                "--end-user-header",
                format!("{:?} is not a header name", self.header),
            )
        })?;
        let mut limits = serde_json::Map::new();
        if let Some(r) = self.rate_limit {
            let r = Rate::parse(r).map_err(|e| usage("--end-user-rate-limit", e))?;
            limits.insert("rate_limit".into(), json!(r.to_string()));
        }
        if let Some(m) = self.max_concurrent {
            limits.insert("max_concurrent".into(), json!(m.get()));
        }
        if let Some(t) = self.token_limit {
            let t = TokenRate::parse(t).map_err(|e| usage("--end-user-token-limit", e))?;
            limits.insert("token_limit".into(), json!(t.to_string()));
        }
        Ok((header.as_str().to_string(), limits))
    }
}

/// Adds a new key to the file and returns `(key, id)`. Only the key's
/// digest is stored.
pub fn keygen(
    keys_path: &Path,
    req: &NewKey<'_>,
    now: SystemTime,
) -> Result<(String, KeyDigest), KeyToolError> {
    if req.user.trim().is_empty() {
        return Err(KeyToolError::Usage("--user must not be empty".into()));
    }
    match (req.admin, req.services.is_empty()) {
        (false, true) => {
            return Err(KeyToolError::Usage(
                "at least one --service is needed".into(),
            ))
        }
        (true, false) => {
            return Err(KeyToolError::Usage(
                "an admin key is granted no service: leave out --service".into(),
            ))
        }
        _ => {}
    }
    let expires_at = req.expires.map(|e| expiry(e, now)).transpose()?;
    let rate = req.rate_limit.map(parse_rate).transpose()?;
    let tokens = req.token_limit.map(parse_token_limit).transpose()?;
    let models = parse_models(req.models)?;

    let end_users = req.end_users.as_ref().map(NewEndUsers::entry).transpose()?;

    let key = generate_key()?;
    let digest = KeyDigest::of(key.as_bytes());
    let mut entry = serde_json::Map::new();
    entry.insert("user".into(), json!(req.user));
    match req.services {
        [] => None,
        [one] => entry.insert("service".into(), json!(one)),
        many => entry.insert("services".into(), json!(many)),
    };
    if req.admin {
        entry.insert("admin".into(), Value::Bool(true));
    }
    entry.insert(
        "created_at".into(),
        json!(humantime::format_rfc3339_millis(now).to_string()),
    );
    if let Some(e) = expires_at {
        entry.insert("expires_at".into(), json!(e));
    }
    if let Some(n) = req.note {
        entry.insert("note".into(), json!(n));
    }
    if let Some(r) = rate {
        entry.insert("rate_limit".into(), json!(r.to_string()));
    }
    if let Some(m) = req.max_concurrent {
        entry.insert("max_concurrent".into(), json!(m.get()));
    }
    if let Some(t) = tokens {
        entry.insert("token_limit".into(), json!(t.to_string()));
    }
    if !models.is_empty() {
        entry.insert("models".into(), json!(models));
    }
    if let Some((header, limits)) = end_users {
        entry.insert("end_user_header".into(), json!(header));
        if !limits.is_empty() {
            entry.insert("end_user_limits".into(), limits.into());
        }
    }

    let _lock = Lock::acquire(keys_path)?;
    let mut file = KeyFile::open(keys_path)?;
    file.entries.insert(
        format!("{DIGEST_PREFIX}{}", digest.to_hex()),
        Value::Object(entry),
    );
    file.save()?;
    Ok((key, digest))
}

fn parse_rate(r: &str) -> Result<Rate, KeyToolError> {
    Rate::parse(r).map_err(|e| KeyToolError::Usage(format!("--rate-limit: {e}")))
}

fn parse_token_limit(t: &str) -> Result<TokenRate, KeyToolError> {
    TokenRate::parse(t).map_err(|e| KeyToolError::Usage(format!("--token-limit: {e}")))
}

/// The model patterns as the file stores them, each checked.
fn parse_models(models: &[String]) -> Result<Vec<String>, KeyToolError> {
    models
        .iter()
        .map(|m| {
            ModelPattern::parse(m)
                .map(|p| p.as_str().to_string())
                .map_err(|e| KeyToolError::Usage(format!("--model: {e}")))
        })
        .collect()
}

/// `expires`: an RFC 3339 time, or a duration from `now` (`30d`, `12h`).
/// A duration is rounded up to the next whole second, so a key never
/// expires sooner than asked; a time already past is refused.
fn expiry(s: &str, now: SystemTime) -> Result<String, KeyToolError> {
    let s = s.trim();
    let (text, at_ms) = match parse_timestamp(s) {
        Ok(ms) => (s.to_string(), ms),
        Err(_) => {
            let d: Duration = humantime::parse_duration(s).map_err(|_| {
                KeyToolError::Usage(format!(
                    "--expires {s:?}: give an RFC 3339 time (2027-01-01T00:00:00Z) or a duration (30d, 12h)"
                ))
            })?;
            let at = now + d;
            let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let whole = if since_epoch.subsec_nanos() > 0 {
                Duration::from_secs(since_epoch.as_secs() + 1)
            } else {
                since_epoch
            };
            let at = std::time::UNIX_EPOCH + whole;
            (
                humantime::format_rfc3339_seconds(at).to_string(),
                unix_millis(at),
            )
        }
    };
    if at_ms <= unix_millis(now) {
        return Err(KeyToolError::Usage(format!(
            "--expires {s:?} is not in the future"
        )));
    }
    Ok(text)
}

/// One row of `keys list`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyRow {
    pub id: String,
    pub user: String,
    pub services: Vec<String>,
    pub created_at: Option<String>,
    pub expires_at: Option<String>,
    /// `active`, `expired` or `disabled`.
    pub state: &'static str,
    /// Whether the file holds this key in plaintext.
    pub plaintext: bool,
    /// Models the key may use; empty for every model.
    pub models: Vec<String>,
    pub rate_limit: Option<String>,
    pub max_concurrent: Option<u64>,
    pub token_limit: Option<String>,
    pub note: Option<String>,
    /// An admin key (admin listener only).
    pub admin: bool,
}

/// The rows of `keys list`, in file order. Never includes a key.
pub fn list(keys_path: &Path, now: SystemTime) -> Result<Vec<KeyRow>, KeyToolError> {
    let file = KeyFile::open(keys_path)?;
    let now_ms = unix_millis(now);
    Ok(file
        .entries
        .iter()
        .map(|(name, v)| {
            let s = |field: &str| v.get(field).and_then(Value::as_str).map(str::to_string);
            let strings = |v: Option<&Value>| match v {
                Some(Value::Array(many)) => many
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            let services = match v.get("service") {
                Some(Value::String(one)) => vec![one.clone()],
                _ => strings(v.get("services")),
            };
            let expires_at = s("expires_at");
            let disabled = v.get("disabled").and_then(Value::as_bool).unwrap_or(false);
            let expired = expires_at
                .as_deref()
                .and_then(|e| parse_timestamp(e).ok())
                .is_some_and(|ms| now_ms >= ms);
            KeyRow {
                id: entry_digest(name).id().to_string(),
                user: s("user").unwrap_or_default(),
                services,
                created_at: s("created_at"),
                expires_at,
                state: if disabled {
                    "disabled"
                } else if expired {
                    "expired"
                } else {
                    "active"
                },
                plaintext: is_plaintext(name),
                models: strings(v.get("models")),
                rate_limit: s("rate_limit"),
                max_concurrent: v.get("max_concurrent").and_then(Value::as_u64),
                token_limit: s("token_limit"),
                note: s("note"),
                admin: v.get("admin").and_then(Value::as_bool).unwrap_or(false),
            }
        })
        .collect())
}

/// Renders rows as an aligned text table.
pub fn render_table(rows: &[KeyRow]) -> String {
    let header = ["ID", "USER", "SERVICES", "CREATED", "EXPIRES", "STATE"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                r.user.clone(),
                r.services.join(","),
                r.created_at.clone().unwrap_or_else(|| "-".into()),
                r.expires_at.clone().unwrap_or_else(|| "never".into()),
                if r.plaintext {
                    format!("{} (plaintext)", r.state)
                } else {
                    r.state.to_string()
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cols: &[&str]| {
        let mut l = String::new();
        for (i, (c, w)) in cols.iter().zip(widths).enumerate() {
            if i + 1 == cols.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &cells {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// What `keys revoke` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Revoked {
    Disabled(String),
    Deleted(String),
}

/// Marks the entry whose id starts with `id` disabled, or deletes it.
pub fn revoke(
    keys_path: &Path,
    id: &str,
    delete: bool,
    now: SystemTime,
) -> Result<Revoked, KeyToolError> {
    let id = id.trim();
    if id.len() < 4 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(KeyToolError::Usage(format!(
            "{id:?} is not a key id: give at least 4 hex digits of the id `keys list` shows"
        )));
    }
    let _lock = Lock::acquire(keys_path)?;
    let mut file = KeyFile::open(keys_path)?;
    let (name, key_id) = find_one(&file, id)?;
    if delete {
        file.entries.shift_remove(&name);
        file.save()?;
        return Ok(Revoked::Deleted(key_id.to_string()));
    }
    if let Some(Value::Object(entry)) = file.entries.get_mut(&name) {
        entry.insert("disabled".into(), Value::Bool(true));
        entry.insert(
            "revoked_at".into(),
            json!(humantime::format_rfc3339_seconds(now).to_string()),
        );
    }
    file.save()?;
    Ok(Revoked::Disabled(key_id.to_string()))
}

/// The one entry whose id starts with `id`.
fn find_one(file: &KeyFile, id: &str) -> Result<(String, KeyId), KeyToolError> {
    let hits = file.find_by_id(id);
    match hits.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(KeyToolError::Usage(format!(
            "no key with id {id} in {}",
            file.path.display()
        ))),
        many => {
            let ids: Vec<String> = many.iter().map(|(_, k)| k.to_string()).collect();
            Err(KeyToolError::Usage(format!(
                "id {id} is ambiguous, it matches {}; give more digits",
                ids.join(", ")
            )))
        }
    }
}

/// What [`update`] changes in an entry: `None` leaves a field as it is,
/// `Some(None)` removes it (`services` cannot be removed: a key needs one).
#[derive(Debug, Default)]
pub struct KeyPatch {
    pub services: Option<Vec<String>>,
    pub models: Option<Option<Vec<String>>>,
    /// RFC 3339, or a duration from now such as `30d`.
    pub expires: Option<Option<String>>,
    pub note: Option<Option<String>>,
    pub rate_limit: Option<Option<String>>,
    pub max_concurrent: Option<Option<std::num::NonZeroU32>>,
    pub token_limit: Option<Option<String>>,
}

/// Changes the fields `patch` names in the entry of key `id` (a locked
/// read-modify-write, as `keygen` and `keys revoke` do): each value is
/// checked as `keygen` checks it, and the file is written only if the
/// daemon would accept it. Returns the key's id and the fields as now
/// written (`null` for one removed).
pub fn update(
    keys_path: &Path,
    id: &str,
    patch: &KeyPatch,
    now: SystemTime,
) -> Result<(KeyId, serde_json::Map<String, Value>), KeyToolError> {
    let mut set = serde_json::Map::new();
    let mut put = |field: &str, v: Option<Value>| {
        set.insert(field.to_string(), v.unwrap_or(Value::Null));
    };
    if let Some(services) = &patch.services {
        if services.is_empty() {
            return Err(KeyToolError::Usage("services must not be empty".into()));
        }
        put("services", Some(json!(services)));
    }
    if let Some(m) = &patch.models {
        let models = m.as_deref().map(parse_models).transpose()?;
        put("models", models.filter(|m| !m.is_empty()).map(|m| json!(m)));
    }
    if let Some(e) = &patch.expires {
        put(
            "expires_at",
            e.as_deref()
                .map(|e| expiry(e, now))
                .transpose()?
                .map(Value::from),
        );
    }
    if let Some(n) = &patch.note {
        put("note", n.clone().map(Value::from));
    }
    if let Some(r) = &patch.rate_limit {
        let r = r.as_deref().map(parse_rate).transpose()?;
        put("rate_limit", r.map(|r| json!(r.to_string())));
    }
    if let Some(m) = patch.max_concurrent {
        put("max_concurrent", m.map(|m| json!(m.get())));
    }
    if let Some(t) = &patch.token_limit {
        let t = t.as_deref().map(parse_token_limit).transpose()?;
        put("token_limit", t.map(|t| json!(t.to_string())));
    }
    let _lock = Lock::acquire(keys_path)?;
    let mut file = KeyFile::open(keys_path)?;
    let (name, key_id) = find_one(&file, id)?;
    let Some(Value::Object(entry)) = file.entries.get_mut(&name) else {
        return Err(KeyToolError::Usage(format!(
            "key {key_id}: its entry is not an object"
        )));
    };
    for (field, v) in &set {
        match (field.as_str(), v) {
            ("services", Value::Array(list)) => {
                entry.remove("service");
                entry.remove("services");
                match list.as_slice() {
                    [one] => entry.insert("service".into(), one.clone()),
                    _ => entry.insert("services".into(), v.clone()),
                };
            }
            (_, Value::Null) => {
                entry.remove(field);
            }
            _ => {
                entry.insert(field.clone(), v.clone());
            }
        }
    }
    file.save()?;
    Ok((key_id, set))
}

/// What `keys hash` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Hashed {
    pub hashed: usize,
    pub already: usize,
    pub backup: Option<PathBuf>,
}

/// Replaces every plaintext key name with `sha256:<digest>`, in place and
/// in order, keeping each entry's fields. With `backup`, the original file
/// is first copied (mode 0600) to `<file>.bak`.
pub fn hash_in_place(keys_path: &Path, backup: bool) -> Result<Hashed, KeyToolError> {
    let _lock = Lock::acquire(keys_path)?;
    let file = KeyFile::open(keys_path)?;
    let mut out = serde_json::Map::with_capacity(file.entries.len());
    let (mut hashed, mut already) = (0, 0);
    for (name, v) in file.entries.iter() {
        let new_name = if is_plaintext(name) {
            hashed += 1;
            format!("{DIGEST_PREFIX}{}", KeyDigest::of(name.as_bytes()).to_hex())
        } else {
            already += 1;
            name.clone()
        };
        if out.insert(new_name, v.clone()).is_some() {
            return Err(KeyToolError::Load(LoadError::invalid(
                keys_path,
                format!(
                    "key {} is listed twice (in plaintext and as a digest); remove one first",
                    entry_digest(name).id()
                ),
            )));
        }
    }
    let backup_path = if backup && hashed > 0 {
        let mut name = keys_path.file_name().unwrap_or_default().to_os_string();
        name.push(".bak");
        let p = keys_path.with_file_name(name);
        let original = std::fs::read(keys_path).map_err(|e| LoadError::io(keys_path, e))?;
        write_atomically(&p, &original).map_err(|e| LoadError::io(&p, e))?;
        Some(p)
    } else {
        None
    };
    if hashed > 0 {
        let new = KeyFile {
            path: file.path.clone(),
            format: file.format,
            entries: out,
        };
        new.save()?;
    }
    Ok(Hashed {
        hashed,
        already,
        backup: backup_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyStore, ServiceTable};

    fn store(path: &Path) -> KeyStore {
        let mut s = ServiceTable::default();
        s.intern("chat");
        s.intern("tts");
        KeyStore::load(path, &s).unwrap()
    }

    #[test]
    fn generated_keys_look_right_and_differ() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("agw_"));
        assert_eq!(a.len(), 4 + 32);
        assert!(a[4..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }

    #[test]
    fn keygen_stores_only_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.json");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let services = ["chat".to_string(), "tts".to_string()];
        let (key, digest) = keygen(
            &p,
            &NewKey {
                user: "ann",
                services: &services,
                expires: Some("30d"),
                note: Some("laptop"),
                rate_limit: None,
                max_concurrent: None,
                token_limit: None,
                end_users: None,
                models: &[],
                admin: false,
            },
            now,
        )
        .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains(&key));
        assert!(text.contains(&digest.to_hex()));
        assert!(
            text.contains("\"created_at\": \"2027-01-15T08:00:00.000Z\""),
            "{text}"
        );
        assert!(
            text.contains("\"expires_at\": \"2027-02-14T08:00:00Z\""),
            "{text}"
        );
        let s = store(&p);
        assert!(s.check(Some(key.as_bytes()), 1, unix_millis(now)).is_ok());
    }

    #[test]
    fn keygen_writes_token_limits_and_models() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.json");
        let services = ["chat".to_string()];
        let models = ["llama3.2".to_string(), "qwen*".to_string()];
        let req = NewKey {
            user: "ann",
            services: &services,
            expires: None,
            note: None,
            rate_limit: None,
            max_concurrent: None,
            token_limit: Some("1.5M/day"),
            end_users: None,
            models: &models,
            admin: false,
        };
        let (key, _) = keygen(&p, &req, SystemTime::now()).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"token_limit\": \"1500k/day\""), "{text}");
        let s = store(&p);
        let k = s
            .check(Some(key.as_bytes()), 0, unix_millis(SystemTime::now()))
            .unwrap();
        assert_eq!(k.limits.tokens.unwrap().count.get(), 1_500_000);
        assert_eq!(k.models.unwrap().len(), 2);
        let bad = NewKey {
            token_limit: Some("lots/day"),
            end_users: None,
            ..req
        };
        let e = keygen(&p, &bad, SystemTime::now()).unwrap_err().to_string();
        assert!(e.contains("--token-limit"), "{e}");
        let bad_models = ["a b".to_string()];
        let bad = NewKey {
            models: &bad_models,
            ..req
        };
        let e = keygen(&p, &bad, SystemTime::now()).unwrap_err().to_string();
        assert!(e.contains("--model"), "{e}");
    }

    #[test]
    fn keygen_rejects_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.json");
        let svc = ["chat".to_string()];
        let bad = |user, services: &[String], expires| {
            keygen(
                &p,
                &NewKey {
                    user,
                    services,
                    expires,
                    note: None,
                    rate_limit: None,
                    max_concurrent: None,
                    token_limit: None,
                    end_users: None,
                    models: &[],
                    admin: false,
                },
                SystemTime::now(),
            )
            .unwrap_err()
            .to_string()
        };
        assert!(bad("", &svc, None).contains("--user"));
        assert!(bad("u", &[], None).contains("--service"));
        assert!(bad("u", &svc, Some("someday")).contains("--expires"));
        assert!(bad("u", &svc, Some("2000-01-01T00:00:00Z")).contains("not in the future"));
        assert!(!p.exists());
    }

    #[test]
    fn duration_expiry_rounds_up() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_400);
        assert_eq!(expiry("3s", now).unwrap(), "2027-01-15T08:00:04Z");
        let exact = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(expiry("3s", exact).unwrap(), "2027-01-15T08:00:03Z");
    }

    #[test]
    fn list_revoke_delete() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.json");
        std::fs::write(
            &p,
            r#"{"plain-1": {"user": "a", "service": "chat", "expires_at": "2000-01-01T00:00:00Z"}, "plain-2": {"user": "b", "services": ["chat", "tts"]}}"#,
        )
        .unwrap();
        let rows = list(&p, SystemTime::now()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].state, "expired");
        assert_eq!(rows[1].state, "active");
        assert_eq!(rows[1].services, vec!["chat", "tts"]);
        assert!(rows[0].plaintext);
        let table = render_table(&rows);
        assert!(!table.contains("plain-1") && !table.contains("plain-2"));
        assert!(table.starts_with("ID"));

        let id2 = rows[1].id.clone();
        assert_eq!(
            revoke(&p, &id2, false, SystemTime::now()).unwrap(),
            Revoked::Disabled(id2.clone())
        );
        assert_eq!(list(&p, SystemTime::now()).unwrap()[1].state, "disabled");
        assert_eq!(
            revoke(&p, &id2[..8], true, SystemTime::now()).unwrap(),
            Revoked::Deleted(id2.clone())
        );
        assert_eq!(list(&p, SystemTime::now()).unwrap().len(), 1);
        assert!(revoke(&p, &id2, false, SystemTime::now())
            .unwrap_err()
            .to_string()
            .contains("no key"));
        assert!(revoke(&p, "xyz", false, SystemTime::now())
            .unwrap_err()
            .to_string()
            .contains("not a key id"));
    }

    #[test]
    fn admin_keys_take_no_service_and_open_only_the_admin_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.json");
        let req = NewKey {
            user: "root",
            services: &[],
            expires: None,
            note: None,
            rate_limit: None,
            max_concurrent: None,
            token_limit: None,
            models: &[],
            admin: true,
            end_users: None,
        };
        let (key, digest) = keygen(&p, &req, SystemTime::now()).unwrap();
        let s = store(&p);
        let now = unix_millis(SystemTime::now());
        assert_eq!(
            s.check_admin(Some(key.as_bytes()), now).unwrap().0,
            digest.id()
        );
        assert_eq!(
            s.check(Some(key.as_bytes()), 0, now).unwrap_err(),
            crate::keys::KeyDenial::WrongService
        );
        let svc = ["chat".to_string()];
        let both = NewKey {
            services: &svc,
            ..req
        };
        assert!(keygen(&p, &both, SystemTime::now()).is_err());
        let rows = list(&p, SystemTime::now()).unwrap();
        assert!(rows[0].admin && rows[0].services.is_empty());
    }

    #[test]
    fn update_sets_and_removes_fields_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.json");
        std::fs::write(
            &p,
            r#"{"k1": {"user": "a", "service": "chat", "note": "n", "custom": 1}, "k2": {"user": "b", "service": "tts"}}"#,
        )
        .unwrap();
        let id = list(&p, SystemTime::now()).unwrap()[0].id.clone();
        let patch = KeyPatch {
            services: Some(vec!["chat".into(), "tts".into()]),
            note: Some(None),
            rate_limit: Some(Some("5/s".into())),
            models: Some(Some(vec!["llama3.2".into()])),
            ..KeyPatch::default()
        };
        let (got, set) = update(&p, &id, &patch, SystemTime::now()).unwrap();
        assert_eq!(got.to_string(), id);
        assert_eq!(set["note"], Value::Null);
        let row = &list(&p, SystemTime::now()).unwrap()[0];
        assert_eq!(row.services, ["chat", "tts"]);
        assert_eq!(row.note, None);
        assert_eq!(row.rate_limit.as_deref(), Some("5/s"));
        assert_eq!(row.models, ["llama3.2"]);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"custom\": 1") && text.find("k1") < text.find("k2"));
        let bad = KeyPatch {
            token_limit: Some(Some("lots".into())),
            ..KeyPatch::default()
        };
        assert!(update(&p, &id, &bad, SystemTime::now()).is_err());
        assert!(update(&p, "ffff", &KeyPatch::default(), SystemTime::now()).is_err());
    }

    #[test]
    fn hash_converts_plaintext_and_keeps_keys_working() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.json");
        let d = KeyDigest::of(b"already").to_hex();
        std::fs::write(
            &p,
            format!(r#"{{"plain-1": {{"user": "a", "service": "chat", "note": "n"}}, "sha256:{d}": {{"user": "b", "service": "tts"}}, "plain-2": {{"user": "c", "service": "tts"}}}}"#),
        )
        .unwrap();
        let r = hash_in_place(&p, true).unwrap();
        assert_eq!((r.hashed, r.already), (2, 1));
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains("plain-1") && !text.contains("plain-2"));
        assert!(text.contains("\"note\": \"n\""));
        let backup = std::fs::read_to_string(r.backup.unwrap()).unwrap();
        assert!(backup.contains("plain-1"));
        let s = store(&p);
        assert!(s.check(Some(b"plain-1"), 0, 0).is_ok());
        assert!(s.check(Some(b"plain-2"), 1, 0).is_ok());
        assert!(s.check(Some(b"already"), 1, 0).is_ok());
        let again = hash_in_place(&p, true).unwrap();
        assert_eq!((again.hashed, again.already, again.backup), (0, 3, None));
    }
}
