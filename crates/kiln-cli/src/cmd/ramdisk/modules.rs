//! Which kernel modules go into the ramdisk, and the `modules.dep` /
//! `modules.alias` files busybox `modprobe` reads, made from each module's
//! `.modinfo` (no `depmod` needed on the build host).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::elf;

/// The modules the ramdisk carries, by name, with what each needs.
/// NICs, disk controllers, md RAID and device mapper, the filesystems the
/// layouts make, and in-band IPMI. Names not built as modules by this kernel
/// (built in, or absent) are reported and skipped.
pub const WANTED: &[&str] = &[
    // virtio (QEMU, clouds)
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    // NICs
    "e1000",
    "e1000e",
    "igb",
    "ixgbe",
    "i40e",
    "ice",
    "mlx5_core",
    "bnxt_en",
    "tg3",
    // disks and controllers
    "nvme",
    "ahci",
    "sd_mod",
    "megaraid_sas",
    "mpt3sas",
    // RAID and LVM
    "md_mod",
    "raid0",
    "raid1",
    "raid10",
    "dm_mod",
    "dm_raid",
    // filesystems the layouts make and the ESP: FAT needs its code page
    // (cp437) and its I/O charset (Debian's kernel mounts FAT with
    // `iocharset=ascii` unless told otherwise: without nls_ascii an ESP
    // does not mount, "FAT-fs: IO charset ascii not found")
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859_1",
    "nls_utf8",
    // UEFI variables (/sys/firmware/efi/efivars), for efibootmgr's NVRAM
    // boot entry
    "efivarfs",
    // LLDP's raw sockets
    "af_packet",
    // in-band IPMI (absent on most VMs: loading is allowed to fail)
    "ipmi_si",
    "ipmi_devintf",
];

/// One kernel module found in the kernel package.
#[derive(Debug, Clone)]
pub struct Module {
    /// Path under `lib/modules/KVER/`, e.g. `kernel/drivers/net/virtio_net.ko`.
    pub rel: String,
    pub path: PathBuf,
    pub depends: Vec<String>,
    /// `softdep=pre: crc32c` and the like: modules wanted at load time that
    /// the kernel does not link against (ext4 needs a crc32c driver).
    pub softdeps: Vec<String>,
    pub aliases: Vec<String>,
}

/// `-` and `_` are the same in module names.
pub fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// Every `.ko` under `moddir` (`…/lib/modules/KVER`), by name. Only the
/// file names are read here; `.modinfo` is read for the modules picked.
pub fn index(moddir: &Path) -> anyhow::Result<BTreeMap<String, (String, PathBuf)>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![moddir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let e = e?;
            let path = e.path();
            if e.file_type()?.is_dir() {
                stack.push(path);
            } else if let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                let rel = path
                    .strip_prefix(moddir)
                    .expect("under moddir")
                    .to_string_lossy()
                    .into_owned();
                out.insert(norm(stem), (rel, path));
            }
        }
    }
    Ok(out)
}

fn read_module(rel: &str, path: &Path) -> anyhow::Result<Module> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let info = elf::modinfo(&bytes).with_context(|| path.display().to_string())?;
    let mut m = Module {
        rel: rel.to_string(),
        path: path.to_path_buf(),
        depends: vec![],
        softdeps: vec![],
        aliases: vec![],
    };
    for (k, v) in info {
        match k.as_str() {
            "depends" => m.depends.extend(v.split(',').filter(|s| !s.is_empty()).map(norm)),
            "softdep" => m
                .softdeps
                .extend(v.split_whitespace().filter(|w| !w.ends_with(':')).map(norm)),
            "alias" => m.aliases.push(v),
            _ => {}
        }
    }
    Ok(m)
}

/// What [`select`] found.
#[derive(Debug, Default)]
pub struct Selection {
    /// Every module to include (the wanted ones and all they need), by name.
    pub modules: BTreeMap<String, Module>,
    /// Wanted names this kernel has built in.
    pub builtin: Vec<String>,
    /// Wanted names this kernel has neither as a module nor built in.
    pub missing: Vec<String>,
}

