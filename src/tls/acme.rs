//! Certificates from an ACME server (RFC 8555) with the HTTP-01 challenge,
//! through the `instant-acme` client, and the cache folder that keeps the
//! account key and the certificate between runs.
//!
//! Nothing here spawns: [`obtain`] is one order, start to finish, awaited
//! by the daemon's ACME task (which decides when, and retries).
//!
//! The cache folder (mode 0700) holds, each written atomically with mode
//! 0600:
//! - `account-<id>.json`: the account's credentials (its private key), one
//!   per directory URL (`<id>` is the start of the URL's SHA-256);
//! - `cert.pem`: the certificate chain, leaf first;
//! - `key.pem`: the certificate's private key.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use log::info;
use sha2::{Digest, Sha256};

use super::certs::LoadedCert;
use super::challenges::Challenges;
use crate::config::{read_certificates, AcmeSpec, LoadError};

/// How long the ACME server may take to validate the challenges and to
/// issue the certificate, each.
const POLL_TIMEOUT: Duration = Duration::from_secs(90);

/// Why an order failed; the message says at which step.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {reason}")]
pub struct AcmeError {
    step: &'static str,
    reason: String,
}

impl AcmeError {
    fn at(step: &'static str, e: impl std::fmt::Display) -> AcmeError {
        AcmeError {
            step,
            reason: e.to_string(),
        }
    }

    /// The error with its causes (hyper's "client error (Connect)" says
    /// little without them).
    fn from_acme(step: &'static str, e: &instant_acme::Error) -> AcmeError {
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            source = s.source();
        }
        AcmeError { step, reason }
    }
}

/// The files of one ACME setting's cache.
#[derive(Debug, Clone)]
pub struct AcmeCache {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub account: PathBuf,
}

impl AcmeCache {
    pub fn new(spec: &AcmeSpec) -> AcmeCache {
        let id = Sha256::digest(spec.directory.as_bytes());
        let id: String = id.iter().take(6).map(|b| format!("{b:02x}")).collect();
        AcmeCache {
            dir: spec.cache.clone(),
            cert: spec.cache.join("cert.pem"),
            key: spec.cache.join("key.pem"),
            account: spec.cache.join(format!("account-{id}.json")),
        }
    }

    /// The cached certificate, if there is one: `Ok(None)` when the cache
    /// holds none; an error when its files are unreadable or bad.
    pub fn load(&self) -> Result<Option<LoadedCert>, LoadError> {
        if !self.cert.exists() && !self.key.exists() {
            return Ok(None);
        }
        LoadedCert::load(&self.cert, &self.key).map(Some)
    }

    /// The cached certificate when it can be served for `spec` at `now`:
    /// it names every domain and has not expired.
    pub fn usable(
        &self,
        spec: &AcmeSpec,
        now: SystemTime,
    ) -> Result<Option<LoadedCert>, LoadError> {
        Ok(self
            .load()?
            .filter(|c| c.covers(&spec.domains) && c.remaining(now).is_some()))
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        ensure_private_dir(&self.dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

/// Creates `dir` (and its parents) if needed, and makes it 0700.
fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// What `check` can say about an ACME setting without contacting the
/// server: the CA file parses, the cache folder can be created, and what
/// the cache holds.
pub fn check_spec(
    spec: &AcmeSpec,
    config_path: &Path,
    now: SystemTime,
) -> Result<String, LoadError> {
    if let Some(ca) = &spec.ca {
        read_certificates(ca)?;
    }
    let cache = AcmeCache::new(spec);
    if cache.dir.exists() && !cache.dir.is_dir() {
        return Err(LoadError::invalid(
            config_path,
            format!("tls.acme.cache {} is not a folder", cache.dir.display()),
        ));
    }
    let state = match cache.load()? {
        None => "no certificate cached yet: one is requested at start".to_string(),
        Some(c) if !c.covers(&spec.domains) => format!(
            "the cached certificate ({}) does not name every domain: a new one is requested at start",
            cache.cert.display()
        ),
        Some(c) => match c.remaining(now) {
            None => "the cached certificate has expired: a new one is requested at start".into(),
            Some(left) => format!(
                "cached certificate valid for {} more day(s), renewed from {}",
                left.as_secs() / 86_400,
                humantime::format_rfc3339_seconds(c.renew_at())
            ),
        },
    };
    Ok(format!(
        "acme for {} from {}: {state}",
        spec.domains.join(", "),
        spec.directory
    ))
}

/// The account: from the cache, or created (and cached) on first use.
async fn account(spec: &AcmeSpec, cache: &AcmeCache) -> Result<Account, AcmeError> {
    let builder = || match &spec.ca {
        Some(ca) => Account::builder_with_root(ca)
            .map_err(|e| AcmeError::from_acme("reading the tls.acme.ca file", &e)),
        None => Account::builder().map_err(|e| AcmeError::from_acme("the system's roots", &e)),
    };
    if let Ok(text) = std::fs::read_to_string(&cache.account) {
        let creds: AccountCredentials = serde_json::from_str(&text)
            .map_err(|e| AcmeError::at("reading the cached account", e))?;
        return builder()?
            .from_credentials(creds)
            .await
            .map_err(|e| AcmeError::from_acme("restoring the account", &e));
    }
    let mailto = spec.email.as_ref().map(|e| format!("mailto:{e}"));
    let contact: Vec<&str> = mailto.iter().map(String::as_str).collect();
    let (account, creds) = builder()?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            spec.directory.clone(),
            None,
        )
        .await
        .map_err(|e| AcmeError::from_acme("creating the account", &e))?;
    let json = serde_json::to_vec(&creds).map_err(|e| AcmeError::at("saving the account", e))?;
    cache.write(&cache.account, &json).map_err(|e| {
        AcmeError::at(
            "saving the account",
            format!("{}: {e}", cache.account.display()),
        )
    })?;
    info!("acme: account created at {}", spec.directory);
    Ok(account)
}

/// Whether the server says the account does not exist (RFC 8555 6.7).
/// The HTTP-01 tokens an order has published; taken back out when
/// dropped, so an order abandoned halfway (by its timeout, which drops
/// it) leaves none being answered.
struct Published<'a> {
    challenges: &'a Challenges,
    tokens: Vec<String>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for t in &self.tokens {
            self.challenges.remove(t);
        }
    }
}

