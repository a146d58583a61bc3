//! A read-only qcow2 reader that decodes an image *as it streams in*,
//! without seeking the source: written for the agent, which reads images
//! from an HTTP body and has no disk to spool them to.
//!
//! qcow2 (versions 2 and 3) maps the guest disk through two levels of
//! tables: the header points at the L1 table, each L1 entry at an L2 table,
//! each L2 entry at a data cluster, a compressed cluster (zlib's raw
//! deflate or zstd), or nothing (reads as zeros). The tables may sit
//! anywhere in the file, so the reader keeps a queue of what it knows is
//! ahead — "the L2 table for guest bytes X at file offset Y" — and handles
//! each when the stream reaches it. `qemu-img convert` writes every table
//! before the clusters it maps, so its images stream with no buffering;
//! with `-c` its parallel writers may put a compressed cluster a little
//! before its L2 table (13 KB seen, with 512-byte clusters). For those,
//! and for other layouts (an L1 table moved to the end by `qemu-img
//! resize`), the bytes passed while a table is still unread are kept, up
//! to a limit ("look-behind", 64 MiB by default); an image that needs more
//! is refused with the command that rewrites it streamable.
//!
//! Refused, each with its own message: a backing file (the image is not
//! self-contained), encryption, an external data file, extended L2 entries
//! (subclusters), the "corrupt" flag, unknown incompatible features, and
//! headers or tables whose values cannot be right (offsets off cluster
//! boundaries or inside the header, an L1 table too small for the disk,
//! reserved bits set). The header's own checks are a pure function,
//! [`parse_header`]. Refcounts and snapshots are never read: a reader
//! needs neither, which is also why the "dirty" flag is accepted.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Seek, Write};

use super::{ImageError, Meter, Source, Target, read_full};

/// Every offset field: bits 9–55.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits that must be zero: 0–8 and 56–62 (63 is "copied").
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits that must be zero: 1–8 and 56–61.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;

/// qemu's largest L1 table.
const MAX_L1_BYTES: u64 = 32 << 20;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_EXTERNAL_DATA | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2;

const EXT_ENCRYPTION: u32 = 0x0537_be77;
const EXT_EXTERNAL_DATA: u32 = 0x4441_5441;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

