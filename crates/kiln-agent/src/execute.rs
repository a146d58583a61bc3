//! Deploy mode from the job's plan to the reboot: check, lay out, write,
//! configure, install the bootloader — reporting stages 1 to 4 as each is
//! reached, and a failure (with the reason) as soon as one happens.
//!
//! The order is the safety argument:
//! 1. stage 1 as soon as the plan is read (the server disarms net boot:
//!    from here on a reboot boots the disk);
//! 2. [`preflight`] — identity and layout — before anything is written;
//!    a refusal is reported and nothing is touched;
//! 3. the disks' first 2 MiB and last MiB are zeroed (boot code, both
//!    GPTs), then the layout's commands wipe and lay out the disks;
//! 4. the image streams onto the root volume and its SHA-256 is checked
//!    (a mismatch leaves the disks unbootable: no bootloader is written
//!    before step 6); stage 2;
//! 5. the new root is configured (fstab, hostname, cloud-init NoCloud
//!    seed, root password hash, SSH keys, mdadm.conf); stage 3;
//! 6. GRUB on every disk of the layout, so any surviving disk boots (on
//!    UEFI: at the removable path of every ESP, and a named NVRAM entry
//!    per ESP); unmount; stage 4; the caller reboots.
//!
//! A whole-disk image ([`ImageContent::WholeDisk`], docs/images.md) takes
//! a shorter path after the same stage 1 and identity check: the layout
//! must be `flat` (refused otherwise, before anything is written); the
//! system disk's ends are zeroed; the image streams onto the whole disk and
//! its SHA-256 is checked (stage 2); the backup GPT moves to the disk's
//! end, the image's last partition grows, and a `CIDATA` partition with the
//! NoCloud seed is added behind it, then `sgdisk -v` checks the table
//! (stage 3); the image's own bootloader boots it (stage 4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_types::agent::DeployPlan;
use kiln_types::catalog::ImageContent;
use kiln_types::job::Stage;

use crate::deploy::{preflight, preflight_whole_disk};
use crate::image::{ExpectedImage, Progress, SyncOnFlush, WriteOptions, write_image};
use crate::inventory::{Firmware, Inventory};
use crate::layout::{FsKind, LayoutPlan};
use crate::server::{ControlPlane, DeployJob};
use crate::system::{System, devices_needed};
use crate::whole_disk::{GPT_HEAD_BYTES, Window, plan_finish, read_gpt, write_cidata};

/// Where deploy mode works.
#[derive(Debug, Clone)]
pub struct DeployEnv {
    /// Where the new root is mounted while it is configured.
    pub target: PathBuf,
    /// Kernel arguments the new OS boots with besides `root=`: the
    /// agent's own `console=` arguments, so the console stays where the
    /// operator looks.
    pub kernel_args: Vec<String>,
}

/// Why a deploy stopped. The server has been told (when it could be).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeployError(pub String);

/// What a finished deploy did, for the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    pub hostname: String,
    pub root_device: String,
    pub boot_disks: Vec<String>,
}

/// Runs deploy mode for `plan` on the machine `inventory` describes.
pub fn deploy(
    server: &mut dyn ControlPlane,
    system: &mut dyn System,
    plan: &DeployPlan,
    inventory: &Inventory,
    env: &DeployEnv,
) -> Result<Deployed, DeployError> {
    let who = inventory
        .hardware
        .dmi
        .as_ref()
        .and_then(|d| d.serial.clone())
        .unwrap_or_else(|| "a machine without a DMI serial".into());
    server
        .report_stage(Stage::STARTED, &format!("kiln-agent started on {who}"))
        .map_err(|e| DeployError(format!("cannot report stage 1: {e}")))?;
    let result = steps(server, system, plan, inventory, env);
    if let Err(DeployError(reason)) = &result
        && let Err(e) = server.report_failure(reason)
    {
        eprintln!("kiln-agent: could not report the failure to the server: {e}");
    }
    result
}

