//! kiln-workflow: durable jobs (DESIGN.md, "Reimage, the main workflow").
//!
//! A job is a list of steps run one at a time by whichever server holds the
//! job's lease. Each step is an idempotent function of the job's persisted
//! state that says what comes next (`Next`, `Wait`, `Retry`, `Fail`); the
//! engine commits that answer before the following step starts, so a server
//! killed anywhere resumes the job at the step it was in, and a step that
//! armed something is undone when the job fails or is cancelled.

pub mod engine;
pub mod hooks;
pub mod post_install;
pub mod process;
pub mod reimage;
pub mod rollout;

pub use engine::{
    BmcAction, BmcError, Effects, Engine, EngineSettings, NetbootPlan, Outcome, job_view, retry_plan, steps,
};
