//! ai-gateway: an API-key gateway for self-hosted AI services, on Pingora.
//!
//! The layers, lowest first; each may import only those before it:
//!
//! | layer     | owns |
//! |-----------|------|
//! | [`config`] | what users write, validated; errors with file and line |
//! | [`keys`]   | digests, the key store, the key file and its commands |
//! | [`state`]  | what outlives a snapshot: upstream health, per-key counters |
//! | [`tls`]    | certificates: PEM pairs, the swappable slot, ACME orders and challenges |
//! | [`usage`]  | what AI APIs say: models in requests, token usage in answers (pure readers), the usage report over the audit log |
//! | [`policy`] | the snapshot, routes, path rules, refusals, the decision (pure) |
//! | [`ops`]    | metrics, audit log, request ids, the status page's history |
//! | [`cluster`] | limits shared with other instances through Redis: leases, revocations, sync |
//! | [`admin`]  | the admin listener: metrics and health, admin keys, the key API, the status page |
//! | [`proxy`]  | Pingora's `ProxyHttp` hooks: the only place that names a `Session` |
//! | [`daemon`] | start-up, listeners, reloads, threads: the only place that starts threads or binds |
//!
//! [`cli`] sits on top and runs the commands. Each layer's `mod.rs` says
//! what it owns and may import; `tests/layering.rs` checks every `use
//! crate::…` in `src/` against those lists, that no files of one folder
//! import each other in a circle, and that only the layers whose doc says
//! so spawn threads or tasks.

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod keys;
pub mod ops;
pub mod policy;
pub mod proxy;
pub mod state;
pub mod tls;
pub mod usage;
