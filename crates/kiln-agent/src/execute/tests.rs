//! The deploy flow against a fake server and a fake machine whose
//! `mount` moves directories around, so what lands on which filesystem
//! can be checked. The real commands run on the QEMU end-to-end test
//! (crates/kiln/tests/reimage_qemu.rs).

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;

use kiln_types::agent::{ExpectedIdentity, ImageSource};
use kiln_types::catalog::{ImageContent, StorageLayout};
use kiln_types::install::{CryptHash, SshPublicKey};
use tempfile::TempDir;

use super::*;
use crate::image::Sha256;
use crate::inventory::collect;
use crate::server::ControlPlaneError;
use crate::system::SystemError;

const HASH: &str = "$6$saltsalt$aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const IMAGE_URL: &str = "http://kiln/boot/file/test-os.img";

#[derive(Default)]
struct FakeServer {
    image: Vec<u8>,
    stages: Vec<(u8, String)>,
    failures: Vec<String>,
}

impl ControlPlane for FakeServer {
    fn report_discovery(
        &mut self,
        _: &kiln_types::agent::DiscoveryReport,
    ) -> Result<kiln_types::agent::DiscoveryResult, ControlPlaneError> {
        unreachable!("deploy mode does not report discovery")
    }
    fn deploy_plan(&mut self) -> Result<DeployPlan, ControlPlaneError> {
        unreachable!("the plan is given")
    }
    fn open(&mut self, url: &str) -> Result<(Box<dyn Read>, Option<u64>), ControlPlaneError> {
        let bytes = match url {
            IMAGE_URL => self.image.clone(),
            u if u.contains("user-data") => b"#cloud-config\nhostname: web1\n".to_vec(),
            u if u.contains("meta-data") => b"instance-id: kiln-job\n".to_vec(),
            u if u.contains("network-config") => b"version: 2\nethernets: {}\n".to_vec(),
            other => panic!("unexpected fetch {other}"),
        };
        let len = bytes.len() as u64;
        Ok((Box::new(Cursor::new(bytes)), Some(len)))
    }
    fn report_stage(&mut self, stage: Stage, message: &str) -> Result<(), ControlPlaneError> {
        self.stages.push((stage.0, message.to_string()));
        Ok(())
    }
    fn report_failure(&mut self, reason: &str) -> Result<(), ControlPlaneError> {
        self.failures.push(reason.to_string());
        Ok(())
    }
}

/// A machine in a temporary directory: block devices are files under
/// `dev/`, each filesystem's content a directory under `fs/`, and
/// `mount DEV DIR` swaps that content into DIR (`umount` swaps it back).
struct FakeMachine {
    dir: TempDir,
    commands: Vec<Vec<String>>,
    mounted: BTreeMap<String, String>,
    /// A command (by program) that fails.
    failing: Option<&'static str>,
    /// sgdisk runs for real on the files (whole-disk tests); else it is
    /// only recorded.
    real_sgdisk: bool,
}

impl FakeMachine {
    fn new() -> FakeMachine {
        FakeMachine {
            dir: TempDir::new().unwrap(),
            commands: vec![],
            mounted: BTreeMap::new(),
            failing: None,
            real_sgdisk: false,
        }
    }
    fn fs(&self, device: &str) -> PathBuf {
        self.dir
            .path()
            .join("fs")
            .join(device.trim_start_matches('/').replace('/', "_"))
    }
    fn ran(&self, program: &str) -> Vec<String> {
        self.commands
            .iter()
            .filter(|c| c[0] == program)
            .map(|c| c.join(" "))
            .collect()
    }
    fn swap(a: &Path, b: &Path) {
        let tmp = a.with_extension("swap");
        fs::rename(a, &tmp).unwrap();
        fs::rename(b, a).unwrap();
        fs::rename(&tmp, b).unwrap();
    }
}

