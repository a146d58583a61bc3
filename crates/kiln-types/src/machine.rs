//! Machines: their kind, lifecycle state, BMC, NICs, addresses and the
//! hardware inventory the agent reports; the create / patch / filter shapes.

use std::net::{Ipv4Addr, Ipv6Addr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::catalog::Arch;
use crate::{Fqdn, Hostname, JobId, MacAddr, MachineId, OsImageId, RackId, Secret, validate::Tag};

/// Declares a string-valued enum with serde, `Display`, `FromStr` (whose
/// error lists the accepted values) and `ALL`.
#[macro_export]
macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:tt),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
                 serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        "unknown {} `{}`: expected one of {}",
                        stringify!($name), other,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

string_enum!(
    /// Physical server or virtual machine.
    MachineKind { Physical = "physical", Virtual = "virtual" }
);

string_enum!(
    /// Where a machine is in its life. Maintenance is a separate flag, not a
    /// state: a deployed machine in maintenance is still deployed.
    MachineState {
        New = "new",
        Discovering = "discovering",
        Ready = "ready",
        Deploying = "deploying",
        Deployed = "deployed",
        Reimaging = "reimaging",
        Failed = "failed",
        Decommissioned = "decommissioned",
    }
);

string_enum!(
    /// How kiln talks to a machine's BMC.
    BmcDriver { Ipmi = "ipmi", Redfish = "redfish", Command = "command" }
);

string_enum!(
    /// How the machine's firmware boots: UEFI, or legacy BIOS (also a
    /// UEFI firmware's CSM). Decides the mode a BMC sets the next boot
    /// device in and the boot partition a layout makes.
    FirmwareMode { Uefi = "uefi", Bios = "bios" }
);

string_enum!(
    /// How a machine boots in normal operation. `disk`: from its disk; a
    /// reimage sets a one-time network boot, then the disk again.
    /// `always-netboot`: always from the network, and kiln's answer decides
    /// (its local disk, or an installer while a job is armed); a reimage
    /// never changes its boot device, only its power.
    BootPolicy { Disk = "disk", AlwaysNetboot = "always-netboot" }
);

// By hand: `string_enum!` owns the derive list.
#[allow(clippy::derivable_impls)]
impl Default for BootPolicy {
    fn default() -> Self {
        BootPolicy::Disk
    }
}

impl BootPolicy {
    fn is_default(&self) -> bool {
        *self == BootPolicy::Disk
    }
}

/// The machine's firmware, as the agent last reported it or an operator
/// set it (for a machine never inventoried).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Firmware {
    pub mode: FirmwareMode,
    /// UEFI Secure Boot is on. Always off on BIOS.
    #[serde(default)]
    pub secure_boot: bool,
}

impl Firmware {
    pub fn validate(&self) -> Result<(), String> {
        if self.mode == FirmwareMode::Bios && self.secure_boot {
            return Err("firmware.secure_boot needs mode `uefi`: BIOS has no Secure Boot".into());
        }
        Ok(())
    }
}

/// The OS a reimage installed, recorded when the new OS phoned home
/// (stage 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstalledOs {
    pub os_image: OsImageId,
    pub name: String,
    pub version: String,
    /// The image's SHA-256 as the catalog had it, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub job_id: JobId,
    pub installed_at: DateTime<Utc>,
}

/// BMC settings as given by an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BmcInput {
    pub driver: BmcDriver,
    /// `host` or `host:port` (IPMI, port 623 by default), an `http(s)://` URL
    /// (Redfish), or a name handed to the command templates.
    pub address: String,
    #[serde(default)]
    pub username: Option<String>,
    /// Stored encrypted; on update, leave it out to keep the current one.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Redfish over https only: accept the BMC's TLS certificate without
    /// checking it. Explicit per BMC; every change of it is in the audit
    /// log, and so is every BMC call made with it on.
    #[serde(default)]
    pub insecure: bool,
    /// Redfish over https only: CA certificate(s) in PEM to trust for this
    /// BMC besides the system's, e.g. the site CA that signed the BMCs'
    /// certificates. Certificates only, never a private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
}

