//! Device certificates: register one, change its status, attach it to a thing or detach
//! it, list them. A certificate that stops being ACTIVE, or is detached, ends the live
//! connections that logged in with it.

use std::sync::Arc;

use dashmap::DashMap;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use twin_model::certificate::{CertificateId, CertificateStatus};
use twin_model::{DeviceId, Rejection};
use twin_store::{CaRecord, CertificateRecord};

use crate::device::RegistryOp;
use crate::device_ca::{CaDir, CaError, DeviceCa};
use crate::error::FleetError;
use crate::fleet::{FleetHandle, Reply};

/// The id of the certificate whose DER encoding is `der`.
pub fn fingerprint(der: &[u8]) -> CertificateId {
    CertificateId::from_digest(&Sha256::digest(der).into())
}

/// What Doppel reads from a certificate it is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCertificate {
    pub id: CertificateId,
    /// The certificate, PEM, as given (one certificate).
    pub pem: String,
    /// The end of its validity, milliseconds since the epoch.
    pub not_after: u64,
}

/// Reads one X.509 certificate in PEM; refuses anything else, saying what was wrong.
pub fn parse_pem(pem: &str) -> Result<ParsedCertificate, Rejection> {
    let (rest, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| Rejection::bad_request(format!("not a PEM certificate: {e}")))?;
    if block.label != "CERTIFICATE" {
        return Err(Rejection::bad_request(format!(
            "the PEM block is a {:?}, not a CERTIFICATE",
            block.label
        )));
    }
    if rest.iter().any(|b| !b.is_ascii_whitespace()) {
        return Err(Rejection::bad_request(
            "more than one PEM block: register one certificate at a time",
        ));
    }
    let cert = block
        .parse_x509()
        .map_err(|e| Rejection::bad_request(format!("not an X.509 certificate: {e}")))?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp())
        .unwrap_or(0)
        .saturating_mul(1000);
    Ok(ParsedCertificate {
        id: fingerprint(&block.contents),
        pem: pem.trim().to_owned() + "\n",
        not_after,
    })
}

/// The fleet's live certificate logins, so that a status change or a detach ends them,
/// and one lock that keeps certificate writes in order (a status read and written by two
/// callers at once must not resurrect a revoked certificate). One node: a cluster needs a
/// conditional write in the store instead.
#[derive(Default)]
pub(crate) struct CertificateState {
    logins: DashMap<CertificateId, Vec<Arc<LoginEntry>>>,
    writing: tokio::sync::Mutex<()>,
    device_ca: CaDir,
    /// Fleet provisioning's ownership tokens.
    pub(crate) tokens: super::provisioning::OwnershipTokens,
}

struct LoginEntry {
    thing: DeviceId,
    /// Why the login must end, once it must.
    end: watch::Sender<Option<&'static str>>,
}

/// A live connection that logged in with a certificate, registered from before its
/// certificate's status is read until it is dropped: a status change or a detach that
/// comes later ends it through [`CertificateLogin::ended`].
pub struct CertificateLogin {
    state: Arc<CertificateState>,
    id: CertificateId,
    entry: Arc<LoginEntry>,
    ended: watch::Receiver<Option<&'static str>>,
}

impl CertificateLogin {
    pub fn certificate(&self) -> &CertificateId {
        &self.id
    }

    /// Resolves, with the reason, once the login must end (at once if it already must).
    pub async fn ended(&mut self) -> &'static str {
        let reason = match self.ended.wait_for(Option::is_some).await {
            Ok(reason) => *reason,
            Err(_) => None,
        };
        match reason {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }
}

impl Drop for CertificateLogin {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.state.logins.entry(self.id.clone()) {
            e.get_mut().retain(|l| !Arc::ptr_eq(l, &self.entry));
            if e.get().is_empty() {
                e.remove();
            }
        }
    }
}

impl CertificateState {
    pub(crate) fn new(device_ca_dir: Option<std::path::PathBuf>) -> Self {
        Self {
            device_ca: CaDir::new(device_ca_dir),
            ..Self::default()
        }
    }

    pub(crate) fn login(
        self: &Arc<Self>,
        id: &CertificateId,
        thing: &DeviceId,
    ) -> CertificateLogin {
        let (end, ended) = watch::channel(None);
        let entry = Arc::new(LoginEntry {
            thing: thing.clone(),
            end,
        });
        self.logins
            .entry(id.clone())
            .or_default()
            .push(entry.clone());
        CertificateLogin {
            state: self.clone(),
            id: id.clone(),
            entry,
            ended,
        }
    }

