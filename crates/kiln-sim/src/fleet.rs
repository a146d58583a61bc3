//! A simulated fleet: machines that behave toward kiln like real ones, over
//! loopback. Each machine has a MAC, a simulated Redfish BMC (the
//! [`model`](crate::model), one port each) and the behaviour of its
//! firmware, of kiln's deploy agent and of the OS it installs:
//!
//! - When its BMC powers it on or resets it, or it restarts by itself, it
//!   boots from where the BMC's boot override says.
//! - A network boot is what iPXE does: a DHCP exchange with kiln (DISCOVER,
//!   OFFER, REQUEST, ACK over UDP) through the fleet's simulated relay agent,
//!   which forwards it as a switch would (giaddr, option 82), then a `GET` of
//!   the boot file URL the ACK names (kiln's `/boot/ipxe?mac=…`). Without a
//!   DHCP server configured it asks `/boot/ipxe` straight away.
//! - A script that boots kiln's deploy agent (`kiln.job=`, `kiln.token=` and
//!   `kiln.server=` on its kernel line) runs "the agent": it reports stages
//!   1 to 4 to `POST /api/v1/jobs/{id}/stages/{n}` with the token, pausing
//!   as configured between them, then restarts the machine. It leaves the
//!   token to the new OS (as cloud-init would be handed it), which reports
//!   stage 5 once it has booted from disk.
//! - A script that says "local disk", or a boot from the disk, boots the
//!   installed OS, which reports nothing unless it was just installed.
//!
//! The kernel and initrd are not downloaded: what is simulated is the
//! conversation with kiln, not the bytes of an install.
//!
//! Failures per machine ([`MachineFaults`]): hang in stage 2, never phone
//! home, and the BMC's own fault knobs ([`Faults`]: no answer, 5xx bursts,
//! refused credentials). Pauses get a jitter drawn from the fleet's seed,
//! so two runs with one seed ask for the same things in the same order per
//! machine. Every network call has a deadline and a bounded number of
//! tries; [`Fleet::shutdown`] (or dropping the fleet) stops every task.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dhcproto::v4::relay::{RelayAgentInformation, RelayCode, RelayInfo, UnknownInfo};
use dhcproto::v4::{Architecture, DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable as _, Encodable as _};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Faults, Power, Sim, SimBmc, SimConfig};

/// A MAC address (kiln-sim speaks kiln's protocols without kiln's types).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The `n`th MAC of a simulated fleet: locally administered
    /// (`02:…`), distinct for every `n` below 2³².
    pub fn nth(n: u32) -> Mac {
        let b = n.to_be_bytes();
        Mac([0x02, 0x5e, b[0], b[1], b[2], b[3]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How long each phase of a simulated (re)install takes. Each pause is
/// lengthened by up to `jitter` of itself, drawn from the fleet's seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Durations {
    /// Power on to the first DHCP packet (the firmware's POST).
    pub post: Duration,
    /// Deploy agent booted to stage 1 (kernel, initrd, agent start).
    pub agent_start: Duration,
    /// Stage 1 to 2: the image written.
    pub write_image: Duration,
    /// Stage 2 to 3: the configuration written.
    pub configure: Duration,
    /// Stage 3 to 4: finishing, about to restart.
    pub finish: Duration,
    /// Disk boot to the OS being up (and phoning home: stage 5).
    pub first_boot: Duration,
    /// Fraction (0 to 1) each pause may be lengthened by.
    pub jitter: f64,
}

impl Durations {
    /// Every pause `d` (POST a tenth of it), jitter 20 %.
    pub fn uniform(d: Duration) -> Durations {
        Durations {
            post: d / 10,
            agent_start: d,
            write_image: d,
            configure: d,
            finish: d,
            first_boot: d,
            jitter: 0.2,
        }
    }

    /// The sum of the pauses of one reimage, without jitter: the least a
    /// simulated reimage can take.
    pub fn reimage_total(&self) -> Duration {
        self.post + self.agent_start + self.write_image + self.configure + self.finish + self.post + self.first_boot
    }
}

impl Default for Durations {
    /// A whole reimage in about 1.5 s: quick enough for tests.
    fn default() -> Self {
        Durations::uniform(Duration::from_millis(250))
    }
}

/// What goes wrong with one machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineFaults {
    /// The agent reports stage 1, then nothing more: the write hangs.
    pub hang_in_stage_2: bool,
    /// The new OS never reports stage 5 (its network is broken).
    pub never_phone_home: bool,
    /// The BMC's faults: `hang` (timeouts), `error_burst`, `reject_auth`.
    pub bmc: Faults,
}

/// One machine of a fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSpec {
    pub mac: Mac,
    /// Option 82 the relay adds for the switch port this machine is
    /// cabled to: circuit-id and remote-id (kiln knows a machine by them
    /// before its MAC).
    pub circuit_id: Option<String>,
    pub remote_id: Option<String>,
    /// The SMBIOS serial and UUID its BMC and firmware report (default: the
    /// BMC's own, `SIM00000-1` and [`model::system_uuid`](crate::model::system_uuid)).
    /// kiln's Redfish driver finds the system by them: set them to what
    /// the inventory says.
    pub serial: Option<String>,
    pub uuid: Option<uuid::Uuid>,
    pub faults: MachineFaults,
}

