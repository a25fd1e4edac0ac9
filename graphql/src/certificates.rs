//! Device certificates in the schema (admin): register, activate, deactivate or revoke,
//! attach to things and detach, list; and the certificates on a `Thing`.

use std::sync::Arc;

use async_graphql::{Context, Enum, ID, Object, SimpleObject};
use twin_model::DeviceId;
use twin_model::certificate::{self, CertificateId};
use twin_store::{CaRecord, CertificateRecord};

use crate::auth::Role;
use crate::error::{ApiError, ApiResult, Code};
use crate::schema::{DateTime, PageInfo, RoleGuard, api, thing_id};
use crate::things::{Thing, view};
use twin_actors::device_ca::DeviceCa;

/// Whether a certificate may log in. `REVOKED` is final.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateStatus {
    Active,
    Inactive,
    Revoked,
}

impl From<CertificateStatus> for certificate::CertificateStatus {
    fn from(s: CertificateStatus) -> Self {
        match s {
            CertificateStatus::Active => Self::Active,
            CertificateStatus::Inactive => Self::Inactive,
            CertificateStatus::Revoked => Self::Revoked,
        }
    }
}

impl From<certificate::CertificateStatus> for CertificateStatus {
    fn from(s: certificate::CertificateStatus) -> Self {
        match s {
            certificate::CertificateStatus::Active => Self::Active,
            certificate::CertificateStatus::Inactive => Self::Inactive,
            certificate::CertificateStatus::Revoked => Self::Revoked,
        }
    }
}

/// A registered device certificate.
pub struct Certificate(pub(crate) CertificateRecord);

#[Object]
impl Certificate {
    /// The SHA-256 of the certificate (DER), hex: AWS IoT's `certificateId`.
    async fn certificate_id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    /// The certificate, PEM.
    async fn certificate_pem(&self) -> &str {
        &self.0.pem
    }

    async fn status(&self) -> CertificateStatus {
        self.0.status.into()
    }

    async fn created_at(&self) -> DateTime {
        DateTime(self.0.created_at)
    }

    /// When the status last changed.
    async fn updated_at(&self) -> DateTime {
        DateTime(self.0.updated_at)
    }

    /// The end of the certificate's validity: it cannot log in after.
    async fn not_after(&self) -> DateTime {
        DateTime(self.0.not_after)
    }

    /// For a claim certificate: the provisioning template it may use (and nothing else).
    async fn provisioning_template(&self) -> Option<&str> {
        self.0.provisioning_template.as_deref()
    }
}

/// A registered CA: with `autoRegistration`, a certificate it issued whose common name is
/// the client id is registered and attached to that thing on its first connection.
pub struct CaCertificate(pub(crate) CaRecord);

#[Object]
impl CaCertificate {
    /// The SHA-256 of the CA certificate (DER), hex.
    async fn certificate_id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    async fn certificate_pem(&self) -> &str {
        &self.0.pem
    }

    async fn status(&self) -> CertificateStatus {
        self.0.status.into()
    }

    async fn auto_registration(&self) -> bool {
        self.0.auto_registration
    }

    async fn created_at(&self) -> DateTime {
        DateTime(self.0.created_at)
    }

    async fn updated_at(&self) -> DateTime {
        DateTime(self.0.updated_at)
    }
}

#[derive(SimpleObject)]
pub struct CertificateConnection {
    pub edges: Vec<CertificateEdge>,
    pub page_info: PageInfo,
}

#[derive(SimpleObject)]
pub struct CertificateEdge {
    /// Opaque; pass as `after` to continue after this certificate.
    pub cursor: String,
    pub node: Certificate,
}

pub(crate) fn certificate_id(id: &ID) -> ApiResult<CertificateId> {
    CertificateId::parse(id).map_err(ApiError::from)
}

/// The certificates attached to `thing`'s record, in attachment order.
pub(crate) async fn attached(
    ctx: &Context<'_>,
    ids: &[CertificateId],
) -> ApiResult<Vec<Certificate>> {
    let fleet = &api(ctx).fleet;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        // Attached means registered: a certificate is never deleted.
        if let Some(c) = fleet.certificates().get(id).await? {
            out.push(Certificate(c));
        }
    }
    Ok(out)
}

#[derive(Default)]
pub struct CertificatesQuery;

#[Object]
impl CertificatesQuery {
    /// The registered CAs (admin).
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn ca_certificates(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Vec<CaCertificate>> {
        let cas = api(ctx)
            .fleet
            .certificates()
            .cas()
            .await
            .map_err(ApiError::from)?;
        Ok(cas.into_iter().map(CaCertificate).collect())
    }

    /// A certificate by id; null when it is not registered.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn certificate(
        &self,
        ctx: &Context<'_>,
        certificate_id: ID,
    ) -> async_graphql::Result<Option<Certificate>> {
        let id = self::certificate_id(&certificate_id)?;
        let found = api(ctx)
            .fleet
            .certificates()
            .get(&id)
            .await
            .map_err(ApiError::from)?;
        Ok(found.map(Certificate))
    }

