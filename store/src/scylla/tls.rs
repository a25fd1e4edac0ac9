//! TLS to the database: rustls (ring provider, passed explicitly as the gateway does),
//! the server verified against a CA file, and an optional client certificate for nodes
//! that require one.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use scylla::client::session::TlsContext;

use crate::StoreError;

/// What TLS to the database needs, as PEM.
#[derive(Debug, Clone)]
pub struct ScyllaTls {
    /// The CA(s) that signed the nodes' certificates.
    pub ca: Vec<u8>,
    /// A client certificate chain and its key, for nodes that require one.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

fn invalid(what: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(format!(
        "invalid TLS settings for ScyllaDB: {what}: {reason}"
    ))
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, e))?;
    if certs.is_empty() {
        return Err(invalid(what, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The driver's TLS context. Nodes are verified by the addresses they are reached at, so
/// their certificates name those addresses (an IP address SAN for `10.0.0.5:9042`).
pub fn context(tls: &ScyllaTls) -> Result<TlsContext, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in certificates(&tls.ca, "scylla_tls_ca_file")? {
        roots
            .add(cert)
            .map_err(|e| invalid("scylla_tls_ca_file", e))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("protocol versions", e))?
        .with_root_certificates(roots);
    let config = match &tls.client {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let chain = certificates(chain, "scylla_tls_cert_file")?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| invalid("scylla_tls_key_file", e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid("scylla_tls_cert_file and scylla_tls_key_file", e))?
        }
    };
    Ok(TlsContext::from(Arc::new(config)))
}
