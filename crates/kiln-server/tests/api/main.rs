//! In-process HTTP tests of the REST API, one module per resource, each
//! body run against a server on SQLite and one on PostgreSQL.

mod agent;
mod auth;
mod bmc;
mod boot;
mod catalog;
mod fleet;
mod jobs;
mod machines;
mod network;
mod openapi;
mod policy;
mod ports;
mod transport;
