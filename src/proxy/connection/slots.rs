//! The connection cap: one slot per open client connection, taken when it
//! is accepted and given back when its task ends, whatever ends it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use log::warn;
use prometheus::IntGauge;

/// At most one warning per this many seconds that the cap refuses
/// connections; the refusals themselves are counted, never logged.
const WARN_EVERY_SECS: u64 = 60;

/// Counts the open client connections against a cap. One per process,
/// shared by every proxy service, so the cap holds across them.
#[derive(Debug)]
pub struct Slots {
    open: AtomicUsize,
    /// The same count, exported (`agw_client_connections`).
    gauge: IntGauge,
    /// Unix seconds of the last "cap reached" warning.
    warned_at: AtomicU64,
}

/// An open connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot<'a>(&'a Slots);

impl Slots {
    pub fn new(gauge: IntGauge) -> Slots {
        Slots {
            open: AtomicUsize::new(0),
            gauge,
            warned_at: AtomicU64::new(0),
        }
    }

    /// A slot if fewer than `cap` connections are open. Exact under
    /// concurrent accepts: the count is claimed first and given back when
    /// it went over.
    pub fn take(&self, cap: usize) -> Option<Slot<'_>> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= cap {
            self.open.fetch_sub(1, Ordering::Relaxed);
            self.warn_refusing(cap);
            return None;
        }
        self.gauge.inc();
        Some(Slot(self))
    }

    fn warn_refusing(&self, cap: usize) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.warned_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY_SECS
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(
                "max_connections ({cap}) reached: new client connections are refused \
                 (counted in agw_client_connections_refused_total; this is logged at most once a minute)"
            );
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_exact_and_slots_come_back() {
        let gauge = IntGauge::new("g", "test").unwrap();
        let slots = Slots::new(gauge.clone());
        let a = slots.take(2).expect("first");
        let b = slots.take(2).expect("second");
        assert!(slots.take(2).is_none(), "third over a cap of 2");
        assert_eq!(gauge.get(), 2);
        drop(a);
        let c = slots.take(2).expect("a freed slot is taken again");
        assert!(slots.take(1).is_none(), "a lowered cap refuses at once");
        drop((b, c));
        assert_eq!(gauge.get(), 0);
        assert!(slots.take(1).is_some(), "all slots came back");
    }

    #[test]
    fn concurrent_takes_never_exceed_the_cap() {
        let gauge = IntGauge::new("g", "test").unwrap();
        let slots = Slots::new(gauge.clone());
        let (held, most, granted) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if let Some(slot) = slots.take(3) {
                            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            granted.fetch_add(1, Ordering::SeqCst);
                            held.fetch_sub(1, Ordering::SeqCst);
                            drop(slot);
                        }
                    }
                });
            }
        });
        assert!(most.load(Ordering::SeqCst) <= 3, "{most:?}");
        assert!(granted.load(Ordering::SeqCst) > 0);
        assert_eq!(gauge.get(), 0);
    }
}
