//! Power, boot device and BMC check through the API, against real peers:
//! OpenIPMI's `ipmi_sim` (IPMI driver) and shell programs (command driver).
//! The maintenance rule, deadlines, per-BMC and global concurrency, audit
//! events, tenants, and a canary password that shows nowhere.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_bmc::command::CommandTemplates;
use kiln_server::Settings;
use kiln_server::bmc::{AUTH_MAINTENANCE_PREFIX, BmcSettings};
use kiln_test_utils::{TestServer, api_test};
use kiln_types::Secret;
use kiln_types::auth::{Role, TenantCreate, TokenCreate};
use kiln_types::event::EventFilter;
use kiln_types::job::JobState;
use kiln_types::machine::{BmcDriver, BmcInput, Firmware, FirmwareMode, MachineCreate, MachinePatch};
use kiln_types::power::{BootDevice, BootDeviceRequest, PowerAction, PowerState};
use sqlx::Row;

const USER: &str = "admin";
const CANARY: &str = "canary-Vb7-ipmi-pw";

// ---- ipmi_sim ----

/// A running ipmi_sim on a loopback port, killed (by PID) when dropped.
struct Sim {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CHASSIS: &str = r#"#!/bin/sh
D=$(dirname "$0")
echo "$*" >>"$D/actions.log"
op=$1; shift
case $op in
get)
  for p in "$@"; do
    case $p in
      power) echo "power:$(cat "$D/power" 2>/dev/null || echo 0)" ;;
      boot) echo "boot:$(cat "$D/boot" 2>/dev/null || echo none)" ;;
      *) echo "Invalid parameter: $p"; exit 1 ;;
    esac
  done ;;
set)
  while [ $# -gt 1 ]; do
    p=$1; v=$2; shift 2
    case $p in
      power) echo "$v" >"$D/power" ;;
      boot) echo "$v" >"$D/boot" ;;
      reset|shutdown) ;;
      identify) shift ;;
      *) echo "Invalid parameter: $p"; exit 1 ;;
    esac
  done ;;
*) exit 1 ;;
esac
exit 0
"#;

