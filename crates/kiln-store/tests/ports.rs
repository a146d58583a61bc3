//! Switch-port identity in the store (issue 15), on SQLite and PostgreSQL:
//! a NIC enrolled by port with no MAC, the MAC learned from its first
//! relayed request, a swapped server flagged, the operator's confirmation,
//! and the audit events of each.

use kiln_store::{Actor, NewMachine, PortChange, Store, StoreError};
use kiln_test_utils::store_test;
use kiln_types::MacAddr;
use kiln_types::event::EventFilter;
use kiln_types::machine::{MachineCreate, MachinePatch, Nic};

fn actor() -> Actor {
    Actor::new("test (operator)")
}

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn by_port(host: &str, circuit: &str) -> NewMachine {
    let mut spec = MachineCreate::new(host.parse().unwrap());
    spec.nics = vec![Nic::by_port(Some(circuit.into()), None)];
    NewMachine {
        spec,
        sealed_password: None,
    }
}

async fn actions(store: &Store, host: &str) -> Vec<(String, String)> {
    let page = store
        .list_events(&EventFilter {
            target: Some(host.into()),
            ..EventFilter::default()
        })
        .await
        .unwrap();
    page.items.into_iter().map(|e| (e.action, e.actor)).collect()
}

store_test!(a_nic_enrolled_by_port_learns_its_mac_once, |store| {
    store
        .create_machines(&actor(), vec![by_port("racked1", "krr2"), by_port("racked2", "krr3")])
        .await
        .unwrap();
    let m = store.get_machine("racked1", None).await.unwrap();
    assert_eq!(m.nics[0].mac, None, "enrolled with no MAC");
    assert_eq!(
        store
            .find_machine_by_nic(mac("52:54:00:15:00:01"), None, None)
            .await
            .unwrap(),
        None
    );
    let generation = store.machines_generation().await.unwrap();

    // A request from another port, or not relayed: nothing.
    let a = mac("52:54:00:15:00:01");
    assert_eq!(
        store.observe_port(a, Some("elsewhere"), None).await.unwrap(),
        PortChange::None
    );
    // The first relayed request from the port: learned, audited.
    let PortChange::Learned(m) = store.observe_port(a, Some("krr2"), Some("relay1")).await.unwrap() else {
        panic!("the MAC must be learned");
    };
    assert_eq!(m.nics[0].mac, Some(a));
    let stored = store.get_machine("racked1", None).await.unwrap();
    assert_eq!(stored.nics[0].mac, Some(a));
    assert_eq!(
        stored.nics[0].circuit_id.as_deref(),
        Some("krr2"),
        "the port stays on record"
    );
    assert!(
        store.machines_generation().await.unwrap() > generation,
        "DHCP copies reload"
    );
    // From now on the MAC finds the machine (HTTP boot, discovery).
    let found = store.find_machine_by_nic(a, None, None).await.unwrap().unwrap();
    assert_eq!(found.hostname.as_str(), "racked1");
    // Seen again: nothing new, no second event.
    assert_eq!(
        store.observe_port(a, Some("krr2"), None).await.unwrap(),
        PortChange::None
    );
    let events = actions(&store, "racked1").await;
    let learned: Vec<_> = events.iter().filter(|(a, _)| a == "machine.port_learned").collect();
    assert_eq!(learned.len(), 1, "{events:?}");
    assert!(
        learned[0].1.contains("circuit-id krr2"),
        "the event names the port: {events:?}"
    );
    // The same MAC on racked2's port is not learned there: the inventory
    // must say which machine it is.
    let e = store.observe_port(a, Some("krr3"), None).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::Refused(m) if m.contains("racked1") && m.contains("not learned")),
        "{e:?}"
    );
    assert_eq!(store.get_machine("racked2", None).await.unwrap().nics[0].mac, None);
});

