//! The agent's side of the server's API (docs/architecture.md, "The
//! agent's contract"): the [`ControlPlane`] trait deploy and discovery are
//! written against, and [`HttpControlPlane`], its blocking HTTP client.
//!
//! Every call is bounded in time. Reports (discovery, stages, failure) are
//! safe to repeat, so they are retried when the server cannot be reached
//! or answers 5xx; an answer that refuses (4xx) is final. The token goes
//! only into `Authorization` headers, never into a message.

use std::io::Read;
use std::thread::sleep;
use std::time::{Duration, Instant};

use kiln_types::agent::{DeployPlan, DiscoveryReport, DiscoveryResult};
use kiln_types::catalog::{ImageContent, StorageLayout};
use kiln_types::job::Stage;
use kiln_types::{JobId, Secret};
use serde::{Deserialize, Serialize};

use crate::identity::{ExpectedDisk, ExpectedMachine};
use crate::image::{ImageFormat, Sha256};

/// Everything deploy mode's checks need to know about its job: the
/// server's [`DeployPlan`] in the agent's own terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployJob {
    pub job: JobId,
    /// What the machine must be; checked before anything is written.
    pub machine: ExpectedMachine,
    pub layout: StorageLayout,
    /// Swap volume size; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_bytes: Option<u64>,
    /// Root size; all the space left by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_bytes: Option<u64>,
    pub image: ImageSource,
    /// The disk (serial or WWN) `flat` and `lvm_hba` put the OS on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_disk: Option<String>,
}

/// Where the image is and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSource {
    /// Fetched with the job's token.
    pub url: String,
    /// The catalog's format; the file's magic must agree.
    pub format: ImageFormat,
    /// The catalog's `sha256`: of the image file's bytes.
    pub sha256: Sha256,
    /// A root filesystem for the layout, or a whole disk for the system
    /// disk.
    #[serde(default)]
    pub content: ImageContent,
}

impl DeployJob {
    /// The plan as deploy mode checks it. Disks are expected by serial:
    /// what discovery recorded.
    pub fn from_plan(plan: &DeployPlan) -> Result<DeployJob, String> {
        let format = plan
            .image
            .format
            .as_str()
            .parse::<ImageFormat>()
            .map_err(|e| format!("the plan's image format: {e}"))?;
        let sha256 = plan
            .image
            .sha256
            .parse::<Sha256>()
            .map_err(|e| format!("the plan's image sha256: {e}"))?;
        Ok(DeployJob {
            job: plan.job_id,
            machine: ExpectedMachine {
                serial: plan.identity.serial.clone(),
                uuid: plan.identity.uuid.clone(),
                disks: plan
                    .identity
                    .disk_serials
                    .iter()
                    .map(|s| ExpectedDisk {
                        serial: Some(s.clone()),
                        by_id: None,
                    })
                    .collect(),
                protected: plan.protected,
                macs: plan.identity.macs.clone(),
            },
            layout: plan.layout,
            swap_bytes: None,
            root_bytes: None,
            image: ImageSource {
                url: plan.image.url.clone(),
                format,
                sha256,
                content: plan.image.content,
            },
            system_disk: plan.system_disk.clone(),
        })
    }
}

/// The server, as the agent uses it.
pub trait ControlPlane {
    /// Discovery's report (discover mode).
    fn report_discovery(&mut self, report: &DiscoveryReport) -> Result<DiscoveryResult, ControlPlaneError>;
    /// What this boot's job is to do (deploy mode).
    fn deploy_plan(&mut self) -> Result<DeployPlan, ControlPlaneError>;
    /// A file the plan names (image, cloud-init seed), with the job's
    /// token; its bytes and their length when the server says it.
    fn open(&mut self, url: &str) -> Result<(Box<dyn Read>, Option<u64>), ControlPlaneError>;
    /// An install stage reached (1–4 from the agent; 5 comes from the new OS).
    fn report_stage(&mut self, stage: Stage, message: &str) -> Result<(), ControlPlaneError>;
    /// The job cannot go on: why, in words an operator can act on.
    fn report_failure(&mut self, reason: &str) -> Result<(), ControlPlaneError>;
}

/// A call to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The server could not be reached, or did not answer in time.
    #[error("the server cannot be reached: {0}")]
    Unreachable(String),
    /// The server answered with an error.
    #[error("the server refused: {status} {message}")]
    Refused { status: u16, message: String },
    /// The answer was not what the API says.
    #[error("the server's answer cannot be read: {0}")]
    BadAnswer(String),
}

impl ControlPlaneError {
    /// Worth trying again: the server may come back (5xx, no answer).
    fn passing(&self) -> bool {
        match self {
            ControlPlaneError::Unreachable(_) => true,
            ControlPlaneError::Refused { status, .. } => *status >= 500,
            ControlPlaneError::BadAnswer(_) => false,
        }
    }
}

/// How long each kind of call may take.
#[derive(Debug, Clone)]
pub struct Deadlines {
    /// Connecting, and each small call as a whole.
    pub call: Duration,
    /// Waiting for a file's body to start; its bytes then stream without
    /// a deadline (an image takes as long as the disk needs).
    pub file_response: Duration,
    /// How long a report is retried before the agent gives up.
    pub report_retries: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            call: Duration::from_secs(30),
            file_response: Duration::from_secs(60),
            report_retries: Duration::from_secs(120),
        }
    }
}

