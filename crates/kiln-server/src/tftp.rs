//! TFTP: read-only, rooted in one directory, with a bound on concurrent
//! transfers, on the transfers one client address may hold, and on how
//! long a silent client keeps its slot (issue 14: a few dozen requests
//! asking `timeout=255` and never acknowledged used to hold every slot for
//! 25 minutes). The protocol is `kiln_boot::tftp` (codec, option
//! negotiation, the sender's state machine, all pure); this module is the
//! I/O around it: a tokio task reads requests on the listening socket, and
//! each transfer gets its own ephemeral UDP socket (a new TID, RFC 1350),
//! connected to the client so the kernel drops other peers' packets.
//!
//! A transfer runs on its own thread with a blocking socket, not as a tokio
//! task. Lock-step TFTP is one send and one receive per block; on a thread
//! that is two system calls and the kernel's wakeup, with no epoll
//! registration, waker or timer-wheel traffic. Measured with 200 clients
//! on this 2-core host (bench/boot-services.sh), tokio tasks on the shared
//! runtime (or a dedicated one) used about as little CPU but kept clients
//! waiting: two busy threads lose their turn to 200 runnable clients and
//! every transfer stalls with them, while a thread per transfer is
//! scheduled like the client it serves. `max_transfers` bounds the threads
//! (a displaced transfer's thread may outlive its slot by a moment).
//!
//! Slots are taken when a request arrives, before any file is opened, and
//! given back when the transfer's thread ends, whatever ends it. How long
//! a transfer may wait for a client that does not answer is decided by
//! `kiln_boot::tftp::Timing::plan`, and who gets a slot when all are taken
//! by `kiln_boot::tftp::Slots`; the thread only keeps its deadlines, says
//! when its client first answered, and ends at once when its slot was
//! given to a newcomer (its socket is shut down, which wakes its `recv`).
//!
//! What may be read: regular files under the root and nothing else — no
//! `..`, no absolute path, no symlink that leads out. Writes are refused
//! with an ERROR. File contents are served from memory: boot files are
//! small and 200 machines ask for the same few, so each is read once and
//! shared (keyed by path, size, mtime and inode, so a replaced file is read
//! again); a file too large for the cache is read in chunks per transfer.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
pub use kiln_boot::tftp::Timing;
use kiln_boot::tftp::{
    Busy, ErrorCode, Limits, Mode, Packet, ReadTransfer, SlotId, Slots, Step, data_header, error_packet, negotiate,
};
use serde::Deserialize;
use std::time::Instant;
use tokio::sync::OnceCell;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// `[tftp]`: the TFTP service. Absent: kiln serves no TFTP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TftpSettings {
    /// Serve TFTP. Without a `[tftp]` section TFTP runs when `[dhcp]` does;
    /// `false` turns it off (then `[dhcp]` is refused: its PXE clients
    /// would be sent a file nothing serves).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
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
    /// Transfers one client address may have at once; more are refused.
    #[serde(default = "default_max_per_client")]
    pub max_per_client: usize,
    /// Longest retransmission timeout (RFC 2349 `timeout`) granted to a
    /// client, in seconds; a request for more is declined.
    #[serde(default = "default_max_timeout_secs")]
    pub max_timeout_secs: u8,
    /// Resends of one block (or window, or OACK) before a silent client is
    /// given up.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// The longest a transfer waits for a client that does not answer, in
    /// seconds, whatever timeout it negotiated.
    #[serde(default = "default_max_silence_secs")]
    pub max_silence_secs: u64,
}

impl Default for TftpSettings {
    fn default() -> Self {
        TftpSettings {
            enabled: default_enabled(),
            root: default_root(),
            listen: default_listen(),
            max_transfers: default_max_transfers(),
            max_per_client: default_max_per_client(),
            max_timeout_secs: default_max_timeout_secs(),
            max_retries: default_max_retries(),
            max_silence_secs: default_max_silence_secs(),
        }
    }
}

