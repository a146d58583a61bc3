//! Listening for LLDP frames during discovery: one raw packet socket on
//! all interfaces for a few seconds, keeping the first frame that parses
//! on each NIC asked about. Switches send LLDP every 30 s by default, so
//! the wait is a trade between discovery time and finding the port
//! (`kiln.lldp_secs=` on the kernel command line).
//!
//! The socket takes every frame (`ETH_P_ALL`, as tcpdump does) and keeps
//! those with ethertype 0x88cc: a socket per ethertype would miss frames
//! with an 802.1Q tag. Each NIC is asked to pass LLDP's group address
//! (01:80:c2:00:00:0e) up (`PACKET_ADD_MEMBERSHIP`, as lldpd does): a NIC
//! filters multicast it was not asked for (QEMU's virtio-net does). A NIC
//! whose firmware runs its own LLDP agent (Intel's i40e and ice by
//! default) may still swallow the frames.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use kiln_types::MacAddr;
use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    AddressFamily, LinkAddr, SockFlag, SockProtocol, SockType, recvfrom, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

use super::{LldpNeighbor, parse_frame};

/// A NIC to listen on: its kernel interface index and MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    pub ifindex: i32,
    pub mac: MacAddr,
}

/// The first LLDP neighbour seen on each NIC of `nics` within `wait`
/// (less when every NIC has one). Needs root (`CAP_NET_RAW`).
pub fn capture(nics: &[Listen], wait: Duration) -> std::io::Result<BTreeMap<MacAddr, LldpNeighbor>> {
    let mut found = BTreeMap::new();
    if nics.is_empty() || wait.is_zero() {
        return Ok(found);
    }
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )?;
    for nic in nics {
        join_lldp_group(&fd, nic.ifindex)?;
    }
    let end = Instant::now() + wait;
    let mut buf = vec![0u8; 9216];
    while found.len() < nics.len() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // At least 1 ms: a zero timeout means "block forever".
        let timeout = TimeVal::new(left.as_secs() as _, left.subsec_micros().max(1000) as _);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
        let (n, from) = match recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut buf) {
            Ok(got) => got,
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let Some(nic) = from.and_then(|a| nics.iter().find(|l| l.ifindex == a.ifindex() as i32)) else {
            continue;
        };
        if found.contains_key(&nic.mac) {
            continue;
        }
        // Everything that is not LLDP (the agent's own traffic) is
        // dropped here; so is an LLDP frame that does not parse.
        if let Ok(neighbor) = parse_frame(&buf[..n]) {
            found.insert(nic.mac, neighbor);
        }
    }
    Ok(found)
}

/// LLDP's "nearest bridge" group address.
const LLDP_GROUP: [u8; 6] = [0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e];

/// Has interface `ifindex` pass LLDP's group address up for as long as
/// `fd` is open. nix has no wrapper for this socket option, so it is the
/// one call here made through libc directly.
#[allow(unsafe_code)]
fn join_lldp_group(fd: &OwnedFd, ifindex: i32) -> std::io::Result<()> {
    let mut address = [0u8; 8];
    address[..6].copy_from_slice(&LLDP_GROUP);
    let request = libc::packet_mreq {
        mr_ifindex: ifindex,
        mr_type: libc::PACKET_MR_MULTICAST as u16,
        mr_alen: 6,
        mr_address: address,
    };
    // SAFETY: `fd` is an open packet socket; `request` is a complete
    // `packet_mreq` that lives across the call, and its size is what is
    // passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            std::ptr::from_ref(&request).cast(),
            std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
