//! LLDP (IEEE 802.1AB): which switch and port a NIC is cabled to, from one
//! frame the switch sends every 30 seconds or so.
//!
//! The parser is a pure function over the frame's bytes ([`capture`]
//! listens for frames during discovery). It takes the first three TLVs the standard requires (chassis ID, port ID,
//! time to live, in that order) and the optional port description and
//! system name, and ignores the rest (capabilities, management address,
//! organisation-specific TLVs), which discovery does not report.

use std::net::{Ipv4Addr, Ipv6Addr};

pub mod capture;

/// The ethertype of LLDP frames.
pub const ETHERTYPE_LLDP: u16 = 0x88cc;
/// The ethertype of an IEEE 802.1Q VLAN tag.
const ETHERTYPE_VLAN: u16 = 0x8100;

/// A chassis or port ID: its subtype (what kind of name it is) and the
/// name as text (MACs as `aa:bb:…`, addresses in their usual notation,
/// other subtypes as the UTF-8 they are meant to be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LldpId {
    pub subtype: u8,
    pub value: String,
}

/// What one LLDP frame says about the switch port at the other end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LldpNeighbor {
    pub chassis_id: LldpId,
    pub port_id: LldpId,
    /// How long the information stays valid; 0 means the switch withdraws it.
    pub ttl_secs: u16,
    pub port_description: Option<String>,
    pub system_name: Option<String>,
}

/// Port ID subtypes that are an interface's name (`xe-0/0/12`,
/// `Ethernet1/1`), as opposed to a MAC, an address or an SNMP index.
const PORT_ID_INTERFACE_ALIAS: u8 = 1;
const PORT_ID_INTERFACE_NAME: u8 = 5;

impl LldpNeighbor {
    /// The switch's name for people: its system name, else its chassis ID.
    pub fn switch_name(&self) -> &str {
        self.system_name.as_deref().unwrap_or(&self.chassis_id.value)
    }

