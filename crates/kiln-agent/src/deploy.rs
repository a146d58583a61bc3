//! Deploy mode's decisions before its first write: is this the job's
//! machine, which of its disks the layout uses, and the plan for them.
//!
//! One pure function over the job and the inventory, so that every
//! refusal — wrong machine, protected machine, disks that do not suit the
//! layout — happens before a disk is touched, and is tested without one.
//! Running the plan and writing the image come after it (not built yet).

use kiln_types::machine::Disk;

use crate::identity::{Confirmed, Refusal, check_identity};
use crate::inventory::Inventory;
use crate::layout::{LayoutOptions, LayoutPlan, PlanError, plan};
use crate::server::DeployJob;

/// Deploy may go ahead: the machine is the job's, and this is the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    pub confirmed: Confirmed,
    pub plan: LayoutPlan,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreflightError {
    #[error(transparent)]
    Identity(#[from] Refusal),
    #[error(
        "the job names no disks: the agent writes only to disks the server recorded for the machine (discover \
         it again)"
    )]
    NoDisks,
    #[error("cannot lay out the disks: {0}")]
    Layout(#[from] PlanError),
    /// A whole-disk image with a layout it cannot combine with.
    #[error("{0}")]
    WholeDisk(String),
}

/// Where a whole-disk image goes, once the machine is confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WholeDiskTarget {
    pub confirmed: Confirmed,
    /// The system disk's kernel name and device path.
    pub disk: String,
    pub device: String,
    /// The job's other disks: left as they are.
    pub others: Vec<String>,
}

/// Checks the machine against the job and picks the system disk for a
/// whole-disk image ([`crate::whole_disk::system_disk`]); refuses a layout
/// other than `flat` (the server refuses it too, at validation).
pub fn preflight_whole_disk(job: &DeployJob, inventory: &Inventory) -> Result<WholeDiskTarget, PreflightError> {
    if let Some(why) = crate::whole_disk::layout_refusal(job.layout) {
        return Err(PreflightError::WholeDisk(why));
    }
    let confirmed = check_identity(&job.machine, &inventory.hardware)?;
    let disks: Vec<Disk> = confirmed
        .disks
        .iter()
        .filter_map(|name| inventory.hardware.disks.iter().find(|d| d.name == *name).cloned())
        .collect();
    let disk = crate::whole_disk::system_disk(&disks).ok_or(PreflightError::NoDisks)?;
    let name = disk.name.clone();
    Ok(WholeDiskTarget {
        device: format!("/dev/{name}"),
        others: disks
            .iter()
            .filter(|d| d.name != name)
            .map(|d| d.name.clone())
            .collect(),
        disk: name,
        confirmed,
    })
}

