//! Layout planning: one table test per layout, the refusals, the exact
//! commands of one plan, and properties over random disk sets.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

const TB: u64 = 1_000_000_000_000;

fn disk(name: &str, size_bytes: u64) -> Disk {
    Disk {
        name: name.into(),
        size_bytes,
        rotational: false,
        model: None,
        serial: Some(format!("SN-{name}")),
        by_id: None,
    }
}

fn disks(n: usize, size: u64) -> Vec<Disk> {
    (0..n)
        .map(|i| disk(&format!("sd{}", (b'a' + i as u8) as char), size))
        .collect()
}

fn uefi() -> LayoutOptions {
    LayoutOptions::new(Firmware::Uefi)
}

fn argvs(plan: &LayoutPlan) -> Vec<String> {
    plan.commands.iter().map(ToString::to_string).collect()
}

#[test]
fn flat_uses_the_first_disk_only() {
    let mut o = LayoutOptions::new(Firmware::Bios);
    o.swap_bytes = 4 * GIB;
    o.root = RootSource::Ext4;
    let p = plan(StorageLayout::Flat, &[disk("nvme0n1", TB), disk("sda", TB)], &o).unwrap();
    assert_eq!(p.disks.len(), 1);
    let parts: Vec<(&str, PartitionKind, u64)> = p.disks[0]
        .partitions
        .iter()
        .map(|p| (p.device.as_str(), p.kind, p.size_bytes))
        .collect();
    let root = usable_end(TB) - MIB - MIB - GIB - 4 * GIB;
    assert_eq!(
        parts,
        [
            ("/dev/nvme0n1p1", PartitionKind::BiosBoot, MIB),
            ("/dev/nvme0n1p2", PartitionKind::Boot, GIB),
            ("/dev/nvme0n1p3", PartitionKind::Swap, 4 * GIB),
            ("/dev/nvme0n1p4", PartitionKind::Root, root),
        ]
    );
    assert_eq!((p.root_device.as_str(), p.root_bytes), ("/dev/nvme0n1p4", root));
    assert!(p.arrays.is_empty() && p.volume_group.is_none());
    let kinds: Vec<(FsKind, Option<&str>)> = p
        .filesystems
        .iter()
        .map(|f| (f.kind, f.mountpoint.as_deref()))
        .collect();
    assert_eq!(
        kinds,
        [
            (FsKind::Ext4, Some("/boot")),
            (FsKind::Swap, None),
            (FsKind::Ext4, Some("/"))
        ],
        "BIOS: no ESP"
    );
    assert!(
        argvs(&p).iter().all(|c| !c.contains("sda")),
        "flat touches only the first disk"
    );
}

#[test]
fn lvm_spans_every_disk() {
    let p = plan(StorageLayout::Lvm, &[disk("sda", TB), disk("sdb", 2 * TB)], &uefi()).unwrap();
    assert_eq!(p.disks[0].partitions.len(), 3);
    assert_eq!(p.disks[1].partitions.len(), 1, "a single PV partition on the others");
    let vg = p.volume_group.as_ref().unwrap();
    assert_eq!(vg.physical_volumes, ["/dev/sda3", "/dev/sdb1"]);
    assert!(vg.size_bytes > 2 * TB + TB - 3 * GIB && vg.size_bytes < 3 * TB);
    assert_eq!(p.root_device, "/dev/vg0/root");
    assert_eq!(p.root_bytes, vg.size_bytes, "root takes it all");
    assert_eq!(p.filesystems[0].mountpoint.as_deref(), Some("/boot/efi"));
}

/// Every argument of every command that names a device under `/dev/`.
fn devices_named(plan: &LayoutPlan) -> BTreeSet<String> {
    plan.commands
        .iter()
        .flat_map(|c| c.argv.iter().filter(|a| a.starts_with("/dev/")).cloned())
        .collect()
}

