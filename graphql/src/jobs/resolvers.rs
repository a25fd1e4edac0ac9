//! The OTA job fields of the schema: they translate arguments and answers; every rule
//! lives in [`super`] (creation, targets, counts) and in the fleet (rollouts, status).

use async_graphql::futures_util::stream::Stream;
use async_graphql::{Context, ID, Object, Subscription};

use super::{NewJob, OtaDocument, OtaExecutions, OtaJob, OtaJobEvent, OtaRollout, OtaTargets};
use crate::auth::Role;
use crate::error::ApiError;
use crate::schema::{RoleGuard, api};

#[derive(Default)]
pub struct JobsQuery;

#[Object]
impl JobsQuery {
    /// The Ed25519 public key (hex) that verifies job documents' `signature`.
    #[graphql(guard = "RoleGuard(Role::Viewer)")]
    async fn signing_key(&self, ctx: &Context<'_>) -> async_graphql::Result<String> {
        Ok(api(ctx).signer.public_key())
    }

    /// OTA jobs in id order, with their counts.
    #[graphql(guard = "RoleGuard(Role::Viewer)")]
    async fn ota_jobs(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<Vec<OtaJob>> {
        let api = api(ctx);
        let first = api.page_size(first)?;
        Ok(super::list(&api.fleet, after, first).await?)
    }

    /// An OTA job and its executions per status; null when there is none.
    #[graphql(guard = "RoleGuard(Role::Viewer)")]
    async fn ota_job(
        &self,
        ctx: &Context<'_>,
        job_id: ID,
    ) -> async_graphql::Result<Option<OtaJob>> {
        let api = api(ctx);
        if !twin_model::topic::valid_job_id(&job_id) {
            return Ok(None);
        }
        Ok(super::progress(&api.fleet, &job_id).await?)
    }
}

#[derive(Default)]
pub struct JobsMutation;

#[Object]
impl JobsMutation {
    /// Creates a firmware (OTA) job (operator): every target gets an execution, which
    /// its device sees on the AWS IoT Jobs topics (`notify`, `start-next`, ...): all at
    /// once, or paced by `rollout` (waves or a rate) and stopped by its abort policy.
    #[graphql(guard = "RoleGuard(Role::Operator)")]
    async fn create_ota_job(
        &self,
        ctx: &Context<'_>,
        job_id: ID,
        targets: OtaTargets,
        document: OtaDocument,
        executions: Option<OtaExecutions>,
        rollout: Option<OtaRollout>,
    ) -> async_graphql::Result<OtaJob> {
        let api = api(ctx);
        let new = NewJob {
            job_id: job_id.0,
            targets,
            document,
            executions: executions.unwrap_or_default(),
            rollout: rollout.unwrap_or_default(),
        };
        Ok(super::create(&api.fleet, &api.signer, new, api.fleet.now_millis()).await?)
    }

    /// Pauses a paced job's rollout (operator): no new executions until resumed.
    #[graphql(guard = "RoleGuard(Role::Operator)")]
    async fn pause_ota_job(&self, ctx: &Context<'_>, job_id: ID) -> async_graphql::Result<OtaJob> {
        let api = api(ctx);
        Ok(super::pause(&api.fleet, &job_id, true).await?)
    }

    /// Resumes a paused rollout (operator).
    #[graphql(guard = "RoleGuard(Role::Operator)")]
    async fn resume_ota_job(&self, ctx: &Context<'_>, job_id: ID) -> async_graphql::Result<OtaJob> {
        let api = api(ctx);
        Ok(super::pause(&api.fleet, &job_id, false).await?)
    }

    /// Cancels an OTA job (operator): no execution is queued anymore and every queued one
    /// ends `CANCELED`; with `force`, in-progress ones too (their devices are told on
    /// `notify`).
    #[graphql(guard = "RoleGuard(Role::Operator)")]
    async fn cancel_ota_job(
        &self,
        ctx: &Context<'_>,
        job_id: ID,
        #[graphql(desc = "Default false.")] force: Option<bool>,
    ) -> async_graphql::Result<OtaJob> {
        let api = api(ctx);
        Ok(super::cancel(&api.fleet, &job_id, force.unwrap_or(false)).await?)
    }

    /// Takes things out of an OTA job (operator): those without an execution yet never get
    /// one, and the others' executions end `REMOVED` (their devices are told on `notify`).
    /// An in-progress execution is removed only with `force`; without it, or when a thing
    /// is not a target of the job, nothing is changed (`VERSION_CONFLICT`, `NOT_FOUND`).
    #[graphql(guard = "RoleGuard(Role::Operator)")]
    async fn remove_ota_job_targets(
        &self,
        ctx: &Context<'_>,
        job_id: ID,
        thing_ids: Vec<ID>,
        #[graphql(desc = "Default false.")] force: Option<bool>,
    ) -> async_graphql::Result<OtaJob> {
        let api = api(ctx);
        Ok(super::remove_targets(&api.fleet, &job_id, &thing_ids, force.unwrap_or(false)).await?)
    }
}

#[derive(Default)]
pub struct JobsSubscription;

#[Subscription]
impl JobsSubscription {
    /// An OTA job's counts now, then again after its executions change (a burst of changes
    /// gives one up-to-date job).
    #[graphql(guard = "RoleGuard(Role::Viewer)")]
    async fn ota_job_progress(
        &self,
        ctx: &Context<'_>,
        job_id: ID,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<OtaJobEvent>> + use<>> {
        let api = api(ctx);
        if api
            .fleet
            .jobs()
            .get(&job_id)
            .await
            .map_err(ApiError::from)?
            .is_none()
        {
            return Err(ApiError::not_found(format!("no job {}", job_id.0)).into());
        }
        Ok(super::watch(api.fleet.clone(), job_id.0))
    }
}