/// What the reader needs from a qcow2 header, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// The guest disk's size in bytes.
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub compression: Compression,
    /// Not closed cleanly: refcounts may be stale, which a reader ignores.
    pub dirty: bool,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest bytes one L2 table maps.
    fn l2_span(&self) -> u64 {
        self.cluster_size() * (self.cluster_size() / 8)
    }

    /// L1 entries the guest size needs.
    fn l1_needed(&self) -> u64 {
        self.size.div_ceil(self.l2_span())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Qcow2Error {
    #[error("qcow2 header is cut short: {have} bytes, it needs {need}")]
    ShortHeader { have: usize, need: usize },
    #[error("not a qcow2 image: no QFI\\xfb magic")]
    NoMagic,
    #[error("qcow2 version {0} is not supported: versions 2 and 3 are")]
    Version(u32),
    #[error(
        "qcow2 image has a backing file{}: the agent writes self-contained images only; flatten it with \
         `qemu-img convert -O qcow2 IMAGE FLAT.qcow2`",
        .0.as_ref().map(|n| format!(" (`{n}`)")).unwrap_or_default()
    )]
    BackingFile(Option<String>),
    #[error("qcow2 image is encrypted: the agent cannot decrypt it")]
    Encrypted,
    #[error("qcow2 image is flagged corrupt by qemu: repair it with `qemu-img check -r all`")]
    MarkedCorrupt,
    #[error("qcow2 image keeps its data in an external file: the agent needs it in the image")]
    ExternalData,
    #[error(
        "qcow2 image uses extended L2 entries (subclusters), which the agent does not read: rewrite it with \
         `qemu-img convert -O qcow2 -o extended_l2=off`"
    )]
    ExtendedL2,
    #[error("qcow2 image has incompatible features the agent does not know ({0:#x})")]
    UnknownFeatures(u64),
    #[error("qcow2 compression type {0} is unknown: 0 (zlib) and 1 (zstd) are")]
    CompressionType(u8),
    #[error("qcow2 image is corrupt: {0}")]
    Corrupt(String),
    #[error("qcow2 image ends at byte {file_bytes}, inside the {what} at byte {offset}: it was cut short")]
    Truncated {
        what: &'static str,
        offset: u64,
        file_bytes: u64,
    },
    #[error(
        "qcow2 image is not streamable: the cluster at byte {offset} comes before the table that maps it, \
         more than {lookbehind} bytes back; rewrite it with `qemu-img convert -O qcow2` (which writes tables \
         first)"
    )]
    NotStreamable { offset: u64, lookbehind: usize },
    #[error("qcow2 compressed cluster for guest byte {guest} does not decompress: {why}")]
    Decompress { guest: u64, why: String },
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks a qcow2 header. `first` is the start of the file: the whole
/// first cluster where the file has it (header extensions live there).
pub fn parse_header(first: &[u8]) -> Result<Header, Qcow2Error> {
    let corrupt = |why: String| Err(Qcow2Error::Corrupt(why));
    if first.len() < 4 || first[..4] != super::QCOW2_MAGIC {
        return Err(if first.len() < 4 {
            Qcow2Error::ShortHeader {
                have: first.len(),
                need: 72,
            }
        } else {
            Qcow2Error::NoMagic
        });
    }
    if first.len() < 72 {
        return Err(Qcow2Error::ShortHeader {
            have: first.len(),
            need: 72,
        });
    }
    let version = be32(first, 4);
    if !(2..=3).contains(&version) {
        return Err(Qcow2Error::Version(version));
    }
    let backing_file_offset = be64(first, 8);
    let backing_file_size = be32(first, 16) as usize;
    if backing_file_offset != 0 {
        let name = usize::try_from(backing_file_offset)
            .ok()
            .and_then(|at| first.get(at..at.checked_add(backing_file_size.min(1023))?))
            .map(|b| String::from_utf8_lossy(b).into_owned());
        return Err(Qcow2Error::BackingFile(name));
    }
    let cluster_bits = be32(first, 20);
    if !(9..=21).contains(&cluster_bits) {
        return corrupt(format!("cluster_bits is {cluster_bits}, outside 9-21"));
    }
    let cluster_size = 1u64 << cluster_bits;
    let size = be64(first, 24);
    if be32(first, 32) != 0 {
        return Err(Qcow2Error::Encrypted);
    }
    let l1_size = be32(first, 36);
    let l1_table_offset = be64(first, 40);

    let (header_length, compression) = if version == 3 {
        if first.len() < 104 {
            return Err(Qcow2Error::ShortHeader {
                have: first.len(),
                need: 104,
            });
        }
        let incompatible = be64(first, 72);
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Qcow2Error::MarkedCorrupt);
        }
        if incompatible & INCOMPAT_EXTERNAL_DATA != 0 {
            return Err(Qcow2Error::ExternalData);
        }
        if incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(Qcow2Error::ExtendedL2);
        }
        if incompatible & !INCOMPAT_KNOWN != 0 {
            return Err(Qcow2Error::UnknownFeatures(incompatible & !INCOMPAT_KNOWN));
        }
        let refcount_order = be32(first, 96);
        if refcount_order > 6 {
            return corrupt(format!("refcount_order is {refcount_order}, above 6"));
        }
        let header_length = be32(first, 100) as u64;
        if header_length < 104 || !header_length.is_multiple_of(8) || header_length > cluster_size {
            return corrupt(format!(
                "header_length is {header_length}: it must be a multiple of 8 from 104 to the cluster size"
            ));
        }
        let compression = if incompatible & INCOMPAT_COMPRESSION != 0 {
            if header_length < 105 || first.len() < 105 {
                return corrupt("the compression type bit is set but the header has no compression type".into());
            }
            match first[104] {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                other => return Err(Qcow2Error::CompressionType(other)),
            }
        } else {
            Compression::Zlib
        };
        (header_length, compression)
    } else {
        (72, Compression::Zlib)
    };
    check_extensions(first, header_length as usize, cluster_size as usize)?;

    let header = Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_table_offset,
        compression,
        dirty: version == 3 && be64(first, 72) & INCOMPAT_DIRTY != 0,
    };
    if size > i64::MAX as u64 {
        return corrupt(format!("the disk size {size} is beyond any disk"));
    }
    let needed = header.l1_needed();
    if u64::from(l1_size) < needed {
        return corrupt(format!(
            "the L1 table has {l1_size} entries but a {size}-byte disk needs {needed}"
        ));
    }
    if u64::from(l1_size) * 8 > MAX_L1_BYTES {
        return corrupt(format!(
            "the L1 table has {l1_size} entries, more than qemu ever writes"
        ));
    }
    if l1_size > 0 && (!l1_table_offset.is_multiple_of(cluster_size) || l1_table_offset < cluster_size) {
        return corrupt(format!(
            "the L1 table's offset {l1_table_offset} is not a cluster boundary after the header"
        ));
    }
    Ok(header)
}

