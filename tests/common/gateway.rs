//! Running the real `ai-gateway` binary: config and keys files in a temp
//! dir, a [`Gateway`] process handle (killed on drop) and one-shot CLI runs.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::config::{ConfigText, GatewayConfig, Listen};
use super::util::{free_port, poll, wait_until};

/// The `RUST_LOG` a gateway runs with unless a test asks for another.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// How long [`Gateway::start`] waits for the binary to answer HTTP.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of the gateway binary under test (built by cargo for integration tests).
pub fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ai-gateway")
}

/// A temporary directory holding `gateway.yaml` and `keys.json`, before any
/// process is started; lets tests run the binary in other ways (e.g.
/// `check` subcommands or expected start-up failures).
pub struct GatewayFiles {
    /// The temporary directory (deleted on drop).
    pub dir: TempDir,
    /// `<dir>/gateway.yaml`.
    pub config_path: PathBuf,
    /// `<dir>/keys.json`.
    pub keys_path: PathBuf,
    /// `<dir>/gateway.log`, where the gateway's stderr goes.
    pub log_path: PathBuf,
}

impl GatewayFiles {
    /// Creates a temp dir and writes the complete config (built, or text
    /// for tests of config errors) and the keys file.
    pub fn write(config: impl ConfigText, keys: impl std::fmt::Display) -> GatewayFiles {
        let dir = tempfile::Builder::new()
            .prefix("ai-gateway-test-")
            .tempdir()
            .expect("create temp dir for gateway files");
        let config_path = dir.path().join("gateway.yaml");
        let keys_path = dir.path().join("keys.json");
        let log_path = dir.path().join("gateway.log");
        fs::write(&config_path, config.config_text()).expect("write gateway.yaml");
        fs::write(&keys_path, keys.to_string()).expect("write keys.json");
        GatewayFiles {
            dir,
            config_path,
            keys_path,
            log_path,
        }
    }
}

/// A running `ai-gateway` process with its temp dir; killed on drop.
pub struct Gateway {
    /// Port of the (first) listen address, used by [`Gateway::url`].
    pub port: u16,
    /// Temp dir holding config, keys and log; deleted on drop.
    pub dir: TempDir,
    /// Absolute path of the config file passed with `--config`.
    pub config_path: PathBuf,
    /// Absolute path of the keys file.
    pub keys_path: PathBuf,
    /// File receiving the gateway's stderr (its log).
    pub log_path: PathBuf,
    /// The config it was started with, listeners and admin port filled in
    /// (`None` when started from text).
    config: Option<GatewayConfig>,
    child: Child,
}

impl Gateway {
    /// Starts a gateway with `config` and waits until it answers HTTP.
    ///
    /// Without a `listen` entry the gateway gets a plain listener on a free
    /// loopback port (retried on a fresh one if it was taken meanwhile),
    /// and [`GatewayConfig::with_admin`] gets a free admin port the same
    /// way; otherwise the first plain (or redirect) listener is the one
    /// probed. Panics (with the gateway log) if it does not come up.
    pub fn start(config: &GatewayConfig, keys: impl std::fmt::Display) -> Gateway {
        Gateway::start_with_log_level(config, keys, DEFAULT_LOG_LEVEL)
    }

