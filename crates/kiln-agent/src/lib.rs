//! kiln's agent: the program the net-booted ramdisk runs on a machine.
//!
//! This crate is its pure, tested core; `main.rs` is a thin shell over it.
//! Each module decides from plain data and leaves I/O at its edges:
//!
//! - [`cmdline`]: the `kiln.*` words of the kernel command line.
//! - [`inventory`]: discovery's report, read from `/proc`, `/sys` and `/dev`.
//! - [`lldp`]: the switch and port a NIC is cabled to, from an LLDP frame.
//! - [`identity`]: is this machine the one the job is for? Checked before
//!   anything is written.
//! - [`layout`]: a storage layout made concrete for the machine's disks,
//!   with the commands that apply it.
//! - [`image`]: streams an image (raw, zstd, qcow2) onto a disk, checks its
//!   SHA-256, and leaves a disk it failed to write unbootable.
//! - [`deploy`]: deploy mode's checks and plan, before its first write.
//! - [`execute`]: deploy mode from the plan to the reboot.
//! - [`discover`]: discovery mode's report.
//! - [`server`]: the server's API: a trait and its HTTP client.
//! - [`system`]: programs to run and devices to wait for, behind a trait.
//!
//! See `docs/agent.md` for what is built and what comes next.

pub mod cmdline;
pub mod deploy;
pub mod discover;
pub mod execute;
pub mod identity;
pub mod image;
pub mod inventory;
pub mod layout;
pub mod lldp;
pub mod server;
pub mod system;
pub mod whole_disk;
