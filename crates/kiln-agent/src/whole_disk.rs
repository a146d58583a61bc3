//! Whole-disk images (docs/images.md): the decisions, as pure functions.
//!
//! A whole-disk image — what Debian, Ubuntu, Rocky and Flatcar publish —
//! brings its own GPT and bootloader. The agent streams it onto one disk,
//! the **system disk**, and then finishes the disk:
//!
//! 1. `sgdisk -e` moves the backup GPT from the image's end to the disk's;
//! 2. the image's last partition (by position) grows to just before a small
//!    `CIDATA` partition kiln adds at the disk's end: same number, start,
//!    type GUID, unique GUID, name and attribute bits, so the image's fstab,
//!    `root=PARTUUID=` and bootloader still find it;
//! 3. the `CIDATA` partition gets a FAT filesystem labelled `CIDATA`
//!    holding the NoCloud seed (`user-data`, `meta-data`, and
//!    `network-config` when the plan has one): what cloud-init's NoCloud
//!    datasource looks for on any block device, with none of the image's
//!    partitions touched.
//!
//! Why the agent grows the partition, not cloud-init's `growpart` in the new
//! OS: `growpart` grows a partition into free space after it, and the
//! `CIDATA` partition sits there. The *filesystem* is left to the new OS
//! (cloud-init's `resize_rootfs`, on by default in every cloud image, or
//! Flatcar's own first-boot resize): it knows ext4 from XFS from btrfs and
//! grows them online, where the ramdisk would need every filesystem's tools.
//!
//! The GPT is read here from the disk's first sectors (no tool output to
//! parse); sgdisk, which the ramdisk has, makes the changes.

use std::fmt::{self, Write as _};
use std::io::{self, Read, Seek, SeekFrom, Write};

use kiln_types::catalog::{ImageContent, StorageLayout};
use kiln_types::machine::Disk;

/// Bytes in the GPT's logical block: the image writer, the ramdisk's
/// disks and every published image use 512.
pub const SECTOR: u64 = 512;
/// The `CIDATA` partition's size: a FAT12 filesystem with room for a large
/// user-data (the server caps each seed file at 1 MiB).
pub const CIDATA_BYTES: u64 = 4 << 20;
/// Partitions start on 1 MiB boundaries.
const ALIGN_SECTORS: u64 = (1 << 20) / SECTOR;
/// Bytes from the disk's start that hold the primary GPT with 128 entries.
pub const GPT_HEAD_BYTES: usize = 34 * SECTOR as usize;

/// The system disk for a whole-disk image: the smallest of the job's disks
/// (the first of equals, in the job's order), as seed 001's `lvm_hba` puts
/// the OS on the smallest device. `None` when there is no disk.
pub fn system_disk(disks: &[Disk]) -> Option<&Disk> {
    disks
        .iter()
        .enumerate()
        .min_by_key(|(i, d)| (d.size_bytes, *i))
        .map(|(_, d)| d)
}

/// Why a whole-disk deploy cannot go ahead with `layout`; `None` if it can.
pub fn layout_refusal(layout: StorageLayout) -> Option<String> {
    ImageContent::WholeDisk.check_layout(layout).err()
}