impl MachineSpec {
    pub fn new(mac: Mac) -> MachineSpec {
        MachineSpec {
            mac,
            circuit_id: None,
            remote_id: None,
            serial: None,
            uuid: None,
            faults: MachineFaults::default(),
        }
    }
}

/// Where the fleet's DHCP goes: the relay agent binds `relay_ip` (any free
/// port: it asks for replies on it with RFC 8357's relay source port) and
/// forwards every request to kiln's DHCP `server` with `relay_ip` as
/// giaddr, which must lie in one of kiln's `[[dhcp.subnet]]`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpRelay {
    pub server: SocketAddr,
    pub relay_ip: Ipv4Addr,
}

impl DhcpRelay {
    /// The relay address [`FleetConfig`]s use unless told otherwise: any
    /// 127.0.0.0/8 address works on Linux, and this one is nobody else's.
    pub const DEFAULT_RELAY_IP: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);
    /// A `[[dhcp.subnet]]` of kiln's that contains the default relay
    /// address and has room for a large fleet.
    pub const DEFAULT_SUBNET: &'static str = "127.77.0.0/16";
    pub const DEFAULT_POOL: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 77, 1, 1), Ipv4Addr::new(127, 77, 255, 254)];

    pub fn to(server: SocketAddr) -> DhcpRelay {
        DhcpRelay {
            server,
            relay_ip: Self::DEFAULT_RELAY_IP,
        }
    }
}

/// A fleet to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub machines: Vec<MachineSpec>,
    /// kiln's base URL (`http://127.0.0.1:7070`): where a machine asks for
    /// `/boot/ipxe` when there is no DHCP (with DHCP, the ACK says where).
    pub kiln_url: String,
    /// `None`: no DHCP, machines go to `kiln_url` straight away.
    pub dhcp: Option<DhcpRelay>,
    pub durations: Durations,
    pub seed: u64,
    /// The BMCs: address, TLS, credentials, spec. `bmcs` and
    /// `spec.systems` are set by the fleet (one single-system BMC per
    /// machine); each machine's `faults.bmc` replaces `spec.faults`.
    pub bmc: SimConfig,
    /// Deadline of each HTTP request and of each wait for a DHCP reply.
    pub request_timeout: Duration,
}

impl FleetConfig {
    pub fn new(kiln_url: impl Into<String>, machines: Vec<MachineSpec>) -> FleetConfig {
        FleetConfig {
            machines,
            kiln_url: kiln_url.into(),
            dhcp: None,
            durations: Durations::default(),
            seed: 0,
            bmc: SimConfig::default(),
            request_timeout: Duration::from_secs(10),
        }
    }

    /// `n` machines with MACs [`Mac::nth`]`(0..n)` and no faults.
    pub fn with_machines(kiln_url: impl Into<String>, n: u32) -> FleetConfig {
        Self::new(kiln_url, (0..n).map(|i| MachineSpec::new(Mac::nth(i))).collect())
    }
}

