//! The server's side of jobs: the effects the engine's steps ask for (BMC
//! calls through the BMC service, what a machine net-boots, hooks, tasks,
//! the callback), the job tokens, and the net-boot arm as the boot decision
//! sees it.
//!
//! Job tokens: an agent or installer reports stages with a token that is
//! the HMAC of the job id under the server's secret key. Nothing about it is
//! stored, every server sharing the key can check it, and it is refused as
//! soon as the job has ended (the store refuses reports for ended jobs).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kiln_bmc::BmcErrorKind;
use kiln_boot::decision::NetbootArm;
use kiln_store::{Actor, ArmRecord, JobRecord, Store};
use kiln_types::catalog::{OsImage, OsKind};
use kiln_types::job::{Job, ReimageSpec};
use kiln_types::power::{BootDevice, PowerAction};
use kiln_types::{JobId, MachineId};
use kiln_workflow::hooks::HookRunner;
use kiln_workflow::post_install::{PostInstallRunner, PostInstallTask, TaskTarget};
use kiln_workflow::process::{self, ProcessSpec};
use kiln_workflow::{BmcAction, BmcError, Effects, NetbootPlan};

use crate::Config;
use crate::bmc::{BmcCallError, BmcService, Op};
use crate::boot_http::BootContext;
use crate::secrets::SecretBox;

/// The engine as this server runs it.
pub type Engine = kiln_workflow::Engine<ServerEffects>;

/// The effects of job steps, carried out by this server.
#[derive(Debug)]
pub struct ServerEffects {
    store: Store,
    bmc: Arc<BmcService>,
    boot: Arc<BootContext>,
    hooks: HookRunner,
    tasks: PostInstallRunner,
    http: reqwest::Client,
}

impl ServerEffects {
    pub fn new(
        store: Store,
        bmc: Arc<BmcService>,
        boot: Arc<BootContext>,
        config: &Config,
    ) -> anyhow::Result<ServerEffects> {
        // One TLS provider for the process (ring), as for the BMC drivers.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the callback HTTP client")?;
        Ok(ServerEffects {
            store,
            bmc,
            boot,
            hooks: HookRunner::new(config.hooks.clone()).context("[[hooks]]")?,
            tasks: PostInstallRunner::new(config.post_install.clone()).context("[post_install]")?,
            http,
        })
    }
}

fn bmc_error(e: BmcCallError) -> BmcError {
    let retryable = match &e {
        BmcCallError::Busy { .. } | BmcCallError::Store(_) => true,
        BmcCallError::Bmc(f) => {
            !f.entered_maintenance
                && matches!(
                    f.kind,
                    BmcErrorKind::Unreachable | BmcErrorKind::Timeout | BmcErrorKind::OutcomeUnknown
                )
        }
        _ => false,
    };
    BmcError {
        message: e.to_string(),
        retryable,
    }
}

impl Effects for ServerEffects {
    async fn bmc(&self, machine: MachineId, action: BmcAction) -> Result<(), BmcError> {
        // The next boot device is set for legacy BIOS; UEFI machines need
        // the firmware kind in their inventory first (the agent reports it).
        let op = match action {
            // Reading the power state proves the BMC answers and takes
            // kiln's credentials.
            BmcAction::Check => Op::Status,
            BmcAction::BootNetworkOnce => Op::BootDevice {
                device: BootDevice::Network,
                once: true,
                uefi: false,
            },
            BmcAction::BootDisk => Op::BootDevice {
                device: BootDevice::Disk,
                once: false,
                uefi: false,
            },
            BmcAction::PowerOff => Op::Power(PowerAction::Off),
            BmcAction::PowerOn => Op::Power(PowerAction::On),
        };
        let actor = Actor::new("job engine");
        self.bmc.call(&actor, machine, op).await.map(|_| ()).map_err(bmc_error)
    }

    fn netboot_plan(&self, job: &JobRecord, _spec: &ReimageSpec, image: &OsImage) -> Result<NetbootPlan, String> {
        match image.kind {
            OsKind::DiskImage => {
                let s = &self.boot.settings;
                let mut cmdline = s.agent_cmdline.clone();
                cmdline.push("kiln.mode=deploy".into());
                cmdline.push(format!("kiln.job={}", job.id));
                Ok(NetbootPlan {
                    kernel: s.agent_kernel.clone(),
                    initrds: vec![s.agent_initrd.clone()],
                    cmdline,
                })
            }
            OsKind::Installer => Err(format!(
                "{} {} is an installer image; kiln reimages with disk images only so far \
                 (the installer path is issue 6)",
                image.name, image.version
            )),
        }
    }

    async fn run_hooks(&self, event: &'static str, job: &JobRecord) -> Result<Vec<String>, String> {
        self.hooks.run_for_job(event, job).await
    }

