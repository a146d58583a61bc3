//! kiln's TFTP service against a standard client (curl's tftp://), on
//! loopback: blksize negotiation, byte-exact files, no path out of the root,
//! writes refused, concurrent transfers bounded.

use std::process::Command;

use kiln_server::tftp::{RootedHandler, serve};
use tokio_util::sync::CancellationToken;

struct Tftp {
    port: u16,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
}

async fn start(max_transfers: usize) -> Tftp {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    // Not a multiple of any block size, so the last block is short.
    let data: Vec<u8> = (0..(3 << 20) + 777).map(|i: u32| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("undionly.kpxe"), &data).unwrap();
    std::fs::write(dir.path().join("secret"), b"do not serve").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let handler = RootedHandler::new(&root, max_transfers).unwrap();
    tokio::spawn(serve(handler, socket, stop.clone()));
    Tftp {
        port,
        stop,
        _dir: dir,
        root,
    }
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "30"])
        .args(args)
        .output()
        .expect("curl is needed for this test")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_downloads_exact_bytes_and_nothing_else() {
    let t = start(8).await;
    let url = |p: &str| format!("tftp://127.0.0.1:{}/{p}", t.port);
    let want = std::fs::read(t.root.join("undionly.kpxe")).unwrap();
    for blksize in ["512", "1468", "8192"] {
        let url = url("undionly.kpxe");
        let out = tokio::task::spawn_blocking(move || curl(&["--tftp-blksize", blksize, &url]))
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "blksize {blksize}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout == want,
            "blksize {blksize}: {} bytes, want {}",
            out.stdout.len(),
            want.len()
        );
    }
    for bad in ["../secret", "escape", "nope.efi", "%2e%2e/secret"] {
        let u = url(bad);
        let out = tokio::task::spawn_blocking(move || curl(&[&u])).await.unwrap();
        assert!(!out.status.success(), "{bad} was served");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("do not serve"));
    }
    // Uploads are refused, and nothing is written.
    let src = t.root.parent().unwrap().join("upload");
    std::fs::write(&src, b"evil").unwrap();
    let (s, u) = (src.display().to_string(), url("new.efi"));
    let out = tokio::task::spawn_blocking(move || curl(&["-T", &s, &u]))
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(!t.root.join("new.efi").exists());
    t.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_are_bounded() {
    let t = start(1).await;
    let url = format!("tftp://127.0.0.1:{}/undionly.kpxe", t.port);
    // Small blocks make the first transfer last while the second asks.
    let first = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || curl(&["--tftp-blksize", "512", &url]))
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let second = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || curl(&[&url])).await.unwrap()
    };
    let first = first.await.unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(!second.status.success(), "the second transfer should have been refused");
    // The slot comes back when a transfer ends.
    let third = tokio::task::spawn_blocking(move || curl(&[&url])).await.unwrap();
    assert!(third.status.success(), "{}", String::from_utf8_lossy(&third.stderr));
    t.stop.cancel();
}