/// Something a simulated machine did, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Powered on or restarted: booting from `target` (`Pxe`, `Hdd`, …).
    Boot { target: String },
    /// Powered off: whatever ran stopped.
    PoweredOff,
    /// The DHCP exchange ended with this address.
    Leased { ip: Ipv4Addr },
    /// No DHCP answer after every try: nothing to boot from the network.
    NoDhcp,
    /// kiln's script boots the deploy agent of job `job`.
    Agent { job: String },
    /// kiln's script says: boot the local disk.
    LocalDisk,
    /// Nothing bootable came of the network boot (why).
    Halted { why: String },
    /// Stage `n` was reported and accepted.
    Stage { n: u8 },
    /// Stage `n` could not be reported (refused, or kiln unreachable).
    ReportFailed { n: u8, why: String },
    /// The agent stopped reporting (`hang_in_stage_2`).
    Hung,
    /// The OS on disk is up.
    OsUp,
}

/// An [`Event`] and when, since the fleet started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub at: Duration,
    pub event: Event,
}

/// Most records a machine keeps (the oldest go first).
const HISTORY: usize = 256;
/// DHCP exchanges tried per network boot (a PXE ROM tries about four).
const DHCP_TRIES: u32 = 4;
/// Tries per stage report when kiln does not answer or answers 5xx.
const REPORT_TRIES: u32 = 5;
/// Tries per `GET /boot/ipxe`.
const SCRIPT_TRIES: u32 = 3;

/// What the agent leaves on the disk for the new OS: how to phone home.
#[derive(Debug, Clone)]
struct Handoff {
    server: String,
    job: String,
    token: String,
}

#[derive(Debug)]
struct MachineInner {
    faults: MachineFaults,
    history: std::collections::VecDeque<Record>,
    handoff: Option<Handoff>,
}

/// One simulated machine: its spec, its BMC and what it did.
#[derive(Debug, Clone)]
pub struct SimMachine {
    index: usize,
    spec: Arc<MachineSpec>,
    bmc: SimBmc,
    started: Instant,
    inner: Arc<Mutex<MachineInner>>,
}

impl SimMachine {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn mac(&self) -> Mac {
        self.spec.mac
    }

    pub fn spec(&self) -> &MachineSpec {
        &self.spec
    }

    /// Its BMC: `bmc().url()` is what to enroll in kiln.
    pub fn bmc(&self) -> &SimBmc {
        &self.bmc
    }

    /// The SMBIOS UUID and serial its firmware reports (the BMC's system).
    pub fn uuid(&self) -> uuid::Uuid {
        self.bmc.uuid(0)
    }

    pub fn serial(&self) -> String {
        self.bmc.serial(0)
    }

    fn lock(&self) -> MutexGuard<'_, MachineInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes what goes wrong, from the next boot on (BMC faults at once).
    pub fn set_faults(&self, faults: MachineFaults) {
        self.bmc.set_faults(faults.bmc.clone());
        self.lock().faults = faults;
    }

    /// What it did, oldest first (the last [`HISTORY`] records).
    pub fn history(&self) -> Vec<Record> {
        self.lock().history.iter().cloned().collect()
    }

    pub fn events(&self) -> Vec<Event> {
        self.lock().history.iter().map(|r| r.event.clone()).collect()
    }

    /// The stages it reported and kiln accepted, in order.
    pub fn stages_reported(&self) -> Vec<u8> {
        self.lock()
            .history
            .iter()
            .filter_map(|r| match r.event {
                Event::Stage { n } => Some(n),
                _ => None,
            })
            .collect()
    }

    /// The address of its last DHCP lease.
    pub fn leased_ip(&self) -> Option<Ipv4Addr> {
        self.lock().history.iter().rev().find_map(|r| match r.event {
            Event::Leased { ip } => Some(ip),
            _ => None,
        })
    }

    fn record(&self, event: Event) {
        tracing::debug!(machine = self.index, mac = %self.spec.mac, ?event, "sim machine");
        let at = self.started.elapsed();
        let mut inner = self.lock();
        if inner.history.len() >= HISTORY {
            inner.history.pop_front();
        }
        inner.history.push_back(Record { at, event });
    }

    fn faults(&self) -> MachineFaults {
        self.lock().faults.clone()
    }
}

/// What every machine's tasks share.
#[derive(Debug)]
struct Ctx {
    http: reqwest::Client,
    kiln_url: String,
    relay: Option<Arc<Relay>>,
    durations: Durations,
    seed: u64,
    timeout: Duration,
}

