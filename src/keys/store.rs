//! API keys: the key file format, and the compiled store the hot path asks.
//!
//! The key file is the one the Caddy + Flask setup already uses: a JSON (or
//! YAML) object whose names are keys and whose values describe them. A name
//! is either the plaintext key or `sha256:` followed by the key's SHA-256 in
//! hex, so a key file need not hold secrets.
//!
//! At load every entry is reduced to its SHA-256 digest; a request's key is
//! hashed once and looked up by digest. The cost of a check therefore does
//! not grow with the number of keys, and no key is ever compared byte by
//! byte. Entries are read one at a time from the parser (never as a whole
//! document tree), so a file of a million keys costs little more memory than
//! the store it becomes.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeSeed, Error as _, MapAccess, Visitor};
use serde::Deserialize;

use super::digest::{DigestHasher, KeyDigest, KeyId, DIGEST_PREFIX};
use crate::config::{yaml, AlertSettings, Limits, LoadError, ModelPattern, Rate, TokenRate};

/// An index into the route table's list of services.
pub type ServiceId = u16;

/// The services the routes serve, numbered once at load so a key's grant is
/// a short list of numbers instead of strings.
#[derive(Debug, Default)]
pub struct ServiceTable {
    ids: HashMap<String, ServiceId>,
}

impl ServiceTable {
    /// Numbers `name` (idempotent).
    pub fn intern(&mut self, name: &str) -> ServiceId {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = ServiceId::try_from(self.ids.len()).unwrap_or(ServiceId::MAX);
        self.ids.insert(name.to_string(), id);
        id
    }

    pub fn get(&self, name: &str) -> Option<ServiceId> {
        self.ids.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Which services a key may use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Grant {
    /// `"*"`: every service.
    All,
    /// The listed services that some route serves, sorted.
    Only(Box<[ServiceId]>),
}

impl Grant {
    #[inline]
    pub fn allows(&self, service: ServiceId) -> bool {
        match self {
            Grant::All => true,
            Grant::Only(list) => list.contains(&service),
        }
    }
}

/// A key's holder, shared by all of that holder's keys. The header value
/// sent upstream is built once here instead of on every request.
#[derive(Debug)]
pub struct User {
    pub name: Arc<str>,
    pub header: HeaderValue,
}

/// What the store keeps per key: small, so a million keys fit comfortably.
#[derive(Debug, Clone, Copy)]
struct KeyRecord {
    /// Milliseconds since the Unix epoch; `i64::MAX` for never.
    expires_at_ms: i64,
    user: u32,
    grant: u32,
    /// Index into the store's limit sets; 0 is "none of its own".
    limits: u32,
    /// Index into the store's model lists; 0 is "every model".
    models: u32,
    /// The key's position in the file, which numbers its per-key state.
    ordinal: u32,
    /// Index into the store's [`KeyExtras`] plus one; 0 is "none".
    extras: u32,
    disabled: bool,
    /// `"admin": true`: the key opens the admin listener's page and key
    /// API, and no route (it is granted no service).
    admin: bool,
}

/// What few keys set, kept apart so the others pay one number for it:
/// end users behind the key, and alerts of the key's own.
#[derive(Debug)]
pub struct KeyExtras {
    /// The header naming the key's end users, with their limits.
    pub end_users: Option<EndUserSpec>,
    /// The key's own alert settings (over the config's).
    pub alerts: Option<AlertSettings>,
    /// The key's place among the keys with extras: the index of its
    /// per-end-user state in a snapshot.
    pub slot: u32,
}

/// `end_user_header` and `end_user_limits` of a key.
#[derive(Debug)]
pub struct EndUserSpec {
    pub header: HeaderName,
    /// Applied to each end user, within the key's own limits.
    pub limits: Limits,
}

/// Why a request's key was refused. The first four are 401s, the last 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDenial {
    Missing,
    Unknown,
    Expired,
    Disabled,
    /// A valid key that is not granted the route's service.
    WrongService,
}

/// An accepted key.
#[derive(Debug, Clone, Copy)]
pub struct Principal<'a> {
    pub id: KeyId,
    pub user: &'a User,
    /// The key's own limits (rate, concurrency), before route and global
    /// defaults.
    pub limits: Limits,
    /// The key's number in its store, `0..len()`: the index of its per-key
    /// state.
    pub ordinal: u32,
    /// The models the key may use (`models` in its entry); `None` for all.
    pub models: Option<&'a Arc<[ModelPattern]>>,
    /// End users and alerts of its own, for the few keys that set them.
    pub extras: Option<&'a KeyExtras>,
}

/// The compiled, immutable key set.
#[derive(Debug, Default)]
pub struct KeyStore {
    by_digest: HashMap<KeyDigest, KeyRecord, BuildHasherDefault<DigestHasher>>,
    users: Vec<User>,
    grants: Vec<Grant>,
    /// Distinct limit sets of keys; the first is "none".
    limits: Vec<Limits>,
    /// Distinct model lists of keys; the first (empty) is "every model".
    model_lists: Vec<Arc<[ModelPattern]>>,
    /// One per key that sets end users or alerts, in file order.
    extras: Vec<KeyExtras>,
    /// How many entries were stored in plaintext in the file.
    pub plaintext_entries: usize,
    /// Services named by keys that no route serves (likely typos), with how
    /// many keys name each.
    pub unserved_services: BTreeMap<String, usize>,
}