impl TftpSettings {
    /// What is wrong with these settings, said so that it can be fixed.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_transfers == 0 {
            return Err("max_transfers is 0: no transfer could run; set at least 1 (default 64)".into());
        }
        if self.max_per_client == 0 {
            return Err("max_per_client is 0: no client could fetch a file; set at least 1 (default 4)".into());
        }
        if self.max_timeout_secs == 0 {
            return Err("max_timeout_secs is 0: RFC 2349 timeouts are 1 to 255 s; set at least 1 (default 10)".into());
        }
        if self.max_silence_secs < u64::from(self.max_timeout_secs) {
            return Err(format!(
                "max_silence_secs ({}) is below max_timeout_secs ({}): a client granted the longest \
                 timeout could not be waited for once; raise max_silence_secs or lower max_timeout_secs",
                self.max_silence_secs, self.max_timeout_secs
            ));
        }
        Ok(())
    }

    /// The service's bounds these settings give.
    pub fn bounds(&self) -> Bounds {
        Bounds {
            max_transfers: self.max_transfers,
            max_per_client: self.max_per_client,
            timing: Timing {
                max_retries: self.max_retries,
                max_silence: Duration::from_secs(self.max_silence_secs),
                ..Timing::default()
            },
            limits: Limits {
                max_timeout: self.max_timeout_secs,
                ..Limits::default()
            },
        }
    }
}

fn default_enabled() -> bool {
    true
}

fn default_root() -> PathBuf {
    PathBuf::from(crate::first_stage::DEBIAN_IPXE_DIR)
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:69".parse().expect("a valid address")
}

fn default_max_transfers() -> usize {
    64
}

/// A PXE ROM fetches one file at a time, but may leave a transfer behind
/// (it aborts after the tsize OACK, or its RRQ is answered twice), and a
/// chainloading iPXE starts the next fetch while the ROM's last one winds
/// down: four leaves room for that, and 16 addresses to fill 64 slots.
fn default_max_per_client() -> usize {
    4
}

fn default_max_timeout_secs() -> u8 {
    kiln_boot::tftp::DEFAULT_MAX_TIMEOUT
}

fn default_max_retries() -> u32 {
    Timing::default().max_retries
}

fn default_max_silence_secs() -> u64 {
    kiln_boot::tftp::DEFAULT_MAX_SILENCE.as_secs()
}

/// What the service allows: its slots and each address's share, how long
/// it waits for silent clients, and the options it grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_transfers: usize,
    pub max_per_client: usize,
    pub timing: Timing,
    pub limits: Limits,
}

impl Default for Bounds {
    fn default() -> Self {
        TftpSettings::default().bounds()
    }
}

/// A file at most this large is kept in memory and shared by transfers.
const CACHE_FILE_MAX: u64 = 16 << 20;
/// The cache holds at most this much (transfers in flight may still hold
/// evicted contents until they end).
const CACHE_TOTAL_MAX: u64 = 128 << 20;
/// Larger files are read in chunks of this much per transfer.
const CHUNK: usize = 1 << 20;

/// Why a request is refused: the TFTP error code and the message sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: &'static str,
}

const NOT_FOUND: Refusal = Refusal {
    code: ErrorCode::FileNotFound,
    message: "file not found",
};
const OUTSIDE: Refusal = Refusal {
    code: ErrorCode::AccessViolation,
    message: "access violation: paths stay inside the TFTP root",
};

/// File contents shared between transfers, keyed by path.
#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<PathBuf, CacheEntry>,
    bytes: u64,
    clock: u64,
}

#[derive(Debug)]
struct CacheEntry {
    /// (len, mtime ns, inode, device): a changed file is a new entry.
    version: (u64, i128, u64, u64),
    data: Arc<OnceCell<Arc<[u8]>>>,
    used: u64,
}

fn version(m: &std::fs::Metadata) -> (u64, i128, u64, u64) {
    let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
    (m.len(), mtime, m.ino(), m.dev())
}

/// The TFTP service's state: the root, the transfer slots, the cache.
#[derive(Debug, Clone)]
pub struct TftpServer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// First-stage files served from elsewhere when the root lacks them
    /// (request path → file): Debian's iPXE ([`crate::first_stage`]).
    fallback: std::collections::BTreeMap<PathBuf, PathBuf>,
    slots: Mutex<SlotTable>,
    cache: Mutex<Cache>,
    timing: Timing,
    limits: Limits,
    /// Transfer threads alive, evicted ones still winding down included.
    threads: AtomicUsize,
    /// Transfers that ended without their client ever answering: a flood
    /// of forged requests makes one each, so they are logged sparingly.
    unanswered_log: Mutex<LogLimiter>,
}

/// The slots, and how to end each slot's transfer when it is evicted.
#[derive(Debug)]
struct SlotTable {
    slots: Slots,
    ends: HashMap<SlotId, Arc<Ending>>,
}

/// How an evicted transfer is told to end: a flag, and its socket (once
/// it has one) to shut down, which wakes a thread blocked in `recv` at
/// once rather than at its next timeout: evicted threads must not pile up
/// under a flood of requests.
#[derive(Debug, Default)]
struct Ending {
    ended: AtomicBool,
    socket: Mutex<Option<socket2::Socket>>,
}