/// A running fleet. Dropping it stops every machine and BMC.
#[derive(Debug)]
pub struct Fleet {
    sim: Sim,
    machines: Vec<SimMachine>,
    relay_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// Dropping the fleet without `shutdown` still stops its tasks.
    _stop_on_drop: tokio_util::sync::DropGuard,
}

impl Fleet {
    /// Starts the BMCs, the relay agent (with DHCP) and one task per
    /// machine. Machines are off until their BMC powers them on.
    pub async fn start(cfg: FleetConfig) -> anyhow::Result<Fleet> {
        let mut bmc = cfg.bmc.clone();
        bmc.bmcs = cfg.machines.len();
        bmc.spec.systems = 1;
        let sim = crate::start(bmc).await?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (relay, relay_addr) = match &cfg.dhcp {
            Some(d) => {
                let socket = UdpSocket::bind((d.relay_ip, 0))
                    .await
                    .with_context(|| format!("binding the simulated DHCP relay to {}", d.relay_ip))?;
                let addr = socket.local_addr()?;
                let relay = Arc::new(Relay {
                    socket,
                    server: d.server,
                    giaddr: d.relay_ip,
                    waiting: Mutex::new(HashMap::new()),
                });
                tracker.spawn(relay_replies(relay.clone(), cancel.clone()));
                (Some(relay), Some(addr))
            }
            None => (None, None),
        };
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            // The fleet only ever talks to kiln on loopback.
            .no_proxy()
            .build()
            .context("building the fleet's HTTP client")?;
        let ctx = Arc::new(Ctx {
            http,
            kiln_url: cfg.kiln_url.trim_end_matches('/').to_string(),
            relay,
            durations: cfg.durations.clone(),
            seed: cfg.seed,
            timeout: cfg.request_timeout,
        });
        let started = Instant::now();
        let machines: Vec<SimMachine> = cfg
            .machines
            .into_iter()
            .zip(sim.bmcs())
            .enumerate()
            .map(|(index, (spec, bmc))| {
                bmc.set_faults(spec.faults.bmc.clone());
                bmc.with(|b| {
                    let sys = &mut b.systems[0];
                    if let Some(serial) = &spec.serial {
                        sys.serial = serial.clone();
                    }
                    if let Some(uuid) = spec.uuid {
                        sys.uuid = uuid;
                    }
                });
                SimMachine {
                    index,
                    bmc: bmc.clone(),
                    started,
                    inner: Arc::new(Mutex::new(MachineInner {
                        faults: spec.faults.clone(),
                        history: Default::default(),
                        handoff: None,
                    })),
                    spec: Arc::new(spec),
                }
            })
            .collect();
        for m in &machines {
            tracker.spawn(run_machine(ctx.clone(), m.clone(), cancel.clone(), tracker.clone()));
        }
        Ok(Fleet {
            sim,
            machines,
            relay_addr,
            _stop_on_drop: cancel.clone().drop_guard(),
            cancel,
            tracker,
        })
    }

    pub fn machines(&self) -> &[SimMachine] {
        &self.machines
    }

    pub fn machine(&self, i: usize) -> &SimMachine {
        &self.machines[i]
    }

    /// The BMCs (and, with TLS, their CA).
    pub fn sim(&self) -> &Sim {
        &self.sim
    }

    /// Where the relay agent sends from and takes replies, with DHCP.
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay_addr
    }

    /// Stops every machine, the relay and the BMCs, and waits for them.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        let Fleet { sim, .. } = self;
        sim.shutdown().await;
    }
}

/// One machine's life: it waits for its BMC to change something, and on
/// each boot starts what that boot runs (cutting short what ran before).
async fn run_machine(ctx: Arc<Ctx>, m: SimMachine, cancel: CancellationToken, tracker: TaskTracker) {
    let mut changes = m.bmc.subscribe();
    let mut seen = 0;
    let mut was_on = false;
    let mut boots = 0u64;
    let mut running: Option<CancellationToken> = None;
    loop {
        changes.borrow_and_update();
        let (new, power, next) = m.bmc.with(|b| {
            let new: Vec<String> = b.boots[seen.min(b.boots.len())..]
                .iter()
                .map(|boot| boot.target.clone())
                .collect();
            seen = b.boots.len();
            (new, b.systems[0].power, b.next_change())
        });
        if (!new.is_empty() || power == Power::Off)
            && let Some(r) = running.take()
        {
            r.cancel();
        }
        if power == Power::Off && was_on {
            m.record(Event::PoweredOff);
        }
        was_on = power == Power::On;
        // Boots that came and went between two looks were cut short at
        // once: only the last one runs.
        if let Some(target) = new.last().filter(|_| power == Power::On) {
            boots += 1;
            m.record(Event::Boot { target: target.clone() });
            let stop = cancel.child_token();
            running = Some(stop.clone());
            let (ctx, m, target) = (ctx.clone(), m.clone(), target.clone());
            tracker.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = boot(&ctx, &m, &target, boots) => {}
                }
            });
        }
        let wake = next.map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {}
        }
    }
}