/// The most text `bmc.ca_cert` may hold: room for a chain of a few
/// certificates, not for a bundle of every public CA.
pub const MAX_CA_CERT_LEN: usize = 64 * 1024;

impl BmcInput {
    /// A BMC with just a driver and an address (no user, password or TLS
    /// settings).
    pub fn new(driver: BmcDriver, address: &str) -> Self {
        BmcInput {
            driver,
            address: address.to_string(),
            username: None,
            password: None,
            insecure: false,
            ca_cert: None,
        }
    }

    /// Checks the address against what the driver expects, and the TLS
    /// settings against the driver and address. The CA certificate's shape
    /// only (PEM with CERTIFICATE blocks and no key): the server parses
    /// the certificates themselves.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_address()?;
        self.validate_tls()
    }

    fn validate_tls(&self) -> Result<(), String> {
        if !(self.insecure || self.ca_cert.is_some()) {
            return Ok(());
        }
        let what = if self.insecure { "bmc.insecure" } else { "bmc.ca_cert" };
        if self.driver != BmcDriver::Redfish {
            // Refused rather than ignored: an operator who sets it expects it
            // to do something, and the audit log would show a flag that
            // changed nothing.
            return Err(format!(
                "{what} applies to the redfish driver only (it is about checking a BMC's TLS certificate, and \
                 the {} driver makes no TLS connection): leave it out",
                self.driver
            ));
        }
        if !self.address.trim().starts_with("https://") {
            return Err(format!(
                "{what} needs an https:// address: `{}` has no TLS to check",
                self.address.trim()
            ));
        }
        if self.insecure && self.ca_cert.is_some() {
            return Err(
                "give bmc.ca_cert or bmc.insecure, not both: insecure checks no certificate, so the CA would be \
                 ignored"
                    .into(),
            );
        }
        if let Some(pem) = &self.ca_cert {
            check_pem_shape(pem)?;
        }
        Ok(())
    }

    fn validate_address(&self) -> Result<(), String> {
        let a = self.address.trim();
        if a.is_empty() {
            return Err("bmc.address is empty".into());
        }
        if a.len() > 255 {
            return Err("bmc.address is longer than 255 characters".into());
        }
        if self.password.as_ref().is_some_and(|p| p.expose().is_empty()) {
            return Err("bmc.password is empty: leave it out instead".into());
        }
        match self.driver {
            BmcDriver::Redfish => {
                if !(a.starts_with("https://") || a.starts_with("http://")) {
                    return Err(format!(
                        "bmc.address `{a}` is not a URL: the redfish driver wants \
                         https://HOST[:PORT][/redfish/v1/Systems/ID]"
                    ));
                }
            }
            BmcDriver::Ipmi => {
                if a.contains("://") || a.contains('/') || a.contains(char::is_whitespace) {
                    return Err(format!(
                        "bmc.address `{a}` is not a host: the ipmi driver wants HOST or HOST:PORT"
                    ));
                }
                if let Some((host, port)) = a.rsplit_once(':')
                    && !host.contains(':')
                    && port.parse::<u16>().map_or(true, |p| p == 0)
                {
                    return Err(format!("bmc.address `{a}`: `{port}` is not a port (1-65535)"));
                }
            }
            BmcDriver::Command => {}
        }
        Ok(())
    }
}

/// What `bmc.ca_cert` must look like before the server parses it: PEM
/// text with at least one CERTIFICATE block and no private key.
fn check_pem_shape(pem: &str) -> Result<(), String> {
    if pem.len() > MAX_CA_CERT_LEN {
        return Err(format!(
            "bmc.ca_cert is {} bytes; the most is {MAX_CA_CERT_LEN}: give the CA that signed this BMC's \
             certificate, not a bundle",
            pem.len()
        ));
    }
    if pem.contains("PRIVATE KEY-----") {
        // Said without quoting the text: it is a secret.
        return Err(
            "bmc.ca_cert holds a private key: give only the CA's certificate (and treat that key as \
                    exposed)"
                .into(),
        );
    }
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(
            "bmc.ca_cert is not a PEM certificate: it must hold a -----BEGIN CERTIFICATE----- block \
                    (convert a DER file with `openssl x509 -inform der -in FILE`)"
                .into(),
        );
    }
    Ok(())
}

