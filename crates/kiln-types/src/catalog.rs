//! The install catalog: OS images, post-install tasks and storage layouts
//! with the disk rule each layout needs.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::agent::ImageFormat;
use crate::{OsImageId, TaskId, string_enum};

string_enum!(
    /// CPU architecture.
    Arch { X86_64 = "x86_64", Aarch64 = "aarch64" }
);

string_enum!(
    /// A disk image written by the agent, or an installer that runs itself.
    OsKind { DiskImage = "disk-image", Installer = "installer" }
);

string_enum!(
    /// What a disk image holds (docs/images.md). `filesystem`: one root
    /// filesystem; kiln lays out the disks (the plan's layout) and writes it
    /// onto the root volume, then installs the bootloader. `whole-disk`: a
    /// disk with its own partition table and bootloader, as Debian, Ubuntu,
    /// Rocky and Flatcar publish; the agent streams it onto the system disk,
    /// grows its last partition and adds a `CIDATA` NoCloud seed partition
    /// after it. Only the `flat` layout combines with it.
    ImageContent { Filesystem = "filesystem", WholeDisk = "whole-disk" }
);

// string_enum! derives no Default (most of its enums have none), so this
// cannot be `#[derive(Default)]` with `#[default]`.
#[allow(clippy::derivable_impls)]
impl Default for ImageContent {
    fn default() -> Self {
        ImageContent::Filesystem
    }
}

impl ImageContent {
    /// Whether an image of this content can be deployed with `layout`; the
    /// error is the reason, for the operator.
    pub fn check_layout(self, layout: StorageLayout) -> Result<(), String> {
        match (self, layout) {
            (ImageContent::Filesystem, _) | (ImageContent::WholeDisk, StorageLayout::Flat) => Ok(()),
            (ImageContent::WholeDisk, other) => Err(format!(
                "a whole-disk image brings its own partition table and goes onto one disk: it combines with \
                 the `flat` layout only, not `{other}` (use a filesystem image of the OS for RAID and LVM \
                 layouts)"
            )),
        }
    }
}

string_enum!(
    /// What platform an image or task is for: bare metal, VM, GPU, vGPU.
    PlatformTag { Bm = "bm", Vm = "vm", Gpu = "gpu", Vgpu = "vgpu" }
);

string_enum!(
    /// Post-install task kind.
    TaskKind { Ansible = "ansible", Script = "script" }
);

string_enum!(
    /// How the agent lays out a machine's disks.
    StorageLayout {
        Flat = "flat",
        Lvm = "lvm",
        LvmRaid0 = "lvm_raid0",
        LvmRaid1 = "lvm_raid1",
        LvmRaid10 = "lvm_raid10",
        LvmRaid10s = "lvm_raid10s",
        LvmHba = "lvm_hba",
    }
);

/// The disks a layout needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LayoutRule {
    pub min_disks: u32,
    /// Data disks must come in pairs (mirrors).
    pub pairs: bool,
    /// One disk more than the pairs is kept as a hot spare.
    pub spare: bool,
    /// The disks sit behind a hardware RAID controller / HBA.
    pub needs_hba: bool,
}

impl StorageLayout {
    pub fn rule(self) -> LayoutRule {
        let r = |min_disks, pairs, spare, needs_hba| LayoutRule {
            min_disks,
            pairs,
            spare,
            needs_hba,
        };
        match self {
            StorageLayout::Flat | StorageLayout::Lvm => r(1, false, false, false),
            StorageLayout::LvmRaid0 => r(2, false, false, false),
            StorageLayout::LvmRaid1 => r(2, true, false, false),
            StorageLayout::LvmRaid10 => r(4, true, false, false),
            StorageLayout::LvmRaid10s => r(5, true, true, false),
            StorageLayout::LvmHba => r(1, false, false, true),
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            StorageLayout::Flat => "plain partitions on the first disk",
            StorageLayout::Lvm => "one LVM volume group over all disks",
            StorageLayout::LvmRaid0 => "LVM on a RAID 0 stripe over all disks (no redundancy)",
            StorageLayout::LvmRaid1 => "LVM on RAID 1 mirrors of disk pairs",
            StorageLayout::LvmRaid10 => "LVM on RAID 10 over an even number of disks (at least 4)",
            StorageLayout::LvmRaid10s => "LVM on RAID 10 over an even number of disks (at least 4) plus one hot spare",
            StorageLayout::LvmHba => "LVM on the volume a hardware RAID controller (HBA) presents",
        }
    }