fn is_unknown_account(p: &instant_acme::Problem) -> bool {
    p.r#type
        .as_deref()
        .is_some_and(|t| t.ends_with(":accountDoesNotExist"))
}

/// Runs one order for `spec`'s domains: HTTP-01 challenges answered
/// through `challenges`, a new key and CSR, the certificate. On success the
/// certificate and its key are in the cache and returned.
pub async fn obtain(spec: &AcmeSpec, challenges: &Challenges) -> Result<LoadedCert, AcmeError> {
    let cache = AcmeCache::new(spec);
    ensure_private_dir(&cache.dir).map_err(|e| {
        AcmeError::at(
            "creating the cache folder",
            format!("{}: {e}", cache.dir.display()),
        )
    })?;
    let identifiers: Vec<Identifier> = spec
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let new_order = NewOrder::new(&identifiers);
    let mut order = match account(spec, &cache).await?.new_order(&new_order).await {
        Ok(order) => order,
        // The server forgot the cached account (a reset test server, a
        // deactivated account): a new one, once.
        Err(instant_acme::Error::Api(p)) if is_unknown_account(&p) => {
            info!(
                "acme: {} does not know the cached account ({}); creating a new one",
                spec.directory,
                cache.account.display()
            );
            let _ = std::fs::remove_file(&cache.account);
            account(spec, &cache)
                .await?
                .new_order(&new_order)
                .await
                .map_err(|e| AcmeError::from_acme("creating the order", &e))?
        }
        Err(e) => return Err(AcmeError::from_acme("creating the order", &e)),
    };

    let mut published = Published {
        challenges,
        tokens: Vec::new(),
    };
    let tokens = &mut published.tokens;
    let answered = async {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz =
                authz.map_err(|e| AcmeError::from_acme("fetching an authorization", &e))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::at(
                        "authorization",
                        format!("unexpected status {other:?}"),
                    ))
                }
            }
            let mut challenge = authz.challenge(ChallengeType::Http01).ok_or_else(|| {
                AcmeError::at("authorization", "the server offers no http-01 challenge")
            })?;
            challenges.set(&challenge.token, challenge.key_authorization().as_str());
            tokens.push(challenge.token.clone());
            challenge
                .set_ready()
                .await
                .map_err(|e| AcmeError::from_acme("answering the challenge", &e))?;
        }
        Ok(())
    }
    .await;
    let ready = match answered {
        Ok(()) => order
            .poll_ready(&RetryPolicy::new().timeout(POLL_TIMEOUT))
            .await
            .map_err(|e| AcmeError::from_acme("waiting for validation", &e)),
        Err(e) => Err(e),
    };
    drop(published);
    match ready? {
        OrderStatus::Ready => {}
        status => {
            let why = order
                .state()
                .error
                .as_ref()
                .map_or_else(|| format!("order is {status:?}"), |p| p.to_string());
            return Err(AcmeError::at("validation", why));
        }
    }
    let key_pem = order
        .finalize()
        .await
        .map_err(|e| AcmeError::from_acme("finalizing the order", &e))?;
    let chain_pem = order
        .poll_certificate(&RetryPolicy::new().timeout(POLL_TIMEOUT))
        .await
        .map_err(|e| AcmeError::from_acme("downloading the certificate", &e))?;
    let cert = LoadedCert::from_pem(
        &cache.cert,
        chain_pem.as_bytes(),
        &cache.key,
        key_pem.as_bytes(),
    )
    .map_err(|e| AcmeError::at("the issued certificate", e))?;
    let saved = cache
        .write(&cache.key, key_pem.as_bytes())
        .and_then(|()| cache.write(&cache.cert, chain_pem.as_bytes()));
    saved.map_err(|e| {
        AcmeError::at(
            "saving the certificate",
            format!("{}: {e}", cache.dir.display()),
        )
    })?;
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_of_an_abandoned_order_are_no_longer_answered() {
        let challenges = Challenges::default();
        let path = "/.well-known/acme-challenge/tok1";
        {
            let mut published = Published {
                challenges: &challenges,
                tokens: Vec::new(),
            };
            challenges.set("tok1", "tok1.thumb");
            published.tokens.push("tok1".to_string());
            assert!(challenges.answer(path).is_some());
            // Dropped here, as a timed-out order's future is.
        }
        assert_eq!(challenges.answer(path), None);
    }
}
