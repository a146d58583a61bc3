//! The image writer against files the reference tools made
//! (`tests/fixtures/images/make.sh`: qemu-img, qemu-io, zstd), and, where
//! qemu-img is installed, against images it makes on the spot.

use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_agent::image::qcow2::Qcow2Error;
use kiln_agent::image::{ExpectedImage, ImageError, ImageFormat, Sha256, WriteOptions, WriteReport, write_image};

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/images")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn options(lookbehind: usize) -> WriteOptions {
    WriteOptions {
        qcow2_lookbehind_bytes: lookbehind,
        progress_every: Duration::ZERO,
        ..WriteOptions::default()
    }
}

/// Writes `file` (its own SHA-256 as the catalog's) into a fresh target.
fn write(
    file: &[u8],
    format: ImageFormat,
    source: impl Read,
    lookbehind: usize,
) -> Result<(WriteReport, Vec<u8>), ImageError> {
    let expected = ExpectedImage {
        format,
        sha256: Sha256::of(file),
        file_bytes: Some(file.len() as u64),
    };
    let mut target = Cursor::new(vec![0xaa; 2 << 20]);
    let report = write_image(source, &mut target, &expected, &options(lookbehind), &mut |_| {})?;
    Ok((report, target.into_inner()))
}

fn decoded(name: &str, format: ImageFormat) -> (WriteReport, Vec<u8>) {
    let file = fixture(name);
    match write(&file, format, &file[..], 64 << 20) {
        Ok(out) => out,
        Err(e) => panic!("{name}: {e}"),
    }
}

fn refused(name: &str, lookbehind: usize) -> ImageError {
    let file = fixture(name);
    match write(&file, ImageFormat::Qcow2, &file[..], lookbehind) {
        Ok(_) => panic!("{name}: written, not refused"),
        Err(e) => e,
    }
}

/// The disk every fixture holds, decoded from the reference zstd's file;
/// its SHA-256 is the one `make.sh` took of the raw file.
fn source_disk() -> Vec<u8> {
    let (report, out) = decoded("source.raw.zst", ImageFormat::RawZstd);
    let disk = out[..report.image_bytes as usize].to_vec();
    let want = String::from_utf8(fixture("source.raw.sha256")).unwrap();
    assert_eq!(
        Sha256::of(&disk).to_string(),
        want.trim(),
        "zstd -19 --check decodes to the source"
    );
    disk
}

/// `disk` at the start of `out`, and only the target's old bytes or the
/// zeroed first MiB after it.
fn assert_holds(name: &str, report: &WriteReport, out: &[u8], disk: &[u8]) {
    assert_eq!(report.image_bytes, disk.len() as u64, "{name}");
    assert!(out[..disk.len()] == disk[..], "{name}: decoded disk differs");
    let end = disk.len().max(1 << 20);
    assert!(out[disk.len()..end].iter().all(|b| *b == 0), "{name}");
    assert!(out[end..].iter().all(|b| *b == 0xaa), "{name}: wrote past the image");
}

#[test]
fn qemu_img_images_decode_to_the_source() {
    let disk = source_disk();
    assert_eq!(disk.len(), 1024 * 1024 + 3584);
    let (report, out) = decoded("multi-frame.raw.zst", ImageFormat::RawZstd);
    assert_holds("multi-frame.raw.zst", &report, &out, &disk);
    for name in [
        "v3.qcow2",
        "v2.qcow2",
        "v3-zlib.qcow2",
        "v3-zstd.qcow2",
        "v2-zlib.qcow2",
        "v3-64k.qcow2",
    ] {
        let (report, out) = decoded(name, ImageFormat::Qcow2);
        assert_holds(name, &report, &out, &disk);
        assert_eq!(
            report.source_bytes,
            fixture(name).len() as u64,
            "{name}: every byte hashed"
        );
    }
}

#[test]
fn zero_flag_clusters_read_as_zeros() {
    let (report, expected) = decoded("zero-flag.raw.zst", ImageFormat::RawZstd);
    let expected = &expected[..report.image_bytes as usize];
    let (report, out) = decoded("zero-flag.qcow2", ImageFormat::Qcow2);
    assert_holds("zero-flag.qcow2", &report, &out, expected);
    assert!(expected[4096..12288].iter().all(|b| *b == 0) && expected[65536..69632].iter().all(|b| *b == 0));
}

/// `qemu-img resize` moved the L1 table behind every cluster it maps.
#[test]
fn a_resized_image_needs_lookbehind() {
    let disk = source_disk();
    let file = fixture("resized.qcow2");
    let (report, out) = write(&file, ImageFormat::Qcow2, &file[..], 1 << 20).unwrap();
    assert_eq!(report.image_bytes, 64 << 20);
    assert!(out[..disk.len()] == disk[..]);
    assert!(out[disk.len()..].iter().all(|b| *b == 0), "grown part zeroed");
    let e = refused("resized.qcow2", 4096);
    assert!(matches!(e, ImageError::Qcow2(Qcow2Error::NotStreamable { .. })), "{e}");
    assert!(e.to_string().contains("qemu-img convert -O qcow2"), "{e}");
}