impl Ending {
    fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        if let Some(s) = self.socket.lock().expect("never poisoned").take() {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
    }

    /// Registers the transfer's socket; false if the transfer was ended
    /// already (checked under the same lock [`Ending::end`] takes, so an
    /// eviction is never missed).
    fn watch(&self, socket: &std::net::UdpSocket) -> io::Result<bool> {
        let mut slot = self.socket.lock().expect("never poisoned");
        if self.ended.load(Ordering::SeqCst) {
            return Ok(false);
        }
        *slot = Some(socket2::Socket::from(std::os::fd::OwnedFd::from(socket.try_clone()?)));
        Ok(true)
    }

    fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }
}

/// A transfer slot, given back when dropped.
#[derive(Debug)]
struct Slot {
    inner: Arc<Inner>,
    id: SlotId,
    ending: Arc<Ending>,
}

impl Slot {
    /// The client acknowledged something: the slot is no longer up for
    /// eviction.
    fn heard_from(&self) {
        self.inner.table().slots.heard_from(self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.inner.table();
        table.slots.release(self.id);
        table.ends.remove(&self.id);
    }
}

impl Inner {
    fn table(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        self.slots.lock().expect("the TFTP slots lock is never poisoned")
    }
}

impl TftpServer {
    pub fn new(root: &Path, bounds: Bounds) -> anyhow::Result<TftpServer> {
        Self::with_fallback(root, bounds, Default::default())
    }

    /// A server whose root is `root`, and which serves `fallback`'s files
    /// (request path → file) when the root has none of that name.
    pub fn with_fallback(
        root: &Path,
        bounds: Bounds,
        fallback: std::collections::BTreeMap<PathBuf, PathBuf>,
    ) -> anyhow::Result<TftpServer> {
        let root = root
            .canonicalize()
            .with_context(|| format!("the TFTP root {} does not exist", root.display()))?;
        anyhow::ensure!(root.is_dir(), "the TFTP root {} is not a directory", root.display());
        Ok(TftpServer {
            inner: Arc::new(Inner {
                root,
                fallback,
                slots: Mutex::new(SlotTable {
                    slots: Slots::new(bounds.max_transfers, bounds.max_per_client),
                    ends: HashMap::new(),
                }),
                cache: Mutex::new(Cache::default()),
                timing: bounds.timing,
                limits: bounds.limits,
                threads: AtomicUsize::new(0),
                unanswered_log: Mutex::new(LogLimiter::default()),
            }),
        })
    }

    /// Transfer slots free now.
    pub fn free_slots(&self) -> usize {
        self.inner.table().slots.free()
    }

    /// Transfer slots `client` holds now.
    pub fn slots_held_by(&self, client: IpAddr) -> usize {
        self.inner.table().slots.held_by(client)
    }

    /// Transfer threads running now, evicted ones not yet ended included.
    pub fn transfer_threads(&self) -> usize {
        self.inner.threads.load(Ordering::SeqCst)
    }

    /// A slot for `client`; ends the transfer it was taken from, if any.
    fn take_slot(&self, client: IpAddr) -> Result<(Slot, Option<SlotId>), Busy> {
        let mut table = self.inner.table();
        let taken = table.slots.take(client)?;
        if let Some(old) = taken.evicted
            && let Some(ending) = table.ends.remove(&old)
        {
            ending.end();
        }
        let ending = Arc::new(Ending::default());
        table.ends.insert(taken.id, ending.clone());
        Ok((
            Slot {
                inner: self.inner.clone(),
                id: taken.id,
                ending,
            },
            taken.evicted,
        ))
    }

    /// The file `requested` names under the root, or why it may not be read.
    pub fn resolve(&self, requested: &Path) -> Result<PathBuf, Refusal> {
        let root = &self.inner.root;
        // Clients send `/undionly.kpxe` or `undionly.kpxe`; both mean the root's.
        let relative = requested.strip_prefix("/").unwrap_or(requested);
        if relative.as_os_str().is_empty()
            || relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(OUTSIDE);
        }
        let Ok(full) = root.join(relative).canonicalize() else {
            return self.fallback(relative);
        };
        // A symlink may point anywhere; what it resolves to must stay inside.
        if !full.starts_with(root) {
            return Err(OUTSIDE);
        }
        if !full.is_file() {
            return self.fallback(relative);
        }
        Ok(full)
    }

    /// The fallback file for `relative` (the root has none), if any.
    fn fallback(&self, relative: &Path) -> Result<PathBuf, Refusal> {
        let relative: PathBuf = relative.components().filter(|c| *c != Component::CurDir).collect();
        match self.inner.fallback.get(&relative) {
            Some(file) if file.is_file() => Ok(file.clone()),
            _ => Err(NOT_FOUND),
        }
    }

