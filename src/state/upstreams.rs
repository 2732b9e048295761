//! What is known about each upstream address: its health and its load,
//! kept outside the snapshot by address.
//!
//! A reload (a key added by `keygen`, a route edited) keeps what is known
//! about every upstream the new configuration still names, and drops the
//! rest. Routes that name the same address share it: it is the same
//! server, so its health, its requests in flight and its cap's count are
//! one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use super::upstream_health::UpstreamHealth;
use super::upstream_load::UpstreamLoad;

/// One upstream address's state, shared by every snapshot that names it.
#[derive(Debug, Default)]
pub struct UpstreamState {
    pub health: UpstreamHealth,
    pub load: UpstreamLoad,
}

/// The state of every upstream the running configuration names, by
/// address. Only snapshot builds, reloads and the admin endpoints take its
/// lock; requests hold the `Arc`s their snapshot's routes were built with.
#[derive(Debug, Default)]
pub struct UpstreamBook {
    entries: Mutex<HashMap<SocketAddr, Arc<UpstreamState>>>,
}

impl UpstreamBook {
    /// The state of `addr`: the one already known, or a new one (in
    /// rotation, nothing in flight).
    pub fn entry(&self, addr: SocketAddr) -> Arc<UpstreamState> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(entries.entry(addr).or_default())
    }

    /// Forgets every upstream not in `named` (the addresses of the snapshot
    /// now in service). Requests still in flight to one hold its state
    /// until they end.
    pub fn retain(&self, named: &[SocketAddr]) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|addr, _| named.contains(addr));
    }

    /// Every upstream known, by address (for metrics and `/readyz`).
    pub fn all(&self) -> Vec<(SocketAddr, Arc<UpstreamState>)> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = entries.iter().map(|(a, s)| (*a, Arc::clone(s))).collect();
        all.sort_unstable_by_key(|(a, _)| *a);
        all
    }

    /// How many upstreams are tracked.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_book_keeps_known_upstreams_and_drops_the_rest() {
        let book = UpstreamBook::default();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        book.entry(a).health.connect_failed(1000, false);
        book.entry(b);
        assert!(
            !book.entry(a).health.is_up(1001),
            "the same state is handed out again"
        );
        book.retain(&[a]);
        assert_eq!(book.len(), 1);
        assert!(!book.entry(a).health.is_up(1001));
        assert!(
            book.entry(b).health.is_up(1001),
            "a dropped upstream starts afresh"
        );
    }
}
