//! `kiln ramdisk build` for real (Debian packages through the host's apt,
//! the static agent), then the ramdisk under QEMU (software emulation,
//! direct -kernel/-initrd boot): discovery runs the agent and powers off by
//! itself; `root=` boots the test OS (scripts/make-test-os-image.sh) from a
//! plain disk with kiln-boot's real user-data, whose first-boot script runs
//! the job's script there, reports stage 5 and calls the callback (a
//! listener here), and from LVM on md RAID 1 as `lvm_raid1` lays it out.
//! Serial consoles are asserted on; QEMU is stopped by PID.
//!
//! The static agent: `KILN_TEST_STATIC_AGENT` (scripts/test builds it once
//! before the tests), else built here with the documented command.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// One VM at a time: software emulation on two cores is slow enough.
static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Built {
    /// vmlinuz and kiln-agent.cpio.gz.
    out: PathBuf,
    stdout: String,
}

/// `kiln ramdisk build`, once per test process, into target/tmp/ramdisk-out.
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        // One fixed directory, replaced by each run (not one per process,
        // which would pile up 27 MB a run).
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ramdisk-out");
        let _ = std::fs::remove_dir_all(&out);
        let t = Instant::now();
        let stdout = build_ramdisk(&out);
        eprintln!("kiln ramdisk build ({:.1} s):\n{stdout}", t.elapsed().as_secs_f64());
        Built { out, stdout }
    })
}

