//! Reference-model property tests for the write overlay (`vmback::overlay::Overlay`), with
//! no FUSE: random interleavings of reads, writes and punches against a naive `Vec<u8>`
//! per image.
//!
//! The base images are real chains (a full with data, zero frames and gaps, then an
//! incremental with unaligned extents, plain or lz4) written with `StreamWriter` and read
//! through `ImageReader`; their sizes are mostly not page multiples. The dirty budget is
//! tiny (a few pages), so nearly every write spills, and two overlays share it, so one
//! image's writes make the budget full while the other spills. After every operation:
//! random ranges of both images read like the model, the budget is within its limit, and
//! the data/hole runs of `run_at` tile the image and never call a range with non-zero
//! bytes a hole. At the end, the whole image. A second property saves an overlay
//! (`persist`, the map through JSON as the mount saves it) and loads it again.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::rng::Rng;
use proptest::prelude::*;
use tempfile::TempDir;
use vmback::cache::ReadCache;
use vmback::chain::{ImageReader, Layer, StreamIndex, StreamMeta, StreamWriter};
use vmback::overlay::{DirtyBudget, Overlay, PAGE, SavedMap};
use vmback::view::{ImageView, Run};

/// splitmix64 ([`Rng`]): bytes and ranges derived from a seed.
impl Rng {
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        for c in v.chunks_mut(8) {
            let x = self.next_u64().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
        // Some zero bytes inside written data: zeros written as data are data, not holes.
        if len > 64 && self.below(4) == 0 {
            let at = self.below(len as u64 - 32) as usize;
            v[at..at + 32].fill(0);
        }
        v
    }
}

// ---------------------------------------------------------------------------------------
// Base images

/// A chain on disk, its reader, and the bytes it must read as.
struct Base {
    /// Shared with the overlay over it (which owns its base).
    reader: Arc<ImageReader>,
    model: Vec<u8>,
}

fn meta(size: u64, data: u64, cpt: &str, parent: &str, inc: bool, lz4: bool) -> StreamMeta {
    StreamMeta::full("sda", size, data).point(cpt, parent, inc).lz4(lz4).dated("2026-06-01T08:00:00.000001")
}

/// One stream: `(start, len, is_data)` frames in order; data bytes come from `rng` and are
/// applied to `model`.
fn write_stream(
    path: &Path,
    meta: &StreamMeta,
    frames: &[(u64, u64, bool)],
    model: &mut [u8],
    rng: &mut Rng,
    max_request: u64,
) {
    let mut w = StreamWriter::new(BufWriter::new(File::create(path).unwrap()), meta, max_request).unwrap();
    for &(start, len, data) in frames {
        let range = start as usize..(start + len) as usize;
        if data {
            let bytes = rng.bytes(len as usize);
            w.data(start, &bytes).unwrap();
            model[range].copy_from_slice(&bytes);
        } else {
            w.zero(start, len).unwrap();
            model[range].fill(0);
        }
    }
    w.finish().unwrap();
}

