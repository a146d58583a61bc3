//! The Redfish driver against kiln-sim's simulated BMCs on loopback, over
//! verified HTTPS: power with slow transitions, the cycle fallback, a
//! one-shot boot override consumed by the next boot, 5xx bursts, lost
//! answers, silence, 401, basic-auth fallback, the system found by UUID or
//! serial, TLS refusals, and logins kept between calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_bmc::redfish::{RedfishConfig, RedfishDriver, Sessions};
use kiln_bmc::{BmcDriver, BmcErrorKind, BootDevice, BootFirmware, BootPersistence, Password, PowerAction, PowerState};
use kiln_sim::{BmcSpec, Faults, Power, Sim, SimConfig};

const USER: &str = "admin";
/// A canary: it must appear in no error text.
const PASSWORD: &str = "canary-7Hq2-redfish";

async fn fleet(bmcs: usize, spec: BmcSpec) -> Sim {
    kiln_sim::start(SimConfig {
        bmcs,
        tls: true,
        username: USER.into(),
        password: PASSWORD.into(),
        spec,
        ..SimConfig::default()
    })
    .await
    .expect("start the simulator")
}

/// A verified-TLS driver config for BMC `i`, with short timing.
fn config(sim: &Sim, i: usize) -> RedfishConfig {
    let mut c = RedfishConfig::new(sim.bmc(i).url(), USER, Password::new(PASSWORD));
    c.ca_pem = sim.ca_pem().map(str::to_string);
    c.request_timeout = Duration::from_millis(2000);
    c.deadline = Duration::from_secs(20);
    c.poll_interval = Duration::from_millis(100);
    c
}

/// [`config`] with its login kept in `sessions`, as the server does.
fn kept(sim: &Sim, i: usize, sessions: &Arc<Sessions>) -> RedfishConfig {
    let mut c = config(sim, i);
    c.sessions = Some(sessions.clone());
    c
}

fn driver(c: RedfishConfig) -> RedfishDriver {
    RedfishDriver::new(c).expect("driver")
}

#[tokio::test]
async fn power_on_off_cycle_wait_for_slow_transitions() {
    let delay = Duration::from_millis(700);
    let sim = fleet(
        1,
        BmcSpec {
            power_delay: delay,
            ..BmcSpec::default()
        },
    )
    .await;
    let d = driver(config(&sim, 0));
    assert_eq!(d.power_status().await.unwrap(), PowerState::Off);

    let t = Instant::now();
    d.power(PowerAction::On).await.unwrap();
    assert!(
        t.elapsed() >= delay,
        "returned before the state changed: {:?}",
        t.elapsed()
    );
    assert_eq!(sim.bmc(0).power(0), Power::On);
    assert_eq!(d.power_status().await.unwrap(), PowerState::On);

    // On again: already on, nothing sent.
    d.power(PowerAction::On).await.unwrap();

    let t = Instant::now();
    d.power(PowerAction::Cycle).await.unwrap();
    assert!(t.elapsed() >= delay);
    assert_eq!(sim.bmc(0).power(0), Power::On);

    let t = Instant::now();
    d.power(PowerAction::Off).await.unwrap();
    assert!(t.elapsed() >= delay);
    assert_eq!(sim.bmc(0).power(0), Power::Off);

    let s = sim.bmc(0).stats();
    assert_eq!(s.resets, ["On", "PowerCycle", "ForceOff"]);
    assert_eq!(s.sessions_created, 6, "one session per call");
    assert_eq!(s.sessions_deleted, 6, "every session deleted again");
    assert_eq!(s.unauthorized, 0);
}

#[tokio::test]
async fn cycle_without_power_cycle_is_off_then_on_and_reset_uses_force_restart() {
    let sim = fleet(
        1,
        BmcSpec {
            powered_on: true,
            power_delay: Duration::from_millis(200),
            allowed_resets: vec!["On".into(), "ForceOff".into()],
            ..BmcSpec::default()
        },
    )
    .await;
    let d = driver(config(&sim, 0));
    d.power(PowerAction::Cycle).await.unwrap();
    assert_eq!(sim.bmc(0).stats().resets, ["ForceOff", "On"]);
    assert_eq!(sim.bmc(0).power(0), Power::On);
    // SoftOff is not allowed here: refused before anything is sent.
    let e = d.power(PowerAction::SoftOff).await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("GracefulShutdown"), "{e}");
    assert_eq!(sim.bmc(0).stats().resets.len(), 2);

    let sim = fleet(
        1,
        BmcSpec {
            powered_on: true,
            ..BmcSpec::default()
        },
    )
    .await;
    driver(config(&sim, 0)).power(PowerAction::Reset).await.unwrap();
    assert_eq!(sim.bmc(0).stats().resets, ["ForceRestart"]);
}

