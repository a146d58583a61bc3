//! Machines over HTTP: validation, conflicts, bulk all-or-nothing, secrets.

use kiln_test_utils::api_test;
use kiln_types::machine::{MachineCreate, MachineFilter, MachinePatch};
use kiln_types::site::{RackCreate, SiteCreate};
use serde_json::json;

const CANARY: &str = "canary-Zq8-bmc-password";

/// POSTs raw JSON (so tests can send what the typed client would refuse).
async fn post_raw(srv: &kiln_test_utils::TestServer, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", srv.url))
        .bearer_auth(&srv.admin_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

api_test!(bad_values_are_named, |srv| {
    for (body, want) in [
        (
            json!({"hostname": "h1", "nics": [{"mac": "52:54:00:zz:00:01"}]}),
            "nics[0].mac: invalid MAC address `52:54:00:zz:00:01`",
        ),
        (
            json!({"hostname": "h1", "ipv4": "10.0.0.300"}),
            "ipv4: invalid IPv4 address",
        ),
        (json!({"hostname": "H_1"}), "hostname: invalid hostname `H_1`"),
        (json!({"hostname": "h1", "colour": "red"}), "unknown field `colour`"),
        (
            json!({"hostname": "h1", "state": "sleeping"}),
            "state: unknown variant `sleeping`",
        ),
        (
            json!({"hostname": "h1", "bmc": {"driver": "redfish", "address": "10.0.0.1"}}),
            "not a URL",
        ),
        (
            json!({"hostname": "h1", "nics": [{"mac": "52:54:00:00:00:01", "port": "p1"}]}),
            "needs its switch",
        ),
        (json!({"nics": []}), "missing field `hostname`"),
    ] {
        let (status, err) = post_raw(&srv, "/api/v1/machines", body.clone()).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(err["code"], "bad_request");
        let msg = err["message"].as_str().unwrap();
        assert!(msg.contains(want), "{body}: `{msg}` lacks `{want}`");
    }
    let (status, err) = post_raw(&srv, "/api/v1/machines", json!("not an object")).await;
    assert_eq!(status, 400, "{err}");
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/machines?limit=zero", srv.url))
        .bearer_auth(&srv.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert!(err["message"].as_str().unwrap().contains("`limit`"), "{err}");
});

api_test!(duplicates_name_the_holder, |srv| {
    let admin = srv.admin();
    let body = json!({"hostname": "db1", "nics": [{"mac": "52:54:00:00:00:01", "switch": "asw1", "port": "xe-0/0/1"}],
                      "bmc": {"driver": "ipmi", "address": "10.1.0.1"}});
    assert_eq!(post_raw(&srv, "/api/v1/machines", body).await.0, 201);
    for (body, want) in [
        (
            json!({"hostname": "db2", "nics": [{"mac": "52-54-00-00-00-01"}]}),
            "MAC 52:54:00:00:00:01 is already used by machine db1",
        ),
        (
            json!({"hostname": "db2", "nics": [{"mac": "52:54:00:00:00:02", "switch": "asw1", "port": "xe-0/0/1"}]}),
            "switch port asw1 xe-0/0/1 is already used by machine db1",
        ),
        (
            json!({"hostname": "db2", "bmc": {"driver": "ipmi", "address": "10.1.0.1"}}),
            "BMC address `10.1.0.1` is already used by machine db1",
        ),
        (
            json!({"hostname": "DB1"}),
            "hostname `db1` is already used by machine db1",
        ),
    ] {
        let (status, err) = post_raw(&srv, "/api/v1/machines", body.clone()).await;
        assert_eq!(status, 409, "{body}: {err}");
        assert!(err["message"].as_str().unwrap().contains(want), "{err}");
    }
    assert_eq!(
        admin
            .list_machines(&MachineFilter::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
});

api_test!(bulk_is_all_or_nothing_and_reports_every_row, |srv| {
    let admin = srv.admin();
    admin
        .create_site(&SiteCreate {
            name: "eqiad".into(),
            description: None,
        })
        .await
        .unwrap();
    admin
        .create_rack(&RackCreate {
            name: "a1".into(),
            site: "eqiad".into(),
            row: None,
            node_group: None,
        })
        .await
        .unwrap();
    let rows = json!({"machines": [
        {"hostname": "n1", "rack": "a1", "nics": [{"mac": "52:54:00:00:01:01"}]},
        {"hostname": "n2", "nics": [{"mac": "bogus"}]},
        {"hostname": "n3", "rack": "b9"},
        {"hostname": "n4", "nics": [{"mac": "52:54:00:00:01:01"}]},
        {"hostname": "n5", "speed": 3},
        {"hostname": "n6"}
    ]});
    let (status, err) = post_raw(&srv, "/api/v1/machines/bulk", rows).await;
    assert_eq!(status, 400, "{err}");
    let details = err["details"].as_array().unwrap();
    let rows_hit: Vec<u64> = details.iter().map(|d| d["index"].as_u64().unwrap()).collect();
    // Rows 1 and 4 fail parsing; row 2 names a missing rack; row 3 repeats row 0's MAC.
    // Parse errors are reported first, before any database check.
    assert_eq!(rows_hit, [1, 4], "{err}");
    assert!(
        details[0]["message"]
            .as_str()
            .unwrap()
            .contains("invalid MAC address `bogus`")
    );
    assert_eq!(details[0]["field"], "nics[0].mac");
    assert!(
        details[1]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `speed`")
    );
    // Fix the parse errors: the database checks then report theirs, all of them.
    let rows = json!({"machines": [
        {"hostname": "n1", "rack": "a1", "nics": [{"mac": "52:54:00:00:01:01"}]},
        {"hostname": "n2"},
        {"hostname": "n3", "rack": "b9"},
        {"hostname": "n4", "nics": [{"mac": "52:54:00:00:01:01"}]},
        {"hostname": "n6"}
    ]});
    let (status, err) = post_raw(&srv, "/api/v1/machines/bulk", rows).await;
    assert_eq!(status, 400, "{err}");
    let msgs: Vec<(u64, String)> = err["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["index"].as_u64().unwrap(), d["message"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(
        msgs[0].0 == 2 && msgs[0].1.contains("rack `b9` does not exist"),
        "{msgs:?}"
    );
    assert!(msgs[1].0 == 3 && msgs[1].1.contains("also used by row 0"), "{msgs:?}");
    assert!(
        admin
            .list_machines(&MachineFilter::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "nothing imported"
    );
    // A clean batch goes in whole.
    let batch: Vec<MachineCreate> = (0..50)
        .map(|i| {
            let mut m = MachineCreate::new(format!("ok{i:02}").parse().unwrap());
            m.rack = Some("a1".into());
            m.tags = vec!["batch".parse().unwrap()];
            m
        })
        .collect();
    assert_eq!(admin.bulk_create_machines(batch).await.unwrap().len(), 50);
    let page = admin
        .list_machines(&MachineFilter {
            tag: Some("batch".into()),
            rack: Some("a1".into()),
            limit: Some(20),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.items.len(), 20);
    assert!(page.next_cursor.is_some());
    assert_eq!(
        admin
            .list_all_machines(&MachineFilter {
                site: Some("eqiad".into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .len(),
        50
    );
});

api_test!(bmc_password_is_sealed_and_never_shown, |srv| {
    let admin = srv.admin();
    let body = json!({"hostname": "bmc1", "bmc": {"driver": "ipmi", "address": "10.2.0.1:623", "username": "root", "password": CANARY}});
    let (status, created) = post_raw(&srv, "/api/v1/machines", body).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["bmc"]["password_set"], true);
    // Nowhere in what the API says, the audit log included.
    let shown = [
        serde_json::to_string(&created).unwrap(),
        serde_json::to_string(&admin.get_machine("bmc1").await.unwrap()).unwrap(),
        serde_json::to_string(&admin.list_machines(&MachineFilter::default()).await.unwrap()).unwrap(),
        serde_json::to_string(&admin.list_events(&Default::default()).await.unwrap()).unwrap(),
    ];
    for text in &shown {
        assert!(!text.contains(CANARY), "password leaked: {text}");
    }
    // Not in the database either: sealed, and it opens with the server's key.
    let sealed = srv
        .state
        .store
        .machine_bmc_password(created["id"].as_str().unwrap().parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(!sealed.0.contains(CANARY));
    assert_eq!(srv.state.secrets.open(&sealed).unwrap().expose(), CANARY);
    // Changing the address keeps the password; null removes the BMC.
    let patch: MachinePatch =
        serde_json::from_value(json!({"bmc": {"driver": "ipmi", "address": "10.2.0.2"}})).unwrap();
    assert!(
        admin
            .update_machine("bmc1", &patch)
            .await
            .unwrap()
            .bmc
            .unwrap()
            .password_set
    );
    let patch: MachinePatch = serde_json::from_value(json!({"bmc": null})).unwrap();
    assert!(admin.update_machine("bmc1", &patch).await.unwrap().bmc.is_none());
});

api_test!(protected_machines_are_not_deleted, |srv| {
    let admin = srv.admin();
    let mut m = MachineCreate::new("keep1".parse().unwrap());
    m.protected = true;
    admin.create_machine(&m).await.unwrap();
    let e = admin.delete_machine("keep1").await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(
        e.to_string().contains("keep1 is protected: clear the flag first"),
        "{e}"
    );
    let patch: MachinePatch = serde_json::from_value(json!({"protected": false})).unwrap();
    admin.update_machine("keep1", &patch).await.unwrap();
    admin.delete_machine("keep1").await.unwrap();
    assert_eq!(admin.get_machine("keep1").await.unwrap_err().status(), Some(404));
    let e = admin.delete_machine("keep1").await.unwrap_err();
    assert!(e.to_string().contains("machine `keep1` not found"), "{e}");
});
