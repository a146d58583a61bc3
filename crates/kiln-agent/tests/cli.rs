//! The `kiln-agent` binary, run as a person (or the ramdisk's init) would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn inventory_prints_json() {
    let root = fixtures().join("server-uefi");
    let out = agent(&["inventory", "--root", root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["firmware"], "uefi");
    assert_eq!(json["hardware"]["disks"].as_array().unwrap().len(), 3);
    assert_eq!(json["hardware"]["dmi"]["serial"], "7XK2LM3");
}

#[test]
fn plan_prints_commands_or_says_why_not() {
    let root = fixtures().join("qemu-bios");
    let out = agent(&[
        "plan",
        "--layout",
        "lvm_raid1",
        "--root",
        root.to_str().unwrap(),
        "--swap",
        "1G",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("mdadm --create /dev/md1"), "{stdout}");
    let out = agent(&["plan", "--layout", "lvm_raid10", "--root", root.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim(),
        "kiln-agent: lvm_raid10 needs an even number of disks, at least 4, in pairs of similar size; the machine \
         has 2 disks: vda 8 GiB, vdb 8 GiB"
    );
}

#[test]
fn write_image_checks_the_checksum() {
    let image = fixtures().join("images/v3-zstd.qcow2");
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&image).unwrap()))
    };
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.img");
    let args = |sha: &str| {
        vec![
            "write-image".to_string(),
            image.display().to_string(),
            target.display().to_string(),
            "--format".into(),
            "qcow2".into(),
            "--sha256".into(),
            sha.into(),
        ]
    };
    let run = |args: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(args(&sha));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("wrote"), "{}", text(&out.stderr));
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 1024 * 1024 + 3584);

    let out = run(args(&"0".repeat(64)));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("SHA-256 of the image is"),
        "{}",
        text(&out.stderr)
    );
    let disk = std::fs::read(&target).unwrap();
    assert!(disk[..1 << 20].iter().all(|b| *b == 0), "left unbootable");
}

#[test]
fn run_reads_the_kernel_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let cmdline = dir.path().join("cmdline");
    std::fs::write(&cmdline, "console=ttyS0 kiln.mode=deploy kiln.token=canary-hunter2\n").unwrap();
    let out = agent(&["run", "--cmdline", cmdline.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("kiln.server is missing from the kernel command line"),
        "{stderr}"
    );
    assert!(!stderr.contains("canary"), "{stderr}");
}
