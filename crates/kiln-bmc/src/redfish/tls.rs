//! The HTTP clients the Redfish driver uses: rustls on the ring provider
//! (one provider for the whole workspace), certificates verified against
//! the system's roots plus any CA given for the BMC (a refused one named in
//! the error), or — only when the machine's BMC says `insecure` — not
//! verified at all.
//!
//! A client holds a connection pool and, when verifying, the loaded system
//! roots, so one is built per distinct policy and shared by every driver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

use super::cert;

/// How the driver treats the BMC's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TlsPolicy {
    /// Verify against the system's roots and these extra CA certificates
    /// (PEM); the name must match the address's host.
    Verify { extra_ca_pem: Option<String> },
    /// Accept any certificate. Per BMC and explicit; the caller records it
    /// in the audit log.
    Insecure,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(tls: rustls::ClientConfig) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        // A BMC sits on a management network: an HTTP(S)_PROXY meant for the
        // internet must not be used for it.
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

fn make(policy: &TlsPolicy) -> Result<reqwest::Client, String> {
    let p = provider();
    let builder = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .dangerous();
    let config = match policy {
        TlsPolicy::Insecure => builder
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(p)))
            .with_no_client_auth(),
        TlsPolicy::Verify { extra_ca_pem } => {
            let extra: Vec<CertificateDer<'static>> = match extra_ca_pem {
                None => vec![],
                Some(pem) => cert::parse_ca_pem(pem)?,
            };
            let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(extra, p)
                .map_err(|e| format!("cannot load the system's trusted certificates: {e}"))?;
            builder
                .with_custom_certificate_verifier(Arc::new(NamesUntrusted(verifier)))
                .with_no_client_auth()
        }
    };
    build(config)
}

/// The client for a policy, built once per distinct policy and shared:
/// a site usually signs all its BMCs' certificates with one CA, so a fleet
/// of thousands shares one client (one set of loaded roots, one pool).
pub fn client(policy: &TlsPolicy) -> Result<reqwest::Client, String> {
    static CLIENTS: OnceLock<Mutex<HashMap<TlsPolicy, reqwest::Client>>> = OnceLock::new();
    let clients = CLIENTS.get_or_init(Default::default);
    if let Some(c) = clients.lock().unwrap_or_else(|e| e.into_inner()).get(policy) {
        return Ok(c.clone());
    }
    // Built outside the lock: loading the system roots takes a while.
    let c = make(policy)?;
    let mut map = clients.lock().unwrap_or_else(|e| e.into_inner());
    Ok(map.entry(policy.clone()).or_insert(c).clone())
}

/// The platform verifier, with a refused certificate named in the error:
/// "UnknownIssuer" alone does not tell an operator which certificate (and
/// so which CA) is meant.
#[derive(Debug)]
struct NamesUntrusted(rustls_platform_verifier::Verifier);

/// A refused certificate: what it is, and why it was refused.
#[derive(Debug)]
struct Untrusted {
    certificate: String,
    cause: CertificateError,
}

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "certificate {}: {}", self.certificate, self.cause)
    }
}

impl std::error::Error for Untrusted {}

impl ServerCertVerifier for NamesUntrusted {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(cause) => {
                    // Still an InvalidCertificate, so `describe` sees a
                    // certificate problem.
                    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Untrusted {
                        certificate: cert::summary(end_entity),
                        cause,
                    }))))
                }
                other => other,
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Accepts any certificate; still checks that the server signed the
/// handshake with the key of the certificate it sent (which is all that
/// can be checked without trusting the certificate).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The message of an error and all its sources, looking inside `io::Error`s
/// (whose `source()` skips the error they wrap), and whether a TLS
/// certificate problem is among them.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> (String, bool) {
    let mut parts: Vec<String> = vec![];
    let mut cert = false;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let mut text = e.to_string();
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            cert |= matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            );
            // rustls shows an `Other` cause with `Debug`: use the named
            // certificate's own text instead.
            if let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = r {
                text = format!("invalid peer certificate: {inner}");
            }
        }
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        cur = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    (parts.join(": "), cert)
}
