//! The command driver: power and boot device through programs the operator
//! names (a PDU tool, a hypervisor CLI, an SSH wrapper), for sites without a
//! usable BMC.
//!
//! Each action has an argv template in the server config (`[bmc.command]`,
//! see `docs/config.md`). A template is a list of strings; `{name}` in an
//! element is replaced by the machine's value, *inside that one element*:
//! no shell ever sees the result, so a hostname or address cannot add an
//! argument, a pipe or a command. The program itself (element 0) takes no
//! variables. The same values reach the program as `KILN_*` environment
//! variables; the BMC password reaches it **only** as `KILN_BMC_PASSWORD`
//! in its environment (never in argv, which every user can read in
//! `/proc/PID/cmdline`): `{password}` is not a variable, and a template
//! that names it is refused when the config is loaded.
//!
//! A call runs the program in its own process group with stdin closed,
//! waits for it up to the timeout and then kills the whole group (a script's
//! children included). Exit 0 is success; `77` (sysexits `EX_NOPERM`) means
//! "the credentials were refused" and counts as [`BmcError::AuthFailed`];
//! `69` (`EX_UNAVAILABLE`) means "the device did not answer"
//! ([`BmcError::Unreachable`]); any other code is an error carrying the code
//! and the start of stderr. `power_status` prints `on` or `off` (its last
//! non-empty line of stdout, any case).

use std::collections::BTreeMap;
use std::fmt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use kiln_types::machine::Machine;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{
    BmcDriver, BmcError, BootDevice, BootFirmware, BootPersistence, Identity, Password, PowerAction, PowerState,
};

/// The most of stdout kept (a status answer is one word).
pub const STDOUT_LIMIT: usize = 16 * 1024;
/// The most of stderr quoted in an error.
pub const STDERR_LIMIT: usize = 2 * 1024;

/// Exit code of a program whose credentials were refused (`EX_NOPERM`).
pub const EXIT_AUTH_FAILED: i32 = 77;
/// Exit code of a program whose device did not answer (`EX_UNAVAILABLE`).
pub const EXIT_UNREACHABLE: i32 = 69;

/// The variables a template may use. Each is also an environment variable
/// `KILN_` + its name in capitals.
pub const VARIABLES: &[&str] = &[
    "hostname",
    "fqdn",
    "machine_id",
    "bmc_address",
    "bmc_username",
    "mac",
    "ipv4",
    "action",
    "device",
    "persistence",
    "firmware",
];

/// `[bmc.command]`: one argv template per action. An action without a
/// template is `Unsupported` for machines on this driver.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandTemplates {
    #[serde(default)]
    pub power_on: Option<Vec<String>>,
    #[serde(default)]
    pub power_off: Option<Vec<String>>,
    #[serde(default)]
    pub power_soft_off: Option<Vec<String>>,
    #[serde(default)]
    pub power_cycle: Option<Vec<String>>,
    #[serde(default)]
    pub power_reset: Option<Vec<String>>,
    /// Prints `on` or `off`.
    #[serde(default)]
    pub power_status: Option<Vec<String>>,
    /// Sets the next boot device: use `{device}` (`network`, `disk`,
    /// `cdrom`, `uefi_http`), `{persistence}` (`once`, `persistent`) and `{firmware}`
    /// (`bios`, `uefi`).
    #[serde(default)]
    pub bootdev: Option<Vec<String>>,
    /// How long one program may run before its process group is killed.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_timeout_secs() -> u64 {
    30
}

impl Default for CommandTemplates {
    fn default() -> Self {
        CommandTemplates {
            power_on: None,
            power_off: None,
            power_soft_off: None,
            power_cycle: None,
            power_reset: None,
            power_status: None,
            bootdev: None,
            timeout_secs: default_timeout_secs(),
        }
    }
}

