//! Whatever bytes a client sends, the MQTT codec answers with a packet, a request for
//! more bytes or an error: it never panics, and never reads past what it was given.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use twin_gateway::codec::{self, Version};

const MAX_PACKET: usize = 128 * 1024;

fuzz_target!(|data: &[u8]| {
    // The first packet decides the version, as on a real connection.
    let _ = codec::sniff_version(data, MAX_PACKET);
    for version in [Version::V4, Version::V5] {
        let mut buf = BytesMut::from(data);
        // Every packet in the bytes, until the codec wants more or refuses.
        while let Ok(Some(_)) = codec::read(&mut buf, version, MAX_PACKET) {}
    }
});