#[test]
fn hba_puts_the_os_on_the_smallest_disk_and_names_no_other() {
    let set = [
        disk("sda", 2 * TB),
        disk("sdb", 480 * GIB),
        disk("sdc", 480 * GIB),
        disk("nvme0n1", 960 * GIB),
    ];
    let p = plan(StorageLayout::LvmHba, &set, &uefi()).unwrap();
    // The smallest; of two equal, the first.
    assert_eq!(p.disks.len(), 1);
    assert_eq!(p.disks[0].name, "sdb");
    let kinds: Vec<PartitionKind> = p.disks[0].partitions.iter().map(|q| q.kind).collect();
    assert_eq!(kinds, [PartitionKind::Esp, PartitionKind::Boot, PartitionKind::Lvm]);
    assert_eq!(p.volume_group.as_ref().unwrap().physical_volumes, ["/dev/sdb3"]);
    assert_eq!(p.root_device, "/dev/vg0/root");
    // Nothing but sdb is named, and nothing global (stopping every old md
    // array or volume group) runs: the other disks stay as they were.
    assert!(
        devices_named(&p)
            .iter()
            .all(|d| d.starts_with("/dev/sdb") || d.starts_with("/dev/vg0/")),
        "{:?}",
        devices_named(&p)
    );
    assert!(
        p.commands
            .iter()
            .all(|c| !c.may_fail && c.argv[0] != "vgchange" && c.argv[0] != "mdadm"),
        "{:?}",
        argvs(&p)
    );
    assert_eq!(p.boot_disks().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["sdb"]);

    // The operator's system disk wins, by serial or by WWN.
    let mut o = uefi();
    o.system_disk = Some("SN-nvme0n1".into());
    assert_eq!(plan(StorageLayout::LvmHba, &set, &o).unwrap().disks[0].name, "nvme0n1");
    let mut wwn = set.to_vec();
    wwn[0].by_id = Some("/dev/disk/by-id/wwn-0x5000c500a1b2c3d4".into());
    o.system_disk = Some("0x5000C500A1B2C3D4".into());
    assert_eq!(plan(StorageLayout::LvmHba, &wwn, &o).unwrap().disks[0].name, "sda");
    // One the machine does not have is refused, saying what it has.
    o.system_disk = Some("SN-gone".into());
    let e = plan(StorageLayout::LvmHba, &set, &o).unwrap_err();
    assert!(matches!(e, PlanError::Rule(_)), "{e}");
    assert!(
        e.to_string()
            .contains("system disk SN-gone, which the machine does not have; it has 4 disks: sda 1.8 TiB, sdb 480 GiB"),
        "{e}"
    );
    // One disk is not what seed 001 sells as HBA.
    let e = plan(StorageLayout::LvmHba, &set[..1], &uefi()).unwrap_err();
    assert!(e.to_string().contains("needs at least 2 disks"), "{e}");
}

#[test]
fn flat_takes_the_system_disk_when_one_is_named() {
    let set = [disk("sda", TB), disk("sdb", 2 * TB)];
    let mut o = uefi();
    o.system_disk = Some("sn-sdb".into());
    let p = plan(StorageLayout::Flat, &set, &o).unwrap();
    assert_eq!(p.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["sdb"]);
    assert!(devices_named(&p).iter().all(|d| d.starts_with("/dev/sdb")));
    // Layouts over every disk ignore it.
    let p = plan(StorageLayout::Lvm, &set, &o).unwrap();
    assert_eq!(p.disks.len(), 2);
}

