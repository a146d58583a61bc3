//! The IPMI commands kiln sends, as pure request builders and response
//! readers: channel capabilities, session privilege, chassis status and
//! control, the boot-flags parameter, and the system GUID (FRU reads are
//! in `fru.rs`).

use super::codec::Request;
use crate::{BootDevice, BootFirmware, BootPersistence, PowerAction, PowerState};

pub const NETFN_CHASSIS: u8 = 0x00;
pub const NETFN_APP: u8 = 0x06;

/// Privilege levels (§6.8).
pub const PRIV_ADMIN: u8 = 0x04;

/// "This channel", in channel-number fields.
const CURRENT_CHANNEL: u8 = 0x0e;

/// Get Channel Authentication Capabilities, asking for the IPMI 2.0
/// extended data (bit 7).
pub fn get_channel_auth_caps(privilege: u8) -> Request {
    Request::new(NETFN_APP, 0x38, vec![0x80 | CURRENT_CHANNEL, privilege])
}

/// What Get Channel Authentication Capabilities says that kiln uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthCaps {
    pub channel: u8,
    /// The BMC speaks IPMI 2.0 (RMCP+) on this channel.
    pub ipmi20: bool,
    /// A BMC key (K_G) is set: kiln needs it, the password alone will not do.
    pub kg_required: bool,
}

pub fn parse_auth_caps(data: &[u8]) -> Result<AuthCaps, String> {
    if data.len() < 4 {
        return Err(format!(
            "Get Channel Authentication Capabilities: {} data bytes, expected 8",
            data.len()
        ));
    }
    // Byte 2 bit 7: extended capabilities present; byte 4 bit 1: IPMI 2.0.
    let ext = data[1] & 0x80 != 0;
    Ok(AuthCaps {
        channel: data[0] & 0x0f,
        ipmi20: ext && data[3] & 0x02 != 0,
        kg_required: data[2] & 0x20 != 0,
    })
}

/// Get Channel Cipher Suites, IPMI payload, "list by cipher suite", page
/// `index` (16 bytes each).
pub fn get_channel_cipher_suites(index: u8) -> Request {
    Request::new(NETFN_APP, 0x54, vec![CURRENT_CHANNEL, 0x00, 0x80 | (index & 0x3f)])
}

/// Set Session Privilege Level.
pub fn set_session_privilege(privilege: u8) -> Request {
    Request::new(NETFN_APP, 0x3b, vec![privilege])
}

/// Close Session, naming the BMC's session ID.
pub fn close_session(bmc_sid: u32) -> Request {
    Request::new(NETFN_APP, 0x3c, bmc_sid.to_le_bytes().to_vec())
}

pub fn get_chassis_status() -> Request {
    Request::new(NETFN_CHASSIS, 0x01, vec![])
}

/// The power state in a Get Chassis Status answer (byte 1 bit 0).
pub fn parse_chassis_status(data: &[u8]) -> Result<PowerState, String> {
    match data.first() {
        Some(b) if b & 0x01 != 0 => Ok(PowerState::On),
        Some(_) => Ok(PowerState::Off),
        None => Err("Get Chassis Status: empty answer".into()),
    }
}

/// Chassis Control (§28.3).
pub fn chassis_control(action: PowerAction) -> Request {
    let code = match action {
        PowerAction::Off => 0x00,
        PowerAction::On => 0x01,
        PowerAction::Cycle => 0x02,
        PowerAction::Reset => 0x03,
        PowerAction::SoftOff => 0x05,
    };
    Request::new(NETFN_CHASSIS, 0x02, vec![code])
}