/// A two-layer chain of an image of `size` bytes in `dir`: a full holding data extents,
/// zero frames and gaps (and data in its last bytes), then an incremental with unaligned
/// data extents and one zero frame.
fn build_base(dir: &Path, name: &str, size: u64, lz4: bool, seed: u64) -> Base {
    let mut rng = Rng(seed);
    let mut model = vec![0u8; size as usize];
    // The full: walk the disk in random steps; each step data, zero frame or gap.
    let mut frames = Vec::new();
    let mut pos = 0;
    while pos < size {
        let len = (1 + rng.below(3 * PAGE + 700)).min(size - pos);
        match rng.below(3) {
            0 => frames.push((pos, len, true)),
            1 => frames.push((pos, len, false)),
            _ => {}
        }
        pos += len;
    }
    if !frames.last().is_some_and(|f| f.2 && f.0 + f.1 == size) {
        let tail = 100.min(size);
        frames.retain(|f| f.0 + f.1 <= size - tail);
        frames.push((size - tail, tail, true));
    }
    let data: u64 = frames.iter().filter(|f| f.2).map(|f| f.1).sum();
    let full = dir.join(format!("{name}.full.data"));
    // A small max_request splits extents into several lz4 frames.
    write_stream(
        &full,
        &meta(size, data, "virtnbdbackup.0", "", false, lz4),
        &frames,
        &mut model,
        &mut rng,
        5000,
    );

    let mut frames = Vec::new();
    let mut pos = rng.below(PAGE);
    while pos < size {
        let len = (1 + rng.below(2 * PAGE)).min(size - pos);
        frames.push((pos, len, rng.below(5) != 0));
        pos += len + rng.below(4 * PAGE);
    }
    let data: u64 = frames.iter().filter(|f| f.2).map(|f| f.1).sum();
    let inc = dir.join(format!("{name}.inc.virtnbdbackup.1.data"));
    let m = meta(size, data, "virtnbdbackup.1", "virtnbdbackup.0", true, lz4);
    write_stream(&inc, &m, &frames, &mut model, &mut rng, 3000);

    let layers = [full, inc]
        .iter()
        .enumerate()
        .map(|(i, p)| Layer { id: i as u32, index: Arc::new(StreamIndex::open(p, "sda").unwrap()) })
        .collect();
    let reader = ImageReader::new(layers, Arc::new(ReadCache::new(64 << 10)));
    let mut got = vec![0u8; size as usize];
    assert_eq!(reader.read_at(&mut got, 0).unwrap(), size as usize);
    assert!(got == model, "the base chain does not read like its model");
    Base { reader: Arc::new(reader), model }
}

// ---------------------------------------------------------------------------------------
// Operations

/// One operation; positions are raw numbers turned into offsets by [`place`].
#[derive(Debug, Clone)]
enum Op {
    Read { img: usize, at: (u8, u64), len: u64 },
    Write { img: usize, at: (u8, u64), len: u64, seed: u64 },
    Punch { img: usize, at: (u8, u64), len: u64 },
}

/// Offsets that matter: anywhere, next to a page boundary, next to the end, the last
/// byte, and past the end.
fn at() -> impl Strategy<Value = (u8, u64)> {
    (
        prop_oneof![3 => Just(0u8), 3 => Just(1u8), 2 => Just(2u8), 1 => Just(3u8), 1 => Just(4u8)],
        any::<u64>(),
    )
}

fn place((kind, r): (u8, u64), size: u64) -> u64 {
    let pages = size.div_ceil(PAGE);
    match kind {
        0 => r % size,
        1 => ((r >> 8) % (pages + 1) * PAGE).saturating_add(r % 7).saturating_sub(3).min(size - 1),
        2 => size - 1 - (r % 5000).min(size - 1),
        3 => size - 1,
        _ => size + r % 3,
    }
}

fn len() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1u64..64,
        4 => 1u64..3 * PAGE + 100,
        2 => prop::sample::select(vec![PAGE, 2 * PAGE, PAGE - 1, PAGE + 1]),
        // Longer than the whole budget: one write spills part-way.
        1 => 8 * PAGE..24 * PAGE,
    ]
}

fn op(images: usize) -> impl Strategy<Value = Op> {
    let img = 0..images;
    prop_oneof![
        3 => (img.clone(), at(), len()).prop_map(|(img, at, len)| Op::Read { img, at, len }),
        5 => (img.clone(), at(), len(), any::<u64>())
            .prop_map(|(img, at, len, seed)| Op::Write { img, at, len, seed }),
        2 => (img, at(), len()).prop_map(|(img, at, len)| Op::Punch { img, at, len }),
    ]
}

/// An image under test: its base, its overlay and the model of its current bytes.
struct Subject {
    base: Base,
    overlay: Overlay<Arc<ImageReader>>,
    model: Vec<u8>,
}

impl Subject {
    fn size(&self) -> u64 {
        self.model.len() as u64
    }

    fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0xeeu8; len as usize];
        let n = self.overlay.read_at(&mut buf, off).unwrap();
        buf.truncate(n);
        buf
    }

    /// Reads `[off, off + len)` and compares it with the model (clipped at the end).
    fn check_range(&self, off: u64, len: u64, what: &str) -> Result<(), TestCaseError> {
        let got = self.read(off, len);
        let end = off.saturating_add(len).min(self.size()).max(off.min(self.size()));
        let want = &self.model[off.min(self.size()) as usize..end as usize];
        if got != want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
            return Err(TestCaseError::fail(format!(
                "{what}: read of {len} at {off} differs from the model at image offset {} \
                 (got {} bytes, want {})",
                off + first as u64,
                got.len(),
                want.len()
            )));
        }
        Ok(())
    }

    /// The runs of `run_at` tile the image; no hole run holds a non-zero model byte.
    fn check_runs(&self) -> Result<(), TestCaseError> {
        let mut pos = 0;
        while pos < self.size() {
            let (run, end) = self.overlay.run_at(pos);
            prop_assert!(
                end > pos && end <= self.size(),
                "run_at({pos}) ends at {end} (size {})",
                self.size()
            );
            if run == Run::Hole {
                let bad = self.model[pos as usize..end as usize].iter().position(|&b| b != 0);
                prop_assert!(
                    bad.is_none(),
                    "run_at calls [{pos}, {end}) a hole but byte {} is non-zero",
                    pos + bad.unwrap_or(0) as u64
                );
            }
            // A run from the middle of a run ends where the run does.
            if end - pos > 1 {
                let mid = pos + (end - pos) / 2;
                let (r2, e2) = self.overlay.run_at(mid);
                prop_assert!(
                    r2 == run && e2 == end,
                    "run_at({mid}) = ({r2:?}, {e2}) inside ({run:?}, {end})"
                );
            }
            pos = end;
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let size = self.size();
        match *op {
            Op::Read { at, len, .. } => self.check_range(place(at, size), len, "read")?,
            Op::Write { at, len, seed, .. } => {
                let off = place(at, size);
                let data = Rng(seed).bytes(len as usize);
                let res = self.overlay.write_at(&data, off);
                if off >= size {
                    let err = res.expect_err("a write past the end must fail");
                    prop_assert_eq!(err.errno(), libc::ENOSPC);
                } else {
                    let n = res.map_err(|e| TestCaseError::fail(format!("write: {e}")))?;
                    let want = len.min(size - off);
                    prop_assert_eq!(n as u64, want, "short write count");
                    self.model[off as usize..(off + want) as usize].copy_from_slice(&data[..want as usize]);
                }
            }
            Op::Punch { at, len, .. } => {
                let off = place(at, size);
                self.overlay.punch(off, len).map_err(|e| TestCaseError::fail(format!("punch: {e}")))?;
                if off < size {
                    let end = (off + len).min(size);
                    self.model[off as usize..end as usize].fill(0);
                }
            }
        }
        Ok(())
    }
}

/// Sizes that are mostly not page multiples.
fn image_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(16 * PAGE),
        Just(100_000u64),
        Just(150_001u64),
        Just(64 * PAGE - 1),
        Just(3 * PAGE + 1),
        (PAGE..48 * PAGE),
    ]
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, max_shrink_iters: 300, failure_persistence: None, ..ProptestConfig::default() }
}

fn subject(dir: &Path, name: &str, size: u64, lz4: bool, seed: u64, budget: &Arc<DirtyBudget>) -> Subject {
    let base = build_base(dir, name, size, lz4, seed);
    let overlay = Overlay::new(base.reader.clone(), dir.join(format!("{name}.overlay")), budget.clone());
    let model = base.model.clone();
    Subject { base, overlay, model }
}

