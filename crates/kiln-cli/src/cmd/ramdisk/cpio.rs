//! A reproducible cpio archive in the "newc" format (what the kernel
//! unpacks as an initramfs): entries sorted by path, owned by root, mtime 0,
//! inode numbers counted from 1, no hard links.
//!
//! Ours rather than a crate: the format is a 110-byte ASCII header, the
//! name and the data, each padded to 4 bytes, and we need full control of
//! every field for reproducibility and for device nodes, which the build
//! makes without root (no `mknod` on the build host).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;

/// What one archive entry is. Paths are relative, without a leading `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    /// A regular file whose contents are read from a file on the build
    /// host when the archive is written.
    File {
        source: PathBuf,
        mode: u32,
    },
    /// A regular file with these contents.
    Bytes {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink(String),
    /// A character device node (major, minor).
    CharDev(u32, u32),
}

/// The archive's contents: path → entry, ordered by path.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    pub entries: BTreeMap<String, Entry>,
}

impl Tree {
    /// Adds `path` and every parent directory missing so far. A later
    /// insert of the same path replaces the earlier one.
    pub fn insert(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/').to_string();
        let mut parent = path.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            self.entries.entry(p.to_string()).or_insert(Entry::Dir);
            parent = p;
        }
        self.entries.insert(path, entry);
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

fn pad4(w: &mut impl Write, len: u64) -> io::Result<()> {
    let pad = (4 - (len % 4) as usize) % 4;
    w.write_all(&[0u8; 3][..pad])
}

fn header(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<()> {
    let namesize = name.len() + 1;
    write!(
        w,
        "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}\
         {dmaj:08X}{dmin:08X}{rmaj:08X}{rmin:08X}{namesize:08X}{check:08X}",
        uid = 0,
        gid = 0,
        mtime = 0,
        dmaj = 0,
        dmin = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        check = 0,
    )?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, 110 + namesize as u64)
}

/// Writes `tree` as a newc archive ending with the `TRAILER!!!` entry.
pub fn write(tree: &Tree, mut w: impl Write) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut ino = 0u32;
    for (path, entry) in &tree.entries {
        ino += 1;
        match entry {
            Entry::Dir => header(&mut w, ino, S_IFDIR | 0o755, 2, 0, (0, 0), path)?,
            Entry::CharDev(major, minor) => header(&mut w, ino, S_IFCHR | 0o600, 1, 0, (*major, *minor), path)?,
            Entry::Symlink(target) => {
                header(&mut w, ino, S_IFLNK | 0o777, 1, target.len() as u32, (0, 0), path)?;
                w.write_all(target.as_bytes())?;
                pad4(&mut w, target.len() as u64)?;
            }
            Entry::Bytes { data, mode } => {
                let size = u32::try_from(data.len()).context("file over 4 GiB")?;
                header(&mut w, ino, S_IFREG | (mode & 0o7777), 1, size, (0, 0), path)?;
                w.write_all(data)?;
                pad4(&mut w, data.len() as u64)?;
            }
            Entry::File { source, mode } => {
                let file = std::fs::File::open(source).with_context(|| format!("cannot read {}", source.display()))?;
                let len = file.metadata()?.len();
                let size = u32::try_from(len).with_context(|| format!("{} is over 4 GiB", source.display()))?;
                header(&mut w, ino, S_IFREG | (mode & 0o7777), 1, size, (0, 0), path)?;
                // Exactly `len` bytes, even if the file changed meanwhile:
                // the header already said how many.
                let copied = io::copy(&mut file.take(len), &mut w)?;
                if copied != len {
                    anyhow::bail!("{} shrank while it was archived", source.display());
                }
                pad4(&mut w, len)?;
            }
        }
    }
    header(&mut w, 0, 0, 1, 0, (0, 0), "TRAILER!!!")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a newc archive back: (name, mode, rdev major, data) per entry.
    pub fn parse(mut b: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&b[..6], b"070701", "magic at {offset}");
            let field =
                |i: usize| u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap();
            let mode = field(1);
            let size = field(6) as usize;
            let rmaj = field(9);
            let namesize = field(11) as usize;
            assert_eq!(field(5), 0, "mtime");
            assert_eq!(field(2), 0, "uid");
            let name = std::str::from_utf8(&b[110..110 + namesize - 1]).unwrap().to_string();
            let data_at = (110 + namesize).div_ceil(4) * 4;
            let data = b[data_at..data_at + size].to_vec();
            let next = (data_at + size).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                assert_eq!(next, b.len());
                return out;
            }
            out.push((name, mode, rmaj, data));
            b = &b[next..];
            offset += next;
        }
    }

    #[test]
    fn round_trip_sorted_with_parents() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("agent");
        std::fs::write(&src, b"12345").unwrap();
        let mut t = Tree::default();
        t.insert(
            "/usr/bin/kiln-agent",
            Entry::File {
                source: src,
                mode: 0o755,
            },
        );
        t.insert("bin", Entry::Symlink("usr/bin".into()));
        t.insert("dev/console", Entry::CharDev(5, 1));
        t.insert(
            "init",
            Entry::Bytes {
                data: b"#!/bin/sh\n".to_vec(),
                mode: 0o755,
            },
        );
        let mut out = Vec::new();
        write(&t, &mut out).unwrap();
        let entries = parse(&out);
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "dev",
                "dev/console",
                "init",
                "usr",
                "usr/bin",
                "usr/bin/kiln-agent"
            ]
        );
        assert_eq!(entries[0].1, S_IFLNK | 0o777);
        assert_eq!(entries[0].3, b"usr/bin");
        assert_eq!(entries[2].1, S_IFCHR | 0o600);
        assert_eq!(entries[2].2, 5);
        assert_eq!(entries[6].3, b"12345");
        assert_eq!(entries[6].1, S_IFREG | 0o755);
        // Reproducible: the same tree gives the same bytes.
        let mut again = Vec::new();
        write(&t, &mut again).unwrap();
        assert_eq!(out, again);
    }
}
