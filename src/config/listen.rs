//! `listen`: where the gateway accepts clients, and how.
//!
//! An entry is a plain `host:port` (plain HTTP), or an object:
//!
//! ```yaml
//! listen:
//!   - "127.0.0.1:8080"                                   # plain HTTP
//!   - {address: "0.0.0.0:80", redirect_https: true}      # 308 to https (ACME challenges answered)
//!   - {address: "0.0.0.0:443", tls: {cert: cert.pem, key: key.pem}}
//!   - {address: "0.0.0.0:8443", tls: {acme: {domains: [ai.example.com], email: me@example.com,
//!        directory: "https://acme-v02.api.letsencrypt.org/directory", cache: acme}}}
//! ```
//!
//! Only the shape is checked here; the addresses are resolved by the
//! compile step, and the certificate files and the ACME cache are read by
//! the `tls` layer, when listeners are set up and on every reload.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::{Location as Span, Spanned};

use super::address::HostPort;
use super::error::{LoadError, Location};
use super::yaml::location;

/// One listener, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub addr: SocketAddr,
    pub kind: ListenKind,
}

/// What a listener speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenKind {
    /// Plain HTTP, the gateway's routes.
    Plain,
    /// Plain HTTP answering every request with a `308` to https (the ACME
    /// HTTP-01 challenge path excepted).
    Redirect,
    /// TLS (1.2 and 1.3), HTTP/2 or HTTP/1.1 by ALPN, the gateway's routes.
    Tls(TlsSource),
}

/// Where a TLS listener's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// PEM files: the chain (leaf first) and its private key. Re-read on
    /// every reload.
    Files { cert: PathBuf, key: PathBuf },
    /// Obtained and renewed from an ACME server.
    Acme(AcmeSpec),
}

/// `tls: {acme: {...}}`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSpec {
    /// The names the certificate is for (its subject alternative names).
    pub domains: Vec<String>,
    /// The account's contact address, if any.
    pub email: Option<String>,
    /// The ACME directory URL (https).
    pub directory: String,
    /// The folder that keeps the account key and the certificates.
    pub cache: PathBuf,
    /// A PEM CA certificate to trust for the directory (a test or private
    /// ACME server); the system's roots otherwise.
    pub ca: Option<PathBuf>,
}

impl ListenSpec {
    pub fn is_tls(&self) -> bool {
        matches!(self.kind, ListenKind::Tls(_))
    }

