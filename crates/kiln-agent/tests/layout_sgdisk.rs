//! The partitioning commands of real plans, run by the real `sgdisk` on
//! sparse files standing in for disks, then read back: the partitions
//! sgdisk makes are exactly the ones the plan describes (start, size, type,
//! name) — and the disks a plan leaves alone (`lvm_hba`'s) keep every byte.
//! Fails, saying so, where sgdisk (Debian's `gdisk`) is missing.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use kiln_agent::inventory::Firmware;
use kiln_agent::layout::{GIB, LayoutOptions, MIB, plan};
use kiln_types::catalog::StorageLayout;
use kiln_types::machine::Disk;

fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok()
}

fn run(argv: &[String]) -> String {
    let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sgdisk --info=N` → (first sector, size in sectors, type GUID, name).
fn read_back(file: &Path, number: u32) -> (u64, u64, String, String) {
    let text = run(&["sgdisk".into(), format!("--info={number}"), file.display().to_string()]);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no `{name}` in {text}"))
            .trim()
            .to_string()
    };
    let number = |s: String| s.split_whitespace().next().unwrap().parse::<u64>().unwrap();
    (
        number(field("First sector:")),
        number(field("Partition size:")),
        field("Partition GUID code:")
            .split_whitespace()
            .next()
            .unwrap()
            .to_string(),
        field("Partition name:").trim_matches('\'').to_string(),
    )
}

#[test]
fn sgdisk_makes_the_planned_partitions() {
    assert!(
        have("sgdisk"),
        "sgdisk (Debian package gdisk) is not installed: run the tests with scripts/test"
    );
    let dir = tempfile::tempdir().unwrap();
    let disk = |name: &str, size_bytes: u64| Disk {
        name: name.into(),
        size_bytes,
        rotational: false,
        model: None,
        serial: None,
        by_id: None,
    };
    let cases = [
        (
            StorageLayout::Flat,
            Firmware::Bios,
            vec![disk("vda", 20 * GIB + 12345)],
            4 * GIB,
        ),
        (
            StorageLayout::Lvm,
            Firmware::Uefi,
            vec![disk("vda", 20 * GIB), disk("vdb", 10 * GIB)],
            0,
        ),
        (
            StorageLayout::LvmRaid1,
            Firmware::Uefi,
            vec![disk("nvme0n1", 30 * GIB), disk("nvme1n1", 30 * GIB + MIB)],
            0,
        ),
        // HBA on unequal disks: the OS on the smallest (vdb, the first of
        // two), the others left alone.
        (
            StorageLayout::LvmHba,
            Firmware::Uefi,
            vec![
                disk("vda", 30 * GIB),
                disk("vdb", 10 * GIB),
                disk("vdc", 20 * GIB),
                disk("vdd", 10 * GIB),
            ],
            0,
        ),
        (
            StorageLayout::LvmRaid0,
            Firmware::Bios,
            vec![disk("vda", 10 * GIB), disk("vdb", 25 * GIB + 7 * MIB)],
            0,
        ),
        (
            StorageLayout::LvmRaid10,
            Firmware::Uefi,
            vec![
                disk("vda", 10 * GIB),
                disk("vdb", 10 * GIB),
                disk("vdc", 10 * GIB + MIB),
                disk("vdd", 10 * GIB),
            ],
            2 * GIB,
        ),
        // RAID10S with two small and two big disks, mixed up.
        (
            StorageLayout::LvmRaid10s,
            Firmware::Uefi,
            vec![
                disk("vda", 40 * GIB),
                disk("vdb", 8 * GIB),
                disk("vdc", 40 * GIB),
                disk("vdd", 8 * GIB),
            ],
            0,
        ),
    ];
    /// A pattern in the first and last MiB of a disk file, to see whether
    /// anything wrote there.
    fn mark(file: &Path) {
        let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        let pattern: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
        f.write_all(&pattern).unwrap();
        f.seek(SeekFrom::End(-(MIB as i64))).unwrap();
        f.write_all(&pattern).unwrap();
    }
    fn marked(file: &Path) -> bool {
        let mut f = std::fs::File::open(file).unwrap();
        let pattern: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
        let mut buf = vec![0; MIB as usize];
        f.read_exact(&mut buf).unwrap();
        let head = buf == pattern;
        f.seek(SeekFrom::End(-(MIB as i64))).unwrap();
        f.read_exact(&mut buf).unwrap();
        head && buf == pattern
    }
    for (layout, firmware, disks, swap) in cases {
        let mut options = LayoutOptions::new(firmware);
        options.swap_bytes = swap;
        let p = plan(layout, &disks, &options).unwrap();
        let case = dir.path().join(layout.as_str());
        std::fs::create_dir(&case).unwrap();
        // A file for every disk of the machine, marked; the plan's are
        // laid out below, the others must keep their marks.
        for d in &disks {
            let file = case.join(&d.name);
            std::fs::File::create(&file).unwrap().set_len(d.size_bytes).unwrap();
            mark(&file);
        }
        let untouched: Vec<&Disk> = disks
            .iter()
            .filter(|d| !p.disks.iter().any(|u| u.name == d.name))
            .collect();
        if layout == StorageLayout::LvmHba {
            assert_eq!(p.disks.len(), 1);
            assert_eq!(p.disks[0].name, "vdb", "the smallest disk");
            assert_eq!(untouched.len(), 3);
        } else {
            assert!(untouched.is_empty(), "{layout} uses every disk");
        }
        // Every command on whole disks — of any disk of the machine, so
        // one naming a disk the plan should leave alone would write on its
        // file — with the disks' files for their devices, in plan order.
        // Commands on partitions, arrays and volumes are skipped (a file
        // has none), and so are those naming no device (`mdadm --stop
        // --scan` would act on this host).
        let file_of = |arg: &String| {
            disks
                .iter()
                .find(|d| *arg == format!("/dev/{}", d.name))
                .map(|d| case.join(&d.name).display().to_string())
        };
        for c in &p.commands {
            let devices: Vec<&String> = c.argv.iter().filter(|a| a.starts_with("/dev/")).collect();
            if devices.is_empty() || devices.iter().any(|a| file_of(a).is_none()) {
                continue;
            }
            let argv: Vec<String> = c.argv.iter().map(|a| file_of(a).unwrap_or_else(|| a.clone())).collect();
            run(&argv);
        }
        for d in &p.disks {
            let file = case.join(&d.name);
            for part in &d.partitions {
                let (first, sectors, guid, name) = read_back(&file, part.number);
                assert_eq!(
                    (first * 512, sectors * 512),
                    (part.start_bytes, part.size_bytes),
                    "{layout} {}",
                    part.device
                );
                let expected_guid = match format!("{:?}", part.kind).as_str() {
                    "Esp" => "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                    "BiosBoot" => "21686148-6449-6E6F-744E-656564454649",
                    "Raid" => "A19D880F-05FC-4D3B-A006-743F0F84911E",
                    "Lvm" => "E6D6D379-F507-44C2-A23C-238F2A3DF928",
                    "Swap" => "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
                    _ => "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
                };
                assert_eq!(guid, expected_guid, "{layout} {}", part.device);
                assert!(!name.is_empty());
            }
            // sgdisk agrees the table is sound, backup header included.
            let verify = run(&["sgdisk".into(), "--verify".into(), file.display().to_string()]);
            assert!(verify.contains("No problems found"), "{layout} {}: {verify}", d.name);
        }
        for d in untouched {
            assert!(marked(&case.join(&d.name)), "{layout} wrote on {}", d.name);
            let device = format!("/dev/{}", d.name);
            assert!(
                p.commands
                    .iter()
                    .all(|c| c.argv.iter().all(|a| !a.starts_with(&device))),
                "{layout}: a command names {device}"
            );
        }
    }
}
