//! `kiln ramdisk build`: the net-boot kernel and initramfs the server hands
//! to machines (discovery and deploy), made from Debian packages and the
//! static `kiln-agent`. See docs/ramdisk.md.

mod apt;
pub mod cpio;
pub mod elf;
mod modules;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use cpio::{Entry, Tree};
use serde::Serialize;

use crate::output::{Format, Out};

/// The ramdisk's `/init`.
pub const INIT: &str = include_str!("init.sh");
const UDHCPC_SCRIPT: &str = include_str!("udhcpc.sh");
const LVM_CONF: &str = include_str!("lvm.conf");

/// The file names the server serves by default (`[boot] agent_kernel`,
/// `agent_initrd`).
pub const KERNEL_NAME: &str = "vmlinuz";
pub const INITRD_NAME: &str = "kiln-agent.cpio.gz";

/// How to build a static agent, for the refusal of a dynamic one.
const STATIC_BUILD: &str = "RUSTFLAGS='-C target-feature=+crt-static' \
     cargo build -p kiln-agent --release --target x86_64-unknown-linux-gnu \
     (then --agent target/x86_64-unknown-linux-gnu/release/kiln-agent)";

#[derive(Debug, Subcommand)]
pub enum RamdiskCmd {
    /// Build the net-boot kernel and initramfs (`vmlinuz`,
    /// `kiln-agent.cpio.gz`) from Debian packages and the static agent.
    Build(BuildArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The kiln-agent binary, statically linked.
    #[arg(long)]
    pub agent: PathBuf,
    /// Where to write `vmlinuz` and `kiln-agent.cpio.gz`: the server's
    /// artifacts directory, which it serves at /boot/file/ (files are
    /// replaced by rename, so no client reads half a file).
    #[arg(long, default_value = "/var/lib/kiln/artifacts")]
    pub out: PathBuf,
    /// Downloaded and extracted packages, reused across builds (default:
    /// $XDG_CACHE_HOME/kiln/ramdisk or ~/.cache/kiln/ramdisk).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// The kernel: a linux-image package or metapackage, resolved through
    /// the host's apt.
    #[arg(long, default_value = "linux-image-amd64")]
    pub kernel_package: String,
}

pub async fn run(cmd: RamdiskCmd, out: &mut Out) -> anyhow::Result<()> {
    match cmd {
        RamdiskCmd::Build(args) => {
            let report = tokio::task::spawn_blocking(move || build(&args)).await??;
            report.print(out)
        }
    }
}

/// What a build made, printed at the end (`-o json` for scripts).
#[derive(Debug, Serialize)]
pub struct Report {
    pub out_dir: PathBuf,
    pub kernel_package: String,
    pub kernel_version: String,
    pub kernel_bytes: u64,
    pub initrd_bytes: u64,
    /// The archive before compression.
    pub initrd_uncompressed_bytes: u64,
    pub files: usize,
    pub modules: usize,
    /// Wanted modules this kernel builds in.
    pub builtin_modules: Vec<String>,
    /// Wanted modules this kernel does not have.
    pub missing_modules: Vec<String>,
    pub packages_downloaded: usize,
    pub seconds: f64,
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

impl Report {
    fn print(&self, out: &mut Out) -> anyhow::Result<()> {
        if out.format == Format::Json {
            return out.json(self);
        }
        out.line(format!(
            "{KERNEL_NAME:<20}{:>9}  {} {}",
            mb(self.kernel_bytes),
            self.kernel_package,
            self.kernel_version
        ))?;
        out.line(format!(
            "{INITRD_NAME:<20}{:>9}  {} files, {} uncompressed, {} kernel modules",
            mb(self.initrd_bytes),
            self.files,
            mb(self.initrd_uncompressed_bytes),
            self.modules
        ))?;
        if !self.missing_modules.is_empty() {
            out.line(format!("not in this kernel: {}", self.missing_modules.join(" ")))?;
        }
        out.line(format!(
            "written to {} in {:.1} s ({} packages downloaded)",
            self.out_dir.display(),
            self.seconds,
            self.packages_downloaded
        ))
    }
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("kiln ramdisk: {}", msg.as_ref());
}

fn default_cache() -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("kiln/ramdisk"));
    }
    let home = std::env::var_os("HOME").context("no --cache, and neither XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/kiln/ramdisk"))
}

