//! Subnets and machine networks through the API: the disjointness rule
//! against kiln's own DHCP pool (on change and at start-up), next-free
//! addresses, what a tenant reads, and the rendered network-config.

use kiln_server::{AppState, Settings};
use kiln_store::Actor;
use kiln_test_utils::api_test;
use kiln_types::auth::{Role, TenantCreate, TokenCreate};
use kiln_types::network::{MachineNetwork, SubnetPatch};
use serde_json::json;

/// kiln serves DHCP on loopback with a pool in 10.0.0.0/24.
fn dhcp_settings() -> Settings {
    toml::from_str(
        r#"
[dhcp]
mode = "full"
interfaces = ["lo"]
port = 0

[[dhcp.subnet]]
network = "10.0.0.0/24"
pool = ["10.0.0.200", "10.0.0.250"]
"#,
    )
    .unwrap()
}

api_test!(
    subnets_stay_clear_of_kilns_dhcp_pool_and_machines_get_their_network,
    settings = dhcp_settings(),
    |srv| {
        let admin = srv.admin();
        let overlap = serde_json::from_value(json!({
            "name": "prod", "prefix": "10.0.0.0/24", "gateway": "10.0.0.1",
            "static_range": {"first": "10.0.0.10", "last": "10.0.0.210"}
        }))
        .unwrap();
        let e = admin.create_subnet(&overlap).await.unwrap_err();
        assert_eq!(e.status(), Some(400));
        let text = format!("{e:?}");
        assert!(
            text.contains("10.0.0.10-10.0.0.210") && text.contains("10.0.0.200-10.0.0.250"),
            "the error names both ranges: {text}"
        );

        let prod = serde_json::from_value(json!({
            "name": "prod", "prefix": "10.0.0.0/24", "gateway": "10.0.0.1", "dns": ["10.0.0.53"],
            "search": ["example.net"], "static_range": {"first": "10.0.0.10", "last": "10.0.0.99"},
            "dynamic_range": {"first": "10.0.0.200", "last": "10.0.0.250"}
        }))
        .unwrap();
        admin.create_subnet(&prod).await.unwrap();

        admin
            .create_tenant(&TenantCreate {
                name: "acme".into(),
                description: None,
            })
            .await
            .unwrap();
        let mut m = kiln_types::machine::MachineCreate::new("web1".parse().unwrap());
        m.owner = Some("acme".into());
        admin.create_machine(&m).await.unwrap();
        let net: MachineNetwork = serde_json::from_value(json!({
            "interfaces": [{"name": "eno1", "mac": "52:54:00:00:02:01"}, {"name": "eno2", "mac": "52:54:00:00:02:02"}],
            "bonds": [{"name": "bond0", "interfaces": ["eno1", "eno2"], "mode": "802.3ad", "lacp_rate": "fast",
                       "miimon": 100, "addresses": [{"subnet": "prod", "default_route": true}]}]
        }))
        .unwrap();
        let stored = admin.set_machine_network("web1", &net).await.unwrap();
        assert_eq!(stored.bonds[0].addresses[0].address, Some("10.0.0.10".parse().unwrap()));

        // The owner reads its machine's network and network-config, and may
        // not change them.
        let tenant = admin
            .create_token(&TokenCreate {
                role: Role::Tenant,
                tenant: Some("acme".into()),
                name: None,
                expires_at: None,
            })
            .await
            .unwrap();
        let owner = srv.client(Some(&tenant.token));
        assert_eq!(owner.machine_network("web1").await.unwrap(), stored);
        let yaml = owner.machine_network_config("web1").await.unwrap();
        assert!(yaml.contains("10.0.0.10/24") && yaml.contains("802.3ad"), "{yaml}");
        assert_eq!(
            owner.set_machine_network("web1", &net).await.unwrap_err().status(),
            Some(403)
        );
        assert_eq!(owner.list_subnets().await.unwrap_err().status(), Some(403));

        let detail = admin.get_subnet("prod").await.unwrap();
        assert_eq!(detail.assignments.len(), 1);
        assert_eq!(detail.assignments[0].machine, "web1");

        // A change of the subnet is checked against the pool too.
        let widen = SubnetPatch {
            static_range: Some(Some("10.0.0.10-10.0.0.220".parse().unwrap())),
            dynamic_range: Some(None),
            ..Default::default()
        };
        let e = admin.update_subnet("prod", &widen).await.unwrap_err();
        assert!(format!("{e:?}").contains("10.0.0.200-10.0.0.250"), "{e:?}");

        // Start-up: a subnet that meets the configured pool (written past the
        // API, as if [dhcp] changed since) stops the server, naming both.
        srv.state
            .store
            .update_subnet(&Actor::new("test"), "prod", &widen, &[])
            .await
            .unwrap();
        let Err(e) = AppState::open(&srv.config).await else {
            panic!("start-up accepted a subnet that meets kiln's DHCP pool");
        };
        let msg = format!("{e:#}");
        assert!(
            msg.contains("10.0.0.10-10.0.0.220")
                && msg.contains("10.0.0.200-10.0.0.250")
                && msg.contains("[[dhcp.subnet]]"),
            "{msg}"
        );
    }
);
