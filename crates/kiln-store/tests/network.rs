//! Subnets and machine networks on both backends: the disjointness rule on
//! every change, next-free allocation, addresses one machine's only (also
//! when two writers race), and the audit trail.

use std::net::IpAddr;

use kiln_store::{Actor, NewMachine, Store, StoreError};
use kiln_test_utils::store_test;
use kiln_types::event::EventFilter;
use kiln_types::machine::MachineCreate;
use kiln_types::network::{DynamicPool, MachineNetwork, SubnetCreate, SubnetPatch};
use serde_json::json;

fn actor() -> Actor {
    Actor::new("test (admin)")
}

fn subnet(name: &str, prefix: &str, stat: Option<&str>, dynamic: Option<&str>) -> SubnetCreate {
    serde_json::from_value(json!({
        "name": name, "prefix": prefix, "gateway": prefix.replace(".0/24", ".1"),
        "dns": ["10.0.0.53"], "search": ["example.net"],
        "static_range": stat.map(|r| { let (a, b) = r.split_once('-').unwrap(); json!({"first": a, "last": b}) }),
        "dynamic_range": dynamic.map(|r| { let (a, b) = r.split_once('-').unwrap(); json!({"first": a, "last": b}) }),
    }))
    .unwrap()
}

fn pools() -> Vec<DynamicPool> {
    vec![DynamicPool {
        range: "10.0.0.200-10.0.0.250".parse().unwrap(),
        what: "kiln's DHCP pool of [[dhcp.subnet]] 10.0.0.0/24".into(),
    }]
}

async fn machine(store: &Store, host: &str) {
    store
        .create_machines(
            &actor(),
            vec![NewMachine {
                spec: MachineCreate::new(host.parse().unwrap()),
                sealed_password: None,
            }],
        )
        .await
        .unwrap();
}

fn net(v: serde_json::Value) -> MachineNetwork {
    serde_json::from_value(v).unwrap()
}

