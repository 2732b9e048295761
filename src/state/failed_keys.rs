//! Client addresses that keep presenting bad keys, in a table of fixed
//! size, and the keys that worked from each address.
//!
//! An attacker with many addresses cannot grow it: it has [`SLOTS`] slots,
//! each for one address at a time (found by a hash keyed with a secret
//! made at start, so nobody can aim at a slot). A slot whose address is
//! blocked is never taken over until the block ends. Reads and updates are
//! atomics; two requests racing on one slot can miscount by one, never
//! block an innocent address for longer than one cool-down.
//!
//! One address is often many people: a team behind a NAT, every user of a
//! front end such as Open WebUI. So that one stale key does not lock them
//! all out, a second fixed table remembers which keys succeeded from which
//! address ([`KNOWN_SLOTS`] pairs, for [`KNOWN_FOR_S`] seconds); a blocked address is
//! still served for those. Any other key, right or wrong, is refused while
//! the block lasts, so a block never tells a guesser which guess was right.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::config::ThrottleSpec;
use crate::keys::KeyId;

/// Addresses tracked at once (about 1.5 MiB).
pub const SLOTS: usize = 1 << 16;

/// (address, key) pairs remembered at once (1 MiB). A pair whose entry is
/// taken over by another is forgotten: that key is refused while its
/// address is blocked, as a new one would be.
pub const KNOWN_SLOTS: usize = 1 << 16;

/// How long a key that succeeded from an address stays known there.
pub const KNOWN_FOR_S: u32 = 3600;

/// A known pair is written again only when its time is older than this,
/// so a busy key costs a load per request, not a store.
const KNOWN_REFRESH_S: u32 = 10;

/// A client address as the tables know it: its keyed hash, computed once
/// per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrTag(u64);

/// One remembered (address, key) pair.
#[derive(Debug, Default)]
struct Known {
    /// Hash of the pair; 0 = free.
    tag: AtomicU64,
    /// When the key last succeeded from the address (Unix seconds).
    at: AtomicU32,
}

#[derive(Debug, Default)]
struct Slot {
    /// The hash of the address this slot is for; 0 = free.
    tag: AtomicU64,
    /// Start of the current counting window (Unix seconds).
    window_start: AtomicU32,
    failures: AtomicU32,
    /// Blocked until (Unix seconds); 0 = not blocked.
    blocked_until: AtomicU32,
}

/// Failed key checks per client address, and the keys known to work
/// from each.
#[derive(Debug)]
pub struct FailedKeys {
    slots: Box<[Slot]>,
    known: Box<[Known]>,
    hasher: RandomState,
}