    /// `https://addr` or `http://addr`, for logs.
    pub fn url(&self) -> String {
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Whether `other` needs no new socket or listener setup: the same
    /// address and kind (certificate paths may differ: they are re-read on
    /// reload; ACME settings may not).
    pub fn same_setup(&self, other: &ListenSpec) -> bool {
        self.addr == other.addr
            && match (&self.kind, &other.kind) {
                (ListenKind::Plain, ListenKind::Plain)
                | (ListenKind::Redirect, ListenKind::Redirect) => true,
                (
                    ListenKind::Tls(TlsSource::Files { .. }),
                    ListenKind::Tls(TlsSource::Files { .. }),
                ) => true,
                (ListenKind::Tls(TlsSource::Acme(a)), ListenKind::Tls(TlsSource::Acme(b))) => {
                    a == b
                }
                _ => false,
            }
    }
}

/// A `listen` entry as written: a string or an object.
#[derive(Debug)]
pub(super) enum FileListen {
    Plain(HostPort),
    Full(FileListener),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListener {
    address: HostPort,
    #[serde(default)]
    tls: Option<FileTls>,
    #[serde(default)]
    redirect_https: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
    #[serde(default)]
    acme: Option<FileAcme>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAcme {
    domains: Vec<DomainName>,
    #[serde(default)]
    email: Option<String>,
    directory: DirectoryUrl,
    cache: PathBuf,
    #[serde(default)]
    ca: Option<PathBuf>,
}

impl<'de> Deserialize<'de> for FileListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FileListen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("host:port, or {address: host:port, tls: {...}, redirect_https: bool}")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FileListen, E> {
                HostPort::parse(s).map(FileListen::Plain).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FileListen, A::Error> {
                FileListener::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(FileListen::Full)
            }
        }
        d.deserialize_any(V)
    }
}

/// `listen` as written: one entry or a list of them, each with its
/// position when it is one of a list (a single entry has the position of
/// `listen`'s value).
#[derive(Debug)]
pub(super) struct FileListenList(Vec<Spanned<FileListen>>);

/// A value without a position of its own.
fn unplaced<T>(value: T) -> Spanned<T> {
    Spanned::new(value, Span::UNKNOWN, Span::UNKNOWN)
}

impl<'de> Deserialize<'de> for FileListenList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FileListenList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address (host:port), a listener object, or a list of them")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FileListenList, E> {
                let entry = HostPort::parse(s).map_err(E::custom)?;
                Ok(FileListenList(vec![unplaced(FileListen::Plain(entry))]))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FileListenList, A::Error> {
                FileListener::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|l| FileListenList(vec![unplaced(FileListen::Full(l))]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<FileListenList, A::Error> {
                let mut v = Vec::new();
                while let Some(l) = seq.next_element::<Spanned<FileListen>>()? {
                    v.push(l);
                }
                Ok(FileListenList(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A listener, checked: its address as written (resolved by the compile
/// step) and what it speaks.
#[derive(Debug)]
pub(super) struct CheckedListener {
    pub(super) address: HostPort,
    /// Where the entry is written.
    pub(super) at: Location,
    pub(super) kind: ListenKind,
}

/// Checks `listen`: at least one entry, each a consistent listener, and
/// the listeners together (see [`check_listeners`]); `base` is the config's
/// folder (relative paths are resolved against it). Errors are about
/// `path`.
pub(super) fn check(
    path: &Path,
    listen: Spanned<FileListenList>,
    base: &Path,
) -> Result<Vec<CheckedListener>, LoadError> {
    let list_at = location(&listen);
    let entries = listen.value.0;
    if entries.is_empty() {
        return Err(LoadError::at(
            path,
            list_at,
            "listen: at least one address is needed",
        ));
    }
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let at = match location(&entry) {
            Location { line: None, .. } => list_at,
            known => known,
        };
        let (address, kind) = entry.value.check(base).map_err(|(address, why)| {
            LoadError::at(path, at, format!("listen {:?}: {why}", address.to_string()))
        })?;
        out.push(CheckedListener { address, at, kind });
    }
    let kinds: Vec<&ListenKind> = out.iter().map(|l| &l.kind).collect();
    check_listeners(&kinds).map_err(|why| LoadError::at(path, list_at, why))?;
    Ok(out)
}

impl FileListen {
    /// The entry's address and kind; `base` is the config's folder. An
    /// error comes with the address, which names the entry.
    fn check(self, base: &Path) -> Result<(HostPort, ListenKind), (HostPort, String)> {
        let l = match self {
            FileListen::Plain(address) => return Ok((address, ListenKind::Plain)),
            FileListen::Full(l) => l,
        };
        let kind = match (l.tls, l.redirect_https) {
            (None, false) => ListenKind::Plain,
            (None, true) => ListenKind::Redirect,
            (Some(_), true) => {
                return Err((
                    l.address,
                    "redirect_https is for plain listeners: a TLS listener serves https itself"
                        .into(),
                ))
            }
            (Some(tls), false) => match tls.check(base) {
                Ok(source) => ListenKind::Tls(source),
                Err(why) => return Err((l.address, why)),
            },
        };
        Ok((l.address, kind))
    }
}

impl FileTls {
    fn check(self, base: &Path) -> Result<TlsSource, String> {
        match (self.cert, self.key, self.acme) {
            (Some(cert), Some(key), None) => Ok(TlsSource::Files {
                cert: base.join(cert),
                key: base.join(key),
            }),
            (None, None, Some(acme)) => {
                if acme.domains.is_empty() {
                    return Err("tls.acme.domains: at least one domain is needed".into());
                }
                if let Some(e) = &acme.email {
                    if !e.contains('@') || e.chars().any(char::is_whitespace) {
                        return Err(format!("tls.acme.email {e:?} is not an email address"));
                    }
                }
                let mut domains: Vec<String> = Vec::with_capacity(acme.domains.len());
                for DomainName(d) in acme.domains {
                    if !domains.contains(&d) {
                        domains.push(d);
                    }
                }
                Ok(TlsSource::Acme(AcmeSpec {
                    domains,
                    email: acme.email,
                    directory: acme.directory.0,
                    cache: base.join(acme.cache),
                    ca: acme.ca.map(|c| base.join(c)),
                }))
            }
            (Some(_), None, None) => Err("tls: cert is given without key".into()),
            (None, Some(_), None) => Err("tls: key is given without cert".into()),
            (None, None, None) => {
                Err("tls: give cert and key (PEM files), or acme: {domains, ...}".into())
            }
            (_, _, Some(_)) => Err("tls: give cert and key, or acme, not both".into()),
        }
    }
}

/// Checks across listeners: a redirect needs a TLS listener to point at,
/// ACME needs a plain listener for its HTTP-01 challenges, and two ACME
/// listeners sharing a cache must ask for the same certificate.
fn check_listeners(kinds: &[&ListenKind]) -> Result<(), String> {
    let tls = kinds
        .iter()
        .filter(|k| matches!(k, ListenKind::Tls(_)))
        .count();
    let (has_tls, has_plain) = (tls > 0, tls < kinds.len());
    if !has_tls && kinds.iter().any(|k| **k == ListenKind::Redirect) {
        return Err(
            "listen: redirect_https needs a TLS listener (an entry with tls) to redirect to".into(),
        );
    }
    let acme: Vec<&AcmeSpec> = kinds
        .iter()
        .filter_map(|k| match k {
            ListenKind::Tls(TlsSource::Acme(a)) => Some(a),
            _ => None,
        })
        .collect();
    if !acme.is_empty() && !has_plain {
        return Err("listen: tls.acme needs a plain listener (port 80 for a public ACME server) to answer HTTP-01 challenges".into());
    }
    for (i, a) in acme.iter().enumerate() {
        for b in acme.iter().skip(i + 1) {
            if a.cache == b.cache && a != b {
                return Err(format!(
                    "listen: two tls.acme settings share the cache {} but differ; give each its own cache",
                    a.cache.display()
                ));
            }
        }
    }
    Ok(())
}

/// The port clients reach the TLS listeners on, for redirects: the first
/// TLS listener's.
pub fn https_port(listeners: &[ListenSpec]) -> Option<u16> {
    listeners.iter().find(|l| l.is_tls()).map(|l| l.addr.port())
}

/// A DNS name for a certificate: letters, digits, `-` and `.`, stored in
/// lower case. Wildcards need the DNS-01 challenge, which the gateway does
/// not answer.
#[derive(Debug)]
struct DomainName(String);

impl<'de> Deserialize<'de> for DomainName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let lower = s.trim().trim_end_matches('.').to_ascii_lowercase();
        if lower.starts_with("*.") {
            return Err(de::Error::custom(format!(
                "domain {s:?}: wildcards need the DNS-01 challenge, which the gateway does not answer (HTTP-01 only)"
            )));
        }
        if !is_dns_name(&lower) {
            return Err(de::Error::custom(format!(
                "domain {s:?} is not a DNS name (letters, digits, '-' and '.')"
            )));
        }
        Ok(DomainName(lower))
    }
}

/// Whether `s` (lower case) is a DNS name with at least one dot... or a
/// single label such as `localhost`: private ACME servers may issue those.
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
        && s.parse::<std::net::IpAddr>().is_err()
}

/// An ACME directory URL: RFC 8555 requires https.
#[derive(Debug)]
struct DirectoryUrl(String);

impl<'de> Deserialize<'de> for DirectoryUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = s
            .strip_prefix("https://")
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
            && http::Uri::try_from(s.as_str()).is_ok();
        if !ok {
            return Err(de::Error::custom(format!(
                "directory {s:?} must be an https:// URL (such as https://acme-v02.api.letsencrypt.org/directory)"
            )));
        }
        Ok(DirectoryUrl(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        for good in ["ai.example.com", "localhost", "a-b.c", "x1.test"] {
            assert!(is_dns_name(good), "{good}");
        }
        for bad in ["", "a..b", "-a.b", "a_b.c", "1.2.3.4", "a b", "é.fr"] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }
}