fn messages(e: StoreError) -> String {
    match e {
        StoreError::Rows { details, .. } => details.into_iter().map(|d| d.message).collect::<Vec<_>>().join("\n"),
        other => panic!("expected a refusal with reasons, got {other:?}"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

store_test!(subnet_crud_and_the_disjointness_rule, |store| {
    let s = store
        .create_subnet(
            &actor(),
            &subnet(
                "prod",
                "10.0.0.0/24",
                Some("10.0.0.10-10.0.0.99"),
                Some("10.0.0.100-10.0.0.199"),
            ),
            &pools(),
        )
        .await
        .unwrap();
    assert_eq!(store.get_subnet("prod").await.unwrap(), s);
    assert_eq!(store.get_subnet(&s.id.to_string()).await.unwrap(), s);

    // Static overlapping dynamic, on create: both ranges named.
    let e = store
        .create_subnet(
            &actor(),
            &subnet(
                "lab",
                "10.9.0.0/24",
                Some("10.9.0.10-10.9.0.120"),
                Some("10.9.0.100-10.9.0.199"),
            ),
            &[],
        )
        .await
        .unwrap_err();
    let m = messages(e);
    assert!(
        m.contains("10.9.0.10-10.9.0.120") && m.contains("10.9.0.100-10.9.0.199"),
        "{m}"
    );
    // Against kiln's DHCP pool.
    let e = store
        .create_subnet(
            &actor(),
            &subnet("lab", "10.0.0.0/24", Some("10.0.0.10-10.0.0.220"), None),
            &pools(),
        )
        .await
        .unwrap_err();
    let m = messages(e);
    assert!(
        m.contains("10.0.0.200-10.0.0.250") && m.contains("[[dhcp.subnet]]"),
        "{m}"
    );
    assert!(m.contains("overlaps subnet prod"), "{m}");

    // On change: widening the static range into the dynamic one is refused.
    let widen = SubnetPatch {
        static_range: Some(Some("10.0.0.10-10.0.0.150".parse().unwrap())),
        ..Default::default()
    };
    let m = messages(
        store
            .update_subnet(&actor(), "prod", &widen, &pools())
            .await
            .unwrap_err(),
    );
    assert!(
        m.contains("10.0.0.10-10.0.0.150") && m.contains("10.0.0.100-10.0.0.199"),
        "{m}"
    );
    assert_eq!(store.get_subnet("prod").await.unwrap(), s, "nothing changed");

    let mtu = SubnetPatch {
        mtu: Some(Some(9000)),
        ..Default::default()
    };
    assert_eq!(
        store.update_subnet(&actor(), "prod", &mtu, &pools()).await.unwrap().mtu,
        Some(9000)
    );
    assert!(matches!(
        store
            .create_subnet(&actor(), &subnet("prod", "10.5.0.0/24", None, None), &[])
            .await,
        Err(StoreError::Conflict(_))
    ));
    store.delete_subnet(&actor(), "prod").await.unwrap();
    assert!(matches!(
        store.get_subnet("prod").await,
        Err(StoreError::NotFound { .. })
    ));
    let events = store.list_events(&EventFilter::default()).await.unwrap();
    let actions: Vec<&str> = events.items.iter().map(|e| e.action.as_str()).collect();
    for a in ["subnet.create", "subnet.update", "subnet.delete"] {
        assert!(actions.contains(&a), "{actions:?}");
    }
});

store_test!(
    machine_network_allocates_next_free_and_keeps_addresses_one_machines,
    |store| {
        store
            .create_subnet(
                &actor(),
                &subnet(
                    "prod",
                    "10.0.0.0/24",
                    Some("10.0.0.10-10.0.0.12"),
                    Some("10.0.0.100-10.0.0.199"),
                ),
                &pools(),
            )
            .await
            .unwrap();
        store
            .create_subnet(&actor(), &subnet("storage", "10.20.0.0/24", None, None), &pools())
            .await
            .unwrap();
        for h in ["web1", "web2", "web3"] {
            machine(&store, h).await;
        }
        let bonded = net(json!({
            "interfaces": [{"name": "eno1", "mac": "52:54:00:00:01:01"}, {"name": "eno2", "mac": "52:54:00:00:01:02"}],
            "bonds": [{"name": "bond0", "interfaces": ["eno1", "eno2"], "mode": "802.3ad", "lacp_rate": "fast", "miimon": 100,
                       "addresses": [{"subnet": "prod", "default_route": true}]}],
            "vlans": [{"name": "bond0.20", "id": 20, "link": "bond0", "addresses": [{"subnet": "storage"}]}]
        }));
        let got = store
            .set_machine_network(&actor(), "web1", None, &bonded, &pools())
            .await
            .unwrap();
        assert_eq!(got.bonds[0].addresses[0].address, Some(ip("10.0.0.10")));
        assert_eq!(
            got.vlans[0].addresses[0].address,
            Some(ip("10.20.0.2")),
            ".1 is the gateway"
        );
        // Setting the same network again keeps the machine's own addresses
        // available to it (they are given now).
        let again = store
            .set_machine_network(&actor(), "web1", None, &got, &pools())
            .await
            .unwrap();
        assert_eq!(again, got);

        let web1 = store.get_machine("web1", None).await.unwrap();
        let (stored, subnets) = store.get_machine_network(web1.id).await.unwrap();
        assert_eq!(stored, got);
        assert_eq!(subnets.keys().collect::<Vec<_>>(), ["prod", "storage"]);

        // Taken by another machine: refused, naming the holder.
        let steal =
            net(json!({"interfaces": [{"name": "eth0", "addresses": [{"subnet": "prod", "address": "10.0.0.10"}]}]}));
        let m = messages(
            store
                .set_machine_network(&actor(), "web2", None, &steal, &pools())
                .await
                .unwrap_err(),
        );
        assert!(m.contains("10.0.0.10 (subnet prod) is taken by machine web1"), "{m}");
        // Inside the dynamic range or kiln's pool: refused.
        let dynamic =
            net(json!({"interfaces": [{"name": "eth0", "addresses": [{"subnet": "prod", "address": "10.0.0.150"}]}]}));
        assert!(
            messages(
                store
                    .set_machine_network(&actor(), "web2", None, &dynamic, &pools())
                    .await
                    .unwrap_err()
            )
            .contains("outside the static range")
        );
        let bad_member = net(json!({"bonds": [{"name": "bond0", "interfaces": ["eno9"], "mode": "active-backup"}]}));
        assert!(
            messages(
                store
                    .set_machine_network(&actor(), "web2", None, &bad_member, &pools())
                    .await
                    .unwrap_err()
            )
            .contains("`eno9`, which is not one of")
        );

        // Next free: .11, then .12, then the range is full.
        let auto =
            net(json!({"interfaces": [{"name": "eth0", "addresses": [{"subnet": "prod", "default_route": true}]}]}));
        let w2 = store
            .set_machine_network(&actor(), "web2", None, &auto, &pools())
            .await
            .unwrap();
        assert_eq!(w2.interfaces[0].addresses[0].address, Some(ip("10.0.0.11")));
        let two = net(json!({"interfaces": [{"name": "eth0", "addresses": [{"subnet": "prod"}, {"subnet": "prod"}]}]}));
        let m = messages(
            store
                .set_machine_network(&actor(), "web3", None, &two, &pools())
                .await
                .unwrap_err(),
        );
        assert!(m.contains("no free address left in 10.0.0.10-10.0.0.12"), "{m}");
        let assigned = store.subnet_assignments("prod").await.unwrap();
        assert_eq!(
            assigned
                .iter()
                .map(|a| (a.address, a.hostname.as_str()))
                .collect::<Vec<_>>(),
            [(ip("10.0.0.10"), "web1"), (ip("10.0.0.11"), "web2")],
            "the refused write left nothing behind"
        );

        // A subnet change that would leave an assigned address outside is refused.
        let shrink = SubnetPatch {
            static_range: Some(Some("10.0.0.11-10.0.0.12".parse().unwrap())),
            ..Default::default()
        };
        let m = messages(
            store
                .update_subnet(&actor(), "prod", &shrink, &pools())
                .await
                .unwrap_err(),
        );
        assert!(m.contains("machine web1 has 10.0.0.10"), "{m}");
        // A subnet in use cannot go.
        assert!(matches!(
            store.delete_subnet(&actor(), "prod").await,
            Err(StoreError::Refused(_))
        ));

        // Clearing a network frees its addresses; deleting a machine too.
        store
            .set_machine_network(&actor(), "web2", None, &MachineNetwork::default(), &pools())
            .await
            .unwrap();
        store.delete_machine(&actor(), "web1", None).await.unwrap();
        assert!(store.subnet_assignments("prod").await.unwrap().is_empty());
        store.delete_subnet(&actor(), "storage").await.unwrap();
    }
);

store_test!(concurrent_allocations_never_share_an_address, |store| {
    store
        .create_subnet(
            &actor(),
            &subnet("prod", "10.0.0.0/24", Some("10.0.0.10-10.0.0.99"), None),
            &[],
        )
        .await
        .unwrap();
    let hosts: Vec<String> = (0..8).map(|i| format!("race{i}")).collect();
    for h in &hosts {
        machine(&store, h).await;
    }
    let auto = net(json!({"interfaces": [{"name": "eth0", "addresses": [{"subnet": "prod"}]}]}));
    let mut tasks = tokio::task::JoinSet::new();
    for h in hosts.clone() {
        let (store, auto) = (store.clone(), auto.clone());
        tasks.spawn(async move { store.set_machine_network(&actor(), &h, None, &auto, &[]).await });
    }
    let mut got = vec![];
    while let Some(r) = tasks.join_next().await {
        got.push(r.unwrap().unwrap().interfaces[0].addresses[0].address.unwrap());
    }
    got.sort();
    got.dedup();
    assert_eq!(got.len(), hosts.len(), "every machine got its own address: {got:?}");
    assert_eq!(got.last(), Some(&ip("10.0.0.17")), "the lowest free ones: {got:?}");
});