    /// Registered certificates, optionally only those attached to `thingId` and those of
    /// one `status`. Without `thingId` the order is the store's (id order on the embedded
    /// store, token order on ScyllaDB); with it, attachment order.
    #[graphql(
        guard = "RoleGuard(Role::Admin)",
        complexity = "(first.max(1) as usize).saturating_mul(child_complexity)"
    )]
    async fn certificates(
        &self,
        ctx: &Context<'_>,
        thing_id: Option<ID>,
        status: Option<CertificateStatus>,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<CertificateConnection> {
        let api = api(ctx);
        let first = api.page_size(first)?;
        let after = after
            .map(|a| CertificateId::parse(&a))
            .transpose()
            .map_err(|_| ApiError::invalid("after is not a cursor of this connection"))?;
        let wanted = |c: &CertificateRecord| status.is_none_or(|s| c.status == s.into());
        let mut found: Vec<CertificateRecord> = Vec::new();
        let mut more = false;
        if let Some(thing) = thing_id {
            let thing = self::thing_id(&thing)?;
            let ids = view(&api.fleet, &thing)?.0.record.certificates.clone();
            let start = after.as_ref().map_or(0, |a| {
                ids.iter().position(|i| i == a).map_or(ids.len(), |p| p + 1)
            });
            for c in attached(ctx, &ids[start..]).await? {
                if wanted(&c.0) {
                    found.push(c.0);
                }
            }
        } else {
            // Pages of the listing until one more than asked matched, or it ended.
            let mut cursor = after;
            loop {
                let page = api
                    .fleet
                    .certificates()
                    .list(cursor.as_ref(), first + 1)
                    .await
                    .map_err(ApiError::from)?;
                let ended = page.len() <= first;
                cursor = page.last().map(|c| c.id.clone());
                found.extend(page.into_iter().filter(|c| wanted(c)));
                if ended || found.len() > first {
                    break;
                }
            }
        }
        if found.len() > first {
            found.truncate(first);
            more = true;
        }
        let edges: Vec<CertificateEdge> = found
            .into_iter()
            .map(|c| CertificateEdge {
                cursor: c.id.to_string(),
                node: Certificate(c),
            })
            .collect();
        Ok(CertificateConnection {
            page_info: PageInfo {
                has_next_page: more,
                end_cursor: edges.last().map(|e| e.cursor.clone()),
            },
            edges,
        })
    }
}

/// A certificate and its private key, which is shown only here, once.
#[derive(SimpleObject)]
pub struct KeysAndCertificate {
    pub certificate: Certificate,
    /// PKCS#8, PEM. Not stored: it cannot be shown again.
    pub private_key_pem: String,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(Code::Internal, e.to_string())
}

/// The built-in device CA, or `FAILED_PRECONDITION` saying how to make one.
async fn device_ca(ctx: &Context<'_>) -> ApiResult<Arc<DeviceCa>> {
    let ca = api(ctx).fleet.certificates().device_ca().await;
    ca.map_err(internal)?.ok_or_else(|| {
        ApiError::new(
            Code::FailedPrecondition,
            "this server has no device CA: run `doppel ca init` on its data directory, or register certificates from your own CA with registerCertificate",
        )
    })
}

/// Registers a certificate just issued and attaches it to `thing`, if given.
async fn register_and_attach(
    ctx: &Context<'_>,
    pem: &str,
    status: CertificateStatus,
    thing: Option<&DeviceId>,
    provisioning_template: Option<String>,
) -> ApiResult<Certificate> {
    let certificates = api(ctx).fleet.certificates();
    let record = certificates
        .register_as(pem, status.into(), provisioning_template)
        .await?;
    if let Some(thing) = thing {
        certificates.attach(thing, &record.id).await?;
    }
    Ok(Certificate(record))
}

#[derive(Default)]
pub struct CertificatesMutation;

#[Object]
impl CertificatesMutation {
    /// Registers a device certificate (PEM, one certificate) with `status` (default
    /// ACTIVE); `VERSION_CONFLICT` when it is registered already. With
    /// `provisioningTemplate`, a claim certificate (see `createProvisioningTemplate`).
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn register_certificate(
        &self,
        ctx: &Context<'_>,
        pem: String,
        #[graphql(default_with = "CertificateStatus::Active")] status: CertificateStatus,
        provisioning_template: Option<String>,
    ) -> async_graphql::Result<Certificate> {
        let record = api(ctx)
            .fleet
            .certificates()
            .register_as(&pem, status.into(), provisioning_template)
            .await
            .map_err(ApiError::from)?;
        Ok(Certificate(record))
    }

