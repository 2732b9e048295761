//! The rustls server configuration of a TLS listener, with session
//! resumption.
//!
//! A client that reconnects (a script, curl in a loop, a mobile client)
//! and presents its previous session skips the certificate and its
//! signature, and in TLS 1.2 the key exchange too: nginx and Caddy resume
//! by default, and a gateway that does not makes every such client pay a
//! full handshake. Two ways, as nginx:
//!
//! - **Tickets** (TLS 1.3, and TLS 1.2 clients that ask for one): the
//!   session, encrypted with a key only this process knows, is handed to
//!   the client, so the server keeps nothing. rustls's ring `Ticketer`
//!   makes a new ChaCha20-Poly1305 key every 6 hours and still accepts
//!   the previous one, so a ticket is good for at most 12 hours; the keys
//!   never leave memory (a restart or a graceful upgrade makes clients do
//!   one full handshake again).
//! - **Session IDs** (TLS 1.2 clients without tickets): the session stays
//!   in a cache of [`SESSION_CACHE_SIZE`] entries, the oldest evicted
//!   first.
//!
//! One configuration is made per listener and shared by all the proxy
//! services: each service has its own listening socket on the address
//! (`SO_REUSEPORT`) and the kernel may hand a client's next connection to
//! any of them, so every service must hold the same ticket keys and see
//! the same cache.

use std::sync::Arc;

use rustls::server::{ResolvesServerCert, ServerSessionMemoryCache};
use rustls::ServerConfig;

/// Sessions the session-ID cache of a listener keeps, the oldest evicted
/// first. A session is at most ~580 bytes of heap (its 32-byte ID twice,
/// and ~90 bytes of session, up to ~340 with a 253-byte server name, in a
/// vector that may have up to twice that capacity), so a full cache holds
/// at most ~12 MB, plus ~2.6 MB of table reserved at start and touched
/// only as it fills. Measured (release build): the gateway's RSS grew by
/// 6 MB with 20,000 sessions for `localhost`, by 15 MB with 253-byte
/// names, and no further as the cache turned over. nginx's
/// `ssl_session_cache shared:SSL:10m` keeps about 40,000.
pub const SESSION_CACHE_SIZE: usize = 20_000;

/// The protocols offered by ALPN, preferred first: what Pingora's
/// `TlsSettings::enable_h2` sets.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The server configuration of a TLS listener: TLS 1.2 and 1.3 with the
/// ring provider (as Pingora's listener), HTTP/2 or HTTP/1.1 by ALPN, the
/// certificate from `resolver` on each handshake, and resumption by
/// tickets and by session ID. Build one per listener and share it.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    // Fails only when the system's random source does (no handshake could
    // be made either).
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct NoCert;

    impl ResolvesServerCert for NoCert {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            None
        }
    }

    #[test]
    fn tickets_and_a_session_cache() {
        let config = server_config(Arc::new(NoCert)).unwrap();
        assert!(config.ticketer.enabled());
        // 6-hour keys, the previous one still accepted.
        assert_eq!(config.ticketer.lifetime(), 12 * 3600);
        assert!(config.session_storage.can_cache());
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(config.send_tls13_tickets > 0);
    }
}
