//! Discovery's inventory: what a machine is made of, read from `/proc`,
//! `/sys` and `/dev/disk/by-id` under a configurable root.
//!
//! Production reads `/`; tests read fixture trees under `tests/fixtures/`
//! that mimic those directories, so every rule here (which disks count,
//! which NICs are virtual, where a serial comes from) is tested without the
//! hardware. Nothing here runs a program: the ramdisk has no `lshw`, and
//! sysfs says everything the report needs.
//!
//! The result is the wire type [`Hardware`] plus what it has no field for
//! (firmware kind and Secure Boot, reported beside it; sockets and
//! threads), and notes on whatever was
//! skipped or unreadable, so that a person reading the report knows why a
//! disk or NIC is not in it.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kiln_types::MacAddr;
use kiln_types::catalog::Arch;
use kiln_types::machine::{Disk, Dmi, Gpu, Hardware, HardwareNic};
use serde::{Deserialize, Serialize};

/// How the machine booted, which decides the boot partition a layout
/// makes: an EFI system partition, or a BIOS boot partition for GRUB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Uefi,
    Bios,
}

/// The CPU's shape. [`Hardware`] keeps only the model and the core count.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CpuSummary {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub sockets: u32,
    /// Physical cores over all sockets.
    pub cores: u32,
    /// Logical CPUs (hardware threads) over all sockets.
    pub threads: u32,
}

/// Everything discovery found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// What the server stores for the machine.
    pub hardware: Hardware,
    /// Reported beside [`Hardware`] (the machine record keeps it apart).
    pub firmware: Firmware,
    /// Not in [`Hardware`] yet beyond model and cores.
    pub cpu: CpuSummary,
    /// What was skipped or could not be read, one line each, for people.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// UEFI Secure Boot is on (never on BIOS).
    #[serde(default)]
    pub secure_boot: bool,
}

impl Inventory {
    /// The firmware as the discovery report and the machine record say it.
    pub fn firmware_report(&self) -> kiln_types::machine::Firmware {
        kiln_types::machine::Firmware {
            mode: match self.firmware {
                Firmware::Uefi => kiln_types::machine::FirmwareMode::Uefi,
                Firmware::Bios => kiln_types::machine::FirmwareMode::Bios,
            },
            secure_boot: self.secure_boot,
        }
    }
}

/// The UEFI global variable `SecureBoot` (EFI_GLOBAL_VARIABLE's GUID) under
/// efivarfs: 4 bytes of attributes, then one byte, 1 when Secure Boot is on.
const SECURE_BOOT_VAR: &str = "sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// Whether Secure Boot is on: the variable's last byte. Absent (a firmware
/// without Secure Boot, or efivarfs not mounted) reads as off, and an
/// unreadable or malformed variable too, with a note, since the
/// difference only decides which signed chain a later boot needs.
fn secure_boot(root: &Path, notes: &mut Vec<String>) -> bool {
    match fs::read(root.join(SECURE_BOOT_VAR)) {
        Ok(bytes) if bytes.len() == 5 => bytes[4] == 1,
        Ok(bytes) => {
            notes.push(format!(
                "secure boot: the SecureBoot variable has {} bytes, not 5: read as off",
                bytes.len()
            ));
            false
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            notes.push(format!(
                "secure boot: cannot read the SecureBoot variable ({e}): read as off"
            ));
            false
        }
    }
}

