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
//! token counters ([`KeyCounters`]), the same per end user of the keys
//! that name them ([`EndUserBook`]), budget alerts on their way to the
//! webhook ([`AlertQueue`]), and failed key checks per client address
//! ([`FailedKeys`], a table of fixed size).
//!
//! May import: `config`, `keys`. No threads, sockets or clocks of its own:
//! callers pass the time in.

mod alerts;
mod end_users;
mod failed_keys;
mod key_counters;
mod upstream_health;
mod upstreams;

pub use alerts::{crossed, Alert, AlertBody, AlertQueue, AlertTarget, Crossing, ALERT_QUEUE};
pub use end_users::{
    end_user_tag, CounterId, EndUserBook, EndUserHandle, EndUserTable, MAX_END_USERS,
};
pub use failed_keys::{AddrTag, FailedKeys, KNOWN_FOR_S};
pub use key_counters::{
    InFlightGuard, KeyCounter, KeyCounters, SharedShare, TokenMeter, TokenStep,
};
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
    /// End users' counters by key id.
    pub end_users: EndUserBook,
    /// Budget alerts waiting for the daemon's task to post them.
    pub alerts: AlertQueue,
    /// Failed key checks by client address.
    pub failed_keys: FailedKeys,
}
