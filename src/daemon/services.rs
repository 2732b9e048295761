//! The proxy services: one per core.
//!
//! With `threads: N` the gateway runs N proxy services of one thread each
//! (Pingora gives every service its own runtime). Each service has its own
//! listening socket on every `listen` address, bound with `SO_REUSEPORT` so
//! that the kernel spreads new connections over them, and its own
//! `HttpProxy`, so its own pool of upstream connections. A connection is
//! accepted, served and proxied on one thread; nothing of a request crosses
//! cores. The services share the snapshot in service, the metrics, the
//! audit writer and the per-key state (all inside [`Gateway`], cloned per
//! service), and the connection slots, so `max_connections` counts them all.
//!
//! ```text
//!            ┌ socket 0 (SO_REUSEPORT) ─ service ai-gateway-0: 1 thread, HttpProxy, upstream pool ┐
//!  clients ──┤                                                                                      ├─ one snapshot, metrics,
//!            └ socket 1 (SO_REUSEPORT) ─ service ai-gateway-1: 1 thread, HttpProxy, upstream pool ┘  audit writer, key state, slots
//! ```
//!
//! Graceful upgrade: Pingora hands the listening sockets to the new process
//! in a table keyed by each address *as written* (`pingora-core`
//! `listeners/l4.rs`, `ListenerEndpointBuilder::listen`; `server/transfer_fd`),
//! so services given the same string would share one socket. Service `i`
//! therefore writes the port of each address with `i` leading zeros
//! (`127.0.0.1:8080`, `127.0.0.1:08080`, …), which parses to the same
//! address ([`listener_key`]): the old process sends every socket under its
//! own key, and each service of the new process takes its own one. Service
//! 0's key is the plain address, as it was before this layout. Inherited
//! sockets nobody claims (fewer threads after the upgrade) Pingora closes.
//! An upgrade moves at most 32 sockets, their keys in at most 2,048 bytes
//! (`transfer_fd`); past either limit, services get more than one thread
//! each ([`layout`]).
//!
//! TLS listeners are plain TCP listeners to Pingora: the proxy services'
//! application does the handshake ([`TlsFront`]), with one rustls
//! configuration per listener shared by all services, so a TLS session
//! resumes whichever socket the kernel hands the client's next
//! connection to.
//!
//! An upgrade from a gateway that predates this layout inherits sockets
//! bound without `SO_REUSEPORT`, beside which no other socket can be bound.
//! Then the gateway runs one service of N threads on them, as before, until
//! it is restarted ([`inherited_without_reuseport`]).

use std::mem::ManuallyDrop;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, RawFd};
use std::sync::Arc;

use log::info;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service as ListeningService;

use super::handshake::TlsFront;
use super::tls::TlsListeners;
use crate::config::{Config, ListenKind};
use crate::ops::{Metrics, SharedLive};
use crate::proxy::{ClientApp, Gateway, Slots};

/// Read buffer per client connection: none. Pingora's default (64 KiB) is
/// held for as long as a connection lives, idle keep-alive ones and open
/// streams included, and is zeroed when made, so it is resident from the
/// start: 10,000 idle clients cost ~850 MB with it; 8 KiB cost 6.2 KB more
/// per idle connection than none (benches/RESULTS.md). Unbuffered, a
/// request head is read straight into Pingora's head buffer and a body
/// into its body buffer, with the same number of reads for the small
/// requests model servers get; TLS reads its records into rustls's own
/// buffer (no difference in CPU per request was measured without it).
const CLIENT_READ_BUFFER: usize = 0;

/// The most listening sockets a graceful upgrade hands over
/// (`pingora-core` `server/transfer_fd`: `MAX_FDS`).
pub const MAX_UPGRADE_SOCKETS: usize = 32;

/// The most bytes of socket keys a graceful upgrade hands over, separators
/// included (`transfer_fd`: the 2,048-byte buffer; longer is cut short).
pub const MAX_UPGRADE_KEY_BYTES: usize = 2048;

/// The proxy services' threads, one entry per service: as many services as
/// `threads`, one thread each, unless the listening sockets of that many
/// (one per `listen` address per service, plus the admin listener) would
/// not fit a graceful upgrade; then fewer services share the threads.
pub fn layout(threads: usize, listen: &[SocketAddr], admin: Option<SocketAddr>) -> Vec<usize> {
    let threads = threads.max(1);
    let fits = |services: usize| {
        let admin_key = admin.map_or(0, |a| a.to_string().len() + 1);
        let keys: usize = (0..services)
            .flat_map(|i| listen.iter().map(move |a| listener_key(*a, i).len() + 1))
            .sum();
        services * listen.len() + usize::from(admin.is_some()) <= MAX_UPGRADE_SOCKETS
            && keys + admin_key <= MAX_UPGRADE_KEY_BYTES
    };
    let mut services = threads.min(MAX_UPGRADE_SOCKETS);
    while services > 1 && !fits(services) {
        services -= 1;
    }
    (0..services)
        .map(|i| threads / services + usize::from(i < threads % services))
        .collect()
}