impl KeyStore {
    /// Reads and compiles the key file at `path` against the routes' services.
    pub fn load(path: &Path, services: &ServiceTable) -> Result<KeyStore, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        KeyStore::parse(path, &text, services)
    }

    /// Parses key file text; JSON unless the file is named `.yaml`/`.yml`
    /// or does not start with `{`.
    pub fn parse(path: &Path, text: &str, services: &ServiceTable) -> Result<KeyStore, LoadError> {
        let mut builder = KeyStoreBuilder::new(services);
        let is_yaml_name = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        let looks_json = text.trim_start().starts_with('\x7B'); // an opening brace
        if is_yaml_name || !looks_json {
            yaml::from_str_seed(path, text, EntriesSeed(&mut builder))?;
        } else {
            let mut de = serde_json::Deserializer::from_str(text);
            EntriesSeed(&mut builder)
                .deserialize(&mut de)
                .and_then(|()| de.end())
                .map_err(|e| LoadError::from_json(path, &e))?;
        }
        Ok(builder.finish())
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Every key's id and ordinal, for building per-key state.
    pub fn ids(&self) -> impl Iterator<Item = (KeyId, u32)> + '_ {
        self.by_digest.iter().map(|(d, r)| (d.id(), r.ordinal))
    }

    /// The ids of the keys the file marks `disabled`.
    pub fn disabled_ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.by_digest
            .iter()
            .filter(|(_, r)| r.disabled)
            .map(|(d, _)| d.id())
    }

    /// The ids of the keys with end users (by their [`KeyExtras::slot`]
    /// order), or `None` for a key with extras but no end users.
    pub fn end_user_keys(&self) -> Vec<Option<KeyId>> {
        let mut ids = vec![None; self.extras.len()];
        for (d, r) in &self.by_digest {
            let i = (r.extras as usize).wrapping_sub(1);
            let has = self.extras.get(i).is_some_and(|e| e.end_users.is_some());
            if let (true, Some(slot)) = (has, ids.get_mut(i)) {
                *slot = Some(d.id());
            }
        }
        ids
    }

    /// The extras at `slot` (a [`KeyExtras::slot`]).
    pub fn extras(&self, slot: u32) -> Option<&KeyExtras> {
        self.extras.get(slot as usize)
    }

    /// Whether some key sets a limit of its own.
    pub fn any_own_limits(&self) -> bool {
        self.limits.iter().any(|l| *l != Limits::default())
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Decides whether `presented` (the raw key from the request) may use
    /// `service` at `now_ms` (milliseconds since the Unix epoch). One SHA-256
    /// and one map lookup, whatever the number of keys.
    #[inline]
    pub fn check(
        &self,
        presented: Option<&[u8]>,
        service: ServiceId,
        now_ms: i64,
    ) -> Result<Principal<'_>, KeyDenial> {
        let (digest, rec) = self.live_record(presented, now_ms)?;
        let grant = self
            .grants
            .get(rec.grant as usize)
            .ok_or(KeyDenial::Unknown)?;
        if !grant.allows(service) {
            return Err(KeyDenial::WrongService);
        }
        let user = self
            .users
            .get(rec.user as usize)
            .ok_or(KeyDenial::Unknown)?;
        Ok(Principal {
            id: digest.id(),
            user,
            limits: self
                .limits
                .get(rec.limits as usize)
                .copied()
                .unwrap_or_default(),
            ordinal: rec.ordinal,
            models: match rec.models {
                0 => None,
                i => Some(self.model_lists.get(i as usize).ok_or(KeyDenial::Unknown)?),
            },
            extras: match rec.extras {
                0 => None,
                i => Some(self.extras.get(i as usize - 1).ok_or(KeyDenial::Unknown)?),
            },
        })
    }

    /// The record of `presented` when it is a known key, neither revoked
    /// nor expired at `now_ms`: the part of a decision the proxy and the
    /// admin listener share (one SHA-256, one map lookup).
    #[inline]
    fn live_record(
        &self,
        presented: Option<&[u8]>,
        now_ms: i64,
    ) -> Result<(KeyDigest, &KeyRecord), KeyDenial> {
        let presented = match presented {
            Some(k) if !k.is_empty() => k,
            _ => return Err(KeyDenial::Missing),
        };
        let digest = KeyDigest::of(presented);
        let rec = self.by_digest.get(&digest).ok_or(KeyDenial::Unknown)?;
        if rec.disabled {
            return Err(KeyDenial::Disabled);
        }
        if now_ms >= rec.expires_at_ms {
            return Err(KeyDenial::Expired);
        }
        Ok((digest, rec))
    }

    /// Decides whether `presented` opens the admin listener at `now_ms`:
    /// the key's id and holder when it is an admin key; `WrongService`
    /// for a valid key that is not one.
    pub fn check_admin(
        &self,
        presented: Option<&[u8]>,
        now_ms: i64,
    ) -> Result<(KeyId, &User), KeyDenial> {
        let (digest, rec) = self.live_record(presented, now_ms)?;
        if !rec.admin {
            return Err(KeyDenial::WrongService);
        }
        let user = self
            .users
            .get(rec.user as usize)
            .ok_or(KeyDenial::Unknown)?;
        Ok((digest.id(), user))
    }

    /// Every key with what the status page shows of it: id, holder, own
    /// limits, ordinal (its counters) and whether it is refused now.
    pub fn entries(&self) -> impl Iterator<Item = KeyEntry<'_>> + '_ {
        self.by_digest.iter().filter_map(|(d, r)| {
            Some(KeyEntry {
                id: d.id(),
                user: &self.users.get(r.user as usize)?.name,
                limits: self
                    .limits
                    .get(r.limits as usize)
                    .copied()
                    .unwrap_or_default(),
                ordinal: r.ordinal,
                expires_at_ms: r.expires_at_ms,
                disabled: r.disabled,
                admin: r.admin,
            })
        })
    }

    /// Every model name (without `*`) that some key's `models` names.
    pub fn named_models(&self) -> impl Iterator<Item = &ModelPattern> + '_ {
        self.model_lists
            .iter()
            .flat_map(|l| l.iter())
            .filter(|p| p.is_exact())
    }
}

