//! The image writer: streams an OS image from any reader (an HTTP body, a
//! file) onto any seekable writer (a block device), decoding it on the way,
//! and proves it wrote what the catalog holds.
//!
//! - **Formats** are told by their magic, never by a file name: raw, raw
//!   compressed with zstd (`28 B5 2F FD`), qcow2 (`QFI\xfb`, versions 2
//!   and 3, zlib or zstd compressed clusters, decoded by [`qcow2`], our own
//!   reader). The format found must be the one the catalog says.
//! - **The checksum** is SHA-256 over the bytes of the image *file* as
//!   read from the source — compressed or qcow2 as it is — which is what
//!   `sha256sum IMAGE` prints and what `OsImageCreate.sha256` ("SHA-256 of
//!   the image") records. Every byte of the source is read and hashed, to
//!   the end, even bytes a decoder does not need.
//! - **A disk that failed is not bootable.** Before the first byte the
//!   target's first MiB is zeroed, and the image's own first MiB (boot
//!   sector, partition table) is held in memory and written last, only
//!   after the checksum matched and everything else was flushed. On any
//!   error the target's first and last MiB (and the last MiB of what the
//!   image wrote: a GPT's backup header) are zeroed, so firmware finds
//!   neither a boot sector nor a partition table to boot the half-written
//!   disk from.
//! - **Progress** (bytes read, bytes written, rate) goes to a callback at
//!   most once per interval and once at the end.
//!
//! Reads that return a few bytes at a time, writes that take part of a
//! buffer, and `Interrupted` from either are all normal here.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::Digest;

pub mod qcow2;

/// Bytes held back at the start of the image, and zeroed at both ends of
/// the target on failure: covers an MBR, a GPT with its 128 entries, and
/// the usual 1 MiB gap before the first partition.
pub const HEAD_BYTES: u64 = 1 << 20;

/// Decoded data goes out in writes of up to this size.
const CHUNK: usize = 1 << 20;

/// How an image file is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageFormat {
    #[serde(rename = "raw")]
    Raw,
    #[serde(rename = "raw+zstd")]
    RawZstd,
    #[serde(rename = "qcow2")]
    Qcow2,
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

impl ImageFormat {
    pub const ALL: [ImageFormat; 3] = [ImageFormat::Raw, ImageFormat::RawZstd, ImageFormat::Qcow2];

    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::RawZstd => "raw+zstd",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// The format an image starts like. Anything without a known magic is
    /// raw: a raw disk image can start with any bytes.
    pub fn detect(first_bytes: &[u8]) -> ImageFormat {
        if first_bytes.starts_with(&ZSTD_MAGIC) {
            ImageFormat::RawZstd
        } else if first_bytes.starts_with(&QCOW2_MAGIC) {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        }
    }

    /// The format a file name suggests (`.qcow2`, `.zst`, `.raw`/`.img`),
    /// for tools that fill in a catalog entry; the writer itself trusts
    /// only the magic.
    pub fn from_file_name(name: &str) -> Option<ImageFormat> {
        let name = name.rsplit('/').next().unwrap_or(name).to_ascii_lowercase();
        if name.ends_with(".qcow2") {
            Some(ImageFormat::Qcow2)
        } else if name.ends_with(".zst") || name.ends_with(".zstd") {
            Some(ImageFormat::RawZstd)
        } else if name.ends_with(".raw") || name.ends_with(".img") {
            Some(ImageFormat::Raw)
        } else {
            None
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ImageFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| format!("unknown image format `{s}`: expected raw, raw+zstd or qcow2"))
    }
}

/// A SHA-256 digest; parsed from and shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    pub fn of(bytes: &[u8]) -> Sha256 {
        Sha256(sha2::Sha256::digest(bytes).into())
    }
}

impl FromStr for Sha256 {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 32];
        match hex::decode_to_slice(s.trim(), &mut out) {
            Ok(()) => Ok(Sha256(out)),
            Err(_) => Err(format!("`{s}` is not a SHA-256: expected 64 hex digits")),
        }
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

