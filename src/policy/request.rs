//! What the decision looks at in a request, read off its head once.

use http::header::UPGRADE;
use http::{HeaderMap, Method, Version};

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
}

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
        }
    }
}