#[test]
fn refused_images() {
    let e = refused("backing.qcow2", 1 << 20);
    assert!(
        matches!(&e, ImageError::Qcow2(Qcow2Error::BackingFile(Some(name))) if name == "v3.qcow2"),
        "{e}"
    );
    assert!(e.to_string().contains("(`v3.qcow2`)"), "{e}");
    let e = refused("extended-l2.qcow2", 1 << 20);
    assert!(matches!(e, ImageError::Qcow2(Qcow2Error::ExtendedL2)), "{e}");
    // Cut short: the download stopped.
    let file = fixture("v3.qcow2");
    for cut in [50, 5000, 13000, 30000] {
        let part = &file[..cut];
        let e = match write(part, ImageFormat::Qcow2, part, 1 << 20) {
            Ok(_) => panic!("{cut}: written"),
            Err(e) => e,
        };
        assert!(
            matches!(
                e,
                ImageError::Qcow2(Qcow2Error::Truncated { .. } | Qcow2Error::ShortHeader { .. })
            ),
            "{cut}: {e}"
        );
    }
}

/// A reader that gives 1–7 bytes per call and a target that takes at most
/// 3000 bytes per write, on real images.
#[test]
fn real_images_through_a_trickle() {
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1 += 1;
            let n = (self.1 % 7 + 1).min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    struct Partial(Cursor<Vec<u8>>);
    impl io::Write for Partial {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write(&buf[..buf.len().min(3000)])
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl io::Seek for Partial {
        fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
            self.0.seek(pos)
        }
    }
    let disk = source_disk();
    for (name, format) in [
        ("v3-zstd.qcow2", ImageFormat::Qcow2),
        ("v2-zlib.qcow2", ImageFormat::Qcow2),
        ("source.raw.zst", ImageFormat::RawZstd),
    ] {
        let file = fixture(name);
        let expected = ExpectedImage {
            format,
            sha256: Sha256::of(&file),
            file_bytes: None,
        };
        let mut target = Partial(Cursor::new(vec![]));
        write_image(
            Trickle(&file, 0),
            &mut target,
            &expected,
            &options(1 << 20),
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(target.0.get_ref()[..disk.len()] == disk[..], "{name}");
    }
}

fn qemu_img() -> Option<PathBuf> {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .ok()
        .map(|_| PathBuf::from("qemu-img"))
}

/// Images qemu-img makes here and now from a larger disk, in each cluster
/// size and compression, read with the least look-behind they need.
#[test]
fn fresh_qemu_img_images() {
    let qemu_img =
        qemu_img().expect("qemu-img (Debian package qemu-utils) is not installed: run the tests with scripts/test");
    let dir = tempfile::tempdir().unwrap();
    // 6 MiB: text, noise and holes at irregular places.
    let mut disk = vec![0u8; 6 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, chunk) in disk.chunks_mut(12_345).enumerate() {
        match i % 4 {
            0 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"kiln agent fixture "[j % 19]),
            1 => chunk.iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }),
            _ => {}
        }
    }
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, &disk).unwrap();
    for (i, opts) in [
        "compat=1.1,cluster_size=65536",
        "compat=1.1,cluster_size=512",
        "compat=1.1,cluster_size=2097152",
        "compat=1.1,cluster_size=16384,compression_type=zstd",
        "compat=0.10,cluster_size=8192",
    ]
    .iter()
    .enumerate()
    {
        for compress in [false, true] {
            let out = dir.path().join(format!("{i}-{compress}.qcow2"));
            let mut cmd = Command::new(&qemu_img);
            cmd.args(["convert", "-f", "raw", "-O", "qcow2", "-o", opts]);
            if compress {
                cmd.arg("-c");
            }
            let status = cmd.arg(&raw).arg(&out).status().unwrap();
            assert!(status.success(), "{opts}");
            let file = std::fs::read(&out).unwrap();
            // Without -c, qemu-img writes each table before what it maps:
            // no look-behind at all. With -c, its parallel writers may put
            // a compressed cluster a little before its L2 table (13 KB
            // seen with 512-byte clusters): far inside the default 64 MiB.
            let lookbehind = if compress { 1 << 20 } else { 0 };
            let (report, written) = write(&file, ImageFormat::Qcow2, &file[..], lookbehind)
                .unwrap_or_else(|e| panic!("{opts} compressed={compress}: {e}"));
            assert_eq!(report.image_bytes, disk.len() as u64);
            assert!(
                written[..disk.len()] == disk[..],
                "{opts} compressed={compress}: differs"
            );
        }
    }
}