impl Default for FailedKeys {
    fn default() -> Self {
        FailedKeys {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            known: (0..KNOWN_SLOTS).map(|_| Known::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl FailedKeys {
    /// The address's keyed hash: computed once per request and passed to
    /// the other methods.
    #[inline]
    pub fn tag(&self, ip: IpAddr) -> AddrTag {
        AddrTag(self.hasher.hash_one(ip) | 1)
    }

    fn slot(&self, ip: IpAddr) -> (u64, Option<&Slot>) {
        self.slot_of(self.tag(ip))
    }

    fn slot_of(&self, AddrTag(tag): AddrTag) -> (u64, Option<&Slot>) {
        let index = usize::try_from(tag % SLOTS as u64).unwrap_or(0);
        (tag, self.slots.get(index))
    }

    /// How many whole seconds the address is still blocked for, if it is
    /// (at least one).
    #[inline]
    pub fn blocked(&self, addr: AddrTag, now_s: u32) -> Option<u32> {
        let (tag, slot) = self.slot_of(addr);
        let slot = slot?;
        if slot.tag.load(Ordering::Relaxed) != tag {
            return None;
        }
        let until = slot.blocked_until.load(Ordering::Relaxed);
        (until > now_s).then(|| until - now_s)
    }

    /// The entry of the (address, key) pair and the pair's tag. The key id
    /// is mixed in with a multiply so that pairs of one address spread.
    fn known_entry(&self, AddrTag(addr): AddrTag, key: KeyId) -> (u64, Option<&Known>) {
        let tag = (addr ^ key.to_u64().wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
        let index = usize::try_from(tag.rotate_right(17) % KNOWN_SLOTS as u64).unwrap_or(0);
        (tag, self.known.get(index))
    }

    /// Remembers that `key` succeeded from the address.
    #[inline]
    pub fn succeeded(&self, addr: AddrTag, key: KeyId, now_s: u32) {
        let (tag, Some(entry)) = self.known_entry(addr, key) else {
            return;
        };
        if entry.tag.load(Ordering::Relaxed) == tag
            && now_s.saturating_sub(entry.at.load(Ordering::Relaxed)) < KNOWN_REFRESH_S
        {
            return;
        }
        entry.tag.store(tag, Ordering::Relaxed);
        entry.at.store(now_s, Ordering::Relaxed);
    }

    /// Whether `key` succeeded from the address within [`KNOWN_FOR_S`]:
    /// such a key is served while the address is blocked.
    pub fn known(&self, addr: AddrTag, key: KeyId, now_s: u32) -> bool {
        let (tag, Some(entry)) = self.known_entry(addr, key) else {
            return false;
        };
        entry.tag.load(Ordering::Relaxed) == tag
            && now_s.saturating_sub(entry.at.load(Ordering::Relaxed)) <= KNOWN_FOR_S
    }

    /// Counts a failed key check from `ip`. True when this failure blocks
    /// the address (once per block: the caller logs it).
    pub fn failed(&self, ip: IpAddr, now_s: u32, spec: &ThrottleSpec) -> bool {
        let (tag, Some(slot)) = self.slot(ip) else {
            return false;
        };
        let window = u32::try_from(spec.window.as_secs()).unwrap_or(u32::MAX);
        if slot.tag.load(Ordering::Relaxed) != tag {
            if slot.blocked_until.load(Ordering::Relaxed) > now_s {
                // Another address is blocked here: keep its block.
                return false;
            }
            slot.tag.store(tag, Ordering::Relaxed);
            slot.blocked_until.store(0, Ordering::Relaxed);
            slot.window_start.store(now_s, Ordering::Relaxed);
            slot.failures.store(1, Ordering::Relaxed);
            return spec.max_failures.get() <= 1 && self.block(slot, now_s, spec);
        }
        if now_s.saturating_sub(slot.window_start.load(Ordering::Relaxed)) >= window {
            slot.window_start.store(now_s, Ordering::Relaxed);
            slot.failures.store(0, Ordering::Relaxed);
        }
        let n = slot
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        n >= spec.max_failures.get() && self.block(slot, now_s, spec)
    }

    /// Blocks `ip` for `secs` from `now_s` (an address another instance
    /// blocked): takes its slot unless another address's block holds it.
    pub fn block_for(&self, ip: IpAddr, now_s: u32, secs: u32) {
        let (tag, Some(slot)) = self.slot(ip) else {
            return;
        };
        if slot.tag.load(Ordering::Relaxed) != tag {
            if slot.blocked_until.load(Ordering::Relaxed) > now_s {
                return;
            }
            slot.tag.store(tag, Ordering::Relaxed);
            slot.window_start.store(now_s, Ordering::Relaxed);
        }
        slot.failures.store(0, Ordering::Relaxed);
        slot.blocked_until
            .fetch_max(now_s.saturating_add(secs.max(1)), Ordering::Relaxed);
    }

    fn block(&self, slot: &Slot, now_s: u32, spec: &ThrottleSpec) -> bool {
        let cooldown = u32::try_from(spec.cooldown.as_secs())
            .unwrap_or(u32::MAX)
            .max(1);
        let was = slot
            .blocked_until
            .swap(now_s.saturating_add(cooldown), Ordering::Relaxed);
        slot.failures.store(0, Ordering::Relaxed);
        slot.window_start.store(now_s, Ordering::Relaxed);
        was <= now_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use std::time::Duration;

    fn spec(n: u32) -> ThrottleSpec {
        ThrottleSpec {
            enabled: true,
            max_failures: NonZeroU32::new(n).unwrap(),
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(5),
        }
    }

    #[test]
    fn blocks_after_the_threshold_for_the_cooldown_only() {
        let f = FailedKeys::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let s = spec(3);
        assert!(!f.failed(ip, 100, &s));
        assert!(!f.failed(ip, 100, &s));
        assert!(f.blocked(f.tag(ip), 100).is_none());
        assert!(f.failed(ip, 101, &s), "the third failure blocks, once");
        assert_eq!(f.blocked(f.tag(ip), 101), Some(5));
        assert!(
            !f.failed(ip, 102, &s),
            "already blocked: no second block line"
        );
        assert!(f.blocked(f.tag(other), 101).is_none());
        assert!(f.blocked(f.tag(ip), 106).is_none(), "the cool-down is over");
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let f = FailedKeys::default();
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let s = spec(2);
        assert!(!f.failed(ip, 0, &s));
        assert!(!f.failed(ip, 61, &s));
        assert!(f.failed(ip, 62, &s));
    }

    #[test]
    fn keys_that_worked_from_an_address_are_known_there_only_and_for_a_while() {
        let f = FailedKeys::default();
        let nat = f.tag("192.0.2.7".parse().unwrap());
        let other = f.tag("192.0.2.8".parse().unwrap());
        let team = KeyId::parse_hex("0123456789ab").unwrap();
        let stranger = KeyId::parse_hex("ba9876543210").unwrap();
        f.succeeded(nat, team, 1000);
        assert!(f.known(nat, team, 1000));
        assert!(f.known(nat, team, 1000 + KNOWN_FOR_S));
        assert!(!f.known(nat, team, 1001 + KNOWN_FOR_S), "forgotten");
        assert!(!f.known(nat, stranger, 1000));
        assert!(!f.known(other, team, 1000), "known per address");
        f.succeeded(nat, team, 1005);
        assert!(
            !f.known(nat, team, 1001 + KNOWN_FOR_S),
            "refreshed only after KNOWN_REFRESH_S"
        );
        f.succeeded(nat, team, 1000 + KNOWN_REFRESH_S);
        assert!(f.known(nat, team, 1001 + KNOWN_FOR_S), "refreshed");
    }
}
