//! Errors of the fleet API.

use twin_model::{Rejection, RejectionKind};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// The request was refused by the twin; nothing changed.
    #[error("{0}")]
    Rejected(Rejection),
    /// Too many requests are in flight; retry later.
    #[error("overloaded: too many requests in flight, retry later")]
    Overloaded,
    /// The twin could not answer: storage failure, restart, shutdown or timeout.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl FleetError {
    /// The AWS-style rejection to show a device.
    pub fn to_rejection(&self) -> Rejection {
        match self {
            Self::Rejected(r) => r.clone(),
            Self::Overloaded => Rejection::overloaded(),
            Self::Unavailable(_) => Rejection::internal(),
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