/// Header extensions: type, length, data padded to 8 bytes, until type 0,
/// all inside the first cluster.
fn check_extensions(first: &[u8], from: usize, cluster_size: usize) -> Result<(), Qcow2Error> {
    let end = cluster_size.min(first.len());
    let mut at = from;
    while at + 8 <= end {
        let kind = be32(first, at);
        let len = be32(first, at + 4) as usize;
        if kind == 0 {
            return Ok(());
        }
        match kind {
            EXT_ENCRYPTION => return Err(Qcow2Error::Encrypted),
            EXT_EXTERNAL_DATA => return Err(Qcow2Error::ExternalData),
            _ => {}
        }
        let next = at + 8 + len.div_ceil(8) * 8;
        if next > cluster_size {
            return Err(Qcow2Error::Corrupt(format!(
                "header extension {kind:#x} at byte {at} runs past the first cluster"
            )));
        }
        at = next;
    }
    // The whole first cluster is here and no extension ended the list.
    if end == cluster_size {
        return Err(Qcow2Error::Corrupt("header extensions have no end marker".into()));
    }
    Ok(())
}

/// Something at a known offset in the file, to handle when the stream
/// gets there.
#[derive(Debug, Clone, Copy)]
enum Need {
    L1,
    L2 { index: u64 },
    Data { guest: u64 },
    Compressed { guest: u64, len: u64 },
}