/// One key as [`KeyStore::entries`] yields it.
#[derive(Debug, Clone, Copy)]
pub struct KeyEntry<'a> {
    pub id: KeyId,
    pub user: &'a Arc<str>,
    pub limits: Limits,
    pub ordinal: u32,
    /// Milliseconds since the Unix epoch; `i64::MAX` for never.
    pub expires_at_ms: i64,
    pub disabled: bool,
    pub admin: bool,
}

/// Milliseconds since the Unix epoch, the unit expiry is kept in.
pub fn unix_millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// One key file entry as written. Fields the gateway does not know
/// (`created_at`, notes, anything people annotate with) are ignored.
/// Strings borrow from the file's text where they can: a million entries
/// then cost no allocations beyond the store itself.
#[derive(Deserialize)]
struct RawEntry<'a> {
    #[serde(borrow)]
    user: Text<'a>,
    #[serde(default, borrow)]
    service: Option<Text<'a>>,
    #[serde(default, borrow)]
    services: Option<Vec<Text<'a>>>,
    #[serde(default, borrow)]
    expires_at: Option<Text<'a>>,
    #[serde(default)]
    disabled: Option<bool>,
    #[serde(default)]
    rate_limit: Option<Rate>,
    #[serde(default)]
    max_concurrent: Option<NonZeroU32>,
    #[serde(default)]
    token_limit: Option<TokenRate>,
    #[serde(default)]
    models: Option<Vec<ModelPattern>>,
    #[serde(default)]
    admin: Option<bool>,
    #[serde(default, borrow)]
    end_user_header: Option<Text<'a>>,
    #[serde(default)]
    end_user_limits: Option<RawEndUserLimits>,
    #[serde(default)]
    alerts: Option<AlertSettings>,
}

/// `end_user_limits: {rate_limit, max_concurrent, token_limit}` as
/// written: the key's own limit settings, for each end user.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndUserLimits {
    #[serde(default)]
    rate_limit: Option<Rate>,
    #[serde(default)]
    max_concurrent: Option<NonZeroU32>,
    #[serde(default)]
    token_limit: Option<TokenRate>,
}

/// Headers that are the gateway's own or the request's framing: an end
/// user named by one of them would be the key, or a lie.
const RESERVED_HEADERS: [&str; 7] = [
    "authorization",
    "x-api-key",
    "x-gateway-user",
    "x-request-id",
    "host",
    "content-length",
    "transfer-encoding",
];

/// The end user settings of one entry, checked: a header name that is
/// not the gateway's own, limits only with a header.
fn end_user_spec(
    header: Option<&str>,
    limits: Option<RawEndUserLimits>,
) -> Result<Option<EndUserSpec>, String> {
    let Some(header) = header else {
        return match limits {
            Some(_) => Err("`end_user_limits` needs `end_user_header`".into()),
            None => Ok(None),
        };
    };
    let name = HeaderName::from_bytes(header.trim().as_bytes())
        .map_err(|_| format!("end_user_header {header:?} is not a header name"))?;
    if RESERVED_HEADERS.contains(&name.as_str()) {
        return Err(format!(
            "end_user_header {header:?} is a header the gateway reads or sets itself; use one such as X-OpenWebUI-User-Id"
        ));
    }
    let limits = limits.map_or_else(Limits::default, |l| Limits {
        rate: l.rate_limit,
        max_concurrent: l.max_concurrent,
        max_body: None,
        tokens: l.token_limit,
    });
    Ok(Some(EndUserSpec {
        header: name,
        limits,
    }))
}

/// A string borrowed from the input when it has no escapes, owned otherwise.
struct Text<'a>(Cow<'a, str>);

impl fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Parses an RFC 3339 timestamp (`2027-01-01T00:00:00Z`) into Unix millis.
pub fn parse_timestamp(s: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
        format!("{s:?} is not an RFC 3339 timestamp such as 2027-01-01T00:00:00Z")
    })?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("{s:?} is out of range"))
}

