//! The partition table reader (MBR, EBR chain, GPT) over arbitrary disk bytes: never
//! panics, and every partition it returns lies inside the disk, is not empty, and
//! overlaps no other.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmback::fs::partition::read_table;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    if let Ok(parts) = read_table(&data) {
        for (i, p) in parts.iter().enumerate() {
            assert!(p.len > 0 && p.start.checked_add(p.len).is_some_and(|e| e <= size), "{p:?}");
            for q in &parts[..i] {
                assert!(p.start >= q.start + q.len || q.start >= p.start + p.len, "{p:?} overlaps {q:?}");
            }
        }
    }
});
