//! Jobs: durable workflows (a reimage, later discovery, rollout members)
//! with their steps, install stages and log; the request shapes of
//! `/api/v1/machines/{key}/reimage` and `/api/v1/jobs/…`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::catalog::StorageLayout;
use crate::install::{CryptHash, SshPublicKey};
use crate::machine::MachineFilter;
use crate::{Hostname, JobId, MachineId, Secret, string_enum};

string_enum!(
    /// What a job does. A rollout is the job that reimages a set of
    /// machines, a few at a time, through reimage jobs of its own.
    JobKind { Reimage = "reimage", Rollout = "rollout" }
);

string_enum!(
    /// Where a job is. `queued`, `running`, `waiting` and `paused` are
    /// active (the machine has at most one active job); the rest are final.
    JobState {
        Queued = "queued",
        Running = "running",
        Waiting = "waiting",
        Paused = "paused",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
);

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// The install stages an agent or installer reports (0–5), the contract of
/// `POST /api/v1/jobs/{id}/stages/{n}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct Stage(pub u8);

impl Stage {
    pub const ACCEPTED: Stage = Stage(0);
    pub const STARTED: Stage = Stage(1);
    pub const BASE_INSTALLED: Stage = Stage(2);
    pub const CONFIGURED: Stage = Stage(3);
    pub const FINISHING: Stage = Stage(4);
    pub const FIRST_BOOT: Stage = Stage(5);
    pub const LAST: Stage = Stage::FIRST_BOOT;

    pub fn new(n: u8) -> Result<Stage, String> {
        if n <= Stage::LAST.0 {
            Ok(Stage(n))
        } else {
            Err(format!("stage {n} does not exist: stages are 0 to {}", Stage::LAST.0))
        }
    }

    /// What the stage means, for people.
    pub fn meaning(self) -> &'static str {
        match self.0 {
            0 => "accepted",
            1 => "installer started",
            2 => "base system installed",
            3 => "configured",
            4 => "finishing, rebooting",
            _ => "first boot of the new OS",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.0, self.meaning())
    }
}

/// `POST /api/v1/machines/{key}/reimage`: install an OS on a machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReimageRequest {
    /// OS image: `name`, `name-version` or its id.
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<StorageLayout>,
    /// The new OS's hostname (default: the machine's); the machine is
    /// renamed when the reimage succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<Hostname>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<SshPublicKey>,
    /// Plaintext; kiln keeps only its SHA-512 crypt hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_password: Option<Secret>,
    /// Or the hash itself (`$6$…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_password_hash: Option<CryptHash>,
    /// Post-install tasks from the catalog, by name, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<String>,
    /// Runs in the new OS at its first boot (never on a kiln server); its
    /// exit status and the end of its output come back with stage 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_install_script: Option<String>,
    /// Called (POST, JSON `{job_id, hostname, stage, post_install_exit}`)
    /// by the new OS once it reported stage 5, never by kiln's servers.
    /// Checked against the outbound rules when the reimage is asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// The change ticket this reimage belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// The OS is already written: skip the net boot and the install stages,
    /// set the disk as boot device and go on with the post-install work.
    #[serde(default)]
    pub no_pxe: bool,
    /// Do not run the configured pre/post hooks.
    #[serde(default)]
    pub no_hooks: bool,
    /// A new machine, never installed: the checks that need its hardware
    /// inventory are skipped while it has none, and so are the pre-reimage
    /// hooks (it is in no monitoring or load balancer yet).
    #[serde(default)]
    pub new: bool,
}

/// What a reimage job was asked to do, as stored (no plaintext secret).
#[derive(Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReimageSpec {
    pub os_image: String,
    pub os_label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<StorageLayout>,
    pub hostname: Hostname,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<SshPublicKey>,
    /// Never shown by the API (see [`Job`]'s `root_password_set`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub root_password_hash: Option<CryptHash>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_install_script: Option<String>,
    #[serde(default)]
    pub no_pxe: bool,
    #[serde(default)]
    pub no_hooks: bool,
    #[serde(default)]
    pub new: bool,
}

