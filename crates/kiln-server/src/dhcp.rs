//! The DHCPv4 listener: thin I/O around `kiln_boot::dhcp::handle`.
//!
//! One UDP socket per configured interface, bound to that interface
//! (SO_BINDTODEVICE) on port 67: the socket a packet arrives on says which
//! interface it came in on, which is what IP_PKTINFO would tell a single
//! wildcard socket, and replies leave through the same interface. For every
//! request the listener looks up the facts (machine by option 82 or MAC,
//! the client's lease, which pool addresses are free), calls the pure
//! handler, makes a lease durable in the store *before* sending the ACK, and
//! sends the reply to the relay, the client, or the broadcast address.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use anyhow::Context;
use chrono::{Duration, Utc};
use dhcproto::Encodable;
use dhcproto::v4::{Message, MessageType};
use kiln_boot::decision::BootPolicy;
use kiln_boot::dhcp::{Effect, Facts, Lease, LeaseState, ServerConfig, Subnet, decode, handle, request_identity};
use kiln_boot::firmware::FirstStageFiles;
use kiln_store::Store;
use tokio::net::UdpSocket;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::{BootSettings, DhcpSettings};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// How long an offered address waits for its client's REQUEST.
const OFFER_HOLD_SECONDS: i64 = 30;
/// How long a declined address stays out of the pool.
const DECLINE_HOLD_MINUTES: i64 = 10;

/// Leases as committed to the store, by address and by client, and where
/// each subnet's pool allocation resumes.
#[derive(Debug, Default)]
struct Leases {
    by_ip: HashMap<Ipv4Addr, Lease>,
    /// Bound leases by client (one address per client).
    by_mac: HashMap<kiln_types::MacAddr, Ipv4Addr>,
    cursor: HashMap<String, Ipv4Addr>,
    /// Addresses offered and not yet requested, held for their client for
    /// `OFFER_HOLD_SECONDS`: without the hold, DISCOVERs arriving together
    /// were offered the same free address and all but one were NAKed
    /// (bench/dhcp).
    offers: HashMap<Ipv4Addr, (kiln_types::MacAddr, chrono::DateTime<Utc>)>,
    /// The pending offer of each client (at most one), so that neither
    /// finding nor replacing it scans every offer.
    offer_by_mac: HashMap<kiln_types::MacAddr, Ipv4Addr>,
}

impl Leases {
    fn load(leases: Vec<Lease>) -> Leases {
        let mut l = Leases::default();
        for lease in leases {
            l.insert(lease);
        }
        l
    }

    /// `mac`'s live bound lease in `subnet`.
    fn of(&self, mac: kiln_types::MacAddr, subnet: &Subnet) -> Option<&Lease> {
        let now = Utc::now();
        let ip = self.by_mac.get(&mac)?;
        self.by_ip
            .get(ip)
            .filter(|l| l.mac == mac && l.state == LeaseState::Bound && l.is_live(now) && subnet.contains(l.ip))
    }

    fn insert(&mut self, lease: Lease) {
        if lease.state == LeaseState::Bound
            && let Some(old) = self.by_mac.insert(lease.mac, lease.ip)
            && old != lease.ip
        {
            self.by_ip.remove(&old);
        }
        self.by_ip.insert(lease.ip, lease);
    }

    /// `mac`'s pending offer, as a lease-shaped fact for the handler.
    fn offer_of(&self, mac: kiln_types::MacAddr, subnet: &Subnet, now: chrono::DateTime<Utc>) -> Option<Lease> {
        let ip = *self.offer_by_mac.get(&mac)?;
        let (_, until) = self.offers.get(&ip).filter(|(m, until)| *m == mac && *until > now)?;
        subnet.contains(ip).then_some(Lease {
            ip,
            mac,
            state: LeaseState::Bound,
            machine_id: None,
            hostname: None,
            expires_at: *until,
        })
    }

    /// Whether `ip` is held by an offer to another client.
    fn offered_to_other(&self, ip: Ipv4Addr, mac: kiln_types::MacAddr, now: chrono::DateTime<Utc>) -> bool {
        self.offers.get(&ip).is_some_and(|(m, until)| *m != mac && *until > now)
    }

    fn hold_offer(&mut self, ip: Ipv4Addr, mac: kiln_types::MacAddr, now: chrono::DateTime<Utc>) {
        // Lapsed offers are dropped now and then, not on every packet.
        if self.offers.len() >= 1024 && self.offers.len().is_power_of_two() {
            self.offers.retain(|_, (_, until)| *until > now);
            let offers = &self.offers;
            self.offer_by_mac
                .retain(|m, ip| offers.get(ip).is_some_and(|(holder, _)| holder == m));
        }
        self.drop_offer_of(mac);
        self.offers
            .insert(ip, (mac, now + Duration::seconds(OFFER_HOLD_SECONDS)));
        self.offer_by_mac.insert(mac, ip);
    }

    /// Forgets `mac`'s pending offer (replaced, or turned into a lease).
    fn drop_offer_of(&mut self, mac: kiln_types::MacAddr) {
        if let Some(old) = self.offer_by_mac.remove(&mac)
            && self.offers.get(&old).is_some_and(|(m, _)| *m == mac)
        {
            self.offers.remove(&old);
        }
    }

