//! `kiln demo`: kiln's main job on its embedded default. Starts a server on
//! SQLite in a data directory, enrolls a simulated two-rack fleet with its
//! hardware inventory and a small catalog (once), prints an admin token and
//! serves until Ctrl-C.
//!
//! The fleet is alive: kiln-sim runs a simulated Redfish BMC per machine
//! (enrolled with its address and a password made for this run) and
//! machines that net-boot from kiln — DHCP on loopback through a simulated
//! relay, HTTP boot, the deploy agent's stage reports. The demo starts a
//! reimage of a few machines and shows it happening, in seconds.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use kiln_client::{Client, JobEvent};
use kiln_server::config::DhcpSettings;
use kiln_server::{AppState, Config, Settings};
use kiln_sim::fleet::{DhcpRelay, Durations, Fleet, FleetConfig, Mac, MachineSpec};
use kiln_store::{Actor, NewMachine, Store};
use kiln_types::Secret;
use kiln_types::auth::{Role, TenantCreate};
use kiln_types::catalog::{Arch, OsImageCreate, OsKind, PlatformTag, TaskCreate, TaskKind};
use kiln_types::job::{JobFilter, JobLogKind, JobState, ReimageRequest};
use kiln_types::machine::{
    BmcDriver, BmcInput, Disk, Dmi, Gpu, Hardware, HardwareNic, Machine, MachineCreate, MachineFilter, MachinePatch,
    MachineState, Nic,
};
use kiln_types::site::{RackCreate, SiteCreate};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::server::{init_logging, shutdown_on_signal};
use crate::output::Out;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the demo keeps its database and key.
    #[arg(long, default_value = "kiln-demo")]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Machines per rack in the simulated fleet (two racks).
    #[arg(long, default_value_t = 20)]
    per_rack: u32,
    /// Enroll the fleet and exit instead of serving.
    #[arg(long)]
    seed_only: bool,
    /// Machines to reimage at start (0: none; start your own).
    #[arg(long, default_value_t = 3)]
    reimage: usize,
    /// Seconds a simulated machine spends in each install stage.
    #[arg(long, default_value_t = 2.0)]
    stage_secs: f64,
    /// Stop once the demo's reimages have ended (exit status 1 if one
    /// failed) instead of serving until Ctrl-C.
    #[arg(long)]
    exit_when_done: bool,
}

const GIB: u64 = 1 << 30;

/// A machine of the simulated fleet: every fifth has GPUs, disks vary so
/// that different storage layouts fit.
fn sim_machine(rack: u32, n: u32) -> MachineCreate {
    let host = format!("sim-r{rack}-n{n:03}");
    let mac = format!("02:00:00:{rack:02x}:{:02x}:{:02x}", n >> 8, n & 0xff);
    let gpu = n.is_multiple_of(5);
    let disks = [1, 2, 4, 5][(n % 4) as usize];
    let hw = Hardware {
        arch: Some(Arch::X86_64),
        cpu_model: Some("Simulated Xeon".into()),
        cpu_cores: if gpu { 64 } else { 32 },
        memory_bytes: if gpu { 512 * GIB } else { 128 * GIB },
        disks: (0..disks)
            .map(|d| Disk {
                name: format!("nvme{d}n1"),
                size_bytes: 960 * 1_000_000_000,
                rotational: false,
                model: Some("SIM NVMe 960G".into()),
                serial: Some(format!("SIM{rack}{n:03}{d}")),
                by_id: Some(format!("/dev/disk/by-id/nvme-SIM_{rack}{n:03}{d}")),
            })
            .collect(),
        nics: vec![HardwareNic {
            mac: mac.parse().unwrap(),
            name: "eno1".into(),
            driver: Some("virtio_net".into()),
            speed_mbps: Some(25_000),
            link: true,
        }],
        gpus: if gpu {
            vec![Gpu {
                model: "Simulated A100".into(),
                vgpu: false,
            }]
        } else {
            vec![]
        },
        raid_controller: None,
        dmi: Some(Dmi {
            vendor: Some("kiln".into()),
            product: Some("sim".into()),
            serial: Some(format!("SIM-{rack}-{n:03}")),
            uuid: None,
        }),
    };
    MachineCreate {
        state: MachineState::Ready,
        tags: vec![
            format!("rack{rack}").parse().unwrap(),
            if gpu { "gpu" } else { "cpu" }.parse().unwrap(),
        ],
        site: Some("demo".into()),
        rack: Some(format!("r{rack}")),
        owner: (n < 4).then(|| "acme".to_string()),
        nics: vec![Nic {
            mac: Some(mac.parse().unwrap()),
            name: Some("eno1".into()),
            switch: Some(format!("asw-r{rack}")),
            port: Some(format!("xe-0/0/{n}")),
            vlan: Some(100 + rack as u16),
            circuit_id: Some(format!("xe-0/0/{n}")),
            remote_id: Some(format!("asw-r{rack}")),
        }],
        ipv4: Some(format!("10.{rack}.{}.{}", n / 250, n % 250 + 2).parse().unwrap()),
        hardware: Some(hw),
        ..MachineCreate::new(host.parse().unwrap())
    }
}

