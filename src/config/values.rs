//! Setting values that are more than a number or a string: a request rate
//! (`60/min`), a size (`10MB`), an address or range (`10.0.0.0/8`), a
//! timeout (`5s`), a count of at least one. Each checks itself while it is
//! deserialized, so its error carries the line and column, in the config
//! and in the key file alike.

use std::fmt;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{Unexpected, Visitor};
use serde::{Deserialize, Deserializer};

/// Deserializes a string and checks it with `parse`, whose error becomes
/// the parser's (at the value's line and column): how every value of this
/// module, and the addresses, read themselves.
pub(super) fn parsed<'de, D: Deserializer<'de>, T>(
    d: D,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    let s = String::deserialize(d)?;
    parse(&s).map_err(serde::de::Error::custom)
}

/// A duration such as `5s`, `300ms` or `2m`, as every timeout of the
/// config is written; zero is refused (it would fail every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Duration);

impl Timeout {
    pub fn parse(s: &str) -> Result<Timeout, String> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("invalid duration {s:?} ({e}); write it like 5s, 300ms or 2m"))?;
        if d.is_zero() {
            return Err("a timeout of zero is not allowed".into());
        }
        Ok(Timeout(d))
    }
}

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, Timeout::parse)
    }
}

/// A whole number of at least 1 (`threads`, `max_concurrent`,
/// `max_connections`), written as a plain number and held as `T`
/// (`NonZeroU32`, `NonZeroUsize`, ...). Zero is refused with a reason
/// (for these settings it would let nothing through), and anything else
/// that is not such a number in serde's words, quoting what was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Positive<T>(pub T);

impl<'de, T: TryFrom<NonZeroU64>> Deserialize<'de> for Positive<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T: TryFrom<NonZeroU64>> Visitor<'_> for V<T> {
            type Value = Positive<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number of at least 1")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Positive<T>, E> {
                let Some(nz) = NonZeroU64::new(n) else {
                    return Err(E::custom(
                        "must be at least 1 (leave the setting out for its default)",
                    ));
                };
                T::try_from(nz)
                    .map(Positive)
                    .map_err(|_| E::custom(format!("{n} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Positive<T>, E> {
                match u64::try_from(n) {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(E::invalid_type(Unexpected::Signed(n), &self)),
                }
            }
        }
        // `any`: a string or a fraction reaches the visitor, which names
        // it, instead of the parser's bare "invalid u64".
        d.deserialize_any(V(PhantomData))
    }
}

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
        let period = period_of(unit).ok_or_else(bad)?;
        Ok(Rate { count, period })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, period_name(self.period))
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, Rate::parse)
    }
}

/// A token budget: `count` tokens (prompt and completion together) per
/// `period`, written like a rate with an optional `k` (thousand) or `M`
/// (million) suffix: `200k/day`, `1.5M/day`, `5000/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenRate {
    pub count: std::num::NonZeroU64,
    pub period: Duration,
}

/// The largest token budget per period: counters hold 32 bits.
pub const MAX_TOKEN_BUDGET: u64 = 4_000_000_000;

impl TokenRate {
    pub fn parse(s: &str) -> Result<TokenRate, String> {
        let bad =
            || format!("invalid token limit {s:?}; write it like 200k/day, 1.5M/day or 5000/h");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count = parse_count(n.trim()).ok_or_else(bad)?;
        if count > MAX_TOKEN_BUDGET {
            return Err(format!(
                "token limit {s:?} is over the largest budget, 4000M per period"
            ));
        }
        let count = std::num::NonZeroU64::new(count).ok_or_else(|| {
            format!("a token limit of {s:?} lets nothing through; leave the limit out instead")
        })?;
        let period = period_of(unit).ok_or_else(bad)?;
        Ok(TokenRate { count, period })
    }
}

impl fmt::Display for TokenRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.count.get();
        if n.is_multiple_of(1_000_000) {
            write!(f, "{}M", n / 1_000_000)?;
        } else if n.is_multiple_of(1_000) {
            write!(f, "{}k", n / 1_000)?;
        } else {
            write!(f, "{n}")?;
        }
        write!(f, "/{}", period_name(self.period))
    }
}

impl<'de> Deserialize<'de> for TokenRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, TokenRate::parse)
    }
}

/// `123`, `200k`, `1.5M`: a count with an optional k (10^3) or M (10^6)
/// suffix; a fraction only with a suffix, and only as fine as one token.
fn parse_count(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (s.get(..s.len() - 1)?, 1_000u64),
        b'M' => (s.get(..s.len() - 1)?, 1_000_000u64),
        _ => (s, 1u64),
    };
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) if mult > 1 => (i, f),
        Some(_) => return None,
        None => (digits, ""),
    };
    let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    let whole = int.parse::<u64>().ok()?.checked_mul(mult)?;
    let mut part = 0u64;
    let mut scale = mult;
    for b in frac.bytes() {
        scale /= 10;
        if scale == 0 {
            return None;
        }
        part += u64::from(b - b'0') * scale;
    }
    whole.checked_add(part)
}

/// The period of `s`, `min`, `h`, `day` (and their long forms).
fn period_of(unit: &str) -> Option<Duration> {
    let secs = match unit.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "second" => 1,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3_600,
        "d" | "day" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

fn period_name(period: Duration) -> &'static str {
    match period.as_secs() {
        1 => "s",
        60 => "min",
        3_600 => "h",
        _ => "day",
    }
}

