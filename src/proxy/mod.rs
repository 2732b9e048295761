//! The request path: Pingora's `ProxyHttp` hooks, the request context, and
//! the gateway's own replies. The only layer that names a Pingora
//! `Session`. Connections reach these hooks through
//! [`connection::ClientApp`], which holds the connection cap and the client
//! timeouts.
//!
//! ```text
//!  client ─▶ (TLS listeners: the handshake, in the daemon's TLS front
//!             (`daemon::handshake`) with the listener's shared session
//!             cache and ticket keys, and the certificate the listener's
//!             slot holds now; ALPN h2 or http/1.1)
//!         ─▶ new_ctx                 the one snapshot load
//!         ─▶ early_request_filter    stop the head's clock (see `connection`),
//!                                    bound each read of the body
//!         ─▶ request_filter          plain listeners: ACME HTTP-01 challenges,
//!              │                     then `redirect_https` (308); then
//!              │                     request id; head checks (framing,
//!              │                     host, size); path, route, method,
//!              │                     upgrade, key: one decision
//!              └ refused ─▶ JSON 4xx from the Refusal, then logging
//!         ─▶ upstream_peer           round-robin over the route's peers
//!         ─▶ upstream_request_filter strip credentials and client copies of
//!                                    gateway-owned headers (underscore names
//!                                    too), set X-Gateway-User, X-Request-Id,
//!                                    X-Forwarded-For/-Proto; strip the prefix
//!         ─▶ upstream_response_filter an unasked 101 becomes a 502
//!         ◀─▶ bodies stream both ways, chunk by chunk (Pingora's default)
//!         ─▶ fail_to_proxy           502/504 with a JSON body; 408 for a
//!                                    stalled request body (see `connection`)
//!         ─▶ logging                 metrics and the audit line, always
//! ```
//!
//! The connection loop (`connection`) spawns one task per HTTP/2 stream,
//! as Pingora's own accept loop does; nothing here starts a thread.
//!
//! Files, lowest first (each imports only those before it): `clock` (the
//! events that move a connection's clocks), `client_stream` (the client's
//! stream, which reports them), `connection` (the loop around Pingora's
//! proxy, generic over its hooks), `context`, `framing`, `headers`,
//! `reply`, `listener`, `ai`, `phases`, `gateway` (the hooks).
//!
//! May import: `config`, `keys`, `state`, `tls`, `usage`, `policy`, `ops`,
//! `cluster`.

mod ai;
mod client_stream;
mod clock;
mod connection;
mod context;
mod end_users;
mod fleet;
mod framing;
mod gateway;
mod headers;
mod listener;
mod phases;
mod reply;

pub use connection::{ClientApp, Slots};

pub use context::{AiRequest, Outcome, Replay, RequestCtx};
pub use framing::MAX_HEADER_BYTES;
pub use gateway::{Gateway, GatewayParts};
pub use listener::Listeners;