    /// The contents to send for `path`: shared from the cache when small
    /// enough, else a file read in chunks.
    async fn open(&self, path: &Path) -> io::Result<Source> {
        let file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        if meta.len() > CACHE_FILE_MAX {
            return Ok(Source::File {
                file: Arc::new(file),
                len: meta.len(),
                buf: Vec::new(),
                start: 0,
            });
        }
        let v = version(&meta);
        let cell = {
            let mut cache = self.inner.cache.lock().expect("the TFTP cache lock is never poisoned");
            cache.clock += 1;
            let now = cache.clock;
            let stale = cache.entries.get(path).is_some_and(|e| e.version != v);
            if stale && let Some(old) = cache.entries.remove(path) {
                cache.bytes -= old.version.0;
            }
            if !cache.entries.contains_key(path) {
                // Make room, least recently used first.
                while cache.bytes + v.0 > CACHE_TOTAL_MAX {
                    let Some(oldest) = cache.entries.iter().min_by_key(|(_, e)| e.used).map(|(p, _)| p.clone()) else {
                        break;
                    };
                    let e = cache.entries.remove(&oldest).expect("just found");
                    cache.bytes -= e.version.0;
                }
                cache.bytes += v.0;
                cache.entries.insert(
                    path.to_owned(),
                    CacheEntry {
                        version: v,
                        data: Arc::new(OnceCell::new()),
                        used: now,
                    },
                );
            }
            let e = cache.entries.get_mut(path).expect("present");
            e.used = now;
            e.data.clone()
        };
        // Concurrent first requests wait for one read instead of each
        // reading the file.
        let data = cell
            .get_or_try_init(|| async move {
                let data = tokio::task::spawn_blocking(move || read_whole(file, v))
                    .await
                    .map_err(io::Error::other)??;
                Ok::<_, io::Error>(Arc::<[u8]>::from(data))
            })
            .await;
        match data {
            Ok(d) => Ok(Source::Memory(d.clone())),
            Err(e) => {
                // Not cached (it changed while read, or failed): drop the
                // entry so the next request tries again.
                let mut cache = self.inner.cache.lock().expect("the TFTP cache lock is never poisoned");
                if cache.entries.get(path).is_some_and(|e| Arc::ptr_eq(&e.data, &cell))
                    && let Some(old) = cache.entries.remove(path)
                {
                    cache.bytes -= old.version.0;
                }
                Err(e)
            }
        }
    }
}

/// Reads a whole file, failing if it changed meanwhile (the cache would
/// otherwise keep a mix of two versions under the new one's key).
fn read_whole(file: std::fs::File, v: (u64, i128, u64, u64)) -> io::Result<Vec<u8>> {
    let mut data = vec![0; usize::try_from(v.0).map_err(io::Error::other)?];
    file.read_exact_at(&mut data, 0)?;
    let mut probe = [0u8; 1];
    if file.read_at(&mut probe, v.0)? != 0 || version(&file.metadata()?) != v {
        return Err(io::Error::other("the file changed while it was read; try again"));
    }
    Ok(data)
}

/// What a transfer sends from.
#[derive(Debug)]
enum Source {
    Memory(Arc<[u8]>),
    /// A large file: `buf` holds its bytes from `start`.
    File {
        file: Arc<std::fs::File>,
        len: u64,
        buf: Vec<u8>,
        start: u64,
    },
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::Memory(d) => d.len() as u64,
            Source::File { len, .. } => *len,
        }
    }

    /// Makes bytes `from..to` available to [`Source::slice`]. Blocks on a
    /// file read for a large file (transfers run on their own threads).
    fn load(&mut self, from: u64, to: u64) -> io::Result<()> {
        let Source::File { file, len, buf, start } = self else {
            return Ok(());
        };
        let to = to.min(*len);
        if from >= *start && to <= *start + buf.len() as u64 {
            return Ok(());
        }
        let want = usize::try_from((to - from).max(CHUNK as u64).min(*len - from)).map_err(io::Error::other)?;
        buf.resize(want, 0);
        file.read_exact_at(buf, from)?;
        *start = from;
        Ok(())
    }

    /// Bytes `from..to` (clamped to the end); [`Source::load`] came first.
    fn slice(&self, from: u64, to: u64) -> &[u8] {
        match self {
            Source::Memory(d) => {
                let to = (to.min(d.len() as u64)) as usize;
                &d[(from as usize).min(to)..to]
            }
            Source::File { len, buf, start, .. } => {
                let to = to.min(*len);
                let from = from.min(to);
                &buf[(from - start) as usize..(to - start) as usize]
            }
        }
    }
}