/// Enrolls the demo site, racks, tenant, catalog and `per_rack` machines in
/// each of two racks — unless the store already has machines.
pub async fn seed_demo_fleet(store: &Store, per_rack: u32) -> anyhow::Result<usize> {
    if !store
        .list_machines(
            &MachineFilter {
                limit: Some(1),
                ..Default::default()
            },
            None,
        )
        .await?
        .items
        .is_empty()
    {
        return Ok(0);
    }
    let actor = Actor::new("demo seed");
    store
        .create_site(
            &actor,
            &SiteCreate {
                name: "demo".into(),
                description: Some("simulated fleet".into()),
            },
        )
        .await?;
    for r in 1..=2 {
        store
            .create_rack(
                &actor,
                &RackCreate {
                    name: format!("r{r}"),
                    site: "demo".into(),
                    row: Some("a".into()),
                    node_group: None,
                },
            )
            .await?;
    }
    store
        .create_tenant(
            &actor,
            &TenantCreate {
                name: "acme".into(),
                description: Some("a hosting customer".into()),
            },
        )
        .await?;
    let image = |name: &str, version: &str, tags: Vec<PlatformTag>, ram: u64| OsImageCreate {
        name: name.into(),
        version: version.into(),
        arch: Arch::X86_64,
        kind: OsKind::DiskImage,
        tags,
        min_ram_bytes: ram * GIB,
        min_disk_bytes: 20 * GIB,
        source: format!("http://images.example/{name}-{version}.raw.zst"),
        sha256: Some("0".repeat(64)),
        format: None,
        content: Default::default(),
        templates: Default::default(),
    };
    store
        .create_os_image(
            &actor,
            &image("debian", "12", vec![PlatformTag::Bm, PlatformTag::Vm], 2),
        )
        .await?;
    store
        .create_os_image(
            &actor,
            &image("ubuntu-cuda", "24.04", vec![PlatformTag::Bm, PlatformTag::Gpu], 64),
        )
        .await?;
    store
        .create_task(
            &actor,
            &TaskCreate {
                name: "motd".into(),
                kind: TaskKind::Script,
                tags: vec![],
                content: "#!/bin/sh\necho 'installed by kiln' > /etc/motd\n".into(),
            },
        )
        .await?;
    let machines: Vec<NewMachine> = (1..=2)
        .flat_map(|r| {
            (1..=per_rack).map(move |n| NewMachine {
                spec: sim_machine(r, n),
                sealed_password: None,
            })
        })
        .collect();
    Ok(store.create_machines(&actor, machines).await?.len())
}

/// DHCP on loopback for the simulated relay's subnet, at a free port: no
/// privileges needed.
fn loopback_dhcp() -> DhcpSettings {
    let [from, to] = DhcpRelay::DEFAULT_POOL;
    let toml = format!(
        "mode = \"full\"\ninterfaces = [\"lo\"]\nport = 0\n\n[[subnet]]\nnetwork = \"{}\"\npool = [\"{from}\", \"{to}\"]\nlease_time = 600\n",
        DhcpRelay::DEFAULT_SUBNET
    );
    toml::from_str(&toml).expect("the demo's DHCP settings parse")
}