/// Streams the image from `src` (positioned at its first byte, nothing
/// consumed) onto `out`.
pub(super) fn stream<R: Read, W: Write + Seek>(
    src: &mut Source<R>,
    out: &mut Target<'_, W>,
    meter: &mut Meter<'_>,
    lookbehind: usize,
) -> Result<(), ImageError> {
    let mut file = FileStream::new(src, lookbehind);
    let start = file.fetch(0, 104, true)?;
    // The cluster size first, then the whole first cluster.
    let cluster_bits = if start.len() >= 24 { be32(&start, 20) } else { 16 };
    let first = file.fetch(0, 1 << cluster_bits.clamp(9, 21), true)?;
    let h = parse_header(&first)?;
    out.check_fits(h.size)?;

    let mut reader = Reader {
        h,
        pending: BTreeMap::new(),
        unread_tables: 0,
    };
    if h.l1_size > 0 && h.size > 0 {
        reader.queue(h.l1_table_offset, Need::L1);
        reader.unread_tables = 1;
    } else {
        out.write_zeros(0, h.size)?;
    }
    while let Some(mut entry) = reader.pending.first_entry() {
        let start = *entry.key();
        let need = entry.get_mut().pop().expect("no empty lists are kept");
        if entry.get().is_empty() {
            entry.remove();
        }
        // Keep passed bytes only while a table that may point back at
        // them is unread, or a need behind the stream is still queued.
        let behind = reader
            .pending
            .first_key_value()
            .is_some_and(|(s, _)| *s < file.window_start);
        file.keep_passed = reader.unread_tables > 0 || behind || start < file.window_start;
        let bytes = match need {
            Need::L1 => file.fetch(start, u64::from(h.l1_size) * 8, false),
            Need::L2 { .. } => file.fetch(start, h.cluster_size(), false),
            Need::Data { guest } => file.fetch(start, h.cluster_size().min(h.size - guest), false),
            Need::Compressed { len, .. } => file.fetch(start, len, true),
        }
        .map_err(|e| e.named(need))?;
        reader.handle(need, &bytes, out)?;
        meter.report(file.src.bytes, out.written, false);
    }
    Ok(())
}

/// The tables read so far and what they still point at.
struct Reader {
    h: Header,
    /// By file offset: what is there.
    pending: BTreeMap<u64, Vec<Need>>,
    /// Tables queued but not yet read.
    unread_tables: u64,
}

impl Reader {
    fn queue(&mut self, offset: u64, need: Need) {
        self.pending.entry(offset).or_default().push(need);
    }

    fn corrupt(why: String) -> ImageError {
        ImageError::Qcow2(Qcow2Error::Corrupt(why))
    }

    /// Checks a table's or a data cluster's offset: on a cluster boundary,
    /// after the header.
    fn check_offset(&self, offset: u64, what: &str) -> Result<(), ImageError> {
        if !offset.is_multiple_of(self.h.cluster_size()) || offset < self.h.cluster_size() {
            return Err(Self::corrupt(format!(
                "{what} points at byte {offset}, not a cluster boundary after the header"
            )));
        }
        Ok(())
    }