/// What one boot runs, from power on until there is nothing more to do.
async fn boot(ctx: &Ctx, m: &SimMachine, target: &str, boot_no: u64) {
    pause(ctx, m, ctx.durations.post, boot_no, 0).await;
    match target {
        "Pxe" | "UefiHttp" => net_boot(ctx, m, boot_no).await,
        // Hdd, None (no override) and anything else: the disk.
        _ => os_boot(ctx, m, boot_no).await,
    }
}

/// Sleeps `base`, lengthened by the jitter drawn for this machine, boot
/// and phase.
async fn pause(ctx: &Ctx, m: &SimMachine, base: Duration, boot_no: u64, phase: u64) {
    let r = unit(splitmix64(ctx.seed ^ ((m.index as u64) << 24) ^ (boot_no << 8) ^ phase));
    let d = base.mul_f64(1.0 + ctx.durations.jitter.clamp(0.0, 1.0) * r);
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// SplitMix64: a good 64-bit mix of `x`, enough for reproducible jitter.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `x` as a number in [0, 1).
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// iPXE's network boot: DHCP (when the fleet has it), the script, and what
/// the script says.
async fn net_boot(ctx: &Ctx, m: &SimMachine, boot_no: u64) {
    let url = match &ctx.relay {
        Some(relay) => match dhcp(ctx, relay, m, boot_no).await {
            Some(ack) => {
                m.record(Event::Leased { ip: ack.ip });
                match ack.bootfile {
                    Some(file) if file.starts_with("http://") || file.starts_with("https://") => {
                        expand_ipxe_settings(&file, m)
                    }
                    other => {
                        m.record(Event::Halted {
                            why: format!("the DHCP answer names no HTTP boot file ({other:?})"),
                        });
                        return;
                    }
                }
            }
            None => {
                m.record(Event::NoDhcp);
                return;
            }
        },
        None => format!("{}/boot/ipxe?mac={}&platform=pcbios", ctx.kiln_url, m.mac()),
    };
    let script = match get_script(ctx, &url).await {
        Ok(s) => s,
        Err(why) => {
            m.record(Event::Halted { why });
            return;
        }
    };
    match parse_script(&script) {
        Script::Agent { server, job, token } => agent(ctx, m, server, job, token, boot_no).await,
        Script::LocalDisk => {
            m.record(Event::LocalDisk);
            os_boot(ctx, m, boot_no).await
        }
        Script::Other(why) => m.record(Event::Halted { why }),
    }
}

/// Fills in what iPXE expands in a boot file name: `${uuid}` and
/// `${serial:uristring}` from the machine's SMBIOS.
fn expand_ipxe_settings(file: &str, m: &SimMachine) -> String {
    let serial: String = m
        .serial()
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    file.replace("${uuid}", &m.uuid().to_string())
        .replace("${serial:uristring}", &serial)
        .replace("${serial}", &serial)
}

async fn get_script(ctx: &Ctx, url: &str) -> Result<String, String> {
    let mut last = String::new();
    for attempt in 0..SCRIPT_TRIES {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        match ctx.http.get(url).send().await {
            Ok(r) if r.status().is_success() => {
                return r.text().await.map_err(|e| format!("reading the boot script: {e}"));
            }
            Ok(r) => last = format!("GET /boot/ipxe answered {}", r.status()),
            Err(e) => last = format!("GET /boot/ipxe: {e}"),
        }
    }
    Err(last)
}

/// What a kiln iPXE script tells the machine to do.
#[derive(Debug, PartialEq, Eq)]
enum Script {
    Agent { server: String, job: String, token: String },
    LocalDisk,
    Other(String),
}

fn parse_script(script: &str) -> Script {
    if let Some(kernel) = script.lines().find(|l| l.starts_with("kernel ")) {
        let arg = |name: &str| {
            kernel
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
        };
        return match (arg("kiln.server="), arg("kiln.job="), arg("kiln.token=")) {
            (Some(server), Some(job), Some(token)) => Script::Agent { server, job, token },
            _ => Script::Other(format!(
                "the script boots a kernel that is not a deploy agent with a job ({})",
                arg("kiln.mode=").unwrap_or_else(|| "no kiln.mode".into())
            )),
        };
    }
    // `sanboot … || exit` or `exit` (`exit 1` on UEFI): iPXE gives up and the firmware boots
    // the next device, the disk.
    if script
        .lines()
        .any(|l| l.starts_with("sanboot") || l.trim() == "exit" || l.trim() == "exit 1")
    {
        return Script::LocalDisk;
    }
    Script::Other(format!(
        "the script neither boots a kernel nor exits: {:?}",
        script.chars().take(120).collect::<String>()
    ))
}

/// The deploy agent: stages 1 to 4, the hand-off, the restart.
async fn agent(ctx: &Ctx, m: &SimMachine, server: String, job: String, token: String, boot_no: u64) {
    m.record(Event::Agent { job: job.clone() });
    let d = &ctx.durations;
    let steps = [
        (1, d.agent_start, "agent started"),
        (2, d.write_image, "image written"),
        (3, d.configure, "configured"),
        (4, d.finish, "finishing: restarting into the new OS"),
    ];
    for (n, before, message) in steps {
        pause(ctx, m, before, boot_no, u64::from(n)).await;
        if n == 2 && m.faults().hang_in_stage_2 {
            m.record(Event::Hung);
            // Until the machine is powered off, reset or the fleet stops.
            std::future::pending::<()>().await;
        }
        if let Err(why) = report(ctx, &server, &job, &token, n, message).await {
            m.record(Event::ReportFailed { n, why });
            return;
        }
        m.record(Event::Stage { n });
    }
    m.lock().handoff = Some(Handoff { server, job, token });
    // The restart ends this boot (and this task with it).
    m.bmc.reboot_from_os(0);
}

/// The OS on the disk: after an install it phones home (stage 5) once.
async fn os_boot(ctx: &Ctx, m: &SimMachine, boot_no: u64) {
    pause(ctx, m, ctx.durations.first_boot, boot_no, 5).await;
    let handoff = m.lock().handoff.take();
    if let Some(h) = handoff
        && !m.faults().never_phone_home
    {
        match report(ctx, &h.server, &h.job, &h.token, 5, "hello from the new OS").await {
            Ok(()) => m.record(Event::Stage { n: 5 }),
            Err(why) => m.record(Event::ReportFailed { n: 5, why }),
        }
    }
    m.record(Event::OsUp);
}

/// `POST {server}/api/v1/jobs/{job}/stages/{n}` with the job's token, tried
/// again (a bounded number of times) while kiln does not answer or answers
/// 5xx; a 4xx is final.
async fn report(ctx: &Ctx, server: &str, job: &str, token: &str, n: u8, message: &str) -> Result<(), String> {
    let url = format!("{}/api/v1/jobs/{job}/stages/{n}", server.trim_end_matches('/'));
    let body = serde_json::json!({ "message": message }).to_string();
    let mut last = String::new();
    for attempt in 0..REPORT_TRIES {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
        }
        let sent = ctx
            .http
            .post(&url)
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if r.status().is_client_error() => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                return Err(format!("stage {n} refused: {status} {}", text.trim()));
            }
            Ok(r) => last = format!("stage {n}: kiln answered {}", r.status()),
            Err(e) => last = format!("stage {n}: {e}"),
        }
    }
    Err(last)
}

