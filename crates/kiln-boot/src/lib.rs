//! Net boot, decided in one place. `decision` is the safety core: a pure
//! function from (machine record, its armed job, configuration) to what the
//! machine is told to boot. `firmware` picks the first-stage file a PXE or
//! HTTP-boot client gets; `ipxe` renders the answer as an iPXE script whose
//! every value is checked so nothing a user or client sent can add commands.
//! `templates` renders the installer and first-boot files (preseed,
//! kickstart, cloud-init, Ignition) with per-format escaping; `password`
//! turns a plaintext root password into the `$6$` hash they take.
//! `installer` is what an installer image net-boots: its kernel, initrd and
//! the command line that points it at the job's preseed or kickstart.
//! `network` renders a machine's interfaces, bonds and VLANs as cloud-init
//! network-config and the installers' static network settings.
//! `dhcp` and `tftp` are the protocols' codecs and decisions, without sockets.
//!
//! The DHCP, TFTP and HTTP listeners (issue 3, in progress) are thin I/O
//! around these functions.

pub mod decision;
pub mod dhcp;
pub mod firmware;
pub mod installer;
pub mod ipxe;
pub mod network;
pub mod password;
pub mod templates;
pub mod tftp;