    fn handle<W: Write + Seek>(&mut self, need: Need, bytes: &[u8], out: &mut Target<'_, W>) -> Result<(), ImageError> {
        let h = self.h;
        match need {
            Need::L1 => {
                self.unread_tables -= 1;
                for (i, entry) in bytes.chunks_exact(8).enumerate().take(h.l1_needed() as usize) {
                    let entry = be64(entry, 0);
                    let i = i as u64;
                    if entry & L1_RESERVED != 0 {
                        return Err(Self::corrupt(format!(
                            "L1 entry {i} has reserved bits set ({entry:#018x})"
                        )));
                    }
                    let guest = i * h.l2_span();
                    let offset = entry & OFFSET_MASK;
                    if offset == 0 {
                        // No L2 table: that whole span reads as zeros.
                        out.write_zeros(guest, h.l2_span().min(h.size - guest))?;
                    } else {
                        self.check_offset(offset, &format!("L1 entry {i}"))?;
                        self.queue(offset, Need::L2 { index: i });
                        self.unread_tables += 1;
                    }
                }
            }
            Need::L2 { index } => {
                self.unread_tables -= 1;
                let cs = h.cluster_size();
                let mut zeros: Option<(u64, u64)> = None;
                for (j, entry) in bytes.chunks_exact(8).enumerate() {
                    let guest = index * h.l2_span() + j as u64 * cs;
                    if guest >= h.size {
                        break;
                    }
                    let entry = be64(entry, 0);
                    let len = cs.min(h.size - guest);
                    let zero = if entry & L2_COMPRESSED != 0 {
                        // Offset in the low x bits, then the count of
                        // 512-byte sectors beyond the first.
                        let x = 62 - (h.cluster_bits - 8);
                        let offset = entry & ((1 << x) - 1);
                        let sectors = ((entry >> x) & ((1 << (h.cluster_bits - 8)) - 1)) + 1;
                        if offset < cs {
                            return Err(Self::corrupt(format!(
                                "compressed cluster for guest byte {guest} points into the header"
                            )));
                        }
                        let stored = sectors * 512 - (offset & 511);
                        self.queue(offset, Need::Compressed { guest, len: stored });
                        false
                    } else if entry & L2_RESERVED != 0 {
                        return Err(Self::corrupt(format!(
                            "L2 entry for guest byte {guest} has reserved bits set ({entry:#018x})"
                        )));
                    } else if entry & L2_ZERO != 0 {
                        if h.version < 3 {
                            return Err(Self::corrupt(format!(
                                "L2 entry for guest byte {guest} has the zero flag, which version 2 does not have"
                            )));
                        }
                        true
                    } else if entry & OFFSET_MASK == 0 {
                        true
                    } else {
                        let offset = entry & OFFSET_MASK;
                        self.check_offset(offset, &format!("L2 entry for guest byte {guest}"))?;
                        self.queue(offset, Need::Data { guest });
                        false
                    };
                    // Runs of zero clusters become one write.
                    zeros = match (zeros, zero) {
                        (Some((at, n)), true) => Some((at, n + len)),
                        (None, true) => Some((guest, len)),
                        (Some((at, n)), false) => {
                            out.write_zeros(at, n)?;
                            None
                        }
                        (None, false) => None,
                    };
                }
                if let Some((at, n)) = zeros {
                    out.write_zeros(at, n)?;
                }
            }
            Need::Data { guest } => out.write_at(guest, bytes)?,
            Need::Compressed { guest, .. } => {
                let len = h.cluster_size().min(h.size - guest) as usize;
                let cluster = decompress(h, guest, bytes, len)?;
                out.write_at(guest, &cluster[..len])?;
            }
        }
        Ok(())
    }
}

/// Decompresses one cluster; at least `len` bytes must come out.
fn decompress(h: Header, guest: u64, input: &[u8], len: usize) -> Result<Vec<u8>, Qcow2Error> {
    let mut out = vec![0u8; h.cluster_size() as usize];
    let fail = |why: String| Qcow2Error::Decompress { guest, why };
    let got = match h.compression {
        // Raw deflate, no zlib header (qemu's window bits -12); the stored
        // bytes run on into the next cluster's, which is why the stream
        // may not end where the input does.
        Compression::Zlib => {
            use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
            let mut state = DecompressorOxide::new();
            let (status, _, got) = decompress(
                &mut state,
                input,
                &mut out,
                0,
                inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
            );
            if got < len {
                return Err(fail(format!(
                    "deflate stopped with {status:?} after {got} of {len} bytes"
                )));
            }
            got
        }
        Compression::Zstd => {
            let mut frame = ruzstd::decoding::StreamingDecoder::new(input).map_err(|e| fail(format!("zstd: {e}")))?;
            read_full(&mut frame, &mut out).map_err(|e| fail(format!("zstd: {e}")))?
        }
    };
    if got < len {
        return Err(fail(format!("{got} bytes came out, the cluster has {len}")));
    }
    Ok(out)
}

impl ImageError {
    /// Names the part of the file a truncation error happened in.
    fn named(self, need: Need) -> ImageError {
        match self {
            ImageError::Qcow2(Qcow2Error::Truncated { offset, file_bytes, .. }) => {
                ImageError::Qcow2(Qcow2Error::Truncated {
                    what: match need {
                        Need::L1 => "L1 table",
                        Need::L2 { .. } => "L2 table",
                        Need::Data { .. } => "data cluster",
                        Need::Compressed { .. } => "compressed cluster",
                    },
                    offset,
                    file_bytes,
                })
            }
            other => other,
        }
    }
}

