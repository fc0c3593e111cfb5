//! Reference-model property tests for the chain reader.
//!
//! Random chains (a full, then incrementals, differentials and the odd lost-CBT full,
//! compressed or not, split into lz4 frames at random small `max_request`s, sometimes
//! resized) are written with `StreamWriter` and read back through `ImageReader`, either
//! from layers built by hand or from the restore points `Catalog::discover` finds for
//! upstream-named files. Every read is compared with a naive model: a `Vec<u8>` the same
//! frames were applied to, plus a per-byte "stored as data" flag that SEEK_DATA/SEEK_HOLE
//! must agree with.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::rng::Rng;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{FileFailurePersistence, TestRunner};
use tempfile::TempDir;
use vmback::cache::ReadCache;
use vmback::catalog::{Catalog, PointKey, Status};
use vmback::chain::{ImageReader, Layer, StreamIndex, StreamMeta, StreamWriter};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Generated chain descriptions

/// How the bytes of one data frame are made.
#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// One repeated byte (compresses to almost nothing).
    Byte(u8),
    /// A counter over the disk offset (compressible, position-dependent).
    Ramp(u8),
    /// Pseudo-random bytes (lz4 stores these raw).
    Noise(u64),
    /// Zeros stored as data (must still count as data, not as a hole).
    Zeros,
}

fn pattern() -> impl Strategy<Value = Pattern> {
    prop_oneof![
        any::<u8>().prop_map(Pattern::Byte),
        any::<u8>().prop_map(Pattern::Ramp),
        any::<u64>().prop_map(Pattern::Noise),
        Just(Pattern::Zeros),
    ]
}

fn fill(p: Pattern, disk_off: u64, len: usize) -> Vec<u8> {
    match p {
        Pattern::Byte(b) => vec![b; len],
        Pattern::Zeros => vec![0; len],
        Pattern::Ramp(step) => {
            (0..len as u64).map(|i| ((disk_off + i).wrapping_mul(u64::from(step) | 1) >> 3) as u8).collect()
        }
        Pattern::Noise(seed) => {
            let mut rng = Rng(seed);
            let mut out = Vec::with_capacity(len + 8);
            while out.len() < len {
                out.extend_from_slice(&rng.next_u64().to_le_bytes());
            }
            out.truncate(len);
            out
        }
    }
}

/// One frame of a stream before placement: where (as a fraction of the virtual size),
/// how long, and whether it is a `zero` frame.
#[derive(Debug, Clone)]
struct WriteSpec {
    at: u32,
    len: u64,
    zero: bool,
    pattern: Pattern,
}

fn write_spec(zero_weight: f64) -> impl Strategy<Value = WriteSpec> {
    // Some lengths are exact multiples of the common max_requests: an extent of exactly
    // `max_request` bytes gets the object trailer form with one frame.
    let len = prop_oneof![
        3 => 0u64..64,
        4 => 0u64..70_000,
        2 => 0u64..300_000,
        1 => (1u64..=4).prop_map(|k| k * 4096),
        1 => Just(65536u64),
    ];
    (any::<u32>(), len, prop::bool::weighted(zero_weight), pattern())
        .prop_map(|(at, len, zero, pattern)| WriteSpec { at, len, zero, pattern })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Inc,
    Diff,
    /// An `inc` file holding a full (`incremental: false`, upstream's lost CBT).
    LostFull,
}

#[derive(Debug, Clone)]
struct StreamSpec {
    kind: Kind,
    compressed: bool,
    max_request: u64,
    /// A new virtual size from this stream on.
    resize: Option<u64>,
    writes: Vec<WriteSpec>,
}

fn max_request() -> impl Strategy<Value = u64> {
    prop_oneof![Just(4096u64), Just(65536), 512u64..100_000]
}

fn vsize() -> impl Strategy<Value = u64> {
    prop_oneof![1u64..=3 * MIB, (256u64..=768).prop_map(|pages| pages * 4096)]
}

fn later_stream() -> impl Strategy<Value = StreamSpec> {
    let kind = prop_oneof![5 => Just(Kind::Inc), 3 => Just(Kind::Diff), 1 => Just(Kind::LostFull)];
    (
        kind,
        any::<bool>(),
        max_request(),
        prop::option::weighted(0.12, vsize()),
        prop::collection::vec(write_spec(0.15), 0..10),
    )
        .prop_map(|(kind, compressed, max_request, resize, writes)| StreamSpec {
            kind,
            compressed,
            max_request,
            resize,
            writes,
        })
}

