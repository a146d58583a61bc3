//! Storage layout planning: from a machine's disks and a layout name to a
//! plan — which disks, which partitions, which md arrays, which LVM volume
//! group and volumes, which filesystems — and the exact commands that
//! apply it, as data.
//!
//! Planning is a pure function so that everything that can be refused is
//! refused before a disk is touched (too few disks, unequal mirror pairs,
//! disks too small for the root asked for), and so that property tests can
//! check every plan for the rules that keep data safe: md members on
//! distinct disks, mirrors of near-equal size, nothing past a disk's end,
//! and no command that names a disk outside the plan. Running the commands
//! is the executor's job (not built yet).
//!
//! The shape every layout shares, per disk used (GPT, 1 MiB aligned):
//!
//! | # | what | size | why |
//! |---|---|---|---|
//! | 1 | ESP (UEFI) or BIOS boot partition | 512 MiB / 1 MiB | the firmware's or GRUB's |
//! | 2 | `/boot` | 1 GiB | outside md/LVM on `flat`/`lvm`; an md RAID 1 (metadata 1.0, at the end, so GRUB reads a member as a plain ext4) on the RAID layouts |
//! | 3 | data | the rest | root (`flat`), an LVM PV (`lvm`, `lvm_hba`) or an md member |
//!
//! `lvm` puts partitions 1 and 2 on the first disk only and a single PV
//! partition on the others. The last MiB of every disk stays free for GPT's
//! backup header.
//!
//! Which disks a layout uses (seed 001's meanings):
//! - `flat`, `lvm_hba`: one disk — the machine's system disk if an
//!   operator named one (serial or WWN), else the first (`flat`) or the
//!   smallest (`lvm_hba`, first on a tie). No command names another disk,
//!   and neither layout stops the old md arrays and volume groups (which
//!   may live on the disks it leaves alone): the deploy ramdisk assembles
//!   none, so there is nothing to stop.
//! - `lvm_raid10s`: the smallest pair (disks sorted by size, taken two by
//!   two) gets the OS exactly as `lvm_raid1` lays out a pair; the other
//!   pairs get one md member partition each, a RAID 10 over them, and the
//!   volume group `vgdata` with one volume `data` (ext4, `/data`).
//! - every other layout: all the disks it is given.

use std::fmt;

use kiln_types::catalog::{PAIR_TOLERANCE_PERCENT, StorageLayout};
use kiln_types::machine::Disk;
use serde::{Deserialize, Serialize};

use crate::inventory::Firmware;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Room md metadata 1.2 keeps before the data (mdadm's default data offset
/// of 128 MiB, plus the internal bitmap's margin): what a member loses.
const MD_DATA_OFFSET: u64 = 132 * MIB;
/// Room md metadata 1.0 keeps at the end of a member (superblock, bitmap).
const MD_TAIL: u64 = 8 * MIB;
/// LVM's default physical extent and metadata area at the start of a PV.
const EXTENT: u64 = 4 * MIB;
const PV_HEADER: u64 = MIB;
/// The smallest data partition worth planning: below it md's and LVM's
/// overheads are most of the disk.
const MIN_DATA_PARTITION: u64 = GIB;
/// `lvm_raid10s`'s data volume group and volume.
pub const DATA_VG: &str = "vgdata";
const DATA_LV: &str = "data";

/// What the plan may vary; the defaults suit most servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutOptions {
    pub firmware: Firmware,
    pub esp_bytes: u64,
    pub boot_bytes: u64,
    /// 0 for no swap.
    pub swap_bytes: u64,
    /// `None`: all the space left.
    pub root_bytes: Option<u64>,
    /// The least root the machine must end up with.
    pub min_root_bytes: u64,
    pub root: RootSource,
    pub volume_group: String,
    /// How much (in percent of the larger) two disks of a mirror pair may
    /// differ: a mirror is as large as its smaller disk, the rest is lost.
    pub pair_tolerance_percent: u32,
    /// The disk (serial or WWN) `flat` and `lvm_hba` put the OS on; a plan
    /// naming one the disks do not include is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_disk: Option<String>,
}

impl LayoutOptions {
    pub fn new(firmware: Firmware) -> Self {
        LayoutOptions {
            firmware,
            esp_bytes: 512 * MIB,
            boot_bytes: GIB,
            swap_bytes: 0,
            root_bytes: None,
            min_root_bytes: 2 * GIB,
            root: RootSource::Image,
            volume_group: "vg0".into(),
            pair_tolerance_percent: PAIR_TOLERANCE_PERCENT,
            system_disk: None,
        }
    }
}

/// What fills the root device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootSource {
    /// The image writer writes a filesystem image onto it: no mkfs.
    Image,
    /// An ext4 filesystem is made on it (an installer or tarball fills it).
    Ext4,
}

/// What a partition is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionKind {
    Esp,
    BiosBoot,
    Boot,
    Swap,
    Root,
    Lvm,
    Raid,
}

