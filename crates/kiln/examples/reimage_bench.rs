//! The reimage benchmark's driver (issue 5; run it through
//! `bench/reimage.sh`, which builds it and the server, makes and drops the
//! PostgreSQL database, and records the results in BENCHMARKS.md).
//!
//! One run, one backend:
//!
//! 1. starts a real `kiln server` *process* (release binary; SQLite in a
//!    fresh data directory, or `--database-url`) with DHCP on `lo` at a free
//!    port, so that its CPU time and peak memory are its own;
//! 2. starts a simulated fleet in this process (`kiln_sim::fleet`): N
//!    machines, each with a Redfish BMC on loopback (HTTPS, verified against
//!    the fleet's CA; powered on, as a deployed machine is), that net-boot
//!    through a relayed DHCP exchange with kiln, fetch `/boot/ipxe`, report
//!    stages 1–4 as the agent and 5 as the new OS;
//! 3. enrolls the N machines (one bulk request: MAC, DMI serial, BMC with
//!    password and CA) and an OS image;
//! 4. starts N reimages at once (at most `--start-concurrency` requests in
//!    flight) and waits until no job is active;
//! 5. reports wall time (first request to the last `finished_at`), the
//!    server's CPU (utime + stime from /proc/PID/stat) over the reimage
//!    phase and per reimage, its peak RSS (VmHWM, reset with
//!    /proc/PID/clear_refs before the phase), and per job its duration
//!    against the least the simulation allows: `Durations::reimage_total()`
//!    plus the BMC's power-off and power-on delays (jitter is 0, so that
//!    floor is exact for every job — and all machines move in lockstep,
//!    the worst case for bursts).
//!
//! Each job's overshoot is split where it was spent: BMC path (job created
//! to the machine's network boot, less the two power delays), machine path
//! (what kiln's DHCP, HTTP boot and stage endpoint added to the machine's
//! own pauses, from the machine's event history) and tail (stage 5
//! accepted to the job's end).
//!
//! Every load is bounded: the fleet's requests have deadlines and bounded
//! tries, the start is `--start-concurrency` requests at a time, the wait
//! for the end polls one cheap request every 250 ms and gives up after the
//! floor plus `--timeout-secs`. The server is stopped by its PID (SIGTERM,
//! then SIGKILL) however the run ends.

// serde_json::json! of the results nests deeper than the default allows.
#![recursion_limit = "256"]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use clap::Parser;
use kiln_client::Client;
use kiln_sim::fleet::{DhcpRelay, Durations, Event, Fleet, FleetConfig, Mac, MachineSpec, SimMachine};
use kiln_types::Secret;
use kiln_types::catalog::{Arch, OsImageCreate, OsKind, PlatformTag};
use kiln_types::job::{Job, JobDetail, JobFilter, JobLogKind, JobState, ReimageRequest};
use kiln_types::machine::{BmcDriver, BmcInput, Disk, Dmi, Hardware, MachineCreate, MachineState, Nic};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Debug, Parser)]
#[command(about = "1,000 concurrent simulated reimages against a real kiln server process")]
struct Args {
    /// The kiln binary to run as the server.
    #[arg(long, default_value = "target/release/kiln")]
    kiln: PathBuf,
    /// Machines, all reimaged at once.
    #[arg(long, default_value_t = 1000)]
    machines: u32,
    /// PostgreSQL database (empty, made for this run); without it, SQLite
    /// in the work directory.
    #[arg(long)]
    database_url: Option<String>,
    /// A name for this run in the output (default: the backend).
    #[arg(long)]
    label: Option<String>,
    /// Seconds of each simulated install phase (POST a tenth of it).
    #[arg(long, default_value_t = 3.0)]
    stage_secs: f64,
    /// How long a simulated BMC takes to change the power state.
    #[arg(long, default_value_t = 1000)]
    power_delay_ms: u64,
    /// The server's `[bmc] max_concurrent`.
    #[arg(long, default_value_t = 1024)]
    bmc_max_concurrent: usize,
    /// Reimage requests in flight at once while starting the jobs.
    #[arg(long, default_value_t = 64)]
    start_concurrency: usize,
    /// The BMCs speak plain HTTP instead of verified HTTPS.
    #[arg(long)]
    plain_bmc: bool,
    /// The server's log filter (its log goes to WORK_DIR/server.log).
    #[arg(long, default_value = "info")]
    log: String,
    /// Seconds past the simulated floor to wait for the jobs to end.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Where the config, data directory and server log go (default: a
    /// temporary directory, removed at the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Also write the results here, as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

const GIB: u64 = 1 << 30;
/// /proc reports CPU times in USER_HZ ticks, 100 on Linux.
const TICKS_PER_SEC: f64 = 100.0;

fn host(i: usize) -> String {
    format!("bench{i:05}")
}

fn serial(i: usize) -> String {
    format!("BENCH-{i:05}")
}

/// A free port on 127.0.0.1 for `proto` (closed again: the server binds it).
fn free_port(udp: bool) -> anyhow::Result<u16> {
    Ok(if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
    })
}

