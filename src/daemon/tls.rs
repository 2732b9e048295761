//! The TLS listeners' certificates while the gateway runs: loaded at
//! start, re-read on every reload (files), obtained and renewed in the
//! background (ACME).
//!
//! Each TLS listener has a [`CertSlot`]; rustls asks it on every
//! handshake. A reload or a renewal replaces what the slot holds; a bad
//! file or a failed order leaves the old certificate in place (logged,
//! counted). Each also has one rustls configuration, made at start and
//! shared by all the proxy services, so that a session resumes whichever
//! service the kernel hands the client's next connection to.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{error, info, warn};
use pingora::listeners::tls::Acceptor;

use super::handshake::Acceptors;
use crate::config::{AcmeSpec, Config, ListenKind, LoadError, TlsSource};
use crate::ops::Metrics;
use crate::tls::acme::{self, AcmeCache};
use crate::tls::{server_config, CertSlot, Challenges, LoadedCert, SlotResolver};

/// The first wait after a failed ACME order; doubled after each failure.
const ACME_FIRST_BACKOFF: Duration = Duration::from_secs(30);
/// The longest wait between two tries.
const ACME_MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// How long one order may take, all steps together.
const ACME_ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// The ACME task wakes at least this often to look at the time again
/// (sleeps are monotonic; certificates live in wall-clock time).
const ACME_MAX_SLEEP: Duration = Duration::from_secs(3600);

/// One TLS listener's certificate.
struct Entry {
    addr: SocketAddr,
    slot: Arc<CertSlot>,
    /// The handshakes' configuration (certificates from `slot`, the
    /// session ticket key and cache), the same for every proxy service.
    acceptor: Arc<Acceptor>,
    /// ACME settings as at start (a change needs a restart).
    acme: Option<AcmeSpec>,
}

/// Every TLS listener's certificate slot.
pub struct TlsListeners {
    entries: Vec<Entry>,
    metrics: Arc<Metrics>,
}

impl TlsListeners {
    /// Loads the certificates of `config`'s TLS listeners: the files
    /// (which must be valid: an error names the file), and what the ACME
    /// caches hold (a listener whose cache has nothing valid starts empty
    /// and gets its certificate from the ACME task).
    pub fn load(config: &Config, metrics: Arc<Metrics>) -> Result<TlsListeners, LoadError> {
        let now = SystemTime::now();
        let mut entries = Vec::new();
        for l in &config.listeners {
            let ListenKind::Tls(source) = &l.kind else {
                continue;
            };
            let (cert, acme) = match source {
                TlsSource::Files { cert, key } => {
                    let loaded = LoadedCert::load(cert, key)?;
                    if let Some(w) = loaded.check_dates(cert, now)? {
                        warn!("{w}");
                    }
                    (Some(loaded), None)
                }
                TlsSource::Acme(spec) => {
                    let cache = AcmeCache::new(spec);
                    let cached = cache.usable(spec, now).unwrap_or_else(|e| {
                        warn!("acme cache: {e}; a new certificate will be requested");
                        None
                    });
                    match &cached {
                        Some(c) => info!(
                            "https://{}: certificate for {} from the cache {} (serial {}, valid until {})",
                            l.addr,
                            spec.domains.join(", "),
                            cache.dir.display(),
                            c.serial,
                            humantime::format_rfc3339_seconds(c.not_after)
                        ),
                        None => info!(
                            "https://{}: no valid certificate in {}; requesting one from {}",
                            l.addr,
                            cache.dir.display(),
                            spec.directory
                        ),
                    }
                    (cached, Some(spec.clone()))
                }
            };
            if let Some(c) = &cert {
                metrics.cert_expires(&l.url(), c.not_after);
            }
            let slot = Arc::new(CertSlot::new(cert));
            let tls = server_config(Arc::new(SlotResolver(Arc::clone(&slot))))
                .map_err(|e| LoadError::invalid(&config.path, format!("{}: {e}", l.url())))?;
            entries.push(Entry {
                addr: l.addr,
                slot,
                acceptor: Arc::new(Acceptor::from_server_config(Arc::new(tls))),
                acme,
            });
        }
        Ok(TlsListeners { entries, metrics })
    }

    /// The TLS listeners' handshakes (see [`crate::tls::server_config`]),
    /// for the proxy services to share.
    pub fn acceptors(&self) -> Acceptors {
        Acceptors::new(
            self.entries
                .iter()
                .map(|e| (e.addr, Arc::clone(&e.acceptor)))
                .collect(),
        )
    }

    /// Re-reads the certificate files of the listeners that use files,
    /// from the paths in `config` (the same address's entry). A file that
    /// is bad keeps the old certificate in service.
    pub fn reload(&self, config: &Config) {
        let now = SystemTime::now();
        for entry in self.entries.iter().filter(|e| e.acme.is_none()) {
            let Some((cert_path, key_path)) = config.listeners.iter().find_map(|l| match &l.kind {
                ListenKind::Tls(TlsSource::Files { cert, key }) if l.addr == entry.addr => {
                    Some((cert, key))
                }
                _ => None,
            }) else {
                continue;
            };
            let loaded = LoadedCert::load(cert_path, key_path).and_then(|c| {
                let warning = c.check_dates(cert_path, now)?;
                Ok((c, warning))
            });
            match loaded {
                Ok((cert, warning)) => {
                    if let Some(w) = warning {
                        warn!("{w}");
                    }
                    let before = entry.slot.current().map(|c| c.serial.clone());
                    if before.as_deref() != Some(cert.serial.as_str()) {
                        info!(
                            "https://{}: new certificate from {} (serial {}, valid until {}); new connections get it",
                            entry.addr,
                            cert_path.display(),
                            cert.serial,
                            humantime::format_rfc3339_seconds(cert.not_after)
                        );
                    }
                    self.metrics
                        .cert_expires(&format!("https://{}", entry.addr), cert.not_after);
                    entry.slot.store(cert);
                    self.metrics.cert_reloaded(true);
                }
                Err(e) => {
                    error!(
                        "https://{}: certificate not reloaded, the old one stays in service: {e}",
                        entry.addr
                    );
                    self.metrics.cert_reloaded(false);
                }
            }
        }
    }