fn check_budget(budget: &DirtyBudget, limit: u64, after: &Op) -> Result<(), TestCaseError> {
    let used = budget.used();
    prop_assert!(used % PAGE == 0, "budget used {used} is not whole pages after {after:?}");
    // A write that pushes the total past the limit spills that image's pages; the other
    // image's pages were within the limit before, so the total is again.
    prop_assert!(used <= limit, "budget used {used} > limit {limit} after {after:?}");
    Ok(())
}

/// Overlay files stay sparse: never larger than the image, never more allocated blocks
/// than the image's pages.
fn check_file(s: &Subject) -> Result<(), TestCaseError> {
    if let Ok(m) = std::fs::metadata(s.overlay.path()) {
        use std::os::unix::fs::MetadataExt;
        prop_assert_eq!(m.len(), s.size(), "overlay file length");
        prop_assert!(m.blocks() * 512 <= s.size().div_ceil(PAGE) * PAGE + 64 * 1024);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(96))]

    /// Two overlays over two chains (one plain, one lz4), sharing one tiny budget.
    #[test]
    fn overlays_read_like_the_model(
        sizes in (image_size(), image_size()),
        seed in any::<u64>(),
        limit_pages in prop_oneof![Just(2u64), Just(4u64), 2u64..16],
        ops in prop::collection::vec(op(2), 1..120),
        check_seed in any::<u64>(),
    ) {
        let dir = TempDir::new().unwrap();
        let limit = limit_pages * PAGE;
        let budget = Arc::new(DirtyBudget::new(limit));
        let mut subjects = [
            subject(dir.path(), "sda", sizes.0, false, seed, &budget),
            subject(dir.path(), "sdb", sizes.1, true, seed ^ 0x5555, &budget),
        ];
        let mut rng = Rng(check_seed);
        let mut spilled = [false; 2];
        for op in &ops {
            let img = match op {
                Op::Read { img, .. } | Op::Write { img, .. } | Op::Punch { img, .. } => *img,
            };
            subjects[img].apply(op)?;
            if let Op::Write { at, len, .. } = op {
                // A write of more pages than the budget holds must have spilled.
                let size = subjects[img].size();
                let off = place(*at, size);
                spilled[img] |= off < size && (*len).min(size - off) > limit + 2 * PAGE;
            }
            check_budget(&budget, limit, op)?;
            for s in &subjects {
                for _ in 0..2 {
                    let off = rng.below(s.size());
                    let len = 1 + rng.below(3 * PAGE);
                    s.check_range(off, len, &format!("after {op:?}"))?;
                }
                s.check_runs()?;
            }
        }
        for (s, spilled) in subjects.iter().zip(spilled) {
            if spilled {
                prop_assert!(s.overlay.path().exists(), "a write larger than the budget did not spill");
            }
            s.check_range(0, s.size(), "whole image at the end")?;
            s.check_range(s.size(), 10, "read at the end")?;
            check_file(s)?;
        }
        drop(subjects);
        prop_assert_eq!(budget.used(), 0, "dropped overlays give their pages back");
    }

    /// `persist` then `Overlay::load` on the same file (the map through JSON) reads the
    /// same bytes, and keeps working: more writes on the loaded overlay, saved again.
    #[test]
    fn persisted_overlay_loads_the_same_bytes(
        size in image_size(),
        seed in any::<u64>(),
        lz4 in any::<bool>(),
        limit_pages in 1u64..12,
        ops in prop::collection::vec(op(1), 1..60),
        more in prop::collection::vec(op(1), 0..30),
    ) {
        let dir = TempDir::new().unwrap();
        let limit = limit_pages * PAGE;
        let budget = Arc::new(DirtyBudget::new(limit));
        let mut s = subject(dir.path(), "sda", size, lz4, seed, &budget);
        for op in &ops {
            s.apply(op)?;
        }
        let map = save(&s.overlay)?;
        prop_assert_eq!(budget.used(), 0, "persist leaves no page in memory");
        s.check_range(0, size, "the saved overlay itself")?;

        let path: PathBuf = s.overlay.path().to_owned();
        let fresh = Arc::new(DirtyBudget::new(limit));
        let loaded = Overlay::load(&map, s.base.reader.clone(), path.clone(), fresh.clone())
            .map_err(|e| TestCaseError::fail(format!("load: {e}")))?;
        let mut s2 = Subject { base: s.base, overlay: loaded, model: s.model };
        drop(s.overlay);
        s2.check_range(0, size, "the loaded overlay")?;
        s2.check_runs()?;
        prop_assert_eq!(s2.overlay.is_empty(), map.spilled.is_empty());
        for op in &more {
            s2.apply(op)?;
            check_budget(&fresh, limit, op)?;
        }
        let map2 = save(&s2.overlay)?;
        let again = Overlay::load(&map2, s2.base.reader.clone(), path, Arc::new(DirtyBudget::new(limit)))
            .map_err(|e| TestCaseError::fail(format!("second load: {e}")))?;
        let s3 = Subject { base: s2.base, overlay: again, model: s2.model };
        drop(s2.overlay);
        s3.check_range(0, size, "loaded after a second save")?;
        s3.check_runs()?;
    }
}