    /// Whether `disks` disks (with or without an HBA) satisfy the rule; the
    /// error says what is missing.
    pub fn check(self, disks: usize, has_hba: bool) -> Result<(), String> {
        let rule = self.rule();
        let name = self.as_str();
        if disks < rule.min_disks as usize {
            return Err(format!(
                "{name} needs at least {} disks, the machine has {disks}",
                rule.min_disks
            ));
        }
        let data = if rule.spare { disks - 1 } else { disks };
        if rule.pairs && data % 2 != 0 {
            return Err(if rule.spare {
                format!("{name} needs an even number of data disks plus one spare, the machine has {disks} disks")
            } else {
                format!("{name} needs disks in pairs, the machine has {disks}")
            });
        }
        if rule.needs_hba && !has_hba {
            return Err(format!(
                "{name} needs a hardware RAID controller, the inventory shows none"
            ));
        }
        Ok(())
    }
}

/// A layout and its rule, as the API lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LayoutInfo {
    pub name: StorageLayout,
    pub description: String,
    pub rule: LayoutRule,
}

impl From<StorageLayout> for LayoutInfo {
    fn from(l: StorageLayout) -> Self {
        LayoutInfo {
            name: l,
            description: l.description().to_string(),
            rule: l.rule(),
        }
    }
}

/// An installable OS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OsImage {
    pub id: OsImageId,
    pub name: String,
    pub version: String,
    pub arch: Arch,
    pub kind: OsKind,
    pub tags: Vec<PlatformTag>,
    pub min_ram_bytes: u64,
    pub min_disk_bytes: u64,
    /// URL or path of the image. For an installer: the directory holding
    /// its kernel and initrd (`linux` + `initrd.gz` for d-i, `vmlinuz` +
    /// `initrd.img` for Anaconda), under the artifacts directory or as an
    /// http(s) URL.
    pub source: String,
    /// Lowercase hex SHA-256 of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// How a disk image's file is encoded; the agent refuses a file whose
    /// magic says otherwise. (Not used for installers.)
    #[serde(default)]
    pub format: ImageFormat,
    /// What a disk image holds. (Not used for installers.)
    #[serde(default)]
    pub content: ImageContent,
    /// The operator's installer templates by kind (see [`TEMPLATE_KINDS`]);
    /// kinds not given use kiln's built-in template.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub templates: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
}

/// The installer files a template makes, as `templates` keys.
pub const TEMPLATE_KINDS: [&str; 5] = ["preseed", "kickstart", "user-data", "meta-data", "ignition"];

/// Largest template source.
const MAX_TEMPLATE: usize = 256 * 1024;

fn template_problems(templates: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = vec![];
    for (kind, source) in templates {
        if !TEMPLATE_KINDS.contains(&kind.as_str()) {
            problems.push(format!(
                "templates: `{kind}` is not a template kind; expected one of {}",
                TEMPLATE_KINDS.join(", ")
            ));
        }
        if source.len() > MAX_TEMPLATE {
            problems.push(format!("templates.{kind}: longer than {} KiB", MAX_TEMPLATE / 1024));
        }
    }
    problems
}

/// A new OS image for the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OsImageCreate {
    pub name: String,
    pub version: String,
    #[serde(default = "default_arch")]
    pub arch: Arch,
    pub kind: OsKind,
    #[serde(default)]
    pub tags: Vec<PlatformTag>,
    #[serde(default)]
    pub min_ram_bytes: u64,
    #[serde(default)]
    pub min_disk_bytes: u64,
    /// URL or path of the image; for an installer, the directory of its
    /// kernel and initrd (see [`OsImage::source`]).
    pub source: String,
    /// Required for disk images: the agent refuses to write an image it
    /// cannot verify.
    #[serde(default)]
    pub sha256: Option<String>,
    /// How the disk image's file is encoded: `raw`, `raw+zstd` or `qcow2`.
    /// Default: from the source's name (`.qcow2`, `.zst`, else raw). The
    /// agent checks the file's magic against it before writing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    /// What the disk image holds: `filesystem` (default) or `whole-disk`.
    #[serde(default)]
    pub content: ImageContent,
    /// Installer templates by kind (`preseed`, `kickstart`, `user-data`,
    /// `meta-data`, `ignition`); the server checks that each compiles.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub templates: BTreeMap<String, String>,
}

