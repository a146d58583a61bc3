//! kiln-sim: simulated BMCs for tests, demos and scale runs.
//!
//! [`start`] serves a fleet of Redfish BMCs on loopback, **one listening
//! port per BMC**, so that each is addressed exactly like a real one
//! (`https://127.0.0.1:PORT`, no path prefix the driver would have to know
//! about); thousands of ports cost one socket and one small task each. All
//! BMCs share one HTTP service; the connection's port picks the BMC.
//!
//! What a BMC does is plain data in [`model`] (power with delayed
//! transitions, a one-shot boot override consumed by the next boot,
//! sessions, faults: 5xx bursts, no answer at all, 401), changed at run time
//! through [`SimBmc`]. The `kiln-sim` binary runs the same fleet on its own.

pub mod fleet;
pub mod model;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use model::{Bmc, BmcSpec, Boot, Faults, Power, Stats};

/// A fleet to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub bmcs: usize,
    /// The address every BMC listens on (any 127.0.0.0/8 address works on
    /// Linux without configuration).
    pub ip: IpAddr,
    /// BMC `i` listens on `base_port + i`; 0 lets the OS pick each port.
    pub base_port: u16,
    /// HTTPS with a certificate from a CA made at start ([`Sim::ca_pem`]).
    pub tls: bool,
    pub username: String,
    pub password: String,
    pub spec: BmcSpec,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            bmcs: 1,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            base_port: 0,
            tls: false,
            username: "admin".into(),
            password: "password".into(),
            spec: BmcSpec::default(),
        }
    }
}

/// One simulated BMC: its address and a view of its state.
#[derive(Debug, Clone)]
pub struct SimBmc {
    url: String,
    addr: SocketAddr,
    state: Arc<Mutex<Bmc>>,
    /// Bumped after every request the BMC answered (and every reboot from
    /// the OS): what a simulated machine waits on to see a power change or
    /// a boot without polling ([`fleet`]).
    changes: Arc<tokio::sync::watch::Sender<()>>,
}

impl SimBmc {
    /// `http(s)://IP:PORT`, the address to give the driver.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lock(&self) -> MutexGuard<'_, Bmc> {
        // A panic while holding the lock leaves plain data behind: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the BMC's state (after completing due power changes).
    /// Changes made here are not announced to [`SimBmc::subscribe`]rs:
    /// they see them at their next wake-up.
    pub fn with<R>(&self, f: impl FnOnce(&mut Bmc) -> R) -> R {
        let mut b = self.lock();
        b.settle(Instant::now());
        f(&mut b)
    }

