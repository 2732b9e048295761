//! A certificate chain and its private key, read from PEM, checked (the
//! key matches the certificate; dates), and made ready for rustls.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;

use crate::config::{parse_certificates, parse_private_key, LoadError};

/// Fewer days than this left on a certificate is worth a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// A loaded certificate: what rustls serves, and what the gateway needs to
/// know about it (dates for renewal and warnings, the serial for logs).
#[derive(Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The leaf's serial number in hex, for logs.
    pub serial: String,
    /// The leaf's DNS names (subject alternative names).
    pub names: Vec<String>,
}

impl LoadedCert {
    /// Reads the chain at `cert_path` (leaf first) and the key at
    /// `key_path`. Errors name the file at fault.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, LoadError> {
        let cert = std::fs::read(cert_path).map_err(|e| LoadError::io(cert_path, e))?;
        let key = std::fs::read(key_path).map_err(|e| LoadError::io(key_path, e))?;
        LoadedCert::from_pem(cert_path, &cert, key_path, &key)
    }

    /// [`LoadedCert::load`] on PEM text already read (the paths name the
    /// files in errors).
    pub fn from_pem(
        cert_path: &Path,
        cert_pem: &[u8],
        key_path: &Path,
        key_pem: &[u8],
    ) -> Result<LoadedCert, LoadError> {
        let chain = parse_certificates(cert_path, cert_pem)?;
        let key = parse_private_key(key_path, key_pem)?;
        let leaf = chain
            .first()
            .ok_or_else(|| LoadError::invalid(cert_path, "no certificate found"))?;
        let (not_before, not_after, serial, names) = leaf_facts(leaf)
            .map_err(|why| LoadError::invalid(cert_path, format!("the certificate {why}")))?;
        let provider = rustls::crypto::ring::default_provider();
        let ders: Vec<CertificateDer<'static>> =
            chain.into_iter().map(CertificateDer::from).collect();
        let certified = CertifiedKey::from_der(ders, key, &provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => LoadError::invalid(
                key_path,
                format!(
                    "the private key does not match the certificate in {}",
                    cert_path.display()
                ),
            ),
            _ => LoadError::invalid(
                key_path,
                "unsupported private key (RSA, ECDSA P-256/P-384 or Ed25519 are supported)",
            ),
        })?;
        Ok(LoadedCert {
            key: Arc::new(certified),
            not_before,
            not_after,
            serial,
            names,
        })
    }

    /// Time left until `not_after`; `None` once expired.
    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        self.not_after.duration_since(now).ok()
    }

    /// When a third of its lifetime is left: the time to renew it.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_after - lifetime / 3
    }

    /// Whether the certificate names every one of `domains`.
    pub fn covers(&self, domains: &[String]) -> bool {
        domains.iter().all(|d| self.names.iter().any(|n| n == d))
    }

    /// The expiry check of `check` and of start-up: an error (naming
    /// `cert_path`) once expired or not yet valid; a warning when fewer
    /// than 14 days are left.
    pub fn check_dates(
        &self,
        cert_path: &Path,
        now: SystemTime,
    ) -> Result<Option<String>, LoadError> {
        let when = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        if now < self.not_before {
            return Err(LoadError::invalid(
                cert_path,
                format!(
                    "the certificate is not valid before {}",
                    when(self.not_before)
                ),
            ));
        }
        match self.remaining(now) {
            None => Err(LoadError::invalid(
                cert_path,
                format!("the certificate expired at {}", when(self.not_after)),
            )),
            Some(left) if left < EXPIRY_WARNING => Ok(Some(format!(
                "{}: the certificate expires in {} day(s), at {}",
                cert_path.display(),
                left.as_secs() / 86_400,
                when(self.not_after)
            ))),
            Some(_) => Ok(None),
        }
    }
}

/// Dates, serial and DNS names of a leaf certificate.
fn leaf_facts(der: &[u8]) -> Result<(SystemTime, SystemTime, String, Vec<String>), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("does not parse as X.509: {e}"))?;
    let at = |secs: i64| {
        u64::try_from(secs)
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
            .map_err(|_| "has a date before 1970".to_string())
    };
    let validity = cert.validity();
    let not_before = at(validity.not_before.timestamp())?;
    let not_after = at(validity.not_after.timestamp())?;
    let serial = cert.raw_serial_as_string().replace(':', "");
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok((not_before, not_after, serial, names))
}
