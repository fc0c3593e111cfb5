//! The 40-byte frame header: never panics, and what parses re-encodes to a header that
//! parses the same (the writer's format is the canonical form of every accepted header).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmback::chain::frame::{FRAME_LEN, encode_header, parse_header};

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = data.get(..FRAME_LEN) else { return };
    let bytes: &[u8; FRAME_LEN] = bytes.try_into().expect("sliced to FRAME_LEN");
    if let Ok(h) = parse_header(bytes) {
        assert_eq!(parse_header(&encode_header(h.kind, h.start, h.length)), Ok(h));
    }
});