impl std::fmt::Debug for ReimageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReimageSpec")
            .field("os_label", &self.os_label)
            .field("layout", &self.layout)
            .field("hostname", &self.hostname)
            .field("root_password_set", &self.root_password_hash.is_some())
            .field("tasks", &self.tasks)
            .field("no_pxe", &self.no_pxe)
            .field("no_hooks", &self.no_hooks)
            .field("new", &self.new)
            .finish_non_exhaustive()
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: JobId,
    pub kind: JobKind,
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<MachineId>,
    /// The machine's hostname when the job was made.
    pub hostname: String,
    /// The step the job is in (or ended in).
    pub step: String,
    pub step_index: u32,
    /// Steps of this job, in order.
    pub steps: Vec<String>,
    /// The highest install stage reported so far.
    pub stage: Stage,
    /// Why the job waits, failed or was cancelled, in words a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// A root password (hash) was given; the hash itself is never shown.
    pub root_password_set: bool,
    /// Who asked for the job.
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

string_enum!(
    /// What a job log line records.
    JobLogKind {
        Created = "created",
        Step = "step",
        Stage = "stage",
        Wait = "wait",
        Retry = "retry",
        Note = "note",
        Operator = "operator",
        Failed = "failed",
        Cancelled = "cancelled",
        Paused = "paused",
        Succeeded = "succeeded",
    }
);

/// One line of a job's log (also what the live event stream sends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobLogEntry {
    /// Increases within the job; the event stream resumes after it.
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub kind: JobLogKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    pub message: String,
}

/// A job with its log, for `GET /api/v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: Job,
    pub log: Vec<JobLogEntry>,
}

/// `POST /api/v1/jobs/{id}/stages/{n}` from an agent or installer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StageReport {
    #[serde(default)]
    pub message: String,
}

/// Filters for `GET /api/v1/jobs`; newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    /// Only active jobs (queued, running, waiting, paused).
    #[serde(default)]
    pub active: bool,
    /// Hostname or machine id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// `POST /api/v1/jobs/{id}/retry`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    /// Step name to start from (default: the step the job ended in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_step: Option<String>,
}

/// `POST /api/v1/rollouts`: reimage every machine `selector` picks, at most
/// `concurrency` at a time, stopping once more than `max_failures` failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// Which machines (tag, rack, site, state, owner), resolved when the
    /// rollout starts. Protected machines and machines in maintenance are
    /// left out.
    pub selector: MachineFilter,
    /// What each machine gets (`hostname` must be absent: each keeps its own).
    pub reimage: ReimageRequest,
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Failed members tolerated; one more stops the rollout.
    #[serde(default)]
    pub max_failures: u32,
    /// A command (argv) run on the kiln server after a member's reimage
    /// ended; the member counts as done only if it exits 0. `KILN_HOSTNAME`,
    /// `KILN_HOST` (its address), `KILN_JOB_ID` are set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Vec<String>>,
}

fn default_concurrency() -> u32 {
    1
}

/// A rollout as stored in its job's spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// The selector, in words (`tag=db rack=a1`).
    pub selector: String,
    /// Each member's reimage, but for the hostname (set per member).
    pub template: ReimageSpec,
    pub callback_url: Option<String>,
    pub ticket: Option<String>,
    pub concurrency: u32,
    pub max_failures: u32,
    pub health_check: Option<Vec<String>>,
}

string_enum!(
    /// Where a member of a rollout is.
    MemberState {
        Pending = "pending",
        Running = "running",
        Done = "done",
        Failed = "failed",
        /// Never started (the rollout stopped or was aborted first).
        Skipped = "skipped",
    }
);

/// One machine of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RolloutMember {
    pub position: u32,
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<MachineId>,
    pub state: MemberState,
    /// Its reimage job, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A rollout: its controlling job (pause, resume and abort are that job's
/// pause, resume and cancel) and its members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Rollout {
    #[serde(flatten)]
    pub job: Job,
    pub concurrency: u32,
    pub max_failures: u32,
    pub members: Vec<RolloutMember>,
}