/// FRU device 0 of the simulated BMC: a common header and a product area
/// (manufacturer, name, part, version, serial `SIM-SN-42`), checksums
/// included; the driver reads the serial for `bmc check`.
const FRU: &[u8] = &[
    0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0xfe, // header: product area at 8
    0x01, 0x04, 0x19, 0xc2, b'K', b'n', 0xc2, b'X', b'y', 0xc2, b'P', b'n', 0xc2, b'v', b'1', 0xc9, b'S', b'I', b'M',
    b'-', b'S', b'N', b'-', b'4', b'2', 0xc1, 0x00, 0x00, 0x00, 0x00, 0x00, 0x17,
];

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sim {
    async fn start() -> Sim {
        let bin = ["/usr/bin/ipmi_sim", "/usr/local/bin/ipmi_sim", "/usr/sbin/ipmi_sim"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("ipmi_sim (Debian package openipmi) is not installed: run the tests with scripts/test");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let port = free_udp_port();
        let chassis = d.join("chassis.sh");
        std::fs::write(&chassis, CHASSIS).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&chassis, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            d.join("lan.conf"),
            format!(
                "name \"kilnapi\"\nset_working_mc 0x20\n  startlan 1\n    addr 127.0.0.1 {port}\n    priv_limit admin\n\
                 allowed_auths_callback none md2 md5 straight\n    allowed_auths_user none md2 md5 straight\n\
                 allowed_auths_operator none md2 md5 straight\n    allowed_auths_admin none md2 md5 straight\n\
                 guid 4c616200000040008000000000000042\n  endlan\n  chassis_control \"{}\"\n\
                 user 1 false \"\" \"\" user 1 none\n  user 2 true \"{USER}\" \"{CANARY}\" admin 10 none md2 md5 straight\n",
                chassis.display()
            ),
        )
        .unwrap();
        std::fs::write(d.join("fru.bin"), FRU).unwrap();
        std::fs::write(
            d.join("sim.emu"),
            format!(
                "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n\
                 mc_add_fru_data 0x20 0 {} file 0 \"{}\"\nmc_enable 0x20\n",
                FRU.len(),
                d.join("fru.bin").display()
            ),
        )
        .unwrap();
        std::fs::create_dir(d.join("state")).unwrap();
        let log = std::fs::File::create(d.join("ipmi_sim.log")).unwrap();
        let child = Command::new(bin)
            .arg("-n")
            .arg("-c")
            .arg(d.join("lan.conf"))
            .arg("-f")
            .arg(d.join("sim.emu"))
            .arg("-s")
            .arg(d.join("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start ipmi_sim");
        let sim = Sim { child, port, dir };
        // Ready when it answers an ASF presence ping.
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.connect(sim.addr()).await.unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        loop {
            let _ = s.send(&kiln_bmc::ipmi::codec::asf_ping(1)).await;
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), s.recv(&mut buf)).await {
                break;
            }
            assert!(Instant::now() < end, "ipmi_sim did not come up");
        }
        sim
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn actions(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("actions.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

fn with_bmc(host: &str, driver: BmcDriver, address: &str, password: Option<&str>) -> MachineCreate {
    let mut m = MachineCreate::new(host.parse().unwrap());
    m.bmc = Some(BmcInput {
        username: Some(USER.into()),
        password: password.map(Secret::new),
        ..BmcInput::new(driver, address)
    });
    m
}

async fn bmc_events(srv: &TestServer, host: &str) -> Vec<kiln_types::event::Event> {
    srv.admin()
        .list_events(&EventFilter {
            target: Some(host.into()),
            action: Some("bmc.".into()),
            ..EventFilter::default()
        })
        .await
        .unwrap()
        .items
}

/// Every text the database holds, table by table and column by column
/// (the schema is read from the database, so a table added later is
/// scanned too), except the sealed password column, which is checked to
/// hold only sealed text without `canary`.
async fn database_text(srv: &TestServer, canary: &str) -> String {
    let pool = srv.state.store.pool();
    let columns_sql = match srv.state.store.backend() {
        kiln_store::Backend::Sqlite => {
            "SELECT m.name AS t, p.name AS c FROM sqlite_master m JOIN pragma_table_info(m.name) p \
             WHERE m.type = 'table'"
        }
        kiln_store::Backend::Postgres => {
            "SELECT table_name::text AS t, column_name::text AS c FROM information_schema.columns \
             WHERE table_schema = current_schema()"
        }
    };
    let columns: Vec<(String, String)> = sqlx::query(columns_sql)
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<String, _>("t"), r.get::<String, _>("c")))
        .collect();
    let tables: std::collections::BTreeSet<&str> = columns.iter().map(|(t, _)| t.as_str()).collect();
    assert!(
        ["machines", "events", "tokens"].iter().all(|t| tables.contains(t)),
        "the scan sees the schema: {tables:?}"
    );
    let sqlite = srv.state.store.backend() == kiln_store::Backend::Sqlite;
    let mut all = String::new();
    for (t, c) in &columns {
        // SQLite: the bytes as hex, whatever the value's type (a BLOB cast
        // to TEXT need not be UTF-8); PostgreSQL: every type casts to text.
        let sql = if sqlite {
            format!("SELECT hex(CAST(\"{c}\" AS BLOB)) AS v FROM \"{t}\"")
        } else {
            format!("SELECT CAST(\"{c}\" AS TEXT) AS v FROM \"{t}\"")
        };
        for row in sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await.unwrap() {
            let v: String = row.try_get::<Option<String>, _>(0).unwrap().unwrap_or_default();
            let v = if sqlite {
                String::from_utf8_lossy(&hex::decode(&v).unwrap()).into_owned()
            } else {
                v
            };
            if (t.as_str(), c.as_str()) == ("machines", "bmc_password") {
                assert!(
                    v.is_empty() || v.starts_with("v1:"),
                    "the password column holds sealed text"
                );
                assert!(!v.contains(canary));
                continue;
            }
            all.push_str(&v);
            all.push('\n');
        }
    }
    all
}

// Issue 15: a reimage sets boot devices in the machine's recorded mode.
// Through the job engine, the BMC service and the IPMI driver against
// ipmi_sim: the job's two boot-device calls go out as UEFI (each call's
// audit event records the mode the driver was given, and the driver's
// bytes for it — the EFI bit, 0xa0 / 0xe0 — are checked in
// kiln-bmc's `cmd.rs`), and ipmi_sim carries out PXE, then the disk.
// ipmi_sim's chassis hook sees only the device, not the EFI bit, so the
// bit cannot be read back from it; `redfish_uefi_reimage` (kiln-sim)
// reads the mode back from the BMC.
api_test!(a_uefi_machine_is_reimaged_with_uefi_boot_devices_over_ipmi, |srv| {
    let sim = Sim::start().await;
    let admin = srv.admin();
    crate::jobs::catalog(&admin).await;
    let mac = "52:54:00:fe:00:01";
    let mut m = crate::jobs::machine("uefi1", mac, "http://unused.invalid");
    m.bmc = Some(BmcInput {
        username: Some(USER.into()),
        password: Some(Secret::new(CANARY)),
        ..BmcInput::new(BmcDriver::Ipmi, &sim.addr().to_string())
    });
    m.firmware = Some(Firmware {
        mode: FirmwareMode::Uefi,
        secure_boot: false,
    });
    admin.create_machine(&m).await.unwrap();
    let id = admin
        .reimage("uefi1", &crate::jobs::request())
        .await
        .unwrap()
        .id
        .to_string();
    crate::jobs::until(&admin, &id, "the installer wait", |j| {
        j.step == "wait_installer" && j.state == JobState::Waiting
    })
    .await;
    let token = crate::jobs::token_in(&crate::jobs::ipxe(&srv, mac).await);
    let agent = srv.client(Some(&token));
    for n in 1..=4 {
        agent.report_stage(&id, n, "ok").await.unwrap();
    }
    crate::jobs::until(&admin, &id, "the first-boot wait", |j| {
        j.step == "wait_first_boot" && j.state == JobState::Waiting
    })
    .await;
    let sets: Vec<String> = sim.actions().into_iter().filter(|a| a.starts_with("set ")).collect();
    let at = |a: &str| {
        sets.iter()
            .position(|s| s == a)
            .unwrap_or_else(|| panic!("no {a}: {sets:?}"))
    };
    assert!(
        at("set boot pxe") < at("set power 1"),
        "next boot set before power on: {sets:?}"
    );
    assert_eq!(sets.last().map(String::as_str), Some("set boot default"), "{sets:?}");
    let boot_calls: Vec<(String, bool, bool)> = bmc_events(&srv, "uefi1")
        .await
        .iter()
        .filter(|e| e.action == "bmc.bootdev")
        .map(|e| {
            let d = e.after.as_ref().unwrap();
            (
                d["device"].as_str().unwrap().to_string(),
                d["once"].as_bool().unwrap(),
                d["uefi"].as_bool().unwrap(),
            )
        })
        .collect();
    // Newest first.
    assert_eq!(
        boot_calls,
        [("disk".to_string(), false, true), ("network".to_string(), true, true)],
        "both in UEFI mode"
    );
});

api_test!(ipmi_power_bootdev_and_check_through_the_api, |srv| {
    let sim = Sim::start().await;
    let admin = srv.admin();
    admin
        .create_machine(&with_bmc("vm1", BmcDriver::Ipmi, &sim.addr().to_string(), Some(CANARY)))
        .await
        .unwrap();

    assert_eq!(admin.power_status("vm1").await.unwrap().state, PowerState::Off);
    admin.power("vm1", PowerAction::On).await.unwrap();
    assert_eq!(admin.power_status("vm1").await.unwrap().state, PowerState::On);
    admin.power("vm1", PowerAction::Off).await.unwrap();
    assert_eq!(admin.power_status("vm1").await.unwrap().state, PowerState::Off);
    admin.power("vm1", PowerAction::On).await.unwrap();
    admin.power("vm1", PowerAction::Cycle).await.unwrap();
    // ipmi_sim carries out a cycle as "power 0" and, once off, "power 1".
    let end = Instant::now() + Duration::from_secs(10);
    while sim.actions().iter().filter(|a| *a == "set power 1").count() < 3 {
        assert!(Instant::now() < end, "{:?}", sim.actions());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sets: Vec<String> = sim.actions().into_iter().filter(|a| a.starts_with("set ")).collect();
    assert_eq!(
        sets,
        [
            "set power 1",
            "set power 0",
            "set power 1",
            "set power 0",
            "set power 1"
        ]
    );

    let r = admin
        .set_boot_device(
            "vm1",
            &BootDeviceRequest {
                device: BootDevice::Network,
                once: true,
                uefi: false,
            },
        )
        .await
        .unwrap();
    assert!(r.once);
    assert!(
        sim.actions().contains(&"set boot pxe".to_string()),
        "{:?}",
        sim.actions()
    );

    let c = admin.bmc_check("vm1").await.unwrap();
    assert!(c.ok && c.reachable && c.authenticated, "{c:?}");
    assert_eq!(c.cipher_suite, Some(3), "ipmi_sim has no suite 17");
    assert_eq!(c.power, Some(PowerState::On));
    assert_eq!(c.uuid.as_deref(), Some("4c616200-0000-4000-8000-000000000042"));
    assert_eq!(c.serial.as_deref(), Some("SIM-SN-42"), "from the BMC's FRU data");

    // Every action is in the audit log with who and the result; reads are not.
    let events = bmc_events(&srv, "vm1").await;
    let actions: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.action.as_str(), e.after.as_ref().unwrap()["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("bmc.check", "ok"),
            ("bmc.bootdev", "ok"),
            ("bmc.power", "ok"),
            ("bmc.power", "ok"),
            ("bmc.power", "ok"),
            ("bmc.power", "ok")
        ]
    );
    assert_eq!(events[2].after.as_ref().unwrap()["action"], "cycle");
    assert_eq!(events[0].actor, "test-admin (admin)");

    // The canary: in no answer, no event, nowhere in the database but sealed.
    let shown = format!(
        "{:?}{:?}{:?}",
        admin.get_machine("vm1").await.unwrap(),
        events,
        admin.bmc_check("vm1").await.unwrap()
    );
    assert!(!shown.contains(CANARY));
    assert!(!database_text(&srv, CANARY).await.contains(CANARY));
});

api_test!(ipmi_wrong_password_three_times_means_maintenance, |srv| {
    let sim = Sim::start().await;
    let admin = srv.admin();
    admin
        .create_machine(&with_bmc(
            "vm2",
            BmcDriver::Ipmi,
            &sim.addr().to_string(),
            Some("not-the-password"),
        ))
        .await
        .unwrap();
    for i in 1..=3 {
        let e = admin.power("vm2", PowerAction::On).await.unwrap_err();
        assert_eq!(e.status(), Some(502), "{e}");
        let text = e.to_string();
        assert!(text.contains("refused user"), "{text}");
        assert_eq!(text.contains("now in maintenance"), i == 3, "try {i}: {text}");
    }
    let m = admin.get_machine("vm2").await.unwrap();
    assert!(m.maintenance);
    assert!(
        m.maintenance_reason
            .as_deref()
            .unwrap()
            .starts_with(AUTH_MAINTENANCE_PREFIX),
        "{m:?}"
    );
    // The fourth call is refused before anything reaches the BMC.
    let before = std::fs::read_to_string(sim.dir.path().join("ipmi_sim.log")).unwrap();
    let e = admin.power_status("vm2").await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("in maintenance"), "{e}");
    assert_eq!(
        std::fs::read_to_string(sim.dir.path().join("ipmi_sim.log")).unwrap(),
        before
    );
    assert!(sim.actions().is_empty(), "no power action happened");
    // The maintenance change itself is audited as made by kiln.
    let ev = admin
        .list_events(&EventFilter {
            target: Some("vm2".into()),
            action: Some("machine.update".into()),
            ..EventFilter::default()
        })
        .await
        .unwrap()
        .items;
    assert_eq!(ev[0].actor, "kiln (bmc)");
});

