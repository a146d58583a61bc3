//! Values that are parsed once at the edge and valid from then on:
//! MAC addresses, hostnames, FQDNs, tags. Each error says what was wrong and
//! what a right value looks like.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error(
        "invalid MAC address `{0}`: expected six hex octets such as 52:54:00:12:34:56 \
         (also accepted: 52-54-00-12-34-56, 5254.0012.3456, 525400123456)"
    )]
    Mac(String),
    #[error("invalid hostname `{value}`: {why}")]
    Hostname { value: String, why: String },
    #[error("invalid FQDN `{value}`: {why}")]
    Fqdn { value: String, why: String },
    #[error("invalid tag `{value}`: {why}")]
    Tag { value: String, why: String },
}

/// A MAC-48 address, shown as lowercase colon-separated hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ToSchema)]
#[schema(value_type = String, example = "52:54:00:12:34:56")]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ValidationError::Mac(s.to_string());
        let t = s.trim();
        let hex: String = if t.contains(':') || t.contains('-') {
            let parts: Vec<&str> = t.split([':', '-']).collect();
            if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
                return Err(err());
            }
            parts.concat()
        } else if t.contains('.') {
            let parts: Vec<&str> = t.split('.').collect();
            if parts.len() != 3 || parts.iter().any(|p| p.len() != 4) {
                return Err(err());
            }
            parts.concat()
        } else {
            t.to_string()
        };
        if hex.len() != 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let mut out = [0u8; 6];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    /// `52:54:00:0a:05:01`. Written by hand: the DHCP listener formats a
    /// MAC several times per packet, and six `{:02x}` arguments through
    /// `write!` cost about a tenth of its instructions (bench/dhcp).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b':'; 17];
        for (i, byte) in self.0.iter().enumerate() {
            out[i * 3] = HEX[usize::from(byte >> 4)];
            out[i * 3 + 1] = HEX[usize::from(byte & 0xf)];
        }
        f.pad(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Checks one DNS label (RFC 1123): 1–63 of `a-z 0-9 -`, no hyphen at either end.
fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("a label is empty (two dots in a row, or a dot at an end)".into());
    }
    if label.len() > 63 {
        return Err(format!("the label `{label}` is longer than 63 characters"));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!("the character {c:?} is not allowed: use a-z, 0-9 and '-'"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err("a label may not start or end with '-'".into());
    }
    Ok(())
}

/// A short host name: one DNS label, lowercase.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, ToSchema)]
#[schema(value_type = String, example = "db1001")]
pub struct Hostname(String);

impl Hostname {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Hostname {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value = s.trim().to_ascii_lowercase();
        let err = |why: String| ValidationError::Hostname {
            value: s.to_string(),
            why,
        };
        if value.contains('.') {
            return Err(err(
                "a hostname is one label without dots: put the full name in `fqdn`".into()
            ));
        }
        check_label(&value).map_err(err)?;
        Ok(Hostname(value))
    }
}

/// A fully qualified domain name, lowercase, without the trailing dot.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, ToSchema)]
#[schema(value_type = String, example = "db1001.eqiad.example.net")]
pub struct Fqdn(String);

impl Fqdn {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Fqdn {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let err = |why: String| ValidationError::Fqdn {
            value: s.to_string(),
            why,
        };
        if value.len() > 253 {
            return Err(err("longer than 253 characters".into()));
        }
        if !value.contains('.') {
            return Err(err("an FQDN has at least two labels, such as host.example.net".into()));
        }
        for label in value.split('.') {
            check_label(label).map_err(err)?;
        }
        Ok(Fqdn(value))
    }
}

/// A free-form machine tag: 1–64 of `a-z A-Z 0-9 - _ . : /` (no spaces or
/// commas, so tags are safe in selectors and CSV cells).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, ToSchema)]
#[schema(value_type = String, example = "rack-a1")]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| ValidationError::Tag {
            value: s.to_string(),
            why: why.to_string(),
        };
        let value = s.trim();
        if value.is_empty() || value.len() > 64 {
            return Err(err("a tag has 1 to 64 characters"));
        }
        if !value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/=".contains(c)) {
            return Err(err("use letters, digits and - _ . : / ="));
        }
        Ok(Tag(value.to_string()))
    }
}

/// Serde through `FromStr`/`Display` for the validated string types, so a
/// bad value fails deserialization with the type's own message.
macro_rules! serde_via_str {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_via_str!(MacAddr, Hostname, Fqdn, Tag);

macro_rules! display_inner {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    )*};
}
display_inner!(Hostname, Fqdn, Tag);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_prints_as_lowercase_colon_hex_and_parses_back() {
        for bytes in [
            [0u8; 6],
            [0xff; 6],
            [0x52, 0x54, 0x00, 0x0a, 0xb5, 0x01],
            [1, 0x10, 0x9f, 0xf9, 0xa0, 0x0a],
        ] {
            let text = MacAddr(bytes).to_string();
            let expected: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(text, expected.join(":"));
            assert_eq!(text.parse::<MacAddr>().unwrap(), MacAddr(bytes));
        }
        assert_eq!(format!("[{:>19}]", MacAddr([0; 6])), "[  00:00:00:00:00:00]");
    }

    #[test]
    fn mac_formats() {
        let want = "52:54:00:ab:cd:ef";
        for s in [
            "52:54:00:AB:CD:EF",
            "52-54-00-ab-cd-ef",
            "5254.00ab.cdef",
            "525400abcdef",
            " 52:54:00:ab:cd:ef ",
        ] {
            assert_eq!(s.parse::<MacAddr>().unwrap().to_string(), want, "{s}");
        }
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:eg",
            "52:54:00:ab:cd:ef:01",
            "5:54:00:ab:cd:eff",
            "zz",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err().to_string();
            assert!(e.contains("invalid MAC address"), "{bad}: {e}");
        }
    }

    #[test]
    fn hostnames() {
        assert_eq!("DB1001".parse::<Hostname>().unwrap().as_str(), "db1001");
        for (bad, why) in [
            ("", "empty"),
            ("-db", "start or end"),
            ("db_1", "not allowed"),
            ("db1.example", "without dots"),
            (&"a".repeat(64), "longer than 63"),
        ] {
            let e = bad.parse::<Hostname>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn fqdns_and_tags() {
        assert_eq!("Db1.Example.NET.".parse::<Fqdn>().unwrap().as_str(), "db1.example.net");
        assert!("db1".parse::<Fqdn>().is_err());
        assert!("a..b".parse::<Fqdn>().is_err());
        assert!("gpu".parse::<Tag>().is_ok());
        assert!("role=db".parse::<Tag>().is_ok());
        assert!("has space".parse::<Tag>().is_err());
        assert!("a,b".parse::<Tag>().is_err());
    }
}
