//! The active health checker: a thread that sends `GET <path>` to each
//! upstream of the routes that ask for it, and records the result in the
//! upstream's health (which lives in `state`, so it survives reloads).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime};

use log::{info, warn};

use crate::config::HealthCheckSpec;
use crate::keys::unix_millis;
use crate::ops::SharedLive;
use crate::state::Transition;

/// How often the checker looks for checks that are due.
const TICK: Duration = Duration::from_millis(100);

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
pub fn run_checker(shared: SharedLive) {
    loop {
        std::thread::sleep(TICK);
        let live = shared.load_full();
        for route in live.snapshot.router.routes() {
            let Some(spec) = route.health_check() else {
                continue;
            };
            for up in route.upstreams() {
                let now = unix_millis(SystemTime::now());
                if !up.state.health.check_due(now, spec.interval) {
                    continue;
                }
                let result = probe(up.addr, spec);
                let ok = matches!(result, Ok(status) if status < 500);
                match up.state.health.checked(ok, now) {
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