/// BMC settings as shown: never the password, only whether one is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Bmc {
    pub driver: BmcDriver,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    pub password_set: bool,
    /// TLS certificate checks are off for this BMC (redfish). Always
    /// shown, so that an audit event's before/after shows it change.
    #[serde(default)]
    pub insecure: bool,
    /// The CA certificate(s) (PEM) trusted for this BMC besides the
    /// system's. Public, like any certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
}

/// A network interface and where it is plugged in.
///
/// Known by its MAC, by its switch port (the relay's option 82
/// `circuit_id` and/or `remote_id`), or both. A NIC enrolled by port only
/// gets its MAC recorded when its first relayed DHCP request arrives
/// (`kiln_boot::port`); HTTP boot, discovery and the agent then know it by
/// that MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// Absent for a NIC enrolled by switch port whose MAC kiln has not
    /// seen yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// Interface name as the OS sees it (`eno1`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The switch this NIC is cabled to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
    /// The switch port (`xe-0/0/12`); unique per switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// DHCP relay option 82 circuit-id that identifies this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_id: Option<String>,
    /// DHCP relay option 82 remote-id (usually the switch) for this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_id: Option<String>,
}

impl Nic {
    /// A NIC known by its MAC only.
    pub fn with_mac(mac: MacAddr) -> Nic {
        Nic {
            mac: Some(mac),
            name: None,
            switch: None,
            port: None,
            vlan: None,
            circuit_id: None,
            remote_id: None,
        }
    }

    /// A NIC known by its switch port only: its MAC is learned later.
    pub fn by_port(circuit_id: Option<String>, remote_id: Option<String>) -> Nic {
        Nic {
            mac: None,
            circuit_id,
            remote_id,
            ..Nic::with_mac(MacAddr([0; 6]))
        }
    }

    /// Whether the NIC is enrolled by the relay's view of its port.
    pub fn has_port_identity(&self) -> bool {
        self.circuit_id.is_some() || self.remote_id.is_some()
    }

    /// How messages name this NIC: its MAC, else its port identity.
    pub fn label(&self) -> String {
        match (&self.mac, &self.circuit_id, &self.remote_id) {
            (Some(mac), _, _) => mac.to_string(),
            (None, c, r) => port_label(c.as_deref(), r.as_deref()),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.mac.is_none() && !self.has_port_identity() {
            return Err(
                "a nic needs a `mac` or a switch-port identity (`circuit_id` and/or `remote_id`, as the DHCP relay \
                 reports them in option 82)"
                    .into(),
            );
        }
        if self.port.is_some() && self.switch.is_none() {
            return Err(format!(
                "nic {}: a port needs its switch (give both `switch` and `port`)",
                self.label()
            ));
        }
        if let Some(v) = self.vlan
            && !(1..=4094).contains(&v)
        {
            return Err(format!("nic {}: vlan {v} is outside 1-4094", self.label()));
        }
        for (name, v) in [
            ("name", &self.name),
            ("switch", &self.switch),
            ("port", &self.port),
            ("circuit_id", &self.circuit_id),
            ("remote_id", &self.remote_id),
        ] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > 255)
            {
                return Err(format!("nic {}: {name} must have 1 to 255 characters", self.label()));
            }
        }
        Ok(())
    }
}

/// A switch port as the relay names it: `circuit-id C remote-id R`.
pub fn port_label(circuit_id: Option<&str>, remote_id: Option<&str>) -> String {
    match (circuit_id, remote_id) {
        (Some(c), Some(r)) => format!("circuit-id {c} remote-id {r}"),
        (Some(c), None) => format!("circuit-id {c}"),
        (None, Some(r)) => format!("remote-id {r}"),
        (None, None) => "(no port identity)".into(),
    }
}

