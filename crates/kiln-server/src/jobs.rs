//! The server's side of jobs: the effects the engine's steps ask for (BMC
//! calls through the BMC service, what a machine net-boots, hooks, the
//! operator's catalog tasks), the job tokens, and the net-boot arm as the boot decision
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
use kiln_types::job::ReimageSpec;
use kiln_types::machine::{FirmwareMode, Machine};
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
}

impl ServerEffects {
    pub fn new(
        store: Store,
        bmc: Arc<BmcService>,
        boot: Arc<BootContext>,
        config: &Config,
    ) -> anyhow::Result<ServerEffects> {
        Ok(ServerEffects {
            store,
            bmc,
            boot,
            hooks: HookRunner::new(config.hooks.clone()).context("[[hooks]]")?,
            tasks: PostInstallRunner::new(config.post_install.clone()).context("[post_install]")?,
        })
    }
}

impl ServerEffects {
    /// Whether `machine`'s boot devices are set in UEFI mode (IPMI's EFI
    /// bit, Redfish's `BootSourceOverrideMode: UEFI`): its recorded
    /// firmware. Unknown firmware gets legacy (BIOS) mode, as before kiln
    /// recorded it: what BMCs assume when they are not told.
    async fn boots_uefi(&self, machine: MachineId) -> Result<bool, BmcError> {
        match self.store.get_machine(&machine.to_string(), None).await {
            Ok(m) => Ok(m.firmware.is_some_and(|f| f.mode == FirmwareMode::Uefi)),
            Err(e) => Err(BmcError {
                message: format!("reading the machine's firmware mode failed: {e}"),
                retryable: !matches!(e, kiln_store::StoreError::NotFound { .. }),
            }),
        }
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
        let op = match action {
            // Reading the power state proves the BMC answers and takes
            // kiln's credentials.
            BmcAction::Check => Op::Status,
            BmcAction::BootNetworkOnce => Op::BootDevice {
                device: BootDevice::Network,
                once: true,
                uefi: self.boots_uefi(machine).await?,
            },
            BmcAction::BootDisk => Op::BootDevice {
                device: BootDevice::Disk,
                once: false,
                uefi: self.boots_uefi(machine).await?,
            },
            BmcAction::PowerOff => Op::Power(PowerAction::Off),
            BmcAction::PowerOn => Op::Power(PowerAction::On),
        };
        let actor = Actor::new("job engine");
        self.bmc.call(&actor, machine, op).await.map(|_| ()).map_err(bmc_error)
    }

    fn netboot_plan(
        &self,
        job: &JobRecord,
        spec: &ReimageSpec,
        image: &OsImage,
        machine: &Machine,
    ) -> Result<NetbootPlan, String> {
        let s = &self.boot.settings;
        match image.kind {
            OsKind::DiskImage => {
                let mut cmdline = s.agent_cmdline.clone();
                cmdline.push("kiln.mode=deploy".into());
                cmdline.push(format!("kiln.job={}", job.id));
                Ok(NetbootPlan {
                    kernel: s.agent_kernel.clone(),
                    initrds: vec![s.agent_initrd.clone()],
                    cmdline,
                })
            }
            OsKind::Installer => {
                // The new OS's domain: the machine's, as the installer files
                // compute it (`TemplateContext`).
                let domain = machine
                    .fqdn
                    .as_ref()
                    .and_then(|f| f.as_str().split_once('.'))
                    .map(|(_, d)| d);
                let boot = kiln_boot::installer::boot(
                    image,
                    &job.id.to_string(),
                    spec.hostname.as_str(),
                    domain,
                    &s.agent_cmdline,
                )
                .map_err(|e| format!("{} {}: {e}", image.name, image.version))?;
                // A missing kernel would leave the machine at iPXE's prompt
                // until the installer wait times out: say so now.
                for file in [&boot.kernel, &boot.initrd] {
                    if is_url(file) {
                        continue;
                    }
                    let path = self.boot.artifacts.join(file);
                    if !path.is_file() {
                        return Err(format!(
                            "{} {}: the installer's {} is missing: {} (`source` names the directory \
                             holding `{}` and `{}`, under the artifacts directory or as an http(s) URL)",
                            image.name,
                            image.version,
                            if file == &boot.kernel { "kernel" } else { "initrd" },
                            path.display(),
                            boot.flavor.files().0,
                            boot.flavor.files().1,
                        ));
                    }
                }
                Ok(NetbootPlan {
                    kernel: boot.kernel,
                    initrds: vec![boot.initrd],
                    cmdline: boot.cmdline,
                })
            }
        }
    }

