//! TLS for client listeners: certificates from PEM files (checked, and
//! swapped without a restart) and from an ACME server.
//!
//! Owns: reading and checking certificate/key pairs ([`LoadedCert`]), the
//! per-listener certificate slot rustls asks on every handshake
//! ([`CertSlot`]), the HTTP-01 challenges in progress ([`Challenges`]),
//! one ACME order with its cache ([`acme`]), and a listener's rustls
//! configuration with session resumption ([`server_config`]). Nothing
//! here spawns threads or tasks or binds sockets: the daemon runs the
//! ACME task and the reloads, and the TLS handshakes.
//!
//! May import: `config`, `keys`, `state`.

pub mod acme;
mod certs;
mod challenges;
mod resolver;
mod sessions;

pub use certs::LoadedCert;
pub use challenges::{is_challenge_path, Challenges};
pub use resolver::{CertSlot, SlotResolver};
pub use sessions::{server_config, SESSION_CACHE_SIZE};
