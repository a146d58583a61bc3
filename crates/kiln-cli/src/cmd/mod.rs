//! One module per group of verbs.

pub mod catalog;
pub mod demo;
pub mod machine;
pub mod org;
pub mod power;
pub mod server;