fn default_arch() -> Arch {
    Arch::X86_64
}

/// Checks a catalog name or version: 1–64 of `A-Z a-z 0-9 . _ + -`.
pub fn check_catalog_name(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 64 {
        return Err(format!("{field} must have 1 to 64 characters"));
    }
    if !value.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c)) {
        return Err(format!("{field} `{value}` has a character outside A-Z a-z 0-9 . _ + -"));
    }
    Ok(())
}

impl OsImageCreate {
    /// The image file's format: as given, else from the source's name.
    pub fn format(&self) -> ImageFormat {
        self.format
            .unwrap_or_else(|| ImageFormat::from_source(self.source.trim()))
    }

    /// Every problem with this record, one per entry.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = vec![];
        for (field, value) in [("name", &self.name), ("version", &self.version)] {
            if let Err(e) = check_catalog_name(field, value) {
                problems.push(e);
            }
        }
        if self.source.trim().is_empty() {
            problems.push("source is empty: give the image's URL or path".into());
        }
        match &self.sha256 {
            Some(h) if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                problems.push(format!("sha256 `{h}` is not 64 hex digits"));
            }
            None if self.kind == OsKind::DiskImage => {
                problems.push("sha256 is required for a disk image: the agent verifies what it writes".into())
            }
            _ => {}
        }
        if self.kind == OsKind::Installer && self.content == ImageContent::WholeDisk {
            problems.push("content `whole-disk` is for disk images; an installer lays out the disks itself".into());
        }
        if self.tags.contains(&PlatformTag::Vgpu) && self.tags.contains(&PlatformTag::Bm) {
            problems.push("tags `vgpu` and `bm` exclude each other: vGPUs live in VMs".into());
        }
        problems.extend(template_problems(&self.templates));
        problems
    }
}

/// Changes to an OS image. Name, version and arch are its identity and stay.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OsImagePatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<OsKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<PlatformTag>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ram_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_disk_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A new format; when only `source` changes, the format follows the
    /// new source's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<ImageContent>,
    /// Replaces all templates (`{}` removes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<BTreeMap<String, String>>,
}

impl OsImagePatch {
    /// The image as a create request after this patch, for validation.
    pub fn apply(&self, image: &OsImage) -> OsImageCreate {
        OsImageCreate {
            name: image.name.clone(),
            version: image.version.clone(),
            arch: image.arch,
            kind: self.kind.unwrap_or(image.kind),
            tags: self.tags.clone().unwrap_or_else(|| image.tags.clone()),
            min_ram_bytes: self.min_ram_bytes.unwrap_or(image.min_ram_bytes),
            min_disk_bytes: self.min_disk_bytes.unwrap_or(image.min_disk_bytes),
            source: self.source.clone().unwrap_or_else(|| image.source.clone()),
            sha256: self.sha256.clone().or_else(|| image.sha256.clone()),
            format: self.format.or(if self.source.is_some() {
                None
            } else {
                Some(image.format)
            }),
            content: self.content.unwrap_or(image.content),
            templates: self.templates.clone().unwrap_or_else(|| image.templates.clone()),
        }
    }
}

/// Changes to a task (a new playbook version, other tags).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<TaskKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<PlatformTag>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A post-install task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub id: TaskId,
    pub name: String,
    pub kind: TaskKind,
    pub tags: Vec<PlatformTag>,
    /// Playbook YAML or script text.
    pub content: String,
    pub created_at: DateTime<Utc>,
}

/// A new post-install task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskCreate {
    pub name: String,
    pub kind: TaskKind,
    #[serde(default)]
    pub tags: Vec<PlatformTag>,
    pub content: String,
}