/// The fleet's relay agent: one UDP socket; replies go to the machine
/// waiting for their transaction id.
#[derive(Debug)]
struct Relay {
    socket: UdpSocket,
    server: SocketAddr,
    giaddr: Ipv4Addr,
    waiting: Mutex<HashMap<u32, mpsc::Sender<Message>>>,
}

impl Relay {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, mpsc::Sender<Message>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A machine's claim on replies with one transaction id; dropped, it
/// lets go.
struct Waiter<'a> {
    relay: &'a Relay,
    xid: u32,
    replies: mpsc::Receiver<Message>,
}

impl<'a> Waiter<'a> {
    fn new(relay: &'a Relay, xid: u32) -> Waiter<'a> {
        let (tx, replies) = mpsc::channel(4);
        relay.lock().insert(xid, tx);
        Waiter { relay, xid, replies }
    }

    /// The next reply of kind `want` (or a NAK) for `mac`, within `timeout`.
    async fn reply(&mut self, mac: Mac, want: MessageType, timeout: Duration) -> Option<Message> {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(end, self.replies.recv()).await.ok()??;
            let kind = msg.opts().msg_type();
            // hlen first: dhcproto slices chaddr by it.
            if msg.hlen() == 6 && msg.chaddr() == mac.0 && (kind == Some(want) || kind == Some(MessageType::Nak)) {
                return Some(msg);
            }
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.relay.lock().remove(&self.xid);
    }
}

async fn relay_replies(relay: Arc<Relay>, cancel: CancellationToken) {
    let mut buf = vec![0u8; 1500];
    loop {
        let len = tokio::select! {
            _ = cancel.cancelled() => return,
            r = relay.socket.recv_from(&mut buf) => match r {
                Ok((len, _)) => len,
                Err(e) => {
                    tracing::warn!(error = %e, "sim relay: receive failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // dhcproto can panic on a malformed packet: such a packet is
        // dropped like any other that does not decode.
        let Ok(Ok(msg)) = std::panic::catch_unwind(|| Message::from_bytes(&buf[..len])) else {
            continue;
        };
        if msg.opcode() != Opcode::BootReply {
            continue;
        }
        let to = relay.lock().get(&msg.xid()).cloned();
        if let Some(tx) = to {
            // A machine that stopped listening does not hold up the others.
            let _ = tx.try_send(msg);
        }
    }
}

/// What a DHCP exchange ended with.
#[derive(Debug)]
struct Ack {
    ip: Ipv4Addr,
    bootfile: Option<String>,
}

/// The transaction id of a machine's exchange: the machine's index in the
/// middle bits keeps concurrent exchanges of up to 65,536 machines apart;
/// the seed and the try number fill the rest.
fn xid(seed: u64, index: usize, boot_no: u64, attempt: u32) -> u32 {
    let salt = (splitmix64(seed) as u32) & 0xff00_0000;
    salt | ((index as u32 & 0xffff) << 8) | ((boot_no as u32).wrapping_mul(DHCP_TRIES).wrapping_add(attempt) & 0xff)
}

/// DISCOVER, OFFER, REQUEST, ACK as iPXE sends them (user class `iPXE`,
/// BIOS architecture), relayed.
async fn dhcp(ctx: &Ctx, relay: &Relay, m: &SimMachine, boot_no: u64) -> Option<Ack> {
    for attempt in 0..DHCP_TRIES {
        let mut waiter = Waiter::new(relay, xid(ctx.seed, m.index, boot_no, attempt));
        // Real clients wait 4 s, then 8, 16…; on loopback an answer takes
        // milliseconds, so the deadline grows from a second.
        let wait = ctx.timeout.min(Duration::from_secs(1) * (1 << attempt));
        let discover = request(relay, m, waiter.xid, MessageType::Discover, None);
        if send(relay, &discover).await.is_err() {
            continue;
        }
        let Some(offer) = waiter.reply(m.mac(), MessageType::Offer, wait).await else {
            continue;
        };
        if offer.opts().msg_type() != Some(MessageType::Offer) {
            continue;
        }
        let server_id = match offer.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        let req = request(
            relay,
            m,
            waiter.xid,
            MessageType::Request,
            Some((offer.yiaddr(), server_id)),
        );
        if send(relay, &req).await.is_err() {
            continue;
        }
        match waiter.reply(m.mac(), MessageType::Ack, wait).await {
            Some(ack) if ack.opts().msg_type() == Some(MessageType::Ack) => {
                let bootfile = match ack.opts().get(OptionCode::BootfileName) {
                    Some(DhcpOption::BootfileName(f)) => Some(String::from_utf8_lossy(f).into_owned()),
                    _ => ack.fname().map(|f| String::from_utf8_lossy(f).into_owned()),
                };
                return Some(Ack {
                    ip: ack.yiaddr(),
                    bootfile: bootfile.filter(|f| !f.is_empty()),
                });
            }
            // A NAK, or nothing: start over, as a client does.
            _ => continue,
        }
    }
    None
}

/// A client request as the relay forwards it: giaddr, one hop, option 82
/// with the machine's port and the relay source port (RFC 8357), so that
/// kiln answers to the relay's own port rather than to 67.
fn request(
    relay: &Relay,
    m: &SimMachine,
    xid: u32,
    kind: MessageType,
    chosen: Option<(Ipv4Addr, Option<Ipv4Addr>)>,
) -> Message {
    let mut msg = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        relay.giaddr,
        &m.mac().0,
    );
    msg.set_hops(1);
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ClientSystemArchitecture(Architecture::X86_Bios));
    opts.insert(DhcpOption::ClassIdentifier(
        b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
    ));
    opts.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    opts.insert(DhcpOption::MaxMessageSize(1472));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::BootfileName,
    ]));
    if let Some((ip, server_id)) = chosen {
        opts.insert(DhcpOption::RequestedIpAddress(ip));
        if let Some(id) = server_id {
            opts.insert(DhcpOption::ServerIdentifier(id));
        }
    }
    let mut info = RelayAgentInformation::default();
    if let Some(c) = &m.spec.circuit_id {
        info.insert(RelayInfo::AgentCircuitId(c.as_bytes().to_vec()));
    }
    if let Some(r) = &m.spec.remote_id {
        info.insert(RelayInfo::AgentRemoteId(r.as_bytes().to_vec()));
    }
    info.insert(RelayInfo::Unknown(UnknownInfo::new(
        RelayCode::Unknown(RELAY_SOURCE_PORT),
        vec![],
    )));
    opts.insert(DhcpOption::RelayAgentInformation(info));
    msg
}