fn steps(
    server: &mut dyn ControlPlane,
    system: &mut dyn System,
    plan: &DeployPlan,
    inventory: &Inventory,
    env: &DeployEnv,
) -> Result<Deployed, DeployError> {
    let job = DeployJob::from_plan(plan).map_err(DeployError)?;
    if job.image.content == ImageContent::WholeDisk {
        return whole_disk_steps(server, system, plan, &job, inventory);
    }
    let checked = preflight(&job, inventory).map_err(|e| DeployError(format!("refused before writing: {e}")))?;
    // On the console: what told the agent this is the job's machine.
    eprintln!(
        "kiln-agent: the job's machine: {}",
        checked.confirmed.matched.join(", ")
    );
    let layout = checked.plan;
    eprint!("kiln-agent: {layout}");
    lay_out(system, &layout)?;

    let written = write_to(server, system, &job, &layout.root_device)?;
    server
        .report_stage(Stage::BASE_INSTALLED, &written)
        .map_err(fail("reporting stage 2"))?;

    let mounts = mount_target(system, &layout, &env.target)?;
    let ids = fs_ids(system, &layout)?;
    let configured = configure(server, system, plan, &layout, &ids, &env.target)?;
    server
        .report_stage(Stage::CONFIGURED, &configured)
        .map_err(fail("reporting stage 3"))?;

    let boot_disks = install_bootloader(system, plan, &layout, &ids, env)?;
    for mount in mounts.iter().rev() {
        system.run(&argv(&["umount", mount])).map_err(fail("unmounting"))?;
    }
    system.run(&argv(&["sync"])).map_err(fail("syncing"))?;
    server
        .report_stage(
            Stage::FINISHING,
            &format!("bootloader on {}; rebooting", boot_disks.join(", ")),
        )
        .map_err(fail("reporting stage 4"))?;
    Ok(Deployed {
        hostname: plan.hostname.to_string(),
        root_device: layout.root_device.clone(),
        boot_disks,
    })
}

/// Runs `layout`'s commands in order: what deploy mode does before it
/// writes the image, and what `kiln-agent plan --apply` does alone.
pub fn lay_out(system: &mut dyn System, layout: &LayoutPlan) -> Result<(), DeployError> {
    let mut wiped = false;
    for command in &layout.commands {
        // After the old arrays and volume groups are stopped, before the
        // first partition table: the disks' boot code goes (MBR, GPT, a
        // BIOS boot partition's GRUB core), so a deploy that fails from
        // here leaves nothing that boots.
        if !command.may_fail && !wiped {
            for disk in &layout.disks {
                zero_ends(system, &disk.device)?;
            }
            wiped = true;
        }
        for device in devices_needed(&command.argv) {
            system.wait_for_device(device).map_err(fail("laying out the disks"))?;
        }
        match system.run(&command.argv) {
            Ok(_) => {}
            Err(e) if command.may_fail => eprintln!("kiln-agent: ({}) {e}", command.why),
            Err(e) => return Err(DeployError(format!("laying out the disks ({}): {e}", command.why))),
        }
    }
    Ok(())
}

