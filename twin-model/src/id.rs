//! Validated names: thing (device) ids and shadow names.
//!
//! Both follow AWS IoT's rules so that names valid there are valid here: a thing name is
//! 1-128 characters of `[A-Za-z0-9_.:-]`, a named shadow 1-64 of the same set. Every edge
//! (MQTT client id, topic, GraphQL argument, CLI) parses through these types.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} characters long; the limit is {max}")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} contains {ch:?}; allowed are letters, digits and _ . : -")]
    BadChar { kind: &'static str, ch: char },
}

fn validate(kind: &'static str, s: &str, max: usize) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if let Some(ch) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(NameError::BadChar { kind, ch });
    }
    if s.len() > max {
        return Err(NameError::TooLong {
            kind,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

/// A thing name, which is also the device's MQTT client id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(Box<str>);

impl DeviceId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(s: &str) -> Result<Self, NameError> {
        validate("thing name", s, Self::MAX_LEN)?;
        Ok(Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// FNV-1a of the name: stable across builds, platforms and versions, because stores
    /// keep data under it ([`DeviceId::partition`]).
    pub fn stable_hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    /// The placement partition of the thing, below [`PARTITIONS`]. Stores group their
    /// per-thing listings (the fleet index's source, pending deadlines) by partition, so
    /// that a node can load only the partitions it owns.
    pub fn partition(&self) -> u16 {
        (self.stable_hash() % u64::from(PARTITIONS)) as u16
    }
}

/// How many placement partitions the fleet is divided into. Fixed: stored data is keyed
/// by it.
pub const PARTITIONS: u16 = 1024;

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DeviceId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for DeviceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Which shadow of a thing: the classic (unnamed) one or a named one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ShadowName(Option<Box<str>>);

impl ShadowName {
    pub const MAX_LEN: usize = 64;

    /// The classic, unnamed shadow.
    pub const fn classic() -> Self {
        Self(None)
    }

    pub fn named(s: &str) -> Result<Self, NameError> {
        validate("shadow name", s, Self::MAX_LEN)?;
        Ok(Self(Some(s.into())))
    }

    /// The name, or `None` for the classic shadow.
    pub fn name(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// A stable key: the empty string for the classic shadow (never a valid shadow name).
    pub fn key(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }

    /// The inverse of [`ShadowName::key`].
    pub fn from_key(key: &str) -> Result<Self, NameError> {
        if key.is_empty() {
            Ok(Self::classic())
        } else {
            Self::named(key)
        }
    }
}

impl fmt::Display for ShadowName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name().unwrap_or("(classic)"))
    }
}

impl Serialize for ShadowName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.key())
    }
}

impl<'de> Deserialize<'de> for ShadowName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_key(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thing_names_follow_aws_rules() {
        assert!(DeviceId::parse("sensor-1.plant_7:a").is_ok());
        assert_eq!(
            DeviceId::parse(""),
            Err(NameError::Empty { kind: "thing name" })
        );
        assert!(matches!(
            DeviceId::parse("a/b"),
            Err(NameError::BadChar { ch: '/', .. })
        ));
        assert!(matches!(
            DeviceId::parse("+"),
            Err(NameError::BadChar { ch: '+', .. })
        ));
        assert!(DeviceId::parse(&"x".repeat(128)).is_ok());
        assert!(matches!(
            DeviceId::parse(&"x".repeat(129)),
            Err(NameError::TooLong { len: 129, .. })
        ));
        assert!(DeviceId::parse("é").is_err());
    }

    #[test]
    fn shadow_names_round_trip_through_their_key() {
        assert_eq!(ShadowName::from_key("").unwrap(), ShadowName::classic());
        let n = ShadowName::named("config").unwrap();
        assert_eq!(ShadowName::from_key(n.key()).unwrap(), n);
        assert!(ShadowName::named(&"s".repeat(65)).is_err());
        assert!(ShadowName::named("a b").is_err());
    }
}
