//! The one place where failures become GraphQL errors with a stable `extensions.code`.
//!
//! | code                | when                                                        |
//! |---------------------|-------------------------------------------------------------|
//! | `NOT_FOUND`         | no such thing or shadow                                     |
//! | `VERSION_CONFLICT`  | `expectedVersion` is stale; the thing (or certificate) is already registered |
//! | `INVALID_ARGUMENT`  | a bad id, filter, document, cursor, page size or query      |
//! | `PAYLOAD_TOO_LARGE` | a document or request body over its limit                   |
//! | `UNAUTHENTICATED`   | no valid bearer token                                       |
//! | `FORBIDDEN`         | the token's role may not do this                            |
//! | `OVERLOADED`        | too many requests in flight; retry later                    |
//! | `TIMEOUT`           | the request body did not arrive in time (HTTP 408)          |
//! | `FAILED_PRECONDITION` | the server lacks what the call needs (a device CA) |
//! | `INTERNAL`          | storage failure, shutdown, timeout                          |

use std::sync::Arc;

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextRequest};
use async_graphql::futures_util::stream::{BoxStream, StreamExt};
use async_graphql::{ErrorExtensions, Response, ServerError};
use twin_actors::FleetError;
use twin_model::{FilterError, NameError, Rejection, RejectionKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    NotFound,
    VersionConflict,
    InvalidArgument,
    PayloadTooLarge,
    Unauthenticated,
    Forbidden,
    Overloaded,
    Timeout,
    FailedPrecondition,
    Internal,
    /// The store cannot be reached; retry later.
    Unavailable,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "NOT_FOUND",
            Self::VersionConflict => "VERSION_CONFLICT",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
            Self::Overloaded => "OVERLOADED",
            Self::Timeout => "TIMEOUT",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
        }
    }
}

/// A failure of an API call, with its code.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    /// For filter errors: the 1-based column of the problem.
    pub position: Option<usize>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            position: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        let code = match r.kind {
            RejectionKind::BadRequest | RejectionKind::UnsupportedEncoding => Code::InvalidArgument,
            RejectionKind::NotFound => Code::NotFound,
            RejectionKind::VersionConflict => Code::VersionConflict,
            RejectionKind::PayloadTooLarge => Code::PayloadTooLarge,
            RejectionKind::Unauthorized => Code::Unauthenticated,
            RejectionKind::Forbidden => Code::Forbidden,
            RejectionKind::TooManyRequests => Code::Overloaded,
            RejectionKind::Internal => Code::Internal,
            RejectionKind::Unavailable => Code::Unavailable,
        };
        Self::new(code, r.message)
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::Rejected(r) => r.into(),
            FleetError::Overloaded => Self::new(Code::Overloaded, e.to_string()),
            FleetError::Store(ref cause) if cause.is_retryable() => {
                tracing::warn!(error = %e, "GraphQL request failed: the store is unavailable or the twin is another node's");
                Self::new(Code::Unavailable, e.to_string())
            }
            FleetError::Store(_)
            | FleetError::Timeout(_)
            | FleetError::Stopped(_)
            | FleetError::Inconsistent(_) => {
                tracing::warn!(error = %e, "GraphQL request failed");
                Self::new(Code::Internal, e.to_string())
            }
        }
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        Self::invalid(e.to_string())
    }
}

impl From<FilterError> for ApiError {
    fn from(e: FilterError) -> Self {
        Self {
            code: Code::InvalidArgument,
            position: Some(e.position),
            message: e.to_string(),
        }
    }
}

impl From<ApiError> for async_graphql::Error {
    fn from(e: ApiError) -> Self {
        async_graphql::Error::new(e.message).extend_with(|_, ext| {
            ext.set("code", e.code.as_str());
            if let Some(p) = e.position {
                ext.set("position", p as u64);
            }
        })
    }
}

/// A whole-request error (auth, body), as the JSON body of a GraphQL response.
pub fn response(e: ApiError) -> Response {
    let gql: async_graphql::Error = e.into();
    Response::from_errors(vec![gql.into_server_error(Default::default())])
}

/// Gives every error a code: the parser's and validator's own errors (syntax, unknown
/// fields, depth and complexity limits) are the caller's mistakes. The validator's limit
/// errors are reworded to say the limit and the setting that changes it.
#[derive(Debug, Clone, Copy)]
pub struct Coded {
    pub max_depth: usize,
    pub max_complexity: usize,
}

impl ExtensionFactory for Coded {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(*self)
    }
}

impl Coded {
    fn code_errors(&self, mut response: Response) -> Response {
        for e in &mut response.errors {
            self.code_error(e);
        }
        response
    }

    fn code_error(&self, e: &mut ServerError) {
        match e.message.as_str() {
            "Query is nested too deep." => {
                e.message = format!(
                    "the query is nested too deep: at most {} levels (setting graphql_max_depth)",
                    self.max_depth
                );
            }
            "Query is too complex." => {
                e.message = format!(
                    "the query is too complex: at most {} (one per field, times `first` for pages; setting graphql_max_complexity)",
                    self.max_complexity
                );
            }
            _ => {}
        }
        let ext = e.extensions.get_or_insert_with(Default::default);
        if ext.get("code").is_none() {
            ext.set("code", Code::InvalidArgument.as_str());
        }
    }
}

#[async_graphql::async_trait::async_trait]
impl Extension for Coded {
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        self.code_errors(next.run(ctx).await)
    }

    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: async_graphql::extensions::NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        let coded = *self;
        next.run(ctx, stream)
            .map(move |r| coded.code_errors(r))
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_failures_map_to_stable_codes() {
        for (e, code) in [
            (FleetError::Overloaded, "OVERLOADED"),
            (
                twin_store::StoreError::Engine("disk".into()).into(),
                "INTERNAL",
            ),
            (
                FleetError::Timeout(std::time::Duration::from_secs(10)),
                "INTERNAL",
            ),
            (
                twin_store::StoreError::Unavailable("no connection".into()).into(),
                "UNAVAILABLE",
            ),
            (
                FleetError::Rejected(Rejection::version_conflict()),
                "VERSION_CONFLICT",
            ),
            (
                FleetError::Rejected(Rejection::too_large(8192)),
                "PAYLOAD_TOO_LARGE",
            ),
            (FleetError::Rejected(Rejection::no_shadow("x")), "NOT_FOUND"),
            (
                FleetError::Rejected(Rejection::bad_request("no")),
                "INVALID_ARGUMENT",
            ),
        ] {
            let gql: async_graphql::Error = ApiError::from(e).into();
            let ext = gql.extensions.unwrap();
            assert_eq!(ext.get("code"), Some(&async_graphql::Value::from(code)));
        }
    }
}