/// Refuses an agent that is not a static x86-64 executable.
pub fn check_agent(path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read the agent {}", path.display()))?;
    let info = elf::read_info(&bytes).with_context(|| format!("{} is not an x86-64 executable", path.display()))?;
    if let Some(interp) = info.interp {
        bail!(
            "{} is dynamically linked (loader {interp}; needs {}): the ramdisk has no C library \
             for it. Build the static agent: {STATIC_BUILD}",
            path.display(),
            info.needed.join(", ")
        );
    }
    if !info.needed.is_empty() {
        bail!(
            "{} needs shared libraries ({}). Build the static agent: {STATIC_BUILD}",
            path.display(),
            info.needed.join(", ")
        );
    }
    Ok(())
}

/// A program taken from a package: its path in the package, and the other
/// names (in the same directory) that point at it.
struct Tool {
    package: &'static str,
    path: &'static str,
    links: &'static [&'static str],
}

const TOOLS: &[Tool] = &[
    Tool {
        package: "lvm2",
        path: "sbin/lvm",
        links: &[
            "pvcreate",
            "pvremove",
            "pvs",
            "pvscan",
            "pvdisplay",
            "vgcreate",
            "vgchange",
            "vgremove",
            "vgs",
            "vgscan",
            "vgdisplay",
            "lvcreate",
            "lvremove",
            "lvchange",
            "lvs",
            "lvscan",
            "lvdisplay",
            "lvmconfig",
        ],
    },
    Tool {
        package: "mdadm",
        path: "sbin/mdadm",
        links: &[],
    },
    Tool {
        package: "gdisk",
        path: "sbin/sgdisk",
        links: &[],
    },
    Tool {
        package: "util-linux",
        path: "sbin/wipefs",
        links: &[],
    },
    Tool {
        package: "util-linux",
        path: "sbin/blkid",
        links: &[],
    },
    Tool {
        package: "util-linux",
        path: "sbin/mkswap",
        links: &[],
    },
    Tool {
        package: "util-linux",
        path: "sbin/blockdev",
        links: &[],
    },
    Tool {
        package: "fdisk",
        path: "sbin/sfdisk",
        links: &[],
    },
    Tool {
        package: "e2fsprogs",
        path: "sbin/mke2fs",
        links: &["mkfs.ext4", "mkfs.ext3", "mkfs.ext2"],
    },
    Tool {
        package: "e2fsprogs",
        path: "sbin/e2fsck",
        links: &["fsck.ext4"],
    },
    Tool {
        package: "dosfstools",
        path: "sbin/mkfs.fat",
        links: &["mkfs.vfat"],
    },
    Tool {
        package: "grub2-common",
        path: "usr/sbin/grub-install",
        links: &[],
    },
    Tool {
        package: "grub-common",
        path: "usr/bin/grub-mkimage",
        links: &[],
    },
    Tool {
        package: "grub-common",
        path: "usr/bin/grub-editenv",
        links: &[],
    },
    Tool {
        package: "grub-common",
        path: "usr/sbin/grub-probe",
        links: &[],
    },
    Tool {
        package: "grub-pc-bin",
        path: "usr/lib/grub/i386-pc/grub-bios-setup",
        links: &[],
    },
    // The NVRAM boot entry of a UEFI machine's installed OS.
    Tool {
        package: "efibootmgr",
        path: "bin/efibootmgr",
        links: &[],
    },
];

/// Whole directories taken from packages: GRUB's platform files, which
/// `grub-install` reads (the prebuilt monolithic EFI images are left out).
const DIRS: &[(&str, &str, &[&str])] = &[
    ("grub-pc-bin", "usr/lib/grub/i386-pc", &[]),
    ("grub-efi-amd64-bin", "usr/lib/grub/x86_64-efi", &["monolithic"]),
];

/// Single files taken from packages as they are.
const FILES: &[(&str, &str)] = &[("e2fsprogs", "etc/mke2fs.conf")];

