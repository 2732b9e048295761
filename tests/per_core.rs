//! The per-core layout, against the real binary: with `threads: N` the
//! gateway runs N proxy services of one thread each, each with its own
//! listening socket on the address (`SO_REUSEPORT`); requests on many
//! connections all succeed; `max_connections` counts the connections of
//! every service; and a graceful upgrade hands each service's socket to the
//! new process one to one (and one fewer service leaves no socket behind).
//!
//! Sockets are found in `/proc`: the LISTEN entries for the port in
//! `/proc/<pid>/net/tcp*`, matched by inode against the process's `fd/`.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;

const KEY: &str = "per-core-key-0001";
fn keys() -> KeyFile {
    KeyFile::of([Key::new(KEY, "pc").service("chat")])
}

/// `threads` services, `/chat/` to `upstream`.
fn config(threads: usize, upstream: SocketAddr) -> GatewayConfig {
    GatewayConfig::new()
        .threads(threads)
        .route(Route::chat(upstream))
}

/// The inodes of the listening TCP sockets on `port` that process `pid`
/// holds open.
fn listening_sockets(pid: u32, port: u16) -> BTreeSet<u64> {
    let mut listening = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f.get(3) == Some(&"0A") {
                listening.extend(f.get(9).and_then(|i| i.parse::<u64>().ok()));
            }
        }
    }
    let mut held = BTreeSet::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).expect("read the process's fds") {
        let Ok(target) = fs::read_link(entry.expect("fd entry").path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let inode = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(inode) = inode.filter(|i| listening.contains(i)) {
            held.insert(inode);
        }
    }
    held
}

/// The process's threads: (name, user + system CPU ticks).
fn threads_of(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task")).expect("read the process's tasks") {
        let dir = entry.expect("task entry").path();
        let (Ok(name), Ok(stat)) = (
            fs::read_to_string(dir.join("comm")),
            fs::read_to_string(dir.join("stat")),
        ) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.push((name.trim().to_string(), ticks(11) + ticks(12)));
    }
    out
}

/// CPU ticks of the thread named `name` (exactly one must exist).
fn service_thread_ticks(pid: u32, name: &str) -> u64 {
    let named: Vec<u64> = threads_of(pid)
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, t)| t)
        .collect();
    assert_eq!(
        named.len(),
        1,
        "threads named {name}: {:?}",
        threads_of(pid)
    );
    named[0]
}

fn request(path: &str) -> String {
    format!("GET /chat/{path} HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY}\r\n\r\n")
}

/// A keep-alive client connection.
struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let w = TcpStream::connect(addr).expect("connect to the gateway");
        w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        Conn { w, r }
    }

    /// Sends one request; its status, or 0 if the connection was refused
    /// or closed.
    fn status(&mut self, path: &str) -> u16 {
        if self.w.write_all(request(path).as_bytes()).is_err() {
            return 0;
        }
        read_response(&mut self.r).map_or(0, |r| r.status)
    }
}

