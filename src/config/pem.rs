//! PEM files: certificates (a chain, a CA bundle) and private keys, read
//! with errors that name the file. Nothing here logs or returns key bytes
//! in an error.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::error::LoadError;

/// The DER certificates of the PEM file at `path`, in file order; each is
/// checked to parse as X.509. An empty list is an error.
pub fn read_certificates(path: &Path) -> Result<Vec<Vec<u8>>, LoadError> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::io(path, e))?;
    parse_certificates(path, &bytes)
}

/// [`read_certificates`] on bytes already read from `path`.
pub fn parse_certificates(path: &Path, bytes: &[u8]) -> Result<Vec<Vec<u8>>, LoadError> {
    let mut out = Vec::new();
    for (i, item) in CertificateDer::pem_slice_iter(bytes).enumerate() {
        let der = item.map_err(|e| {
            LoadError::invalid(path, format!("certificate {}: not valid PEM: {e}", i + 1))
        })?;
        if let Err(e) = x509_parser::parse_x509_certificate(&der) {
            return Err(LoadError::invalid(
                path,
                format!("certificate {} does not parse as X.509: {e}", i + 1),
            ));
        }
        out.push(der.to_vec());
    }
    if out.is_empty() {
        return Err(LoadError::invalid(
            path,
            "no certificate found (expected PEM: -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(out)
}

/// [`read_private_key`] on bytes already read from `path`.
pub fn parse_private_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, LoadError> {
    // The parser's own error may quote the input; only its kind is kept.
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| {
        let why = match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no private key found (expected PEM: -----BEGIN PRIVATE KEY-----)"
            }
            _ => "the private key is not valid PEM",
        };
        LoadError::invalid(path, why)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_garbage_files_are_named() {
        let p = Path::new("/etc/agw/cert.pem");
        let e = parse_certificates(p, b"hello").unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/agw/cert.pem: no certificate found"),
            "{e}"
        );
        let bad = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = parse_certificates(p, bad).unwrap_err().to_string();
        assert!(e.contains("does not parse as X.509"), "{e}");
        let e = parse_private_key(Path::new("k.pem"), b"nothing")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("k.pem: no private key found"), "{e}");
    }
}