#[derive(Debug, Clone)]
struct ChainSpec {
    vsize: u64,
    full_compressed: bool,
    full_max_request: u64,
    full: Vec<WriteSpec>,
    later: Vec<StreamSpec>,
    /// A `copy` backup (catalog property only): compressed?, its frames.
    copy: Option<(bool, Vec<WriteSpec>)>,
}

fn chain_spec() -> impl Strategy<Value = ChainSpec> {
    (
        vsize(),
        any::<bool>(),
        max_request(),
        prop::collection::vec(write_spec(0.2), 0..14),
        prop::collection::vec(later_stream(), 0..=6),
        prop::option::weighted(0.3, (any::<bool>(), prop::collection::vec(write_spec(0.2), 0..6))),
    )
        .prop_map(|(vsize, full_compressed, full_max_request, full, later, copy)| ChainSpec {
            vsize,
            full_compressed,
            full_max_request,
            full,
            later,
            copy,
        })
}

// ---------------------------------------------------------------------------------------
// Placement, the model, writing

#[derive(Debug, Clone)]
enum Frame {
    Data { start: u64, bytes: Vec<u8> },
    Zero { start: u64, len: u64 },
}

/// Places `writes` as sorted, non-overlapping frames inside `[0, vsize)`; with `tile`
/// (full and copy streams) the gaps become `zero` frames so the frames tile the disk.
fn place(writes: &[WriteSpec], vsize: u64, tile: bool) -> Vec<Frame> {
    let mut sorted = writes.to_vec();
    sorted.sort_by_key(|w| w.at);
    let mut out = Vec::new();
    let mut pos = 0u64;
    for w in sorted {
        let start = ((u64::from(w.at) * vsize) >> 32).max(pos);
        if start > vsize {
            continue;
        }
        let len = w.len.min(vsize - start);
        if tile && start > pos {
            out.push(Frame::Zero { start: pos, len: start - pos });
        }
        if w.zero {
            out.push(Frame::Zero { start, len });
        } else {
            out.push(Frame::Data { start, bytes: fill(w.pattern, start, len as usize) });
        }
        pos = start + len;
    }
    if tile && pos < vsize {
        out.push(Frame::Zero { start: pos, len: vsize - pos });
    }
    out
}

/// The reference model of a disk: its bytes and, per byte, whether a data frame (rather
/// than a zero frame or nothing) stores it. Unbounded: cut to size only when read.
#[derive(Debug, Clone, Default)]
struct Model {
    bytes: Vec<u8>,
    data: Vec<bool>,
}

impl Model {
    fn apply(&mut self, frames: &[Frame], incremental: bool) {
        if !incremental {
            self.bytes.clear();
            self.data.clear();
        }
        for f in frames {
            let (start, len) = match f {
                Frame::Data { start, bytes } => (*start as usize, bytes.len()),
                Frame::Zero { start, len } => (*start as usize, *len as usize),
            };
            if self.bytes.len() < start + len {
                self.bytes.resize(start + len, 0);
                self.data.resize(start + len, false);
            }
            match f {
                Frame::Data { bytes, .. } => {
                    self.bytes[start..start + len].copy_from_slice(bytes);
                    self.data[start..start + len].fill(true);
                }
                Frame::Zero { .. } => {
                    self.bytes[start..start + len].fill(0);
                    self.data[start..start + len].fill(false);
                }
            }
        }
    }

    /// The image of `size` bytes: cut, or padded with never-written zeros.
    fn image(&self, size: u64) -> Model {
        let mut m = self.clone();
        m.bytes.resize(size as usize, 0);
        m.data.resize(size as usize, false);
        m
    }
}

/// One stream file to write.
struct StreamFile {
    name: String,
    meta: StreamMeta,
    frames: Vec<Frame>,
    max_request: u64,
}

/// One restore point: its key (catalog property), the files of its chain, its image.
struct Point {
    key: PointKey,
    layers: Vec<usize>,
    image: Model,
}

