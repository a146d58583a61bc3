//! The Redfish driver's decisions as pure functions over plain data: where
//! the service and the system are (from the machine's BMC address), which
//! system of a collection is the machine, which `ResetType`s carry out a
//! power action on this BMC, the boot override body, and what a
//! `PowerState` string means. `mod.rs` does the HTTP around them.

use serde_json::{Value, json};

use crate::{BootDevice, BootFirmware, BootPersistence, PowerAction, PowerState};

/// Where a machine's Redfish service is, parsed from its BMC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://host[:port]`, which every `@odata.id` path is joined to.
    pub origin: String,
    /// The service root's path: `/redfish/v1`, after any path prefix the
    /// address had (`https://proxy/bmc7` → `/bmc7/redfish/v1`).
    pub root: String,
    /// The system's path when the address names it
    /// (`…/redfish/v1/Systems/ID`); otherwise it is looked up.
    pub system: Option<String>,
}

/// The address for errors and logs: a user or password someone put in it
/// replaced by `***` (such an address is refused, but the refusal must
/// not repeat the password).
pub fn display_name(address: &str) -> String {
    let start = address.find("://").map_or(0, |i| i + 3);
    let end = address[start..].find('/').map_or(address.len(), |j| start + j);
    match address[start..end].rfind('@') {
        Some(at) => format!("{}***@{}", &address[..start], &address[start + at + 1..]),
        None => address.to_string(),
    }
}

