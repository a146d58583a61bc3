//! What kiln's agent (the static binary in the net-booted ramdisk) and the
//! server say to each other: the discovery report, and the deploy plan a
//! reimage job hands the agent.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::catalog::{ImageContent, StorageLayout};
use crate::install::{CryptHash, SshPublicKey};
use crate::machine::{Firmware, Hardware, MachineState};
use crate::{Hostname, JobId, MacAddr, MachineId, string_enum};

/// An LLDP neighbour seen on one of the machine's NICs: the switch port it
/// is plugged into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LldpNeighbor {
    /// The machine's NIC that saw it.
    pub mac: MacAddr,
    /// The switch's system name (or chassis id).
    pub switch: String,
    /// Its port id.
    pub port: String,
}

/// `POST /api/v1/discovery`: what the agent found, in discovery mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryReport {
    /// The NIC the machine booted from (`BOOTIF`), which the discovery
    /// token was made for.
    pub boot_mac: MacAddr,
    pub hardware: Hardware,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lldp: Vec<LldpNeighbor>,
    /// How the machine booted the agent (UEFI or BIOS, Secure Boot); absent
    /// from agents older than issue 15.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
}

/// The machine a discovery report created or updated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiscoveryResult {
    pub machine_id: MachineId,
    pub hostname: Hostname,
    pub state: MachineState,
    /// The report made a new machine (its MAC and DMI were unknown).
    pub created: bool,
}

string_enum!(
    /// How an image file is stored; the agent checks the file's magic
    /// against it before writing anything.
    ImageFormat { Raw = "raw", RawZstd = "raw+zstd", Qcow2 = "qcow2" }
);

// string_enum! derives no Default (most of its enums have none), so this
// cannot be `#[derive(Default)]` with `#[default]`.
#[allow(clippy::derivable_impls)]
impl Default for ImageFormat {
    fn default() -> Self {
        ImageFormat::Raw
    }
}

impl ImageFormat {
    /// The format an image's source names by its extension: `.qcow2`,
    /// `.zst` / `.zstd`, anything else raw.
    pub fn from_source(source: &str) -> ImageFormat {
        let s = source.to_ascii_lowercase();
        if s.ends_with(".qcow2") || s.ends_with(".qcow") {
            ImageFormat::Qcow2
        } else if s.ends_with(".zst") || s.ends_with(".zstd") {
            ImageFormat::RawZstd
        } else {
            ImageFormat::Raw
        }
    }
}

/// Who the machine must be before the agent writes anything: what the
/// inventory knows of it (absent values are not checked).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExpectedIdentity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Serials of the disks the inventory lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_serials: Vec<String>,
    /// The MACs on record for the machine's NICs (given, or learned from
    /// its switch port, issue 15): one of them must be in the machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub macs: Vec<crate::MacAddr>,
}

/// The image to write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageSource {
    pub url: String,
    pub format: ImageFormat,
    /// Lowercase hex SHA-256 of the image file as served.
    pub sha256: String,
    /// A root filesystem for the layout's root volume, or a whole disk for
    /// the system disk.
    #[serde(default)]
    pub content: ImageContent,
}

/// `GET /api/v1/jobs/{id}/plan`: what the deploy agent of a reimage does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeployPlan {
    pub job_id: JobId,
    pub hostname: Hostname,
    pub identity: ExpectedIdentity,
    /// A protected machine is never written to; the agent refuses.
    pub protected: bool,
    pub image: ImageSource,
    pub layout: StorageLayout,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub root_password_hash: Option<CryptHash>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub ssh_keys: Vec<SshPublicKey>,
    /// cloud-init NoCloud seed files for the new OS (with the job token in
    /// the query; fetch them, do not print them).
    pub user_data_url: String,
    pub meta_data_url: String,
    /// The seed's `network-config` (cloud-init v2), when the inventory has
    /// a network for the machine; absent: the new OS keeps its default
    /// (DHCP on its first NIC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config_url: Option<String>,
    /// POST `{stage_url}/{n}` with the job token to report stage `n`.
    pub stage_url: String,
    /// The machine's system disk (serial or WWN), for the layouts that put
    /// the OS on one disk; the agent refuses a plan naming a disk it lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_disk: Option<String>,
}
