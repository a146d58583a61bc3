//! One DHCP request in, at most one reply out, plus the lease change the
//! listener must make durable *before* it sends the reply.

use std::net::Ipv4Addr;

use chrono::{DateTime, Duration, Utc};
use dhcproto::v4::{
    DhcpOption, HType, Message, MessageType, Opcode, OptionCode,
    relay::{RelayCode, RelayInfo},
};
use kiln_types::MacAddr;
pub use kiln_types::lease::{Lease, LeaseState};
use kiln_types::machine::Machine;
use serde::Serialize;

use super::Subnet;
use crate::decision::{BootAnswer, BootPolicy, NetbootArm, decide};
use crate::firmware::{Client, FirstStage, FirstStageFiles, classify, first_stage};

/// Full DHCP (addresses and boot), or proxyDHCP (boot information only,
/// beside a DHCP server kiln does not own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Full,
    Proxy,
}

/// What the handler needs to know about the server answering.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub mode: Mode,
    /// Our address where the request arrived: server identifier and
    /// next-server (TFTP).
    pub server_ip: Ipv4Addr,
    /// Base URL of kiln's HTTP boot as clients reach it.
    pub http_base: String,
    pub files: FirstStageFiles,
    pub policy: BootPolicy,
    /// This socket is the PXE boot server port (4011) of a proxy: there it
    /// answers a client's REQUEST for its boot file; on 67 it answers
    /// DISCOVERs, and only the REQUESTs that name it as their server.
    pub boot_server_port: bool,
    /// Whether to write `Outcome::note`. A listener that will not log it
    /// says no: formatting it for every packet was a tenth of the DHCP
    /// listener's instructions (bench/dhcp).
    pub notes: bool,
}

/// The note's text, if the configuration asks for notes (the arguments
/// are not evaluated otherwise).
macro_rules! note {
    ($cfg:expr, $($arg:tt)*) => {
        if $cfg.notes { format!($($arg)*) } else { String::new() }
    };
}

/// Who asked, for notes: the machine's hostname and MAC, or the MAC.
#[derive(Debug, Clone, Copy)]
struct Who<'a> {
    machine: Option<&'a Machine>,
    mac: MacAddr,
}

impl std::fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.machine {
            Some(m) => write!(f, "{} ({})", m.hostname, self.mac),
            None => write!(f, "unknown {}", self.mac),
        }
    }
}

/// What the listener looked up for this request.
pub struct Facts<'a> {
    /// The subnet the client is on: the relay's (giaddr) or the
    /// interface's. `None`: we serve no subnet there.
    pub subnet: Option<&'a Subnet>,
    /// The machine, found by switch port (option 82) or MAC.
    pub machine: Option<&'a Machine>,
    pub arm: Option<&'a NetbootArm>,
    /// This client's current lease in `subnet`.
    pub lease: Option<&'a Lease>,
    /// Whether a pool address is free: no other client's lease, no
    /// machine's inventory address, not declined.
    pub is_free: &'a dyn Fn(Ipv4Addr) -> bool,
    /// Where to start looking for a free pool address (after the last one
    /// handed out).
    pub pool_cursor: Option<Ipv4Addr>,
}

impl std::fmt::Debug for Facts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Facts")
            .field("subnet", &self.subnet.map(|s| &s.network))
            .field("machine", &self.machine.map(|m| m.hostname.to_string()))
            .field("arm", &self.arm.map(|a| &a.job_id))
            .field("lease", &self.lease)
            .finish()
    }
}

/// The lease change a reply depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Persist this lease, then send the ACK.
    Commit(Lease),
    Release {
        ip: Ipv4Addr,
        mac: MacAddr,
    },
    /// The client found `ip` in use: keep it out of the pool for a while.
    Decline {
        ip: Ipv4Addr,
        mac: MacAddr,
    },
}

#[derive(Debug)]
pub struct Outcome {
    pub reply: Option<Message>,
    pub effect: Effect,
    /// Why, for the log and `kiln boot explain`.
    pub note: String,
}

fn ignore(note: impl Into<String>) -> Outcome {
    Outcome {
        reply: None,
        effect: Effect::None,
        note: note.into(),
    }
}

/// Decodes a packet from the wire. `None` for anything malformed —
/// including packets that make the codec itself panic (dhcproto has
/// `debug_assert!`s and subtractions on lengths taken from the packet), so
/// no packet from the network can take the listener down.
pub fn decode(bytes: &[u8]) -> Option<Message> {
    use dhcproto::Decodable;
    std::panic::catch_unwind(|| Message::from_bytes(bytes)).ok()?.ok()
}