/// The wanted modules and everything they depend on (hard and soft
/// dependencies; a soft dependency may name an alias, such as `crc32c`,
/// which is looked up among the modules' aliases).
pub fn select(moddir: &Path, wanted: &[&str]) -> anyhow::Result<Selection> {
    let idx = index(moddir)?;
    let builtin: BTreeSet<String> = std::fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|f| f.strip_suffix(".ko"))
        .map(norm)
        .collect();
    let mut sel = Selection::default();
    let mut queue: Vec<(String, bool)> = wanted.iter().map(|w| (norm(w), true)).collect();
    // Soft dependencies name aliases too (ext4: "crc32c"); built lazily,
    // since it means reading every module's .modinfo.
    let mut alias_index: Option<BTreeMap<String, Vec<String>>> = None;
    while let Some((name, from_user)) = queue.pop() {
        if sel.modules.contains_key(&name) {
            continue;
        }
        let Some((rel, path)) = idx.get(&name) else {
            if builtin.contains(&name) {
                if from_user {
                    sel.builtin.push(name);
                }
                continue;
            }
            if from_user {
                sel.missing.push(name);
                continue;
            }
            // A soft dependency by alias.
            let aliases = match &mut alias_index {
                Some(a) => a,
                None => alias_index.insert(alias_map(&idx)?),
            };
            if let Some(providers) = aliases.get(&name) {
                queue.extend(providers.iter().map(|p| (p.clone(), false)));
            }
            continue;
        };
        let m = read_module(rel, path)?;
        for d in &m.depends {
            if !idx.contains_key(d) {
                anyhow::bail!("module {name} depends on {d}, which is not in the kernel package");
            }
        }
        queue.extend(m.depends.iter().chain(&m.softdeps).map(|d| (d.clone(), false)));
        sel.modules.insert(name, m);
    }
    sel.builtin.sort();
    sel.missing.sort();
    Ok(sel)
}

/// Exact (non-wildcard) aliases of every module: alias → module names.
fn alias_map(idx: &BTreeMap<String, (String, PathBuf)>) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, (rel, path)) in idx {
        // Only crypto and library modules provide the names soft
        // dependencies use; reading all 4,000 modules would take seconds.
        if !(rel.starts_with("kernel/crypto/") || rel.starts_with("kernel/lib/") || rel.starts_with("kernel/arch/")) {
            continue;
        }
        for a in read_module(rel, path)?.aliases {
            if !a.contains(['*', '?', '[']) {
                out.entry(norm(&a)).or_default().push(name.clone());
            }
        }
    }
    Ok(out)
}

/// `name` and its dependencies, dependencies first (a load order).
fn load_order(sel: &BTreeMap<String, Module>, name: &str, seen: &mut BTreeSet<String>, out: &mut Vec<String>) {
    if !seen.insert(name.to_string()) {
        return;
    }
    if let Some(m) = sel.get(name) {
        for d in &m.depends {
            load_order(sel, d, seen, out);
        }
    }
    out.push(name.to_string());
}

/// `modules.dep` for the selection. As `depmod` writes it: each line is
/// `module: deps…` with the dependencies in reverse load order (modprobe
/// loads from the end of the list).
pub fn modules_dep(sel: &BTreeMap<String, Module>) -> String {
    let mut text = String::new();
    for (name, m) in sel {
        let mut order = Vec::new();
        load_order(sel, name, &mut BTreeSet::new(), &mut order);
        order.pop(); // the module itself, last
        let deps: Vec<&str> = order.iter().rev().map(|d| sel[d].rel.as_str()).collect();
        text.push_str(&m.rel);
        text.push(':');
        for d in deps {
            text.push(' ');
            text.push_str(d);
        }
        text.push('\n');
    }
    text
}

/// `modules.alias`: `alias PATTERN module` for every alias of the selection
/// (what `modprobe $(cat /sys/…/modalias)` matches against).
pub fn modules_alias(sel: &BTreeMap<String, Module>) -> String {
    let mut text = String::new();
    for (name, m) in sel {
        for a in &m.aliases {
            text.push_str(&format!("alias {a} {name}\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rel: &str, deps: &[&str]) -> Module {
        Module {
            rel: rel.into(),
            path: PathBuf::new(),
            depends: deps.iter().map(|d| d.to_string()).collect(),
            softdeps: vec![],
            aliases: vec![format!("pci:v*d*{rel}")],
        }
    }

    #[test]
    fn modules_dep_lists_dependencies_in_reverse_load_order() {
        let mut sel = BTreeMap::new();
        sel.insert("failover".into(), m("kernel/net/failover.ko", &[]));
        sel.insert("net_failover".into(), m("kernel/net/net_failover.ko", &["failover"]));
        sel.insert("virtio_net".into(), m("kernel/virtio_net.ko", &["net_failover"]));
        let dep = modules_dep(&sel);
        assert!(
            dep.contains("kernel/virtio_net.ko: kernel/net/net_failover.ko kernel/net/failover.ko\n"),
            "{dep}"
        );
        assert!(dep.contains("kernel/net/failover.ko:\n"), "{dep}");
        let mut order = Vec::new();
        load_order(&sel, "virtio_net", &mut BTreeSet::new(), &mut order);
        assert_eq!(order, ["failover", "net_failover", "virtio_net"]);
        assert!(modules_alias(&sel).contains("alias pci:v*d*kernel/virtio_net.ko virtio_net\n"));
    }
}