    fn remove(&mut self, ip: Ipv4Addr) {
        if let Some(l) = self.by_ip.remove(&ip)
            && self.by_mac.get(&l.mac) == Some(&ip)
        {
            self.by_mac.remove(&l.mac);
        }
    }
}

/// Shared by the sockets of all interfaces.
struct Service {
    store: Store,
    settings: DhcpSettings,
    boot: BootSettings,
    listen_port: u16,
    leases: Mutex<Leases>,
    reserved: Mutex<Reserved>,
}

/// The inventory's IPv4 addresses (never handed out from a pool), copied
/// from the store and reloaded only when the machines generation moved.
#[derive(Debug, Default)]
struct Reserved {
    generation: Option<i64>,
    addresses: std::collections::HashSet<Ipv4Addr>,
}

impl Service {
    /// The current inventory addresses: one primary-key read, and a reload
    /// only after a machine changed.
    async fn reserved(&self) -> anyhow::Result<tokio::sync::MutexGuard<'_, Reserved>> {
        let generation = self.store.machines_generation().await?;
        let mut r = self.reserved.lock().await;
        if r.generation != Some(generation) {
            r.addresses = self.store.reserved_ipv4s().await?.into_iter().collect();
            r.generation = Some(generation);
        }
        Ok(r)
    }
}

/// The first IPv4 address of interface `name`.
fn interface_ipv4(name: &str) -> anyhow::Result<Ipv4Addr> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing network interfaces")?;
    for a in addrs {
        if a.interface_name == name
            && let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in())
        {
            return Ok(sin.ip());
        }
    }
    anyhow::bail!("interface `{name}` does not exist or has no IPv4 address: [dhcp] interfaces names it")
}

fn bind(interface: &str) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(interface.as_bytes()))
        .with_context(|| format!("binding a socket to interface `{interface}` (needs root or CAP_NET_RAW)"))?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SERVER_PORT)).into())
        .with_context(|| {
            format!("binding UDP port {SERVER_PORT} on `{interface}` (needs root or CAP_NET_BIND_SERVICE)")
        })?;
    Ok(UdpSocket::from_std(s.into())?)
}

/// Serves DHCP on every configured interface until `shutdown`.
pub async fn run(
    store: Store,
    settings: DhcpSettings,
    boot: BootSettings,
    listen_port: u16,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let loaded = store.load_leases().await.context("loading DHCP leases")?;
    if loaded.quarantined > 0 {
        tracing::warn!(
            count = loaded.quarantined,
            "unreadable DHCP leases were moved to dhcp_lease_quarantine"
        );
    }
    let leases = Leases::load(loaded.leases);
    let service = Arc::new(Service {
        store,
        settings,
        boot,
        listen_port,
        leases: Mutex::new(leases),
        reserved: Mutex::new(Reserved::default()),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for iface in service.settings.interfaces.clone() {
        let ip = interface_ipv4(&iface)?;
        let socket = bind(&iface)?;
        tracing::info!(interface = %iface, address = %ip, mode = ?service.settings.mode, "DHCP listening");
        tasks.spawn(serve_interface(service.clone(), iface, ip, socket, shutdown.clone()));
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a DHCP task panicked")??;
    }
    Ok(())
}

async fn serve_interface(
    service: Arc<Service>,
    iface: String,
    server_ip: Ipv4Addr,
    socket: UdpSocket,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 1500];
    loop {
        let (len, from) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(interface = %iface, error = %e, "DHCP receive failed");
                    continue;
                }
            },
        };
        let Some(msg) = decode(&buf[..len]) else {
            tracing::debug!(%from, "ignoring a malformed DHCP packet");
            continue;
        };
        if let Err(e) = answer(&service, server_ip, &socket, &msg).await {
            // A failed lease write means no ACK: the client retries, and no
            // acknowledged lease is ever missing from the store.
            tracing::error!(interface = %iface, error = format!("{e:#}"), "DHCP request not answered");
        }
    }
}