store_test!(a_swapped_server_is_flagged_until_confirmed, |store| {
    store
        .create_machines(&actor(), vec![by_port("racked1", "krr2")])
        .await
        .unwrap();
    let (old, new) = (mac("52:54:00:15:00:01"), mac("52:54:00:15:00:02"));
    store.observe_port(old, Some("krr2"), None).await.unwrap();
    // Confirming with nothing flagged is refused.
    let e = store.confirm_port(&actor(), "racked1", None).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::Refused(m) if m.contains("no port alert")),
        "{e:?}"
    );

    let PortChange::Flagged(m) = store.observe_port(new, Some("krr2"), None).await.unwrap() else {
        panic!("another MAC on the port must flag the machine");
    };
    let alert = m.port_alert.clone().unwrap();
    assert_eq!((alert.recorded_mac, alert.seen_mac), (old, new));
    let stored = store.get_machine("racked1", None).await.unwrap();
    assert_eq!(stored.port_alert, Some(alert.clone()), "the alert is stored");
    assert_eq!(
        stored.nics[0].mac,
        Some(old),
        "the record keeps the old MAC until confirmed"
    );
    // Flagged once per MAC.
    assert_eq!(
        store.observe_port(new, Some("krr2"), None).await.unwrap(),
        PortChange::None
    );
    // HTTP boot finds the flagged machine by the MAC its port showed.
    let flagged = store.find_machine_by_alert_mac(new).await.unwrap().unwrap();
    assert_eq!(flagged.hostname.as_str(), "racked1");
    assert_eq!(store.find_machine_by_alert_mac(old).await.unwrap(), None);
    // An edit keeps the alert: only a confirmation clears it.
    let edited = store
        .update_machine(
            &actor(),
            "racked1",
            MachinePatch {
                tags: Some(vec!["db".parse().unwrap()]),
                ..MachinePatch::default()
            },
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(edited.port_alert, Some(alert.clone()));
    assert_eq!(
        store.get_machine("racked1", None).await.unwrap().port_alert,
        Some(alert)
    );

    let confirmed = store.confirm_port(&actor(), "racked1", None).await.unwrap();
    assert_eq!(confirmed.port_alert, None);
    assert_eq!(confirmed.nics[0].mac, Some(new));
    let stored = store.get_machine("racked1", None).await.unwrap();
    assert_eq!(stored, confirmed, "returned as stored");
    assert_eq!(store.find_machine_by_alert_mac(new).await.unwrap(), None);
    assert_eq!(
        store
            .find_machine_by_nic(new, None, None)
            .await
            .unwrap()
            .map(|m| m.hostname.to_string()),
        Some("racked1".into())
    );
    let events: Vec<String> = actions(&store, "racked1").await.into_iter().map(|(a, _)| a).collect();
    for want in ["machine.port_learned", "machine.port_flagged", "machine.port_confirmed"] {
        assert!(events.iter().any(|a| a == want), "{want} missing from {events:?}");
    }
});

store_test!(port_identities_are_unique_and_nics_need_one, |store| {
    store
        .create_machines(&actor(), vec![by_port("racked1", "krr2")])
        .await
        .unwrap();
    // Two machines on one port: refused, naming the holder.
    let e = store
        .create_machines(&actor(), vec![by_port("racked9", "krr2")])
        .await
        .unwrap_err();
    let StoreError::Rows { conflict, details } = e else {
        panic!("expected row errors");
    };
    assert!(conflict);
    assert!(
        details[0].message.contains("circuit-id krr2") && details[0].message.contains("racked1"),
        "{details:?}"
    );
    // A NIC with neither MAC nor port identity: the API refuses it with
    // `Nic::validate`'s words; the database refuses it anyway.
    let mut bare = by_port("racked8", "x");
    bare.spec.nics[0].circuit_id = None;
    assert!(
        bare.spec
            .validate()
            .iter()
            .any(|p| p.contains("needs a `mac` or a switch-port identity"))
    );
    let e = format!("{:?}", store.create_machines(&actor(), vec![bare]).await.unwrap_err());
    assert!(e.contains("mac IS NOT NULL") || e.contains("nics_identity_ck"), "{e}");
    assert!(
        store.get_machine("racked8", None).await.is_err(),
        "nothing half-created"
    );
    // Several NICs may wait for their MAC at once (NULLs do not clash).
    let mut two = by_port("racked7", "krr7");
    two.spec.nics.push(Nic::by_port(None, Some("rack7-port2".into())));
    let m = store.create_machines(&actor(), vec![two]).await.unwrap().remove(0);
    assert_eq!(m.nics.len(), 2);
    // remote-id alone identifies the second.
    let PortChange::Learned(m) = store
        .observe_port(mac("52:54:00:15:00:77"), Some("some-circuit"), Some("rack7-port2"))
        .await
        .unwrap()
    else {
        panic!("learned by remote-id");
    };
    assert_eq!(m.nics[1].mac, Some(mac("52:54:00:15:00:77")));
    assert_eq!(m.nics[0].mac, None);
});