/// Discovery could not read what every Linux system has.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read {path}: is the root `{root}` a Linux system's?")]
    Read {
        root: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Kernel block devices that are not disks a layout may use: loop files,
/// RAM disks, compressed swap, optical drives, RAID and device-mapper
/// volumes (built on other disks), network block devices, floppies.
const NOT_DISKS: [&str; 8] = ["loop", "ram", "zram", "sr", "md", "dm-", "nbd", "fd"];

/// PCI vendors whose display controllers are a BMC's or an emulator's
/// framebuffer, not a GPU anyone schedules work on: ASPEED, Matrox, QEMU's
/// std-vga, Red Hat (QXL, virtio-gpu), Cirrus, VMware.
const FRAMEBUFFER_VENDORS: [&str; 7] = ["1a03", "102b", "1234", "1b36", "1af4", "1013", "15ad"];

/// Drivers of hardware RAID controllers, which a SAS HBA's PCI class alone
/// does not tell apart from a plain HBA.
const RAID_DRIVERS: [&str; 5] = ["megaraid_sas", "hpsa", "smartpqi", "aacraid", "mpi3mr"];

/// Reads the inventory of the system whose `/proc`, `/sys` and `/dev` are
/// under `root`.
pub fn collect(root: &Path) -> Result<Inventory, InventoryError> {
    let must = |rel: &str| {
        let path = root.join(rel);
        fs::read_to_string(&path).map_err(|source| InventoryError::Read {
            root: root.to_path_buf(),
            path,
            source,
        })
    };
    let cpuinfo = must("proc/cpuinfo")?;
    let meminfo = must("proc/meminfo")?;
    let mut notes = vec![];

    let cpu = parse_cpuinfo(&cpuinfo);
    let memory_bytes = memory_from_blocks(root).unwrap_or_else(|| parse_memtotal(&meminfo).unwrap_or(0));
    if memory_bytes == 0 {
        notes.push("memory: neither /sys/devices/system/memory nor MemTotal in /proc/meminfo says".into());
    }
    let disks = disks(root, &mut notes);
    let nics = nics(root, &mut notes);
    let pci = pci_devices(root);
    let mut controllers = pci.iter().filter(|d| d.is_raid_controller()).map(PciDevice::label);
    let raid_controller = controllers.next();
    for other in controllers {
        notes.push(format!(
            "raid controller {other}: not reported, the inventory holds one"
        ));
    }
    let gpus = pci
        .iter()
        .filter(|d| d.is_gpu())
        .map(|d| Gpu {
            model: d.label(),
            vgpu: d.vgpu_capable,
        })
        .collect();
    let firmware = if root.join("sys/firmware/efi").is_dir() {
        Firmware::Uefi
    } else {
        Firmware::Bios
    };
    let secure_boot = firmware == Firmware::Uefi && secure_boot(root, &mut notes);

    let hardware = Hardware {
        arch: own_arch(),
        cpu_model: cpu.model.clone(),
        cpu_cores: cpu.cores,
        memory_bytes,
        disks,
        nics,
        gpus,
        raid_controller,
        dmi: dmi(root),
    };
    Ok(Inventory {
        hardware,
        firmware,
        cpu,
        notes,
        secure_boot,
    })
}

/// The agent runs natively on the machine it inventories, so the machine's
/// architecture is the one it was built for.
fn own_arch() -> Option<Arch> {
    match std::env::consts::ARCH {
        "x86_64" => Some(Arch::X86_64),
        "aarch64" => Some(Arch::Aarch64),
        _ => None,
    }
}

/// A sysfs attribute as text, trimmed; `None` if absent, unreadable (sysfs
/// answers `EINVAL` for e.g. the speed of a NIC without link) or empty.
fn attr(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// The names in a directory, sorted (read_dir's order is the filesystem's).
fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

/// The last path component a symlink points at (`driver -> …/ixgbe`).
/// Read from the link's text, never resolved, so fixture trees may point
/// at paths that do not exist.
fn link_name(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    target.file_name()?.to_str().map(str::to_string)
}

pub fn parse_cpuinfo(text: &str) -> CpuSummary {
    let mut model = None;
    let mut threads = 0u32;
    let mut sockets = BTreeSet::new();
    let mut cores = BTreeSet::new();
    // One block per logical CPU, separated by blank lines.
    for block in text.split("\n\n") {
        let mut physical = None;
        let mut core = None;
        let mut is_cpu = false;
        for line in block.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "processor" => is_cpu = true,
                "model name" if model.is_none() && !value.is_empty() => model = Some(value.to_string()),
                "physical id" => physical = Some(value.to_string()),
                "core id" => core = Some(value.to_string()),
                _ => {}
            }
        }
        if !is_cpu {
            continue;
        }
        threads += 1;
        let socket = physical.unwrap_or_default();
        sockets.insert(socket.clone());
        // Without topology lines (some VMs, arm64) each logical CPU counts
        // as a core: the best that can be said.
        cores.insert((socket, core.unwrap_or_else(|| format!("thread{threads}"))));
    }
    CpuSummary {
        model,
        sockets: if threads == 0 { 0 } else { sockets.len() as u32 },
        cores: cores.len() as u32,
        threads,
    }
}