async fn answer(service: &Service, server_ip: Ipv4Addr, socket: &UdpSocket, msg: &Message) -> anyhow::Result<()> {
    let Some((mac, circuit, remote)) = request_identity(msg) else {
        return Ok(());
    };
    let s = &service.settings;
    let machine = service
        .store
        .find_machine_by_nic(mac, circuit.as_deref(), remote.as_deref())
        .await?;
    let giaddr = msg.giaddr();
    let locator = if giaddr.is_unspecified() { server_ip } else { giaddr };
    let subnet = s.subnets.iter().find(|sub| sub.contains(locator));
    let needs_pool = matches!(
        msg.opts().msg_type(),
        Some(MessageType::Discover | MessageType::Request)
    ) && machine
        .as_ref()
        .and_then(|m| m.ipv4)
        .is_none_or(|ip| subnet.is_none_or(|sub| !sub.contains(ip)));
    // Pool checks only; a client with an inventory address needs none.
    let reserved = if needs_pool {
        Some(service.reserved().await?)
    } else {
        None
    };
    let cfg = ServerConfig {
        mode: s.mode,
        server_ip,
        http_base: service
            .boot
            .http_base
            .clone()
            .unwrap_or_else(|| format!("http://{server_ip}:{}", service.listen_port)),
        files: FirstStageFiles {
            bios: s.bios_file.clone(),
            uefi: s.uefi_file.clone(),
        },
        policy: BootPolicy {
            discovery: service.boot.discovery,
        },
    };
    let mut leases = service.leases.lock().await;
    let now = Utc::now();
    let own = subnet.and_then(|sub| leases.of(mac, sub).cloned().or_else(|| leases.offer_of(mac, sub, now)));
    let outcome = {
        let is_free = |ip: Ipv4Addr| {
            !reserved.as_ref().is_some_and(|r| r.addresses.contains(&ip))
                && !leases.offered_to_other(ip, mac, now)
                && leases
                    .by_ip
                    .get(&ip)
                    .is_none_or(|l| !l.is_live(now) || (l.mac == mac && l.state == LeaseState::Bound))
        };
        let facts = Facts {
            subnet,
            machine: machine.as_ref(),
            arm: None,
            lease: own.as_ref(),
            is_free: &is_free,
            pool_cursor: subnet.and_then(|sub| leases.cursor.get(&sub.network).copied()),
        };
        handle(&cfg, msg, &facts, now)
    };
    tracing::info!(%mac, note = %outcome.note, "dhcp");
    if let Some(reply) = &outcome.reply
        && reply.opts().msg_type() == Some(MessageType::Offer)
        && !reply.yiaddr().is_unspecified()
    {
        let ip = reply.yiaddr();
        leases.hold_offer(ip, mac, now);
        if let Some(sub) = subnet.filter(|sub| sub.in_pool(ip)) {
            leases
                .cursor
                .insert(sub.network.clone(), Ipv4Addr::from(u32::from(ip).wrapping_add(1)));
        }
    }
    match outcome.effect {
        Effect::None => {}
        Effect::Commit(lease) => {
            service.store.commit_lease(&lease).await.context("writing the lease")?;
            leases.drop_offer_of(lease.mac);
            if let Some(sub) = subnet.filter(|sub| sub.in_pool(lease.ip)) {
                leases
                    .cursor
                    .insert(sub.network.clone(), Ipv4Addr::from(u32::from(lease.ip).wrapping_add(1)));
            }
            leases.insert(lease);
        }
        Effect::Release { ip, mac } => {
            service.store.release_lease(ip, mac).await?;
            leases.remove(ip);
        }
        Effect::Decline { ip, mac } => {
            let hold = Lease {
                ip,
                mac,
                state: LeaseState::Declined,
                machine_id: None,
                hostname: None,
                expires_at: now + Duration::minutes(DECLINE_HOLD_MINUTES),
            };
            service.store.commit_lease(&hold).await?;
            leases.insert(hold);
        }
    }
    drop(leases);
    if let Some(reply) = outcome.reply {
        let dest = if !giaddr.is_unspecified() {
            SocketAddrV4::new(giaddr, SERVER_PORT)
        } else if !msg.ciaddr().is_unspecified() && !msg.flags().broadcast() {
            SocketAddrV4::new(msg.ciaddr(), CLIENT_PORT)
        } else {
            // The client has no address yet: broadcast on the interface
            // this socket is bound to.
            SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT)
        };
        socket
            .send_to(&reply.to_vec()?, dest)
            .await
            .with_context(|| format!("sending to {dest}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> Subnet {
        Subnet {
            network: "10.0.0.0/24".into(),
            pool: Some(["10.0.0.10".parse().unwrap(), "10.0.0.20".parse().unwrap()]),
            routers: vec![],
            dns: vec![],
            domain: None,
            lease_time: 600,
        }
    }

    #[test]
    fn an_offer_holds_its_address_for_its_client_only() {
        let (a, b): (kiln_types::MacAddr, kiln_types::MacAddr) = (
            "52:54:00:00:00:0a".parse().unwrap(),
            "52:54:00:00:00:0b".parse().unwrap(),
        );
        let ip: Ipv4Addr = "10.0.0.10".parse().unwrap();
        let now = Utc::now();
        let mut leases = Leases::default();
        leases.hold_offer(ip, a, now);
        assert!(leases.offered_to_other(ip, b, now), "b may not be offered a's address");
        assert!(!leases.offered_to_other(ip, a, now));
        assert_eq!(leases.offer_of(a, &subnet(), now).map(|l| l.ip), Some(ip));
        assert_eq!(leases.offer_of(b, &subnet(), now), None);
        // A new offer to the same client replaces its old one.
        let other: Ipv4Addr = "10.0.0.11".parse().unwrap();
        leases.hold_offer(other, a, now);
        assert!(!leases.offered_to_other(ip, b, now));
        // Offers lapse.
        let later = now + Duration::seconds(OFFER_HOLD_SECONDS + 1);
        assert!(!leases.offered_to_other(other, b, later));
        assert_eq!(leases.offer_of(a, &subnet(), later), None);
    }
}