pub async fn run(args: DemoArgs, out: &mut Out) -> anyhow::Result<()> {
    // The demo's simulated machines and printed URL speak plain HTTP, which
    // the server allows on loopback only (docs/config.md, `[api]`).
    if args.listen.parse::<SocketAddr>().is_ok_and(|a| !a.ip().is_loopback()) {
        anyhow::bail!(
            "the demo serves its API over plain HTTP, so only on loopback: --listen 127.0.0.1:PORT \
             (a server for other hosts is `kiln server` with `tls = true` under [api])"
        );
    }
    let config = Config::from_settings(Settings {
        data_dir: Some(args.data_dir.clone()),
        listen: Some(args.listen.clone()),
        dhcp: Some(loopback_dhcp()),
        // The simulated machines are iPXE clients sent to HTTP boot: no
        // TFTP (whose port 69 would need privileges). `kiln server` would
        // refuse this (its PXE clients' first stage would not be served);
        // the demo runs no PXE client.
        tftp: Some(kiln_server::tftp::TftpSettings {
            enabled: false,
            ..Default::default()
        }),
        ..Default::default()
    })?;
    init_logging("warn");
    let state = AppState::open(&config).await?;
    let seeded = seed_demo_fleet(&state.store, args.per_rack).await?;
    let (token, hash) = kiln_server::auth::new_token();
    state
        .store
        .create_token(&Actor::new("demo"), None, Role::Admin, None, &hash, None)
        .await?;
    let enrolled = format!(
        "kiln demo: embedded SQLite in {}/ ({} machines enrolled now)",
        config.data_dir.display(),
        seeded
    );
    if args.seed_only {
        out.line(enrolled)?;
        out.line(format!(
            "  export KILN_URL=http://{}\n  export KILN_TOKEN={token}",
            config.listen
        ))?;
        return Ok(());
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e} (choose another with --listen)", config.listen))?;
    let url = format!("http://{}", listener.local_addr()?);
    let mut config = config;
    // DHCP on lo needs SO_BINDTODEVICE, which needs no privileges since
    // Linux 5.7; elsewhere the machines ask HTTP boot directly.
    let (dhcp_sockets, dhcp_addr) = match config.dhcp.as_ref().map(kiln_server::dhcp::bind_interfaces) {
        Some(Ok(sockets)) => {
            let addr = sockets[0].local_addr()?;
            (sockets, Some(SocketAddr::V4(addr)))
        }
        Some(Err(e)) => {
            out.line(format!(
                "  (no DHCP on loopback: {e:#}; the simulated machines ask HTTP boot directly)"
            ))?;
            config.dhcp = None;
            (vec![], None)
        }
        None => (vec![], None),
    };

    let machines = demo_machines(&state.store).await?;
    let password = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let fleet = start_fleet(&machines, &url, dhcp_addr, &password, args.stage_secs).await?;
    out.line(enrolled)?;
    out.line(format!(
        "  {} simulated machines, each with a Redfish BMC on 127.0.0.1; {}",
        fleet.machines().len(),
        match dhcp_addr {
            Some(a) => format!("kiln's DHCP on {a}, relayed from {}", DhcpRelay::DEFAULT_RELAY_IP),
            None => "no DHCP".into(),
        }
    ))?;
    out.line(format!("  export KILN_URL={url}\n  export KILN_TOKEN={token}"))?;
    out.line("  kiln machine list --tag gpu      kiln machine show sim-r1-n005      kiln events")?;

    let shutdown = shutdown_on_signal();
    let server = {
        let (stop, config) = (shutdown.clone(), config.clone());
        tokio::spawn(async move {
            kiln_server::serve_on(
                state,
                &config,
                kiln_server::Listeners::plain(listener),
                dhcp_sockets,
                stop,
            )
            .await
        })
    };
    let admin = Client::new(&url, Some(token));
    let outcome = demo_reimages(&admin, &fleet, &machines, &password, &args, out, &shutdown).await;
    if outcome.is_err() || args.exit_when_done {
        shutdown.cancel();
    }
    let served = server.await.context("the demo server panicked")?;
    fleet.shutdown().await;
    outcome?;
    served
}