/// A GUID as GPT stores it (the first three fields little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Guid(pub [u8; 16]);

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        for x in &b[10..] {
            write!(f, "{x:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Partition types the agent never grows (growing them gains nothing, and
/// an ESP or BIOS boot partition last on a disk is someone's odd layout).
const NOT_GROWN: [&str; 3] = [
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", // EFI system partition
    "21686148-6449-6E6F-744E-656564454649", // BIOS boot
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F", // Linux swap
];

/// One used entry of a GPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    /// 1-based, as sgdisk and the kernel number them.
    pub number: u32,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

/// What the agent needs of a disk's GPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpt {
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    /// Where the header says its backup is (the image's end until `sgdisk
    /// -e` moved it).
    pub backup_lba: u64,
    pub entries: u32,
    pub partitions: Vec<GptPartition>,
}

/// Reads the primary GPT from a disk's first [`GPT_HEAD_BYTES`] (more is
/// fine): header at LBA 1, entries where it says (they must lie in the
/// bytes given). The header's CRC is checked: a damaged table is not
/// edited.
pub fn read_gpt(head: &[u8]) -> Result<Gpt, String> {
    let h = head
        .get(SECTOR as usize..2 * SECTOR as usize)
        .ok_or("the disk is shorter than two sectors")?;
    if &h[0..8] != b"EFI PART" {
        return Err(
            "the image has no GPT (no \"EFI PART\" at LBA 1): kiln deploys whole-disk images with a GPT only".into(),
        );
    }
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let header_size = le32(h, 12) as usize;
    if !(92..=SECTOR as usize).contains(&header_size) {
        return Err(format!("the GPT header says it is {header_size} bytes long"));
    }
    let mut copy = h[..header_size].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != le32(h, 16) {
        return Err("the GPT header's CRC does not match: the partition table is damaged".into());
    }
    let entries_lba = le64(h, 72);
    let entries = le32(h, 80);
    let entry_size = le32(h, 84) as usize;
    if entry_size < 128 || entries > 1024 {
        return Err(format!(
            "the GPT has {entries} entries of {entry_size} bytes: not a table kiln edits"
        ));
    }
    let start = usize::try_from(entries_lba * SECTOR).map_err(|_| "GPT entries out of range")?;
    let table = head
        .get(start..start + entries as usize * entry_size)
        .ok_or_else(|| format!("the GPT's entries (LBA {entries_lba}) lie outside the disk's first sectors"))?;
    if crc32(table) != le32(h, 88) {
        return Err("the GPT entries' CRC does not match: the partition table is damaged".into());
    }
    let mut partitions = vec![];
    for (i, e) in table.chunks(entry_size).enumerate() {
        let type_guid = Guid(e[0..16].try_into().unwrap());
        if type_guid == Guid::default() {
            continue;
        }
        let name: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        partitions.push(GptPartition {
            number: i as u32 + 1,
            type_guid,
            unique_guid: Guid(e[16..32].try_into().unwrap()),
            first_lba: le64(e, 32),
            last_lba: le64(e, 40),
            attributes: le64(e, 48),
            name: String::from_utf16_lossy(&name),
        });
    }
    Ok(Gpt {
        first_usable_lba: le64(h, 40),
        last_usable_lba: le64(h, 48),
        backup_lba: le64(h, 32),
        entries,
        partitions,
    })
}

/// CRC-32 (IEEE, reflected), as GPT uses.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// How the agent finishes a disk after the image is on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    /// The image's last partition and where it will end, when it grows.
    pub grown: Option<(GptPartition, u64)>,
    /// The `CIDATA` partition: number, first and last LBA.
    pub cidata: (u32, u64, u64),
    /// One sgdisk call that does both (sgdisk applies its options in
    /// order).
    pub argv: Vec<String>,
}

impl Finish {
    /// Byte offset and length of the `CIDATA` partition on the disk.
    pub fn cidata_bytes(&self) -> (u64, u64) {
        let (_, first, last) = self.cidata;
        (first * SECTOR, (last - first + 1) * SECTOR)
    }
}

/// The sgdisk call that grows the last partition of `gpt` (read after
/// `sgdisk -e`, so `last_usable_lba` is the disk's) and adds the `CIDATA`
/// partition behind it on `device`.
pub fn plan_finish(gpt: &Gpt, device: &str) -> Result<Finish, String> {
    let cidata_sectors = CIDATA_BYTES / SECTOR;
    let last_used = gpt.partitions.iter().map(|p| p.last_lba).max().unwrap_or(0);
    let cidata_first = (gpt.last_usable_lba + 1).saturating_sub(cidata_sectors) / ALIGN_SECTORS * ALIGN_SECTORS;
    if cidata_first <= last_used || cidata_first < gpt.first_usable_lba {
        return Err(format!(
            "the disk has no room after the image's partitions for the {} MiB CIDATA partition: the disk is \
             (nearly) the image's size; use a larger disk or a smaller image",
            CIDATA_BYTES >> 20
        ));
    }
    let number = (1..=gpt.entries)
        .find(|n| !gpt.partitions.iter().any(|p| p.number == *n))
        .ok_or("the image's GPT has no free entry for the CIDATA partition")?;
    let mut argv: Vec<String> = vec!["sgdisk".into(), "--set-alignment=1".into()];
    let last = gpt.partitions.iter().max_by_key(|p| p.last_lba);
    let grown = match last {
        Some(p) if !NOT_GROWN.contains(&p.type_guid.to_string().as_str()) && p.last_lba + 1 < cidata_first => {
            let end = cidata_first - 1;
            let n = p.number;
            argv.push(format!("--delete={n}"));
            argv.push(format!("--new={n}:{}:{end}", p.first_lba));
            argv.push(format!("--typecode={n}:{}", p.type_guid));
            argv.push(format!("--partition-guid={n}:{}", p.unique_guid));
            if !p.name.is_empty() {
                argv.push(format!("--change-name={n}:{}", p.name));
            }
            for bit in (0..64).filter(|b| p.attributes & (1u64 << b) != 0) {
                argv.push(format!("--attributes={n}:set:{bit}"));
            }
            Some((p.clone(), end))
        }
        _ => None,
    };
    let cidata_last = gpt.last_usable_lba;
    argv.push(format!("--new={number}:{cidata_first}:{cidata_last}"));
    // Microsoft basic data: what a FAT filesystem's partition is typed.
    argv.push(format!("--typecode={number}:0700"));
    argv.push(format!("--change-name={number}:CIDATA"));
    argv.push(device.to_string());
    Ok(Finish {
        grown,
        cidata: (number, cidata_first, cidata_last),
        argv,
    })
}

