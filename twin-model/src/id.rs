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

    /// The thing's token on the ring of ScyllaDB and Cassandra (their Murmur3Partitioner:
    /// the first half of MurmurHash3 x64 128 of the id's bytes, seed 0).
    pub fn token(&self) -> i64 {
        let h = murmur3_x64_128_h1(self.0.as_bytes()) as i64;
        // The partitioner keeps i64::MIN out of the ring.
        if h == i64::MIN { i64::MAX } else { h }
    }

    /// The placement partition of the thing, below [`PARTITIONS`]: the 1,024th of the
    /// token ring its token falls in. Stores group their per-thing listings (the fleet
    /// index's source, pending deadlines) by partition, so that a node can load only the
    /// partitions it owns; on ScyllaDB a partition is one token range, read as one scan.
    pub fn partition(&self) -> u16 {
        (((self.token() as u64) ^ (1 << 63)) >> (64 - PARTITION_BITS)) as u16
    }
}

/// How many placement partitions the fleet is divided into. Fixed: stored data is keyed
/// by it.
pub const PARTITIONS: u16 = 1 << PARTITION_BITS;
const PARTITION_BITS: u32 = 10;

/// The tokens of a placement partition, both ends included.
pub fn partition_tokens(partition: u16) -> (i64, i64) {
    let width = 1u64 << (64 - PARTITION_BITS);
    let first = (u64::from(partition) * width) ^ (1 << 63);
    (first as i64, (first + (width - 1)) as i64)
}

/// The first 64 bits of MurmurHash3 x64 128 (seed 0), as Cassandra computes it: the bytes
/// of the tail are sign-extended (Java bytes), which matters only above 0x7f.
fn murmur3_x64_128_h1(data: &[u8]) -> u64 {
    const C1: u64 = 0x87c3_7b91_1142_53d5;
    const C2: u64 = 0x4cf5_ad43_2745_937f;
    fn fmix(mut k: u64) -> u64 {
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^ (k >> 33)
    }
    let (mut h1, mut h2) = (0u64, 0u64);
    let blocks = data.chunks_exact(16);
    let tail = blocks.remainder();
    for block in blocks {
        let k1 = u64::from_le_bytes(block[..8].try_into().expect("8 bytes"));
        let k2 = u64::from_le_bytes(block[8..].try_into().expect("8 bytes"));
        h1 ^= k1.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2);
        h1 = h1
            .rotate_left(27)
            .wrapping_add(h2)
            .wrapping_mul(5)
            .wrapping_add(0x52dc_e729);
        h2 ^= k2.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1);
        h2 = h2
            .rotate_left(31)
            .wrapping_add(h1)
            .wrapping_mul(5)
            .wrapping_add(0x3849_5ab5);
    }
    let signed = |b: u8| i64::from(b as i8) as u64;
    let (mut k1, mut k2) = (0u64, 0u64);
    for (i, &b) in tail.iter().enumerate().skip(8) {
        k2 ^= signed(b) << (8 * (i - 8));
    }
    for (i, &b) in tail.iter().enumerate().take(8) {
        k1 ^= signed(b) << (8 * i);
    }
    if tail.len() > 8 {
        h2 ^= k2.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1);
    }
    if !tail.is_empty() {
        h1 ^= k1.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2);
    }
    let len = data.len() as u64;
    h1 ^= len;
    h2 ^= len;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    h1 = fmix(h1);
    h2 = fmix(h2);
    h1.wrapping_add(h2)
}

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
