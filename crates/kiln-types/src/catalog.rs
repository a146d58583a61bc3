//! The install catalog: OS images, post-install tasks and storage layouts
//! with the disk rule each layout needs.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::agent::ImageFormat;
use crate::fit::human_bytes;
use crate::machine::Disk;
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
    /// How the agent lays out a machine's disks (seed 001's schemes, and
    /// kiln's own `flat`, `lvm` and `lvm_raid10_spare`).
    StorageLayout {
        Flat = "flat",
        Lvm = "lvm",
        LvmRaid0 = "lvm_raid0",
        LvmRaid1 = "lvm_raid1",
        LvmRaid10 = "lvm_raid10",
        LvmRaid10s = "lvm_raid10s",
        LvmHba = "lvm_hba",
        LvmRaid10Spare = "lvm_raid10_spare",
    }
);

/// How much (in percent of the larger) two disks that mirror each other
/// may differ by default: a mirror is as large as its smaller disk.
pub const PAIR_TOLERANCE_PERCENT: u32 = 3;

/// The disks a layout needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LayoutRule {
    pub min_disks: u32,
    /// Disks come in pairs of similar size (mirrors).
    pub pairs: bool,
    /// One disk more than the pairs is kept as a hot spare.
    pub spare: bool,
    /// The OS goes on one disk — the machine's system disk if an operator
    /// named one, else the layout's default (`flat`: the first disk,
    /// `lvm_hba`: the smallest) — and no other disk is touched.
    pub one_disk: bool,
}

impl StorageLayout {
    pub fn rule(self) -> LayoutRule {
        let r = |min_disks, pairs, spare, one_disk| LayoutRule {
            min_disks,
            pairs,
            spare,
            one_disk,
        };
        match self {
            StorageLayout::Flat => r(1, false, false, true),
            StorageLayout::Lvm => r(1, false, false, false),
            StorageLayout::LvmRaid0 => r(2, false, false, false),
            StorageLayout::LvmRaid1 => r(2, true, false, false),
            StorageLayout::LvmRaid10 | StorageLayout::LvmRaid10s => r(4, true, false, false),
            StorageLayout::LvmHba => r(2, false, false, true),
            StorageLayout::LvmRaid10Spare => r(5, true, true, false),
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            StorageLayout::Flat => {
                "plain partitions on one disk (the system disk, else the first); the others untouched"
            }
            StorageLayout::Lvm => "one LVM volume group over all disks (no redundancy)",
            StorageLayout::LvmRaid0 => "LVM on a RAID 0 stripe over all disks (no redundancy)",
            StorageLayout::LvmRaid1 => "LVM on RAID 1 mirrors of disk pairs of similar size",
            StorageLayout::LvmRaid10 => "LVM on RAID 10 over all disk pairs (at least 2 pairs)",
            StorageLayout::LvmRaid10s => {
                "the OS on RAID 1 over the smallest pair; a data volume (/data) on RAID 10 over the other pairs"
            }
            StorageLayout::LvmHba => {
                "the OS (LVM) on the smallest disk, or the system disk; the other disks untouched (at least 2 disks)"
            }
            StorageLayout::LvmRaid10Spare => {
                "LVM on RAID 10 over disk pairs plus one hot spare (an odd number, at least 5)"
            }
        }
    }

    /// What the layout needs, in words, for refusals.
    fn needs(self) -> &'static str {
        match self {
            StorageLayout::Flat | StorageLayout::Lvm => "at least 1 disk",
            StorageLayout::LvmRaid0 => "at least 2 disks",
            StorageLayout::LvmRaid1 => "disks in pairs of similar size (at least 2 disks)",
            StorageLayout::LvmRaid10 => "an even number of disks, at least 4, in pairs of similar size",
            StorageLayout::LvmRaid10s => {
                "an even number of disks, at least 4, in pairs of similar size (RAID 1 on the smallest pair for the \
                 OS, RAID 10 over the others)"
            }
            StorageLayout::LvmHba => {
                "at least 2 disks (the OS on the smallest or the system disk, the others untouched)"
            }
            StorageLayout::LvmRaid10Spare => "an odd number of disks, at least 5: pairs of similar size plus one spare",
        }
    }

    /// Whether `disks` suit the layout by number and by `system_disk` (a
    /// serial or WWN the machine must have, for the layouts that use it),
    /// not by size. The error says what the layout needs and what the
    /// machine has.
    pub fn check_shape(self, disks: &[Disk], system_disk: Option<&str>) -> Result<(), String> {
        let rule = self.rule();
        let n = disks.len();
        let has = || describe_disks(disks);
        let data = if rule.spare { n.saturating_sub(1) } else { n };
        if n < rule.min_disks as usize || (rule.pairs && data % 2 != 0) {
            return Err(format!("{self} needs {}; the machine has {}", self.needs(), has()));
        }
        if rule.one_disk
            && let Some(id) = system_disk
            && !disks.iter().any(|d| d.is_known_as(id))
        {
            return Err(format!(
                "{self} puts the OS on the system disk {id}, which the machine does not have; it has {} (set \
                 another with `kiln machine edit HOST --system-disk SERIAL|WWN`, or clear it with `--system-disk \
                 -`)",
                has()
            ));
        }
        Ok(())
    }

    /// [`Self::check_shape`], and for the layouts that mirror, pairs (the
    /// disks sorted by size, taken two by two) that differ by at most
    /// [`PAIR_TOLERANCE_PERCENT`]. `lvm_raid10_spare`'s pairs depend on
    /// which disk the agent makes the spare, so the agent checks them.
    pub fn check(self, disks: &[Disk], system_disk: Option<&str>) -> Result<(), String> {
        self.check_shape(disks, system_disk)?;
        let rule = self.rule();
        if !rule.pairs || rule.spare {
            return Ok(());
        }
        let mut sorted: Vec<&Disk> = disks.iter().collect();
        sorted.sort_by_key(|d| (d.size_bytes, d.name.as_str()));
        for pair in sorted.chunks(2) {
            let (small, large) = (pair[0], pair[1]);
            let diff = large.size_bytes - small.size_bytes;
            if diff.saturating_mul(100) > u64::from(PAIR_TOLERANCE_PERCENT) * large.size_bytes {
                return Err(format!(
                    "{self} needs {}, but {} ({}) and {} ({}) would mirror each other and differ by {:.1}%, more \
                     than {PAIR_TOLERANCE_PERCENT}%; the machine has {}",
                    self.needs(),
                    small.name,
                    human_bytes(small.size_bytes),
                    large.name,
                    human_bytes(large.size_bytes),
                    diff as f64 * 100.0 / large.size_bytes as f64,
                    describe_disks(disks)
                ));
            }
        }
        Ok(())
    }
}

