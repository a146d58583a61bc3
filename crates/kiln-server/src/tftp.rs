//! TFTP: read-only, rooted in one directory, with a bound on concurrent
//! transfers. async-tftp speaks the protocol (RFC 1350 with the blksize,
//! tsize, timeout and windowsize options); this handler decides what may be
//! read: regular files under the root and nothing else — no `..`, no
//! absolute path, no symlink that leads out — and refuses every write.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use async_tftp::packet;
use async_tftp::server::{Handler, TftpServerBuilder};
use futures_lite::AsyncRead;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// `[tftp]`: the TFTP service. Absent: kiln serves no TFTP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TftpSettings {
    /// Directory served (Debian's `ipxe` package installs its binaries in
    /// /usr/lib/ipxe).
    #[serde(default = "default_root")]
    pub root: PathBuf,
    /// Address and port to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Transfers served at once; more are refused (clients retry).
    #[serde(default = "default_max_transfers")]
    pub max_transfers: usize,
}

fn default_root() -> PathBuf {
    PathBuf::from("/usr/lib/ipxe")
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:69".parse().expect("a valid address")
}

fn default_max_transfers() -> usize {
    64
}

/// Serves files under a root, read-only, at most `permits` at once.
#[derive(Debug, Clone)]
pub struct RootedHandler {
    root: PathBuf,
    permits: Arc<Semaphore>,
}

impl RootedHandler {
    pub fn new(root: &Path, max_transfers: usize) -> anyhow::Result<RootedHandler> {
        let root = root
            .canonicalize()
            .with_context(|| format!("the TFTP root {} does not exist", root.display()))?;
        anyhow::ensure!(root.is_dir(), "the TFTP root {} is not a directory", root.display());
        Ok(RootedHandler {
            root,
            permits: Arc::new(Semaphore::new(max_transfers.max(1))),
        })
    }

    /// The file `requested` names under the root, or why it may not be read.
    pub fn resolve(&self, requested: &Path) -> Result<PathBuf, packet::Error> {
        // Clients send `/undionly.kpxe` or `undionly.kpxe`; both mean the root's.
        let relative = requested.strip_prefix("/").unwrap_or(requested);
        if relative.as_os_str().is_empty()
            || relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(packet::Error::PermissionDenied);
        }
        let full = self
            .root
            .join(relative)
            .canonicalize()
            .map_err(|_| packet::Error::FileNotFound)?;
        // A symlink may point anywhere; what it resolves to must stay inside.
        if !full.starts_with(&self.root) {
            return Err(packet::Error::PermissionDenied);
        }
        if !full.is_file() {
            return Err(packet::Error::FileNotFound);
        }
        Ok(full)
    }
}

/// A file being sent, holding its transfer slot until it is dropped.
#[allow(missing_debug_implementations)] // blocking::Unblock has no Debug
pub struct Transfer {
    file: blocking::Unblock<std::fs::File>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Transfer {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

/// Never constructed: writes are refused before a writer exists.
#[derive(Debug)]
pub struct NoWrite;

impl futures_lite::AsyncWrite for NoWrite {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Err(std::io::ErrorKind::PermissionDenied.into()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Handler for RootedHandler {
    type Reader = Transfer;
    type Writer = NoWrite;

    async fn read_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
    ) -> Result<(Transfer, Option<u64>), packet::Error> {
        let full = self.resolve(path).inspect_err(|e| {
            tracing::info!(%client, path = %path.display(), error = ?e, "tftp read refused");
        })?;
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            tracing::warn!(%client, path = %path.display(), "tftp busy: too many transfers");
            packet::Error::Msg("server busy: too many transfers, try again".into())
        })?;
        let file = std::fs::File::open(&full).map_err(|_| packet::Error::FileNotFound)?;
        let len = file.metadata().ok().map(|m| m.len());
        tracing::info!(%client, path = %path.display(), bytes = ?len, "tftp read");
        Ok((
            Transfer {
                file: blocking::Unblock::new(file),
                _permit: permit,
            },
            len,
        ))
    }

    async fn write_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
        _size: Option<u64>,
    ) -> Result<NoWrite, packet::Error> {
        tracing::info!(%client, path = %path.display(), "tftp write refused: kiln's TFTP is read-only");
        Err(packet::Error::IllegalOperation)
    }
}

/// Serves TFTP until `shutdown`.
pub async fn run(settings: TftpSettings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handler = RootedHandler::new(&settings.root, settings.max_transfers)?;
    let socket = std::net::UdpSocket::bind(settings.listen).with_context(|| {
        format!(
            "binding TFTP on {} (port 69 needs root or CAP_NET_BIND_SERVICE)",
            settings.listen
        )
    })?;
    serve(handler, socket, shutdown).await
}

/// Serves TFTP on an already-bound socket (tests use port 0).
pub async fn serve(
    handler: RootedHandler,
    socket: std::net::UdpSocket,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = socket.local_addr()?;
    let server = TftpServerBuilder::with_handler(handler)
        .std_socket(socket)?
        .build()
        .await?;
    tracing::info!(%addr, "TFTP listening");
    tokio::select! {
        r = server.serve() => r.context("the TFTP server failed"),
        _ = shutdown.cancelled() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("undionly.kpxe"), b"x").unwrap();
        std::fs::write(root.join("sub/a.efi"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        let h = RootedHandler::new(&root, 4).unwrap();
        assert!(h.resolve(Path::new("undionly.kpxe")).is_ok());
        assert!(h.resolve(Path::new("/undionly.kpxe")).is_ok());
        assert!(h.resolve(Path::new("sub/a.efi")).is_ok());
        assert!(h.resolve(Path::new("./sub/a.efi")).is_ok());
        for bad in [
            "../secret",
            "sub/../../secret",
            "link",
            "//etc/passwd",
            "sub",
            "",
            "nope",
        ] {
            assert!(h.resolve(Path::new(bad)).is_err(), "{bad} must be refused");
        }
    }
}