impl Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// What the catalog says about the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedImage {
    pub format: ImageFormat,
    /// Of the image file's bytes (see the module's documentation).
    pub sha256: Sha256,
    /// The image file's length, when known (an HTTP Content-Length): only
    /// for progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_bytes: Option<u64>,
}

/// How to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOptions {
    /// The target's size: an image that would write past it is refused
    /// (qcow2: before the first byte, from its header). `None` for a
    /// target that grows (a file).
    pub target_bytes: Option<u64>,
    /// The target reads as zeros already (freshly discarded or created),
    /// so runs of zeros are skipped instead of written.
    pub target_is_zeroed: bool,
    /// How many bytes of a qcow2 file the reader keeps in case a table met
    /// later points back at them (see [`qcow2`]).
    pub qcow2_lookbehind_bytes: usize,
    pub progress_every: Duration,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            target_bytes: None,
            target_is_zeroed: false,
            qcow2_lookbehind_bytes: 64 << 20,
            progress_every: Duration::from_secs(1),
        }
    }
}

/// How far the write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes read from the image file so far.
    pub source_bytes: u64,
    /// The image file's length, when known.
    pub source_total: Option<u64>,
    /// Bytes of the decoded image put on the target (zeros skipped on a
    /// zeroed target count as put).
    pub written_bytes: u64,
    pub elapsed: Duration,
    /// This is the last report, sent when the write succeeded.
    pub done: bool,
}

impl Progress {
    /// Decoded bytes per second so far.
    pub fn rate_bytes_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.written_bytes as f64 / secs
        } else {
            0.0
        }
    }

    /// Percent of the image file read, when its length is known.
    pub fn percent(&self) -> Option<f64> {
        self.source_total
            .filter(|t| *t > 0)
            .map(|t| (self.source_bytes as f64 * 100.0 / t as f64).min(100.0))
    }
}

/// What a successful write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReport {
    pub format: ImageFormat,
    pub sha256: Sha256,
    /// The image file's length.
    pub source_bytes: u64,
    /// The decoded image's length: how far into the target it reaches.
    pub image_bytes: u64,
    pub elapsed: Duration,
}

/// Why an image was not written. Whatever the reason, the target was made
/// unbootable, unless the error is [`ImageError::NotCleaned`].
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image is {found} but the catalog says {expected}")]
    FormatMismatch { expected: ImageFormat, found: ImageFormat },
    #[error(
        "SHA-256 of the image is {actual} but the catalog says {expected}: the image changed or arrived \
         damaged"
    )]
    ChecksumMismatch { expected: Sha256, actual: Sha256 },
    #[error("the image needs {image_bytes} bytes but the target has {target_bytes}")]
    TooLarge { image_bytes: u64, target_bytes: u64 },
    #[error("cannot read the image after {at} bytes")]
    Source {
        at: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the target at byte {at}")]
    Target {
        at: u64,
        #[source]
        source: io::Error,
    },
    #[error("the zstd stream is corrupt after {at} bytes of the image: {why}")]
    Zstd { at: u64, why: String },
    #[error(transparent)]
    Qcow2(#[from] qcow2::Qcow2Error),
    #[error("{error}; and zeroing the target's first and last MiB failed too, so it may still boot")]
    NotCleaned {
        error: Box<ImageError>,
        #[source]
        cleanup: io::Error,
    },
}

/// Wraps a device so that `flush` also makes the data durable
/// (`sync_data`): the writer flushes before it writes the image's first
/// MiB, so a power cut never leaves a boot sector pointing at data still
/// in the page cache.
#[derive(Debug)]
pub struct SyncOnFlush(pub std::fs::File);

impl Write for SyncOnFlush {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.0.sync_data()
    }
}

impl Seek for SyncOnFlush {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}

