//! Debian packages through the host's apt: which versions (the host's
//! candidates), downloading into the cache (`apt-get download`, kept and
//! reused by file name, which holds the version), and extracting each once
//! (`dpkg-deb -x` into a directory named after the `.deb`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?} (is this a Debian host with apt?)", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `Depends` and `PreDepends` of each package, first alternative only
/// (`a | b` needs just `a`), virtual packages left out; with `recurse`, of
/// every package reached too (one `apt-cache` run: each takes about a
/// second to load apt's cache).
pub fn depends(pkgs: &[String], recurse: bool) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut cmd = Command::new("apt-cache");
    cmd.arg("depends");
    if recurse {
        cmd.arg("--recurse");
    }
    let out = run(cmd
        .args([
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
        ])
        .args(pkgs))?;
    Ok(parse_depends(&out))
}

fn parse_depends(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    // True after a `|Depends:` line: the next line is another alternative
    // of the same dependency.
    let mut in_alternatives = false;
    for line in text.lines() {
        if !line.starts_with(' ') {
            current = (!line.starts_with('<')).then(|| line.trim().to_string());
            if let Some(c) = &current {
                out.entry(c.clone()).or_default();
            }
            in_alternatives = false;
            continue;
        }
        let Some(pkg) = &current else { continue };
        let t = line.trim_start();
        let (alt, t) = match t.strip_prefix('|') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let Some((kind, name)) = t.split_once(": ") else {
            continue;
        };
        if kind != "Depends" && kind != "PreDepends" {
            continue;
        }
        let skip = in_alternatives;
        in_alternatives = alt;
        if skip || name.starts_with('<') {
            continue;
        }
        out.get_mut(pkg).expect("current").push(name.trim().to_string());
    }
    out
}

/// Resolves a metapackage such as `linux-image-amd64` to the versioned
/// package it depends on (`linux-image-6.1.0-57-amd64`); a versioned name
/// is returned as it is. `deps` must hold the recursive dependencies.
pub fn resolve_kernel_package(name: &str, deps: &BTreeMap<String, Vec<String>>) -> anyhow::Result<String> {
    let mut name = name.to_string();
    for _ in 0..4 {
        let next = deps
            .get(&name)
            .with_context(|| format!("apt knows no package {name}"))?
            .iter()
            .find(|d| d.starts_with("linux-image-"))
            .cloned();
        match next {
            Some(n) => name = n,
            None => return Ok(name),
        }
    }
    bail!("{name}: too many levels of linux-image metapackages")
}

/// Packages that hold shared libraries: named `lib…` (and zlib1g). The
/// libraries a tool links against come from these packages, not the host.
fn is_library_package(name: &str) -> bool {
    (name.starts_with("lib") && !name.ends_with("-dev") && !name.ends_with("-perl") && !name.contains("-common"))
        || name == "zlib1g"
}

/// `roots` and the library packages they depend on, transitively, from
/// the recursive dependencies `deps`.
pub fn with_library_closure(
    roots: &[String],
    deps: &BTreeMap<String, Vec<String>>,
) -> anyhow::Result<BTreeSet<String>> {
    let mut all: BTreeSet<String> = BTreeSet::new();
    let mut stack: Vec<String> = roots.to_vec();
    while let Some(p) = stack.pop() {
        if !all.insert(p.clone()) {
            continue;
        }
        let d = deps.get(&p).with_context(|| format!("apt knows no package {p}"))?;
        stack.extend(d.iter().filter(|d| is_library_package(d) && !all.contains(*d)).cloned());
    }
    Ok(all)
}

/// A package as apt would download it now.
#[derive(Debug, Clone)]
pub struct Deb {
    pub package: String,
    /// The `.deb`'s file name, as `apt-get download` writes it.
    pub file: String,
}

/// The `.deb` file name of each package's candidate version.
pub fn candidates(pkgs: &BTreeSet<String>) -> anyhow::Result<Vec<Deb>> {
    let list: Vec<&String> = pkgs.iter().collect();
    let out = run(Command::new("apt-get")
        .args(["download", "--print-uris", "-q"])
        .args(&list))?;
    let mut debs = Vec::new();
    for line in out.lines() {
        // 'URL' FILE SIZE HASH
        let mut words = line.split_whitespace();
        let (Some(_url), Some(file)) = (words.next(), words.next()) else {
            continue;
        };
        let package = file.split('_').next().unwrap_or(file).to_string();
        debs.push(Deb {
            package,
            file: file.to_string(),
        });
    }
    for p in pkgs {
        if !debs.iter().any(|d| &d.package == p) {
            bail!("apt has no download for {p} (apt-get update?)");
        }
    }
    Ok(debs)
}

/// Downloads the debs not yet in `dir`. Returns how many were fetched.
pub fn download(debs: &[Deb], dir: &Path) -> anyhow::Result<usize> {
    let missing: Vec<&Deb> = debs.iter().filter(|d| !dir.join(&d.file).exists()).collect();
    if missing.is_empty() {
        return Ok(0);
    }
    // Into a fresh directory first: a download cut short never leaves a
    // partial .deb under its final name.
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot write to {}", dir.display()))?;
    // apt drops privileges to `_apt` when it can; a cache it cannot write
    // only draws a warning and the download runs as the caller.
    run(Command::new("apt-get")
        .args(["download", "-q"])
        .args(missing.iter().map(|d| d.package.as_str()))
        .current_dir(tmp.path()))?;
    for d in &missing {
        let from = tmp.path().join(&d.file);
        if !from.exists() {
            bail!(
                "apt-get download did not write {} (the candidate changed meanwhile? retry)",
                d.file
            );
        }
        std::fs::rename(&from, dir.join(&d.file))?;
    }
    Ok(missing.len())
}

/// Extracts `deb` under `root` once: `root/NAME/` (NAME: the file name
/// without `.deb`), written to a temporary directory and renamed.
pub fn extract(debs_dir: &Path, deb: &Deb, root: &Path) -> anyhow::Result<PathBuf> {
    let dest = root.join(deb.file.trim_end_matches(".deb"));
    if dest.is_dir() {
        return Ok(dest);
    }
    let tmp = tempfile::Builder::new().prefix(".extract-").tempdir_in(root)?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(debs_dir.join(&deb.file))
        .arg(tmp.path()))?;
    std::fs::rename(tmp.keep(), &dest)?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_takes_the_first_alternative_and_skips_virtual_packages() {
        let text = "lvm2\n  Depends: libaio1\n |Depends: libsystemd0\n  Depends: libelogind0\n  \
                    Depends: <debconf-2.0>\n  PreDepends: init-system-helpers\n  Recommends: thin\n\
                    <debconf-2.0>\n  Depends: foo\nlinux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        let d = parse_depends(text);
        assert_eq!(d["lvm2"], ["libaio1", "libsystemd0", "init-system-helpers"]);
        assert_eq!(d["linux-image-amd64"], ["linux-image-6.1.0-57-amd64"]);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn library_packages() {
        assert!(is_library_package("libdevmapper1.02.1"));
        assert!(is_library_package("zlib1g"));
        assert!(!is_library_package("libsemanage-common"));
        assert!(!is_library_package("udev"));
    }
}