/// The five data bytes of boot-options parameter 5, "boot flags" (§28.13,
/// table 28-14):
/// - byte 1: bit 7 the flags are valid, bit 6 persistent (else next boot
///   only), bit 5 EFI boot (else PC-compatible / legacy BIOS);
/// - byte 2: bits 5:2 the device selector — 0001 PXE, 0010 default hard
///   disk, 0101 default CD/DVD — giving 0x04, 0x08 and 0x14;
/// - bytes 3–5: no further overrides (BIOS verbosity, console redirection,
///   mux and device instance all left to the firmware).
///
/// `None` for a device the selector cannot name: UEFI HTTP boot (the IPMI
/// 2.0 table stops at PXE; what a BIOS does with "PXE" in UEFI mode is up
/// to its own boot order).
pub fn boot_flags(device: BootDevice, persistence: BootPersistence, firmware: BootFirmware) -> Option<[u8; 5]> {
    let mut b1 = 0x80;
    if persistence == BootPersistence::Persistent {
        b1 |= 0x40;
    }
    if firmware == BootFirmware::Uefi {
        b1 |= 0x20;
    }
    let b2 = match device {
        BootDevice::Network => 0x04,
        BootDevice::Disk => 0x08,
        BootDevice::Cdrom => 0x14,
        BootDevice::UefiHttp => return None,
    };
    Some([b1, b2, 0, 0, 0])
}

/// Set System Boot Options, parameter 5 (parameter byte bit 7 clear: the
/// parameter is valid / unlocked).
pub fn set_boot_flags(flags: [u8; 5]) -> Request {
    let mut data = vec![0x05];
    data.extend_from_slice(&flags);
    Request::new(NETFN_CHASSIS, 0x08, data)
}

/// Set System Boot Options, parameter 4, boot info acknowledge: write mask
/// 0x01, data 0x01 — "BIOS/POST has not yet handled the boot info", so the
/// firmware reads the new flags on the next boot.
pub fn set_boot_info_ack() -> Request {
    Request::new(NETFN_CHASSIS, 0x08, vec![0x04, 0x01, 0x01])
}

/// Get System Boot Options, parameter 5.
pub fn get_boot_flags() -> Request {
    Request::new(NETFN_CHASSIS, 0x09, vec![0x05, 0x00, 0x00])
}

/// The boot flags in a Get System Boot Options answer: parameter version,
/// parameter selector, then the five data bytes.
pub fn parse_boot_flags(data: &[u8]) -> Result<[u8; 5], String> {
    if data.len() < 7 || data[1] & 0x7f != 0x05 {
        return Err(format!(
            "Get System Boot Options: expected parameter 5 and 5 data bytes, got {data:02x?}"
        ));
    }
    Ok(data[2..7].try_into().expect("5 bytes"))
}

pub fn get_system_guid() -> Request {
    Request::new(NETFN_APP, 0x37, vec![])
}