    /// A receiver that is marked changed after each request this BMC
    /// answered and each [`SimBmc::reboot_from_os`]. Pending power changes
    /// complete on their own time: wait for [`Bmc::next_change`] too.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// System `sys` restarts by itself (an installer at its end), booting
    /// again at once as the boot override says.
    pub fn reboot_from_os(&self, sys: usize) {
        self.lock().reboot_from_os(Instant::now(), sys);
        self.changes.send_replace(());
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub fn boots(&self) -> Vec<Boot> {
        self.lock().boots.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().spec.faults = faults;
    }

    /// System `sys`'s power state now.
    pub fn power(&self, sys: usize) -> Power {
        self.with(|b| b.systems[sys].power)
    }

    pub fn uuid(&self, sys: usize) -> uuid::Uuid {
        self.lock().systems[sys].uuid
    }

    pub fn serial(&self, sys: usize) -> String {
        self.lock().systems[sys].serial.clone()
    }
}

/// A running fleet. Dropping it stops every listener and connection.
#[derive(Debug)]
pub struct Sim {
    bmcs: Vec<SimBmc>,
    ca_pem: Option<String>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Sim {
    pub fn bmcs(&self) -> &[SimBmc] {
        &self.bmcs
    }

    pub fn bmc(&self, i: usize) -> &SimBmc {
        &self.bmcs[i]
    }

    /// The CA certificate (PEM) the BMCs' certificates are signed by, when
    /// serving TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Stops listening, closes every connection and waits for the tasks.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct Shared {
    state: Arc<Mutex<Bmc>>,
    changes: Arc<tokio::sync::watch::Sender<()>>,
    username: String,
    password: String,
}

/// Binds every BMC's port and starts serving. Fails, naming the port, if
/// one cannot be bound (in use, or the open-file limit too low for the
/// fleet: each BMC needs one descriptor, plus one per connection).
pub async fn start(cfg: SimConfig) -> anyhow::Result<Sim> {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (acceptor, ca_pem) = if cfg.tls {
        let (a, pem) = tls_acceptor(cfg.ip).context("making the simulator's TLS certificate")?;
        (Some(a), Some(pem))
    } else {
        (None, None)
    };
    let scheme = if cfg.tls { "https" } else { "http" };
    let mut bmcs = Vec::with_capacity(cfg.bmcs);
    for i in 0..cfg.bmcs {
        let port = match cfg.base_port {
            0 => 0,
            b => u16::try_from(b as usize + i).context("base port + number of BMCs exceeds 65535")?,
        };
        let listener = TcpListener::bind((cfg.ip, port)).await.with_context(|| {
            format!(
                "binding BMC {i} to {}:{port} (port in use, or the open-file limit `ulimit -n` too low for {} BMCs?)",
                cfg.ip, cfg.bmcs
            )
        })?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(Bmc::new(i, cfg.spec.clone())));
        let changes = Arc::new(tokio::sync::watch::Sender::new(()));
        let shared = Arc::new(Shared {
            state: state.clone(),
            changes: changes.clone(),
            username: cfg.username.clone(),
            password: cfg.password.clone(),
        });
        tracker.spawn(accept_loop(
            listener,
            shared,
            acceptor.clone(),
            cancel.clone(),
            tracker.clone(),
        ));
        let host = match addr.ip() {
            IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        bmcs.push(SimBmc {
            url: format!("{scheme}://{host}:{}", addr.port()),
            addr,
            state,
            changes,
        });
    }
    Ok(Sim {
        bmcs,
        ca_pem,
        cancel,
        tracker,
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, most likely: wait, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(connection(stream, shared.clone(), tls.clone(), cancel.clone()));
    }
}

async fn connection(stream: TcpStream, shared: Arc<Shared>, tls: Option<TlsAcceptor>, cancel: CancellationToken) {
    match tls {
        None => serve(stream, shared, cancel).await,
        Some(acceptor) => {
            let hs = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
            let tls_stream = tokio::select! {
                r = hs => match r {
                    Ok(Ok(s)) => s,
                    // A client that does not trust us hangs up here; fine.
                    _ => return,
                },
                _ = cancel.cancelled() => return,
            };
            serve(tls_stream, shared, cancel).await
        }
    }
}

async fn serve<IO>(io: IO, shared: Arc<Shared>, cancel: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let c2 = cancel.clone();
    let svc = hyper::service::service_fn(move |req| answer(shared.clone(), c2.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), svc);
    tokio::select! {
        _ = conn => {}
        _ = cancel.cancelled() => {}
    }
}

/// The credentials a request carries: a session token, else basic auth.
fn credentials(req: &Request<Incoming>) -> model::Credentials {
    let h = req.headers();
    if let Some(t) = h.get("x-auth-token").and_then(|v| v.to_str().ok()) {
        return model::Credentials::Token(t.to_string());
    }
    let basic = h
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok());
    match basic.as_deref().and_then(|s| s.split_once(':')) {
        Some((u, p)) => model::Credentials::Basic {
            user: u.to_string(),
            password: p.to_string(),
        },
        None => model::Credentials::None,
    }
}

async fn answer(
    shared: Arc<Shared>,
    cancel: CancellationToken,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (hang, latency) = {
        let mut b = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let hang = b.spec.faults.hang && b.spec.faults.applies_to(req.uri().path());
        if hang {
            b.stats.hung += 1;
        }
        (hang, b.spec.latency)
    };
    if hang {
        // No answer at all: the client's deadline has to save it.
        cancel.cancelled().await;
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let creds = credentials(&req);
    let if_match = req
        .headers()
        .get(hyper::header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let a = {
        let mut b = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        b.handle(
            Instant::now(),
            &method,
            &path,
            &creds,
            if_match.as_deref(),
            &shared.username,
            &shared.password,
            &body,
        )
    };
    shared.changes.send_replace(());
    let mut resp = Response::builder().status(a.status).header("OData-Version", "4.0");
    if a.status == 401 {
        resp = resp.header("WWW-Authenticate", "Basic realm=\"kiln-sim\"");
    }
    for (k, v) in &a.headers {
        resp = resp.header(*k, v);
    }
    let out = if a.body.is_null() {
        Bytes::new()
    } else {
        resp = resp.header("Content-Type", "application/json");
        Bytes::from(a.body.to_string())
    };
    Ok(resp
        .body(Full::new(out))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

/// A CA made now, and a server certificate it signs for `ip` only (not
/// `localhost`, so that a name mismatch can be tested): the driver
/// verifies it when given the CA, as with a site CA.
fn tls_acceptor(ip: IpAddr) -> anyhow::Result<(TlsAcceptor, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kiln-sim test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![ip.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, "kiln-sim BMC");
    let cert = params.signed_by(&key, &issuer)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone(), ca_cert.der().clone()], key_der)?;
    Ok((TlsAcceptor::from(Arc::new(config)), ca_cert.pem()))
}