/// Writes the image from `source` to `target`; see the module's
/// documentation for what is checked and what a failure leaves.
pub fn write_image<R: Read, W: Write + Seek>(
    source: R,
    target: &mut W,
    expected: &ExpectedImage,
    options: &WriteOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<WriteReport, ImageError> {
    let mut src = Source::new(source);
    let mut out = Target::new(target, options);
    let mut meter = Meter {
        started: Instant::now(),
        last: None,
        every: options.progress_every,
        total: expected.file_bytes,
        callback: progress,
    };
    match write_checked(&mut src, &mut out, &mut meter, expected, options) {
        Ok(report) => {
            meter.report(src.bytes, out.written, true);
            Ok(report)
        }
        Err(error) => match out.make_unbootable() {
            Ok(()) => Err(error),
            Err(cleanup) => Err(ImageError::NotCleaned {
                error: Box::new(error),
                cleanup,
            }),
        },
    }
}

fn write_checked<R: Read, W: Write + Seek>(
    src: &mut Source<R>,
    out: &mut Target<'_, W>,
    meter: &mut Meter<'_>,
    expected: &ExpectedImage,
    options: &WriteOptions,
) -> Result<WriteReport, ImageError> {
    // Whatever booted from this disk before cannot boot from it while the
    // image is being written, nor after a crash half way.
    out.zero_head()?;
    let found = ImageFormat::detect(src.peek(4)?);
    if found != expected.format {
        return Err(ImageError::FormatMismatch {
            expected: expected.format,
            found,
        });
    }
    match found {
        ImageFormat::Raw => copy_raw(src, out, meter)?,
        ImageFormat::RawZstd => copy_zstd(src, out, meter)?,
        ImageFormat::Qcow2 => qcow2::stream(src, out, meter, options.qcow2_lookbehind_bytes)?,
    }
    src.drain()?;
    let actual = src.digest();
    if actual != expected.sha256 {
        return Err(ImageError::ChecksumMismatch {
            expected: expected.sha256,
            actual,
        });
    }
    out.commit()?;
    Ok(WriteReport {
        format: found,
        sha256: actual,
        source_bytes: src.bytes,
        image_bytes: out.extent,
        elapsed: meter.started.elapsed(),
    })
}

/// Fills `buf` as far as the reader goes: fewer bytes only at the end.
fn read_full(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn copy_raw<R: Read, W: Write + Seek>(
    src: &mut Source<R>,
    out: &mut Target<'_, W>,
    meter: &mut Meter<'_>,
) -> Result<(), ImageError> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    loop {
        let n = read_full(src, &mut buf).map_err(|e| src.error(e))?;
        if n == 0 {
            return Ok(());
        }
        out.write_at(at, &buf[..n])?;
        at += n as u64;
        meter.report(src.bytes, out.written, false);
    }
}

/// Zstd frames one after another (as `zstd` and `pzstd` write them), and
/// skippable frames between them.
fn copy_zstd<R: Read, W: Write + Seek>(
    src: &mut Source<R>,
    out: &mut Target<'_, W>,
    meter: &mut Meter<'_>,
) -> Result<(), ImageError> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    loop {
        let magic = src.peek(4)?.to_vec();
        if magic.is_empty() {
            return Ok(());
        }
        let skippable = <[u8; 4]>::try_from(magic.as_slice())
            .is_ok_and(|m| (0x184D2A50..=0x184D2A5F).contains(&u32::from_le_bytes(m)));
        if skippable {
            let mut header = [0u8; 8];
            let got = read_full(src, &mut header).map_err(|e| src.error(e))?;
            let length = u64::from(u32::from_le_bytes([header[4], header[5], header[6], header[7]]));
            let skipped = io::copy(&mut src.by_ref().take(length), &mut io::sink()).map_err(|e| src.error(e))?;
            if got < 8 || skipped < length {
                return Err(src.zstd_error("a skippable frame is cut short"));
            }
            continue;
        }
        let mut frame = match ruzstd::decoding::StreamingDecoder::new(&mut *src) {
            Ok(frame) => frame,
            Err(e) => return Err(src.zstd_error(e)),
        };
        loop {
            let n = match read_full(&mut frame, &mut buf) {
                Ok(n) => n,
                Err(e) => return Err(frame.get_mut().zstd_error(e)),
            };
            if n == 0 {
                break;
            }
            out.write_at(at, &buf[..n])?;
            at += n as u64;
            meter.report(frame.get_ref().bytes, out.written, false);
        }
    }
}

