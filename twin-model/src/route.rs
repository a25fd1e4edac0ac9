//! Routes: which of the fleet's events an integrator receives, and the events as every
//! destination gets them.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The kinds of event a route can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventType {
    ShadowChanged,
    ConnectivityChanged,
    Telemetry,
    CommandUpdated,
    JobExecutionUpdated,
    ThingRegistered,
    ThingUpdated,
    ThingDeleted,
}

impl EventType {
    pub const ALL: [Self; 8] = [
        Self::ShadowChanged,
        Self::ConnectivityChanged,
        Self::Telemetry,
        Self::CommandUpdated,
        Self::JobExecutionUpdated,
        Self::ThingRegistered,
        Self::ThingUpdated,
        Self::ThingDeleted,
    ];

    /// The name on the wire (`SHADOW_CHANGED`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ShadowChanged => "SHADOW_CHANGED",
            Self::ConnectivityChanged => "CONNECTIVITY_CHANGED",
            Self::Telemetry => "TELEMETRY",
            Self::CommandUpdated => "COMMAND_UPDATED",
            Self::JobExecutionUpdated => "JOB_EXECUTION_UPDATED",
            Self::ThingRegistered => "THING_REGISTERED",
            Self::ThingUpdated => "THING_UPDATED",
            Self::ThingDeleted => "THING_DELETED",
        }
    }

    /// A bit of its own, for sets of event types.
    pub fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// An event's id as every destination shows it, from its place in the outbox: the same
/// for every delivery of the event, retries and replays included.
pub fn event_id(position: u64) -> String {
    format!("evt_{position:016x}")
}

/// The outbox position an [`event_id`] names.
pub fn event_position(id: &str) -> Option<u64> {
    let hex = id.strip_prefix("evt_")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// An IP network, `address/prefix` (`10.0.0.0/8`, `::1/128`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let address: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP network (address/prefix)"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length is 0 to {max}"))?,
            None => max,
        };
        Ok(Self { address, prefix })
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.address, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4 address written as IPv6 (`::ffff:10.0.0.1`) is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a webhook may be sent to `ip`: public addresses may; loopback, private,
/// link-local (cloud metadata services live there), unique-local, shared (CGNAT),
/// unspecified, broadcast and multicast ones only when `allowed` names them. This is what
/// keeps a route from reaching the platform's own network (server-side request forgery).
pub fn may_send_to(ip: IpAddr, allowed: &[Network]) -> bool {
    let ip = canonical(ip);
    if allowed.iter().any(|n| n.contains(ip)) {
        return true;
    }
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_name_their_position() {
        assert_eq!(event_id(26), "evt_000000000000001a");
        assert_eq!(event_position(&event_id(u64::MAX)), Some(u64::MAX));
        assert_eq!(event_position("evt_1a"), None);
        assert_eq!(event_position("msg_000000000000001a"), None);
    }

    #[test]
    fn each_type_has_its_own_bit_and_wire_name() {
        let mut bits = 0;
        for t in EventType::ALL {
            assert_eq!(bits & t.bit(), 0);
            bits |= t.bit();
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
        }
    }

    #[test]
    fn private_and_metadata_addresses_need_an_allowance() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!may_send_to(ip(refused), &[]), "{refused}");
        }
        for public in ["93.184.216.34", "2606:4700::1111", "100.128.0.1"] {
            assert!(may_send_to(ip(public), &[]), "{public}");
        }
        let loopback: Network = "127.0.0.0/8".parse().unwrap();
        assert!(may_send_to(ip("127.0.0.1"), &[loopback]));
        assert!(!may_send_to(ip("10.0.0.1"), &[loopback]));
        let host: Network = "::1".parse().unwrap();
        assert!(may_send_to(ip("::1"), &[host]));
        assert_eq!(host.to_string(), "::1/128");
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("example.com/8".parse::<Network>().is_err());
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
    }
}
