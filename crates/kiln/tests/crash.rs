//! Crash tests of the job engine with the real `kiln server` binary: the
//! server kills itself with SIGKILL at every step boundary of a reimage
//! (`KILN_TEST_CRASH_AT=STEP:before|after`: the step ran and its answer is
//! not committed yet, or it was just committed), is started again, and the
//! job must still end `succeeded` with the machine deployed, disarmed, and
//! net-booted exactly once — on SQLite and on PostgreSQL. On PostgreSQL,
//! also two servers: one dies holding jobs, the other takes them over.
//!
//! The BMCs are kiln-sim's simulated Redfish BMCs (in this process); this
//! test plays the deploy agent: it reads the job token from the iPXE script
//! the machine would get and reports the install stages.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_client::Client;
use kiln_test_utils::{Backend, TestDb};
use kiln_types::Secret;
use kiln_types::catalog::{Arch, OsImageCreate, OsKind, PlatformTag};
use kiln_types::job::{Job, JobState, ReimageRequest};
use kiln_types::machine::{BmcDriver, BmcInput, Disk, Hardware, MachineCreate, MachineState};
use kiln_workflow::reimage::STEPS;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const GIB: u64 = 1 << 30;

/// A free port for a server, outside the kernel's ephemeral range: the
/// simulated BMCs these tests start beside it take ports the kernel picks
/// (32768 and up), and one of them could take a port picked that way
/// between the check here and the server's bind.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() % 5000) as u16;
    loop {
        let port = 20_000 + (seed + NEXT.fetch_add(7, Ordering::Relaxed)) % 10_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A `kiln server` process, killed (SIGKILL) when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One server's config: the shared data directory (its secret key opens
/// the BMC passwords and signs job tokens) and database, its own port.
fn config(dir: &Path, db: &TestDb, name: &str) -> (PathBuf, String) {
    let port = free_port();
    let database = match db.backend {
        Backend::Postgres => format!("database_url = \"{}\"\n", db.url),
        Backend::Sqlite => String::new(),
    };
    let text = format!(
        "data_dir = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n{database}log = \"info\"\n\
         [jobs]\nlease_secs = 1\npoll_interval_ms = 100\n[jobs.reimage]\nbmc_retry_secs = 0\n",
        dir.join("data").display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    (path, format!("http://127.0.0.1:{port}"))
}

async fn start(dir: &Path, cfg: &(PathBuf, String), crash_at: Option<&str>) -> Server {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    let mut cmd = Command::new(KILN);
    cmd.args(["server", "--config"])
        .arg(&cfg.0)
        .env_remove("KILN_TEST_CRASH_AT")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(at) = crash_at {
        cmd.env("KILN_TEST_CRASH_AT", at);
    }
    let server = Server {
        child: cmd.spawn().unwrap(),
        url: cfg.1.clone(),
    };
    let mut server = server;
    let probe = Client::new(&server.url, None);
    // Generous: CI runs the crash tests beside other test binaries.
    let end = Instant::now() + Duration::from_secs(60);
    while probe.healthz().await.is_err() {
        let log = || std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!("kiln server exited ({status}) before it answered; its log:\n{}", log());
        }
        assert!(
            Instant::now() < end,
            "kiln server did not come up in 60 s; its log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server
}

fn admin_token(cfg: &Path) -> String {
    let out = Command::new(KILN)
        .args(["token", "create", "--role", "admin", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn mac(i: usize) -> String {
    format!("52:54:00:cc:{:02x}:{:02x}", i / 256, i % 256)
}

fn machine(i: usize, bmc_url: &str) -> MachineCreate {
    let mut m = MachineCreate::new(format!("crash{i}").parse().unwrap());
    m.state = MachineState::Deployed;
    m.nics = vec![serde_json::from_value(serde_json::json!({ "mac": mac(i) })).unwrap()];
    m.bmc = Some(BmcInput {
        driver: BmcDriver::Redfish,
        address: bmc_url.into(),
        username: Some("admin".into()),
        password: Some(Secret::new("rf-secret")),
        insecure: false,
        ca_cert: None,
    });
    m.hardware = Some(Hardware {
        arch: Some(Arch::X86_64),
        memory_bytes: 8 * GIB,
        disks: vec![Disk {
            name: "vda".into(),
            size_bytes: 100 * GIB,
            rotational: false,
            model: None,
            serial: None,
            by_id: None,
        }],
        ..Default::default()
    });
    m
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
        ticket: None,
        no_pxe: false,
        no_hooks: false,
        new: false,
    }
}

/// Plays machine `i`'s deploy agent and new OS against whichever of
/// `urls` answers, until job `id` ends.
async fn agent(urls: Vec<String>, token: String, id: String, i: usize) -> Job {
    let end = Instant::now() + Duration::from_secs(120);
    let mut job_token: Option<String> = None;
    loop {
        assert!(Instant::now() < end, "job {id} did not end");
        for url in &urls {
            let Ok(detail) = Client::new(url, Some(token.clone())).get_job(&id).await else {
                continue;
            };
            let job = detail.job;
            if job.state.is_final() {
                return job;
            }
            let wanted = match job.step.as_str() {
                "wait_installer" => 1,
                "wait_base_installed" => 2,
                "wait_configured" => 3,
                "wait_finishing" => 4,
                "wait_first_boot" => 5,
                _ => 0,
            };
            if wanted > job.stage.0 {
                if job_token.is_none() {
                    let script = reqwest::get(format!("{url}/boot/ipxe?mac={}", mac(i)))
                        .await
                        .ok()
                        .map(|r| r.text());
                    if let Some(text) = script {
                        job_token = text
                            .await
                            .unwrap_or_default()
                            .split_whitespace()
                            .find_map(|w| w.strip_prefix("kiln.token=").map(str::to_string));
                    }
                }
                if let Some(t) = &job_token {
                    let _ = Client::new(url, Some(t.clone())).report_stage(&id, wanted, "ok").await;
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the simulated BMC of machine `i` saw: one boot, from the network,
/// and only state-setting resets (never a cycle or restart).
fn assert_booted_once(sim: &kiln_sim::Sim, i: usize, what: &str) {
    let boots: Vec<String> = sim.bmc(i).boots().into_iter().map(|b| b.target).collect();
    assert_eq!(boots, vec!["Pxe".to_string()], "{what}: boots");
    let resets = sim.bmc(i).stats().resets;
    assert!(
        resets.iter().all(|r| r == "On" || r == "ForceOff"),
        "{what}: only idempotent resets: {resets:?}"
    );
}

async fn assert_deployed(admin: &Client, i: usize, what: &str) {
    let m = admin.get_machine(&format!("crash{i}")).await.unwrap();
    assert_eq!(m.state, MachineState::Deployed, "{what}");
    let e = admin.boot_explain(&format!("crash{i}"), None).await.unwrap();
    assert_eq!(e["answer"], "local_disk", "{what}: left armed: {e}");
}

async fn wait_killed(server: &mut Server, what: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert_eq!(
                status.signal(),
                Some(9),
                "{what}: the server ended with {status:?}, not SIGKILL"
            );
            return;
        }
        assert!(Instant::now() < end, "{what}: the crash point was never reached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    db: Option<TestDb>,
    sim: kiln_sim::Sim,
    token: String,
}

async fn fixture(backend: Backend, bmcs: usize) -> Fixture {
    let db = TestDb::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let sim = kiln_sim::start(kiln_sim::SimConfig {
        bmcs,
        username: "admin".into(),
        password: "rf-secret".into(),
        ..kiln_sim::SimConfig::default()
    })
    .await
    .unwrap();
    let cfg = config(&path, &db, "setup");
    let token = admin_token(&cfg.0);
    let server = start(&path, &cfg, None).await;
    let admin = Client::new(&server.url, Some(token.clone()));
    admin
        .create_os_image(&OsImageCreate {
            name: "debian".into(),
            version: "12".into(),
            arch: Arch::X86_64,
            kind: OsKind::DiskImage,
            tags: vec![PlatformTag::Bm],
            min_ram_bytes: GIB,
            min_disk_bytes: 10 * GIB,
            source: "images/debian-12.raw".into(),
            sha256: Some("ab".repeat(32)),
            format: None,
            content: Default::default(),
            templates: Default::default(),
        })
        .await
        .unwrap();
    for i in 0..bmcs {
        admin.create_machine(&machine(i, sim.bmc(i).url())).await.unwrap();
    }
    drop(server);
    Fixture {
        _dir: dir,
        dir: path,
        db: Some(db),
        sim,
        token,
    }
}

impl Fixture {
    fn db(&self) -> &TestDb {
        self.db.as_ref().unwrap()
    }

    async fn cleanup(mut self) {
        if let Some(db) = self.db.take() {
            db.cleanup().await;
        }
        self.sim.shutdown().await;
    }
}

/// Every step boundary, before and after its commit, one machine each.
async fn crash_at_every_boundary(backend: Backend) {
    let points: Vec<String> = STEPS
        .iter()
        .flat_map(|s| [format!("{s}:before"), format!("{s}:after")])
        .collect();
    let fx = fixture(backend, points.len()).await;
    for (i, point) in points.iter().enumerate() {
        let cfg = config(&fx.dir, fx.db(), "server");
        let mut dying = start(&fx.dir, &cfg, Some(point)).await;
        let admin = Client::new(&cfg.1, Some(fx.token.clone()));
        let id = admin
            .reimage(&format!("crash{i}"), &request())
            .await
            .unwrap()
            .id
            .to_string();
        let playing = tokio::spawn(agent(vec![cfg.1.clone()], fx.token.clone(), id.clone(), i));
        wait_killed(&mut dying, point).await;
        drop(dying);
        let _server = start(&fx.dir, &cfg, None).await;
        let job = playing.await.unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{point}: {:?}", job.reason);
        assert_deployed(&admin, i, point).await;
        assert_booted_once(&fx.sim, i, point);
    }
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reimage_survives_sigkill_at_every_step_boundary_sqlite() {
    crash_at_every_boundary(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reimage_survives_sigkill_at_every_step_boundary_postgres() {
    crash_at_every_boundary(Backend::Postgres).await;
}

/// Two servers on one PostgreSQL: A dies holding jobs; B, started after,
/// takes them over once their leases expire. Then both share new jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_takes_over_the_jobs_of_one_that_died() {
    let fx = fixture(Backend::Postgres, 9).await;
    let cfg_a = config(&fx.dir, fx.db(), "a");
    let cfg_b = config(&fx.dir, fx.db(), "b");
    let urls = vec![cfg_a.1.clone(), cfg_b.1.clone()];
    let mut a = start(&fx.dir, &cfg_a, Some("power_off:before")).await;
    let admin_a = Client::new(&cfg_a.1, Some(fx.token.clone()));
    let mut agents = vec![];
    for i in 0..3 {
        let id = admin_a
            .reimage(&format!("crash{i}"), &request())
            .await
            .unwrap()
            .id
            .to_string();
        agents.push((i, tokio::spawn(agent(urls.clone(), fx.token.clone(), id, i))));
    }
    wait_killed(&mut a, "server A").await;
    drop(a);
    let b = start(&fx.dir, &cfg_b, None).await;
    let admin = Client::new(&b.url, Some(fx.token.clone()));
    for (i, playing) in agents.drain(..) {
        let job = playing.await.unwrap();
        assert_eq!(job.state, JobState::Succeeded, "crash{i}: {:?}", job.reason);
        assert_deployed(&admin, i, "taken over").await;
        assert_booted_once(&fx.sim, i, "taken over");
    }
    // A again, beside B: the two share new jobs; each still runs once.
    let _a = start(&fx.dir, &cfg_a, None).await;
    for i in 3..9 {
        let via = Client::new(&urls[i % 2], Some(fx.token.clone()));
        let id = via
            .reimage(&format!("crash{i}"), &request())
            .await
            .unwrap()
            .id
            .to_string();
        agents.push((i, tokio::spawn(agent(urls.clone(), fx.token.clone(), id, i))));
    }
    for (i, playing) in agents {
        let job = playing.await.unwrap();
        assert_eq!(job.state, JobState::Succeeded, "crash{i}: {:?}", job.reason);
        assert_deployed(&admin, i, "shared").await;
        assert_booted_once(&fx.sim, i, "shared");
    }
    drop(b);
    fx.cleanup().await;
}
