//! The one image reader: the bytes of a disk at a restore point, rebuilt lazily from its
//! chain of stream files. The mount, and later restore and verify, all read through it.
//!
//! A read finds its pieces in the [`ExtentMap`] by binary search, then fills holes and zero
//! extents with zeros, `pread`s plain payloads straight into the caller's buffer, and copies
//! out of decoded lz4 frames held in the shared [`ReadCache`] (decoding a frame on a miss).
//! A damaged piece fails the read that touches it, and only that read. A read that
//! continues the previous one (a sequential reader) queues the frames after it for the
//! cache's prefetch thread.
//!
//! Every byte of a stream file comes in through the reader its index holds open (a
//! [`crate::source::ReadAt`] of the source the file is in), so a test that wraps that
//! reader to fail at chosen offsets checks that a read error from the disk under SOURCE
//! fails only the request that met it.
//! A file changed under an open mount: deleted or replaced by another file (a rename over
//! it), the reader keeps the old file open and keeps serving its bytes; truncated in place,
//! a read past its new end fails with [`ReadError::Truncated`] and the rest still reads.

use std::io::Read;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

use super::extent::{ExtentMap, Source};
use super::io::{RangeRead, read_full};
use super::lz4::Lz4Frame;
use super::scan::{Stored, StreamIndex};
use crate::cache::{BlockKey, CacheStats, ReadCache};

/// Bytes per read of compressed data while decoding: a few lz4 blocks (64 KiB each) per
/// `pread`, so a 32 MiB frame costs about a hundred syscalls, not thousands.
const DECODE_READ: usize = 256 << 10;

/// How far past a sequential read the lz4 frames are decoded ahead, in the background:
/// one frame of the largest size upstream writes (32 MiB), so that the next frame is
/// being decoded while the FUSE threads serve this one.
const PREFETCH_AHEAD: u64 = 32 << 20;

/// Caches smaller than this decode nothing ahead: the frame being read (up to 32 MiB as
/// upstream writes them) and the frames queued in the `PREFETCH_AHEAD` bytes after it (up
/// to two more) must fit with room to spare, or a prefetch would evict the frame the
/// reader is in and it would be decoded again.
const PREFETCH_MIN_CACHE: usize = 4 * PREFETCH_AHEAD as usize;

/// A read that starts this close to where the previous one ended continues it: the
/// kernel's readahead requests (up to 1 MiB each) reach the FUSE threads, and so the
/// reader, a little out of order.
const SEQUENTIAL_SLACK: u64 = 4 << 20;

/// A read that could not be served.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("{path}: damaged stream; disk offset {disk_offset} cannot be read ({reason})")]
    Damaged { path: PathBuf, disk_offset: u64, reason: String },
    #[error("{path}: read failed at offset {offset}")]
    Io {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: file ends at offset {offset}, inside a payload (truncated since the scan?)")]
    Truncated { path: PathBuf, offset: u64 },
    #[error("{path}: corrupt lz4 frame at offset {offset}")]
    Decode {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

impl ReadError {
    /// The file and byte offset the error is about (for damage: the scan's finding).
    pub fn location(&self) -> (&std::path::Path, Option<u64>) {
        match self {
            ReadError::Damaged { path, .. } => (path, None),
            ReadError::Io { path, offset, .. }
            | ReadError::Truncated { path, offset }
            | ReadError::Decode { path, offset, .. } => (path, Some(*offset)),
        }
    }

    /// The errno a FUSE read reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            // Keep the OS's own code (EIO from the disk, ESTALE from NFS, ...).
            ReadError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ReadError::Damaged { .. } | ReadError::Truncated { .. } | ReadError::Decode { .. } => libc::EIO,
        }
    }
}

/// One stream file of a chain, with the number that keys its frames in the cache.
#[derive(Debug, Clone)]
pub struct Layer {
    pub id: u32,
    pub index: Arc<StreamIndex>,
}

/// See the module note.
pub struct ImageReader {
    layers: Vec<Layer>,
    map: ExtentMap,
    cache: Arc<ReadCache>,
    /// Where the last read ended (`u64::MAX` before the first): a read starting near it
    /// is sequential, and its next lz4 frames are decoded ahead.
    last_end: AtomicU64,
}

impl ImageReader {
    /// The image of `layers` (oldest first, not empty). Its size is the newest layer's
    /// virtual size, as upstream restore uses since 1.9.16.
    pub fn new(layers: Vec<Layer>, cache: Arc<ReadCache>) -> ImageReader {
        let size = layers.last().map_or(0, |l| l.index.meta.virtual_size);
        let map = ExtentMap::build(layers.iter().map(|l| &*l.index), size);
        ImageReader::with_map(layers, map, cache)
    }

