//! What a listener does before the routes: answer ACME HTTP-01 challenges
//! on plain listeners, and redirect plain listeners marked
//! `redirect_https` to https.
//!
//! Every listener is served by the one proxy service; the listener a
//! request arrived on is known by the connection's local address (and TLS
//! by its TLS digest), for HTTP/1 and HTTP/2 alike.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::Authority;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

use super::reply::answer;
use crate::config::{https_port, ListenKind, ListenSpec, TlsSource};
use crate::tls::{is_challenge_path, Challenges};

/// The answer to a challenge path with no challenge in progress.
const NO_CHALLENGE: &str = r#"{"error":"no such acme challenge"}"#;

/// The listeners as they were set up at start (they change only with a
/// restart), and the challenges in progress.
#[derive(Debug, Clone)]
pub struct Listeners {
    challenges: Arc<Challenges>,
    /// Whether any listener gets its certificate from ACME: only then are
    /// challenge paths the gateway's.
    acme: bool,
    /// Addresses of the `redirect_https` listeners.
    redirect: Box<[SocketAddr]>,
    /// The port of the TLS listener redirects point at.
    https_port: Option<u16>,
}

/// What the front door did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontDoor {
    /// Nothing: the request goes on to the routes.
    Pass,
    /// Answered an ACME challenge (200, or 404 for an unknown token).
    Challenge,
    /// Answered with a redirect to https.
    Redirected,
}

impl Listeners {
    pub fn new(specs: &[ListenSpec], challenges: Arc<Challenges>) -> Listeners {
        Listeners {
            challenges,
            acme: specs
                .iter()
                .any(|l| matches!(l.kind, ListenKind::Tls(TlsSource::Acme(_)))),
            redirect: specs
                .iter()
                .filter(|l| l.kind == ListenKind::Redirect)
                .map(|l| l.addr)
                .collect(),
            https_port: https_port(specs),
        }
    }

    /// Whether a connection to local address `local` came in on a
    /// `redirect_https` listener (one on `0.0.0.0:80` takes any address
    /// with port 80).
    fn is_redirect(&self, local: Option<SocketAddr>) -> bool {
        let Some(local) = local else { return false };
        self.redirect
            .iter()
            .any(|r| r.port() == local.port() && (r.ip() == local.ip() || r.ip().is_unspecified()))
    }

    /// Challenges on plain connections, then the redirect. Runs first in
    /// `request_filter`: before any key check.
    pub async fn handle(&self, session: &mut Session) -> Result<FrontDoor> {
        if self.redirect.is_empty() && !self.acme {
            return Ok(FrontDoor::Pass);
        }
        if is_tls(session) {
            return Ok(FrontDoor::Pass);
        }
        let path = session.req_header().uri.path();
        let redirect = self.is_redirect(local_addr(session));
        // A redirect listener never redirects a challenge path: with no
        // ACME setting (or an unknown token) it is a 404.
        if (self.acme || redirect) && is_challenge_path(path) {
            let (status, body, ctype) = match self.challenges.answer(path) {
                Some(key_authorization) => (200, Bytes::from(key_authorization), "text/plain"),
                None => (
                    404,
                    Bytes::from_static(NO_CHALLENGE.as_bytes()),
                    "application/json",
                ),
            };
            let mut resp = ResponseHeader::build(status, Some(3))?;
            resp.insert_header("content-type", ctype)?;
            resp.insert_header("content-length", body.len())?;
            resp.insert_header("cache-control", "no-store")?;
            answer(session, resp, body).await?;
            return Ok(FrontDoor::Challenge);
        }
        if !redirect {
            return Ok(FrontDoor::Pass);
        }
        let Some(location) = self.location(session) else {
            return Ok(FrontDoor::Pass);
        };
        let mut resp = ResponseHeader::build(308, Some(3))?;
        resp.insert_header("location", location)?;
        resp.insert_header("content-length", "0")?;
        resp.insert_header("cache-control", "no-store")?;
        answer(session, resp, Bytes::new()).await?;
        Ok(FrontDoor::Redirected)
    }

    /// `https://HOST[:PORT]/path?query` for the request: the host from its
    /// `Host` (or the absolute URI), the port of the TLS listener unless it
    /// is 443. `None` when the request names no usable host (the usual
    /// checks then answer it).
    fn location(&self, session: &Session) -> Option<String> {
        let req = session.req_header();
        let host = req
            .uri
            .authority()
            .map(|a| a.host().to_string())
            .or_else(|| {
                let h = req.headers.get(http::header::HOST)?.to_str().ok()?;
                Authority::from_str(h).ok().map(|a| a.host().to_string())
            })
            .filter(|h| !h.is_empty())?;
        let port = match self.https_port {
            Some(443) | None => String::new(),
            Some(p) => format!(":{p}"),
        };
        // `OPTIONS *` (asterisk form) has no path to keep.
        let target = req
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .filter(|t| t.starts_with('/'))
            .unwrap_or("/");
        Some(format!("https://{host}{port}{target}"))
    }
}

/// Whether the request came over TLS.
pub fn is_tls(session: &Session) -> bool {
    session
        .as_downstream()
        .digest()
        .is_some_and(|d| d.ssl_digest.is_some())
}

fn local_addr(session: &Session) -> Option<SocketAddr> {
    session
        .as_downstream()
        .server_addr()
        .and_then(|a| a.as_inet())
        .copied()
}
