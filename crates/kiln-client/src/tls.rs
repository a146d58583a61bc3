//! How the client trusts an `https://` kiln server: the system's roots, a
//! CA file, or one certificate pinned by its SHA-256 fingerprint — how a
//! server with the certificate kiln generated is trusted, since no CA
//! vouches for it. A pinned certificate is the server's identity: its
//! names and dates are not checked, but the server must still prove in the
//! handshake that it holds the certificate's key.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Whom an `https://` server must satisfy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Trust {
    /// The system's trusted roots (and the name in the URL).
    #[default]
    System,
    /// Exactly the certificate with this SHA-256 fingerprint (of its DER).
    Fingerprint([u8; 32]),
    /// The CA certificates in this PEM file (and the name in the URL).
    CaFile(PathBuf),
}

/// Parses a fingerprint as kiln prints it (`sha256:` and 64 hex digits) or
/// as `openssl x509 -fingerprint -sha256` does (`AB:CD:…`, with or without
/// its `sha256 Fingerprint=` prefix).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_prefix("sha256 fingerprint=")
        .or_else(|| lower.strip_prefix("sha256:"))
        .unwrap_or(&lower);
    let hex_digits: String = body.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&hex_digits).ok().filter(|b| b.len() == 32).ok_or_else(|| {
        format!(
            "`{t}` is not a SHA-256 fingerprint: write sha256: and 64 hex digits, as the server prints it \
             at start and `kiln server fingerprint` shows it"
        )
    })?;
    let mut out = [0u8; 32];
    out.copy_from_slice(&bytes);
    Ok(out)
}

/// `sha256:HEX`, as the server prints it.
pub(crate) fn show(fp: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(fp))
}

/// A pin, and the certificate it last refused (to name it in the error).
#[derive(Debug)]
pub(crate) struct Pin {
    pub want: [u8; 32],
    refused: Mutex<Option<[u8; 32]>>,
}

impl Pin {
    pub fn refused(&self) -> Option<[u8; 32]> {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls settings for `trust`, and the pin to ask after a refusal.
pub(crate) fn client_config(trust: &Trust) -> Result<(rustls::ClientConfig, Option<Arc<Pin>>), String> {
    let p = provider();
    let builder = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?;
    Ok(match trust {
        Trust::System => {
            let verifier = rustls_platform_verifier::Verifier::new(p)
                .map_err(|e| format!("cannot load the system's trusted certificates: {e}"))?;
            let config = builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            (config, None)
        }
        Trust::CaFile(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read the CA file {} (PEM): {e}", path.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("the CA file {} holds an unusable certificate: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("the CA file {} holds no CERTIFICATE block", path.display()));
            }
            (builder.with_root_certificates(roots).with_no_client_auth(), None)
        }
        Trust::Fingerprint(want) => {
            let pin = Arc::new(Pin {
                want: *want,
                refused: Mutex::new(None),
            });
            let config = builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    pin: pin.clone(),
                    provider: p,
                }))
                .with_no_client_auth();
            (config, Some(pin))
        }
    })
}

/// Accepts exactly the pinned certificate.
#[derive(Debug)]
struct Pinned {
    pin: Arc<Pin>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if seen == self.pin.want {
            return Ok(ServerCertVerified::assertion());
        }
        *self.pin.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen);
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    // The handshake's signature is still checked: a server that copied
    // the certificate without its key fails here.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The certificate problem behind a failed request, if that is what it
/// was (reqwest's own message says only "error sending request").
pub(crate) fn certificate_problem(err: &reqwest::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(rustls::Error::InvalidCertificate(c)) = e.downcast_ref::<rustls::Error>() {
            return Some(format!("{c:?}"));
        }
        // An io::Error's `source()` skips the error it wraps: look inside.
        source = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_as_kiln_and_openssl_print_them() {
        let hex64 = "0123456789abcdef".repeat(4);
        let want = parse_fingerprint(&format!("sha256:{hex64}")).unwrap();
        assert_eq!(show(&want), format!("sha256:{hex64}"));
        let openssl = hex64
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&openssl).unwrap(), want);
        assert_eq!(
            parse_fingerprint(&format!("sha256 Fingerprint={openssl}")).unwrap(),
            want
        );
        assert_eq!(parse_fingerprint(&format!("  SHA256:{hex64}\n")).unwrap(), want);
        for bad in [
            "",
            "sha256:",
            "sha256:abcd",
            &format!("sha1:{hex64}"),
            &format!("sha256:{hex64}00"),
        ] {
            let e = parse_fingerprint(bad).unwrap_err();
            assert!(e.contains("64 hex digits"), "{bad}: {e}");
        }
    }
}