/// The server's config: DHCP on loopback for the fleet relay's subnet,
/// BMC concurrency for the whole fleet, everything else the defaults.
fn server_config(args: &Args, dir: &Path, port: u16, dhcp_port: u16) -> String {
    let [from, to] = DhcpRelay::DEFAULT_POOL;
    let database = match &args.database_url {
        Some(url) => format!("database_url = \"{url}\"\n"),
        None => String::new(),
    };
    format!(
        r#"data_dir = "{data}"
listen = "127.0.0.1:{port}"
{database}log = "{log}"

[bmc]
max_concurrent = {bmc}

[dhcp]
mode = "full"
interfaces = ["lo"]
port = {dhcp_port}

[[dhcp.subnet]]
network = "{subnet}"
pool = ["{from}", "{to}"]
lease_time = 3600
"#,
        data = dir.join("data").display(),
        log = args.log,
        bmc = args.bmc_max_concurrent,
        subnet = DhcpRelay::DEFAULT_SUBNET,
    )
}

/// The `kiln server` process; stopped by its PID when dropped.
struct Server {
    child: Child,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, up to 10 s to stop, then SIGKILL.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// utime + stime of process `pid`, in seconds.
fn cpu_secs(pid: &str) -> anyhow::Result<f64> {
    let [user, sys] = cpu_split(pid)?;
    Ok(user + sys)
}

/// utime and stime of process `pid` (all its threads), in seconds.
fn cpu_split(pid: &str) -> anyhow::Result<[f64; 2]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: state is the
    // first, utime the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').context("/proc/PID/stat without a command name")? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok([
        f[11].parse::<u64>()? as f64 / TICKS_PER_SEC,
        f[12].parse::<u64>()? as f64 / TICKS_PER_SEC,
    ])
}

/// CPU seconds the whole machine spent busy (all CPUs; user, nice,
/// system, irq, softirq), stolen by the hypervisor, and in softirq (where
/// loopback packets are processed, whichever process sent them), from
/// /proc/stat.
fn machine_busy() -> anyhow::Result<[f64; 3]> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .context("an empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let field = |i: usize| cpu.get(i).copied().unwrap_or(0) as f64 / TICKS_PER_SEC;
    Ok([field(0) + field(1) + field(2) + field(5) + field(6), field(7), field(6)])
}

/// A `/proc/PID/status` line's value in MiB (`VmHWM`, `VmRSS`).
fn status_mib(pid: &str, key: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("a status line without a value")?
        .parse()?;
    Ok(kib / 1024.0)
}

/// The PostgreSQL backends serving database `db` (their process titles
/// name it), with their CPU seconds so far.
fn pg_backends(db: &str) -> std::collections::HashMap<u32, f64> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let title = String::from_utf8_lossy(&cmdline);
        // "postgres: [CLUSTER: ]USER DB HOST(PORT) STATE"
        if title.starts_with("postgres: ")
            && title.split(['\0', ' ']).any(|w| w == db)
            && let Ok(cpu) = cpu_secs(&pid.to_string())
        {
            out.insert(pid, cpu);
        }
    }
    out
}

/// CPU the backends in `after` used since `before` (a backend that
/// started in between counts from zero; one that ended is not seen).
fn pg_cpu_since(before: &std::collections::HashMap<u32, f64>, after: &std::collections::HashMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, cpu)| cpu - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

fn request() -> ReimageRequest {
    ReimageRequest {
        os: "debian-12".into(),
        layout: None,
        hostname: None,
        ssh_keys: vec![],
        root_password: None,
        root_password_hash: None,
        tasks: vec![],
        post_install_script: None,
        callback_url: None,
        ticket: Some("BENCH".into()),
        no_pxe: false,
        no_hooks: false,
        new: false,
    }
}