/// The key under which service `service` listens on `addr`: the address,
/// its port written with `service` leading zeros. Pingora binds what the
/// key parses to, and hands the socket over in an upgrade under the key.
pub fn listener_key(addr: SocketAddr, service: usize) -> String {
    let text = addr.to_string();
    match text.rsplit_once(':') {
        Some((host, port)) => format!("{host}:{}{port}", "0".repeat(service)),
        None => text,
    }
}

/// Pingora's settings, for the server (`threads` is the default of
/// services that set none) and for each proxy service's `HttpProxy`, which
/// sizes its upstream pool and its shutdown notifier by `threads`: given
/// the service's own thread count, the pools of all services together hold
/// what one pool of the whole process held before.
pub fn server_conf(config: &Config, threads: usize) -> ServerConf {
    ServerConf {
        threads,
        grace_period_seconds: Some(config.shutdown_grace.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: config.upgrade_sock.display().to_string(),
        work_stealing: false,
        upstream_keepalive_pool_size: config.clients.upstream_pool_per_thread,
        ..ServerConf::default()
    }
}

/// Adds the proxy services to `server`: `threads` holds each service's
/// thread count (see [`layout`]). Each serves a clone of `gateway` behind
/// the TLS handshake (TLS listeners), the connection cap and client
/// timeouts, with its own `HttpProxy`.
pub fn add_proxy_services(
    server: &mut Server,
    config: &Config,
    threads: &[usize],
    gateway: &Gateway,
    tls: &TlsListeners,
    live: &SharedLive,
    metrics: &Arc<Metrics>,
) {
    let slots = Arc::new(Slots::new(metrics.client_connections.clone()));
    let acceptors = tls.acceptors();
    let mut options = TcpSocketOptions::default();
    options.so_reuseport = Some(true);
    for (i, &n) in threads.iter().enumerate() {
        let conf = Arc::new(server_conf(config, n));
        let mut proxy = pingora::proxy::http_proxy(&conf, gateway.clone());
        // HTTP/2 connections are Pingora's to keep alive: they get the idle
        // timeout in force at start.
        let mut http = HttpServerOptions::default();
        http.h2_idle_timeout = Some(config.clients.idle_timeout);
        proxy.server_options = Some(http);
        let app = ClientApp::new(
            proxy,
            Arc::clone(live),
            Arc::clone(metrics),
            Arc::clone(&slots),
        );
        let app = TlsFront::new(app, acceptors.clone());
        let mut service = ListeningService::new(format!("ai-gateway-{i}"), app);
        service.threads = Some(n);
        for l in &config.listeners {
            let listener = ListenerConfig::tcp(listener_key(l.addr, i))
                .tcp_socket_options(options.clone())
                .l4_buffer(L4BufferSettings::default().read(CLIENT_READ_BUFFER));
            service.add_listener(listener);
        }
        server.add_service(service);
    }
    for l in &config.listeners {
        match l.kind {
            ListenKind::Redirect => info!("listening on {} (redirecting to https)", l.url()),
            ListenKind::Tls(_) => info!(
                "listening on {} (HTTP/2 and HTTP/1.1; sessions resume by ticket or by ID, cache of {} sessions)",
                l.url(),
                crate::tls::SESSION_CACHE_SIZE
            ),
            ListenKind::Plain => info!("listening on {}", l.url()),
        }
    }
    let each = match threads {
        [n] => format!("one proxy service of {n} thread(s)"),
        _ if threads.iter().all(|&n| n == 1) => {
            format!("{} proxy services of one thread each", threads.len())
        }
        _ => format!("{} proxy services of {threads:?} threads", threads.len()),
    };
    info!("{each}, one listening socket per service and address (SO_REUSEPORT)");
}

/// Whether this process holds a listening socket on one of `listen` that
/// was bound without `SO_REUSEPORT`: after `bootstrap()` on an upgrade,
/// that is a socket inherited from a gateway older than the per-core
/// layout, beside which no other socket on the address can be bound.
pub fn inherited_without_reuseport(listen: &[SocketAddr]) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return false;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<RawFd>().ok())
        .any(|fd| {
            socket_option(fd, libc::SO_ACCEPTCONN) == Some(1)
                && local_addr(fd).is_some_and(|a| listen.contains(&a))
                && socket_option(fd, libc::SO_REUSEPORT) == Some(0)
        })
}

