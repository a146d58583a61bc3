//! Store conformance: every test body runs on SQLite and on PostgreSQL.

use chrono::Timelike;
use kiln_store::{Actor, NewMachine, SealedPassword, Store, StoreError};
use kiln_test_utils::store_test;
use kiln_types::agent::ImageFormat;
use kiln_types::auth::{Role, TenantCreate, TokenState};
use kiln_types::catalog::{Arch, ImageContent, OsImageCreate, OsImagePatch, OsKind, PlatformTag, TaskCreate, TaskKind};
use kiln_types::event::EventFilter;
use kiln_types::machine::{
    BmcDriver, BmcInput, BootPolicy, Firmware, FirmwareMode, InstalledOs, MachineCreate, MachineFilter, MachinePatch,
    MachineState, Nic,
};
use kiln_types::site::{RackCreate, SiteCreate};

fn actor() -> Actor {
    Actor::new("test (admin)")
}

fn nic(mac: &str) -> Nic {
    Nic::with_mac(mac.parse().unwrap())
}

fn machine(host: &str, mac: &str) -> NewMachine {
    let mut spec = MachineCreate::new(host.parse().unwrap());
    spec.nics.push(nic(mac));
    NewMachine {
        spec,
        sealed_password: None,
    }
}

async fn rack(store: &Store, site: &str, rack: &str) {
    if store.get_site(site).await.is_err() {
        store
            .create_site(
                &actor(),
                &SiteCreate {
                    name: site.into(),
                    description: None,
                },
            )
            .await
            .unwrap();
    }
    store
        .create_rack(
            &actor(),
            &RackCreate {
                name: rack.into(),
                site: site.into(),
                row: Some("a".into()),
                node_group: None,
            },
        )
        .await
        .unwrap();
}

fn rows_of(e: StoreError) -> (bool, Vec<(Option<usize>, String)>) {
    match e {
        StoreError::Rows { conflict, details } => {
            (conflict, details.into_iter().map(|d| (d.index, d.message)).collect())
        }
        other => panic!("expected row errors, got {other:?}"),
    }
}

store_test!(machine_round_trip, |store| {
    rack(&store, "eqiad", "a1").await;
    store
        .create_tenant(
            &actor(),
            &TenantCreate {
                name: "acme".into(),
                description: None,
            },
        )
        .await
        .unwrap();
    let mut m = machine("db1001", "52:54:00:00:00:01");
    m.spec.tags = vec!["db".parse().unwrap(), "bm".parse().unwrap()];
    m.spec.rack = Some("a1".into());
    m.spec.owner = Some("acme".into());
    m.spec.ipv4 = Some("10.0.0.1".parse().unwrap());
    m.spec.protected = true;
    m.spec.bmc = Some(BmcInput {
        username: Some("root".into()),
        ..BmcInput::new(BmcDriver::Ipmi, "10.1.0.1")
    });
    m.sealed_password = Some(SealedPassword("sealed-bytes".into()));
    m.spec.nics[0].switch = Some("asw-a1".into());
    m.spec.nics[0].port = Some("xe-0/0/1".into());
    m.spec.nics[0].vlan = Some(1001);
    let created = store.create_machines(&actor(), vec![m]).await.unwrap().remove(0);
    let got = store.get_machine("db1001", None).await.unwrap();
    assert_eq!(created, got, "the returned record equals the stored one");
    assert_eq!(got.site.as_deref(), Some("eqiad"));
    assert_eq!(got.rack.as_deref(), Some("a1"));
    assert_eq!(got.owner.as_deref(), Some("acme"));
    assert!(got.protected && !got.maintenance);
    assert!(got.bmc.as_ref().unwrap().password_set);
    assert_eq!(got.tags.iter().map(|t| t.as_str()).collect::<Vec<_>>(), ["bm", "db"]);
    assert_eq!(got.nics[0].vlan, Some(1001));
    assert_eq!(
        store.get_machine(&got.id.to_string(), None).await.unwrap().hostname,
        got.hostname
    );
    assert_eq!(
        store.machine_bmc_password(got.id).await.unwrap(),
        Some(SealedPassword("sealed-bytes".into()))
    );
});

