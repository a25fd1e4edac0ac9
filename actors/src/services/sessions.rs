//! Device sessions: a device connecting and disconnecting, and where its twin delivers its events while it is connected.

use std::sync::Arc;

use twin_model::certificate::CertificateId;
use twin_model::{DeviceId, Rejection, RejectionKind};

use super::certificates::{CertificateLogin, Certificates, refusal};
use crate::device::{Credential, DeviceMsg};
use crate::error::FleetError;
use crate::fleet::{ConnectOk, FleetHandle, Reply};
use crate::pipeline::DeviceLink;

/// What a certificate logged in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// The thing of the client id: a device session.
    Thing(ConnectOk),
    /// No thing: a claim certificate, which may only use fleet provisioning with this
    /// template.
    Claim { template: String },
}

/// Device sessions (`fleet.sessions()`).
#[derive(Clone, Copy)]
pub struct DeviceSessions<'a>(pub(crate) &'a FleetHandle);

impl DeviceSessions<'_> {
    /// Authenticates a device by its secret and marks it connected.
    pub fn connect(self, thing: &DeviceId, password: Option<String>) -> Reply<ConnectOk> {
        self.0.request(thing, |reply, permit| DeviceMsg::Connect {
            credential: Credential::Password(password),
            reply,
            permit,
        })
    }

    /// Authenticates a device by the certificate it presented (`der`, whose id is `id`):
    /// registered (or registered now, see [`Certificates::auto_register`]), ACTIVE,
    /// unexpired and attached to `thing`; and marks it connected. The login, kept by the
    /// connection, ends when the certificate stops being ACTIVE or is detached.
    pub async fn connect_with_certificate(
        self,
        thing: &DeviceId,
        id: &CertificateId,
        der: &[u8],
    ) -> Result<(Login, CertificateLogin), FleetError> {
        // Registered before the status is read: a change written after the read ends it.
        let login = self.0.certs.login(id, thing);
        let record = self
            .0
            .twins
            .store()
            .certificate(id)
            .await
            .map_err(FleetError::from)?;
        let record = match record {
            Some(r) => Some(r),
            None => Certificates(self.0).auto_register(der, thing).await?,
        };
        if let Some(why) = refusal(record.as_ref(), self.0.twins.now_millis()) {
            return Err(Rejection::new(RejectionKind::Unauthorized, why).into());
        }
        if let Some(template) = record.and_then(|r| r.provisioning_template) {
            return Ok((Login::Claim { template }, login));
        }
        let ok = self
            .0
            .request(thing, |reply, permit| DeviceMsg::Connect {
                credential: Credential::Certificate(id.clone()),
                reply,
                permit,
            })
            .await?;
        Ok((Login::Thing(ok), login))
    }

    /// Marks the device disconnected, unless a newer session has replaced `session`.
    pub fn disconnected(self, thing: &DeviceId, session: u64, reason: impl Into<String>) {
        let msg = DeviceMsg::Disconnected {
            session,
            reason: reason.into(),
        };
        if let Err(e) = self.0.route(thing, msg) {
            tracing::debug!(%thing, error = %e, "disconnect not recorded");
        }
    }

    /// Routes the events of `thing` to `link` (replacing a previous link).
    pub fn attach(self, thing: &DeviceId, link: Arc<dyn DeviceLink>) {
        self.0.links.attach(thing, link);
    }

    /// Stops routing to `link`, if it is still the thing's link.
    pub fn detach(self, thing: &DeviceId, link: &Arc<dyn DeviceLink>) {
        self.0.links.detach(thing, link);
    }

    /// The connection of `session` subscribed to its thing's command requests.
    pub fn commands_wanted(self, thing: &DeviceId, session: u64) {
        if let Err(e) = self.0.route(thing, DeviceMsg::CommandsWanted { session }) {
            tracing::debug!(%thing, error = %e, "pending commands not delivered");
        }
    }
}
