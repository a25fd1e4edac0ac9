//! Why a request was refused, in one place.
//!
//! Each kind carries the HTTP-style code that AWS IoT Device Shadow uses in its `rejected`
//! payloads; the gateway and the GraphQL layer map kinds to their own codes from here.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RejectionKind {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    VersionConflict,
    PayloadTooLarge,
    UnsupportedEncoding,
    TooManyRequests,
    Internal,
    /// The store cannot be reached: nothing was changed; retry later.
    Unavailable,
}

impl RejectionKind {
    /// The code AWS IoT puts in `rejected` payloads (an HTTP status).
    pub const fn code(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::VersionConflict => 409,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedEncoding => 415,
            Self::TooManyRequests => 429,
            Self::Internal => 500,
            Self::Unavailable => 503,
        }
    }
}

/// A refused request: nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({})", kind.code())]
pub struct Rejection {
    pub kind: RejectionKind,
    pub message: String,
}

impl Rejection {
    pub fn new(kind: RejectionKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The store cannot be reached (503).
    pub fn store_unavailable() -> Self {
        Self::new(RejectionKind::Unavailable, "store unavailable")
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(RejectionKind::BadRequest, message)
    }

    pub fn version_conflict() -> Self {
        Self::new(RejectionKind::VersionConflict, "Version conflict")
    }

    /// AWS's message, and the limit: `max_state_bytes` bytes of state.
    pub fn too_large(max_state_bytes: usize) -> Self {
        Self::new(
            RejectionKind::PayloadTooLarge,
            format!(
                "The payload exceeds the maximum size allowed: {max_state_bytes} bytes of state (setting max_state_bytes)"
            ),
        )
    }

    pub fn no_shadow(name: &str) -> Self {
        Self::new(
            RejectionKind::NotFound,
            format!("No shadow exists with name: '{name}'"),
        )
    }

    pub fn overloaded() -> Self {
        Self::new(
            RejectionKind::TooManyRequests,
            "Too many in-flight requests; retry later",
        )
    }

    pub fn internal() -> Self {
        Self::new(RejectionKind::Internal, "Internal service failure")
    }

    pub fn code(&self) -> u16 {
        self.kind.code()
    }
}
