//! kiln's wire contract: typed IDs, validated values, domain records and the
//! request/response shapes of the REST API. The server, the CLI, the client
//! and (later) the agent all compile against this crate and nothing heavier.

pub mod agent;
pub mod auth;
pub mod catalog;
pub mod error;
pub mod event;
pub mod fit;
pub mod ids;
pub mod install;
pub mod job;
pub mod lease;
pub mod machine;
pub mod network;
pub mod page;
pub mod port;
pub mod power;
pub mod secret;
pub mod site;
pub mod validate;

pub use ids::*;
pub use secret::Secret;
pub use validate::{Fqdn, Hostname, MacAddr, Tag, ValidationError};