/// The server's API over HTTP (or HTTPS, with the webpki roots).
pub struct HttpControlPlane {
    server: String,
    token: Secret,
    job: Option<JobId>,
    calls: ureq::Agent,
    files: ureq::Agent,
    deadlines: Deadlines,
}

impl HttpControlPlane {
    /// A client for `server` (the base URL) with `token`: the job's in
    /// deploy mode, the boot NIC's discovery token in discover mode.
    pub fn new(server: &str, token: Secret, job: Option<JobId>, deadlines: Deadlines) -> HttpControlPlane {
        let agent = |config: ureq::config::ConfigBuilder<ureq::typestate::AgentScope>| -> ureq::Agent {
            config
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(10)))
                .user_agent(concat!("kiln-agent/", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        HttpControlPlane {
            server: server.trim_end_matches('/').to_string(),
            token,
            job,
            calls: agent(ureq::Agent::config_builder().timeout_global(Some(deadlines.call))),
            files: agent(ureq::Agent::config_builder().timeout_recv_response(Some(deadlines.file_response))),
            deadlines,
        }
    }

    fn job(&self) -> Result<JobId, ControlPlaneError> {
        self.job
            .ok_or_else(|| ControlPlaneError::BadAnswer("this boot has no job (kiln.job)".into()))
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token.expose())
    }

    /// POSTs JSON `body` to `path`, retrying while the failure is passing.
    fn post(&self, path: &str, body: &impl Serialize) -> Result<String, ControlPlaneError> {
        let json = serde_json::to_string(body).map_err(|e| ControlPlaneError::BadAnswer(e.to_string()))?;
        let url = format!("{}{path}", self.server);
        let started = Instant::now();
        let mut pause = Duration::from_secs(1);
        loop {
            let result = self
                .calls
                .post(&url)
                .header("Authorization", &self.bearer())
                .header("Content-Type", "application/json")
                .send(&json)
                .map_err(unreachable)
                .and_then(answer_text);
            match result {
                Err(e) if e.passing() && started.elapsed() + pause < self.deadlines.report_retries => {
                    eprintln!("kiln-agent: POST {path}: {e}; trying again in {}s", pause.as_secs());
                    sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(15));
                }
                other => return other,
            }
        }
    }
}

// By hand: the token must not show in `{:?}`.
impl std::fmt::Debug for HttpControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpControlPlane")
            .field("server", &self.server)
            .field("job", &self.job)
            .finish_non_exhaustive()
    }
}

fn unreachable(e: ureq::Error) -> ControlPlaneError {
    ControlPlaneError::Unreachable(e.to_string())
}

/// The body of a 2xx answer; any other status as `Refused` with the
/// server's message (its JSON error's `message`, or the text).
fn answer_text(mut response: ureq::http::Response<ureq::Body>) -> Result<String, ControlPlaneError> {
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(1 << 20)
        .read_to_string()
        .map_err(unreachable)?;
    if (200..300).contains(&status) {
        return Ok(text);
    }
    Err(ControlPlaneError::Refused {
        status,
        message: error_message(&text),
    })
}

fn error_message(text: &str) -> String {
    #[derive(Deserialize)]
    struct Body {
        message: String,
    }
    serde_json::from_str::<Body>(text)
        .map(|b| b.message)
        .unwrap_or_else(|_| text.trim().chars().take(500).collect())
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ControlPlaneError> {
    serde_json::from_str(text).map_err(|e| ControlPlaneError::BadAnswer(e.to_string()))
}

#[derive(Serialize)]
struct Message<'a> {
    message: &'a str,
}

impl ControlPlane for HttpControlPlane {
    fn report_discovery(&mut self, report: &DiscoveryReport) -> Result<DiscoveryResult, ControlPlaneError> {
        parse(&self.post("/api/v1/discovery", report)?)
    }

    fn deploy_plan(&mut self) -> Result<DeployPlan, ControlPlaneError> {
        let url = format!("{}/api/v1/jobs/{}/plan", self.server, self.job()?);
        let response = self
            .calls
            .get(&url)
            .header("Authorization", &self.bearer())
            .call()
            .map_err(unreachable)?;
        parse(&answer_text(response)?)
    }

    fn open(&mut self, url: &str) -> Result<(Box<dyn Read>, Option<u64>), ControlPlaneError> {
        let response = self
            .files
            .get(url)
            .header("Authorization", &self.bearer())
            .call()
            .map_err(unreachable)?;
        if !response.status().is_success() {
            return Err(answer_text(response).expect_err("not a success"));
        }
        let length = response.body().content_length();
        let reader = response.into_body().into_with_config().limit(u64::MAX).reader();
        Ok((Box::new(reader), length))
    }

    fn report_stage(&mut self, stage: Stage, message: &str) -> Result<(), ControlPlaneError> {
        let path = format!("/api/v1/jobs/{}/stages/{}", self.job()?, stage.0);
        self.post(&path, &Message { message }).map(|_| ())
    }

    fn report_failure(&mut self, reason: &str) -> Result<(), ControlPlaneError> {
        let path = format!("/api/v1/jobs/{}/failure", self.job()?);
        self.post(&path, &Message { message: reason }).map(|_| ())
    }
}
