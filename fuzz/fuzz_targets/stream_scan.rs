//! A whole stream file: scanning arbitrary bytes never panics, the index keeps its
//! invariants (checked by `StreamIndex::broken_invariant`, asserted in debug builds), and
//! reading the image through `ImageReader` never panics either.
//!
//! The scan reads a file (it is the same code the mount runs), so each input is written
//! to one file in a RAM-backed folder and scanned from there.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmback::cache::ReadCache;
use vmback::chain::{ImageReader, Layer, StreamIndex};

/// Bytes read per probe: enough to cross a few lz4 frames of the small inputs fuzzing
/// makes, small enough that a probe of a huge virtual size stays cheap.
const PROBE: usize = 256 << 10;
/// Extents probed per input: the first few, where fuzzed streams put their content.
const PROBED_EXTENTS: usize = 8;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base =
            if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let dir = base.join(format!("vmback-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        dir.join("sda.full.data")
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).expect("scratch file");
    for index in [StreamIndex::open(path, "sda"), StreamIndex::open_stream(path)].into_iter().flatten() {
        assert_eq!(index.broken_invariant(), None);
        let mut probes: Vec<u64> = index.extents.iter().take(PROBED_EXTENTS).map(|e| e.start).collect();
        probes.extend(index.damage.as_ref().map(|d| d.from));
        probes.extend([0, index.meta.virtual_size.saturating_sub(1)]);
        let reader = ImageReader::new(
            vec![Layer { id: 1, index: Arc::new(index) }],
            Arc::new(ReadCache::new(1 << 20)),
        );
        let mut buf = vec![0u8; PROBE];
        for off in probes {
            let _ = reader.read_at(&mut buf, off);
        }
    }
});