/// A switch port that showed another MAC than the one kiln learned or was
/// given for it (the server behind it was swapped, or a cable moved).
/// While it is set the machine is never installed: its boot answer is the
/// local disk and a reimage is refused, until an operator confirms the new
/// MAC (`kiln machine confirm-port HOST`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortAlert {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_id: Option<String>,
    /// The MAC on record for the NIC on that port.
    pub recorded_mac: MacAddr,
    /// The MAC the port showed.
    pub seen_mac: MacAddr,
    pub seen_at: DateTime<Utc>,
}

impl PortAlert {
    /// Why the machine is not installed, for refusals and boot answers.
    pub fn reason(&self) -> String {
        format!(
            "switch port {} showed MAC {} where {} was on record (was the server swapped?): nothing is installed \
             until an operator confirms the port with `kiln machine confirm-port HOST`",
            port_label(self.circuit_id.as_deref(), self.remote_id.as_deref()),
            self.seen_mac,
            self.recorded_mac
        )
    }
}

/// One disk as the agent found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Disk {
    /// Kernel name (`sda`, `nvme0n1`).
    pub name: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub rotational: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Stable `/dev/disk/by-id/…` path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_id: Option<String>,
}

impl Disk {
    /// Whether an operator's name for a disk — its serial, or its WWN
    /// (`0x5000c500a1b2c3d4`, `wwn-0x…`, `naa.…`, or a whole
    /// `/dev/disk/by-id/…` path) — is this disk. Compared case-insensitively.
    /// Kernel names (`sda`) are not stable across boots and never match.
    pub fn is_known_as(&self, id: &str) -> bool {
        let id = id.trim().to_ascii_lowercase();
        if id.is_empty() {
            return false;
        }
        if self
            .serial
            .as_deref()
            .is_some_and(|s| s.trim().eq_ignore_ascii_case(&id))
        {
            return true;
        }
        let Some(by_id) = self.by_id.as_deref().map(str::to_ascii_lowercase) else {
            return false;
        };
        let link = by_id.rsplit('/').next().unwrap_or_default();
        let wwn = match id.strip_prefix("naa.") {
            Some(hex) => format!("wwn-0x{hex}"),
            None if id.starts_with("wwn-") => id.clone(),
            None => format!("wwn-{id}"),
        };
        by_id == id || link == id || link == wwn
    }
}

/// Checks a system disk name: a serial or WWN of 1 to 128 printable
/// ASCII characters.
pub fn check_system_disk(id: &str) -> Result<(), String> {
    if id.trim().is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(format!(
            "system_disk `{}` is not a disk serial or WWN: give 1 to 128 printable ASCII characters",
            id.escape_debug()
        ));
    }
    Ok(())
}

/// A NIC as the agent found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HardwareNic {
    pub mac: MacAddr,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_mbps: Option<u32>,
    #[serde(default)]
    pub link: bool,
}

/// A GPU; `vgpu` marks a mediated (virtual) GPU or a vGPU-capable card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Gpu {
    pub model: String,
    #[serde(default)]
    pub vgpu: bool,
}

/// SMBIOS/DMI identity.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct Dmi {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// Hardware inventory, as reported by the net-booted agent (or imported).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct Hardware {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<Arch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    #[serde(default)]
    pub cpu_cores: u32,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub nics: Vec<HardwareNic>,
    #[serde(default)]
    pub gpus: Vec<Gpu>,
    /// A hardware RAID controller / HBA that presents the disks, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raid_controller: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmi: Option<Dmi>,
}

