//! Whatever a device publishes on `.../shadow/update`, parsing and deciding the update
//! gives an accepted change or an AWS-style rejection: never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use twin_model::{Limits, Shadow};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let _ = twin_model::shadow::parse_client_token(data);
    if let Ok(request) = twin_model::UpdateRequest::parse(data, &limits) {
        let shadow = Shadow::default();
        if let Ok((_, next)) = shadow.update(&request, 1_800_000_000, &limits) {
            let _ = next.delta();
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = twin_model::topic::parse(text);
    }
});