store_test!(uniqueness_is_reported_per_row, |store| {
    let mut a = machine("a1", "52:54:00:00:00:01");
    a.spec.nics[0].switch = Some("sw1".into());
    a.spec.nics[0].port = Some("p1".into());
    a.spec.bmc = Some(BmcInput::new(BmcDriver::Ipmi, "10.9.9.9"));
    store.create_machines(&actor(), vec![a]).await.unwrap();

    let mut dup_port = machine("b1", "52:54:00:00:00:02");
    dup_port.spec.nics[0].switch = Some("sw1".into());
    dup_port.spec.nics[0].port = Some("p1".into());
    let mut dup_bmc = machine("b2", "52:54:00:00:00:03");
    dup_bmc.spec.bmc = Some(BmcInput::new(BmcDriver::Ipmi, "10.9.9.9"));
    let batch = vec![
        machine("a1", "52:54:00:00:00:09"), // hostname taken
        machine("b0", "52:54:00:00:00:01"), // MAC taken
        dup_port,                           // switch port taken
        dup_bmc,                            // BMC address taken
        machine("c1", "52:54:00:00:00:0a"), // fine
        machine("c1", "52:54:00:00:00:0b"), // hostname twice in the batch
    ];
    let (conflict, rows) = rows_of(store.create_machines(&actor(), batch).await.unwrap_err());
    assert!(conflict);
    let text = format!("{rows:?}");
    assert!(
        rows.iter()
            .any(|(i, m)| *i == Some(0) && m.contains("hostname `a1` is already used by machine a1")),
        "{text}"
    );
    assert!(
        rows.iter()
            .any(|(i, m)| *i == Some(1) && m.contains("MAC 52:54:00:00:00:01 is already used by machine a1")),
        "{text}"
    );
    assert!(
        rows.iter()
            .any(|(i, m)| *i == Some(2) && m.contains("switch port sw1 p1 is already used by machine a1")),
        "{text}"
    );
    assert!(
        rows.iter()
            .any(|(i, m)| *i == Some(3) && m.contains("BMC address `10.9.9.9`")),
        "{text}"
    );
    assert!(
        rows.iter()
            .any(|(i, m)| *i == Some(5) && m.contains("also used by row 4")),
        "{text}"
    );
    assert!(!rows.iter().any(|(i, _)| *i == Some(4)), "{text}");
    // All or nothing: the good row was not written either.
    assert!(matches!(
        store.get_machine("c1", None).await,
        Err(StoreError::NotFound { .. })
    ));
});

store_test!(database_enforces_uniqueness, |store| {
    store
        .create_machines(&actor(), vec![machine("x1", "52:54:00:00:00:01")])
        .await
        .unwrap();
    let id = uuid::Uuid::now_v7().to_string();
    // Straight into the table, past every check in code.
    let raw = sqlx::query::<sqlx::Any>(
        "INSERT INTO machines (id, hostname, kind, state, protected, maintenance, created_at, updated_at) \
         VALUES ($1, 'x1', 'physical', 'new', FALSE, FALSE, 'now', 'now')",
    )
    .bind(&id)
    .execute(store.pool())
    .await;
    let err = raw.expect_err("the database must refuse a second x1");
    assert!(err.as_database_error().unwrap().is_unique_violation(), "{err}");
    let raw = sqlx::query::<sqlx::Any>(
        "INSERT INTO nics (mac, machine_id, position) SELECT '52:54:00:00:00:01', id, 1 FROM machines",
    )
    .execute(store.pool())
    .await;
    assert!(
        raw.expect_err("duplicate MAC")
            .as_database_error()
            .unwrap()
            .is_unique_violation()
    );
});

store_test!(concurrent_creates_of_one_hostname, |store| {
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .create_machines(&actor(), vec![machine("race", &format!("52:54:00:00:01:{i:02x}"))])
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Rows { conflict: true, .. } | StoreError::Conflict(_)) => {}
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!(ok, 1, "exactly one create of `race` wins");
});

store_test!(unknown_rack_and_tenant_are_named, |store| {
    let mut m = machine("h1", "52:54:00:00:00:01");
    m.spec.rack = Some("nope".into());
    m.spec.owner = Some("ghost".into());
    let (conflict, rows) = rows_of(store.create_machines(&actor(), vec![m]).await.unwrap_err());
    assert!(!conflict);
    assert!(rows[0].1.contains("rack `nope` does not exist"), "{rows:?}");
    assert!(rows[1].1.contains("tenant `ghost` does not exist"), "{rows:?}");
});