/// A machine as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Machine {
    pub id: MachineId,
    pub hostname: Hostname,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<Fqdn>,
    pub kind: MachineKind,
    pub state: MachineState,
    pub tags: Vec<Tag>,
    /// Owning tenant's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack_id: Option<RackId>,
    /// Never reprovisioned or deleted until the flag is cleared.
    pub protected: bool,
    pub maintenance: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bmc: Option<Bmc>,
    pub nics: Vec<Nic>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub ipv4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv6)]
    pub ipv6: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<Hardware>,
    /// Set when a NIC's switch port showed another MAC: the machine is not
    /// installed until an operator confirms (`PortAlert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_alert: Option<PortAlert>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Unknown until the agent reports it or an operator sets it; a
    /// reimage then sets boot devices in legacy (BIOS) mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    #[serde(default)]
    pub boot_policy: BootPolicy,
    /// What the last reimage installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_os: Option<InstalledOs>,
    /// The disk the one-disk layouts (`flat`, `lvm_hba`) put the OS on, by
    /// serial or WWN; set by operators (seed 004). None: the layout's
    /// default (`flat` the first disk, `lvm_hba` the smallest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_disk: Option<String>,
}

impl Machine {
    /// A machine with only a hostname, kind and state, stamped now: for
    /// tests, simulations and examples, never for the store.
    pub fn sketch(hostname: &str, kind: MachineKind, state: MachineState) -> Machine {
        let now = chrono::Utc::now();
        Machine {
            id: MachineId::new(),
            hostname: hostname.parse().expect("a valid hostname"),
            fqdn: None,
            kind,
            state,
            tags: vec![],
            owner: None,
            site: None,
            rack: None,
            rack_id: None,
            protected: false,
            maintenance: false,
            maintenance_reason: None,
            bmc: None,
            nics: vec![],
            ipv4: None,
            ipv6: None,
            hardware: None,
            port_alert: None,
            created_at: now,
            updated_at: now,
            firmware: None,
            boot_policy: BootPolicy::Disk,
            installed_os: None,
            system_disk: None,
        }
    }
}

/// A new machine. Only `hostname` is required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineCreate {
    pub hostname: Hostname,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<Fqdn>,
    #[serde(default = "default_kind")]
    pub kind: MachineKind,
    /// Defaults to `new`; give `ready` or `deployed` when enrolling machines
    /// that already run.
    #[serde(default = "default_state")]
    pub state: MachineState,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<Tag>,
    /// Owning tenant, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Site of the rack, by name; needed only when the rack name is not
    /// unique across sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Rack, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack: Option<String>,
    #[serde(default)]
    pub protected: bool,
    #[serde(default)]
    pub maintenance: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bmc: Option<BmcInput>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub ipv4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv6)]
    pub ipv6: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<Hardware>,
    /// For a machine never inventoried; the agent's report replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    #[serde(default, skip_serializing_if = "BootPolicy::is_default")]
    pub boot_policy: BootPolicy,
    /// The disk the one-disk layouts (`flat`, `lvm_hba`) put the OS on, by
    /// serial or WWN; set by operators (seed 004). None: the layout's
    /// default (`flat` the first disk, `lvm_hba` the smallest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_disk: Option<String>,
}

fn default_kind() -> MachineKind {
    MachineKind::Physical
}

fn default_state() -> MachineState {
    MachineState::New
}

impl MachineCreate {
    /// A machine with just a hostname; the rest at defaults.
    pub fn new(hostname: Hostname) -> Self {
        Self {
            hostname,
            fqdn: None,
            kind: default_kind(),
            state: default_state(),
            tags: vec![],
            owner: None,
            site: None,
            rack: None,
            protected: false,
            maintenance: false,
            maintenance_reason: None,
            bmc: None,
            nics: vec![],
            ipv4: None,
            ipv6: None,
            hardware: None,
            firmware: None,
            boot_policy: BootPolicy::Disk,
            system_disk: None,
        }
    }