/// `3 disks: sda 447 GiB, sdb 447 GiB, sdc 7.3 TiB` (`no disks`).
fn describe_disks(disks: &[Disk]) -> String {
    if disks.is_empty() {
        return "no disks".into();
    }
    let list: Vec<String> = disks
        .iter()
        .map(|d| format!("{} {}", d.name, human_bytes(d.size_bytes)))
        .collect();
    format!(
        "{} disk{}: {}",
        disks.len(),
        if disks.len() == 1 { "" } else { "s" },
        list.join(", ")
    )
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

    const GIB: u64 = 1 << 30;

    fn disks(sizes_gib: &[u64]) -> Vec<Disk> {
        sizes_gib
            .iter()
            .enumerate()
            .map(|(i, g)| Disk {
                name: format!("sd{}", (b'a' + i as u8) as char),
                size_bytes: g * GIB,
                rotational: false,
                model: None,
                serial: Some(format!("SN{i}")),
                by_id: Some(format!("/dev/disk/by-id/wwn-0x500{i}")),
            })
            .collect()
    }

    #[test]
    fn layout_rules_table() {
        use StorageLayout::*;
        // (layout, disk sizes in GiB, fits)
        let table: [(StorageLayout, &[u64], bool); 22] = [
            (Flat, &[], false),
            (Flat, &[100], true),
            (Lvm, &[100, 200, 300], true),
            (LvmRaid0, &[100], false),
            (LvmRaid0, &[100, 400, 900], true),
            (LvmRaid1, &[100], false),
            (LvmRaid1, &[100, 100], true),
            (LvmRaid1, &[100, 100, 100], false),
            (LvmRaid1, &[100, 400, 100, 400], true),
            (LvmRaid1, &[100, 200], false),
            (LvmRaid10, &[100, 100], false),
            (LvmRaid10, &[100; 4], true),
            (LvmRaid10, &[100; 5], false),
            // RAID10S: the smallest pair for the OS, the others RAID 10.
            (LvmRaid10s, &[4000, 240, 4000, 240], true),
            (LvmRaid10s, &[240, 240, 4000], false),
            (LvmRaid10s, &[240, 480, 4000, 4000], false),
            (LvmRaid10s, &[240, 240, 4000, 4000, 8000, 8000], true),
            // HBA: the OS on one disk of several, any sizes.
            (LvmHba, &[100], false),
            (LvmHba, &[100, 4000, 8000], true),
            (LvmRaid10Spare, &[100; 4], false),
            (LvmRaid10Spare, &[100; 5], true),
            (LvmRaid10Spare, &[100; 6], false),
        ];
        for (layout, sizes, fits) in table {
            let result = layout.check(&disks(sizes), None);
            assert_eq!(result.is_ok(), fits, "{layout} on {sizes:?} GiB: {result:?}");
        }
    }

    #[test]
    fn refusals_say_what_the_layout_needs_and_what_the_machine_has() {
        let e = StorageLayout::LvmRaid10s
            .check(&disks(&[240, 240, 4000]), None)
            .unwrap_err();
        assert_eq!(
            e,
            "lvm_raid10s needs an even number of disks, at least 4, in pairs of similar size (RAID 1 on the \
             smallest pair for the OS, RAID 10 over the others); the machine has 3 disks: sda 240 GiB, sdb 240 \
             GiB, sdc 3.9 TiB"
        );
        let e = StorageLayout::LvmRaid1.check(&disks(&[480, 500]), None).unwrap_err();
        assert!(
            e.contains("sda (480 GiB) and sdb (500 GiB) would mirror each other and differ by 4.0%"),
            "{e}"
        );
        let e = StorageLayout::LvmHba.check(&disks(&[480]), None).unwrap_err();
        assert!(
            e.contains("at least 2 disks") && e.ends_with("1 disk: sda 480 GiB"),
            "{e}"
        );
    }

    #[test]
    fn the_system_disk_must_be_one_the_machine_has() {
        let set = disks(&[480, 240, 960]);
        for layout in [StorageLayout::Flat, StorageLayout::LvmHba] {
            // By serial (any case) or WWN (with or without `wwn-`).
            for id in ["SN2", "sn2", "0x5002", "wwn-0x5002"] {
                assert!(layout.check(&set, Some(id)).is_ok(), "{layout} {id}");
            }
            let e = layout.check(&set, Some("SN9")).unwrap_err();
            assert!(
                e.contains("system disk SN9, which the machine does not have; it has 3 disks: sda 480 GiB"),
                "{e}"
            );
            // A kernel name is no stable name: not a match.
            assert!(layout.check(&set, Some("sdb")).is_err());
        }
        // Layouts that use every disk do not look at it.
        assert!(StorageLayout::Lvm.check(&set, Some("SN9")).is_ok());
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