    /// Like [`Gateway::start`], with `RUST_LOG` set to `log_level` (e.g.
    /// `"debug"`) instead of [`DEFAULT_LOG_LEVEL`].
    pub fn start_with_log_level(
        config: &GatewayConfig,
        keys: impl std::fmt::Display,
        log_level: &str,
    ) -> Gateway {
        let keys = keys.to_string();
        let free_listener = config.listeners().is_empty();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut config = config.clone();
            if free_listener {
                config = config.listen(format!("127.0.0.1:{}", free_port()));
            }
            if config.wants_free_admin_port() {
                config = config.admin_listen(format!("127.0.0.1:{}", free_port()));
            }
            let port = probe_port(&config);
            let files = GatewayFiles::write(&config, &keys);
            let mut gw = Gateway::spawn_with_log_level(files, port, log_level);
            gw.config = Some(config);
            match gw.wait_ready(READY_TIMEOUT) {
                Ok(()) => return gw,
                Err(msg) => {
                    let in_use = gw.log().to_ascii_lowercase().contains("in use");
                    if !(in_use && attempt < 3) {
                        panic!("{msg}");
                    }
                }
            }
        }
    }

    /// Starts a gateway with a complete config that listens on (at least)
    /// `127.0.0.1:<port>` (text for shipped configs), and waits until it
    /// answers HTTP.
    pub fn start_raw(config: impl ConfigText, keys: impl std::fmt::Display, port: u16) -> Gateway {
        let mut gw = Gateway::spawn(GatewayFiles::write(config, keys), port);
        if let Err(msg) = gw.wait_ready(READY_TIMEOUT) {
            panic!("{msg}");
        }
        gw
    }

    /// Spawns `ai-gateway run --config <config_path>` for prepared files
    /// without waiting for readiness (for tests that expect start-up to
    /// fail, or that want to time it). `port` is only used for probing/URLs.
    pub fn spawn(files: GatewayFiles, port: u16) -> Gateway {
        Gateway::spawn_with_log_level(files, port, DEFAULT_LOG_LEVEL)
    }

    /// Like [`Gateway::spawn`], with `RUST_LOG` set to `log_level`.
    pub fn spawn_with_log_level(files: GatewayFiles, port: u16, log_level: &str) -> Gateway {
        let log = fs::File::create(&files.log_path).expect("create gateway.log");
        let child = Command::new(gateway_bin())
            .arg("run")
            .arg("--config")
            .arg(&files.config_path)
            .current_dir(files.dir.path())
            .env("RUST_LOG", log_level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn the ai-gateway binary");
        Gateway {
            port,
            dir: files.dir,
            config_path: files.config_path,
            keys_path: files.keys_path,
            log_path: files.log_path,
            config: None,
            child,
        }
    }

    /// Polls until `GET /__probe__` on the port gets any HTTP response.
    ///
    /// Returns an error message containing the log if the process exits
    /// first or the timeout passes.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on gateway child") {
                return Err(format!(
                    "gateway exited before becoming ready ({status}); log:\n{}",
                    self.log()
                ));
            }
            if probe_http(self.port) {
                // A foreign server could own the port if we lost a race; a
                // gateway failing to bind would exit, so check once more.
                thread::sleep(Duration::from_millis(20));
                if let Some(status) = self.child.try_wait().expect("try_wait on gateway child") {
                    return Err(format!(
                        "gateway exited right after the port answered ({status}); log:\n{}",
                        self.log()
                    ));
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "gateway not answering on 127.0.0.1:{} after {timeout:?}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Socket address of the gateway's (first) listener.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The config the gateway was started with by [`Gateway::start`], with
    /// its listeners and admin port, e.g. to write a changed copy.
    pub fn config(&self) -> &GatewayConfig {
        self.config
            .as_ref()
            .expect("a gateway started by Gateway::start has its config")
    }

    /// The admin listener's address.
    pub fn admin(&self) -> SocketAddr {
        self.config()
            .admin_addr()
            .expect("this gateway has an admin listener on an address")
    }

    /// Process id of the gateway.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name, e.g. `"HUP"`, `"TERM"`, `"INT"` (via `kill`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run the kill command");
        assert!(
            status.success(),
            "kill -{sig} {} failed: {status}",
            self.pid()
        );
    }

    /// The gateway's stderr output so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Atomically replaces the keys file (temp file in the same dir, then
    /// rename), so the gateway never observes a half-written file.
    pub fn write_keys(&self, keys: impl std::fmt::Display) {
        atomic_write(&self.keys_path, &keys.to_string());
    }

    /// Atomically replaces the config file (see [`Gateway::write_keys`]).
    pub fn write_config(&self, config: impl ConfigText) {
        atomic_write(&self.config_path, &config.config_text());
    }

    /// Polls for process exit for up to `timeout`; `None` if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on gateway child") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("try_wait on gateway child")
            .is_none()
    }

    /// Polls the log until it contains `needle`; false after `timeout`.
    pub fn wait_log_contains(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_log_count(needle, 1, timeout)
    }

    /// Polls the log until `needle` occurs at least `count` times (e.g. to
    /// wait for a second reload message); false after `timeout`.
    pub fn wait_log_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().matches(needle).count() >= count)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- ai-gateway log ({}) ----\n{}\n---- end of log ----",
                self.log_path.display(),
                self.log()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port [`Gateway::wait_ready`] probes: the first plain (or redirect)
/// listener's.
fn probe_port(config: &GatewayConfig) -> u16 {
    config
        .listeners()
        .iter()
        .find_map(|l| match l {
            Listen::Plain(a) | Listen::Redirect(a) => a.parse::<SocketAddr>().ok(),
            _ => None,
        })
        .map(|a| a.port())
        .expect("a config for Gateway::start has a plain or redirect listener on an address")
}

fn atomic_write(path: &Path, contents: &str) {
    let dir = path.parent().expect("file path has a parent dir");
    let name = path
        .file_name()
        .expect("file path has a file name")
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, contents).expect("write temp file");
    fs::rename(&tmp, path).expect("rename temp file over target");
}

/// One-shot readiness probe: any HTTP/1.x status line counts as ready.
fn probe_http(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let request = "GET /__probe__ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut got = 0;
    while got < 9 {
        match stream.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    buf[..got].starts_with(b"HTTP/1.")
}

// ---------------------------------------------------------------------------
// 8. Graceful upgrade
// ---------------------------------------------------------------------------

/// A second gateway process started with `run --upgrade` in another
/// gateway's directory; killed on drop.
pub struct Upgraded {
    /// The process.
    pub child: Child,
    /// Where its stderr goes: `gateway-b.log` in the directory.
    pub log_path: PathBuf,
}

impl Upgraded {
    pub fn spawn(config: &Path, dir: &Path) -> Upgraded {
        let log_path = dir.join("gateway-b.log");
        let log = fs::File::create(&log_path).expect("create gateway-b.log");
        let child = Command::new(gateway_bin())
            .args(["run", "--upgrade", "--config"])
            .arg(config)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn ai-gateway run --upgrade");
        Upgraded { child, log_path }
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let what = format!("{needle:?} in the new gateway's log");
        poll(timeout, &what, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("new gateway exited ({status}):\n{}", self.log());
            }
            self.log().contains(needle).then_some(())
        });
    }
}

impl Drop for Upgraded {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("---- new gateway log ----\n{}\n---- end ----", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Output of a one-shot run of the binary (see [`run_cli`]).
#[derive(Debug)]
pub struct CliOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

/// Runs `ai-gateway <args>` in `cwd` to completion (killed after 30 s so a
/// hang fails the test instead of stalling the suite). Output goes through
/// files, so large output cannot deadlock on a full pipe.
pub fn run_cli(args: &[&str], cwd: &Path) -> CliOutput {
    let out_dir = tempfile::tempdir().expect("temp dir for CLI output");
    let out_path = out_dir.path().join("stdout");
    let err_path = out_dir.path().join("stderr");
    let mut child = Command::new(gateway_bin())
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("create stdout file"))
        .stderr(fs::File::create(&err_path).expect("create stderr file"))
        .spawn()
        .expect("spawn the ai-gateway binary");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait on CLI child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ai-gateway {args:?} did not exit within 30 s");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    CliOutput {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}