fn fail<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> DeployError {
    move |e| DeployError(format!("{what}: {e}"))
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// Bytes zeroed at a disk's start: MBR, primary GPT and the 1 MiB BIOS
/// boot partition at 1 MiB where GRUB's core image lives.
const ZEROED_HEAD: u64 = 2 << 20;
/// And at its end: the backup GPT.
const ZEROED_TAIL: u64 = 1 << 20;

fn zero_ends(system: &mut dyn System, device: &str) -> Result<(), DeployError> {
    let path = system.device_path(device);
    let failed = |e: std::io::Error| DeployError(format!("wiping the start and end of {device}: {e}"));
    let mut file = OpenOptions::new().write(true).open(&path).map_err(failed)?;
    let size = file.seek(SeekFrom::End(0)).map_err(failed)?;
    let zeros = vec![0u8; ZEROED_HEAD as usize];
    let mut put = |at: u64, len: u64| -> std::io::Result<()> {
        file.seek(SeekFrom::Start(at))?;
        std::io::Write::write_all(&mut file, &zeros[..len as usize])
    };
    put(0, ZEROED_HEAD.min(size)).map_err(failed)?;
    if size > ZEROED_HEAD + ZEROED_TAIL {
        put(size - ZEROED_TAIL, ZEROED_TAIL).map_err(failed)?;
    }
    file.sync_data().map_err(failed)
}

/// Deploys a whole-disk image onto the system disk (see the module's
/// documentation): stages 2 to 4.
fn whole_disk_steps(
    server: &mut dyn ControlPlane,
    system: &mut dyn System,
    plan: &DeployPlan,
    job: &DeployJob,
    inventory: &Inventory,
) -> Result<Deployed, DeployError> {
    let target =
        preflight_whole_disk(job, inventory).map_err(|e| DeployError(format!("refused before writing: {e}")))?;
    let device = target.device.clone();
    eprintln!(
        "kiln-agent: whole-disk image onto {device} (the smallest of the job's disks){}",
        if target.others.is_empty() {
            String::new()
        } else {
            format!("; {} left as they are", target.others.join(", "))
        }
    );
    // Old arrays or volume groups on the disk would hold it open.
    for cleanup in [&["vgchange", "--activate", "n"][..], &["mdadm", "--stop", "--scan"][..]] {
        if let Err(e) = system.run(&argv(cleanup)) {
            eprintln!("kiln-agent: (stopping old volumes) {e}");
        }
    }
    system.wait_for_device(&device).map_err(fail("writing the image"))?;
    // The old boot code and both old GPTs go first: the backup GPT at the
    // disk's end would otherwise outlive the image (which ends earlier).
    zero_ends(system, &device)?;
    let written = write_to(server, system, job, &device)?;
    server
        .report_stage(Stage::BASE_INSTALLED, &written)
        .map_err(fail("reporting stage 2"))?;
    let configured = match finish_whole_disk(server, system, plan, &device) {
        Ok(configured) => configured,
        Err(e) => {
            // The image is on the disk but has no seed: it must not boot
            // (an OS without its configuration), so its boot code and both
            // GPTs go, as after a failed write.
            if let Err(z) = zero_ends(system, &device) {
                eprintln!("kiln-agent: could not make {device} unbootable: {z}");
            }
            return Err(e);
        }
    };
    server
        .report_stage(Stage::CONFIGURED, &configured)
        .map_err(fail("reporting stage 3"))?;
    system.run(&argv(&["sync"])).map_err(fail("syncing"))?;
    server
        .report_stage(
            Stage::FINISHING,
            &format!("the image's own bootloader on {device}; rebooting"),
        )
        .map_err(fail("reporting stage 4"))?;
    Ok(Deployed {
        hostname: plan.hostname.to_string(),
        root_device: device.clone(),
        boot_disks: vec![device],
    })
}

/// After a whole-disk image is written: the backup GPT to the disk's end,
/// the last partition grown, `CIDATA` added and the seed written; the line
/// stage 3 reports.
fn finish_whole_disk(
    server: &mut dyn ControlPlane,
    system: &mut dyn System,
    plan: &DeployPlan,
    device: &str,
) -> Result<String, DeployError> {
    let device = device.to_string();
    system
        .run(&argv(&["sgdisk", "--move-second-header", &device]))
        .map_err(fail("moving the image's backup GPT to the disk's end"))?;
    let path = system.device_path(&device);
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| DeployError(format!("cannot open {}: {e}", path.display())))?;
    let mut head = vec![0u8; GPT_HEAD_BYTES];
    disk.read_exact(&mut head)
        .map_err(|e| DeployError(format!("reading the image's partition table on {device}: {e}")))?;
    let gpt = read_gpt(&head).map_err(|e| DeployError(format!("the image on {device}: {e}")))?;
    let finish = plan_finish(&gpt, &device).map_err(|e| DeployError(format!("the image on {device}: {e}")))?;
    system
        .run(&finish.argv)
        .map_err(fail("growing the image's last partition and adding CIDATA"))?;
    system
        .run(&argv(&["sgdisk", "--verify", &device]))
        .map_err(fail("checking the partition table"))?;

    // The seed, written through the disk's own node at the partition's
    // offset: no partition node has to appear (no udev in the ramdisk).
    let seed = fetch_seed(server, plan)?;
    let (offset, len) = finish.cidata_bytes();
    write_cidata(&mut Window::new(&mut disk, offset, len), &seed)
        .map_err(|e| DeployError(format!("writing the NoCloud seed: {e}")))?;
    disk.sync_all()
        .map_err(|e| DeployError(format!("syncing {device}: {e}")))?;
    drop(disk);
    let names: Vec<&str> = seed.iter().map(|(name, _)| *name).collect();
    Ok(format!(
        "configured: {finish}, with the NoCloud seed ({})",
        names.join(", ")
    ))
}