/// The client's MAC and, for relayed requests, its option 82 circuit-id and
/// remote-id (as text; non-UTF-8 ids are shown as hex).
pub fn request_identity(msg: &Message) -> Option<(MacAddr, Option<String>, Option<String>)> {
    // hlen comes from the packet, and dhcproto's `chaddr()` slices its
    // 16-byte buffer by it: check before calling (a larger hlen panics).
    if msg.htype() != HType::Eth || msg.hlen() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&msg.chaddr()[..6]);
    let text = |b: &[u8]| match std::str::from_utf8(b) {
        Ok(s) if !s.is_empty() && s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => b.iter().map(|x| format!("{x:02x}")).collect(),
    };
    let (mut circuit, mut remote) = (None, None);
    if let Some(DhcpOption::RelayAgentInformation(info)) = msg.opts().get(OptionCode::RelayAgentInformation) {
        if let Some(RelayInfo::AgentCircuitId(c)) = info.get(RelayCode::AgentCircuitId) {
            circuit = Some(text(c));
        }
        if let Some(RelayInfo::AgentRemoteId(r)) = info.get(RelayCode::AgentRemoteId) {
            remote = Some(text(r));
        }
    }
    Some((MacAddr(mac), circuit, remote))
}

/// Which boot client this is, from options 93, 60, 77 and 175.
fn boot_client(msg: &Message) -> Client {
    let opts = msg.opts();
    let arch = match opts.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Some(a.0),
        _ => None,
    };
    let vendor = match opts.get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(v)) => std::str::from_utf8(v).ok(),
        _ => None,
    };
    let ipxe = matches!(opts.get(OptionCode::UserClass), Some(DhcpOption::UserClass(u)) if u.windows(4).any(|w| w == b"iPXE"))
        || opts.iter().any(|(code, _)| u8::from(*code) == 175);
    classify(arch, vendor, ipxe)
}

/// The address this client gets in `subnet`: its inventory address, its
/// current lease, the address it asks for, or the first free pool address.
pub fn choose_address(
    subnet: &Subnet,
    machine: Option<&Machine>,
    lease: Option<&Lease>,
    requested: Option<Ipv4Addr>,
    is_free: &dyn Fn(Ipv4Addr) -> bool,
    cursor: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    if let Some(ip) = machine.and_then(|m| m.ipv4).filter(|ip| subnet.contains(*ip)) {
        return Some(ip);
    }
    if let Some(l) = lease.filter(|l| subnet.contains(l.ip)) {
        return Some(l.ip);
    }
    if let Some(ip) = requested.filter(|ip| subnet.in_pool(*ip) && is_free(*ip)) {
        return Some(ip);
    }
    subnet.pool_addresses_from(cursor).find(|ip| is_free(*ip))
}

/// A reply skeleton per RFC 2131 §4.3.1: copies xid, flags, giaddr, chaddr
/// and echoes option 82 (RFC 3046 §2.2).
fn reply_to(msg: &Message, kind: MessageType, server_ip: Ipv4Addr) -> Message {
    let mut r = Message::default();
    r.set_opcode(Opcode::BootReply)
        .set_htype(msg.htype())
        .set_xid(msg.xid())
        .set_flags(msg.flags())
        .set_giaddr(msg.giaddr())
        .set_chaddr(msg.chaddr());
    let opts = r.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ServerIdentifier(server_ip));
    if let Some(o82 @ DhcpOption::RelayAgentInformation(_)) = msg.opts().get(OptionCode::RelayAgentInformation) {
        opts.insert(o82.clone());
    }
    r
}

fn add_subnet_options(r: &mut Message, subnet: &Subnet) {
    let opts = r.opts_mut();
    opts.insert(DhcpOption::SubnetMask(subnet.mask()));
    if !subnet.routers.is_empty() {
        opts.insert(DhcpOption::Router(subnet.routers.clone()));
    }
    if !subnet.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(subnet.dns.clone()));
    }
    if let Some(d) = &subnet.domain {
        opts.insert(DhcpOption::DomainName(d.clone()));
    }
}

fn add_lease_options(r: &mut Message, subnet: &Subnet) {
    let t = subnet.lease_time;
    let opts = r.opts_mut();
    opts.insert(DhcpOption::AddressLeaseTime(t));
    opts.insert(DhcpOption::Renewal(t / 2));
    opts.insert(DhcpOption::Rebinding(t / 8 * 7));
}

