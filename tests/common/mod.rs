//! Shared support code for the `ai-gateway` integration tests.
//!
//! * [`ai_upstream`]: a mock model server speaking Ollama's and the
//!   OpenAI-compatible API, streaming with delays, with predictable token
//!   counts;
//! * [`ai_gateway`]: the gateway of the AI-route tests (routes with `api`,
//!   scoped keys, a raw client sending what the official clients send; not
//!   glob re-exported: `use common::ai_gateway::*` where needed);
//! * [`upstreams`]: small, dependency-free HTTP/1.1 upstream servers (echo,
//!   streaming, silent, custom) that run on background threads, so tests can
//!   observe exactly what the gateway forwarded and how it forwarded it;
//! * [`config`]: typed gateway configs ([`GatewayConfig`], [`Route`]) and
//!   key files ([`KeyFile`], [`Key`]), rendered to what the gateway reads;
//! * [`audit`]: the audit log's lines, by request id;
//! * [`check`]: `ai-gateway check` runs, and the line its errors name;
//! * [`gateway`]: a [`Gateway`] runner that writes a config + keys file into
//!   a temporary directory, spawns the real `ai-gateway` binary and waits
//!   until it answers HTTP, and [`run_cli`] for one-shot commands;
//! * [`cluster`]: three gateway instances sharing one Redis (not glob
//!   re-exported: `use common::cluster::*` where needed);
//! * [`hostile`]: exact bytes on a raw connection and checks that the
//!   upstream received nothing, for the hardening tests (not glob
//!   re-exported: `use common::hostile::*` where needed);
//! * [`redis`]: a real `redis-server` on a loopback port (for the cluster
//!   tests), with a small RESP client to look inside it;
//! * [`metrics`] and [`prometheus`]: the admin listener's `/metrics`, by
//!   series or parsed strictly, and `/readyz`;
//! * [`reliability`]: the gateway and raw exchange of the reliability
//!   tests (not glob re-exported);
//! * [`raw_http`]: raw HTTP/1.x request and response reading, for upstreams
//!   and for tests that talk to the gateway over a bare `TcpStream`;
//! * [`webhook`]: a budget-alert webhook receiver that records what it
//!   is posted, or holds the connection without answering;
//! * [`util`]: client helpers ([`agent`], [`wait_until`], [`sha256_hex`],
//!   [`PatternReader`], ...).
//!
//! Everything is blocking std code (threads + `std::net`), no async runtime.
//!
//! Test crates declare this module as `pub mod common;`: each uses only a
//! subset of the helpers, and rustc does not report unused `pub` items that
//! are reachable from the crate root, so no `dead_code` allowance is needed
//! (private items that are unused are still reported).

pub mod ai_gateway;
pub mod ai_upstream;
pub mod audit;
pub mod check;
pub mod cluster;
pub mod config;
pub mod gateway;
pub mod hostile;
pub mod key_files;
pub mod metrics;
pub mod pebble;
pub mod prometheus;
pub mod raw_client;
pub mod raw_http;
pub mod redis;
pub mod reliability;
pub mod tls;
pub mod upstreams;
pub mod util;
pub mod webhook;

pub use ai_upstream::*;
pub use audit::*;
pub use check::*;
pub use config::*;
pub use gateway::*;
pub use key_files::*;
pub use metrics::*;
pub use prometheus::*;
pub use raw_client::*;
pub use raw_http::*;
pub use upstreams::*;
pub use util::*;