/// Accumulates entries as the parser yields them.
struct KeyStoreBuilder<'s> {
    services: &'s ServiceTable,
    store: KeyStore,
    user_ids: HashMap<String, u32>,
    grant_ids: HashMap<Grant, u32>,
    /// One-service grants by name, and whether no route serves it.
    single_grants: HashMap<String, (u32, bool)>,
    /// Model lists already stored, by content.
    model_list_ids: HashMap<Box<[ModelPattern]>, u32>,
}

impl<'s> KeyStoreBuilder<'s> {
    fn new(services: &'s ServiceTable) -> Self {
        KeyStoreBuilder {
            services,
            store: KeyStore::default(),
            user_ids: HashMap::new(),
            grant_ids: HashMap::new(),
            single_grants: HashMap::new(),
            model_list_ids: HashMap::new(),
        }
    }

    fn add(&mut self, name: &str, raw: RawEntry) -> Result<(), String> {
        let (digest, plaintext) = match name.strip_prefix(DIGEST_PREFIX) {
            Some(hex) => {
                let d = KeyDigest::from_hex(hex).ok_or_else(|| {
                    format!(
                        "entry for user {:?}: `sha256:` must be followed by 64 hex digits",
                        raw.user
                    )
                })?;
                (d, false)
            }
            None => {
                if name.is_empty() {
                    return Err(format!("entry for user {:?}: the key is empty", raw.user));
                }
                // HTTP trims and forbids these in header values, so such a
                // key could never be presented.
                if name
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
                {
                    return Err(format!(
                        "key {} (user {:?}) contains whitespace or control characters",
                        KeyDigest::of(name.as_bytes()).id(),
                        raw.user
                    ));
                }
                (KeyDigest::of(name.as_bytes()), true)
            }
        };
        let id = digest.id();

        let admin = raw.admin.unwrap_or(false);
        let grant = self.grant_of(id, &raw.user, raw.service, raw.services, admin)?;
        let expires_at_ms = match raw.expires_at.as_deref() {
            None => i64::MAX,
            Some(s) => parse_timestamp(s)
                .map_err(|e| format!("key {id} (user {:?}): expires_at: {e}", raw.user))?,
        };
        if raw.user.trim().is_empty() {
            return Err(format!("key {id}: `user` is empty"));
        }
        let user = self
            .user_for(&raw.user)
            .map_err(|e| format!("key {id}: {e}"))?;

        let own = Limits {
            rate: raw.rate_limit,
            max_concurrent: raw.max_concurrent,
            max_body: None,
            tokens: raw.token_limit,
        };
        let limits = self.limits_for(own);
        let models = match raw.models {
            None => 0,
            Some(list) if list.is_empty() => {
                return Err(format!(
                    "key {id} (user {:?}): `models` is empty, so the key could use no model; leave it out to allow every model",
                    raw.user
                ))
            }
            Some(list) => self.models_for(list.into_boxed_slice()),
        };
        let ordinal =
            u32::try_from(self.store.by_digest.len()).map_err(|_| "too many keys".to_string())?;
        let end_users = end_user_spec(raw.end_user_header.as_deref(), raw.end_user_limits)
            .map_err(|e| format!("key {id} (user {:?}): {e}", raw.user))?;
        let extras = self.extras_for(end_users, raw.alerts);
        let record = KeyRecord {
            expires_at_ms,
            user,
            grant,
            limits,
            models,
            ordinal,
            extras,
            disabled: raw.disabled.unwrap_or(false),
            admin,
        };
        if let Some(prev) = self.store.by_digest.insert(digest, record) {
            let prev_user = self
                .store
                .users
                .get(prev.user as usize)
                .map_or("?", |u| &u.name);
            return Err(format!(
                "key {id} is listed twice (for user {prev_user:?} and for user {:?}), for example once in plaintext and once as its sha256 digest; remove one",
                raw.user
            ));
        }
        if plaintext {
            self.store.plaintext_entries += 1;
        }
        Ok(())
    }

