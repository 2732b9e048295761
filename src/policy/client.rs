//! Which address a request comes from: the socket's peer, unless that peer
//! is a trusted proxy, in which case `X-Forwarded-For` names the client.

use std::net::IpAddr;

use http::HeaderMap;

use crate::config::{any_contains, IpRange};

/// The client's address. For a peer in `trusted`, `X-Forwarded-For` is read
/// from the right (each proxy appends the address it received from),
/// skipping trusted hops; the first untrusted one is the client. A hop that
/// is not an address ends the walk at the last trusted one: what lies left
/// of it cannot be vouched for. A direct client's `X-Forwarded-For` is
/// never read, so it cannot claim another address.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpRange]) -> IpAddr {
    if trusted.is_empty() || !any_contains(trusted, peer) {
        return peer;
    }
    let mut client = peer;
    // Later header lines were appended by later hops: walk them last first.
    let lines: Vec<&[u8]> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    for line in lines.iter().rev() {
        for hop in line.rsplit(|b| *b == b',') {
            let Some(ip) = std::str::from_utf8(hop)
                .ok()
                .and_then(|h| h.trim().parse::<IpAddr>().ok())
            else {
                return client;
            };
            client = ip;
            if !any_contains(trusted, ip) {
                return ip;
            }
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ranges(list: &[&str]) -> Vec<IpRange> {
        list.iter().map(|s| IpRange::parse(s).unwrap()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn only_a_trusted_peer_is_believed() {
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let h = xff(&["192.0.2.7"]);
        assert_eq!(client_ip(peer, &h, &[]), peer);
        assert_eq!(client_ip(peer, &h, &ranges(&["10.0.0.0/8"])), peer);
        assert_eq!(
            client_ip(peer, &h, &ranges(&["127.0.0.1"])),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn trusted_hops_are_skipped_from_the_right() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = ranges(&["10.0.0.0/8"]);
        let h = xff(&["198.51.100.1, 192.0.2.7, 10.0.0.2"]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "192.0.2.7".parse::<IpAddr>().unwrap(),
            "the spoofable left part is not read"
        );
        let h = xff(&["192.0.2.7", "10.0.0.2"]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
        let h = xff(&["garbage, 10.0.0.3"]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "10.0.0.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted), peer);
    }
}