store_test!(filters_and_pagination, |store| {
    rack(&store, "eqiad", "a1").await;
    rack(&store, "codfw", "b1").await;
    store
        .create_tenant(
            &actor(),
            &TenantCreate {
                name: "acme".into(),
                description: None,
            },
        )
        .await
        .unwrap();
    let mut batch = vec![];
    for i in 0..25 {
        let mut m = machine(&format!("node{i:03}"), &format!("52:54:00:00:10:{i:02x}"));
        m.spec.rack = Some(if i % 2 == 0 { "a1" } else { "b1" }.into());
        m.spec.tags = vec![
            if i % 5 == 0 { "gpu" } else { "cpu" }.parse().unwrap(),
            "fleet".parse().unwrap(),
        ];
        if i < 3 {
            m.spec.owner = Some("acme".into());
            m.spec.state = MachineState::Deployed;
        }
        batch.push(m);
    }
    store.create_machines(&actor(), batch).await.unwrap();
    let list = |f: MachineFilter| {
        let store = store.clone();
        async move { store.list_machines(&f, None).await.unwrap() }
    };
    let gpu = list(MachineFilter {
        tag: Some("gpu".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(gpu.items.len(), 5);
    let both = list(MachineFilter {
        tag: Some("gpu,fleet".into()),
        site: Some("eqiad".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(
        both.items.iter().map(|m| m.hostname.to_string()).collect::<Vec<_>>(),
        ["node000", "node010", "node020"]
    );
    assert_eq!(
        list(MachineFilter {
            rack: Some("b1".into()),
            ..Default::default()
        })
        .await
        .items
        .len(),
        12
    );
    assert_eq!(
        list(MachineFilter {
            state: Some(MachineState::Deployed),
            ..Default::default()
        })
        .await
        .items
        .len(),
        3
    );
    assert_eq!(
        list(MachineFilter {
            owner: Some("acme".into()),
            ..Default::default()
        })
        .await
        .items
        .len(),
        3
    );
    assert_eq!(
        list(MachineFilter {
            q: Some("E01".into()),
            ..Default::default()
        })
        .await
        .items
        .len(),
        10
    );
    // A LIKE wildcard in the query is a literal character.
    assert_eq!(
        list(MachineFilter {
            q: Some("node_".into()),
            ..Default::default()
        })
        .await
        .items
        .len(),
        0
    );

    // Pages of 10 walk all 25 machines once, in hostname order.
    let mut seen = vec![];
    let mut cursor = None;
    loop {
        let page = list(MachineFilter {
            limit: Some(10),
            cursor: cursor.clone(),
            ..Default::default()
        })
        .await;
        seen.extend(page.items.iter().map(|m| m.hostname.to_string()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let mut want: Vec<String> = (0..25).map(|i| format!("node{i:03}")).collect();
    want.sort();
    assert_eq!(seen, want);

    // A tenant's scope sees its machines only.
    let acme = store.get_tenant("acme").await.unwrap();
    assert_eq!(
        store
            .list_machines(&MachineFilter::default(), Some(acme.id))
            .await
            .unwrap()
            .items
            .len(),
        3
    );
    assert!(matches!(
        store.get_machine("node003", Some(acme.id)).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.get_machine("node002", Some(acme.id)).await.is_ok());

    assert!(matches!(
        store
            .list_machines(
                &MachineFilter {
                    cursor: Some("zz".into()),
                    ..Default::default()
                },
                None
            )
            .await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store
            .list_machines(
                &MachineFilter {
                    limit: Some(0),
                    ..Default::default()
                },
                None
            )
            .await,
        Err(StoreError::Invalid(_))
    ));
});

store_test!(update_delete_and_audit, |store| {
    store
        .create_machines(
            &actor(),
            vec![machine("w1", "52:54:00:00:00:01"), machine("w2", "52:54:00:00:00:02")],
        )
        .await
        .unwrap();
    // A partial update keeps what it does not name.
    let patch: MachinePatch =
        serde_json::from_str(r#"{"tags": ["web"], "protected": true, "fqdn": "w1.example.net"}"#).unwrap();
    let after = store.update_machine(&actor(), "w1", patch, None, None).await.unwrap();
    assert_eq!(after.nics.len(), 1);
    assert_eq!(after, store.get_machine("w1", None).await.unwrap());
    // Taking another machine's MAC is refused, naming it.
    let patch: MachinePatch = serde_json::from_str(r#"{"nics": [{"mac": "52:54:00:00:00:02"}]}"#).unwrap();
    let (conflict, rows) = rows_of(
        store
            .update_machine(&actor(), "w1", patch, None, None)
            .await
            .unwrap_err(),
    );
    assert!(conflict && rows[0].1.contains("already used by machine w2"), "{rows:?}");
    // Its own MAC again is fine; so is renaming.
    let patch: MachinePatch =
        serde_json::from_str(r#"{"hostname": "web1", "nics": [{"mac": "52:54:00:00:00:01", "name": "eno1"}]}"#)
            .unwrap();
    let renamed = store.update_machine(&actor(), "w1", patch, None, None).await.unwrap();
    assert_eq!(renamed.hostname.as_str(), "web1");
    assert_eq!(renamed.nics[0].name.as_deref(), Some("eno1"));
    // Protected machines are not deleted.
    let err = store.delete_machine(&actor(), "web1", None).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Refused(m) if m.contains("protected")),
        "{err:?}"
    );
    store
        .update_machine(
            &actor(),
            "web1",
            serde_json::from_str(r#"{"protected": false}"#).unwrap(),
            None,
            None,
        )
        .await
        .unwrap();
    store.delete_machine(&actor(), "web1", None).await.unwrap();
    assert!(matches!(
        store.get_machine("web1", None).await,
        Err(StoreError::NotFound { .. })
    ));

    let events = store
        .list_events(&EventFilter {
            target_kind: Some("machine".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .items;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "machine.delete",
            "machine.update",
            "machine.update",
            "machine.update",
            "machine.create",
            "machine.create"
        ]
    );
    let rename = &events[2];
    assert_eq!(rename.before.as_ref().unwrap()["hostname"], "w1");
    assert_eq!(rename.after.as_ref().unwrap()["hostname"], "web1");
    assert_eq!(rename.actor, "test (admin)");
    let by_name = store
        .list_events(&EventFilter {
            target: Some("w2".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .items;
    assert_eq!(by_name.len(), 1);

    // The log is append-only, in the database itself.
    let upd = sqlx::query::<sqlx::Any>("UPDATE events SET actor = 'mallory'")
        .execute(store.pool())
        .await;
    assert!(upd.unwrap_err().to_string().contains("append-only"));
    let del = sqlx::query::<sqlx::Any>("DELETE FROM events")
        .execute(store.pool())
        .await;
    assert!(del.unwrap_err().to_string().contains("append-only"));
});

store_test!(bmc_tls_settings_round_trip_and_are_audited, |store| {
    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let mut m = machine("rf1", "52:54:00:00:00:01");
    m.spec.bmc = Some(BmcInput {
        ca_cert: Some(PEM.into()),
        ..BmcInput::new(BmcDriver::Redfish, "https://10.1.0.1")
    });
    m.sealed_password = Some(SealedPassword("sealed-bytes".into()));
    let created = store.create_machines(&actor(), vec![m]).await.unwrap().remove(0);
    let got = store.get_machine("rf1", None).await.unwrap();
    assert_eq!(created, got);
    let bmc = got.bmc.unwrap();
    assert_eq!((bmc.insecure, bmc.ca_cert.as_deref()), (false, Some(PEM)));

    // Turning checks off (and the CA out) is an update like any other: in
    // the audit log with the flag before and after; the password is kept.
    let patch: MachinePatch = serde_json::from_value(serde_json::json!({
        "bmc": {"driver": "redfish", "address": "https://10.1.0.1", "insecure": true}
    }))
    .unwrap();
    let after = store.update_machine(&actor(), "rf1", patch, None, None).await.unwrap();
    let bmc = after.bmc.as_ref().unwrap();
    assert!(bmc.insecure && bmc.ca_cert.is_none() && bmc.password_set, "{bmc:?}");
    assert_eq!(after, store.get_machine("rf1", None).await.unwrap());
    let ev = store
        .list_events(&EventFilter {
            target: Some("rf1".into()),
            action: Some("machine.update".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .items;
    let (before, after) = (ev[0].before.as_ref().unwrap(), ev[0].after.as_ref().unwrap());
    assert_eq!(before["bmc"]["insecure"], false);
    assert_eq!(before["bmc"]["ca_cert"], PEM);
    assert_eq!(after["bmc"]["insecure"], true);
    assert!(after["bmc"].get("ca_cert").is_none(), "{after}");

    // The store checks the settings against the driver too.
    let patch: MachinePatch = serde_json::from_value(serde_json::json!({
        "bmc": {"driver": "ipmi", "address": "10.1.0.1", "insecure": true}
    }))
    .unwrap();
    let (_, rows) = rows_of(
        store
            .update_machine(&actor(), "rf1", patch, None, None)
            .await
            .unwrap_err(),
    );
    assert!(rows[0].1.contains("applies to the redfish driver only"), "{rows:?}");
});

store_test!(firmware_boot_policy_and_installed_os_round_trip_and_filter, |store| {
    // Enrolled by hand with a firmware mode (never inventoried) and the
    // always-netboot policy; one UEFI with Secure Boot; one unknown.
    let mut a = machine("fw-bios", "52:54:00:00:10:01");
    a.spec.firmware = Some(Firmware {
        mode: FirmwareMode::Bios,
        secure_boot: false,
    });
    a.spec.boot_policy = BootPolicy::AlwaysNetboot;
    let mut b = machine("fw-uefi", "52:54:00:00:10:02");
    b.spec.firmware = Some(Firmware {
        mode: FirmwareMode::Uefi,
        secure_boot: true,
    });
    let c = machine("fw-unknown", "52:54:00:00:10:03");
    let made = store.create_machines(&actor(), vec![a, b, c]).await.unwrap();
    for m in &made {
        assert_eq!(m, &store.get_machine(m.hostname.as_str(), None).await.unwrap());
    }
    let got = store.get_machine("fw-bios", None).await.unwrap();
    assert_eq!(got.boot_policy, BootPolicy::AlwaysNetboot);
    assert_eq!(got.firmware.unwrap().mode, FirmwareMode::Bios);
    assert!(
        store
            .get_machine("fw-uefi", None)
            .await
            .unwrap()
            .firmware
            .unwrap()
            .secure_boot
    );
    let unknown = store.get_machine("fw-unknown", None).await.unwrap();
    assert_eq!((unknown.firmware, unknown.boot_policy), (None, BootPolicy::Disk));

    let hosts = |page: kiln_types::page::Page<kiln_types::machine::Machine>| {
        page.items
            .into_iter()
            .map(|m| m.hostname.to_string())
            .collect::<Vec<_>>()
    };
    let by_fw = |mode| MachineFilter {
        firmware: Some(mode),
        ..Default::default()
    };
    assert_eq!(
        hosts(store.list_machines(&by_fw(FirmwareMode::Uefi), None).await.unwrap()),
        ["fw-uefi"]
    );
    assert_eq!(
        hosts(store.list_machines(&by_fw(FirmwareMode::Bios), None).await.unwrap()),
        ["fw-bios"]
    );

    // A patch changes both; a BIOS machine cannot have Secure Boot on.
    let patch: MachinePatch = serde_json::from_value(serde_json::json!({
        "firmware": {"mode": "uefi"}, "boot_policy": "disk"
    }))
    .unwrap();
    let after = store
        .update_machine(&actor(), "fw-bios", patch, None, None)
        .await
        .unwrap();
    assert_eq!(
        (after.firmware.unwrap().mode, after.boot_policy),
        (FirmwareMode::Uefi, BootPolicy::Disk)
    );
    assert_eq!(after, store.get_machine("fw-bios", None).await.unwrap());
    let patch: MachinePatch = serde_json::from_value(serde_json::json!({
        "firmware": {"mode": "bios", "secure_boot": true}
    }))
    .unwrap();
    let (_, rows) = rows_of(
        store
            .update_machine(&actor(), "fw-bios", patch, None, None)
            .await
            .unwrap_err(),
    );
    assert!(rows[0].1.contains("BIOS has no Secure Boot"), "{rows:?}");
    let patch: MachinePatch = serde_json::from_value(serde_json::json!({"firmware": null})).unwrap();
    let after = store
        .update_machine(&actor(), "fw-bios", patch, None, None)
        .await
        .unwrap();
    assert_eq!(after.firmware, None, "null forgets it");

    // What runs where: recorded, kept across other updates, replaced by
    // the next install, filtered by NAME and NAME:VERSION.
    let os = |name: &str, version: &str| InstalledOs {
        os_image: kiln_types::OsImageId::new(),
        name: name.into(),
        version: version.into(),
        sha256: Some("ab".repeat(32)),
        job_id: kiln_types::JobId::new(),
        installed_at: chrono::Utc::now().with_nanosecond(123_456_000).unwrap(),
    };
    let deb12 = os("debian", "12");
    let m = store.record_installed_os(&actor(), made[0].id, &deb12).await.unwrap();
    assert_eq!(m.installed_os.as_ref(), Some(&deb12));
    store
        .record_installed_os(&actor(), made[1].id, &os("debian", "11"))
        .await
        .unwrap();
    store
        .record_installed_os(&actor(), made[2].id, &os("rocky", "9"))
        .await
        .unwrap();
    let patch = MachinePatch {
        protected: Some(true),
        ..Default::default()
    };
    let after = store
        .update_machine(&actor(), "fw-bios", patch, None, None)
        .await
        .unwrap();
    assert_eq!(after.installed_os.as_ref(), Some(&deb12), "an edit keeps the record");
    assert_eq!(
        store.get_machine("fw-bios", None).await.unwrap().installed_os,
        Some(deb12.clone())
    );
    let by_os = |os: &str| MachineFilter {
        os: Some(os.into()),
        ..Default::default()
    };
    assert_eq!(
        hosts(store.list_machines(&by_os("debian"), None).await.unwrap()),
        ["fw-bios", "fw-uefi"]
    );
    assert_eq!(
        hosts(store.list_machines(&by_os("debian:12"), None).await.unwrap()),
        ["fw-bios"]
    );
    assert_eq!(
        hosts(store.list_machines(&by_os("rocky:9"), None).await.unwrap()),
        ["fw-unknown"]
    );
    assert!(hosts(store.list_machines(&by_os("debian:13"), None).await.unwrap()).is_empty());
    let e = store
        .list_machines(&by_os("debian:"), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("NAME:VERSION"), "{e}");
    // Reinstalled: the new record replaces the old, and is audited.
    let rocky = os("rocky", "9");
    store.record_installed_os(&actor(), made[0].id, &rocky).await.unwrap();
    assert_eq!(
        hosts(store.list_machines(&by_os("debian"), None).await.unwrap()),
        ["fw-uefi"]
    );
    let ev = store
        .list_events(&EventFilter {
            target: Some("fw-bios".into()),
            action: Some("machine.installed_os".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .items;
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(ev[0].after.as_ref().unwrap()["installed_os"]["name"], "rocky");
});

store_test!(token_expiry_and_last_use, |store| {
    let t0 = chrono::Utc::now();
    let soon = t0 + chrono::Duration::seconds(30);
    let t = store
        .create_token(&actor(), Some("ci"), Role::Operator, None, "h9", Some(soon))
        .await
        .unwrap();
    let found = store.token_by_hash("h9").await.unwrap().unwrap().info;
    assert_eq!(found, t, "what is returned is what is read back");
    assert_eq!(
        found.expires_at.map(|e| e.timestamp_micros()),
        Some(soon.timestamp_micros())
    );
    assert_eq!(found.state_at(t0), TokenState::Live);
    assert!(matches!(found.state_at(soon), TokenState::Expired(_)));
    assert!(found.last_used_at.is_none());

    // Last use: written once, then not again within the interval.
    let minute = std::time::Duration::from_secs(60);
    assert!(store.touch_token(t.id, t0, "192.0.2.7", minute).await.unwrap());
    assert!(
        !store
            .touch_token(t.id, t0 + chrono::Duration::seconds(59), "192.0.2.8", minute)
            .await
            .unwrap(),
        "a second use within a minute writes nothing"
    );
    let used = store.token_by_hash("h9").await.unwrap().unwrap().info;
    assert_eq!(
        used.last_used_at.map(|u| u.timestamp_micros()),
        Some(t0.timestamp_micros())
    );
    assert_eq!(used.last_used_from.as_deref(), Some("192.0.2.7"));
    let later = t0 + chrono::Duration::seconds(61);
    assert!(store.touch_token(t.id, later, "192.0.2.8", minute).await.unwrap());
    let listed = store.list_tokens().await.unwrap();
    let ci = listed.iter().find(|x| x.name == "ci").unwrap();
    assert_eq!(ci.last_used_from.as_deref(), Some("192.0.2.8"));
    assert_eq!(
        ci.last_used_at.map(|u| u.timestamp_micros()),
        Some(later.timestamp_micros())
    );

    // An expired tenant token no longer keeps its tenant alive.
    store
        .create_tenant(
            &actor(),
            &TenantCreate {
                name: "gone".into(),
                description: None,
            },
        )
        .await
        .unwrap();
    store
        .create_token(
            &actor(),
            None,
            Role::Tenant,
            Some("gone"),
            "h10",
            Some(t0 - chrono::Duration::seconds(1)),
        )
        .await
        .unwrap();
    store.delete_tenant(&actor(), "gone").await.unwrap();
});

store_test!(tokens_tenants_and_catalog, |store| {
    store
        .create_tenant(
            &actor(),
            &TenantCreate {
                name: "acme".into(),
                description: None,
            },
        )
        .await
        .unwrap();
    let err = store
        .create_token(&actor(), None, Role::Tenant, None, "h0", None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs --tenant"));
    let err = store
        .create_token(&actor(), None, Role::Admin, Some("acme"), "h0", None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("only tenant tokens"));
    let t = store
        .create_token(&actor(), Some("acme-ci"), Role::Tenant, Some("acme"), "h1", None)
        .await
        .unwrap();
    let found = store.token_by_hash("h1").await.unwrap().unwrap();
    assert_eq!(found.info, t);
    assert!(found.tenant_id.is_some());
    assert!(store.token_by_hash("h2").await.unwrap().is_none());
    let err = store.delete_tenant(&actor(), "acme").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Refused(m) if m.contains("1 live tokens")),
        "{err:?}"
    );
    store.revoke_token(&actor(), "acme-ci").await.unwrap();
    let revoked = store.token_by_hash("h1").await.unwrap().unwrap().info;
    assert!(
        matches!(revoked.state_at(chrono::Utc::now()), TokenState::Revoked(_)),
        "a revoked token no longer authenticates: {revoked:?}"
    );
    store.delete_tenant(&actor(), "acme").await.unwrap();

    let img = OsImageCreate {
        name: "debian".into(),
        version: "12".into(),
        arch: Arch::X86_64,
        kind: OsKind::DiskImage,
        tags: vec![PlatformTag::Vm, PlatformTag::Bm, PlatformTag::Bm],
        min_ram_bytes: 1 << 30,
        min_disk_bytes: 10 << 30,
        source: "http://mirror/debian-12.raw.zst".into(),
        sha256: Some("AB".repeat(32)),
        format: None,
        content: Default::default(),
        templates: Default::default(),
    };
    let created = store.create_os_image(&actor(), &img).await.unwrap();
    assert_eq!(created.tags, [PlatformTag::Bm, PlatformTag::Vm]);
    assert_eq!(store.get_os_image("debian-12").await.unwrap(), created);
    assert_eq!(store.get_os_image("debian").await.unwrap(), created);
    // The format comes from the source's name and is stored; an edit of
    // the source alone follows it, a given format wins.
    assert_eq!(created.format, ImageFormat::RawZstd);
    assert_eq!(created.content, ImageContent::Filesystem);
    let edited = store
        .update_os_image(
            &actor(),
            "debian-12",
            &OsImagePatch {
                source: Some("http://mirror/debian-12-genericcloud-amd64.qcow2".into()),
                content: Some(ImageContent::WholeDisk),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (edited.format, edited.content),
        (ImageFormat::Qcow2, ImageContent::WholeDisk)
    );
    assert_eq!(
        store.get_os_image("debian-12").await.unwrap(),
        edited,
        "read back the same"
    );
    let edited = store
        .update_os_image(
            &actor(),
            "debian-12",
            &OsImagePatch {
                format: Some(ImageFormat::Raw),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (edited.format, edited.content),
        (ImageFormat::Raw, ImageContent::WholeDisk)
    );
    assert!(matches!(
        store.create_os_image(&actor(), &img).await,
        Err(StoreError::Conflict(_))
    ));
    let task = store
        .create_task(
            &actor(),
            &TaskCreate {
                name: "motd".into(),
                kind: TaskKind::Script,
                tags: vec![],
                content: "echo hi".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(store.list_tasks().await.unwrap(), vec![task]);
    store.delete_task(&actor(), "motd").await.unwrap();
    store.delete_os_image(&actor(), "debian-12").await.unwrap();
    assert!(store.list_os_images().await.unwrap().is_empty());
});

store_test!(sites_and_racks, |store| {
    rack(&store, "eqiad", "a1").await;
    rack(&store, "codfw", "a1").await;
    let err = store.find_rack(None, "a1").await.unwrap_err();
    assert!(err.to_string().contains("exists in sites codfw, eqiad"), "{err}");
    assert_eq!(store.find_rack(Some("codfw"), "a1").await.unwrap().site, "codfw");
    let mut m = machine("r1", "52:54:00:00:00:01");
    m.spec.rack = Some("a1".into());
    let (_, rows) = rows_of(store.create_machines(&actor(), vec![m.clone()]).await.unwrap_err());
    assert!(rows[0].1.contains("say which with `site`"), "{rows:?}");
    m.spec.site = Some("eqiad".into());
    store.create_machines(&actor(), vec![m]).await.unwrap();
    let err = store.delete_rack(&actor(), Some("eqiad"), "a1").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Refused(m) if m.contains("still holds 1 machines")),
        "{err:?}"
    );
    let err = store.delete_site(&actor(), "codfw").await.unwrap_err();
    assert!(matches!(&err, StoreError::Refused(_)));
    store.delete_rack(&actor(), Some("codfw"), "a1").await.unwrap();
    store.delete_site(&actor(), "codfw").await.unwrap();
});

mod leases {
    use super::*;
    use chrono::{Duration, Utc};
    use kiln_types::MacAddr;
    use kiln_types::lease::{Lease, LeaseState};

    fn lease(ip: &str, mac: &str) -> Lease {
        Lease {
            ip: ip.parse().unwrap(),
            mac: mac.parse::<MacAddr>().unwrap(),
            state: LeaseState::Bound,
            machine_id: None,
            hostname: None,
            expires_at: Utc::now() + Duration::hours(1),
        }
    }

    store_test!(committed_leases_survive_and_move_with_the_client, |store| {
        store
            .commit_lease(&lease("10.0.0.100", "52:54:00:00:00:01"))
            .await
            .unwrap();
        store
            .commit_lease(&lease("10.0.0.101", "52:54:00:00:00:02"))
            .await
            .unwrap();
        // The same client bound elsewhere: its old lease goes.
        store
            .commit_lease(&lease("10.0.0.102", "52:54:00:00:00:01"))
            .await
            .unwrap();
        let loaded = store.load_leases().await.unwrap();
        let ips: Vec<String> = loaded.leases.iter().map(|l| l.ip.to_string()).collect();
        assert_eq!(ips, ["10.0.0.101", "10.0.0.102"]);
        assert_eq!(loaded.quarantined, 0);
        // Only the holder can release an address.
        store
            .release_lease("10.0.0.101".parse().unwrap(), "52:54:00:00:00:09".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(store.load_leases().await.unwrap().leases.len(), 2);
        store
            .release_lease("10.0.0.101".parse().unwrap(), "52:54:00:00:00:02".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(store.load_leases().await.unwrap().leases.len(), 1);
    });

    store_test!(a_batch_of_lease_writes_lands_as_if_written_one_by_one, |store| {
        use kiln_store::LeaseWrite::{Commit, Release};
        store
            .commit_lease(&lease("10.0.0.100", "52:54:00:00:00:01"))
            .await
            .unwrap();
        // 1,200 new clients (more than one multi-row statement), client 01
        // moving twice, an address changing hands twice, and releases of an
        // address written in the batch and of one from before it.
        let mut writes: Vec<kiln_store::LeaseWrite> = (0..1200u32)
            .map(|i| {
                Commit(lease(
                    &format!("10.1.{}.{}", i / 200, i % 200 + 1),
                    &format!("52:54:00:01:{:02x}:{:02x}", i / 256, i % 256),
                ))
            })
            .collect();
        writes.extend([
            Commit(lease("10.0.0.101", "52:54:00:00:00:01")),
            Commit(lease("10.0.0.102", "52:54:00:00:00:01")),
            Commit(lease("10.0.0.103", "52:54:00:00:00:02")),
            Commit(lease("10.0.0.103", "52:54:00:00:00:03")),
            Release {
                ip: "10.1.0.1".parse().unwrap(),
                mac: "52:54:00:01:00:00".parse().unwrap(),
            },
            Release {
                ip: "10.0.0.102".parse().unwrap(),
                mac: "52:54:00:00:00:09".parse().unwrap(),
            },
        ]);
        store.write_leases(&writes).await.unwrap();
        let leases = store.load_leases().await.unwrap().leases;
        let held = |ip: &str| {
            leases
                .iter()
                .find(|l| l.ip.to_string() == ip)
                .map(|l| l.mac.to_string())
        };
        assert_eq!(leases.len(), 1199 + 2);
        assert_eq!(held("10.0.0.100"), None, "client 01 moved on");
        assert_eq!(held("10.0.0.101"), None, "and on again");
        assert_eq!(
            held("10.0.0.102").as_deref(),
            Some("52:54:00:00:00:01"),
            "not released by another client"
        );
        assert_eq!(held("10.0.0.103").as_deref(), Some("52:54:00:00:00:03"));
        assert_eq!(held("10.1.0.1"), None, "released");
        assert_eq!(held("10.1.5.200").as_deref(), Some("52:54:00:01:04:af"));
    });

    store_test!(a_lease_batch_that_fails_changes_nothing, |store| {
        use kiln_store::LeaseWrite::Commit;
        store
            .commit_lease(&lease("10.0.0.100", "52:54:00:00:00:01"))
            .await
            .unwrap();
        // The database refuses one row of the next batch, after the batch's
        // first statement (client 01's old lease ending) has run.
        let refuse: &[&str] = match store.backend() {
            kiln_store::Backend::Sqlite => &["CREATE TRIGGER refuse BEFORE INSERT ON dhcp_leases \
                 WHEN NEW.ip = '10.0.0.99' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"],
            kiln_store::Backend::Postgres => &[
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN \
                 IF NEW.ip = '10.0.0.99' THEN RAISE EXCEPTION 'refused by the test'; END IF; \
                 RETURN NEW; END $$ LANGUAGE plpgsql",
                "CREATE TRIGGER refuse BEFORE INSERT ON dhcp_leases FOR EACH ROW EXECUTE FUNCTION refuse()",
            ],
        };
        for sql in refuse {
            sqlx::query::<sqlx::Any>(sqlx::AssertSqlSafe(*sql))
                .execute(store.pool())
                .await
                .unwrap();
        }
        let err = store
            .write_leases(&[
                Commit(lease("10.0.0.101", "52:54:00:00:00:01")),
                Commit(lease("10.0.0.99", "52:54:00:00:00:02")),
            ])
            .await
            .unwrap_err();
        let cause = std::error::Error::source(&err)
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(cause.contains("refused by the test"), "{err}: {cause}");
        let leases = store.load_leases().await.unwrap().leases;
        let held: Vec<String> = leases.iter().map(|l| format!("{} {}", l.ip, l.mac)).collect();
        assert_eq!(held, ["10.0.0.100 52:54:00:00:00:01"], "all or nothing");
        // No connection was left inside the failed transaction: writes go on
        // (more of them than the pool has connections).
        for i in 0..12 {
            store
                .commit_lease(&lease(&format!("10.0.1.{i}"), &format!("52:54:00:00:01:{i:02x}")))
                .await
                .unwrap();
        }
        assert_eq!(store.load_leases().await.unwrap().leases.len(), 13);
    });

    store_test!(a_corrupt_lease_is_quarantined_not_fatal, |store| {
        store
            .commit_lease(&lease("10.0.0.100", "52:54:00:00:00:01"))
            .await
            .unwrap();
        sqlx::query::<sqlx::Any>(
            "INSERT INTO dhcp_leases (ip, mac, state, expires_at, updated_at) VALUES ('10.0.0.7', 'not-a-mac', 'bound', 'soon', 'x')",
        )
        .execute(store.pool())
        .await
        .unwrap();
        let loaded = store.load_leases().await.unwrap();
        assert_eq!(loaded.leases.len(), 1);
        assert_eq!(loaded.quarantined, 1);
        let q: i64 = sqlx::query_scalar::<sqlx::Any, i64>("SELECT COUNT(*) FROM dhcp_lease_quarantine")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(q, 1);
        assert_eq!(
            store.load_leases().await.unwrap().quarantined,
            0,
            "quarantined once, then gone"
        );
    });

    store_test!(machines_are_found_by_switch_port_or_mac, |store| {
        let mut m = machine("rack1", "52:54:00:00:00:01");
        m.spec.nics[0].circuit_id = Some("xe-0/0/7".into());
        m.spec.nics[0].remote_id = Some("asw-a1".into());
        m.spec.ipv4 = Some("10.0.0.7".parse().unwrap());
        store.create_machines(&actor(), vec![m]).await.unwrap();
        let other_mac: MacAddr = "02:00:00:00:00:99".parse().unwrap();
        let by_port = store
            .find_machine_by_nic(other_mac, Some("xe-0/0/7"), Some("asw-a1"))
            .await
            .unwrap();
        assert_eq!(
            by_port.unwrap().hostname.as_str(),
            "rack1",
            "cabling identifies the machine, whatever its MAC"
        );
        let by_mac = store
            .find_machine_by_nic("52:54:00:00:00:01".parse().unwrap(), None, None)
            .await
            .unwrap();
        assert_eq!(by_mac.unwrap().hostname.as_str(), "rack1");
        assert!(
            store
                .find_machine_by_nic(other_mac, Some("xe-0/0/8"), Some("asw-a1"))
                .await
                .unwrap()
                .is_none()
        );
        let all = store.all_machines().await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].ipv4, Some("10.0.0.7".parse().unwrap()));
    });
}

store_test!(a_large_import_crosses_every_statement_chunk, |store| {
    // More rows than one multi-row statement takes (400 machines, 800 NICs,
    // 2,000 tags, 1,000 events), and enough to refresh planner statistics.
    let batch: Vec<NewMachine> = (0..1100u32)
        .map(|i| {
            let mut m = machine(
                &format!("bulk{i:05}"),
                &format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff),
            );
            m.spec
                .nics
                .push(nic(&format!("02:00:01:00:{:02x}:{:02x}", i >> 8, i & 0xff)));
            m.spec.nics[1].switch = Some("sw".into());
            m.spec.nics[1].port = Some(format!("p{i}"));
            m.spec.tags = vec![
                "a".parse().unwrap(),
                "b".parse().unwrap(),
                format!("n{i}").parse().unwrap(),
            ];
            m
        })
        .collect();
    let created = store.create_machines(&actor(), batch).await.unwrap();
    assert_eq!(created.len(), 1100);
    let last = store.get_machine("bulk01099", None).await.unwrap();
    assert_eq!(last, created[1099]);
    assert_eq!(last.nics.len(), 2);
    assert_eq!(last.nics[1].port.as_deref(), Some("p1099"));
    let page = store
        .list_machines(
            &MachineFilter {
                tag: Some("n1050,a".into()),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    let events = store
        .list_events(&EventFilter {
            action: Some("machine.create".into()),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(events.items.len(), 1000);
    assert!(events.next_cursor.is_some());
    assert_eq!(
        events.items[0].target_name, "bulk01099",
        "newest first, in import order"
    );
});

store_test!(the_machines_generation_moves_with_every_change, |store| {
    let g0 = store.machines_generation().await.unwrap();
    store
        .create_machines(&actor(), vec![machine("g1", "52:54:00:00:00:01")])
        .await
        .unwrap();
    let g1 = store.machines_generation().await.unwrap();
    assert!(g1 > g0);
    store
        .update_machine(
            &actor(),
            "g1",
            serde_json::from_str(r#"{"ipv4": "10.0.0.5"}"#).unwrap(),
            None,
            None,
        )
        .await
        .unwrap();
    let g2 = store.machines_generation().await.unwrap();
    assert!(g2 > g1);
    // A failed change leaves it alone.
    assert!(
        store
            .create_machines(&actor(), vec![machine("g1", "52:54:00:00:00:02")])
            .await
            .is_err()
    );
    assert_eq!(store.machines_generation().await.unwrap(), g2);
    store.delete_machine(&actor(), "g1", None).await.unwrap();
    assert!(store.machines_generation().await.unwrap() > g2);
});