/// A model name or a pattern of them: `llama3.2`, `qwen*` (`*` stands for
/// any run of characters). Matching ignores ASCII case and a `:latest`
/// tag on either side, as Ollama does (`llama3.2` and `llama3.2:latest`
/// are one model).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelPattern {
    /// As written.
    text: String,
    /// Lower case, without a trailing `:latest`: what is matched.
    folded: Box<[u8]>,
}

/// The longest model name or pattern accepted.
pub const MAX_MODEL_NAME: usize = 256;

impl ModelPattern {
    pub fn parse(s: &str) -> Result<ModelPattern, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err("a model name must not be empty".into());
        }
        if t.len() > MAX_MODEL_NAME {
            return Err(format!(
                "model name {:?}... is longer than {MAX_MODEL_NAME} bytes",
                t.chars().take(32).collect::<String>()
            ));
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "model name {t:?} must not contain spaces or control characters"
            ));
        }
        Ok(ModelPattern {
            text: t.to_string(),
            folded: fold_model(t).into(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this names one model (no `*`).
    pub fn is_exact(&self) -> bool {
        !self.text.contains('*')
    }

    /// The form of `model` that matching compares (lower case, without
    /// `:latest`): two names with the same form are one model.
    pub fn folded(model: &str) -> String {
        String::from_utf8_lossy(&fold_model(model)).into_owned()
    }

    /// Whether `model` (as a request or an answer names it) matches.
    pub fn matches(&self, model: &str) -> bool {
        glob_match(&self.folded, &fold_model(model))
    }
}

impl fmt::Display for ModelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ModelPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, ModelPattern::parse)
    }
}

/// Whether `model` matches one of `patterns`.
pub fn any_model_matches(patterns: &[ModelPattern], model: &str) -> bool {
    patterns.iter().any(|p| p.matches(model))
}

/// A model name as it is compared: ASCII lower case, without a trailing
/// `:latest` (Ollama's default tag).
fn fold_model(name: &str) -> Vec<u8> {
    let name = name.trim();
    let lower = name.to_ascii_lowercase();
    let base = lower.strip_suffix(":latest").unwrap_or(&lower);
    base.as_bytes().to_vec()
}

/// Whether `text` matches `pattern`, where `*` matches any run of bytes
/// (none included). Linear in practice: one backtrack point at a time.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    // Where the last `*` was, and where in `text` its match would resume.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(c) if Some(c) == text.get(t) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|b| *b == b'*'))
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
        parsed(d, IpRange::parse)
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
    fn token_rates() {
        let t = TokenRate::parse("200k/day").unwrap();
        assert_eq!(t.count.get(), 200_000);
        assert_eq!(t.period, Duration::from_secs(86_400));
        assert_eq!(TokenRate::parse("1.5M/h").unwrap().count.get(), 1_500_000);
        assert_eq!(TokenRate::parse("2.25k/min").unwrap().count.get(), 2_250);
        assert_eq!(TokenRate::parse(" 5000 / s ").unwrap().count.get(), 5_000);
        assert_eq!(
            TokenRate::parse("200k/day").unwrap().to_string(),
            "200k/day"
        );
        assert_eq!(
            TokenRate::parse("1.5M/day").unwrap().to_string(),
            "1500k/day"
        );
        assert_eq!(TokenRate::parse("1234/h").unwrap().to_string(), "1234/h");
        assert_eq!(
            TokenRate::parse("4000M/day").unwrap().count.get(),
            MAX_TOKEN_BUDGET
        );
        for bad in [
            "0/day",
            "0k/day",
            "k/day",
            "1.5/day",
            "1.0000005M/day",
            "5G/day",
            "5M",
            "5M/week",
            "-1k/day",
            "4001M/day",
            "99999999999999999999/day",
            "1.x k/day",
        ] {
            assert!(TokenRate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn model_patterns() {
        let p = |s: &str| ModelPattern::parse(s).unwrap();
        assert!(p("llama3.2").matches("llama3.2"));
        assert!(p("llama3.2").matches("llama3.2:latest"));
        assert!(p("llama3.2:latest").matches("llama3.2"));
        assert!(p("llama3.2").matches("Llama3.2"));
        assert!(!p("llama3.2").matches("llama3.2:1b"));
        assert!(!p("llama3.2").matches("llama3.21"));
        assert!(p("qwen*").matches("qwen2.5:7b"));
        assert!(p("qwen*").matches("qwen"));
        assert!(!p("qwen*").matches("xqwen"));
        assert!(p("*").matches("anything:at-all"));
        assert!(p("*-instruct").matches("mistral-7b-instruct"));
        assert!(!p("*-instruct").matches("mistral-7b-instruct-v2"));
        assert!(p("a*b*c").matches("aXXbYYc"));
        assert!(!p("a*b*c").matches("aXXbYY"));
        assert!(p("**").matches(""));
        assert!(p("llama3.2").is_exact() && !p("qwen*").is_exact());
        assert_eq!(p(" llama3.2 ").as_str(), "llama3.2");
        for bad in ["", " ", "a b", "a\tb"] {
            assert!(ModelPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ModelPattern::parse(&"x".repeat(MAX_MODEL_NAME + 1)).is_err());
    }

    #[test]
    fn timeouts() {
        assert_eq!(Timeout::parse(" 3s ").unwrap().0, Duration::from_secs(3));
        assert_eq!(Timeout::parse("4000ms").unwrap().0, Duration::from_secs(4));
        let e = Timeout::parse("0ms").unwrap_err();
        assert_eq!(e, "a timeout of zero is not allowed");
        assert!(Timeout::parse("5")
            .unwrap_err()
            .contains("time unit needed"));
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
