//! The servers under test, each started fresh for a run so its idle
//! memory is the baseline of that run: nginx (`proxy_buffering off`, the
//! key checked by a `map`) and the gateway (`api` on, usage counted, an
//! audit log), both in front of the same paced upstream.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The one key every stream carries.
pub const KEY: &str = "agw_bench_streams_000000000000000000";

/// A started server; stopped (killed) when dropped.
pub struct Peer {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Peer {
    /// The process to measure (nginx: its master; its workers are found
    /// as children).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The upstream itself, for the direct runs: nothing to measure.
    pub fn direct(addr: SocketAddr) -> Peer {
        Peer {
            name: "upstream direct",
            addr,
            child: None,
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn free_addr() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The gateway for `n` streams: `max_connections` set to let them all in
/// (the default, derived from the open-file limit, keeps room for a large
/// upstream pool and would refuse some of the largest run).
pub fn start_gateway(bin: &Path, dir: &Path, upstream: SocketAddr, n: u32) -> Result<Peer, String> {
    let addr = free_addr().map_err(|e| e.to_string())?;
    let keys = dir.join("keys.json");
    let digest = sha256_hex(KEY);
    write(
        &keys,
        &format!("{{\"sha256:{digest}\": {{\"user\": \"bench\", \"service\": \"ai\"}}}}\n"),
    )?;
    // The gateway warns about a key file others can read.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600));
    let config = dir.join("gateway.yaml");
    let mut text = String::new();
    let _ = write!(
        text,
        "listen: \"{addr}\"\nkeys_file: {keys}\nthreads: 2\nwatch: false\nshutdown_grace: 1s\nmax_connections: {max}\n\
         audit_log: {audit}\nupgrade_sock: {sock}\nroutes:\n\
         \x20 - {{name: ollama, path_prefix: /ollama/, service: ai, strip_prefix: true, api: ollama, upstreams: [\"{upstream}\"]}}\n\
         \x20 - {{name: openai, path_prefix: /v1/, service: ai, api: openai, include_usage: true, upstreams: [\"{upstream}\"]}}\n",
        keys = keys.display(),
        max = n + 100,
        audit = dir.join("audit.log").display(),
        sock = dir.join("upgrade.sock").display(),
    );
    write(&config, &text)?;
    let log = std::fs::File::create(dir.join("gateway.log")).map_err(|e| e.to_string())?;
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    ready(Peer {
        name: "ai-gateway",
        addr,
        child: Some(child),
    })
}

pub fn start_nginx(bin: &Path, dir: &Path, upstream: SocketAddr) -> Result<Peer, String> {
    let addr = free_addr().map_err(|e| e.to_string())?;
    let d = dir.display();
    let config = format!(
        "worker_processes 2;\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         daemon off;\nevents {{ worker_connections 20000; }}\nhttp {{\n\
         client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
         access_log {d}/access.log;\n\
         map $http_x_api_key $allowed {{ default 0; \"{KEY}\" 1; }}\n\
         upstream backend {{ server {upstream}; keepalive 1024; }}\n\
         server {{\n  listen {addr} backlog=16384;\n  location / {{\n\
         \x20   if ($allowed = 0) {{ return 401 '{{\"error\":\"invalid api key\"}}'; }}\n\
         \x20   proxy_pass http://backend;\n    proxy_http_version 1.1;\n\
         \x20   proxy_set_header Connection \"\";\n    proxy_set_header X-API-Key \"\";\n\
         \x20   proxy_buffering off;\n    proxy_read_timeout 300s;\n  }}\n}}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    write(&path, &config)?;
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    ready(Peer {
        name: "nginx",
        addr,
        child: Some(child),
    })
}

/// Waits (probing, up to 30 s) until the server accepts connections.
fn ready(mut peer: Peer) -> Result<Peer, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(peer.addr).is_ok() {
            return Ok(peer);
        }
        if let Some(Ok(Some(status))) = peer.child.as_mut().map(Child::try_wait) {
            return Err(format!("{} exited: {status}", peer.name));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "{} did not listen on {} within 30 s",
        peer.name, peer.addr
    ))
}

fn write(path: &PathBuf, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