/// `MemTotal` in bytes. It is less than the installed memory (the kernel
/// keeps some), which is why the memory blocks are asked first.
pub fn parse_memtotal(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Installed memory as `lsmem` counts it: online memory blocks times the
/// block size.
fn memory_from_blocks(root: &Path) -> Option<u64> {
    let dir = root.join("sys/devices/system/memory");
    let block = u64::from_str_radix(attr(&dir.join("block_size_bytes"))?.trim_start_matches("0x"), 16).ok()?;
    let online = names(&dir)
        .iter()
        .filter(|n| n.starts_with("memory") && n[6..].parse::<u64>().is_ok())
        .filter(|n| attr(&dir.join(n).join("online")).as_deref() == Some("1"))
        .count() as u64;
    (online > 0).then(|| online * block)
}

fn disks(root: &Path, notes: &mut Vec<String>) -> Vec<Disk> {
    let sys_block = root.join("sys/block");
    let by_id = by_id_links(root);
    let mut out = vec![];
    for name in names(&sys_block) {
        if NOT_DISKS.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let dir = sys_block.join(&name);
        // NVMe multipath's per-path devices (nvme0c0n1) are hidden: the
        // disk is their shared head (nvme0n1).
        if attr(&dir.join("hidden")).as_deref() == Some("1") {
            continue;
        }
        // Removable media (USB sticks, card readers, the virtual media a
        // BMC mounts) are left out so that no layout ever wipes them.
        if attr(&dir.join("removable")).as_deref() == Some("1") {
            notes.push(format!("disk {name}: removable, skipped"));
            continue;
        }
        // `size` is in 512-byte units whatever the disk's sector size.
        let sectors: u64 = attr(&dir.join("size")).and_then(|s| s.parse().ok()).unwrap_or(0);
        if sectors == 0 {
            notes.push(format!("disk {name}: no medium (size 0), skipped"));
            continue;
        }
        let model = attr(&dir.join("device/model"));
        let ids: Vec<&String> = by_id.iter().filter(|(_, dev)| *dev == name).map(|(id, _)| id).collect();
        let serial = attr(&dir.join("device/serial"))
            .or_else(|| attr(&dir.join("serial")))
            .or_else(|| vpd_serial(&dir.join("device/vpd_pg80")))
            .or_else(|| ata_serial_from_id(&ids, model.as_deref()));
        out.push(Disk {
            size_bytes: sectors.saturating_mul(512),
            rotational: attr(&dir.join("queue/rotational")).as_deref() == Some("1"),
            model,
            serial,
            by_id: preferred_id(&ids).map(|id| format!("/dev/disk/by-id/{id}")),
            name,
        });
    }
    out
}

/// `(link name, kernel device)` of every whole-disk link in
/// `/dev/disk/by-id` (partitions' `-partN` links left out).
fn by_id_links(root: &Path) -> Vec<(String, String)> {
    let dir = root.join("dev/disk/by-id");
    names(&dir)
        .into_iter()
        .filter(|id| !id.contains("-part"))
        .filter_map(|id| link_name(&dir.join(&id)).map(|dev| (id, dev)))
        .collect()
}

/// The by-id name least likely to change: a WWN or EUI is the disk's own
/// world-wide name; model-and-serial names come next; anything else after.
fn preferred_id<'a>(ids: &[&'a String]) -> Option<&'a String> {
    const ORDER: [&str; 7] = ["wwn-", "nvme-eui.", "ata-", "nvme-", "scsi-", "virtio-", "usb-"];
    let rank = |id: &str| ORDER.iter().position(|p| id.starts_with(p)).unwrap_or(ORDER.len());
    ids.iter().copied().min_by_key(|id| (rank(id), id.as_str()))
}

/// The unit serial number from SCSI VPD page 0x80: a 4-byte header whose
/// last byte is the length, then the serial in ASCII (space padded).
fn vpd_serial(path: &Path) -> Option<String> {
    let page = fs::read(path).ok()?;
    let len = usize::from(*page.get(3)?);
    let serial = String::from_utf8_lossy(page.get(4..4 + len)?).trim().to_string();
    (!serial.is_empty()).then_some(serial)
}

