//! Power and boot device through a machine's BMC: the request and answer
//! shapes of `/api/v1/machines/{key}/power`, `…/bootdev` and `…/bmc/check`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::machine::BmcDriver;
use crate::string_enum;

string_enum!(
    /// What to do with a machine's power. `on` and `off` set a state (safe
    /// to repeat); `soft_off` (ACPI button), `cycle` and `reset` are events,
    /// never repeated blindly.
    PowerAction { On = "on", Off = "off", SoftOff = "soft_off", Cycle = "cycle", Reset = "reset" }
);

string_enum!(
    /// Whether a machine is powered, as its BMC says.
    PowerState { On = "on", Off = "off" }
);

string_enum!(
    /// Where a machine boots from next. `uefi_http` is UEFI HTTP boot (the
    /// firmware loads its boot program over HTTP(S)): UEFI only, and only
    /// on drivers that can name it (redfish; the command driver passes it
    /// on; IPMI cannot).
    BootDevice { Network = "network", Disk = "disk", Cdrom = "cdrom", UefiHttp = "uefi_http" }
);

/// `POST /api/v1/machines/{key}/power`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerRequest {
    pub action: PowerAction,
}

/// The power state read from the BMC just now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PowerStatus {
    pub hostname: String,
    pub state: PowerState,
}

/// A power action the BMC carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PowerResult {
    pub hostname: String,
    pub action: PowerAction,
    /// How long the BMC call took, in milliseconds.
    pub elapsed_ms: u64,
}

/// `PUT /api/v1/machines/{key}/bootdev`: the next boot device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootDeviceRequest {
    pub device: BootDevice,
    /// For the next boot only (default: until changed).
    #[serde(default)]
    pub once: bool,
    /// The override is for UEFI boot (default: legacy BIOS).
    #[serde(default)]
    pub uefi: bool,
}

impl BootDeviceRequest {
    /// Checks what serde cannot: UEFI HTTP boot exists in UEFI mode only.
    pub fn validate(&self) -> Result<(), String> {
        if self.device == BootDevice::UefiHttp && !self.uefi {
            return Err("device uefi_http boots in UEFI mode only: set `uefi: true`".into());
        }
        Ok(())
    }
}

/// The boot device the BMC accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BootDeviceResult {
    pub hostname: String,
    pub device: BootDevice,
    pub once: bool,
    pub uefi: bool,
    pub elapsed_ms: u64,
}

/// What `bmc check` found: each step as far as it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BmcCheck {
    pub hostname: String,
    pub driver: BmcDriver,
    pub address: String,
    /// Everything below worked.
    pub ok: bool,
    /// The BMC answered at all.
    pub reachable: bool,
    /// kiln's credentials were accepted.
    pub authenticated: bool,
    /// IPMI: the cipher suite the session used (17 or 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher_suite: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<PowerState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The first failure, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub elapsed_ms: u64,
}
