//! Fleet provisioning, as AWS IoT's MQTT API does it: a device holding a claim
//! certificate asks for a certificate of its own (`CreateKeysAndCertificate` or
//! `CreateCertificateFromCsr`), gets it with a single-use ownership token, and trades the
//! token and its parameters for a thing (`RegisterThing`) made by a provisioning template.
//! It composes the registry and the certificates, as the rollout controller composes jobs
//! and queries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::time::Instant;
use twin_model::certificate::{CertificateId, CertificateStatus};
use twin_model::provisioning::ProvisioningTemplate;
use twin_model::{DeviceId, Rejection, RejectionKind};
use twin_store::CertificateRecord;

use crate::device::RegistryOp;
use crate::error::FleetError;
use crate::fleet::FleetHandle;

/// How long an ownership token may be traded for a thing (AWS IoT: one hour).
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Ownership tokens outstanding at most; more certificate requests are refused (429).
pub const MAX_TOKENS: usize = 100_000;

/// The ownership tokens handed out and not yet traded.
#[derive(Default)]
pub(crate) struct OwnershipTokens {
    tokens: Mutex<HashMap<String, (CertificateId, Instant)>>,
}

impl OwnershipTokens {
    fn issue(&self, id: &CertificateId) -> Result<String, FleetError> {
        // As random as a device secret: 32 bytes from the OS, hex.
        let token = twin_store::secret::generate()?;
        let now = Instant::now();
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if tokens.len() >= MAX_TOKENS {
            tokens.retain(|_, (_, expires)| *expires > now);
            if tokens.len() >= MAX_TOKENS {
                return Err(Rejection::new(
                    RejectionKind::TooManyRequests,
                    format!("{MAX_TOKENS} ownership tokens are outstanding; retry later"),
                )
                .into());
            }
        }
        tokens.insert(token.clone(), (id.clone(), now + TOKEN_TTL));
        Ok(token)
    }

    /// The certificate of `token`, which is used up; `None` if unknown, used or expired.
    fn redeem(&self, token: &str) -> Option<CertificateId> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let (id, expires) = tokens.remove(token)?;
        (expires > Instant::now()).then_some(id)
    }
}

/// A certificate made for a device, with what it needs to use it.
pub struct NewCertificate {
    pub record: CertificateRecord,
    /// Only when Doppel made the key (`CreateKeysAndCertificate`).
    pub private_key_pem: Option<String>,
    pub ownership_token: String,
}

/// What `RegisterThing` made.
pub struct Registered {
    pub thing: DeviceId,
    pub device_configuration: Map<String, Value>,
}

/// Fleet provisioning (`fleet.provisioning()`).
#[derive(Clone, Copy)]
pub struct Provisioning<'a>(pub(crate) &'a FleetHandle);

impl Provisioning<'_> {
    /// Creates or replaces a template.
    pub async fn put_template(self, template: ProvisioningTemplate) -> Result<(), FleetError> {
        template.validate()?;
        self.0
            .twins
            .store()
            .put_template(&template)
            .await
            .map_err(FleetError::from)
    }

    pub async fn templates(self) -> Result<Vec<ProvisioningTemplate>, FleetError> {
        self.0
            .twins
            .store()
            .templates()
            .await
            .map_err(FleetError::from)
    }

    pub async fn template(self, name: &str) -> Result<ProvisioningTemplate, FleetError> {
        self.templates()
            .await?
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| {
                Rejection::new(
                    RejectionKind::NotFound,
                    format!("no provisioning template is named {name}"),
                )
                .into()
            })
    }

    /// A new key pair and certificate from the built-in device CA, registered INACTIVE
    /// until a `RegisterThing` with its ownership token.
    pub async fn create_keys_and_certificate(self) -> Result<NewCertificate, FleetError> {
        let ca = self.device_ca().await?;
        let issued = ca
            .issue("provisioned device")
            .map_err(|e| FleetError::Inconsistent(e.to_string()))?;
        let mut made = self.registered(&issued.certificate_pem).await?;
        made.private_key_pem = Some(issued.private_key_pem);
        Ok(made)
    }

    /// A certificate from the built-in device CA for a signing request's key, registered
    /// INACTIVE until a `RegisterThing` with its ownership token.
    pub async fn create_certificate_from_csr(
        self,
        csr: &str,
    ) -> Result<NewCertificate, FleetError> {
        let pem = self.device_ca().await?.sign_csr(csr)?;
        self.registered(&pem).await
    }

    async fn device_ca(self) -> Result<Arc<crate::device_ca::DeviceCa>, FleetError> {
        self.0
            .certificates()
            .device_ca()
            .await
            .map_err(|e| FleetError::Inconsistent(e.to_string()))?
            .ok_or_else(|| {
                Rejection::new(
                    RejectionKind::Unavailable,
                    "this server has no device CA (doppel ca init) to issue certificates",
                )
                .into()
            })
    }

    async fn registered(self, pem: &str) -> Result<NewCertificate, FleetError> {
        let record = self
            .0
            .certificates()
            .register(pem, CertificateStatus::Inactive)
            .await?;
        let ownership_token = self.0.certs.tokens.issue(&record.id)?;
        Ok(NewCertificate {
            record,
            private_key_pem: None,
            ownership_token,
        })
    }

    /// Trades an ownership token and a device's parameters for a thing made by
    /// `template`: registered (or its attributes merged, if it exists), the certificate
    /// attached and made ACTIVE.
    pub async fn register_thing(
        self,
        template: &str,
        ownership_token: &str,
        parameters: &Map<String, Value>,
    ) -> Result<Registered, FleetError> {
        let template = self.template(template).await?;
        let provisioned = template.provision(parameters)?;
        let id = self.0.certs.tokens.redeem(ownership_token).ok_or_else(|| {
            Rejection::bad_request("the certificateOwnershipToken is unknown, used or expired")
        })?;
        let thing = provisioned.thing;
        let registry = self.0.registry();
        match registry
            .register(&thing, provisioned.attributes.clone())
            .await
        {
            Ok(_) => {}
            Err(FleetError::Rejected(r)) if r.kind == RejectionKind::VersionConflict => {
                registry
                    .apply(&thing, RegistryOp::MergeAttributes(provisioned.attributes))
                    .await?;
            }
            Err(e) => return Err(e),
        }
        let certificates = self.0.certificates();
        certificates.attach(&thing, &id).await?;
        certificates
            .set_status(&id, CertificateStatus::Active)
            .await?;
        tracing::info!(%thing, certificate = %id, template = %template.name, "provisioned a device");
        Ok(Registered {
            thing,
            device_configuration: template.device_configuration,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_token_is_traded_once_and_not_after_an_hour() {
        let tokens = OwnershipTokens::default();
        let id = CertificateId::from_digest(&[3; 32]);
        let once = tokens.issue(&id).unwrap();
        assert_eq!(once.len(), 64);
        assert_eq!(tokens.redeem(&once), Some(id.clone()));
        assert_eq!(tokens.redeem(&once), None, "single-use");
        let late = tokens.issue(&id).unwrap();
        tokio::time::advance(TOKEN_TTL + Duration::from_secs(1)).await;
        assert_eq!(tokens.redeem(&late), None, "expired");
        assert_eq!(tokens.redeem("made-up"), None);
    }
}