/// SATA disks behind libata may have no serial attribute, but udev names
/// their link `ata-<model with _ for spaces>_<serial>`: with the model
/// known, the serial is what follows it.
fn ata_serial_from_id(ids: &[&String], model: Option<&str>) -> Option<String> {
    let model = model?.replace(' ', "_");
    ids.iter()
        .find_map(|id| id.strip_prefix("ata-")?.strip_prefix(&model)?.strip_prefix('_'))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn nics(root: &Path, notes: &mut Vec<String>) -> Vec<HardwareNic> {
    let class = root.join("sys/class/net");
    let mut out = vec![];
    for name in names(&class) {
        if name == "lo" {
            continue;
        }
        let dir = class.join(&name);
        // Bridges, bonds, VLANs, veth and tun devices have no `device`:
        // they are made by software on top of the real NICs.
        if fs::symlink_metadata(dir.join("device")).is_err() {
            notes.push(format!("nic {name}: virtual, skipped"));
            continue;
        }
        if dir.join("wireless").exists() || dir.join("phy80211").exists() {
            notes.push(format!("nic {name}: wireless, skipped"));
            continue;
        }
        // ARPHRD_ETHER: InfiniBand (32) has 20-byte addresses, no MAC.
        if attr(&dir.join("type")).is_some_and(|t| t != "1") {
            notes.push(format!("nic {name}: not Ethernet, skipped"));
            continue;
        }
        let Some(mac) = attr(&dir.join("address")).and_then(|a| a.parse::<MacAddr>().ok()) else {
            notes.push(format!("nic {name}: no readable MAC address, skipped"));
            continue;
        };
        if mac.0 == [0; 6] {
            notes.push(format!("nic {name}: MAC 00:00:00:00:00:00, skipped"));
            continue;
        }
        out.push(HardwareNic {
            mac,
            driver: link_name(&dir.join("device/driver")),
            // -1 (or EINVAL) when there is no link.
            speed_mbps: attr(&dir.join("speed"))
                .and_then(|s| s.parse::<u32>().ok())
                .filter(|s| *s > 0),
            link: attr(&dir.join("carrier")).as_deref() == Some("1"),
            name,
        });
    }
    out
}

fn dmi(root: &Path) -> Option<Dmi> {
    let dir = root.join("sys/class/dmi/id");
    let dmi = Dmi {
        vendor: attr(&dir.join("sys_vendor")),
        product: attr(&dir.join("product_name")),
        serial: attr(&dir.join("product_serial")),
        uuid: attr(&dir.join("product_uuid")).map(|u| u.to_ascii_lowercase()),
    };
    (dmi != Dmi::default()).then_some(dmi)
}

/// The parts of a PCI device the inventory looks at.
#[derive(Debug)]
struct PciDevice {
    /// `0x010400`: base class, subclass, programming interface.
    class: u32,
    vendor: String,
    device: String,
    driver: Option<String>,
    /// Offers mediated devices or SR-IOV functions (vGPU).
    vgpu_capable: bool,
}

impl PciDevice {
    fn is_raid_controller(&self) -> bool {
        self.class >> 8 == 0x0104 || self.driver.as_deref().is_some_and(|d| RAID_DRIVERS.contains(&d))
    }

    fn is_gpu(&self) -> bool {
        // 0x0300 VGA-compatible, 0x0302 3D controller (datacenter GPUs).
        matches!(self.class >> 8, 0x0300 | 0x0302) && !FRAMEBUFFER_VENDORS.contains(&self.vendor.as_str())
    }

    /// `NVIDIA 10de:2330 (nvidia)`: there is no pci.ids in the ramdisk,
    /// so the IDs stand for the model, with the vendor's name when known.
    fn label(&self) -> String {
        let vendor = match self.vendor.as_str() {
            "10de" => "NVIDIA ",
            "1002" => "AMD ",
            "8086" => "Intel ",
            "1000" => "Broadcom/LSI ",
            "103c" => "HPE ",
            "9005" => "Microchip/Adaptec ",
            _ => "",
        };
        let driver = self.driver.as_ref().map(|d| format!(" ({d})")).unwrap_or_default();
        format!("{vendor}{}:{}{driver}", self.vendor, self.device)
    }
}

fn pci_devices(root: &Path) -> Vec<PciDevice> {
    let dir = root.join("sys/bus/pci/devices");
    let hex = |path: &Path| attr(path).map(|v| v.trim_start_matches("0x").to_ascii_lowercase());
    names(&dir)
        .into_iter()
        .filter_map(|addr| {
            let dev = dir.join(addr);
            Some(PciDevice {
                class: u32::from_str_radix(&hex(&dev.join("class"))?, 16).ok()?,
                vendor: hex(&dev.join("vendor"))?,
                device: hex(&dev.join("device"))?,
                driver: link_name(&dev.join("driver")),
                vgpu_capable: dev.join("mdev_supported_types").is_dir()
                    || attr(&dev.join("sriov_totalvfs")).is_some_and(|n| n != "0"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    #[test]
    fn cpuinfo_counts_sockets_cores_and_threads() {
        // Two sockets, two cores each, two threads per core.
        let mut text = String::new();
        for (n, (socket, core)) in [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (0, 1), (1, 0), (1, 1)]
            .into_iter()
            .enumerate()
        {
            text.push_str(&format!(
                "processor\t: {n}\nmodel name\t: Xeon\nphysical id\t: {socket}\ncore id\t\t: {core}\n\n"
            ));
        }
        let cpu = parse_cpuinfo(&text);
        assert_eq!((cpu.sockets, cpu.cores, cpu.threads), (2, 4, 8));
        assert_eq!(cpu.model.as_deref(), Some("Xeon"));
        // No topology: every thread is a core.
        let cpu = parse_cpuinfo("processor : 0\nBogoMIPS : 50\n\nprocessor : 1\n\n");
        assert_eq!((cpu.sockets, cpu.cores, cpu.threads, cpu.model), (1, 2, 2, None));
        assert_eq!(parse_cpuinfo(""), CpuSummary::default());
    }

    #[test]
    fn memtotal() {
        assert_eq!(
            parse_memtotal("MemTotal:       16303916 kB\nMemFree: 1 kB\n"),
            Some(16303916 * 1024)
        );
        assert_eq!(parse_memtotal("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn the_lab_vm() {
        let inv = collect(&fixture("qemu-bios")).unwrap();
        let hw = &inv.hardware;
        assert_eq!(inv.firmware, Firmware::Bios);
        assert_eq!(hw.cpu_model.as_deref(), Some("QEMU Virtual CPU version 2.5+"));
        assert_eq!((inv.cpu.sockets, inv.cpu.cores, inv.cpu.threads), (1, 1, 1));
        // No memory blocks in this tree: MemTotal.
        assert_eq!(hw.memory_bytes, 491_640 * 1024);
        // loop0, ram0, zram0, sr0, md127 and dm-0 are not disks.
        let names: Vec<&str> = hw.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["vda", "vdb"]);
        let vda = &hw.disks[0];
        assert_eq!(vda.size_bytes, 8 << 30);
        assert_eq!(vda.serial.as_deref(), Some("kiln-disk-1"));
        assert_eq!(vda.by_id.as_deref(), Some("/dev/disk/by-id/virtio-kiln-disk-1"));
        assert!(vda.rotational);
        assert_eq!(vda.model, None);
        // lo and the bridge are not NICs.
        assert_eq!(hw.nics.len(), 1);
        let nic = &hw.nics[0];
        assert_eq!(nic.mac.to_string(), "52:54:00:13:00:01");
        assert_eq!((nic.name.as_str(), nic.driver.as_deref()), ("eth0", Some("virtio_net")));
        assert_eq!(nic.speed_mbps, None, "virtio reports -1");
        assert!(nic.link);
        let dmi = hw.dmi.as_ref().unwrap();
        assert_eq!(dmi.vendor.as_deref(), Some("QEMU"));
        assert_eq!(dmi.uuid.as_deref(), Some("4c616200-0000-4000-8000-000000000001"));
        assert!(hw.gpus.is_empty(), "QEMU's std-vga is no GPU");
        assert_eq!(hw.raid_controller, None);
        assert!(
            inv.notes.contains(&"nic br0: virtual, skipped".to_string()),
            "{:?}",
            inv.notes
        );
    }

    #[test]
    fn a_uefi_server() {
        let inv = collect(&fixture("server-uefi")).unwrap();
        let hw = &inv.hardware;
        assert_eq!(inv.firmware, Firmware::Uefi);
        assert!(inv.secure_boot, "SecureBoot's last byte is 1");
        assert_eq!((inv.cpu.sockets, inv.cpu.cores, inv.cpu.threads), (2, 4, 8));
        assert_eq!(hw.cpu_cores, 4);
        // Three of four 32 GiB blocks online.
        assert_eq!(hw.memory_bytes, 3 * (32 << 30));

        let names: Vec<&str> = hw.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["nvme0n1", "sda", "sdb"], "sdc is removable, nvme0c0n1 hidden");
        let nvme = &hw.disks[0];
        assert_eq!(nvme.model.as_deref(), Some("SAMSUNG MZQL21T9HCJR-00A07"));
        assert_eq!(nvme.serial.as_deref(), Some("S64GNE0R123456"));
        assert_eq!(
            nvme.by_id.as_deref(),
            Some("/dev/disk/by-id/nvme-eui.36344730524003450025384500000001")
        );
        assert!(!nvme.rotational);
        // SATA SSD: serial from VPD page 0x80, the WWN link preferred.
        let sda = &hw.disks[1];
        assert_eq!(sda.serial.as_deref(), Some("PHYF123400AB480BGN"));
        assert_eq!(sda.by_id.as_deref(), Some("/dev/disk/by-id/wwn-0x55cd2e415a1b2c3d"));
        // SATA HDD: no serial attribute or VPD page; the ata- link has it.
        let sdb = &hw.disks[2];
        assert_eq!(sdb.serial.as_deref(), Some("ZL2ABCDE"));
        assert!(sdb.rotational);
        assert_eq!(sdb.size_bytes, 8_001_563_222_016);

        let nics: Vec<(&str, Option<u32>, bool)> = hw
            .nics
            .iter()
            .map(|n| (n.name.as_str(), n.speed_mbps, n.link))
            .collect();
        assert_eq!(nics, [("eno1", Some(10000), true), ("eno2", None, false)]);
        assert_eq!(hw.nics[0].driver.as_deref(), Some("ixgbe"));
        for skipped in ["nic bond0: virtual", "nic ib0: not Ethernet", "disk sdc: removable"] {
            assert!(
                inv.notes.iter().any(|n| n.starts_with(skipped)),
                "{skipped}: {:?}",
                inv.notes
            );
        }

        assert_eq!(
            hw.raid_controller.as_deref(),
            Some("Broadcom/LSI 1000:005d (megaraid_sas)")
        );
        assert_eq!(
            hw.gpus,
            [Gpu {
                model: "NVIDIA 10de:20b5 (nvidia)".into(),
                vgpu: true
            }],
            "the BMC's ASPEED VGA is no GPU"
        );
        let dmi = hw.dmi.as_ref().unwrap();
        assert_eq!(
            (dmi.vendor.as_deref(), dmi.product.as_deref(), dmi.serial.as_deref()),
            (Some("Dell Inc."), Some("PowerEdge R650"), Some("7XK2LM3"))
        );
        assert_eq!(
            dmi.uuid.as_deref(),
            Some("4c4c4544-0058-4b10-8032-b7c04f4c4d33"),
            "lowercased"
        );
    }

    #[test]
    fn secure_boot_is_the_variables_last_byte() {
        let dir = tempfile::tempdir().unwrap();
        let var = dir.path().join(SECURE_BOOT_VAR);
        std::fs::create_dir_all(var.parent().unwrap()).unwrap();
        let mut notes = vec![];
        assert!(!secure_boot(dir.path(), &mut notes), "absent is off");
        assert!(notes.is_empty(), "absent is normal: {notes:?}");
        std::fs::write(&var, [6, 0, 0, 0, 0]).unwrap();
        assert!(!secure_boot(dir.path(), &mut notes));
        std::fs::write(&var, [6, 0, 0, 0, 1]).unwrap();
        assert!(secure_boot(dir.path(), &mut notes));
        std::fs::write(&var, [6, 0, 0]).unwrap();
        assert!(!secure_boot(dir.path(), &mut notes));
        assert!(notes[0].contains("3 bytes"), "{notes:?}");
        // BIOS has none, whatever a stray file says.
        let bios = collect(&fixture("qemu-bios")).unwrap();
        assert_eq!((bios.firmware, bios.secure_boot), (Firmware::Bios, false));
    }

    #[test]
    fn a_root_that_is_not_linux_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = collect(dir.path()).unwrap_err().to_string();
        assert!(e.contains("proc/cpuinfo") && e.contains("Linux system"), "{e}");
    }

    #[test]
    fn inventory_json_round_trips() {
        let inv = collect(&fixture("server-uefi")).unwrap();
        let json = serde_json::to_string(&inv).unwrap();
        assert!(json.contains(r#""firmware":"uefi""#));
        assert_eq!(serde_json::from_str::<Inventory>(&json).unwrap(), inv);
    }
}
