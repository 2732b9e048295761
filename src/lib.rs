//! ai-gateway: an API-key gateway for self-hosted AI services, on Pingora.
//!
//! The request path lives in [`proxy`]; the rules it applies are compiled
//! into a [`snapshot::Snapshot`] from [`config`] and [`keys`], with routing
//! in [`routes`]. [`reload`] swaps snapshots; [`daemon`] runs the server.

pub mod admin;
pub mod audit;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod health;
pub mod keyfile;
pub mod keys;
pub mod keytool;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod request_id;
pub mod routes;
pub mod snapshot;
pub mod watch;