/// Parses `http(s)://host[:port][/prefix]` or `…/redfish/v1/Systems/ID`.
pub fn parse_address(address: &str) -> Result<Endpoint, String> {
    let url = reqwest::Url::parse(address.trim()).map_err(|e| {
        format!("{address:?} is not a Redfish URL ({e}); write it as https://HOST[:PORT] or https://HOST/redfish/v1/Systems/ID")
    })?;
    match url.scheme() {
        "https" | "http" => {}
        other => {
            return Err(format!(
                "scheme {other:?} is not Redfish: use https:// (or http:// for a BMC without TLS)"
            ));
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        // A password in the address would end up in logs and the API: the
        // BMC's credentials belong in the machine's BMC user and password.
        return Err("the address must not carry a user or password; set the BMC user and password instead".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the address must not have a query (?…) or fragment (#…)".into());
    }
    let host = url.host_str().ok_or("the address has no host")?;
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let origin = match url.port() {
        Some(p) => format!("{}://{host}:{p}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    };
    let path = url.path().trim_end_matches('/');
    // `…/redfish/v1/Systems/ID`: the system is given.
    if let Some(i) = path.find("/redfish/v1") {
        let prefix = &path[..i];
        let rest = &path[i + "/redfish/v1".len()..];
        let root = format!("{prefix}/redfish/v1");
        if rest.is_empty() {
            return Ok(Endpoint {
                origin,
                root,
                system: None,
            });
        }
        let id = rest
            .strip_prefix("/Systems/")
            .filter(|id| !id.is_empty() && !id.contains('/'));
        return match id {
            Some(_) => Ok(Endpoint {
                origin,
                root,
                system: Some(path.to_string()),
            }),
            None => Err(format!(
                "the path {path:?} is neither the service root nor a system; use https://HOST or https://HOST/redfish/v1/Systems/ID"
            )),
        };
    }
    Ok(Endpoint {
        origin,
        root: format!("{path}/redfish/v1"),
        system: None,
    })
}

/// One member of `/redfish/v1/Systems`, as far as choosing it goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Candidate {
    pub path: String,
    pub uuid: Option<String>,
    pub serial: Option<String>,
}

impl Candidate {
    pub fn from_json(path: &str, v: &Value) -> Self {
        Candidate {
            path: path.to_string(),
            uuid: v.get("UUID").and_then(Value::as_str).map(str::to_string),
            serial: v.get("SerialNumber").and_then(Value::as_str).map(str::to_string),
        }
    }
}

/// Which system is the machine: the one with its UUID, else the one with
/// its serial; with neither known, the only system there is.
pub fn choose_system(
    candidates: &[Candidate],
    uuid: Option<uuid::Uuid>,
    serial: Option<&str>,
) -> Result<usize, String> {
    if candidates.is_empty() {
        return Err("the service lists no systems under /redfish/v1/Systems".into());
    }
    if let Some(want) = uuid {
        // BMCs write UUIDs in either case, some with braces; compare values.
        let hit = candidates.iter().position(|c| {
            c.uuid
                .as_deref()
                .and_then(|u| uuid::Uuid::parse_str(u.trim_matches(['{', '}'])).ok())
                == Some(want)
        });
        if let Some(i) = hit {
            return Ok(i);
        }
    }
    if let Some(want) = serial.map(str::trim).filter(|s| !s.is_empty()) {
        let hit = candidates
            .iter()
            .position(|c| c.serial.as_deref().map(str::trim) == Some(want));
        if let Some(i) = hit {
            return Ok(i);
        }
    }
    if uuid.is_none() && serial.is_none() {
        if candidates.len() == 1 {
            return Ok(0);
        }
        return Err(format!(
            "the service has {} systems and kiln knows neither the machine's UUID nor its serial; record one, or give the address as …/redfish/v1/Systems/ID",
            candidates.len()
        ));
    }
    let seen: Vec<String> = candidates
        .iter()
        .map(|c| {
            format!(
                "{} (UUID {}, serial {})",
                c.path,
                c.uuid.as_deref().unwrap_or("-"),
                c.serial.as_deref().unwrap_or("-")
            )
        })
        .collect();
    Err(format!(
        "no system matches the machine's {}; the service has: {}",
        match (uuid, serial) {
            (Some(u), Some(s)) => format!("UUID {u} or serial {s}"),
            (Some(u), None) => format!("UUID {u}"),
            (None, Some(s)) => format!("serial {s}"),
            (None, None) => unreachable!("handled above"),
        },
        seen.join(", ")
    ))
}

/// A system's `PowerState`. The transitional states count as where they
/// lead for a status read, and as not there yet while waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RfPower {
    On,
    Off,
    PoweringOn,
    PoweringOff,
    Paused,
}

impl RfPower {
    pub fn parse(s: &str) -> Option<RfPower> {
        Some(match s {
            "On" => RfPower::On,
            "Off" => RfPower::Off,
            "PoweringOn" => RfPower::PoweringOn,
            "PoweringOff" => RfPower::PoweringOff,
            "Paused" => RfPower::Paused,
            _ => return None,
        })
    }

    /// What `power status` reports: a machine powering on is on, one
    /// powering off is off, a paused one is powered.
    pub fn status(self) -> PowerState {
        match self {
            RfPower::On | RfPower::PoweringOn | RfPower::Paused => PowerState::On,
            RfPower::Off | RfPower::PoweringOff => PowerState::Off,
        }
    }

    /// True once the machine really is in `want` (not on its way there).
    pub fn is(self, want: PowerState) -> bool {
        matches!(
            (self, want),
            (RfPower::On, PowerState::On) | (RfPower::Off, PowerState::Off)
        )
    }
}

/// One step of carrying out a power action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// POST `ComputerSystem.Reset` with this `ResetType`.
    Reset(&'static str),
    /// Poll `PowerState` until it is this, or the deadline passes.
    WaitFor(PowerState),
}

/// True if sending this `ResetType` twice leaves the machine as sending it
/// once: it sets a state. `ForceRestart`, `PowerCycle`, `GracefulRestart`
/// and `Nmi` are events and are never resent blindly.
pub fn reset_is_idempotent(reset_type: &str) -> bool {
    matches!(reset_type, "On" | "ForceOn" | "ForceOff" | "GracefulShutdown")
}

/// The steps that carry out `action` on a system now in `current` whose
/// `ResetType@Redfish.AllowableValues` is `allowed` (`None`: the service
/// does not say, so the usual value is assumed).
///
/// - on / off / soft off of a machine already there: nothing to do;
/// - cycle and reset of a machine that is off: power on (it then boots, as
///   the caller wants; `PowerCycle` of an off machine is vendor-defined);
/// - cycle: `PowerCycle`, else `ForceOff` then `On`; reset: `ForceRestart`,
///   else `PowerCycle`, else `ForceOff` then `On`;
/// - every plan ends waiting for the state it leads to, because Redfish
///   power actions are asynchronous.
pub fn reset_plan(action: PowerAction, current: RfPower, allowed: Option<&[String]>) -> Result<Vec<Step>, String> {
    let ok = |t: &str| allowed.is_none_or(|a| a.iter().any(|x| x == t));
    let pick = |choices: &[&'static str]| choices.iter().copied().find(|t| ok(t));
    let on = || pick(&["On", "ForceOn"]);
    let unsupported = |what: &str| {
        format!(
            "{what}: the system allows ResetType {}",
            allowed.map(|a| a.join(", ")).unwrap_or_default()
        )
    };
    let power_on = || -> Result<Vec<Step>, String> {
        let t = on().ok_or_else(|| unsupported("cannot power on (neither On nor ForceOn)"))?;
        Ok(vec![Step::Reset(t), Step::WaitFor(PowerState::On)])
    };
    let off_then_on = || -> Option<Vec<Step>> {
        Some(vec![
            Step::Reset(pick(&["ForceOff"])?),
            Step::WaitFor(PowerState::Off),
            Step::Reset(on()?),
            Step::WaitFor(PowerState::On),
        ])
    };
    let powered = current.status() == PowerState::On;
    match action {
        PowerAction::On if current.is(PowerState::On) => Ok(vec![]),
        PowerAction::On => power_on(),
        PowerAction::Off | PowerAction::SoftOff if current.is(PowerState::Off) => Ok(vec![]),
        PowerAction::Off => {
            let t = pick(&["ForceOff"]).ok_or_else(|| unsupported("cannot power off (no ForceOff)"))?;
            Ok(vec![Step::Reset(t), Step::WaitFor(PowerState::Off)])
        }
        PowerAction::SoftOff => {
            let t = pick(&["GracefulShutdown"]).ok_or_else(|| unsupported("cannot soft off (no GracefulShutdown)"))?;
            Ok(vec![Step::Reset(t), Step::WaitFor(PowerState::Off)])
        }
        PowerAction::Cycle | PowerAction::Reset if !powered => power_on(),
        PowerAction::Cycle => {
            if let Some(t) = pick(&["PowerCycle"]) {
                return Ok(vec![Step::Reset(t), Step::WaitFor(PowerState::On)]);
            }
            off_then_on().ok_or_else(|| unsupported("cannot power cycle (no PowerCycle, nor ForceOff and On)"))
        }
        PowerAction::Reset => {
            if let Some(t) = pick(&["ForceRestart", "PowerCycle"]) {
                return Ok(vec![Step::Reset(t), Step::WaitFor(PowerState::On)]);
            }
            off_then_on()
                .ok_or_else(|| unsupported("cannot reset (no ForceRestart or PowerCycle, nor ForceOff and On)"))
        }
    }
}

/// The Redfish `BootSourceOverrideTarget` for a boot device.
pub fn boot_target(device: BootDevice) -> &'static str {
    match device {
        BootDevice::Network => "Pxe",
        BootDevice::Disk => "Hdd",
        BootDevice::Cdrom => "Cd",
        BootDevice::UefiHttp => "UefiHttp",
    }
}

/// The PATCH body that sets the boot override. The mode is sent only when
/// the system shows `BootSourceOverrideMode` (older services reject the
/// whole PATCH for a property they do not have); a target or enabled
/// value the system lists as not allowed is refused here, before any write.
pub fn boot_patch(
    device: BootDevice,
    persistence: BootPersistence,
    firmware: BootFirmware,
    boot: Option<&Value>,
) -> Result<Value, String> {
    let target = boot_target(device);
    if device == BootDevice::UefiHttp && firmware == BootFirmware::Bios {
        // A legacy override to a UEFI-only device: some BMCs take it and the
        // machine then boots from neither.
        return Err("UefiHttp boots in UEFI mode only: set the override for UEFI".into());
    }
    let enabled = match persistence {
        BootPersistence::Once => "Once",
        BootPersistence::Persistent => "Continuous",
    };
    let allowed = |key: &str, value: &str| -> Result<(), String> {
        let list = boot
            .and_then(|b| b.get(format!("{key}@Redfish.AllowableValues")))
            .and_then(Value::as_array);
        match list {
            Some(l) if !l.iter().any(|x| x.as_str() == Some(value)) => Err(format!(
                "{key} {value} is not allowed; the system allows {}",
                l.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")
            )),
            _ => Ok(()),
        }
    };
    allowed("BootSourceOverrideTarget", target)?;
    allowed("BootSourceOverrideEnabled", enabled)?;
    let mut body = json!({
        "BootSourceOverrideEnabled": enabled,
        "BootSourceOverrideTarget": target,
    });
    if boot.is_some_and(|b| b.get("BootSourceOverrideMode").is_some()) {
        let mode = match firmware {
            BootFirmware::Uefi => "UEFI",
            BootFirmware::Bios => "Legacy",
        };
        allowed("BootSourceOverrideMode", mode)?;
        body["BootSourceOverrideMode"] = json!(mode);
    }
    Ok(json!({ "Boot": body }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(origin: &str, root: &str, system: Option<&str>) -> Endpoint {
        Endpoint {
            origin: origin.into(),
            root: root.into(),
            system: system.map(Into::into),
        }
    }

    #[test]
    fn addresses() {
        let cases = [
            ("https://10.0.0.5", ep("https://10.0.0.5", "/redfish/v1", None)),
            (
                "https://bmc7.example:8443/",
                ep("https://bmc7.example:8443", "/redfish/v1", None),
            ),
            (
                "http://127.0.0.1:9001",
                ep("http://127.0.0.1:9001", "/redfish/v1", None),
            ),
            ("https://[fe80::1]:443", ep("https://[fe80::1]", "/redfish/v1", None)),
            ("https://h/redfish/v1", ep("https://h", "/redfish/v1", None)),
            ("https://h/redfish/v1/", ep("https://h", "/redfish/v1", None)),
            (
                "https://h/redfish/v1/Systems/System.Embedded.1",
                ep(
                    "https://h",
                    "/redfish/v1",
                    Some("/redfish/v1/Systems/System.Embedded.1"),
                ),
            ),
            ("https://proxy/bmc/7", ep("https://proxy", "/bmc/7/redfish/v1", None)),
            (
                "https://proxy/bmc/7/redfish/v1/Systems/1",
                ep(
                    "https://proxy",
                    "/bmc/7/redfish/v1",
                    Some("/bmc/7/redfish/v1/Systems/1"),
                ),
            ),
        ];
        for (addr, want) in cases {
            assert_eq!(parse_address(addr).as_ref(), Ok(&want), "{addr}");
        }
    }

    #[test]
    fn bad_addresses_say_why() {
        for (addr, says) in [
            ("10.0.0.5", "not a Redfish URL"),
            ("ftp://h", "not Redfish"),
            ("https://root:calvin@h", "must not carry a user or password"),
            ("https://h/?x=1", "query"),
            (
                "https://h/redfish/v1/Managers/1",
                "neither the service root nor a system",
            ),
            ("https://h/redfish/v1/Systems/", "neither"),
            ("https://h/redfish/v1/Systems/1/Bios", "neither"),
        ] {
            let e = parse_address(addr).unwrap_err();
            assert!(e.contains(says), "{addr}: {e}");
            assert!(!e.contains("calvin"), "the password leaked into {e}");
        }
    }

    #[test]
    fn names_hide_userinfo() {
        assert_eq!(display_name("https://root:calvin@h:443/x"), "https://***@h:443/x");
        assert_eq!(
            display_name("https://h/redfish/v1/Systems/a@b"),
            "https://h/redfish/v1/Systems/a@b"
        );
        assert_eq!(display_name("https://h"), "https://h");
    }

    fn cand(path: &str, uuid: Option<&str>, serial: Option<&str>) -> Candidate {
        Candidate {
            path: path.into(),
            uuid: uuid.map(Into::into),
            serial: serial.map(Into::into),
        }
    }

    #[test]
    fn system_by_uuid_then_serial_then_only_one() {
        let u1 = "27946b59-9e44-4fa7-8e91-f3527a1ef094";
        let u2 = "8d1ab2a2-0ab6-4a1b-9f3f-6c1a8a7e4f10";
        let c = [
            cand("/s/1", Some(u1), Some("SN1")),
            cand("/s/2", Some(&u2.to_uppercase()), Some(" SN2 ")),
        ];
        let id = |s: &str| uuid::Uuid::parse_str(s).ok();
        assert_eq!(choose_system(&c, id(u2), None), Ok(1), "uuid matched whatever its case");
        assert_eq!(
            choose_system(&c, None, Some("SN2")),
            Ok(1),
            "serial matched, spaces trimmed"
        );
        assert_eq!(choose_system(&c, id(u1), Some("SN2")), Ok(0), "uuid wins over serial");
        let braced = [cand("/s/9", Some(&format!("{{{u1}}}")), None)];
        assert_eq!(choose_system(&braced, id(u1), None), Ok(0));
        assert_eq!(choose_system(&c[..1], None, None), Ok(0), "the only one");
        let e = choose_system(&c, None, None).unwrap_err();
        assert!(e.contains("2 systems"), "{e}");
        let e = choose_system(&c, id("00000000-0000-4000-8000-000000000000"), Some("X")).unwrap_err();
        assert!(
            e.contains("UUID 00000000-0000-4000-8000-000000000000 or serial X"),
            "{e}"
        );
        assert!(e.contains("/s/2 (UUID 8D1AB2A2"), "lists what it saw: {e}");
        assert!(choose_system(&[], None, None).unwrap_err().contains("no systems"));
    }

    fn allowed(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reset_mapping() {
        use PowerAction::{Cycle, Off, On, SoftOff};
        use PowerState as P;
        use Step::{Reset as R, WaitFor};
        const RESET: PowerAction = PowerAction::Reset;
        let all = allowed(&["On", "ForceOff", "GracefulShutdown", "ForceRestart", "PowerCycle"]);
        let sushy = allowed(&[
            "On",
            "ForceOff",
            "GracefulShutdown",
            "GracefulRestart",
            "ForceRestart",
            "Nmi",
            "ForceOn",
        ]);
        let only_force_on = allowed(&["ForceOn", "ForceOff"]);
        let no_restart = allowed(&["On", "ForceOff", "PowerCycle"]);
        let bare = allowed(&["On", "ForceOff"]);
        let off_on = vec![R("ForceOff"), WaitFor(P::Off), R("On"), WaitFor(P::On)];
        type Case<'a> = (PowerAction, RfPower, Option<&'a [String]>, Vec<Step>);
        let cases: Vec<Case> = vec![
            (On, RfPower::Off, Some(&all), vec![R("On"), WaitFor(P::On)]),
            (On, RfPower::On, Some(&all), vec![]),
            (On, RfPower::PoweringOn, Some(&all), vec![R("On"), WaitFor(P::On)]),
            (
                On,
                RfPower::Off,
                Some(&only_force_on),
                vec![R("ForceOn"), WaitFor(P::On)],
            ),
            (On, RfPower::Off, None, vec![R("On"), WaitFor(P::On)]),
            (Off, RfPower::On, Some(&all), vec![R("ForceOff"), WaitFor(P::Off)]),
            (Off, RfPower::Off, Some(&all), vec![]),
            (
                SoftOff,
                RfPower::On,
                Some(&all),
                vec![R("GracefulShutdown"), WaitFor(P::Off)],
            ),
            (SoftOff, RfPower::Off, Some(&all), vec![]),
            (Cycle, RfPower::On, Some(&all), vec![R("PowerCycle"), WaitFor(P::On)]),
            (Cycle, RfPower::On, Some(&sushy), off_on.clone()),
            (Cycle, RfPower::Off, Some(&all), vec![R("On"), WaitFor(P::On)]),
            (Cycle, RfPower::On, None, vec![R("PowerCycle"), WaitFor(P::On)]),
            (RESET, RfPower::On, Some(&all), vec![R("ForceRestart"), WaitFor(P::On)]),
            (
                RESET,
                RfPower::On,
                Some(&no_restart),
                vec![R("PowerCycle"), WaitFor(P::On)],
            ),
            (RESET, RfPower::On, Some(&bare), off_on.clone()),
            (RESET, RfPower::Off, Some(&all), vec![R("On"), WaitFor(P::On)]),
        ];
        for (action, cur, allow, want) in cases {
            assert_eq!(
                reset_plan(action, cur, allow),
                Ok(want),
                "{action} from {cur:?} with {allow:?}"
            );
        }
        let e = reset_plan(Cycle, RfPower::On, Some(&allowed(&["On", "GracefulShutdown"]))).unwrap_err();
        assert!(
            e.contains("cannot power cycle") && e.contains("allows ResetType On, GracefulShutdown"),
            "{e}"
        );
        let e = reset_plan(Off, RfPower::On, Some(&allowed(&["On"]))).unwrap_err();
        assert!(e.contains("no ForceOff"), "{e}");
    }

    #[test]
    fn only_state_setting_resets_are_idempotent() {
        for t in ["On", "ForceOn", "ForceOff", "GracefulShutdown"] {
            assert!(reset_is_idempotent(t), "{t}");
        }
        for t in [
            "ForceRestart",
            "PowerCycle",
            "GracefulRestart",
            "Nmi",
            "PushPowerButton",
        ] {
            assert!(!reset_is_idempotent(t), "{t}");
        }
    }

    #[test]
    fn power_states() {
        assert_eq!(RfPower::parse("PoweringOn").map(RfPower::status), Some(PowerState::On));
        assert_eq!(
            RfPower::parse("PoweringOff").map(RfPower::status),
            Some(PowerState::Off)
        );
        assert!(!RfPower::PoweringOn.is(PowerState::On), "on its way is not there");
        assert!(RfPower::Off.is(PowerState::Off));
        assert_eq!(RfPower::parse("on"), None, "Redfish enums are case-sensitive");
    }

    #[test]
    fn boot_bodies() {
        let with_mode = json!({"BootSourceOverrideMode": "Legacy", "BootSourceOverrideTarget": "Hdd"});
        assert_eq!(
            boot_patch(
                BootDevice::Network,
                BootPersistence::Once,
                BootFirmware::Uefi,
                Some(&with_mode)
            ),
            Ok(
                json!({"Boot": {"BootSourceOverrideEnabled": "Once", "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideMode": "UEFI"}})
            )
        );
        assert_eq!(
            boot_patch(
                BootDevice::Disk,
                BootPersistence::Persistent,
                BootFirmware::Bios,
                Some(&with_mode)
            ),
            Ok(
                json!({"Boot": {"BootSourceOverrideEnabled": "Continuous", "BootSourceOverrideTarget": "Hdd", "BootSourceOverrideMode": "Legacy"}})
            )
        );
        let no_mode = json!({"BootSourceOverrideTarget": "None"});
        assert_eq!(
            boot_patch(
                BootDevice::Cdrom,
                BootPersistence::Once,
                BootFirmware::Uefi,
                Some(&no_mode)
            ),
            Ok(json!({"Boot": {"BootSourceOverrideEnabled": "Once", "BootSourceOverrideTarget": "Cd"}})),
            "no mode property, no mode sent"
        );
        let limited = json!({"BootSourceOverrideTarget@Redfish.AllowableValues": ["Pxe", "Hdd"]});
        let e = boot_patch(
            BootDevice::Cdrom,
            BootPersistence::Once,
            BootFirmware::Uefi,
            Some(&limited),
        )
        .unwrap_err();
        assert_eq!(
            e,
            "BootSourceOverrideTarget Cd is not allowed; the system allows Pxe, Hdd"
        );
        assert_eq!(
            boot_patch(
                BootDevice::UefiHttp,
                BootPersistence::Once,
                BootFirmware::Uefi,
                Some(&with_mode)
            ),
            Ok(
                json!({"Boot": {"BootSourceOverrideEnabled": "Once", "BootSourceOverrideTarget": "UefiHttp", "BootSourceOverrideMode": "UEFI"}})
            )
        );
        let e = boot_patch(
            BootDevice::UefiHttp,
            BootPersistence::Once,
            BootFirmware::Bios,
            Some(&with_mode),
        )
        .unwrap_err();
        assert!(e.contains("UEFI mode only"), "{e}");
        let e = boot_patch(
            BootDevice::UefiHttp,
            BootPersistence::Once,
            BootFirmware::Uefi,
            Some(&limited),
        )
        .unwrap_err();
        assert!(e.contains("UefiHttp is not allowed"), "{e}");
        let e = boot_patch(
            BootDevice::Network,
            BootPersistence::Once,
            BootFirmware::Bios,
            Some(
                &json!({"BootSourceOverrideMode": "UEFI", "BootSourceOverrideMode@Redfish.AllowableValues": ["UEFI"]}),
            ),
        )
        .unwrap_err();
        assert!(e.contains("Legacy is not allowed"), "{e}");
    }
}
