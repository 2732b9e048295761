//! Addresses as written: `host:port` for listeners and the admin listener,
//! `host:port` or `https://host:port` for upstreams.
//!
//! Only their form is checked here, while parsing, so a typo is reported
//! at its line even on a machine that cannot resolve the name. Names are
//! resolved once, at load, by the compile step (`compile.rs`): the request
//! path never touches DNS.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Deserializer};

use super::values::parsed;

/// `host:port` as written: a host name or an IP address (IPv6 in
/// brackets), and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// As written, for messages.
    written: String,
    /// Without the brackets of an IPv6 address.
    host: String,
    port: u16,
}

impl HostPort {
    /// Parses `host:port` as `std` resolves it: the port after the last
    /// `:`, the host before it (brackets around an IPv6 address removed).
    pub fn parse(s: &str) -> Result<HostPort, String> {
        let bad = || format!("{s:?} is not host:port (such as 127.0.0.1:8080 or localhost:8080)");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty()
            || host
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '/')
        {
            return Err(bad());
        }
        Ok(HostPort {
            written: s.to_string(),
            host: host.to_string(),
            port,
        })
    }

    /// `127.0.0.1:port`, written as `written` (`9090`, `:9090`).
    pub fn loopback(written: &str, port: u16) -> HostPort {
        HostPort {
            written: written.to_string(),
            host: "127.0.0.1".to_string(),
            port,
        }
    }

    /// The host, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address, when the host is an IP address (no lookup).
    pub fn literal(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl fmt::Display for HostPort {
    /// As written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.written)
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, HostPort::parse)
    }
}

/// An upstream as written: `host:port` (plain HTTP) or `https://host:port`
/// (TLS, the host name checked against the certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddr {
    /// As written, for messages.
    pub written: String,
    pub addr: HostPort,
    /// For `https://`: the host name (lower case, brackets of an IPv6
    /// address removed), sent as SNI.
    pub tls_name: Option<String>,
}

impl UpstreamAddr {
    pub fn parse(s: &str) -> Result<UpstreamAddr, String> {
        let (host_port, tls) = match s.split_once("://") {
            None => (s, false),
            Some(("https", rest)) => (rest.strip_suffix('/').unwrap_or(rest), true),
            Some(_) => {
                return Err(format!(
                    "upstream {s:?} must be host:port (plain HTTP) or https://host:port (TLS)"
                ))
            }
        };
        let addr = HostPort::parse(host_port)
            .ok()
            .filter(|a| a.port != 0)
            .ok_or_else(|| {
                format!(
                    "upstream {s:?} must be host:port with a non-zero port (https://host:port for TLS)"
                )
            })?;
        let tls_name = tls.then(|| addr.host.to_ascii_lowercase());
        Ok(UpstreamAddr {
            written: s.to_string(),
            addr,
            tls_name,
        })
    }
}

impl<'de> Deserialize<'de> for UpstreamAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, UpstreamAddr::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        let a = HostPort::parse("127.0.0.1:8080").unwrap();
        assert_eq!(a.literal(), Some("127.0.0.1:8080".parse().unwrap()));
        let a = HostPort::parse("[::1]:5003").unwrap();
        assert_eq!((a.host(), a.to_string().as_str()), ("::1", "[::1]:5003"));
        assert_eq!(a.literal(), Some("[::1]:5003".parse().unwrap()));
        let a = HostPort::parse("localhost:0").unwrap();
        assert_eq!((a.host(), a.port(), a.literal()), ("localhost", 0, None));
        for bad in [
            "127.0.0.1",
            ":80",
            "h:port",
            "h:70000",
            "a b:1",
            "x/y:1",
            "",
        ] {
            assert!(HostPort::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upstream_forms() {
        let u = UpstreamAddr::parse("https://LocalHost:11434/").unwrap();
        assert_eq!(u.tls_name.as_deref(), Some("localhost"));
        assert_eq!(u.addr.to_string(), "LocalHost:11434");
        let u = UpstreamAddr::parse("https://[::1]:8443").unwrap();
        assert_eq!(u.tls_name.as_deref(), Some("::1"));
        assert!(UpstreamAddr::parse("127.0.0.1:1")
            .unwrap()
            .tls_name
            .is_none());
        let e = UpstreamAddr::parse("http://h:1").unwrap_err();
        assert!(e.contains("https://host:port (TLS)"), "{e}");
        for bad in ["127.0.0.1", "127.0.0.1:0", ":5002"] {
            let e = UpstreamAddr::parse(bad).unwrap_err();
            assert!(e.contains("non-zero port") && e.contains(bad), "{e}");
        }
    }
}