/// Streams the image onto `device` (the layout's root volume, or a whole
/// disk); the line stage 2 reports.
fn write_to(
    server: &mut dyn ControlPlane,
    system: &mut dyn System,
    job: &DeployJob,
    device: &str,
) -> Result<String, DeployError> {
    system.wait_for_device(device).map_err(fail("writing the image"))?;
    let (source, file_bytes) = server.open(&job.image.url).map_err(fail("fetching the image"))?;
    let path = system.device_path(device);
    let mut file = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| DeployError(format!("cannot open {}: {e}", path.display())))?;
    let is_device = file.metadata().is_ok_and(|m| m.file_type().is_block_device());
    let target_bytes = if is_device {
        Some(file.seek(SeekFrom::End(0)).map_err(fail("sizing the root device"))?)
    } else {
        None
    };
    let expected = ExpectedImage {
        format: job.image.format,
        sha256: job.image.sha256,
        file_bytes,
    };
    let options = WriteOptions {
        target_bytes,
        // The layout's `lvcreate --zero=y` zeroes only the start.
        target_is_zeroed: false,
        progress_every: Duration::from_secs(5),
        ..WriteOptions::default()
    };
    let mut show = |p: &Progress| {
        let percent = p.percent().map(|x| format!(" ({x:.0}%)")).unwrap_or_default();
        eprintln!(
            "kiln-agent: image: {:.0} MiB written{percent}, {:.1} MiB/s",
            p.written_bytes as f64 / 1048576.0,
            p.rate_bytes_per_sec() / 1048576.0
        );
    };
    let mut target = SyncOnFlush(file);
    let report = write_image(source, &mut target, &expected, &options, &mut show)
        .map_err(|e| DeployError(format!("writing the image to {device}: {e}")))?;
    let secs = report.elapsed.as_secs_f64().max(0.001);
    Ok(format!(
        "image written to {device}: {} MiB of {} in {secs:.1} s ({:.1} MiB/s), sha256 checked",
        report.image_bytes >> 20,
        report.format,
        report.image_bytes as f64 / 1048576.0 / secs
    ))
}

/// Mounts the new root at `target`, moves the image's `/boot` onto the
/// layout's `/boot` filesystem and mounts it (and the ESP) in place.
/// Gives the mount points, outermost first.
fn mount_target(system: &mut dyn System, layout: &LayoutPlan, target: &Path) -> Result<Vec<String>, DeployError> {
    let t = target.display().to_string();
    mkdir(target)?;
    system
        .run(&argv(&["mount", &layout.root_device, &t]))
        .map_err(fail("mounting the new root"))?;
    let mut mounts = vec![t.clone()];
    let mounted_at = |mountpoint: &str| {
        layout
            .filesystems
            .iter()
            .find(|f| f.mountpoint.as_deref() == Some(mountpoint))
    };
    if let Some(boot) = mounted_at("/boot") {
        // The image's kernels and initrds go onto the layout's /boot.
        let staging = format!("{t}.boot");
        mkdir(Path::new(&staging))?;
        system
            .run(&argv(&["mount", &boot.device, &staging]))
            .map_err(fail("mounting /boot"))?;
        let image_boot = target.join("boot");
        if image_boot.is_dir() {
            system
                .run(&argv(&["cp", "-a", &format!("{}/.", image_boot.display()), &staging]))
                .map_err(fail("copying the image's /boot"))?;
            empty_dir(&image_boot)?;
        }
        system
            .run(&argv(&["umount", &staging]))
            .map_err(fail("unmounting /boot"))?;
        mkdir(&image_boot)?;
        let at = image_boot.display().to_string();
        system
            .run(&argv(&["mount", &boot.device, &at]))
            .map_err(fail("mounting /boot"))?;
        mounts.push(at);
    }
    if let Some(esp) = mounted_at("/boot/efi") {
        let at = target.join("boot/efi");
        mkdir(&at)?;
        let at = at.display().to_string();
        system
            .run(&argv(&["mount", &esp.device, &at]))
            .map_err(fail("mounting the ESP"))?;
        mounts.push(at);
    }
    Ok(mounts)
}

fn mkdir(path: &Path) -> Result<(), DeployError> {
    fs::create_dir_all(path).map_err(|e| DeployError(format!("cannot create {}: {e}", path.display())))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), DeployError> {
    if let Some(parent) = path.parent() {
        mkdir(parent)?;
    }
    fs::write(path, text)
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(mode)))
        .map_err(|e| DeployError(format!("cannot write {}: {e}", path.display())))
}

