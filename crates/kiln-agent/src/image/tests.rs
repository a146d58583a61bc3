//! The image writer: round trips through awkward readers and writers,
//! checksum and format refusals, what a failure leaves on the target, and
//! qcow2 images laid out every which way by a small builder of our own
//! (the qemu-img fixtures are in `tests/image_fixtures.rs`).

use std::io::Cursor;

use proptest::prelude::*;

use super::qcow2::{Compression, Qcow2Error, parse_header};
use super::*;

const MIB: usize = 1 << 20;

fn expect(format: ImageFormat, file: &[u8]) -> ExpectedImage {
    ExpectedImage {
        format,
        sha256: Sha256::of(file),
        file_bytes: Some(file.len() as u64),
    }
}

fn fast() -> WriteOptions {
    WriteOptions {
        progress_every: Duration::ZERO,
        ..WriteOptions::default()
    }
}

fn write(file: &[u8], expected: &ExpectedImage, target: &mut Cursor<Vec<u8>>) -> Result<WriteReport, ImageError> {
    write_image(file, target, expected, &fast(), &mut |_| {})
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

/// An image with a recognisable boot sector and a body.
fn disk_image(len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    if len >= 512 {
        d[510] = 0x55;
        d[511] = 0xaa;
    }
    d
}

/// A reader that hands out 1 to 7 bytes per call and now and then says
/// `Interrupted`, as a slow socket might.
struct Trickle<'a> {
    data: &'a [u8],
    sizes: Vec<u8>,
    calls: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        let step = self.sizes[self.calls % self.sizes.len()];
        if step == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = usize::from(step).min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// A target that takes only part of each write, says `Interrupted` now and
/// then, and records where each write landed.
struct Grudging {
    inner: Cursor<Vec<u8>>,
    sizes: Vec<usize>,
    calls: usize,
    writes: Vec<(u64, usize)>,
    /// Fails every write once this many bytes went in.
    fail_after: Option<usize>,
    put: usize,
}

impl Grudging {
    fn new(len: usize, fill: u8, sizes: Vec<usize>) -> Self {
        Grudging {
            inner: Cursor::new(vec![fill; len]),
            sizes,
            calls: 0,
            writes: vec![],
            fail_after: None,
            put: 0,
        }
    }
}

impl Write for Grudging {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.fail_after.is_some_and(|limit| self.put >= limit) {
            return Err(io::Error::other("medium error"));
        }
        self.calls += 1;
        let step = self.sizes[self.calls % self.sizes.len()];
        if step == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let at = self.inner.position();
        let n = self.inner.write(&buf[..step.min(buf.len())])?;
        self.writes.push((at, n));
        self.put += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Grudging {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

#[test]
fn formats_by_magic() {
    assert_eq!(ImageFormat::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]), ImageFormat::RawZstd);
    assert_eq!(ImageFormat::detect(b"QFI\xfb\0\0\0\x03"), ImageFormat::Qcow2);
    assert_eq!(ImageFormat::detect(b"\xeb\x63\x90"), ImageFormat::Raw);
    assert_eq!(ImageFormat::detect(b""), ImageFormat::Raw);
    assert_eq!(
        ImageFormat::from_file_name("http://h/debian-12.qcow2"),
        Some(ImageFormat::Qcow2)
    );
    assert_eq!(ImageFormat::from_file_name("x.img.zst"), Some(ImageFormat::RawZstd));
    assert_eq!(ImageFormat::from_file_name("x.raw"), Some(ImageFormat::Raw));
    assert_eq!(ImageFormat::from_file_name("x.iso"), None);
    for f in ImageFormat::ALL {
        assert_eq!(f.to_string().parse::<ImageFormat>(), Ok(f));
        assert_eq!(serde_json::to_string(&f).unwrap(), format!("\"{f}\""));
    }
    assert!(
        "vmdk"
            .parse::<ImageFormat>()
            .unwrap_err()
            .contains("raw, raw+zstd or qcow2")
    );
}

#[test]
fn sha256_text() {
    let h = Sha256::of(b"abc");
    let text = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    assert_eq!(h.to_string(), text);
    assert_eq!(text.to_uppercase().parse::<Sha256>(), Ok(h), "upper case is read too");
    assert!("abc".parse::<Sha256>().is_err());
    assert_eq!(serde_json::from_str::<Sha256>(&format!("\"{text}\"")).unwrap(), h);
}

#[test]
fn raw_round_trip_writes_the_boot_sector_last() {
    let image = disk_image(3 * MIB + 1000);
    let mut target = Grudging::new(8 * MIB, 0xee, vec![65536]);
    let report = write_image(
        &image[..],
        &mut target,
        &expect(ImageFormat::Raw, &image),
        &fast(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.image_bytes, image.len() as u64);
    assert_eq!(report.source_bytes, image.len() as u64);
    assert_eq!(report.sha256, Sha256::of(&image));
    let disk = target.inner.get_ref();
    assert_eq!(&disk[..image.len()], &image[..]);
    assert!(disk[image.len()..].iter().all(|b| *b == 0xee), "nothing past the image");
    // The first writes zero the first MiB; the image's first MiB is the
    // last thing written.
    let head_writes: Vec<usize> = target
        .writes
        .iter()
        .enumerate()
        .filter(|(_, (at, _))| *at < HEAD_BYTES)
        .map(|(i, _)| i)
        .collect();
    let last_body = target.writes.iter().rposition(|(at, _)| *at >= HEAD_BYTES).unwrap();
    assert!(head_writes[0] == 0 && *head_writes.last().unwrap() > last_body);
}

#[test]
fn zstd_round_trip_and_frames() {
    let image = disk_image(2 * MIB + 77);
    let file = zstd(&image);
    let mut target = Cursor::new(vec![]);
    write(&file, &expect(ImageFormat::RawZstd, &file), &mut target).unwrap();
    assert_eq!(&target.get_ref()[..image.len()], &image[..]);
    // Two frames with a skippable frame between them.
    let mut file = zstd(&image[..MIB]);
    file.extend_from_slice(&[0x5e, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
    file.extend(zstd(&image[MIB..]));
    let mut target = Cursor::new(vec![]);
    write(&file, &expect(ImageFormat::RawZstd, &file), &mut target).unwrap();
    assert_eq!(&target.get_ref()[..image.len()], &image[..]);
}

#[test]
fn a_wrong_checksum_leaves_the_target_unbootable() {
    for format in [ImageFormat::Raw, ImageFormat::RawZstd] {
        let image = disk_image(3 * MIB);
        let file = if format == ImageFormat::Raw {
            image.clone()
        } else {
            zstd(&image)
        };
        let mut expected = expect(format, &file);
        expected.sha256 = Sha256::of(b"another image");
        let mut target = Cursor::new(vec![0xaa; 8 * MIB]);
        let e = write(&file, &expected, &mut target).unwrap_err();
        assert!(matches!(e, ImageError::ChecksumMismatch { .. }), "{e}");
        assert!(e.to_string().contains("the catalog says"), "{e}");
        let disk = target.get_ref();
        assert!(disk[..MIB].iter().all(|b| *b == 0), "{format}: first MiB zeroed");
        assert!(
            disk[7 * MIB..].iter().all(|b| *b == 0),
            "{format}: target's last MiB zeroed"
        );
        assert!(
            disk[2 * MIB..3 * MIB].iter().all(|b| *b == 0),
            "{format}: image's last MiB zeroed"
        );
        assert_eq!(disk[MIB..2 * MIB], image[MIB..2 * MIB], "the rest is left as written");
    }
}

#[test]
fn the_format_must_be_the_catalogs() {
    let image = disk_image(MIB);
    let mut target = Cursor::new(vec![0xaa; 4 * MIB]);
    let e = write(&image, &expect(ImageFormat::Qcow2, &image), &mut target).unwrap_err();
    assert_eq!(e.to_string(), "the image is raw but the catalog says qcow2");
    assert!(target.get_ref()[..MIB].iter().all(|b| *b == 0));
    let file = zstd(&image);
    let e = write(&file, &expect(ImageFormat::Raw, &file), &mut Cursor::new(vec![])).unwrap_err();
    assert!(matches!(
        e,
        ImageError::FormatMismatch {
            found: ImageFormat::RawZstd,
            ..
        }
    ));
}

#[test]
fn read_errors_and_damaged_streams() {
    struct Broken<'a>(&'a [u8]);
    impl Read for Broken<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "peer reset"));
            }
            let n = buf.len().min(self.0.len()).min(4096);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let image = disk_image(2 * MIB);
    let file = zstd(&image);
    for (format, file) in [(ImageFormat::Raw, &image), (ImageFormat::RawZstd, &file)] {
        let mut target = Cursor::new(vec![0xaa; 4 * MIB]);
        let cut = &file[..file.len() / 2];
        let e = write_image(Broken(cut), &mut target, &expect(format, file), &fast(), &mut |_| {}).unwrap_err();
        assert!(
            matches!(e, ImageError::Source { at, .. } if at == cut.len() as u64),
            "{format}: {e:?}"
        );
        assert!(target.get_ref()[..MIB].iter().all(|b| *b == 0));
    }
    // Cut short and damaged zstd streams.
    let cut = &file[..file.len() - 10];
    let e = refused(
        write(cut, &expect(ImageFormat::RawZstd, &file), &mut Cursor::new(vec![])),
        "cut zstd",
    );
    assert!(matches!(e, ImageError::Zstd { .. }), "{e}");
    // Damage may still decode (to other bytes: zstd's own checksum is not
    // read); the catalog's SHA-256 of the file catches it either way.
    let mut damaged = file.clone();
    for b in &mut damaged[20..60] {
        *b ^= 0x5a;
    }
    let mut target = Cursor::new(vec![0xaa; 4 * MIB]);
    let e = refused(
        write(&damaged, &expect(ImageFormat::RawZstd, &file), &mut target),
        "damaged zstd",
    );
    assert!(
        matches!(e, ImageError::Zstd { .. } | ImageError::ChecksumMismatch { .. }),
        "{e}"
    );
    assert!(target.get_ref()[..MIB].iter().all(|b| *b == 0));
}

