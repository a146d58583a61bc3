//! The DHCPv4 listener: thin I/O around `kiln_boot::dhcp::handle`.
//!
//! One UDP socket per configured interface, bound to that interface
//! (SO_BINDTODEVICE) on port 67 (`[dhcp] port`): the socket a packet
//! arrives on says which interface it came in on, which is what IP_PKTINFO
//! would tell a single wildcard socket, and replies leave through the same
//! interface. Replies to a relay go to its port 67, or to the port it sent
//! from when it asks so with RFC 8357's relay source port sub-option (how
//! the simulated fleet's relay works unprivileged on loopback). In proxy
//! mode a second socket per interface is the PXE boot server (port 4011),
//! where a client that got its address elsewhere asks for its boot file.
//!
//! No packet waits for the database. The facts a request needs — the
//! machine (by option 82 or MAC), the client's lease, which pool addresses
//! are free — come from memory: the inventory is copied in and reloaded when
//! a machine changes, and the lease table is loaded at start and kept. A
//! lease change goes to one writer task that commits the changes of many
//! clients in one transaction (group commit) and sends each ACK only after
//! the commit: an acknowledged lease is always in the store.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use anyhow::Context;
use chrono::{Duration, Utc};
use dhcproto::Encodable;
use dhcproto::v4::{Message, MessageType};
use kiln_boot::decision::BootPolicy;
use kiln_boot::dhcp::{Effect, Facts, Lease, LeaseState, ServerConfig, Subnet, decode, handle, request_identity};
use kiln_boot::firmware::FirstStageFiles;
use kiln_store::{LeaseWrite, Store};
use kiln_types::MacAddr;
use kiln_types::machine::Machine;
use tokio::net::UdpSocket;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{BootSettings, DhcpSettings};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// The PXE boot server port: a proxy answers boot file requests here.
pub const PXE_PORT: u16 = 4011;
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
    by_mac: HashMap<MacAddr, Ipv4Addr>,
    cursor: HashMap<String, Ipv4Addr>,
    /// Addresses offered and not yet requested, held for their client for
    /// `OFFER_HOLD_SECONDS`: without the hold, DISCOVERs arriving together
    /// were offered the same free address and all but one were NAKed
    /// (bench/dhcp).
    offers: HashMap<Ipv4Addr, (MacAddr, chrono::DateTime<Utc>)>,
    /// The pending offer of each client (at most one), so that neither
    /// finding nor replacing it scans every offer.
    offer_by_mac: HashMap<MacAddr, Ipv4Addr>,
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
    fn of(&self, mac: MacAddr, subnet: &Subnet) -> Option<&Lease> {
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
    fn offer_of(&self, mac: MacAddr, subnet: &Subnet, now: chrono::DateTime<Utc>) -> Option<Lease> {
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
    fn offered_to_other(&self, ip: Ipv4Addr, mac: MacAddr, now: chrono::DateTime<Utc>) -> bool {
        self.offers.get(&ip).is_some_and(|(m, until)| *m != mac && *until > now)
    }

    fn hold_offer(&mut self, ip: Ipv4Addr, mac: MacAddr, now: chrono::DateTime<Utc>) {
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
    fn drop_offer_of(&mut self, mac: MacAddr) {
        if let Some(old) = self.offer_by_mac.remove(&mac)
            && self.offers.get(&old).is_some_and(|(m, _)| *m == mac)
        {
            self.offers.remove(&old);
        }
    }

    /// Pool allocation in `subnet` resumes after `ip`.
    fn advance_cursor(&mut self, subnet: Option<&Subnet>, ip: Ipv4Addr) {
        if let Some(sub) = subnet.filter(|sub| sub.in_pool(ip)) {
            self.cursor
                .insert(sub.network.clone(), Ipv4Addr::from(u32::from(ip).wrapping_add(1)));
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

/// How often the listener asks the database whether another server changed
/// a machine (this server's own changes are seen at once).
const INVENTORY_RECHECK: StdDuration = StdDuration::from_secs(1);
/// Lease changes waiting for the writer; past this, requests are dropped
/// (the client retries) rather than queued without bound.
const PENDING_WRITES: usize = 8192;
/// How long the writer waits for more lease changes before it commits.
const COMMIT_LINGER: StdDuration = StdDuration::from_millis(2);
/// Most lease changes committed in one transaction.
const WRITES_PER_COMMIT: usize = 1024;

/// The inventory as the listener needs it.
#[derive(Debug, Default)]
struct Inventory {
    by_mac: HashMap<MacAddr, Arc<Machine>>,
    /// By the option 82 sub-options (circuit-id, remote-id) a NIC records
    /// (either or both); looked up with `kiln_types::port::lookup_keys`.
    by_port: HashMap<(Option<String>, Option<String>), Arc<Machine>>,
    /// Inventory IPv4 addresses: never handed out from a pool.
    reserved: HashSet<Ipv4Addr>,
}

impl Inventory {
    fn new(machines: Vec<Machine>) -> Inventory {
        let mut inv = Inventory::default();
        for m in machines {
            let m = Arc::new(m);
            if let Some(ip) = m.ipv4 {
                inv.reserved.insert(ip);
            }
            for nic in &m.nics {
                if let Some(mac) = nic.mac {
                    inv.by_mac.insert(mac, m.clone());
                }
                if nic.has_port_identity() {
                    inv.by_port
                        .insert((nic.circuit_id.clone(), nic.remote_id.clone()), m.clone());
                }
            }
        }
        inv
    }

    /// The machine a request comes from: by the switch port its relay
    /// reported, else by MAC.
    fn find(&self, mac: MacAddr, circuit: Option<&str>, remote: Option<&str>) -> Option<&Machine> {
        kiln_types::port::lookup_keys(circuit, remote)
            .into_iter()
            .find_map(|k| self.by_port.get(&k))
            .or_else(|| self.by_mac.get(&mac))
            .map(|m| &**m)
    }
}

/// The inventory copy and when it was last checked against the store.
#[derive(Debug, Default)]
struct InventoryCache {
    inventory: Arc<Inventory>,
    generation: Option<i64>,
    changes_seen: u64,
    checked_at: Option<Instant>,
}

/// A lease change on its way to the store, and the reply that may only be
/// sent once it is there.
struct Pending {
    write: LeaseWrite,
    reply: Option<(Vec<u8>, SocketAddrV4, Arc<UdpSocket>)>,
}

/// Shared by the sockets of all interfaces.
struct Service {
    store: Store,
    settings: DhcpSettings,
    boot: BootSettings,
    listen_port: u16,
    leases: std::sync::Mutex<Leases>,
    inventory: Mutex<InventoryCache>,
    writes: mpsc::Sender<Pending>,
}

impl Service {
    /// The inventory, reloaded if this server changed a machine since, or
    /// if the store's generation moved (checked at most every
    /// `INVENTORY_RECHECK`).
    async fn inventory(&self) -> anyhow::Result<Arc<Inventory>> {
        let mut cache = self.inventory.lock().await;
        let changes = self.store.machine_changes_here();
        let due = cache.checked_at.is_none_or(|t| t.elapsed() >= INVENTORY_RECHECK);
        if changes != cache.changes_seen || due {
            // The generation is read before the machines: a change made
            // while they load moves it again, and the next check reloads.
            let generation = self.store.machines_generation().await?;
            if cache.generation != Some(generation) {
                cache.inventory = Arc::new(Inventory::new(self.store.all_machines().await?));
                cache.generation = Some(generation);
            }
            cache.changes_seen = changes;
            cache.checked_at = Some(Instant::now());
        }
        Ok(cache.inventory.clone())
    }

    fn lock_leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        // A panic while holding the lock cannot leave the table half-changed
        // in a way that matters more than losing the listener would.
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
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

fn bind(interface: &str, port: u16) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(interface.as_bytes()))
        .with_context(|| format!("binding a socket to interface `{interface}` (needs root or CAP_NET_RAW)"))?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())
        .with_context(|| {
            let hint = if port < 1024 {
                "below 1024 it needs root or CAP_NET_BIND_SERVICE; "
            } else {
                ""
            };
            format!("binding UDP port {port} on `{interface}` ({hint}is another DHCP or PXE server using it?)")
        })?;
    Ok(s.into())
}

/// A socket bound to one configured interface, ready to serve.
#[derive(Debug)]
pub struct BoundInterface {
    pub interface: String,
    /// The interface's address: the server identifier in replies.
    pub ip: Ipv4Addr,
    socket: std::net::UdpSocket,
    /// Proxy mode: the PXE boot server port (4011) on the same interface.
    boot_server: Option<std::net::UdpSocket>,
}

impl BoundInterface {
    /// Where requests reach this socket (`[dhcp] port` 0 binds any free
    /// port: tests and the demo read it here).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddrV4> {
        match self.socket.local_addr()? {
            SocketAddr::V4(a) => Ok(SocketAddrV4::new(self.ip, a.port())),
            SocketAddr::V6(a) => anyhow::bail!("the DHCP socket is bound to an IPv6 address {a}"),
        }
    }
}

/// Binds a socket on every interface `settings` names. Done before the
/// listener starts so that a caller can learn the port and fail early.
pub fn bind_interfaces(settings: &DhcpSettings) -> anyhow::Result<Vec<BoundInterface>> {
    settings
        .interfaces
        .iter()
        .map(|iface| {
            Ok(BoundInterface {
                interface: iface.clone(),
                ip: interface_ipv4(iface)?,
                socket: bind(iface, settings.port)?,
                boot_server: match settings.mode {
                    kiln_boot::dhcp::Mode::Proxy => Some(bind(iface, PXE_PORT)?),
                    kiln_boot::dhcp::Mode::Full => None,
                },
            })
        })
        .collect()
}

/// Serves DHCP on every configured interface until `shutdown`.
pub async fn run(
    store: Store,
    settings: DhcpSettings,
    boot: BootSettings,
    listen_port: u16,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sockets = bind_interfaces(&settings)?;
    run_on(store, settings, sockets, boot, listen_port, shutdown).await
}

/// Serves DHCP on `sockets` (from [`bind_interfaces`]) until `shutdown`.
///
/// The listener runs on a thread of its own with a single-threaded runtime
/// and a store pool of its own: a packet is received, answered and sent,
/// and a batch of leases committed, without waking another thread but
/// SQLite's (on the shared runtime tokio's workers handed the socket's task
/// back and forth, bench/dhcp).
pub async fn run_on(
    store: Store,
    settings: DhcpSettings,
    sockets: Vec<BoundInterface>,
    boot: BootSettings,
    listen_port: u16,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kiln-dhcp".into())
        .spawn(move || {
            let r = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(async move {
                    // Connections belong to the runtime that opened them.
                    let store = store.with_own_pool(2).await.context("opening the store for DHCP")?;
                    let r = serve(store.clone(), settings, sockets, boot, listen_port, shutdown).await;
                    store.close().await;
                    r
                }),
                Err(e) => Err(anyhow::Error::from(e).context("starting the DHCP thread's runtime")),
            };
            let _ = done.send(r);
        })
        .context("starting the DHCP thread")?;
    result.await.context("the DHCP thread ended without a result")?
}

async fn serve(
    store: Store,
    settings: DhcpSettings,
    sockets: Vec<BoundInterface>,
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
    let (writes, pending) = mpsc::channel(PENDING_WRITES);
    let service = Arc::new(Service {
        store: store.clone(),
        settings,
        boot,
        listen_port,
        leases: std::sync::Mutex::new(Leases::load(loaded.leases)),
        inventory: Mutex::new(InventoryCache::default()),
        writes,
    });
    service.inventory().await.context("loading the inventory for DHCP")?;
    let mut tasks = tokio::task::JoinSet::new();
    for bound in sockets {
        let port = bound.local_addr()?.port();
        // A tokio socket belongs to the runtime it is made in: this thread's.
        let socket = Arc::new(UdpSocket::from_std(bound.socket)?);
        let (iface, ip) = (bound.interface, bound.ip);
        tracing::info!(interface = %iface, address = %ip, port, mode = ?service.settings.mode, "DHCP listening");
        if let Some(boot_server) = bound.boot_server {
            let boot_server = Arc::new(UdpSocket::from_std(boot_server)?);
            tracing::info!(interface = %iface, address = %ip, port = PXE_PORT, "PXE boot server listening");
            tasks.spawn(serve_interface(
                service.clone(),
                iface.clone(),
                ip,
                boot_server,
                true,
                shutdown.clone(),
            ));
        }
        tasks.spawn(serve_interface(
            service.clone(),
            iface,
            ip,
            socket,
            false,
            shutdown.clone(),
        ));
    }
    // The writer ends when every sender is gone: after the listeners (which
    // hold the service) have stopped, so queued changes are still written.
    drop(service);
    let writer = tokio::spawn(write_leases(store, pending));
    while let Some(done) = tasks.join_next().await {
        done.context("a DHCP task panicked")??;
    }
    writer.await.context("the DHCP lease writer panicked")?;
    Ok(())
}

/// Commits lease changes in batches — whatever queued up while the last
/// commit ran — and sends each change's reply after its commit. A failed
/// commit sends none of its replies: those clients retry.
async fn write_leases(store: Store, mut pending: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(WRITES_PER_COMMIT);
    while pending.recv_many(&mut batch, WRITES_PER_COMMIT).await > 0 {
        // Wait a moment for more: one transaction (four round trips to
        // SQLite's thread, each a thread wake) then carries many clients'
        // leases, and each ACK leaves a millisecond or two later — nothing
        // to a DHCP client, which waits seconds before it retries.
        if batch.len() < WRITES_PER_COMMIT {
            tokio::time::sleep(COMMIT_LINGER).await;
            while batch.len() < WRITES_PER_COMMIT
                && let Ok(p) = pending.try_recv()
            {
                batch.push(p);
            }
        }
        let writes: Vec<LeaseWrite> = batch.iter().map(|p| p.write.clone()).collect();
        match store.write_leases(&writes).await {
            Ok(()) => {
                for p in batch.drain(..) {
                    if let Some((bytes, dest, socket)) = p.reply
                        && let Err(e) = socket.send_to(&bytes, dest).await
                    {
                        tracing::warn!(%dest, error = %e, "DHCP reply not sent");
                    }
                }
            }
            Err(e) => {
                tracing::error!(
                    changes = batch.len(),
                    error = format!("{e:#}"),
                    "DHCP leases not written: those clients get no reply and retry"
                );
                batch.clear();
            }
        }
    }
}

async fn serve_interface(
    service: Arc<Service>,
    iface: String,
    server_ip: Ipv4Addr,
    socket: Arc<UdpSocket>,
    boot_server_port: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let s = &service.settings;
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
        boot_server_port,
        // The note is only ever logged, at info.
        notes: tracing::enabled!(tracing::Level::INFO),
    };
    let mut buf = vec![0u8; 1500];
    // Made once: a new `cancelled()` per packet would register and
    // unregister a waiter on the token every time.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        let (len, from) = tokio::select! {
            biased;
            _ = &mut cancelled => return Ok(()),
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
        if let Err(e) = answer(&service, &cfg, &socket, &msg, from).await {
            tracing::error!(interface = %iface, error = format!("{e:#}"), "DHCP request not answered");
        }
    }
}

