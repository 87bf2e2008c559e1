//! Where a worker's gradient ring listens. Peers dial the address the listener binds (it
//! travels to them in `Join`), so it must be one address of this host on the network the
//! ring is meant to use: never the any-address, which would listen on every interface and
//! give peers nothing to dial.

use anyhow::{bail, Context, Result};
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use xkd_collective::RingListener;

/// How the ring's address is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingHost {
    /// The address this host uses to reach the coordinator (the default).
    TowardsCoordinator,
    /// A host name or address of this host (`--collective-host`).
    Named(String),
    /// The address of a network interface (`--collective-interface`): one name for every
    /// node of a cluster, as `NCCL_SOCKET_IFNAME` is for NCCL.
    Interface(String),
}

impl RingHost {
    /// Binds the ring's listener (port chosen by the system) where this choice says.
    pub fn bind(&self, coordinator: SocketAddr) -> Result<RingListener> {
        let addr = match self {
            RingHost::TowardsCoordinator => SocketAddr::new(route_to(coordinator)?, 0).to_string(),
            RingHost::Named(host) => match host.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, 0).to_string(),
                Err(_) => format!("{host}:0"),
            },
            RingHost::Interface(name) => SocketAddr::new(interface_address(name)?, 0).to_string(),
        };
        let listener = RingListener::bind(&addr)
            .with_context(|| format!("binding the gradient ring on {addr} ({self})"))?;
        if listener.local_addr().ip().is_unspecified() {
            bail!(
                "the gradient ring would listen on every interface ({}, from {self}), and peers \
                 could not dial that address: give --collective-host an address of this host on \
                 the ring's network, or --collective-interface its interface",
                listener.local_addr()
            );
        }
        Ok(listener)
    }
}

impl std::fmt::Display for RingHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingHost::TowardsCoordinator => f.write_str("the route to the coordinator"),
            RingHost::Named(host) => write!(f, "--collective-host {host}"),
            RingHost::Interface(name) => write!(f, "--collective-interface {name}"),
        }
    }
}

/// The local address this host would use to reach `addr` (no packet is sent).
fn route_to(addr: SocketAddr) -> Result<IpAddr> {
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind)?;
    socket
        .connect(addr)
        .with_context(|| format!("no route to the coordinator at {addr}"))?;
    Ok(socket.local_addr()?.ip())
}

/// The IPv4 address of interface `name`, or its first IPv6 address that is not link-local
/// when it has none (a link-local one needs a scope a peer's address cannot carry here).
pub fn interface_address(name: &str) -> Result<IpAddr> {
    let all = interface_addresses().context("listing this host's network interfaces")?;
    let mine: Vec<IpAddr> = all
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, ip)| *ip)
        .collect();
    let routable_v6 = |ip: &IpAddr| match ip {
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        IpAddr::V4(_) => false,
    };
    if let Some(v4) = mine.iter().find(|ip| ip.is_ipv4()) {
        return Ok(*v4);
    }
    if let Some(v6) = mine.iter().find(|ip| routable_v6(ip)) {
        return Ok(*v6);
    }
    let mut names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    bail!(
        "--collective-interface {name}: no such interface with an IPv4 or routable IPv6 \
         address on this host (it has: {})",
        names.join(", ")
    )
}

/// Every (interface name, IP address) pair of this host, in the system's order.
fn interface_addresses() -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs stores the head of a list it allocates into `head` (or fails and
    // stores nothing); the list is freed once below, after the last read of it.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of that list, alive until freeifaddrs.
        let entry = unsafe { &*cursor };
        // SAFETY: a non-null ifa_name is a NUL-terminated string, and a non-null ifa_addr a
        // sockaddr whose family says its length, both owned by the list.
        let ip = unsafe { ip_of(entry.ifa_addr) };
        if let (Some(ip), false) = (ip, entry.ifa_name.is_null()) {
            let name = unsafe { CStr::from_ptr(entry.ifa_name) };
            found.push((name.to_string_lossy().into_owned(), ip));
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and nothing of the list is used after this.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// The IP address in `addr`, when it is an IPv4 or IPv6 one.
///
/// # Safety
/// `addr` is null or points to a sockaddr at least as long as its family's struct.
unsafe fn ip_of(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    match i32::from((*addr).sa_family) {
        libc::AF_INET => {
            let v4 = &*(addr as *const libc::sockaddr_in);
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            let v6 = &*(addr as *const libc::sockaddr_in6);
            Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_interface_has_its_address() {
        assert_eq!(
            interface_address("lo").unwrap(),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
    }

    #[test]
    fn an_unknown_interface_is_named_with_those_there_are() {
        let error = format!("{:#}", interface_address("nosuch0").unwrap_err());
        assert!(error.contains("nosuch0"), "{error}");
        assert!(error.contains("lo"), "{error}");
    }

    #[test]
    fn the_ring_binds_the_chosen_address_and_never_the_any_address() {
        let coordinator: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for choice in [
            RingHost::TowardsCoordinator,
            RingHost::Named("127.0.0.1".into()),
            RingHost::Named("localhost".into()),
            RingHost::Interface("lo".into()),
        ] {
            let listener = choice.bind(coordinator).unwrap();
            assert!(listener.local_addr().ip().is_loopback(), "{choice}");
            assert_ne!(listener.local_addr().port(), 0, "{choice}");
        }
        let error = RingHost::Named("0.0.0.0".into())
            .bind(coordinator)
            .unwrap_err();
        let error = format!("{error:#}");
        assert!(error.contains("every interface"), "{error}");
        assert!(error.contains("--collective-host 0.0.0.0"), "{error}");
    }
}
