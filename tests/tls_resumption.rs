//! TLS session resumption against the real binary, with Python's `ssl`
//! (OpenSSL, as curl, scripts and most clients) as the client: a second
//! connection presenting the first's session resumes it, in TLS 1.3
//! (tickets), TLS 1.2 with tickets, and TLS 1.2 by session ID (the client
//! refuses tickets, so the server's session cache is what resumes it).
//!
//! The gateway runs `threads: 2`: two proxy services, each with its own
//! listening socket, and the kernel spreads connections over them by a
//! hash of their addresses. Each test resumes [`RESUMES`] connections
//! with the first connection's session; they all land on the service
//! that made the session with a chance of 1 in 2^RESUMES, so the ticket
//! key and the session cache are shown to be shared by the services.

// `pub` so rustc does not report harness items this crate leaves unused.
pub mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::tls::*;
use common::*;

const KEY: &str = "tls-resume-key-0001";
fn keys() -> KeyFile {
    KeyFile::of([Key::new(KEY, "ann")
        .service("chat")
        .created_at("2025-06-01T18:58:30.356Z")])
}

/// Connections that present the first connection's session.
const RESUMES: usize = 12;

/// The client: connects `1 + 1 + n` times to the TLS listener, each time
/// sending one request and reading the whole answer (in TLS 1.3 the
/// tickets come after the handshake: reading the answer takes them in
/// before `.session` is read). The first connection makes a session, the
/// second is a fresh full handshake (no session), the next `n` present
/// the first's session. Prints one JSON object.
const CLIENT: &str = r#"
import json, socket, ssl, sys
port, cafile, mode, n, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(cafile)
version = ssl.TLSVersion.TLSv1_3 if mode == "1.3" else ssl.TLSVersion.TLSv1_2
ctx.minimum_version = version
ctx.maximum_version = version
if mode == "1.2-ids":
    ctx.options |= ssl.OP_NO_TICKET
request = ("GET /chat/hello HTTP/1.1\r\nHost: localhost\r\nX-API-Key: %s\r\nConnection: close\r\n\r\n" % key).encode()

def connect(session=None):
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    s = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    s.sendall(request)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ssl.SSLError, OSError):
            break
        if not chunk:
            break
        data += chunk
    sess = s.session
    out = {
        "reused": s.session_reused,
        "version": s.version(),
        "status": data.split(b"\r\n", 1)[0].decode("latin-1"),
        "ticket": sess is not None and sess.has_ticket,
        "session_id": sess.id.hex() if sess is not None else "",
    }
    s.close()
    return out, sess

first, session = connect()
fresh, _ = connect()
resumed = [connect(session)[0] for _ in range(n)]
print(json.dumps({"first": first, "fresh": fresh, "resumed": resumed}))
"#;

/// A gateway with a plain listener (for the harness's readiness probe)
/// and a TLS listener, two proxy services, a route to an echo upstream.
struct Setup {
    _gw: Gateway,
    _echo: EchoServer,
    tls: SocketAddr,
    _certs: tempfile::TempDir,
    ca_file: std::path::PathBuf,
}

fn start() -> Setup {
    let ca = TestCa::new("resumption test CA");
    let leaf = ca.leaf(&["localhost"], 1, 30);
    let certs = tempfile::tempdir().expect("cert dir");
    let cert = certs.path().join("cert.pem");
    let key = certs.path().join("key.pem");
    let ca_file = certs.path().join("ca.pem");
    leaf.write(&cert, &key);
    std::fs::write(&ca_file, &ca.pem).expect("write CA");
    let echo = EchoServer::start();
    let plain = free_port();
    let tls_port = free_port();
    let config = GatewayConfig::new()
        .listen(loopback(plain))
        .listen_tls(loopback(tls_port), &cert, &key)
        .threads(2)
        .route(Route::chat(echo.addr));
    let gw = Gateway::start(&config, keys());
    Setup {
        _gw: gw,
        _echo: echo,
        tls: SocketAddr::from(([127, 0, 0, 1], tls_port)),
        _certs: certs,
        ca_file,
    }
}

/// Runs [`CLIENT`] in `mode` (`1.3`, `1.2`, `1.2-ids`) and returns its
/// report.
fn run_client(s: &Setup, mode: &str) -> serde_json::Value {
    let out = Command::new("python3")
        .arg("-c")
        .arg(CLIENT)
        .arg(s.tls.port().to_string())
        .arg(&s.ca_file)
        .arg(mode)
        .arg(RESUMES.to_string())
        .arg(KEY)
        .output()
        .expect("python3 is needed for this test (its ssl module is the TLS client)");
    assert!(
        out.status.success(),
        "the client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the client's report is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Every connection was served (200 from the echo upstream) in `version`;
/// the first and the fresh one were full handshakes; every one that
/// presented the first's session resumed it.
fn assert_resumed(report: &serde_json::Value, version: &str) {
    let all = std::iter::once(&report["first"])
        .chain(std::iter::once(&report["fresh"]))
        .chain(report["resumed"].as_array().expect("resumed list"));
    for c in all {
        assert_eq!(c["version"], version, "{report:#}");
        assert_eq!(c["status"], "HTTP/1.1 200 OK", "{report:#}");
    }
    assert_eq!(report["first"]["reused"], false, "{report:#}");
    assert_eq!(
        report["fresh"]["reused"], false,
        "a connection without a session resumed: {report:#}"
    );
    let resumed = report["resumed"].as_array().expect("resumed list");
    assert_eq!(resumed.len(), RESUMES);
    let missed = resumed.iter().filter(|c| c["reused"] != true).count();
    assert_eq!(
        missed, 0,
        "{missed} of {RESUMES} connections presenting the session did a full handshake: {report:#}"
    );
}

#[test]
fn tls13_sessions_resume_by_ticket_on_every_service() {
    let s = start();
    let report = run_client(&s, "1.3");
    assert_resumed(&report, "TLSv1.3");
    assert_eq!(report["first"]["ticket"], true, "{report:#}");
}

#[test]
fn tls12_sessions_resume_by_ticket_on_every_service() {
    let s = start();
    let report = run_client(&s, "1.2");
    assert_resumed(&report, "TLSv1.2");
    assert_eq!(
        report["first"]["ticket"], true,
        "no ticket in TLS 1.2: {report:#}"
    );
}

#[test]
fn tls12_sessions_resume_by_session_id_on_every_service() {
    let s = start();
    let report = run_client(&s, "1.2-ids");
    assert_resumed(&report, "TLSv1.2");
    assert_eq!(
        report["first"]["ticket"], false,
        "a ticket although the client refuses them: {report:#}"
    );
    assert_ne!(report["first"]["session_id"], "", "{report:#}");
}