impl CommandTemplates {
    fn all(&self) -> [(&'static str, &Option<Vec<String>>); 7] {
        [
            ("power_on", &self.power_on),
            ("power_off", &self.power_off),
            ("power_soft_off", &self.power_soft_off),
            ("power_cycle", &self.power_cycle),
            ("power_reset", &self.power_reset),
            ("power_status", &self.power_status),
            ("bootdev", &self.bootdev),
        ]
    }

    /// Checks every template: not empty, a constant program, known
    /// variables only, balanced braces. Returns what is wrong, naming the
    /// key.
    pub fn validate(&self) -> Result<(), String> {
        if self.timeout_secs == 0 {
            return Err("timeout_secs must be at least 1".into());
        }
        for (key, t) in self.all() {
            let Some(argv) = t else { continue };
            let Some(program) = argv.first() else {
                return Err(format!("{key} is empty: give the program and its arguments"));
            };
            if program.contains('{') || program.contains('}') {
                return Err(format!(
                    "{key}: the program `{program}` may not contain variables; put them in the arguments"
                ));
            }
            for (i, element) in argv.iter().enumerate() {
                parse(element).map_err(|e| format!("{key}[{i}] `{element}`: {e}"))?;
            }
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// One piece of a template element.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

/// Splits `element` into text and `{variable}`s; `{{` and `}}` are a
/// literal brace.
fn parse(element: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = vec![];
    let mut rest = element;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{{") {
            out.push(Piece::Text("{"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            out.push(Piece::Text("}"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}').ok_or("a `{` is not closed (write `{{` for a brace)")?;
            let name = &r[..end];
            if name == "password" || name == "bmc_password" {
                return Err(
                    "the password is never put into arguments (anyone can read them in /proc): \
                     the program reads it from $KILN_BMC_PASSWORD"
                        .into(),
                );
            }
            if !VARIABLES.contains(&name) {
                return Err(format!(
                    "unknown variable `{{{name}}}`; known: {}",
                    VARIABLES.join(", ")
                ));
            }
            out.push(Piece::Var(name));
            rest = &r[end + 1..];
        } else if rest.starts_with('}') {
            return Err("a `}` without its `{` (write `}}` for a brace)".into());
        } else {
            let end = rest.find(['{', '}']).unwrap_or(rest.len());
            out.push(Piece::Text(&rest[..end]));
            rest = &rest[end..];
        }
    }
    Ok(out)
}

/// Fills `argv` with `vars`. Pure: the tests check it without processes.
///
/// A value that would *start* an element with `-` is refused, so a value
/// (an address, a user name) can never be read as an option by the program.
pub fn render(argv: &[String], vars: &BTreeMap<&'static str, String>) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(argv.len());
    for element in argv {
        let mut s = String::new();
        for piece in parse(element)? {
            match piece {
                Piece::Text(t) => s.push_str(t),
                Piece::Var(name) => {
                    let v = vars
                        .get(name)
                        .ok_or_else(|| format!("`{{{name}}}` has no value for this machine"))?;
                    if s.is_empty() && v.starts_with('-') {
                        return Err(format!(
                            "the value of `{{{name}}}` starts with `-` and would read as an option"
                        ));
                    }
                    if v.contains('\0') {
                        return Err(format!("the value of `{{{name}}}` contains a NUL byte"));
                    }
                    s.push_str(v);
                }
            }
        }
        out.push(s);
    }
    Ok(out)
}

/// The command driver for one machine.
pub struct CommandDriver {
    templates: Arc<CommandTemplates>,
    /// Machine values, by variable name (without the per-call ones).
    vars: BTreeMap<&'static str, String>,
    password: Option<Password>,
    /// How errors name the BMC: the machine's hostname.
    name: String,
}

impl fmt::Debug for CommandDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandDriver")
            .field("machine", &self.name)
            .field("vars", &self.vars)
            .field("password", &self.password)
            .finish()
    }
}

impl CommandDriver {
    /// A driver for `machine` with `templates` (already validated).
    pub fn new(templates: Arc<CommandTemplates>, machine: &Machine, password: Option<Password>) -> Self {
        let mut vars = BTreeMap::new();
        vars.insert("hostname", machine.hostname.to_string());
        vars.insert("machine_id", machine.id.to_string());
        if let Some(f) = &machine.fqdn {
            vars.insert("fqdn", f.to_string());
        }
        if let Some(b) = &machine.bmc {
            vars.insert("bmc_address", b.address.clone());
            if let Some(u) = &b.username {
                vars.insert("bmc_username", u.clone());
            }
        }
        if let Some(mac) = machine.nics.first().and_then(|n| n.mac) {
            vars.insert("mac", mac.to_string());
        }
        if let Some(ip) = machine.ipv4 {
            vars.insert("ipv4", ip.to_string());
        }
        CommandDriver {
            templates,
            vars,
            password,
            name: machine.hostname.to_string(),
        }
    }

    fn unsupported(&self, key: &str) -> BmcError {
        BmcError::Unsupported {
            bmc: self.name.clone(),
            what: format!("no `{key}` command is configured in [bmc.command]"),
        }
    }

    /// Runs the template `key` with the machine's values and `extra`;
    /// returns stdout (bounded). `acts`: the action is an event (cycle,
    /// reset, soft off), so a timeout leaves its outcome unknown.
    async fn run(&self, key: &'static str, extra: &[(&'static str, String)], acts: bool) -> Result<String, BmcError> {
        let template = self
            .templates
            .all()
            .into_iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, t)| t.clone())
            .ok_or_else(|| self.unsupported(key))?;
        let mut vars = self.vars.clone();
        vars.extend(extra.iter().cloned());
        let argv = render(&template, &vars).map_err(|detail| BmcError::Config {
            bmc: self.name.clone(),
            detail: format!("[bmc.command] {key}: {detail}"),
        })?;
        let timeout = self.templates.timeout();
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for (k, v) in &vars {
            cmd.env(format!("KILN_{}", k.to_ascii_uppercase()), v);
        }
        if let Some(p) = &self.password {
            cmd.env("KILN_BMC_PASSWORD", p.expose());
        }
        let mut child = cmd.spawn().map_err(|e| BmcError::Config {
            bmc: self.name.clone(),
            detail: format!("[bmc.command] {key}: cannot run `{}`: {e}", argv[0]),
        })?;
        let pgid = child.id();
        // If the caller gives up (its own deadline drops this future), the
        // program and its children must not run on: kill the group.
        let mut group = GroupGuard(pgid);
        let out = tokio::spawn(read_bounded(child.stdout.take(), STDOUT_LIMIT));
        let err = tokio::spawn(read_bounded(child.stderr.take(), STDERR_LIMIT));
        let status = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(s) => s.map_err(|e| BmcError::Protocol {
                bmc: self.name.clone(),
                step: key.into(),
                detail: format!("waiting for `{}`: {e}", argv[0]),
            })?,
            Err(_) => {
                // The whole group: a script's children go too, so nothing
                // keeps acting on the machine after kiln gave up.
                if let Some(pid) = pgid {
                    kill_group(pid);
                }
                let _ = child.wait().await;
                out.abort();
                err.abort();
                let waited = started.elapsed();
                return Err(if acts {
                    BmcError::OutcomeUnknown {
                        bmc: self.name.clone(),
                        action: format!("`{key}` (killed after {timeout:?})"),
                        waited,
                    }
                } else {
                    BmcError::Timeout {
                        bmc: self.name.clone(),
                        step: format!("`{key}` (killed after {timeout:?})"),
                        waited,
                        tries: 1,
                    }
                });
            }
        };
        group.0 = None;
        // A child of the program may still hold the pipes open: bound the
        // reads by what is left of the timeout, then kill the group.
        let left = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(100));
        let stdout = match tokio::time::timeout(left, out).await {
            Ok(Ok(s)) => s,
            _ => {
                if let Some(pid) = pgid {
                    kill_group(pid);
                }
                String::new()
            }
        };
        let stderr = match tokio::time::timeout(Duration::from_millis(500), err).await {
            Ok(Ok(s)) => s,
            _ => String::new(),
        };
        let stderr = stderr.trim();
        match status.code() {
            Some(0) => Ok(stdout),
            Some(EXIT_AUTH_FAILED) => Err(BmcError::AuthFailed {
                bmc: self.name.clone(),
                user: self.vars.get("bmc_username").cloned().unwrap_or_default(),
                reason: format!("`{key}` exited with {EXIT_AUTH_FAILED} (credentials refused): {stderr}"),
            }),
            Some(EXIT_UNREACHABLE) => Err(BmcError::Unreachable {
                bmc: self.name.clone(),
                reason: format!("`{key}` exited with {EXIT_UNREACHABLE} (device unavailable): {stderr}"),
            }),
            code => Err(BmcError::Protocol {
                bmc: self.name.clone(),
                step: key.into(),
                detail: match code {
                    Some(c) => format!("`{}` exited with code {c}: {stderr}", argv[0]),
                    None => format!("`{}` was killed by a signal: {stderr}", argv[0]),
                },
            }),
        }
    }
}

