//! The BMC service: every call kiln makes to a machine's BMC goes through
//! here, for the API, the power sync and (later) the workflow engine.
//!
//! - **Driver by configuration**: the machine's `bmc.driver` picks IPMI
//!   (`host` / `host:port`), Redfish (an `http(s)://` URL; TLS verified
//!   against the system's roots and the BMC's own `ca_cert`, unless the
//!   BMC is marked `insecure`; the system found by the machine's DMI UUID
//!   or serial) or the command driver (`[bmc.command]`).
//! - **Deadlines**: a call has `deadline_secs` from the moment it is asked
//!   for, waiting for its turn included; the driver gets what is left.
//! - **Concurrency**: one call at a time per machine (a keyed lock; BMC
//!   addresses are unique, so this is one per BMC), and at most
//!   `max_concurrent` BMC calls in the whole server (a semaphore, taken
//!   after the per-machine lock so a queue on one slow BMC holds no slot).
//! - **Authentication failures**: counted per machine *in memory* (a
//!   restart starts from zero). After `auth_failure_limit` (at most 3)
//!   failures in a row the machine is put in maintenance with the reason,
//!   and no call is sent to its BMC until an operator clears maintenance —
//!   so kiln never walks a BMC into its account lock-out.
//! - **Audit**: every action (power, boot device, check) is an event with
//!   who, what and the result; status reads are not. Error texts are
//!   scrubbed of the password before they are stored or answered.
//! - **Power sync** ([`BmcService::sync_once`], [`run_sync`]): reads the
//!   fleet's power with bounded concurrency and records drift — a state
//!   different from the last one kiln saw or set — as `bmc.power.drift`. It
//!   never acts on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_bmc::command::{CommandDriver, CommandTemplates};
use kiln_bmc::ipmi::IpmiDriver;
use kiln_bmc::redfish::{RedfishConfig, RedfishDriver, Sessions};
use kiln_bmc::{BmcDriver, BmcError, BmcErrorKind, BootFirmware, BootPersistence, Password};
use kiln_store::{Actor, Store, StoreError};
use kiln_types::MachineId;
use kiln_types::machine::{BmcDriver as DriverKind, Machine, MachinePatch};
use kiln_types::power::{BmcCheck, BootDevice, PowerAction, PowerState};
use serde::Deserialize;
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::secrets::{SecretBox, SecretError};

/// How a maintenance reason set by the BMC service begins: a machine in
/// maintenance for this reason gets no BMC call at all.
pub const AUTH_MAINTENANCE_PREFIX: &str = "BMC refused kiln's credentials";

/// `[bmc]` in the server config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmcSettings {
    /// Whole budget of one BMC call, waiting for its turn included.
    #[serde(default = "default_deadline_secs")]
    pub deadline_secs: u64,
    /// BMC calls in flight in the whole server.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Authentication failures in a row before maintenance (1 to 3).
    #[serde(default = "default_auth_failure_limit")]
    pub auth_failure_limit: u32,
    /// Seconds between power-state sweeps of the fleet; 0 turns the sync off.
    #[serde(default)]
    pub sync_interval_secs: u64,
    /// BMCs read at once by a sweep (also bounded by `max_concurrent`).
    #[serde(default = "default_sync_concurrency")]
    pub sync_concurrency: usize,
    /// IPMI: how long one request waits for its answer, in milliseconds.
    #[serde(default = "default_ipmi_try_timeout_ms")]
    pub ipmi_try_timeout_ms: u64,
    /// IPMI: tries of a request that may be repeated.
    #[serde(default = "default_ipmi_tries")]
    pub ipmi_tries: u32,
    /// The command driver's templates; without them, machines on the
    /// `command` driver get a configuration error.
    #[serde(default)]
    pub command: Option<CommandTemplates>,
}

fn default_deadline_secs() -> u64 {
    30
}
fn default_max_concurrent() -> usize {
    64
}
fn default_auth_failure_limit() -> u32 {
    3
}
fn default_sync_concurrency() -> usize {
    32
}
fn default_ipmi_try_timeout_ms() -> u64 {
    1000
}
fn default_ipmi_tries() -> u32 {
    3
}