fn empty_dir(dir: &Path) -> Result<(), DeployError> {
    let cannot = |e: std::io::Error| DeployError(format!("cannot empty {}: {e}", dir.display()));
    for entry in fs::read_dir(dir).map_err(cannot)? {
        let path = entry.map_err(cannot)?.path();
        if path.is_dir() && !path.is_symlink() {
            fs::remove_dir_all(&path).map_err(cannot)?;
        } else {
            fs::remove_file(&path).map_err(cannot)?;
        }
    }
    Ok(())
}

/// A filesystem's UUID and type, from `blkid`.
fn blkid(system: &mut dyn System, device: &str) -> Result<(String, String), DeployError> {
    let mut tag = |name: &str| -> Result<String, DeployError> {
        let out = system
            .run(&argv(&["blkid", "-s", name, "-o", "value", device]))
            .map_err(fail("reading filesystem ids"))?;
        let value = out.trim().to_string();
        if value.is_empty() {
            return Err(DeployError(format!("{device} has no filesystem {name}")));
        }
        Ok(value)
    };
    Ok((tag("UUID")?, tag("TYPE")?))
}

/// UUID and type of the new root and of every filesystem the layout made,
/// by device: read once, for fstab and for GRUB.
type FsIds = BTreeMap<String, (String, String)>;

fn fs_ids(system: &mut dyn System, layout: &LayoutPlan) -> Result<FsIds, DeployError> {
    let mut ids = FsIds::new();
    let devices = std::iter::once(&layout.root_device).chain(layout.filesystems.iter().map(|f| &f.device));
    for device in devices {
        if !ids.contains_key(device) {
            let found = blkid(system, device)?;
            ids.insert(device.clone(), found);
        }
    }
    Ok(ids)
}

/// Writes the new OS's configuration under `target`; the line stage 3
/// reports.
fn configure(
    server: &mut dyn ControlPlane,
    system: &mut dyn System,
    plan: &DeployPlan,
    layout: &LayoutPlan,
    ids: &FsIds,
    target: &Path,
) -> Result<String, DeployError> {
    let mut done = vec![];
    // fstab: the layout is kiln's, so the image's fstab cannot know it.
    let (root_uuid, root_type) = &ids[&layout.root_device];
    let mut fstab = format!(
        "# Written by kiln-agent for job {}\nUUID={root_uuid} / {root_type} defaults 0 1\n",
        plan.job_id
    );
    for fs in &layout.filesystems {
        let line = match (fs.kind, fs.mountpoint.as_deref()) {
            (FsKind::Swap, _) => Some(("none", "swap", "sw", 0)),
            (FsKind::Ext4, Some(at)) => Some((at, "ext4", "defaults", 2)),
            (FsKind::Vfat, Some(at)) => Some((at, "vfat", "umask=0077", 1)),
            _ => None,
        };
        if let Some((at, kind, options, pass)) = line {
            // A mount point the image lacks (lvm_raid10s's /data).
            if at.starts_with('/') {
                mkdir(&target.join(at.trim_start_matches('/')))?;
            }
            let (uuid, _) = &ids[&fs.device];
            let _ = writeln!(fstab, "UUID={uuid} {at} {kind} {options} 0 {pass}");
        }
    }
    write(&target.join("etc/fstab"), &fstab, 0o644)?;
    done.push("fstab");

    let hostname = plan.hostname.to_string();
    write(&target.join("etc/hostname"), &format!("{hostname}\n"), 0o644)?;
    let hosts_path = target.join("etc/hosts");
    let hosts = fs::read_to_string(&hosts_path).unwrap_or_else(|_| "127.0.0.1 localhost\n".into());
    write(&hosts_path, &with_host_line(&hosts, &hostname), 0o644)?;
    done.push("hostname");

    // cloud-init's NoCloud seed: the new OS's first boot configures users,
    // keys and network from it, and phones home (stage 5).
    let seed = target.join("var/lib/cloud/seed/nocloud");
    for (name, text) in fetch_seed(server, plan)? {
        write(&seed.join(name), &text, 0o600)?;
    }
    done.push("cloud-init seed");

    // Also straight into the image, for OSes without cloud-init.
    if let Some(hash) = &plan.root_password_hash {
        let shadow_path = target.join("etc/shadow");
        if let Ok(shadow) = fs::read_to_string(&shadow_path) {
            write(&shadow_path, &with_root_hash(&shadow, hash.as_str()), 0o640)?;
            done.push("root password");
        }
    }
    if !plan.ssh_keys.is_empty() {
        let keys: Vec<String> = plan.ssh_keys.iter().map(|k| k.as_str().to_string()).collect();
        let path = target.join("root/.ssh/authorized_keys");
        let old = fs::read_to_string(&path).unwrap_or_default();
        write(&path, &with_keys(&old, &keys), 0o600)?;
        fs::set_permissions(target.join("root/.ssh"), fs::Permissions::from_mode(0o700))
            .map_err(|e| DeployError(format!("cannot set the mode of /root/.ssh: {e}")))?;
        done.push("SSH keys");
    }
    if !layout.arrays.is_empty() {
        let scan = system
            .run(&argv(&["mdadm", "--detail", "--scan"]))
            .map_err(fail("listing the md arrays"))?;
        write(&target.join("etc/mdadm/mdadm.conf"), &scan, 0o644)?;
        done.push("mdadm.conf");
    }
    Ok(format!("configured: {}", done.join(", ")))
}

