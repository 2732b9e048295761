//! The gateway's admin listener: `/metrics` (Prometheus text) read by
//! series, and `/readyz`.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::raw_http::read_response;
use super::util::agent;

/// The Prometheus text the admin listener at `admin` serves; empty when it
/// does not answer (not started yet, or gone).
pub fn metrics_text(admin: SocketAddr) -> String {
    agent()
        .get(format!("http://{admin}/metrics"))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default()
}

/// The value of the sample `series` (its name and labels exactly as
/// exposed, e.g. `agw_client_timeouts_total{kind="body"}`) in `text`;
/// `None` when absent.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// [`sample`] read from `admin` now; 0 when absent.
pub fn metric_at(admin: SocketAddr, series: &str) -> f64 {
    sample(&metrics_text(admin), series).unwrap_or(0.0)
}

/// The admin listener on loopback port `port`.
pub fn local_admin(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// ---------------------------------------------------------------------------
// 5. Health and readiness
// ---------------------------------------------------------------------------

/// The status `/readyz` answers, or `None` if the admin listener does not
/// answer at all.
pub fn readyz_status(admin: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .ok()?;
    read_response(&mut BufReader::new(s)).ok().map(|r| r.status)
}