#[tokio::test]
async fn boot_override_once_is_consumed_by_the_next_boot() {
    let sim = fleet(
        1,
        BmcSpec {
            power_delay: Duration::from_millis(150),
            ..BmcSpec::default()
        },
    )
    .await;
    let d = driver(config(&sim, 0));
    d.set_boot_device(BootDevice::Network, BootPersistence::Once, BootFirmware::Uefi)
        .await
        .unwrap();
    let boot = sim.bmc(0).with(|b| {
        let s = &b.systems[0];
        (
            s.override_enabled.clone(),
            s.override_target.clone(),
            s.override_mode.clone(),
        )
    });
    assert_eq!(boot, ("Once".into(), "Pxe".into(), "UEFI".into()));
    assert!(sim.bmc(0).boots().is_empty(), "nothing booted yet");

    d.power(PowerAction::On).await.unwrap();
    d.power(PowerAction::Cycle).await.unwrap();
    let boots: Vec<_> = sim.bmc(0).boots().into_iter().map(|b| (b.target, b.mode)).collect();
    assert_eq!(
        boots,
        [
            ("Pxe".to_string(), "UEFI".to_string()),
            ("Hdd".to_string(), "UEFI".to_string())
        ],
        "the first boot used the override, the second the disk"
    );
    assert_eq!(sim.bmc(0).with(|b| b.systems[0].override_enabled.clone()), "Disabled");

    // Persistent, legacy: every boot.
    d.set_boot_device(BootDevice::Cdrom, BootPersistence::Persistent, BootFirmware::Bios)
        .await
        .unwrap();
    d.power(PowerAction::Cycle).await.unwrap();
    d.power(PowerAction::Cycle).await.unwrap();
    let last: Vec<_> = sim.bmc(0).boots()[2..]
        .iter()
        .map(|b| (b.target.clone(), b.mode.clone()))
        .collect();
    assert_eq!(
        last,
        [
            ("Cd".to_string(), "Legacy".to_string()),
            ("Cd".to_string(), "Legacy".to_string())
        ]
    );

    // UEFI HTTP boot: Redfish's `UefiHttp`, in UEFI mode.
    d.set_boot_device(BootDevice::UefiHttp, BootPersistence::Once, BootFirmware::Uefi)
        .await
        .unwrap();
    d.power(PowerAction::Cycle).await.unwrap();
    let b = sim.bmc(0).boots().pop().unwrap();
    assert_eq!((b.target.as_str(), b.mode.as_str()), ("UefiHttp", "UEFI"));
}

#[tokio::test]
async fn a_5xx_burst_is_retried_for_reads_and_the_boot_override() {
    let sim = fleet(
        1,
        BmcSpec {
            faults: Faults {
                error_burst: 2,
                ..Faults::default()
            },
            ..BmcSpec::default()
        },
    )
    .await;
    let d = driver(config(&sim, 0));
    assert_eq!(d.power_status().await.unwrap(), PowerState::Off);
    assert_eq!(sim.bmc(0).stats().injected_errors, 2);

    sim.bmc(0).set_faults(Faults {
        error_burst: 2,
        only_path: Some("/Systems/1".into()),
        ..Faults::default()
    });
    d.set_boot_device(BootDevice::Disk, BootPersistence::Once, BootFirmware::Uefi)
        .await
        .unwrap();
    assert_eq!(sim.bmc(0).stats().injected_errors, 4);
    assert_eq!(sim.bmc(0).with(|b| b.systems[0].override_target.clone()), "Hdd");

    // A burst longer than the tries: a clear error after exactly 3 tries.
    sim.bmc(0).set_faults(Faults {
        error_burst: 10,
        ..Faults::default()
    });
    let e = d.power_status().await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::Protocol, "{e}");
    assert!(e.to_string().contains("503"), "{e}");
    assert_eq!(sim.bmc(0).stats().injected_errors, 7);
}