#[test]
fn raid10s_mirrors_the_smallest_pair_for_the_os_and_stripes_the_other_pairs() {
    // Two small and two big disks, mixed up.
    let set = [
        disk("sda", 4 * TB),
        disk("sdb", 480 * GIB),
        disk("sdc", 4 * TB),
        disk("sdd", 480 * GIB),
    ];
    let p = plan(StorageLayout::LvmRaid10s, &set, &uefi()).unwrap();
    let arrays: Vec<(&str, &str, RaidLevel, Vec<&str>)> = p
        .arrays
        .iter()
        .map(|a| {
            (
                a.device.as_str(),
                a.name.as_str(),
                a.level,
                a.members.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        arrays,
        [
            ("/dev/md0", "boot", RaidLevel::Raid1, vec!["/dev/sdb2", "/dev/sdd2"]),
            ("/dev/md1", "pv0", RaidLevel::Raid1, vec!["/dev/sdb3", "/dev/sdd3"]),
            ("/dev/md2", "data", RaidLevel::Raid10, vec!["/dev/sda1", "/dev/sdc1"]),
        ]
    );
    // The OS: vg0 on the small mirror only.
    assert_eq!(p.volume_group.as_ref().unwrap().physical_volumes, ["/dev/md1"]);
    assert_eq!(p.root_device, "/dev/vg0/root");
    assert!(p.root_bytes < 480 * GIB);
    // The data: its own volume group on the big disks' RAID 10.
    let data = p.data_volume.as_ref().unwrap();
    assert_eq!(data.volume_group.name, "vgdata");
    assert_eq!(data.volume_group.physical_volumes, ["/dev/md2"]);
    assert!(data.volume_group.size_bytes > 4 * TB - 2 * GIB && data.volume_group.size_bytes < 4 * TB);
    // Boot partitions and ESPs on the OS pair only; one member on the others.
    assert_eq!(
        p.boot_disks().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["sdb", "sdd"]
    );
    for name in ["sda", "sdc"] {
        let d = p.disks.iter().find(|d| d.name == name).unwrap();
        assert_eq!(d.partitions.len(), 1);
        assert_eq!(d.partitions[0].kind, PartitionKind::Raid);
    }
    let mounts: Vec<(&str, Option<&str>)> = p
        .filesystems
        .iter()
        .map(|f| (f.device.as_str(), f.mountpoint.as_deref()))
        .collect();
    assert_eq!(
        mounts,
        [
            ("/dev/sdb1", Some("/boot/efi")),
            ("/dev/sdd1", None),
            ("/dev/md0", Some("/boot")),
            ("/dev/vgdata/data", Some("/data")),
        ]
    );
    let commands = argvs(&p);
    for expected in [
        "mdadm --create /dev/md2 --run --name=data --metadata=1.2 --level=10 --raid-devices=2 --layout=n2 \
         /dev/sda1 /dev/sdc1",
        "pvcreate --yes /dev/md2",
        "vgcreate --yes vgdata /dev/md2",
        "lvcreate --yes --wipesignatures=y --zero=y --name=data --extents=100%FREE vgdata",
        "mkfs.ext4 -F -q -L data /dev/vgdata/data",
    ] {
        assert!(
            commands.iter().any(|c| c == expected),
            "no `{expected}` in {commands:#?}"
        );
    }
    assert!(p.to_string().contains("vg vgdata on /dev/md2"), "{p}");

    // Three pairs: RAID 10 over the four bigger disks, pair by pair.
    let mut six = set.to_vec();
    six.push(disk("sde", 4 * TB + 10 * GIB));
    six.push(disk("sdf", 4 * TB + 10 * GIB));
    let p = plan(StorageLayout::LvmRaid10s, &six, &uefi()).unwrap();
    assert_eq!(
        p.arrays[2].members,
        ["/dev/sda1", "/dev/sdc1", "/dev/sde1", "/dev/sdf1"]
    );
    // Unequal pairs are refused as for any mirror.
    let e = plan(
        StorageLayout::LvmRaid10s,
        &[
            disk("sda", 480 * GIB),
            disk("sdb", 960 * GIB),
            disk("sdc", TB),
            disk("sdd", TB),
        ],
        &uefi(),
    )
    .unwrap_err();
    assert!(matches!(e, PlanError::UnequalPair { .. }), "{e}");
}

#[test]
fn raid1_mirrors_pairs_of_equal_disks() {
    // Four disks, two sizes, given mixed up: paired by size.
    let set = [
        disk("sda", TB),
        disk("sdb", 2 * TB),
        disk("sdc", TB),
        disk("sdd", 2 * TB),
    ];
    let p = plan(StorageLayout::LvmRaid1, &set, &uefi()).unwrap();
    let arrays: Vec<(&str, RaidLevel, Vec<&str>)> = p
        .arrays
        .iter()
        .map(|a| {
            (
                a.device.as_str(),
                a.level,
                a.members.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        arrays,
        [
            (
                "/dev/md0",
                RaidLevel::Raid1,
                vec!["/dev/sda2", "/dev/sdc2", "/dev/sdb2", "/dev/sdd2"]
            ),
            ("/dev/md1", RaidLevel::Raid1, vec!["/dev/sda3", "/dev/sdc3"]),
            ("/dev/md2", RaidLevel::Raid1, vec!["/dev/sdb3", "/dev/sdd3"]),
        ]
    );
    assert_eq!(p.arrays[0].metadata, "1.0", "GRUB reads a /boot member as plain ext4");
    assert_eq!(
        p.volume_group.as_ref().unwrap().physical_volumes,
        ["/dev/md1", "/dev/md2"]
    );
    // Every disk has its own ESP; the first is mounted.
    let esps: Vec<Option<&str>> = p
        .filesystems
        .iter()
        .filter(|f| f.kind == FsKind::Vfat)
        .map(|f| f.mountpoint.as_deref())
        .collect();
    assert_eq!(esps, [Some("/boot/efi"), None, None, None]);
}

#[test]
fn raid1_pairs_of_nearly_equal_disks_use_the_smaller() {
    // 960 GB and 1 TB differ by 4%: refused at 3%, planned at 5%.
    let set = [disk("sda", 960_000_000_000), disk("sdb", TB)];
    let e = plan(StorageLayout::LvmRaid1, &set, &uefi()).unwrap_err();
    assert!(matches!(e, PlanError::UnequalPair { ref small, ref large, .. } if small == "sda" && large == "sdb"));
    assert!(e.to_string().contains("differ by 4.0%, more than 3%"), "{e}");
    let mut o = uefi();
    o.pair_tolerance_percent = 5;
    let p = plan(StorageLayout::LvmRaid1, &set, &o).unwrap();
    let sizes: Vec<u64> = p.disks.iter().map(|d| d.partitions[2].size_bytes).collect();
    assert_eq!(sizes[0], sizes[1], "both members as large as the smaller disk's room");
}

#[test]
fn raid10_with_spare_picks_the_odd_disk_as_spare() {
    let mut set = disks(4, 2 * TB);
    set.insert(2, disk("sdx", 4 * TB));
    let p = plan(StorageLayout::LvmRaid10Spare, &set, &uefi()).unwrap();
    let spare: Vec<&str> = p.disks.iter().filter(|d| d.spare).map(|d| d.name.as_str()).collect();
    assert_eq!(spare, ["sdx"]);
    let data = &p.arrays[1];
    assert_eq!(
        (data.level, data.members.len(), data.spares.as_slice()),
        (RaidLevel::Raid10, 4, &["/dev/sdx3".to_string()][..])
    );
    assert_eq!(p.arrays[0].spares, ["/dev/sdx2"], "the spare stands by for /boot too");
    // All members and the spare are the same size: the spare can replace any.
    let sizes: BTreeSet<u64> = p.disks.iter().map(|d| d.partitions[2].size_bytes).collect();
    assert_eq!(sizes.len(), 1);
    let create = argvs(&p)
        .into_iter()
        .find(|c| c.starts_with("mdadm --create /dev/md1"))
        .unwrap();
    assert!(
        create.contains("--level=10 --raid-devices=4 --layout=n2 --spare-devices=1"),
        "{create}"
    );
    assert!(create.ends_with("/dev/sdx3"), "the spare comes last: {create}");
}

#[test]
fn raid0_stripes_unequal_disks_whole() {
    let p = plan(
        StorageLayout::LvmRaid0,
        &[disk("sda", TB), disk("sdb", 2 * TB)],
        &uefi(),
    )
    .unwrap();
    let data = &p.arrays[1];
    assert_eq!(data.level, RaidLevel::Raid0);
    // Each member loses only its 1.5 GiB of boot partitions and md's offset.
    let member = |size: u64| size / MIB * MIB - MIB - 1537 * MIB - MD_DATA_OFFSET;
    assert_eq!(data.size_bytes, member(TB) + member(2 * TB));
}

#[test]
fn refusals_say_why() {
    let o = uefi();
    let cases: Vec<(StorageLayout, Vec<Disk>, bool, &str)> = vec![
        (
            StorageLayout::Flat,
            vec![],
            false,
            "flat needs at least 1 disk; the machine has no disks",
        ),
        (StorageLayout::LvmRaid1, disks(3, TB), false, "needs disks in pairs"),
        (StorageLayout::LvmRaid10, disks(2, TB), false, "at least 4"),
        (
            StorageLayout::LvmRaid10s,
            disks(3, TB),
            false,
            "RAID 1 on the smallest pair",
        ),
        (StorageLayout::LvmRaid10Spare, disks(6, TB), false, "plus one spare"),
        (StorageLayout::LvmHba, disks(1, TB), false, "at least 2 disks"),
        (
            StorageLayout::Flat,
            vec![disk("sda", 3 * GIB)],
            false,
            "disk sda has 3221225472 bytes; flat needs",
        ),
        (
            StorageLayout::LvmRaid1,
            disks(2, 2 * GIB),
            false,
            "lvm_raid1 needs at least",
        ),
        (
            StorageLayout::Lvm,
            vec![disk("sda", TB), disk("../x", TB)],
            false,
            "`../x` is not a kernel disk name",
        ),
        (
            StorageLayout::Lvm,
            vec![disk("sda", TB), disk("sda", TB)],
            false,
            "sda is listed twice",
        ),
    ];
    for (layout, set, _, says) in cases {
        let e = plan(layout, &set, &o).unwrap_err().to_string();
        assert!(
            e.contains(says),
            "{layout} on {} disks: `{e}` does not say `{says}`",
            set.len()
        );
    }
    let mut big_root = uefi();
    big_root.root_bytes = Some(2048 * GIB);
    let e = plan(StorageLayout::Lvm, &disks(1, TB), &big_root).unwrap_err();
    assert!(
        matches!(e, PlanError::RootTooSmall { needed_bytes, .. } if needed_bytes == 2048 * GIB),
        "{e}"
    );
}

#[test]
fn bad_options_are_refused() {
    let check = |f: &dyn Fn(&mut LayoutOptions), says: &str| {
        let mut o = uefi();
        f(&mut o);
        let e = plan(StorageLayout::Lvm, &disks(1, TB), &o).unwrap_err().to_string();
        assert!(e.contains(says), "`{e}` does not say `{says}`");
    };
    check(&|o| o.esp_bytes = 100 * MIB, "too small for FAT32");
    check(&|o| o.boot_bytes = 10 * MIB + 1, "not a whole number of MiB");
    check(&|o| o.root_bytes = Some(GIB), "below min_root_bytes");
    check(&|o| o.volume_group = "vg 0; rm".into(), "volume_group");
    // BIOS has no ESP, so its size does not matter.
    let mut o = LayoutOptions::new(Firmware::Bios);
    o.esp_bytes = 0;
    assert!(plan(StorageLayout::Flat, &disks(1, TB), &o).is_ok());
}

/// The whole command list of one plan, as the executor will run it.
#[test]
fn lvm_raid1_commands() {
    let mut o = uefi();
    o.swap_bytes = 2 * GIB;
    let p = plan(
        StorageLayout::LvmRaid1,
        &[disk("vda", 20 * GIB), disk("vdb", 20 * GIB)],
        &o,
    )
    .unwrap();
    let expected = [
        "vgchange --activate n",
        "mdadm --stop --scan",
        "wipefs --all --force /dev/vda",
        "sgdisk --zap-all /dev/vda",
        "sgdisk --new=1:1M:+512M --typecode=1:EF00 --change-name=1:esp --new=2:513M:+1024M --typecode=2:8300 \
         --change-name=2:boot --new=3:1537M:+18942M --typecode=3:FD00 --change-name=3:raid /dev/vda",
        "wipefs --all --force /dev/vdb",
        "sgdisk --zap-all /dev/vdb",
        "sgdisk --new=1:1M:+512M --typecode=1:EF00 --change-name=1:esp --new=2:513M:+1024M --typecode=2:8300 \
         --change-name=2:boot --new=3:1537M:+18942M --typecode=3:FD00 --change-name=3:raid /dev/vdb",
        "wipefs --all --force /dev/vda1",
        "wipefs --all --force /dev/vda2",
        "wipefs --all --force /dev/vda3",
        "wipefs --all --force /dev/vdb1",
        "wipefs --all --force /dev/vdb2",
        "wipefs --all --force /dev/vdb3",
        "mdadm --create /dev/md0 --run --name=boot --metadata=1.0 --level=1 --raid-devices=2 /dev/vda2 /dev/vdb2",
        "wipefs --all --force /dev/md0",
        "mdadm --create /dev/md1 --run --name=pv0 --metadata=1.2 --level=1 --raid-devices=2 /dev/vda3 /dev/vdb3",
        "wipefs --all --force /dev/md1",
        "pvcreate --yes /dev/md1",
        "vgcreate --yes vg0 /dev/md1",
        "lvcreate --yes --wipesignatures=y --zero=y --name=swap --size=2048m vg0",
        "lvcreate --yes --wipesignatures=y --zero=y --name=root --extents=100%FREE vg0",
        "mkfs.vfat -F 32 -n ESP /dev/vda1",
        "mkfs.vfat -F 32 -n ESP2 /dev/vdb1",
        "mkfs.ext4 -F -q -L boot /dev/md0",
        "mkswap -L swap /dev/vg0/swap",
    ];
    assert_eq!(argvs(&p), expected);
    assert!(p.commands[..2].iter().all(|c| c.may_fail) && p.commands[2..].iter().all(|c| !c.may_fail));
    assert_eq!(p.root_device, "/dev/vg0/root");
    // 20 GiB - 1 MiB GPT - 1537 MiB head = 18942 MiB member, less md's
    // 132 MiB and LVM's first MiB, in 4 MiB extents, less 2 GiB swap.
    assert_eq!(p.root_bytes, (18942 - 132 - 1) / 4 * 4 * MIB - 2 * GIB);
    // The plan reads as text too.
    assert!(p.to_string().contains("/dev/md1 Raid1 of /dev/vda3 /dev/vdb3"), "{p}");
}

#[test]
fn plans_serialize() {
    let p = plan(StorageLayout::LvmRaid10, &disks(4, TB), &uefi()).unwrap();
    let json = serde_json::to_string(&p).unwrap();
    assert!(json.contains(r#""level":"raid10""#), "{json}");
    assert_eq!(serde_json::from_str::<LayoutPlan>(&json).unwrap(), p);
}

// ---- properties

/// Disk sets: 0–8 disks, sizes from 2 GiB to 16 TB, often in near-equal
/// groups (as real machines have), sometimes wildly mixed.
fn arb_disks() -> impl Strategy<Value = Vec<Disk>> {
    let size = prop_oneof![
        3 => prop::sample::select(vec![240_057_409_536u64, 480_103_981_056, 960_197_124_096, 1_920_383_410_176, 3_840_755_982_336]),
        1 => 2 * GIB..16 * TB,
    ];
    prop::collection::vec((size, 0u64..2 * GIB), 0..9).prop_map(|sizes| {
        sizes
            .into_iter()
            .enumerate()
            .map(|(i, (s, jitter))| {
                let name = if i % 2 == 0 {
                    format!("sd{}", (b'a' + i as u8) as char)
                } else {
                    format!("nvme{i}n1")
                };
                disk(&name, s + jitter)
            })
            .collect()
    })
}

fn arb_layout() -> impl Strategy<Value = StorageLayout> {
    prop::sample::select(StorageLayout::ALL.to_vec())
}

fn arb_options() -> impl Strategy<Value = LayoutOptions> {
    (
        prop::bool::ANY,
        0u64..8,
        prop::option::of(4u64..200),
        prop::bool::ANY,
        1u32..10,
    )
        .prop_map(|(uefi, swap_gib, root_gib, ext4, tolerance)| {
            let mut o = LayoutOptions::new(if uefi { Firmware::Uefi } else { Firmware::Bios });
            o.swap_bytes = swap_gib * GIB;
            o.root_bytes = root_gib.map(|g| g * GIB);
            o.root = if ext4 { RootSource::Ext4 } else { RootSource::Image };
            o.pair_tolerance_percent = tolerance;
            o
        })
}

/// The disk a device path is on: `/dev/sda3` → `sda`, `/dev/nvme1n1p2` → `nvme1n1`.
fn disk_of<'a>(plan: &'a LayoutPlan, device: &str) -> &'a str {
    plan.disks
        .iter()
        .find(|d| d.partitions.iter().any(|p| p.device == device))
        .map(|d| d.name.as_str())
        .unwrap_or_else(|| panic!("{device} is no partition of the plan"))
}

/// The property below means something only if it sees plans, not just
/// refusals: most generated cases must plan.
#[test]
fn the_generators_mostly_make_plannable_cases() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = (arb_layout(), arb_disks(), arb_options());
    let mut planned = 0;
    for _ in 0..1000 {
        let (layout, set, o) = strategy.new_tree(&mut runner).unwrap().current();
        planned += usize::from(plan(layout, &set, &o).is_ok());
    }
    assert!(planned > 300, "only {planned} of 1000 cases planned");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn plans_keep_the_rules(layout in arb_layout(), set in arb_disks(), o in arb_options(), system in prop::option::of(0usize..10)) {
        // Sometimes a system disk: one of the set's (by serial), or one
        // it does not have.
        let mut o = o;
        o.system_disk = system.map(|i| set.get(i).map_or("SN-gone".into(), |d| format!("SN-{}", d.name)));
        let rule_ok = layout.check_shape(&set, o.system_disk.as_deref()).is_ok();
        let result = plan(layout, &set, &o);
        let p = match result {
            Err(e) => {
                // Refused: with a reason, and always when the rule says no.
                prop_assert!(!e.to_string().is_empty());
                if !rule_ok {
                    prop_assert!(matches!(e, PlanError::Rule(_)), "{}", e);
                }
                return Ok(());
            }
            Ok(p) => p,
        };
        prop_assert!(rule_ok, "planned what the rule refuses");

        // Disks: flat uses the system disk or the first, lvm_hba the system
        // disk or the smallest (the first of equals); every other layout
        // all of them.
        let used: Vec<&str> = p.disks.iter().map(|d| d.name.as_str()).collect();
        let named = o.system_disk.as_deref().and_then(|id| set.iter().find(|d| d.is_known_as(id)));
        if layout == StorageLayout::Flat {
            prop_assert_eq!(used, vec![named.unwrap_or(&set[0]).name.as_str()]);
        } else if layout == StorageLayout::LvmHba {
            let smallest = set.iter().enumerate().min_by_key(|(i, d)| (d.size_bytes, *i)).unwrap().1;
            prop_assert_eq!(used, vec![named.unwrap_or(smallest).name.as_str()]);
        } else {
            prop_assert_eq!(used.iter().copied().collect::<BTreeSet<_>>(), set.iter().map(|d| d.name.as_str()).collect::<BTreeSet<_>>());
        }
        prop_assert_eq!(p.disks.iter().filter(|d| d.spare).count(), usize::from(layout.rule().spare));

        // Partitions: aligned, in order, never overlapping, never past the
        // disk's end or into GPT's backup.
        for d in &p.disks {
            let mut at = MIB;
            for part in &d.partitions {
                prop_assert!(part.start_bytes % MIB == 0 && part.size_bytes % MIB == 0, "{:?}", part);
                prop_assert!(part.start_bytes >= at && part.size_bytes > 0, "{:?}", part);
                at = part.end_bytes();
            }
            prop_assert!(at <= d.size_bytes - MIB, "{} ends at {} of {}", d.name, at, d.size_bytes);
        }

        // md: members and spares on distinct disks; mirrors near-equal.
        for a in &p.arrays {
            let on: Vec<&str> = a.members.iter().chain(&a.spares).map(|m| disk_of(&p, m)).collect();
            let distinct: BTreeSet<&str> = on.iter().copied().collect();
            prop_assert_eq!(distinct.len(), on.len(), "{:?}", a);
            let size = |dev: &str| p.disks.iter().find(|d| d.name == disk_of(&p, dev)).unwrap().size_bytes;
            let mirrors: Vec<&[String]> = match a.level {
                RaidLevel::Raid1 if a.name != "boot" => vec![&a.members[..]],
                RaidLevel::Raid10 => a.members.chunks(2).collect(),
                _ => vec![],
            };
            for pair in mirrors {
                let (x, y) = (size(&pair[0]), size(&pair[1]));
                let (small, large) = (x.min(y), x.max(y));
                prop_assert!((large - small) * 100 <= u64::from(o.pair_tolerance_percent) * large,
                    "{} and {} differ too much", pair[0], pair[1]);
            }
            // Members of one array have the same size (RAID 0 excepted).
            if a.level != RaidLevel::Raid0 {
                let part = |dev: &String| p.disks.iter().flat_map(|d| &d.partitions).find(|q| &q.device == dev).unwrap().size_bytes;
                let sizes: BTreeSet<u64> = a.members.iter().chain(&a.spares).map(part).collect();
                prop_assert_eq!(sizes.len(), 1, "{:?}", a);
            }
            prop_assert!(a.size_bytes > 0);
        }

        // Volumes fit their group; root is at least what was asked.
        if let Some(vg) = &p.volume_group {
            let fixed: u64 = p.logical_volumes.iter().filter_map(|l| l.size_bytes).sum();
            prop_assert!(fixed <= vg.size_bytes);
            prop_assert!(p.root_bytes + p.logical_volumes.iter().filter(|l| l.name != "root").filter_map(|l| l.size_bytes).sum::<u64>() <= vg.size_bytes);
        }
        prop_assert!(p.root_bytes >= o.root_bytes.unwrap_or(o.min_root_bytes));

        // Commands name no disk outside the plan, and every device they
        // create or format is one the plan has.
        let planned: BTreeSet<String> = p.disks.iter().flat_map(|d| std::iter::once(d.device.clone()).chain(d.partitions.iter().map(|q| q.device.clone())))
            .chain(p.arrays.iter().map(|a| a.device.clone()))
            .chain(p.logical_volumes.iter().map(|l| l.device.clone()))
            .chain(p.data_volume.iter().map(|d| d.logical_volume.device.clone()))
            .collect();
        for c in &p.commands {
            for arg in c.argv.iter().filter(|a| a.starts_with("/dev/")) {
                prop_assert!(planned.contains(arg), "`{}` names {} outside the plan", c, arg);
            }
        }
        for other in set.iter().filter(|d| !p.disks.iter().any(|u| u.name == d.name)) {
            let device = format!("/dev/{}", other.name);
            let named = p.commands.iter().any(|c| c.argv.iter().any(|a| a.starts_with(&device)));
            prop_assert!(!named, "a command names {}, which the plan does not use", device);
        }
        // A layout that leaves disks alone runs nothing that reaches past
        // its own disk (stopping every md array or volume group).
        if layout.rule().one_disk {
            prop_assert!(p.commands.iter().all(|c| !c.may_fail), "{:?}", p.commands);
        }
        // The bootloader goes only where there is a boot partition, and
        // there is one on every disk of every layout but lvm_raid10s's
        // data disks.
        let boot = p.boot_disks().count();
        if layout == StorageLayout::LvmRaid10s {
            prop_assert_eq!(boot, 2);
        } else if layout != StorageLayout::Lvm {
            prop_assert_eq!(boot, p.disks.len());
        }
        // Each new partition and array is wiped before anything uses it
        // (creating the array is not using it).
        for dev in p.disks.iter().flat_map(|d| d.partitions.iter().map(|q| &q.device)).chain(p.arrays.iter().map(|a| &a.device)) {
            let creates = |c: &Command| c.argv.get(1).map(String::as_str) == Some("--create") && c.argv.get(2) == Some(dev);
            let wiped = p.commands.iter().position(|c| c.argv[0] == "wipefs" && c.argv.last() == Some(dev));
            let used = p.commands.iter().position(|c| c.argv[0] != "wipefs" && !creates(c) && c.argv.contains(dev));
            prop_assert!(wiped.is_some(), "{} is never wiped", dev);
            if let (Some(w), Some(u)) = (wiped, used) {
                prop_assert!(w < u, "{} used before it is wiped", dev);
            }
        }
        // mkfs only where the plan says, root only when asked.
        let root_formatted = p.commands.iter().any(|c| c.argv[0].starts_with("mkfs") && c.argv.last() == Some(&p.root_device));
        prop_assert_eq!(root_formatted, o.root == RootSource::Ext4);
    }
}