/// The image file as read: every byte hashed and counted exactly once,
/// with a few bytes of look-ahead for format detection.
struct Source<R> {
    inner: R,
    hasher: sha2::Sha256,
    /// Bytes read from `inner` (and hashed).
    bytes: u64,
    /// Read and hashed but not yet handed out.
    peeked: Vec<u8>,
    /// The last error the reader gave: the zstd decoder wraps the errors
    /// of the reader under it with its own, and this tells them apart.
    failed: Option<io::Error>,
}

impl<R: Read> Source<R> {
    fn new(inner: R) -> Self {
        Source {
            inner,
            hasher: sha2::Sha256::new(),
            bytes: 0,
            peeked: vec![],
            failed: None,
        }
    }

    fn error(&self, source: io::Error) -> ImageError {
        ImageError::Source { at: self.bytes, source }
    }

    /// An error out of the zstd decoder: the reader's, if it failed, else
    /// the stream's.
    fn zstd_error(&mut self, why: impl fmt::Display) -> ImageError {
        match self.failed.take() {
            Some(source) => self.error(source),
            None => ImageError::Zstd {
                at: self.bytes,
                why: why.to_string(),
            },
        }
    }

    /// The next `n` bytes without consuming them (fewer at the end).
    fn peek(&mut self, n: usize) -> Result<&[u8], ImageError> {
        while self.peeked.len() < n {
            let mut buf = vec![0u8; n - self.peeked.len()];
            let got = read_full(&mut self.inner, &mut buf).map_err(|e| self.error(e))?;
            self.hasher.update(&buf[..got]);
            self.bytes += got as u64;
            self.peeked.extend_from_slice(&buf[..got]);
            if got < buf.len() {
                break;
            }
        }
        Ok(&self.peeked[..n.min(self.peeked.len())])
    }

    /// Reads the rest, so the hash covers the whole file.
    fn drain(&mut self) -> Result<(), ImageError> {
        io::copy(self, &mut io::sink()).map(drop).map_err(|e| self.error(e))
    }

    fn digest(&mut self) -> Sha256 {
        Sha256(std::mem::take(&mut self.hasher).finalize().into())
    }
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.peeked.is_empty() {
            let n = buf.len().min(self.peeked.len());
            buf[..n].copy_from_slice(&self.peeked[..n]);
            self.peeked.drain(..n);
            return Ok(n);
        }
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.hasher.update(&buf[..n]);
                    self.bytes += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.failed = Some(io::Error::new(e.kind(), e.to_string()));
                    return Err(e);
                }
            }
        }
    }
}

/// The target, with the image's first [`HEAD_BYTES`] held back in memory.
struct Target<'a, W> {
    inner: &'a mut W,
    head: Vec<u8>,
    /// Where `inner`'s cursor is, to skip needless seeks.
    pos: Option<u64>,
    /// Decoded bytes put (or, on a zeroed target, skipped as zeros).
    written: u64,
    /// How far into the target the image reaches.
    extent: u64,
    limit: Option<u64>,
    target_is_zeroed: bool,
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

impl<'a, W: Write + Seek> Target<'a, W> {
    fn new(inner: &'a mut W, options: &WriteOptions) -> Self {
        Target {
            inner,
            head: vec![0; HEAD_BYTES as usize],
            pos: None,
            written: 0,
            extent: 0,
            limit: options.target_bytes,
            target_is_zeroed: options.target_is_zeroed,
        }
    }

    fn error(at: u64) -> impl FnOnce(io::Error) -> ImageError {
        move |source| ImageError::Target { at, source }
    }

    /// Refuses an image that reaches past the target's end.
    fn check_fits(&self, image_bytes: u64) -> Result<(), ImageError> {
        match self.limit {
            Some(target_bytes) if image_bytes > target_bytes => Err(ImageError::TooLarge {
                image_bytes,
                target_bytes,
            }),
            _ => Ok(()),
        }
    }

