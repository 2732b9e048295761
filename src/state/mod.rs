//! State that outlives a snapshot.
//!
//! A snapshot is rebuilt on every reload, and `keygen` triggers one each
//! time someone adds a key; what the gateway has learnt at run time must not
//! be lost with it. Such state lives here, keyed by what identifies the
//! thing it is about (an upstream's address; a key's id), never by a
//! position in a snapshot. A snapshot build takes handles from here; after
//! a reload, entries for things the new snapshot still names carry over
//! and the rest are dropped.
//!
//! Owns: upstream health and load ([`UpstreamBook`]), per-key rate, concurrency and
//! token counters ([`KeyCounters`]), and failed key checks per client address
//! ([`FailedKeys`], a table of fixed size).
//!
//! May import: `config`, `keys`. No threads, sockets or clocks of its own:
//! callers pass the time in.

mod failed_keys;
mod key_counters;
mod upstream_health;
mod upstreams;

pub use failed_keys::{AddrTag, FailedKeys, KNOWN_FOR_S};
pub use key_counters::{InFlightGuard, KeyCounter, KeyCounters, SharedShare, TokenMeter};
pub use upstream_health::{Transition, UpstreamHealth, PASSIVE_COOLDOWN};
pub use upstreams::{
    Entered, Lease, Member, UpstreamBook, UpstreamLoad, UpstreamState, WaitQueue, Waiting,
};

/// Everything that outlives a snapshot, shared by the proxy, the reloader
/// and the health checker.
#[derive(Debug, Default)]
pub struct Carried {
    /// Upstream health and load by address.
    pub upstreams: UpstreamBook,
    /// Rate and concurrency counters by key id.
    pub keys: KeyCounters,
    /// Failed key checks by client address.
    pub failed_keys: FailedKeys,
}
