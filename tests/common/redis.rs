//! A real `redis-server` on a loopback port for one test, with a tiny RESP
//! client to look inside it.
//!
//! Debian's `redis-server` package ships the binary. A test that cannot
//! find it fails, saying how to install it (the cluster tests are never
//! skipped).

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::util::free_port;

/// How long [`RedisServer::start`] and [`RedisServer::restart`] wait for
/// `PING` to be answered.
const REDIS_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where `redis-server` is, or a failure saying how to install it.
fn find_redis_server() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("redis-server"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/bin/redis-server")])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "redis-server not found: the cluster tests (tests/cluster.rs) run a real Redis. \
                 Install it with `apt-get install redis-server` (Debian/Ubuntu), or put the \
                 redis-server binary on PATH"
            )
        })
}

/// A running `redis-server` on `127.0.0.1:<port>`, without persistence,
/// in its own temp dir; killed on drop.
pub struct RedisServer {
    port: u16,
    bin: PathBuf,
    dir: TempDir,
    child: Option<Child>,
    /// More arguments for every start (a password, a TLS port).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port and waits until it
    /// answers `PING` with `+PONG`. Retries on a fresh port if the chosen
    /// one was taken in the meantime.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// [`RedisServer::start`] with more arguments, such as
    /// `["--requirepass", "pw"]` or a `--tls-port` with its certificate
    /// files (the plain port stays, for the readiness probe and
    /// [`RedisServer::command`]).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let bin = find_redis_server();
        let dir = tempfile::Builder::new()
            .prefix("ai-gateway-redis-")
            .tempdir()
            .expect("create temp dir for redis-server");
        let mut server = RedisServer {
            port: 0,
            bin,
            dir,
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        for attempt in 1.. {
            server.port = free_port();
            match server.run() {
                Ok(()) => return server,
                Err(msg) => {
                    let in_use = msg.to_ascii_lowercase().contains("in use");
                    if !(in_use && attempt < 3) {
                        panic!("{msg}");
                    }
                }
            }
        }
        unreachable!()
    }

    /// Spawns the server on `self.port` and waits for `+PONG`.
    fn run(&mut self) -> Result<(), String> {
        self.kill();
        let log = fs::File::create(self.log_path()).expect("create redis.log");
        let port = self.port.to_string();
        let child = Command::new(&self.bin)
            .args(["--port", &port])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--protected-mode", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                log.try_clone().expect("clone the redis.log handle"),
            ))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + REDIS_READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait on redis-server"))
            {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited before answering PING ({status}); log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if self.ping() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = self.log();
                self.kill();
                return Err(format!(
                    "redis-server not answering PING on 127.0.0.1:{} after {REDIS_READY_TIMEOUT:?}; log:\n{log}",
                    self.port
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether `PING` on a new connection is answered `+PONG` right now.
    fn ping(&self) -> bool {
        // A server with a password answers NOAUTH: it is up all the same.
        self.try_command(&["PING"])
            .is_ok_and(|reply| reply == "+PONG\r\n" || reply.starts_with("-NOAUTH"))
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The port it listens on (the same after [`RedisServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Whether the process is running (started and not stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL, as a crash or a lost host would) and
    /// waits for it to exit; every connection to it is broken off.
    pub fn stop(&mut self) {
        self.kill();
        // Nothing may answer on the port any more.
        assert!(
            TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_err(),
            "something still accepts connections on 127.0.0.1:{} after redis-server was killed",
            self.port
        );
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port: an empty Redis (nothing
    /// is persisted), as after a crash. Waits until it answers `PING`.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(msg) = self.run() {
            panic!("restarting redis-server on the same port: {msg}");
        }
    }

    /// Sends one command (RESP-encoded by hand) on a new connection and
    /// returns the raw reply, e.g. `"+PONG\r\n"` or
    /// `"*1\r\n$3\r\nfoo\r\n"`. Panics if the server does not answer.
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args)
            .unwrap_or_else(|e| panic!("redis {args:?} on 127.0.0.1:{}: {e}", self.port))
    }

    fn try_command(&self, args: &[&str]) -> io::Result<String> {
        let mut s = TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&encode_command(args))?;
        let mut reader = BufReader::new(s);
        let mut raw = Vec::new();
        read_reply(&mut reader, &mut raw)?;
        String::from_utf8(raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// The names of every key in the current database (`KEYS *`).
    pub fn keys(&self) -> Vec<String> {
        let reply = self.command(&["KEYS", "*"]);
        assert!(
            reply.starts_with('*'),
            "KEYS * answered {reply:?}, not an array"
        );
        // `*N`, then `$len` and the key's bytes for each key.
        reply
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.starts_with('$') && !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The server's output so far.
    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- redis-server log (port {}) ----\n{}\n---- end of log ----",
                self.port,
                self.log()
            );
        }
        self.kill();
    }
}

/// A command as a RESP array of bulk strings.
fn encode_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one complete RESP (2) reply, appending its raw bytes to `raw`.
fn read_reply(r: &mut impl BufRead, raw: &mut Vec<u8>) -> io::Result<()> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a reply",
        ));
    }
    raw.extend_from_slice(&line);
    let text = String::from_utf8_lossy(&line);
    let text = text.trim_end_matches(['\r', '\n']);
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad reply line {text:?}"),
        )
    };
    let (kind, rest) = text.split_at(text.chars().next().map_or(0, char::len_utf8));
    match kind {
        "+" | "-" | ":" => Ok(()),
        "$" => {
            let len: i64 = rest.parse().map_err(|_| bad())?;
            if len < 0 {
                return Ok(());
            }
            let mut data = vec![0u8; usize::try_from(len).map_err(|_| bad())? + 2];
            r.read_exact(&mut data)?;
            raw.extend_from_slice(&data);
            Ok(())
        }
        "*" => {
            let n: i64 = rest.parse().map_err(|_| bad())?;
            for _ in 0..n.max(0) {
                read_reply(r, raw)?;
            }
            Ok(())
        }
        _ => Err(bad()),
    }
}
