//! Reading the gateway's `/metrics` (Prometheus text) from its admin
//! listener.

use std::net::SocketAddr;

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