    /// The port's name for people. Many switches send an SNMP index or a
    /// MAC as port ID and the interface name as the description, so the
    /// ID is taken only when it is an interface name.
    pub fn port_name(&self) -> &str {
        match (self.port_id.subtype, &self.port_description) {
            (PORT_ID_INTERFACE_ALIAS | PORT_ID_INTERFACE_NAME, _) | (_, None) => &self.port_id.value,
            (_, Some(description)) => description,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LldpError {
    #[error("frame is {0} bytes, too short for an Ethernet header")]
    ShortFrame(usize),
    #[error("ethertype {0:#06x} is not LLDP (0x88cc)")]
    NotLldp(u16),
    #[error("TLV {tlv_type} at byte {at} says {length} bytes but only {left} remain")]
    TlvOverrun {
        tlv_type: u8,
        at: usize,
        length: usize,
        left: usize,
    },
    #[error("the LLDPDU must start with chassis ID, port ID and TTL TLVs; {0} is missing or out of order")]
    Mandatory(&'static str),
    #[error("{0} TLV is malformed")]
    Malformed(&'static str),
}

/// Parses an Ethernet frame (destination, source, optional 802.1Q tag,
/// ethertype 0x88cc, LLDPDU).
pub fn parse_frame(frame: &[u8]) -> Result<LldpNeighbor, LldpError> {
    let ethertype_at = |at: usize| frame.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let mut at = 12;
    let mut ethertype = ethertype_at(at).ok_or(LldpError::ShortFrame(frame.len()))?;
    if ethertype == ETHERTYPE_VLAN {
        at += 4;
        ethertype = ethertype_at(at).ok_or(LldpError::ShortFrame(frame.len()))?;
    }
    if ethertype != ETHERTYPE_LLDP {
        return Err(LldpError::NotLldp(ethertype));
    }
    parse_lldpdu(&frame[at + 2..])
}

/// Parses an LLDPDU: the TLVs after the ethertype.
pub fn parse_lldpdu(pdu: &[u8]) -> Result<LldpNeighbor, LldpError> {
    let mut chassis_id = None;
    let mut port_id = None;
    let mut ttl = None;
    let mut port_description = None;
    let mut system_name = None;
    let mut at = 0;
    let mut index = 0;
    while at + 2 <= pdu.len() {
        // 7 bits of type, 9 bits of length.
        let header = u16::from_be_bytes([pdu[at], pdu[at + 1]]);
        let tlv_type = (header >> 9) as u8;
        let length = usize::from(header & 0x1ff);
        let left = pdu.len() - at - 2;
        if length > left {
            return Err(LldpError::TlvOverrun {
                tlv_type,
                at,
                length,
                left,
            });
        }
        let value = &pdu[at + 2..at + 2 + length];
        at += 2 + length;
        // The first three must be chassis ID, port ID, TTL: a frame that
        // breaks that rule is not one to trust for where a cable goes.
        let expected = [(1, "chassis ID"), (2, "port ID"), (3, "TTL")];
        if let Some(&(want, name)) = expected.get(index)
            && tlv_type != want
        {
            return Err(LldpError::Mandatory(name));
        }
        index += 1;
        match tlv_type {
            0 => break, // End of LLDPDU.
            1 => chassis_id = Some(parse_id(value, true).ok_or(LldpError::Malformed("chassis ID"))?),
            2 => port_id = Some(parse_id(value, false).ok_or(LldpError::Malformed("port ID"))?),
            3 => {
                let v: [u8; 2] = value.try_into().map_err(|_| LldpError::Malformed("TTL"))?;
                ttl = Some(u16::from_be_bytes(v));
            }
            4 => port_description = Some(text(value)),
            5 => system_name = Some(text(value)),
            _ => {}
        }
    }
    Ok(LldpNeighbor {
        chassis_id: chassis_id.ok_or(LldpError::Mandatory("chassis ID"))?,
        port_id: port_id.ok_or(LldpError::Mandatory("port ID"))?,
        ttl_secs: ttl.ok_or(LldpError::Mandatory("TTL"))?,
        port_description,
        system_name,
    })
}

/// Text TLVs are meant to be UTF-8 (often ASCII) but switches pad them
/// with NULs or spaces now and then.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

/// A chassis or port ID TLV: a subtype byte and 1–255 bytes of ID. The
/// MAC subtype is 4 for chassis IDs and 3 for port IDs; network address
/// is 5 for chassis IDs and 4 for port IDs.
fn parse_id(value: &[u8], chassis: bool) -> Option<LldpId> {
    let (&subtype, id) = value.split_first()?;
    if id.is_empty() {
        return None;
    }
    let (mac, address) = if chassis { (4, 5) } else { (3, 4) };
    let value = if subtype == mac && id.len() == 6 {
        kiln_types::MacAddr(id.try_into().ok()?).to_string()
    } else if subtype == address {
        // IANA address family, then the address.
        match (id[0], &id[1..]) {
            (1, a) if a.len() == 4 => Ipv4Addr::from(<[u8; 4]>::try_from(a).ok()?).to_string(),
            (2, a) if a.len() == 16 => Ipv6Addr::from(<[u8; 16]>::try_from(a).ok()?).to_string(),
            _ => hex::encode(id),
        }
    } else {
        text(id)
    };
    Some(LldpId { subtype, value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tlv(tlv_type: u8, value: &[u8]) -> Vec<u8> {
        let header = (u16::from(tlv_type) << 9) | value.len() as u16;
        let mut out = header.to_be_bytes().to_vec();
        out.extend_from_slice(value);
        out
    }

    fn frame(tlvs: &[Vec<u8>], vlan: bool) -> Vec<u8> {
        let mut f = vec![0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e, 0x2c, 0x6b, 0xf5, 0x11, 0x22, 0x33];
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        }
        f.extend_from_slice(&ETHERTYPE_LLDP.to_be_bytes());
        for t in tlvs {
            f.extend_from_slice(t);
        }
        f
    }

    /// A Juniper-style frame: chassis ID a MAC, port ID an SNMP index (local
    /// subtype 7) with the interface name as description.
    fn juniper() -> Vec<Vec<u8>> {
        vec![
            tlv(1, &[4, 0x2c, 0x6b, 0xf5, 0x11, 0x22, 0x00]),
            tlv(2, b"\x07517"),
            tlv(3, &120u16.to_be_bytes()),
            tlv(4, b"xe-0/0/12"),
            tlv(5, b"asw-a1.dc1\0"),
            tlv(7, &[0, 0x14, 0, 0x14]), // capabilities: ignored
            tlv(127, &[0x00, 0x12, 0x0f, 0x01, 0x03, 0x6c, 0x03, 0x00, 0x10]), // org-specific: ignored
            tlv(0, &[]),
        ]
    }

    #[test]
    fn a_switch_frame() {
        for vlan in [false, true] {
            let n = parse_frame(&frame(&juniper(), vlan)).unwrap();
            assert_eq!(n.chassis_id.value, "2c:6b:f5:11:22:00");
            assert_eq!((n.port_id.subtype, n.port_id.value.as_str()), (7, "517"));
            assert_eq!(n.ttl_secs, 120);
            assert_eq!(n.switch_name(), "asw-a1.dc1");
            assert_eq!(n.port_name(), "xe-0/0/12", "an SNMP index is no port name");
        }
    }

    #[test]
    fn interface_name_ports_and_address_chassis() {
        let n = parse_lldpdu(
            &[
                tlv(1, &[5, 1, 10, 0, 0, 2]),
                tlv(2, b"\x05Ethernet1/1"),
                tlv(3, &[0, 30]),
                tlv(4, b"to server r12-u07"),
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(n.chassis_id.value, "10.0.0.2");
        assert_eq!(n.switch_name(), "10.0.0.2", "no system name: the chassis ID");
        assert_eq!(n.port_name(), "Ethernet1/1");
        // A MAC port ID (subtype 3) with no description.
        let n = parse_lldpdu(&[tlv(1, b"\x07sw1"), tlv(2, &[3, 1, 2, 3, 4, 5, 6]), tlv(3, &[0, 30])].concat()).unwrap();
        assert_eq!(n.port_name(), "01:02:03:04:05:06");
    }

    #[test]
    fn broken_frames_say_what_is_wrong() {
        let mut ip = frame(&juniper(), false);
        ip[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(parse_frame(&ip), Err(LldpError::NotLldp(0x0800)));
        assert_eq!(parse_frame(&[0; 10]), Err(LldpError::ShortFrame(10)));
        // Port ID before chassis ID.
        let t = juniper();
        let swapped = [t[1].clone(), t[0].clone(), t[2].clone()].concat();
        assert_eq!(parse_lldpdu(&swapped), Err(LldpError::Mandatory("chassis ID")));
        // No TTL.
        assert_eq!(parse_lldpdu(&t[..2].concat()), Err(LldpError::Mandatory("TTL")));
        // A length past the end.
        let mut cut = t[..3].concat();
        cut.truncate(cut.len() - 1);
        assert!(matches!(
            parse_lldpdu(&cut),
            Err(LldpError::TlvOverrun { tlv_type: 3, .. })
        ));
        // An empty chassis ID.
        assert_eq!(
            parse_lldpdu(&[tlv(1, &[4]), t[1].clone(), t[2].clone()].concat()),
            Err(LldpError::Malformed("chassis ID"))
        );
    }

    proptest! {
        /// Whatever a switch sends (printable names), the parser gives it back.
        #[test]
        fn round_trip(
            chassis in "[a-zA-Z0-9./:-]{1,64}",
            port in "[a-zA-Z0-9./:-]{1,64}",
            ttl in any::<u16>(),
            description in proptest::option::of("[a-zA-Z0-9 ./-]{0,100}"),
            name in proptest::option::of("[a-zA-Z0-9.-]{1,100}"),
        ) {
            let mut tlvs = vec![
                tlv(1, &[&[7u8][..], chassis.as_bytes()].concat()),
                tlv(2, &[&[5u8][..], port.as_bytes()].concat()),
                tlv(3, &ttl.to_be_bytes()),
            ];
            if let Some(d) = &description { tlvs.push(tlv(4, d.as_bytes())); }
            if let Some(n) = &name { tlvs.push(tlv(5, n.as_bytes())); }
            let n = parse_frame(&frame(&tlvs, false)).unwrap();
            prop_assert_eq!(&n.chassis_id.value, &chassis);
            prop_assert_eq!(n.port_name(), port.as_str());
            prop_assert_eq!(n.ttl_secs, ttl);
            prop_assert_eq!(n.port_description, description.map(|d| d.trim().to_string()));
            prop_assert_eq!(n.system_name, name);
        }

        /// Any bytes at all: an answer or an error, never a panic.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_frame(&bytes);
            let _ = parse_lldpdu(&bytes);
        }
    }
}
