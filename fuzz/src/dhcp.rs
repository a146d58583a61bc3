//! Fixed server configurations and facts for the DHCP targets, and what a
//! reply must satisfy whatever the request was.

use std::net::Ipv4Addr;
use std::sync::LazyLock;

use chrono::{DateTime, Duration, TimeZone, Utc};
use dhcproto::Encodable;
use dhcproto::v4::relay::{RelayAgentInformation, RelayInfo};
use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use kiln_boot::decision::{BootPolicy, NetbootArm};
use kiln_boot::dhcp::{Effect, Facts, Lease, LeaseState, Mode, Outcome, ServerConfig, Subnet, decode, handle};
use kiln_boot::firmware::FirstStageFiles;
use kiln_types::machine::{Machine, MachineKind, MachineState};
use kiln_types::{MacAddr, Secret};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const RELAY: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 254);

struct Fixtures {
    now: DateTime<Utc>,
    full: ServerConfig,
    proxy: ServerConfig,
    quiet: ServerConfig,
    subnet: Subnet,
    deployed: Machine,
    fresh: Machine,
    arm: NetbootArm,
    lease: Lease,
}

static FIXTURES: LazyLock<Fixtures> = LazyLock::new(|| {
    let now = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap();
    let cfg = |mode, discovery| ServerConfig {
        mode,
        server_ip: SERVER,
        http_base: "http://10.213.0.1:7070".into(),
        files: FirstStageFiles::default(),
        policy: BootPolicy { discovery },
        boot_server_port: false,
        notes: true,
    };
    let mut deployed = Machine::sketch("web1", MachineKind::Physical, MachineState::Deployed);
    deployed.ipv4 = Some(Ipv4Addr::new(10, 213, 0, 10));
    let fresh = Machine::sketch("new1", MachineKind::Physical, MachineState::Ready);
    let arm = NetbootArm {
        job_id: "job-1".into(),
        machine_id: fresh.id,
        token: Secret::new("kiln_fuzz_token"),
        kernel: "http://10.213.0.1:7070/boot/file/vmlinuz".into(),
        initrds: vec!["http://10.213.0.1:7070/boot/file/initrd.gz".into()],
        cmdline: vec!["console=ttyS0".into()],
        expires_at: now + Duration::hours(1),
        consumed: false,
    };
    Fixtures {
        now,
        full: cfg(Mode::Full, true),
        proxy: cfg(Mode::Proxy, true),
        quiet: cfg(Mode::Full, false),
        subnet: Subnet {
            network: "10.213.0.0/24".into(),
            pool: Some([Ipv4Addr::new(10, 213, 0, 100), Ipv4Addr::new(10, 213, 0, 199)]),
            routers: vec![SERVER],
            dns: vec![SERVER],
            domain: Some("prov.example.net".into()),
            lease_time: 3600,
        },
        lease: Lease {
            ip: Ipv4Addr::new(10, 213, 0, 10),
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            state: LeaseState::Bound,
            machine_id: Some(deployed.id),
            hostname: Some("web1".into()),
            expires_at: now + Duration::hours(1),
        },
        deployed,
        fresh,
        arm,
    }
});

fn all_free(_: Ipv4Addr) -> bool {
    true
}

fn none_free(_: Ipv4Addr) -> bool {
    false
}

/// The sets of facts each request is tried against: an unknown client
/// (pool free), a deployed machine with its inventory address and lease, a
/// machine armed for an install with the pool exhausted, and a request from
/// where no subnet is served.
fn facts(f: &Fixtures) -> [Facts<'_>; 4] {
    [
        Facts {
            subnet: Some(&f.subnet),
            machine: None,
            arm: None,
            lease: None,
            is_free: &all_free,
            pool_cursor: None,
        },
        Facts {
            subnet: Some(&f.subnet),
            machine: Some(&f.deployed),
            arm: None,
            lease: Some(&f.lease),
            is_free: &all_free,
            pool_cursor: Some(Ipv4Addr::new(10, 213, 0, 150)),
        },
        Facts {
            subnet: Some(&f.subnet),
            machine: Some(&f.fresh),
            arm: Some(&f.arm),
            lease: None,
            is_free: &none_free,
            pool_cursor: None,
        },
        Facts {
            subnet: None,
            machine: None,
            arm: None,
            lease: None,
            is_free: &all_free,
            pool_cursor: None,
        },
    ]
}