/// Reads at most `limit` bytes and drains (discards) the rest, so a chatty
/// program never blocks on a full pipe.
async fn read_bounded(r: Option<impl AsyncRead + Unpin>, limit: usize) -> String {
    let Some(mut r) = r else { return String::new() };
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    let mut s = String::from_utf8_lossy(&kept).into_owned();
    if kept.len() >= limit {
        s.push_str(" […]");
    }
    s
}

/// Kills the process group on drop unless disarmed (its pid set to None).
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            kill_group(pid);
        }
    }
}

fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// `on` / `off` from a status program's stdout: its last non-empty line.
pub fn parse_power(stdout: &str) -> Result<PowerState, String> {
    let last = stdout.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("");
    match last.to_ascii_lowercase().as_str() {
        "on" => Ok(PowerState::On),
        "off" => Ok(PowerState::Off),
        _ => {
            let shown: String = last.chars().take(80).collect();
            Err(format!(
                "the status command printed `{shown}`; it must print `on` or `off`"
            ))
        }
    }
}

fn action_key(action: PowerAction) -> &'static str {
    match action {
        PowerAction::On => "power_on",
        PowerAction::Off => "power_off",
        PowerAction::SoftOff => "power_soft_off",
        PowerAction::Cycle => "power_cycle",
        PowerAction::Reset => "power_reset",
    }
}