fn ipmi_timing(deadline_secs: u64) -> Settings {
    Settings {
        bmc: Some(BmcSettings {
            deadline_secs,
            ipmi_try_timeout_ms: 1000,
            ipmi_tries: 3,
            ..BmcSettings::default()
        }),
        ..Settings::default()
    }
}

api_test!(
    a_silent_or_closed_bmc_fails_within_the_deadline,
    settings = ipmi_timing(2),
    |srv| {
        // Bound and never answering: the deadline (2 s) cuts the 3 × 1 s tries.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let admin = srv.admin();
        admin
            .create_machine(&with_bmc(
                "quiet1",
                BmcDriver::Ipmi,
                &silent.local_addr().unwrap().to_string(),
                Some(CANARY),
            ))
            .await
            .unwrap();
        let start = Instant::now();
        let e = admin.power("quiet1", PowerAction::Cycle).await.unwrap_err();
        let took = start.elapsed();
        assert_eq!(e.status(), Some(504), "{e}");
        assert!(took < Duration::from_millis(2800), "{took:?}");
        assert!(took >= Duration::from_millis(1500), "{took:?}");
        // IPMI cannot name UEFI HTTP boot: 501 at once, nothing sent.
        let start = Instant::now();
        let e = admin
            .set_boot_device(
                "quiet1",
                &BootDeviceRequest {
                    device: BootDevice::UefiHttp,
                    once: true,
                    uefi: true,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(501), "{e}");
        assert!(e.to_string().contains("unsupported by the ipmi driver"), "{e}");
        assert!(start.elapsed() < Duration::from_millis(800), "{:?}", start.elapsed());
        // Nobody there at all: unreachable, at once.
        admin
            .create_machine(&with_bmc(
                "gone1",
                BmcDriver::Ipmi,
                &format!("127.0.0.1:{}", free_udp_port()),
                Some(CANARY),
            ))
            .await
            .unwrap();
        let start = Instant::now();
        let e = admin.power_status("gone1").await.unwrap_err();
        assert_eq!(e.status(), Some(502), "{e}");
        assert!(e.to_string().contains("unreachable"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
        // A failed check is a report, not an HTTP error.
        let c = admin.bmc_check("gone1").await.unwrap();
        assert!(!c.ok && !c.reachable, "{c:?}");
        // Not in maintenance: only authentication failures count.
        assert!(!admin.get_machine("gone1").await.unwrap().maintenance);
    }
);

// ---- the command driver ----

/// A PDU stand-in: `pdu DIR VERB [ARGS]`, DIR being the machine's BMC
/// address. It records each call and its own command line, the global and
/// per-machine number of runs at once (with `DIR/slow`), refuses the
/// credentials with `DIR/refuse` (exit 77) and hangs with `DIR/hang`.
const PDU: &str = r#"D=$1; verb=$2; shift 2
mkdir -p "$D/run" "$(dirname "$D")/run"
echo "$verb $*" >>"$D/calls"
tr '\0' ' ' </proc/$$/cmdline >>"$D/cmdlines"; echo >>"$D/cmdlines"
[ "$KILN_BMC_PASSWORD" = "$(cat "$(dirname "$D")/expected-password" 2>/dev/null)" ] && echo yes >>"$D/password-ok"
if [ -e "$D/refuse" ]; then echo "login refused" >&2; exit 77; fi
if [ -e "$D/hang" ]; then sleep 30 & echo $! >"$D/sleep.pid"; wait; fi
if [ -e "$D/slow" ]; then
  G=$(dirname "$D")/run
  touch "$G/$$" "$D/run/$$"
  ls "$G" | wc -l >>"$(dirname "$D")/global-seen"
  ls "$D/run" | wc -l >>"$D/seen"
  sleep 0.3
  rm -f "$G/$$" "$D/run/$$"
fi
case $verb in
  on) echo on >"$D/power" ;;
  off) echo off >"$D/power" ;;
  cycle) echo on >"$D/power" ;;
  status) cat "$D/power" 2>/dev/null || echo off ;;
  boot) echo "$*" >"$D/boot" ;;