/// Boot fields for `client` given the boot decision; none for plain
/// clients, and none when the decision is to stay silent.
fn add_boot(
    r: &mut Message,
    cfg: &ServerConfig,
    client: Client,
    answer: &BootAnswer,
    mac: MacAddr,
) -> Option<FirstStage> {
    if matches!(answer, BootAnswer::NoAnswer { .. }) {
        return None;
    }
    let stage = first_stage(client, &cfg.files, &cfg.http_base, &mac.to_string())?;
    match &stage {
        FirstStage::Tftp { file } => {
            r.set_siaddr(cfg.server_ip);
            set_file(r, file);
            r.opts_mut()
                .insert(DhcpOption::TFTPServerName(cfg.server_ip.to_string().into_bytes()));
            r.opts_mut().insert(DhcpOption::BootfileName(file.clone().into_bytes()));
        }
        FirstStage::Http { url } => {
            set_file(r, url);
            r.opts_mut().insert(DhcpOption::BootfileName(url.clone().into_bytes()));
            if matches!(client, Client::Ipxe { .. }) && cfg.mode == Mode::Full {
                // iPXE option 175, setting 176 "no-pxedhcp" = 1: do not wait
                // for proxyDHCP offers (about 3 s per boot otherwise).
                r.opts_mut()
                    .insert(DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(
                        OptionCode::from(175u8),
                        vec![176, 1, 1],
                    )));
            }
            if client == Client::UefiHttp {
                // UEFI HTTP boot only accepts an offer that says HTTPClient.
                r.opts_mut().insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
            }
        }
    }
    if cfg.mode == Mode::Proxy && client != Client::UefiHttp {
        // iPXE takes a proxy's answer only with a next-server and a boot
        // file in it (its `dhcp_has_pxeopts`), an HTTP script URL too.
        r.set_siaddr(cfg.server_ip);
        r.opts_mut().insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
        // PXE option 43, sub-option 6 (discovery control) = 8: skip boot
        // server discovery and use the boot file given here.
        r.opts_mut().insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
    }
    Some(stage)
}

/// The BOOTP `file` field holds 127 bytes and a NUL; a longer name goes in
/// option 67 only (which every client here reads).
fn set_file(r: &mut Message, name: &str) {
    if name.len() < 128 {
        r.set_fname_str(name);
    }
}

/// Answers one request. Pure: everything it needs is in `cfg` and `facts`.
pub fn handle(cfg: &ServerConfig, msg: &Message, facts: &Facts, now: DateTime<Utc>) -> Outcome {
    if msg.opcode() != Opcode::BootRequest {
        return ignore("not a request");
    }
    let Some((mac, _, _)) = request_identity(msg) else {
        return ignore("not an Ethernet client");
    };
    let Some(kind) = msg.opts().msg_type() else {
        return ignore(note!(cfg, "{mac}: BOOTP without a DHCP message type is not served"));
    };
    let answer = decide(facts.machine, facts.arm, cfg.policy, now);
    let who = Who {
        machine: facts.machine,
        mac,
    };
    if facts.machine.is_none() && matches!(answer, BootAnswer::NoAnswer { .. }) {
        return ignore(note!(
            cfg,
            "{who}: not in the inventory and discovery is off: left to other servers"
        ));
    }
    let client = boot_client(msg);
    if cfg.mode == Mode::Proxy {
        return proxy(cfg, msg, kind, client, &answer, mac, who);
    }
    let Some(subnet) = facts.subnet else {
        return ignore(note!(cfg, "{who}: no subnet is served where this request came from"));
    };
    let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    let hostname = facts.machine.map(|m| m.hostname.to_string());
    match kind {
        MessageType::Discover => {
            let Some(ip) = choose_address(
                subnet,
                facts.machine,
                facts.lease,
                requested,
                facts.is_free,
                facts.pool_cursor,
            ) else {
                return ignore(note!(cfg, "{who}: no free address in {}", subnet.network));
            };
            let mut r = reply_to(msg, MessageType::Offer, cfg.server_ip);
            r.set_yiaddr(ip);
            add_subnet_options(&mut r, subnet);
            add_lease_options(&mut r, subnet);
            let boot = add_boot(&mut r, cfg, client, &answer, mac);
            Outcome {
                reply: Some(r),
                effect: Effect::None,
                note: note!(cfg, "{who}: offer {ip}; {}", boot_note(&answer, &boot)),
            }
        }
        MessageType::Request => {
            if server_id.is_some_and(|id| id != cfg.server_ip) {
                return ignore(note!(cfg, "{who}: chose another server"));
            }
            let wanted = requested.or_else(|| (!msg.ciaddr().is_unspecified()).then(|| msg.ciaddr()));
            let chosen = choose_address(
                subnet,
                facts.machine,
                facts.lease,
                wanted,
                facts.is_free,
                facts.pool_cursor,
            );
            match (wanted, chosen) {
                (Some(w), Some(c)) if w == c => {
                    let mut r = reply_to(msg, MessageType::Ack, cfg.server_ip);
                    r.set_yiaddr(c).set_ciaddr(msg.ciaddr());
                    add_subnet_options(&mut r, subnet);
                    add_lease_options(&mut r, subnet);
                    let boot = add_boot(&mut r, cfg, client, &answer, mac);
                    let lease = Lease {
                        ip: c,
                        mac,
                        state: LeaseState::Bound,
                        machine_id: facts.machine.map(|m| m.id),
                        hostname,
                        expires_at: now + Duration::seconds(i64::from(subnet.lease_time)),
                    };
                    Outcome {
                        reply: Some(r),
                        effect: Effect::Commit(lease),
                        note: note!(cfg, "{who}: ack {c}; {}", boot_note(&answer, &boot)),
                    }
                }
                (Some(w), c) => {
                    let mut r = reply_to(msg, MessageType::Nak, cfg.server_ip);
                    r.opts_mut()
                        .insert(DhcpOption::Message(format!("{w} is not yours here")));
                    let why = || c.map_or_else(|| "no address is free".to_string(), |c| format!("its address is {c}"));
                    Outcome {
                        reply: Some(r),
                        effect: Effect::None,
                        note: note!(cfg, "{who}: nak {w}: {}", why()),
                    }
                }
                (None, _) => ignore(note!(cfg, "{who}: request without an address")),
            }
        }
        MessageType::Release => {
            let ip = msg.ciaddr();
            if facts.lease.is_some_and(|l| l.ip == ip) {
                Outcome {
                    reply: None,
                    effect: Effect::Release { ip, mac },
                    note: note!(cfg, "{who}: released {ip}"),
                }
            } else {
                ignore(note!(cfg, "{who}: release of {ip}, which it does not hold"))
            }
        }
        MessageType::Decline => match requested {
            Some(ip) if subnet.contains(ip) => Outcome {
                reply: None,
                effect: Effect::Decline { ip, mac },
                note: note!(cfg, "{who}: declined {ip} (in use on the wire)"),
            },
            _ => ignore(note!(cfg, "{who}: decline without an address of ours")),
        },
        MessageType::Inform => {
            let mut r = reply_to(msg, MessageType::Ack, cfg.server_ip);
            r.set_ciaddr(msg.ciaddr());
            add_subnet_options(&mut r, subnet);
            Outcome {
                reply: Some(r),
                effect: Effect::None,
                note: note!(cfg, "{who}: inform"),
            }
        }
        other => ignore(note!(cfg, "{who}: {other:?} is not a client message")),
    }
}