/// Serves TFTP until `shutdown`.
pub async fn run(
    settings: TftpSettings,
    fallback: std::collections::BTreeMap<PathBuf, PathBuf>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = TftpServer::with_fallback(&settings.root, settings.bounds(), fallback)?;
    let socket = std::net::UdpSocket::bind(settings.listen).with_context(|| {
        format!(
            "binding TFTP on {} (port 69 needs root or CAP_NET_BIND_SERVICE)",
            settings.listen
        )
    })?;
    serve(server, socket, shutdown).await
}

/// Serves TFTP on an already-bound socket (tests use port 0).
pub async fn serve(server: TftpServer, socket: std::net::UdpSocket, shutdown: CancellationToken) -> anyhow::Result<()> {
    socket.set_nonblocking(true)?;
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    let addr = socket.local_addr()?;
    tracing::info!(%addr, "TFTP listening");
    let mut transfers = JoinSet::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut busy_log = LogLimiter::default();
    // A request with options fits in 512 bytes (RFC 2347); a larger read
    // is cut and then fails to parse, which is what it deserves.
    let mut buf = vec![0u8; 2048];
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = transfers.join_next(), if !transfers.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "a TFTP transfer panicked");
                }
            }
            received = socket.recv_from(&mut buf) => {
                let (n, peer) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        // An ICMP error for an earlier reply, or a full
                        // buffer: neither ends the service.
                        tracing::debug!(error = %e, "TFTP receive failed");
                        continue;
                    }
                };
                server.request(&buf[..n], peer, addr.ip(), &mut transfers, &stop, &mut busy_log);
            }
        }
    }
    // Ends every transfer (they hold no state worth finishing): each
    // thread sees the flag within a second.
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while transfers.join_next().await.is_some() {}
    })
    .await;
    transfers.shutdown().await;
    Ok(())
}