    fn with_map(layers: Vec<Layer>, map: ExtentMap, cache: Arc<ReadCache>) -> ImageReader {
        ImageReader { layers, map, cache, last_end: AtomicU64::new(u64::MAX) }
    }

    /// Readers for many chains, sharing work: a chain that is another one plus a layer
    /// (the next restore point) extends that one's map instead of rebuilding it.
    pub fn many(chains: &[Vec<Layer>], cache: &Arc<ReadCache>) -> Vec<ImageReader> {
        let mut out: Vec<ImageReader> = Vec::with_capacity(chains.len());
        let mut by_chain: std::collections::HashMap<Vec<u32>, usize> = std::collections::HashMap::new();
        for layers in chains {
            let ids: Vec<u32> = layers.iter().map(|l| l.id).collect();
            let parent = ids.len().checked_sub(1).and_then(|k| by_chain.get(&ids[..k]).copied());
            let size = layers.last().map_or(0, |l| l.index.meta.virtual_size);
            let map = parent.and_then(|p| {
                let last = layers.last().expect("a parent means at least two layers");
                out[p].map.extend(layers.len() - 1, &last.index, size)
            });
            let reader = match map {
                Some(map) => ImageReader::with_map(layers.clone(), map, cache.clone()),
                None => ImageReader::new(layers.clone(), cache.clone()),
            };
            by_chain.insert(ids, out.len());
            out.push(reader);
        }
        out
    }

    pub fn size(&self) -> u64 {
        self.map.size()
    }

