//! The client's IP address, for per-IP limits and logs.
//!
//! Prevents: a client choosing its own identity for rate limiting by sending
//! `X-Forwarded-For: <random>`. The header is believed only when the TCP peer is one of
//! `TRUSTED_PROXIES` (your load balancer), and then only up to the first hop that is not a
//! trusted proxy itself: the rightmost untrusted address is the client.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;
use ipnet::IpNet;

/// The resolved client address, in the request extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(networks: Vec<IpNet>) -> Self {
        TrustedProxies(networks)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|network| network.contains(&ip))
    }

    /// The client address for a request that arrived from `peer`. IPv4-mapped IPv6 addresses
    /// (`::ffff:10.0.0.5`, what a dual-stack listener sees) count as the IPv4 address they are.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.iter().rev() {
            // A hop we cannot read ends the walk: what lies left of it is the client's to invent.
            let Some(ip) = parse_hop(hop) else {
                return peer;
            };
            if !self.trusts(ip) {
                return ip;
            }
        }
        hops.first().and_then(|hop| parse_hop(hop)).unwrap_or(peer)
    }
}

/// `203.0.113.1`, `203.0.113.1:5555`, `2001:db8::1` or `[2001:db8::1]:5555`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|addr| addr.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

/// Puts [`ClientIp`] in the request extensions.
pub fn resolve(trusted: &TrustedProxies, mut request: Request) -> Request {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip());
    let client = trusted.client_ip(peer, request.headers());
    request.extensions_mut().insert(ClientIp(client));
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(forwarded: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", forwarded.parse().unwrap());
        headers
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_proxies() {
        let proxies = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let stranger: IpAddr = "198.51.100.9".parse().unwrap();
        assert_eq!(
            proxies.client_ip(stranger, &headers("203.0.113.1")),
            stranger,
            "spoofed header ignored"
        );
        assert_eq!(
            proxies.client_ip(proxy, &headers("203.0.113.1")),
            "203.0.113.1".parse::<IpAddr>().unwrap()
        );
        // The client prepended a fake hop; the rightmost untrusted address is the real client.
        assert_eq!(
            proxies.client_ip(proxy, &headers("1.1.1.1, 203.0.113.1, 10.0.0.7")),
            "203.0.113.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(proxies.client_ip(proxy, &HeaderMap::new()), proxy);
        // Proxies that append the port, and dual-stack listeners, are read correctly.
        assert_eq!(
            proxies.client_ip(proxy, &headers("6.6.6.6, 203.0.113.1:5555")),
            "203.0.113.1".parse::<IpAddr>().unwrap()
        );
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().unwrap();
        assert_eq!(
            proxies.client_ip(mapped, &headers("203.0.113.1")),
            "203.0.113.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(proxies.client_ip(stranger, &HeaderMap::new()), stranger);
        // An unreadable hop stops the walk: the client cannot hide behind garbage.
        assert_eq!(
            proxies.client_ip(proxy, &headers("6.6.6.6, garbage")),
            proxy
        );
    }
}
