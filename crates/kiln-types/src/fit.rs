//! Which OS images, tasks and storage layouts fit a machine: pure functions
//! of the machine record, so the reinstall form, the API and (later) the
//! reimage validation step all give the same answer.

use crate::catalog::{OsImage, PlatformTag, StorageLayout, Task};
use crate::machine::{Hardware, Machine, MachineKind};

/// Why `tags` do not fit a machine of `kind` with `hw`, if they do not.
fn platform_misfit(tags: &[PlatformTag], kind: MachineKind, hw: Option<&Hardware>) -> Option<String> {
    let bm = tags.contains(&PlatformTag::Bm);
    let vm = tags.contains(&PlatformTag::Vm);
    match kind {
        MachineKind::Physical if vm && !bm => return Some("made for VMs, this is a physical machine".into()),
        MachineKind::Virtual if bm && !vm => return Some("made for bare metal, this is a VM".into()),
        _ => {}
    }
    let gpus = hw.map(|h| h.gpus.as_slice()).unwrap_or_default();
    if tags.contains(&PlatformTag::Gpu) && gpus.is_empty() {
        return Some("needs a GPU, the inventory shows none".into());
    }
    if tags.contains(&PlatformTag::Vgpu) && !gpus.iter().any(|g| g.vgpu) {
        return Some("needs a vGPU, the inventory shows none".into());
    }
    None
}

/// `Ok` if `image` can be installed on `machine`, else every reason why not.
pub fn os_image_fits(machine: &Machine, image: &OsImage) -> Result<(), Vec<String>> {
    let hw = machine.hardware.as_ref();
    let mut why = vec![];
    if let Some(m) = platform_misfit(&image.tags, machine.kind, hw) {
        why.push(m);
    }
    match hw {
        None if image.min_ram_bytes > 0 || image.min_disk_bytes > 0 => {
            why.push("no hardware inventory yet to check RAM and disk against: discover the machine first".into());
        }
        None => {}
        Some(hw) => {
            if let Some(arch) = hw.arch
                && arch != image.arch
            {
                why.push(format!("built for {}, the machine is {arch}", image.arch));
            }
            if hw.memory_bytes < image.min_ram_bytes {
                why.push(format!(
                    "needs {} of RAM, the machine has {}",
                    human_bytes(image.min_ram_bytes),
                    human_bytes(hw.memory_bytes)
                ));
            }
            let largest = hw.disks.iter().map(|d| d.size_bytes).max().unwrap_or(0);
            if largest < image.min_disk_bytes {
                why.push(format!(
                    "needs a {} disk, the largest is {}",
                    human_bytes(image.min_disk_bytes),
                    human_bytes(largest)
                ));
            }
        }
    }
    if why.is_empty() { Ok(()) } else { Err(why) }
}

