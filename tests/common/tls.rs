//! TLS for the tests: a certificate authority made with rcgen, leaf
//! certificates it signs (with chosen serials and dates), and clients that
//! trust it: a rustls connection that reports the certificate served, a
//! ureq agent, and curl.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// A test CA: its certificate (PEM) and the means to sign leaves.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A leaf certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate, DER (what a client sees served).
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signed CA");
        let pem = issuer.pem();
        TestCa { issuer, pem }
    }

    /// A leaf for `names` (DNS names or IP addresses) with `serial`,
    /// valid from a day ago for `days` days (negative: already expired).
    pub fn leaf(&self, names: &[&str], serial: u64, days: i64) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.serial_number = Some(SerialNumber::from(serial));
        let now = time::OffsetDateTime::now_utc();
        if days >= 0 {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(days);
        } else {
            params.not_before = now - time::Duration::days(30);
            params.not_after = now + time::Duration::days(days);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

impl Leaf {
    /// Writes the chain and key (atomically: a temporary file renamed over
    /// each), as a certificate tool would.
    pub fn write(&self, cert: &Path, key: &Path) {
        atomic_write(key, &self.key_pem);
        atomic_write(cert, &self.cert_pem);
    }
}

fn atomic_write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over target");
}

/// A rustls client config trusting the PEM CA certificates in `roots`,
/// offering `alpn`.
pub fn client_config(roots: &[&str], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for pem in roots {
        for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            store.add(der.expect("root PEM")).expect("add root");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `addr` for `name`.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects and completes the handshake (verifying the certificate
/// against `roots` for `name`).
pub fn tls_connect(
    addr: SocketAddr,
    name: &str,
    roots: &[&str],
    alpn: &[&[u8]],
) -> io::Result<TlsStream> {
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let conn = rustls::ClientConnection::new(client_config(roots, alpn), server_name)
        .map_err(io::Error::other)?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// The leaf certificate (DER) the connection was served.
pub fn peer_leaf(tls: &TlsStream) -> Vec<u8> {
    tls.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .expect("the server presented a certificate")
}

/// The leaf a new connection to `addr` gets, or the handshake error.
pub fn served_leaf(addr: SocketAddr, name: &str, roots: &[&str]) -> io::Result<Vec<u8>> {
    tls_connect(addr, name, roots, &[b"http/1.1"]).map(|t| peer_leaf(&t))
}

/// The serial number (hex) of a DER certificate.
pub fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("served certificate parses");
    cert.raw_serial_as_string().replace(':', "")
}

/// Sends a raw HTTP/1.1 `request` over a fresh TLS connection and returns
/// the status code and the body (the request must ask for `Connection:
/// close`).
pub fn https_raw(addr: SocketAddr, name: &str, roots: &[&str], request: &str) -> (u16, String) {
    let mut tls = tls_connect(addr, name, roots, &[b"http/1.1"]).expect("TLS handshake");
    tls.write_all(request.as_bytes()).expect("send request");
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A ureq agent that trusts `root_pem` only (and otherwise behaves like
/// [`super::agent`]).
pub fn https_agent(root_pem: &str) -> ureq::Agent {
    let root = ureq::tls::Certificate::from_pem(root_pem.as_bytes())
        .expect("root PEM")
        .to_owned();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![root])))
                .build(),
        )
        .build()
        .into()
}

/// curl, or a failure telling how to install it.
pub fn curl() -> std::process::Command {
    let found = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "curl is needed for this test (HTTP/2 client): apt-get install curl"
    );
    std::process::Command::new("curl")
}

/// Reads lines from `reader` with the instant each arrived (as
/// [`super::read_lines_timed`], for any reader).
pub fn lines_timed(reader: impl Read) -> Vec<(String, std::time::Instant)> {
    let mut r = BufReader::new(reader);
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return out,
            Ok(_) => {
                let l = line.trim_end().to_string();
                if !l.is_empty() {
                    out.push((l, std::time::Instant::now()));
                }
            }
        }
    }
}

/// An HTTPS upstream: answers every request with 200 and a JSON body
/// naming the path and that it came over TLS (one request per
/// connection).
pub struct TlsUpstream {
    pub addr: SocketAddr,
    hits: Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsUpstream {
    /// Serves with `leaf` (chain: the leaf alone).
    pub fn start(leaf: &Leaf) -> TlsUpstream {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                .map(|c| c.expect("leaf PEM"))
                .collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
            .expect("key PEM");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .expect("server cert"),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind TLS upstream");
        let addr = listener.local_addr().expect("local addr");
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let config = Arc::clone(&config);
                let counted = Arc::clone(&counted);
                std::thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                    let Ok(conn) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut reader = BufReader::new(&mut tls);
                    let Ok(Some(head)) = super::read_request_head(&mut reader) else {
                        return;
                    };
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = format!(r#"{{"tls":true,"path":"{}"}}"#, head.target);
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(resp.as_bytes());
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        TlsUpstream { addr, hits }
    }

    /// Requests answered.
    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}
