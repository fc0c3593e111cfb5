//! The one image reader: the bytes of a disk at a restore point, rebuilt lazily from its
//! chain of stream files. The mount, and later restore and verify, all read through it.
//!
//! A read finds its pieces in the [`ExtentMap`] by binary search, then fills holes and zero
//! extents with zeros, `pread`s plain payloads straight into the caller's buffer, and copies
//! out of decoded lz4 frames held in the shared [`ReadCache`] (decoding a frame on a miss).
//! A damaged piece fails the read that touches it, and only that read.

use std::io::Read;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use thiserror::Error;

use super::extent::{ExtentMap, Source};
use super::scan::{Lz4Frame, Stored, StreamIndex, read_full};
use crate::cache::{BlockKey, ReadCache};

/// Bytes per read of compressed data while decoding: a few lz4 blocks (64 KiB each) per
/// `pread`, so a 32 MiB frame costs about a hundred syscalls, not thousands.
const DECODE_READ: usize = 256 << 10;

/// A positional reader over `[pos, end)` of a file; `UnexpectedEof` if the file ends
/// first.
struct FileRange<'a> {
    file: &'a std::fs::File,
    pos: u64,
    end: u64,
}

impl Read for FileRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = (buf.len() as u64).min(self.end - self.pos) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += got as u64;
        Ok(got)
    }
}

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
}

impl ImageReader {
    /// The image of `layers` (oldest first, not empty). Its size is the newest layer's
    /// virtual size, as upstream restore uses since 1.9.16.
    pub fn new(layers: Vec<Layer>, cache: Arc<ReadCache>) -> ImageReader {
        let size = layers.last().map_or(0, |l| l.index.meta.virtual_size);
        let map = ExtentMap::build(layers.iter().map(|l| &*l.index), size);
        ImageReader { layers, map, cache }
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
                Some(map) => ImageReader { layers: layers.clone(), map, cache: cache.clone() },
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
        Ok((end - off) as usize)
    }

    fn pread(&self, index: &StreamIndex, out: &mut [u8], at: u64) -> Result<(), ReadError> {
        let n = read_full(&index.file, out, at).map_err(|source| ReadError::Io {
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
        let first = frames.partition_point(|f| f.extent_off + f.len <= want.start);
        for f in &frames[first..] {
            if f.extent_off >= want.end {
                break;
            }
            let key = BlockKey { file: layer.id, frame: f.file_off };
            let data = self.cache.get_or_load(key, f.len as usize, || self.decode(&layer.index, f))?;
            let r: Range<u64> = want.start.max(f.extent_off)..want.end.min(f.extent_off + f.len);
            out[(r.start - rel) as usize..(r.end - rel) as usize]
                .copy_from_slice(&data[(r.start - f.extent_off) as usize..(r.end - f.extent_off) as usize]);
        }
        Ok(())
    }

    /// Decodes one lz4 frame, checking its block and content checksums and its size.
    /// Decodes one lz4 frame straight from the stream file (no copy of the compressed
    /// bytes), checking its block and content checksums and its size.
    fn decode(&self, index: &StreamIndex, f: &Lz4Frame) -> Result<Vec<u8>, ReadError> {
        let src = std::io::BufReader::with_capacity(
            DECODE_READ,
            FileRange { file: &index.file, pos: f.file_off, end: f.file_off + f.comp_len },
        );
        let bad = |source: std::io::Error| {
            let len = index.file.metadata().map_or(u64::MAX, |m| m.len());
            if source.kind() == std::io::ErrorKind::UnexpectedEof && len < f.file_off + f.comp_len {
                ReadError::Truncated { path: index.path.clone(), offset: len }
            } else {
                ReadError::Decode { path: index.path.clone(), offset: f.file_off, source }
            }
        };
        let mut dec = lz4_flex::frame::FrameDecoder::new(src);
        // Into spare capacity: no zeroing of a buffer about to be overwritten.
        let mut out = Vec::with_capacity(f.len as usize);
        (&mut dec).take(f.len).read_to_end(&mut out).map_err(bad)?;
        if out.len() as u64 != f.len {
            return Err(bad(std::io::Error::other("frame holds less data than its extent")));
        }
        // Reading past the content makes the decoder check the end mark and content
        // checksum, and fails if the frame holds more than the index says.
        let mut extra = [0u8; 1];
        match dec.read(&mut extra).map_err(bad)? {
            0 => {}
            _ => return Err(bad(std::io::Error::other("frame holds more data than its extent"))),
        }
        self.cache.stats.bytes_read.fetch_add(f.comp_len, Ordering::Relaxed);
        self.cache.stats.bytes_decoded.fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }
}