/// `Ok` if `task` suits `machine`, else why not.
pub fn task_fits(machine: &Machine, task: &Task) -> Result<(), String> {
    match platform_misfit(&task.tags, machine.kind, machine.hardware.as_ref()) {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// `Ok` if `layout` can be applied to `machine`'s disks (and its system
/// disk, for the layouts that use one), else what the layout needs and
/// what the machine has.
pub fn layout_fits(machine: &Machine, layout: StorageLayout) -> Result<(), String> {
    let Some(hw) = &machine.hardware else {
        return Err("no hardware inventory yet: discover the machine first".into());
    };
    layout.check(&hw.disks, machine.system_disk.as_deref())
}

/// Bytes in binary units, for messages: `512 MiB`, `1.5 TiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OsImageId;
    use crate::catalog::{Arch, OsKind};
    use crate::machine::{Disk, Gpu as GpuCard, MachineState};

    const GIB: u64 = 1 << 30;

    fn machine(kind: MachineKind, hw: Option<Hardware>) -> Machine {
        let mut m = Machine::sketch("m1", kind, MachineState::Ready);
        m.hardware = hw;
        m
    }

    fn hw(ram_gib: u64, disks_gib: &[u64], gpus: Vec<GpuCard>) -> Hardware {
        Hardware {
            arch: Some(Arch::X86_64),
            memory_bytes: ram_gib * GIB,
            disks: disks_gib
                .iter()
                .enumerate()
                .map(|(i, g)| Disk {
                    name: format!("sd{}", (b'a' + i as u8) as char),
                    size_bytes: g * GIB,
                    rotational: false,
                    model: None,
                    serial: None,
                    by_id: None,
                })
                .collect(),
            gpus,
            ..Default::default()
        }
    }

    fn image(tags: &[PlatformTag], ram_gib: u64, disk_gib: u64) -> OsImage {
        OsImage {
            id: OsImageId::new(),
            name: "debian".into(),
            version: "12".into(),
            arch: Arch::X86_64,
            kind: OsKind::DiskImage,
            tags: tags.to_vec(),
            min_ram_bytes: ram_gib * GIB,
            min_disk_bytes: disk_gib * GIB,
            source: "x".into(),
            sha256: None,
            format: Default::default(),
            content: Default::default(),
            templates: Default::default(),
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn os_fit_table() {
        use PlatformTag::*;
        let gpu = || {
            vec![GpuCard {
                model: "A100".into(),
                vgpu: false,
            }]
        };
        let vgpu = || {
            vec![GpuCard {
                model: "A16".into(),
                vgpu: true,
            }]
        };
        let phys = |h| machine(MachineKind::Physical, h);
        let virt = |h| machine(MachineKind::Virtual, h);
        // (machine, image, fits)
        let table = vec![
            (phys(Some(hw(64, &[500], vec![]))), image(&[Bm], 8, 20), true),
            (phys(Some(hw(64, &[500], vec![]))), image(&[Vm], 8, 20), false),
            (virt(Some(hw(4, &[40], vec![]))), image(&[Vm], 2, 20), true),
            (virt(Some(hw(4, &[40], vec![]))), image(&[Bm], 2, 20), false),
            (phys(Some(hw(64, &[500], vec![]))), image(&[Bm, Vm], 8, 20), true),
            (phys(Some(hw(4, &[500], vec![]))), image(&[Bm], 8, 20), false),
            (phys(Some(hw(64, &[10], vec![]))), image(&[Bm], 8, 20), false),
            (phys(Some(hw(64, &[500], vec![]))), image(&[Bm, Gpu], 8, 20), false),
            (phys(Some(hw(64, &[500], gpu()))), image(&[Bm, Gpu], 8, 20), true),
            (virt(Some(hw(16, &[40], gpu()))), image(&[Vm, Vgpu], 8, 20), false),
            (virt(Some(hw(16, &[40], vgpu()))), image(&[Vm, Vgpu], 8, 20), true),
            (phys(None), image(&[Bm], 8, 20), false),
            (phys(None), image(&[Bm], 0, 0), true),
        ];
        for (i, (m, img, fits)) in table.into_iter().enumerate() {
            assert_eq!(
                os_image_fits(&m, &img).is_ok(),
                fits,
                "row {i}: {:?}",
                os_image_fits(&m, &img)
            );
        }
    }

    #[test]
    fn misfit_reasons_are_specific() {
        let m = machine(MachineKind::Physical, Some(hw(4, &[10], vec![])));
        let why = os_image_fits(&m, &image(&[PlatformTag::Bm], 8, 20)).unwrap_err();
        assert_eq!(
            why,
            vec![
                "needs 8 GiB of RAM, the machine has 4 GiB",
                "needs a 20 GiB disk, the largest is 10 GiB"
            ]
        );
    }

    #[test]
    fn layouts_against_inventory() {
        let m = machine(MachineKind::Physical, Some(hw(8, &[100, 100], vec![])));
        assert!(layout_fits(&m, StorageLayout::LvmRaid1).is_ok());
        assert!(layout_fits(&m, StorageLayout::LvmRaid10).is_err());
        assert!(layout_fits(&machine(MachineKind::Physical, None), StorageLayout::Flat).is_err());
    }

    #[test]
    fn bytes_for_humans() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(8 * GIB), "8 GiB");
        assert_eq!(human_bytes(3 * GIB / 2), "1.5 GiB");
    }
}
