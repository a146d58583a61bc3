//! The cipher suite policy: which RMCP+ suites kiln will use, in which
//! order, and how a BMC's Get Channel Cipher Suites answer is read.
//!
//! kiln uses suite 17 (RAKP-HMAC-SHA256, HMAC-SHA256-128, AES-CBC-128) and
//! else suite 3 (RAKP-HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128). Nothing else,
//! ever: suite 0 has no authentication at all, 1 no integrity, 2 no
//! confidentiality, and the MD5 / RC4 suites are broken. A BMC that offers
//! neither 17 nor 3 is refused with an error naming what it offered.

use super::codec::Algorithms;
use super::crypto::Hash;

/// A suite kiln is willing to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suite {
    /// RAKP-HMAC-SHA1 / HMAC-SHA1-96 / AES-CBC-128.
    S3,
    /// RAKP-HMAC-SHA256 / HMAC-SHA256-128 / AES-CBC-128.
    S17,
}

impl Suite {
    /// In order of preference.
    pub const PREFERENCE: [Suite; 2] = [Suite::S17, Suite::S3];

    pub fn id(self) -> u8 {
        match self {
            Suite::S3 => 3,
            Suite::S17 => 17,
        }
    }

    pub fn hash(self) -> Hash {
        match self {
            Suite::S3 => Hash::Sha1,
            Suite::S17 => Hash::Sha256,
        }
    }

    /// The algorithm numbers proposed in Open Session.
    pub fn algorithms(self) -> Algorithms {
        match self {
            Suite::S3 => Algorithms {
                auth: 1,
                integrity: 1,
                confidentiality: 1,
            },
            Suite::S17 => Algorithms {
                auth: 3,
                integrity: 4,
                confidentiality: 1,
            },
        }
    }
}

/// One record of a Get Channel Cipher Suites answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedSuite {
    pub id: u8,
    pub auth: Option<u8>,
    pub integrity: Vec<u8>,
    pub confidentiality: Vec<u8>,
}

impl OfferedSuite {
    /// True if this record really is the suite kiln means by `suite`: the
    /// ID alone is not trusted, the algorithms must be listed too.
    fn is(&self, suite: Suite) -> bool {
        let a = suite.algorithms();
        self.id == suite.id()
            && self.auth == Some(a.auth)
            && self.integrity.contains(&a.integrity)
            && self.confidentiality.contains(&a.confidentiality)
    }
}

/// Reads the concatenated record bytes of Get Channel Cipher Suites
/// ("list algorithms by cipher suite"; §22.15): each record starts with
/// 0xC0 and the suite ID (0xC1, ID and a 3-byte IANA for OEM suites), then
/// algorithm bytes tagged in their two top bits (00 authentication,
/// 01 integrity, 10 confidentiality).
pub fn parse_cipher_suite_records(bytes: &[u8]) -> Result<Vec<OfferedSuite>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start = bytes[i];
        let (id, mut j) = match start {
            0xc0 if i + 1 < bytes.len() => (bytes[i + 1], i + 2),
            0xc1 if i + 4 < bytes.len() => (bytes[i + 1], i + 5),
            _ => {
                return Err(format!(
                    "cipher suite list: byte {i} is {start:#04x}, expected the start of a record"
                ));
            }
        };
        let mut s = OfferedSuite {
            id,
            auth: None,
            integrity: Vec::new(),
            confidentiality: Vec::new(),
        };
        while j < bytes.len() && bytes[j] & 0xc0 != 0xc0 {
            let alg = bytes[j] & 0x3f;
            match bytes[j] >> 6 {
                0 => s.auth = Some(alg),
                1 => s.integrity.push(alg),
                _ => s.confidentiality.push(alg),
            }
            j += 1;
        }
        // OEM records are kept for the error message; they never match.
        if start == 0xc1 {
            s.auth = None;
        }
        out.push(s);
        i = j;
    }
    Ok(out)
}

/// Why no suite could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoAcceptableSuite {
    pub offered: Vec<u8>,
}

impl std::fmt::Display for NoAcceptableSuite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = self.offered.iter().map(u8::to_string).collect::<Vec<_>>().join(", ");
        write!(
            f,
            "cipher suite 17 or 3 is required (kiln never uses 0, 1 or 2); the BMC offers [{list}]: enable suite 17 (or 3) on the BMC's LAN channel"
        )
    }
}

