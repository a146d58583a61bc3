//! What the agent needs from the server, as plain data and one small
//! trait, so the HTTP client can be written against it later (and tests
//! can stand in for the server now).
//!
//! The server's endpoints for the agent are being designed separately;
//! nothing here fixes their paths. The shapes here are what the agent
//! needs to know, and the names are a proposal.

use std::io::Read;

use kiln_types::JobId;
use kiln_types::catalog::StorageLayout;
use kiln_types::job::Stage;
use serde::{Deserialize, Serialize};

use crate::identity::ExpectedMachine;
use crate::image::{ImageFormat, Sha256};
use crate::inventory::Inventory;

/// Everything deploy mode needs to know about its job.
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
}

/// Where the image is and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSource {
    /// Fetched with the job's token.
    pub url: String,
    /// The catalog's format. `OsImage` has no such field yet: until it
    /// does, the server can take it from the source's name
    /// ([`ImageFormat::from_file_name`]).
    pub format: ImageFormat,
    /// The catalog's `sha256`: of the image file's bytes.
    pub sha256: Sha256,
}

/// The server, as the agent uses it. Every call is made with the job's
/// token; implementations bound each call in time and retry only what is
/// safe to repeat (every report here is).
pub trait ControlPlane {
    /// Discovery's report (discover mode).
    fn report_inventory(&mut self, inventory: &Inventory) -> Result<(), ControlPlaneError>;
    /// The job this boot is for (deploy mode).
    fn deploy_job(&mut self) -> Result<DeployJob, ControlPlaneError>;
    /// The image's bytes, and their length when the server says it.
    fn open_image(&mut self, source: &ImageSource) -> Result<(Box<dyn Read>, Option<u64>), ControlPlaneError>;
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
}
