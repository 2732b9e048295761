//! API keys: digests, the compiled store the hot path asks, reading and
//! editing the key file, and the `keygen` / `keys` commands.
//!
//! Owns: [`KeyDigest`] and [`KeyId`] (a key is only ever held as its
//! SHA-256, and named by the id derived from it), [`KeyStore`] (the
//! immutable key set: one hash, one lookup), the key file's formats and its
//! locked, atomic edits.
//!
//! May import: `config` (for [`LoadError`](crate::config::LoadError), its
//! YAML reader, and to find the key file a config names).

mod commands;
mod digest;
mod file;
mod store;

pub use commands::{
    generate_key, hash_in_place, keygen, list, render_table, resolve_keys_file, revoke, update,
    Hashed, KeyPatch, KeyRow, KeyToolError, NewEndUsers, NewKey, Revoked, KEY_PREFIX,
};
pub use digest::{DigestHasher, KeyDigest, KeyId, DIGEST_PREFIX};
pub use file::{entry_digest, is_plaintext, lock_path, write_atomically, Format, KeyFile, Lock};
pub use store::{
    parse_timestamp, unix_millis, EndUserSpec, Grant, KeyDenial, KeyEntry, KeyExtras, KeyStore,
    Principal, ServiceId, ServiceTable, User,
};
