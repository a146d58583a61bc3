//! Certificates as an operator needs to see them: the CA certificates given
//! for a BMC checked before they are stored, and a certificate kiln does
//! not trust named in the error (subject, issuer, SHA-256 fingerprint), so
//! the operator knows which CA to fetch or which certificate to compare.
//!
//! The names are read with a small DER walk over the three fields needed
//! rather than an X.509 crate; parsing for trust is rustls' and webpki's.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::{PemObject, SectionKind};
use sha2::{Digest, Sha256};

/// Checks the CA certificate(s) given for a BMC and returns them: PEM with
/// only CERTIFICATE blocks (a key, request or CRL is refused, by its kind,
/// never quoted), each one a certificate webpki accepts as a trust anchor.
pub fn parse_ca_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certs = vec![];
    for (i, section) in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes()).enumerate() {
        let (kind, der) = section.map_err(|e| format!("the CA certificate is not valid PEM: {e}"))?;
        match kind {
            SectionKind::Certificate => {}
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                return Err("the CA certificate text holds a private key: give only the CA's certificate".into());
            }
            other => {
                return Err(format!(
                    "block {} of the CA certificate text is a {other:?}, not a CERTIFICATE",
                    i + 1
                ));
            }
        }
        let cert = CertificateDer::from(der);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).map_err(|e| {
            format!(
                "certificate {} of the CA certificate text is not a usable X.509 certificate: {e}",
                i + 1
            )
        })?;
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err("the BMC's CA certificate holds no CERTIFICATE block".into());
    }
    Ok(certs)
}

/// `subject CN=…, issued by CN=…, SHA-256 AB:CD:…` for a DER certificate;
/// only the fingerprint when the names cannot be read.
pub fn summary(der: &[u8]) -> String {
    let fingerprint = Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    match names(der) {
        Some((subject, issuer)) => format!("subject {subject}, issued by {issuer}, SHA-256 {fingerprint}"),
        None => format!("SHA-256 {fingerprint}"),
    }
}

/// One DER element: its tag, its contents and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;

/// Subject and issuer of a certificate, as `CN=…, O=…`.
fn names(der: &[u8]) -> Option<(String, String)> {
    let (SEQUENCE, cert, _) = element(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(cert)? else {
        return None;
    };
    let mut rest = tbs;
    // version [0] EXPLICIT, present from v2 on.
    if rest.first() == Some(&0xa0) {
        rest = element(rest)?.2;
    }
    let (_serial, _, rest) = element(rest)?;
    let (_signature, _, rest) = element(rest)?;
    let (SEQUENCE, issuer, rest) = element(rest)? else {
        return None;
    };
    let (_validity, _, rest) = element(rest)?;
    let (SEQUENCE, subject, _) = element(rest)? else {
        return None;
    };
    Some((name(subject)?, name(issuer)?))
}

/// A distinguished name's CN, O and OU attributes, most specific first.
fn name(mut rdns: &[u8]) -> Option<String> {
    const ATTRS: [(&[u8], &str); 3] = [(&[0x55, 4, 3], "CN"), (&[0x55, 4, 11], "OU"), (&[0x55, 4, 10], "O")];
    let mut found: Vec<(usize, String)> = vec![];
    while !rdns.is_empty() {
        let (_set, mut set, rest) = element(rdns)?;
        rdns = rest;
        while !set.is_empty() {
            let (SEQUENCE, atv, more) = element(set)? else {
                return None;
            };
            set = more;
            let (0x06, oid, value) = element(atv)? else { return None };
            let (tag, text, _) = element(value)?;
            if let Some(rank) = ATTRS.iter().position(|(o, _)| *o == oid) {
                found.push((rank, format!("{}={}", ATTRS[rank].1, printable(tag, text))));
            }
        }
    }
    if found.is_empty() {
        return Some("(no CN, O or OU)".into());
    }
    found.sort_by_key(|(rank, _)| *rank);
    Some(found.into_iter().map(|(_, s)| s).collect::<Vec<_>>().join(", "))
}

/// A directory string made safe to print: a BMC chooses these bytes, so
/// control characters (terminal escapes) are shown as `?` and the length
/// is bounded.
fn printable(tag: u8, bytes: &[u8]) -> String {
    let text = match tag {
        // BMPString: UTF-16BE.
        0x1e => char::decode_utf16(bytes.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])))
            .map(|c| c.unwrap_or('?'))
            .collect(),
        _ => String::from_utf8_lossy(bytes).into_owned(),
    };
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == 64 {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { '?' } else { c });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_and_leaf() -> (rcgen::Certificate, rcgen::Certificate, String) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(DnType::CommonName, "Site BMC CA");
        ca.distinguished_name.push(DnType::OrganizationName, "eqiad");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["10.0.0.5".into()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "bmc-db1001\u{1b}[31m");
        let leaf_cert = leaf.signed_by(&key, &issuer).unwrap();
        (ca_cert, leaf_cert, key.serialize_pem())
    }

    #[test]
    fn names_and_fingerprint() {
        let (ca, leaf, _) = ca_and_leaf();
        let s = summary(leaf.der());
        assert!(
            s.starts_with("subject CN=bmc-db1001?[31m, issued by CN=Site BMC CA, O=eqiad, SHA-256 "),
            "{s}"
        );
        let fp = s.rsplit("SHA-256 ").next().unwrap();
        assert_eq!(fp.len(), 32 * 3 - 1, "{fp}");
        assert!(summary(ca.der()).starts_with("subject CN=Site BMC CA, O=eqiad, issued by CN=Site BMC CA"));
        // Not a certificate: the fingerprint still names it.
        assert!(summary(b"\x30\x03\x02\x01\x01").starts_with("SHA-256 "));
        assert!(summary(b"").starts_with("SHA-256 "));
    }

    #[test]
    fn ca_pem_is_checked() {
        let (ca, leaf, key) = ca_and_leaf();
        let two = format!("{}{}", ca.pem(), leaf.pem());
        assert_eq!(parse_ca_pem(&ca.pem()).unwrap().len(), 1);
        assert_eq!(parse_ca_pem(&two).unwrap().len(), 2);
        let with_key = format!("{}{key}", ca.pem());
        let e = parse_ca_pem(&with_key).unwrap_err();
        assert!(e.contains("private key"), "{e}");
        assert!(!e.contains(&key[40..80]), "the key was quoted: {e}");
        let e = parse_ca_pem("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n").unwrap_err();
        assert!(
            e.contains("certificate 1") && e.contains("not a usable X.509 certificate"),
            "{e}"
        );
        let e = parse_ca_pem("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").unwrap_err();
        assert!(e.contains("not valid PEM"), "{e}");
        assert!(parse_ca_pem("hello").unwrap_err().contains("no CERTIFICATE block"));
    }
}
