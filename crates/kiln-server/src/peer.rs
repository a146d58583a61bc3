//! Who is calling: the client address that rate limits and the audit log
//! use. It is the TCP peer's address (axum's `ConnectInfo`, which
//! [`crate::run`] provides); requests built in tests without a connection
//! count as the unspecified address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::ConnectInfo;
use axum::http::request::Parts;

/// The address of the client that sent `parts`.
pub fn client_ip(parts: &Parts) -> IpAddr {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}