/// `msg` as a relay agent would forward it: giaddr set, option 82 added
/// unless the client's packet already has one.
fn relayed(msg: &Message) -> Message {
    let mut m = msg.clone();
    if m.giaddr().is_unspecified() {
        m.set_giaddr(RELAY);
    }
    if m.opts().get(OptionCode::RelayAgentInformation).is_none() {
        let mut info = RelayAgentInformation::default();
        info.insert(RelayInfo::AgentCircuitId(b"xe-0/0/7".to_vec()));
        info.insert(RelayInfo::AgentRemoteId(b"asw-a1".to_vec()));
        m.opts_mut().insert(DhcpOption::RelayAgentInformation(info));
    }
    m
}

/// What every outcome must satisfy.
fn check(msg: &Message, out: &Outcome) {
    let Some(reply) = &out.reply else {
        return;
    };
    let bytes = reply
        .to_vec()
        .unwrap_or_else(|e| panic!("a reply does not encode: {e} ({})", out.note));
    let back = decode(&bytes).unwrap_or_else(|| panic!("a reply does not decode again ({})", out.note));
    // RFC 2131 §4.3.1: the transaction, the client and the relay are the request's.
    assert_eq!(back.xid(), msg.xid(), "{}", out.note);
    assert_eq!(back.giaddr(), msg.giaddr(), "{}", out.note);
    assert_eq!(reply.chaddr(), msg.chaddr(), "{}", out.note);
    // RFC 3046 §2.2: option 82 is echoed.
    if let Some(o82) = msg.opts().get(OptionCode::RelayAgentInformation) {
        assert_eq!(
            reply.opts().get(OptionCode::RelayAgentInformation),
            Some(o82),
            "{}",
            out.note
        );
    }
    // A lease is only committed with an ACK that carries its address.
    if let Effect::Commit(lease) = &out.effect {
        assert_eq!(reply.opts().msg_type(), Some(MessageType::Ack), "{}", out.note);
        assert_eq!(reply.yiaddr(), lease.ip, "{}", out.note);
    }
}

/// Decodes `data`; if it is a message, answers it every way (full, proxy
/// and full with discovery off; as sent and as relayed; each set of facts)
/// and checks each outcome.
pub fn check_every_way(data: &[u8]) {
    let Some(msg) = decode(data) else {
        return;
    };
    let f = &*FIXTURES;
    for msg in [msg.clone(), relayed(&msg)] {
        for cfg in [&f.full, &f.proxy, &f.quiet] {
            for facts in &facts(f) {
                let out = handle(cfg, &msg, facts, f.now);
                check(&msg, &out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds are worth starting from: each decodes, and is answered in
    /// at least one of the ways the target tries (so `check` has replies
    /// to check). `cargo +nightly test` here; CI only fuzzes.
    #[test]
    fn every_seed_is_answered_some_way() {
        let f = &*FIXTURES;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/dhcp");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let msg = decode(&std::fs::read(&path).unwrap()).unwrap_or_else(|| panic!("{path:?} does not decode"));
            let mut answered = 0;
            for msg in [msg.clone(), relayed(&msg)] {
                for cfg in [&f.full, &f.proxy, &f.quiet] {
                    for facts in &facts(f) {
                        let out = handle(cfg, &msg, facts, f.now);
                        check(&msg, &out);
                        answered += usize::from(out.reply.is_some() || out.effect != Effect::None);
                    }
                }
            }
            assert!(answered > 0, "{path:?} is never answered");
            seen += 1;
        }
        assert!(seen >= 10, "only {seen} seeds in {dir:?}");
    }
}