    /// The grant of an entry: its `service` or `services`, or none for an
    /// admin key (which must name neither).
    fn grant_of(
        &mut self,
        id: KeyId,
        user: &str,
        service: Option<Text<'_>>,
        services: Option<Vec<Text<'_>>>,
        admin: bool,
    ) -> Result<u32, String> {
        let grant = match (service, services) {
            // An admin key is for the admin listener alone: a key that
            // leaks from a script on the proxy side cannot edit keys, and
            // one an admin types into a browser is no proxy key.
            (Some(_), _) | (_, Some(_)) if admin => {
                return Err(format!(
                    "key {id} (user {:?}): an admin key is granted no service; remove `service`/`services` or `admin`",
                    user
                ))
            }
            (None, None) if admin => self.grant_for(&[]),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "key {id} (user {:?}): give `service` or `services`, not both",
                    user
                ))
            }
            (None, None) => {
                return Err(format!(
                    "key {id} (user {:?}): `service` or `services` is required",
                    user
                ))
            }
            (Some(one), None) => self.grant_for_one(&one),
            (None, Some(list)) => {
                if list.is_empty() {
                    return Err(format!(
                        "key {id} (user {:?}): `services` is empty",
                        user
                    ));
                }
                let names: Vec<&str> = list.iter().map(|t| &**t).collect();
                self.grant_for(&names)
            }
        };
        Ok(grant)
    }

    /// The index of `own` among the store's limit sets (few distinct ones:
    /// a linear search is fine).
    fn limits_for(&mut self, own: Limits) -> u32 {
        let sets = &mut self.store.limits;
        if sets.is_empty() {
            sets.push(Limits::default());
        }
        match sets.iter().position(|l| *l == own) {
            Some(i) => u32::try_from(i).unwrap_or(0),
            None => {
                sets.push(own);
                u32::try_from(sets.len() - 1).unwrap_or(0)
            }
        }
    }

    /// The extras index of an entry (0 when it sets none).
    fn extras_for(&mut self, end_users: Option<EndUserSpec>, alerts: Option<AlertSettings>) -> u32 {
        if end_users.is_none() && alerts.is_none() {
            return 0;
        }
        let slot = u32::try_from(self.store.extras.len()).unwrap_or(u32::MAX);
        self.store.extras.push(KeyExtras {
            end_users,
            alerts,
            slot,
        });
        slot.saturating_add(1)
    }

    /// The index of `list` among the store's model lists (shared by every
    /// key that names the same list).
    fn models_for(&mut self, list: Box<[ModelPattern]>) -> u32 {
        let lists = &mut self.store.model_lists;
        if lists.is_empty() {
            lists.push(Arc::from(Vec::new()));
        }
        if let Some(i) = self.model_list_ids.get(&list) {
            return *i;
        }
        let i = u32::try_from(lists.len()).unwrap_or(0);
        lists.push(Arc::from(list.clone()));
        self.model_list_ids.insert(list, i);
        i
    }

    fn user_for(&mut self, name: &str) -> Result<u32, String> {
        if let Some(id) = self.user_ids.get(name) {
            return Ok(*id);
        }
        let header = HeaderValue::from_bytes(name.as_bytes()).map_err(|_| {
            format!("user {name:?} contains characters that cannot be sent in an HTTP header")
        })?;
        let id = u32::try_from(self.store.users.len()).map_err(|_| "too many users".to_string())?;
        self.store.users.push(User {
            name: Arc::from(name),
            header,
        });
        self.user_ids.insert(name.to_string(), id);
        Ok(id)
    }

    /// The grant of a one-service entry, the common case, cached by name so
    /// most entries cost one lookup and no allocation.
    fn grant_for_one(&mut self, name: &str) -> u32 {
        if let Some(&(id, unserved)) = self.single_grants.get(name) {
            if unserved {
                *self
                    .store
                    .unserved_services
                    .entry(name.to_string())
                    .or_insert(0) += 1;
            }
            return id;
        }
        let id = self.grant_for(&[name]);
        let unserved = name != "*" && self.services.get(name).is_none();
        self.single_grants.insert(name.to_string(), (id, unserved));
        id
    }

    fn grant_for(&mut self, names: &[&str]) -> u32 {
        let grant = if names.contains(&"*") {
            Grant::All
        } else {
            let mut ids: Vec<ServiceId> = Vec::with_capacity(names.len());
            for n in names {
                match self.services.get(n) {
                    Some(id) => ids.push(id),
                    None => {
                        *self
                            .store
                            .unserved_services
                            .entry(n.to_string())
                            .or_insert(0) += 1
                    }
                }
            }
            ids.sort_unstable();
            ids.dedup();
            Grant::Only(ids.into_boxed_slice())
        };
        if let Some(id) = self.grant_ids.get(&grant) {
            return *id;
        }
        let id = u32::try_from(self.store.grants.len()).unwrap_or(u32::MAX);
        self.store.grants.push(grant.clone());
        self.grant_ids.insert(grant, id);
        id
    }

    fn finish(mut self) -> KeyStore {
        self.store.by_digest.shrink_to_fit();
        self.store
    }
}

/// Drives the parser over the top-level object one entry at a time.
struct EntriesSeed<'b, 's>(&'b mut KeyStoreBuilder<'s>);

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        // `any`, not `map`: what is not a mapping is then named in serde's words
        // ("invalid type: sequence, expected ..."), by any parser.
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object mapping each key (or sha256:<hex digest>) to {user, service | services, ...}")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        // An empty YAML document: no keys.
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if let Some(hint) = map.size_hint() {
            self.0.store.by_digest.reserve(hint);
        }
        while let Some(name) = map.next_key::<Text<'de>>()? {
            map.next_value_seed(EntrySeed {
                name: &name,
                builder: &mut *self.0,
            })?;
        }
        Ok(())
    }
}

/// Parses and adds one entry. The entry is checked while the parser is still
/// inside it, so the parser reports the entry's own line with any error.
struct EntrySeed<'n, 'b, 's> {
    name: &'n str,
    builder: &'b mut KeyStoreBuilder<'s>,
}