    /// Checks what serde cannot: NICs, BMC address, duplicates inside the
    /// record. Returns every problem, one per entry.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = vec![];
        if let Some(bmc) = &self.bmc
            && let Err(e) = bmc.validate()
        {
            problems.push(e);
        }
        let mut macs = std::collections::HashSet::new();
        let mut ports = std::collections::HashSet::new();
        for nic in &self.nics {
            if let Err(e) = nic.validate() {
                problems.push(e);
            }
            if let Some(mac) = nic.mac
                && !macs.insert(mac)
            {
                problems.push(format!("nic {mac} is listed twice"));
            }
            if nic.has_port_identity() && !ports.insert((&nic.circuit_id, &nic.remote_id)) {
                problems.push(format!(
                    "{} is listed on two nics",
                    port_label(nic.circuit_id.as_deref(), nic.remote_id.as_deref())
                ));
            }
        }
        if let Some(fw) = &self.firmware
            && let Err(e) = fw.validate()
        {
            problems.push(e);
        }
        if self.rack.is_none() && self.site.is_some() {
            problems.push("`site` is given without `rack`: machines belong to a rack".into());
        }
        if let Some(disk) = &self.system_disk
            && let Err(e) = check_system_disk(disk)
        {
            problems.push(e);
        }
        problems
    }
}

/// Deserializes a field that may be absent (keep), `null` (clear) or a value
/// (set) into `Option<Option<T>>`.
fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// A partial update: absent fields are kept, `null` clears a nullable field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachinePatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<Hostname>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub fqdn: Option<Option<Fqdn>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<MachineKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<MachineState>,
    /// Replaces the whole tag list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<Tag>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub owner: Option<Option<String>>,
    /// Site of `rack`, when the rack name is not unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub rack: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<bool>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub maintenance_reason: Option<Option<String>>,
    /// Replaces the BMC; a missing password keeps the stored one.
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<BmcInput>)]
    pub bmc: Option<Option<BmcInput>>,
    /// Replaces the whole NIC list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nics: Option<Vec<Nic>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub ipv4: Option<Option<Ipv4Addr>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub ipv6: Option<Option<Ipv6Addr>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Hardware>)]
    pub hardware: Option<Option<Hardware>>,
    /// `null` forgets it (unknown: legacy boot devices).
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Firmware>)]
    pub firmware: Option<Option<Firmware>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_policy: Option<BootPolicy>,
    /// The system disk by serial or WWN; `null` clears it.
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub system_disk: Option<Option<String>>,
}

/// Filters for listing machines; all given filters must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams, ToSchema)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MachineFilter {
    /// Comma-separated tags; a machine must carry all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Rack name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack: Option<String>,
    /// Site name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<String>)]
    pub state: Option<MachineState>,
    /// Owning tenant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Substring of the hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// Firmware mode (`uefi`, `bios`); machines of unknown firmware match
    /// neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<String>)]
    pub firmware: Option<FirmwareMode>,
    /// Installed OS: `NAME` or `NAME:VERSION`, as recorded at its last
    /// reimage's stage 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// Bulk create: all machines or none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineBulkCreate {
    pub machines: Vec<MachineCreate>,
}

