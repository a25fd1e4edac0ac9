//! The built-in device CA, for fleets that have none: `doppel ca init` makes it in the
//! data directory (`device-ca.pem`, and `device-ca.key` readable by the owner only), and
//! it issues device certificates for `doppel cert issue`, `createKeysAndCertificate` and
//! `createCertificateFromCsr`. An ECDSA P-256 key, as AWS IoT's own device certificates
//! use; a certificate it issues still logs in only once registered and attached.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use twin_model::Rejection;

pub const CERT_FILE: &str = "device-ca.pem";
pub const KEY_FILE: &str = "device-ca.key";

/// How long a certificate the CA issues is valid.
const DEVICE_VALIDITY_DAYS: i64 = 365 * 10;
const CA_VALIDITY_DAYS: i64 = 365 * 20;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the device CA in {0} exists already; it is kept as it is")]
    Exists(String),
    #[error("{path} is not a usable device CA: {reason}")]
    Bad { path: String, reason: String },
    #[error("cannot make a certificate: {0}")]
    Make(#[from] rcgen::Error),
}

/// The device CA of a data directory.
pub struct DeviceCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate the CA issued with a new key pair, both PEM.
pub struct Issued {
    pub certificate_pem: String,
    pub private_key_pem: String,
}

fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(CERT_FILE), dir.join(KEY_FILE))
}

/// A certificate's validity from now, for `days`.
fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(days);
}

impl DeviceCa {
    /// Makes a new CA in `dir`; refuses when one is there.
    pub fn init(dir: &Path, name: &str) -> Result<Self, CaError> {
        let (cert_path, key_path) = paths(dir);
        if cert_path.exists() || key_path.exists() {
            return Err(CaError::Exists(dir.display().to_string()));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| CaError::Io { path, source }
        };
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
        Ok(Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA of `dir`, if `doppel ca init` made one.
    pub fn open(dir: &Path) -> Result<Option<Self>, CaError> {
        let (cert_path, key_path) = paths(dir);
        let read = |path: &Path| match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CaError::Io {
                path: path.display().to_string(),
                source,
            }),
        };
        let (Some(pem), Some(key)) = (read(&cert_path)?, read(&key_path)?) else {
            return Ok(None);
        };
        let bad = |reason: String| CaError::Bad {
            path: dir.display().to_string(),
            reason,
        };
        let key = KeyPair::from_pem(&key).map_err(|e| bad(format!("{KEY_FILE}: {e}")))?;
        let issuer =
            Issuer::from_ca_cert_pem(&pem, key).map_err(|e| bad(format!("{CERT_FILE}: {e}")))?;
        Ok(Some(Self { issuer, pem }))
    }

    /// The CA certificate, PEM: what devices and `tls_client_ca_file` may trust.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A device certificate for `thing` (its common name), with a new key pair.
    pub fn issue(&self, thing: &str) -> Result<Issued, CaError> {
        let key = KeyPair::generate()?;
        let cert = device_params(thing).signed_by(&key, &self.issuer)?;
        Ok(Issued {
            certificate_pem: cert.pem(),
            private_key_pem: key.serialize_pem(),
        })
    }

    /// A device certificate for the key and subject of a certificate signing request
    /// (PEM); the CA sets the validity and the usages.
    pub fn sign_csr(&self, csr_pem: &str) -> Result<String, Rejection> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            Rejection::bad_request(format!("not a PEM certificate signing request: {e}"))
        })?;
        let mut params = device_params("");
        params.distinguished_name = csr.params.distinguished_name.clone();
        let request = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = request
            .signed_by(&self.issuer)
            .map_err(|e| Rejection::bad_request(format!("cannot sign the request: {e}")))?;
        Ok(cert.pem())
    }
}

/// Writes a new file that only its owner may read (mode 0600 on Unix).
#[cfg(unix)]
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Writes a new file that only its owner may read (mode 0600 on Unix).
#[cfg(not(unix))]
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// The device CA of the server's data directory, read when first needed (so that `doppel
/// ca init` takes effect without a restart).
#[derive(Default)]
pub struct CaDir {
    /// `None`: the server has no data directory for one.
    dir: Option<PathBuf>,
    loaded: std::sync::Mutex<Option<Arc<DeviceCa>>>,
}

impl CaDir {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            loaded: std::sync::Mutex::default(),
        }
    }

    /// The CA; `None` until `doppel ca init` made one.
    pub fn get(&self) -> Result<Option<Arc<DeviceCa>>, CaError> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.is_none() {
            *loaded = DeviceCa::open(dir)?.map(Arc::new);
        }
        Ok(loaded.clone())
    }
}

/// A device (TLS client) certificate's parameters, named `thing` when given.
fn device_params(thing: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if !thing.is_empty() {
        dn.push(DnType::CommonName, thing);
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, DEVICE_VALIDITY_DAYS);
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_is_made_once_reopened_and_issues_device_certificates() {
        let dir = tempfile::tempdir().unwrap();
        assert!(DeviceCa::open(dir.path()).unwrap().is_none());
        let ca = DeviceCa::init(dir.path(), "Doppel device CA").unwrap();
        assert!(matches!(
            DeviceCa::init(dir.path(), "again"),
            Err(CaError::Exists(_))
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "the CA key is the owner's only");
        }
        let reopened = DeviceCa::open(dir.path()).unwrap().unwrap();
        assert_eq!(reopened.pem(), ca.pem());

        let issued = reopened.issue("lamp-1").unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(issued.certificate_pem.as_bytes()).unwrap();
        let cert = der.parse_x509().unwrap();
        let (_, ca_der) = x509_parser::pem::parse_x509_pem(ca.pem().as_bytes()).unwrap();
        let ca_cert = ca_der.parse_x509().unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok());
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "lamp-1"
        );

        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "from-csr");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let signed = ca.sign_csr(&csr).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(signed.as_bytes()).unwrap();
        let cert = der.parse_x509().unwrap();
        assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok());
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert!(
            ca.sign_csr("not a csr")
                .unwrap_err()
                .message
                .contains("signing request")
        );
    }
}
