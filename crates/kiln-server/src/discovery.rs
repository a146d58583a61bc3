//! Discovery that cannot be spoofed (issue 14): the discovery token and the
//! rules a discovery report must pass before it may touch the inventory.
//! Both are pure (the clock and the store's answers come in as arguments);
//! `api::agent::discovery` is the thin I/O around them.
//!
//! Any machine on the provisioning network may net-boot kiln's discovery
//! agent, so a discovery token proves only that kiln's boot script sent an
//! agent to that MAC, recently, once. It is bound to:
//! - the MAC it was issued to (a report about another MAC is refused);
//! - the switch port (the relay's circuit-id) when the inventory records
//!   one for that NIC at boot time (HTTP boot knows no more: the DHCP
//!   lease does not keep option 82);
//! - an expiry inside the token (`[boot] discovery_token_secs`);
//! - a random nonce, recorded in the store when the token carries its
//!   report, so it carries one report only — across restarts and servers.
//!
//! The token is `kd2.` + base64url(`MAC|EXPIRY|NONCE|PORT`) + `.` +
//! HMAC-SHA256 of that text under the server's key: the server checks it
//! from the `Authorization` header alone, before it reads any body.

use chrono::{DateTime, TimeZone, Utc};
use kiln_types::agent::DiscoveryReport;
use kiln_types::machine::{Machine, MachineState};
use kiln_types::{MacAddr, MachineId, Secret};

use crate::secrets::SecretBox;

const CONTEXT: &[u8] = b"kiln discovery token v2\0";
const PREFIX: &str = "kd2.";

/// The largest discovery report read: a large server's inventory (hundreds
/// of disks and NICs, DMI text) is some tens of KiB as JSON; 1 MiB leaves a
/// wide margin and still bounds what an unauthenticated caller can make the
/// server hold.
pub const MAX_REPORT_BYTES: usize = 1 << 20;

/// The most NICs a report may list: each is looked up in the inventory.
pub const MAX_REPORT_NICS: usize = 128;

/// What a discovery token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryClaims {
    pub mac: MacAddr,
    /// The relay circuit-id of the NIC's switch port, when the inventory
    /// knew it when the token was issued.
    pub port: Option<String>,
    pub expires_at: DateTime<Utc>,
    /// Random; the key of the token's use record.
    pub nonce: String,
}

/// Why a token is refused from the headers alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token this server issued (or one of the old, unbound form).
    #[error("that is not a discovery token kiln issued: use the kiln.token of this boot's kernel command line")]
    Invalid,
    /// Issued by this server, but too old.
    #[error(
        "this discovery token expired at {}: net-boot the machine again for a fresh one",
        .0.expires_at.format("%Y-%m-%d %H:%M:%S UTC")
    )]
    Expired(DiscoveryClaims),
}

