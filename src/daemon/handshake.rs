//! The TLS handshake of client connections, done by the proxy services'
//! application instead of Pingora's listener.
//!
//! Why: session resumption across the proxy services needs one rustls
//! `ServerConfig` per listener, shared by every service (one ticket key,
//! one session cache; see `crate::tls::server_config`). Pingora 0.9.1's
//! listener takes only a `TlsSettings`, which builds a `ServerConfig` of
//! its own in each service, with rustls's defaults (no tickets, a cache of
//! 256 sessions per service), and has no setter for either. Its public
//! `Acceptor::from_server_config` does take a `ServerConfig`, but no
//! listener takes an `Acceptor`. So TLS listeners are plain TCP listeners
//! to Pingora, and [`TlsFront`] runs the handshake with the listener's
//! acceptor before the connection reaches the wrapped application,
//! producing the same `TlsStream` Pingora's listener would (digest, ALPN,
//! certificate), under the same 60 s limit, logged the same way.
//!
//! The listener a connection came in on is known by its local address,
//! as `proxy::listener` does for redirects.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use log::error;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

/// How long a handshake may take: Pingora's listener's fixed limit.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// The TLS listeners' acceptors, by listening address.
#[derive(Clone, Default)]
pub struct Acceptors(Vec<(SocketAddr, Arc<Acceptor>)>);

impl Acceptors {
    pub fn new(listeners: Vec<(SocketAddr, Arc<Acceptor>)>) -> Acceptors {
        Acceptors(listeners)
    }

    /// The acceptor of the TLS listener a connection to local address
    /// `local` came in on: the listener on that very address, else one on
    /// the unspecified address with that port (`0.0.0.0:443` takes any
    /// address with port 443), of the same family first. `None`: a plain
    /// listener's connection.
    fn find(&self, local: SocketAddr) -> Option<&Arc<Acceptor>> {
        let ip = local.ip().to_canonical();
        let local = SocketAddr::new(ip, local.port());
        let on_port = || self.0.iter().filter(|(a, _)| a.port() == local.port());
        on_port()
            .find(|(a, _)| *a == local)
            .or_else(|| on_port().find(|(a, _)| a.ip().is_unspecified() && same_family(a.ip(), ip)))
            .or_else(|| on_port().find(|(a, _)| a.ip().is_unspecified()))
            .map(|(_, acceptor)| acceptor)
    }
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// `A` behind the TLS handshake of the TLS listeners' connections; plain
/// listeners' connections go to `A` as they come.
pub struct TlsFront<A> {
    inner: Arc<A>,
    acceptors: Acceptors,
}

impl<A> TlsFront<A> {
    pub fn new(inner: A, acceptors: Acceptors) -> TlsFront<A> {
        TlsFront {
            inner: Arc::new(inner),
            acceptors,
        }
    }

    /// The listener's acceptor if `stream` came in on a TLS listener.
    fn acceptor_for(&self, stream: &Stream) -> Option<Arc<Acceptor>> {
        if self.acceptors.0.is_empty() {
            return None;
        }
        let digest = stream.get_socket_digest()?;
        let local = *digest.local_addr()?.as_inet()?;
        self.acceptors.find(local).cloned()
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for TlsFront<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(acceptor) = self.acceptor_for(&stream) else {
            return self.inner.process_new(stream, shutdown).await;
        };
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().cloned());
        // What a TCP listener hands over is its own stream type; anything
        // else would be a connection this front has already seen.
        let tcp = match stream.into_any().downcast::<L4Stream>() {
            Ok(tcp) => *tcp,
            Err(_) => {
                error!("a connection on a TLS listener is not a TCP stream; closed");
                return None;
            }
        };
        let tls: Stream =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.tls_handshake(tcp)).await {
                Ok(Ok(tls)) => Box::new(tls),
                Ok(Err(e)) => {
                    match peer {
                        Some(peer) => error!("Downstream handshake error from {peer}: {e}"),
                        None => error!("Downstream handshake error: {e}"),
                    }
                    return None;
                }
                Err(_) => {
                    error!("Downstream handshake timeout");
                    return None;
                }
            };
        // A kept-alive connection comes back to be served again, here
        // rather than through Pingora, which would hand it to this front
        // as new.
        let mut next = self.inner.process_new(tls, shutdown).await;
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn acceptor() -> Arc<Acceptor> {
        let config =
            crate::tls::server_config(Arc::new(crate::tls::SlotResolver(Arc::default()))).unwrap();
        Arc::new(Acceptor::from_server_config(Arc::new(config)))
    }

    #[test]
    fn a_connection_finds_its_listener_by_local_address() {
        let exact = acceptor();
        let any_v4 = acceptor();
        let any_v6 = acceptor();
        let acceptors = Acceptors::new(vec![
            (addr("127.0.0.1:8443"), Arc::clone(&exact)),
            (addr("0.0.0.0:443"), Arc::clone(&any_v4)),
            (addr("[::]:443"), Arc::clone(&any_v6)),
        ]);
        let found = |local: &str| acceptors.find(addr(local)).cloned();
        assert!(found("127.0.0.1:8443").is_some_and(|a| Arc::ptr_eq(&a, &exact)));
        assert!(
            found("10.0.0.1:8443").is_none(),
            "another address, same port"
        );
        assert!(found("127.0.0.1:8080").is_none(), "a plain listener");
        assert!(found("10.0.0.1:443").is_some_and(|a| Arc::ptr_eq(&a, &any_v4)));
        assert!(found("[::ffff:10.0.0.1]:443").is_some_and(|a| Arc::ptr_eq(&a, &any_v4)));
        assert!(found("[2001:db8::1]:443").is_some_and(|a| Arc::ptr_eq(&a, &any_v6)));
        let only_v6 = Acceptors::new(vec![(addr("[::]:443"), Arc::clone(&any_v6))]);
        assert!(only_v6
            .find(addr("[::ffff:10.0.0.1]:443"))
            .is_some_and(|a| Arc::ptr_eq(a, &any_v6)));
    }
}
