//! Fleet provisioning templates in the schema (admin): what a device holding a claim
//! certificate becomes when it provisions itself over MQTT (`RegisterThing`).

use async_graphql::{Context, Json, Object, SimpleObject};
use serde_json::{Map, Value};
use twin_model::provisioning;
use twin_model::{Rejection, RejectionKind};

use crate::auth::Role;
use crate::error::ApiError;
use crate::schema::{RoleGuard, api};

/// A provisioning template.
#[derive(SimpleObject)]
pub struct ProvisioningTemplate {
    pub name: String,
    /// The thing's name; `{{Param}}` stands for a device's parameter.
    pub thing_name: String,
    /// The thing's attributes; `{{Param}}` in a string stands for a parameter.
    pub attributes: Json<Map<String, Value>>,
    /// A fleet filter that must hold: `id` is the thing name, `attributes.<Param>` a
    /// parameter.
    pub pre_provisioning_check: Option<String>,
    /// Returned to the device in `RegisterThing`'s answer.
    pub device_configuration: Json<Map<String, Value>>,
    pub enabled: bool,
}

impl From<provisioning::ProvisioningTemplate> for ProvisioningTemplate {
    fn from(t: provisioning::ProvisioningTemplate) -> Self {
        Self {
            name: t.name,
            thing_name: t.thing_name,
            attributes: Json(t.attributes),
            pre_provisioning_check: t.pre_provisioning_check,
            device_configuration: Json(t.device_configuration),
            enabled: t.enabled,
        }
    }
}

#[derive(Default)]
pub struct ProvisioningQuery;

#[Object]
impl ProvisioningQuery {
    /// Every provisioning template (admin).
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn provisioning_templates(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Vec<ProvisioningTemplate>> {
        let all = api(ctx)
            .fleet
            .provisioning()
            .templates()
            .await
            .map_err(ApiError::from)?;
        Ok(all.into_iter().map(Into::into).collect())
    }
}

#[derive(Default)]
pub struct ProvisioningMutation;

#[Object]
impl ProvisioningMutation {
    /// Creates a provisioning template (admin): a device logged in with a claim
    /// certificate of this template (`registerCertificate` or `createKeysAndCertificate`
    /// with `provisioningTemplate`) gets a certificate of its own over MQTT and trades it,
    /// with its parameters, for the thing this template makes. `VERSION_CONFLICT` when
    /// the name is taken.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    #[allow(clippy::too_many_arguments)]
    async fn create_provisioning_template(
        &self,
        ctx: &Context<'_>,
        name: String,
        thing_name: String,
        attributes: Option<Json<Map<String, Value>>>,
        pre_provisioning_check: Option<String>,
        device_configuration: Option<Json<Map<String, Value>>>,
        #[graphql(default = true)] enabled: bool,
    ) -> async_graphql::Result<ProvisioningTemplate> {
        let provisioning = api(ctx).fleet.provisioning();
        let taken = provisioning
            .templates()
            .await
            .map_err(ApiError::from)?
            .iter()
            .any(|t| t.name == name);
        if taken {
            let r = Rejection::new(
                RejectionKind::VersionConflict,
                format!("a provisioning template is named {name} already"),
            );
            return Err(ApiError::from(r).into());
        }
        let template = provisioning::ProvisioningTemplate {
            name,
            thing_name,
            attributes: attributes.map(|a| a.0).unwrap_or_default(),
            pre_provisioning_check,
            device_configuration: device_configuration.map(|d| d.0).unwrap_or_default(),
            enabled,
        };
        provisioning
            .put_template(template.clone())
            .await
            .map_err(ApiError::from)?;
        Ok(template.into())
    }
}