/// `want == got`, in time independent of where they differ.
fn same(want: &str, got: &str) -> bool {
    let (a, b) = (want.as_bytes(), got.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

impl SecretBox {
    /// A fresh discovery token for the machine booting from `mac` (on
    /// switch port `port`, if known), valid until `expires_at`.
    pub fn discovery_token(&self, mac: MacAddr, port: Option<&str>, expires_at: DateTime<Utc>) -> Secret {
        use base64::Engine;
        let mut nonce = [0u8; 16];
        // No randomness is a broken host; a fixed nonce would make every
        // token after the first a "replay", so the failure shows at once.
        getrandom::fill(&mut nonce).expect("the system random number generator works");
        let payload = format!(
            "{mac}|{}|{}|{}",
            expires_at.timestamp(),
            b64().encode(nonce),
            port.unwrap_or_default()
        );
        let sig = self.mac_b64(&[CONTEXT, payload.as_bytes()].concat());
        Secret::new(format!("{PREFIX}{}.{sig}", b64().encode(payload)))
    }

    /// The claims of `token` if this server issued it and it has not
    /// expired at `now`. Checks nothing against the store (use, machine).
    pub fn check_discovery_token(&self, token: &str, now: DateTime<Utc>) -> Result<DiscoveryClaims, TokenError> {
        use base64::Engine;
        let (payload_b64, sig) = token
            .strip_prefix(PREFIX)
            .and_then(|t| t.split_once('.'))
            .ok_or(TokenError::Invalid)?;
        // Bounded before decoding: a token is well under 1 KiB.
        if payload_b64.len() > 1024 {
            return Err(TokenError::Invalid);
        }
        let payload = b64().decode(payload_b64).map_err(|_| TokenError::Invalid)?;
        if !same(&self.mac_b64(&[CONTEXT, &payload].concat()), sig) {
            return Err(TokenError::Invalid);
        }
        // Signed by this server: what follows cannot fail on a token it
        // made, but is checked rather than trusted to be so.
        let text = String::from_utf8(payload).map_err(|_| TokenError::Invalid)?;
        let mut parts = text.splitn(4, '|');
        let (Some(mac), Some(expiry), Some(nonce), Some(port)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Invalid);
        };
        let claims = DiscoveryClaims {
            mac: mac.parse().map_err(|_| TokenError::Invalid)?,
            port: (!port.is_empty()).then(|| port.to_string()),
            expires_at: expiry
                .parse::<i64>()
                .ok()
                .and_then(|s| Utc.timestamp_opt(s, 0).single())
                .ok_or(TokenError::Invalid)?,
            nonce: nonce.to_string(),
        };
        if now >= claims.expires_at {
            return Err(TokenError::Expired(claims));
        }
        Ok(claims)
    }
}

/// Whether discovery may change `m`: it is waiting for discovery and no
/// one else's. Waiting: `discovering` (an operator asked for it, e.g.
/// `kiln machine discover`), or `new` and never inventoried (at most a DMI
/// identity recorded, as an operator's import or a BMC gives it: no
/// memory, disks or hardware NICs). Never a machine that a tenant owns or
/// that is protected, whatever its state; never `ready`, `deployed` or any
/// later state.
pub fn is_waiting(m: &Machine) -> bool {
    let state_waits = match m.state {
        MachineState::Discovering => true,
        MachineState::New => !m.hardware.as_ref().is_some_and(inventoried),
        _ => false,
    };
    state_waits && m.owner.is_none() && !m.protected
}

/// Whether `h` holds what only a discovery (or an operator's hand) records.
fn inventoried(h: &kiln_types::machine::Hardware) -> bool {
    h.memory_bytes > 0 || !h.disks.is_empty() || !h.nics.is_empty()
}

/// Whether `m` may be completed by a report that found it by DMI alone
/// (the boot MAC is not on it): waiting for discovery, and either
/// `discovering` or `new` without any NIC — a record whose NICs are known
/// is completed only by a report from one of them.
pub fn may_complete_by_dmi(m: &Machine) -> bool {
    is_waiting(m) && (m.state == MachineState::Discovering || m.nics.is_empty())
}

/// What to do with a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A new machine, named after the boot MAC.
    Create,
    /// Complete or update this machine (and make it `ready`).
    Update(MachineId),
    Refuse(Refusal),
}

/// A refused report: `public` is the answer's message (it names no
/// machine the caller could not see: only the MAC and identity the caller
/// sent); `why` is for the audit log and may name the machine concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub public: String,
    pub why: String,
    /// The machine the report would have changed, for the audit event's
    /// target.
    pub machine: Option<MachineId>,
}

/// What the store knows about a report's claims.
#[derive(Debug, Default)]
pub struct Found<'a> {
    /// The machine with a NIC of the report's boot MAC.
    pub by_mac: Option<&'a Machine>,
    /// The machine whose recorded DMI UUID (else serial) the report claims.
    pub by_dmi: Option<&'a Machine>,
    /// Other NICs the report lists, with the machine recording each.
    pub nic_holders: Vec<(MacAddr, MachineId)>,
}

fn refuse(public: impl Into<String>, why: impl Into<String>, machine: Option<&Machine>) -> Verdict {
    Verdict::Refuse(Refusal {
        public: public.into(),
        why: why.into(),
        machine: machine.map(|m| m.id),
    })
}

