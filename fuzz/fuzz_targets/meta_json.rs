//! The metadata JSON of the `meta` frame: never panics, and what parses survives a round
//! trip through the writer's serialization.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmback::chain::StreamMeta;

fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = StreamMeta::parse(data) {
        let again = StreamMeta::parse(meta.to_json().as_bytes()).expect("our own JSON parses");
        assert_eq!(again, meta);
    }
});