/// Machine `m` of the fleet as enrolled: its MAC, the serial its BMC
/// reports (the Redfish driver finds its system by it) and its BMC.
fn enrollment(m: &SimMachine, password: &str, ca: Option<&str>) -> anyhow::Result<MachineCreate> {
    let i = m.index();
    let mac = m
        .mac()
        .to_string()
        .parse()
        .map_err(|e| anyhow::anyhow!("MAC {}: {e}", m.mac()))?;
    let mut c = MachineCreate::new(host(i).parse().map_err(|e| anyhow::anyhow!("hostname: {e}"))?);
    c.state = MachineState::Deployed;
    c.nics = vec![Nic {
        name: Some("eno1".into()),
        ..Nic::with_mac(mac)
    }];
    c.bmc = Some(BmcInput {
        driver: BmcDriver::Redfish,
        address: m.bmc().url().to_string(),
        username: Some("admin".into()),
        password: Some(Secret::new(password)),
        insecure: false,
        ca_cert: ca.map(str::to_string),
    });
    c.hardware = Some(Hardware {
        arch: Some(Arch::X86_64),
        cpu_cores: 32,
        memory_bytes: 128 * GIB,
        disks: vec![Disk {
            name: "nvme0n1".into(),
            size_bytes: 960 * 1_000_000_000,
            rotational: false,
            model: None,
            serial: None,
            by_id: None,
        }],
        dmi: Some(Dmi {
            serial: Some(serial(i)),
            ..Default::default()
        }),
        ..Default::default()
    });
    Ok(c)
}

