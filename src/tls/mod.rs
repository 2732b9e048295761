//! TLS for client listeners: certificates from PEM files (checked, and
//! swapped without a restart) and from an ACME server.
//!
//! Owns: reading and checking certificate/key pairs ([`LoadedCert`]), the
//! per-listener certificate slot rustls asks on every handshake
//! ([`CertSlot`]), the HTTP-01 challenges in progress ([`Challenges`]),
//! and one ACME order with its cache ([`acme`]). Nothing here spawns
//! threads or tasks or binds sockets: the daemon runs the ACME task and
//! the reloads.
//!
//! May import: `config`, `keys`, `state`.

pub mod acme;
mod certs;
mod challenges;
mod resolver;

pub use certs::LoadedCert;
pub use challenges::{is_challenge_path, Challenges};
pub use resolver::{CertSlot, SlotResolver};
