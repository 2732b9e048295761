//! Pebble, the ACME (RFC 8555) test server, with its mock DNS
//! (`pebble-challtestsrv`), started on loopback ports for one test.
//!
//! Debian's `pebble` package ships both binaries. A test that cannot find
//! them fails, saying how to install them.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::tls::{https_agent, TestCa};
use super::util::{free_port, wait_until};

/// Where a binary of the `pebble` package is, or a failure saying how to
/// install it.
fn find(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/bin").join(name)])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found: the ACME tests run Pebble, the RFC 8555 test server. \
                 Install it with `apt-get install pebble` (Debian/Ubuntu; it ships pebble and \
                 pebble-challtestsrv), or put both binaries on PATH"
            )
        })
}

/// A running Pebble and its DNS server; both killed on drop.
pub struct Pebble {
    /// The ACME directory URL.
    pub directory: String,
    /// The PEM file of the CA that signed Pebble's own HTTPS certificate:
    /// the gateway's `tls.acme.ca`.
    pub ca_file: PathBuf,
    /// Pebble's TLS CA, PEM (to fetch its roots).
    tls_ca: String,
    management: SocketAddr,
    acme: SocketAddr,
    pebble: Option<Child>,
    dns: Child,
    dir: tempfile::TempDir,
    config: PathBuf,
    dns_addr: SocketAddr,
    bin: PathBuf,
}

impl Pebble {
    /// Starts Pebble validating HTTP-01 challenges on `http_port` (the
    /// gateway's plain listener), issuing certificates valid for
    /// `validity` seconds, and resolving every name to 127.0.0.1.
    pub fn start(http_port: u16, validity: u64) -> Pebble {
        let pebble_bin = find("pebble");
        let dns_bin = find("pebble-challtestsrv");
        let dir = tempfile::tempdir().expect("pebble dir");
        let tls_ca = TestCa::new("pebble TLS test CA");
        let leaf = tls_ca.leaf(&["localhost", "127.0.0.1"], 1, 30);
        let cert = dir.path().join("pebble-cert.pem");
        let key = dir.path().join("pebble-key.pem");
        leaf.write(&cert, &key);
        let ca_file = dir.path().join("pebble-tls-ca.pem");
        std::fs::write(&ca_file, &tls_ca.pem).expect("write CA");
        let acme = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let management = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let dns_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let dns_mgmt = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.path().join("pebble-config.json");
        let json = serde_json::json!({
            "pebble": {
                "listenAddress": acme.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": cert,
                "privateKey": key,
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity,
            }
        });
        std::fs::write(&config, json.to_string()).expect("write pebble config");
        let log =
            |name: &str| std::fs::File::create(dir.path().join(name)).expect("create pebble log");
        let dns = Command::new(dns_bin)
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &dns_addr.to_string()])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &dns_mgmt.to_string()])
            .stdin(Stdio::null())
            .stdout(log("dns.log"))
            .stderr(log("dns.err"))
            .spawn()
            .expect("start pebble-challtestsrv");
        let mut p = Pebble {
            directory: format!("https://{acme}/dir"),
            ca_file,
            tls_ca: tls_ca.pem,
            management,
            acme,
            pebble: None,
            dns,
            dir,
            config,
            dns_addr,
            bin: pebble_bin,
        };
        p.run();
        p
    }

    fn run(&mut self) {
        let child = Command::new(&self.bin)
            .arg("-config")
            .arg(&self.config)
            .args(["-dnsserver", &self.dns_addr.to_string()])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(
                std::fs::File::create(self.dir.path().join("pebble.log"))
                    .expect("create pebble log"),
            )
            .stderr(Stdio::null())
            .spawn()
            .expect("start pebble");
        self.pebble = Some(child);
        let up = wait_until(Duration::from_secs(20), || {
            TcpStream::connect_timeout(&self.acme, Duration::from_millis(200)).is_ok()
                && TcpStream::connect_timeout(&self.management, Duration::from_millis(200)).is_ok()
        });
        assert!(up, "pebble did not start; log:\n{}", self.log());
    }

    /// Pebble's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// The root certificate Pebble issues under (PEM), from its
    /// management interface.
    pub fn root(&self) -> String {
        let url = format!("https://{}/roots/0", self.management);
        let mut resp = https_agent(&self.tls_ca)
            .get(&url)
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(resp.status(), 200, "GET {url}");
        resp.body_mut().read_to_string().expect("root PEM")
    }

    /// Pauses Pebble (SIGSTOP): it holds its state, answers nothing.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Resumes a paused Pebble.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.pebble.as_ref().expect("pebble running").id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} pebble");
    }

    /// Stops Pebble for good (its DNS server keeps running).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.pebble.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts Pebble again on the same ports: a new instance, with new
    /// roots and no memory of accounts or orders.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        if let Some(c) = self.pebble.as_mut() {
            // A paused process must be resumed to die of SIGKILL cleanly.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(c.id().to_string())
                .status();
        }
        self.stop();
        let _ = self.dns.kill();
        let _ = self.dns.wait();
    }
}
