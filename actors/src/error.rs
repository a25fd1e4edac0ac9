//! Errors of the fleet API. Each failure keeps its kind and its cause: a store error is
//! carried as it came (with its source chain), not flattened into text.

use std::sync::Arc;
use std::time::Duration;

use twin_model::job::{JobError, JobErrorCode};
use twin_model::{Rejection, RejectionKind};
use twin_store::StoreError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FleetError {
    /// The request was refused by the twin; nothing changed.
    #[error("{0}")]
    Rejected(Rejection),
    /// Too many requests are in flight; retry later.
    #[error("overloaded: too many requests in flight, retry later")]
    Overloaded,
    /// The store failed: the change was not acknowledged (it may or may not have landed).
    #[error("storage failed: {0}")]
    Store(#[source] Arc<StoreError>),
    /// The twin did not answer within the request timeout.
    #[error("unavailable: no answer within {0:?}")]
    Timeout(Duration),
    /// What was to answer (a twin, a job's rollout) stopped first: it panicked and is
    /// restarted on the next request, or the server is stopping. Retry.
    #[error("unavailable: {0} stopped before answering; retry")]
    Stopped(&'static str),
    /// Stored data contradicts itself (a job execution without its job).
    #[error("internal error: {0}")]
    Inconsistent(String),
}

impl FleetError {
    /// The AWS-style rejection to show a device.
    pub fn to_rejection(&self) -> Rejection {
        match self {
            Self::Rejected(r) => r.clone(),
            Self::Overloaded => Rejection::overloaded(),
            Self::Store(e) if e.is_retryable() => Rejection::store_unavailable(),
            Self::Store(_) | Self::Timeout(_) | Self::Stopped(_) | Self::Inconsistent(_) => {
                Rejection::internal()
            }
        }
    }

    pub fn kind(&self) -> RejectionKind {
        self.to_rejection().kind
    }
}

impl From<Rejection> for FleetError {
    fn from(r: Rejection) -> Self {
        Self::Rejected(r)
    }
}

impl From<StoreError> for FleetError {
    fn from(e: StoreError) -> Self {
        Self::Store(Arc::new(e))
    }
}

impl From<Arc<StoreError>> for FleetError {
    fn from(e: Arc<StoreError>) -> Self {
        Self::Store(e)
    }
}

/// Why a device's request on the Jobs API was not accepted: one error for the Jobs
/// service's device API.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobRequestError {
    /// The Jobs API refused it (the device is told this code and message).
    #[error("{}: {}", .0.code.as_str(), .0.message)]
    Refused(JobError),
    /// The fleet could not answer it.
    #[error(transparent)]
    Fleet(#[from] FleetError),
}

impl JobRequestError {
    /// What the device is told on the request's `rejected` topic.
    pub fn to_job_error(&self) -> JobError {
        match self {
            Self::Refused(e) => e.clone(),
            Self::Fleet(e) => {
                let code = match e {
                    FleetError::Overloaded => JobErrorCode::RequestThrottled,
                    FleetError::Rejected(r) if r.kind == RejectionKind::NotFound => {
                        JobErrorCode::ResourceNotFound
                    }
                    _ => JobErrorCode::InternalError,
                };
                JobError::new(code, e.to_string())
            }
        }
    }

    /// The refusal, or the fleet's failure as an error.
    pub fn into_refusal(self) -> Result<JobError, FleetError> {
        match self {
            Self::Refused(e) => Ok(e),
            Self::Fleet(e) => Err(e),
        }
    }
}