/// `/bin`, `/sbin`, `/lib`, `/lib64` are links into `/usr` (Debian 12's
/// merged /usr): a package's `sbin/mdadm` lands in `usr/sbin/mdadm`.
fn merged(path: &str) -> String {
    let path = path.trim_start_matches("./").trim_start_matches('/');
    for top in ["bin", "sbin", "lib", "lib64"] {
        if let Some(rest) = path.strip_prefix(top).and_then(|r| r.strip_prefix('/')) {
            return format!("usr/{top}/{rest}");
        }
    }
    path.to_string()
}

/// Follows symbolic links inside an extracted package (absolute targets
/// are relative to the package's root, not the build host's).
fn resolve_in(root: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..16 {
        let meta = std::fs::symlink_metadata(&p).with_context(|| format!("{} is missing", p.display()))?;
        if !meta.file_type().is_symlink() {
            return Ok(p);
        }
        let target = std::fs::read_link(&p)?;
        p = if target.is_absolute() {
            root.join(target.strip_prefix("/").expect("absolute"))
        } else {
            p.parent().expect("has a parent").join(target)
        };
    }
    bail!("{}: too many levels of symbolic links", path.display())
}

/// Shared libraries of the extracted library packages, by file name.
fn library_index(roots: &[&PathBuf]) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for root in roots {
        for dir in [
            "lib/x86_64-linux-gnu",
            "usr/lib/x86_64-linux-gnu",
            "lib64",
            "lib",
            "usr/lib",
        ] {
            let Ok(rd) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.contains(".so") {
                    continue;
                }
                if let Ok(real) = resolve_in(root, &e.path())
                    && real.is_file()
                {
                    out.entry(name).or_insert(real);
                }
            }
        }
    }
    out
}

const LIBDIR: &str = "usr/lib/x86_64-linux-gnu";

fn mode_of(path: &Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
}

/// Adds `binary`'s loader and every shared library it needs, transitively.
fn add_libraries(
    tree: &mut Tree,
    libs: &BTreeMap<String, PathBuf>,
    binary: &Path,
    done: &mut BTreeSet<String>,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let info = elf::read_info(&bytes).with_context(|| binary.display().to_string())?;
    if let Some(interp) = &info.interp {
        // The loader's file goes with the libraries; its absolute path
        // (/lib64/ld-linux-x86-64.so.2) is a link to it.
        let base = interp.rsplit('/').next().unwrap_or(interp);
        let real = libs
            .get(base)
            .with_context(|| format!("{}: loader {interp} is in no library package", binary.display()))?;
        if done.insert(base.to_string()) {
            tree.insert(
                &format!("{LIBDIR}/{base}"),
                Entry::File {
                    source: real.clone(),
                    mode: 0o755,
                },
            );
        }
        let at = merged(interp);
        if at != format!("{LIBDIR}/{base}") && !tree.contains(&at) {
            tree.insert(&at, Entry::Symlink(format!("/{LIBDIR}/{base}")));
        }
    }
    for soname in &info.needed {
        if !done.insert(soname.clone()) {
            continue;
        }
        let real = libs.get(soname).with_context(|| {
            format!(
                "{} needs {soname}, which no downloaded library package holds",
                binary.display()
            )
        })?;
        tree.insert(
            &format!("{LIBDIR}/{soname}"),
            Entry::File {
                source: real.clone(),
                mode: 0o644,
            },
        );
        add_libraries(tree, libs, real, done)?;
    }
    Ok(())
}

/// Every file under `dir` (relative paths), skipping the subdirectories
/// named in `skip`.
fn walk(dir: &Path, skip: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(dir.join(&rel)).with_context(|| format!("cannot list {}", dir.display()))? {
            let e = e?;
            let r = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                if !skip.iter().any(|s| Path::new(s) == r) {
                    stack.push(r);
                }
            } else {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `data` to `dir/name` through a temporary file and a rename, so
/// that a reader sees the old file or the new one, never half of one.
struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
}

impl Staged {
    fn commit(self) -> anyhow::Result<()> {
        std::fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("cannot rename {} to {}", self.tmp.display(), self.dest.display()))
    }
}

fn staged_path(dir: &Path, name: &str) -> Staged {
    Staged {
        tmp: dir.join(format!(".{name}.tmp-{}", std::process::id())),
        dest: dir.join(name),
    }
}