/// Checks the machine against the job and plans its disks: the job's
/// disks, in the job's order, with the firmware the machine booted with.
pub fn preflight(job: &DeployJob, inventory: &Inventory) -> Result<Preflight, PreflightError> {
    let confirmed = check_identity(&job.machine, &inventory.hardware)?;
    // Only the disks the server knows: a disk added since discovery is
    // not the job's to wipe.
    if confirmed.disks.is_empty() {
        return Err(PreflightError::NoDisks);
    }
    let disks: Vec<Disk> = confirmed
        .disks
        .iter()
        .filter_map(|name| inventory.hardware.disks.iter().find(|d| d.name == *name).cloned())
        .collect();
    let mut options = LayoutOptions::new(inventory.firmware);
    options.swap_bytes = job.swap_bytes.unwrap_or(0);
    options.root_bytes = job.root_bytes;
    options.system_disk = job.system_disk.clone();
    let plan = plan(job.layout, &disks, &options)?;
    Ok(Preflight { confirmed, plan })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use kiln_types::catalog::{ImageContent, StorageLayout};

    use super::*;
    use crate::identity::{ExpectedDisk, ExpectedMachine, Mismatch};
    use crate::image::{ImageFormat, Sha256};
    use crate::inventory::collect;
    use crate::server::ImageSource;

    fn inventory(name: &str) -> Inventory {
        collect(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).unwrap()
    }

    /// The job the server would send for a machine it discovered as `inv`.
    fn job_for(inv: &Inventory, layout: StorageLayout) -> DeployJob {
        let dmi = inv.hardware.dmi.clone().unwrap_or_default();
        DeployJob {
            job: "0190f5b0-7d1e-7c3a-9a4e-2f6b8c1d2e3f".parse().unwrap(),
            machine: ExpectedMachine {
                serial: dmi.serial,
                uuid: dmi.uuid,
                disks: inv
                    .hardware
                    .disks
                    .iter()
                    .map(|d| ExpectedDisk {
                        serial: d.serial.clone(),
                        by_id: d.by_id.clone(),
                    })
                    .collect(),
                protected: false,
                macs: vec![],
            },
            layout,
            swap_bytes: None,
            root_bytes: None,
            image: ImageSource {
                url: "http://10.0.0.1/images/debian.qcow2".into(),
                format: ImageFormat::Qcow2,
                sha256: Sha256([0; 32]),
                content: ImageContent::Filesystem,
            },
            system_disk: None,
        }
    }

    #[test]
    fn the_lab_vm_gets_its_mirror() {
        let inv = inventory("qemu-bios");
        let ok = preflight(&job_for(&inv, StorageLayout::LvmRaid1), &inv).unwrap();
        assert_eq!(ok.confirmed.disks, ["vda", "vdb"]);
        assert_eq!(ok.plan.arrays.len(), 2, "/boot and one data mirror");
        assert_eq!(
            ok.plan.disks[0].partitions[0].size_bytes,
            1 << 20,
            "BIOS boot partition: SeaBIOS"
        );
        assert_eq!(ok.plan.root_device, "/dev/vg0/root");
    }

    #[test]
    fn refusals_come_before_any_write() {
        let inv = inventory("server-uefi");
        // An 8 TB HDD cannot mirror a 1.9 TB NVMe disk.
        let e = preflight(&job_for(&inv, StorageLayout::LvmRaid1), &inv).unwrap_err();
        assert!(matches!(e, PreflightError::Layout(PlanError::Rule(_))), "3 disks: {e}");
        let mut job = job_for(&inv, StorageLayout::LvmRaid1);
        job.machine.disks.remove(1);
        let e = preflight(&job, &inv).unwrap_err();
        assert!(e.to_string().contains("differ by"), "{e}");
        // Another machine's job.
        let mut job = job_for(&inv, StorageLayout::Lvm);
        job.machine.serial = Some("OTHER01".into());
        job.machine.protected = true;
        let PreflightError::Identity(refusal) = preflight(&job, &inv).unwrap_err() else {
            panic!("not an identity refusal")
        };
        assert_eq!(refusal.mismatches.len(), 2);
        assert!(refusal.mismatches.contains(&Mismatch::Protected));
        // A job with no disks.
        let mut job = job_for(&inv, StorageLayout::Lvm);
        job.machine.disks.clear();
        assert_eq!(preflight(&job, &inv).unwrap_err(), PreflightError::NoDisks);
        // The right job: UEFI, so an ESP on the first disk.
        let ok = preflight(&job_for(&inv, StorageLayout::Lvm), &inv).unwrap();
        assert_eq!(ok.plan.disks.len(), 3);
        assert_eq!(ok.plan.filesystems[0].mountpoint.as_deref(), Some("/boot/efi"));
        // A system disk the machine lacks: refused before any write.
        let mut job = job_for(&inv, StorageLayout::LvmHba);
        job.system_disk = Some("NOSUCHDISK".into());
        let e = preflight(&job, &inv).unwrap_err();
        assert!(matches!(e, PreflightError::Layout(PlanError::Rule(_))), "{e}");
        assert!(e.to_string().contains("system disk NOSUCHDISK"), "{e}");
    }

    #[test]
    fn hba_takes_the_smallest_disk_or_the_system_disk() {
        let inv = inventory("server-uefi");
        // nvme0n1 1.9 TB, sda 480 GB (SSD), sdb 8 TB (HDD).
        let on = |system_disk: Option<&str>| {
            let mut job = job_for(&inv, StorageLayout::LvmHba);
            job.system_disk = system_disk.map(String::from);
            let plan = preflight(&job, &inv).unwrap().plan;
            plan.disks.iter().map(|d| d.name.clone()).collect::<Vec<_>>()
        };
        assert_eq!(on(None), ["sda"]);
        assert_eq!(on(Some("S64GNE0R123456")), ["nvme0n1"], "by serial");
        assert_eq!(on(Some("naa.55cd2e415a1b2c3d")), ["sda"], "by WWN, as sysfs spells it");
        assert_eq!(on(Some("ZL2ABCDE")), ["sdb"]);
    }

    #[test]
    fn whole_disk_images_go_onto_the_smallest_disk_of_a_flat_layout() {
        let inv = inventory("server-uefi");
        let mut job = job_for(&inv, StorageLayout::Flat);
        job.image.content = ImageContent::WholeDisk;
        let ok = preflight_whole_disk(&job, &inv).unwrap();
        let smallest = inv.hardware.disks.iter().min_by_key(|d| d.size_bytes).unwrap();
        assert_eq!(ok.disk, smallest.name);
        assert_eq!(ok.device, format!("/dev/{}", smallest.name));
        assert_eq!(ok.others.len(), inv.hardware.disks.len() - 1);
        // RAID layouts are refused with the reason, before the identity.
        job.layout = StorageLayout::LvmRaid1;
        let e = preflight_whole_disk(&job, &inv).unwrap_err();
        assert!(
            matches!(&e, PreflightError::WholeDisk(w) if w.contains("`flat` layout only")),
            "{e}"
        );
        // Another machine's job is refused as always.
        job.layout = StorageLayout::Flat;
        job.machine.serial = Some("OTHER01".into());
        assert!(matches!(
            preflight_whole_disk(&job, &inv),
            Err(PreflightError::Identity(_))
        ));
        let mut job = job_for(&inv, StorageLayout::Flat);
        job.machine.disks.clear();
        assert_eq!(preflight_whole_disk(&job, &inv).unwrap_err(), PreflightError::NoDisks);
    }

    #[test]
    fn deploy_jobs_are_json() {
        let inv = inventory("qemu-bios");
        let job = job_for(&inv, StorageLayout::LvmRaid1);
        let json = serde_json::to_value(&job).unwrap();
        assert_eq!(json["layout"], "lvm_raid1");
        assert_eq!(json["image"]["format"], "qcow2");
        assert_eq!(json["image"]["sha256"], "0".repeat(64));
        assert_eq!(serde_json::from_value::<DeployJob>(json).unwrap(), job);
    }
}
