//! The compression trailer (JSON list of lz4 frame sizes): never panics, and what parses
//! survives a round trip through the writer's serialization.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmback::chain::meta::{parse_trailer, trailer_json};

/// lz4 frames a trailer may list: far more than fuzz inputs hold, so the bound itself is
/// not what the target exercises.
const MAX_FRAMES: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = parse_trailer(data, MAX_FRAMES) {
        // Written in the object form, every entry reads back as the same sizes.
        let as_written: Vec<(bool, Vec<u64>)> = entries.iter().map(|e| (true, e.clone())).collect();
        // An object's key is the sum of its sizes; when that overflows it cannot be written.
        if entries.iter().all(|e| e.iter().try_fold(0u64, |a, &s| a.checked_add(s)).is_some()) {
            assert_eq!(parse_trailer(trailer_json(&as_written).as_bytes(), MAX_FRAMES).ok(), Some(entries));
        }
    }
});