impl TftpServer {
    /// One datagram on the listening socket.
    fn request(
        &self,
        bytes: &[u8],
        peer: SocketAddr,
        local: IpAddr,
        transfers: &mut JoinSet<()>,
        stop: &Arc<AtomicBool>,
        busy_log: &mut LogLimiter,
    ) {
        match Packet::parse(bytes) {
            Ok(Packet::Rrq(req)) => {
                let slot = match self.take_slot(peer.ip()) {
                    Ok((slot, evicted)) => {
                        if evicted.is_some() {
                            tracing::debug!(%peer, "tftp: every slot taken; a transfer never answered gives up its own");
                        }
                        slot
                    }
                    Err(busy) => {
                        if let Some(unlogged) = busy_log.note(Instant::now()) {
                            tracing::warn!(%peer, file = req.filename, reason = %busy.message(),
                                refused_unlogged = unlogged, "tftp read refused: busy");
                        }
                        refuse(local, peer, ErrorCode::NotDefined, &busy.message());
                        return;
                    }
                };
                let request = OwnedRequest {
                    filename: req.filename.to_owned(),
                    mode: req.mode,
                    options: req
                        .options
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.to_string()))
                        .collect(),
                };
                transfers.spawn(self.clone().transfer(request, peer, local, slot, stop.clone()));
            }
            Ok(Packet::Wrq(req)) => {
                tracing::info!(%peer, file = req.filename, "tftp write refused: kiln's TFTP is read-only");
                refuse(
                    local,
                    peer,
                    ErrorCode::AccessViolation,
                    "kiln's TFTP server is read-only: writes are refused",
                );
            }
            Ok(other) => {
                // DATA, ACK, ERROR or OACK belong to a transfer's own port.
                tracing::debug!(%peer, packet = ?other, "tftp: not a request, ignored");
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "tftp: malformed packet");
                if matches!(bytes, [0, 1 | 2, ..]) {
                    refuse(local, peer, ErrorCode::IllegalOperation, "malformed request");
                }
            }
        }
    }

    /// One read transfer, start to end, holding its slot: prepared here,
    /// sent from its own thread (see [`Sender`]).
    async fn transfer(self, req: OwnedRequest, peer: SocketAddr, local: IpAddr, slot: Slot, stop: Arc<AtomicBool>) {
        let socket = match transfer_socket(local, peer) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "tftp: cannot open a transfer socket");
                return;
            }
        };
        match slot.ending.watch(&socket) {
            Ok(true) => {}
            Ok(false) => return, // evicted before it started
            Err(e) => {
                tracing::warn!(%peer, error = %e, "tftp: cannot set up the transfer socket");
                return;
            }
        }
        let source = match self.prepare(&req).await {
            Ok(s) => s,
            Err(r) => {
                tracing::info!(%peer, file = %req.filename, reason = r.message, "tftp read refused");
                let _ = socket.send(&error_packet(r.code, r.message));
                return;
            }
        };
        let options: Vec<(&str, &str)> = req.options.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let negotiated = negotiate(&options, source.len(), &self.inner.limits);
        let plan = self.inner.timing.plan(negotiated.timeout);
        // Logged at info when it ends, if its client answered (a flood of
        // forged requests would otherwise write a line per packet).
        tracing::debug!(%peer, file = %req.filename, bytes = source.len(), blksize = negotiated.blksize,
            windowsize = negotiated.windowsize, retransmit_ms = plan.interval.as_millis() as u64,
            max_retries = plan.max_retries, "tftp read");
        let (bytes, blksize, windowsize) = (source.len(), negotiated.blksize, negotiated.windowsize);
        let mut machine = ReadTransfer::new(
            source.len(),
            negotiated.blksize,
            negotiated.windowsize,
            !negotiated.oack.is_empty(),
            plan.max_retries,
        );
        let mut sender = Sender {
            socket,
            source,
            blksize: u64::from(negotiated.blksize),
            oack: negotiated.oack_packet(),
            packet: Vec::with_capacity(4 + usize::from(negotiated.blksize)),
            stop,
            slot,
        };
        let (done, outcome) = tokio::sync::oneshot::channel();
        let threads = ThreadCount::new(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("tftp-transfer".into())
            .stack_size(256 << 10)
            .spawn(move || {
                let outcome = sender.run(&mut machine, plan.interval);
                // The slot is free when the thread is done, not before.
                drop(sender);
                drop(threads);
                let _ = done.send((outcome, machine.heard_from()));
            });
        if let Err(e) = spawned {
            tracing::warn!(%peer, error = %e, "tftp: cannot start a transfer thread");
            return;
        }
        let file = &req.filename;
        match outcome.await {
            Ok((Ok(Step::Done), _)) => tracing::info!(%peer, file, bytes, blksize, windowsize, "tftp read done"),
            Ok((outcome, true)) => {
                let why = outcome.map_or_else(|e| e.to_string(), |_| "the client went silent".into());
                tracing::info!(%peer, file, bytes, reason = why, "tftp read abandoned");
            }
            Ok((outcome, false)) => {
                // Never acknowledged: a PXE ROM that only asked for the
                // size (it sends an ERROR after the OACK), a client that
                // cannot receive from the transfer's port (a firewall), or
                // a forged request.
                let limited = self
                    .inner
                    .unanswered_log
                    .lock()
                    .expect("never poisoned")
                    .note(Instant::now());
                let why = outcome.map_or_else(|e| e.to_string(), |_| "the client went silent".into());
                match limited {
                    Some(unlogged) => tracing::info!(%peer, file, reason = why, unanswered_unlogged = unlogged,
                        "tftp read abandoned before the client acknowledged anything"),
                    None => {
                        tracing::debug!(%peer, file, reason = why, "tftp read abandoned before the client acknowledged anything")
                    }
                }
            }
            Err(_) => tracing::error!(%peer, file, "a TFTP transfer thread panicked"),
        }
    }

    /// What `req` will be sent, or why not.
    async fn prepare(&self, req: &OwnedRequest) -> Result<Source, Refusal> {
        if req.mode == Mode::Mail {
            return Err(Refusal {
                code: ErrorCode::IllegalOperation,
                message: "mail mode is not served; ask in octet mode",
            });
        }
        let path = self.resolve(Path::new(&req.filename))?;
        let source = self.open(&path).await.map_err(|e| {
            tracing::warn!(path = %path.display(), error = %e, "tftp: reading a file failed");
            Refusal {
                code: ErrorCode::AccessViolation,
                message: "the file cannot be read",
            }
        })?;
        if req.mode != Mode::Netascii {
            return Ok(source);
        }
        match source {
            Source::Memory(d) => Ok(Source::Memory(kiln_boot::tftp::to_netascii(&d).into())),
            Source::File { .. } => Err(Refusal {
                code: ErrorCode::IllegalOperation,
                message: "netascii is served for files up to 16 MiB; ask in octet mode",
            }),
        }
    }
}

/// Lines a flood of requests could multiply (busy refusals, transfers
/// never answered) are logged at most once per [`LogLimiter::EVERY`],
/// with the number left unlogged since: a flood of requests must not
/// become a flood of log lines.
#[derive(Debug, Default)]
struct LogLimiter {
    last: Option<Instant>,
    unlogged: u64,
}

