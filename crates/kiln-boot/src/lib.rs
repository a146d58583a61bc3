//! Net boot, decided in one place. `decision` is the safety core: a pure
//! function from (machine record, its armed job, configuration) to what the
//! machine is told to boot. `firmware` picks the first-stage file a PXE or
//! HTTP-boot client gets; `ipxe` renders the answer as an iPXE script whose
//! every value is checked so nothing a user or client sent can add commands.
//! `dhcp` and `tftp` are the protocols' codecs and decisions, without sockets.
//!
//! The DHCP, TFTP and HTTP listeners (issue 3, in progress) are thin I/O
//! around these functions.

pub mod decision;
pub mod dhcp;
pub mod firmware;
pub mod ipxe;
pub mod tftp;