/// A relayed request from a machine's port showed `mac`: when that is news
/// (a NIC enrolled by port without a MAC, or another MAC than the one on
/// record), the store learns the MAC or flags the machine
/// (`Store::observe_port`, which decides again in its transaction).
///
/// This is the one place a packet waits for the database, once per port
/// and MAC: the MAC must be on record before the client, answered, asks
/// for its boot script by it. A store error is logged and the request is
/// answered as before; the next request from the port tries again.
async fn learn_or_flag(
    service: &Service,
    machine: &Machine,
    mac: MacAddr,
    circuit: Option<&str>,
    remote: Option<&str>,
) {
    use kiln_types::port::{Sighting, observe};
    match observe(machine, mac, circuit, remote, Utc::now()) {
        Sighting::NotByPort | Sighting::Known | Sighting::AlreadyFlagged => return,
        Sighting::Learn { .. } | Sighting::Swapped { .. } => {}
    }
    let port = kiln_types::machine::port_label(circuit, remote);
    match service.store.observe_port(mac, circuit, remote).await {
        Ok(kiln_store::PortChange::Learned(m)) => {
            tracing::info!(machine = %m.hostname, %mac, %port, "learned the MAC of a NIC enrolled by switch port");
        }
        Ok(kiln_store::PortChange::Flagged(m)) => {
            tracing::warn!(
                machine = %m.hostname, %mac, %port,
                "switch port shows another MAC than the one on record: machine flagged, nothing is installed \
                 until an operator confirms (kiln machine confirm-port)"
            );
        }
        Ok(kiln_store::PortChange::None) => {}
        Err(e) => tracing::warn!(machine = %machine.hostname, %mac, %port, error = %e, "port sighting not recorded"),
    }
}