fn action_name(action: PowerAction) -> &'static str {
    match action {
        PowerAction::On => "on",
        PowerAction::Off => "off",
        PowerAction::SoftOff => "soft_off",
        PowerAction::Cycle => "cycle",
        PowerAction::Reset => "reset",
    }
}

impl BmcDriver for CommandDriver {
    fn power_status(&self) -> BoxFuture<'_, Result<PowerState, BmcError>> {
        Box::pin(async move {
            let out = self.run("power_status", &[("action", "status".into())], false).await?;
            parse_power(&out).map_err(|detail| BmcError::Protocol {
                bmc: self.name.clone(),
                step: "power_status".into(),
                detail,
            })
        })
    }

    fn power(&self, action: PowerAction) -> BoxFuture<'_, Result<(), BmcError>> {
        Box::pin(async move {
            self.run(
                action_key(action),
                &[("action", action_name(action).into())],
                !action.is_idempotent(),
            )
            .await
            .map(|_| ())
        })
    }

    fn set_boot_device(
        &self,
        device: BootDevice,
        persistence: BootPersistence,
        firmware: BootFirmware,
    ) -> BoxFuture<'_, Result<(), BmcError>> {
        let device = match device {
            BootDevice::Network => "network",
            BootDevice::Disk => "disk",
            BootDevice::Cdrom => "cdrom",
            BootDevice::UefiHttp => "uefi_http",
        };
        let persistence = match persistence {
            BootPersistence::Once => "once",
            BootPersistence::Persistent => "persistent",
        };
        let firmware = match firmware {
            BootFirmware::Bios => "bios",
            BootFirmware::Uefi => "uefi",
        };
        Box::pin(async move {
            self.run(
                "bootdev",
                &[
                    ("action", "bootdev".into()),
                    ("device", device.into()),
                    ("persistence", persistence.into()),
                    ("firmware", firmware.into()),
                ],
                false,
            )
            .await
            .map(|_| ())
        })
    }

    fn identity(&self) -> BoxFuture<'_, Result<Identity, BmcError>> {
        Box::pin(async move {
            Err(BmcError::Unsupported {
                bmc: self.name.clone(),
                what: "the command driver reports no identity (serial, UUID)".into(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<&'static str, String> {
        let mut v = BTreeMap::new();
        v.insert("hostname", "db1001".to_string());
        v.insert("bmc_address", "pdu3:outlet 7; rm -rf /".to_string());
        v
    }

    #[test]
    fn values_stay_inside_their_element() {
        let argv = vec![
            "/usr/bin/pdu".to_string(),
            "--outlet={bmc_address}".to_string(),
            "{hostname}".to_string(),
            "{{literal}}".to_string(),
        ];
        assert_eq!(
            render(&argv, &vars()).unwrap(),
            vec![
                "/usr/bin/pdu",
                "--outlet=pdu3:outlet 7; rm -rf /",
                "db1001",
                "{literal}"
            ]
        );
    }

    #[test]
    fn bad_templates_are_refused_naming_the_key() {
        let t = |argv: &[&str]| CommandTemplates {
            power_on: Some(argv.iter().map(|s| s.to_string()).collect()),
            ..CommandTemplates::default()
        };
        for (argv, want) in [
            (&["/bin/x", "{password}"][..], "never put into arguments"),
            (&["/bin/x", "{bmc_password}"][..], "never put into arguments"),
            (&["/bin/x", "{colour}"][..], "unknown variable `{colour}`"),
            (&["/bin/{hostname}"][..], "may not contain variables"),
            (&["/bin/x", "{hostname"][..], "not closed"),
            (&["/bin/x", "a}"][..], "without its"),
            (&[][..], "power_on is empty"),
        ] {
            let e = t(argv).validate().unwrap_err();
            assert!(e.contains(want), "{argv:?}: {e}");
            assert!(e.contains("power_on"), "{e}");
        }
        assert!(t(&["/bin/x", "{hostname}", "x{{y}}"]).validate().is_ok());
    }

    #[test]
    fn a_value_cannot_become_an_option() {
        let mut v = vars();
        v.insert("bmc_username", "--config=/etc/evil".into());
        let e = render(&["/bin/x".into(), "{bmc_username}".into()], &v).unwrap_err();
        assert!(e.contains("would read as an option"), "{e}");
        // After a constant prefix it is only a value.
        assert_eq!(
            render(&["/bin/x".into(), "--user={bmc_username}".into()], &v).unwrap()[1],
            "--user=--config=/etc/evil"
        );
        let e = render(&["/bin/x".into(), "{ipv4}".into()], &v).unwrap_err();
        assert!(e.contains("no value for this machine"), "{e}");
    }

    #[test]
    fn power_status_output() {
        assert_eq!(parse_power("on\n").unwrap(), PowerState::On);
        assert_eq!(parse_power("checking…\nOFF\n\n").unwrap(), PowerState::Off);
        assert!(parse_power("Chassis Power is on").unwrap_err().contains("must print"));
        assert!(parse_power("").is_err());
    }

    #[test]
    fn the_password_never_shows() {
        let m = Machine::sketch(
            "db1",
            kiln_types::machine::MachineKind::Physical,
            kiln_types::machine::MachineState::Ready,
        );
        let d = CommandDriver::new(
            Arc::new(CommandTemplates::default()),
            &m,
            Some(Password::new("canary-cmd")),
        );
        assert!(!format!("{d:?}").contains("canary"));
    }
}
