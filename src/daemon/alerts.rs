//! Posting budget alerts to their webhooks, on a thread of its own (a
//! current-thread runtime), so no request ever waits on a webhook: the
//! request path only puts an alert in the bounded queue (`state::AlertQueue`).
//!
//! Each alert is one JSON `POST` over HTTP/1.1 (`Connection: close`),
//! with TLS (rustls, the system's roots) for `https://`; a 2xx answer
//! delivers it. An attempt is bounded by the alert's `timeout`; a failed
//! one is tried again after 1 s, then 2 s, then given up (counted).
//! Failures are logged at most once a minute, by the webhook's scheme,
//! host and port only (its path may hold a secret; no key ever appears).

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc::Receiver;
use tokio_rustls::TlsConnector;

use crate::config::Webhook;
use crate::ops::Metrics;
use crate::state::{Alert, Carried};

/// Attempts per alert, and the wait before the second (doubled after).
const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// At most one line about failures per this long.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// The longest status line read from a webhook.
const MOST_STATUS_LINE: u64 = 1024;

/// Starts the sender's thread, which runs until the process ends.
pub fn start(carried: &Carried, metrics: Arc<Metrics>) {
    let Some(queue) = carried.alerts.take_receiver() else {
        return;
    };
    super::spawn_thread(
        "alert-sender",
        move || match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(run(queue, metrics)),
            Err(e) => warn!("budget alerts cannot be sent: no runtime: {e}"),
        },
    );
}

/// What was last said about failures.
struct FailureLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl FailureLog {
    fn failed(&mut self, webhook: &Webhook, why: &str) {
        self.unlogged += 1;
        if self.last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return;
        }
        warn!(
            "budget alerts: {} attempt(s) to post to {} failed (last: {why}); next report in {}s at the earliest",
            self.unlogged,
            webhook.place(),
            LOG_EVERY.as_secs()
        );
        self.last = Some(Instant::now());
        self.unlogged = 0;
    }
}

async fn run(mut queue: Receiver<Alert>, metrics: Arc<Metrics>) {
    let tls = client_config().map(|c| TlsConnector::from(Arc::new(c)));
    let mut log = FailureLog {
        last: None,
        unlogged: 0,
    };
    while let Some(alert) = queue.recv().await {
        let body = serde_json::to_vec(&alert.body).unwrap_or_default();
        let request = request(&alert.webhook, &body);
        let mut delivered = false;
        let mut backoff = FIRST_BACKOFF;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            let outcome =
                tokio::time::timeout(alert.timeout, post(&alert.webhook, &request, tls.as_ref()))
                    .await;
            let why = match outcome {
                Ok(Ok(status)) if (200..300).contains(&status) => {
                    delivered = true;
                    break;
                }
                Ok(Ok(status)) => format!("answered {status}"),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", alert.timeout),
            };
            metrics.alerts().failed_attempts.inc();
            log.failed(&alert.webhook, &why);
        }
        if delivered {
            metrics.alerts().sent.inc();
        } else {
            metrics.alerts().dropped_failed.inc();
        }
    }
}

/// The request's bytes: head and JSON body.
fn request(webhook: &Webhook, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ai-gateway\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        webhook.target,
        webhook.authority,
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// One attempt: connects, sends, and reads the answer's status.
async fn post(
    webhook: &Webhook,
    request: &[u8],
    tls: Option<&TlsConnector>,
) -> std::io::Result<u16> {
    let tcp = TcpStream::connect((webhook.host.as_str(), webhook.port)).await?;
    if !webhook.tls {
        return exchange(tcp, request).await;
    }
    let tls = tls.ok_or_else(|| std::io::Error::other("TLS is not available"))?;
    let name = ServerName::try_from(webhook.host.clone())
        .map_err(|_| std::io::Error::other("the webhook's host is not a TLS server name"))?;
    exchange(tls.connect(name, tcp).await?, request).await
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    request: &[u8],
) -> std::io::Result<u16> {
    s.write_all(request).await?;
    s.flush().await?;
    let mut line = String::new();
    BufReader::new(s.take(MOST_STATUS_LINE))
        .read_line(&mut line)
        .await?;
    status_of(&line).ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}

/// The status of an HTTP/1.x status line.
fn status_of(line: &str) -> Option<u16> {
    let mut words = line.split_ascii_whitespace();
    let version = words.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    words.next()?.parse().ok()
}

/// TLS to webhooks: the system's roots (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` are honoured), the ring provider Pingora's rustls uses.
fn client_config() -> Option<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?;
    Some(builder.with_root_certificates(roots).with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_and_the_status_line() {
        let w = Webhook::parse("http://127.0.0.1:9000/hook?t=1").unwrap();
        let r = String::from_utf8(request(&w, b"{}")).unwrap();
        assert!(
            r.starts_with("POST /hook?t=1 HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"),
            "{r}"
        );
        assert!(
            r.ends_with("Content-Length: 2\r\nConnection: close\r\n\r\n{}"),
            "{r}"
        );
        assert_eq!(status_of("HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_of("HTTP/1.0 500\r\n"), Some(500));
        assert_eq!(status_of("SSH-2.0\r\n"), None);
        assert_eq!(status_of(""), None);
    }
}