/// Why `m` is not waiting, for the audit log.
fn not_waiting(m: &Machine) -> String {
    let mut why = vec![format!("{} is {}", m.hostname, m.state)];
    if let Some(o) = &m.owner {
        why.push(format!("owned by {o}"));
    }
    if m.protected {
        why.push("protected".into());
    }
    if m.state == MachineState::New && m.hardware.is_some() {
        why.push("already inventoried".into());
    }
    if m.state == MachineState::New && !m.nics.is_empty() {
        why.push("has NICs".into());
    }
    why.join(", ")
}

/// Whether the report's DMI identity contradicts what `m` records: serials
/// both known and different, or (no serials to compare) UUIDs both known
/// and different. Serials first: a BMC's idea of the system UUID may be the
/// SMBIOS one with its first three fields byte-swapped (IPMI's GUID), so
/// UUIDs are compared in both byte orders.
fn identity_differs(m: &Machine, report: &DiscoveryReport) -> bool {
    let ours = m.hardware.as_ref().and_then(|h| h.dmi.as_ref());
    let theirs = report.hardware.dmi.as_ref();
    let pick = |d: Option<&kiln_types::machine::Dmi>, f: fn(&kiln_types::machine::Dmi) -> Option<&String>| {
        d.and_then(f)
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
    };
    match (pick(ours, |d| d.serial.as_ref()), pick(theirs, |d| d.serial.as_ref())) {
        (Some(a), Some(b)) => a != b,
        _ => match (pick(ours, |d| d.uuid.as_ref()), pick(theirs, |d| d.uuid.as_ref())) {
            (Some(a), Some(b)) => !same_uuid(&a, &b),
            _ => false,
        },
    }
}

/// `a` and `b` name one UUID, in SMBIOS or in IPMI GUID byte order.
fn same_uuid(a: &str, b: &str) -> bool {
    match (a.parse::<uuid::Uuid>(), b.parse::<uuid::Uuid>()) {
        (Ok(x), Ok(y)) => x == y || x.to_bytes_le() == *y.as_bytes(),
        _ => a == b,
    }
}

