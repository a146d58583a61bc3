//! The identity check: before deploy mode writes a byte, is this machine
//! the one the job is for?
//!
//! A machine net-booting into the wrong job (a swapped cable, a stale DHCP
//! lease, a recycled IP, a moved disk) must not be wiped. So the job says
//! what the machine is — its DMI serial and UUID, its disks' serials and
//! by-id paths, whether it is protected — and this pure function compares
//! that with the inventory just taken. It answers yes with what matched,
//! or no with **every** mismatch, so one report tells the operator all
//! there is to fix.
//!
//! Rules:
//! - a protected machine is always refused;
//! - every identifier the job gives must match (the serial and UUID
//!   case-insensitively, the UUID also in the byte order some BMCs use);
//! - every disk the job names must be present, each a different disk;
//! - when the job lists MACs (the inventory's, given or learned from the
//!   switch port), one of the machine's NICs must have one of them: a
//!   server swapped behind a port enrolled by port is not the machine;
//! - at least one identifier that matched must be real: vendor
//!   placeholders such as `To Be Filled By O.E.M.` match every board of a
//!   make, so on their own they prove nothing.

use std::fmt;

use kiln_types::MacAddr;
use kiln_types::machine::{Disk, Hardware};
use serde::{Deserialize, Serialize};

/// What the job says the machine is (from the server's record of it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedMachine {
    /// DMI system serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// DMI system UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The disks the machine had when it was discovered.
    #[serde(default)]
    pub disks: Vec<ExpectedDisk>,
    /// The machine must never be reprovisioned.
    #[serde(default)]
    pub protected: bool,
    /// The MACs on record; one must be among the machine's NICs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub macs: Vec<MacAddr>,
}

/// A disk the job expects, by serial and/or `/dev/disk/by-id` path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedDisk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_id: Option<String>,
}

impl fmt::Display for ExpectedDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.serial, &self.by_id) {
            (Some(s), Some(id)) => write!(f, "serial {s} ({id})"),
            (Some(s), None) => write!(f, "serial {s}"),
            (None, Some(id)) => f.write_str(id),
            (None, None) => f.write_str("(no serial or by-id)"),
        }
    }
}

/// One reason the machine is not the job's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Protected,
    Serial {
        expected: String,
        found: Option<String>,
    },
    Uuid {
        expected: String,
        found: Option<String>,
    },
    DiskMissing(ExpectedDisk),
    /// The disk's serial and by-id path name two different disks.
    DiskSplit {
        expected: ExpectedDisk,
        by_serial: String,
        by_id: String,
    },
    /// Two of the job's disks are the same disk here.
    DiskTwice {
        expected: ExpectedDisk,
        name: String,
    },
    DiskUnidentified,
    /// None of the machine's NICs has a MAC on record.
    Nic {
        expected: Vec<MacAddr>,
        found: Vec<MacAddr>,
    },
    /// Nothing real matched: only placeholders, or nothing given at all.
    NoRealIdentifier,
}

fn or_none(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("none")
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Protected => f.write_str("the machine is protected: clear its protected flag to reimage it"),
            Mismatch::Serial { expected, found } => {
                write!(f, "DMI serial is {}, the job expects {expected}", or_none(found))
            }
            Mismatch::Uuid { expected, found } => {
                write!(f, "DMI UUID is {}, the job expects {expected}", or_none(found))
            }
            Mismatch::DiskMissing(d) => write!(f, "disk {d} is not in this machine"),
            Mismatch::DiskSplit {
                expected,
                by_serial,
                by_id,
            } => write!(
                f,
                "disk {expected}: the serial is on {by_serial} but the by-id path is {by_id}"
            ),
            Mismatch::DiskTwice { expected, name } => {
                write!(
                    f,
                    "disk {expected} is {name}, which another of the job's disks already is"
                )
            }
            Mismatch::DiskUnidentified => f.write_str("the job names a disk with neither serial nor by-id path"),
            Mismatch::Nic { expected, found } => {
                let show = |m: &[MacAddr]| m.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                write!(
                    f,
                    "no NIC has a MAC the job expects ({}); this machine's NICs are {}",
                    show(expected),
                    if found.is_empty() { "none".into() } else { show(found) }
                )
            }
            Mismatch::NoRealIdentifier => f.write_str(
                "nothing identifies this machine: the job gives no serial, UUID or disk that is not a vendor \
                 placeholder",
            ),
        }
    }
}