impl PartitionKind {
    /// sgdisk's type code.
    fn type_code(self) -> &'static str {
        match self {
            PartitionKind::Esp => "EF00",
            PartitionKind::BiosBoot => "EF02",
            PartitionKind::Boot | PartitionKind::Root => "8300",
            PartitionKind::Swap => "8200",
            PartitionKind::Lvm => "8E00",
            PartitionKind::Raid => "FD00",
        }
    }

    fn label(self) -> &'static str {
        match self {
            PartitionKind::Esp => "esp",
            PartitionKind::BiosBoot => "bios",
            PartitionKind::Boot => "boot",
            PartitionKind::Swap => "swap",
            PartitionKind::Root => "root",
            PartitionKind::Lvm => "lvm",
            PartitionKind::Raid => "raid",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub number: u32,
    /// `/dev/sda1`, `/dev/nvme0n1p1`.
    pub device: String,
    pub start_bytes: u64,
    pub size_bytes: u64,
    pub kind: PartitionKind,
}

impl Partition {
    pub fn end_bytes(&self) -> u64 {
        self.start_bytes + self.size_bytes
    }
}

/// A disk the plan uses, and what goes on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedDisk {
    pub name: String,
    pub device: String,
    pub size_bytes: u64,
    /// A hot spare: its partitions join the arrays as spares.
    pub spare: bool,
    pub partitions: Vec<Partition>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaidLevel {
    #[serde(rename = "raid0")]
    Raid0,
    #[serde(rename = "raid1")]
    Raid1,
    #[serde(rename = "raid10")]
    Raid10,
}

impl RaidLevel {
    fn mdadm(self) -> &'static str {
        match self {
            RaidLevel::Raid0 => "0",
            RaidLevel::Raid1 => "1",
            RaidLevel::Raid10 => "10",
        }
    }
}

/// An md array to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdArray {
    /// `/dev/md0`.
    pub device: String,
    pub name: String,
    pub level: RaidLevel,
    /// Member partitions. For RAID 10 adjacent members mirror each other
    /// (md's `near=2` layout), so they are listed pair by pair.
    pub members: Vec<String>,
    pub spares: Vec<String>,
    /// `1.0` (superblock at the end) or `1.2` (4 KiB from the start).
    pub metadata: String,
    /// Usable size, estimated from md's overheads.
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeGroup {
    pub name: String,
    pub physical_volumes: Vec<String>,
    /// Usable size in whole extents, estimated from LVM's overheads.
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogicalVolume {
    pub name: String,
    /// `/dev/vg0/root`.
    pub device: String,
    /// `None`: all the space left in the volume group.
    pub size_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsKind {
    Vfat,
    Ext4,
    Swap,
}

/// A filesystem the plan makes, and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filesystem {
    pub device: String,
    pub kind: FsKind,
    pub label: String,
    /// `None` for swap, and for the ESPs of disks other than the first
    /// (kept in step by the bootloader step, so any disk can boot).
    pub mountpoint: Option<String>,
}

/// One command to run, as an argv (never through a shell).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub argv: Vec<String>,
    /// Why it runs, for the job's log.
    pub why: String,
    /// Cleanup that may find nothing to do (no old array to stop).
    #[serde(default)]
    pub may_fail: bool,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.argv.join(" "))
    }
}

fn cmd(why: impl Into<String>, argv: &[&str]) -> Command {
    Command {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        why: why.into(),
        may_fail: false,
    }
}

/// A layout made concrete for one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutPlan {
    pub layout: StorageLayout,
    pub firmware: Firmware,
    pub disks: Vec<PlannedDisk>,
    pub arrays: Vec<MdArray>,
    pub volume_group: Option<VolumeGroup>,
    pub logical_volumes: Vec<LogicalVolume>,
    pub filesystems: Vec<Filesystem>,
    /// Where `/` goes: the image writer's target.
    pub root_device: String,
    /// The root device's size; for a volume that takes the space left,
    /// an estimate (the writer reads the device's real size).
    pub root_bytes: u64,
    /// Everything to run, in order.
    pub commands: Vec<Command>,
    /// `lvm_raid10s`'s data volume, apart from the OS's volume group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_volume: Option<DataVolume>,
}

/// A volume group of its own with one volume filling it, for data (the
/// OS's volume group is [`LayoutPlan::volume_group`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataVolume {
    pub volume_group: VolumeGroup,
    pub logical_volume: LogicalVolume,
}

