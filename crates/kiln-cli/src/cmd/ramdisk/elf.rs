//! Just enough of ELF (64-bit, little-endian: x86-64) to build a ramdisk:
//! is a binary static, which shared libraries does it need, what does a
//! kernel module's `.modinfo` say. Reads the whole file into memory; the
//! largest input is a kernel module of a few MB.

use anyhow::{Context, bail};

/// What the ramdisk builder needs to know about one ELF file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ElfInfo {
    /// `PT_INTERP`: the dynamic loader's path. None for a static binary.
    pub interp: Option<String>,
    /// `DT_NEEDED` sonames, in file order.
    pub needed: Vec<String>,
}

/// `len` bytes at `off`, or an error (never a panic, whatever the offsets).
fn bytes(b: &[u8], off: usize, len: usize) -> anyhow::Result<&[u8]> {
    off.checked_add(len)
        .and_then(|end| b.get(off..end))
        .context("ELF truncated or offset out of range")
}

fn u16_at(b: &[u8], off: usize) -> anyhow::Result<u16> {
    let s = bytes(b, off, 2)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> anyhow::Result<u32> {
    let s = bytes(b, off, 4)?;
    Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], off: usize) -> anyhow::Result<u64> {
    let s = bytes(b, off, 8)?;
    Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

fn usize_at(b: &[u8], off: usize) -> anyhow::Result<usize> {
    usize::try_from(u64_at(b, off)?).context("ELF offset too large")
}

/// True if `bytes` starts like an ELF file.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

fn check_header(b: &[u8]) -> anyhow::Result<()> {
    if !is_elf(b) {
        bail!("not an ELF file");
    }
    if b.len() < 64 {
        bail!("ELF header truncated");
    }
    if b[4] != 2 || b[5] != 1 {
        bail!("not a 64-bit little-endian ELF file (this builds x86-64 ramdisks)");
    }
    Ok(())
}

/// A NUL-terminated string at `off`.
fn c_str(b: &[u8], off: usize) -> anyhow::Result<String> {
    let rest = b.get(off..).context("ELF string offset out of range")?;
    let end = rest.iter().position(|&c| c == 0).context("ELF string not terminated")?;
    Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
}

struct Phdr {
    kind: u32,
    offset: usize,
    vaddr: u64,
    filesz: usize,
}

fn program_headers(b: &[u8]) -> anyhow::Result<Vec<Phdr>> {
    let phoff = usize_at(b, 0x20)?;
    let phentsize = usize::from(u16_at(b, 0x36)?);
    let phnum = usize::from(u16_at(b, 0x38)?);
    if phnum > 0 && phentsize < 56 {
        bail!("ELF program header entries too small");
    }
    (0..phnum)
        .map(|i| {
            let p = i
                .checked_mul(phentsize)
                .and_then(|x| x.checked_add(phoff))
                .context("ELF program header offset out of range")?;
            Ok(Phdr {
                kind: u32_at(b, p)?,
                offset: usize_at(b, p + 0x08)?,
                vaddr: u64_at(b, p + 0x10)?,
                filesz: usize_at(b, p + 0x20)?,
            })
        })
        .collect()
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;

/// The loader and the needed libraries of an executable or shared library.
pub fn read_info(b: &[u8]) -> anyhow::Result<ElfInfo> {
    check_header(b)?;
    let phdrs = program_headers(b)?;
    let mut info = ElfInfo::default();
    if let Some(p) = phdrs.iter().find(|p| p.kind == PT_INTERP) {
        let raw = bytes(b, p.offset, p.filesz)?;
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        info.interp = Some(String::from_utf8_lossy(&raw[..end]).into_owned());
    }
    let Some(dynamic) = phdrs.iter().find(|p| p.kind == PT_DYNAMIC) else {
        return Ok(info);
    };
    // The dynamic section: (tag, value) pairs up to DT_NULL.
    let mut needed_offsets = Vec::new();
    let mut strtab_vaddr = None;
    let table = bytes(b, dynamic.offset, dynamic.filesz)?;
    for entry in table.chunks_exact(16) {
        let tag = u64_at(entry, 0)?;
        let val = u64_at(entry, 8)?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed_offsets.push(val),
            DT_STRTAB => strtab_vaddr = Some(val),
            _ => {}
        }
    }
    if needed_offsets.is_empty() {
        return Ok(info);
    }
    let strtab_vaddr = strtab_vaddr.context("ELF has DT_NEEDED but no DT_STRTAB")?;
    // DT_STRTAB is an address: find the loaded segment that holds it.
    let seg = phdrs
        .iter()
        .find(|p| p.kind == PT_LOAD && p.vaddr <= strtab_vaddr && strtab_vaddr - p.vaddr < p.filesz as u64)
        .context("DT_STRTAB is in no loaded segment")?;
    let strtab = bytes(b, seg.offset, seg.filesz)?;
    let strtab = &strtab[usize::try_from(strtab_vaddr - seg.vaddr)?..];
    for off in needed_offsets {
        info.needed.push(c_str(strtab, usize::try_from(off)?)?);
    }
    Ok(info)
}

/// The contents of the section named `name`, if there is one.
pub fn section<'a>(b: &'a [u8], name: &str) -> anyhow::Result<Option<&'a [u8]>> {
    check_header(b)?;
    let shoff = usize_at(b, 0x28)?;
    let shentsize = usize::from(u16_at(b, 0x3a)?);
    let shnum = usize::from(u16_at(b, 0x3c)?);
    let shstrndx = usize::from(u16_at(b, 0x3e)?);
    if shnum == 0 {
        return Ok(None);
    }
    if shentsize < 64 || shstrndx >= shnum {
        bail!("ELF section headers malformed");
    }
    let sh = |i: usize| -> anyhow::Result<&[u8]> {
        let at = i
            .checked_mul(shentsize)
            .and_then(|x| x.checked_add(shoff))
            .context("ELF section header offset out of range")?;
        bytes(b, at, 64)
    };
    let names_hdr = sh(shstrndx)?;
    let names = bytes(b, usize_at(names_hdr, 0x18)?, usize_at(names_hdr, 0x20)?)?;
    for i in 0..shnum {
        let h = sh(i)?;
        let name_off = usize::try_from(u32_at(h, 0)?)?;
        if c_str(names, name_off)? == name {
            return Ok(Some(bytes(b, usize_at(h, 0x18)?, usize_at(h, 0x20)?)?));
        }
    }
    Ok(None)
}