/// The demo's machines, as enrolled (by hostname).
async fn demo_machines(store: &Store) -> anyhow::Result<Vec<Machine>> {
    let mut machines: Vec<Machine> = store
        .all_machines()
        .await?
        .into_iter()
        .filter(|m| m.hostname.to_string().starts_with("sim-r") && !m.nics.is_empty())
        .collect();
    machines.sort_by_key(|m| m.hostname.to_string());
    Ok(machines)
}

/// One simulated machine per enrolled one: its MAC and switch port, so that
/// DHCP knows it, and a BMC.
async fn start_fleet(
    machines: &[Machine],
    url: &str,
    dhcp: Option<SocketAddr>,
    password: &str,
    stage_secs: f64,
) -> anyhow::Result<Fleet> {
    let specs = machines
        .iter()
        .map(|m| {
            let nic = &m.nics[0];
            let dmi = m.hardware.as_ref().and_then(|h| h.dmi.as_ref());
            MachineSpec {
                circuit_id: nic.circuit_id.clone(),
                remote_id: nic.remote_id.clone(),
                // kiln checks that the BMC's system is this machine.
                serial: dmi.and_then(|d| d.serial.clone()),
                uuid: dmi.and_then(|d| d.uuid.as_deref()).and_then(|u| u.parse().ok()),
                ..MachineSpec::new(Mac(nic.mac.expect("demo NICs have a MAC").0))
            }
        })
        .collect();
    let mut cfg = FleetConfig::new(url, specs);
    cfg.dhcp = dhcp.map(DhcpRelay::to);
    let stage = Duration::try_from_secs_f64(stage_secs.clamp(0.0, 3600.0)).unwrap_or(Duration::from_secs(2));
    cfg.durations = Durations::uniform(stage);
    cfg.seed = 1;
    cfg.bmc.password = password.to_string();
    Fleet::start(cfg).await.context("starting the simulated fleet")
}