/// A size for people: `1 MiB`, `512 MiB`, `7.0 GiB`, `1.8 TiB`.
fn human(bytes: u64) -> String {
    const TIB: u64 = 1 << 40;
    if bytes >= TIB {
        format!("{:.1} TiB", bytes as f64 / TIB as f64)
    } else if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

impl fmt::Display for LayoutPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "layout {} ({} boot)", self.layout, self.firmware_name())?;
        for d in &self.disks {
            let spare = if d.spare { ", spare" } else { "" };
            writeln!(f, "disk {} ({}{spare})", d.device, human(d.size_bytes))?;
            for p in &d.partitions {
                writeln!(f, "  {} {:?} {}", p.device, p.kind, human(p.size_bytes))?;
            }
        }
        for a in &self.arrays {
            let spares = if a.spares.is_empty() {
                String::new()
            } else {
                format!(" + spare {}", a.spares.join(" "))
            };
            writeln!(
                f,
                "{} {:?} of {}{spares}: {}",
                a.device,
                a.level,
                a.members.join(" "),
                human(a.size_bytes)
            )?;
        }
        if let Some(vg) = &self.volume_group {
            writeln!(
                f,
                "vg {} on {}: {}",
                vg.name,
                vg.physical_volumes.join(" "),
                human(vg.size_bytes)
            )?;
        }
        for lv in &self.logical_volumes {
            let size = lv.size_bytes.map_or_else(|| "the rest".to_string(), human);
            writeln!(f, "lv {}: {size}", lv.device)?;
        }
        if let Some(d) = &self.data_volume {
            let vg = &d.volume_group;
            writeln!(
                f,
                "vg {} on {}: {}",
                vg.name,
                vg.physical_volumes.join(" "),
                human(vg.size_bytes)
            )?;
            writeln!(f, "lv {}: all of it", d.logical_volume.device)?;
        }
        writeln!(f, "root {} ({})", self.root_device, human(self.root_bytes))
    }
}

impl LayoutPlan {
    /// The disks that carry a boot partition (ESP or BIOS boot), where the
    /// bootloader goes: not `lvm_raid10s`'s data disks.
    pub fn boot_disks(&self) -> impl Iterator<Item = &PlannedDisk> {
        self.disks.iter().filter(|d| {
            d.partitions
                .iter()
                .any(|p| matches!(p.kind, PartitionKind::Esp | PartitionKind::BiosBoot))
        })
    }

    fn firmware_name(&self) -> &'static str {
        match self.firmware {
            Firmware::Uefi => "UEFI",
            Firmware::Bios => "BIOS",
        }
    }
}

/// Why no plan could be made. Each says what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Rule(String),
    #[error("disk name `{0}` is not a kernel disk name (a-z, 0-9)")]
    BadDiskName(String),
    #[error("disk {0} is listed twice")]
    DuplicateDisk(String),
    #[error(
        "disks {small} ({small_bytes} bytes) and {large} ({large_bytes} bytes) would mirror each other but differ by \
         {percent:.1}%, more than {tolerance}%: use disks of the same size, or another layout"
    )]
    UnequalPair {
        small: String,
        small_bytes: u64,
        large: String,
        large_bytes: u64,
        percent: f64,
        tolerance: u32,
    },
    #[error("disk {disk} has {size_bytes} bytes; {layout} needs at least {needed_bytes} on it")]
    DiskTooSmall {
        disk: String,
        size_bytes: u64,
        needed_bytes: u64,
        layout: StorageLayout,
    },
    #[error("root would have {available_bytes} bytes, but at least {needed_bytes} are asked for")]
    RootTooSmall { available_bytes: u64, needed_bytes: u64 },
    #[error("layout option {0}")]
    BadOption(String),
}

/// Partition `number` of disk `name`: a `p` goes between when the disk's
/// name ends in a digit (`nvme0n1p1`, `mmcblk0p1`, but `sda1`).
pub fn partition_device(name: &str, number: u32) -> String {
    if name.ends_with(|c: char| c.is_ascii_digit()) {
        format!("/dev/{name}p{number}")
    } else {
        format!("/dev/{name}{number}")
    }
}

fn floor_to(value: u64, unit: u64) -> u64 {
    value / unit * unit
}

fn ceil_to(value: u64, unit: u64) -> u64 {
    value.div_ceil(unit) * unit
}

/// Where the last partition may end: the last whole MiB before the one
/// kept for GPT's backup header.
fn usable_end(size_bytes: u64) -> u64 {
    floor_to(size_bytes, MIB).saturating_sub(MIB)
}

/// Builds a disk's partitions: the fixed ones in `head` in order from
/// 1 MiB, then one data partition of `data_bytes` (or up to the end).
fn partition_disk(
    disk: &Disk,
    head: &[(PartitionKind, u64)],
    data: PartitionKind,
    data_bytes: Option<u64>,
) -> Vec<Partition> {
    let mut at = MIB;
    let mut out = vec![];
    for &(kind, size) in head {
        out.push((kind, at, size));
        at += size;
    }
    let data_size = data_bytes.unwrap_or_else(|| usable_end(disk.size_bytes).saturating_sub(at));
    out.push((data, at, data_size));
    out.into_iter()
        .zip(1..)
        .map(|((kind, start_bytes, size_bytes), number)| Partition {
            number,
            device: partition_device(&disk.name, number),
            start_bytes,
            size_bytes,
            kind,
        })
        .collect()
}

/// The size of the disk left after `head` for the data partition.
fn data_room(disk: &Disk, head: &[(PartitionKind, u64)]) -> u64 {
    let used: u64 = MIB + head.iter().map(|(_, s)| s).sum::<u64>();
    usable_end(disk.size_bytes).saturating_sub(used)
}

