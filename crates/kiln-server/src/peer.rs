//! Who is calling: the client address that rate limits and the audit log
//! use. It is the TCP peer's address (axum's `ConnectInfo`, which every
//! listener [`crate::run`] and its siblings serve provides), unless that
//! peer is one of `[api] trusted_proxies`: then `X-Forwarded-For` names
//! the client, read from the right, and the first hop that is not itself a
//! trusted proxy is the client. Anyone else's `X-Forwarded-For` is ignored:
//! a client writes what it likes there. Requests built in tests without a
//! connection count as the unspecified address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use ipnet::IpNet;

/// The proxies whose `X-Forwarded-For` counts, as a request extension
/// (the router adds it from the config).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(pub Arc<Vec<IpNet>>);

/// [`client_ip`] as a handler argument.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<ClientIp, Self::Rejection> {
        Ok(ClientIp(client_ip(parts)))
    }
}

/// The address of the client that sent `parts`.
pub fn client_ip(parts: &Parts) -> IpAddr {
    let Some(ConnectInfo(addr)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
        return IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    };
    match parts.extensions.get::<TrustedProxies>() {
        Some(TrustedProxies(trusted)) if !trusted.is_empty() => client_behind(addr.ip(), &parts.headers, trusted),
        _ => addr.ip(),
    }
}

/// Pure: the client's address, given the TCP peer, the request's headers
/// and the trusted proxies. Hops are read right to left (each proxy
/// appends the address it received from); the first one not trusted is
/// the client. A hop that is not an address stops the walk at the last
/// good one: whatever is left of it was written by someone untrusted.
pub fn client_behind(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(&canonical(*ip)));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(s) => s.split(',').collect::<Vec<_>>(),
            // Not text: a hop that is not an address.
            Err(_) => vec![""],
        })
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match parse_hop(hop) {
            Some(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

/// An `X-Forwarded-For` hop: `192.0.2.1`, `2001:db8::1`, and the forms
/// with a port some proxies write (`192.0.2.1:4711`, `[2001:db8::1]:4711`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    hop.parse::<SocketAddr>().ok().map(|a| canonical(a.ip()))
}

/// An IPv4 address seen on a dual-stack socket (`::ffff:192.0.2.1`) is
/// the IPv4 address, so that a list of IPv4 CIDRs matches it.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_behind(ip("192.0.2.9"), &xff(&["203.0.113.5"]), &trusted),
            ip("192.0.2.9")
        );
        assert_eq!(
            client_behind(ip("192.0.2.9"), &xff(&["10.0.0.1"]), &[]),
            ip("192.0.2.9")
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let trusted = nets(&["10.0.0.0/8", "2001:db8:ff::/48"]);
        let peer = ip("10.0.0.2");
        let cases: &[(&[&str], &str)] = &[
            // One proxy.
            (&["203.0.113.5"], "203.0.113.5"),
            // The client forged a hop on the left: the proxy's hop wins.
            (&["198.51.100.66, 203.0.113.5"], "203.0.113.5"),
            // Two proxies of ours, the outer one appended the client.
            (&["203.0.113.5, 10.9.9.9"], "203.0.113.5"),
            // Several headers read as one list, in order.
            (&["198.51.100.66", "203.0.113.5", "10.9.9.9"], "203.0.113.5"),
            // Ports and IPv6.
            (&["203.0.113.5:4711"], "203.0.113.5"),
            (&["[2001:db8::7]:443, 2001:db8:ff::1"], "2001:db8::7"),
            // All hops trusted: the leftmost is as far as we can see.
            (&["10.1.1.1, 10.2.2.2"], "10.1.1.1"),
            // No header: the proxy itself.
            (&[], "10.0.0.2"),
            // Garbage stops the walk at the last address we could read.
            (&["203.0.113.5, not-an-ip"], "10.0.0.2"),
            (&["not-an-ip, 10.3.3.3"], "10.3.3.3"),
            (&["203.0.113.5, "], "10.0.0.2"),
        ];
        for (headers, want) in cases {
            assert_eq!(
                client_behind(peer, &xff(headers), &trusted),
                ip(want),
                "X-Forwarded-For {headers:?}"
            );
        }
    }

    #[test]
    fn a_mapped_ipv4_peer_matches_ipv4_cidrs() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_behind(ip("::ffff:10.0.0.2"), &xff(&["203.0.113.5"]), &trusted),
            ip("203.0.113.5")
        );
    }

    #[test]
    fn requests_without_a_connection_are_unspecified() {
        let (parts, ()) = axum::http::Request::new(()).into_parts();
        assert_eq!(client_ip(&parts), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
}