/// A kernel module's `.modinfo` as (key, value) pairs, in order.
pub fn modinfo(b: &[u8]) -> anyhow::Result<Vec<(String, String)>> {
    let Some(raw) = section(b, ".modinfo")? else {
        bail!("no .modinfo section: not a kernel module");
    };
    Ok(raw
        .split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running test binary is a dynamically linked ELF on Linux.
    #[test]
    fn reads_the_test_binary_itself() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let info = read_info(&me).unwrap();
        assert!(info.interp.as_deref().unwrap().contains("ld-linux"), "{info:?}");
        assert!(info.needed.iter().any(|n| n.starts_with("libc.so")), "{info:?}");
        assert!(section(&me, ".text").unwrap().is_some());
        assert!(section(&me, ".no-such-section").unwrap().is_none());
    }

    #[test]
    fn refuses_what_is_not_elf() {
        assert!(read_info(b"#!/bin/sh\necho hi\n").is_err());
        assert!(read_info(b"\x7fELF").is_err());
        let mut elf32 = vec![0u8; 64];
        elf32[..4].copy_from_slice(b"\x7fELF");
        elf32[4] = 1;
        assert!(read_info(&elf32).unwrap_err().to_string().contains("64-bit"));
    }

    #[test]
    fn garbage_never_panics() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Truncations of a real header and table area, and bit flips in it.
        for len in [64, 65, 100, 200, 1000, 4096] {
            let _ = read_info(&me[..len.min(me.len())]);
            let _ = section(&me[..len.min(me.len())], ".text");
        }
        for i in 16..128 {
            let mut m = me[..8192.min(me.len())].to_vec();
            m[i] ^= 0xff;
            let _ = read_info(&m);
            let _ = section(&m, ".modinfo");
        }
    }
}
