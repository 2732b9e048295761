//! What the decision looks at in a request, read off its head once.

use std::net::IpAddr;

use http::header::{ACCESS_CONTROL_REQUEST_METHOD, CONTENT_LENGTH, ORIGIN, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Version};

use super::credentials::{presented_key, Credential};

/// The parts of a request the decision judges.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a Method,
    /// The path, without the query.
    pub path: &'a str,
    pub credential: Credential<'a>,
    /// What the client asks to switch to (`Upgrade`), if anything.
    pub upgrade: Option<Upgrade>,
    /// The client's address (the socket's peer, or from `X-Forwarded-For`
    /// when the peer is a trusted proxy).
    pub client: IpAddr,
    /// The page that sent it (`Origin`), for CORS.
    pub origin: Option<&'a HeaderValue>,
    /// An `OPTIONS` with `Access-Control-Request-Method`: a CORS preflight.
    pub preflight: bool,
    /// The declared body size (already checked to be one decimal number).
    pub content_length: Option<u64>,
}

/// The address a request without one is taken to come from (benches, tests).
const UNSPECIFIED: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// A protocol switch a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    Websocket,
    /// Anything else (`h2c`, ...): never passed on.
    Other,
}

impl<'a> Request<'a> {
    /// Reads the request's parts from its head. An `Upgrade` header counts
    /// only on HTTP/1.1, as for Pingora, which tunnels nothing else.
    #[inline]
    pub fn from_head(
        method: &'a Method,
        path: &'a str,
        version: Version,
        headers: &'a HeaderMap,
        client: IpAddr,
    ) -> Self {
        let upgrade = match headers.get(UPGRADE) {
            Some(v) if version == Version::HTTP_11 => {
                if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket") {
                    Some(Upgrade::Websocket)
                } else {
                    Some(Upgrade::Other)
                }
            }
            _ => None,
        };
        Request {
            method,
            path,
            credential: presented_key(headers),
            upgrade,
            client,
            origin: headers.get(ORIGIN),
            preflight: method == Method::OPTIONS
                && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD),
            content_length: headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        }
    }

    /// A plain request (no upgrade) with `credential`, for callers that
    /// have no head: benches, property tests, fuzzers.
    pub fn plain(method: &'a Method, path: &'a str, credential: Credential<'a>) -> Self {
        Request {
            method,
            path,
            credential,
            upgrade: None,
            client: UNSPECIFIED,
            origin: None,
            preflight: false,
            content_length: None,
        }
    }
}