impl TaskCreate {
    pub fn validate(&self) -> Vec<String> {
        let mut problems = vec![];
        if let Err(e) = check_catalog_name("name", &self.name) {
            problems.push(e);
        }
        if self.content.trim().is_empty() {
            problems.push("content is empty".into());
        }
        if self.content.len() > 1 << 20 {
            problems.push("content is larger than 1 MiB".into());
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_rules_table() {
        use StorageLayout::*;
        // (layout, disks, hba, fits)
        let table = [
            (Flat, 0, false, false),
            (Flat, 1, false, true),
            (Lvm, 3, false, true),
            (LvmRaid0, 1, false, false),
            (LvmRaid0, 3, false, true),
            (LvmRaid1, 1, false, false),
            (LvmRaid1, 2, false, true),
            (LvmRaid1, 3, false, false),
            (LvmRaid1, 4, false, true),
            (LvmRaid10, 2, false, false),
            (LvmRaid10, 4, false, true),
            (LvmRaid10, 5, false, false),
            (LvmRaid10s, 4, false, false),
            (LvmRaid10s, 5, false, true),
            (LvmRaid10s, 6, false, false),
            (LvmHba, 1, false, false),
            (LvmHba, 1, true, true),
        ];
        for (layout, disks, hba, fits) in table {
            assert_eq!(
                layout.check(disks, hba).is_ok(),
                fits,
                "{layout} with {disks} disks, hba={hba}: {:?}",
                layout.check(disks, hba)
            );
        }
    }

    #[test]
    fn disk_images_need_a_checksum() {
        let mut img = OsImageCreate {
            name: "debian".into(),
            version: "12".into(),
            arch: Arch::X86_64,
            kind: OsKind::DiskImage,
            tags: vec![],
            min_ram_bytes: 0,
            min_disk_bytes: 0,
            source: "http://x/img.raw".into(),
            sha256: None,
            format: None,
            content: ImageContent::Filesystem,
            templates: Default::default(),
        };
        assert!(img.validate()[0].contains("sha256 is required"));
        img.sha256 = Some("ab".into());
        assert!(img.validate()[0].contains("not 64 hex"));
        img.sha256 = Some("a".repeat(64));
        assert!(img.validate().is_empty());
        img.kind = OsKind::Installer;
        img.sha256 = None;
        assert!(img.validate().is_empty());
        img.content = ImageContent::WholeDisk;
        assert!(img.validate()[0].contains("whole-disk` is for disk images"));
    }

    #[test]
    fn format_defaults_to_the_source_name_and_follows_a_new_source() {
        let mut img = OsImageCreate {
            name: "debian".into(),
            version: "12".into(),
            arch: Arch::X86_64,
            kind: OsKind::DiskImage,
            tags: vec![],
            min_ram_bytes: 0,
            min_disk_bytes: 0,
            source: "http://x/debian-12-genericcloud-amd64.qcow2".into(),
            sha256: Some("a".repeat(64)),
            format: None,
            content: ImageContent::WholeDisk,
            templates: Default::default(),
        };
        assert_eq!(img.format(), ImageFormat::Qcow2);
        img.format = Some(ImageFormat::Raw);
        assert_eq!(img.format(), ImageFormat::Raw, "a given format wins over the name");
        let stored = OsImage {
            id: OsImageId::new(),
            name: img.name.clone(),
            version: img.version.clone(),
            arch: img.arch,
            kind: img.kind,
            tags: vec![],
            min_ram_bytes: 0,
            min_disk_bytes: 0,
            source: "http://x/d.qcow2".into(),
            sha256: img.sha256.clone(),
            format: ImageFormat::Raw,
            content: ImageContent::WholeDisk,
            templates: Default::default(),
            created_at: Utc::now(),
        };
        let keep = OsImagePatch::default().apply(&stored);
        assert_eq!(
            (keep.format(), keep.content),
            (ImageFormat::Raw, ImageContent::WholeDisk)
        );
        let moved = OsImagePatch {
            source: Some("http://x/d.raw.zst".into()),
            ..Default::default()
        }
        .apply(&stored);
        assert_eq!(moved.format(), ImageFormat::RawZstd);
    }

    #[test]
    fn whole_disk_images_take_the_flat_layout_only() {
        for layout in StorageLayout::ALL {
            assert!(ImageContent::Filesystem.check_layout(*layout).is_ok());
            let whole = ImageContent::WholeDisk.check_layout(*layout);
            assert_eq!(whole.is_ok(), *layout == StorageLayout::Flat, "{layout}: {whole:?}");
        }
        let e = ImageContent::WholeDisk
            .check_layout(StorageLayout::LvmRaid1)
            .unwrap_err();
        assert!(e.contains("`flat` layout only, not `lvm_raid1`"), "{e}");
    }
}
