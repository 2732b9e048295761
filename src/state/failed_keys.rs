//! Client addresses that keep presenting bad keys, in a table of fixed
//! size.
//!
//! An attacker with many addresses cannot grow it: it has [`SLOTS`] slots,
//! each for one address at a time (found by a hash keyed with a secret
//! made at start, so nobody can aim at a slot). A slot whose address is
//! blocked is never taken over until the block ends. Reads and updates are
//! atomics; two requests racing on one slot can miscount by one, never
//! block an innocent address for longer than one cool-down.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::config::ThrottleSpec;

/// Addresses tracked at once (about 1.5 MiB).
pub const SLOTS: usize = 1 << 16;

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

/// Failed key checks per client address.
#[derive(Debug)]
pub struct FailedKeys {
    slots: Box<[Slot]>,
    hasher: RandomState,
}

impl Default for FailedKeys {
    fn default() -> Self {
        FailedKeys {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl FailedKeys {
    fn slot(&self, ip: IpAddr) -> (u64, Option<&Slot>) {
        let tag = self.hasher.hash_one(ip) | 1;
        let index = usize::try_from(tag % SLOTS as u64).unwrap_or(0);
        (tag, self.slots.get(index))
    }

    /// How many whole seconds `ip` is still blocked for, if it is (at least
    /// one).
    #[inline]
    pub fn blocked(&self, ip: IpAddr, now_s: u32) -> Option<u32> {
        let (tag, slot) = self.slot(ip);
        let slot = slot?;
        if slot.tag.load(Ordering::Relaxed) != tag {
            return None;
        }
        let until = slot.blocked_until.load(Ordering::Relaxed);
        (until > now_s).then(|| until - now_s)
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
        assert!(f.blocked(ip, 100).is_none());
        assert!(f.failed(ip, 101, &s), "the third failure blocks, once");
        assert_eq!(f.blocked(ip, 101), Some(5));
        assert!(
            !f.failed(ip, 102, &s),
            "already blocked: no second block line"
        );
        assert!(f.blocked(other, 101).is_none());
        assert!(f.blocked(ip, 106).is_none(), "the cool-down is over");
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
}