    /// The certificate and key files to watch for changes.
    pub fn watched_files(config: &Config) -> Vec<PathBuf> {
        config
            .listeners
            .iter()
            .filter_map(|l| match &l.kind {
                ListenKind::Tls(TlsSource::Files { cert, key }) => {
                    Some([cert.clone(), key.clone()])
                }
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Starts the ACME task when a listener uses ACME: a thread with its
    /// own small runtime, one loop per listener. `plain` is a plain
    /// listener's address, where the ACME server's challenge requests
    /// arrive: the first order waits until it accepts connections.
    pub fn start_acme(&self, challenges: Arc<Challenges>, plain: Option<SocketAddr>) {
        let jobs: Vec<(SocketAddr, AcmeSpec, Arc<CertSlot>)> = self
            .entries
            .iter()
            .filter_map(|e| {
                e.acme
                    .clone()
                    .map(|spec| (e.addr, spec, Arc::clone(&e.slot)))
            })
            .collect();
        if jobs.is_empty() {
            return;
        }
        let metrics = Arc::clone(&self.metrics);
        super::spawn_thread("acme", move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    error!("acme: cannot start its runtime ({e}); no certificate will be obtained or renewed");
                    return;
                }
            };
            runtime.block_on(async move {
                if let Some(addr) = plain {
                    wait_until_listening(addr).await;
                }
                let mut tasks = Vec::new();
                for (addr, spec, slot) in jobs {
                    let challenges = Arc::clone(&challenges);
                    let metrics = Arc::clone(&metrics);
                    tasks.push(tokio::spawn(async move {
                        acme_loop(addr, spec, slot, challenges, metrics).await;
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
    }
}

/// Waits (at most 30 s) until `addr` accepts TCP connections: Pingora
/// binds its listeners once the server runs.
async fn wait_until_listening(addr: SocketAddr) {
    let target = if addr.ip().is_unspecified() {
        SocketAddr::new(
            if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            addr.port(),
        )
    } else {
        addr
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Obtains a certificate when the slot has none, and renews it when a
/// third of its lifetime is left; after a failure, tries again with a
/// doubling wait, serving the old certificate meanwhile.
async fn acme_loop(
    addr: SocketAddr,
    spec: AcmeSpec,
    slot: Arc<CertSlot>,
    challenges: Arc<Challenges>,
    metrics: Arc<Metrics>,
) {
    let listener = format!("https://{addr}");
    let mut backoff = ACME_FIRST_BACKOFF;
    let mut retry_at: Option<SystemTime> = None;
    loop {
        let now = SystemTime::now();
        let current = slot.current();
        let due = match (&current, retry_at) {
            (_, Some(t)) => t,
            (Some(c), None) => c.renew_at(),
            (None, None) => now,
        };
        if let Ok(wait) = due.duration_since(now) {
            if !wait.is_zero() {
                tokio::time::sleep(wait.min(ACME_MAX_SLEEP)).await;
                continue;
            }
        }
        let what = if current.is_some() {
            "renewal"
        } else {
            "first certificate"
        };
        info!(
            "acme: ordering a certificate for {} from {} ({what})",
            spec.domains.join(", "),
            spec.directory
        );
        let result =
            tokio::time::timeout(ACME_ORDER_TIMEOUT, acme::obtain(&spec, &challenges)).await;
        let failure = match result {
            Ok(Ok(cert)) => {
                info!(
                    "acme: certificate for {} obtained (serial {}, valid until {}, renewal from {}); {listener} serves it to new connections",
                    spec.domains.join(", "),
                    cert.serial,
                    humantime::format_rfc3339_seconds(cert.not_after),
                    humantime::format_rfc3339_seconds(cert.renew_at())
                );
                metrics.cert_expires(&listener, cert.not_after);
                metrics.acme_order(true);
                let renew_at = cert.renew_at();
                slot.store(cert);
                if renew_at <= SystemTime::now() {
                    // A certificate due for renewal at once (a very short
                    // lifetime, a clock ahead): not ordered again in a
                    // loop, but after the growing wait.
                    warn!(
                        "acme: the new certificate for {} is already due for renewal; next order in {}s",
                        spec.domains.join(", "),
                        backoff.as_secs()
                    );
                    retry_at = Some(SystemTime::now() + backoff);
                    backoff = (backoff * 2).min(ACME_MAX_BACKOFF);
                } else {
                    backoff = ACME_FIRST_BACKOFF;
                    retry_at = None;
                }
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {}s", ACME_ORDER_TIMEOUT.as_secs()),
        };
        metrics.acme_order(false);
        let serving = match &current {
            Some(c) => format!(
                "still serving the certificate valid until {}",
                humantime::format_rfc3339_seconds(c.not_after)
            ),
            None => format!("{listener} has no certificate yet"),
        };
        error!(
            "acme: {what} for {} from {} failed: {failure}; {serving}; next try in {}s",
            spec.domains.join(", "),
            spec.directory,
            backoff.as_secs()
        );
        retry_at = Some(SystemTime::now() + backoff);
        backoff = (backoff * 2).min(ACME_MAX_BACKOFF);
    }
}