fn proxy(
    cfg: &ServerConfig,
    msg: &Message,
    kind: MessageType,
    client: Client,
    answer: &BootAnswer,
    mac: MacAddr,
    who: Who<'_>,
) -> Outcome {
    if matches!(client, Client::Plain | Client::Unsupported { .. }) {
        return ignore(note!(cfg, "{who}: proxy mode answers boot clients only"));
    }
    let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    let reply_kind = match kind {
        MessageType::Discover => MessageType::Offer,
        // A PXE client asks the boot server on port 4011 once it has an
        // address (iPXE names the proxy as server there too). On 67 a
        // broadcast REQUEST takes another server's offer: not ours to ACK.
        MessageType::Request | MessageType::Inform
            if server_id == Some(cfg.server_ip) || (cfg.boot_server_port && server_id.is_none()) =>
        {
            MessageType::Ack
        }
        MessageType::Request | MessageType::Inform => {
            return ignore(note!(cfg, "{who}: {kind:?} for another server"));
        }
        _ => return ignore(note!(cfg, "{who}: {kind:?} needs no proxy answer")),
    };
    let mut r = reply_to(msg, reply_kind, cfg.server_ip);
    r.set_ciaddr(msg.ciaddr());
    let boot = add_boot(&mut r, cfg, client, answer, mac);
    if boot.is_none() {
        return ignore(note!(cfg, "{who}: nothing to boot"));
    }
    Outcome {
        reply: Some(r),
        effect: Effect::None,
        note: note!(cfg, "{who}: proxy {reply_kind:?}; {}", boot_note(answer, &boot)),
    }
}