/// The suites to try, in order, given what the BMC lists. `None` means the
/// BMC gave no list (Get Channel Cipher Suites unsupported, as in
/// OpenIPMI's ipmi_sim before a session): then kiln proposes 17 and, if the
/// BMC refuses that algorithm, 3 — the BMC's Open Session answer is the
/// authority, and neither proposal is weak.
pub fn candidates(offered: Option<&[OfferedSuite]>) -> Result<Vec<Suite>, NoAcceptableSuite> {
    let Some(offered) = offered else {
        return Ok(Suite::PREFERENCE.to_vec());
    };
    let chosen: Vec<Suite> = Suite::PREFERENCE
        .into_iter()
        .filter(|s| offered.iter().any(|o| o.is(*s)))
        .collect();
    if chosen.is_empty() {
        Err(NoAcceptableSuite {
            offered: offered.iter().map(|o| o.id).collect(),
        })
    } else {
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u8, a: u8, i: u8, c: u8) -> Vec<u8> {
        vec![0xc0, id, a, 0x40 | i, 0x80 | c]
    }

    fn parse(records: &[Vec<u8>]) -> Vec<OfferedSuite> {
        parse_cipher_suite_records(&records.concat()).unwrap()
    }

    #[test]
    fn parses_what_ipmi_sim_sends() {
        // The first three records of ipmi_sim's table, as read in a session.
        let bytes = hex::decode("c000004080c001014080c002014180").unwrap();
        let s = parse_cipher_suite_records(&bytes).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[2],
            OfferedSuite {
                id: 2,
                auth: Some(1),
                integrity: vec![1],
                confidentiality: vec![0]
            }
        );
    }

    #[test]
    fn prefers_17_then_3() {
        let all = parse(&[rec(0, 0, 0, 0), rec(3, 1, 1, 1), rec(17, 3, 4, 1)]);
        assert_eq!(candidates(Some(&all)).unwrap(), vec![Suite::S17, Suite::S3]);
        let only3 = parse(&[rec(0, 0, 0, 0), rec(1, 1, 0, 0), rec(2, 1, 1, 0), rec(3, 1, 1, 1)]);
        assert_eq!(candidates(Some(&only3)).unwrap(), vec![Suite::S3]);
        let only17 = parse(&[rec(17, 3, 4, 1)]);
        assert_eq!(candidates(Some(&only17)).unwrap(), vec![Suite::S17]);
    }

    #[test]
    fn refuses_weak_suites_and_names_them() {
        for offered in [
            vec![rec(0, 0, 0, 0)],
            vec![rec(0, 0, 0, 0), rec(1, 1, 0, 0), rec(2, 1, 1, 0)],
            vec![rec(8, 2, 2, 1)],
        ] {
            let parsed = parse(&offered);
            let err = candidates(Some(&parsed)).unwrap_err();
            let ids: Vec<u8> = parsed.iter().map(|s| s.id).collect();
            assert_eq!(err.offered, ids);
            let msg = err.to_string();
            assert!(
                msg.contains(&format!(
                    "[{}]",
                    ids.iter().map(u8::to_string).collect::<Vec<_>>().join(", ")
                )),
                "{msg}"
            );
        }
        // An empty list is a refusal too.
        assert_eq!(candidates(Some(&[])).unwrap_err().offered, Vec::<u8>::new());
    }

    #[test]
    fn a_suite_id_with_other_algorithms_does_not_count() {
        // ID 3 but no confidentiality: not what kiln means by suite 3.
        let fake = parse(&[rec(3, 1, 1, 0)]);
        assert!(candidates(Some(&fake)).is_err());
        // OEM records never match.
        let oem = parse_cipher_suite_records(&[0xc1, 17, 0x57, 0x01, 0x00, 0x03, 0x44, 0x81]).unwrap();
        assert_eq!(oem[0].id, 17);
        assert!(candidates(Some(&oem)).is_err());
    }

    #[test]
    fn without_a_list_kiln_proposes_17_then_3() {
        assert_eq!(candidates(None).unwrap(), vec![Suite::S17, Suite::S3]);
    }

    #[test]
    fn malformed_lists_are_errors_not_panics() {
        assert!(parse_cipher_suite_records(&[0x01, 0x02]).is_err());
        assert!(parse_cipher_suite_records(&[0xc0]).is_err());
        assert!(parse_cipher_suite_records(&[0xc1, 1, 2]).is_err());
        assert_eq!(parse_cipher_suite_records(&[]).unwrap(), vec![]);
    }
}
