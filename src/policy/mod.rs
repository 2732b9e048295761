//! The rules a request is judged by: routes, path rules, where the key is
//! found, the snapshot they are compiled into, and the decision.
//!
//! Owns: [`Snapshot`] (config, routes and keys compiled into one immutable
//! value), [`Router`] (longest-prefix routes and their upstream peers),
//! [`Refusal`] (every answer the gateway gives itself), and the request
//! decision.
//!
//! Pure: no Pingora `Session`, no threads, sockets or clocks it reads
//! itself (callers pass the time in), so benches, property tests and
//! fuzzers call the decision directly.
//!
//! May import: `config`, `keys`, `state`, `usage`.

mod client;
mod credentials;
mod path;
mod refusal;
mod request;
mod routes;
mod snapshot;

pub use client::client_ip;
pub use credentials::{presented_key, Credential};
pub use path::is_ambiguous_path;
pub use refusal::{ErrorShape, ExtraHeader, Refusal, CHALLENGE};
pub use request::{Request, Upgrade};
pub use routes::{Cors, Pick, Route, Router, Upstream, DEFAULT_POOL, UPSTREAM_IDLE_TIMEOUT};
pub use snapshot::{
    admit_locally, judge_models, load_timed, whole_seconds, Admission, Decision, Snapshot,
};