impl System for FakeMachine {
    fn run(&mut self, argv: &[String]) -> Result<String, SystemError> {
        self.commands.push(argv.to_vec());
        if self.failing == Some(argv[0].as_str()) {
            return Err(SystemError::Failed {
                command: argv.join(" "),
                status: "exit status: 5".into(),
                output: "Device or resource busy".into(),
            });
        }
        let words: Vec<&str> = argv.iter().map(String::as_str).collect();
        match words.as_slice() {
            ["mount", device, at] => {
                let content = self.fs(device);
                fs::create_dir_all(&content).unwrap();
                assert!(
                    self.mounted.insert(at.to_string(), device.to_string()).is_none(),
                    "{at} mounted twice"
                );
                Self::swap(Path::new(at), &content);
                Ok(String::new())
            }
            ["umount", at] => {
                let device = self
                    .mounted
                    .remove(*at)
                    .unwrap_or_else(|| panic!("{at} is not mounted"));
                Self::swap(Path::new(at), &self.fs(&device));
                Ok(String::new())
            }
            ["cp", ..] => HostSystem.run(argv),
            // The real sgdisk, on the files that stand for the disks.
            ["sgdisk", ..] if self.real_sgdisk => {
                let mapped: Vec<String> = argv
                    .iter()
                    .map(|a| match a.starts_with("/dev/") {
                        true => self.device_path(a).display().to_string(),
                        false => a.clone(),
                    })
                    .collect();
                HostSystem.run(&mapped)
            }
            ["blkid", "-s", "UUID", "-o", "value", device] => Ok(format!("uuid-of-{}\n", device.replace('/', "_"))),
            ["blkid", "-s", "TYPE", "-o", "value", _] => Ok("ext4\n".into()),
            ["mdadm", "--detail", "--scan"] => Ok("ARRAY /dev/md0 metadata=1.0 UUID=aa\n".into()),
            // A machine reimaged before: its old kiln entry, the firmware's own.
            ["efibootmgr"] => Ok("BootCurrent: 0001\nBootOrder: 0003,0001,0000\nBoot0000* UiApp\n\
                 Boot0001* UEFI PXEv4 (MAC:525400820001)\nBoot0003* old-name (kiln, vda)\tHD(1,GPT,aa)/File(\\EFI\\BOOT\\BOOTX64.EFI)\n"
                .into()),
            ["lvcreate", ..] => {
                let root = self.device_path("/dev/vg0/root");
                fs::create_dir_all(root.parent().unwrap()).unwrap();
                fs::write(root, b"").unwrap();
                Ok(String::new())
            }
            _ => Ok(String::new()),
        }
    }
    fn wait_for_device(&mut self, _: &str) -> Result<(), SystemError> {
        Ok(())
    }
    fn device_path(&self, device: &str) -> PathBuf {
        self.dir.path().join(device.trim_start_matches('/'))
    }
}

use crate::system::HostSystem;

fn inventory() -> Inventory {
    collect(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qemu-bios")).unwrap()
}

fn plan_for(inv: &Inventory, image: &[u8]) -> DeployPlan {
    let dmi = inv.hardware.dmi.clone().unwrap_or_default();
    let base = "http://kiln/boot/job/0190f5b0-7d1e-7c3a-9a4e-2f6b8c1d2e3f";
    DeployPlan {
        job_id: "0190f5b0-7d1e-7c3a-9a4e-2f6b8c1d2e3f".parse().unwrap(),
        hostname: "web1".parse().unwrap(),
        identity: ExpectedIdentity {
            serial: dmi.serial,
            uuid: dmi.uuid,
            disk_serials: inv.hardware.disks.iter().filter_map(|d| d.serial.clone()).collect(),
            macs: vec![],
        },
        protected: false,
        image: ImageSource {
            url: IMAGE_URL.into(),
            format: kiln_types::agent::ImageFormat::Raw,
            sha256: Sha256::of(image).to_string(),
            content: ImageContent::Filesystem,
        },
        layout: StorageLayout::LvmRaid1,
        root_password_hash: Some(HASH.parse::<CryptHash>().unwrap()),
        ssh_keys: vec![
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx5 ops@example.net"
                .parse::<SshPublicKey>()
                .unwrap(),
        ],
        user_data_url: format!("{base}/user-data?token=t"),
        meta_data_url: format!("{base}/meta-data?token=t"),
        network_config_url: Some(format!("{base}/network-config?token=t")),
        stage_url: format!("{base}/stages"),
        system_disk: None,
    }
}

/// The machine with an image whose root filesystem holds a kernel, an
/// initrd and a shadow file (the fake's filesystems are directories).
fn setup() -> (FakeServer, FakeMachine, DeployEnv) {
    let machine = FakeMachine::new();
    // Two used disks, boot code and all.
    for disk in ["/dev/vda", "/dev/vdb"] {
        let path = machine.device_path(disk);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, vec![0xeb; 5 << 20]).unwrap();
    }
    let root = machine.fs("/dev/vg0/root");
    fs::create_dir_all(root.join("boot")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("boot/vmlinuz-6.1.0-21-amd64"), b"kernel").unwrap();
    fs::write(root.join("boot/initrd.img-6.1.0-21-amd64"), b"initrd").unwrap();
    fs::write(
        root.join("etc/shadow"),
        "root:*:19000:0:99999:7:::\ndaemon:*:19000::::::\n",
    )
    .unwrap();
    let server = FakeServer {
        image: b"an ext4 image, say".repeat(1000),
        ..Default::default()
    };
    let env = DeployEnv {
        target: machine.dir.path().join("mnt/kiln"),
        kernel_args: vec!["console=ttyS0,115200".into()],
    };
    (server, machine, env)
}