/// The new OS's cloud-init NoCloud seed, as (file name, contents): what
/// goes into `/var/lib/cloud/seed/nocloud` of a filesystem image, or onto
/// a `CIDATA` filesystem beside a whole-disk image.
fn fetch_seed(server: &mut dyn ControlPlane, plan: &DeployPlan) -> Result<Vec<(&'static str, String)>, DeployError> {
    let mut files = vec![];
    let network = plan.network_config_url.as_ref().map(|url| ("network-config", url));
    for (name, url) in [("user-data", &plan.user_data_url), ("meta-data", &plan.meta_data_url)]
        .into_iter()
        .chain(network)
    {
        let text = fetch_text(server, url).map_err(|e| DeployError(format!("fetching the {name} seed: {e}")))?;
        files.push((name, text));
    }
    Ok(files)
}

fn fetch_text(server: &mut dyn ControlPlane, url: &str) -> Result<String, String> {
    let (reader, _) = server.open(url).map_err(|e| e.to_string())?;
    let mut text = String::new();
    reader
        .take(1 << 20)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    Ok(text)
}

/// `hosts` with a `127.0.1.1 HOSTNAME` line (Debian's convention), in
/// place of an old one.
pub fn with_host_line(hosts: &str, hostname: &str) -> String {
    let mut out: String = hosts
        .lines()
        .filter(|l| !l.starts_with("127.0.1.1"))
        .map(|l| format!("{l}\n"))
        .collect();
    let _ = writeln!(out, "127.0.1.1 {hostname}");
    out
}