/// The plan for `layout` on `disks` (in the job's order: `flat` uses the
/// first unless a system disk is named, `lvm` puts the boot partitions on
/// the first).
pub fn plan(layout: StorageLayout, disks: &[Disk], options: &LayoutOptions) -> Result<LayoutPlan, PlanError> {
    check_options(options)?;
    for (i, d) in disks.iter().enumerate() {
        if d.name.is_empty()
            || !d.name.starts_with(|c: char| c.is_ascii_lowercase())
            || !d.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(PlanError::BadDiskName(d.name.clone()));
        }
        if disks[..i].iter().any(|o| o.name == d.name) {
            return Err(PlanError::DuplicateDisk(d.name.clone()));
        }
    }
    // Number and system disk; sizes are checked below, pair by pair, with
    // this plan's tolerance.
    layout
        .check_shape(disks, options.system_disk.as_deref())
        .map_err(PlanError::Rule)?;

    let boot_part = match options.firmware {
        Firmware::Uefi => (PartitionKind::Esp, options.esp_bytes),
        Firmware::Bios => (PartitionKind::BiosBoot, MIB),
    };
    let mut planner = Planner {
        layout,
        options,
        plan: LayoutPlan {
            layout,
            firmware: options.firmware,
            disks: vec![],
            arrays: vec![],
            volume_group: None,
            logical_volumes: vec![],
            filesystems: vec![],
            root_device: String::new(),
            root_bytes: 0,
            commands: vec![],
            data_volume: None,
        },
    };
    match layout {
        StorageLayout::Flat => planner.flat(os_disk(layout, disks, options)?, boot_part)?,
        StorageLayout::LvmHba => {
            let disk = os_disk(layout, disks, options)?.clone();
            planner.lvm(&[disk], boot_part)?
        }
        StorageLayout::Lvm => planner.lvm(disks, boot_part)?,
        StorageLayout::LvmRaid0 => planner.raid(disks, boot_part, RaidLevel::Raid0)?,
        StorageLayout::LvmRaid1 => planner.raid(disks, boot_part, RaidLevel::Raid1)?,
        StorageLayout::LvmRaid10 | StorageLayout::LvmRaid10Spare => {
            planner.raid(disks, boot_part, RaidLevel::Raid10)?
        }
        StorageLayout::LvmRaid10s => planner.raid10s(disks, boot_part)?,
    }
    planner.plan.commands = commands(&planner.plan);
    Ok(planner.plan)
}

/// The disk a one-disk layout puts the OS on: the system disk if one is
/// named, else the first (`flat`) or the smallest, first on a tie
/// (`lvm_hba`).
fn os_disk<'a>(layout: StorageLayout, disks: &'a [Disk], o: &LayoutOptions) -> Result<&'a Disk, PlanError> {
    if let Some(id) = &o.system_disk {
        // check_shape refused a name no disk has; this is its twin.
        return disks
            .iter()
            .find(|d| d.is_known_as(id))
            .ok_or_else(|| PlanError::Rule(format!("no disk is the system disk {id}")));
    }
    let first = disks.first().ok_or_else(|| PlanError::Rule("no disks".into()))?;
    Ok(match layout {
        StorageLayout::LvmHba => disks
            .iter()
            .enumerate()
            .min_by_key(|(i, d)| (d.size_bytes, *i))
            .map_or(first, |(_, d)| d),
        _ => first,
    })
}

fn check_options(o: &LayoutOptions) -> Result<(), PlanError> {
    let bad = |what: String| Err(PlanError::BadOption(what));
    for (name, value) in [
        ("esp_bytes", o.esp_bytes),
        ("boot_bytes", o.boot_bytes),
        ("swap_bytes", o.swap_bytes),
        ("root_bytes", o.root_bytes.unwrap_or(0)),
    ] {
        if value % MIB != 0 {
            return bad(format!("{name} = {value} is not a whole number of MiB"));
        }
    }
    // FAT32 wants at least 65525 clusters; 256 MiB holds them with 4 KiB
    // sectors too.
    if o.firmware == Firmware::Uefi && o.esp_bytes < 256 * MIB {
        return bad(format!(
            "esp_bytes = {} is below 256 MiB, too small for FAT32",
            o.esp_bytes
        ));
    }
    if o.boot_bytes < 256 * MIB {
        return bad(format!(
            "boot_bytes = {} is below 256 MiB: two kernels and initrds need more",
            o.boot_bytes
        ));
    }
    if o.root_bytes.is_some_and(|r| r < o.min_root_bytes) {
        return bad(format!("root_bytes is below min_root_bytes ({})", o.min_root_bytes));
    }
    let vg = &o.volume_group;
    if vg.is_empty() || vg.len() > 32 || !vg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return bad(format!("volume_group `{vg}` must be 1 to 32 of A-Z a-z 0-9 _"));
    }
    if vg == DATA_VG {
        return bad(format!(
            "volume_group `{vg}` is lvm_raid10s's data volume group: pick another name"
        ));
    }
    if o.pair_tolerance_percent > 50 {
        return bad("pair_tolerance_percent is above 50".into());
    }
    Ok(())
}

struct Planner<'a> {
    layout: StorageLayout,
    options: &'a LayoutOptions,
    plan: LayoutPlan,
}

