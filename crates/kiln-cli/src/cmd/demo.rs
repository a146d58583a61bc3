//! `kiln demo`: kiln's main job on its embedded default. Starts a server on
//! SQLite in a data directory, enrolls a simulated two-rack fleet with its
//! hardware inventory and a small catalog (once), prints an admin token and
//! serves until Ctrl-C.

use std::io::Write;
use std::path::PathBuf;

use kiln_server::{AppState, Config, Settings};
use kiln_store::{Actor, NewMachine, Store};
use kiln_types::auth::{Role, TenantCreate};
use kiln_types::catalog::{Arch, OsImageCreate, OsKind, PlatformTag, TaskCreate, TaskKind};
use kiln_types::machine::{Disk, Dmi, Gpu, Hardware, HardwareNic, MachineCreate, MachineFilter, MachineState, Nic};
use kiln_types::site::{RackCreate, SiteCreate};
use tokio::net::TcpListener;

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
            mac: mac.parse().unwrap(),
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

pub async fn run(args: DemoArgs, out: &mut Out) -> anyhow::Result<()> {
    let config = Config::from_settings(Settings {
        data_dir: Some(args.data_dir.clone()),
        listen: Some(args.listen.clone()),
        ..Default::default()
    })?;
    init_logging("warn");
    let state = AppState::open(&config).await?;
    let seeded = seed_demo_fleet(&state.store, args.per_rack).await?;
    let (token, hash) = kiln_server::auth::new_token();
    state
        .store
        .create_token(&Actor::new("demo"), None, Role::Admin, None, &hash)
        .await?;
    let url = format!("http://{}", config.listen);
    out.line(format!(
        "kiln demo: embedded SQLite in {}/ ({} machines enrolled now)",
        config.data_dir.display(),
        seeded
    ))?;
    out.line(format!("  export KILN_URL={url}\n  export KILN_TOKEN={token}"))?;
    out.line("  kiln machine list --tag gpu      kiln machine show sim-r1-n005      kiln events")?;
    if args.seed_only {
        return Ok(());
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e} (choose another with --listen)", config.listen))?;
    out.line(format!("serving on {url}; Ctrl-C stops"))?;
    out.w.flush()?;
    kiln_server::run(state, listener, shutdown_on_signal()).await
}