impl Default for BmcSettings {
    fn default() -> Self {
        BmcSettings {
            deadline_secs: default_deadline_secs(),
            max_concurrent: default_max_concurrent(),
            auth_failure_limit: default_auth_failure_limit(),
            sync_interval_secs: 0,
            sync_concurrency: default_sync_concurrency(),
            ipmi_try_timeout_ms: default_ipmi_try_timeout_ms(),
            ipmi_tries: default_ipmi_tries(),
            command: None,
        }
    }
}

impl BmcSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.deadline_secs == 0 {
            return Err("deadline_secs must be at least 1".into());
        }
        if self.max_concurrent == 0 {
            return Err("max_concurrent must be at least 1".into());
        }
        if self.sync_concurrency == 0 {
            return Err("sync_concurrency must be at least 1".into());
        }
        if !(1..=3).contains(&self.auth_failure_limit) {
            return Err(format!(
                "auth_failure_limit is {}; it must be 1 to 3 (more tries walk BMCs into their account lock-out)",
                self.auth_failure_limit
            ));
        }
        if self.ipmi_try_timeout_ms == 0 || self.ipmi_tries == 0 {
            return Err("ipmi_try_timeout_ms and ipmi_tries must be at least 1".into());
        }
        if let Some(c) = &self.command {
            c.validate().map_err(|e| format!("[bmc.command] {e}"))?;
        }
        Ok(())
    }

    pub fn deadline(&self) -> Duration {
        Duration::from_secs(self.deadline_secs)
    }
}

/// One thing to do with a BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Status,
    Power(PowerAction),
    BootDevice { device: BootDevice, once: bool, uefi: bool },
    Check,
}

impl Op {
    /// The audit action, or `None` for reads that are not recorded.
    fn audit_action(self) -> Option<&'static str> {
        match self {
            Op::Status => None,
            Op::Power(_) => Some("bmc.power"),
            Op::BootDevice { .. } => Some("bmc.bootdev"),
            Op::Check => Some("bmc.check"),
        }
    }
}

/// What an [`Op`] gave back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutput {
    Status(PowerState),
    Done,
    Check(BmcCheck),
}

/// A failed BMC call as the caller sees it; the message holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmcFailure {
    pub kind: BmcErrorKind,
    pub message: String,
    /// This failure put the machine in maintenance.
    pub entered_maintenance: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BmcCallError {
    #[error("machine {0} has no BMC: set one with `kiln machine edit` or the API")]
    NoBmc(String),
    #[error(
        "machine {hostname} is in maintenance ({reason}); kiln sends nothing to its BMC until maintenance is cleared"
    )]
    Maintenance { hostname: String, reason: String },
    #[error("the BMC of {hostname} is busy: no turn within the {waited:?} deadline")]
    Busy { hostname: String, waited: Duration },
    #[error("{}", .0.message)]
    Bmc(BmcFailure),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the BMC password of {hostname} cannot be opened")]
    Secret {
        hostname: String,
        #[source]
        err: SecretError,
    },
}

/// Per-key async locks whose entries go away when nobody holds or waits.
#[derive(Debug, Default)]
struct KeyedLocks {
    map: Mutex<HashMap<MachineId, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds one key's lock; on drop, removes the entry if it was the last user.
struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: MachineId,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    async fn lock(&self, key: MachineId) -> KeyedGuard<'_> {
        let m = self.map.lock().expect("keyed lock map").entry(key).or_default().clone();
        let guard = m.lock_owned().await;
        KeyedGuard {
            locks: self,
            key,
            guard: Some(guard),
        }
    }

    fn len(&self) -> usize {
        self.map.lock().expect("keyed lock map").len()
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.map.lock().expect("keyed lock map");
        // Only the map's own reference left: nobody holds or waits.
        if map.get(&self.key).is_some_and(|m| Arc::strong_count(m) == 1) {
            map.remove(&self.key);
        }
    }
}