#[tokio::test]
async fn a_5xx_on_a_cycle_is_not_repeated_but_on_is_resent_when_the_state_shows_it_did_not_happen() {
    let sim = fleet(
        1,
        BmcSpec {
            powered_on: true,
            faults: Faults {
                error_burst: 1,
                only_path: Some("ComputerSystem.Reset".into()),
                ..Faults::default()
            },
            ..BmcSpec::default()
        },
    )
    .await;
    let d = driver(config(&sim, 0));
    let e = d.power(PowerAction::Cycle).await.unwrap_err();
    assert!(e.to_string().contains("503"), "{e}");
    let s = sim.bmc(0).stats();
    assert_eq!((s.injected_errors, s.resets.len()), (1, 0), "one POST, not repeated");

    d.power(PowerAction::Off).await.unwrap();
    sim.bmc(0).set_faults(Faults {
        error_burst: 1,
        only_path: Some("ComputerSystem.Reset".into()),
        ..Faults::default()
    });
    d.power(PowerAction::On).await.unwrap();
    let s = sim.bmc(0).stats();
    assert_eq!(
        s.resets,
        ["ForceOff", "On"],
        "On resent after the 503 since the state still read Off"
    );
    assert_eq!(s.injected_errors, 2);
}

#[tokio::test]
async fn a_lost_cycle_answer_is_outcome_unknown_and_sent_once() {
    let sim = fleet(
        1,
        BmcSpec {
            powered_on: true,
            faults: Faults {
                hang: true,
                only_path: Some("ComputerSystem.Reset".into()),
                ..Faults::default()
            },
            ..BmcSpec::default()
        },
    )
    .await;
    let mut c = config(&sim, 0);
    c.request_timeout = Duration::from_millis(300);
    let e = driver(c).power(PowerAction::Cycle).await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::OutcomeUnknown, "{e}");
    assert_eq!(sim.bmc(0).stats().hung, 1, "the cycle was sent exactly once");
}

#[tokio::test]
async fn a_silent_bmc_times_out_within_the_deadline() {
    let sim = fleet(
        1,
        BmcSpec {
            faults: Faults {
                hang: true,
                ..Faults::default()
            },
            ..BmcSpec::default()
        },
    )
    .await;
    let mut c = config(&sim, 0);
    c.request_timeout = Duration::from_millis(300);
    c.deadline = Duration::from_secs(5);
    let t = Instant::now();
    let e = driver(c.clone()).power_status().await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::Timeout, "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "3 tries of 300 ms plus pauses, took {:?}",
        t.elapsed()
    );
    assert_eq!(sim.bmc(0).stats().hung, 3);

    // A deadline shorter than the tries wins.
    c.request_timeout = Duration::from_secs(10);
    c.deadline = Duration::from_millis(800);
    let t = Instant::now();
    let e = driver(c).power_status().await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::Timeout, "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the 800 ms deadline, not the 10 s request timeout; took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_wrong_password_is_auth_failed_after_exactly_one_attempt() {
    for sessions in [true, false] {
        let sim = fleet(
            1,
            BmcSpec {
                sessions,
                ..BmcSpec::default()
            },
        )
        .await;
        let mut c = config(&sim, 0);
        c.password = Password::new("wrong-canary-Zx81");
        let e = driver(c).power(PowerAction::On).await.unwrap_err();
        assert_eq!(e.kind(), BmcErrorKind::AuthFailed, "{e}");
        let s = sim.bmc(0).stats();
        assert_eq!(s.unauthorized, 1, "sessions {sessions}: one attempt, never retried");
        assert!(s.resets.is_empty());
        let text = format!("{e} {e:?}");
        assert!(!text.contains("wrong-canary") && !text.contains(PASSWORD), "{text}");
        assert!(text.contains(USER), "names the user: {text}");

        // A BMC that refuses everyone (locked account): the same.
        sim.bmc(0).set_faults(Faults {
            reject_auth: true,
            ..Faults::default()
        });
        let e = driver(config(&sim, 0)).power_status().await.unwrap_err();
        assert_eq!(e.kind(), BmcErrorKind::AuthFailed);
        assert_eq!(sim.bmc(0).stats().unauthorized, 2);
    }
}

