//! The partition table reader (MBR, EBR chain, GPT) over arbitrary disk bytes: never
//! panics, and every partition it returns lies inside the disk, is not empty, and
//! overlaps no other.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmback::fs::partition::read_table;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    let mut read = |buf: &mut [u8], off: u64| {
        let from = usize::try_from(off).unwrap_or(usize::MAX).min(data.len());
        let n = buf.len().min(data.len() - from);
        buf[..n].copy_from_slice(&data[from..from + n]);
        Ok(n)
    };
    if let Ok(parts) = read_table(size, &mut read) {
        for (i, p) in parts.iter().enumerate() {
            assert!(p.len > 0 && p.start.checked_add(p.len).is_some_and(|e| e <= size), "{p:?}");
            for q in &parts[..i] {
                assert!(p.start >= q.start + q.len || q.start >= p.start + p.len, "{p:?} overlaps {q:?}");
            }
        }
    }
});
