//! Switch-port identity (issue 15, seed 000): which NIC a relayed DHCP
//! request comes from, and what kiln does with the MAC it shows — learn it,
//! accept it, or flag the port. Pure functions over the machine record; the
//! DHCP listener and the store (which re-decides inside its transaction)
//! share them, so the rule is written once.
//!
//! A NIC's port identity is the option 82 sub-options it records
//! (`circuit_id`, `remote_id`, either or both). A request matches it when
//! every sub-option the NIC records equals the one the relay sent: a NIC
//! recording only `circuit_id` matches whatever remote-id the relay adds.

use chrono::{DateTime, Utc};

use crate::MacAddr;
use crate::machine::{Machine, Nic, PortAlert};

/// Whether `nic` is the one on the port a relay reported as (`circuit`, `remote`).
pub fn nic_matches(nic: &Nic, circuit: Option<&str>, remote: Option<&str>) -> bool {
    nic.has_port_identity()
        && nic.circuit_id.as_deref().is_none_or(|c| Some(c) == circuit)
        && nic.remote_id.as_deref().is_none_or(|r| Some(r) == remote)
}

/// The keys a NIC recording (`circuit`, `remote`) would be indexed under
/// that a request with these sub-options may hit, most specific first: the
/// request matches a NIC under one of them ([`nic_matches`]).
pub fn lookup_keys(circuit: Option<&str>, remote: Option<&str>) -> Vec<(Option<String>, Option<String>)> {
    let (c, r) = (circuit.map(str::to_string), remote.map(str::to_string));
    let mut keys = vec![];
    if c.is_some() && r.is_some() {
        keys.push((c.clone(), r.clone()));
    }
    if c.is_some() {
        keys.push((c, None));
    }
    if r.is_some() {
        keys.push((None, r));
    }
    keys
}

/// What a relayed request from a machine's port means for its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sighting {
    /// No NIC of the machine is on that port (it was found by MAC).
    NotByPort,
    /// The NIC on the port has this MAC on record: nothing to do.
    Known,
    /// The NIC on the port (index `nic`) has no MAC yet: record `mac`.
    Learn { nic: usize, mac: MacAddr },
    /// The port shows another MAC than the one on record: flag the machine.
    Swapped { nic: usize, alert: PortAlert },
    /// Already flagged for this very MAC on this port: nothing new.
    AlreadyFlagged,
}

/// The decision for a request showing `mac` from the port
/// (`circuit`, `remote`) of `machine`, at `now`.
pub fn observe(
    machine: &Machine,
    mac: MacAddr,
    circuit: Option<&str>,
    remote: Option<&str>,
    now: DateTime<Utc>,
) -> Sighting {
    if circuit.is_none() && remote.is_none() {
        return Sighting::NotByPort;
    }
    let Some((i, nic)) = machine
        .nics
        .iter()
        .enumerate()
        .find(|(_, n)| nic_matches(n, circuit, remote))
    else {
        return Sighting::NotByPort;
    };
    match nic.mac {
        None => Sighting::Learn { nic: i, mac },
        Some(m) if m == mac => Sighting::Known,
        Some(recorded) => {
            let alert = PortAlert {
                circuit_id: nic.circuit_id.clone(),
                remote_id: nic.remote_id.clone(),
                recorded_mac: recorded,
                seen_mac: mac,
                seen_at: now,
            };
            match &machine.port_alert {
                Some(a) if a.seen_mac == mac && a.recorded_mac == recorded => Sighting::AlreadyFlagged,
                _ => Sighting::Swapped { nic: i, alert },
            }
        }
    }
}

