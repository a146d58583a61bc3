//! The command driver with real programs: small shell scripts that keep a
//! power state in a file and record what they were given (argv, their own
//! `/proc/self/cmdline`, environment), and misbehaving ones (hang with a
//! child, fail, refuse credentials, flood stderr).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_bmc::command::{CommandDriver, CommandTemplates};
use kiln_bmc::{BmcDriver, BmcErrorKind, BootDevice, BootFirmware, BootPersistence, Password, PowerAction, PowerState};
use kiln_types::machine::{Bmc, BmcDriver as DriverKind, Machine, MachineKind, MachineState};

const CANARY: &str = "canary-cmd-Xq81-password";

/// Writes an executable script `name` in `dir`.
fn script(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.display().to_string()
}

fn machine() -> Machine {
    let mut m = Machine::sketch("db1001", MachineKind::Physical, MachineState::Ready);
    m.bmc = Some(Bmc {
        driver: DriverKind::Command,
        address: "pdu3 outlet 7; touch /tmp/pwned".into(),
        username: Some("ops".into()),
        password_set: true,
        insecure: false,
        ca_cert: None,
    });
    m
}

fn argv(items: &[&str]) -> Option<Vec<String>> {
    Some(items.iter().map(|s| s.to_string()).collect())
}

/// A PDU-like tool: `pdu.sh STATE_DIR VERB [ARGS…]`, recording each call.
fn pdu(dir: &Path) -> (String, PathBuf) {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let s = script(
        dir,
        "pdu.sh",
        r#"D=$1; verb=$2; shift 2
printf '%s\n' "$verb" "$@" >"$D/argv.$verb"
tr '\0' '\n' </proc/$$/cmdline >"$D/cmdline.$verb"
printf '%s' "$KILN_BMC_PASSWORD" >"$D/password.$verb"
env | grep '^KILN_' | grep -v PASSWORD | sort >"$D/env.$verb"
case $verb in
  on) echo on >"$D/power" ;;
  off) echo off >"$D/power" ;;
  cycle) echo off >"$D/power"; echo on >"$D/power" ;;
  status) echo "reading outlet..."; cat "$D/power" 2>/dev/null || echo off ;;
  boot) echo "$1 $2 $3" >"$D/boot" ;;
esac
"#,
    );
    (s, state)
}

#[tokio::test]
async fn power_and_boot_through_a_script_with_values_as_whole_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let (pdu, state) = pdu(dir.path());
    let st = state.display().to_string();
    let t = CommandTemplates {
        power_on: argv(&[&pdu, &st, "on", "{bmc_address}", "--host={hostname}"]),
        power_off: argv(&[&pdu, &st, "off", "{bmc_address}"]),
        power_cycle: argv(&[&pdu, &st, "cycle"]),
        power_status: argv(&[&pdu, &st, "status"]),
        bootdev: argv(&[&pdu, &st, "boot", "{device}", "{persistence}", "{firmware}"]),
        ..CommandTemplates::default()
    };
    t.validate().unwrap();
    let d = CommandDriver::new(Arc::new(t), &machine(), Some(Password::new(CANARY)));

    assert_eq!(d.power_status().await.unwrap(), PowerState::Off);
    d.power(PowerAction::On).await.unwrap();
    assert_eq!(d.power_status().await.unwrap(), PowerState::On);
    // The address with `;` and spaces arrived as one argument, untouched.
    let args = std::fs::read_to_string(state.join("argv.on")).unwrap();
    assert_eq!(args, "on\npdu3 outlet 7; touch /tmp/pwned\n--host=db1001\n");
    let env = std::fs::read_to_string(state.join("env.on")).unwrap();
    assert!(env.contains("KILN_HOSTNAME=db1001"), "{env}");
    assert!(
        env.contains("KILN_BMC_ADDRESS=pdu3 outlet 7; touch /tmp/pwned"),
        "{env}"
    );
    assert!(env.contains("KILN_BMC_USERNAME=ops"), "{env}");
    assert!(env.contains("KILN_ACTION=on"), "{env}");
    // The password: in the environment, never in the process's arguments.
    assert_eq!(std::fs::read_to_string(state.join("password.on")).unwrap(), CANARY);
    for verb in ["on", "status"] {
        let cmdline = std::fs::read_to_string(state.join(format!("cmdline.{verb}"))).unwrap();
        assert!(cmdline.contains("pdu.sh"), "{cmdline}");
        assert!(!cmdline.contains(CANARY), "{cmdline}");
    }

    d.power(PowerAction::Off).await.unwrap();
    assert_eq!(d.power_status().await.unwrap(), PowerState::Off);
    d.power(PowerAction::Cycle).await.unwrap();
    assert_eq!(d.power_status().await.unwrap(), PowerState::On);

    d.set_boot_device(BootDevice::Network, BootPersistence::Once, BootFirmware::Uefi)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(state.join("boot")).unwrap(),
        "network once uefi\n"
    );
    // UEFI HTTP boot is passed through as a value; the program decides.
    d.set_boot_device(BootDevice::UefiHttp, BootPersistence::Persistent, BootFirmware::Uefi)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(state.join("boot")).unwrap(),
        "uefi_http persistent uefi\n"
    );

    // Not configured: unsupported, naming the key.
    let e = d.power(PowerAction::Reset).await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::Unsupported);
    assert!(e.to_string().contains("power_reset"), "{e}");
    assert_eq!(d.identity().await.unwrap_err().kind(), BmcErrorKind::Unsupported);
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for this purpose: it runs nothing.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

