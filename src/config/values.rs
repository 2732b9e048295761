//! Setting values that are more than a number or a string: a request rate
//! (`60/min`), a size (`10MB`), an address or range (`10.0.0.0/8`). Each
//! checks itself while it is deserialized, so its error carries the line
//! and column, in the config and in the key file alike.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// A request rate: `count` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub period: Duration,
}

impl Rate {
    /// Parses `N/s`, `N/min`, `N/h` or `N/day` (also `sec`, `second`,
    /// `m`, `minute`, `hour`, `d`).
    pub fn parse(s: &str) -> Result<Rate, String> {
        let bad = || format!("invalid rate {s:?}; write it like 60/min, 5/s, 1000/h or 10000/day");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let count = NonZeroU32::new(count).ok_or_else(|| {
            format!("a rate of {s:?} lets nothing through; leave the limit out instead")
        })?;
        let secs = match unit.trim().to_ascii_lowercase().as_str() {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3_600,
            "d" | "day" => 86_400,
            _ => return Err(bad()),
        };
        Ok(Rate {
            count,
            period: Duration::from_secs(secs),
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "min",
            3_600 => "h",
            _ => "day",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Rate::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A size in bytes: a number, or one with a unit (`B`, `KB`, `MB`, `GB` in
/// powers of 1000; `KiB`, `MiB`, `GiB` in powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(split);
        let bad = || format!("invalid size {s:?}; write it like 10MB, 512KiB or 1048576");
        let n: u64 = n.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// An address (`127.0.0.1`, `::1`) or a range (`10.0.0.0/8`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange(pub IpNet);

impl IpRange {
    pub fn parse(s: &str) -> Result<IpRange, String> {
        let t = s.trim();
        if let Ok(net) = t.parse::<IpNet>() {
            return Ok(IpRange(net.trunc()));
        }
        t.parse::<IpAddr>()
            .map(|a| IpRange(IpNet::from(a)))
            .map_err(|_| {
                format!("{s:?} is not an address or range; write it like 192.168.1.10, 10.0.0.0/8 or ::1")
            })
    }

    #[inline]
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.0.contains(ip)
    }
}

impl<'de> Deserialize<'de> for IpRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        IpRange::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Whether `ip` is in any of `ranges`. IPv4-mapped IPv6 addresses
/// (`::ffff:10.0.0.1`, as a dual-stack socket reports IPv4 peers) match
/// IPv4 ranges.
pub fn any_contains(ranges: &[IpRange], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    ranges.iter().any(|r| r.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let r = Rate::parse("60/min").unwrap();
        assert_eq!((r.count.get(), r.period), (60, Duration::from_secs(60)));
        assert_eq!(
            Rate::parse(" 5 / s ").unwrap().period,
            Duration::from_secs(1)
        );
        assert_eq!(Rate::parse("200/day").unwrap().to_string(), "200/day");
        for bad in ["five", "5", "5/fortnight", "0/s", "-1/s", "/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("10MB").unwrap().0, 10_000_000);
        assert_eq!(ByteSize::parse("512KiB").unwrap().0, 524_288);
        assert_eq!(ByteSize::parse("100").unwrap().0, 100);
        assert_eq!(ByteSize::parse("100 B").unwrap().0, 100);
        for bad in ["10XB", "MB", "-1MB", "1.5MB", "99999999999999999999GB"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges() {
        let r = IpRange::parse("10.1.2.3/8").unwrap();
        assert!(r.contains(&"10.200.0.1".parse().unwrap()));
        assert!(!r.contains(&"11.0.0.1".parse().unwrap()));
        let one = IpRange::parse("::1").unwrap();
        assert!(one.contains(&"::1".parse().unwrap()));
        assert!(IpRange::parse("300.1.1.1").is_err());
        let v4 = [IpRange::parse("127.0.0.1").unwrap()];
        assert!(any_contains(&v4, "::ffff:127.0.0.1".parse().unwrap()));
    }
}