/// Option 82 sub-option "relay source port" (RFC 8357 §5.1): the relay
/// takes replies on the port its request came from, not on 67.
const RELAY_SOURCE_PORT: u8 = 19;

/// The port a relay takes replies on: the one it sent from if it says so
/// (RFC 8357), else the DHCP server port (RFC 2131 §4.1).
fn relay_reply_port(msg: &Message, from: SocketAddr) -> u16 {
    use dhcproto::v4::relay::RelayCode;
    use dhcproto::v4::{DhcpOption, OptionCode};
    match msg.opts().get(OptionCode::RelayAgentInformation) {
        Some(DhcpOption::RelayAgentInformation(info)) if info.get(RelayCode::Unknown(RELAY_SOURCE_PORT)).is_some() => {
            from.port()
        }
        _ => SERVER_PORT,
    }
}

async fn answer(
    service: &Service,
    cfg: &ServerConfig,
    socket: &Arc<UdpSocket>,
    msg: &Message,
    from: SocketAddr,
) -> anyhow::Result<()> {
    let Some((mac, circuit, remote)) = request_identity(msg) else {
        return Ok(());
    };
    let inventory = service.inventory().await?;
    let machine = inventory.find(mac, circuit.as_deref(), remote.as_deref());
    if let Some(m) = machine {
        learn_or_flag(service, m, mac, circuit.as_deref(), remote.as_deref()).await;
    }
    let giaddr = msg.giaddr();
    let locator = if giaddr.is_unspecified() { cfg.server_ip } else { giaddr };
    let subnet = service.settings.subnets.iter().find(|sub| sub.contains(locator));
    let now = Utc::now();
    let (outcome, write) = {
        let mut leases = service.lock_leases();
        let own = subnet.and_then(|sub| leases.of(mac, sub).cloned().or_else(|| leases.offer_of(mac, sub, now)));
        let outcome = {
            let is_free = |ip: Ipv4Addr| {
                !inventory.reserved.contains(&ip)
                    && !leases.offered_to_other(ip, mac, now)
                    && leases
                        .by_ip
                        .get(&ip)
                        .is_none_or(|l| !l.is_live(now) || (l.mac == mac && l.state == LeaseState::Bound))
            };
            let facts = Facts {
                subnet,
                machine,
                // The arm decides between an installer and the disk, which
                // the HTTP script (`/boot/ipxe`) tells apart; DHCP answers a
                // known machine with the same boot file either way.
                arm: None,
                lease: own.as_ref(),
                is_free: &is_free,
                pool_cursor: subnet.and_then(|sub| leases.cursor.get(&sub.network).copied()),
            };
            handle(cfg, msg, &facts, now)
        };
        if let Some(reply) = &outcome.reply
            && reply.opts().msg_type() == Some(MessageType::Offer)
            && !reply.yiaddr().is_unspecified()
        {
            let ip = reply.yiaddr();
            leases.hold_offer(ip, mac, now);
            leases.advance_cursor(subnet, ip);
        }
        // The table in memory changes now, so that the next request already
        // sees it; the store follows in the writer's next commit. If that
        // commit fails the client gets no ACK and asks again, and its entry
        // here only keeps the address from others meanwhile.
        let write = match &outcome.effect {
            Effect::None => None,
            Effect::Commit(lease) => {
                leases.drop_offer_of(lease.mac);
                leases.advance_cursor(subnet, lease.ip);
                leases.insert(lease.clone());
                Some(LeaseWrite::Commit(lease.clone()))
            }
            Effect::Release { ip, mac } => {
                leases.remove(*ip);
                Some(LeaseWrite::Release { ip: *ip, mac: *mac })
            }
            Effect::Decline { ip, mac } => {
                let hold = Lease {
                    ip: *ip,
                    mac: *mac,
                    state: LeaseState::Declined,
                    machine_id: None,
                    hostname: None,
                    expires_at: now + Duration::minutes(DECLINE_HOLD_MINUTES),
                };
                leases.insert(hold.clone());
                Some(LeaseWrite::Commit(hold))
            }
        };
        (outcome, write)
    };
    tracing::info!(%mac, note = %outcome.note, "dhcp");
    let reply = match outcome.reply {
        Some(reply) => {
            let dest = if cfg.boot_server_port {
                // A boot server request comes from a client with an address
                // and takes its answer where it came from (iPXE checks that
                // it comes from 4011, which is this socket).
                match from {
                    SocketAddr::V4(a) => a,
                    SocketAddr::V6(_) => return Ok(()),
                }
            } else if !giaddr.is_unspecified() {
                SocketAddrV4::new(giaddr, relay_reply_port(msg, from))
            } else if !msg.ciaddr().is_unspecified() && !msg.flags().broadcast() {
                SocketAddrV4::new(msg.ciaddr(), CLIENT_PORT)
            } else {
                // The client has no address yet: broadcast on the interface
                // this socket is bound to.
                SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT)
            };
            Some((reply.to_vec()?, dest))
        }
        None => None,
    };
    match (write, reply) {
        (Some(write), reply) => {
            let pending = Pending {
                write,
                reply: reply.map(|(bytes, dest)| (bytes, dest, socket.clone())),
            };
            if service.writes.try_send(pending).is_err() {
                anyhow::bail!("too many lease changes waiting for the store; the client will retry");
            }
        }
        (None, Some((bytes, dest))) => {
            socket
                .send_to(&bytes, dest)
                .await
                .with_context(|| format!("sending to {dest}"))?;
        }
        (None, None) => {}
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
    fn a_port_in_use_is_named_with_what_may_hold_it() {
        let taken = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let e = format!("{:#}", bind("lo", port).unwrap_err());
        assert!(
            e.contains(&format!("binding UDP port {port} on `lo`")) && e.contains("another DHCP or PXE server"),
            "{e}"
        );
        assert!(!e.contains("CAP_NET_BIND_SERVICE"), "not a privileged port: {e}");
    }

    #[test]
    fn a_relay_gets_its_reply_on_67_unless_it_names_its_source_port() {
        use dhcproto::v4::relay::{RelayAgentInformation, RelayCode, RelayInfo, UnknownInfo};
        use dhcproto::v4::{DhcpOption, Message};
        let from: SocketAddr = "127.77.0.1:40000".parse().unwrap();
        let mut msg = Message::default();
        assert_eq!(relay_reply_port(&msg, from), SERVER_PORT);
        let mut info = RelayAgentInformation::default();
        info.insert(RelayInfo::AgentCircuitId(b"xe-0/0/1".to_vec()));
        msg.opts_mut().insert(DhcpOption::RelayAgentInformation(info.clone()));
        assert_eq!(relay_reply_port(&msg, from), SERVER_PORT, "option 82 alone");
        info.insert(RelayInfo::Unknown(UnknownInfo::new(
            RelayCode::Unknown(RELAY_SOURCE_PORT),
            vec![],
        )));
        msg.opts_mut().insert(DhcpOption::RelayAgentInformation(info));
        // Through the wire format, as a relay sends it.
        let bytes = dhcproto::Encodable::to_vec(&msg).unwrap();
        let decoded = decode(&bytes).unwrap();
        assert_eq!(relay_reply_port(&decoded, from), 40000);
    }

    #[test]
    fn an_offer_holds_its_address_for_its_client_only() {
        let (a, b): (MacAddr, MacAddr) = (
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