    pub fn map(&self) -> &ExtentMap {
        &self.map
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Fills `buf` from image offset `off`; returns the bytes read (short only at EOF).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, ReadError> {
        let end = off.saturating_add(buf.len() as u64).min(self.size());
        if off >= end {
            return Ok(0);
        }
        for piece in self.map.pieces(off..end) {
            let (s, e) = (piece.start.max(off), piece.end.min(end));
            let out = &mut buf[(s - off) as usize..(e - off) as usize];
            match piece.src {
                Source::Hole | Source::Zero => out.fill(0),
                Source::Damaged { layer } => {
                    let index = &self.layers[layer as usize].index;
                    let reason = index.damage.as_ref().map_or_else(String::new, |d| d.error.to_string());
                    return Err(ReadError::Damaged { path: index.path.clone(), disk_offset: s, reason });
                }
                Source::Data { layer, extent } => {
                    let layer = &self.layers[layer as usize];
                    let ext = &layer.index.extents[extent as usize];
                    match &ext.stored {
                        Stored::Plain { file_off } => {
                            self.pread(&layer.index, out, file_off + (s - ext.start))?
                        }
                        Stored::Lz4(frames) => self.read_lz4(layer, frames, s - ext.start, out)?,
                        Stored::Zero => unreachable!("invariant: zero extents map to Source::Zero"),
                    }
                }
            }
        }
        let prev = self.last_end.swap(end, Ordering::Relaxed);
        if prev != u64::MAX
            && off.abs_diff(prev) <= SEQUENTIAL_SLACK
            && self.cache.limit() >= PREFETCH_MIN_CACHE
        {
            self.prefetch(end);
        }
        Ok((end - off) as usize)
    }

    /// Queues the decode of the lz4 frames in the `PREFETCH_AHEAD` bytes from `from`
    /// (holes and plain payloads need none).
    fn prefetch(&self, from: u64) {
        let to = from.saturating_add(PREFETCH_AHEAD).min(self.size());
        if from >= to {
            return;
        }
        for piece in self.map.pieces(from..to) {
            let Source::Data { layer, extent } = piece.src else { continue };
            let layer = &self.layers[layer as usize];
            let ext = &layer.index.extents[extent as usize];
            let Stored::Lz4(frames) = &ext.stored else { continue };
            let want = piece.start.max(from) - ext.start..piece.end.min(to) - ext.start;
            for &f in frames_in(frames, want) {
                let (index, cache) = (layer.index.clone(), self.cache.clone());
                let key = BlockKey { file: layer.id, frame: f.file_off };
                self.cache.prefetch(key, f.len as usize, move |buf| decode(&index, &f, &cache.stats, buf));
            }
        }
    }

    fn pread(&self, index: &StreamIndex, out: &mut [u8], at: u64) -> Result<(), ReadError> {
        let n = read_full(&*index.file, out, at).map_err(|source| ReadError::Io {
            path: index.path.clone(),
            offset: at,
            source,
        })?;
        self.cache.stats.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        if n < out.len() {
            return Err(ReadError::Truncated { path: index.path.clone(), offset: at + n as u64 });
        }
        Ok(())
    }

    /// Copies extent bytes `[rel, rel + out.len())` out of the decoded lz4 frames.
    fn read_lz4(
        &self,
        layer: &Layer,
        frames: &[Lz4Frame],
        rel: u64,
        out: &mut [u8],
    ) -> Result<(), ReadError> {
        let want = rel..rel + out.len() as u64;
        for f in frames_in(frames, want.clone()) {
            let key = BlockKey { file: layer.id, frame: f.file_off };
            let data = self
                .cache
                .get_or_load(key, f.len as usize, |buf| decode(&layer.index, f, &self.cache.stats, buf))?;
            let r: Range<u64> = want.start.max(f.extent_off)..want.end.min(f.extent_off + f.len);
            out[(r.start - rel) as usize..(r.end - rel) as usize]
                .copy_from_slice(&data[(r.start - f.extent_off) as usize..(r.end - f.extent_off) as usize]);
        }
        Ok(())
    }
}

/// The frames of an extent (sorted, tiling it) that hold bytes of `want`, extent-relative:
/// found by binary search.
fn frames_in(frames: &[Lz4Frame], want: Range<u64>) -> impl Iterator<Item = &Lz4Frame> {
    let first = frames.partition_point(|f| f.extent_off + f.len <= want.start);
    frames[first..].iter().take_while(move |f| f.extent_off < want.end)
}

/// Decodes one lz4 frame straight from the stream file (no copy of the compressed
/// bytes), checking its block and content checksums and its size.
fn decode(
    index: &StreamIndex,
    f: &Lz4Frame,
    stats: &CacheStats,
    mut out: Vec<u8>,
) -> Result<Vec<u8>, ReadError> {
    let src = std::io::BufReader::with_capacity(
        DECODE_READ,
        RangeRead { file: &*index.file, pos: f.file_off, end: f.file_off + f.comp_len },
    );
    let bad = |source: std::io::Error| {
        let len = index.file.size().unwrap_or(u64::MAX);
        if source.kind() == std::io::ErrorKind::UnexpectedEof && len < f.file_off + f.comp_len {
            ReadError::Truncated { path: index.path.clone(), offset: len }
        } else if source.raw_os_error().is_some() {
            // The disk failed, not the frame: keep its errno, do not call it corrupt.
            ReadError::Io { path: index.path.clone(), offset: f.file_off, source }
        } else {
            ReadError::Decode { path: index.path.clone(), offset: f.file_off, source }
        }
    };
    let mut dec = lz4_flex::frame::FrameDecoder::new(src);
    // A reused buffer is overwritten in place: only bytes past its old length are zeroed.
    out.resize(f.len as usize, 0);
    dec.read_exact(&mut out).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            bad(std::io::Error::new(e.kind(), "frame holds less data than its extent"))
        }
        _ => bad(e),
    })?;
    // Reading past the content makes the decoder check the end mark and content
    // checksum, and fails if the frame holds more than the index says.
    let mut extra = [0u8; 1];
    match dec.read(&mut extra).map_err(bad)? {
        0 => {}
        _ => return Err(bad(std::io::Error::other("frame holds more data than its extent"))),
    }
    stats.bytes_read.fetch_add(f.comp_len, Ordering::Relaxed);
    stats.bytes_decoded.fetch_add(out.len() as u64, Ordering::Relaxed);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::cache::ReadCache;
    use crate::chain::scan::Stored;
    use crate::chain::{ImageReader, Layer, StreamIndex, StreamMeta, StreamWriter};
    use crate::source::ReadAt;

    /// A disk that fails reads (EIO) touching `bad`, a range of file offsets, while armed.
    #[derive(Debug)]
    struct Failing {
        file: Arc<dyn ReadAt>,
        bad: Range<u64>,
        armed: AtomicBool,
    }

    impl ReadAt for Failing {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            let end = offset + buf.len() as u64;
            if self.armed.load(Ordering::Relaxed) && offset < self.bad.end && self.bad.start < end {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            self.file.read_at(buf, offset)
        }

        fn size(&self) -> std::io::Result<u64> {
            self.file.size()
        }

        fn modified(&self) -> Option<std::time::SystemTime> {
            self.file.modified()
        }
    }

    /// A full stream of 1 MiB with data at [0, 256 KiB) and [512 KiB, 768 KiB), lz4 or
    /// plain; the index of its file in `dir` and the image.
    fn stream(dir: &std::path::Path, lz4: bool) -> (Arc<StreamIndex>, Vec<u8>) {
        const K: usize = 1024;
        let mut image = vec![0u8; 1024 * K];
        for (i, b) in image.iter_mut().enumerate() {
            *b = (i * 13 % 251) as u8 | 1;
        }
        image[256 * K..512 * K].fill(0);
        image[768 * K..].fill(0);
        let meta = StreamMeta::full("sda", image.len() as u64, 512 * K as u64).lz4(lz4);
        // 64 KiB requests: several lz4 frames per extent.
        let mut w = StreamWriter::new(Vec::new(), &meta, 64 * K as u64).unwrap();
        w.data(0, &image[..256 * K]).unwrap();
        w.zero(256 * K as u64, 256 * K as u64).unwrap();
        w.data(512 * K as u64, &image[512 * K..768 * K]).unwrap();
        w.zero(768 * K as u64, 256 * K as u64).unwrap();
        let path = dir.join(if lz4 { "z.full.data" } else { "p.full.data" });
        std::fs::write(&path, w.finish().unwrap()).unwrap();
        (Arc::new(StreamIndex::open(&path, "sda").unwrap()), image)
    }

    /// The file range holding the second data extent's bytes (its payload, or its frames).
    fn second_extent(index: &StreamIndex) -> Range<u64> {
        let ext = index.extents.iter().filter(|e| !matches!(e.stored, Stored::Zero)).nth(1).unwrap();
        match &ext.stored {
            Stored::Plain { file_off } => *file_off..file_off + (ext.end() - ext.start),
            Stored::Lz4(frames) => {
                let (a, b) = (frames.first().unwrap(), frames.last().unwrap());
                a.file_off..b.file_off + b.comp_len
            }
            Stored::Zero => unreachable!(),
        }
    }

    /// A read error from the disk fails only the reads that need the failing bytes, with
    /// the disk's errno and a message naming the file and offset; every other read, and
    /// the same read once the disk recovers, gets the right bytes.
    #[test]
    fn a_disk_read_error_fails_only_the_reads_that_touch_it() {
        let dir = tempfile::tempdir().unwrap();
        for lz4 in [false, true] {
            let (plain, image) = stream(dir.path(), lz4);
            let bad = second_extent(&plain);
            let disk = Arc::new(Failing {
                file: plain.file.clone(),
                bad: bad.clone(),
                armed: AtomicBool::new(false),
            });
            let index = Arc::new(StreamIndex::scan(plain.path.clone(), disk.clone(), Some("sda")).unwrap());
            // The disk fails once the file is indexed (the scan reads lz4 frame headers).
            disk.armed.store(true, Ordering::Relaxed);
            let reader = ImageReader::new(
                vec![Layer { id: 1, index: index.clone() }],
                Arc::new(ReadCache::new(1 << 20)),
            );
            let read = |off: usize, len: usize| {
                let mut buf = vec![0u8; len];
                reader.read_at(&mut buf, off as u64).map(|_| buf)
            };
            const K: usize = 1024;
            for (off, len) in
                [(0, 256 * K), (100, 300 * K), (256 * K, 256 * K), (768 * K, 256 * K), (500 * K, 12 * K)]
            {
                assert_eq!(read(off, len).unwrap(), image[off..off + len], "lz4 {lz4}: {off}+{len}");
            }
            for (off, len) in [(512 * K, 4096), (700 * K, 100 * K), (0, 1024 * K)] {
                let err = read(off, len).unwrap_err();
                assert_eq!(err.errno(), libc::EIO, "lz4 {lz4}: {off}+{len}: {err}");
                let msg = err.to_string();
                let (path, at) = err.location();
                assert_eq!(path, index.path, "{msg}");
                let at = at.expect("an offset");
                assert!(bad.contains(&at) && msg.contains(&at.to_string()), "lz4 {lz4}: {msg} ({bad:?})");
                assert!(matches!(err, super::ReadError::Io { .. }), "lz4 {lz4}: not a disk error: {msg}");
            }
            disk.armed.store(false, Ordering::Relaxed);
            assert_eq!(read(0, 1024 * K).unwrap(), image, "lz4 {lz4}: after the disk recovered");
        }
    }

    /// A read that continues the previous one has the lz4 frames after it decoded in the
    /// background, so the next reads find them cached; a first read alone queues nothing.
    #[test]
    fn sequential_reads_decode_the_next_frames_ahead() {
        const K: usize = 1024;
        let dir = tempfile::tempdir().unwrap();
        let (index, image) = stream(dir.path(), true);
        let cache = Arc::new(ReadCache::new(super::PREFETCH_MIN_CACHE));
        let reader = ImageReader::new(vec![Layer { id: 1, index }], cache.clone());
        let read = |off: usize, len: usize| {
            let mut buf = vec![0u8; len];
            reader.read_at(&mut buf, off as u64).unwrap();
            assert_eq!(buf, image[off..off + len], "{off}+{len}");
        };
        let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        read(0, 64 * K);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(count(&cache.stats.prefetched), 0, "a lone read is not sequential");
        read(64 * K, 64 * K);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while count(&cache.stats.prefetched) == 0 {
            assert!(std::time::Instant::now() < deadline, "nothing was decoded ahead");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // The frame right after the read was queued first: the next read finds it.
        let misses = count(&cache.stats.misses);
        read(128 * K, 64 * K);
        assert_eq!(count(&cache.stats.misses), misses, "the next frame was decoded again");
    }
}
