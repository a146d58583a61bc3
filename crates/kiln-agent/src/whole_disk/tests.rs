//! The whole-disk decisions on real partition tables: sgdisk makes them on
//! sparse files, the plan's own sgdisk call edits them, and the result is
//! read back; the CIDATA filesystem is checked with dosfstools, mtools and
//! blkid, the tools that judge FAT for real.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_types::machine::Disk;

use super::*;

const MIB: u64 = 1 << 20;

fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-whole-disk-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn head(path: &Path) -> Vec<u8> {
    let mut b = vec![0; GPT_HEAD_BYTES];
    File::open(path).unwrap().read_exact(&mut b).unwrap();
    b
}

/// A disk like the Debian image's, `mib` MiB: BIOS boot, ESP, then a root
/// with a name, a fixed unique GUID and the legacy-BIOS-bootable bit; then
/// "written" onto a disk of `disk_mib` MiB (the file just grows, as the
/// image's bytes would sit at the start of a larger disk).
fn image_on_disk(dir: &Path, mib: u64, disk_mib: u64) -> PathBuf {
    let disk = dir.join("disk.raw");
    File::create(&disk).unwrap().set_len(mib * MIB).unwrap();
    let d = disk.to_str().unwrap();
    run(&[
        "sgdisk",
        "-n",
        "1:2048:+1M",
        "-t",
        "1:EF02",
        "-n",
        "2:4096:+32M",
        "-t",
        "2:EF00",
        "-n",
        "3:69632:0",
        "-t",
        "3:8304",
        "-c",
        "3:root",
        "-u",
        "3:11111111-2222-3333-4444-555555555555",
        "-A",
        "3:set:2",
        d,
    ]);
    OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(disk_mib * MIB)
        .unwrap();
    disk
}

fn gpt_of(disk: &Path) -> Gpt {
    read_gpt(&head(disk)).unwrap()
}

#[test]
fn the_smallest_disk_is_the_system_disk() {
    let disk = |name: &str, gib: u64| Disk {
        name: name.into(),
        size_bytes: gib << 30,
        rotational: false,
        model: None,
        serial: None,
        by_id: None,
    };
    let disks = [
        disk("sda", 960),
        disk("sdb", 240),
        disk("sdc", 240),
        disk("nvme0n1", 3840),
    ];
    assert_eq!(
        system_disk(&disks).unwrap().name,
        "sdb",
        "smallest, the first of equals"
    );
    assert!(system_disk(&[]).is_none());
    assert!(layout_refusal(StorageLayout::Flat).is_none());
    let why = layout_refusal(StorageLayout::LvmRaid1).unwrap();
    assert!(why.contains("whole-disk") && why.contains("lvm_raid1"), "{why}");
}