    async fn post_install(&self, job: &JobRecord, spec: &ReimageSpec) -> Result<Vec<String>, String> {
        let mut tasks = Vec::with_capacity(spec.tasks.len() + 1);
        for name in &spec.tasks {
            let task = self
                .store
                .get_task(name)
                .await
                .map_err(|e| format!("task {name}: {e}"))?;
            tasks.push(PostInstallTask::from(&task));
        }
        if let Some(script) = &spec.post_install_script {
            tasks.push(PostInstallTask::job_script(script.clone()));
        }
        if tasks.is_empty() {
            return Ok(vec![]);
        }
        let target = TaskTarget::from_job(job, self.address_of(job).await?)?;
        self.tasks.run_all(&tasks, &target).await
    }

    async fn health_check(&self, argv: &[String], job: &JobRecord) -> Result<(), String> {
        let Some((program, args)) = argv.split_first() else {
            return Err("the health check has no command".into());
        };
        let mut spec = ProcessSpec::new(program.clone(), Duration::from_secs(120));
        spec.args = args.to_vec();
        spec.env.insert("KILN_HOSTNAME".into(), job.hostname.clone());
        spec.env.insert("KILN_HOST".into(), self.address_of(job).await?);
        spec.env.insert("KILN_JOB_ID".into(), job.id.to_string());
        let out = process::run(&spec).await.map_err(|e| e.to_string())?;
        if out.success() {
            Ok(())
        } else {
            Err(format!("`{}` {}: {}", spec.display_argv(), out.exit, out.last_lines(3)))
        }
    }

    async fn callback(&self, url: &str, job: &Job) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            match self.http.post(url).json(job).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) if r.status().is_client_error() => return Err(format!("answered {}", r.status())),
                Ok(r) => last = format!("answered {}", r.status()),
                Err(e) => last = e.without_url().to_string(),
            }
        }
        Err(last)
    }
}

impl ServerEffects {
    /// Where the job's machine (its new OS) is reached: its IPv4 address,
    /// else its FQDN, else its hostname.
    async fn address_of(&self, job: &JobRecord) -> Result<String, String> {
        let machine = match job.machine_id {
            Some(id) => self
                .store
                .get_machine(&id.to_string(), None)
                .await
                .map_err(|e| e.to_string())?,
            None => return Err("the machine was deleted".into()),
        };
        Ok(match (machine.ipv4, &machine.fqdn) {
            (Some(ip), _) => ip.to_string(),
            (None, Some(fqdn)) => fqdn.to_string(),
            (None, None) => machine.hostname.to_string(),
        })
    }
}

const TOKEN_CONTEXT: &[u8] = b"kiln job token v1\0";
const DISCOVERY_CONTEXT: &[u8] = b"kiln discovery token v1\0";

/// `want == got`, in time independent of where they differ.
fn same(want: &kiln_types::Secret, got: &str) -> bool {
    let (a, b) = (want.expose().as_bytes(), got.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl SecretBox {
    /// The token of job `id` (see the module doc).
    pub fn job_token(&self, id: JobId) -> kiln_types::Secret {
        let mut msg = TOKEN_CONTEXT.to_vec();
        msg.extend_from_slice(id.to_string().as_bytes());
        kiln_types::Secret::new(format!("kj_{}", self.mac_b64(&msg)))
    }

    /// Whether `token` is job `id`'s, compared in constant time.
    pub fn check_job_token(&self, id: JobId, token: &str) -> bool {
        same(&self.job_token(id), token)
    }

    /// The token a discovery agent booted from `mac` reports with: it says
    /// that kiln's boot script sent that agent (any machine may ask for a
    /// discovery boot, so it proves no more than that), and that the
    /// report is about the NIC it booted from.
    pub fn discovery_token(&self, mac: kiln_types::MacAddr) -> kiln_types::Secret {
        let mut msg = DISCOVERY_CONTEXT.to_vec();
        msg.extend_from_slice(mac.to_string().as_bytes());
        kiln_types::Secret::new(format!("kd_{}", self.mac_b64(&msg)))
    }

    pub fn check_discovery_token(&self, mac: kiln_types::MacAddr, token: &str) -> bool {
        same(&self.discovery_token(mac), token)
    }
}

/// The arm of `machine` as the boot decision takes it: artifact paths as
/// URLs under `base`, the server's address and the job token added.
pub fn netboot_arm(arm: &ArmRecord, secrets: &SecretBox, base: &str) -> NetbootArm {
    let url = |path: &str| format!("{base}/boot/file/{}", path.trim_start_matches('/'));
    let mut cmdline = arm.cmdline.clone();
    cmdline.push(format!("kiln.server={base}"));
    NetbootArm {
        job_id: arm.job_id.to_string(),
        machine_id: arm.machine_id,
        token: secrets.job_token(arm.job_id),
        kernel: url(&arm.kernel),
        initrds: arm.initrds.iter().map(|i| url(i)).collect(),
        cmdline,
        expires_at: arm.expires_at,
        consumed: arm.consumed,
    }
}

/// A name for this server in job leases: host, process and a random part
/// (two servers on one host, or one restarted, never share a name).
pub fn server_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "kiln".into());
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    format!("{host}/{}/{}", std::process::id(), hex::encode(r))
}
