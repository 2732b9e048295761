//! The certificate a TLS listener serves, swappable while it runs.
//!
//! rustls asks the resolver for a certificate on every handshake; the
//! resolver answers with what its slot holds at that moment. Replacing the
//! slot's content (a reload, an ACME renewal) changes what new handshakes
//! get; connections already open keep the certificate they started with.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::certs::LoadedCert;

/// One listener's certificate. Empty until one is loaded or obtained: a
/// handshake then fails (an ACME listener waiting for its first
/// certificate).
#[derive(Debug, Default)]
pub struct CertSlot {
    current: ArcSwapOption<LoadedCert>,
}

impl CertSlot {
    pub fn new(cert: Option<LoadedCert>) -> CertSlot {
        CertSlot {
            current: ArcSwapOption::from(cert.map(Arc::new)),
        }
    }

    /// Serves `cert` to new handshakes from now on.
    pub fn store(&self, cert: LoadedCert) {
        self.current.store(Some(Arc::new(cert)));
    }

    /// The certificate served now.
    pub fn current(&self) -> Option<Arc<LoadedCert>> {
        self.current.load_full()
    }
}

/// What rustls holds: a handle on the slot.
#[derive(Debug)]
pub struct SlotResolver(pub Arc<CertSlot>);

impl ResolvesServerCert for SlotResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current.load().as_ref().map(|c| Arc::clone(&c.key))
    }
}