/// Reads a system GUID as a UUID. The IPMI spec stores it with every field
/// least-significant byte first (the whole RFC 4122 string reversed); BMCs
/// also ship the SMBIOS order (first three fields swapped) and the plain
/// RFC 4122 order (OpenIPMI's ipmi_sim does). The first reading whose
/// version and variant bits are those of a real UUID wins, in that order;
/// if none is, the spec's order is used.
pub fn parse_guid(data: &[u8]) -> Result<uuid::Uuid, String> {
    let g: [u8; 16] = data
        .get(..16)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| format!("Get System GUID: {} data bytes, expected 16", data.len()))?;
    let mut spec = g;
    spec.reverse();
    let smbios = {
        let mut s = g;
        s[0..4].reverse();
        s[4..6].reverse();
        s[6..8].reverse();
        s
    };
    let plausible = |b: &[u8; 16]| matches!(b[6] >> 4, 1..=8) && b[8] & 0xc0 == 0x80;
    let pick = [spec, smbios, g].into_iter().find(plausible).unwrap_or(spec);
    Ok(uuid::Uuid::from_bytes(pick))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipmi::codec::encode_request;

    #[test]
    fn boot_flags_bytes() {
        use BootDevice::*;
        use BootFirmware::*;
        use BootPersistence::*;
        let cases = [
            (Network, Once, Bios, [0x80, 0x04, 0, 0, 0]),
            (Network, Once, Uefi, [0xa0, 0x04, 0, 0, 0]),
            (Network, Persistent, Uefi, [0xe0, 0x04, 0, 0, 0]),
            (Disk, Persistent, Bios, [0xc0, 0x08, 0, 0, 0]),
            (Disk, Once, Uefi, [0xa0, 0x08, 0, 0, 0]),
            (Cdrom, Once, Bios, [0x80, 0x14, 0, 0, 0]),
            (Cdrom, Persistent, Uefi, [0xe0, 0x14, 0, 0, 0]),
        ];
        for (d, p, f, want) in cases {
            assert_eq!(boot_flags(d, p, f), Some(want), "{d:?} {p:?} {f:?}");
        }
        assert_eq!(boot_flags(UefiHttp, Once, Uefi), None, "no IPMI device selector");
    }

    #[test]
    fn set_boot_options_requests() {
        let r = set_boot_flags(boot_flags(BootDevice::Network, BootPersistence::Once, BootFirmware::Uefi).unwrap());
        assert_eq!((r.netfn, r.cmd), (0x00, 0x08));
        assert_eq!(r.data, vec![0x05, 0xa0, 0x04, 0, 0, 0]);
        // The whole IPMI message, checksums included.
        assert_eq!(
            encode_request(&r, 3),
            vec![0x20, 0x00, 0xe0, 0x81, 0x0c, 0x08, 0x05, 0xa0, 0x04, 0, 0, 0, 0xc2]
        );
        assert_eq!(set_boot_info_ack().data, vec![0x04, 0x01, 0x01]);
        assert_eq!(get_boot_flags().data, vec![0x05, 0x00, 0x00]);
    }

    #[test]
    fn reads_boot_flags_back() {
        // ipmitool showed ipmi_sim's answer as "version 1, parameter 5
        // valid, data 0004000000".
        assert_eq!(
            parse_boot_flags(&[0x01, 0x05, 0x00, 0x04, 0, 0, 0]).unwrap(),
            [0x00, 0x04, 0, 0, 0]
        );
        assert_eq!(
            parse_boot_flags(&[0x01, 0x85, 0xa0, 0x04, 0, 0, 0]).unwrap(),
            [0xa0, 0x04, 0, 0, 0]
        );
        assert!(parse_boot_flags(&[0x01, 0x04, 0, 0, 0, 0, 0]).is_err());
        assert!(parse_boot_flags(&[0x01, 0x05, 0]).is_err());
    }

    #[test]
    fn chassis_control_codes() {
        let code = |a| chassis_control(a).data[0];
        assert_eq!(code(PowerAction::Off), 0);
        assert_eq!(code(PowerAction::On), 1);
        assert_eq!(code(PowerAction::Cycle), 2);
        assert_eq!(code(PowerAction::Reset), 3);
        assert_eq!(code(PowerAction::SoftOff), 5);
        assert_eq!(parse_chassis_status(&[0x01, 0, 0]).unwrap(), PowerState::On);
        assert_eq!(parse_chassis_status(&[0x60, 0, 0]).unwrap(), PowerState::Off);
        assert!(parse_chassis_status(&[]).is_err());
    }

    #[test]
    fn auth_caps() {
        // ipmi_sim: channel 1, ext caps + md5/md2/none/straight, IPMI 1.5+2.0.
        let c = parse_auth_caps(&[0x01, 0x97, 0x04, 0x03, 0, 0, 0, 0]).unwrap();
        assert_eq!(
            c,
            AuthCaps {
                channel: 1,
                ipmi20: true,
                kg_required: false
            }
        );
        // A 1.5-only BMC has no extended-capabilities bit.
        assert!(!parse_auth_caps(&[0x01, 0x17, 0x04, 0x03]).unwrap().ipmi20);
        assert!(parse_auth_caps(&[0x01, 0x97, 0x24, 0x02]).unwrap().kg_required);
        assert!(parse_auth_caps(&[0x01]).is_err());
    }

    #[test]
    fn guid_byte_orders() {
        let want: uuid::Uuid = "4c616200-0000-4000-8000-000000000001".parse().unwrap();
        let rfc = *want.as_bytes();
        // ipmi_sim sends RFC 4122 order.
        assert_eq!(parse_guid(&rfc).unwrap(), want);
        // The spec's order: everything reversed.
        let mut spec = rfc;
        spec.reverse();
        assert_eq!(parse_guid(&spec).unwrap(), want);
        // SMBIOS order: the first three fields little-endian.
        let mut smbios = rfc;
        smbios[0..4].reverse();
        smbios[4..6].reverse();
        smbios[6..8].reverse();
        assert_eq!(parse_guid(&smbios).unwrap(), want);
        assert!(parse_guid(&rfc[..10]).is_err());
    }
}
