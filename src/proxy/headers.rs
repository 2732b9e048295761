//! The request headers that go upstream: the credential and every header
//! the gateway vouches for are the gateway's own, whatever the client sent.

use std::net::IpAddr;

use http::HeaderValue;
use pingora::http::RequestHeader;
use pingora::prelude::*;

/// Headers the client may not send upstream as they are: the credential,
/// and what the gateway sets or vouches for (who the user is, where the
/// request came from). Client values are removed; the gateway sets its own
/// where it has one.
const GATEWAY_OWNED: [&str; 9] = [
    "x-api-key",
    "authorization",
    "x-gateway-user",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
];

/// What the gateway adds to an accepted request.
pub struct Identity<'a> {
    pub user: Option<&'a HeaderValue>,
    pub request_id: Option<&'a HeaderValue>,
    /// The socket's peer.
    pub peer: Option<IpAddr>,
    /// Whether the peer is a trusted proxy, whose `X-Forwarded-For` chain
    /// is passed on (with the peer appended) instead of replaced.
    pub peer_trusted: bool,
    /// Whether the client connected over TLS (`X-Forwarded-Proto: https`).
    pub tls: bool,
}

/// Removes the client's credential and gateway-owned headers, drops header
/// names with `_` (all of them unless `underscores` allows them, and even
/// then those that CGI-style servers would read as a gateway-owned one),
/// then sets the gateway's own.
pub fn rewrite_for_upstream(
    req: &mut RequestHeader,
    underscores: bool,
    who: &Identity<'_>,
) -> Result<()> {
    let forwarded_for = match who.peer {
        Some(peer) if who.peer_trusted => {
            let chain: Vec<&str> = req
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            Some(if chain.is_empty() {
                peer.to_string()
            } else {
                format!("{}, {peer}", chain.join(", "))
            })
        }
        Some(peer) => Some(peer.to_string()),
        None => None,
    };
    for name in GATEWAY_OWNED {
        req.remove_header(name);
    }
    // Only a request that has underscore names pays for collecting them.
    if req.headers.keys().any(|n| n.as_str().contains('_')) {
        let drop: Vec<String> = req
            .headers
            .keys()
            .map(|n| n.as_str())
            .filter(|n| n.contains('_') && (!underscores || normalises_to_owned(n)))
            .map(str::to_owned)
            .collect();
        for name in &drop {
            req.remove_header(name.as_str());
        }
    }
    if let Some(user) = who.user {
        req.insert_header("x-gateway-user", user.clone())?;
    }
    if let Some(id) = who.request_id {
        req.insert_header("x-request-id", id.clone())?;
    }
    if let Some(chain) = forwarded_for {
        req.insert_header("x-forwarded-for", chain)?;
    }
    req.insert_header("x-forwarded-proto", if who.tls { "https" } else { "http" })?;
    Ok(())
}

/// Whether `name` (lower case, as stored) reads as a gateway-owned header
/// once `_` is taken for `-`, as CGI and WSGI servers do.
fn normalises_to_owned(name: &str) -> bool {
    GATEWAY_OWNED.iter().any(|owned| {
        owned.len() == name.len()
            && owned
                .bytes()
                .zip(name.bytes())
                .all(|(o, n)| o == n || (o == b'-' && n == b'_'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    fn names(r: &RequestHeader) -> Vec<String> {
        let mut v: Vec<String> = r.headers.keys().map(|n| n.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn client_values_of_owned_headers_never_pass() {
        let user = HeaderValue::from_static("ann");
        let mut r = request(&[
            ("X-Gateway-User", "root"),
            ("X_Gateway_User", "root"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Real-IP", "1.2.3.4"),
            ("Forwarded", "for=1.2.3.4"),
            ("X-API-Key", "secret"),
            ("X_API_Key", "secret"),
            ("Accept", "*/*"),
            ("X_Custom", "1"),
        ]);
        let who = Identity {
            user: Some(&user),
            request_id: None,
            peer: Some(IpAddr::from([127, 0, 0, 1])),
            peer_trusted: false,
            tls: false,
        };
        rewrite_for_upstream(&mut r, false, &who).unwrap();
        assert_eq!(
            names(&r),
            [
                "accept",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-gateway-user"
            ]
        );
        assert_eq!(r.headers["x-gateway-user"], "ann");
        assert_eq!(r.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(r.headers.get_all("x-gateway-user").iter().count(), 1);
    }

    #[test]
    fn underscores_allowed_still_never_impersonate() {
        let mut r = request(&[
            ("X_Custom", "1"),
            ("X_Gateway_User", "root"),
            ("x_request_id", "r"),
            ("X_Forwarded_For", "1.2.3.4"),
            ("X_API_KEY", "k"),
        ]);
        let who = Identity {
            user: None,
            request_id: None,
            peer: None,
            peer_trusted: false,
            tls: false,
        };
        rewrite_for_upstream(&mut r, true, &who).unwrap();
        assert_eq!(names(&r), ["x-forwarded-proto", "x_custom"]);
    }

    #[test]
    fn a_trusted_proxys_chain_is_extended() {
        let mut r = request(&[
            ("X-Forwarded-For", "192.0.2.7"),
            ("X-Forwarded-For", "10.0.0.2"),
        ]);
        let who = Identity {
            user: None,
            request_id: None,
            peer: Some(IpAddr::from([127, 0, 0, 1])),
            peer_trusted: true,
            tls: false,
        };
        rewrite_for_upstream(&mut r, false, &who).unwrap();
        assert_eq!(
            r.headers["x-forwarded-for"],
            "192.0.2.7, 10.0.0.2, 127.0.0.1"
        );
    }
}