/// Enrolls the BMCs, starts the reimages and shows them until they end.
async fn demo_reimages(
    admin: &Client,
    fleet: &Fleet,
    machines: &[Machine],
    password: &str,
    args: &DemoArgs,
    out: &mut Out,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // The BMCs listen on new ports every run: (re-)enroll them.
    for (m, sim) in machines.iter().zip(fleet.machines()) {
        let patch = MachinePatch {
            bmc: Some(Some(BmcInput {
                driver: BmcDriver::Redfish,
                address: sim.bmc().url().to_string(),
                username: Some("admin".into()),
                password: Some(Secret::new(password)),
                insecure: false,
                ca_cert: None,
            })),
            ..Default::default()
        };
        admin
            .update_machine(&m.hostname.to_string(), &patch)
            .await
            .with_context(|| format!("enrolling the BMC of {}", m.hostname))?;
    }
    // A demo stopped mid-reimage left its jobs waiting for machines that
    // are gone: end them, or the machines cannot be reimaged again.
    for job in admin
        .list_jobs(&JobFilter {
            active: true,
            ..Default::default()
        })
        .await?
    {
        if job.hostname.starts_with("sim-r") {
            admin.job_action(&job.id.to_string(), "cancel").await?;
            out.line(format!(
                "  cancelled job {} of {}, left by an earlier demo",
                job.id, job.hostname
            ))?;
        }
    }
    let chosen: Vec<&Machine> = machines
        .iter()
        .filter(|m| m.hardware.as_ref().is_some_and(|h| h.gpus.is_empty()))
        .take(args.reimage)
        .collect();
    if chosen.is_empty() {
        out.line(format!("serving on {}; Ctrl-C stops", admin.base_url()))?;
        out.w.flush()?;
        if args.exit_when_done {
            return Ok(());
        }
        shutdown.cancelled().await;
        return Ok(());
    }
    let (tx, mut lines) = mpsc::unbounded_channel::<(String, Option<JobState>)>();
    let mut ids = vec![];
    for m in &chosen {
        let host = m.hostname.to_string();
        let job = admin
            .reimage(&host, &demo_request())
            .await
            .with_context(|| format!("reimaging {host}"))?;
        let id = job.id.to_string();
        ids.push(id.clone());
        let (admin, tx) = (admin.clone(), tx.clone());
        tokio::spawn(async move {
            let mut last_step = None;
            let ended = admin
                .watch_job(&id, |e| {
                    if let JobEvent::Log(l) = e
                        && let Some(text) = show(l, &mut last_step)
                    {
                        let _ = tx.send((format!("  {host:<12} {text}"), None));
                    }
                })
                .await;
            let line = match ended {
                Ok(job) => (
                    format!(
                        "  {host:<12} job {id} {}{}",
                        job.state,
                        job.reason.map(|r| format!(": {r}")).unwrap_or_default()
                    ),
                    Some(job.state),
                ),
                Err(e) => (
                    format!("  {host:<12} job {id}: lost the event stream: {e}"),
                    Some(JobState::Failed),
                ),
            };
            let _ = tx.send(line);
        });
    }
    drop(tx);
    let total = Durations::uniform(Duration::try_from_secs_f64(args.stage_secs.clamp(0.0, 3600.0)).unwrap_or_default())
        .reimage_total();
    out.line(format!(
        "reimaging {} with debian-12 (simulated, about {} s each):",
        chosen
            .iter()
            .map(|m| m.hostname.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        total.as_secs().max(1)
    ))?;
    for (m, id) in chosen.iter().zip(&ids) {
        out.line(format!("  {:<12} job {id}", m.hostname.to_string()))?;
    }
    out.line(format!(
        "  watch one:  kiln job watch {0}\n              curl -sN -H \"Authorization: Bearer $KILN_TOKEN\" $KILN_URL/api/v1/jobs/{0}/events\n  all:        kiln job list --active",
        ids[0]
    ))?;
    out.line(format!("serving on {}; Ctrl-C stops", admin.base_url()))?;
    out.w.flush()?;
    let mut ended = vec![];
    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some((text, state)) => {
                    out.line(text)?;
                    out.w.flush()?;
                    ended.extend(state);
                }
                None => break,
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    // What the machines saw of it.
    for (m, sim) in machines.iter().zip(fleet.machines()) {
        if !chosen.iter().any(|c| c.id == m.id) {
            continue;
        }
        let boots: Vec<String> = sim.bmc().boots().into_iter().map(|b| b.target).collect();
        out.line(format!(
            "  {:<12} the machine: DHCP lease {}, booted {}, reported stages {:?}",
            m.hostname.to_string(),
            sim.leased_ip().map_or_else(|| "none".to_string(), |ip| ip.to_string()),
            boots.join(" then "),
            sim.stages_reported()
        ))?;
    }
    let ok = ended.iter().filter(|s| **s == JobState::Succeeded).count();
    out.line(format!(
        "demo reimages done: {ok} of {} succeeded. The fleet keeps running: reimage more with the API, or Ctrl-C.",
        ended.len()
    ))?;
    out.w.flush()?;
    if ok < ended.len() {
        anyhow::bail!("{} of the demo's reimages did not succeed", ended.len() - ok);
    }
    if !args.exit_when_done {
        shutdown.cancelled().await;
    }
    Ok(())
}

/// The log lines worth showing while a reimage runs: each step once as it
/// starts (a waiting step starts again at each wake-up; the stage reports
/// say more than the waits), stage reports, notes and retries.
fn show(l: &kiln_types::job::JobLogEntry, last_step: &mut Option<String>) -> Option<String> {
    match l.kind {
        JobLogKind::Stage => Some(match l.stage {
            Some(s) => format!("stage {}: {}", s.0, l.message),
            None => l.message.clone(),
        }),
        JobLogKind::Step if l.message == "started" => {
            let step = l.step.clone()?;
            if last_step.as_ref() == Some(&step) {
                return None;
            }
            *last_step = Some(step.clone());
            (!step.starts_with("wait_")).then(|| format!("step {step}"))
        }
        JobLogKind::Retry | JobLogKind::Note | JobLogKind::Operator => Some(l.message.clone()),
        _ => None,
    }
}

fn demo_request() -> ReimageRequest {
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
        ticket: Some("DEMO".into()),
        no_pxe: false,
        no_hooks: false,
        new: false,
    }
}
