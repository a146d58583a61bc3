//! The agent's two calls: the discovery report (with the discovery token
//! HTTP boot gives it) and the deploy plan of a reimage (with the job's
//! token).

use kiln_client::Client;
use kiln_server::Settings;
use kiln_server::config::BootSettings;
use kiln_test_utils::{TestServer, api_test};
use kiln_types::agent::{DiscoveryReport, ImageFormat, LldpNeighbor};
use kiln_types::catalog::{Arch, OsImageCreate, OsKind, PlatformTag, StorageLayout};
use kiln_types::job::{JobState, ReimageRequest};
use kiln_types::machine::{Disk, Dmi, Firmware, FirmwareMode, Hardware, HardwareNic, MachineState};

const GIB: u64 = 1 << 30;

async fn script(srv: &TestServer, mac: &str) -> String {
    reqwest::get(format!("{}/boot/ipxe?mac={mac}&platform=pcbios", srv.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn token_in(script: &str) -> String {
    script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kiln.token="))
        .unwrap_or_else(|| panic!("no token in {script}"))
        .to_string()
}

/// A discovery token for `mac` as HTTP boot issues it, for a machine that
/// HTTP boot would no longer send to discovery (a ready one boots its
/// disk, and gets no token): one issued earlier, or taken from elsewhere.
fn fresh_token(srv: &TestServer, mac: &str) -> String {
    srv.state
        .secrets
        .discovery_token(
            mac.parse().unwrap(),
            None,
            chrono::Utc::now() + chrono::Duration::minutes(30),
        )
        .expose()
        .to_string()
}

fn hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

fn hardware(mac: &str, serial: &str) -> Hardware {
    Hardware {
        arch: Some(Arch::X86_64),
        memory_bytes: 8 * GIB,
        disks: ["vda", "vdb"]
            .iter()
            .map(|n| Disk {
                name: n.to_string(),
                size_bytes: 100 * GIB,
                rotational: false,
                model: Some("QEMU HARDDISK".into()),
                serial: Some(format!("{serial}-{n}")),
                by_id: None,
            })
            .collect(),
        nics: vec![HardwareNic {
            mac: mac.parse().unwrap(),
            name: "ens3".into(),
            driver: Some("virtio_net".into()),
            speed_mbps: Some(1000),
            link: true,
        }],
        dmi: Some(Dmi {
            serial: Some(serial.into()),
            // One UUID per serial: two machines never share one.
            uuid: Some(uuid::Uuid::from_u64_pair(hash(serial), 0x4000_8000_0000_0000).to_string()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn discovery_on() -> Settings {
    Settings {
        boot: Some(BootSettings {
            discovery: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

api_test!(
    a_discovery_report_enrolls_the_machine_it_booted_on,
    settings = discovery_on(),
    |srv| {
        let mac = "52:54:00:ab:cd:01";
        let s = script(&srv, mac).await;
        assert!(
            s.contains("kiln.mode=discover") && s.contains(&format!("BOOTIF={mac}")),
            "{s}"
        );
        let token = token_in(&s);
        // kiln boot explain does not show it.
        let e = srv.admin().boot_explain(mac, None).await.unwrap();
        assert!(
            !e.to_string().contains("kd2.") && e.to_string().contains("kiln.token=[redacted]"),
            "{e}"
        );
        let report = DiscoveryReport {
            firmware: Some(Firmware {
                mode: FirmwareMode::Uefi,
                secure_boot: true,
            }),
            boot_mac: mac.parse().unwrap(),
            hardware: hardware(mac, "SN-0001"),
            lldp: vec![LldpNeighbor {
                mac: mac.parse().unwrap(),
                switch: "asw-a1".into(),
                port: "ge-0/0/7".into(),
            }],
        };
        // Another MAC's token, or none, is refused.
        let other = token_in(&script(&srv, "52:54:00:ab:cd:02").await);
        let e = srv.client(Some(&other)).report_discovery(&report).await.unwrap_err();
        assert_eq!(e.status(), Some(401));
        let e = srv.client(None).report_discovery(&report).await.unwrap_err();
        assert_eq!(e.status(), Some(401));

        let agent = srv.client(Some(&token));
        let r = agent.report_discovery(&report).await.unwrap();
        assert!(r.created);
        assert_eq!(
            (r.hostname.as_str(), r.state),
            ("node-525400abcd01", MachineState::Ready)
        );
        let m = srv.admin().get_machine("node-525400abcd01").await.unwrap();
        assert_eq!(m.hardware.as_ref().unwrap().disks.len(), 2);
        assert_eq!(m.nics[0].switch.as_deref(), Some("asw-a1"));
        assert_eq!(m.nics[0].port.as_deref(), Some("ge-0/0/7"));
        assert_eq!(m.firmware, report.firmware, "the record keeps the reported firmware");
        // Again (a second boot, a fresh token): the machine is ready now,
        // so the report changes nothing — re-inventory is an operator's
        // `kiln machine discover`, which makes it `discovering` first.
        let mut again = report.clone();
        again.hardware.memory_bytes = 16 * GIB;
        assert!(
            !script(&srv, mac).await.contains("kiln.token"),
            "a ready machine boots its disk"
        );
        let fresh = fresh_token(&srv, mac);
        let e = srv.client(Some(&fresh)).report_discovery(&again).await.unwrap_err();
        assert_eq!(e.status(), Some(409), "{e}");
        assert!(e.to_string().contains("not waiting for discovery"), "{e}");
        let m = srv.admin().get_machine("node-525400abcd01").await.unwrap();
        assert_eq!(m.hardware.unwrap().memory_bytes, 8 * GIB);
        // An enrolled machine (known by its MAC) is updated and made ready.
        let mut enrolled = kiln_types::machine::MachineCreate::new("db7".parse().unwrap());
        // An operator's guess; the agent's report is the truth.
        enrolled.firmware = Some(Firmware {
            mode: FirmwareMode::Bios,
            secure_boot: false,
        });
        enrolled.nics = vec![serde_json::from_value(serde_json::json!({ "mac": "52:54:00:ab:cd:03" })).unwrap()];
        srv.admin().create_machine(&enrolled).await.unwrap();
        let mac3 = "52:54:00:ab:cd:03";
        let r3 = srv
            .client(Some(&token_in(&script(&srv, mac3).await)))
            .report_discovery(&DiscoveryReport {
                firmware: Some(Firmware {
                    mode: FirmwareMode::Uefi,
                    secure_boot: false,
                }),
                boot_mac: mac3.parse().unwrap(),
                hardware: hardware(mac3, "SN-0003"),
                lldp: vec![],
            })
            .await
            .unwrap();
        assert_eq!(
            (r3.hostname.as_str(), r3.state, r3.created),
            ("db7", MachineState::Ready, false)
        );
        let db7 = srv.admin().get_machine("db7").await.unwrap();
        assert_eq!(db7.firmware.map(|f| f.mode), Some(FirmwareMode::Uefi));
    }
);

api_test!(a_deploy_plan_is_given_to_the_job_token_only, |srv| {
    let sim = crate::jobs::sim().await;
    let admin: Client = srv.admin();
    let sha = "cd".repeat(32);
    admin
        .create_os_image(&OsImageCreate {
            name: "debian".into(),
            version: "12".into(),
            arch: Arch::X86_64,
            kind: OsKind::DiskImage,
            tags: vec![PlatformTag::Bm],
            min_ram_bytes: 2 * GIB,
            min_disk_bytes: 20 * GIB,
            source: "images/debian-12.raw.zst".into(),
            sha256: Some(sha.clone()),
            format: None,
            content: Default::default(),
            templates: Default::default(),
        })
        .await
        .unwrap();
    let mac = "52:54:00:ab:cd:10";
    let mut m = kiln_types::machine::MachineCreate::new("web10".parse().unwrap());
    m.state = MachineState::Deployed;
    m.nics = vec![serde_json::from_value(serde_json::json!({ "mac": mac })).unwrap()];
    // The Redfish driver finds the system by the inventory's DMI identity.
    let serial = sim.bmc(0).serial(0);
    let mut hw = hardware(mac, &serial);
    hw.dmi.as_mut().unwrap().uuid = Some(sim.bmc(0).uuid(0).to_string());
    m.hardware = Some(hw);
    m.bmc = Some(kiln_types::machine::BmcInput {
        driver: kiln_types::machine::BmcDriver::Redfish,
        address: sim.bmc(0).url().into(),
        username: Some("admin".into()),
        password: Some(kiln_types::Secret::new("rf-secret")),
        insecure: false,
        ca_cert: None,
    });
    // The operator's system disk travels in the plan (lvm_raid1 does not
    // use it; the agent decides that).
    m.system_disk = Some(format!("{serial}-vdb"));
    admin.create_machine(&m).await.unwrap();
    // The inventory's network for it: the plan points at its network-config.
    let subnet =
        serde_json::from_value(serde_json::json!({"name": "prod", "prefix": "10.0.0.0/24", "gateway": "10.0.0.1"}));
    admin.create_subnet(&subnet.unwrap()).await.unwrap();
    let net = serde_json::from_value(serde_json::json!({
        "interfaces": [{"name": "eth0", "mac": mac, "addresses": [{"subnet": "prod", "default_route": true}]}]
    }));
    admin.set_machine_network("web10", &net.unwrap()).await.unwrap();
    let job = admin
        .reimage(
            "web10",
            &ReimageRequest {
                os: "debian-12".into(),
                layout: Some(StorageLayout::LvmRaid1),
                hostname: None,
                ssh_keys: vec![],
                root_password: None,
                root_password_hash: None,
                tasks: vec![],
                post_install_script: None,
                callback_url: None,
                ticket: None,
                no_pxe: false,
                no_hooks: false,
                new: false,
            },
        )
        .await
        .unwrap();
    let id = job.id.to_string();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let token = loop {
        let s = script(&srv, mac).await;
        if s.contains("kiln.token=") {
            break token_in(&s);
        }
        assert!(std::time::Instant::now() < end, "never armed: {s}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let agent = srv.client(Some(&token));
    let plan = agent.deploy_plan(&id).await.unwrap();
    assert_eq!(plan.hostname.as_str(), "web10");
    assert_eq!(plan.layout, StorageLayout::LvmRaid1);
    assert_eq!(plan.system_disk, Some(format!("{serial}-vdb")));
    assert_eq!(plan.image.format, ImageFormat::RawZstd);
    assert_eq!(plan.image.sha256, sha);
    assert!(
        plan.image.url.ends_with("/boot/file/images/debian-12.raw.zst"),
        "{}",
        plan.image.url
    );
    assert_eq!(plan.identity.serial.as_deref(), Some(serial.as_str()));
    assert_eq!(
        plan.identity.disk_serials,
        [format!("{serial}-vda"), format!("{serial}-vdb")]
    );
    assert!(plan.user_data_url.contains("/boot/job/") && plan.stage_url.ends_with("/stages"));
    let network_config = plan.network_config_url.clone().expect("the machine has a network");
    let yaml = reqwest::get(&network_config).await.unwrap().text().await.unwrap();
    assert!(
        yaml.contains(r#"macaddress: "52:54:00:ab:cd:10""#)
            && yaml.contains(r#""10.0.0.2/24""#)
            && yaml.contains(r#"via: "10.0.0.1""#),
        "{yaml}"
    );
    let without_token = network_config.split('?').next().unwrap().to_string();
    assert_eq!(reqwest::get(&without_token).await.unwrap().status(), 401);
    let e = srv.client(Some(&srv.admin_token)).deploy_plan(&id).await.unwrap_err();
    assert_eq!(e.status(), Some(401));
    admin.job_action(&id, "cancel").await.unwrap();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !admin.get_job(&id).await.unwrap().job.state.is_final() {
        assert!(std::time::Instant::now() < end);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(admin.get_job(&id).await.unwrap().job.state, JobState::Cancelled);
    assert_eq!(agent.deploy_plan(&id).await.unwrap_err().status(), Some(409));
    sim.shutdown().await;
});

api_test!(
    a_machine_enrolled_by_its_bmc_only_is_discovered,
    settings = discovery_on(),
    |srv| {
        let sim = crate::jobs::sim().await;
        let admin = srv.admin();
        let mut m = kiln_types::machine::MachineCreate::new("blank1".parse().unwrap());
        m.bmc = Some(kiln_types::machine::BmcInput {
            driver: kiln_types::machine::BmcDriver::Redfish,
            address: sim.bmc(0).url().into(),
            username: Some("admin".into()),
            password: Some(kiln_types::Secret::new("rf-secret")),
            insecure: false,
            ca_cert: None,
        });
        admin.create_machine(&m).await.unwrap();

        let m = admin.discover_machine("blank1").await.unwrap();
        assert_eq!(m.state, MachineState::Discovering);
        let dmi = m.hardware.unwrap().dmi.unwrap();
        assert_eq!(dmi.serial.as_deref(), Some(sim.bmc(0).serial(0).as_str()));
        // Its BMC was told: network once, then off and on.
        let boots: Vec<String> = sim.bmc(0).boots().into_iter().map(|b| b.target).collect();
        assert_eq!(boots, ["Pxe"]);
        assert_eq!(sim.bmc(0).power(0), kiln_sim::Power::On);

        // The agent's report names it only by DMI: it lands on blank1.
        let mac = "52:54:00:ab:cd:44";
        let token = token_in(&script(&srv, mac).await);
        let r = srv
            .client(Some(&token))
            .report_discovery(&DiscoveryReport {
                firmware: None,
                boot_mac: mac.parse().unwrap(),
                hardware: hardware(mac, &sim.bmc(0).serial(0)),
                lldp: vec![],
            })
            .await
            .unwrap();
        assert_eq!(
            (r.hostname.as_str(), r.state, r.created),
            ("blank1", MachineState::Ready, false)
        );
        let m = admin.get_machine("blank1").await.unwrap();
        assert_eq!(m.nics[0].mac.unwrap().to_string(), mac);

        // Ready now: the agent's next report (a fresh boot, a fresh token)
        // changes nothing; an operator's `discover` makes it wait again,
        // and then its report is taken.
        let mut bigger = hardware(mac, &sim.bmc(0).serial(0));
        bigger.memory_bytes = 16 * GIB;
        let report = DiscoveryReport {
            firmware: None,
            boot_mac: mac.parse().unwrap(),
            hardware: bigger,
            lldp: vec![],
        };
        let again = fresh_token(&srv, mac);
        let e = srv.client(Some(&again)).report_discovery(&report).await.unwrap_err();
        assert_eq!(e.status(), Some(409), "{e}");
        assert_eq!(
            admin.discover_machine("blank1").await.unwrap().state,
            MachineState::Discovering
        );
        let fresh = token_in(&script(&srv, mac).await);
        let r = srv.client(Some(&fresh)).report_discovery(&report).await.unwrap();
        assert_eq!((r.hostname.as_str(), r.state), ("blank1", MachineState::Ready));
        let m = admin.get_machine("blank1").await.unwrap();
        assert_eq!(m.hardware.as_ref().unwrap().memory_bytes, 16 * GIB);

        // A tenant's machine is not rebooted into discovery: its report
        // would be refused.
        admin
            .create_tenant(&kiln_types::auth::TenantCreate {
                name: "acme".into(),
                description: None,
            })
            .await
            .unwrap();
        admin
            .update_machine(
                "blank1",
                &kiln_types::machine::MachinePatch {
                    owner: Some(Some("acme".into())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let e = admin.discover_machine("blank1").await.unwrap_err();
        assert_eq!(e.status(), Some(409));
        assert!(e.to_string().contains("--owner -"), "{e}");
        admin
            .update_machine(
                "blank1",
                &kiln_types::machine::MachinePatch {
                    owner: Some(None),
                    ..Default::default()
                },
            )
            .await
            .unwrap();

        // A deployed machine is not rebooted into the agent.
        admin
            .update_machine(
                "blank1",
                &kiln_types::machine::MachinePatch {
                    state: Some(MachineState::Deployed),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let e = admin.discover_machine("blank1").await.unwrap_err();
        assert_eq!(e.status(), Some(409));
        assert!(e.to_string().contains("--state ready"), "{e}");
        assert_eq!(sim.bmc(0).boots().len(), 2, "no third boot");
        sim.shutdown().await;
    }
);

/// The security events about discovery reports, newest first.
async fn refusals(srv: &TestServer) -> Vec<kiln_types::event::Event> {
    srv.admin()
        .list_events(&kiln_types::event::EventFilter {
            action: Some("security.discovery_refused".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .items
}

// Issue 14: a report from a new MAC that claims a deployed, owned,
// protected machine's serial and UUID must change nothing, name nothing,
// and leave a security event.
api_test!(
    issue_14_a_spoofed_discovery_report_changes_nothing_and_is_audited,
    settings = discovery_on(),
    |srv| {
        let admin = srv.admin();
        admin
            .create_tenant(&kiln_types::auth::TenantCreate {
                name: "acme".into(),
                description: None,
            })
            .await
            .unwrap();
        let victim_mac = "52:54:00:ab:cd:50";
        let mut m = kiln_types::machine::MachineCreate::new("db1050".parse().unwrap());
        m.state = MachineState::Deployed;
        m.owner = Some("acme".into());
        m.protected = true;
        m.nics = vec![serde_json::from_value(serde_json::json!({ "mac": victim_mac })).unwrap()];
        m.hardware = Some(hardware(victim_mac, "SN-VICTIM"));
        admin.create_machine(&m).await.unwrap();
        let before = admin.get_machine("db1050").await.unwrap();
        let victim_uuid = m.hardware.as_ref().unwrap().dmi.as_ref().unwrap().uuid.clone().unwrap();

        // The attacker's machine booted from a MAC kiln does not know: it
        // gets a discovery token (discovery is on) and claims the victim.
        let attacker = "52:54:00:ee:00:01";
        let spoof = DiscoveryReport {
            firmware: None,
            boot_mac: attacker.parse().unwrap(),
            hardware: hardware(attacker, "SN-VICTIM"),
            lldp: vec![],
        };
        let token = token_in(&script(&srv, attacker).await);
        let e = srv.client(Some(&token)).report_discovery(&spoof).await.unwrap_err();
        assert_eq!(e.status(), Some(409), "{e}");
        let text = e.to_string();
        assert!(
            !text.contains("db1050") && !text.contains(&before.id.to_string()) && !text.contains("acme"),
            "the answer names the victim: {text}"
        );
        assert!(text.contains("not waiting for discovery"), "{text}");
        // Nothing changed: not the record (its update time included), and
        // no machine was made for the attacker's MAC.
        assert_eq!(admin.get_machine("db1050").await.unwrap(), before);
        assert_eq!(
            admin.get_machine("node-525400ee0001").await.unwrap_err().status(),
            Some(404)
        );
        // The event names the machine for operators, with the claim and
        // where it came from.
        let events = refusals(&srv).await;
        assert_eq!(events.len(), 1, "{events:?}");
        let ev = &events[0];
        assert_eq!(
            (ev.target_kind.as_str(), ev.target_name.as_str()),
            ("machine", "db1050")
        );
        let d = ev.after.as_ref().unwrap();
        assert_eq!(d["mac"], attacker);
        assert_eq!(d["claimed_serial"], "SN-VICTIM");
        assert_eq!(d["claimed_uuid"], victim_uuid.as_str());
        assert_eq!(d["client"], "127.0.0.1");
        assert!(d["reason"].as_str().unwrap().contains("deployed"), "{d}");

        // The serial alone (no UUID), from another new MAC: refused too.
        let attacker2 = "52:54:00:ee:00:02";
        let mut by_serial = spoof.clone();
        by_serial.boot_mac = attacker2.parse().unwrap();
        by_serial.hardware = hardware(attacker2, "SN-VICTIM");
        by_serial.hardware.dmi.as_mut().unwrap().uuid = None;
        let token = token_in(&script(&srv, attacker2).await);
        let e = srv.client(Some(&token)).report_discovery(&by_serial).await.unwrap_err();
        assert_eq!(e.status(), Some(409), "{e}");
        // A fresh identity that lists the victim's NIC among its own: the
        // NIC is not moved; the answer names only the MAC it was sent.
        let attacker3 = "52:54:00:ee:00:03";
        let mut steal_nic = DiscoveryReport {
            firmware: None,
            boot_mac: attacker3.parse().unwrap(),
            hardware: hardware(attacker3, "SN-ATTACKER"),
            lldp: vec![],
        };
        steal_nic.hardware.dmi.as_mut().unwrap().uuid = Some("7d0b3b2e-4f4a-4a55-9c1e-0e6f1b2a3c4d".into());
        steal_nic.hardware.nics.push(kiln_types::machine::HardwareNic {
            mac: victim_mac.parse().unwrap(),
            name: "ens4".into(),
            driver: None,
            speed_mbps: None,
            link: true,
        });
        let token = token_in(&script(&srv, attacker3).await);
        let e = srv.client(Some(&token)).report_discovery(&steal_nic).await.unwrap_err();
        assert_eq!(e.status(), Some(409), "{e}");
        assert!(
            e.to_string().contains(victim_mac) && !e.to_string().contains("db1050"),
            "{e}"
        );
        assert_eq!(admin.get_machine("db1050").await.unwrap(), before);
        assert_eq!(
            admin.get_machine("node-525400ee0003").await.unwrap_err().status(),
            Some(404)
        );
        assert_eq!(refusals(&srv).await.len(), 3);
    }
);

// Issue 14: a discovery token is bound to its MAC, good once and for a
// while only; only tokens kiln issued leave audit events.
api_test!(
    issue_14_a_discovery_token_is_bound_to_its_mac_single_use_and_short_lived,
    settings = discovery_on(),
    |srv| {
        let (a, b) = ("52:54:00:ab:cd:61", "52:54:00:ab:cd:62");
        let report = |mac: &str| DiscoveryReport {
            firmware: None,
            boot_mac: mac.parse().unwrap(),
            hardware: hardware(mac, &format!("SN-{mac}")),
            lldp: vec![],
        };
        let mut report_b = report(b);
        report_b.hardware.dmi.as_mut().unwrap().uuid = None;
        let token_a = token_in(&script(&srv, a).await);
        assert!(token_a.starts_with("kd2."), "{token_a}");

        // A's token for a report about B.
        let e = srv
            .client(Some(&token_a))
            .report_discovery(&report_b)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(401), "{e}");
        assert!(e.to_string().contains(&format!("issued to {a}")), "{e}");
        assert_eq!(
            srv.admin().get_machine("node-525400abcd62").await.unwrap_err().status(),
            Some(404)
        );
        assert_eq!(
            refusals(&srv).await[0].after.as_ref().unwrap()["reason"],
            "token issued to another MAC"
        );

        // Its own report: accepted, once. The replay, even of the very same
        // report, is refused and audited.
        let mut report_a = report(a);
        report_a.hardware.dmi.as_mut().unwrap().uuid = None;
        let agent = srv.client(Some(&token_a));
        let r = agent.report_discovery(&report_a).await.unwrap();
        assert!(r.created);
        let e = agent.report_discovery(&report_a).await.unwrap_err();
        assert_eq!(e.status(), Some(409), "{e}");
        assert!(e.to_string().contains("already carried a report"), "{e}");
        assert_eq!(
            refusals(&srv).await[0].after.as_ref().unwrap()["reason"],
            "token replayed"
        );
        // The use is recorded in the database (so it holds across restarts
        // and for every server on it), not in this server's memory.
        assert!(srv.state.store.discovery_tokens_kept().await.unwrap() >= 1);

        // Expired: refused from the header alone, and audited.
        let old = srv.state.secrets.discovery_token(
            b.parse().unwrap(),
            None,
            chrono::Utc::now() - chrono::Duration::seconds(1),
        );
        let e = srv
            .client(Some(old.expose()))
            .report_discovery(&report_b)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(401), "{e}");
        assert!(e.to_string().contains("expired"), "{e}");
        assert_eq!(
            refusals(&srv).await[0].after.as_ref().unwrap()["reason"],
            "expired token"
        );
        assert_eq!(
            srv.admin().get_machine("node-525400abcd62").await.unwrap_err().status(),
            Some(404)
        );

        // Forged, foreign or old-style tokens: 401, and no event (anyone
        // may send those; they must not fill the audit log).
        let events = refusals(&srv).await.len();
        let (payload, _) = token_a.rsplit_once('.').unwrap();
        for bad in [
            format!("{payload}.AAAA"),
            "kd_c2VjcmV0".to_string(),
            "kd2.bm90LWEtdG9rZW4.x".to_string(),
        ] {
            let e = srv.client(Some(&bad)).report_discovery(&report_b).await.unwrap_err();
            assert_eq!(e.status(), Some(401), "{bad}: {e}");
        }
        assert_eq!(refusals(&srv).await.len(), events);

        // B's own fresh token still works: refusals did not burn it.
        let token_b = token_in(&script(&srv, b).await);
        assert!(
            srv.client(Some(&token_b))
                .report_discovery(&report_b)
                .await
                .unwrap()
                .created
        );

        // Used tokens are pruned once expired.
        let store = &srv.state.store;
        let now = chrono::Utc::now();
        let mac = a.parse().unwrap();
        store
            .use_discovery_token("test-old", mac, now - chrono::Duration::hours(1))
            .await
            .unwrap();
        let kept = store.discovery_tokens_kept().await.unwrap();
        assert_eq!(
            store
                .use_discovery_token("test-new", mac, now + chrono::Duration::hours(1))
                .await
                .unwrap(),
            kiln_store::TokenUse::First
        );
        assert_eq!(
            store.discovery_tokens_kept().await.unwrap(),
            kept,
            "the expired row went, the new one came"
        );
        assert!(matches!(
            store
                .use_discovery_token("test-new", mac, now + chrono::Duration::hours(1))
                .await
                .unwrap(),
            kiln_store::TokenUse::Replay { .. }
        ));
        // Concurrent uses of one token (two servers, or a quick replay):
        // exactly one is the first.
        let uses = futures::future::join_all((0..8).map(|_| {
            let store = store.clone();
            async move {
                store
                    .use_discovery_token("test-race", mac, now + chrono::Duration::hours(1))
                    .await
                    .unwrap()
            }
        }))
        .await;
        assert_eq!(
            uses.iter().filter(|u| **u == kiln_store::TokenUse::First).count(),
            1,
            "{uses:?}"
        );
        store.release_discovery_token("test-new").await.unwrap();
        assert_eq!(
            store
                .use_discovery_token("test-new", mac, now + chrono::Duration::hours(1))
                .await
                .unwrap(),
            kiln_store::TokenUse::First
        );
    }
);

/// Sends `head` (request line and headers, without the blank line) and
/// then `body_chunks` on a raw connection, and returns the status line of
/// the answer; the body is sent by a task that stops at the first error
/// (the server may close the connection without reading it all).
async fn raw_post(srv: &TestServer, head: String, body_chunks: Vec<Vec<u8>>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = srv.url.trim_start_matches("http://").to_string();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(format!("{head}\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        for c in body_chunks {
            if wr.write_all(&c).await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while !answer.windows(2).any(|w| w == b"\r\n") {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    writer.abort();
    assert!(read.is_ok(), "no answer within 10 s: the server waited for the body");
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

// Issue 14, bounded before trusted: the token is checked from the headers
// before any body is read, and a report is at most 1 MiB.
api_test!(
    issue_14_a_discovery_report_is_bounded_before_it_is_trusted,
    settings = discovery_on(),
    |srv| {
        let mac = "52:54:00:ab:cd:71";
        let token = token_in(&script(&srv, mac).await);
        let post = |auth: &str, framing: &str| {
            format!("POST /api/v1/discovery HTTP/1.1\r\nContent-Type: application/json\r\n{auth}{framing}")
        };
        // 100 MiB declared, a few bytes sent: answered at once, unread.
        let huge = "Content-Length: 104857600";
        let status = raw_post(&srv, post("", huge), vec![b"{".to_vec()]).await;
        assert!(status.contains(" 401 "), "no token: {status}");
        let status = raw_post(
            &srv,
            post("Authorization: Bearer kd2.forged.x\r\n", huge),
            vec![b"{".to_vec()],
        )
        .await;
        assert!(status.contains(" 401 "), "forged token: {status}");
        let auth = format!("Authorization: Bearer {token}\r\n");
        let status = raw_post(&srv, post(&auth, huge), vec![b"{".to_vec()]).await;
        assert!(status.contains(" 413 "), "declared too large: {status}");
        // No length declared (chunked): cut off once past 1 MiB.
        let chunk = |n: usize| {
            let mut c = format!("{n:x}\r\n").into_bytes();
            c.extend(std::iter::repeat_n(b' ', n));
            c.extend_from_slice(b"\r\n");
            c
        };
        let status = raw_post(
            &srv,
            post(&auth, "Transfer-Encoding: chunked"),
            (0..48).map(|_| chunk(64 << 10)).collect(),
        )
        .await;
        assert!(status.contains(" 413 "), "streamed too large: {status}");
        // None of that used the token: its report still goes through.
        let r = srv
            .client(Some(&token))
            .report_discovery(&DiscoveryReport {
                firmware: None,
                boot_mac: mac.parse().unwrap(),
                hardware: hardware(mac, "SN-0071"),
                lldp: vec![],
            })
            .await
            .unwrap();
        assert!(r.created);
    }
);

// Issue 14: placeholder identities name no machine. Two machines whose
// firmware says "To be filled by O.E.M." and a nil UUID are two machines:
// the second is not refused as a claim on the first (nor merged into it).
api_test!(
    issue_14_placeholder_dmi_values_match_no_machine,
    settings = discovery_on(),
    |srv| {
        for mac in ["52:54:00:ab:cd:81", "52:54:00:ab:cd:82"] {
            let mut hw = hardware(mac, "To be filled by O.E.M.");
            hw.dmi.as_mut().unwrap().uuid = Some("00000000-0000-0000-0000-000000000000".into());
            let r = srv
                .client(Some(&token_in(&script(&srv, mac).await)))
                .report_discovery(&DiscoveryReport {
                    firmware: None,
                    boot_mac: mac.parse().unwrap(),
                    hardware: hw,
                    lldp: vec![],
                })
                .await
                .unwrap();
            assert!(r.created, "{mac}");
        }
        assert!(refusals(&srv).await.is_empty());
    }
);
