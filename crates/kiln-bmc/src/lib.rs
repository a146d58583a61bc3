//! BMC drivers behind one trait: read and set a machine's power, choose its
//! next boot device, and read the identity its BMC reports.
//!
//! The engine talks to every BMC through [`BmcDriver`]; which driver a
//! machine gets is configuration (its `bmc.driver`), not a Cargo feature.
//! Drivers: [`ipmi::IpmiDriver`] (IPMI 2.0 RMCP+ spoken natively),
//! [`redfish::RedfishDriver`] (Redfish over verified HTTPS) and
//! [`command::CommandDriver`] (the operator's programs, argv templates,
//! never a shell); see `docs/bmc.md`.
//!
//! Every call has a deadline and bounded retries, and a call that could act
//! twice is never repeated blindly: see [`BmcError::OutcomeUnknown`].
//! Passwords travel as [`Password`], which never shows itself in `Debug`,
//! `Display` or logs.

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;

pub mod command;
pub mod ipmi;
pub mod redfish;

/// The BMC password. It is `kiln_types::Secret`: `Debug` and `Display`
/// print `[redacted]`; only [`Password::expose`] gives the value, and the
/// drivers call it only to key a MAC.
pub use kiln_types::Secret as Password;

/// Whether the machine is powered, as its BMC says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PowerState {
    On,
    Off,
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerState::On => "on",
            PowerState::Off => "off",
        })
    }
}

/// A power action.
///
/// `On` and `Off` *set a state*: doing them twice leaves the machine as
/// doing them once, so a driver may resend them when an answer is lost.
/// `SoftOff`, `Cycle` and `Reset` *are events*: a second one is a second
/// reboot (or a second ACPI button press), so a driver sends them once and
/// reports [`BmcError::OutcomeUnknown`] when the answer is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PowerAction {
    On,
    /// Hard power off.
    Off,
    /// ACPI power button: the OS shuts down if it listens.
    SoftOff,
    /// Off, then on again.
    Cycle,
    /// Hard reset, power stays on.
    Reset,
}

impl PowerAction {
    /// True if repeating the action changes nothing (it sets a state).
    pub fn is_idempotent(self) -> bool {
        matches!(self, PowerAction::On | PowerAction::Off)
    }
}

impl fmt::Display for PowerAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerAction::On => "power on",
            PowerAction::Off => "power off",
            PowerAction::SoftOff => "soft off",
            PowerAction::Cycle => "power cycle",
            PowerAction::Reset => "reset",
        })
    }
}

/// Where the machine should boot from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootDevice {
    /// PXE / network boot.
    Network,
    /// The default hard disk.
    Disk,
    /// The default CD/DVD drive.
    Cdrom,
    /// UEFI HTTP boot: the firmware fetches its boot program over HTTP(S)
    /// instead of TFTP. UEFI only; Redfish has it (`UefiHttp`), IPMI's boot
    /// flags have no such device.
    UefiHttp,
}

/// For the next boot only, or until changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootPersistence {
    Once,
    Persistent,
}

/// Which firmware boot path the override is for: a UEFI machine given a
/// legacy (BIOS) override may boot in compatibility mode or ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootFirmware {
    Bios,
    Uefi,
}

/// What the BMC reports about the machine, where it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub serial: Option<String>,
    pub uuid: Option<uuid::Uuid>,
}

/// What kind of failure a [`BmcError`] is, for callers that decide on it
/// (the engine puts a machine in maintenance after repeated `AuthFailed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BmcErrorKind {
    Unreachable,
    Timeout,
    OutcomeUnknown,
    AuthFailed,
    Unsupported,
    Protocol,
    Config,
}

/// A BMC call that failed. Every variant names the BMC; none carries the
/// password.
#[derive(Debug, thiserror::Error)]
pub enum BmcError {
    #[error(
        "BMC {bmc} is unreachable: {reason} (check the address and port, and that the BMC's IPMI-over-LAN or Redfish service is enabled)"
    )]
    Unreachable { bmc: String, reason: String },

    #[error(
        "BMC {bmc} did not answer {step} within {waited:?} ({tries} tries): check the address, port and network path"
    )]
    Timeout {
        bmc: String,
        step: String,
        waited: Duration,
        tries: u32,
    },

    #[error(
        "BMC {bmc} did not confirm {action} within {waited:?}; it may or may not have been carried out, and it is not repeated blindly: read the power state before acting again"
    )]
    OutcomeUnknown {
        bmc: String,
        action: String,
        waited: Duration,
    },

    #[error("BMC {bmc} refused user {user:?}: {reason}")]
    AuthFailed { bmc: String, user: String, reason: String },

    #[error("BMC {bmc} does not support what kiln needs: {what}")]
    Unsupported { bmc: String, what: String },

    #[error("BMC {bmc}: protocol error during {step}: {detail}")]
    Protocol { bmc: String, step: String, detail: String },

    #[error("BMC {bmc}: bad driver configuration: {detail}")]
    Config { bmc: String, detail: String },
}

impl BmcError {
    pub fn kind(&self) -> BmcErrorKind {
        match self {
            BmcError::Unreachable { .. } => BmcErrorKind::Unreachable,
            BmcError::Timeout { .. } => BmcErrorKind::Timeout,
            BmcError::OutcomeUnknown { .. } => BmcErrorKind::OutcomeUnknown,
            BmcError::AuthFailed { .. } => BmcErrorKind::AuthFailed,
            BmcError::Unsupported { .. } => BmcErrorKind::Unsupported,
            BmcError::Protocol { .. } => BmcErrorKind::Protocol,
            BmcError::Config { .. } => BmcErrorKind::Config,
        }
    }
}

/// One machine's BMC. Each call opens what it needs (an IPMI session),
/// does its work within the driver's deadline and closes it again, so a
/// driver value holds no connection and can be shared.
///
/// Methods return boxed futures so that the engine can hold drivers of
/// different kinds as `Box<dyn BmcDriver>`.
pub trait BmcDriver: Send + Sync + fmt::Debug {
    fn power_status(&self) -> BoxFuture<'_, Result<PowerState, BmcError>>;

    fn power(&self, action: PowerAction) -> BoxFuture<'_, Result<(), BmcError>>;

    fn set_boot_device(
        &self,
        device: BootDevice,
        persistence: BootPersistence,
        firmware: BootFirmware,
    ) -> BoxFuture<'_, Result<(), BmcError>>;

    /// Serial number and UUID, each where the BMC gives it.
    fn identity(&self) -> BoxFuture<'_, Result<Identity, BmcError>>;
}