impl LogLimiter {
    const EVERY: Duration = Duration::from_secs(10);

    /// A refusal at `now`: `Some(refusals not logged before it)` if this
    /// one is to be logged.
    fn note(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < Self::EVERY)
        {
            self.unlogged += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[derive(Debug)]
struct OwnedRequest {
    filename: String,
    mode: Mode,
    options: Vec<(String, String)>,
}

/// A new ephemeral port on the address the request came to, connected to
/// the client so that the kernel drops other peers' packets (and reports
/// the client's ICMP "port unreachable" as an error: it has gone).
fn transfer_socket(local: IpAddr, peer: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(local, 0))?;
    socket.connect(peer)?;
    Ok(socket)
}

/// Answers a request with an ERROR from a fresh port (the client expects
/// replies from a new TID); best effort, without waiting.
fn refuse(local: IpAddr, peer: SocketAddr, code: ErrorCode, message: &str) {
    let sent = std::net::UdpSocket::bind(SocketAddr::new(local, 0))
        .and_then(|s| s.send_to(&error_packet(code, message), peer));
    if let Err(e) = sent {
        tracing::debug!(%peer, error = %e, "tftp: the refusal could not be sent");
    }
}

/// The I/O half of a transfer, on its own thread with a blocking socket:
/// sends what the state machine says and reports what comes back.
struct Sender {
    socket: std::net::UdpSocket,
    source: Source,
    blksize: u64,
    oack: Vec<u8>,
    packet: Vec<u8>,
    /// Set when the service stops.
    stop: Arc<AtomicBool>,
    slot: Slot,
}

/// Counts a transfer thread while it lives.
struct ThreadCount(Arc<Inner>);

impl ThreadCount {
    fn new(inner: &Arc<Inner>) -> ThreadCount {
        inner.threads.fetch_add(1, Ordering::SeqCst);
        ThreadCount(inner.clone())
    }
}

impl Drop for ThreadCount {
    fn drop(&mut self) {
        self.0.threads.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Sender {
    fn send(&mut self, step: Step) -> io::Result<()> {
        match step {
            Step::SendOack => {
                self.socket.send(&self.oack)?;
            }
            Step::Send { first, count } => {
                let bs = self.blksize;
                self.source.load((first - 1) * bs, (first + count - 1) * bs)?;
                for i in first..first + count {
                    self.packet.clear();
                    self.packet.extend_from_slice(&data_header(i as u16));
                    self.packet.extend_from_slice(self.source.slice((i - 1) * bs, i * bs));
                    self.socket.send(&self.packet)?;
                }
            }
            Step::Wait | Step::Done | Step::GiveUp => {}
        }
        Ok(())
    }

    /// Runs the transfer to `Done` or `GiveUp`.
    fn run(&mut self, machine: &mut ReadTransfer, retransmit: Duration) -> io::Result<Step> {
        let mut step = machine.start();
        let mut ack = [0u8; 600];
        let mut deadline = Instant::now() + retransmit;
        let mut waiting: Option<Duration> = None;
        let mut heard = false;
        loop {
            match step {
                Step::Done | Step::GiveUp => return Ok(step),
                Step::Wait => {}
                Step::SendOack | Step::Send { .. } => {
                    self.send(step)?;
                    deadline = Instant::now() + retransmit;
                }
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(io::Error::other("the server is shutting down"));
            }
            if self.slot.ending.is_ended() {
                return Err(io::Error::other(
                    "its slot went to another client: every slot was taken and this client had answered nothing",
                ));
            }
            // Wake at the deadline, so that a silent client is given up on
            // time (packets that change nothing must not push the check
            // past it), and at least every second to notice a shutdown.
            // The socket option is only set again when the wait changes by
            // more than 20 ms (the most a check comes late): not one more
            // system call per block.
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_secs(1));
            if waiting.is_none_or(|w| w.abs_diff(wait) > Duration::from_millis(20)) {
                self.socket.set_read_timeout(Some(wait))?;
                waiting = Some(wait);
            }
            step = match self.socket.recv(&mut ack) {
                Ok(n) => match Packet::parse(&ack[..n]) {
                    Ok(Packet::Ack(block)) => {
                        let step = machine.on_ack(block);
                        if !heard && machine.heard_from() {
                            heard = true;
                            self.slot.heard_from();
                        }
                        step
                    }
                    Ok(Packet::Error { code, message }) => {
                        return Err(io::Error::other(format!("the client sent error {code}: {message}")));
                    }
                    _ => Step::Wait,
                },
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Step::Wait,
                Err(e) => return Err(e),
            };
            if step == Step::Wait && Instant::now() >= deadline {
                step = machine.on_timeout();
            }
        }
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
        let h = TftpServer::new(&root, Bounds::default()).unwrap();
        assert!(h.resolve(Path::new("undionly.kpxe")).is_ok());
        assert!(h.resolve(Path::new("/undionly.kpxe")).is_ok());
        assert!(h.resolve(Path::new("sub/a.efi")).is_ok());
        assert!(h.resolve(Path::new("./sub/a.efi")).is_ok());
        for bad in ["../secret", "sub/../../secret", "link"] {
            assert_eq!(h.resolve(Path::new(bad)), Err(OUTSIDE), "{bad} must be refused");
        }
        // `//etc/passwd` means the root's etc/passwd, like `/undionly.kpxe`.
        for bad in ["sub", "nope", "//etc/passwd"] {
            assert_eq!(h.resolve(Path::new(bad)), Err(NOT_FOUND), "{bad} must be refused");
        }
        assert!(h.resolve(Path::new("")).is_err());
    }

    #[test]
    fn first_stage_files_fall_back_to_debians_ipxe_and_the_root_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (root, ipxe) = (dir.path().join("root"), dir.path().join("ipxe"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&ipxe).unwrap();
        std::fs::write(root.join("undionly.kpxe"), b"the operator's").unwrap();
        for f in ["undionly.kpxe", "snponly.efi", "other.efi"] {
            std::fs::write(ipxe.join(f), b"debian's").unwrap();
        }
        let fallback = ["undionly.kpxe", "snponly.efi", "ipxe.efi"]
            .into_iter()
            .map(|n| (PathBuf::from(n), ipxe.join(n)))
            .collect();
        let h = TftpServer::with_fallback(&root, Bounds::default(), fallback).unwrap();
        let root = root.canonicalize().unwrap();
        assert_eq!(h.resolve(Path::new("/undionly.kpxe")), Ok(root.join("undionly.kpxe")));
        assert_eq!(h.resolve(Path::new("/snponly.efi")), Ok(ipxe.join("snponly.efi")));
        assert_eq!(h.resolve(Path::new("./snponly.efi")), Ok(ipxe.join("snponly.efi")));
        // Only the first-stage names, and only files that exist.
        assert_eq!(h.resolve(Path::new("other.efi")), Err(NOT_FOUND));
        assert_eq!(h.resolve(Path::new("ipxe.efi")), Err(NOT_FOUND));
        assert_eq!(h.resolve(Path::new("../ipxe/snponly.efi")), Err(OUTSIDE));
    }

    #[test]
    fn busy_refusals_are_logged_once_per_interval() {
        let mut log = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(log.note(t0), Some(0), "the first is logged");
        for ms in [1, 500, 9_999] {
            assert_eq!(log.note(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(
            log.note(t0 + LogLimiter::EVERY),
            Some(3),
            "with the count left unlogged"
        );
        assert_eq!(log.note(t0 + LogLimiter::EVERY * 3), Some(0));
    }

    #[tokio::test]
    async fn a_changed_file_is_read_again_and_large_files_stream() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"one").unwrap();
        let h = TftpServer::new(dir.path(), Bounds::default()).unwrap();
        let p = h.resolve(Path::new("f")).unwrap();
        let a = h.open(&p).await.unwrap();
        let b = h.open(&p).await.unwrap();
        match (&a, &b) {
            (Source::Memory(x), Source::Memory(y)) => assert!(Arc::ptr_eq(x, y), "shared, read once"),
            other => panic!("{other:?}"),
        }
        std::fs::write(dir.path().join("f"), b"second").unwrap();
        let c = h.open(&p).await.unwrap();
        assert_eq!(c.slice(0, 100), b"second");
        assert_eq!(h.inner.cache.lock().unwrap().bytes, 6);

        let big: Vec<u8> = (0..CACHE_FILE_MAX + 3 * CHUNK as u64 + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(dir.path().join("big"), &big).unwrap();
        let mut s = h.open(&h.resolve(Path::new("big")).unwrap()).await.unwrap();
        assert!(matches!(s, Source::File { .. }));
        let len = big.len() as u64;
        for (from, to) in [(0, 10), (CHUNK as u64 - 3, CHUNK as u64 + 3), (len - 7, len + 100)] {
            s.load(from, to).unwrap();
            assert_eq!(s.slice(from, to), &big[from as usize..to.min(len) as usize]);
        }
    }
}