/// An integer `SOL_SOCKET` option of `fd`; `None` if it is not a socket.
fn socket_option(fd: RawFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`; on a
    // descriptor that is not a socket it fails and writes nothing.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// The local address of a socket descriptor, which stays open.
fn local_addr(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: the listener only borrows `fd` to ask for its address;
    // ManuallyDrop keeps it from closing the descriptor.
    let borrowed = ManuallyDrop::new(unsafe { TcpListener::from_raw_fd(fd) });
    borrowed.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pingora_pools_what_the_open_file_limit_leaves_room_for() {
        let text = "listen: \"127.0.0.1:1\"\nkeys_file: k.json\nroutes:\n  - {name: a, path_prefix: /a/, service: a, upstreams: [\"127.0.0.1:2\"]}\n";
        let config = Config::parse(std::path::Path::new("/t/g.yaml"), text).unwrap();
        let conf = server_conf(&config, 1);
        assert_eq!(
            conf.upstream_keepalive_pool_size,
            config.clients.upstream_pool_per_thread
        );
        assert!(conf.upstream_keepalive_pool_size >= 128);
    }

    #[test]
    fn one_service_per_thread() {
        let listen = [addr("127.0.0.1:8080")];
        assert_eq!(layout(1, &listen, None), vec![1]);
        assert_eq!(layout(2, &listen, None), vec![1, 1]);
        assert_eq!(layout(8, &listen, Some(addr("127.0.0.1:9090"))), vec![1; 8]);
    }

    #[test]
    fn services_share_threads_past_what_an_upgrade_can_hand_over() {
        let listen = [addr("127.0.0.1:8080"), addr("[::1]:8080")];
        let admin = Some(addr("127.0.0.1:9090"));
        let threads = layout(64, &listen, admin);
        assert_eq!(threads.iter().sum::<usize>(), 64);
        assert!(
            threads.len() * listen.len() < MAX_UPGRADE_SOCKETS,
            "{threads:?}"
        );
        assert_eq!(threads.len(), 15, "{threads:?}");
        assert!(threads.iter().all(|&n| n == 4 || n == 5), "{threads:?}");
        // The keys fit the transfer buffer even for long IPv6 addresses.
        let long = [addr("[fd12:3456:789a:bcde:f012:3456:789a:bcde]:65535")];
        let threads = layout(32, &long, None);
        let bytes: usize = (0..threads.len())
            .map(|i| listener_key(long[0], i).len() + 1)
            .sum();
        assert!(bytes <= MAX_UPGRADE_KEY_BYTES, "{bytes} {threads:?}");
        assert_eq!(threads.iter().sum::<usize>(), 32);
    }

    #[test]
    fn keys_differ_and_parse_to_the_address() {
        for a in [
            "127.0.0.1:8080",
            "0.0.0.0:80",
            "[::1]:8443",
            "[fe80::1%2]:8080",
        ] {
            let a = addr(a);
            assert_eq!(listener_key(a, 0), a.to_string());
            let keys: Vec<String> = (0..4).map(|i| listener_key(a, i)).collect();
            for (i, k) in keys.iter().enumerate() {
                assert_eq!(k.parse::<SocketAddr>().unwrap(), a, "{k}");
                assert!(!keys[..i].contains(k), "{k} twice");
                assert!(!k.contains(char::is_whitespace));
            }
        }
    }

    #[test]
    fn finds_a_listener_without_reuseport() {
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = plain.local_addr().unwrap();
        assert!(inherited_without_reuseport(&[a]));
        drop(plain);
        assert!(!inherited_without_reuseport(&[a]));
    }

    #[test]
    fn a_listener_with_reuseport_is_not_reported() {
        // SAFETY: plain socket calls on a descriptor this test owns.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEPORT,
                (&raw const one).cast(),
                len,
            )
        };
        assert_eq!(rc, 0);
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let sl = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(unsafe { libc::bind(fd, (&raw const sa).cast(), sl) }, 0);
        assert_eq!(unsafe { libc::listen(fd, 8) }, 0);
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        let a = listener.local_addr().unwrap();
        assert!(!inherited_without_reuseport(&[a]));
    }
}
