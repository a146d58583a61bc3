//! TLS for the API listener: the certificate (the operator's PEM files, or a
//! self-signed one kiln generates at first start and keeps in DATA_DIR/tls),
//! its SHA-256 fingerprint — what the CLI pins, since a generated
//! certificate has no CA to vouch for it — and a listener that runs TLS
//! handshakes beside the accept loop.
//!
//! Handshakes run concurrently, each with a deadline and under a bound on
//! how many may be in flight: done inline in `accept`, one client that
//! opens a connection and never speaks would stall every other.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsSource;

/// A client has this long to finish its handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; a connection beyond is closed at once.
const MAX_HANDSHAKES: usize = 512;

/// The API's TLS settings, ready to serve.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// `sha256:` and the lowercase hex SHA-256 of the leaf certificate's DER.
    pub fingerprint: String,
    /// Where the certificate is (the operator's file or the generated one).
    pub cert_path: PathBuf,
}

/// `sha256:HEX` of a certificate's DER: what the CLI's `--fingerprint`
/// takes, and what `openssl x509 -noout -fingerprint -sha256` prints (in
/// upper case, with colons).
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// Where the certificate of `source` lives.
pub fn cert_path(source: &TlsSource) -> PathBuf {
    match source {
        TlsSource::Files { cert, .. } => cert.clone(),
        TlsSource::Generated { dir } => dir.join("cert.pem"),
    }
}

/// The certificate the server configured by `config` serves (or would
/// serve: a generated one from an earlier start counts even when `config`
/// is only the data directory), and its fingerprint; `None` when it has
/// none.
pub fn configured_fingerprint(config: &crate::Config) -> anyhow::Result<Option<(String, PathBuf)>> {
    let path = match &config.api.tls {
        Some(source) => cert_path(source),
        None => config.data_dir.join("tls/cert.pem"),
    };
    if config.api.tls.is_none() && !path.exists() {
        return Ok(None);
    }
    Ok(Some((fingerprint_of_file(&path)?, path)))
}

/// The fingerprint of the first certificate in the PEM file `path`.
pub fn fingerprint_of_file(path: &Path) -> anyhow::Result<String> {
    let certs = read_certs(path)?;
    Ok(fingerprint(&certs[0]))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read the TLS certificate {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("the TLS certificate {} is not valid PEM", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "{} holds no CERTIFICATE block: tls_cert must be the PEM certificate chain, leaf first",
            path.display()
        );
    }
    Ok(certs)
}

/// Loads the certificate and key `source` names; for a generated one,
/// makes it first if this is the first start. `listen` goes into a new
/// certificate's names.
pub fn load(source: &TlsSource, listen: SocketAddr) -> anyhow::Result<ServerTls> {
    let (cert_path, key_path) = match source {
        TlsSource::Files { cert, key } => (cert.clone(), key.clone()),
        TlsSource::Generated { dir } => generate_if_missing(dir, listen)?,
    };
    check_key_mode(&key_path)?;
    let certs = read_certs(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("cannot read the TLS private key {} (PEM)", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS set-up failed")?
        .with_no_client_auth()
        .with_single_cert(certs.clone(), key)
        .with_context(|| {
            format!(
                "the TLS key {} does not fit the certificate {} (or is not a key rustls can use)",
                key_path.display(),
                cert_path.display()
            )
        })?;
    // hyper serves HTTP/1.1 only here (axum's `http1` feature).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        fingerprint: fingerprint(&certs[0]),
        cert_path,
    })
}

/// A key others may read is refused, as for the secret key: whoever reads
/// it can pose as this server.
fn check_key_mode(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot read the TLS private key {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o007 != 0 {
        anyhow::bail!(
            "the TLS private key {} is readable by others (mode {:o}): chmod 600 it",
            path.display(),
            mode & 0o777
        );
    }
    Ok(())
}

/// `dir/cert.pem` and `dir/key.pem`, generated if neither exists. A
/// certificate without its key is an error rather than replaced: clients
/// may have pinned it.
fn generate_if_missing(dir: &Path, listen: SocketAddr) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    match (cert.exists(), key.exists()) {
        (true, true) => return Ok((cert, key)),
        (true, false) => anyhow::bail!(
            "{} exists but its key {} does not: restore the key, or delete the certificate so that kiln \
             makes a new pair (clients then pin the new fingerprint)",
            cert.display(),
            key.display()
        ),
        // No certificate: nobody can have pinned it, so a stray key (a
        // first start that stopped half-way) is replaced.
        _ => {}
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let (pair, cert_pem) = self_signed(&host, listen)?;
    write_private(&key, pair.serialize_pem().as_bytes())?;
    // The certificate last: its presence says the pair is whole.
    let tmp = dir.join("cert.pem.tmp");
    std::fs::write(&tmp, cert_pem).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &cert).with_context(|| format!("cannot write {}", cert.display()))?;
    tracing::info!(cert = %cert.display(), "generated a self-signed TLS certificate for the API");
    Ok((cert, key))
}