/// What a machine can be (re)installed with: the reinstall form's choices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MachineOffer {
    pub os_images: Vec<crate::catalog::OsImage>,
    pub tasks: Vec<crate::catalog::Task>,
    pub layouts: Vec<crate::catalog::LayoutInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_distinguishes_absent_null_and_value() {
        let p: MachinePatch = serde_json::from_str(r#"{"fqdn": null}"#).unwrap();
        assert_eq!(p.fqdn, Some(None));
        let p: MachinePatch = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(p.fqdn, None);
        let p: MachinePatch = serde_json::from_str(r#"{"fqdn": "a.example.net"}"#).unwrap();
        assert_eq!(p.fqdn.unwrap().unwrap().as_str(), "a.example.net");
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = serde_json::from_str::<MachineCreate>(r#"{"hostname":"a","colour":"red"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn bmc_addresses() {
        let bmc = BmcInput::new;
        assert!(bmc(BmcDriver::Ipmi, "10.0.0.1").validate().is_ok());
        assert!(bmc(BmcDriver::Ipmi, "bmc1.example:623").validate().is_ok());
        assert!(bmc(BmcDriver::Ipmi, "10.0.0.1:0").validate().is_err());
        assert!(bmc(BmcDriver::Ipmi, "https://x").validate().is_err());
        assert!(
            bmc(BmcDriver::Redfish, "https://10.0.0.1/redfish/v1/Systems/1")
                .validate()
                .is_ok()
        );
        assert!(bmc(BmcDriver::Redfish, "10.0.0.1").validate().is_err());
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn bmc_tls_settings() {
        let tls = |driver, address: &str, insecure: bool, ca: Option<&str>| {
            BmcInput {
                insecure,
                ca_cert: ca.map(str::to_string),
                ..BmcInput::new(driver, address)
            }
            .validate()
        };
        let rf = "https://10.0.0.1";
        assert_eq!(tls(BmcDriver::Redfish, rf, true, None), Ok(()));
        assert_eq!(tls(BmcDriver::Redfish, rf, false, Some(PEM)), Ok(()));
        let cases = [
            (
                tls(BmcDriver::Ipmi, "10.0.0.1", true, None),
                "applies to the redfish driver only",
            ),
            (
                tls(BmcDriver::Command, "pdu-1", false, Some(PEM)),
                "the command driver makes no TLS connection",
            ),
            (
                tls(BmcDriver::Redfish, "http://10.0.0.1", true, None),
                "needs an https:// address",
            ),
            (tls(BmcDriver::Redfish, rf, true, Some(PEM)), "not both"),
            (
                tls(BmcDriver::Redfish, rf, false, Some("MIIB")),
                "not a PEM certificate",
            ),
            (
                tls(
                    BmcDriver::Redfish,
                    rf,
                    false,
                    Some(&format!("{PEM}-----BEGIN PRIVATE KEY-----\nsecret\n")),
                ),
                "holds a private key",
            ),
            (
                tls(BmcDriver::Redfish, rf, false, Some(&PEM.repeat(2000))),
                "the most is 65536",
            ),
        ];
        for (got, says) in cases {
            let e = got.unwrap_err();
            assert!(e.contains(says), "{e} does not say {says}");
            assert!(!e.contains("secret"), "a key was quoted: {e}");
        }
        // Old clients' JSON has neither field: off and none.
        let b: BmcInput = serde_json::from_str(r#"{"driver": "redfish", "address": "https://h"}"#).unwrap();
        assert!(!b.insecure && b.ca_cert.is_none());
    }

    #[test]
    fn nic_rules() {
        let mut nic = Nic {
            mac: Some("52:54:00:00:00:01".parse().unwrap()),
            name: None,
            switch: None,
            port: Some("ge-0/0/1".into()),
            vlan: None,
            circuit_id: None,
            remote_id: None,
        };
        assert!(nic.validate().unwrap_err().contains("needs its switch"));
        nic.switch = Some("asw-a1".into());
        assert!(nic.validate().is_ok());
        nic.vlan = Some(5000);
        assert!(nic.validate().unwrap_err().contains("outside 1-4094"));
        nic.vlan = None;
        // Issue 15: a NIC may be enrolled by its port alone, but not by
        // nothing at all.
        nic.mac = None;
        assert!(
            nic.validate()
                .unwrap_err()
                .contains("needs a `mac` or a switch-port identity")
        );
        nic.remote_id = Some("asw-a1".into());
        assert!(nic.validate().is_ok(), "remote-id alone");
        nic.remote_id = None;
        nic.circuit_id = Some("ge-0/0/1".into());
        assert!(nic.validate().is_ok(), "circuit-id alone");
        let by_port: Nic = serde_json::from_str(r#"{"circuit_id": "ge-0/0/1"}"#).unwrap();
        assert_eq!(by_port.mac, None);
        assert_eq!(
            serde_json::to_value(&by_port).unwrap(),
            serde_json::json!({"circuit_id": "ge-0/0/1"})
        );
        let mut m = MachineCreate::new("m1".parse().unwrap());
        m.nics = vec![by_port.clone(), by_port];
        assert!(
            m.validate()
                .iter()
                .any(|p| p.contains("circuit-id ge-0/0/1 is listed on two nics")),
            "{:?}",
            m.validate()
        );
    }
}