#[tokio::test]
async fn a_hanging_program_and_its_children_are_killed_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let hang = script(
        dir.path(),
        "hang.sh",
        &format!(
            "sleep 60 &\necho $! >>{p}\necho $$ >>{p}\nsleep 60\n",
            p = pids.display()
        ),
    );
    let t = CommandTemplates {
        power_status: argv(&[&hang]),
        power_cycle: argv(&[&hang]),
        timeout_secs: 1,
        ..CommandTemplates::default()
    };
    let d = CommandDriver::new(Arc::new(t), &machine(), None);
    let start = Instant::now();
    let e = d.power_status().await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(e.kind(), BmcErrorKind::Timeout, "{e}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // A cycle that timed out may have happened: outcome unknown, not retried.
    let e = d.power(PowerAction::Cycle).await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::OutcomeUnknown, "{e}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pids: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 4, "two runs, a script and its child each");
    for pid in pids {
        assert!(!alive(pid), "process {pid} survived the timeout");
    }
}

#[tokio::test]
async fn exit_codes_and_bounded_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let refuse = script(dir.path(), "refuse.sh", "echo 'login refused' >&2\nexit 77\n");
    let down = script(dir.path(), "down.sh", "echo 'no route' >&2\nexit 69\n");
    let fail = script(
        dir.path(),
        "fail.sh",
        "i=0; while [ $i -lt 5000 ]; do echo \"error line $i\" >&2; i=$((i+1)); done\nexit 3\n",
    );
    let garbage = script(dir.path(), "garbage.sh", "echo 'power is probably fine'\n");
    let t = CommandTemplates {
        power_on: argv(&[&refuse]),
        power_off: argv(&[&down]),
        power_cycle: argv(&[&fail]),
        power_status: argv(&[&garbage]),
        power_reset: argv(&["/nonexistent/kiln-tool"]),
        ..CommandTemplates::default()
    };
    let d = CommandDriver::new(Arc::new(t), &machine(), None);
    let e = d.power(PowerAction::On).await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::AuthFailed, "{e}");
    assert!(e.to_string().contains("login refused"), "{e}");
    let e = d.power(PowerAction::Off).await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::Unreachable, "{e}");
    let e = d.power(PowerAction::Cycle).await.unwrap_err().to_string();
    assert!(e.contains("exited with code 3") && e.contains("error line 0"), "{e}");
    assert!(e.len() < 3 * 1024, "stderr is bounded: {} bytes", e.len());
    let e = d.power_status().await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::Protocol);
    assert!(e.to_string().contains("power is probably fine"), "{e}");
    let e = d.power(PowerAction::Reset).await.unwrap_err();
    assert_eq!(e.kind(), BmcErrorKind::Config);
    assert!(e.to_string().contains("/nonexistent/kiln-tool"), "{e}");
}
