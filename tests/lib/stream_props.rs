//! Property tests of the stream scan on hostile bytes (issue 7; the cargo-fuzz targets in
//! fuzz/ explore the same ground for longer, these run on every CI run on stable).
//!
//! Inputs are arbitrary byte strings (with and without a plausible `meta` header) and
//! valid streams from our own writer, plain and lz4, that are then damaged: bytes flipped,
//! the file cut short, a piece of it copied elsewhere. Whatever the bytes, opening never
//! panics, every extent the scan yields lies inside the virtual size and its payload inside
//! the file, and reading the image through `ImageReader` never panics.

use std::sync::Arc;

use proptest::prelude::*;
use vmback::cache::ReadCache;
use vmback::chain::scan::Stored;
use vmback::chain::{ImageReader, Layer, StreamIndex, StreamMeta, StreamWriter};

/// Largest virtual size of a generated stream: a few KiB keeps each case fast while
/// leaving room for many small extents.
const MAX_VSIZE: u64 = 16 << 10;

/// Bytes read per probe of the image: several lz4 frames of the generated streams.
const PROBE: usize = 8 << 10;

/// A valid stream: extents `(gap before, length, is data)`, compressed or not, with lz4
/// frames of at most `max_request` bytes.
fn valid_stream(extents: &[(u64, u64, bool)], compressed: bool, max_request: u64, inc: bool) -> Vec<u8> {
    let mut layout = Vec::new();
    let mut pos = 0u64;
    for &(gap, len, data) in extents {
        let start = pos + gap;
        if start + len > MAX_VSIZE {
            break;
        }
        layout.push((start, len, data || inc));
        pos = start + len;
    }
    let meta = StreamMeta::full("sda", MAX_VSIZE, layout.iter().filter(|e| e.2).map(|e| e.1).sum())
        .point("virtnbdbackup.1", if inc { "virtnbdbackup.0" } else { "" }, inc)
        .lz4(compressed)
        .dated("2026-06-30T08:21:01.123456");
    let mut w = StreamWriter::new(Vec::new(), &meta, max_request).expect("in memory");
    for (start, len, data) in layout {
        if data {
            let bytes: Vec<u8> = (start..start + len).map(|i| (i % 251) as u8).collect();
            w.data(start, &bytes).expect("in memory");
        } else {
            w.zero(start, len).expect("in memory");
        }
    }
    w.finish().expect("in memory")
}

/// One way of damaging a file.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR the byte at this fraction of the file with a non-zero value.
    Flip(f64, u8),
    /// Cut the file at this fraction of its length.
    Truncate(f64),
    /// Copy `len` bytes from one fraction of the file over another.
    Splice(f64, f64, usize),
    /// Insert these bytes at a fraction of the file.
    Insert(f64, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (0.0..1.0, 1u8..=255).prop_map(|(at, x)| Mutation::Flip(at, x)),
        1 => (0.0..1.0).prop_map(Mutation::Truncate),
        1 => (0.0..1.0, 0.0..1.0, 1usize..200).prop_map(|(f, t, n)| Mutation::Splice(f, t, n)),
        1 => (0.0..1.0, prop::collection::vec(any::<u8>(), 1..50)).prop_map(|(at, b)| Mutation::Insert(at, b)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    let at = |f: f64, len: usize| ((f * len as f64) as usize).min(len.saturating_sub(1));
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        match m {
            Mutation::Flip(f, x) => {
                let i = at(*f, bytes.len());
                bytes[i] ^= x;
            }
            Mutation::Truncate(f) => bytes.truncate(at(*f, bytes.len())),
            Mutation::Splice(from, to, n) => {
                let (from, to) = (at(*from, bytes.len()), at(*to, bytes.len()));
                let piece: Vec<u8> = bytes[from..(from + n).min(bytes.len())].to_vec();
                let end = (to + piece.len()).min(bytes.len());
                bytes[to..end].copy_from_slice(&piece[..end - to]);
            }
            Mutation::Insert(f, b) => {
                let i = at(*f, bytes.len());
                bytes.splice(i..i, b.iter().copied());
            }
        }
    }
    bytes
}

/// Scans `bytes` as a full (may be raw) and as an incremental (must be a stream), checks
/// the index, and reads the image at every extent and at the damage.
fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("sda.full.data");
    std::fs::write(&path, bytes).expect("write");
    for index in [StreamIndex::open(&path, "sda"), StreamIndex::open_stream(&path)].into_iter().flatten() {
        prop_assert_eq!(index.broken_invariant(), None);
        for e in &index.extents {
            prop_assert!(
                e.start.checked_add(e.len).is_some_and(|end| end <= index.meta.virtual_size),
                "{:?}",
                e
            );
            let payload_end = match &e.stored {
                Stored::Zero => 0,
                Stored::Plain { file_off } => file_off + e.len,
                Stored::Lz4(frames) => frames.iter().map(|f| f.file_off + f.comp_len).max().unwrap_or(0),
            };
            prop_assert!(payload_end <= index.file_len, "{:?} ends past the file", e);
        }
        let mut probes: Vec<u64> = index.extents.iter().map(|e| e.start).collect();
        probes.extend(index.damage.as_ref().map(|d| d.from));
        probes.push(0);
        let top = Layer { id: 2, index: Arc::new(index) };
        // Alone, and laid over a valid full backup (an incremental's gaps show the base).
        let chains = [vec![top.clone()], vec![Layer { id: 1, index: Arc::new(base(dir.path())) }, top]];
        let mut buf = vec![0u8; PROBE];
        for reader in ImageReader::many(&chains, &Arc::new(ReadCache::new(1 << 20))) {
            for &off in &probes {
                // Errors are fine (damage); a panic fails the test.
                let _ = reader.read_at(&mut buf, off);
            }
        }
    }
    Ok(())
}

/// A valid full backup of the whole disk, as the base of a chain.
fn base(dir: &std::path::Path) -> StreamIndex {
    let path = dir.join("sda.base.data");
    std::fs::write(&path, valid_stream(&[(0, MAX_VSIZE, true)], true, 4096, false)).expect("write");
    StreamIndex::open_stream(&path).expect("a valid stream")
}

fn extents() -> impl Strategy<Value = Vec<(u64, u64, bool)>> {
    prop::collection::vec((0u64..600, 0u64..1500, any::<bool>()), 0..12)
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(&bytes)?;
    }

    #[test]
    fn arbitrary_bodies_after_a_valid_meta_frame_never_panic(
        compressed in any::<bool>(),
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = valid_stream(&[], compressed, 4096, false);
        bytes.truncate(bytes.windows(4).position(|w| w == b"stop").expect("a stop frame"));
        bytes.extend(body);
        check(&bytes)?;
    }

    #[test]
    fn damaged_valid_streams_never_panic(
        layout in extents(),
        compressed in any::<bool>(),
        max_request in 64u64..2048,
        inc in any::<bool>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let bytes = valid_stream(&layout, compressed, max_request, inc);
        check(&bytes)?;
        check(&mutate(bytes, &mutations))?;
    }
}