/// A driver built for one call. IPMI stays concrete for `bmc check`, which
/// reports the negotiated cipher suite.
#[derive(Debug)]
enum Built {
    Ipmi(IpmiDriver),
    Other(Box<dyn BmcDriver>),
}

impl Built {
    fn driver(&self) -> &dyn BmcDriver {
        match self {
            Built::Ipmi(d) => d,
            Built::Other(d) => d.as_ref(),
        }
    }
}

/// What a power sweep found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub read: usize,
    pub drifted: usize,
    pub failed: usize,
    /// Machines without a BMC or in maintenance: not asked.
    pub skipped: usize,
}

#[derive(Debug)]
pub struct BmcService {
    store: Store,
    secrets: SecretBox,
    settings: BmcSettings,
    templates: Option<Arc<CommandTemplates>>,
    global: Arc<Semaphore>,
    locks: KeyedLocks,
    /// Authentication failures in a row, per machine (in memory).
    auth_failures: Mutex<HashMap<MachineId, u32>>,
    /// The power state kiln last read or set, per machine (in memory):
    /// what drift is measured against.
    known_power: Mutex<HashMap<MachineId, PowerState>>,
    drifts: std::sync::atomic::AtomicUsize,
    /// Redfish logins kept from one call to the next (see
    /// `kiln_bmc::redfish::Sessions`).
    redfish_sessions: Arc<Sessions>,
}

impl BmcService {
    pub fn new(store: Store, secrets: SecretBox, settings: BmcSettings) -> BmcService {
        BmcService {
            store,
            secrets,
            templates: settings.command.clone().map(Arc::new),
            global: Arc::new(Semaphore::new(settings.max_concurrent)),
            settings,
            locks: KeyedLocks::default(),
            auth_failures: Mutex::default(),
            known_power: Mutex::default(),
            drifts: Default::default(),
            redfish_sessions: Arc::default(),
        }
    }

    pub fn settings(&self) -> &BmcSettings {
        &self.settings
    }

    /// Ends the Redfish sessions kept for later calls (the server stops),
    /// within `wait`.
    pub async fn close_sessions(&self, wait: Duration) {
        let kept = self.redfish_sessions.len();
        if kept > 0 {
            let closed = self.redfish_sessions.close_all(wait).await;
            tracing::info!(kept, closed, "Redfish sessions closed");
        }
    }

    /// Machines with a call running or queued (for tests and metrics).
    pub fn machines_in_flight(&self) -> usize {
        self.locks.len()
    }

