//! MQTT over TLS: the server's certificate, and client certificates.
//!
//! A client certificate is asked for on every TLS connection. With a client CA it must
//! be issued by that CA; without one any well-formed certificate is taken, and its
//! owner's proof of the key is checked by TLS as usual: whether it may log in, and as
//! which thing, is decided by the certificate registry at CONNECT (a certificate is known
//! by its SHA-256, as AWS IoT knows one registered without a CA).
//!
//! rustls with the ring provider passed explicitly, never installed as the process
//! default: two providers in one process make rustls' default builder panic, and ours
//! must not depend on what other crates install.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no PEM certificate found in {0}")]
    NoCertificate(&'static str),
    #[error("{what} is not valid PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA rejected: {0}")]
    ClientCa(String),
}

fn certificates(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(certs)
}

/// A TLS acceptor for the server certificate chain and key (PEM). With `client_ca`, every
/// device must present a certificate issued by it; without, a device may present any
/// certificate, and must when `certificate_required`.
pub fn acceptor(
    cert_chain: &[u8],
    key: &[u8],
    client_ca: Option<&[u8]>,
    certificate_required: bool,
) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(cert_chain, "the server certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem {
        what: "the server key",
        reason: e.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match client_ca {
        None => builder
            .with_client_cert_verifier(Arc::new(AnyCertificate {
                algorithms: provider.signature_verification_algorithms,
                mandatory: certificate_required,
            }))
            .with_single_cert(chain, key)?,
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, "the client CA")? {
                roots.add(cert)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Takes any well-formed client certificate whose owner proves the key: the certificate
/// registry decides at CONNECT whether it may log in.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
    mandatory: bool,
}

impl ClientCertVerifier for AnyCertificate {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        x509_parser::parse_x509_certificate(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The certificate a TLS client presented (its id and DER), if it presented one.
pub fn client_certificate(
    conn: &rustls::ServerConnection,
) -> Option<(twin_model::certificate::CertificateId, Vec<u8>)> {
    conn.peer_certificates()
        .and_then(<[_]>::first)
        .map(|der| (twin_actors::services::fingerprint(der), der.to_vec()))
}