esac
"#;

fn pdu_settings(max_concurrent: usize, deadline_secs: u64) -> Settings {
    let t = |verb: &str, extra: &[&str]| {
        let mut v: Vec<String> = ["/bin/sh", "-c", PDU, "kiln-pdu", "{bmc_address}", verb]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        Some(v)
    };
    Settings {
        bmc: Some(BmcSettings {
            deadline_secs,
            max_concurrent,
            command: Some(CommandTemplates {
                power_on: t("on", &["{hostname}"]),
                power_off: t("off", &[]),
                power_cycle: t("cycle", &[]),
                power_status: t("status", &[]),
                bootdev: t("boot", &["{device}", "{persistence}", "{firmware}"]),
                ..CommandTemplates::default()
            }),
            ..BmcSettings::default()
        }),
        ..Settings::default()
    }
}

async fn pdu_machine(srv: &TestServer, base: &Path, host: &str) -> PathBuf {
    let dir = base.join(host);
    std::fs::create_dir_all(&dir).unwrap();
    srv.admin()
        .create_machine(&with_bmc(
            host,
            BmcDriver::Command,
            &dir.display().to_string(),
            Some(CANARY),
        ))
        .await
        .unwrap();
    dir
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

api_test!(command_driver_power_and_boot, settings = pdu_settings(64, 10), |srv| {
    let base = tempfile::tempdir().unwrap();
    std::fs::write(base.path().join("expected-password"), CANARY).unwrap();
    let d = pdu_machine(&srv, base.path(), "pdu1").await;
    let admin = srv.admin();
    assert_eq!(admin.power_status("pdu1").await.unwrap().state, PowerState::Off);
    admin.power("pdu1", PowerAction::On).await.unwrap();
    assert_eq!(admin.power_status("pdu1").await.unwrap().state, PowerState::On);
    admin
        .set_boot_device(
            "pdu1",
            &BootDeviceRequest {
                device: BootDevice::Network,
                once: true,
                uefi: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(lines(&d.join("boot")), ["network once uefi"]);
    assert_eq!(lines(&d.join("calls"))[1], "on pdu1");
    // Every run got the password in its environment, and none in argv.
    assert_eq!(lines(&d.join("password-ok")).len(), 4);
    let cmdlines = std::fs::read_to_string(d.join("cmdlines")).unwrap();
    assert!(cmdlines.contains("kiln-pdu"), "{cmdlines}");
    assert!(!cmdlines.contains(CANARY));
    // A driver without a template for an action says so.
    let e = admin.power("pdu1", PowerAction::Reset).await.unwrap_err();
    assert_eq!(e.status(), Some(501), "{e}");
    assert!(e.to_string().contains("power_reset"), "{e}");
    let c = admin.bmc_check("pdu1").await.unwrap();
    assert!(c.ok && c.cipher_suite.is_none() && c.uuid.is_none(), "{c:?}");
    assert!(!database_text(&srv, CANARY).await.contains(CANARY));
});

api_test!(
    command_auth_failures_stop_at_three,
    settings = pdu_settings(64, 10),
    |srv| {
        let base = tempfile::tempdir().unwrap();
        let d = pdu_machine(&srv, base.path(), "pdu2").await;
        std::fs::write(d.join("refuse"), "").unwrap();
        let admin = srv.admin();
        for _ in 0..3 {
            let e = admin.power("pdu2", PowerAction::On).await.unwrap_err();
            assert_eq!(e.status(), Some(502), "{e}");
        }
        for _ in 0..2 {
            let e = admin.power("pdu2", PowerAction::On).await.unwrap_err();
            assert_eq!(e.status(), Some(409), "{e}");
        }
        assert_eq!(lines(&d.join("calls")).len(), 3, "the 4th and 5th calls never ran");
        let events = bmc_events(&srv, "pdu2").await;
        assert_eq!(events.len(), 3, "refused calls reach no BMC and are not BMC actions");
        assert_eq!(events[0].after.as_ref().unwrap()["maintenance"], true);
        assert_eq!(events[0].after.as_ref().unwrap()["error_kind"], "AuthFailed");
        // Fixed and cleared by an operator: a fresh start.
        std::fs::remove_file(d.join("refuse")).unwrap();
        admin
            .update_machine(
                "pdu2",
                &MachinePatch {
                    maintenance: Some(false),
                    maintenance_reason: Some(None),
                    ..MachinePatch::default()
                },
            )
            .await
            .unwrap();
        admin.power("pdu2", PowerAction::On).await.unwrap();
        assert_eq!(lines(&d.join("calls")).len(), 4);
    }
);

api_test!(
    one_call_per_bmc_and_a_global_bound,
    settings = pdu_settings(2, 20),
    |srv| {
        let base = tempfile::tempdir().unwrap();
        let mut dirs = vec![];
        for i in 0..4 {
            let d = pdu_machine(&srv, base.path(), &format!("pdu{i}")).await;
            std::fs::write(d.join("slow"), "").unwrap();
            dirs.push(d);
        }
        let admin = srv.admin();
        // Three calls on one machine at once, and one on each of three others.
        let mut calls = vec![];
        for host in ["pdu0", "pdu0", "pdu0", "pdu1", "pdu2", "pdu3"] {
            let c = admin.clone();
            calls.push(tokio::spawn(async move { c.power(host, PowerAction::On).await }));
        }
        let start = Instant::now();
        for c in calls {
            c.await.unwrap().unwrap();
        }
        // Six runs of 0.3 s, two at a time: at least 0.9 s.
        assert!(start.elapsed() >= Duration::from_millis(850), "{:?}", start.elapsed());
        let per_bmc: Vec<String> = lines(&dirs[0].join("seen"));
        assert_eq!(per_bmc, ["1", "1", "1"], "one call at a time on pdu0");
        let global: Vec<usize> = lines(&base.path().join("global-seen"))
            .iter()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        assert_eq!(global.len(), 6);
        assert!(global.iter().all(|n| *n <= 2), "global bound of 2: {global:?}");
        assert_eq!(srv.state.bmc.machines_in_flight(), 0);
    }
);

api_test!(
    a_hanging_command_is_killed_at_the_deadline,
    settings = pdu_settings(8, 2),
    |srv| {
        let base = tempfile::tempdir().unwrap();
        let d = pdu_machine(&srv, base.path(), "pdu5").await;
        std::fs::write(d.join("hang"), "").unwrap();
        let start = Instant::now();
        let e = srv.admin().power("pdu5", PowerAction::Cycle).await.unwrap_err();
        assert_eq!(e.status(), Some(504), "{e}");
        assert!(
            e.to_string().contains("may or may not"),
            "a cycle cut short is not repeated: {e}"
        );
        assert!(start.elapsed() < Duration::from_millis(2800), "{:?}", start.elapsed());
        // Its `sleep 30` went with it (a zombie runs nothing).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pid = std::fs::read_to_string(d.join("sleep.pid")).unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')),
            "the program's child survived: {stat}"
        );
        let calls = lines(&d.join("calls"));
        assert_eq!(calls, ["cycle "]);
    }
);

api_test!(
    power_sync_records_drift_and_never_acts,
    settings = pdu_settings(8, 10),
    |srv| {
        let base = tempfile::tempdir().unwrap();
        let a = pdu_machine(&srv, base.path(), "sync1").await;
        let b = pdu_machine(&srv, base.path(), "sync2").await;
        srv.admin().power("sync1", PowerAction::On).await.unwrap();
        let r = srv.state.bmc.sync_once().await.unwrap();
        assert_eq!((r.read, r.drifted, r.failed), (2, 0, 0), "{r:?}");
        // Someone switches sync1 off and sync2 on behind kiln's back.
        std::fs::write(a.join("power"), "off\n").unwrap();
        std::fs::write(b.join("power"), "on\n").unwrap();
        let r = srv.state.bmc.sync_once().await.unwrap();
        assert_eq!((r.read, r.drifted), (2, 2), "{r:?}");
        let drift = bmc_events(&srv, "sync1").await;
        assert_eq!(drift[0].action, "bmc.power.drift");
        assert_eq!(drift[0].actor, "kiln (power sync)");
        let after = drift[0].after.as_ref().unwrap();
        assert_eq!(
            (after["expected"].as_str(), after["observed"].as_str()),
            (Some("on"), Some("off"))
        );
        // Only status reads were run by the sync: it acts on nothing.
        let calls = lines(&a.join("calls"));
        assert_eq!(calls, ["on sync1", "status ", "status "]);
        // Machines in maintenance are skipped.
        srv.admin()
            .update_machine(
                "sync2",
                &MachinePatch {
                    maintenance: Some(true),
                    ..MachinePatch::default()
                },
            )
            .await
            .unwrap();
        let r = srv.state.bmc.sync_once().await.unwrap();
        assert_eq!((r.read, r.skipped, r.drifted), (1, 1, 0), "{r:?}");
    }
);

api_test!(
    tenants_power_their_own_machines_only,
    settings = pdu_settings(8, 10),
    |srv| {
        let base = tempfile::tempdir().unwrap();
        let admin = srv.admin();
        for t in ["acme", "globex"] {
            admin
                .create_tenant(&TenantCreate {
                    name: t.into(),
                    description: None,
                })
                .await
                .unwrap();
        }
        let token = admin
            .create_token(&TokenCreate {
                role: Role::Tenant,
                tenant: Some("acme".into()),
                name: None,
                expires_at: None,
            })
            .await
            .unwrap()
            .token;
        pdu_machine(&srv, base.path(), "acme1").await;
        pdu_machine(&srv, base.path(), "globex1").await;
        for (host, owner) in [("acme1", "acme"), ("globex1", "globex")] {
            admin
                .update_machine(
                    host,
                    &MachinePatch {
                        owner: Some(Some(owner.into())),
                        ..MachinePatch::default()
                    },
                )
                .await
                .unwrap();
        }
        let acme = srv.client(Some(&token));
        acme.power("acme1", PowerAction::On).await.unwrap();
        assert_eq!(acme.power_status("acme1").await.unwrap().state, PowerState::On);
        let e = acme.power("globex1", PowerAction::Off).await.unwrap_err();
        assert_eq!(e.status(), Some(404), "{e}");
        // The next boot only: a persistent boot device is an operator's.
        let once = |once| BootDeviceRequest {
            device: BootDevice::Network,
            once,
            uefi: false,
        };
        acme.set_boot_device("acme1", &once(true)).await.unwrap();
        let e = acme.set_boot_device("acme1", &once(false)).await.unwrap_err();
        assert_eq!(e.status(), Some(403), "{e}");
        assert!(e.to_string().contains("`once`"), "{e}");
        let e = acme.set_boot_device("globex1", &once(true)).await.unwrap_err();
        assert_eq!(e.status(), Some(404), "{e}");
        assert_eq!(acme.bmc_check("acme1").await.unwrap_err().status(), Some(403));
        assert_eq!(acme.bmc_check("globex1").await.unwrap_err().status(), Some(404));
        let ev = bmc_events(&srv, "acme1").await;
        assert!(ev[0].actor.ends_with("(tenant)"), "{}", ev[0].actor);
    }
);

api_test!(redfish_bmcs_are_driven_through_the_api, |srv| {
    // kiln's simulated Redfish BMC (plain HTTP here; the driver's own tests
    // cover TLS, faults and sushy-tools).
    let sim = kiln_sim::start(kiln_sim::SimConfig {
        bmcs: 1,
        username: USER.into(),
        password: "rf-secret".into(),
        ..kiln_sim::SimConfig::default()
    })
    .await
    .unwrap();
    let admin = srv.admin();
    admin
        .create_machine(&with_bmc(
            "rf1",
            BmcDriver::Redfish,
            sim.bmc(0).url(),
            Some("rf-secret"),
        ))
        .await
        .unwrap();
    admin.power("rf1", PowerAction::Off).await.unwrap();
    assert_eq!(sim.bmc(0).power(0), kiln_sim::Power::Off);
    assert_eq!(admin.power_status("rf1").await.unwrap().state, PowerState::Off);
    admin.power("rf1", PowerAction::On).await.unwrap();
    assert_eq!(sim.bmc(0).power(0), kiln_sim::Power::On);
    assert_eq!(admin.power_status("rf1").await.unwrap().state, PowerState::On);
    let ev = bmc_events(&srv, "rf1").await;
    assert!(ev.iter().any(|e| e.action == "bmc.power"), "{ev:?}");

    // UEFI HTTP boot: Redfish's `UefiHttp`. Asked for without UEFI, it is
    // refused before any BMC call.
    let http = |uefi| BootDeviceRequest {
        device: BootDevice::UefiHttp,
        once: true,
        uefi,
    };
    let before = sim.bmc(0).stats().requests;
    let e = admin.set_boot_device("rf1", &http(false)).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("UEFI mode only"), "{e}");
    assert_eq!(sim.bmc(0).stats().requests, before);
    admin.set_boot_device("rf1", &http(true)).await.unwrap();
    let target = sim
        .bmc(0)
        .with(|b| (b.systems[0].override_target.clone(), b.systems[0].override_mode.clone()));
    assert_eq!(target, ("UefiHttp".to_string(), "UEFI".to_string()));
});

/// An API error's message and every row detail, for matching.
fn error_text(e: &kiln_client::ClientError) -> String {
    match e {
        kiln_client::ClientError::Api { error, .. } => std::iter::once(error.message.clone())
            .chain(error.details.iter().map(|d| format!("{:?}: {}", d.field, d.message)))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// A redfish machine on sim BMC `i` with these TLS settings.
fn redfish_on(sim: &kiln_sim::Sim, host: &str, i: usize, insecure: bool, ca: Option<&str>) -> MachineCreate {
    let mut m = with_bmc(host, BmcDriver::Redfish, sim.bmc(i).url(), Some(RF_CANARY));
    let b = m.bmc.as_mut().unwrap();
    b.insecure = insecure;
    b.ca_cert = ca.map(str::to_string);
    m
}

/// A canary Redfish password (the IPMI one is bound to ipmi_sim's users).
const RF_CANARY: &str = "canary-Rf3-redfish-pw";

async fn redfish_sim(bmcs: usize, tls: bool, spec: kiln_sim::BmcSpec) -> kiln_sim::Sim {
    kiln_sim::start(kiln_sim::SimConfig {
        bmcs,
        tls,
        username: USER.into(),
        password: RF_CANARY.into(),
        spec,
        ..kiln_sim::SimConfig::default()
    })
    .await
    .unwrap()
}

api_test!(redfish_tls_settings_come_from_the_inventory, |srv| {
    let sim = redfish_sim(2, true, kiln_sim::BmcSpec::default()).await;
    let ca = sim.ca_pem().unwrap().to_string();
    let admin = srv.admin();

    // The BMC's CA stored on the machine: verified, and it works.
    admin
        .create_machine(&redfish_on(&sim, "tls1", 0, false, Some(&ca)))
        .await
        .unwrap();
    assert_eq!(admin.power_status("tls1").await.unwrap().state, PowerState::Off);
    assert_eq!(
        admin.get_machine("tls1").await.unwrap().bmc.unwrap().ca_cert,
        Some(ca.clone())
    );

    // Without it: refused, naming the certificate; nothing got through.
    admin
        .create_machine(&redfish_on(&sim, "tls2", 1, false, None))
        .await
        .unwrap();
    let e = admin.power("tls2", PowerAction::On).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    let text = e.to_string();
    assert!(text.contains("TLS certificate is not trusted"), "{text}");
    assert!(
        text.contains("certificate subject CN=kiln-sim BMC, issued by CN=kiln-sim test CA, SHA-256 "),
        "{text}"
    );
    assert!(text.contains("mark this BMC insecure"), "says what to do: {text}");
    assert_eq!(sim.bmc(1).stats().requests, 0);

    // Marked insecure: it works, and the audit log shows the flag turned
    // on, and every action taken under it.
    let insecure = MachinePatch {
        bmc: Some(Some(BmcInput {
            username: Some(USER.into()),
            insecure: true,
            ..BmcInput::new(BmcDriver::Redfish, sim.bmc(1).url())
        })),
        ..MachinePatch::default()
    };
    let m = admin.update_machine("tls2", &insecure).await.unwrap();
    let bmc = m.bmc.unwrap();
    assert!(bmc.insecure && bmc.password_set, "the password was kept: {bmc:?}");
    admin.power("tls2", PowerAction::On).await.unwrap();
    assert_eq!(sim.bmc(1).power(0), kiln_sim::Power::On);
    let update = admin
        .list_events(&EventFilter {
            target: Some("tls2".into()),
            action: Some("machine.update".into()),
            ..EventFilter::default()
        })
        .await
        .unwrap()
        .items;
    assert_eq!(update[0].before.as_ref().unwrap()["bmc"]["insecure"], false);
    assert_eq!(update[0].after.as_ref().unwrap()["bmc"]["insecure"], true);
    assert_eq!(update[0].actor, "test-admin (admin)");
    let calls = bmc_events(&srv, "tls2").await;
    let after = |e: &kiln_types::event::Event| e.after.clone().unwrap();
    assert_eq!(
        calls
            .iter()
            .map(|e| after(e)["tls_insecure"].clone())
            .collect::<Vec<_>>(),
        [serde_json::Value::Bool(true), serde_json::Value::Null],
        "the call made with checks on (refused) is not marked, the one without is: {calls:?}"
    );
    assert!(bmc_events(&srv, "tls1").await.is_empty(), "reads are not audited");

    // At the edge: a certificate that does not parse, a key, the flag on a
    // driver without TLS; on create and on update, nothing stored.
    let junk = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n";
    let e = admin
        .create_machine(&redfish_on(&sim, "tls3", 0, false, Some(junk)))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(
        error_text(&e)
            .contains("bmc.ca_cert: certificate 1 of the CA certificate text is not a usable X.509 certificate"),
        "{}",
        error_text(&e)
    );
    let key = format!("{ca}-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleQ==\n-----END PRIVATE KEY-----\n");
    let e = admin
        .create_machine(&redfish_on(&sim, "tls3", 0, false, Some(&key)))
        .await
        .unwrap_err();
    assert!(error_text(&e).contains("holds a private key"), "{}", error_text(&e));
    assert!(!error_text(&e).contains("c2VjcmV0"), "the key was quoted");
    let mut ipmi = with_bmc("tls3", BmcDriver::Ipmi, "10.0.0.9", None);
    ipmi.bmc.as_mut().unwrap().insecure = true;
    let e = admin.create_machine(&ipmi).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(
        error_text(&e).contains("bmc.insecure applies to the redfish driver only"),
        "{}",
        error_text(&e)
    );
    assert_eq!(admin.get_machine("tls3").await.unwrap_err().status(), Some(404));
    let bad_patch = MachinePatch {
        bmc: Some(Some(BmcInput {
            ca_cert: Some(junk.into()),
            ..BmcInput::new(BmcDriver::Redfish, sim.bmc(1).url())
        })),
        ..MachinePatch::default()
    };
    let e = admin.update_machine("tls2", &bad_patch).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(
        admin.get_machine("tls2").await.unwrap().bmc.unwrap().insecure,
        "unchanged"
    );
});

// ---- kiln-sim's Redfish BMCs: the failure modes through the service ----

fn sim_timing(deadline_secs: u64, max_concurrent: usize) -> Settings {
    Settings {
        bmc: Some(BmcSettings {
            deadline_secs,
            max_concurrent,
            ..BmcSettings::default()
        }),
        ..Settings::default()
    }
}

api_test!(
    a_hanging_redfish_bmc_fails_at_the_deadline_and_frees_its_slots,
    settings = sim_timing(2, 1),
    |srv| {
        let sim = redfish_sim(2, false, kiln_sim::BmcSpec::default()).await;
        let admin = srv.admin();
        for (host, i) in [("hang1", 0), ("ok1", 1)] {
            admin
                .create_machine(&redfish_on(&sim, host, i, false, None))
                .await
                .unwrap();
        }
        sim.bmc(0).set_faults(kiln_sim::Faults {
            hang: true,
            ..kiln_sim::Faults::default()
        });
        // The one global slot (max_concurrent 1) is held by the hanging
        // call; a call to another BMC asked a second later waits for it
        // and gets it when the deadline releases it.
        let start = Instant::now();
        let hung = tokio::spawn({
            let a = admin.clone();
            async move { a.power_status("hang1").await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let other = admin.power_status("ok1").await.unwrap();
        assert_eq!(other.state, PowerState::Off);
        let released = start.elapsed();
        let e = hung.await.unwrap().unwrap_err();
        assert_eq!(e.status(), Some(504), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("did not answer") && text.contains(sim.bmc(0).url()),
            "{text}"
        );
        assert!(
            released >= Duration::from_millis(1800) && released < Duration::from_millis(3500),
            "the other call got the slot at the hanging call's deadline: {released:?}"
        );
        assert_eq!(srv.state.bmc.machines_in_flight(), 0, "no per-BMC lock left");
        // A cycle whose action hangs: sent once, outcome unknown, not resent.
        sim.bmc(0).set_faults(kiln_sim::Faults {
            hang: true,
            only_path: Some("ComputerSystem.Reset".into()),
            ..kiln_sim::Faults::default()
        });
        let hung_before = sim.bmc(0).stats().hung;
        let t = Instant::now();
        let e = admin.power("hang1", PowerAction::Cycle).await.unwrap_err();
        assert_eq!(e.status(), Some(504), "{e}");
        assert!(e.to_string().contains("may or may not"), "{e}");
        assert!(t.elapsed() < Duration::from_millis(3000), "{:?}", t.elapsed());
        assert_eq!(sim.bmc(0).stats().hung - hung_before, 1, "the cycle was sent once");
        // The BMC answers again: the next call is not held up by anything.
        sim.bmc(0).set_faults(kiln_sim::Faults::default());
        let t = Instant::now();
        admin.power_status("hang1").await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(1000), "{:?}", t.elapsed());
        let ev = bmc_events(&srv, "hang1").await;
        assert_eq!(ev[0].after.as_ref().unwrap()["error_kind"], "OutcomeUnknown");
        assert!(
            !admin.get_machine("hang1").await.unwrap().maintenance,
            "timeouts never count"
        );
    }
);

api_test!(redfish_5xx_bursts_retry_reads_but_not_a_cycle, |srv| {
    let sim = redfish_sim(
        1,
        false,
        kiln_sim::BmcSpec {
            powered_on: true,
            ..kiln_sim::BmcSpec::default()
        },
    )
    .await;
    let admin = srv.admin();
    admin
        .create_machine(&redfish_on(&sim, "burst1", 0, false, None))
        .await
        .unwrap();
    let bmc = sim.bmc(0);
    let burst = |n: u32, only: Option<&str>| kiln_sim::Faults {
        error_burst: n,
        only_path: only.map(str::to_string),
        ..kiln_sim::Faults::default()
    };
    // A read through two 503s: retried, and it works.
    bmc.set_faults(burst(2, None));
    assert_eq!(admin.power_status("burst1").await.unwrap().state, PowerState::On);
    assert_eq!(bmc.stats().injected_errors, 2);
    // A 503 to the cycle: not sent again (it could reboot twice).
    bmc.set_faults(burst(1, Some("ComputerSystem.Reset")));
    let e = admin.power("burst1", PowerAction::Cycle).await.unwrap_err();
    assert_eq!(e.status(), Some(502), "{e}");
    assert!(e.to_string().contains("503"), "{e}");
    let s = bmc.stats();
    assert_eq!(s.injected_errors, 3, "one POST of the cycle");
    assert!(s.resets.is_empty(), "and no second one: {:?}", s.resets);
    // Power off sets a state: after a 503 the state shows it did not happen,
    // so it is sent again, and it works.
    bmc.set_faults(burst(1, Some("ComputerSystem.Reset")));
    admin.power("burst1", PowerAction::Off).await.unwrap();
    assert_eq!(bmc.stats().resets, ["ForceOff"]);
    assert_eq!(bmc.power(0), kiln_sim::Power::Off);
    // A burst longer than the tries: a clear error after exactly 3.
    bmc.set_faults(burst(10, None));
    let before = bmc.stats().injected_errors;
    let e = admin.power_status("burst1").await.unwrap_err();
    assert_eq!(e.status(), Some(502), "{e}");
    assert!(e.to_string().contains("HTTP 503"), "{e}");
    assert_eq!(bmc.stats().injected_errors - before, 3);
    let ev = bmc_events(&srv, "burst1").await;
    let kinds: Vec<&str> = ev
        .iter()
        .map(|e| e.after.as_ref().unwrap()["result"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ok", "failed"], "off, then the cycle (reads are not audited)");
    assert!(
        !admin.get_machine("burst1").await.unwrap().maintenance,
        "5xx never counts"
    );
});

api_test!(redfish_401_three_times_means_maintenance, |srv| {
    let sim = redfish_sim(1, false, kiln_sim::BmcSpec::default()).await;
    let admin = srv.admin();
    let mut m = redfish_on(&sim, "auth1", 0, false, None);
    m.bmc.as_mut().unwrap().password = Some(Secret::new("wrong-canary-Qp4"));
    admin.create_machine(&m).await.unwrap();
    for i in 1..=3 {
        let e = admin.power("auth1", PowerAction::On).await.unwrap_err();
        assert_eq!(e.status(), Some(502), "{e}");
        let text = e.to_string();
        assert!(text.contains(&format!("refused user \"{USER}\"")), "{text}");
        assert_eq!(text.contains("now in maintenance"), i == 3, "try {i}: {text}");
        assert!(!text.contains("wrong-canary"), "{text}");
    }
    let s = sim.bmc(0).stats();
    assert_eq!(s.unauthorized, 3, "one failed login per call, never retried");
    assert!(s.resets.is_empty());
    let m = admin.get_machine("auth1").await.unwrap();
    let reason = m.maintenance_reason.unwrap_or_default();
    assert!(m.maintenance && reason.starts_with(AUTH_MAINTENANCE_PREFIX), "{reason}");
    assert!(
        reason.contains("3 times in a row") && !reason.contains("wrong-canary"),
        "{reason}"
    );
    // From now on nothing reaches the BMC.
    let requests = sim.bmc(0).stats().requests;
    for _ in 0..2 {
        let e = admin.power_status("auth1").await.unwrap_err();
        assert_eq!(e.status(), Some(409), "{e}");
    }
    assert_eq!(sim.bmc(0).stats().requests, requests);
    assert!(!database_text(&srv, "wrong-canary-Qp4").await.contains("wrong-canary"));
});

/// The whole process's log, captured while a test asks for it: a global
/// subscriber (so the server's tasks on every thread are seen) at TRACE,
/// whose filter lets events through only while some test is capturing.
mod log_capture {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, OnceLock};

    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::{Layer as _, filter};

    static ON: AtomicUsize = AtomicUsize::new(0);
    static TEXT: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    static INSTALLED: OnceLock<()> = OnceLock::new();

    struct Sink;

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            TEXT.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Captures until the guard is dropped.
    pub struct Capture;

    pub fn start() -> Capture {
        INSTALLED.get_or_init(|| {
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(|| Sink)
                .with_filter(filter::filter_fn(|_| ON.load(Ordering::Relaxed) > 0));
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("no other global subscriber in this test binary");
        });
        ON.fetch_add(1, Ordering::Relaxed);
        Capture
    }

    impl Drop for Capture {
        fn drop(&mut self) {
            ON.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn text() -> String {
        String::from_utf8_lossy(&TEXT.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// Every `/proc/PID/cmdline` on the machine.
fn all_cmdlines() -> String {
    let mut out = String::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(raw) = std::fs::read(e.path().join("cmdline")) {
            out.push_str(&String::from_utf8_lossy(&raw).replace('\0', " "));
            out.push('\n');
        }
    }
    out
}

api_test!(a_redfish_canary_password_shows_nowhere, |srv| {
    let capture = log_capture::start();
    // Verified TLS with the CA stored; one BMC with sessions (the password
    // goes in a POST body), one with basic auth only (in a header); both
    // slow enough to watch every process's arguments during a call.
    let sim = redfish_sim(
        2,
        true,
        kiln_sim::BmcSpec {
            latency: Duration::from_millis(100),
            ..kiln_sim::BmcSpec::default()
        },
    )
    .await;
    sim.bmc(1).with(|b| b.spec.sessions = false);
    let ca = sim.ca_pem().unwrap().to_string();
    let admin = srv.admin();
    let mut shown: Vec<String> = vec![];
    for (host, i) in [("canary1", 0), ("canary2", 1)] {
        let m = admin
            .create_machine(&redfish_on(&sim, host, i, false, Some(&ca)))
            .await
            .unwrap();
        shown.push(format!("{m:?}"));
        let call = tokio::spawn({
            let a = admin.clone();
            let host = host.to_string();
            async move { a.power(&host, PowerAction::On).await }
        });
        let mut argv = String::new();
        while !call.is_finished() {
            argv.push_str(&all_cmdlines());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shown.push(format!("{:?}", call.await.unwrap().unwrap()));
        assert!(
            !argv.is_empty() && !argv.contains(RF_CANARY),
            "a process has the password in its arguments"
        );
        shown.push(format!("{:?}", admin.power_status(host).await.unwrap()));
        let boot = BootDeviceRequest {
            device: BootDevice::Network,
            once: true,
            uefi: true,
        };
        shown.push(format!("{:?}", admin.set_boot_device(host, &boot).await.unwrap()));
        shown.push(format!("{:?}", admin.bmc_check(host).await.unwrap()));
        // An error too: its text comes from the driver.
        sim.bmc(i).set_faults(kiln_sim::Faults {
            error_burst: 10,
            ..kiln_sim::Faults::default()
        });
        shown.push(admin.power(host, PowerAction::Off).await.unwrap_err().to_string());
        sim.bmc(i).set_faults(kiln_sim::Faults::default());
    }
    assert!(sim.bmc(0).stats().sessions_created > 0 && sim.bmc(1).stats().sessions_created == 0);
    shown.push(format!("{:?}", admin.list_machines(&Default::default()).await.unwrap()));
    shown.push(format!(
        "{:?}",
        admin.list_events(&EventFilter::default()).await.unwrap()
    ));
    drop(capture);

    let basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{RF_CANARY}"))
    };
    for text in &shown {
        assert!(
            !text.contains(RF_CANARY) && !text.contains(&basic),
            "in an answer: {text}"
        );
    }
    let db = database_text(&srv, RF_CANARY).await;
    assert!(db.contains("bmc.power") && !db.contains(RF_CANARY) && !db.contains(&basic));
    let log = log_capture::text();
    assert!(
        log.contains("BMC call") && log.contains("redfish"),
        "the log was captured: {log}"
    );
    assert!(!log.contains(RF_CANARY), "the password reached the log");
    assert!(!log.contains(&basic), "the basic-auth header reached the log");
});

api_test!(machines_without_a_bmc_or_a_driver, |srv| {
    let admin = srv.admin();
    admin
        .create_machine(&MachineCreate::new("bare1".parse().unwrap()))
        .await
        .unwrap();
    let e = admin.power("bare1", PowerAction::On).await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(e.to_string().contains("has no BMC"), "{e}");
    // No [bmc.command] in this server's config.
    admin
        .create_machine(&with_bmc("cmd1", BmcDriver::Command, "outlet-7", None))
        .await
        .unwrap();
    let e = admin.power_status("cmd1").await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(e.to_string().contains("[bmc.command]"), "{e}");
});