    /// Runs `op` on the BMC of machine `id` for `actor`, with the deadline,
    /// the concurrency bounds and the maintenance rule; records the action.
    pub async fn call(&self, actor: &Actor, id: MachineId, op: Op) -> Result<OpOutput, BmcCallError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.settings.deadline();
        let busy = |hostname: String| BmcCallError::Busy {
            hostname,
            waited: started.elapsed(),
        };
        let _turn = match tokio::time::timeout_at(deadline, self.locks.lock(id)).await {
            Ok(g) => g,
            Err(_) => return Err(busy(id.to_string())),
        };
        let _slot: OwnedSemaphorePermit =
            match tokio::time::timeout_at(deadline, self.global.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => return Err(busy(id.to_string())),
            };
        // Read under the lock: a call that queued behind the failure that
        // put the machine in maintenance must see it.
        let (machine, sealed) = self.store.machine_with_bmc_password(id).await?;
        let Some(bmc) = machine.bmc.clone() else {
            return Err(BmcCallError::NoBmc(machine.hostname.to_string()));
        };
        if machine.maintenance
            && let Some(reason) = machine
                .maintenance_reason
                .as_ref()
                .filter(|r| r.starts_with(AUTH_MAINTENANCE_PREFIX))
        {
            return Err(BmcCallError::Maintenance {
                hostname: machine.hostname.to_string(),
                reason: reason.clone(),
            });
        }
        let password = match sealed {
            Some(sealed) => Some(self.secrets.open(&sealed).map_err(|err| BmcCallError::Secret {
                hostname: machine.hostname.to_string(),
                err,
            })?),
            None => None,
        };
        let result = match self.driver_for(&machine, password.clone(), deadline).await {
            Ok(built) => match tokio::time::timeout_at(deadline, run_op(&built, op)).await {
                Ok(r) => r,
                Err(_) => Err(deadline_error(&machine, op, started.elapsed())),
            },
            Err(e) => Err(e),
        };
        let elapsed = started.elapsed();
        let scrub = |e: &BmcError| redact(&e.to_string(), password.as_ref());
        let outcome = match result {
            Ok(mut out) => {
                if let OpOutput::Check(c) = &mut out {
                    c.hostname = machine.hostname.to_string();
                    c.driver = bmc.driver;
                    c.address = bmc.address.clone();
                    c.elapsed_ms = elapsed.as_millis() as u64;
                }
                self.auth_failures.lock().expect("auth map").remove(&id);
                Ok(out)
            }
            Err(e) => {
                let kind = e.kind();
                let message = scrub(&e);
                let entered = if kind == BmcErrorKind::AuthFailed {
                    self.auth_failed(&machine, &message).await
                } else {
                    false
                };
                Err(BmcFailure {
                    kind,
                    message,
                    entered_maintenance: entered,
                })
            }
        };
        let drift = match (&outcome, op) {
            (Ok(OpOutput::Status(s)), _) => self.observe(id, Some(*s)),
            (Ok(OpOutput::Check(c)), _) => self.observe(id, c.power),
            (Ok(_), Op::Power(PowerAction::On)) => self.set_known(id, Some(PowerState::On)),
            (Ok(_), Op::Power(PowerAction::Off)) => self.set_known(id, Some(PowerState::Off)),
            // Soft off may be ignored by the OS; a cycle passes through
            // off: the next read sets the baseline again.
            (_, Op::Power(_)) => self.set_known(id, None),
            _ => None,
        };
        if let Some((was, now)) = drift {
            self.drifts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.audit(
                actor,
                &machine,
                "bmc.power.drift",
                serde_json::json!({
                    "driver": bmc.driver, "address": bmc.address,
                    "expected": was, "observed": now,
                    "note": "the power changed outside kiln; kiln does not act on it",
                }),
            )
            .await;
            tracing::warn!(machine = %machine.hostname, expected = %was, observed = %now, "power drift");
        }
        if let Some(action) = op.audit_action() {
            let mut detail = serde_json::json!({
                "driver": bmc.driver,
                "address": bmc.address,
                "elapsed_ms": elapsed.as_millis() as u64,
            });
            if bmc.insecure {
                // Every action taken without checking the BMC's certificate
                // says so, not only the change that turned checking off.
                detail["tls_insecure"] = true.into();
            }
            match op {
                Op::Power(a) => detail["action"] = serde_json::json!(a),
                Op::BootDevice { device, once, uefi } => {
                    detail["device"] = serde_json::json!(device);
                    detail["once"] = once.into();
                    detail["uefi"] = uefi.into();
                }
                _ => {}
            }
            match &outcome {
                Ok(_) => detail["result"] = "ok".into(),
                Err(f) => {
                    detail["result"] = "failed".into();
                    detail["error_kind"] = format!("{:?}", f.kind).into();
                    detail["error"] = f.message.clone().into();
                    if f.entered_maintenance {
                        detail["maintenance"] = true.into();
                    }
                }
            }
            self.audit(actor, &machine, action, detail).await;
        }
        tracing::info!(
            machine = %machine.hostname, op = ?op, ok = outcome.is_ok(),
            elapsed_ms = elapsed.as_millis() as u64, "BMC call"
        );
        outcome.map_err(BmcCallError::Bmc)
    }

    /// Builds the driver the machine's `bmc.driver` names, timed to end by
    /// `deadline`.
    async fn driver_for(
        &self,
        machine: &Machine,
        password: Option<Password>,
        deadline: tokio::time::Instant,
    ) -> Result<Built, BmcError> {
        let bmc = machine.bmc.as_ref().expect("checked by the caller");
        match bmc.driver {
            DriverKind::Ipmi => {
                let budget = deadline.saturating_duration_since(tokio::time::Instant::now());
                let (address, user) = (bmc.address.clone(), bmc.username.clone().unwrap_or_default());
                let password = password.unwrap_or_else(|| Password::new(""));
                let (try_timeout, tries) = (
                    Duration::from_millis(self.settings.ipmi_try_timeout_ms),
                    self.settings.ipmi_tries,
                );
                // Resolving a host name blocks: not on the async workers.
                let d = tokio::task::spawn_blocking(move || IpmiDriver::new(&address, &user, password))
                    .await
                    .map_err(|e| BmcError::Config {
                        bmc: bmc.address.clone(),
                        detail: format!("resolving the address failed: {e}"),
                    })??;
                Ok(Built::Ipmi(d.with_timing(try_timeout, tries, budget)))
            }
            DriverKind::Redfish => {
                let mut cfg = RedfishConfig::new(
                    &bmc.address,
                    bmc.username.as_deref().unwrap_or_default(),
                    password.unwrap_or_else(|| Password::new("")),
                );
                // The system among several is the one with this machine's
                // UUID or serial, as its agent reported them.
                let dmi = machine.hardware.as_ref().and_then(|h| h.dmi.as_ref());
                cfg.machine_uuid = dmi.and_then(|d| d.uuid.as_deref()).and_then(|u| u.parse().ok());
                cfg.machine_serial = dmi.and_then(|d| d.serial.clone());
                // The machine's own TLS settings; a call with `insecure` on
                // says so in its audit event (see `call`).
                cfg.insecure = bmc.insecure;
                cfg.ca_pem = bmc.ca_cert.clone();
                cfg.deadline = deadline.saturating_duration_since(tokio::time::Instant::now());
                cfg.sessions = Some(self.redfish_sessions.clone());
                Ok(Built::Other(Box::new(RedfishDriver::new(cfg)?)))
            }
            DriverKind::Command => match &self.templates {
                Some(t) => Ok(Built::Other(Box::new(CommandDriver::new(t.clone(), machine, password)))),
                None => Err(BmcError::Config {
                    bmc: machine.hostname.to_string(),
                    detail: "the machine uses the command driver, but the server config has no [bmc.command] \
                             section (see docs/config.md)"
                        .into(),
                }),
            },
        }
    }

    /// Counts an authentication failure; at the limit, puts the machine in
    /// maintenance. Returns whether it did.
    async fn auth_failed(&self, machine: &Machine, message: &str) -> bool {
        let n = {
            let mut map = self.auth_failures.lock().expect("auth map");
            let n = map.entry(machine.id).or_insert(0);
            *n += 1;
            *n
        };
        if n < self.settings.auth_failure_limit {
            tracing::warn!(machine = %machine.hostname, failures = n, "BMC authentication failed");
            return false;
        }
        let short: String = message.chars().take(300).collect();
        let reason = format!(
            "{AUTH_MAINTENANCE_PREFIX} {n} times in a row ({short}); fix the BMC user or password \
             (kiln machine edit {host} --bmc-password …), then clear maintenance",
            host = machine.hostname
        );
        let patch = MachinePatch {
            maintenance: Some(true),
            maintenance_reason: Some(Some(reason)),
            ..MachinePatch::default()
        };
        match self
            .store
            .update_machine(&Actor::new("kiln (bmc)"), &machine.id.to_string(), patch, None, None)
            .await
        {
            Ok(_) => {
                // Cleared maintenance starts a fresh count.
                self.auth_failures.lock().expect("auth map").remove(&machine.id);
                tracing::warn!(machine = %machine.hostname, failures = n, "BMC authentication failed: machine put in maintenance");
                true
            }
            Err(e) => {
                tracing::error!(machine = %machine.hostname, error = %e, "cannot put the machine in maintenance");
                false
            }
        }
    }

    /// Notes a power reading; returns `(was, now)` when it differs from
    /// what kiln last saw or set.
    fn observe(&self, id: MachineId, state: Option<PowerState>) -> Option<(PowerState, PowerState)> {
        let state = state?;
        let mut map = self.known_power.lock().expect("power map");
        match map.insert(id, state) {
            Some(was) if was != state => Some((was, state)),
            _ => None,
        }
    }

    fn set_known(&self, id: MachineId, state: Option<PowerState>) -> Option<(PowerState, PowerState)> {
        let mut map = self.known_power.lock().expect("power map");
        match state {
            Some(s) => map.insert(id, s),
            None => map.remove(&id),
        };
        None
    }

    async fn audit(&self, actor: &Actor, machine: &Machine, action: &str, detail: serde_json::Value) {
        if let Err(e) = self
            .store
            .record_event(
                actor,
                action,
                "machine",
                machine.id.to_string(),
                machine.hostname.to_string(),
                detail,
            )
            .await
        {
            tracing::error!(machine = %machine.hostname, action, error = %e, "cannot record the audit event");
        }
    }

    /// One power sweep: reads every machine with a BMC that is not in
    /// maintenance, `sync_concurrency` at a time.
    pub async fn sync_once(&self) -> Result<SyncReport, StoreError> {
        let machines = self.store.all_machines().await?;
        let actor = Actor::new("kiln (power sync)");
        let mut report = SyncReport::default();
        let targets: Vec<MachineId> = machines
            .iter()
            .filter(|m| m.bmc.is_some() && !m.maintenance)
            .map(|m| m.id)
            .collect();
        report.skipped = machines.len() - targets.len();
        let drifts_before = self.drift_count();
        let results: Vec<bool> = futures::stream::iter(targets)
            .map(|id| {
                let actor = &actor;
                async move { self.call(actor, id, Op::Status).await.is_ok() }
            })
            .buffer_unordered(self.settings.sync_concurrency)
            .collect()
            .await;
        report.read = results.iter().filter(|ok| **ok).count();
        report.failed = results.len() - report.read;
        report.drifted = self.drift_count() - drifts_before;
        tracing::info!(
            read = report.read,
            failed = report.failed,
            drifted = report.drifted,
            skipped = report.skipped,
            "power sync"
        );
        Ok(report)
    }

    /// Drift events recorded since start.
    pub fn drift_count(&self) -> usize {
        self.drifts.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Runs power sweeps every `sync_interval_secs` until `shutdown`.
pub async fn run_sync(service: Arc<BmcService>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let every = Duration::from_secs(service.settings.sync_interval_secs);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = service.sync_once().await {
            tracing::error!(error = %e, "power sync could not list the machines");
        }
    }
}