impl<'de> DeserializeSeed<'de> for EntrySeed<'_, '_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        // `any`, not `map`: what is not a mapping is then named in serde's words
        // ("invalid type: sequence, expected ..."), by any parser.
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "an object such as {{\"user\": ..., \"service\": ...}} for key {}",
            name_id(self.name)
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let raw = RawEntry::deserialize(MapAccessDeserializer::new(map)).map_err(|e| {
            // serde's message names the field, never the key.
            A::Error::custom(format!("entry for key {}: {e}", name_id(self.name)))
        })?;
        self.builder.add(self.name, raw).map_err(A::Error::custom)
    }
}

/// The id of an entry name, whether it is plaintext or a digest.
fn name_id(name: &str) -> KeyId {
    match name
        .strip_prefix(DIGEST_PREFIX)
        .and_then(KeyDigest::from_hex)
    {
        Some(d) => d.id(),
        None => KeyDigest::of(name.as_bytes()).id(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> ServiceTable {
        let mut s = ServiceTable::default();
        s.intern("chat");
        s.intern("tts");
        s
    }

    fn parse(name: &str, text: &str) -> Result<KeyStore, LoadError> {
        KeyStore::parse(Path::new(name), text, &services())
    }

    fn err(name: &str, text: &str) -> String {
        parse(name, text)
            .expect_err("should be rejected")
            .to_string()
    }

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn flask_format_is_read_as_is() {
        let ann = KeyDigest::of(b"ann-key").to_hex();
        let text = format!(
            r#"{{
  "e5c4b8c2-537c-47af-94a8-c8489709b49b": {{"user": "beano", "service": "tts", "created_at": "2025-06-01T18:58:30.356Z"}},
  "sha256:{ann}": {{"user": "ann", "services": ["chat", "tts"], "expires_at": "2027-01-01T00:00:00Z", "note": "laptop"}},
  "k3": {{"user": "bob", "service": "*", "disabled": true}}
}}"#
        );
        let s = parse("keys.json", &text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.plaintext_entries, 2);
        let tts = services().get("tts").unwrap();
        let chat = services().get("chat").unwrap();
        let p = s
            .check(Some(b"e5c4b8c2-537c-47af-94a8-c8489709b49b"), tts, NOW)
            .unwrap();
        assert_eq!(&*p.user.name, "beano");
        assert_eq!(p.user.header, "beano");
        assert_eq!(
            s.check(Some(b"e5c4b8c2-537c-47af-94a8-c8489709b49b"), chat, NOW)
                .unwrap_err(),
            KeyDenial::WrongService
        );
        // ann's key expires at 2027-01-01 = 1798761600000 ms.
        assert!(s.check(Some(b"ann-key"), chat, 1_798_761_599_999).is_ok());
        assert_eq!(
            s.check(Some(b"ann-key"), chat, 1_798_761_600_000)
                .unwrap_err(),
            KeyDenial::Expired
        );
        assert_eq!(
            s.check(Some(b"k3"), chat, NOW).unwrap_err(),
            KeyDenial::Disabled
        );
        assert_eq!(
            s.check(Some(b"nope"), chat, NOW).unwrap_err(),
            KeyDenial::Unknown
        );
        assert_eq!(s.check(None, chat, NOW).unwrap_err(), KeyDenial::Missing);
        assert_eq!(
            s.check(Some(b""), chat, NOW).unwrap_err(),
            KeyDenial::Missing
        );
    }

    #[test]
    fn token_limits_and_model_lists() {
        let s = parse(
            "k.json",
            r#"{"a": {"user": "u", "service": "chat", "token_limit": "200k/day", "models": ["llama3.2", "qwen*"]},
                "b": {"user": "v", "service": "chat", "models": ["qwen*", "llama3.2"]},
                "c": {"user": "w", "service": "chat", "models": ["llama3.2", "qwen*"]},
                "d": {"user": "x", "service": "chat"}}"#,
        )
        .unwrap();
        let a = s.check(Some(b"a"), 0, NOW).unwrap();
        assert_eq!(a.limits.tokens.unwrap().count.get(), 200_000);
        let models: Vec<&str> = a.models.unwrap().iter().map(|m| m.as_str()).collect();
        assert_eq!(models, ["llama3.2", "qwen*"]);
        let c = s.check(Some(b"c"), 0, NOW).unwrap();
        assert!(
            Arc::ptr_eq(a.models.unwrap(), c.models.unwrap()),
            "one list, shared"
        );
        assert_eq!(
            s.check(Some(b"b"), 0, NOW).unwrap().models.unwrap().len(),
            2
        );
        assert!(s.check(Some(b"d"), 0, NOW).unwrap().models.is_none());
        assert!(s.any_own_limits());
        let named: Vec<&str> = s.named_models().map(|m| m.as_str()).collect();
        assert!(
            named.contains(&"llama3.2") && !named.contains(&"qwen*"),
            "{named:?}"
        );

        let e = err(
            "k.json",
            r#"{"secret-k": {"user": "u", "service": "chat", "models": []}}"#,
        );
        assert!(e.contains("`models` is empty"), "{e}");
        assert!(!e.contains("secret-k"), "{e}");
        let e = err(
            "k.json",
            r#"{"k": {"user": "u", "service": "chat", "token_limit": "lots"}}"#,
        );
        assert!(e.contains("invalid token limit"), "{e}");
        let e = err(
            "k.json",
            r#"{"k": {"user": "u", "service": "chat", "models": ["a b"]}}"#,
        );
        assert!(e.contains("must not contain spaces"), "{e}");
    }

    #[test]
    fn end_users_and_alerts_of_a_key() {
        let s = parse(
            "k.json",
            r#"{"a": {"user": "u", "service": "chat", "end_user_header": "X-OpenWebUI-User-Id",
                      "end_user_limits": {"rate_limit": "5/min", "token_limit": "10k/day"},
                      "alerts": {"at": [0.5]}},
                "b": {"user": "v", "service": "chat"},
                "c": {"user": "w", "service": "chat", "alerts": {"at": []}}}"#,
        )
        .unwrap();
        let a = s.check(Some(b"a"), 0, NOW).unwrap();
        let extras = a.extras.unwrap();
        let spec = extras.end_users.as_ref().unwrap();
        assert_eq!(spec.header.as_str(), "x-openwebui-user-id");
        assert_eq!(spec.limits.rate.unwrap().count.get(), 5);
        assert!(spec.limits.max_concurrent.is_none());
        assert!(extras.alerts.as_ref().unwrap().webhook.is_none());
        assert!(s.check(Some(b"b"), 0, NOW).unwrap().extras.is_none());
        let c = s.check(Some(b"c"), 0, NOW).unwrap().extras.unwrap();
        assert!(c.end_users.is_none());
        let ids = s.end_user_keys();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[extras.slot as usize], Some(KeyDigest::of(b"a").id()));
        assert_eq!(ids[c.slot as usize], None);

        for (entry, why) in [
            (
                r#""end_user_limits": {"rate_limit": "5/min"}"#,
                "needs `end_user_header`",
            ),
            (
                r#""end_user_header": "X-API-Key""#,
                "the gateway reads or sets itself",
            ),
            (r#""end_user_header": "bad header""#, "is not a header name"),
            (
                r#""end_user_header": "X-U", "end_user_limits": {"rate": "5/min"}"#,
                "unknown field",
            ),
            (r#""alerts": {"at": [0.9, 0.8]}"#, "increasing order"),
            (
                r#""alerts": {"webhook": "mailto:x@y"}"#,
                "http:// or https://",
            ),
        ] {
            let text = format!(
                "{{\n\"secret-k\": {{\"user\": \"u\", \"service\": \"chat\", {entry}}}\n}}"
            );
            let e = err("k.json", &text);
            assert!(e.starts_with("k.json:2:") && e.contains(why), "{e}");
            assert!(!e.contains("secret-k"), "{e}");
        }
    }

    #[test]
    fn wildcard_allows_every_service() {
        let s = parse("k.json", r#"{"k": {"user": "u", "service": "*"}}"#).unwrap();
        assert!(s.check(Some(b"k"), 0, NOW).is_ok());
        assert!(s.check(Some(b"k"), 1, NOW).is_ok());
    }

    #[test]
    fn yaml_errors_name_the_line_and_never_the_key() {
        let e = err(
            "keys.yaml",
            "yaml-secret-1:\n  user: a\n  service: chat\n  rate_limit: fast\n",
        );
        let id = KeyDigest::of(b"yaml-secret-1").id().to_string();
        assert!(
            e.starts_with(&format!(
                "keys.yaml:4:15: entry for key {id}: invalid rate \"fast\""
            )),
            "{e}"
        );
        let e = err(
            "keys.yaml",
            "yaml-secret-1: {user: a, service: chat}\nyaml-secret-1: {user: b, service: chat}\n",
        );
        assert!(
            e.starts_with("keys.yaml:2:") && e.contains("listed twice"),
            "{e}"
        );
        for e in [e, err("keys.yaml", "yaml-secret-1: [1]\n")] {
            assert!(!e.contains("yaml-secret-1"), "{e}");
        }
    }

    #[test]
    fn yaml_is_accepted() {
        let s = parse(
            "keys.yaml",
            "k1:\n  user: a\n  services: [chat]\nk2: {user: b, service: tts}\n",
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert!(s.check(Some(b"k1"), 0, NOW).is_ok());
        let empty = parse("keys.yaml", "").unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn uppercase_digest_is_accepted() {
        let hex = KeyDigest::of(b"x").to_hex().to_uppercase();
        let s = parse(
            "k.json",
            &format!(r#"{{"sha256:{hex}": {{"user": "u", "service": "chat"}}}}"#),
        )
        .unwrap();
        assert!(s.check(Some(b"x"), 0, NOW).is_ok());
        assert_eq!(s.plaintext_entries, 0);
    }

    #[test]
    fn unserved_services_are_counted() {
        let s = parse("k.json", r#"{"a": {"user": "u", "service": "tss"}, "b": {"user": "u", "services": ["tss", "chat"]}}"#).unwrap();
        assert_eq!(s.unserved_services.get("tss"), Some(&2));
        assert_eq!(
            s.check(Some(b"a"), 1, NOW).unwrap_err(),
            KeyDenial::WrongService
        );
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let e = err(
            "keys.json",
            "{\n  \"k\": {\"user\": \"u\", \"service\": \"chat\"},\n  oops\n}",
        );
        assert!(e.starts_with("keys.json:3:"), "{e}");
    }

    #[test]
    fn both_service_fields_is_an_error_without_the_key() {
        let e = err("k.json", "{\n\"secret-key-1\": {\"user\": \"u\", \"service\": \"chat\", \"services\": [\"tts\"]}\n}");
        assert!(e.contains("not both"), "{e}");
        assert!(
            e.contains(&KeyDigest::of(b"secret-key-1").id().to_string()),
            "{e}"
        );
        assert!(!e.contains("secret-key-1"), "{e}");
        assert!(e.starts_with("k.json:2:"), "{e}");
    }

    #[test]
    fn neither_service_field_is_an_error() {
        let e = err("k.json", r#"{"secret-key-2": {"user": "u"}}"#);
        assert!(e.contains("is required"), "{e}");
        assert!(!e.contains("secret-key-2"), "{e}");
        let e = err(
            "k.json",
            r#"{"secret-key-2": {"user": "u", "services": []}}"#,
        );
        assert!(e.contains("`services` is empty"), "{e}");
    }

    #[test]
    fn missing_user_and_wrong_types_do_not_leak_the_key() {
        let e = err("k.json", r#"{"secret-key-3": {"service": "chat"}}"#);
        assert!(e.contains("missing field `user`"), "{e}");
        assert!(!e.contains("secret-key-3"), "{e}");
        let e = err(
            "k.json",
            r#"{"secret-key-3": {"user": "u", "service": "chat", "disabled": "yes"}}"#,
        );
        assert!(!e.contains("secret-key-3"), "{e}");
        let e = err("k.json", r#"{"secret-key-3": "u"}"#);
        assert!(!e.contains("secret-key-3"), "{e}");
        let e = err(
            "k.json",
            r#"{"secret-key-3": {"user": " ", "service": "chat"}}"#,
        );
        assert!(e.contains("`user` is empty"), "{e}");
    }

    #[test]
    fn bad_expiry() {
        let e = err(
            "k.json",
            r#"{"k": {"user": "u", "service": "chat", "expires_at": "next week"}}"#,
        );
        assert!(e.contains("expires_at") && e.contains("RFC 3339"), "{e}");
    }

    #[test]
    fn bad_digest() {
        let e = err(
            "k.json",
            r#"{"sha256:abc": {"user": "u", "service": "chat"}}"#,
        );
        assert!(e.contains("64 hex digits"), "{e}");
        let bad = "g".repeat(64);
        let e = err(
            "k.json",
            &format!(r#"{{"sha256:{bad}": {{"user": "u", "service": "chat"}}}}"#),
        );
        assert!(e.contains("64 hex digits"), "{e}");
    }

    #[test]
    fn unusable_plaintext_keys() {
        let e = err("k.json", r#"{"": {"user": "u", "service": "chat"}}"#);
        assert!(e.contains("the key is empty"), "{e}");
        let e = err(
            "k.json",
            r#"{"has space": {"user": "u", "service": "chat"}}"#,
        );
        assert!(e.contains("whitespace"), "{e}");
        assert!(!e.contains("has space"), "{e}");
    }

    #[test]
    fn user_that_cannot_be_a_header() {
        let e = err("k.json", r#"{"k": {"user": "a\nb", "service": "chat"}}"#);
        assert!(e.contains("HTTP header"), "{e}");
    }

    #[test]
    fn duplicate_plaintext_and_digest_names_both_entries() {
        let hex = KeyDigest::of(b"dup-key").to_hex();
        let text = format!(
            "{{\n\"dup-key\": {{\"user\": \"ann\", \"service\": \"chat\"}},\n\"sha256:{hex}\": {{\"user\": \"bob\", \"service\": \"tts\"}}\n}}"
        );
        let e = err("k.json", &text);
        assert!(e.contains("listed twice"), "{e}");
        assert!(e.contains("\"ann\"") && e.contains("\"bob\""), "{e}");
        assert!(
            e.contains(&KeyDigest::of(b"dup-key").id().to_string()),
            "{e}"
        );
        assert!(!e.contains("dup-key\""), "{e}");
    }

    #[test]
    fn not_an_object() {
        let e = err("k.json", "[1, 2]");
        assert!(
            e.contains("expected an object") || e.contains("invalid type"),
            "{e}"
        );
        let e = err("k.json", "{} trailing");
        assert!(e.contains("trailing"), "{e}");
    }

    #[test]
    fn digest_hex_round_trips_and_id_is_a_prefix() {
        let d = KeyDigest::of(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(KeyDigest::from_hex(&d.to_hex()) == Some(d));
        assert_eq!(d.id().to_string(), "ba7816bf8f01");
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(
            parse_timestamp("2025-06-01T18:58:30.356Z"),
            Ok(1_748_804_310_356)
        );
        assert_eq!(parse_timestamp("1970-01-01T01:00:00+01:00"), Ok(0));
        assert!(parse_timestamp("2025-06-01").is_err());
    }
}