fn boot_note(answer: &BootAnswer, boot: &Option<FirstStage>) -> String {
    match boot {
        Some(FirstStage::Tftp { file }) => format!("boot {file} by TFTP ({})", answer.reason()),
        Some(FirstStage::Http { url }) => format!("boot {url} ({})", answer.reason()),
        None => format!("no boot file ({})", answer.reason()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::relay::RelayAgentInformation;
    use dhcproto::v4::{Architecture, Flags};
    use dhcproto::{Decodable, Encodable};
    use kiln_types::machine::MachineState;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);

    fn subnet() -> Subnet {
        Subnet {
            network: "10.213.0.0/24".into(),
            pool: Some(["10.213.0.100".parse().unwrap(), "10.213.0.101".parse().unwrap()]),
            routers: vec![SERVER],
            dns: vec![SERVER],
            domain: Some("lab.example".into()),
            lease_time: 600,
        }
    }

    fn cfg(mode: Mode, discovery: bool) -> ServerConfig {
        ServerConfig {
            mode,
            server_ip: SERVER,
            http_base: "http://10.213.0.1:7070".into(),
            files: FirstStageFiles::default(),
            policy: BootPolicy { discovery },
            boot_server_port: false,
            notes: true,
        }
    }

    fn machine(ip: Option<&str>, state: MachineState) -> Machine {
        let mut m = Machine::sketch("node1", kiln_types::machine::MachineKind::Physical, state);
        m.ipv4 = ip.map(|i| i.parse().unwrap());
        m
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x13, 0x00, 0x01];

    fn request(kind: MessageType) -> Message {
        let mut m = Message::default();
        m.set_opcode(Opcode::BootRequest)
            .set_xid(0x1234)
            .set_chaddr(&MAC)
            .set_flags(Flags::default().set_broadcast());
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        m
    }

    fn pxe(mut m: Message, arch: u16) -> Message {
        m.opts_mut()
            .insert(DhcpOption::ClientSystemArchitecture(Architecture(arch)));
        m.opts_mut().insert(DhcpOption::ClassIdentifier(
            format!("PXEClient:Arch:{arch:05}:UNDI:002001").into_bytes(),
        ));
        m
    }

    fn facts<'a>(
        s: &'a Subnet,
        m: Option<&'a Machine>,
        lease: Option<&'a Lease>,
        free: &'a dyn Fn(Ipv4Addr) -> bool,
    ) -> Facts<'a> {
        Facts {
            subnet: Some(s),
            machine: m,
            arm: None,
            lease,
            is_free: free,
            pool_cursor: None,
        }
    }

    /// The reply as a client would decode it from the wire.
    fn wire(o: &Outcome) -> Message {
        let bytes = o.reply.as_ref().expect(&o.note).to_vec().unwrap();
        Message::from_bytes(&bytes).unwrap()
    }

    /// The `file` field as a client reads it: up to the first NUL.
    fn file(m: &Message) -> &str {
        let f = m.fname().unwrap_or_default();
        std::str::from_utf8(&f[..f.iter().position(|b| *b == 0).unwrap_or(f.len())]).unwrap()
    }

    fn opt(m: &Message, code: OptionCode) -> Option<&DhcpOption> {
        m.opts().get(code)
    }

    #[test]
    fn unknown_clients_are_left_alone_when_discovery_is_off() {
        let s = subnet();
        let o = handle(
            &cfg(Mode::Full, false),
            &pxe(request(MessageType::Discover), 0),
            &facts(&s, None, None, &|_| true),
            Utc::now(),
        );
        assert!(o.reply.is_none(), "{}", o.note);
        assert!(o.note.contains("discovery is off"));
    }

    #[test]
    fn without_notes_the_answer_is_the_same_and_the_note_empty() {
        let s = subnet();
        let now = Utc::now();
        for kind in [MessageType::Discover, MessageType::Request, MessageType::Inform] {
            let msg = pxe(request(kind), 0);
            let with = handle(&cfg(Mode::Full, true), &msg, &facts(&s, None, None, &|_| true), now);
            let mut quiet_cfg = cfg(Mode::Full, true);
            quiet_cfg.notes = false;
            let without = handle(&quiet_cfg, &msg, &facts(&s, None, None, &|_| true), now);
            assert!(!with.note.is_empty(), "{kind:?}");
            assert!(without.note.is_empty(), "{kind:?}: {}", without.note);
            assert_eq!(with.effect, without.effect, "{kind:?}");
            assert_eq!(
                with.reply.map(|r| r.to_vec().unwrap()),
                without.reply.map(|r| r.to_vec().unwrap()),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn discovery_offers_a_pool_address_and_the_bios_first_stage() {
        let s = subnet();
        let o = handle(
            &cfg(Mode::Full, true),
            &pxe(request(MessageType::Discover), 0),
            &facts(&s, None, None, &|_| true),
            Utc::now(),
        );
        let r = wire(&o);
        assert_eq!(r.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(r.yiaddr(), Ipv4Addr::new(10, 213, 0, 100));
        assert_eq!(r.siaddr(), SERVER);
        assert_eq!(file(&r), "undionly.kpxe");
        assert_eq!(r.xid(), 0x1234);
        assert_eq!(r.chaddr(), &MAC);
        assert!(
            matches!(opt(&r, OptionCode::ServerIdentifier), Some(DhcpOption::ServerIdentifier(ip)) if *ip == SERVER)
        );
        assert!(
            matches!(opt(&r, OptionCode::SubnetMask), Some(DhcpOption::SubnetMask(m)) if *m == Ipv4Addr::new(255, 255, 255, 0))
        );
        assert!(matches!(
            opt(&r, OptionCode::AddressLeaseTime),
            Some(DhcpOption::AddressLeaseTime(600))
        ));
        assert_eq!(o.effect, Effect::None, "an offer is not a lease");
        // UEFI PXE gets the EFI binary, iPXE its script, UEFI HTTP a URL.
        let uefi = wire(&handle(
            &cfg(Mode::Full, true),
            &pxe(request(MessageType::Discover), 7),
            &facts(&s, None, None, &|_| true),
            Utc::now(),
        ));
        assert_eq!(file(&uefi), "snponly.efi");
        let mut ipxe = pxe(request(MessageType::Discover), 0);
        ipxe.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        let r = wire(&handle(
            &cfg(Mode::Full, true),
            &ipxe,
            &facts(&s, None, None, &|_| true),
            Utc::now(),
        ));
        assert_eq!(
            file(&r),
            "http://10.213.0.1:7070/boot/ipxe?mac=52:54:00:13:00:01&uuid=${uuid}&serial=${serial:uristring}&platform=pcbios"
        );
        let no_pxedhcp = r
            .opts()
            .iter()
            .find(|(c, _)| u8::from(**c) == 175)
            .map(|(_, o)| o.clone());
        assert!(
            matches!(no_pxedhcp, Some(DhcpOption::Unknown(u)) if u.data() == [176, 1, 1]),
            "iPXE is told not to wait for proxyDHCP"
        );
        let mut http = request(MessageType::Discover);
        http.opts_mut()
            .insert(DhcpOption::ClientSystemArchitecture(Architecture(16)));
        http.opts_mut().insert(DhcpOption::ClassIdentifier(
            b"HTTPClient:Arch:00016:UNDI:003001".to_vec(),
        ));
        let r = wire(&handle(
            &cfg(Mode::Full, true),
            &http,
            &facts(&s, None, None, &|_| true),
            Utc::now(),
        ));
        assert!(file(&r).starts_with("http://"));
        assert!(
            matches!(opt(&r, OptionCode::ClassIdentifier), Some(DhcpOption::ClassIdentifier(v)) if v == b"HTTPClient")
        );
    }

    #[test]
    fn known_machines_get_their_inventory_address_and_no_installer() {
        let s = subnet();
        let m = machine(Some("10.213.0.42"), MachineState::Deployed);
        let f = facts(&s, Some(&m), None, &|_| true);
        // Its OS asking (plain client): address, no boot file.
        let o = handle(&cfg(Mode::Full, false), &request(MessageType::Discover), &f, Utc::now());
        let r = wire(&o);
        assert_eq!(r.yiaddr(), Ipv4Addr::new(10, 213, 0, 42));
        assert!(
            r.fname().is_none() && opt(&r, OptionCode::BootfileName).is_none(),
            "{}",
            o.note
        );
        // Its PXE ROM asking by accident: the chain that ends in local disk.
        let o = handle(
            &cfg(Mode::Full, false),
            &pxe(request(MessageType::Discover), 0),
            &f,
            Utc::now(),
        );
        assert!(o.note.contains("no job armed"), "{}", o.note);
    }

    #[test]
    fn request_ack_commits_the_lease_before_anything_else() {
        let s = subnet();
        let m = machine(Some("10.213.0.42"), MachineState::Ready);
        let f = facts(&s, Some(&m), None, &|_| true);
        let mut req = request(MessageType::Request);
        req.opts_mut()
            .insert(DhcpOption::RequestedIpAddress("10.213.0.42".parse().unwrap()));
        req.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        let now = Utc::now();
        let o = handle(&cfg(Mode::Full, false), &req, &f, now);
        let r = wire(&o);
        assert_eq!(r.opts().msg_type(), Some(MessageType::Ack));
        match &o.effect {
            Effect::Commit(l) => {
                assert_eq!(l.ip, Ipv4Addr::new(10, 213, 0, 42));
                assert_eq!(l.machine_id, Some(m.id));
                assert_eq!(l.expires_at, now + Duration::seconds(600));
            }
            e => panic!("{e:?}"),
        }
        // Asking for someone else's address: NAK, nothing committed.
        let mut wrong = request(MessageType::Request);
        wrong
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress("10.213.0.43".parse().unwrap()));
        let o = handle(&cfg(Mode::Full, false), &wrong, &f, now);
        assert_eq!(wire(&o).opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(o.effect, Effect::None);
        // A request meant for another server: silence.
        let mut other = request(MessageType::Request);
        other
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress("10.213.0.42".parse().unwrap()));
        other
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier("10.213.0.2".parse().unwrap()));
        assert!(handle(&cfg(Mode::Full, false), &other, &f, now).reply.is_none());
    }

    #[test]
    fn leases_are_kept_and_pools_run_out() {
        let s = subnet();
        let lease = Lease {
            ip: "10.213.0.101".parse().unwrap(),
            mac: MacAddr(MAC),
            state: LeaseState::Bound,
            machine_id: None,
            hostname: None,
            expires_at: Utc::now(),
        };
        let o = handle(
            &cfg(Mode::Full, true),
            &request(MessageType::Discover),
            &facts(&s, None, Some(&lease), &|_| false),
            Utc::now(),
        );
        assert_eq!(wire(&o).yiaddr(), lease.ip, "a client keeps its address");
        let o = handle(
            &cfg(Mode::Full, true),
            &request(MessageType::Discover),
            &facts(&s, None, None, &|_| false),
            Utc::now(),
        );
        assert!(o.reply.is_none() && o.note.contains("no free address"), "{}", o.note);
        let mut rel = request(MessageType::Release);
        rel.set_ciaddr(lease.ip);
        let o = handle(
            &cfg(Mode::Full, true),
            &rel,
            &facts(&s, None, Some(&lease), &|_| true),
            Utc::now(),
        );
        assert_eq!(
            o.effect,
            Effect::Release {
                ip: lease.ip,
                mac: MacAddr(MAC)
            }
        );
        let mut dec = request(MessageType::Decline);
        dec.opts_mut().insert(DhcpOption::RequestedIpAddress(lease.ip));
        let o = handle(
            &cfg(Mode::Full, true),
            &dec,
            &facts(&s, None, Some(&lease), &|_| true),
            Utc::now(),
        );
        assert_eq!(
            o.effect,
            Effect::Decline {
                ip: lease.ip,
                mac: MacAddr(MAC)
            }
        );
    }

    #[test]
    fn relayed_requests_echo_option_82() {
        let s = subnet();
        let mut req = pxe(request(MessageType::Discover), 0);
        req.set_giaddr(Ipv4Addr::new(10, 213, 0, 254)).set_hops(1);
        let mut info = RelayAgentInformation::default();
        info.insert(RelayInfo::AgentCircuitId(b"xe-0/0/7".to_vec()));
        info.insert(RelayInfo::AgentRemoteId(b"asw-a1".to_vec()));
        req.opts_mut().insert(DhcpOption::RelayAgentInformation(info.clone()));
        let (mac, circuit, remote) = request_identity(&req).unwrap();
        assert_eq!(mac, MacAddr(MAC));
        assert_eq!(
            (circuit.as_deref(), remote.as_deref()),
            (Some("xe-0/0/7"), Some("asw-a1"))
        );
        let m = machine(Some("10.213.0.7"), MachineState::Ready);
        let r = wire(&handle(
            &cfg(Mode::Full, false),
            &req,
            &facts(&s, Some(&m), None, &|_| true),
            Utc::now(),
        ));
        assert_eq!(r.giaddr(), Ipv4Addr::new(10, 213, 0, 254));
        assert_eq!(r.yiaddr(), Ipv4Addr::new(10, 213, 0, 7));
        assert!(
            matches!(opt(&r, OptionCode::RelayAgentInformation), Some(DhcpOption::RelayAgentInformation(i)) if *i == info)
        );
    }

    #[test]
    fn proxy_mode_gives_boot_information_only() {
        let s = subnet();
        let o = handle(
            &cfg(Mode::Proxy, true),
            &pxe(request(MessageType::Discover), 0),
            &facts(&s, None, None, &|_| true),
            Utc::now(),
        );
        let r = wire(&o);
        assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(file(&r), "undionly.kpxe");
        assert!(
            matches!(opt(&r, OptionCode::ClassIdentifier), Some(DhcpOption::ClassIdentifier(v)) if v == b"PXEClient")
        );
        assert!(opt(&r, OptionCode::AddressLeaseTime).is_none());
        let plain = handle(
            &cfg(Mode::Proxy, true),
            &request(MessageType::Discover),
            &facts(&s, None, None, &|_| true),
            Utc::now(),
        );
        assert!(plain.reply.is_none());
    }

    #[test]
    fn a_proxy_acks_only_the_requests_meant_for_it() {
        let s = subnet();
        let f = facts(&s, None, None, &|_| true);
        let with_server = |id: Option<Ipv4Addr>| {
            let mut m = pxe(request(MessageType::Request), 0);
            if let Some(id) = id {
                m.opts_mut().insert(DhcpOption::ServerIdentifier(id));
            }
            m
        };
        let other = Some(Ipv4Addr::new(10, 213, 0, 2));
        let on_67 = cfg(Mode::Proxy, true);
        let on_4011 = ServerConfig {
            boot_server_port: true,
            ..cfg(Mode::Proxy, true)
        };
        // The site's server's offer taken, on 67 or wherever it is seen.
        for c in [&on_67, &on_4011] {
            assert!(handle(c, &with_server(other), &f, Utc::now()).reply.is_none());
        }
        assert!(
            handle(&on_67, &with_server(None), &f, Utc::now()).reply.is_none(),
            "a REQUEST naming no server on 67 is a renewal with the site's server"
        );
        // Asked by name, or on the boot server port.
        for (c, req) in [
            (&on_67, with_server(Some(SERVER))),
            (&on_4011, with_server(Some(SERVER))),
            (&on_4011, with_server(None)),
        ] {
            let r = wire(&handle(c, &req, &f, Utc::now()));
            assert_eq!(r.opts().msg_type(), Some(MessageType::Ack));
            assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED, "a proxy gives no address");
            assert_eq!(file(&r), "undionly.kpxe");
        }
        // iPXE asking: the HTTP script, with the next-server iPXE wants to
        // see in a proxy's answer.
        let mut ipxe = with_server(None);
        ipxe.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        let r = wire(&handle(&on_4011, &ipxe, &f, Utc::now()));
        assert!(
            file(&r).starts_with("http://10.213.0.1:7070/boot/ipxe?"),
            "{}",
            file(&r)
        );
        assert_eq!(r.siaddr(), SERVER);
    }

    #[test]
    fn malformed_and_foreign_messages_are_ignored() {
        let s = subnet();
        let f = facts(&s, None, None, &|_| true);
        let c = cfg(Mode::Full, true);
        let mut bootp = Message::default();
        bootp.set_opcode(Opcode::BootRequest).set_chaddr(&MAC);
        assert!(handle(&c, &bootp, &f, Utc::now()).reply.is_none());
        let mut reply = request(MessageType::Offer);
        reply.set_opcode(Opcode::BootReply);
        assert!(handle(&c, &reply, &f, Utc::now()).reply.is_none());
        let mut offer_from_client = request(MessageType::Offer);
        offer_from_client.set_opcode(Opcode::BootRequest);
        assert!(handle(&c, &offer_from_client, &f, Utc::now()).reply.is_none());
        // Garbage never decodes into something we answer.
        for bytes in [&[][..], &[1, 2, 3], &[0u8; 300][..]] {
            if let Ok(m) = Message::from_bytes(bytes) {
                assert!(handle(&c, &m, &f, Utc::now()).reply.is_none());
            }
        }
    }
}

