//! Upstream health: which upstreams of a route are in rotation.
//!
//! Passive: a failed connect takes an upstream out of rotation — for
//! [`PASSIVE_COOLDOWN`] when the route has no active check, or until the
//! active check next passes when it has one. Active (optional, per route):
//! a background thread sends `GET <path>` to each upstream every `interval`;
//! any HTTP answer below 500 counts as up.
//!
//! Health lives in the snapshot's routes, so a reload starts every
//! upstream as up again; the checker always works on the current snapshot.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use log::{info, warn};

use crate::config::HealthCheckSpec;
use crate::keys::unix_millis;
use crate::snapshot::SharedSnapshot;

/// How long a passively failed upstream stays out of rotation when its
/// route has no active check; after that it gets requests again.
pub const PASSIVE_COOLDOWN: Duration = Duration::from_secs(10);
/// How often the checker looks for checks that are due.
const TICK: Duration = Duration::from_millis(100);

/// One upstream's health, shared by every request of its snapshot.
#[derive(Debug, Default)]
pub struct UpstreamHealth {
    /// Out of rotation until this time (Unix ms); 0 = in rotation.
    down_until_ms: AtomicI64,
    /// When the active check is next due (Unix ms).
    next_check_ms: AtomicI64,
}

/// What changed, for logging and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentDown,
    CameUp,
    Unchanged,
}

impl UpstreamHealth {
    #[inline]
    pub fn is_up(&self, now_ms: i64) -> bool {
        now_ms >= self.down_until_ms.load(Ordering::Relaxed)
    }

    /// A connect failed: out of rotation until the cooldown ends, or (with
    /// an active check) until a check passes.
    pub fn connect_failed(&self, now_ms: i64, actively_checked: bool) -> Transition {
        let until = if actively_checked {
            i64::MAX
        } else {
            now_ms.saturating_add(PASSIVE_COOLDOWN.as_millis() as i64)
        };
        let was_up = self.is_up(now_ms);
        self.down_until_ms.store(until, Ordering::Relaxed);
        if was_up {
            Transition::WentDown
        } else {
            Transition::Unchanged
        }
    }

    /// A connect succeeded. Reads before writing so the common case (it
    /// was up) does not bounce the cache line between serving threads.
    #[inline]
    pub fn connected(&self) -> Transition {
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
            Transition::CameUp
        } else {
            Transition::Unchanged
        }
    }

    /// The result of an active check.
    fn checked(&self, ok: bool, now_ms: i64) -> Transition {
        if ok {
            self.connected()
        } else {
            let was_up = self.is_up(now_ms);
            self.down_until_ms.store(i64::MAX, Ordering::Relaxed);
            if was_up {
                Transition::WentDown
            } else {
                Transition::Unchanged
            }
        }
    }
}

/// Sends one health check; `Ok` with the status, or why it failed.
pub fn probe(addr: SocketAddr, spec: &HealthCheckSpec) -> Result<u16, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, spec.timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(spec.timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(spec.timeout))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ai-gateway-health-check\r\nConnection: close\r\n\r\n",
        spec.path
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let n = s
            .read(buf.get_mut(got..).unwrap_or_default())
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = buf.get(..got).unwrap_or_default();
    let status = head
        .strip_prefix(b"HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| std::str::from_utf8(code).ok())
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| "not an HTTP response".to_string())?;
    Ok(status)
}

/// Runs the active checks of the current snapshot forever (on its own thread).
pub fn run_checker(shared: SharedSnapshot) {
    loop {
        std::thread::sleep(TICK);
        let snapshot = shared.load_full();
        for route in snapshot.router.routes() {
            let Some(spec) = route.health_check() else {
                continue;
            };
            for up in route.upstreams() {
                let now = unix_millis(SystemTime::now());
                if now < up.health.next_check_ms.load(Ordering::Relaxed) {
                    continue;
                }
                up.health.next_check_ms.store(
                    now.saturating_add(spec.interval.as_millis() as i64),
                    Ordering::Relaxed,
                );
                let result = probe(up.addr, spec);
                let ok = matches!(result, Ok(status) if status < 500);
                match up.health.checked(ok, now) {
                    Transition::WentDown => {
                        let why = match result {
                            Ok(s) => format!("status {s}"),
                            Err(e) => e,
                        };
                        warn!(
                            "upstream {} of route {:?} is down ({why}): out of rotation",
                            up.addr, route.name
                        );
                    }
                    Transition::CameUp => {
                        info!(
                            "upstream {} of route {:?} is up again: back in rotation",
                            up.addr, route.name
                        );
                    }
                    Transition::Unchanged => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passive_failure_without_active_check_lasts_the_cooldown() {
        let h = UpstreamHealth::default();
        assert!(h.is_up(1000));
        assert_eq!(h.connect_failed(1000, false), Transition::WentDown);
        assert!(!h.is_up(1000 + 9_999));
        assert!(h.is_up(1000 + PASSIVE_COOLDOWN.as_millis() as i64));
        assert_eq!(h.connect_failed(2000, false), Transition::Unchanged);
        assert_eq!(h.connected(), Transition::CameUp);
        assert!(h.is_up(2000));
        assert_eq!(h.connected(), Transition::Unchanged);
    }

    #[test]
    fn with_an_active_check_it_stays_down_until_a_check_passes() {
        let h = UpstreamHealth::default();
        h.connect_failed(1000, true);
        assert!(!h.is_up(i64::MAX - 1));
        assert_eq!(h.checked(false, 5000), Transition::Unchanged);
        assert_eq!(h.checked(true, 6000), Transition::CameUp);
        assert!(h.is_up(6000));
        assert_eq!(h.checked(false, 7000), Transition::WentDown);
    }

    #[test]
    fn probe_reads_the_status_and_fails_on_a_closed_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ =
                    s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
            }
        });
        let spec = HealthCheckSpec {
            path: "/".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
        };
        assert_eq!(probe(addr, &spec), Ok(503));
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(probe(closed, &spec).unwrap_err().starts_with("connect"));
    }
}
