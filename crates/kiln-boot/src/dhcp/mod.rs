//! DHCPv4, as pure functions: what a request means (`classify_request`),
//! which address a client gets (`choose_address`), and the reply
//! (`reply`). The listener around them (sockets, lease persistence) only
//! gathers facts and sends what these return.

mod handler;
mod subnet;

pub use handler::{
    Effect, Facts, Lease, LeaseState, Mode, Outcome, ServerConfig, choose_address, decode, handle, request_identity,
};
pub use subnet::{Subnet, SubnetError};