async fn run_op(built: &Built, op: Op) -> Result<OpOutput, BmcError> {
    let d = built.driver();
    match op {
        Op::Status => Ok(OpOutput::Status(state_of(d.power_status().await?))),
        Op::Power(a) => {
            d.power(action_of(a)).await?;
            Ok(OpOutput::Done)
        }
        Op::BootDevice { device, once, uefi } => {
            let device = match device {
                BootDevice::Network => kiln_bmc::BootDevice::Network,
                BootDevice::Disk => kiln_bmc::BootDevice::Disk,
                BootDevice::Cdrom => kiln_bmc::BootDevice::Cdrom,
                BootDevice::UefiHttp => kiln_bmc::BootDevice::UefiHttp,
            };
            let persistence = if once {
                BootPersistence::Once
            } else {
                BootPersistence::Persistent
            };
            let firmware = if uefi { BootFirmware::Uefi } else { BootFirmware::Bios };
            d.set_boot_device(device, persistence, firmware).await?;
            Ok(OpOutput::Done)
        }
        Op::Check => Ok(OpOutput::Check(check(built).await?)),
    }
}

/// `bmc check`: a session (and its cipher suite, for IPMI), the power
/// state and the identity. Any failure is the call's error, so that an
/// authentication failure is counted like any other; the API turns it into
/// a report.
async fn check(built: &Built) -> Result<BmcCheck, BmcError> {
    let cipher_suite = match built {
        Built::Ipmi(d) => Some(d.negotiated_suite().await?),
        Built::Other(_) => None,
    };
    let power = state_of(built.driver().power_status().await?);
    let identity = match built.driver().identity().await {
        Ok(id) => id,
        // No identity is not a failed check.
        Err(e) if e.kind() == BmcErrorKind::Unsupported => kiln_bmc::Identity::default(),
        Err(e) => return Err(e),
    };
    Ok(BmcCheck {
        hostname: String::new(),
        driver: DriverKind::Command,
        address: String::new(),
        ok: true,
        reachable: true,
        authenticated: true,
        cipher_suite,
        power: Some(power),
        serial: identity.serial,
        uuid: identity.uuid.map(|u| u.to_string()),
        error: None,
        elapsed_ms: 0,
    })
}