#[test]
fn reads_the_gpt_sgdisk_wrote() {
    let dir = scratch("read");
    let disk = image_on_disk(&dir, 64, 64);
    let gpt = gpt_of(&disk);
    assert_eq!(gpt.partitions.len(), 3);
    let root = &gpt.partitions[2];
    assert_eq!(root.number, 3);
    assert_eq!(root.first_lba, 69632);
    assert_eq!(root.name, "root");
    assert_eq!(root.unique_guid.to_string(), "11111111-2222-3333-4444-555555555555");
    assert_eq!(root.type_guid.to_string(), "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709");
    assert_eq!(root.attributes, 1 << 2);
    assert_eq!(
        gpt.partitions[1].type_guid.to_string(),
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    );
    assert_eq!(gpt.backup_lba, 64 * MIB / SECTOR - 1);

    // Damage is refused, not edited.
    let mut bad = head(&disk);
    bad[SECTOR as usize + 40] ^= 1;
    assert!(read_gpt(&bad).unwrap_err().contains("CRC"), "header");
    let mut bad = head(&disk);
    bad[2 * SECTOR as usize + 200] ^= 1;
    assert!(read_gpt(&bad).unwrap_err().contains("entries' CRC"));
    let mbr_only = vec![0u8; GPT_HEAD_BYTES];
    assert!(read_gpt(&mbr_only).unwrap_err().contains("no GPT"));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn grows_the_last_partition_and_adds_cidata_behind_it() {
    let dir = scratch("grow");
    let disk = image_on_disk(&dir, 64, 256);
    let d = disk.to_str().unwrap();
    // As the agent does: the backup GPT to the disk's end first.
    run(&["sgdisk", "-e", d]);
    let before = gpt_of(&disk);
    let finish = plan_finish(&before, d).unwrap();
    let argv: Vec<&str> = finish.argv.iter().map(String::as_str).collect();
    run(&argv);
    run(&["sgdisk", "-v", d]);

    let after = gpt_of(&disk);
    assert_eq!(after.partitions.len(), 4);
    let (old, new) = (&before.partitions[2], &after.partitions[2]);
    assert_eq!(
        (
            new.number,
            new.first_lba,
            new.type_guid,
            new.unique_guid,
            new.attributes,
            &new.name
        ),
        (
            old.number,
            old.first_lba,
            old.type_guid,
            old.unique_guid,
            old.attributes,
            &old.name
        ),
        "the root partition keeps everything but its end"
    );
    let cidata = &after.partitions[3];
    assert_eq!((cidata.number, cidata.name.as_str()), (4, "CIDATA"));
    assert_eq!(new.last_lba + 1, cidata.first_lba, "root grows up to CIDATA");
    assert_eq!(cidata.first_lba % 2048, 0, "CIDATA is MiB-aligned");
    assert_eq!(cidata.last_lba, after.last_usable_lba, "CIDATA ends the disk");
    assert!((cidata.last_lba - cidata.first_lba + 1) * SECTOR >= CIDATA_BYTES - MIB);
    assert_eq!(
        finish.to_string(),
        "partition 3 (root) grown from 29 MiB to 217 MiB; CIDATA is partition 4 (4 MiB)"
    );

    // The seed, written through the whole disk at the partition's offset.
    let (offset, len) = finish.cidata_bytes();
    let mut file = OpenOptions::new().read(true).write(true).open(&disk).unwrap();
    let files = [
        ("user-data", "#cloud-config\nruncmd:\n  - [/bin/true]\n".to_string()),
        ("meta-data", "instance-id: job-1\nlocal-hostname: web-1\n".to_string()),
        ("network-config", "version: 2\nethernets: {}\n".to_string()),
    ];
    write_cidata(&mut Window::new(&mut file, offset, len), &files).unwrap();
    drop(file);
    let part = dir.join("cidata.vfat");
    run(&[
        "dd",
        &format!("if={d}"),
        &format!("of={}", part.display()),
        "bs=512",
        &format!("skip={}", offset / 512),
        &format!("count={}", len / 512),
        "status=none",
    ]);
    let p = part.to_str().unwrap();
    run(&["fsck.vfat", "-n", p]);
    let label = run(&["blkid", "-o", "value", "-s", "LABEL", p]);
    assert_eq!(
        label.trim(),
        "CIDATA",
        "cloud-init's NoCloud finds the seed by this label"
    );
    for (name, text) in &files {
        let got = Command::new("mtype")
            .args(["-i", p, &format!("::/{name}")])
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&got.stdout), *text, "{name}");
    }
    // The image's partitions before CIDATA are untouched: the root's
    // first sectors still read as they did (zeros here).
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_disk_without_room_for_cidata_is_refused_and_swap_is_not_grown() {
    let dir = scratch("full");
    let disk = image_on_disk(&dir, 64, 64);
    let e = plan_finish(&gpt_of(&disk), "/dev/vda").unwrap_err();
    assert!(e.contains("no room") && e.contains("larger disk"), "{e}");

    // Last partition a swap: CIDATA goes behind it, nothing grows.
    let swap = dir.join("swap.raw");
    File::create(&swap).unwrap().set_len(64 * MIB).unwrap();
    let s = swap.to_str().unwrap();
    run(&[
        "sgdisk",
        "-n",
        "1:2048:+8M",
        "-t",
        "1:8300",
        "-n",
        "2:0:+8M",
        "-t",
        "2:8200",
        s,
    ]);
    OpenOptions::new()
        .write(true)
        .open(&swap)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    run(&["sgdisk", "-e", s]);
    let finish = plan_finish(&gpt_of(&swap), s).unwrap();
    assert!(finish.grown.is_none());
    assert_eq!(finish.cidata.0, 3);
    assert!(
        !finish.argv.iter().any(|a| a.starts_with("--delete")),
        "{:?}",
        finish.argv
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_window_stays_inside_its_partition() {
    let mut disk = std::io::Cursor::new(vec![0u8; 64]);
    let mut w = Window::new(&mut disk, 16, 8);
    assert_eq!(w.write(&[1; 20]).unwrap(), 8);
    assert!(w.write(&[1]).is_err());
    w.seek(SeekFrom::Start(4)).unwrap();
    let mut b = [0u8; 10];
    assert_eq!(w.read(&mut b).unwrap(), 4);
    let v = disk.into_inner();
    assert_eq!(&v[15..25], &[0, 1, 1, 1, 1, 1, 1, 1, 1, 0]);
}