fn date(i: usize) -> String {
    format!("2026-06-{:02}T08:{:02}:01.123456", 1 + i / 60, i % 60)
}

fn cpt(n: usize) -> String {
    format!("virtnbdbackup.{n}")
}

fn stream_file(
    name: String,
    i: usize,
    vsize: u64,
    frames: Vec<Frame>,
    (checkpoint, parent, incremental): (String, String, bool),
    compressed: bool,
    max_request: u64,
) -> StreamFile {
    let data_size =
        frames.iter().map(|f| if let Frame::Data { bytes, .. } = f { bytes.len() as u64 } else { 0 }).sum();
    let meta = StreamMeta::full("sda", vsize, data_size)
        .point(&checkpoint, &parent, incremental)
        .lz4(compressed)
        .dated(&date(i));
    StreamFile { name, meta, frames, max_request }
}

/// Turns a spec into files and expected restore points. `upstream`: name files as
/// virtnbdbackup does and model the catalog's chains (a differential sits on its parent
/// checkpoint, not on the differential before it); otherwise every stream is laid over
/// all the ones before it and point k is the first k+1 files.
fn plan(spec: &ChainSpec, upstream: bool) -> (Vec<StreamFile>, Vec<Point>) {
    let mut files = Vec::new();
    let mut points = Vec::new();
    let mut size = spec.vsize;
    let full = place(&spec.full, size, true);
    let mut model = Model::default();
    model.apply(&full, false);
    files.push(stream_file(
        if upstream { "sda.full.data".into() } else { "s0.data".into() },
        0,
        size,
        full,
        (cpt(0), String::new(), false),
        spec.full_compressed,
        spec.full_max_request,
    ));
    points.push(Point { key: PointKey::Checkpoint(cpt(0)), layers: vec![0], image: model.image(size) });
    // Per checkpoint number: the unbounded model and the files of its chain.
    let mut by_cpt: HashMap<usize, (Model, Vec<usize>)> = HashMap::new();
    by_cpt.insert(0, (model.clone(), vec![0]));
    let mut n = 1;
    let mut diff_ranks: HashMap<usize, usize> = HashMap::new();
    let mut linear_layers = vec![0];
    for s in &spec.later {
        let i = files.len();
        if let Some(v) = s.resize {
            size = v;
        }
        let incremental = s.kind != Kind::LostFull;
        let frames = place(&s.writes, size, !incremental);
        if !upstream {
            model.apply(&frames, incremental);
            linear_layers.push(i);
            points.push(Point {
                key: PointKey::Checkpoint(format!("linear.{i}")),
                layers: linear_layers.clone(),
                image: model.image(size),
            });
            let ids = (cpt(i), cpt(i - 1), incremental);
            files.push(stream_file(format!("s{i}.data"), i, size, frames, ids, s.compressed, s.max_request));
            continue;
        }
        let (mut m, mut layers) = by_cpt[&(n - 1)].clone();
        m.apply(&frames, incremental);
        if incremental {
            layers.push(i);
        } else {
            layers = vec![i];
        }
        let (name, ids, key) = match s.kind {
            Kind::Inc => {
                (format!("sda.inc.{}.data", cpt(n)), (cpt(n), cpt(n - 1), true), PointKey::Checkpoint(cpt(n)))
            }
            Kind::LostFull => (
                format!("sda.inc.{}.data", cpt(n)),
                (cpt(n), String::new(), false),
                PointKey::Checkpoint(cpt(n)),
            ),
            Kind::Diff => {
                let rank = diff_ranks.entry(n - 1).or_default();
                let key = PointKey::Derived { parent: cpt(n - 1), offline: false, rank: *rank };
                *rank += 1;
                (format!("sda.diff.{}.data", 1_780_000_000 + i * 60), (cpt(n), cpt(n - 1), true), key)
            }
        };
        points.push(Point { key, layers: layers.clone(), image: m.image(size) });
        if s.kind != Kind::Diff {
            by_cpt.insert(n, (m, layers));
            n += 1;
        }
        files.push(stream_file(name, i, size, frames, ids, s.compressed, s.max_request));
    }
    if upstream && let Some((compressed, writes)) = &spec.copy {
        let i = files.len();
        let frames = place(writes, size, true);
        let mut m = Model::default();
        m.apply(&frames, false);
        points.push(Point { key: PointKey::Copy { rank: 0 }, layers: vec![i], image: m.image(size) });
        let ids = (cpt(0), String::new(), false);
        files.push(stream_file("sda.copy.data".into(), i, size, frames, ids, *compressed, 4096));
    }
    (files, points)
}