#[test]
fn threads_2_runs_two_one_thread_services_with_a_socket_each() {
    let echo = EchoServer::start();
    let gw = Gateway::start(&config(2, echo.addr), keys());
    let pid = gw.pid();
    let sockets = listening_sockets(pid, gw.port);
    assert_eq!(
        sockets.len(),
        2,
        "listening sockets on the port: {sockets:?}"
    );
    let before = [
        service_thread_ticks(pid, "ai-gateway-0"),
        service_thread_ticks(pid, "ai-gateway-1"),
    ];

    // 64 connections at once, 8 requests each: every one succeeds.
    let addr = gw.addr();
    let handles: Vec<_> = (0..64)
        .map(|c| {
            thread::spawn(move || {
                let mut conn = Conn::open(addr);
                (0..8)
                    .map(|i| conn.status(&format!("c{c}/r{i}")))
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    for (c, h) in handles.into_iter().enumerate() {
        let statuses = h.join().expect("client thread");
        assert!(
            statuses.iter().all(|&s| s == 200),
            "connection {c}: {statuses:?}"
        );
    }
    assert_eq!(echo.hits(), 64 * 8);

    // Both services took their share (the kernel spreads connections over
    // the sockets by a hash of the addresses; 64 all on one is ~2^-63).
    let after = [
        service_thread_ticks(pid, "ai-gateway-0"),
        service_thread_ticks(pid, "ai-gateway-1"),
    ];
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "CPU ticks of the service threads: before {before:?}, after {after:?}"
    );
    assert!(
        gw.log().contains("2 proxy services of one thread each"),
        "{}",
        gw.log()
    );
}

#[test]
fn threads_1_has_one_socket() {
    let echo = EchoServer::start();
    let gw = Gateway::start(&config(1, echo.addr), keys());
    assert_eq!(listening_sockets(gw.pid(), gw.port).len(), 1);
    assert_eq!(Conn::open(gw.addr()).status("one"), 200);
}

#[test]
fn max_connections_counts_the_connections_of_every_service() {
    let echo = EchoServer::start();
    let gw = Gateway::start(&config(2, echo.addr).max_connections(3), keys());
    assert_eq!(listening_sockets(gw.pid(), gw.port).len(), 2);
    // Readiness probes may still be closing.
    thread::sleep(Duration::from_millis(300));
    let mut open: Vec<Conn> = (0..3).map(|_| Conn::open(gw.addr())).collect();
    for (i, c) in open.iter_mut().enumerate() {
        assert_eq!(c.status(&format!("held/{i}")), 200);
    }
    // Were the cap counted per service, some of these would land on a
    // service with room left (each of 10 goes to either socket).
    for i in 0..10 {
        let mut c = Conn::open(gw.addr());
        assert_eq!(
            c.status(&format!("over/{i}")),
            503,
            "connection {i} over the cap"
        );
    }
    for (i, c) in open.iter_mut().enumerate() {
        assert_eq!(c.status(&format!("again/{i}")), 200, "held connection {i}");
    }
}

/// Upgrades a 2-service gateway to one with `threads_b` threads; returns
/// the old process's sockets and the new one's, once the old has exited.
fn upgrade_to(threads_b: usize) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let echo = EchoServer::start();
    let mut a = Gateway::start(&config(2, echo.addr).upgrade_sock("up.sock"), keys());
    let old = listening_sockets(a.pid(), a.port);
    assert_eq!(old.len(), 2, "{old:?}");

    let config_b = a.dir.path().join("gateway-b.yaml");
    fs::write(&config_b, a.config().clone().threads(threads_b).render()).unwrap();
    let mut b = Upgraded::spawn(&config_b, a.dir.path());
    let b_log = a.dir.path().join("gateway-b.log");
    let b_says = |needle: &str| {
        fs::read_to_string(&b_log)
            .unwrap_or_default()
            .contains(needle)
    };
    assert!(
        wait_until(Duration::from_secs(10), || a
            .dir
            .path()
            .join("up.sock")
            .exists()),
        "the new gateway never listened on up.sock"
    );
    a.signal("QUIT");
    assert!(
        wait_until(Duration::from_secs(10), || b_says(
            "Starting service: ai-gateway-0"
        )),
        "the new gateway did not start:\n{}",
        fs::read_to_string(&b_log).unwrap_or_default()
    );
    let status = a
        .wait_exit(Duration::from_secs(20))
        .expect("the old gateway exits");
    assert!(status.success(), "old gateway: {status}\n{}", a.log());

    assert!(
        b.child.try_wait().unwrap().is_none(),
        "the new gateway died"
    );
    for i in 0..20 {
        assert_eq!(
            Conn::open(a.addr()).status(&format!("after/{i}")),
            200,
            "request {i}"
        );
    }
    let new = listening_sockets(b.child.id(), a.port);
    let log = fs::read_to_string(&b_log).unwrap_or_default();
    assert!(
        !log.contains("in use"),
        "the new gateway bound anew:\n{log}"
    );
    (old, new)
}

#[test]
fn an_upgrade_hands_each_service_its_own_socket() {
    let (old, new) = upgrade_to(2);
    assert_eq!(
        new, old,
        "the new process holds the old sockets, one per service"
    );
}

#[test]
fn an_upgrade_to_fewer_services_closes_the_socket_left_over() {
    let (old, new) = upgrade_to(1);
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(new.is_subset(&old), "old {old:?}, new {new:?}");
}