/// A self-signed certificate for `host` and the listen address (plus
/// localhost), and its key pair.
fn self_signed(host: &str, listen: SocketAddr) -> anyhow::Result<(rcgen::KeyPair, String)> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if !host.is_empty() && host != "localhost" {
        names.push(host.to_string());
    }
    let ip = listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        names.push(ip.to_string());
    }
    let pair = rcgen::KeyPair::generate().context("cannot generate a TLS key")?;
    let mut params = rcgen::CertificateParams::new(names).context("cannot build the TLS certificate")?;
    let cn = if host.is_empty() {
        "kiln".to_string()
    } else {
        format!("kiln {host}")
    };
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(&pair).context("cannot sign the TLS certificate")?;
    Ok((pair, cert.pem()))
}

/// Writes `path` with mode 0600 from the start (never briefly readable),
/// through a temporary file and a rename.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// A TCP listener whose connections come out TLS-wrapped, for
/// `axum::serve`. The accept loop runs in its own task and ends when this
/// is dropped (when the server stops).
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
        Ok(TlsListener { ready, local, task })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = tx.closed() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many TLS handshakes in progress; connection closed");
            continue;
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                // A client that does not trust the certificate, a port
                // scanner, plain HTTP sent to the TLS port: the client's
                // problem, logged quietly.
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// As axum's own loop does: a connection reset before accept is nothing;
/// anything else (out of file descriptors) is logged and waited out.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop only ends when `ready` is closed, which is
            // never while `self` lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated(dir: &Path) -> TlsSource {
        TlsSource::Generated { dir: dir.join("tls") }
    }

    #[tokio::test]
    async fn a_generated_certificate_is_kept_across_restarts() {
        let d = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "10.1.2.3:7443".parse().unwrap();
        let first = load(&generated(d.path()), listen).unwrap();
        assert!(first.fingerprint.starts_with("sha256:") && first.fingerprint.len() == 7 + 64);
        let key = d.path().join("tls/key.pem");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let again = load(&generated(d.path()), listen).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint, "a restart keeps the certificate");
        assert_eq!(fingerprint_of_file(&first.cert_path).unwrap(), first.fingerprint);
        // The listen address is among its names.
        let pem = std::fs::read(&first.cert_path).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let ip = [10u8, 1, 2, 3];
        assert!(der.windows(4).any(|w| w == ip), "the listen address is a SAN");
    }

    #[tokio::test]
    async fn a_certificate_without_its_key_is_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        load(&generated(d.path()), listen).unwrap();
        std::fs::remove_file(d.path().join("tls/key.pem")).unwrap();
        let e = load(&generated(d.path()), listen).unwrap_err().to_string();
        assert!(e.contains("restore the key"), "{e}");
    }

    #[tokio::test]
    async fn a_key_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        load(&generated(d.path()), listen).unwrap();
        let key = d.path().join("tls/key.pem");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", load(&generated(d.path()), listen).unwrap_err());
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[tokio::test]
    async fn operator_files_must_fit_together() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        load(&generated(a.path()), listen).unwrap();
        load(&generated(b.path()), listen).unwrap();
        let mixed = TlsSource::Files {
            cert: a.path().join("tls/cert.pem"),
            key: b.path().join("tls/key.pem"),
        };
        let e = format!("{:#}", load(&mixed, listen).unwrap_err());
        assert!(e.contains("does not fit the certificate"), "{e}");
        let not_pem = TlsSource::Files {
            cert: b.path().join("tls/key.pem"),
            key: b.path().join("tls/key.pem"),
        };
        let e = format!("{:#}", load(&not_pem, listen).unwrap_err());
        assert!(e.contains("no CERTIFICATE block"), "{e}");
    }
}
