//! One module per group of verbs.

pub mod catalog;
pub mod demo;
pub mod job;
pub mod machine;
pub mod network;
pub mod org;
pub mod power;
pub mod ramdisk;
pub mod reimage;
pub mod rollout;
pub mod server;

use kiln_client::ClientError;

/// What went wrong, in one line for a table cell: the server's own message
/// when it answered, else why it could not be asked.
pub fn error_message(e: &ClientError) -> String {
    match e {
        ClientError::Api { error, .. } => error.message.clone(),
        other => other.to_string(),
    }
}