/// Option 82 sub-option "relay source port" (RFC 8357): the server sends
/// its reply to the UDP port the request came from.
pub const RELAY_SOURCE_PORT: u8 = 19;

async fn send(relay: &Relay, msg: &Message) -> std::io::Result<()> {
    let bytes = msg
        .to_vec()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    relay.socket.send_to(&bytes, relay.server).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_are_read_as_ipxe_would_run_them() {
        let agent = "#!ipxe\necho kiln: job 7: booting its installer\n\
            kernel http://127.0.0.1:1/boot/file/vmlinuz console=ttyS0 kiln.mode=deploy kiln.job=7 \
            kiln.server=http://127.0.0.1:1 kiln.token=kj_abc\ninitrd http://127.0.0.1:1/boot/file/a\nboot\n";
        assert_eq!(
            parse_script(agent),
            Script::Agent {
                server: "http://127.0.0.1:1".into(),
                job: "7".into(),
                token: "kj_abc".into()
            }
        );
        let disk = "#!ipxe\necho kiln: booting from local disk\nsanboot --no-describe --drive 0x80 || exit\n";
        assert_eq!(parse_script(disk), Script::LocalDisk);
        assert_eq!(parse_script("#!ipxe\nexit\n"), Script::LocalDisk);
        assert_eq!(parse_script("#!ipxe\nexit 1\n"), Script::LocalDisk);
        let discover = "#!ipxe\nkernel http://x/boot/file/vmlinuz kiln.mode=discover\nboot\n";
        assert!(matches!(parse_script(discover), Script::Other(w) if w.contains("discover")));
        assert!(matches!(parse_script("nonsense"), Script::Other(_)));
    }

    #[test]
    fn jitter_and_ids_are_reproducible_and_distinct() {
        assert_eq!(splitmix64(42), splitmix64(42));
        assert_ne!(splitmix64(42), splitmix64(43));
        let u = unit(splitmix64(7));
        assert!((0.0..1.0).contains(&u));
        let ids: std::collections::HashSet<u32> = (0..1000).map(|i| xid(1, i, 1, 0)).collect();
        assert_eq!(ids.len(), 1000, "concurrent machines never share an xid");
        assert_ne!(xid(1, 5, 1, 0), xid(1, 5, 1, 1), "each try has its own");
        assert_eq!(Mac::nth(258).to_string(), "02:5e:00:00:01:02");
    }
}