#[tokio::test]
async fn basic_auth_when_the_service_has_no_sessions() {
    let sim = fleet(
        1,
        BmcSpec {
            sessions: false,
            ..BmcSpec::default()
        },
    )
    .await;
    let d = driver(config(&sim, 0));
    d.power(PowerAction::On).await.unwrap();
    assert_eq!(d.power_status().await.unwrap(), PowerState::On);
    let s = sim.bmc(0).stats();
    assert_eq!((s.sessions_created, s.unauthorized), (0, 0));
    assert_eq!(s.resets, ["On"]);
}

#[tokio::test]
async fn the_system_is_found_by_uuid_or_serial() {
    let sim = fleet(
        1,
        BmcSpec {
            systems: 3,
            ..BmcSpec::default()
        },
    )
    .await;
    let bmc = sim.bmc(0);

    let mut c = config(&sim, 0);
    c.machine_uuid = Some(bmc.uuid(1));
    let d = driver(c);
    d.power(PowerAction::On).await.unwrap();
    let powers: Vec<Power> = (0..3).map(|i| bmc.power(i)).collect();
    assert_eq!(powers, [Power::Off, Power::On, Power::Off], "only system 2 powered on");
    let id = d.identity().await.unwrap();
    assert_eq!((id.uuid, id.serial), (Some(bmc.uuid(1)), Some(bmc.serial(1))));

    let mut c = config(&sim, 0);
    c.machine_serial = Some(bmc.serial(2));
    driver(c).power(PowerAction::On).await.unwrap();
    assert_eq!(bmc.power(2), Power::On);

    // The system given in the address.
    let mut c = config(&sim, 0);
    c.address = format!("{}/redfish/v1/Systems/1", bmc.url());
    driver(c).power(PowerAction::On).await.unwrap();
    assert_eq!(bmc.power(0), Power::On);

    // Neither known, several systems: refused, saying what to record.
    let e = driver(config(&sim, 0)).power_status().await.unwrap_err();
    assert!(e.to_string().contains("3 systems"), "{e}");
    let mut c = config(&sim, 0);
    c.machine_uuid = Some(uuid::Uuid::nil());
    let e = driver(c).power_status().await.unwrap_err();
    assert!(e.to_string().contains(&bmc.serial(2)), "lists what it saw: {e}");
}

#[tokio::test]
async fn tls_is_verified_unless_the_bmc_is_marked_insecure() {
    let sim = fleet(1, BmcSpec::default()).await;
    let mut c = config(&sim, 0);
    c.ca_pem = None;
    let e = driver(c.clone()).power_status().await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::Config, "{e}");
    assert!(e.to_string().contains("certificate is not trusted"), "{e}");
    // Named, so the operator knows which CA to fetch.
    assert!(
        e.to_string()
            .contains("certificate subject CN=kiln-sim BMC, issued by CN=kiln-sim test CA, SHA-256 "),
        "{e}"
    );
    assert_eq!(sim.bmc(0).stats().requests, 0, "no request got through");

    c.insecure = true;
    assert_eq!(driver(c).power_status().await.unwrap(), PowerState::Off);

    // The name is checked too: the CA is trusted, but the certificate is
    // for 127.0.0.1, not for "localhost".
    let mut c = config(&sim, 0);
    c.address = sim.bmc(0).url().replace("127.0.0.1", "localhost");
    let e = driver(c).power_status().await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::Config, "{e}");
    assert!(e.to_string().contains("not trusted"), "{e}");
    assert!(e.to_string().contains("subject CN=kiln-sim BMC"), "{e}");
}

#[tokio::test]
async fn a_closed_port_is_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = RedfishConfig::new(&format!("http://127.0.0.1:{port}"), USER, Password::new(PASSWORD));
    c.deadline = Duration::from_secs(3);
    let e = driver(c).power_status().await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::Unreachable, "{e}");
}