/// The source as a forward-only file: hands out byte ranges in ascending
/// order, keeping the current range (ranges may overlap: compressed
/// clusters share sectors) and, while `keep_passed`, up to a limit of the
/// bytes it has passed.
struct FileStream<'s, R> {
    src: &'s mut Source<R>,
    /// Bytes from `window_start` on, read and not yet passed.
    window: Vec<u8>,
    window_start: u64,
    eof: bool,
    /// The most recent passed bytes, ending at `window_start`.
    passed: VecDeque<u8>,
    keep_passed: bool,
    lookbehind: usize,
}

impl<'s, R: Read> FileStream<'s, R> {
    fn new(src: &'s mut Source<R>, lookbehind: usize) -> Self {
        FileStream {
            src,
            window: vec![],
            window_start: 0,
            eof: false,
            passed: VecDeque::new(),
            keep_passed: true,
            lookbehind,
        }
    }

    fn end(&self) -> u64 {
        self.window_start + self.window.len() as u64
    }

    /// Moves `n` bytes from the window's front to the passed bytes.
    fn pass(&mut self, n: usize) {
        if self.keep_passed {
            self.passed.extend(self.window.drain(..n));
            let excess = self.passed.len().saturating_sub(self.lookbehind);
            self.passed.drain(..excess);
        } else {
            self.passed.clear();
            self.window.drain(..n);
        }
        self.window_start += n as u64;
    }

    /// Reads more into the window until it holds `want` bytes, or the end.
    fn fill(&mut self, want: u64) -> Result<(), ImageError> {
        while (self.window.len() as u64) < want && !self.eof {
            let n = (want - self.window.len() as u64).min(super::CHUNK as u64) as usize;
            let at = self.window.len();
            self.window.resize(at + n, 0);
            let got = read_full(self.src, &mut self.window[at..]).map_err(|e| self.src.error(e))?;
            self.window.truncate(at + got);
            if got < n {
                self.eof = true;
            }
        }
        Ok(())
    }

    fn truncated(&self, offset: u64) -> ImageError {
        ImageError::Qcow2(Qcow2Error::Truncated {
            what: "header",
            offset,
            file_bytes: self.end(),
        })
    }

    /// Bytes `[start, start + len)`; fewer at the file's end if
    /// `allow_short`.
    fn fetch(&mut self, start: u64, len: u64, allow_short: bool) -> Result<Vec<u8>, ImageError> {
        if start < self.window_start {
            return self.behind(start, len, allow_short);
        }
        // Pass everything before `start`, reading it first if needed.
        loop {
            let before = (start - self.window_start).min(self.window.len() as u64) as usize;
            self.pass(before);
            if self.window_start == start {
                break;
            }
            self.fill((start - self.window_start).min(super::CHUNK as u64))?;
            if self.window.is_empty() {
                return Err(self.truncated(start));
            }
        }
        self.fill(len)?;
        if (self.window.len() as u64) < len && !allow_short {
            return Err(self.truncated(start));
        }
        let n = len.min(self.window.len() as u64) as usize;
        if n == 0 {
            return Err(self.truncated(start));
        }
        Ok(self.window[..n].to_vec())
    }

    /// A range that starts before the window: from the passed bytes, if
    /// they reach back that far.
    fn behind(&mut self, start: u64, len: u64, allow_short: bool) -> Result<Vec<u8>, ImageError> {
        let passed_start = self.window_start - self.passed.len() as u64;
        if start < passed_start {
            return Err(ImageError::Qcow2(Qcow2Error::NotStreamable {
                offset: start,
                lookbehind: self.lookbehind,
            }));
        }
        let from = (start - passed_start) as usize;
        let to = ((start + len).min(self.window_start) - passed_start) as usize;
        let mut out: Vec<u8> = self.passed.range(from..to).copied().collect();
        if start + len > self.window_start {
            let rest = self.window_start;
            out.extend(self.fetch(rest, start + len - rest, allow_short)?);
        }
        Ok(out)
    }
}