/// The machine is not the job's; every reason is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refusing to write: this machine is not the one the job is for: {}", list(.mismatches))]
pub struct Refusal {
    pub mismatches: Vec<Mismatch>,
}

fn list(mismatches: &[Mismatch]) -> String {
    mismatches
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The machine is the job's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    /// What matched, for the job's log (`serial 7XK2LM3`, `disk sda`, …).
    pub matched: Vec<String>,
    /// The kernel names of the job's disks, in the job's order: what the
    /// layout is planned on.
    pub disks: Vec<String>,
}

/// Serial numbers that boards of a whole make share.
const PLACEHOLDER_SERIALS: [&str; 12] = [
    "to be filled by o.e.m.",
    "default string",
    "not specified",
    "system serial number",
    "chassis serial number",
    "not applicable",
    "n/a",
    "none",
    "0",
    "0123456789",
    "1234567890",
    "123456789",
];

fn norm(s: &str) -> String {
    s.trim().to_ascii_lowercase()
}

pub fn is_placeholder_serial(serial: &str) -> bool {
    let s = norm(serial);
    s.is_empty() || PLACEHOLDER_SERIALS.contains(&s.as_str()) || s.chars().all(|c| c == '0' || c == ' ')
}

fn uuid_hex(uuid: &str) -> Option<[u8; 16]> {
    let hex: String = norm(uuid)
        .chars()
        .filter(|c| *c != '-' && *c != '{' && *c != '}')
        .collect();
    let mut out = [0u8; 16];
    hex::decode_to_slice(&hex, &mut out).ok()?;
    Some(out)
}

/// UUIDs that firmware leaves unset or at a vendor default.
pub fn is_placeholder_uuid(uuid: &str) -> bool {
    match uuid_hex(uuid) {
        None => true,
        Some(b) => {
            b.iter().all(|x| *x == 0)
                || b.iter().all(|x| *x == 0xff)
                // AMI's default, on many boards.
                || hex::encode(b) == "03000200040005000006000700080009"
        }
    }
}

/// SMBIOS 2.6 stores the UUID's first three fields little-endian; older
/// firmware, and some BMCs reading it, use big-endian. The same UUID may
/// so be reported in either order.
fn uuids_match(a: &str, b: &str) -> bool {
    let (Some(a), Some(mut b)) = (uuid_hex(a), uuid_hex(b)) else {
        return norm(a) == norm(b);
    };
    if a == b {
        return true;
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    a == b
}

fn by_id_name(path: &str) -> &str {
    path.trim().rsplit('/').next().unwrap_or_default()
}

fn find_disk<'a>(found: &'a [Disk], want: &ExpectedDisk) -> Result<&'a Disk, Mismatch> {
    let by_serial = want.serial.as_ref().and_then(|s| {
        found
            .iter()
            .find(|d| d.serial.as_deref().is_some_and(|f| norm(f) == norm(s)))
    });
    let by_id = want.by_id.as_ref().and_then(|id| {
        found
            .iter()
            .find(|d| d.by_id.as_deref().is_some_and(|f| by_id_name(f) == by_id_name(id)))
    });
    match (by_serial, by_id) {
        (Some(a), Some(b)) if a.name != b.name => Err(Mismatch::DiskSplit {
            expected: want.clone(),
            by_serial: a.name.clone(),
            by_id: b.name.clone(),
        }),
        (Some(d), _) | (None, Some(d)) => Ok(d),
        (None, None) if want.serial.is_none() && want.by_id.is_none() => Err(Mismatch::DiskUnidentified),
        (None, None) => Err(Mismatch::DiskMissing(want.clone())),
    }
}