#[tokio::test]
async fn kept_sessions_skip_the_login_and_are_renewed_when_the_bmc_drops_them() {
    let sim = fleet(1, BmcSpec::default()).await;
    let sessions = Arc::new(Sessions::default());
    // Without kept sessions: root, login, systems, system, logout.
    driver(config(&sim, 0)).power_status().await.unwrap();
    let alone = sim.bmc(0).stats();
    assert_eq!(
        (alone.requests, alone.sessions_created, alone.sessions_deleted),
        (5, 1, 1)
    );

    // A driver per call, as the server makes them: one login for all.
    driver(kept(&sim, 0, &sessions)).power(PowerAction::On).await.unwrap();
    let before = sim.bmc(0).stats();
    assert_eq!(
        driver(kept(&sim, 0, &sessions)).power_status().await.unwrap(),
        PowerState::On
    );
    let s = sim.bmc(0).stats();
    assert_eq!(s.requests - before.requests, 1, "only the system is read");
    assert_eq!(
        (s.sessions_created, s.sessions_deleted),
        (2, 1),
        "the session stays open"
    );
    assert_eq!(sessions.len(), 1);

    // The BMC forgets its sessions (it restarted, or they timed out): the
    // next call is refused once, logs in again and still succeeds.
    sim.bmc(0).with(|b| b.sessions.clear());
    driver(kept(&sim, 0, &sessions)).power(PowerAction::Off).await.unwrap();
    let s = sim.bmc(0).stats();
    assert_eq!((s.unauthorized, s.sessions_created), (1, 3));
    assert_eq!(s.resets, ["On", "ForceOff"]);

    // Another password is not the kept login's: it logs in itself, and
    // fails like any wrong password, once.
    let mut wrong = kept(&sim, 0, &sessions);
    wrong.password = Password::new("wrong-canary-Zx81");
    let e = driver(wrong).power_status().await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::AuthFailed, "{e}");
    assert_eq!(sim.bmc(0).stats().unauthorized, 2);

    // A BMC that refuses everyone: the kept session is refused, the fresh
    // login too, and the call fails as AuthFailed with nothing kept.
    sim.bmc(0).set_faults(Faults {
        reject_auth: true,
        ..Faults::default()
    });
    let e = driver(kept(&sim, 0, &sessions)).power_status().await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::AuthFailed, "{e}");
    assert_eq!(sim.bmc(0).stats().unauthorized, 4);
    assert!(sessions.is_empty(), "a refused login is not kept");

    // Basic auth (no session service) is kept too; refused, it is the
    // password that is wrong: one 401, no second try, nothing kept.
    let basic = fleet(
        1,
        BmcSpec {
            sessions: false,
            ..BmcSpec::default()
        },
    )
    .await;
    driver(kept(&basic, 0, &sessions)).power_status().await.unwrap();
    assert_eq!(sessions.len(), 1);
    basic.bmc(0).set_faults(Faults {
        reject_auth: true,
        ..Faults::default()
    });
    let e = driver(kept(&basic, 0, &sessions)).power_status().await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::AuthFailed, "{e}");
    assert_eq!(basic.bmc(0).stats().unauthorized, 1);
    assert!(sessions.is_empty());
}

#[tokio::test]
async fn a_stopping_server_closes_its_kept_sessions_within_its_wait() {
    let sim = fleet(3, BmcSpec::default()).await;
    let sessions = Arc::new(Sessions::default());
    for i in 0..3 {
        driver(kept(&sim, i, &sessions)).power_status().await.unwrap();
    }
    assert_eq!(sessions.len(), 3);
    // One BMC no longer answers at all: it does not hold the others up,
    // nor the server past the wait.
    sim.bmc(2).set_faults(Faults {
        hang: true,
        ..Faults::default()
    });
    let t = Instant::now();
    let closed = sessions.close_all(Duration::from_millis(1500)).await;
    assert!(t.elapsed() < Duration::from_millis(2500), "{:?}", t.elapsed());
    assert_eq!(closed, 2);
    assert!(sessions.is_empty());
    for i in 0..2 {
        let s = sim.bmc(i).stats();
        assert_eq!((s.sessions_created, s.sessions_deleted), (1, 1), "BMC {i}");
        assert!(sim.bmc(i).with(|b| b.sessions.is_empty()));
    }
}