impl Planner<'_> {
    fn too_small(&self, disk: &Disk, head: &[(PartitionKind, u64)], data_needed: u64) -> PlanError {
        PlanError::DiskTooSmall {
            disk: disk.name.clone(),
            size_bytes: disk.size_bytes,
            needed_bytes: 2 * MIB + head.iter().map(|(_, s)| s).sum::<u64>() + data_needed,
            layout: self.layout,
        }
    }

    fn add_disk(&mut self, disk: &Disk, spare: bool, partitions: Vec<Partition>) {
        self.plan.disks.push(PlannedDisk {
            name: disk.name.clone(),
            device: format!("/dev/{}", disk.name),
            size_bytes: disk.size_bytes,
            spare,
            partitions,
        });
    }

    fn boot_filesystems(&mut self, boot_device: String) {
        let esps: Vec<String> = self
            .plan
            .disks
            .iter()
            .flat_map(|d| &d.partitions)
            .filter(|p| p.kind == PartitionKind::Esp)
            .map(|p| p.device.clone())
            .collect();
        for (i, esp) in esps.into_iter().enumerate() {
            self.plan.filesystems.push(Filesystem {
                device: esp,
                kind: FsKind::Vfat,
                label: if i == 0 { "ESP".into() } else { format!("ESP{}", i + 1) },
                mountpoint: (i == 0).then(|| "/boot/efi".into()),
            });
        }
        self.plan.filesystems.push(Filesystem {
            device: boot_device,
            kind: FsKind::Ext4,
            label: "boot".into(),
            mountpoint: Some("/boot".into()),
        });
    }

    fn root_filesystem(&mut self) {
        if self.options.root == RootSource::Ext4 {
            self.plan.filesystems.push(Filesystem {
                device: self.plan.root_device.clone(),
                kind: FsKind::Ext4,
                label: "root".into(),
                mountpoint: Some("/".into()),
            });
        }
    }

    /// Plain partitions on one disk: boot, /boot, swap, root.
    fn flat(&mut self, disk: &Disk, boot_part: (PartitionKind, u64)) -> Result<(), PlanError> {
        let o = self.options;
        let mut head = vec![boot_part, (PartitionKind::Boot, o.boot_bytes)];
        if o.swap_bytes > 0 {
            head.push((PartitionKind::Swap, o.swap_bytes));
        }
        let room = data_room(disk, &head);
        let needed = o.root_bytes.unwrap_or(o.min_root_bytes);
        if room < needed {
            return Err(self.too_small(disk, &head, needed));
        }
        let parts = partition_disk(disk, &head, PartitionKind::Root, o.root_bytes);
        let find = |kind| parts.iter().find(|p| p.kind == kind).map(|p| p.device.clone());
        let (boot, swap, root) = (
            find(PartitionKind::Boot),
            find(PartitionKind::Swap),
            find(PartitionKind::Root),
        );
        let root_part = parts.last().cloned().expect("a root partition");
        self.add_disk(disk, false, parts);
        self.boot_filesystems(boot.expect("a boot partition"));
        if let Some(swap) = swap {
            self.plan.filesystems.push(Filesystem {
                device: swap,
                kind: FsKind::Swap,
                label: "swap".into(),
                mountpoint: None,
            });
        }
        self.plan.root_device = root.expect("a root partition");
        self.plan.root_bytes = root_part.size_bytes;
        self.root_filesystem();
        Ok(())
    }

    /// One volume group over all disks: boot partitions on the first, a PV
    /// partition on each.
    fn lvm(&mut self, disks: &[Disk], boot_part: (PartitionKind, u64)) -> Result<(), PlanError> {
        let first_head = vec![boot_part, (PartitionKind::Boot, self.options.boot_bytes)];
        let mut pvs = vec![];
        for (i, disk) in disks.iter().enumerate() {
            let head = if i == 0 { first_head.clone() } else { vec![] };
            if data_room(disk, &head) < MIN_DATA_PARTITION {
                return Err(self.too_small(disk, &head, MIN_DATA_PARTITION));
            }
            let parts = partition_disk(disk, &head, PartitionKind::Lvm, None);
            let pv = parts.last().expect("a PV partition");
            pvs.push((pv.device.clone(), pv.size_bytes));
            self.add_disk(disk, false, parts);
        }
        let boot = self.plan.disks[0].partitions[1].device.clone();
        self.boot_filesystems(boot);
        self.volume_group(pvs)
    }

    /// md arrays on every disk's data partition, LVM on the arrays.
    fn raid(&mut self, disks: &[Disk], boot_part: (PartitionKind, u64), level: RaidLevel) -> Result<(), PlanError> {
        let head = vec![boot_part, (PartitionKind::Boot, self.options.boot_bytes)];
        let (data, spare) = if level == RaidLevel::Raid0 {
            (disks.to_vec(), None)
        } else {
            self.pairs(disks)?
        };
        let all: Vec<&Disk> = data.iter().chain(spare.as_ref()).collect();
        for d in &all {
            if data_room(d, &head) < MIN_DATA_PARTITION + MD_DATA_OFFSET {
                return Err(self.too_small(d, &head, MIN_DATA_PARTITION + MD_DATA_OFFSET));
            }
        }
        // Member sizes: RAID 10 uses the smallest member's size on all of
        // them (and the spare must be able to replace any), so all are
        // made that size; a RAID 1 pair is as large as its smaller disk;
        // RAID 0 stripes over unequal disks and wastes nothing.
        let smallest = all
            .iter()
            .map(|d| floor_to(data_room(d, &head), MIB))
            .min()
            .unwrap_or(0);
        let member_size = |i: usize| -> Option<u64> {
            match level {
                RaidLevel::Raid0 => None,
                RaidLevel::Raid10 => Some(smallest),
                RaidLevel::Raid1 => {
                    let pair = &data[i / 2 * 2..i / 2 * 2 + 2];
                    Some(
                        pair.iter()
                            .map(|d| floor_to(data_room(d, &head), MIB))
                            .min()
                            .unwrap_or(0),
                    )
                }
            }
        };
        for (i, d) in data.iter().enumerate() {
            let parts = partition_disk(d, &head, PartitionKind::Raid, member_size(i));
            self.add_disk(d, false, parts);
        }
        if let Some(s) = &spare {
            let parts = partition_disk(s, &head, PartitionKind::Raid, Some(smallest));
            self.add_disk(s, true, parts);
        }
        let part = |d: &PlannedDisk, n: usize| d.partitions[n].clone();
        let (actives, spares): (Vec<&PlannedDisk>, Vec<&PlannedDisk>) = self.plan.disks.iter().partition(|d| !d.spare);

        // /boot: RAID 1 over every disk, metadata at the end.
        let boot_members: Vec<Partition> = actives.iter().map(|d| part(d, 1)).collect();
        let boot = MdArray {
            device: "/dev/md0".into(),
            name: "boot".into(),
            level: RaidLevel::Raid1,
            members: boot_members.iter().map(|p| p.device.clone()).collect(),
            spares: spares.iter().map(|d| part(d, 1).device).collect(),
            metadata: "1.0".into(),
            size_bytes: boot_members
                .iter()
                .map(|p| p.size_bytes)
                .min()
                .unwrap_or(0)
                .saturating_sub(MD_TAIL),
        };

        let data_parts: Vec<Partition> = actives.iter().map(|d| part(d, 2)).collect();
        let spare_parts: Vec<String> = spares.iter().map(|d| part(d, 2).device).collect();
        let usable = |p: &Partition| p.size_bytes.saturating_sub(MD_DATA_OFFSET);
        let groups: Vec<(Vec<Partition>, Vec<String>)> = match level {
            // One mirror per pair.
            RaidLevel::Raid1 => data_parts.chunks(2).map(|c| (c.to_vec(), vec![])).collect(),
            RaidLevel::Raid0 | RaidLevel::Raid10 => vec![(data_parts.clone(), spare_parts)],
        };
        let mut arrays = vec![boot];
        for (n, (members, spares)) in groups.into_iter().enumerate() {
            let min = members.iter().map(usable).min().unwrap_or(0);
            let size_bytes = match level {
                RaidLevel::Raid0 => members.iter().map(usable).sum(),
                RaidLevel::Raid1 => min,
                RaidLevel::Raid10 => min * members.len() as u64 / 2,
            };
            arrays.push(MdArray {
                device: format!("/dev/md{}", n + 1),
                name: format!("pv{n}"),
                level,
                members: members.iter().map(|p| p.device.clone()).collect(),
                spares,
                metadata: "1.2".into(),
                size_bytes,
            });
        }
        let pvs = arrays[1..].iter().map(|a| (a.device.clone(), a.size_bytes)).collect();
        let boot_device = arrays[0].device.clone();
        self.plan.arrays = arrays;
        self.boot_filesystems(boot_device);
        self.volume_group(pvs)
    }

    /// `lvm_raid10s`: the OS on the smallest pair as `lvm_raid1` lays out
    /// a pair; RAID 10 over the other pairs for a data volume.
    fn raid10s(&mut self, disks: &[Disk], boot_part: (PartitionKind, u64)) -> Result<(), PlanError> {
        let (sorted, _) = self.pairs(disks)?;
        let (os, rest) = sorted.split_at(2);
        self.raid(os, boot_part, RaidLevel::Raid1)?;
        // One member partition per data disk, all the size of the smallest
        // (RAID 10 uses no more of any member).
        for d in rest {
            if data_room(d, &[]) < MIN_DATA_PARTITION + MD_DATA_OFFSET {
                return Err(self.too_small(d, &[], MIN_DATA_PARTITION + MD_DATA_OFFSET));
            }
        }
        let member = rest
            .iter()
            .map(|d| floor_to(data_room(d, &[]), MIB))
            .min()
            .expect("at least one data pair");
        let mut members = vec![];
        for d in rest {
            let parts = partition_disk(d, &[], PartitionKind::Raid, Some(member));
            members.push(parts[0].device.clone());
            self.add_disk(d, false, parts);
        }
        let size_bytes = (member - MD_DATA_OFFSET) * members.len() as u64 / 2;
        let array = MdArray {
            device: format!("/dev/md{}", self.plan.arrays.len()),
            name: DATA_LV.into(),
            level: RaidLevel::Raid10,
            members,
            spares: vec![],
            metadata: "1.2".into(),
            size_bytes,
        };
        let vg_bytes = floor_to(size_bytes.saturating_sub(PV_HEADER), EXTENT);
        let lv = format!("/dev/{DATA_VG}/{DATA_LV}");
        self.plan.data_volume = Some(DataVolume {
            volume_group: VolumeGroup {
                name: DATA_VG.into(),
                physical_volumes: vec![array.device.clone()],
                size_bytes: vg_bytes,
            },
            logical_volume: LogicalVolume {
                name: DATA_LV.into(),
                device: lv.clone(),
                size_bytes: None,
            },
        });
        self.plan.arrays.push(array);
        self.plan.filesystems.push(Filesystem {
            device: lv,
            kind: FsKind::Ext4,
            label: DATA_LV.into(),
            mountpoint: Some("/data".into()),
        });
        Ok(())
    }

    /// The data disks in mirror order (each pair adjacent) and the spare.
    /// Disks are paired by size, so that a pair wastes as little as it can;
    /// a pair that still differs by more than the tolerance is refused.
    fn pairs(&self, disks: &[Disk]) -> Result<(Vec<Disk>, Option<Disk>), PlanError> {
        let mut sorted = disks.to_vec();
        sorted.sort_by(|a, b| (a.size_bytes, &a.name).cmp(&(b.size_bytes, &b.name)));
        let worst = |set: &[Disk]| -> (u64, usize) {
            // The worst pair's difference in parts per million, and where.
            set.chunks(2)
                .enumerate()
                .map(|(i, p)| {
                    (
                        (p[1].size_bytes - p[0].size_bytes) * 1_000_000 / p[1].size_bytes.max(1),
                        i,
                    )
                })
                .max()
                .unwrap_or((0, 0))
        };
        let (data, spare) = if self.layout.rule().spare {
            // The spare is the disk whose leaving out pairs the rest best;
            // on a tie the largest (the usual odd one out).
            let (best, _) = (0..sorted.len())
                .map(|i| {
                    let mut rest = sorted.clone();
                    rest.remove(i);
                    (i, worst(&rest).0)
                })
                .min_by_key(|&(i, w)| (w, std::cmp::Reverse(i)))
                .expect("at least five disks");
            let spare = sorted.remove(best);
            (sorted, Some(spare))
        } else {
            (sorted, None)
        };
        let (ppm, i) = worst(&data);
        let tolerance = self.options.pair_tolerance_percent;
        if ppm > u64::from(tolerance) * 10_000 {
            let (small, large) = (&data[2 * i], &data[2 * i + 1]);
            return Err(PlanError::UnequalPair {
                small: small.name.clone(),
                small_bytes: small.size_bytes,
                large: large.name.clone(),
                large_bytes: large.size_bytes,
                percent: ppm as f64 / 10_000.0,
                tolerance,
            });
        }
        Ok((data, spare))
    }

    /// The volume group over `pvs` (device, size) with swap and root.
    fn volume_group(&mut self, pvs: Vec<(String, u64)>) -> Result<(), PlanError> {
        let o = self.options;
        let size_bytes: u64 = pvs
            .iter()
            .map(|(_, s)| floor_to(s.saturating_sub(PV_HEADER), EXTENT))
            .sum();
        let vg = &o.volume_group;
        // LVM rounds a volume up to whole extents; the plan says so.
        let swap = ceil_to(o.swap_bytes, EXTENT);
        let root_available = size_bytes.saturating_sub(swap);
        let root_bytes = o.root_bytes.map(|r| ceil_to(r, EXTENT));
        let needed = root_bytes.unwrap_or(o.min_root_bytes);
        if root_available < needed {
            return Err(PlanError::RootTooSmall {
                available_bytes: root_available,
                needed_bytes: needed,
            });
        }
        if swap > 0 {
            self.plan.logical_volumes.push(LogicalVolume {
                name: "swap".into(),
                device: format!("/dev/{vg}/swap"),
                size_bytes: Some(swap),
            });
            self.plan.filesystems.push(Filesystem {
                device: format!("/dev/{vg}/swap"),
                kind: FsKind::Swap,
                label: "swap".into(),
                mountpoint: None,
            });
        }
        self.plan.logical_volumes.push(LogicalVolume {
            name: "root".into(),
            device: format!("/dev/{vg}/root"),
            size_bytes: root_bytes,
        });
        self.plan.root_device = format!("/dev/{vg}/root");
        self.plan.root_bytes = root_bytes.unwrap_or(root_available);
        self.plan.volume_group = Some(VolumeGroup {
            name: vg.clone(),
            physical_volumes: pvs.into_iter().map(|(d, _)| d).collect(),
            size_bytes,
        });
        self.root_filesystem();
        Ok(())
    }
}

