//! What the engine tests share: recording effects with injectable faults,
//! a machine and OS image in the store, a reimage job. (Each test binary
//! uses a part of it.)
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use kiln_store::{Actor, JobRecord, NewJob, NewMachine, Store};
use kiln_types::catalog::{Arch, OsImage, OsImageCreate, OsKind, PlatformTag};
use kiln_types::job::{JobKind, ReimageSpec};
use kiln_types::machine::{Disk, Hardware, Machine, MachineCreate, MachineState};
use kiln_types::{JobId, MachineId};
use kiln_workflow::{BmcAction, BmcError, Effects, Engine, EngineSettings, NetbootPlan};

/// Where the fake effects fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    Bmc(BmcAction),
    Hooks(&'static str),
    Plan,
    PostInstall,
}

#[derive(Debug)]
pub struct Recorder {
    pub fault: Mutex<Fault>,
    pub bmc: Mutex<Vec<BmcAction>>,
    pub hooks: Mutex<Vec<&'static str>>,
    /// Hostnames whose health check fails.
    pub unhealthy: Mutex<Vec<String>>,
    /// When set, an operator asks to pause the job while its hooks run.
    pub pause_in_hooks: Mutex<Option<Store>>,
}

impl Recorder {
    pub fn new(fault: Fault) -> Arc<Recorder> {
        Arc::new(Recorder {
            fault: Mutex::new(fault),
            bmc: Mutex::default(),
            hooks: Mutex::default(),
            unhealthy: Mutex::default(),
            pause_in_hooks: Mutex::default(),
        })
    }

    pub fn fault(&self) -> Fault {
        *self.fault.lock().unwrap()
    }
}

impl Effects for Recorder {
    async fn bmc(&self, _machine: MachineId, action: BmcAction) -> Result<(), BmcError> {
        if self.fault() == Fault::Bmc(action) {
            return Err(BmcError {
                message: format!("injected {action:?} failure"),
                retryable: false,
            });
        }
        self.bmc.lock().unwrap().push(action);
        Ok(())
    }

    fn netboot_plan(
        &self,
        job: &JobRecord,
        _spec: &ReimageSpec,
        _image: &OsImage,
        _machine: &Machine,
    ) -> Result<NetbootPlan, String> {
        if self.fault() == Fault::Plan {
            return Err("injected: no deploy agent".into());
        }
        Ok(NetbootPlan {
            kernel: "agent/vmlinuz".into(),
            initrds: vec!["agent/initrd.img".into()],
            cmdline: vec![format!("kiln.job={}", job.id)],
        })
    }

    async fn run_hooks(&self, event: &'static str, job: &JobRecord) -> Result<Vec<String>, String> {
        self.hooks.lock().unwrap().push(event);
        let pauser = self.pause_in_hooks.lock().unwrap().clone();
        if let Some(store) = pauser {
            store
                .control_job(&actor(), job.id, kiln_store::JobControl::Pause)
                .await
                .unwrap();
        }
        if self.fault() == Fault::Hooks(event) {
            return Err(format!("injected {event} hook failure"));
        }
        Ok(vec![format!("{event}: ok")])
    }

    async fn post_install(&self, _job: &JobRecord, _spec: &ReimageSpec) -> Result<Vec<String>, String> {
        if self.fault() == Fault::PostInstall {
            return Err("injected post-install failure".into());
        }
        Ok(vec!["task: ok".into()])
    }

    async fn health_check(&self, _argv: &[String], job: &JobRecord) -> Result<(), String> {
        if self.unhealthy.lock().unwrap().contains(&job.hostname) {
            return Err(format!("{} answers 503", job.hostname));
        }
        Ok(())
    }
}

pub fn actor() -> Actor {
    Actor::new("test (admin)")
}

pub const GIB: u64 = 1 << 30;

pub async fn setup(store: &Store, host: &str) -> (MachineId, OsImage) {
    let mut spec = MachineCreate::new(host.parse().unwrap());
    spec.state = MachineState::Deployed;
    spec.hardware = Some(Hardware {
        arch: Some(Arch::X86_64),
        memory_bytes: 16 * GIB,
        disks: ["sda", "sdb"]
            .iter()
            .map(|n| Disk {
                name: n.to_string(),
                size_bytes: 500 * GIB,
                rotational: false,
                model: None,
                serial: None,
                by_id: None,
            })
            .collect(),
        ..Default::default()
    });
    let m = store
        .create_machines(
            &actor(),
            vec![NewMachine {
                spec,
                sealed_password: None,
            }],
        )
        .await
        .unwrap()
        .remove(0);
    let image = match store.get_os_image("debian-12").await {
        Ok(i) => i,
        Err(_) => store
            .create_os_image(
                &actor(),
                &OsImageCreate {
                    name: "debian".into(),
                    version: "12".into(),
                    arch: Arch::X86_64,
                    kind: OsKind::DiskImage,
                    tags: vec![PlatformTag::Bm],
                    min_ram_bytes: 2 * GIB,
                    min_disk_bytes: 10 * GIB,
                    source: "images/debian-12.raw".into(),
                    sha256: Some("ab".repeat(32)),
                    format: None,
                    content: Default::default(),
                    templates: Default::default(),
                },
            )
            .await
            .unwrap(),
    };
    (m.id, image)
}

pub fn spec(image: &OsImage, host: &str, no_pxe: bool) -> ReimageSpec {
    ReimageSpec {
        os_image: image.id.to_string(),
        os_label: "debian 12".into(),
        layout: Some(kiln_types::catalog::StorageLayout::LvmRaid1),
        hostname: host.parse().unwrap(),
        ssh_keys: vec![],
        root_password_hash: None,
        tasks: vec![],
        post_install_script: None,
        no_pxe,
        no_hooks: false,
        new: false,
    }
}

pub async fn create(store: &Store, host: &str, no_pxe: bool) -> (JobId, MachineId) {
    let (m, image) = setup(store, host).await;
    let job = store
        .create_job(
            &actor(),
            NewJob {
                kind: JobKind::Reimage,
                machine_id: Some(m),
                parent_id: None,
                hostname: host.into(),
                os_label: "debian 12".into(),
                spec: serde_json::to_value(spec(&image, host, no_pxe)).unwrap(),
                ticket: None,
                callback_url: Some("http://127.0.0.1:9/cb".into()),
                first_step: 0,
            },
        )
        .await
        .unwrap();
    (job.id, m)
}

pub fn settings() -> EngineSettings {
    let mut s = EngineSettings::default();
    s.reimage.bmc_retry_secs = 0;
    s
}

pub fn engine(store: &Store, effects: Arc<Recorder>, owner: &str) -> Arc<Engine<Recorder>> {
    Engine::new(store.clone(), effects, settings(), owner.into())
}