    /// Ends the logins with `id` (as `thing` only, if given); returns how many.
    fn end(&self, id: &CertificateId, thing: Option<&DeviceId>, reason: &'static str) -> usize {
        let Some(logins) = self.logins.get(id) else {
            return 0;
        };
        let mut ended = 0;
        for login in logins.iter() {
            if thing.is_none_or(|t| *t == login.thing) {
                login.end.send_replace(Some(reason));
                ended += 1;
            }
        }
        ended
    }
}

/// Why a certificate may not log in now (`None`: it may).
pub(crate) fn refusal(record: Option<&CertificateRecord>, now_millis: u64) -> Option<String> {
    match record {
        None => Some("certificate is not registered".into()),
        Some(c) if !c.status.allows_login() => Some(format!("certificate is {}", c.status)),
        Some(c) if c.not_after < now_millis => Some(format!(
            "certificate expired at {}",
            twin_model::rfc3339(c.not_after)
        )),
        Some(_) => None,
    }
}

/// Device certificates (`fleet.certificates()`).
#[derive(Clone, Copy)]
pub struct Certificates<'a>(pub(crate) &'a FleetHandle);

impl Certificates<'_> {
    /// Registers a certificate (PEM) with `status`; refuses one registered before.
    pub async fn register(
        self,
        pem: &str,
        status: CertificateStatus,
    ) -> Result<CertificateRecord, FleetError> {
        self.register_as(pem, status, None).await
    }

    /// Registers a certificate; with `provisioning_template` (which must exist), a claim
    /// certificate: it logs in as no thing and may only use fleet provisioning with that
    /// template.
    pub async fn register_as(
        self,
        pem: &str,
        status: CertificateStatus,
        provisioning_template: Option<String>,
    ) -> Result<CertificateRecord, FleetError> {
        let parsed = parse_pem(pem)?;
        if let Some(template) = &provisioning_template {
            self.0.provisioning().template(template).await?;
        }
        let _writing = self.0.certs.writing.lock().await;
        let store = self.0.twins.store();
        if store
            .certificate(&parsed.id)
            .await
            .map_err(FleetError::from)?
            .is_some()
        {
            return Err(Rejection::new(
                twin_model::RejectionKind::VersionConflict,
                format!("certificate {} is already registered", parsed.id),
            )
            .into());
        }
        let now = self.0.twins.now_millis();
        let record = CertificateRecord {
            id: parsed.id,
            pem: parsed.pem,
            status,
            created_at: now,
            updated_at: now,
            not_after: parsed.not_after,
            provisioning_template,
        };
        store
            .put_certificate(&record)
            .await
            .map_err(FleetError::from)?;
        Ok(record)
    }

    pub async fn get(self, id: &CertificateId) -> Result<Option<CertificateRecord>, FleetError> {
        self.0
            .twins
            .store()
            .certificate(id)
            .await
            .map_err(FleetError::from)
    }

    /// A page of certificates after `after` (see [`twin_store::CertificateStore::certificates`]).
    pub async fn list(
        self,
        after: Option<&CertificateId>,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>, FleetError> {
        self.0
            .twins
            .store()
            .certificates(after, limit)
            .await
            .map_err(FleetError::from)
    }

    /// Changes a certificate's status. Once it is durable, the live connections that
    /// logged in with it end unless it is ACTIVE.
    pub async fn set_status(
        self,
        id: &CertificateId,
        status: CertificateStatus,
    ) -> Result<CertificateRecord, FleetError> {
        let record = {
            let _writing = self.0.certs.writing.lock().await;
            let store = self.0.twins.store();
            let mut record = store
                .certificate(id)
                .await
                .map_err(FleetError::from)?
                .ok_or_else(|| not_found(id))?;
            record.status.change_to(status)?;
            record.status = status;
            record.updated_at = self.0.twins.now_millis();
            store
                .put_certificate(&record)
                .await
                .map_err(FleetError::from)?;
            record
        };
        if !status.allows_login() {
            let reason = match status {
                CertificateStatus::Revoked => "certificate revoked",
                _ => "certificate deactivated",
            };
            let ended = self.0.certs.end(id, None, reason);
            tracing::info!(certificate = %id, %status, connections = ended, "certificate may no longer log in");
        }
        Ok(record)
    }

    /// The built-in device CA, once `doppel ca init` made it (read from its files on the
    /// blocking pool the first time).
    pub async fn device_ca(self) -> Result<Option<Arc<DeviceCa>>, CaError> {
        let state = self.0.certs.clone();
        tokio::task::spawn_blocking(move || state.device_ca.get())
            .await
            .map_err(|e| CaError::Bad {
                path: "the device CA".into(),
                reason: format!("reading it panicked: {e}"),
            })?
    }

    /// Registers a CA certificate (PEM, with the CA flag); with `auto_registration`, a
    /// certificate it issued is registered on its first connection.
    pub async fn register_ca(
        self,
        pem: &str,
        auto_registration: bool,
    ) -> Result<CaRecord, FleetError> {
        let parsed = parse_pem(pem)?;
        let (_, block) = x509_parser::pem::parse_x509_pem(parsed.pem.as_bytes())
            .map_err(|e| Rejection::bad_request(format!("not a PEM certificate: {e}")))?;
        let is_ca = block
            .parse_x509()
            .ok()
            .and_then(|c| c.basic_constraints().ok().flatten().map(|b| b.value.ca))
            .unwrap_or(false);
        if !is_ca {
            return Err(Rejection::bad_request(
                "not a CA certificate: its basic constraints do not say CA:TRUE",
            )
            .into());
        }
        let _writing = self.0.certs.writing.lock().await;
        let store = self.0.twins.store();
        let cas = store.ca_certificates().await.map_err(FleetError::from)?;
        if cas.iter().any(|c| c.id == parsed.id) {
            return Err(Rejection::new(
                twin_model::RejectionKind::VersionConflict,
                format!("CA certificate {} is already registered", parsed.id),
            )
            .into());
        }
        let now = self.0.twins.now_millis();
        let record = CaRecord {
            id: parsed.id,
            pem: parsed.pem,
            status: CertificateStatus::Active,
            auto_registration,
            created_at: now,
            updated_at: now,
        };
        store
            .put_ca_certificate(&record)
            .await
            .map_err(FleetError::from)?;
        Ok(record)
    }

    /// Changes a registered CA's status or auto-registration.
    pub async fn update_ca(
        self,
        id: &CertificateId,
        status: Option<CertificateStatus>,
        auto_registration: Option<bool>,
    ) -> Result<CaRecord, FleetError> {
        let _writing = self.0.certs.writing.lock().await;
        let store = self.0.twins.store();
        let mut record = store
            .ca_certificates()
            .await
            .map_err(FleetError::from)?
            .into_iter()
            .find(|c| c.id == *id)
            .ok_or_else(|| {
                Rejection::new(
                    twin_model::RejectionKind::NotFound,
                    format!("CA certificate {id} is not registered"),
                )
            })?;
        if let Some(status) = status {
            record.status.change_to(status)?;
            record.status = status;
        }
        if let Some(auto) = auto_registration {
            record.auto_registration = auto;
        }
        record.updated_at = self.0.twins.now_millis();
        store
            .put_ca_certificate(&record)
            .await
            .map_err(FleetError::from)?;
        Ok(record)
    }

    /// Every registered CA.
    pub async fn cas(self) -> Result<Vec<CaRecord>, FleetError> {
        self.0
            .twins
            .store()
            .ca_certificates()
            .await
            .map_err(FleetError::from)
    }

    /// Registers `der`, a certificate presented at a connection as `thing` and not
    /// registered, when a registered CA with auto-registration issued it and its common
    /// name is `thing` (as AWS IoT's just-in-time provisioning with the common name as the
    /// thing name): ACTIVE, attached to `thing`. `None` when it does not qualify.
    pub async fn auto_register(
        self,
        der: &[u8],
        thing: &DeviceId,
    ) -> Result<Option<CertificateRecord>, FleetError> {
        let cas = self.cas().await?;
        if issuing_ca(der, &cas).as_deref() != Some(thing.as_str()) {
            return Ok(None);
        }
        let pem = pem::encode_config(
            &pem::Pem::new("CERTIFICATE", der.to_vec()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        let record = match self.register(&pem, CertificateStatus::Active).await {
            Ok(r) => r,
            // Two first connections at once: the other one registered it.
            Err(FleetError::Rejected(r))
                if r.kind == twin_model::RejectionKind::VersionConflict =>
            {
                match self.get(&fingerprint(der)).await? {
                    Some(r) => r,
                    None => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        };
        self.attach(thing, &record.id).await?;
        tracing::info!(%thing, certificate = %record.id, "registered a certificate on its first connection (its CA has auto-registration)");
        Ok(Some(record))
    }

    /// Lets `id` log in as `thing` (refused when `id` is not registered).
    pub fn attach(self, thing: &DeviceId, id: &CertificateId) -> Reply<()> {
        let fleet = self.0.clone();
        let (thing, id) = (thing.clone(), id.clone());
        Box::pin(async move {
            if fleet
                .twins
                .store()
                .certificate(&id)
                .await
                .map_err(FleetError::from)?
                .is_none()
            {
                return Err(not_found(&id).into());
            }
            fleet
                .registry()
                .apply(&thing, RegistryOp::AttachCertificate(id))
                .await
                .map(drop)
        })
    }

    /// Stops `id` logging in as `thing`; ends the live connection that used it.
    pub fn detach(self, thing: &DeviceId, id: &CertificateId) -> Reply<()> {
        let fleet = self.0.clone();
        let (thing, id) = (thing.clone(), id.clone());
        Box::pin(async move {
            fleet
                .registry()
                .apply(&thing, RegistryOp::DetachCertificate(id.clone()))
                .await?;
            fleet.certs.end(&id, Some(&thing), "certificate detached");
            Ok(())
        })
    }
}

/// A registered CA that issued `der` (its signature checked), if its auto-registration is
/// on and it is ACTIVE; and the certificate's common name.
fn issuing_ca(der: &[u8], cas: &[CaRecord]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())?
        .to_owned();
    cas.iter()
        .filter(|ca| ca.auto_registration && ca.status.allows_login())
        .find(|ca| {
            let Ok((_, block)) = x509_parser::pem::parse_x509_pem(ca.pem.as_bytes()) else {
                return false;
            };
            let Ok(ca_cert) = block.parse_x509() else {
                return false;
            };
            ca_cert.subject() == cert.issuer()
                && cert.verify_signature(Some(ca_cert.public_key())).is_ok()
        })
        .map(|_| name)
}

fn not_found(id: &CertificateId) -> Rejection {
    Rejection::new(
        twin_model::RejectionKind::NotFound,
        format!("certificate {id} is not registered"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pem_certificate_is_read_and_anything_else_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["lamp-1".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let parsed = parse_pem(&cert.pem()).unwrap();
        assert_eq!(parsed.id, fingerprint(cert.der()));
        assert!(
            parsed.not_after > 4_000_000_000_000,
            "rcgen's default validity runs to 4096"
        );

        let two = format!("{}{}", cert.pem(), cert.pem());
        assert!(
            parse_pem(&two)
                .unwrap_err()
                .message
                .contains("more than one")
        );
        assert!(
            parse_pem(&key.serialize_pem())
                .unwrap_err()
                .message
                .contains("not a CERTIFICATE")
        );
        assert!(
            parse_pem("hello")
                .unwrap_err()
                .message
                .contains("not a PEM")
        );
        let garbage = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        assert!(
            parse_pem(garbage)
                .unwrap_err()
                .message
                .contains("not an X.509")
        );
    }

    #[test]
    fn only_a_registered_active_unexpired_certificate_may_log_in() {
        let record = CertificateRecord {
            id: CertificateId::from_digest(&[1; 32]),
            pem: String::new(),
            status: CertificateStatus::Active,
            created_at: 0,
            updated_at: 0,
            not_after: 1_000,
            provisioning_template: None,
        };
        assert_eq!(refusal(Some(&record), 999), None);
        assert!(refusal(Some(&record), 1_001).unwrap().contains("expired"));
        assert_eq!(refusal(None, 0).unwrap(), "certificate is not registered");
        let revoked = CertificateRecord {
            status: CertificateStatus::Revoked,
            ..record
        };
        assert_eq!(
            refusal(Some(&revoked), 0).unwrap(),
            "certificate is REVOKED"
        );
    }

    #[tokio::test]
    async fn a_login_ends_when_told_even_before_it_waits_and_leaves_no_trace() {
        let state = Arc::new(CertificateState::default());
        let id = CertificateId::from_digest(&[2; 32]);
        let (a, b) = (DeviceId::parse("a").unwrap(), DeviceId::parse("b").unwrap());
        let mut as_a = state.login(&id, &a);
        let mut as_b = state.login(&id, &b);
        assert_eq!(state.end(&id, Some(&a), "certificate detached"), 1);
        assert_eq!(as_a.ended().await, "certificate detached");
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(20), as_b.ended());
        assert!(waiting.await.is_err(), "b's login goes on");
        assert_eq!(state.end(&id, None, "certificate revoked"), 2);
        assert_eq!(as_b.ended().await, "certificate revoked");
        drop(as_a);
        drop(as_b);
        assert!(state.logins.is_empty());
        assert_eq!(state.end(&id, None, "certificate revoked"), 0);
    }
}