#[test]
fn a_deploy_reports_each_stage_and_leaves_a_bootable_layout() {
    let (mut server, mut machine, env) = setup();
    let inv = inventory();
    let plan = plan_for(&inv, &server.image);
    let done = deploy(&mut server, &mut machine, &plan, &inv, &env).unwrap();
    assert_eq!(done.boot_disks, ["/dev/vda", "/dev/vdb"]);
    assert!(server.failures.is_empty(), "{:?}", server.failures);
    let stages: Vec<u8> = server.stages.iter().map(|(n, _)| *n).collect();
    assert_eq!(stages, [1, 2, 3, 4]);
    assert!(server.stages[1].1.contains("sha256 checked"), "{:?}", server.stages[1]);

    // Wiped before anything was made, GRUB on both mirrors, all unmounted.
    let lines: Vec<String> = machine.commands.iter().map(|c| c.join(" ")).collect();
    let first = |p: &str| lines.iter().position(|x| x.starts_with(p)).unwrap();
    assert!(first("wipefs") < first("mdadm --create") && first("mdadm --create") < first("mount"));
    assert_eq!(
        machine.ran("grub-install"),
        [
            format!(
                "grub-install --target=i386-pc --boot-directory={}/boot /dev/vda",
                env.target.display()
            ),
            format!(
                "grub-install --target=i386-pc --boot-directory={}/boot /dev/vdb",
                env.target.display()
            ),
        ]
    );
    assert!(machine.mounted.is_empty(), "{:?}", machine.mounted);
    for disk in ["/dev/vda", "/dev/vdb"] {
        let bytes = fs::read(machine.device_path(disk)).unwrap();
        let zero = |r: std::ops::Range<usize>| bytes[r].iter().all(|b| *b == 0);
        assert!(
            zero(0..2 << 20) && zero((4 << 20)..(5 << 20)),
            "{disk}: boot code and GPTs zeroed"
        );
        assert!(!zero((2 << 20)..(4 << 20)), "{disk}: the rest left to the layout");
    }
    let written = fs::read(machine.device_path("/dev/vg0/root")).unwrap();
    assert!(written.starts_with(&server.image), "the image is on the root volume");

    // The kernel moved onto the /boot array, with a grub.cfg for it.
    let root = machine.fs("/dev/vg0/root");
    let boot = machine.fs("/dev/md0");
    assert!(boot.join("vmlinuz-6.1.0-21-amd64").exists());
    assert_eq!(
        fs::read_dir(root.join("boot")).unwrap().count(),
        0,
        "the root's /boot is only a mount point"
    );
    let grub = fs::read_to_string(boot.join("grub/grub.cfg")).unwrap();
    assert!(grub.contains("insmod mdraid1x"), "{grub}");
    assert!(
        grub.contains("search --no-floppy --fs-uuid --set=root uuid-of-_dev_md0"),
        "{grub}"
    );
    assert!(
        grub.contains("linux /vmlinuz-6.1.0-21-amd64 root=/dev/mapper/vg0-root ro console=ttyS0,115200"),
        "{grub}"
    );
    assert!(grub.contains("initrd /initrd.img-6.1.0-21-amd64"), "{grub}");
    assert!(grub.contains("serial --unit=0"), "{grub}");

    // The new root's configuration.
    let read = |p: &str| fs::read_to_string(root.join(p)).unwrap();
    let fstab = read("etc/fstab");
    assert!(
        fstab.contains("UUID=uuid-of-_dev_vg0_root / ext4 defaults 0 1"),
        "{fstab}"
    );
    assert!(
        fstab.contains("UUID=uuid-of-_dev_md0 /boot ext4 defaults 0 2"),
        "{fstab}"
    );
    assert_eq!(read("etc/hostname"), "web1\n");
    assert!(read("etc/hosts").ends_with("127.0.1.1 web1\n"));
    assert!(
        read("etc/shadow").starts_with(&format!("root:{HASH}:19000:")),
        "{}",
        read("etc/shadow")
    );
    assert!(read("root/.ssh/authorized_keys").contains("ops@example.net"));
    assert!(read("var/lib/cloud/seed/nocloud/user-data").starts_with("#cloud-config"));
    assert_eq!(
        read("var/lib/cloud/seed/nocloud/network-config"),
        "version: 2\nethernets: {}\n",
        "the inventory's network goes beside user-data and meta-data"
    );
    let mode = fs::metadata(root.join("var/lib/cloud/seed/nocloud/user-data"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the seed holds the job token");
    assert!(read("etc/mdadm/mdadm.conf").contains("ARRAY /dev/md0"));
}

#[test]
fn a_wrong_checksum_fails_before_any_bootloader() {
    let (mut server, mut machine, env) = setup();
    let inv = inventory();
    let mut plan = plan_for(&inv, &server.image);
    plan.image.sha256 = Sha256::of(b"another image").to_string();
    let e = deploy(&mut server, &mut machine, &plan, &inv, &env).unwrap_err();
    assert!(e.0.contains("writing the image"), "{e}");
    assert_eq!(server.failures, std::slice::from_ref(&e.0));
    assert_eq!(server.stages.len(), 1, "only stage 1: {:?}", server.stages);
    assert!(machine.ran("grub-install").is_empty());
    assert!(machine.ran("mount").is_empty());
}

#[test]
fn another_machine_is_refused_before_any_command() {
    let (mut server, mut machine, env) = setup();
    let inv = inventory();
    let mut plan = plan_for(&inv, &server.image);
    plan.identity.uuid = Some("0e7a57c2-0000-4000-8000-00000000beef".into());
    let e = deploy(&mut server, &mut machine, &plan, &inv, &env).unwrap_err();
    assert!(e.0.starts_with("refused before writing"), "{e}");
    assert_eq!(server.failures.len(), 1);
    assert!(machine.commands.is_empty(), "{:?}", machine.commands);
    let head = fs::read(machine.device_path("/dev/vda")).unwrap();
    assert_eq!(head[0], 0xeb, "a refused machine's disks are not touched");

    let mut plan = plan_for(&inv, &server.image);
    plan.protected = true;
    let e = deploy(&mut server, &mut machine, &plan, &inv, &env).unwrap_err();
    assert!(e.0.contains("protected"), "{e}");
    assert!(machine.commands.is_empty());
}

#[test]
fn a_failing_command_names_its_step() {
    let (mut server, mut machine, env) = setup();
    machine.failing = Some("pvcreate");
    let inv = inventory();
    let plan = plan_for(&inv, &server.image);
    let e = deploy(&mut server, &mut machine, &plan, &inv, &env).unwrap_err();
    assert!(e.0.starts_with("laying out the disks ("), "{e}");
    assert!(e.0.contains("Device or resource busy"), "{e}");
    assert!(machine.ran("lvcreate").is_empty(), "nothing after the failure");
}

#[test]
fn an_image_without_a_kernel_is_refused() {
    let (mut server, mut machine, env) = setup();
    fs::remove_dir_all(machine.fs("/dev/vg0/root").join("boot")).unwrap();
    let inv = inventory();
    let plan = plan_for(&inv, &server.image);
    let e = deploy(&mut server, &mut machine, &plan, &inv, &env).unwrap_err();
    assert!(e.0.contains("the image has no kernel in /boot"), "{e}");
    assert!(machine.ran("grub-install").is_empty());
    assert_eq!(server.stages.len(), 3, "stages 1 to 3, not 4: {:?}", server.stages);
}

#[test]
fn kernels_are_found_newest_first() {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let found = find_kernel(&names(&[
        "vmlinuz-6.1.0-9-amd64",
        "vmlinuz-6.1.0-21-amd64",
        "initrd.img-6.1.0-21-amd64",
        "initrd.img-6.1.0-9-amd64",
        "System.map-6.1.0-21-amd64",
    ]));
    assert_eq!(
        found,
        Some((
            "vmlinuz-6.1.0-21-amd64".into(),
            Some("initrd.img-6.1.0-21-amd64".into())
        ))
    );
    let rhel = find_kernel(&names(&[
        "vmlinuz-5.14.0-427.el9.x86_64",
        "initramfs-5.14.0-427.el9.x86_64.img",
    ]));
    assert_eq!(rhel.unwrap().1.as_deref(), Some("initramfs-5.14.0-427.el9.x86_64.img"));
    assert_eq!(
        find_kernel(&names(&["vmlinuz", "initrd.img"])),
        Some(("vmlinuz".into(), Some("initrd.img".into())))
    );
    assert_eq!(find_kernel(&names(&["grub", "config-6.1"])), None);
}

#[test]
fn small_edits_of_the_new_root() {
    assert_eq!(root_arg("/dev/vg0/root", "u"), "root=/dev/mapper/vg0-root");
    assert_eq!(root_arg("/dev/my-vg/root", "u"), "root=/dev/mapper/my--vg-root");
    assert_eq!(root_arg("/dev/vda3", "1234"), "root=UUID=1234");
    let shadow = "root:*:19000:0:99999:7:::\nroot2:x:1::::::\n";
    assert_eq!(
        with_root_hash(shadow, "$6$s$h"),
        "root:$6$s$h:19000:0:99999:7:::\nroot2:x:1::::::\n"
    );
    let hosts = "127.0.0.1 localhost\n127.0.1.1 debian\n";
    assert_eq!(with_host_line(hosts, "web1"), "127.0.0.1 localhost\n127.0.1.1 web1\n");
    let keys = vec!["ssh-ed25519 AAA a".to_string(), "ssh-ed25519 BBB b".to_string()];
    assert_eq!(
        with_keys("ssh-ed25519 AAA a", &keys),
        "ssh-ed25519 AAA a\nssh-ed25519 BBB b\n"
    );
}

/// A small whole-disk image like a distribution's: GPT, an ESP and a
/// root partition with recognisable bytes, `mib` MiB.
fn whole_disk_image(dir: &Path, mib: u64) -> Vec<u8> {
    let path = dir.join("image.raw");
    fs::File::create(&path).unwrap().set_len(mib << 20).unwrap();
    let out = std::process::Command::new("sgdisk")
        .args([
            "-n",
            "1:2048:+4M",
            "-t",
            "1:EF00",
            "-n",
            "15:0:0",
            "-t",
            "15:8304",
            "-c",
            "15:root",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut bytes = fs::read(&path).unwrap();
    let root_at = 6 << 20;
    bytes[root_at..root_at + 9].copy_from_slice(b"ROOT-DATA");
    bytes
}

fn whole_disk_setup(disk_mib: u64) -> (FakeServer, FakeMachine, DeployPlan, Inventory) {
    let (mut server, mut machine, _) = setup();
    machine.real_sgdisk = true;
    // vda is the smaller of the lab VM's two disks in the fake: 64 MiB.
    for (disk, mib) in [("/dev/vda", disk_mib), ("/dev/vdb", disk_mib * 2)] {
        let f = fs::File::create(machine.device_path(disk)).unwrap();
        f.set_len(mib << 20).unwrap();
    }
    server.image = whole_disk_image(machine.dir.path(), 16);
    let inv = inventory();
    let mut plan = plan_for(&inv, &server.image);
    plan.layout = StorageLayout::Flat;
    plan.image.content = ImageContent::WholeDisk;
    (server, machine, plan, inv)
}

#[test]
fn a_whole_disk_image_is_written_grown_and_seeded() {
    let (mut server, mut machine, plan, inv) = whole_disk_setup(64);
    let env = DeployEnv {
        target: machine.dir.path().join("mnt/kiln"),
        kernel_args: vec![],
    };
    let done = deploy(&mut server, &mut machine, &plan, &inv, &env).unwrap();
    assert!(server.failures.is_empty(), "{:?}", server.failures);
    let stages: Vec<u8> = server.stages.iter().map(|(n, _)| *n).collect();
    assert_eq!(stages, [1, 2, 3, 4]);
    let disk = inv.hardware.disks.iter().min_by_key(|d| d.size_bytes).unwrap();
    let device = format!("/dev/{}", disk.name);
    assert_eq!(done.boot_disks, std::slice::from_ref(&device));
    assert!(server.stages[1].1.contains("sha256 checked"), "{:?}", server.stages[1]);
    assert_eq!(
        server.stages[2].1,
        "configured: partition 15 (root) grown from 10 MiB to 54 MiB; CIDATA is partition 2 (4 MiB), with the \
         NoCloud seed (user-data, meta-data, network-config)"
    );
    // Nothing of the filesystem path ran: no layout, no mount, no GRUB.
    for program in ["wipefs", "mount", "grub-install", "mdadm --create"] {
        assert!(machine.ran(program).is_empty(), "{program} ran: {:?}", machine.commands);
    }
    let bytes = fs::read(machine.device_path(&device)).unwrap();
    assert_eq!(&bytes[6 << 20..(6 << 20) + 9], b"ROOT-DATA", "the image is on the disk");
    let gpt = crate::whole_disk::read_gpt(&bytes).unwrap();
    assert_eq!(
        gpt.last_usable_lba,
        (64 << 20) / 512 - 34,
        "backup GPT at the disk's end"
    );
    let cidata = gpt.partitions.iter().find(|p| p.name == "CIDATA").unwrap();
    let fat = &bytes[(cidata.first_lba * 512) as usize..];
    assert_eq!(&fat[510..512], &[0x55, 0xaa], "a FAT boot sector");
    assert!(fat[..512].windows(6).any(|w| w == b"CIDATA"), "labelled CIDATA");
}

#[test]
fn a_whole_disk_image_with_a_raid_layout_is_refused_before_any_write() {
    let (mut server, mut machine, mut plan, inv) = whole_disk_setup(64);
    plan.layout = StorageLayout::LvmRaid1;
    let env = DeployEnv {
        target: machine.dir.path().join("mnt/kiln"),
        kernel_args: vec![],
    };
    let e = deploy(&mut server, &mut machine, &plan, &inv, &env).unwrap_err();
    assert!(
        e.0.starts_with("refused before writing:") && e.0.contains("`flat` layout only"),
        "{e}"
    );
    assert!(machine.commands.is_empty(), "{:?}", machine.commands);
    assert_eq!(server.stages.len(), 1);
}

#[test]
fn a_whole_disk_image_as_large_as_the_disk_fails_with_the_reason() {
    // The image fills the disk: no room for CIDATA behind it.
    let (mut server, mut machine, plan, inv) = whole_disk_setup(16);
    let env = DeployEnv {
        target: machine.dir.path().join("mnt/kiln"),
        kernel_args: vec![],
    };
    let e = deploy(&mut server, &mut machine, &plan, &inv, &env).unwrap_err();
    assert!(e.0.contains("no room") && e.0.contains("CIDATA"), "{e}");
    assert_eq!(server.failures, std::slice::from_ref(&e.0));
    // Written but not configured: it must not boot.
    let bytes = fs::read(machine.device_path("/dev/vda")).unwrap();
    assert!(bytes[..2 << 20].iter().all(|b| *b == 0), "boot code and GPT zeroed");
    assert!(crate::whole_disk::read_gpt(&bytes).is_err());
}

#[test]
fn uefi_puts_grub_on_every_esp_and_names_the_os_in_nvram() {
    let (mut server, mut machine, env) = setup();
    let mut inv = inventory();
    inv.firmware = Firmware::Uefi;
    let plan = plan_for(&inv, &server.image);
    let done = deploy(&mut server, &mut machine, &plan, &inv, &env).unwrap();
    assert_eq!(done.boot_disks, ["/dev/vda", "/dev/vdb"]);
    assert!(server.failures.is_empty(), "{:?}", server.failures);
    let efi = env.target.join("boot/efi");
    assert_eq!(
        machine.ran("grub-install"),
        [format!(
            "grub-install --target=x86_64-efi --efi-directory={} --boot-directory={}/boot --removable --no-nvram",
            efi.display(),
            env.target.display()
        )]
    );
    // The second disk's ESP gets a copy of the first's.
    let esp_copy: Vec<String> = machine
        .ran("cp")
        .into_iter()
        .filter(|c| c.contains("kiln.esp"))
        .collect();
    assert_eq!(
        esp_copy,
        [format!("cp -a {}/. {}.esp", efi.display(), env.target.display())]
    );
    // The old kiln entry goes, the firmware's stay; one entry per ESP,
    // the first disk's made last so that it is first in BootOrder.
    assert_eq!(
        machine.ran("efibootmgr"),
        [
            "efibootmgr".to_string(),
            "efibootmgr --quiet --bootnum 0003 --delete-bootnum".into(),
            "efibootmgr --quiet --create --disk /dev/vdb --part 1 --label web1 (kiln, vdb) --loader \\EFI\\BOOT\\BOOTX64.EFI"
                .into(),
            "efibootmgr --quiet --create --disk /dev/vda --part 1 --label web1 (kiln, vda) --loader \\EFI\\BOOT\\BOOTX64.EFI"
                .into(),
        ]
    );
    assert!(machine.mounted.is_empty(), "{:?}", machine.mounted);
}

#[test]
fn a_firmware_that_refuses_variables_still_gets_a_bootable_disk() {
    let (mut server, mut machine, env) = setup();
    machine.failing = Some("efibootmgr");
    let mut inv = inventory();
    inv.firmware = Firmware::Uefi;
    let plan = plan_for(&inv, &server.image);
    let done = deploy(&mut server, &mut machine, &plan, &inv, &env).unwrap();
    assert_eq!(done.boot_disks, ["/dev/vda", "/dev/vdb"]);
    assert_eq!(machine.ran("grub-install").len(), 1);
    assert_eq!(
        machine.ran("efibootmgr"),
        ["efibootmgr"],
        "nothing written after the refusal"
    );
}

#[test]
fn kiln_entries_are_found_in_either_efibootmgr_listing() {
    let v17 = "BootCurrent: 0002\nTimeout: 0 seconds\nBootOrder: 0004,0002\nBoot0000* UiApp\n\
               Boot0002* UEFI PXEv4 (MAC:525400820001)\nBoot0004* web1 (kiln, vda)\nBoot000A  web1 (kiln, vdb)\n";
    assert_eq!(kiln_entries(v17), ["0004", "000A"]);
    let v18 = "BootOrder: 0004\nBoot0004* web1 (kiln, nvme0n1)\tHD(1,GPT,0b0e,0x800,0x100000)/\\EFI\\BOOT\\BOOTX64.EFI\n\
               Boot0005* debian\tHD(1,GPT,0b0e)/\\EFI\\debian\\shimx64.efi (kiln-less)\n";
    assert_eq!(kiln_entries(v18), ["0004"], "a path that says kiln is not a label");
    assert!(kiln_entries("BootNext: 0001\nBootXYZW* x (kiln, a)\n").is_empty());
}