/// `persist`, with the map through JSON as the mount saves it.
fn save(o: &Overlay<Arc<ImageReader>>) -> Result<SavedMap, TestCaseError> {
    let map = o.persist().map_err(|e| TestCaseError::fail(format!("persist: {e}")))?;
    let json = serde_json::to_vec(&map).unwrap();
    let back: SavedMap = serde_json::from_slice(&json).unwrap();
    prop_assert_eq!(back.size, map.size);
    prop_assert_eq!(&back.spilled, &map.spilled);
    Ok(back)
}

/// Concurrent writers and readers on two overlays sharing a one-page budget: every
/// thread owns a disjoint set of pages, so the final bytes are known, while spills of
/// both images interleave with reads of pages another thread is writing.
#[test]
fn concurrent_writers_with_a_tiny_budget() {
    let dir = TempDir::new().unwrap();
    let budget = Arc::new(DirtyBudget::new(PAGE));
    let size = 40 * PAGE + 123;
    let subjects = [
        subject(dir.path(), "sda", size, false, 7, &budget),
        subject(dir.path(), "sdb", size, true, 8, &budget),
    ];
    let threads = 4u64;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let subjects = &subjects;
            scope.spawn(move || {
                let mut rng = Rng(t);
                for round in 0..300u64 {
                    let s = &subjects[(round % 2) as usize];
                    // Pages t, t + threads, ...: this thread's own.
                    let page = t + threads * rng.below(size.div_ceil(PAGE).div_ceil(threads));
                    let off = page * PAGE + rng.below(PAGE);
                    if off >= size {
                        continue;
                    }
                    let len = (1 + rng.below(PAGE)).min((page + 1) * PAGE - off).min(size - off);
                    let stamp = vec![(round % 251) as u8 | 1; len as usize];
                    s.overlay.write_at(&stamp, off).unwrap();
                    let mut back = vec![0u8; len as usize];
                    s.overlay.read_at(&mut back, off).unwrap();
                    assert_eq!(back, stamp, "thread {t} round {round}: own write not read back");
                    if rng.below(8) == 0 {
                        s.overlay.punch(page * PAGE, PAGE).unwrap();
                    }
                }
            });
        }
    });
    assert!(budget.used() <= PAGE * threads, "budget used {}", budget.used());
    drop(subjects);
    assert_eq!(budget.used(), 0);
}

/// A zero-length write past the end (not an error for pwrite(2)) returns 0 and does not
/// panic.
#[test]
fn empty_write_past_the_end_is_harmless() {
    let dir = TempDir::new().unwrap();
    let budget = Arc::new(DirtyBudget::new(PAGE));
    let s = subject(dir.path(), "sda", 3 * PAGE + 1, false, 1, &budget);
    assert_eq!(s.overlay.write_at(&[], s.size()).unwrap(), 0);
    assert_eq!(s.overlay.write_at(&[], s.size() + 4096).unwrap(), 0);
}
