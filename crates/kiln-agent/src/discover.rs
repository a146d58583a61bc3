//! Discovery mode: the machine's inventory, reported under the boot NIC's
//! discovery token; the server creates or updates the machine.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_types::MacAddr;
use kiln_types::agent::{DiscoveryReport, DiscoveryResult, LldpNeighbor as Neighbor};

use crate::inventory::Inventory;
use crate::lldp::LldpNeighbor;
use crate::lldp::capture::Listen;
use crate::server::{ControlPlane, ControlPlaneError};

/// The NIC the machine booted from: `BOOTIF` when the boot loader said,
/// else the first NIC with link, else the first NIC.
pub fn boot_mac(bootif: Option<MacAddr>, inventory: &Inventory) -> Option<MacAddr> {
    let nics = &inventory.hardware.nics;
    bootif
        .or_else(|| nics.iter().find(|n| n.link).map(|n| n.mac))
        .or_else(|| nics.first().map(|n| n.mac))
}

/// The NICs with link to listen for LLDP on, with their interface
/// indexes from `/sys/class/net` under `root`.
pub fn lldp_nics(root: &Path, inventory: &Inventory) -> Vec<Listen> {
    inventory
        .hardware
        .nics
        .iter()
        .filter(|n| n.link)
        .filter_map(|n| {
            let index = std::fs::read_to_string(root.join("sys/class/net").join(&n.name).join("ifindex")).ok()?;
            Some(Listen {
                ifindex: index.trim().parse().ok()?,
                mac: n.mac,
            })
        })
        .collect()
}

/// The neighbours as the report carries them: switch and port names.
pub fn neighbors(found: &BTreeMap<MacAddr, LldpNeighbor>) -> Vec<Neighbor> {
    found
        .iter()
        .map(|(mac, n)| Neighbor {
            mac: *mac,
            switch: n.switch_name().to_string(),
            port: n.port_name().to_string(),
        })
        .collect()
}

/// Reports `inventory`, with the LLDP neighbours seen, as the machine
/// booted from `boot_mac`.
pub fn discover(
    server: &mut dyn ControlPlane,
    inventory: &Inventory,
    boot_mac: MacAddr,
    lldp: Vec<Neighbor>,
) -> Result<DiscoveryResult, ControlPlaneError> {
    let report = DiscoveryReport {
        boot_mac,
        hardware: inventory.hardware.clone(),
        lldp,
        firmware: Some(inventory.firmware_report()),
    };
    server.report_discovery(&report)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::inventory::collect;

    #[test]
    fn the_boot_nic_is_bootif_or_the_first_with_link() {
        let inv = collect(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/server-uefi")).unwrap();
        let given: MacAddr = "02:00:00:00:00:99".parse().unwrap();
        assert_eq!(boot_mac(Some(given), &inv), Some(given));
        let with_link = inv.hardware.nics.iter().find(|n| n.link).unwrap().mac;
        assert_eq!(boot_mac(None, &inv), Some(with_link));
        let mut none = inv.clone();
        none.hardware.nics.clear();
        assert_eq!(boot_mac(None, &none), None);
    }
}