/// The report of a check that failed with `f`.
pub fn failed_check(machine: &Machine, f: &BmcFailure, elapsed: Duration) -> BmcCheck {
    let bmc = machine.bmc.as_ref();
    BmcCheck {
        hostname: machine.hostname.to_string(),
        driver: bmc.map_or(DriverKind::Command, |b| b.driver),
        address: bmc.map(|b| b.address.clone()).unwrap_or_default(),
        ok: false,
        reachable: !matches!(f.kind, BmcErrorKind::Unreachable | BmcErrorKind::Timeout),
        authenticated: false,
        cipher_suite: None,
        power: None,
        serial: None,
        uuid: None,
        error: Some(f.message.clone()),
        elapsed_ms: elapsed.as_millis() as u64,
    }
}

fn state_of(s: kiln_bmc::PowerState) -> PowerState {
    match s {
        kiln_bmc::PowerState::On => PowerState::On,
        kiln_bmc::PowerState::Off => PowerState::Off,
    }
}

fn action_of(a: PowerAction) -> kiln_bmc::PowerAction {
    match a {
        PowerAction::On => kiln_bmc::PowerAction::On,
        PowerAction::Off => kiln_bmc::PowerAction::Off,
        PowerAction::SoftOff => kiln_bmc::PowerAction::SoftOff,
        PowerAction::Cycle => kiln_bmc::PowerAction::Cycle,
        PowerAction::Reset => kiln_bmc::PowerAction::Reset,
    }
}

