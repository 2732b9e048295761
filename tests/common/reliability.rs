//! The gateway and raw client of the `reliability*` tests: one key, routes
//! on two worker threads, and reading a raw connection to its end (EOF, a
//! reset, or a hang) to tell how an exchange ended.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::config::{GatewayConfig, Key, KeyFile, Route};
use super::gateway::Gateway;

pub const KEY: &str = "reliability-key-0001";

/// The one key of the reliability tests, for `chat`.
pub fn keys() -> KeyFile {
    KeyFile::of([Key::new(KEY, "rel").service("chat")])
}

/// Two worker threads and the given routes; tests add settings.
pub fn config(routes: impl IntoIterator<Item = Route>) -> GatewayConfig {
    GatewayConfig::new().threads(2).routes(routes)
}

/// A gateway with the given routes (2 worker threads).
pub fn gateway(routes: impl IntoIterator<Item = Route>) -> Gateway {
    Gateway::start(&config(routes), keys())
}

/// GET `path` with the key; the status and the body (empty on a read error).
pub fn get(agent: &ureq::Agent, gw: &Gateway, path: &str) -> (u16, String) {
    let mut resp = agent
        .get(gw.url(path))
        .header("X-API-Key", KEY)
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

/// How a raw exchange ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The peer closed the connection (clean EOF).
    Eof,
    /// The peer reset the connection.
    Reset,
    /// Nothing more arrived before the read timeout: a hang.
    TimedOut,
}

/// Everything a raw client read off one connection, and how it ended.
#[derive(Debug)]
pub struct Exchange {
    pub bytes: Vec<u8>,
    pub end: End,
    pub elapsed: Duration,
}

impl Exchange {
    /// The status of the first response, if a status line arrived.
    pub fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.bytes);
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Reads `stream` until EOF, reset or `timeout` without data.
pub fn read_all(mut stream: TcpStream, timeout: Duration) -> Exchange {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(timeout))
        .expect("set read timeout");
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break End::TimedOut
            }
            Err(_) => break End::Reset,
        }
    };
    Exchange {
        bytes,
        end,
        elapsed: start.elapsed(),
    }
}

/// Sends `request` on a new connection (write errors are ignored: the
/// gateway may answer and close before it has read everything) and reads
/// until the gateway closes the connection, or 5 s pass without data.
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Exchange {
    let mut s = TcpStream::connect(addr).expect("connect to the gateway");
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("set write timeout");
    let _ = s.write_all(request);
    let ex = read_all(s, Duration::from_secs(5));
    eprintln!(
        "{:?}...: {:?}, {:?} after {:?}",
        String::from_utf8_lossy(&request[..request.len().min(40)]),
        ex.status(),
        ex.end,
        ex.elapsed
    );
    ex
}