/// The commands that apply `plan`, in order: stop whatever old arrays and
/// volume groups the ramdisk assembled, wipe, partition, wipe the new
/// partitions (an old signature at the same offset would otherwise come
/// back to life), create arrays, volume group and volumes, make
/// filesystems.
fn commands(plan: &LayoutPlan) -> Vec<Command> {
    let mut out = vec![];
    // Old arrays or volume groups on these disks hold them open, and
    // partitioning an open disk fails; the ramdisk runs nothing from disk,
    // so stopping all of them is safe. Nothing to stop is not an error.
    // Not for the one-disk layouts: what they stop could live on the disks
    // they promise to leave alone.
    if !plan.layout.rule().one_disk {
        let mut cleanup = |why: &str, argv: &[&str]| {
            out.push(Command {
                may_fail: true,
                ..cmd(why, argv)
            })
        };
        cleanup("deactivate old LVM volume groups", &["vgchange", "--activate", "n"]);
        cleanup("stop old md arrays", &["mdadm", "--stop", "--scan"]);
    }

    for d in &plan.disks {
        out.push(cmd(
            format!(
                "wipe the signatures on {} (partition tables, RAID, LVM, filesystems)",
                d.name
            ),
            &["wipefs", "--all", "--force", &d.device],
        ));
        out.push(cmd(
            format!("destroy {}'s GPT and MBR, both copies", d.name),
            &["sgdisk", "--zap-all", &d.device],
        ));
        let mut argv: Vec<String> = vec!["sgdisk".into()];
        for p in &d.partitions {
            let n = p.number;
            argv.push(format!("--new={n}:{}M:+{}M", p.start_bytes / MIB, p.size_bytes / MIB));
            argv.push(format!("--typecode={n}:{}", p.kind.type_code()));
            argv.push(format!("--change-name={n}:{}", p.kind.label()));
        }
        argv.push(d.device.clone());
        out.push(Command {
            argv,
            why: format!("partition {}", d.name),
            may_fail: false,
        });
    }
    for p in plan.disks.iter().flat_map(|d| &d.partitions) {
        out.push(cmd(
            format!("wipe old signatures at the new {}", p.device),
            &["wipefs", "--all", "--force", &p.device],
        ));
    }
    for a in &plan.arrays {
        let mut argv: Vec<String> = [
            "mdadm",
            "--create",
            &a.device,
            "--run",
            &format!("--name={}", a.name),
            &format!("--metadata={}", a.metadata),
            &format!("--level={}", a.level.mdadm()),
            &format!("--raid-devices={}", a.members.len()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if a.level == RaidLevel::Raid10 {
            argv.push("--layout=n2".into());
        }
        if !a.spares.is_empty() {
            argv.push(format!("--spare-devices={}", a.spares.len()));
        }
        argv.extend(a.members.iter().chain(&a.spares).cloned());
        out.push(Command {
            argv,
            why: format!("create md array {} ({:?})", a.name, a.level),
            may_fail: false,
        });
        out.push(cmd(
            format!("wipe old signatures inside the new {}", a.device),
            &["wipefs", "--all", "--force", &a.device],
        ));
    }
    if let Some(vg) = &plan.volume_group {
        for pv in &vg.physical_volumes {
            out.push(cmd(
                format!("make {pv} an LVM physical volume"),
                &["pvcreate", "--yes", pv],
            ));
        }
        let mut argv = vec!["vgcreate".to_string(), "--yes".into(), vg.name.clone()];
        argv.extend(vg.physical_volumes.iter().cloned());
        out.push(Command {
            argv,
            why: format!("create volume group {}", vg.name),
            may_fail: false,
        });
        for lv in &plan.logical_volumes {
            let size = match lv.size_bytes {
                Some(b) => format!("--size={}m", b / MIB),
                None => "--extents=100%FREE".into(),
            };
            out.push(cmd(
                format!("create logical volume {}", lv.name),
                &[
                    "lvcreate",
                    "--yes",
                    "--wipesignatures=y",
                    "--zero=y",
                    &format!("--name={}", lv.name),
                    &size,
                    &vg.name,
                ],
            ));
        }
    }
    if let Some(d) = &plan.data_volume {
        let vg = &d.volume_group;
        let mut argv = vec!["pvcreate".to_string(), "--yes".into()];
        argv.extend(vg.physical_volumes.iter().cloned());
        out.push(Command {
            argv,
            why: "make the data array an LVM physical volume".into(),
            may_fail: false,
        });
        let mut argv = vec!["vgcreate".to_string(), "--yes".into(), vg.name.clone()];
        argv.extend(vg.physical_volumes.iter().cloned());
        out.push(Command {
            argv,
            why: format!("create volume group {}", vg.name),
            may_fail: false,
        });
        out.push(cmd(
            format!("create logical volume {}", d.logical_volume.name),
            &[
                "lvcreate",
                "--yes",
                "--wipesignatures=y",
                "--zero=y",
                &format!("--name={}", d.logical_volume.name),
                "--extents=100%FREE",
                &vg.name,
            ],
        ));
    }
    for fs in &plan.filesystems {
        let argv: Vec<&str> = match fs.kind {
            FsKind::Vfat => vec!["mkfs.vfat", "-F", "32", "-n", &fs.label, &fs.device],
            FsKind::Ext4 => vec!["mkfs.ext4", "-F", "-q", "-L", &fs.label, &fs.device],
            FsKind::Swap => vec!["mkswap", "-L", &fs.label, &fs.device],
        };
        out.push(cmd(format!("make the {} filesystem on {}", fs.label, fs.device), &argv));
    }
    out
}

#[cfg(test)]
mod tests;