    /// Registers a CA certificate (PEM, CA:TRUE); with `autoRegistration`, a certificate
    /// it issued is registered ACTIVE and attached on its first connection, when its common
    /// name is the client id and that thing exists.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn register_ca_certificate(
        &self,
        ctx: &Context<'_>,
        pem: String,
        #[graphql(default = false)] auto_registration: bool,
    ) -> async_graphql::Result<CaCertificate> {
        let record = api(ctx)
            .fleet
            .certificates()
            .register_ca(&pem, auto_registration)
            .await
            .map_err(ApiError::from)?;
        Ok(CaCertificate(record))
    }

    /// Changes a registered CA's status (INACTIVE or REVOKED: its certificates are no
    /// longer registered on their first connection; REVOKED is final) or auto-registration.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn update_ca_certificate(
        &self,
        ctx: &Context<'_>,
        certificate_id: ID,
        status: Option<CertificateStatus>,
        auto_registration: Option<bool>,
    ) -> async_graphql::Result<CaCertificate> {
        let id = self::certificate_id(&certificate_id)?;
        let record = api(ctx)
            .fleet
            .certificates()
            .update_ca(&id, status.map(Into::into), auto_registration)
            .await
            .map_err(ApiError::from)?;
        Ok(CaCertificate(record))
    }

    /// A new key pair and a certificate for it from the built-in device CA (`doppel ca
    /// init`), registered with `status` and attached to `thingId` when given. The private
    /// key is in this answer only: it is not kept. For development; production devices
    /// keep their key and send `createCertificateFromCsr` a signing request. With
    /// `provisioningTemplate`, a claim certificate for a batch of devices.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn create_keys_and_certificate(
        &self,
        ctx: &Context<'_>,
        thing_id: Option<ID>,
        #[graphql(default_with = "CertificateStatus::Active")] status: CertificateStatus,
        provisioning_template: Option<String>,
    ) -> async_graphql::Result<KeysAndCertificate> {
        let thing = thing_id.as_ref().map(self::thing_id).transpose()?;
        let name = thing.as_ref().map_or("device", DeviceId::as_str);
        let issued = device_ca(ctx).await?.issue(name).map_err(internal)?;
        let certificate = register_and_attach(
            ctx,
            &issued.certificate_pem,
            status,
            thing.as_ref(),
            provisioning_template,
        )
        .await?;
        Ok(KeysAndCertificate {
            certificate,
            private_key_pem: issued.private_key_pem,
        })
    }

    /// A certificate from the built-in device CA for the key of a certificate signing
    /// request (PEM), registered with `status` and attached to `thingId` when given.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn create_certificate_from_csr(
        &self,
        ctx: &Context<'_>,
        csr: String,
        thing_id: Option<ID>,
        #[graphql(default_with = "CertificateStatus::Active")] status: CertificateStatus,
    ) -> async_graphql::Result<Certificate> {
        let thing = thing_id.as_ref().map(self::thing_id).transpose()?;
        let pem = device_ca(ctx)
            .await?
            .sign_csr(&csr)
            .map_err(ApiError::from)?;
        Ok(register_and_attach(ctx, &pem, status, thing.as_ref(), None).await?)
    }

    /// Changes a certificate's status: INACTIVE or REVOKED ends the connections that
    /// logged in with it; REVOKED is final.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn update_certificate(
        &self,
        ctx: &Context<'_>,
        certificate_id: ID,
        status: CertificateStatus,
    ) -> async_graphql::Result<Certificate> {
        let id = self::certificate_id(&certificate_id)?;
        let record = api(ctx)
            .fleet
            .certificates()
            .set_status(&id, status.into())
            .await
            .map_err(ApiError::from)?;
        Ok(Certificate(record))
    }

    /// Lets a certificate log in as a thing (at most 10 per thing).
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn attach_certificate(
        &self,
        ctx: &Context<'_>,
        thing_id: ID,
        certificate_id: ID,
    ) -> async_graphql::Result<Thing> {
        let api = api(ctx);
        let (thing, id) = (
            self::thing_id(&thing_id)?,
            self::certificate_id(&certificate_id)?,
        );
        api.fleet
            .certificates()
            .attach(&thing, &id)
            .await
            .map_err(ApiError::from)?;
        Ok(view(&api.fleet, &thing)?)
    }

    /// Stops a certificate logging in as a thing; ends the connection that used it.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn detach_certificate(
        &self,
        ctx: &Context<'_>,
        thing_id: ID,
        certificate_id: ID,
    ) -> async_graphql::Result<Thing> {
        let api = api(ctx);
        let (thing, id) = (
            self::thing_id(&thing_id)?,
            self::certificate_id(&certificate_id)?,
        );
        api.fleet
            .certificates()
            .detach(&thing, &id)
            .await
            .map_err(ApiError::from)?;
        Ok(view(&api.fleet, &thing)?)
    }
}
