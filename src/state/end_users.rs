//! Per-end-user counters, for the keys that name their end users
//! (`end_user_header`): one [`EndUserTable`] per such key, kept by key id
//! like the key's own counter, so a reload hands each key back its table.
//!
//! A table holds at most [`MAX_END_USERS`] end users; a new one past that
//! takes the place of the one idle longest (no request in flight), and
//! the caller counts the eviction. The table is sharded: a request of a
//! known end user takes one shard's read lock (uncontended, one atomic
//! add and sub) and two atomic stores; only a new end user takes a
//! shard's write lock. Keys without end users never reach this file.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use sha2::{Digest, Sha256};

use super::key_counters::KeyCounter;
use crate::keys::KeyId;

/// The most end users one key's table holds.
pub const MAX_END_USERS: usize = 4096;
const SHARDS: usize = 16;
const PER_SHARD: usize = MAX_END_USERS / SHARDS;

/// What a counter in Redis is named after: a key, or one end user of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CounterId {
    pub key: KeyId,
    /// The end user's tag (the first 64 bits of the SHA-256 of the name):
    /// bounded, and the same on every instance.
    pub end_user: Option<u64>,
}

impl CounterId {
    pub fn key(key: KeyId) -> CounterId {
        CounterId {
            key,
            end_user: None,
        }
    }

    /// Reads back what `Display` wrote.
    pub fn parse(s: &str) -> Option<CounterId> {
        match s.split_once('.') {
            None => KeyId::parse_hex(s).map(CounterId::key),
            Some((key, tag)) if tag.len() == 16 => Some(CounterId {
                key: KeyId::parse_hex(key)?,
                end_user: Some(u64::from_str_radix(tag, 16).ok()?),
            }),
            Some(_) => None,
        }
    }
}

impl std::fmt::Display for CounterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.end_user {
            None => write!(f, "{}", self.key),
            Some(tag) => write!(f, "{}.{tag:016x}", self.key),
        }
    }
}

/// The tag of an end user's name (see [`CounterId::end_user`]).
pub fn end_user_tag(name: &str) -> u64 {
    let d = Sha256::digest(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(d.get(..8).unwrap_or(&[0; 8]));
    u64::from_be_bytes(first)
}

struct Entry {
    counter: Arc<KeyCounter>,
    tag: u64,
    /// The caller's monotonic milliseconds of the last request.
    last_used: AtomicU64,
}

/// One end user's counter, as a request finds it.
pub struct EndUserHandle {
    pub counter: Arc<KeyCounter>,
    pub tag: u64,
    /// Another end user was forgotten to make room for this one.
    pub evicted: bool,
}

/// One key's end users.
pub struct EndUserTable {
    shards: [RwLock<HashMap<Box<str>, Entry>>; SHARDS],
    hasher: RandomState,
}

impl Default for EndUserTable {
    fn default() -> Self {
        EndUserTable {
            shards: std::array::from_fn(|_| RwLock::default()),
            hasher: RandomState::new(),
        }
    }
}

impl std::fmt::Debug for EndUserTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EndUserTable({} end users)", self.len())
    }
}

impl EndUserTable {
    /// The counter of end user `name` at `now_ms`, made if new. `None`
    /// when the table is full and every end user in the new one's shard
    /// has a request in flight (none can be forgotten).
    pub fn find(&self, name: &str, now_ms: u64) -> Option<EndUserHandle> {
        let shard = self.shard(name);
        {
            let map = shard.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(e) = map.get(name) {
                return Some(found(e, now_ms, false));
            }
        }
        let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get(name) {
            return Some(found(e, now_ms, false));
        }
        let evicted = map.len() >= PER_SHARD;
        if evicted {
            let oldest = map
                .iter()
                .filter(|(_, e)| e.counter.is_idle())
                .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
                .map(|(n, _)| n.clone())?;
            map.remove(&oldest);
        }
        let entry = Entry {
            counter: Arc::default(),
            tag: end_user_tag(name),
            last_used: AtomicU64::new(now_ms),
        };
        let handle = found(&entry, now_ms, evicted);
        map.insert(name.into(), entry);
        Some(handle)
    }

    /// End users held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, name: &str) -> &RwLock<HashMap<Box<str>, Entry>> {
        &self.shards[(self.hasher.hash_one(name) as usize) % SHARDS]
    }
}

fn found(e: &Entry, now_ms: u64, evicted: bool) -> EndUserHandle {
    e.last_used.store(now_ms, Ordering::Relaxed);
    EndUserHandle {
        counter: Arc::clone(&e.counter),
        tag: e.tag,
        evicted,
    }
}

/// Every key's end user table, by key id. Only snapshot builds take the
/// lock.
#[derive(Debug, Default)]
pub struct EndUserBook {
    entries: Mutex<HashMap<KeyId, Arc<EndUserTable>>>,
}

impl EndUserBook {
    /// The tables for exactly the keys among `ids` (in order; `None`
    /// where a slot has no end users): the one already known, or a new
    /// one. Keys no longer named lose theirs.
    pub fn handles(&self, ids: &[Option<KeyId>]) -> Box<[Option<Arc<EndUserTable>>]> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = HashMap::with_capacity(ids.len());
        let tables = ids
            .iter()
            .map(|id| {
                let id = (*id)?;
                let t = entries.remove(&id).unwrap_or_default();
                next.insert(id, Arc::clone(&t));
                Some(t)
            })
            .collect();
        *entries = next;
        tables
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_user_keeps_its_counter_and_the_idle_oldest_makes_room() {
        let t = EndUserTable::default();
        let a = t.find("alice", 1).unwrap();
        assert!(!a.evicted);
        assert!(Arc::ptr_eq(
            &a.counter,
            &t.find("alice", 2).unwrap().counter
        ));
        assert_eq!(a.tag, end_user_tag("alice"));
        let busy = a.counter.enter(1).unwrap();
        let mut evictions = 0;
        for i in 0..2 * MAX_END_USERS {
            let h = t.find(&format!("u-{i}"), 10 + i as u64).unwrap();
            evictions += u64::from(h.evicted);
        }
        assert!(t.len() <= MAX_END_USERS, "{}", t.len());
        assert!(evictions >= MAX_END_USERS as u64);
        assert!(
            Arc::ptr_eq(&a.counter, &t.find("alice", 99_999).unwrap().counter),
            "an end user with a request in flight is never forgotten"
        );
        drop(busy);
    }

    #[test]
    fn counter_ids_read_back_and_tags_are_bounded() {
        let key = crate::keys::KeyDigest::of(b"k").id();
        for id in [
            CounterId::key(key),
            CounterId {
                key,
                end_user: Some(end_user_tag(&"x".repeat(128))),
            },
        ] {
            assert_eq!(CounterId::parse(&id.to_string()), Some(id));
        }
        assert_eq!(CounterId::parse("zz"), None);
        assert_eq!(CounterId::key(key).to_string().len(), 12);
    }

    #[test]
    fn tables_carry_over_by_key_id() {
        let book = EndUserBook::default();
        let id = crate::keys::KeyDigest::of(b"k").id();
        let first = book.handles(&[None, Some(id)]);
        first[1].as_ref().unwrap().find("bob", 1);
        let again = book.handles(&[Some(id)]);
        assert_eq!(again[0].as_ref().unwrap().len(), 1);
        let gone = book.handles(&[]);
        assert!(gone.is_empty());
        assert!(book.handles(&[Some(id)])[0].as_ref().unwrap().is_empty());
    }
}