    async fn run_hooks(&self, event: &'static str, job: &JobRecord) -> Result<Vec<String>, String> {
        self.hooks.run_for_job(event, job).await
    }

    async fn post_install(&self, job: &JobRecord, spec: &ReimageSpec) -> Result<Vec<String>, String> {
        // Only the operator's catalog tasks run here. The job's own
        // post-install script is the tenant's code: it runs in the new OS
        // (the installer files put it there), never on a kiln server.
        let mut tasks = Vec::with_capacity(spec.tasks.len());
        for name in &spec.tasks {
            let task = self
                .store
                .get_task(name)
                .await
                .map_err(|e| format!("task {name}: {e}"))?;
            tasks.push(PostInstallTask::from(&task));
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
}

fn is_url(path: &str) -> bool {
    path.starts_with("http://") || path.starts_with("https://")
}

/// The arm of `machine` as the boot decision takes it: artifact paths as
/// URLs under `base` (an installer's kernel may be a URL already), and the
/// server's address where the command line asks for it
/// (`kiln_boot::installer::BASE_URL`, an installer's preseed URL) or else
/// as `kiln.server=` (the deploy agent). The token is not added here: the
/// iPXE renderer puts it where the command line asks for it
/// (`kiln_boot::installer::TOKEN`), or adds `kiln.token=`.
pub fn netboot_arm(arm: &ArmRecord, secrets: &SecretBox, base: &str) -> NetbootArm {
    use kiln_boot::installer::BASE_URL;
    let url = |path: &str| {
        if is_url(path) {
            path.to_string()
        } else {
            format!("{base}/boot/file/{}", path.trim_start_matches('/'))
        }
    };
    let names_base = arm.cmdline.iter().any(|a| a.contains(BASE_URL));
    let mut cmdline: Vec<String> = arm.cmdline.iter().map(|a| a.replace(BASE_URL, base)).collect();
    if !names_base {
        cmdline.push(format!("kiln.server={base}"));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_boot::decision::{BootAnswer, BootPolicy, decide};
    use kiln_boot::ipxe::{AgentBoot, Firmware, redact, render};
    use kiln_types::OsImageId;
    use kiln_types::catalog::Arch;
    use kiln_types::machine::{MachineKind, MachineState};

    fn installer(source: &str) -> OsImage {
        OsImage {
            id: OsImageId::new(),
            name: "debian".into(),
            version: "12".into(),
            arch: Arch::X86_64,
            kind: OsKind::Installer,
            tags: vec![],
            min_ram_bytes: 0,
            min_disk_bytes: 0,
            source: source.into(),
            sha256: None,
            format: Default::default(),
            content: Default::default(),
            templates: Default::default(),
            created_at: chrono::Utc::now(),
        }
    }

    fn arm_of(machine: &Machine, job: JobId, image: &OsImage) -> ArmRecord {
        let boot = kiln_boot::installer::boot(
            image,
            &job.to_string(),
            machine.hostname.as_str(),
            Some("eqiad.example.net"),
            &["console=tty0".into(), "console=ttyS0,115200".into()],
        )
        .unwrap();
        ArmRecord {
            machine_id: machine.id,
            job_id: job,
            kernel: boot.kernel,
            initrds: vec![boot.initrd],
            cmdline: boot.cmdline,
            expires_at: chrono::Utc::now() + chrono::Duration::minutes(5),
            consumed: false,
        }
    }

    fn script(arm: &ArmRecord, machine: &Machine, secrets: &SecretBox, base: &str) -> (BootAnswer, String) {
        let armed = netboot_arm(arm, secrets, base);
        let answer = decide(
            Some(machine),
            Some(&armed),
            BootPolicy { discovery: false },
            chrono::Utc::now(),
        );
        let agent = AgentBoot {
            kernel: format!("{base}/boot/file/vmlinuz"),
            initrd: format!("{base}/boot/file/agent"),
            cmdline: vec![],
        };
        let s = render(&answer, Firmware::Bios, &agent).unwrap();
        (answer, s)
    }

    /// The installer's arm: stored without the token or the base URL; the
    /// script has both, the token once, inside the preseed URL; the kernel
    /// and initrd come from the image's directory; redaction hides it.
    #[test]
    fn an_installer_arm_gets_base_and_token_only_in_its_script() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = SecretBox::load_or_create(&dir.path().join("key")).unwrap();
        let machine = Machine::sketch("web1", MachineKind::Physical, MachineState::Deployed);
        let job = JobId::new();
        let token = secrets.job_token(job);
        let arm = arm_of(&machine, job, &installer("di/amd64"));
        let stored = format!("{arm:?}");
        assert!(
            !stored.contains(token.expose()) && !stored.contains("10.0.0.1"),
            "{stored}"
        );
        assert_eq!(arm.kernel, "di/amd64/linux");

        let base = "http://10.0.0.1:7070";
        let (answer, s) = script(&arm, &machine, &secrets, base);
        match &answer {
            BootAnswer::Install { cmdline, .. } => {
                assert!(!cmdline.iter().any(|a| a.contains(token.expose())), "{cmdline:?}")
            }
            other => panic!("{other:?}"),
        }
        let kernel = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        let words: Vec<&str> = kernel.split(' ').collect();
        assert_eq!(words[1], "http://10.0.0.1:7070/boot/file/di/amd64/linux");
        assert!(
            words.contains(&format!("url={base}/boot/job/{job}/preseed?token={}", token.expose()).as_str()),
            "{kernel}"
        );
        for arg in [
            "auto=true",
            "priority=critical",
            "interface=auto",
            "hostname=web1",
            "domain=eqiad.example.net",
        ] {
            assert!(words.contains(&arg), "{arg}: {kernel}");
        }
        assert_eq!(s.matches(token.expose()).count(), 1, "{s}");
        assert!(!s.contains("kiln.token") && !s.contains("kiln.server"), "{s}");
        assert!(
            s.contains("\ninitrd http://10.0.0.1:7070/boot/file/di/amd64/initrd.gz\n"),
            "{s}"
        );
        // What d-i copies into the installed system: the consoles only.
        let after: Vec<&str> = words.iter().skip_while(|w| **w != "---").skip(1).copied().collect();
        assert_eq!(after, ["console=tty0", "console=ttyS0,115200"]);
        let shown = redact(&s);
        assert!(!shown.contains(token.expose()), "{shown}");
        assert!(shown.contains("preseed?token=[redacted]"), "{shown}");

        // Another base (another interface, or a configured http_base).
        let (_, s) = script(&arm, &machine, &secrets, "http://[fd00::1]:7070");
        assert!(s.contains("url=http://[fd00::1]:7070/boot/job/"), "{s}");
        // An installer served from elsewhere keeps its URL.
        let arm = arm_of(&machine, job, &installer("https://mirror.example/di/amd64/"));
        let (_, s) = script(&arm, &machine, &secrets, base);
        assert!(s.contains("kernel https://mirror.example/di/amd64/linux "), "{s}");
        assert!(
            s.contains("\ninitrd https://mirror.example/di/amd64/initrd.gz\n"),
            "{s}"
        );
    }

    /// The deploy agent's arm is as before: `kiln.server=` and `kiln.token=`.
    #[test]
    fn a_deploy_arm_gets_kiln_server_and_kiln_token() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = SecretBox::load_or_create(&dir.path().join("key")).unwrap();
        let machine = Machine::sketch("web1", MachineKind::Physical, MachineState::Deployed);
        let job = JobId::new();
        let arm = ArmRecord {
            machine_id: machine.id,
            job_id: job,
            kernel: "vmlinuz".into(),
            initrds: vec!["kiln-agent.cpio.gz".into()],
            cmdline: vec!["kiln.mode=deploy".into()],
            expires_at: chrono::Utc::now() + chrono::Duration::minutes(5),
            consumed: false,
        };
        let (_, s) = script(&arm, &machine, &secrets, "http://10.0.0.1:7070");
        let token = secrets.job_token(job);
        assert!(
            s.contains(&format!(
                "kiln.mode=deploy kiln.server=http://10.0.0.1:7070 kiln.token={}\n",
                token.expose()
            )),
            "{s}"
        );
    }

    /// A base URL that could add a command never reaches a script.
    #[test]
    fn a_base_url_unfit_for_a_script_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = SecretBox::load_or_create(&dir.path().join("key")).unwrap();
        let machine = Machine::sketch("web1", MachineKind::Physical, MachineState::Deployed);
        let arm = arm_of(&machine, JobId::new(), &installer("di"));
        let armed = netboot_arm(&arm, &secrets, "http://x${net0/ip}&&shell");
        let answer = decide(
            Some(&machine),
            Some(&armed),
            BootPolicy { discovery: false },
            chrono::Utc::now(),
        );
        let agent = AgentBoot {
            kernel: "http://x/k".into(),
            initrd: "http://x/i".into(),
            cmdline: vec![],
        };
        assert!(render(&answer, Firmware::Bios, &agent).is_err());
    }
}
