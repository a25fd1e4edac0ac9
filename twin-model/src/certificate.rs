//! Device certificates as AWS IoT names them: an id that is the SHA-256 fingerprint of
//! the certificate (DER), and a status that decides whether it may log in.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::rejection::Rejection;

/// A certificate's id: the SHA-256 of its DER encoding, 64 lowercase hex digits (as AWS
/// IoT's `certificateId`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CertificateId(String);

impl CertificateId {
    /// Parses an id; upper-case hex is accepted and kept lower-case.
    pub fn parse(text: &str) -> Result<Self, Rejection> {
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Rejection::bad_request(
                "a certificate id is 64 hexadecimal digits (the SHA-256 of the certificate)",
            ));
        }
        Ok(Self(text.to_ascii_lowercase()))
    }

    /// The id of a certificate whose SHA-256 is `digest`.
    pub fn from_digest(digest: &[u8; 32]) -> Self {
        use fmt::Write as _;
        let mut hex = String::with_capacity(64);
        for b in digest {
            let _ = write!(hex, "{b:02x}");
        }
        Self(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CertificateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for CertificateId {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text).map_err(|e| e.message)
    }
}

impl From<CertificateId> for String {
    fn from(id: CertificateId) -> Self {
        id.0
    }
}

/// Whether a certificate may log in. `Revoked` is final, as in AWS IoT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertificateStatus {
    Active,
    Inactive,
    Revoked,
}

impl CertificateStatus {
    /// Whether a device may log in with a certificate of this status.
    pub fn allows_login(self) -> bool {
        self == Self::Active
    }

    /// Whether a certificate may go from this status to `to`: anything but leaving
    /// `Revoked`.
    pub fn change_to(self, to: Self) -> Result<(), Rejection> {
        if self == Self::Revoked && to != Self::Revoked {
            return Err(Rejection::bad_request(
                "the certificate is revoked; a revoked certificate cannot change status again",
            ));
        }
        Ok(())
    }
}

impl fmt::Display for CertificateStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "ACTIVE",
            Self::Inactive => "INACTIVE",
            Self::Revoked => "REVOKED",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_64_hex_digits_kept_lower_case() {
        let upper = "AB".repeat(32);
        assert_eq!(
            CertificateId::parse(&upper).unwrap().as_str(),
            "ab".repeat(32)
        );
        for bad in ["", "ab", &"g".repeat(64), &"a".repeat(65)] {
            assert!(CertificateId::parse(bad).is_err(), "{bad}");
        }
        let id = CertificateId::from_digest(&[0x0f; 32]);
        assert_eq!(id.as_str(), "0f".repeat(32));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<CertificateId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<CertificateId>("\"xyz\"").is_err());
    }

    #[test]
    fn only_active_logs_in_and_revoked_is_final() {
        use CertificateStatus::*;
        assert!(Active.allows_login());
        assert!(!Inactive.allows_login() && !Revoked.allows_login());
        assert!(Inactive.change_to(Active).is_ok());
        assert!(Active.change_to(Revoked).is_ok());
        assert!(Revoked.change_to(Revoked).is_ok());
        assert!(Revoked.change_to(Active).is_err());
        assert!(Revoked.change_to(Inactive).is_err());
        assert_eq!(serde_json::to_string(&Inactive).unwrap(), "\"INACTIVE\"");
    }
}