impl fmt::Display for Finish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        if let Some((p, end)) = &self.grown {
            let _ = write!(
                s,
                "partition {} ({}) grown from {} MiB to {} MiB; ",
                p.number,
                if p.name.is_empty() { "unnamed" } else { &p.name },
                ((p.last_lba - p.first_lba + 1) * SECTOR) >> 20,
                ((end - p.first_lba + 1) * SECTOR) >> 20
            );
        }
        let (n, first, last) = self.cidata;
        let _ = write!(
            s,
            "CIDATA is partition {n} ({} MiB)",
            ((last - first + 1) * SECTOR) >> 20
        );
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests;

/// A window `[offset, offset + len)` of a disk, seen as a device of its
/// own: the `CIDATA` partition is written through the whole disk's node,
/// so no partition node has to appear first (the ramdisk has no udev).
pub struct Window<'a, D> {
    disk: &'a mut D,
    offset: u64,
    len: u64,
    pos: u64,
}

impl<D> fmt::Debug for Window<'_, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Window({}+{} at {})", self.offset, self.len, self.pos)
    }
}

impl<'a, D: Seek> Window<'a, D> {
    pub fn new(disk: &'a mut D, offset: u64, len: u64) -> Self {
        Window {
            disk,
            offset,
            len,
            pos: 0,
        }
    }

    fn room(&self, want: usize) -> usize {
        want.min(self.len.saturating_sub(self.pos) as usize)
    }
}

impl<D: Read + Seek> Read for Window<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 {
            return Ok(0);
        }
        self.disk.seek(SeekFrom::Start(self.offset + self.pos))?;
        let got = self.disk.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<D: Write + Seek> Write for Window<'_, D> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the CIDATA partition's end",
            ));
        }
        self.disk.seek(SeekFrom::Start(self.offset + self.pos))?;
        let put = self.disk.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.disk.flush()
    }
}

impl<D: Seek> Seek for Window<'_, D> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let to = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        let to = to.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the window's start"))?;
        self.pos = to;
        Ok(to)
    }
}

/// Makes a FAT filesystem labelled `CIDATA` on `device` (a partition, or a
/// [`Window`] of a disk) holding `files` in its root directory: cloud-init's
/// NoCloud seed.
pub fn write_cidata<D: Read + Write + Seek>(device: &mut D, files: &[(&str, String)]) -> Result<(), String> {
    let failed = |what: &str, e: io::Error| format!("{what} on the CIDATA partition: {e}");
    fatfs::format_volume(
        &mut *device,
        fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "),
    )
    .map_err(|e| failed("making the FAT filesystem", e))?;
    let fs = fatfs::FileSystem::new(&mut *device, fatfs::FsOptions::new())
        .map_err(|e| failed("opening the new FAT filesystem", e))?;
    {
        let root = fs.root_dir();
        for (name, text) in files {
            let mut file = root
                .create_file(name)
                .map_err(|e| failed(&format!("creating {name}"), e))?;
            file.truncate().map_err(|e| failed(&format!("writing {name}"), e))?;
            file.write_all(text.as_bytes())
                .and_then(|()| file.flush())
                .map_err(|e| failed(&format!("writing {name}"), e))?;
        }
    }
    fs.unmount().map_err(|e| failed("closing the FAT filesystem", e))?;
    device.flush().map_err(|e| failed("flushing", e))
}