#[test]
fn a_target_too_small_or_failing() {
    let image = disk_image(3 * MIB);
    let options = WriteOptions {
        target_bytes: Some(2 * MIB as u64),
        ..fast()
    };
    let mut target = Cursor::new(vec![0xaa; 2 * MIB]);
    let e = write_image(
        &image[..],
        &mut target,
        &expect(ImageFormat::Raw, &image),
        &options,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(e, ImageError::TooLarge { target_bytes, .. } if target_bytes == 2 * MIB as u64),
        "{e}"
    );
    assert!(
        target.get_ref().iter().all(|b| *b == 0),
        "both MiBs of a 2 MiB target zeroed"
    );

    // A medium error half way; cleanup cannot write either.
    let mut target = Grudging::new(4 * MIB, 0xaa, vec![MIB]);
    target.fail_after = Some(2 * MIB);
    let e = write_image(
        &image[..],
        &mut target,
        &expect(ImageFormat::Raw, &image),
        &fast(),
        &mut |_| {},
    )
    .unwrap_err();
    let ImageError::NotCleaned { error, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(matches!(**error, ImageError::Target { .. }), "{error}");
    assert!(e.to_string().contains("may still boot"), "{e}");
}

#[test]
fn progress_is_reported_and_ends_done() {
    let image = disk_image(5 * MIB);
    let mut seen: Vec<Progress> = vec![];
    write_image(
        &image[..],
        &mut Cursor::new(vec![]),
        &expect(ImageFormat::Raw, &image),
        &fast(),
        &mut |p| seen.push(*p),
    )
    .unwrap();
    assert!(seen.len() >= 5, "{}", seen.len());
    assert!(seen.windows(2).all(|w| w[0].written_bytes <= w[1].written_bytes));
    let last = seen.last().unwrap();
    assert!(last.done && seen[..seen.len() - 1].iter().all(|p| !p.done));
    assert_eq!(
        (last.written_bytes, last.source_bytes),
        (image.len() as u64, image.len() as u64)
    );
    assert_eq!(last.percent(), Some(100.0));
    assert!(last.rate_bytes_per_sec() > 0.0);
    // Once per interval: a long interval gives just the end.
    let mut count = 0;
    let slow = WriteOptions {
        progress_every: Duration::from_secs(3600),
        ..WriteOptions::default()
    };
    write_image(
        &image[..],
        &mut Cursor::new(vec![]),
        &expect(ImageFormat::Raw, &image),
        &slow,
        &mut |_| count += 1,
    )
    .unwrap();
    assert_eq!(count, 2, "the first report and the last");
}

#[test]
fn a_zeroed_target_gets_no_zeros_written() {
    let mut image = vec![0u8; 4 * MIB];
    image[2 * MIB + 5] = 1;
    image[0] = 0xeb;
    let options = WriteOptions {
        target_is_zeroed: true,
        ..fast()
    };
    let mut target = Grudging::new(4 * MIB, 0, vec![usize::MAX]);
    write_image(
        &image[..],
        &mut target,
        &expect(ImageFormat::Raw, &image),
        &options,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(target.inner.get_ref(), &image);
    let body: usize = target
        .writes
        .iter()
        .filter(|(at, _)| *at >= HEAD_BYTES)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(body, MIB, "only the MiB holding the 1 goes out past the head");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any image, read a few bytes at a time and written a few bytes at a
    /// time, with `Interrupted` from both: the target ends up holding it.
    #[test]
    fn trickling_reads_and_partial_writes(
        image in prop::collection::vec(any::<u8>(), 0..200_000),
        zstd_it in any::<bool>(),
        read_sizes in prop::collection::vec(0u8..8, 1..16),
        write_sizes in prop::collection::vec(0usize..5000, 1..16),
    ) {
        prop_assume!(read_sizes.iter().any(|s| *s > 0) && write_sizes.iter().any(|s| *s > 0));
        // A raw image that happens to start like zstd or qcow2 is not raw.
        prop_assume!(ImageFormat::detect(&image) == ImageFormat::Raw);
        let (format, file) = if zstd_it { (ImageFormat::RawZstd, zstd(&image)) } else { (ImageFormat::Raw, image.clone()) };
        let source = Trickle { data: &file, sizes: read_sizes, calls: 0 };
        let mut target = Grudging::new(0, 0, write_sizes);
        let report = write_image(source, &mut target, &expect(format, &file), &fast(), &mut |_| {}).unwrap();
        prop_assert_eq!(report.image_bytes, image.len() as u64);
        let disk = target.inner.get_ref();
        prop_assert_eq!(&disk[..image.len()], &image[..]);
        // Past the image, only the zeroed first MiB.
        prop_assert!(disk[image.len()..].iter().all(|b| *b == 0));
    }

    /// With the wrong checksum, whatever the reads, the first and last MiB
    /// are zero at the end.
    #[test]
    fn wrong_checksum_always_zeroes_both_ends(
        len in 0usize..20_000,
        read_sizes in prop::collection::vec(1u8..8, 1..4),
    ) {
        let image = disk_image(len);
        prop_assume!(ImageFormat::detect(&image) == ImageFormat::Raw);
        let expected = ExpectedImage { format: ImageFormat::Raw, sha256: Sha256([7; 32]), file_bytes: None };
        let mut target = Cursor::new(vec![0xaa; 4 * MIB]);
        let source = Trickle { data: &image, sizes: read_sizes, calls: 0 };
        let e = refused(write_image(source, &mut target, &expected, &fast(), &mut |_| {}), "wrong checksum");
        let is_checksum = matches!(e, ImageError::ChecksumMismatch { .. });
        prop_assert!(is_checksum);
        prop_assert!(target.get_ref()[..MIB].iter().all(|b| *b == 0));
        prop_assert!(target.get_ref()[3 * MIB..].iter().all(|b| *b == 0));
    }
}

// ---- qcow2, from a builder of our own

/// What one guest cluster becomes in a built image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Compressed,
    /// v3's zero flag (v2: left unallocated).
    ZeroFlag,
    Unallocated,
}

/// Builds a qcow2 file for `disk`: one `kinds` entry per guest cluster
/// (zero and unallocated clusters read as zeros: the returned disk says
/// what a reader must produce); `order` shuffles where the L1 table, L2
/// tables and clusters go in the file (compressed clusters are packed
/// byte by byte, as qemu does, so their sector ranges overlap).
fn build_qcow2(
    disk: &[u8],
    version: u32,
    cluster_bits: u32,
    compression: Compression,
    kinds: &[Kind],
    order: Option<&[u64]>,
) -> (Vec<u8>, Vec<u8>) {
    let cs = 1usize << cluster_bits;
    let size = disk.len();
    let clusters = size.div_ceil(cs);
    let per_l2 = cs / 8;
    let l2_count = clusters.div_ceil(per_l2);
    let mut expected = disk.to_vec();

    // What goes in the file: (sort key, item).
    #[derive(Debug)]
    enum Item {
        L1,
        L2(usize),
        Data(usize),
        Compressed(usize, Vec<u8>),
    }
    let mut items = vec![Item::L1];
    items.extend((0..l2_count).map(Item::L2));
    for c in 0..clusters {
        let kind = kinds[c % kinds.len()];
        let range = c * cs..((c + 1) * cs).min(size);
        match kind {
            Kind::Data => items.push(Item::Data(c)),
            Kind::Compressed => {
                let mut full = disk[range.clone()].to_vec();
                full.resize(cs, 0);
                let packed = match compression {
                    Compression::Zlib => miniz_oxide::deflate::compress_to_vec(&full, 6),
                    Compression::Zstd => zstd(&full),
                };
                // Like qemu: a cluster that does not shrink is stored plain.
                if packed.len() + 512 < cs {
                    items.push(Item::Compressed(c, packed));
                } else {
                    items.push(Item::Data(c));
                }
            }
            Kind::ZeroFlag | Kind::Unallocated => expected[range].fill(0),
        }
    }
    let keys: Vec<u64> = match order {
        Some(keys) => (0..items.len()).map(|i| keys[i % keys.len()]).collect(),
        // Tables first, then clusters in guest order, as qemu-img writes.
        None => (0..items.len() as u64).collect(),
    };
    let mut placed: Vec<(u64, Item)> = keys.into_iter().zip(items).collect();
    placed.sort_by_key(|(k, _)| *k);

    let l1_bytes = (l2_count * 8).max(8);
    let mut at = cs;
    let mut offsets = vec![];
    for (_, item) in &placed {
        let len = match item {
            Item::Compressed(_, packed) => packed.len(),
            Item::L1 => l1_bytes.div_ceil(cs) * cs,
            _ => cs,
        };
        if !matches!(item, Item::Compressed(..)) {
            at = at.div_ceil(cs) * cs;
        }
        offsets.push(at);
        at += len;
    }
    let mut file = vec![0u8; at];
    let mut l1 = vec![0u64; l2_count];
    let mut l2 = vec![vec![0u64; per_l2]; l2_count];
    for c in 0..clusters {
        if kinds[c % kinds.len()] == Kind::ZeroFlag && version == 3 {
            l2[c / per_l2][c % per_l2] = 1;
        }
    }
    let mut l1_at = 0;
    for ((_, item), &off) in placed.iter().zip(&offsets) {
        match item {
            Item::L1 => l1_at = off,
            Item::L2(i) => l1[*i] = off as u64 | 1 << 63,
            Item::Data(c) => {
                let range = c * cs..((c + 1) * cs).min(size);
                file[off..off + range.len()].copy_from_slice(&disk[range]);
                l2[c / per_l2][c % per_l2] = off as u64 | 1 << 63;
            }
            Item::Compressed(c, packed) => {
                file[off..off + packed.len()].copy_from_slice(packed);
                let x = 62 - (cluster_bits - 8);
                let extra = ((off % 512) + packed.len() - 1) / 512;
                l2[c / per_l2][c % per_l2] = 1 << 62 | (extra as u64) << x | off as u64;
            }
        }
    }
    for (i, e) in l1.iter().enumerate() {
        file[l1_at + 8 * i..l1_at + 8 * i + 8].copy_from_slice(&e.to_be_bytes());
    }
    for ((_, item), &off) in placed.iter().zip(&offsets) {
        if let Item::L2(i) = item {
            for (j, e) in l2[*i].iter().enumerate() {
                file[off + 8 * j..off + 8 * j + 8].copy_from_slice(&e.to_be_bytes());
            }
        }
    }
    // The header.
    let mut h = vec![];
    h.extend_from_slice(b"QFI\xfb");
    h.extend_from_slice(&version.to_be_bytes());
    h.extend_from_slice(&0u64.to_be_bytes()); // backing file offset
    h.extend_from_slice(&0u32.to_be_bytes()); // backing file size
    h.extend_from_slice(&cluster_bits.to_be_bytes());
    h.extend_from_slice(&(size as u64).to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // crypt method
    h.extend_from_slice(&(l2_count as u32).to_be_bytes());
    h.extend_from_slice(&(l1_at as u64).to_be_bytes());
    h.extend_from_slice(&[0u8; 24]); // refcounts and snapshots: never read
    if version == 3 {
        let zstd = compression == Compression::Zstd;
        h.extend_from_slice(&(if zstd { 1u64 << 3 } else { 0 }).to_be_bytes());
        h.extend_from_slice(&[0u8; 16]);
        h.extend_from_slice(&4u32.to_be_bytes()); // refcount order
        h.extend_from_slice(&112u32.to_be_bytes()); // header length
        h.push(u8::from(zstd));
        h.resize(112, 0);
    }
    file[..h.len()].copy_from_slice(&h);
    (file, expected)
}

/// The error of a write that must fail (without printing a whole disk
/// when it does not).
fn refused<T>(result: Result<T, ImageError>, case: &str) -> ImageError {
    match result {
        Ok(_) => panic!("{case}: written, not refused"),
        Err(e) => e,
    }
}

fn qcow2_write(file: &[u8], lookbehind: usize) -> Result<Vec<u8>, ImageError> {
    let options = WriteOptions {
        qcow2_lookbehind_bytes: lookbehind,
        ..fast()
    };
    let mut target = Cursor::new(vec![]);
    write_image(
        file,
        &mut target,
        &expect(ImageFormat::Qcow2, file),
        &options,
        &mut |_| {},
    )?;
    Ok(target.into_inner())
}

fn arb_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::Data),
        3 => Just(Kind::Compressed),
        1 => Just(Kind::ZeroFlag),
        1 => Just(Kind::Unallocated),
    ]
}