/// The error for a call the deadline cut short: an action that acts
/// (cycle, reset, soft off) may have happened.
fn deadline_error(machine: &Machine, op: Op, waited: Duration) -> BmcError {
    let bmc = machine.bmc.as_ref().map(|b| b.address.clone()).unwrap_or_default();
    match op {
        Op::Power(a) if !action_of(a).is_idempotent() => BmcError::OutcomeUnknown {
            bmc,
            action: a.to_string(),
            waited,
        },
        _ => BmcError::Timeout {
            bmc,
            step: format!("{op:?}"),
            waited,
            tries: 1,
        },
    }
}

/// `text` without the password in it (a command's stderr could echo it).
fn redact(text: &str, password: Option<&Password>) -> String {
    match password.map(|p| p.expose()).filter(|p| !p.is_empty()) {
        Some(p) => text.replace(p, "[redacted]"),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        let p = Password::new("hunter2");
        assert_eq!(redact("login hunter2 refused", Some(&p)), "login [redacted] refused");
        assert_eq!(redact("x", Some(&Password::new(""))), "x");
    }

    #[tokio::test]
    async fn keyed_locks_serialize_one_key_and_clean_up() {
        let locks = Arc::new(KeyedLocks::default());
        let a = MachineId::new();
        let b = MachineId::new();
        let g = locks.lock(a).await;
        // Another key is free.
        let gb = tokio::time::timeout(Duration::from_millis(100), locks.lock(b)).await;
        assert!(gb.is_ok());
        drop(gb);
        // The same key waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), locks.lock(a))
                .await
                .is_err()
        );
        drop(g);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), locks.lock(a))
                .await
                .is_ok()
        );
        assert_eq!(locks.len(), 0, "no entry is left behind");
    }
}
