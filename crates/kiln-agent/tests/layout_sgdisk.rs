//! The partitioning commands of real plans, run by the real `sgdisk` on
//! sparse files standing in for disks, then read back: the partitions
//! sgdisk makes are exactly the ones the plan describes (start, size, type,
//! name). Skipped, saying so, where sgdisk (Debian's `gdisk`) is missing.

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
    ];
    for (layout, firmware, disks, swap) in cases {
        let mut options = LayoutOptions::new(firmware);
        options.swap_bytes = swap;
        let p = plan(layout, &disks, false, &options).unwrap();
        for d in &p.disks {
            let file = dir.path().join(&d.name);
            std::fs::File::create(&file).unwrap().set_len(d.size_bytes).unwrap();
            let on_file = |argv: &Vec<String>| -> Vec<String> {
                argv.iter()
                    .map(|a| {
                        if *a == d.device {
                            file.display().to_string()
                        } else {
                            a.clone()
                        }
                    })
                    .collect()
            };
            // The commands for this whole disk (the others name partitions,
            // arrays and volumes a file does not have).
            for c in p.commands.iter().filter(|c| c.argv.last() == Some(&d.device)) {
                run(&on_file(&c.argv));
            }
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
    }
}