/// Builds the ramdisk. Blocking: runs apt, dpkg-deb and busybox.
pub fn build(args: &BuildArgs) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    check_agent(&args.agent)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let cache = match &args.cache {
        Some(c) => c.clone(),
        None => default_cache()?,
    };
    let debs_dir = cache.join("debs");
    let extract_dir = cache.join("extracted");
    std::fs::create_dir_all(&debs_dir).with_context(|| format!("cannot create {}", debs_dir.display()))?;
    std::fs::create_dir_all(&extract_dir)?;

    // Which packages, at the host apt's candidate versions.
    let mut roots: Vec<String> = vec!["busybox-static".into()];
    for t in TOOLS {
        roots.push(t.package.into());
    }
    for (p, _, _) in DIRS {
        roots.push((*p).into());
    }
    roots.sort();
    roots.dedup();
    let mut query = roots.clone();
    query.push(args.kernel_package.clone());
    let deps = apt::depends(&query, true)?;
    let kernel_pkg = apt::resolve_kernel_package(&args.kernel_package, &deps)?;
    let kver = kernel_pkg
        .strip_prefix("linux-image-")
        .filter(|v| v.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .with_context(|| {
            format!(
                "{} resolves to {kernel_pkg}, not a linux-image-VERSION package",
                args.kernel_package
            )
        })?
        .to_string();
    let mut wanted = apt::with_library_closure(&roots, &deps)?;
    wanted.insert(kernel_pkg.clone());
    let debs = apt::candidates(&wanted)?;
    let missing = debs.iter().filter(|d| !debs_dir.join(&d.file).exists()).count();
    if missing > 0 {
        progress(format!(
            "downloading {missing} of {} packages into {}",
            debs.len(),
            debs_dir.display()
        ));
    }
    let downloaded = apt::download(&debs, &debs_dir)?;
    let fresh = debs
        .iter()
        .filter(|d| !extract_dir.join(d.file.trim_end_matches(".deb")).is_dir())
        .count();
    if fresh > 0 {
        progress(format!("extracting {fresh} packages"));
    }
    let mut pkg_root: BTreeMap<String, PathBuf> = BTreeMap::new();
    for d in &debs {
        pkg_root.insert(d.package.clone(), apt::extract(&debs_dir, d, &extract_dir)?);
    }
    let root_of = |p: &str| -> anyhow::Result<&PathBuf> {
        pkg_root.get(p).with_context(|| format!("package {p} was not fetched"))
    };

    let mut tree = Tree::default();
    for top in ["bin", "sbin", "lib", "lib64"] {
        tree.insert(top, Entry::Symlink(format!("usr/{top}")));
        tree.insert(&format!("usr/{top}"), Entry::Dir);
    }
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "newroot",
        "mnt",
        "root",
        "var/lib",
        "etc/kiln",
        "usr/share",
    ] {
        tree.insert(d, Entry::Dir);
    }
    // The kernel opens /dev/console for init before anything is mounted.
    tree.insert("dev/console", Entry::CharDev(5, 1));
    tree.insert("dev/null", Entry::CharDev(1, 3));

    // busybox, with a link for each applet (the real tools below replace
    // the applets they overlap: blkid, mkswap, mke2fs, …).
    let busybox = root_of("busybox-static")?.join("bin/busybox");
    tree.insert(
        "usr/bin/busybox",
        Entry::File {
            source: busybox.clone(),
            mode: 0o755,
        },
    );
    let applets = std::process::Command::new(&busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("cannot run {} --list-full", busybox.display()))?;
    if !applets.status.success() {
        bail!("{} --list-full failed", busybox.display());
    }
    for a in String::from_utf8_lossy(&applets.stdout)
        .lines()
        .filter(|l| !l.is_empty())
    {
        let path = merged(a);
        if path != "usr/bin/busybox" {
            tree.insert(&path, Entry::Symlink("/usr/bin/busybox".into()));
        }
    }

    // The tools and their libraries (from the library packages, not the
    // build host).
    let lib_roots: Vec<&PathBuf> = pkg_root
        .iter()
        .filter(|(p, _)| p.starts_with("lib") || p.as_str() == "zlib1g")
        .map(|(_, r)| r)
        .collect();
    let libs = library_index(&lib_roots);
    let mut done = BTreeSet::new();
    for t in TOOLS {
        let root = root_of(t.package)?;
        let src = resolve_in(root, &root.join(t.path))?;
        let dest = merged(t.path);
        tree.insert(
            &dest,
            Entry::File {
                source: src.clone(),
                mode: mode_of(&src)?,
            },
        );
        add_libraries(&mut tree, &libs, &src, &mut done)?;
        let dir = dest.rsplit_once('/').map(|d| d.0).unwrap_or("");
        let name = dest.rsplit('/').next().unwrap_or(&dest);
        for l in t.links {
            tree.insert(&format!("{dir}/{l}"), Entry::Symlink(name.to_string()));
        }
    }
    // grub-bios-setup lives in GRUB's platform directory; on PATH too.
    tree.insert(
        "usr/sbin/grub-bios-setup",
        Entry::Symlink("../lib/grub/i386-pc/grub-bios-setup".into()),
    );
    for (pkg, dir, skip) in DIRS {
        let base = root_of(pkg)?.join(dir);
        for rel in walk(&base, skip)? {
            let src = base.join(&rel);
            if std::fs::symlink_metadata(&src)?.file_type().is_symlink() {
                continue;
            }
            let path = format!("{}/{}", merged(dir), rel.display());
            if !tree.contains(&path) {
                tree.insert(
                    &path,
                    Entry::File {
                        mode: mode_of(&src)?,
                        source: src,
                    },
                );
            }
        }
    }
    for (pkg, file) in FILES {
        let src = root_of(pkg)?.join(file);
        tree.insert(
            file,
            Entry::File {
                mode: 0o644,
                source: src,
            },
        );
    }

    // Kernel modules, with the files busybox modprobe reads.
    let kroot = root_of(&kernel_pkg)?;
    let moddir = kroot.join("lib/modules").join(&kver);
    let kernel_image = kroot.join("boot").join(format!("vmlinuz-{kver}"));
    if !kernel_image.is_file() || !moddir.is_dir() {
        bail!("{kernel_pkg} has no boot/vmlinuz-{kver} or lib/modules/{kver}");
    }
    let sel = modules::select(&moddir, modules::WANTED)?;
    let mdest = format!("usr/lib/modules/{kver}");
    for m in sel.modules.values() {
        tree.insert(
            &format!("{mdest}/{}", m.rel),
            Entry::File {
                source: m.path.clone(),
                mode: 0o644,
            },
        );
    }
    let bytes = |s: String| Entry::Bytes {
        data: s.into_bytes(),
        mode: 0o644,
    };
    tree.insert(
        &format!("{mdest}/modules.dep"),
        bytes(modules::modules_dep(&sel.modules)),
    );
    tree.insert(
        &format!("{mdest}/modules.alias"),
        bytes(modules::modules_alias(&sel.modules)),
    );
    if moddir.join("modules.builtin").is_file() {
        tree.insert(
            &format!("{mdest}/modules.builtin"),
            Entry::File {
                source: moddir.join("modules.builtin"),
                mode: 0o644,
            },
        );
    }
    // What /init loads: the wanted modules this kernel has, in the order
    // of the list (modprobe brings in their dependencies).
    let load: Vec<String> = modules::WANTED
        .iter()
        .map(|w| modules::norm(w))
        .filter(|w| sel.modules.contains_key(w))
        .collect();
    tree.insert("etc/kiln/modules", bytes(load.join("\n") + "\n"));

    // The agent, /init and its files.
    tree.insert(
        "usr/bin/kiln-agent",
        Entry::File {
            source: args.agent.clone(),
            mode: 0o755,
        },
    );
    tree.insert(
        "init",
        Entry::Bytes {
            data: INIT.as_bytes().to_vec(),
            mode: 0o755,
        },
    );
    tree.insert(
        "etc/kiln/udhcpc.script",
        Entry::Bytes {
            data: UDHCPC_SCRIPT.as_bytes().to_vec(),
            mode: 0o755,
        },
    );
    tree.insert("etc/lvm/lvm.conf", bytes(LVM_CONF.to_string()));
    tree.insert("etc/passwd", bytes("root:x:0:0:root:/root:/bin/sh\n".into()));
    tree.insert("etc/group", bytes("root:x:0:\ndisk:x:6:\n".into()));
    tree.insert(
        "etc/mdadm/mdadm.conf",
        bytes("# kiln ramdisk: scan every partition\nDEVICE partitions\n".into()),
    );
    let mut release = format!("kiln ramdisk\nkernel {kver}\n");
    for d in &debs {
        release.push_str(&format!("package {}\n", d.file));
    }
    tree.insert("etc/kiln/ramdisk-release", bytes(release));

    // The archive: newc, gzip, written beside its final name and renamed.
    let initrd = staged_path(&args.out, INITRD_NAME);
    let kernel = staged_path(&args.out, KERNEL_NAME);
    progress(format!("writing {} entries", tree.entries.len()));
    let uncompressed = write_archive(&tree, &initrd.tmp)?;
    std::fs::copy(&kernel_image, &kernel.tmp).with_context(|| format!("cannot write {}", kernel.tmp.display()))?;
    std::fs::File::open(&kernel.tmp)?.sync_all()?;
    // The two renames back to back: the initrd's modules belong to this
    // kernel.
    initrd.commit()?;
    kernel.commit()?;

    Ok(Report {
        kernel_bytes: std::fs::metadata(args.out.join(KERNEL_NAME))?.len(),
        initrd_bytes: std::fs::metadata(args.out.join(INITRD_NAME))?.len(),
        out_dir: args.out.clone(),
        kernel_version: debs
            .iter()
            .find(|d| d.package == kernel_pkg)
            .and_then(|d| d.file.split('_').nth(1))
            .unwrap_or("?")
            .to_string(),
        kernel_package: kernel_pkg,
        initrd_uncompressed_bytes: uncompressed,
        files: tree.entries.len(),
        modules: sel.modules.len(),
        builtin_modules: sel.builtin,
        missing_modules: sel.missing,
        packages_downloaded: downloaded,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Counts the bytes going through.
struct Counter<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the gzipped newc archive of `tree` to `path`; returns its size
/// before compression.
fn write_archive(tree: &Tree, path: &Path) -> anyhow::Result<u64> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    let result = (|| -> anyhow::Result<u64> {
        // mtime 0 and no file name in the gzip header: reproducible.
        let gz = flate2::GzBuilder::new().mtime(0).write(
            std::io::BufWriter::with_capacity(1 << 20, &file),
            flate2::Compression::new(6),
        );
        let mut counter = Counter {
            inner: std::io::BufWriter::with_capacity(1 << 20, gz),
            n: 0,
        };
        cpio::write(tree, &mut counter)?;
        let gz = counter.inner.into_inner().map_err(|e| e.into_error())?;
        gz.finish()?.flush()?;
        file.sync_all()?;
        Ok(counter.n)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_usr() {
        assert_eq!(merged("sbin/mdadm"), "usr/sbin/mdadm");
        assert_eq!(merged("./bin/busybox"), "usr/bin/busybox");
        assert_eq!(merged("/lib64/ld-linux-x86-64.so.2"), "usr/lib64/ld-linux-x86-64.so.2");
        assert_eq!(merged("usr/sbin/grub-install"), "usr/sbin/grub-install");
        assert_eq!(merged("libexec/x"), "libexec/x");
        assert_eq!(merged("etc/mke2fs.conf"), "etc/mke2fs.conf");
    }

    #[test]
    fn a_dynamic_agent_is_refused_with_the_static_build_command() {
        let me = std::env::current_exe().unwrap();
        let err = check_agent(&me).unwrap_err().to_string();
        assert!(err.contains("dynamically linked"), "{err}");
        assert!(err.contains("+crt-static"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("agent");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(
            check_agent(&script)
                .unwrap_err()
                .to_string()
                .contains("not an x86-64 executable")
        );
    }

    #[test]
    fn init_is_a_busybox_sh_script() {
        assert!(INIT.starts_with("#!/bin/sh\n"));
        for needle in [
            "kiln-agent failed (exit $rc); powering off in 10 s",
            "switch_root",
            "DM_DISABLE_UDEV=1",
        ] {
            assert!(INIT.contains(needle), "{needle}");
        }
    }
}