/// Disk contents that compress in places: runs of one byte, and noise.
fn arb_disk() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((any::<u8>(), 1usize..3000, any::<bool>()), 1..40).prop_map(|runs| {
        let mut d = vec![];
        for (byte, len, noise) in runs {
            d.extend((0..len).map(|i| {
                if noise {
                    (i as u8).wrapping_mul(byte) ^ (i >> 3) as u8
                } else {
                    byte
                }
            }));
        }
        d.truncate(d.len() / 512 * 512 + 512);
        d.resize(d.len().max(512), 0);
        d
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Whatever the order of tables and clusters in the file: with room to
    /// look back over the whole file, the disk comes out right.
    #[test]
    fn qcow2_any_layout(
        disk in arb_disk(),
        v3 in any::<bool>(),
        cluster_bits in 9u32..13,
        zstd_clusters in any::<bool>(),
        kinds in prop::collection::vec(arb_kind(), 1..8),
        order in prop::option::of(prop::collection::vec(any::<u64>(), 1..50)),
    ) {
        let compression = if zstd_clusters && v3 { Compression::Zstd } else { Compression::Zlib };
        let version = if v3 { 3 } else { 2 };
        let (file, expected) = build_qcow2(&disk, version, cluster_bits, compression, &kinds, order.as_deref());
        let out = qcow2_write(&file, file.len()).unwrap();
        prop_assert_eq!(&out[..expected.len()], &expected[..]);
        prop_assert!(out[expected.len()..].iter().all(|b| *b == 0));
        // Laid out as qemu-img does (tables first), it streams with no
        // look-behind at all.
        if order.is_none() {
            let out = qcow2_write(&file, 0).unwrap();
            prop_assert_eq!(&out[..expected.len()], &expected[..]);
        }
    }

    /// Look-behind too small for a layout: refused, never wrong data.
    #[test]
    fn qcow2_too_little_lookbehind_is_refused_not_wrong(
        disk in arb_disk(),
        kinds in prop::collection::vec(arb_kind(), 1..8),
        order in prop::collection::vec(any::<u64>(), 2..50),
        lookbehind in 0usize..4096,
    ) {
        let (file, expected) = build_qcow2(&disk, 3, 9, Compression::Zlib, &kinds, Some(&order));
        match qcow2_write(&file, lookbehind) {
            Ok(out) => prop_assert_eq!(&out[..expected.len()], &expected[..]),
            Err(e) => {
                let refused = matches!(e, ImageError::Qcow2(Qcow2Error::NotStreamable { .. }));
                prop_assert!(refused, "{}", e);
            }
        }
    }

    /// Any bytes after the magic: a header or an error, never a panic.
    #[test]
    fn qcow2_header_never_panics(rest in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut bytes = b"QFI\xfb".to_vec();
        bytes.extend(rest);
        let _ = parse_header(&bytes);
    }

    /// A valid image with any byte of its first 512 changed: refused with
    /// an error, or read (a change that does not matter) — and the reader
    /// never panics, even on the file's tables.
    #[test]
    fn qcow2_mutated_files_never_panic(at in 0usize..1024, value in any::<u8>(), bits in 9u32..11) {
        let disk = disk_image(40_000);
        let (mut file, _) = build_qcow2(&disk, 3, bits, Compression::Zlib, &[Kind::Data, Kind::Compressed], None);
        let at = at % file.len();
        file[at] = value;
        let _ = qcow2_write(&file, 1 << 20);
    }
}

#[test]
fn qcow2_zero_and_unallocated_clusters_overwrite_old_data() {
    let disk = disk_image(64 * 1024);
    let (file, expected) = build_qcow2(
        &disk,
        3,
        12,
        Compression::Zlib,
        &[Kind::Data, Kind::ZeroFlag, Kind::Unallocated],
        None,
    );
    let mut target = Cursor::new(vec![0xaa; 2 * MIB]);
    write_image(
        &file[..],
        &mut target,
        &expect(ImageFormat::Qcow2, &file),
        &fast(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(&target.get_ref()[..expected.len()], &expected[..]);
    assert!(expected[4096..8192].iter().all(|b| *b == 0));
}

/// A header with one field changed, and the error it must give.
#[test]
fn qcow2_corrupt_headers_say_what_is_wrong() {
    let disk = disk_image(100_000);
    let (good, _) = build_qcow2(&disk, 3, 12, Compression::Zlib, &[Kind::Data], None);
    let set = |at: usize, bytes: &[u8]| {
        let mut f = good.clone();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (set(4, &4u32.to_be_bytes()), "version 4 is not supported"),
        (set(8, &300u64.to_be_bytes()), "has a backing file"),
        (set(20, &8u32.to_be_bytes()), "cluster_bits is 8"),
        (set(20, &40u32.to_be_bytes()), "cluster_bits is 40"),
        (set(32, &1u32.to_be_bytes()), "encrypted"),
        (
            set(36, &0u32.to_be_bytes()),
            "the L1 table has 0 entries but a 100000-byte disk needs 1",
        ),
        (set(36, &(u32::MAX).to_be_bytes()), "more than qemu ever writes"),
        (
            set(40, &4097u64.to_be_bytes()),
            "not a cluster boundary after the header",
        ),
        (set(40, &0u64.to_be_bytes()), "not a cluster boundary after the header"),
        (set(24, &(u64::MAX).to_be_bytes()), "beyond any disk"),
        (set(72, &2u64.to_be_bytes()), "flagged corrupt"),
        (set(72, &4u64.to_be_bytes()), "external file"),
        (set(72, &16u64.to_be_bytes()), "extended L2 entries"),
        (
            set(72, &(1u64 << 40).to_be_bytes()),
            "incompatible features the agent does not know (0x10000000000)",
        ),
        (
            set(72, &8u64.to_be_bytes())
                .iter()
                .copied()
                .enumerate()
                .map(|(i, b)| if i == 104 { 7 } else { b })
                .collect(),
            "compression type 7",
        ),
        (set(96, &7u32.to_be_bytes()), "refcount_order is 7"),
        (set(100, &100u32.to_be_bytes()), "header_length is 100"),
        (set(112, &[0x05, 0x37, 0xbe, 0x77, 0, 0, 0, 8]), "encrypted"),
        (
            set(112, &[0x12, 0x34, 0x56, 0x78, 0, 0, 0x40, 0]),
            "runs past the first cluster",
        ),
        (good[..60].to_vec(), "header is cut short: 60 bytes, it needs 72"),
    ];
    for (file, says) in cases {
        let mut target = Cursor::new(vec![0xaa; 2 * MIB]);
        let e = write_image(
            &file[..],
            &mut target,
            &expect(ImageFormat::Qcow2, &file),
            &fast(),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, ImageError::Qcow2(_)), "{says}: {e:?}");
        assert!(e.to_string().contains(says), "`{e}` does not say `{says}`");
        assert!(
            target.get_ref()[..MIB].iter().all(|b| *b == 0),
            "{says}: head not zeroed"
        );
    }
}

#[test]
fn qcow2_corrupt_tables_are_refused() {
    let disk = disk_image(100_000);
    let (good, _) = build_qcow2(&disk, 3, 12, Compression::Zlib, &[Kind::Data], None);
    let l1_at = u64::from_be_bytes(good[40..48].try_into().unwrap()) as usize;
    let l2_at = (u64::from_be_bytes(good[l1_at..l1_at + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let set = |at: usize, value: u64| {
        let mut f = good.clone();
        f[at..at + 8].copy_from_slice(&value.to_be_bytes());
        f
    };
    let first_data = u64::from_be_bytes(good[l2_at..l2_at + 8].try_into().unwrap());
    let cases = [
        (set(l1_at, l2_at as u64 | 1 << 60), "L1 entry 0 has reserved bits set"),
        (set(l1_at, l2_at as u64 + 512), "L1 entry 0 points at byte"),
        (set(l2_at, first_data | 2), "reserved bits set"),
        (set(l2_at, 1 << 62 | 100), "points into the header"),
        (set(l2_at, 4096 + 512), "not a cluster boundary"),
        (good[..good.len() - 3000].to_vec(), "inside the data cluster at byte"),
        (good[..l2_at + 10].to_vec(), "inside the L2 table at byte"),
    ];
    for (file, says) in cases {
        let e = refused(qcow2_write(&file, 1 << 20), says);
        assert!(e.to_string().contains(says), "`{e}` does not say `{says}`");
    }
    // A zero flag in a version 2 image.
    let (v2, _) = build_qcow2(&disk, 2, 12, Compression::Zlib, &[Kind::Data], None);
    let mut v2 = v2;
    let l1_at = u64::from_be_bytes(v2[40..48].try_into().unwrap()) as usize;
    let l2_at = (u64::from_be_bytes(v2[l1_at..l1_at + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    v2[l2_at + 7] |= 1;
    let e = refused(qcow2_write(&v2, 1 << 20), "v2 zero flag");
    assert!(
        e.to_string().contains("zero flag, which version 2 does not have"),
        "{e}"
    );
}

#[test]
fn qcow2_too_large_for_the_target_is_refused_before_writing() {
    let disk = disk_image(3 * MIB);
    let (file, _) = build_qcow2(&disk, 3, 16, Compression::Zlib, &[Kind::Data], None);
    let options = WriteOptions {
        target_bytes: Some(2 * MIB as u64),
        ..fast()
    };
    let mut target = Grudging::new(2 * MIB, 0xaa, vec![usize::MAX]);
    let e = write_image(
        &file[..],
        &mut target,
        &expect(ImageFormat::Qcow2, &file),
        &options,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(e, ImageError::TooLarge { image_bytes, .. } if image_bytes == 3 * MIB as u64),
        "{e}"
    );
    assert!(
        target
            .writes
            .iter()
            .all(|(at, _)| *at < HEAD_BYTES || *at >= MIB as u64),
        "only zeroing"
    );
}