/// p50, p99 and max of `v` (sorted in place); zeros when empty.
fn percentiles(v: &mut [f64]) -> [f64; 3] {
    if v.is_empty() {
        return [0.0; 3];
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    [at(0.5), at(0.99), v[v.len() - 1]]
}

fn secs(d: chrono::TimeDelta) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

/// Where one job's time went beyond the floor, in seconds.
#[derive(Debug, Default)]
struct Split {
    /// Job created to its first step starting (the engine's queue).
    queue: Option<f64>,
    /// Job created to the machine's network boot, less the power delays.
    bmc: Option<f64>,
    /// What kiln's answers added to the machine's own pauses, from the
    /// network boot to stage 5 accepted.
    machine: Option<f64>,
    /// Stage 5 accepted to the job's end.
    tail: Option<f64>,
}

fn split(job: &JobDetail, m: &SimMachine, fleet_t0: DateTime<Utc>, d: &Durations, power: Duration) -> Split {
    let created = job.job.created_at;
    let wall = |at: Duration| fleet_t0 + chrono::TimeDelta::from_std(at).unwrap_or_default();
    let history = m.history();
    let pxe = history
        .iter()
        .find(|r| matches!(&r.event, Event::Boot { target } if target == "Pxe"))
        .map(|r| wall(r.at));
    let stage5 = history
        .iter()
        .find(|r| r.event == Event::Stage { n: 5 })
        .map(|r| wall(r.at));
    let pauses = d.reimage_total();
    let queue = job
        .log
        .iter()
        .find(|l| l.kind == JobLogKind::Step && l.message == "started")
        .map(|l| secs(l.at - created));
    Split {
        queue,
        bmc: pxe.map(|p| secs(p - created) - 2.0 * power.as_secs_f64()),
        machine: pxe.zip(stage5).map(|(p, s)| secs(s - p) - pauses.as_secs_f64()),
        tail: stage5.zip(job.job.finished_at).map(|(s, f)| secs(f - s)),
    }
}

/// The steps of a reimage, in order (from the first job's view).
fn step_order(details: &[(usize, JobDetail)]) -> Vec<&str> {
    details
        .first()
        .map(|(_, d)| d.job.steps.iter().map(String::as_str).collect())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kiln_client::install_tls_provider();
    let args = Args::parse();
    let n = args.machines as usize;
    let backend = if args.database_url.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    let label = args.label.clone().unwrap_or_else(|| backend.to_string());
    let tmp = tempfile::Builder::new().prefix("kiln-reimage-bench-").tempdir()?;
    let dir = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    let kiln = std::fs::canonicalize(&args.kiln).with_context(|| format!("the kiln binary {}", args.kiln.display()))?;

    // The server.
    let (port, dhcp_port) = (free_port(false)?, free_port(true)?);
    let cfg_path = dir.join("server.toml");
    std::fs::write(&cfg_path, server_config(&args, &dir, port, dhcp_port))?;
    let out = Command::new(&kiln)
        .args(["token", "create", "--role", "admin", "--config"])
        .arg(&cfg_path)
        .output()
        .context("running `kiln token create`")?;
    if !out.status.success() {
        bail!("kiln token create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    let log_path = dir.join("server.log");
    let mut server = Server {
        child: Command::new(&kiln)
            .args(["server", "--config"])
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .context("starting kiln server")?,
    };
    let pid = server.pid().to_string();
    let url = format!("http://127.0.0.1:{port}");
    let admin = Client::new(&url, Some(token));
    let end = Instant::now() + Duration::from_secs(30);
    while admin.healthz().await.is_err() {
        if Instant::now() > end || matches!(server.child.try_wait(), Ok(Some(_))) {
            bail!(
                "kiln server did not come up: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The fleet.
    let stage = Duration::try_from_secs_f64(args.stage_secs).context("--stage-secs")?;
    let power = Duration::from_millis(args.power_delay_ms);
    let durations = Durations {
        jitter: 0.0,
        ..Durations::uniform(stage)
    };
    let floor = durations.reimage_total() + 2 * power;
    let password = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let specs = (0..n)
        .map(|i| MachineSpec {
            serial: Some(serial(i)),
            ..MachineSpec::new(Mac::nth(i as u32))
        })
        .collect();
    let mut fc = FleetConfig::new(&url, specs);
    fc.dhcp = Some(DhcpRelay::to(SocketAddr::from((Ipv4Addr::LOCALHOST, dhcp_port))));
    fc.durations = durations.clone();
    fc.seed = 1;
    fc.bmc.tls = !args.plain_bmc;
    fc.bmc.password = password.clone();
    fc.bmc.spec.powered_on = true;
    fc.bmc.spec.power_delay = power;
    let fleet = Fleet::start(fc).await.context("starting the simulated fleet")?;
    let fleet_t0 = Utc::now();

    // Enrollment.
    let t = Instant::now();
    admin
        .create_os_image(&OsImageCreate {
            name: "debian".into(),
            version: "12".into(),
            arch: Arch::X86_64,
            kind: OsKind::DiskImage,
            tags: vec![PlatformTag::Bm],
            min_ram_bytes: 2 * GIB,
            min_disk_bytes: 20 * GIB,
            source: "http://images.example/debian-12.raw.zst".into(),
            sha256: Some("0".repeat(64)),
            format: None,
            content: Default::default(),
            templates: Default::default(),
        })
        .await
        .context("creating the OS image")?;
    let machines = fleet
        .machines()
        .iter()
        .map(|m| enrollment(m, &password, fleet.sim().ca_pem()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let enrolled = admin
        .bulk_create_machines(machines)
        .await
        .context("enrolling the fleet")?
        .len();
    let enroll_secs = t.elapsed().as_secs_f64();
    let enroll_hwm = status_mib(&pid, "VmHWM")?;
    let rss_before = status_mib(&pid, "VmRSS")?;
    eprintln!(
        "[{label}] server PID {pid}; {enrolled} machines enrolled in {enroll_secs:.1} s; server RSS {rss_before:.0} MiB; \
         reimaging (floor {:.1} s per job)…",
        floor.as_secs_f64()
    );

    // The reimage phase.
    // Peak RSS of the phase alone: "5" resets VmHWM to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("resetting the server's VmHWM")?;
    let split0 = cpu_split(&pid)?;
    let cpu0 = split0[0] + split0[1];
    let pg_db = args
        .database_url
        .as_deref()
        .and_then(|u| u.rsplit('/').next())
        .map(|d| d.split('?').next().unwrap_or(d).to_string());
    let pg0 = pg_db.as_deref().map(pg_backends).unwrap_or_default();
    let self_cpu0 = cpu_secs("self")?;
    let busy0 = machine_busy()?;
    let t0 = Utc::now();
    let started = Instant::now();
    let slots = Arc::new(Semaphore::new(args.start_concurrency.max(1)));
    let mut starting = JoinSet::new();
    for i in 0..n {
        let permit = slots.clone().acquire_owned().await?;
        let admin = admin.clone();
        starting.spawn(async move {
            let r = admin.reimage(&host(i), &request()).await;
            drop(permit);
            (i, r)
        });
    }
    let mut jobs: Vec<Option<Job>> = vec![None; n];
    let mut start_errors = vec![];
    while let Some(r) = starting.join_next().await {
        let (i, r) = r?;
        match r {
            Ok(job) => jobs[i] = Some(job),
            Err(e) => start_errors.push(format!("{}: {e}", host(i))),
        }
    }
    let start_secs = started.elapsed().as_secs_f64();
    let give_up = Instant::now() + floor + Duration::from_secs(args.timeout_secs);
    let active = JobFilter {
        active: true,
        limit: Some(1),
        ..Default::default()
    };
    let mut timed_out = false;
    loop {
        match admin.list_jobs(&active).await {
            Ok(a) if a.is_empty() => break,
            Ok(_) => {}
            Err(e) => eprintln!("[{label}] listing active jobs: {e}"),
        }
        if Instant::now() > give_up {
            timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let split1 = cpu_split(&pid)?;
    let self_cpu = cpu_secs("self")? - self_cpu0;
    let busy1 = machine_busy()?;
    let cpu = split1[0] + split1[1] - cpu0;
    let (cpu_user, cpu_sys) = (split1[0] - split0[0], split1[1] - split0[1]);
    let pg_cpu = pg_db.as_deref().map(|db| pg_cpu_since(&pg0, &pg_backends(db)));
    // Everything else that ran on the machine meanwhile (other work, the
    // kernel's own threads).
    let others_cpu = (busy1[0] - busy0[0]) - cpu - self_cpu - pg_cpu.unwrap_or(0.0);
    let steal = busy1[1] - busy0[1];
    let softirq = busy1[2] - busy0[2];
    let hwm = status_mib(&pid, "VmHWM")?;
    let observed_secs = started.elapsed().as_secs_f64();

    // The jobs, read after the measurement (their logs are not free).
    let slots = Arc::new(Semaphore::new(16));
    let mut reading = JoinSet::new();
    for (i, job) in jobs.iter().enumerate() {
        let Some(job) = job else { continue };
        let (admin, id, slots) = (admin.clone(), job.id.to_string(), slots.clone());
        reading.spawn(async move {
            let _permit = slots.acquire_owned().await;
            (i, admin.get_job(&id).await)
        });
    }
    let mut details: Vec<(usize, JobDetail)> = vec![];
    while let Some(r) = reading.join_next().await {
        let (i, r) = r?;
        details.push((i, r.with_context(|| format!("reading the job of {}", host(i)))?));
    }
    details.sort_by_key(|(i, _)| *i);
    let server_log = std::fs::read_to_string(&log_path).unwrap_or_default();
    server.stop();

    let floor_s = floor.as_secs_f64();
    let succeeded = details
        .iter()
        .filter(|(_, d)| d.job.state == JobState::Succeeded)
        .count();
    let mut reasons: Vec<String> = details
        .iter()
        .filter(|(_, d)| d.job.state != JobState::Succeeded)
        .map(|(i, d)| {
            format!(
                "{} {}: {}",
                host(*i),
                d.job.state,
                d.job.reason.as_deref().unwrap_or("(no reason)")
            )
        })
        .collect();
    reasons.extend(start_errors.iter().cloned());
    let last_end = details.iter().filter_map(|(_, d)| d.job.finished_at).max();
    let wall = last_end.map(|e| secs(e - t0));
    let mut durations_s = vec![];
    let mut overshoot = vec![];
    let (mut queue, mut bmc, mut machine, mut tail) = (vec![], vec![], vec![], vec![]);
    let mut machines_off_script = 0;
    for (i, d) in &details {
        let m = fleet.machine(*i);
        if let Some(f) = d.job.finished_at {
            let took = secs(f - d.job.created_at);
            durations_s.push(took);
            overshoot.push(took - floor_s);
        }
        let s = split(d, m, fleet_t0, &durations, power);
        queue.extend(s.queue);
        bmc.extend(s.bmc);
        machine.extend(s.machine);
        tail.extend(s.tail);
        let boots: Vec<String> = m.bmc().boots().into_iter().map(|b| b.target).collect();
        if m.stages_reported() != [1, 2, 3, 4, 5] || boots != ["Pxe", "Hdd"] || m.leased_ip().is_none() {
            machines_off_script += 1;
        }
    }
    // How long each step took, first start to done (waits included).
    let mut steps: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for (_, d) in &details {
        let mut started: std::collections::HashMap<&str, DateTime<Utc>> = Default::default();
        for l in d.log.iter().filter(|l| l.kind == JobLogKind::Step) {
            let Some(step) = l.step.as_deref() else { continue };
            match l.message.as_str() {
                "started" => {
                    started.entry(step).or_insert(l.at);
                }
                "done" => {
                    if let Some(s) = started.get(step) {
                        steps.entry(step.to_string()).or_default().push(secs(l.at - *s));
                    }
                }
                _ => {}
            }
        }
    }
    let order: Vec<&str> = step_order(&details);
    // In step order: [name, [p50, p99, max]].
    let step_secs: Vec<serde_json::Value> = order
        .iter()
        .filter_map(|s| steps.get_mut(*s).map(|v| serde_json::json!([s, percentiles(v)])))
        .collect();
    // What the BMCs were asked, per machine (every request and session).
    let (mut bmc_requests, mut bmc_sessions) = (0u64, 0u64);
    for m in fleet.machines() {
        let st = m.bmc().stats();
        bmc_requests += st.requests;
        bmc_sessions += st.sessions_created;
    }
    let exceeded = overshoot.iter().filter(|o| **o > 2.0).count();
    let [dur_p50, dur_p99, dur_max] = percentiles(&mut durations_s);
    let [over_p50, over_p99, over_max] = percentiles(&mut overshoot);
    let pct = |v: &mut Vec<f64>| percentiles(v).to_vec();
    let log_lines = server_log.lines().count();
    // kiln logs every DHCP request it answers: two per machine when no
    // client had to ask again.
    let dhcp_answers = server_log
        .lines()
        .filter(|l| l.contains("kiln_server::dhcp") && (l.contains("): offer ") || l.contains("): ack ")))
        .count();
    let warn_lines = server_log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .count();
    let result = serde_json::json!({
        "label": label,
        "backend": backend,
        "machines": n,
        "enrolled": enrolled,
        "enroll_secs": enroll_secs,
        "stage_secs": args.stage_secs,
        "power_delay_ms": args.power_delay_ms,
        "bmc_max_concurrent": args.bmc_max_concurrent,
        "bmc_tls": !args.plain_bmc,
        "start_concurrency": args.start_concurrency,
        "log": args.log,
        "floor_secs": floor_s,
        "start_secs": start_secs,
        "observed_secs": observed_secs,
        "wall_secs": wall,
        "timed_out": timed_out,
        "succeeded": succeeded,
        "not_succeeded": reasons.len(),
        "reasons": reasons.iter().take(10).collect::<Vec<_>>(),
        "machines_off_script": machines_off_script,
        "server_cpu_secs": cpu,
        "server_cpu_user_secs": cpu_user,
        "server_cpu_sys_secs": cpu_sys,
        "cpu_ms_per_reimage": cpu * 1000.0 / n as f64,
        "driver_cpu_secs": self_cpu,
        "postgres_cpu_secs": pg_cpu,
        "others_cpu_secs": others_cpu,
        "steal_secs": steal,
        "softirq_secs": softirq,
        "postgres_cpu_ms_per_reimage": pg_cpu.map(|c| c * 1000.0 / n as f64),
        "server_rss_before_mib": rss_before,
        "server_hwm_enroll_mib": enroll_hwm,
        "server_hwm_reimage_mib": hwm,
        "duration_secs": [dur_p50, dur_p99, dur_max],
        "overshoot_secs": [over_p50, over_p99, over_max],
        "exceeded_2s": exceeded,
        "split_secs": {
            "queue": pct(&mut queue),
            "bmc": pct(&mut bmc),
            "machine": pct(&mut machine),
            "tail": pct(&mut tail),
        },
        "step_secs": step_secs,
        "bmc_requests_per_machine": bmc_requests as f64 / n as f64,
        "bmc_sessions_per_machine": bmc_sessions as f64 / n as f64,
        "server_log_lines": log_lines,
        "dhcp_answers_per_machine": dhcp_answers as f64 / n as f64,
        "server_log_warnings": warn_lines,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
    }
    if warn_lines > 0 {
        eprintln!("[{label}] the server logged {warn_lines} warnings or errors; the first:");
        for l in server_log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .take(5)
        {
            eprintln!("  {l}");
        }
    }
    fleet.shutdown().await;
    if timed_out {
        bail!(
            "[{label}] jobs were still active {} s past the floor",
            args.timeout_secs
        );
    }
    Ok(())
}