/// The rules of issue 14 for a report whose token was good (right MAC,
/// not expired, first use).
pub fn judge(report: &DiscoveryReport, claims: &DiscoveryClaims, found: &Found<'_>) -> Verdict {
    let mac = report.boot_mac;
    let redo = "an operator can make a machine wait for discovery again with `kiln machine discover HOST`";
    if let Some(port) = &claims.port {
        let now = found
            .by_mac
            .and_then(|m| m.nics.iter().find(|n| n.mac == Some(mac)))
            .and_then(|n| n.circuit_id.as_deref());
        if now != Some(port.as_str()) {
            return refuse(
                format!(
                    "NIC {mac} is no longer recorded on the switch port its discovery token was issued for: net-boot it again"
                ),
                format!("token bound to circuit-id {port:?}, inventory now says {now:?}"),
                found.by_mac,
            );
        }
    }
    let target = match (found.by_mac, found.by_dmi) {
        (Some(m), dmi) => {
            if !is_waiting(m) {
                return refuse(
                    format!(
                        "the machine kiln knows by NIC {mac} is not waiting for discovery: discovery changes only a \
                         new or discovering machine that no tenant owns and that is not protected; {redo}"
                    ),
                    format!("known by its boot MAC, not waiting: {}", not_waiting(m)),
                    Some(m),
                );
            }
            if let Some(d) = dmi.filter(|d| d.id != m.id) {
                return refuse(
                    format!(
                        "the report's DMI serial or UUID is recorded for another machine than the one kiln knows by \
                         NIC {mac}: nothing was changed; an operator must resolve which record is right"
                    ),
                    format!(
                        "boot MAC is on {}, claimed DMI identity is {}'s",
                        m.hostname, d.hostname
                    ),
                    Some(m),
                );
            }
            if identity_differs(m, report) {
                return refuse(
                    format!(
                        "the report's DMI serial or UUID differs from the one kiln recorded for the machine it knows \
                         by NIC {mac}: nothing was changed; an operator must check the machine"
                    ),
                    format!("{}'s recorded DMI identity differs from the claimed one", m.hostname),
                    Some(m),
                );
            }
            Some(m)
        }
        (None, Some(d)) => {
            if !may_complete_by_dmi(d) {
                return refuse(
                    "the report's DMI serial or UUID is recorded for a machine that is not waiting for discovery: \
                     a report from a NIC kiln does not know may only create a machine or complete one waiting for \
                     discovery; nothing was changed"
                        .to_string(),
                    format!(
                        "new MAC {mac} claims the DMI identity of {}: {}",
                        d.hostname,
                        not_waiting(d)
                    ),
                    Some(d),
                );
            }
            Some(d)
        }
        (None, None) => None,
    };
    if let Some((nic, holder)) = found
        .nic_holders
        .iter()
        .find(|(_, holder)| target.is_none_or(|t| t.id != *holder))
    {
        return refuse(
            format!("the report lists NIC {nic}, which kiln records on another machine: nothing was changed"),
            format!("NIC {nic} belongs to machine {holder}"),
            target,
        );
    }
    match target {
        Some(m) => Verdict::Update(m.id),
        None => Verdict::Create,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use kiln_types::machine::{Dmi, Hardware, MachineKind, Nic};

    fn key() -> SecretBox {
        SecretBox::for_tests(&[7u8; 32])
    }

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_token_names_its_mac_port_and_expiry_and_is_unique() {
        let k = key();
        let now = Utc::now();
        let until = now + Duration::minutes(30);
        let a = k.discovery_token(mac("52:54:00:00:00:01"), Some("ge-0/0/1|x"), until);
        let b = k.discovery_token(mac("52:54:00:00:00:01"), Some("ge-0/0/1|x"), until);
        assert_ne!(a.expose(), b.expose(), "each token has its own nonce");
        kiln_boot::ipxe::check_arg(a.expose()).expect("a kernel argument iPXE accepts");
        let c = k.check_discovery_token(a.expose(), now).unwrap();
        assert_eq!(c.mac, mac("52:54:00:00:00:01"));
        assert_eq!(c.port.as_deref(), Some("ge-0/0/1|x"));
        assert_eq!(c.expires_at.timestamp(), until.timestamp());
        assert_ne!(c.nonce, k.check_discovery_token(b.expose(), now).unwrap().nonce);
        let none = k.discovery_token(mac("52:54:00:00:00:01"), None, until);
        assert_eq!(k.check_discovery_token(none.expose(), now).unwrap().port, None);
    }

    #[test]
    fn expired_forged_and_foreign_tokens_are_refused() {
        let k = key();
        let now = Utc::now();
        let t = k.discovery_token(mac("52:54:00:00:00:01"), None, now + Duration::seconds(60));
        assert!(matches!(
            k.check_discovery_token(t.expose(), now + Duration::seconds(60)),
            Err(TokenError::Expired(c)) if c.mac == mac("52:54:00:00:00:01")
        ));
        // Another server's key.
        let other = SecretBox::for_tests(&[8u8; 32]);
        assert_eq!(other.check_discovery_token(t.expose(), now), Err(TokenError::Invalid));
        // The payload changed (another MAC, a later expiry), signature kept.
        use base64::Engine;
        let (_, sig) = t.expose().rsplit_once('.').unwrap();
        let forged = format!(
            "kd2.{}.{sig}",
            b64().encode(format!(
                "52:54:00:00:00:02|{}|AAAA|",
                (now + Duration::days(9)).timestamp()
            ))
        );
        assert_eq!(k.check_discovery_token(&forged, now), Err(TokenError::Invalid));
        for junk in ["", "kd2.", "kd2..", "kd_abc", "kd2.!!!.x", &"kd2.".repeat(400)] {
            assert_eq!(k.check_discovery_token(junk, now), Err(TokenError::Invalid), "{junk}");
        }
    }

    fn machine(host: &str, state: MachineState) -> Machine {
        Machine::sketch(host, MachineKind::Physical, state)
    }

    fn dmi(serial: &str, uuid: &str) -> Option<Hardware> {
        Some(Hardware {
            dmi: Some(Dmi {
                serial: Some(serial.into()),
                uuid: Some(uuid.into()),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn nic(m: &str) -> Nic {
        serde_json::from_value(serde_json::json!({ "mac": m })).unwrap()
    }

    const UUID: &str = "0b6a1b52-0c7d-4b39-a37e-2b1c5f7a9d10";

    fn report(boot: &str) -> DiscoveryReport {
        DiscoveryReport {
            firmware: None,
            boot_mac: mac(boot),
            hardware: dmi("SN1", UUID).unwrap(),
            lldp: vec![],
        }
    }

    fn claims(boot: &str, port: Option<&str>) -> DiscoveryClaims {
        DiscoveryClaims {
            mac: mac(boot),
            port: port.map(str::to_string),
            expires_at: Utc::now(),
            nonce: "n".into(),
        }
    }

    #[derive(Debug, PartialEq)]
    enum Want {
        Create,
        Update,
        Refuse,
    }

    #[test]
    fn the_rules_table() {
        let boot = "52:54:00:00:00:01";
        let waiting_bmc = {
            let mut m = machine("blank", MachineState::Discovering);
            m.hardware = dmi("SN1", UUID);
            m
        };
        let deployed = {
            let mut m = machine("db1", MachineState::Deployed);
            m.hardware = dmi("SN1", UUID);
            m.owner = Some("acme".into());
            m.protected = true;
            m.nics = vec![nic("52:54:00:00:00:09")];
            m
        };
        let ready = {
            let mut m = machine("r1", MachineState::Ready);
            m.hardware = dmi("SN1", UUID);
            m
        };
        let owned_discovering = {
            let mut m = waiting_bmc.clone();
            m.owner = Some("acme".into());
            m
        };
        let protected_new = {
            let mut m = machine("p1", MachineState::New);
            m.protected = true;
            m.nics = vec![nic(boot)];
            m
        };
        let enrolled_new = {
            let mut m = machine("e1", MachineState::New);
            m.nics = vec![nic(boot)];
            m
        };
        let new_with_hw = {
            let mut m = enrolled_new.clone();
            m.hardware = dmi("SN1", UUID);
            m.hardware.as_mut().unwrap().memory_bytes = 1 << 30;
            m
        };
        let new_dmi_only = {
            let mut m = machine("n1", MachineState::New);
            m.hardware = dmi("SN1", UUID);
            m
        };
        let new_dmi_and_nics = {
            let mut m = machine("n2", MachineState::New);
            m.hardware = dmi("SN1", UUID);
            m.nics = vec![nic("52:54:00:00:00:07")];
            m
        };
        let other_serial = {
            let mut m = machine("e2", MachineState::Discovering);
            m.nics = vec![nic(boot)];
            m.hardware = dmi("SN2", UUID);
            m
        };
        let other_uuid = {
            let mut m = other_serial.clone();
            m.hardware = dmi("SN1", "11111111-2222-3333-4444-555555555555");
            m.hardware.as_mut().unwrap().dmi.as_mut().unwrap().serial = None;
            m
        };
        let swapped_uuid = {
            let mut m = other_uuid.clone();
            // UUID with its first three fields byte-swapped, as IPMI gives it.
            m.hardware.as_mut().unwrap().dmi.as_mut().unwrap().uuid =
                Some("521b6a0b-7d0c-394b-a37e-2b1c5f7a9d10".into());
            m
        };
        let ported = {
            let mut m = enrolled_new.clone();
            m.nics[0].circuit_id = Some("swp7".into());
            m
        };
        // What, found by MAC, found by DMI, the token's port, the verdict.
        type Case<'a> = (&'a str, Option<&'a Machine>, Option<&'a Machine>, Option<&'a str>, Want);
        let cases: Vec<Case> = vec![
            ("nothing known: a new machine", None, None, None, Want::Create),
            (
                "BMC-enrolled, discovering, found by DMI",
                None,
                Some(&waiting_bmc),
                None,
                Want::Update,
            ),
            (
                "spoof: a deployed, owned, protected machine's DMI from a new MAC",
                None,
                Some(&deployed),
                None,
                Want::Refuse,
            ),
            (
                "a ready machine's DMI from a new MAC",
                None,
                Some(&ready),
                None,
                Want::Refuse,
            ),
            (
                "an owned discovering machine's DMI",
                None,
                Some(&owned_discovering),
                None,
                Want::Refuse,
            ),
            (
                "a new machine with only its DMI recorded, by DMI",
                None,
                Some(&new_dmi_only),
                None,
                Want::Update,
            ),
            (
                "a new machine with NICs, by DMI from another NIC",
                None,
                Some(&new_dmi_and_nics),
                None,
                Want::Refuse,
            ),
            (
                "known MAC, ready: no re-discovery by report",
                Some(&ready),
                None,
                None,
                Want::Refuse,
            ),
            (
                "known MAC, deployed",
                Some(&deployed),
                Some(&deployed),
                None,
                Want::Refuse,
            ),
            (
                "known MAC, protected new",
                Some(&protected_new),
                None,
                None,
                Want::Refuse,
            ),
            ("known MAC, enrolled new", Some(&enrolled_new), None, None, Want::Update),
            (
                "known MAC, new but inventoried already",
                Some(&new_with_hw),
                Some(&new_with_hw),
                None,
                Want::Refuse,
            ),
            (
                "known MAC, DMI of another machine",
                Some(&enrolled_new),
                Some(&waiting_bmc),
                None,
                Want::Refuse,
            ),
            (
                "known MAC, its recorded serial differs",
                Some(&other_serial),
                None,
                None,
                Want::Refuse,
            ),
            (
                "known MAC, no serial, its recorded UUID differs",
                Some(&other_uuid),
                None,
                None,
                Want::Refuse,
            ),
            (
                "known MAC, its UUID in IPMI byte order",
                Some(&swapped_uuid),
                None,
                None,
                Want::Update,
            ),
            (
                "port-bound token, same port",
                Some(&ported),
                None,
                Some("swp7"),
                Want::Update,
            ),
            (
                "port-bound token, port changed",
                Some(&ported),
                None,
                Some("swp8"),
                Want::Refuse,
            ),
            (
                "port-bound token, MAC unknown now",
                None,
                None,
                Some("swp7"),
                Want::Refuse,
            ),
        ];
        for (what, by_mac, by_dmi, port, want) in cases {
            let found = Found {
                by_mac,
                by_dmi,
                nic_holders: vec![],
            };
            let got = match judge(&report(boot), &claims(boot, port), &found) {
                Verdict::Create => Want::Create,
                Verdict::Update(id) => {
                    assert_eq!(Some(id), by_mac.or(by_dmi).map(|m| m.id), "{what}");
                    Want::Update
                }
                Verdict::Refuse(r) => {
                    for m in [by_mac, by_dmi].into_iter().flatten() {
                        assert!(
                            !r.public.contains(m.hostname.as_str()) && !r.public.contains(&m.id.to_string()),
                            "{what}: the answer names a machine: {}",
                            r.public
                        );
                    }
                    Want::Refuse
                }
            };
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn a_report_listing_another_machines_nic_is_refused() {
        let boot = "52:54:00:00:00:01";
        let holder = machine("db1", MachineState::Deployed);
        let found = Found {
            nic_holders: vec![(mac("52:54:00:00:00:09"), holder.id)],
            ..Default::default()
        };
        let Verdict::Refuse(r) = judge(&report(boot), &claims(boot, None), &found) else {
            panic!("accepted")
        };
        assert!(
            r.public.contains("52:54:00:00:00:09") && !r.public.contains("db1"),
            "{}",
            r.public
        );
        // The target's own NICs are fine.
        let mut own = machine("e1", MachineState::New);
        own.nics = vec![nic(boot), nic("52:54:00:00:00:09")];
        let found = Found {
            by_mac: Some(&own),
            nic_holders: vec![(mac("52:54:00:00:00:09"), own.id)],
            ..Default::default()
        };
        assert_eq!(
            judge(&report(boot), &claims(boot, None), &found),
            Verdict::Update(own.id)
        );
    }
}
