//! kiln's agent: the program the net-booted ramdisk runs on a machine.
//!
//! This crate is its pure, tested core; `main.rs` is a thin shell over it.
//! Each module decides from plain data and leaves I/O at its edges:
//!
//! - [`cmdline`]: the `kiln.*` words of the kernel command line.
//!
//! See `docs/agent.md` for what is built and what comes next.

pub mod cmdline;
