//! A simulated fleet (kiln-sim) reimaged through the API, every path real:
//! the job engine drives each machine's simulated Redfish BMC, the machine
//! asks kiln's DHCP (relayed, on loopback) and HTTP boot, and its "agent"
//! and new OS report the stages with the job's token. Two machines
//! misbehave: one hangs in stage 2, one never phones home.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kiln_server::Settings;
use kiln_sim::fleet::{DhcpRelay, Event, Fleet, FleetConfig};
use kiln_test_utils::api_test;
use kiln_types::job::JobState;
use kiln_types::machine::MachineState;

use super::jobs::{catalog, ipxe, machine, request, until};

const MACHINES: u32 = 5;
const HANGS_IN_STAGE_2: usize = 3;
const NEVER_PHONES_HOME: usize = 4;

/// DHCP on loopback at a free port (no privileges needed) serving the
/// fleet relay's subnet, and waits short enough for the failures to show
/// within seconds.
fn fleet_settings() -> Settings {
    let [from, to] = DhcpRelay::DEFAULT_POOL;
    toml::from_str(&format!(
        r#"
[dhcp]
mode = "full"
interfaces = ["lo"]
port = 0

[[dhcp.subnet]]
network = "{}"
pool = ["{from}", "{to}"]

[jobs]
poll_interval_ms = 200

[jobs.reimage]
installer_start_secs = 20
base_installed_secs = 2
configured_secs = 20
finishing_secs = 20
first_boot_secs = 3
"#,
        DhcpRelay::DEFAULT_SUBNET
    ))
    .unwrap()
}

api_test!(
    a_simulated_fleet_is_reimaged_through_dhcp_http_boot_bmcs_and_stage_reports,
    settings = fleet_settings(),
    |srv| {
        let mut cfg = FleetConfig::with_machines(srv.url.clone(), MACHINES);
        cfg.dhcp = Some(DhcpRelay::to(SocketAddr::V4(srv.dhcp_addr.expect("DHCP runs"))));
        cfg.seed = 5;
        cfg.bmc.password = "rf-secret".into();
        cfg.machines[HANGS_IN_STAGE_2].faults.hang_in_stage_2 = true;
        cfg.machines[NEVER_PHONES_HOME].faults.never_phone_home = true;
        let fleet = Fleet::start(cfg).await.unwrap();
        let admin = srv.admin();
        catalog(&admin).await;
        for m in fleet.machines() {
            let host = format!("sim{}", m.index());
            admin
                .create_machine(&machine(&host, &m.mac().to_string(), m.bmc().url()))
                .await
                .unwrap();
        }
        let started = Instant::now();
        let mut jobs = vec![];
        for m in fleet.machines() {
            let job = admin.reimage(&format!("sim{}", m.index()), &request()).await.unwrap();
            jobs.push(job.id.to_string());
        }
        let mut ended = vec![];
        for id in &jobs {
            ended.push(until(&admin, id, "the end", |j| j.state.is_final()).await);
        }
        eprintln!("{MACHINES} simulated reimages ended in {:?}", started.elapsed());

        let leases = admin.list_leases(false).await.unwrap();
        for (i, (m, job)) in fleet.machines().iter().zip(&ended).enumerate() {
            let history = m.events();
            // Every machine net-booted once, through DHCP, and got the agent.
            let ip = m
                .leased_ip()
                .unwrap_or_else(|| panic!("machine {i} got no lease: {history:?}"));
            let lease = leases.iter().find(|l| l.mac.to_string() == m.mac().to_string());
            assert_eq!(lease.map(|l| l.ip), Some(ip), "machine {i}: {leases:?}");
            assert!(history.contains(&Event::Agent { job: jobs[i].clone() }), "{history:?}");
            let host = format!("sim{i}");
            let state = admin.get_machine(&host).await.unwrap().state;
            match i {
                HANGS_IN_STAGE_2 => {
                    assert_eq!(job.state, JobState::Failed, "{job:?}");
                    let reason = job.reason.clone().unwrap_or_default();
                    assert!(reason.contains("no stage 2"), "{reason}");
                    assert_eq!(m.stages_reported(), vec![1]);
                    assert!(history.contains(&Event::Hung), "{history:?}");
                    assert_eq!(state, MachineState::Failed);
                }
                NEVER_PHONES_HOME => {
                    assert_eq!(job.state, JobState::Failed, "{job:?}");
                    let reason = job.reason.clone().unwrap_or_default();
                    assert!(reason.contains("no stage 5"), "{reason}");
                    assert_eq!(m.stages_reported(), vec![1, 2, 3, 4]);
                    assert_eq!(state, MachineState::Failed);
                }
                _ => {
                    assert_eq!(job.state, JobState::Succeeded, "machine {i}: {job:?}\n{history:?}");
                    assert_eq!(m.stages_reported(), vec![1, 2, 3, 4, 5]);
                    assert_eq!(state, MachineState::Deployed);
                    // Booted from the network once, then from its disk.
                    let targets: Vec<String> = m.bmc().boots().into_iter().map(|b| b.target).collect();
                    assert_eq!(targets, ["Pxe", "Hdd"], "machine {i}");
                }
            }
            // Failed or not, nothing is left armed, and the BMC boots the disk.
            let script = ipxe(&srv, &m.mac().to_string()).await;
            assert!(!script.contains("kernel"), "machine {i} left armed: {script}");
            let target = m.bmc().with(|b| b.systems[0].override_target.clone());
            assert_eq!(target, "Hdd", "machine {i}");
        }
        fleet.shutdown().await;
    }
);

// Without DHCP the machines ask HTTP boot straight away; each machine's
// history says what it did.
api_test!(a_fleet_without_dhcp_boots_from_http_and_tells_what_it_did, |srv| {
    let mut cfg = FleetConfig::with_machines(srv.url.clone(), 2);
    cfg.durations = kiln_sim::fleet::Durations::uniform(Duration::from_millis(50));
    cfg.bmc.password = "rf-secret".into();
    let fleet = Fleet::start(cfg).await.unwrap();
    let admin = srv.admin();
    catalog(&admin).await;
    for m in fleet.machines() {
        admin
            .create_machine(&machine(
                &format!("nodhcp{}", m.index()),
                &m.mac().to_string(),
                m.bmc().url(),
            ))
            .await
            .unwrap();
    }
    let id = admin.reimage("nodhcp0", &request()).await.unwrap().id.to_string();
    let job = until(&admin, &id, "the end", |j| j.state.is_final()).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let m = fleet.machine(0);
    assert_eq!(m.leased_ip(), None);
    let events: Vec<Event> = m
        .events()
        .into_iter()
        .filter(|e| !matches!(e, Event::PoweredOff))
        .collect();
    assert_eq!(
        events,
        vec![
            Event::Boot { target: "Pxe".into() },
            Event::Agent { job: id.clone() },
            Event::Stage { n: 1 },
            Event::Stage { n: 2 },
            Event::Stage { n: 3 },
            Event::Stage { n: 4 },
            Event::Boot { target: "Hdd".into() },
            Event::Stage { n: 5 },
            Event::OsUp,
        ]
    );
    // The other machine was never powered on: it did nothing at all.
    assert!(fleet.machine(1).events().is_empty());
    // Powered on by hand (no job, nothing armed), a machine boots its disk
    // and reports nothing.
    admin
        .power("nodhcp1", kiln_types::power::PowerAction::On)
        .await
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while !fleet.machine(1).events().contains(&Event::OsUp) {
        assert!(Instant::now() < end, "{:?}", fleet.machine(1).events());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fleet.machine(1).stages_reported().is_empty());
    fleet.shutdown().await;
});
