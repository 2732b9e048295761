//! Admin authentication: the page and the key API need a key whose entry
//! says `"admin": true`.
//!
//! The page takes it through HTTP Basic authentication (any user name,
//! the key as the password), so a browser asks for it; the API takes only
//! `Authorization: Bearer`, which no browser sends by itself, so another
//! site cannot make a logged-in browser call it. No cookies are set.
//!
//! A wrong, expired or revoked key counts toward the failed-key throttle
//! of the client's address, as on the proxy listeners (and through Redis
//! with `shared_state`); a blocked address gets 429 for any key but one
//! that worked from it before. A request without any key is not counted:
//! that is how every browser first asks. A valid key that is not an admin
//! key gets 403 and is not counted either (it is no guess).

use std::net::{IpAddr, Ipv4Addr};
use std::time::SystemTime;

use base64::Engine as _;
use http::{Response, StatusCode};
use pingora::protocols::http::ServerSession;

use super::{error, Admin};
use crate::keys::{unix_millis, KeyDenial, KeyId};
use crate::ops::ClientAddr;

/// Who called, once authenticated.
#[derive(Debug, Clone)]
pub struct AdminCaller {
    pub id: KeyId,
    pub user: String,
    pub client: Option<ClientAddr>,
}

/// The realm browsers show when they ask for the key.
const REALM: &str = r#"Basic realm="ai-gateway", charset="UTF-8""#;

/// The key in `Authorization`: `Bearer <key>`, or with `basic`,
/// `Basic base64(<any user>:<key>)`.
fn presented(value: Option<&[u8]>, basic: bool) -> Option<Vec<u8>> {
    let value = std::str::from_utf8(value?).ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.as_bytes().to_vec());
    }
    if basic && scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        return decoded.get(colon + 1..).map(<[u8]>::to_vec);
    }
    None
}

fn unauthorized(basic: bool, message: &str) -> Response<Vec<u8>> {
    let mut r = error(StatusCode::UNAUTHORIZED, message);
    let challenge = if basic {
        http::HeaderValue::from_static(REALM)
    } else {
        http::HeaderValue::from_static(r#"Bearer realm="ai-gateway""#)
    };
    r.headers_mut()
        .insert(http::header::WWW_AUTHENTICATE, challenge);
    r
}

impl Admin {
    /// The admin key's holder, or the answer to give instead (401, 403,
    /// 429). `basic`: the page, which also takes HTTP Basic.
    pub(super) fn authenticate(
        &self,
        session: &ServerSession,
        basic: bool,
    ) -> Result<AdminCaller, Box<Response<Vec<u8>>>> {
        let peer = session.client_addr().and_then(|a| a.as_inet()).copied();
        let ip = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip());
        let now = SystemTime::now();
        let now_ms = unix_millis(now);
        let now_s = u32::try_from(now_ms / 1000).unwrap_or(u32::MAX);
        let live = self.live.load();
        let spec = &live.snapshot.config.failed_key_throttle;
        let failed = &self.carried.failed_keys;
        let tag = failed.tag(ip);
        let blocked = if spec.enabled {
            failed.blocked(tag, now_s)
        } else {
            None
        };
        let key = presented(
            session
                .req_header()
                .headers
                .get(http::header::AUTHORIZATION)
                .map(http::HeaderValue::as_bytes),
            basic,
        );
        let verdict = live
            .snapshot
            .keys
            .check_admin(key.as_deref(), now_ms)
            .and_then(|(id, user)| match &self.cluster {
                Some(c) if c.is_revoked(id) => Err(KeyDenial::Disabled),
                _ => Ok((id, user)),
            });
        if let Some(retry_after) = blocked {
            if !matches!(verdict, Ok((id, _)) if failed.known(tag, id, now_s)) {
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many failed key checks from this address; try again later",
                );
                r.headers_mut()
                    .insert(http::header::RETRY_AFTER, retry_after.into());
                return Err(Box::new(r));
            }
        }
        match verdict {
            Ok((id, user)) => {
                if spec.enabled {
                    failed.succeeded(tag, id, now_s);
                }
                Ok(AdminCaller {
                    id,
                    user: user.name.to_string(),
                    client: peer.map(ClientAddr::Peer),
                })
            }
            Err(KeyDenial::Missing) => {
                Err(Box::new(unauthorized(basic, "an admin key is required")))
            }
            Err(KeyDenial::WrongService) => Err(Box::new(error(
                StatusCode::FORBIDDEN,
                "this key is not an admin key",
            ))),
            Err(_) => {
                if spec.enabled {
                    if let Some(c) = &self.cluster {
                        c.key_failed(ip, spec);
                    }
                    if failed.failed(ip, now_s, spec) {
                        log::warn!(
                            "client {ip} throttled on the admin listener: blocked for {}s after {} failed key checks",
                            spec.cooldown.as_secs(),
                            spec.max_failures
                        );
                    }
                }
                Err(Box::new(unauthorized(basic, "invalid admin key")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_from_bearer_and_basic() {
        assert_eq!(
            presented(Some(b"Bearer agw_x"), false).as_deref(),
            Some(&b"agw_x"[..])
        );
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("admin:agw_y:z")
        );
        assert_eq!(
            presented(Some(basic.as_bytes()), true).as_deref(),
            Some(&b"agw_y:z"[..])
        );
        assert_eq!(presented(Some(basic.as_bytes()), false), None);
        assert_eq!(presented(Some(b"Basic !!!"), true), None);
        assert_eq!(presented(Some(b"Bearer"), true), None);
        assert_eq!(presented(None, true), None);
        assert_eq!(presented(Some(&[0xff, 0x20, 0x41]), true), None);
    }
}