#[cfg(test)]
mod robustness {
    //! Thousands of random and mutated packets through decode and `handle`:
    //! nothing panics out of them, and whatever is answered encodes.
    //! (Coverage-guided fuzzing of the same is in `fuzz/` and needs a
    //! nightly toolchain; this runs in every `cargo test`.) Panics that `decode`
    //! catches inside dhcproto still print their message through the panic
    //! hook: that output is expected here.

    use super::*;
    use dhcproto::Encodable;

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn valid_discover() -> Vec<u8> {
        let mut m = Message::default();
        m.set_opcode(Opcode::BootRequest)
            .set_xid(7)
            .set_chaddr(&[0x52, 0x54, 0, 0, 0, 1]);
        m.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
        m.opts_mut()
            .insert(DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000".to_vec()));
        m.to_vec().unwrap()
    }

    #[test]
    fn an_oversized_hardware_length_is_not_a_crash() {
        let mut bytes = valid_discover();
        bytes[2] = 200; // hlen
        if let Some(msg) = decode(&bytes) {
            assert_eq!(request_identity(&msg), None);
        }
    }

    /// Found by `cargo fuzz run dhcp_decode` (fuzz/): dhcproto's decoder
    /// `debug_assert!`s that a bulk-leasequery base-time option (152) is 4
    /// bytes long. `decode` must turn that panic into "malformed".
    #[test]
    fn a_bulk_leasequery_option_of_the_wrong_length_is_malformed() {
        let mut bytes = valid_discover();
        assert_eq!(bytes.pop(), Some(255), "options end with End");
        bytes.extend_from_slice(&[152, 2, 0, 0, 255]);
        let decoded = decode(&bytes);
        if cfg!(debug_assertions) {
            assert!(decoded.is_none(), "{decoded:?}");
        }
    }

    #[test]
    fn random_and_mutated_packets_never_panic() {
        let subnet = Subnet {
            network: "10.0.0.0/24".into(),
            pool: Some(["10.0.0.10".parse().unwrap(), "10.0.0.20".parse().unwrap()]),
            routers: vec![],
            dns: vec![],
            domain: None,
            lease_time: 600,
        };
        let cfg = ServerConfig {
            mode: Mode::Full,
            server_ip: Ipv4Addr::new(10, 0, 0, 1),
            http_base: "http://10.0.0.1:7070".into(),
            files: FirstStageFiles::default(),
            policy: BootPolicy { discovery: true },
            boot_server_port: false,
            notes: true,
        };
        let facts = Facts {
            subnet: Some(&subnet),
            machine: None,
            arm: None,
            lease: None,
            is_free: &|_| true,
            pool_cursor: None,
        };
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let base = valid_discover();
        let mut answered = 0;
        for i in 0..20_000 {
            let bytes: Vec<u8> = if i % 2 == 0 {
                let len = (rng.next() % 600) as usize;
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                let mut b = base.clone();
                for _ in 0..=(rng.next() % 8) {
                    let at = (rng.next() as usize) % b.len();
                    b[at] = rng.next() as u8;
                }
                if rng.next().is_multiple_of(4) {
                    b.truncate((rng.next() as usize) % b.len());
                }
                b
            };
            if let Some(msg) = decode(&bytes) {
                let out = handle(&cfg, &msg, &facts, Utc::now());
                if let Some(reply) = out.reply {
                    reply.to_vec().expect("every reply encodes");
                    answered += 1;
                }
            }
        }
        assert!(answered > 0, "some mutated discovers are still valid and answered");
    }
}