/// Is the machine described by `found` the one `expected` describes?
pub fn check_identity(expected: &ExpectedMachine, found: &Hardware) -> Result<Confirmed, Refusal> {
    let mut mismatches = vec![];
    let mut matched = vec![];
    let mut real = false;
    if expected.protected {
        mismatches.push(Mismatch::Protected);
    }
    let dmi = found.dmi.clone().unwrap_or_default();

    if let Some(want) = &expected.serial {
        if dmi.serial.as_deref().is_some_and(|s| norm(s) == norm(want)) {
            matched.push(format!("serial {}", want.trim()));
            real |= !is_placeholder_serial(want);
        } else {
            mismatches.push(Mismatch::Serial {
                expected: want.clone(),
                found: dmi.serial.clone(),
            });
        }
    }
    if let Some(want) = &expected.uuid {
        if dmi.uuid.as_deref().is_some_and(|u| uuids_match(u, want)) {
            matched.push(format!("uuid {}", norm(want)));
            real |= !is_placeholder_uuid(want);
        } else {
            mismatches.push(Mismatch::Uuid {
                expected: want.clone(),
                found: dmi.uuid.clone(),
            });
        }
    }
    let mut disks: Vec<String> = vec![];
    for want in &expected.disks {
        match find_disk(&found.disks, want) {
            Ok(d) if disks.contains(&d.name) => mismatches.push(Mismatch::DiskTwice {
                expected: want.clone(),
                name: d.name.clone(),
            }),
            Ok(d) => {
                matched.push(format!("disk {} ({want})", d.name));
                // A disk's serial or WWN is its maker's, one per disk.
                real |= want.serial.as_deref().is_none_or(|s| !is_placeholder_serial(s));
                disks.push(d.name.clone());
            }
            Err(m) => mismatches.push(m),
        }
    }
    if !expected.macs.is_empty() {
        match found.nics.iter().find(|n| expected.macs.contains(&n.mac)) {
            Some(n) => {
                matched.push(format!("nic {}", n.mac));
                // A burned-in MAC is one NIC's; the inventory recorded it
                // (or learned it from the switch port).
                real = true;
            }
            None => mismatches.push(Mismatch::Nic {
                expected: expected.macs.clone(),
                found: found.nics.iter().map(|n| n.mac).collect(),
            }),
        }
    }
    if !real && mismatches.iter().all(|m| *m == Mismatch::Protected) {
        mismatches.push(Mismatch::NoRealIdentifier);
    }
    if mismatches.is_empty() {
        Ok(Confirmed { matched, disks })
    } else {
        Err(Refusal { mismatches })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_types::machine::Dmi;
    use proptest::prelude::*;

    fn disk(name: &str, serial: &str) -> Disk {
        Disk {
            name: name.into(),
            size_bytes: 1 << 40,
            rotational: false,
            model: Some("SSD".into()),
            serial: Some(serial.into()),
            by_id: Some(format!("/dev/disk/by-id/ata-SSD_{serial}")),
        }
    }

    fn machine() -> Hardware {
        Hardware {
            disks: vec![disk("sda", "S1"), disk("sdb", "S2")],
            dmi: Some(Dmi {
                vendor: Some("Dell Inc.".into()),
                product: Some("PowerEdge R650".into()),
                serial: Some("7XK2LM3".into()),
                uuid: Some("4c4c4544-0058-4b10-8032-b7c04f4c4d33".into()),
            }),
            ..Hardware::default()
        }
    }

    fn expected() -> ExpectedMachine {
        ExpectedMachine {
            serial: Some("7XK2LM3".into()),
            uuid: Some("4C4C4544-0058-4B10-8032-B7C04F4C4D33".into()),
            disks: vec![
                ExpectedDisk {
                    serial: Some("S2".into()),
                    by_id: None,
                },
                ExpectedDisk {
                    serial: None,
                    by_id: Some("ata-SSD_S1".into()),
                },
            ],
            protected: false,
            macs: vec![],
        }
    }

    #[test]
    fn the_right_machine_passes_with_its_disks_in_job_order() {
        let ok = check_identity(&expected(), &machine()).unwrap();
        assert_eq!(ok.disks, ["sdb", "sda"]);
        assert_eq!(ok.matched.len(), 4, "{:?}", ok.matched);
    }

    #[test]
    fn every_mismatch_is_listed() {
        let mut want = expected();
        want.protected = true;
        want.serial = Some("OTHER".into());
        want.uuid = Some("00000000-0000-4000-8000-000000000099".into());
        want.disks.push(ExpectedDisk {
            serial: Some("GONE".into()),
            by_id: None,
        });
        let refusal = check_identity(&want, &machine()).unwrap_err();
        assert_eq!(refusal.mismatches.len(), 4, "{refusal}");
        let text = refusal.to_string();
        for says in [
            "protected",
            "DMI serial is 7XK2LM3, the job expects OTHER",
            "DMI UUID is 4c4c4544",
            "disk serial GONE is not in this machine",
        ] {
            assert!(text.contains(says), "`{text}` does not say `{says}`");
        }
    }

    #[test]
    fn a_mac_on_record_must_be_in_the_machine() {
        // Issue 15: a server swapped behind a port enrolled by port has
        // another MAC than the one kiln learned.
        use kiln_types::machine::HardwareNic;
        let nic = |m: &str| HardwareNic {
            mac: m.parse().unwrap(),
            name: "eno1".into(),
            driver: None,
            speed_mbps: None,
            link: true,
        };
        let mut hw = machine();
        hw.nics = vec![nic("52:54:00:15:00:01"), nic("52:54:00:15:00:02")];
        let mut want = expected();
        want.macs = vec![
            "52:54:00:15:00:02".parse().unwrap(),
            "52:54:00:99:00:09".parse().unwrap(),
        ];
        let ok = check_identity(&want, &hw).unwrap();
        assert!(
            ok.matched.contains(&"nic 52:54:00:15:00:02".to_string()),
            "{:?}",
            ok.matched
        );
        // The MAC alone identifies the machine (its DMI may be placeholders).
        let only_mac = ExpectedMachine {
            macs: want.macs.clone(),
            ..ExpectedMachine::default()
        };
        assert!(check_identity(&only_mac, &hw).is_ok());
        want.macs = vec!["52:54:00:99:00:09".parse().unwrap()];
        let refusal = check_identity(&want, &hw).unwrap_err();
        assert_eq!(refusal.mismatches.len(), 1, "{refusal}");
        let text = refusal.to_string();
        assert!(
            text.contains("no NIC has a MAC the job expects (52:54:00:99:00:09)")
                && text.contains("52:54:00:15:00:01, 52:54:00:15:00:02"),
            "{text}"
        );
    }

    #[test]
    fn protected_alone_refuses() {
        let mut want = expected();
        want.protected = true;
        assert_eq!(
            check_identity(&want, &machine()).unwrap_err().mismatches,
            [Mismatch::Protected]
        );
    }

    #[test]
    fn a_uuid_in_the_other_byte_order_matches() {
        let mut want = expected();
        // First three fields byte-swapped.
        want.uuid = Some("44454c4c-5800-104b-8032-b7c04f4c4d33".into());
        assert!(check_identity(&want, &machine()).is_ok());
    }

    #[test]
    fn placeholders_alone_prove_nothing() {
        let mut hw = machine();
        hw.dmi = Some(Dmi {
            serial: Some("To Be Filled By O.E.M.".into()),
            uuid: Some("03000200-0400-0500-0006-000700080009".into()),
            ..Dmi::default()
        });
        let want = ExpectedMachine {
            serial: Some("To Be Filled By O.E.M.".into()),
            uuid: Some("03000200-0400-0500-0006-000700080009".into()),
            ..ExpectedMachine::default()
        };
        assert_eq!(
            check_identity(&want, &hw).unwrap_err().mismatches,
            [Mismatch::NoRealIdentifier]
        );
        // A job that says nothing at all is refused too.
        assert_eq!(
            check_identity(&ExpectedMachine::default(), &hw).unwrap_err().mismatches,
            [Mismatch::NoRealIdentifier]
        );
        // With a disk serial, the placeholders may match along.
        let mut want = want;
        want.disks = vec![ExpectedDisk {
            serial: Some("S1".into()),
            by_id: None,
        }];
        assert!(check_identity(&want, &hw).is_ok());
    }

    #[test]
    fn disk_rules() {
        let hw = machine();
        let check = |disks: Vec<ExpectedDisk>| {
            let want = ExpectedMachine {
                serial: Some("7XK2LM3".into()),
                disks,
                ..ExpectedMachine::default()
            };
            check_identity(&want, &hw)
        };
        let d = |serial: Option<&str>, by_id: Option<&str>| ExpectedDisk {
            serial: serial.map(Into::into),
            by_id: by_id.map(Into::into),
        };
        // Serial on one disk, by-id on the other.
        let e = check(vec![d(Some("S1"), Some("/dev/disk/by-id/ata-SSD_S2"))]).unwrap_err();
        assert!(
            e.to_string().contains("serial is on sda but the by-id path is sdb"),
            "{e}"
        );
        // The same disk twice.
        let e = check(vec![d(Some("S1"), None), d(None, Some("ata-SSD_S1"))]).unwrap_err();
        assert!(
            matches!(&e.mismatches[..], [Mismatch::DiskTwice { name, .. }] if name == "sda"),
            "{e}"
        );
        assert_eq!(
            check(vec![d(None, None)]).unwrap_err().mismatches,
            [Mismatch::DiskUnidentified]
        );
        // Serials compare trimmed and case-insensitively; extra disks are fine.
        assert_eq!(check(vec![d(Some(" s2 "), None)]).unwrap().disks, ["sdb"]);
    }

    fn arb_hardware() -> impl Strategy<Value = Hardware> {
        (
            proptest::collection::btree_set("[A-Z0-9]{4,8}", 0..6),
            proptest::option::of("[A-Z0-9]{5,8}"),
            proptest::option::of(any::<[u8; 16]>()),
        )
            .prop_map(|(serials, serial, uuid)| Hardware {
                disks: serials
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| disk(&format!("sd{}", (b'a' + i as u8) as char), &s))
                    .collect(),
                dmi: Some(Dmi {
                    serial,
                    uuid: uuid.map(|u| {
                        let h = hex::encode(u);
                        format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
                    }),
                    ..Dmi::default()
                }),
                ..Hardware::default()
            })
    }

    /// What discovery would have recorded for this machine.
    fn recorded(hw: &Hardware) -> ExpectedMachine {
        let dmi = hw.dmi.clone().unwrap_or_default();
        ExpectedMachine {
            serial: dmi.serial,
            uuid: dmi.uuid,
            disks: hw
                .disks
                .iter()
                .map(|d| ExpectedDisk {
                    serial: d.serial.clone(),
                    by_id: d.by_id.clone(),
                })
                .collect(),
            protected: false,
            macs: vec![],
        }
    }

    proptest! {
        /// A machine checked against its own record passes (when the record
        /// identifies anything), with its disks in order; protected, never.
        #[test]
        fn a_machine_is_itself(hw in arb_hardware()) {
            let want = recorded(&hw);
            let identifiable = want.disks.iter().any(|d| d.serial.is_some())
                || want.serial.as_deref().is_some_and(|s| !is_placeholder_serial(s))
                || want.uuid.as_deref().is_some_and(|u| !is_placeholder_uuid(u));
            match check_identity(&want, &hw) {
                Ok(ok) => {
                    prop_assert!(identifiable);
                    let names: Vec<String> = hw.disks.iter().map(|d| d.name.clone()).collect();
                    prop_assert_eq!(ok.disks, names);
                }
                Err(e) => prop_assert!(!identifiable, "{}", e),
            }
            let mut protected = want;
            protected.protected = true;
            prop_assert!(check_identity(&protected, &hw).is_err());
        }

        /// Two different machines never pass for each other when the job
        /// names a real serial or UUID that differs.
        #[test]
        fn another_machine_is_refused(a in arb_hardware(), b in arb_hardware()) {
            let want = recorded(&a);
            let (da, db) = (a.dmi.clone().unwrap_or_default(), b.dmi.clone().unwrap_or_default());
            let serial_differs = da.serial.is_some() && da.serial != db.serial;
            let uuid_differs = da.uuid.is_some() && !uuids_match(da.uuid.as_deref().unwrap_or(""), db.uuid.as_deref().unwrap_or("-"));
            if serial_differs || uuid_differs {
                prop_assert!(check_identity(&want, &b).is_err());
            }
        }
    }
}