fn need_tools() {
    require_root_and(&[
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("busybox", "busybox-static"),
        ("mkfs.ext4", "e2fsprogs"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ]);
}

/// The archive unpacked into `dir` (busybox cpio: no device nodes needed).
fn unpack(archive: &Path, dir: &Path) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && gzip -dc {} | busybox cpio -id 2>&1",
            dir.display(),
            archive.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "cpio: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn a_dynamically_linked_agent_is_refused_with_the_static_build_command() {
    let dir = tempfile::tempdir().unwrap();
    // The kiln binary itself is dynamically linked.
    let out = Command::new(KILN)
        .args(["ramdisk", "build", "--agent", KILN, "--out"])
        .arg(dir.path())
        .arg("--cache")
        .arg(dir.path().join("cache"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dynamically linked"), "{err}");
    assert!(
        err.contains("RUSTFLAGS='-C target-feature=+crt-static' cargo build -p kiln-agent --release --target x86_64-unknown-linux-gnu"),
        "{err}"
    );
    assert!(!dir.path().join("kiln-agent.cpio.gz").exists());
}

#[test]
fn the_ramdisk_holds_the_agent_the_tools_and_every_library_they_need() {
    need_tools();
    let b = built();
    assert!(b.stdout.contains("vmlinuz"), "{}", b.stdout);
    assert!(b.stdout.contains("kiln-agent.cpio.gz"), "{}", b.stdout);
    assert!(b.stdout.contains("written to"), "{}", b.stdout);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    unpack(&b.out.join("kiln-agent.cpio.gz"), root);
    let kver = std::fs::read_dir(root.join("usr/lib/modules"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .into_string()
        .unwrap();
    let m = format!("usr/lib/modules/{kver}");
    for path in [
        "init".to_string(),
        "usr/bin/kiln-agent".into(),
        "usr/bin/busybox".into(),
        "usr/sbin/lvm".into(),
        "usr/sbin/vgchange".into(),
        "usr/sbin/mdadm".into(),
        "usr/sbin/sgdisk".into(),
        "usr/sbin/wipefs".into(),
        "usr/sbin/sfdisk".into(),
        "usr/sbin/mkfs.ext4".into(),
        "usr/sbin/mkfs.vfat".into(),
        "usr/sbin/grub-install".into(),
        "usr/sbin/grub-bios-setup".into(),
        "usr/bin/efibootmgr".into(),
        "usr/lib/grub/i386-pc/boot.img".into(),
        "usr/lib/grub/x86_64-efi/kernel.img".into(),
        "etc/lvm/lvm.conf".into(),
        "etc/mke2fs.conf".into(),
        "etc/kiln/udhcpc.script".into(),
        format!("{m}/modules.dep"),
        format!("{m}/modules.alias"),
        format!("{m}/kernel/drivers/net/virtio_net.ko"),
        format!("{m}/kernel/drivers/block/virtio_blk.ko"),
        format!("{m}/kernel/drivers/nvme/host/nvme.ko"),
        format!("{m}/kernel/drivers/md/raid1.ko"),
        format!("{m}/kernel/drivers/md/dm-mod.ko"),
        format!("{m}/kernel/fs/ext4/ext4.ko"),
        format!("{m}/kernel/drivers/net/ethernet/intel/ixgbe/ixgbe.ko"),
        format!("{m}/kernel/drivers/net/ethernet/mellanox/mlx5/core/mlx5_core.ko"),
    ] {
        assert!(
            root.join(&path).symlink_metadata().is_ok(),
            "{path} is missing from the ramdisk"
        );
    }
    let init = std::fs::read_to_string(root.join("init")).unwrap();
    assert!(init.contains("kiln-agent run"));
    // A UEFI deploy mounts the ESP it makes (FAT: its code page and the
    // `ascii` I/O charset Debian's kernel mounts FAT with; without
    // nls_ascii, "FAT-fs: IO charset ascii not found") and writes the NVRAM
    // boot entry through efivarfs, which init mounts.
    let dep = std::fs::read_to_string(root.join(format!("{m}/modules.dep"))).unwrap();
    let listed = std::fs::read_to_string(root.join("etc/kiln/modules")).unwrap();
    for (module, ko) in [
        ("vfat", "kernel/fs/fat/vfat.ko"),
        ("nls_cp437", "kernel/fs/nls/nls_cp437.ko"),
        ("nls_ascii", "kernel/fs/nls/nls_ascii.ko"),
        ("efivarfs", "kernel/fs/efivarfs/efivarfs.ko"),
    ] {
        assert!(
            listed.lines().any(|l| l == module),
            "{module} is not in the modules init loads:\n{listed}"
        );
        assert!(
            dep.lines().any(|l| l.starts_with(&format!("{ko}:"))),
            "{ko} is not in modules.dep"
        );
        assert!(root.join(format!("{m}/{ko}")).is_file(), "{ko} is missing");
    }
    assert!(
        init.contains("mount -t efivarfs efivarfs /sys/firmware/efi/efivars"),
        "init does not mount efivarfs"
    );
    // modprobe finds a module's dependencies: ext4 needs jbd2 and mbcache.
    let ext4 = dep.lines().find(|l| l.starts_with("kernel/fs/ext4/ext4.ko:")).unwrap();
    assert!(ext4.contains("jbd2.ko") && ext4.contains("mbcache.ko"), "{ext4}");

    // Every dynamic program finds all its libraries in the ramdisk (the
    // loader says "not found" otherwise), and the tools run there.
    let loader = "/usr/lib64/ld-linux-x86-64.so.2";
    let mut checked = 0;
    for bindir in ["usr/bin", "usr/sbin", "usr/lib/grub/i386-pc"] {
        for e in std::fs::read_dir(root.join(bindir)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_symlink() || !e.file_type().unwrap().is_file() {
                continue;
            }
            let mut magic = [0u8; 20];
            let n = std::fs::File::open(e.path()).unwrap().read(&mut magic).unwrap();
            // 64-bit ELF executables and shared objects only (not GRUB's
            // 32-bit modules or relocatable objects).
            if n < 20 || &magic[..4] != b"\x7fELF" || magic[4] != 2 || !matches!(magic[16], 2 | 3) {
                continue;
            }
            let inside = format!("/{bindir}/{}", e.file_name().to_string_lossy());
            let out = Command::new("chroot")
                .arg(root)
                .args([loader, "--list", &inside])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            // A static binary: the loader says so and exits non-zero.
            if inside.ends_with("/busybox") || inside.ends_with("/kiln-agent") {
                continue;
            }
            assert!(
                out.status.success(),
                "{inside}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!text.contains("not found"), "{inside} misses libraries:\n{text}");
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} dynamic programs checked");
    for cmd in [
        "lvm version",
        "mdadm --version",
        "sgdisk --version",
        "grub-install --version",
        "grub-probe --version",
        "grub-mkimage --version",
        "grub-bios-setup --version",
        "mkfs.ext4 -V",
        "e2fsck -V",
        "wipefs --version",
        "blkid -V",
        "sfdisk --version",
        "mkswap --version",
        "blockdev --version",
        "efibootmgr --version",
        "kiln-agent --help",
    ] {
        // Run as the agent runs them: exec'd through PATH, not through
        // busybox sh (which runs its own "nofork" applets, such as
        // blockdev, ahead of PATH).
        let out = Command::new("chroot")
            .arg(root)
            .args(cmd.split_whitespace())
            .env("PATH", "/usr/sbin:/usr/bin")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "`{cmd}` in the ramdisk failed: {text}");
        assert!(
            !text.contains("BusyBox"),
            "`{cmd}` ran busybox's applet, not the real tool: {text}"
        );
    }
}

#[test]
fn a_second_build_with_a_warm_cache_is_quick_and_identical() {
    need_tools();
    let b = built();
    let out = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let o = run(Command::new(KILN)
        .args(["ramdisk", "build", "-o", "json", "--agent"])
        .arg(static_agent())
        .arg("--out")
        .arg(out.path())
        .arg("--cache")
        .arg(ramdisk_cache()));
    let secs = t.elapsed().as_secs_f64();
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["packages_downloaded"], 0, "{report}");
    for name in ["vmlinuz", "kiln-agent.cpio.gz"] {
        assert!(
            std::fs::read(b.out.join(name)).unwrap() == std::fs::read(out.path().join(name)).unwrap(),
            "{name} differs between two builds of the same inputs"
        );
    }
    // No temporary file is left beside the outputs.
    let names: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    eprintln!("warm build: {secs:.1} s; {report}");
    assert!(secs < 120.0, "a warm build took {secs:.0} s");
}

/// QEMU with a serial console in `dir`; `extra` adds disks and NICs.
fn qemu(dir: &Path, name: &str, kernel: &Path, initrd: &Path, append: &str, extra: &[String]) -> Proc {
    let console = dir.join(format!("{name}.console"));
    let child = Command::new("qemu-system-x86_64")
        .args(["-name", name, "-accel", "tcg", "-machine", "pc", "-cpu", "qemu64"])
        .args(["-smp", "1", "-m", "512", "-display", "none", "-vga", "none"])
        .args(["-monitor", "none", "-nodefaults", "-no-reboot"])
        .args(["-serial", &format!("file:{}", console.display())])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &format!("console=ttyS0 {append}")])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.qemu.log"))).unwrap())
        .spawn()
        .unwrap();
    Proc { child, log: console }
}

fn console(vm: &Proc) -> String {
    strip_ansi(&std::fs::read(&vm.log).unwrap_or_default())
}

/// Waits for `needle` on the console; panics with the console otherwise.
fn wait_console(vm: &Proc, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = console(vm);
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "`{needle}` did not appear within {timeout:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits for QEMU to exit by itself (the guest powered off; -no-reboot).
fn wait_exit(vm: &mut Proc, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if vm.child.try_wait().unwrap().is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU still runs after {timeout:?}:\n{}",
            console(vm)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn discovery_loads_modules_runs_the_agent_and_powers_off() {
    need_tools();
    let b = built();
    let dir = tempfile::tempdir().unwrap();
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    // A NIC on QEMU's restricted user network: DHCP answers, nothing
    // beyond is reachable. BOOTIF names it.
    let mut vm = qemu(
        dir.path(),
        "discover",
        &b.out.join("vmlinuz"),
        &b.out.join("kiln-agent.cpio.gz"),
        "kiln.mode=discover kiln.server=http://192.0.2.1:9 BOOTIF=01-52-54-00-12-34-56",
        &[
            "-nic".into(),
            "user,model=virtio-net-pci,restrict=on,mac=52:54:00:12:34:56".into(),
        ],
    );
    wait_exit(&mut vm, Duration::from_secs(240));
    let text = console(&vm);
    for needle in [
        "kiln-init: started",
        "kiln-init: kiln.mode=discover",
        "kiln-init: dhcp on eth0 (BOOTIF 52:54:00:12:34:56)",
        "kiln-init: dhcp on eth0: 10.0.2.15/24",
        "kiln-init: running kiln-agent",
        "kiln-init: powering off",
        "reboot: Power down",
    ] {
        assert!(text.contains(needle), "`{needle}` is not on the console:\n{text}");
    }
    let loaded = text
        .lines()
        .find(|l| l.starts_with("kiln-init: modules loaded:"))
        .unwrap();
    // "modules loaded: N of M": all but in-band IPMI (no BMC here).
    let n: usize = loaded.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(n >= 25, "{loaded}");
    // The agent reached the kernel command line and said what it did.
    assert!(text.contains("kiln-agent"), "{text}");
    assert!(
        text.contains("kiln-init: kiln-agent done") || text.contains("kiln-init: kiln-agent failed (exit"),
        "{text}"
    );
}

/// One HTTP request read by a listener (headers and body), answered 204;
/// panics with the VM's console if none comes.
fn accept_one(listener: &TcpListener, timeout: Duration, vm: &Proc) -> String {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    let (stream, _) = loop {
        match listener.accept() {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no request within {timeout:?}:\n{}",
                    console(vm)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        let end = line == "\r\n" || line.is_empty();
        head.push_str(&line);
        if end {
            break;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    let mut stream = reader.into_inner();
    stream
        .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        .unwrap();
    format!("{head}{}", String::from_utf8_lossy(&body))
}

fn test_os_image(b: &Built, dir: &Path, user_data: Option<&Path>) -> PathBuf {
    let mut cmd = Command::new(workspace().join("scripts/make-test-os-image.sh"));
    cmd.arg("--artifacts").arg(&b.out);
    if let Some(u) = user_data {
        cmd.arg("--user-data").arg(u);
    }
    let out = run(cmd.arg(dir));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sha256"), "{text}");
    let image = dir.join("kiln-test-os.ext4");
    let sum = std::fs::read_to_string(dir.join("kiln-test-os.ext4.sha256")).unwrap();
    assert!(
        sum.ends_with("  kiln-test-os.ext4\n") && sum.len() == 64 + 2 + 17 + 1,
        "{sum}"
    );
    assert!(std::fs::metadata(&image).unwrap().len() <= 128 << 20);
    image
}

/// kiln-boot's own cloud-init user-data (the template the server renders
/// for a disk-image job) for machine `testvm1`, a job whose stage URL and
/// callback are on `base`, and post-install script `script`.
fn rendered_user_data(base: &str, job: &str, token: &str, script: &str) -> String {
    use kiln_boot::templates::{InstallPlan, TemplateContext, TemplateKind, render};
    use kiln_types::catalog::{Arch, OsImage, OsKind};
    use kiln_types::machine::{Machine, MachineKind, MachineState};
    let machine = Machine::sketch("testvm1", MachineKind::Physical, MachineState::Ready);
    let os = OsImage {
        id: kiln_types::OsImageId::new(),
        name: "testos".into(),
        version: "1".into(),
        arch: Arch::X86_64,
        kind: OsKind::DiskImage,
        tags: vec![],
        min_ram_bytes: 0,
        min_disk_bytes: 0,
        source: "kiln-test-os.ext4".into(),
        sha256: None,
        format: Default::default(),
        content: Default::default(),
        templates: Default::default(),
        created_at: chrono::Utc::now(),
    };
    let plan = InstallPlan {
        job_id: job.into(),
        token: kiln_types::Secret::new(token),
        hostname: None,
        layout: None,
        ssh_keys: vec![],
        root_password_hash: None,
        post_install_script: Some(script.into()),
        callback_url: Some(format!("{base}/cb")),
    };
    let ctx = TemplateContext::new(&machine, &os, &plan, base).unwrap();
    render(TemplateKind::UserData, None, &ctx).unwrap()
}

/// The test OS runs kiln-boot's real user-data through its cloud-init
/// subset: the job's script runs in the VM, kiln's first-boot script
/// reports stage 5 with its exit status and output, then calls the
/// callback with JSON — both requests from the VM.
#[test]
fn root_boots_the_test_os_which_runs_the_script_reports_stage_5_and_calls_back() {
    need_tools();
    let b = built();
    let dir = tempfile::tempdir().unwrap();
    // The stage URL and the callback point at this listener through QEMU's
    // user network (10.0.2.2 is the host's loopback there).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let base = format!("http://10.0.2.2:{port}");
    let job = "01900000-0000-7000-8000-000000000005";
    let user_data = dir.path().join("user-data");
    std::fs::write(
        &user_data,
        rendered_user_data(
            &base,
            job,
            "tok-5a5a",
            "#!/bin/sh\necho \"ran on $(hostname)\"\nexit 3\n",
        ),
    )
    .unwrap();
    let image = test_os_image(b, dir.path(), Some(&user_data));
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let vm = qemu(
        dir.path(),
        "testos",
        &b.out.join("vmlinuz"),
        &b.out.join("kiln-agent.cpio.gz"),
        "root=/dev/vda",
        &[
            "-drive".into(),
            format!("file={},format=raw,if=virtio,snapshot=on", image.display()),
            "-smbios".into(),
            "type=1,serial=KILN-TEST-SERIAL,uuid=4c616200-0000-4000-8000-000000000042".into(),
            "-nic".into(),
            "user,model=virtio-net-pci".into(),
        ],
    );
    let text = wait_console(&vm, "kiln-test-os: booted", Duration::from_secs(180));
    assert!(text.contains("kiln-init: root=/dev/vda"), "{text}");
    assert!(text.contains("kiln-init: switching to /dev/vda (/sbin/init)"), "{text}");
    let booted = text.lines().find(|l| l.starts_with("kiln-test-os: booted")).unwrap();
    assert_eq!(
        booted,
        "kiln-test-os: booted hostname=testvm1 serial=KILN-TEST-SERIAL uuid=4c616200-0000-4000-8000-000000000042"
    );
    let request = accept_one(&listener, Duration::from_secs(120), &vm);
    assert!(
        request.starts_with(&format!("POST /api/v1/jobs/{job}/stages/5 HTTP/1.")),
        "{request}"
    );
    assert!(request.contains("Authorization: Bearer tok-5a5a\r\n"), "{request}");
    assert!(
        request.ends_with("\r\n\r\nfirst boot; post-install script exit 3: ran on testvm1"),
        "{request}"
    );
    let callback = accept_one(&listener, Duration::from_secs(60), &vm);
    assert!(callback.starts_with("POST /cb HTTP/1."), "{callback}");
    assert!(!callback.contains("Authorization"), "{callback}");
    let body = callback.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {callback}"));
    assert_eq!(
        json,
        serde_json::json!({"job_id": job, "hostname": "testvm1", "stage": 5, "post_install_exit": 3})
    );
    let text = wait_console(
        &vm,
        "kiln-test-os: runcmd: /var/lib/kiln/firstboot.sh exit 0",
        Duration::from_secs(30),
    );
    for needle in [
        "kiln-test-os: write_files: /etc/kiln-firstboot.env (0600)",
        "kiln-test-os: write_files: /var/lib/kiln/firstboot.sh (0700)",
        "kiln-test-os: write_files: /var/lib/kiln/post-install.sh (0700)",
        "kiln-firstboot: post-install script exit 3",
        &format!("kiln-firstboot: stage 5 reported to {base}/api/v1/jobs/{job}/stages/5"),
        &format!("kiln-firstboot: callback called: {base}/cb"),
    ] {
        assert!(text.contains(needle), "`{needle}` is not on the console:\n{text}");
    }
    assert!(!text.contains("kiln-test-os: cloud-init: skipped"), "{text}");
    drop(vm);
}

#[test]
fn root_on_lvm_over_md_raid1_boots_the_test_os() {
    need_tools();
    let b = built();
    let dir = tempfile::tempdir().unwrap();
    let image = test_os_image(b, dir.path(), None);
    // First boot: a script added to the ramdisk (a second cpio archive
    // after it, as the kernel allows) lays out two disks as lvm_raid1
    // does — md RAID 1, a PV on it, vg0/root — with the ramdisk's own
    // mdadm and lvm, and copies the image onto vg0/root.
    let overlay = dir.path().join("overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    std::fs::write(
        overlay.join("prepare"),
        "#!/bin/sh\nexport PATH=/usr/sbin:/usr/bin DM_DISABLE_UDEV=1\n\
         mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev\n\
         mkdir -p /run/lvm /run/lock/lvm\n\
         for m in virtio_pci virtio_blk raid1 dm_mod; do modprobe $m; done\n\
         for _ in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vdc ] && break; sleep 0.5; done\n\
         mdadm --create /dev/md0 --level=1 --raid-devices=2 --metadata=1.2 --run /dev/vda /dev/vdb &&\n\
         pvcreate -y /dev/md0 && vgcreate vg0 /dev/md0 && lvcreate -y -L 72M -n root vg0 &&\n\
         dd if=/dev/vdc of=/dev/vg0/root bs=1M conv=fsync && vgchange -an vg0 && mdadm --stop /dev/md0 &&\n\
         echo PREPARED\npoweroff -f\n",
    )
    .unwrap();
    std::fs::set_permissions(
        overlay.join("prepare"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let initrd = dir.path().join("prepare.cpio.gz");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && echo prepare | busybox cpio -o -H newc 2>/dev/null | gzip >{} && cat {} {} >{}",
        overlay.display(),
        dir.path().join("overlay.cpio.gz").display(),
        b.out.join("kiln-agent.cpio.gz").display(),
        dir.path().join("overlay.cpio.gz").display(),
        initrd.display()
    )));
    let disks: Vec<PathBuf> = ["d1", "d2"].iter().map(|d| dir.path().join(d)).collect();
    for d in &disks {
        std::fs::File::create(d).unwrap().set_len(200 << 20).unwrap();
    }
    let drives = |extra: Option<&Path>| {
        let mut args = Vec::new();
        for d in disks.iter().map(|d| d.as_path()).chain(extra) {
            args.push("-drive".to_string());
            args.push(format!("file={},format=raw,if=virtio", d.display()));
        }
        args.push("-nic".into());
        args.push("none".into());
        args
    };
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let mut vm = qemu(
        dir.path(),
        "prepare",
        &b.out.join("vmlinuz"),
        &initrd,
        "rdinit=/prepare",
        &drives(Some(&image)),
    );
    wait_exit(&mut vm, Duration::from_secs(240));
    assert!(console(&vm).contains("PREPARED"), "{}", console(&vm));
    drop(vm);

    // Second boot: the ramdisk as the test OS's initrd assembles the
    // array, activates the volume group and switches to vg0/root.
    let vm = qemu(
        dir.path(),
        "raid",
        &b.out.join("vmlinuz"),
        &b.out.join("kiln-agent.cpio.gz"),
        "root=/dev/vg0/root",
        &drives(None),
    );
    let text = wait_console(&vm, "kiln-test-os: booted", Duration::from_secs(180));
    for needle in [
        "kiln-init: md: 1 array(s) running",
        "kiln-init: lvm: 1 volume group(s) active",
        "kiln-init: switching to /dev/vg0/root (/sbin/init)",
        "kiln-test-os: booted hostname=(none)",
    ] {
        assert!(text.contains(needle), "`{needle}` is not on the console:\n{text}");
    }
    wait_console(&vm, "kiln-test-os: no user-data", Duration::from_secs(60));
    drop(vm);
}

/// The lines of `text` from `=== {name}` to `TIME {name}`: one layout's
/// part of the console.
fn section<'a>(text: &'a str, name: &str) -> &'a str {
    let start = text
        .find(&format!("=== {name}\n"))
        .unwrap_or_else(|| panic!("no `=== {name}` on the console:\n{text}"));
    let rest = &text[start..];
    let end = rest
        .find(&format!("TIME {name} "))
        .unwrap_or_else(|| panic!("`{name}` never finished:\n{rest}"));
    &rest[..end]
}

/// Issue 15, test 4: seed 001's layouts laid out by the agent on four real
/// (virtio) disks in one boot of the ramdisk — the agent's own
/// `kiln-agent plan --layout L --apply` (the plan and the commands deploy
/// mode runs) — each checked from the kernel's view (`/sys/block/md*`,
/// `mdadm --detail`, `lvs`, the partitions) and torn down (arrays stopped,
/// volume groups deactivated, as a reboot would) before the next. The
/// disks are 4, 4, 8 and 8 GiB (sparse files), so that "the smallest"
/// means something. `lvm_hba` and `flat` with a system disk must leave the
/// other disks' bytes as they were: their first 4 MiB (GPT, md 1.2
/// superblocks and LVM labels of partitions starting there), 4 MiB at
/// 1 GiB (where the third partition's start, and its md superblock, sit
/// on the OS disks) and their last 4 MiB (backup GPT, md 1.0 superblocks).
#[test]
fn seed_001_layouts_on_four_real_disks() {
    need_tools();
    let b = built();
    let dir = tempfile::tempdir().unwrap();
    let overlay = dir.path().join("overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    std::fs::write(
        overlay.join("layouts"),
        r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin DM_DISABLE_UDEV=1
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /run/lvm /run/lock/lvm /tmp
for m in virtio_pci virtio_blk md_mod raid0 raid1 raid10 dm_mod ext4; do modprobe $m; done
for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do [ -b /dev/vdd ] && break; sleep 0.5; done
# md resyncs new mirrors in the background: not what is tested, and slow
# under emulation.
echo 1000 >/proc/sys/dev/raid/speed_limit_min; echo 1000 >/proc/sys/dev/raid/speed_limit_max
now() { cut -d' ' -f1 /proc/uptime; }
show() {
  for md in /sys/block/md*; do
    case "$(cat $md/md/array_state 2>/dev/null)" in clear|inactive|'') continue;; esac
    n=${md##*/}
    echo "CHECK $n level=$(cat $md/md/level) members=$(ls $md/slaves | tr '\n' ' ')"
    mdadm --detail /dev/$n | grep -E 'Raid Level|Raid Devices|Layout|Array Size'
  done
  lvs --noheadings -o lv_path,lv_size --units m 2>/dev/null | while read p s; do echo "CHECK lv $p $s"; done
  for d in vda vdb vdc vdd; do echo "CHECK parts $d: $(ls /sys/block/$d | grep "^$d" | tr '\n' ' ')"; done
}
teardown() { vgchange -an >/dev/null 2>&1; mdadm --stop --scan >/dev/null 2>&1; }
windows() {
  for d in "$@"; do
    mib=$(( $(cat /sys/block/$d/size) / 2048 ))
    a=$(dd if=/dev/$d bs=1M count=4 2>/dev/null | md5sum | cut -c1-32)
    b=$(dd if=/dev/$d bs=1M skip=1024 count=4 2>/dev/null | md5sum | cut -c1-32)
    c=$(dd if=/dev/$d bs=1M skip=$((mib - 4)) count=4 2>/dev/null | md5sum | cut -c1-32)
    echo "$d $a $b $c"
  done
}
apply() {
  l=$1; shift
  echo "=== $l"
  t=$(now)
  if kiln-agent plan --layout ${l%%+*} "$@" --apply >/tmp/plan 2>/tmp/log; then
    sed 's/^/plan: /' /tmp/plan
  else
    echo "FAILED $l"; tail -n 30 /tmp/log
  fi
  show
  echo "TIME $l $(awk -v a=$t -v b=$(now) 'BEGIN { printf "%.1f", b - a }')"
  teardown
}
echo "LAYOUTS START $(now)"
apply lvm_raid0
apply lvm_raid10
apply lvm_raid10s
windows vda vdc vdd >/tmp/before
apply lvm_hba
windows vda vdc vdd >/tmp/after
if cmp -s /tmp/before /tmp/after; then echo "UNTOUCHED hba: vda vdc vdd"; else echo "CHANGED hba"; cat /tmp/before /tmp/after; fi
apply flat+system-disk --system-disk kiln-disk-c
windows vda vdd >/tmp/after
grep -E '^(vda|vdd) ' /tmp/before >/tmp/before2
if cmp -s /tmp/before2 /tmp/after; then echo "UNTOUCHED flat: vda vdd"; else echo "CHANGED flat"; cat /tmp/before2 /tmp/after; fi
echo "LAYOUTS END $(now)"
poweroff -f
"#,
    )
    .unwrap();
    std::fs::set_permissions(
        overlay.join("layouts"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let initrd = dir.path().join("layouts.cpio.gz");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && echo layouts | busybox cpio -o -H newc 2>/dev/null | gzip >{} && cat {} {} >{}",
        overlay.display(),
        dir.path().join("overlay.cpio.gz").display(),
        b.out.join("kiln-agent.cpio.gz").display(),
        dir.path().join("overlay.cpio.gz").display(),
        initrd.display()
    )));
    // vda 8 GiB, vdb 4 GiB, vdc 8 GiB + 16 MiB, vdd 4 GiB + 16 MiB: two
    // pairs of similar disks, the smallest not the first.
    let sizes: [(&str, u64); 4] = [
        ("a", 8 << 30),
        ("b", 4 << 30),
        ("c", (8 << 30) + (16 << 20)),
        ("d", (4 << 30) + (16 << 20)),
    ];
    let mut drives = Vec::new();
    for (letter, size) in sizes {
        let file = dir.path().join(format!("disk-{letter}"));
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        drives.push("-drive".to_string());
        drives.push(format!("file={},format=raw,if=none,id=d{letter}", file.display()));
        drives.push("-device".to_string());
        drives.push(format!("virtio-blk-pci,drive=d{letter},serial=kiln-disk-{letter}"));
    }
    drives.extend(["-nic".to_string(), "none".to_string()]);
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut vm = qemu(
        dir.path(),
        "layouts",
        &b.out.join("vmlinuz"),
        &initrd,
        "rdinit=/layouts",
        &drives,
    );
    let booted = wait_console(&vm, "LAYOUTS START", Duration::from_secs(120));
    let boot_secs = started.elapsed().as_secs_f64();
    drop(booted);
    wait_exit(&mut vm, Duration::from_secs(300));
    let text = console(&vm);
    drop(vm);
    let total = started.elapsed().as_secs_f64();
    assert!(text.contains("LAYOUTS END"), "{text}");
    assert!(!text.contains("FAILED"), "{text}");

    let expect = |name: &str, lines: &[&str], absent: &[&str]| {
        let part = section(&text, name);
        for line in lines {
            assert!(part.contains(line), "{name}: no `{line}` in\n{part}");
        }
        for line in absent {
            assert!(!part.contains(line), "{name}: `{line}` should not be in\n{part}");
        }
    };
    // RAID 0: /boot mirrored on all four, the stripe over all four.
    expect(
        "lvm_raid0",
        &[
            "CHECK md0 level=raid1 members=vda2 vdb2 vdc2 vdd2",
            "CHECK md1 level=raid0 members=vda3 vdb3 vdc3 vdd3",
            "CHECK lv /dev/vg0/root",
        ],
        &["CHECK md2"],
    );
    // RAID 10 over both pairs, near=2.
    expect(
        "lvm_raid10",
        &[
            "CHECK md0 level=raid1 members=vda2 vdb2 vdc2 vdd2",
            "CHECK md1 level=raid10 members=vda3 vdb3 vdc3 vdd3",
            "near=2",
            "CHECK lv /dev/vg0/root",
        ],
        &["CHECK md2"],
    );
    // RAID10S: the OS on RAID 1 over the small pair (vdb, vdd), the data
    // volume on RAID 10 over the big pair (vda, vdc), which have no boot
    // partitions.
    expect(
        "lvm_raid10s",
        &[
            "CHECK md0 level=raid1 members=vdb2 vdd2",
            "CHECK md1 level=raid1 members=vdb3 vdd3",
            "CHECK md2 level=raid10 members=vda1 vdc1",
            "CHECK lv /dev/vg0/root",
            "CHECK lv /dev/vgdata/data",
            "CHECK parts vda: vda1 \n",
            "CHECK parts vdb: vdb1 vdb2 vdb3 \n",
        ],
        &[],
    );
    // HBA: the OS on the smallest disk, no arrays, the others untouched.
    expect(
        "lvm_hba",
        &[
            "plan: disk /dev/vdb (4.0 GiB)",
            "CHECK lv /dev/vg0/root",
            "CHECK parts vdb: vdb1 vdb2 vdb3 \n",
        ],
        &[
            "CHECK md",
            "plan: disk /dev/vda",
            "plan: disk /dev/vdc",
            "plan: disk /dev/vdd",
        ],
    );
    assert!(text.contains("UNTOUCHED hba: vda vdc vdd"), "{text}");
    // flat on the operator's system disk (by serial), not the first.
    expect(
        "flat+system-disk",
        &["plan: disk /dev/vdc (8.0 GiB)", "CHECK parts vdc: vdc1 vdc2 vdc3 \n"],
        &["plan: disk /dev/vda", "plan: disk /dev/vdd"],
    );
    assert!(text.contains("UNTOUCHED flat: vda vdd"), "{text}");

    let times: Vec<&str> = text.lines().filter(|l| l.starts_with("TIME ")).collect();
    let uptime = |mark: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(mark)).unwrap();
        line[mark.len()..].trim().parse().unwrap()
    };
    eprintln!(
        "seed 001 layouts in QEMU: boot to script {boot_secs:.1} s; the layouts and checks {:.1} s ({}); total \
         {total:.1} s",
        uptime("LAYOUTS END") - uptime("LAYOUTS START"),
        times.join(", ")
    );
}
