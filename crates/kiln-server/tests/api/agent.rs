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
use kiln_types::machine::{Disk, Dmi, Hardware, HardwareNic, MachineState};

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
            uuid: Some("0b6a1b52-0c7d-4b39-a37e-2b1c5f7a9d10".into()),
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
        assert!(!e.to_string().contains(&token), "{e}");
        let report = DiscoveryReport {
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
        // Again (a second boot): the same machine, updated.
        let mut again = report.clone();
        again.hardware.memory_bytes = 16 * GIB;
        let r2 = agent.report_discovery(&again).await.unwrap();
        assert!(!r2.created);
        assert_eq!(r2.machine_id, r.machine_id);
        let m = srv.admin().get_machine("node-525400abcd01").await.unwrap();
        assert_eq!(m.hardware.unwrap().memory_bytes, 16 * GIB);
        // An enrolled machine (known by its MAC) is updated and made ready.
        let mut enrolled = kiln_types::machine::MachineCreate::new("db7".parse().unwrap());
        enrolled.nics = vec![serde_json::from_value(serde_json::json!({ "mac": "52:54:00:ab:cd:03" })).unwrap()];
        srv.admin().create_machine(&enrolled).await.unwrap();
        let mac3 = "52:54:00:ab:cd:03";
        let r3 = srv
            .client(Some(&token_in(&script(&srv, mac3).await)))
            .report_discovery(&DiscoveryReport {
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
    admin.create_machine(&m).await.unwrap();
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
        assert_eq!(m.nics[0].mac.to_string(), mac);

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
        assert_eq!(sim.bmc(0).boots().len(), 1, "no second boot");
        sim.shutdown().await;
    }
);