    /// Writes straight to the device (not through the held-back head).
    fn put(&mut self, at: u64, data: &[u8]) -> Result<(), ImageError> {
        if self.pos != Some(at) {
            self.pos = None;
            self.inner.seek(SeekFrom::Start(at)).map_err(Self::error(at))?;
        }
        // write_all: a device may take part of a buffer per call, and
        // retries `Interrupted` itself.
        self.inner.write_all(data).map_err(Self::error(at))?;
        self.pos = Some(at + data.len() as u64);
        Ok(())
    }

    /// Puts decoded image bytes at `at`.
    fn write_at(&mut self, at: u64, data: &[u8]) -> Result<(), ImageError> {
        let end = at + data.len() as u64;
        self.check_fits(end)?;
        self.extent = self.extent.max(end);
        self.written += data.len() as u64;
        let mut data = data;
        let mut at = at;
        if at < HEAD_BYTES {
            let n = ((HEAD_BYTES - at) as usize).min(data.len());
            self.head[at as usize..at as usize + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            at += n as u64;
        }
        if data.is_empty() || (self.target_is_zeroed && data.iter().all(|b| *b == 0)) {
            return Ok(());
        }
        self.put(at, data)
    }

    /// Puts `len` zero bytes at `at` (unallocated parts of a qcow2 image).
    fn write_zeros(&mut self, at: u64, len: u64) -> Result<(), ImageError> {
        if self.target_is_zeroed {
            // Only the bookkeeping; the head buffer is zeros already.
            self.check_fits(at + len)?;
            self.extent = self.extent.max(at + len);
            self.written += len;
            return Ok(());
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64);
            self.write_at(at + done, &ZEROS[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    fn zero_range(&mut self, at: u64, len: u64) -> Result<(), ImageError> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64);
            self.put(at + done, &ZEROS[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Zeroes the target's first MiB (less, on a smaller target).
    fn zero_head(&mut self) -> Result<(), ImageError> {
        let len = self.limit.map_or(HEAD_BYTES, |l| l.min(HEAD_BYTES));
        self.zero_range(0, len)?;
        self.inner.flush().map_err(Self::error(0))
    }

    /// Makes the rest durable, then writes the image's first MiB.
    fn commit(&mut self) -> Result<(), ImageError> {
        self.inner.flush().map_err(Self::error(self.extent))?;
        let head_len = self.extent.min(HEAD_BYTES) as usize;
        let head = std::mem::take(&mut self.head);
        self.put(0, &head[..head_len])?;
        self.inner.flush().map_err(Self::error(0))
    }

    /// Zeroes the first and last MiB of the target and the last MiB of
    /// what the image wrote.
    fn make_unbootable(&mut self) -> io::Result<()> {
        let unwrap = |r: Result<(), ImageError>| {
            r.map_err(|e| match e {
                ImageError::Target { source, .. } => source,
                other => io::Error::other(other.to_string()),
            })
        };
        self.pos = None;
        let end = self.inner.seek(SeekFrom::End(0))?;
        unwrap(self.zero_range(0, self.limit.map_or(HEAD_BYTES, |l| l.min(HEAD_BYTES))))?;
        for tail_end in [end, self.extent] {
            if tail_end > HEAD_BYTES {
                let start = tail_end.saturating_sub(HEAD_BYTES).max(HEAD_BYTES);
                unwrap(self.zero_range(start, tail_end - start))?;
            }
        }
        self.inner.flush()
    }
}

/// Sends progress at most once per interval.
struct Meter<'a> {
    started: Instant,
    last: Option<Instant>,
    every: Duration,
    total: Option<u64>,
    callback: &'a mut dyn FnMut(&Progress),
}

impl Meter<'_> {
    fn report(&mut self, source_bytes: u64, written_bytes: u64, done: bool) {
        let now = Instant::now();
        if !done && self.last.is_some_and(|last| now.duration_since(last) < self.every) {
            return;
        }
        self.last = Some(now);
        (self.callback)(&Progress {
            source_bytes,
            source_total: self.total,
            written_bytes,
            elapsed: now.duration_since(self.started),
            done,
        });
    }
}

#[cfg(test)]
mod tests;