/// The machine's NICs once the operator has confirmed `alert`: the NIC on
/// the alert's port takes the MAC the port showed. `None` when no NIC is on
/// that port any more (an edit changed them): then the alert is stale and
/// clearing it is all there is to do.
pub fn confirmed_nics(machine: &Machine, alert: &PortAlert) -> Option<Vec<Nic>> {
    let mut nics = machine.nics.clone();
    let nic = nics
        .iter_mut()
        .find(|n| n.circuit_id == alert.circuit_id && n.remote_id == alert.remote_id && n.has_port_identity())?;
    nic.mac = Some(alert.seen_mac);
    Some(nics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{MachineKind, MachineState};

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    fn port_nic(c: Option<&str>, r: Option<&str>, m: Option<&str>) -> Nic {
        Nic {
            mac: m.map(mac),
            circuit_id: c.map(str::to_string),
            remote_id: r.map(str::to_string),
            ..Nic::with_mac(mac("00:00:00:00:00:00"))
        }
    }

    fn machine(nics: Vec<Nic>) -> Machine {
        let mut m = Machine::sketch("racked1", MachineKind::Physical, MachineState::New);
        m.nics = nics;
        m
    }

    #[test]
    fn a_request_matches_the_sub_options_a_nic_records() {
        let both = port_nic(Some("ge-0/0/1"), Some("asw1"), None);
        assert!(nic_matches(&both, Some("ge-0/0/1"), Some("asw1")));
        assert!(!nic_matches(&both, Some("ge-0/0/1"), None), "the switch must match too");
        assert!(!nic_matches(&both, Some("ge-0/0/1"), Some("asw2")));
        let circuit = port_nic(Some("ge-0/0/1"), None, None);
        assert!(
            nic_matches(&circuit, Some("ge-0/0/1"), Some("asw9")),
            "remote-id not recorded: any"
        );
        assert!(!nic_matches(&circuit, Some("ge-0/0/2"), None));
        let remote = port_nic(None, Some("rack7-port3"), None);
        assert!(nic_matches(&remote, None, Some("rack7-port3")));
        assert!(!nic_matches(&remote, Some("x"), Some("rack7-port4")));
        let by_mac = Nic::with_mac(mac("52:54:00:00:00:01"));
        assert!(
            !nic_matches(&by_mac, None, None),
            "a NIC with no port identity is never matched by port"
        );
        assert_eq!(
            lookup_keys(Some("c"), Some("r")),
            vec![
                (Some("c".into()), Some("r".into())),
                (Some("c".into()), None),
                (None, Some("r".into()))
            ]
        );
        assert!(lookup_keys(None, None).is_empty());
    }

    #[test]
    fn learn_accept_flag_and_confirm() {
        let now = Utc::now();
        let (a, b) = (mac("52:54:00:15:00:0a"), mac("52:54:00:15:00:0b"));
        let mut m = machine(vec![
            Nic::with_mac(mac("52:54:00:15:00:01")),
            port_nic(Some("krr2"), None, None),
        ]);
        // Not relayed, or from a port the machine does not have.
        assert_eq!(observe(&m, a, None, None, now), Sighting::NotByPort);
        assert_eq!(observe(&m, a, Some("other"), None, now), Sighting::NotByPort);
        // First sighting: learn the MAC, on the NIC of that port.
        assert_eq!(
            observe(&m, a, Some("krr2"), None, now),
            Sighting::Learn { nic: 1, mac: a }
        );
        m.nics[1].mac = Some(a);
        assert_eq!(observe(&m, a, Some("krr2"), None, now), Sighting::Known);
        // Another server on the port: flagged, naming both MACs.
        let Sighting::Swapped { nic: 1, alert } = observe(&m, b, Some("krr2"), Some("relay1"), now) else {
            panic!("a new MAC on the port must be flagged");
        };
        assert_eq!((alert.recorded_mac, alert.seen_mac), (a, b));
        assert_eq!(alert.circuit_id.as_deref(), Some("krr2"));
        assert!(alert.reason().contains("circuit-id krr2") && alert.reason().contains("confirm-port"));
        m.port_alert = Some(alert.clone());
        assert_eq!(
            observe(&m, b, Some("krr2"), None, now),
            Sighting::AlreadyFlagged,
            "flagged once"
        );
        // The operator confirms: the port's NIC takes the new MAC.
        let nics = confirmed_nics(&m, &alert).unwrap();
        assert_eq!(nics[1].mac, Some(b));
        assert_eq!(nics[0], m.nics[0], "other NICs unchanged");
        m.nics = nics;
        m.port_alert = None;
        assert_eq!(observe(&m, b, Some("krr2"), None, now), Sighting::Known);
        // The old server back on the port is flagged again.
        assert!(matches!(
            observe(&m, a, Some("krr2"), None, now),
            Sighting::Swapped { .. }
        ));
        // A stale alert (the NIC was edited away) confirms to nothing.
        m.nics.truncate(1);
        assert_eq!(confirmed_nics(&m, &alert), None);
    }
}