fn write_stream(path: &Path, f: &StreamFile) {
    let out = BufWriter::new(File::create(path).expect("create stream"));
    let mut w = StreamWriter::new(out, &f.meta, f.max_request).expect("meta");
    for frame in &f.frames {
        match frame {
            Frame::Data { start, bytes } => w.data(*start, bytes).expect("data"),
            Frame::Zero { start, len } => w.zero(*start, *len).expect("zero"),
        }
    }
    w.finish().expect("finish").into_inner().expect("flush");
}

/// Cuts the trailer (JSON, CRLF, `comp` frame) off a compressed stream, as a backup that
/// died after its `stop` frame would leave it.
fn strip_trailer(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let comp = &bytes[bytes.len() - 40..];
    assert_eq!(&comp[..5], b"comp ");
    let t = usize::from_str_radix(std::str::from_utf8(&comp[22..38]).unwrap(), 16).unwrap();
    std::fs::write(path, &bytes[..bytes.len() - 42 - t]).unwrap();
}

fn write_all(dir: &Path, files: &[StreamFile]) -> Vec<PathBuf> {
    files
        .iter()
        .map(|f| {
            let path = dir.join(&f.name);
            write_stream(&path, f);
            path
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Comparing a reader with the model

/// A random read range: mostly inside the image, some across or past its end.
fn random_range(rng: &mut Rng, size: u64) -> (u64, usize) {
    let off = match rng.below(8) {
        0 => size.saturating_sub(rng.below(300)),
        1 => size + rng.below(10_000),
        2 => rng.below(4096),
        _ => rng.below(size + 1),
    };
    let len = match rng.below(4) {
        0 => rng.below(17),
        1 => rng.below(5000),
        2 => rng.below(70_000),
        _ => rng.below(400_000),
    };
    (off, len as usize)
}

/// Reads `[off, off + len)` and compares it with the model; bytes past what was read
/// must be left alone.
fn check_read(reader: &ImageReader, want: &[u8], off: u64, len: usize, what: &str) -> Result<(), String> {
    let mut buf = vec![0xa5u8; len];
    let n = reader.read_at(&mut buf, off).map_err(|e| format!("{what}: read {off}+{len}: {e}"))?;
    let expect_n = (want.len() as u64).saturating_sub(off).min(len as u64) as usize;
    if n != expect_n {
        return Err(format!("{what}: read {off}+{len} returned {n}, want {expect_n}"));
    }
    if n > 0 {
        let exp = &want[off as usize..off as usize + n];
        if buf[..n] != *exp {
            let at = buf.iter().zip(exp).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!(
                "{what}: read {off}+{len}: first difference at image offset {} (got {:#04x}, want {:#04x})",
                off + at as u64,
                buf[at],
                exp[at]
            ));
        }
    }
    if buf[n..].iter().any(|&b| b != 0xa5) {
        return Err(format!("{what}: read {off}+{len} wrote past the {n} bytes it returned"));
    }
    Ok(())
}

/// Whole-image read, random reads, and SEEK_DATA/SEEK_HOLE against the model.
fn check_image(reader: &ImageReader, image: &Model, seed: u64, what: &str) -> Result<(), String> {
    let size = image.bytes.len() as u64;
    if reader.size() != size {
        return Err(format!("{what}: size {} but the model has {size}", reader.size()));
    }
    check_read(reader, &image.bytes, 0, size as usize + 17, what)?;
    let mut rng = Rng(seed);
    // Sequential reads of random lengths, as the kernel's readahead makes them.
    let mut off = 0;
    while off < size {
        let len = 1 + rng.below(256 << 10) as usize;
        check_read(reader, &image.bytes, off, len, what)?;
        off += len as u64;
    }
    for _ in 0..40 {
        let (off, len) = random_range(&mut rng, size);
        check_read(reader, &image.bytes, off, len, what)?;
    }
    check_read(reader, &image.bytes, u64::MAX - 3, 100, what)?;
    check_read(reader, &image.bytes, u64::MAX, 1, what)?;

    // Walk data and holes: data runs are exactly the bytes stored by data frames, holes
    // read as zeros.
    let map = reader.map();
    let runs = |from: u64, to: u64, data: bool| -> Result<(), String> {
        let (f, t) = (from as usize, to as usize);
        if let Some(i) = image.data[f..t].iter().position(|&d| d != data) {
            return Err(format!(
                "{what}: {} [{from}, {to}) but the model says byte {} is {}",
                if data { "data run" } else { "hole" },
                from + i as u64,
                if data { "not stored as data" } else { "stored as data" }
            ));
        }
        if !data && image.bytes[f..t].iter().any(|&b| b != 0) {
            return Err(format!("{what}: hole [{from}, {to}) holds non-zero model bytes"));
        }
        Ok(())
    };
    let mut pos = 0;
    let mut data_total = 0;
    while pos < size {
        match map.seek_data(pos) {
            None => {
                runs(pos, size, false)?;
                break;
            }
            Some(d) => {
                if d < pos || d >= size {
                    return Err(format!("{what}: seek_data({pos}) = {d}, size {size}"));
                }
                runs(pos, d, false)?;
                let h = map.seek_hole(d);
                if h <= d || h > size {
                    return Err(format!("{what}: seek_hole({d}) = {h} after seek_data, size {size}"));
                }
                runs(d, h, true)?;
                data_total += h - d;
                pos = h;
            }
        }
    }
    if map.data_bytes() != data_total || data_total > size {
        return Err(format!(
            "{what}: data_bytes {} but the runs hold {data_total} (size {size})",
            map.data_bytes()
        ));
    }
    for _ in 0..20 {
        let off = rng.below(size.max(1));
        let h = map.seek_hole(off);
        if off < size && (h < off || h > size || (h > off && !image.data[off as usize])) {
            return Err(format!("{what}: seek_hole({off}) = {h}"));
        }
        match map.seek_data(off) {
            Some(d) if d < off || d >= size || !image.data[d as usize] => {
                return Err(format!("{what}: seek_data({off}) = {d}"));
            }
            None if image.data.get(off as usize..).is_some_and(|r| r.contains(&true)) => {
                return Err(format!("{what}: seek_data({off}) found no data"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn config(cases: u32, file: &'static str) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 200,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(file))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// The properties

proptest! {
    #![proptest_config(config(48, "proptest-regressions/chain_ref.txt"))]

    /// Layers built by hand: every prefix of the chain is a restore point. With
    /// `strip`, compressed streams lose their trailer and are indexed by walking their
    /// lz4 frames: damaged (the trailer is gone) but every byte still readable. A cache
    /// of 256 MiB (the mount's default) is large enough for the reader to decode frames
    /// ahead of sequential reads in the background; the small ones are not.
    #[test]
    fn layers_read_like_the_model(
        spec in chain_spec(),
        seed in any::<u64>(),
        cache_kib in prop_oneof![16usize..2048, Just(256usize << 10)],
        strip in prop::bool::weighted(0.3),
    ) {
        let dir = TempDir::new().unwrap();
        let (files, points) = plan(&spec, false);
        let paths = write_all(dir.path(), &files);
        let indexes: Vec<Arc<StreamIndex>> = paths
            .iter()
            .zip(&files)
            .map(|(p, f)| {
                let stripped = strip && f.meta.compressed.is_some();
                if stripped {
                    strip_trailer(p);
                }
                let idx = StreamIndex::open(p, "sda").unwrap();
                if stripped {
                    let d = idx.damage.as_ref().expect("a stream without its trailer is damaged");
                    assert_eq!(d.from, f.meta.virtual_size, "{}: {}", p.display(), d.error);
                } else {
                    assert!(idx.damage.is_none(), "{}: {:?}", p.display(), idx.damage);
                }
                Arc::new(idx)
            })
            .collect();
        // One cache shared by every point: layer ids keep the files' frames apart.
        let cache = Arc::new(ReadCache::new(cache_kib << 10));
        for (k, point) in points.iter().enumerate() {
            let layers =
                point.layers.iter().map(|&i| Layer { id: i as u32, index: indexes[i].clone() }).collect();
            let reader = ImageReader::new(layers, cache.clone());
            let what = format!("point {k} (layers {:?})", point.layers);
            if let Err(e) = check_image(&reader, &point.image, seed ^ k as u64, &what) {
                return Err(TestCaseError::fail(e));
            }
        }
    }

    /// Upstream file names through `Catalog::discover`: every restore point it finds is
    /// complete, has the expected chain, and reads like the model.
    #[test]
    fn catalog_points_read_like_the_model(spec in chain_spec(), seed in any::<u64>()) {
        let dir = TempDir::new().unwrap();
        let (files, points) = plan(&spec, true);
        write_all(dir.path(), &files);
        let cat = Catalog::discover(dir.path()).unwrap();
        prop_assert!(cat.warnings.is_empty(), "warnings: {:?}", cat.warnings);
        prop_assert_eq!(cat.domains.len(), 1);
        let found = &cat.domains[0].points;
        let mut keys: Vec<&PointKey> = found.iter().map(|p| &p.key).collect();
        let mut want: Vec<&PointKey> = points.iter().map(|p| &p.key).collect();
        keys.sort();
        want.sort();
        prop_assert_eq!(keys, want);
        let cache = Arc::new(ReadCache::new(1 << 20));
        for point in &points {
            let rp = found.iter().find(|p| p.key == point.key).unwrap();
            prop_assert_eq!(rp.status(), Status::Complete, "{}", rp.name);
            prop_assert_eq!(rp.disks.len(), 1);
            let disk = &rp.disks[0];
            prop_assert_eq!(&disk.disk, "sda");
            let names: Vec<String> = disk
                .layers
                .iter()
                .map(|l| l.index.path.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            let want_names: Vec<String> = point.layers.iter().map(|&i| files[i].name.clone()).collect();
            prop_assert_eq!(&names, &want_names, "chain of {}", rp.name);
            let reader = ImageReader::new(disk.layers.clone(), cache.clone());
            if let Err(e) = check_image(&reader, &point.image, seed, &rp.name) {
                return Err(TestCaseError::fail(e));
            }
        }
    }
}

/// Eight threads read random ranges of every restore point of a compressed chain
/// through one 64 KiB cache (a few decoded frames: constant eviction, and threads
/// waiting on frames others are decoding).
#[test]
fn concurrent_reads_through_a_tiny_cache() {
    let mut runner = TestRunner::deterministic();
    let spec = loop {
        let mut spec = chain_spec().new_tree(&mut runner).unwrap().current();
        spec.full_compressed = true;
        spec.full_max_request = 4096;
        for s in &mut spec.later {
            s.compressed = true;
            s.max_request = if s.writes.len() % 2 == 0 { 4096 } else { 20_000 };
        }
        let data: u64 = spec.full.iter().filter(|w| !w.zero).map(|w| w.len).sum();
        if data > 512 << 10 && spec.later.len() >= 3 {
            break spec;
        }
    };
    let dir = TempDir::new().unwrap();
    let (files, points) = plan(&spec, false);
    let paths = write_all(dir.path(), &files);
    let indexes: Vec<Arc<StreamIndex>> =
        paths.iter().map(|p| Arc::new(StreamIndex::open(p, "sda").unwrap())).collect();
    let cache = Arc::new(ReadCache::new(64 << 10));
    let readers: Vec<ImageReader> = points
        .iter()
        .map(|p| {
            let layers =
                p.layers.iter().map(|&i| Layer { id: i as u32, index: indexes[i].clone() }).collect();
            ImageReader::new(layers, cache.clone())
        })
        .collect();
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (readers, points) = (&readers, &points);
            s.spawn(move || {
                let mut rng = Rng(0x5eed ^ t);
                for i in 0..150 {
                    let k = rng.below(readers.len() as u64) as usize;
                    let want = &points[k].image.bytes;
                    let (off, len) = random_range(&mut rng, want.len() as u64);
                    let len = len.min(100_000);
                    if let Err(e) = check_read(&readers[k], want, off, len, &format!("thread {t} read {i}")) {
                        panic!("{e}");
                    }
                }
            });
        }
    });
    let stats = &cache.stats;
    let misses = stats.misses.load(std::sync::atomic::Ordering::Relaxed);
    assert!(misses > 100, "the tiny cache should miss a lot, got {misses} misses");
}

/// Writes one uncompressed stream of a 64 KiB disk into `dir`.
fn small_stream(dir: &Path, name: &str, i: usize, ids: (String, String, bool), frames: Vec<Frame>) {
    let f = stream_file(name.into(), i, 65536, frames, ids, false, 4096);
    write_stream(&dir.join(name), &f);
}

/// The disk of point `key` read whole.
fn read_point(cat: &Catalog, key: &PointKey) -> Vec<u8> {
    let p = cat.domains[0].points.iter().find(|p| &p.key == key).unwrap_or_else(|| panic!("no {key:?}"));
    assert_eq!(p.status(), Status::Complete, "{key:?}");
    let reader = ImageReader::new(p.disks[0].layers.clone(), Arc::new(ReadCache::new(1 << 20)));
    let mut buf = vec![0; 65536];
    assert_eq!(reader.read_at(&mut buf, 0).unwrap(), 65536);
    buf
}

/// Checkpoints order by number, not by name (`virtnbdbackup.10` after `.9`, upstream
/// issue #17): with twelve overlapping incrementals every point reads like the model.
#[test]
fn twelve_incrementals_order_numerically() {
    let dir = TempDir::new().unwrap();
    let mut model = Model::default();
    let full =
        vec![Frame::Data { start: 0, bytes: vec![0xff; 4096] }, Frame::Zero { start: 4096, len: 61440 }];
    model.apply(&full, false);
    small_stream(dir.path(), "sda.full.data", 0, (cpt(0), String::new(), false), full);
    let mut want = vec![model.image(65536).bytes];
    for n in 1..=12usize {
        let frames = vec![Frame::Data { start: n as u64 * 100, bytes: vec![n as u8; 250] }];
        model.apply(&frames, true);
        want.push(model.image(65536).bytes);
        small_stream(dir.path(), &format!("sda.inc.{}.data", cpt(n)), n, (cpt(n), cpt(n - 1), true), frames);
    }
    let cat = Catalog::discover(dir.path()).unwrap();
    assert_eq!(cat.domains[0].points.len(), 13);
    for (n, want) in want.iter().enumerate() {
        assert!(read_point(&cat, &PointKey::Checkpoint(cpt(n))) == *want, "point {n}");
    }
}

/// An offline incremental (`checkpointName == parentCheckpoint`, named after that
/// checkpoint) sits on its checkpoint's chain; the next online incremental does not
/// include it.
#[test]
fn offline_incremental_sits_on_its_parent_checkpoint() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let full = vec![Frame::Data { start: 0, bytes: vec![1; 8192] }, Frame::Zero { start: 8192, len: 57344 }];
    let offline =
        vec![Frame::Data { start: 100, bytes: vec![2; 100] }, Frame::Zero { start: 4096, len: 1000 }];
    let inc = vec![Frame::Data { start: 150, bytes: vec![3; 100] }];
    let mut base = Model::default();
    base.apply(&full, false);
    let mut off_model = base.clone();
    off_model.apply(&offline, true);
    let mut inc_model = base.clone();
    inc_model.apply(&inc, true);
    small_stream(d, "sda.full.data", 0, (cpt(0), String::new(), false), full);
    small_stream(d, "sda.inc.virtnbdbackup.0.data", 1, (cpt(0), cpt(0), true), offline);
    small_stream(d, "sda.inc.virtnbdbackup.1.data", 2, (cpt(1), cpt(0), true), inc);
    let cat = Catalog::discover(d).unwrap();
    assert!(cat.warnings.is_empty(), "{:?}", cat.warnings);
    assert_eq!(cat.domains[0].points.len(), 3);
    assert!(read_point(&cat, &PointKey::Checkpoint(cpt(0))) == base.image(65536).bytes);
    let offline_key = PointKey::Derived { parent: cpt(0), offline: true, rank: 0 };
    assert!(read_point(&cat, &offline_key) == off_model.image(65536).bytes);
    assert!(read_point(&cat, &PointKey::Checkpoint(cpt(1))) == inc_model.image(65536).bytes);
}