/// `shadow` with root's password field set to `hash`.
pub fn with_root_hash(shadow: &str, hash: &str) -> String {
    shadow
        .lines()
        .map(|line| match line.split_once(':') {
            Some(("root", rest)) => {
                let rest = rest.split_once(':').map_or("", |(_, after)| after);
                format!("root:{hash}:{rest}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect()
}

/// `old` authorized_keys with `keys` added once each.
pub fn with_keys(old: &str, keys: &[String]) -> String {
    let mut out = old.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    for key in keys {
        if !old.lines().any(|l| l.trim() == key.trim()) {
            out.push_str(key.trim());
            out.push('\n');
        }
    }
    out
}

/// The kernel and initrd in a `/boot` listing: the newest versioned pair
/// (`vmlinuz-6.1.0-21-amd64` + `initrd.img-…` or `initramfs-….img`), or
/// plain `vmlinuz` + `initrd.img`.
pub fn find_kernel(names: &[String]) -> Option<(String, Option<String>)> {
    let mut versions: Vec<&str> = names.iter().filter_map(|n| n.strip_prefix("vmlinuz-")).collect();
    versions.sort_by_key(|v| version_key(v));
    if let Some(v) = versions.last() {
        let initrd = [format!("initrd.img-{v}"), format!("initramfs-{v}.img")]
            .into_iter()
            .find(|i| names.contains(i));
        return Some((format!("vmlinuz-{v}"), initrd));
    }
    names.iter().any(|n| n == "vmlinuz").then(|| {
        let initrd = names.iter().find(|n| *n == "initrd.img").cloned();
        ("vmlinuz".to_string(), initrd)
    })
}

/// Numbers compare as numbers: `6.1.0-21` after `6.1.0-9`.
fn version_key(v: &str) -> Vec<(u64, String)> {
    v.split(|c: char| !c.is_ascii_alphanumeric())
        .map(|part| (part.parse::<u64>().unwrap_or(0), part.to_string()))
        .collect()
}

/// What GRUB is told to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub title: String,
    /// The `/boot` filesystem's UUID: GRUB finds its files there.
    pub boot_uuid: String,
    /// `/boot` is an md array (GRUB needs `mdraid1x`).
    pub boot_on_md: bool,
    pub kernel: String,
    pub initrd: Option<String>,
    /// The kernel's command line, `root=` first.
    pub args: Vec<String>,
    /// Also talk on the first serial port (the args name `ttyS0`).
    pub serial: bool,
}

/// `grub.cfg` for `entry`. Paths are relative to `/boot`: every layout
/// gives `/boot` its own filesystem.
pub fn grub_cfg(entry: &BootEntry, job: &str) -> String {
    let mut s = format!("# Written by kiln-agent for job {job}.\nset timeout=2\nset default=0\n");
    if entry.serial {
        s.push_str("serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n");
    }
    s.push_str("insmod part_gpt\n");
    if entry.boot_on_md {
        s.push_str("insmod mdraid1x\n");
    }
    s.push_str("insmod ext2\n");
    let _ = writeln!(s, "search --no-floppy --fs-uuid --set=root {}", entry.boot_uuid);
    let _ = writeln!(s, "menuentry '{}' {{", entry.title.replace('\'', ""));
    let _ = writeln!(s, "    linux /{} {}", entry.kernel, entry.args.join(" "));
    if let Some(initrd) = &entry.initrd {
        let _ = writeln!(s, "    initrd /{initrd}");
    }
    s.push_str("}\n");
    s
}

/// `root=` for the root device: the device-mapper name of an LVM volume
/// (an initramfs activates what it names), else the filesystem's UUID.
pub fn root_arg(root_device: &str, root_uuid: &str) -> String {
    match root_device.strip_prefix("/dev/").and_then(|r| r.split_once('/')) {
        Some((vg, lv)) if !vg.is_empty() && !lv.contains('/') => {
            format!("root=/dev/mapper/{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
        }
        _ => format!("root=UUID={root_uuid}"),
    }
}

/// GRUB on every disk of the layout and its `grub.cfg`; gives the disks.
fn install_bootloader(
    system: &mut dyn System,
    plan: &DeployPlan,
    layout: &LayoutPlan,
    ids: &FsIds,
    env: &DeployEnv,
) -> Result<Vec<String>, DeployError> {
    let target = &env.target;
    let boot_dir = target.join("boot");
    let names: Vec<String> = fs::read_dir(&boot_dir)
        .map_err(|e| DeployError(format!("cannot read the new /boot: {e}")))?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
        .collect();
    let (kernel, initrd) = find_kernel(&names).ok_or_else(|| {
        DeployError(format!(
            "the image has no kernel in /boot (found: {}): kiln needs vmlinuz-VERSION or vmlinuz",
            if names.is_empty() {
                "nothing".into()
            } else {
                names.join(", ")
            }
        ))
    })?;
    let boot_fs = layout
        .filesystems
        .iter()
        .find(|f| f.mountpoint.as_deref() == Some("/boot"))
        .ok_or_else(|| DeployError("the layout has no /boot filesystem".into()))?;
    let (boot_uuid, _) = ids[&boot_fs.device].clone();
    let (root_uuid, _) = &ids[&layout.root_device];
    let mut args = vec![root_arg(&layout.root_device, root_uuid), "ro".to_string()];
    args.extend(env.kernel_args.iter().cloned());
    let entry = BootEntry {
        title: format!("{} (kiln)", plan.hostname),
        boot_uuid,
        boot_on_md: boot_fs.device.starts_with("/dev/md"),
        kernel,
        initrd,
        serial: env.kernel_args.iter().any(|a| a.starts_with("console=ttyS")),
        args,
    };
    let boot = boot_dir.display().to_string();
    let disks: Vec<String> = layout.boot_disks().map(|d| d.device.clone()).collect();
    match layout.firmware {
        Firmware::Bios => {
            for disk in &disks {
                system
                    .run(&argv(&[
                        "grub-install",
                        "--target=i386-pc",
                        &format!("--boot-directory={boot}"),
                        disk,
                    ]))
                    .map_err(fail("installing GRUB"))?;
            }
        }
        Firmware::Uefi => {
            let efi = target.join("boot/efi").display().to_string();
            system
                .run(&argv(&[
                    "grub-install",
                    "--target=x86_64-efi",
                    &format!("--efi-directory={efi}"),
                    &format!("--boot-directory={boot}"),
                    "--removable",
                    "--no-nvram",
                ]))
                .map_err(fail("installing GRUB"))?;
            // Every other ESP gets the same files, so any disk boots.
            let others = layout
                .filesystems
                .iter()
                .filter(|f| f.kind == FsKind::Vfat && f.mountpoint.is_none());
            for esp in others {
                let at = format!("{}.esp", target.display());
                mkdir(Path::new(&at))?;
                system
                    .run(&argv(&["mount", &esp.device, &at]))
                    .map_err(fail("mounting an ESP"))?;
                system
                    .run(&argv(&["cp", "-a", &format!("{efi}/."), &at]))
                    .map_err(fail("copying the ESP"))?;
                system.run(&argv(&["umount", &at])).map_err(fail("unmounting an ESP"))?;
            }
            nvram_entries(system, plan.hostname.as_str(), layout);
        }
    }
    write(
        &boot_dir.join("grub/grub.cfg"),
        &grub_cfg(&entry, &plan.job_id.to_string()),
        0o644,
    )?;
    Ok(disks)
}

/// What the agent's NVRAM boot entries are called: `HOST (kiln, DISK)`.
/// Every entry whose label has `(kiln` is one of kiln's and is replaced on
/// the next reimage, so entries do not pile up.
fn nvram_label(hostname: &str, disk: &str) -> String {
    format!("{hostname} (kiln, {})", disk.trim_start_matches("/dev/"))
}

/// The boot numbers (`0004`) of kiln's entries in `efibootmgr`'s listing
/// (`Boot0004* web1 (kiln, vda)\tHD(…)`; the device path is printed by
/// efibootmgr 18, not 17).
pub fn kiln_entries(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Boot")?;
            let (num, label) = rest.split_at_checked(4)?;
            if !num.chars().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            let label = label.strip_prefix('*').unwrap_or(label);
            let label = label.split('\t').next().unwrap_or_default();
            label.contains("(kiln").then(|| num.to_string())
        })
        .collect()
}

/// The installed OS as named UEFI boot entries, one per ESP, the first
/// disk's first in `BootOrder` (`efibootmgr --create` puts the entry it
/// makes first, so they are made last disk first). A one-shot network boot
/// (`BootNext`, which a BMC's "PXE once" sets) is taken before `BootOrder`
/// and is left alone, so it still wins. Best effort: every ESP already
/// holds GRUB at the removable path (`\EFI\BOOT\BOOTX64.EFI`), which
/// firmware boots without an entry, so a machine whose variables cannot be
/// written (no efivarfs, a firmware that refuses) still boots; the reason
/// is printed on the console.
fn nvram_entries(system: &mut dyn System, hostname: &str, layout: &LayoutPlan) {
    let esps: Vec<(String, u32)> = layout
        .disks
        .iter()
        .flat_map(|d| {
            d.partitions
                .iter()
                .filter(|p| p.kind == crate::layout::PartitionKind::Esp)
                .map(|p| (d.device.clone(), p.number))
        })
        .collect();
    let result = (|| -> Result<(), DeployError> {
        let listing = system
            .run(&argv(&["efibootmgr"]))
            .map_err(fail("reading the UEFI boot entries"))?;
        for num in kiln_entries(&listing) {
            system
                .run(&argv(&["efibootmgr", "--quiet", "--bootnum", &num, "--delete-bootnum"]))
                .map_err(fail("removing an old kiln boot entry"))?;
        }
        for (disk, part) in esps.iter().rev() {
            system
                .run(&argv(&[
                    "efibootmgr",
                    "--quiet",
                    "--create",
                    "--disk",
                    disk,
                    "--part",
                    &part.to_string(),
                    "--label",
                    &nvram_label(hostname, disk),
                    "--loader",
                    "\\EFI\\BOOT\\BOOTX64.EFI",
                ]))
                .map_err(fail("writing the UEFI boot entry"))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("kiln-agent: no NVRAM boot entry ({e}); the disks boot by GRUB's removable path");
    }
}

#[cfg(test)]
mod tests;
