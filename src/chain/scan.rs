//! One pass over a stream file that indexes where every extent's bytes live.
//!
//! The scan reads headers only (payloads are skipped by offset), so indexing a set costs
//! a few reads per frame, not a read of the data. For a compressed stream the trailer at
//! EOF gives each data frame's lz4 frame sizes; only extents split into several lz4 frames
//! need one more small read per frame to learn its uncompressed size from the lz4 header.
//!
//! Invariants of a [`StreamIndex`] (checked here, relied on by `extent` and `reader`):
//! extents are sorted, do not overlap, and lie inside `[0, virtual_size)`; every payload
//! range lies inside the file; every lz4 frame's uncompressed range lies inside its extent.
//!
//! Damage does not fail the whole stream. When the frame walk breaks at some file offset,
//! the extents read so far stay usable and [`Damage`] records the first disk offset the
//! stream can no longer speak for: reads at or past it fail with EIO, reads before it work.
//! Only a stream whose metadata cannot be read at all is an error.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::frame::{FRAME_LEN, FrameHeader, FrameKind, parse_header};
pub use super::io::ScanError;
use super::io::{RangeRead, read_exact, read_full};
pub use super::lz4::Lz4Frame;
use super::lz4::{self, MAX_LZ4_FRAME};
use super::meta::{MAX_META_LEN, MAX_TRAILER_LEN, StreamMeta, parse_trailer};
use crate::source::{LocalSource, ReadAt, Source};

/// Where the bytes of one stored extent are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A `zero` frame: the range reads as zeros.
    Zero,
    /// Uncompressed payload at this file offset.
    Plain { file_off: u64 },
    /// lz4 frames, in order, tiling the extent.
    Lz4(Box<[Lz4Frame]>),
}

/// One `data` or `zero` frame: the disk range `[start, start + len)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredExtent {
    pub start: u64,
    pub len: u64,
    pub stored: Stored,
}

impl StoredExtent {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The first disk offset a damaged stream cannot speak for, and why.
#[derive(Debug)]
pub struct Damage {
    pub from: u64,
    pub error: ScanError,
}

/// Whether a data file is a stream or a plain raw image (`-t raw`, raw-format disks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Stream,
    Raw,
}

/// The index of one data file. Holds the file open (read-only) for the reader.
#[derive(Debug)]
pub struct StreamIndex {
    /// The file as messages name it.
    pub path: PathBuf,
    pub file: Arc<dyn ReadAt>,
    pub file_len: u64,
    pub format: Format,
    pub meta: StreamMeta,
    pub extents: Vec<StoredExtent>,
    pub damage: Option<Damage>,
}

impl StreamIndex {
    /// Bytes of disk data this file stores (data extents only).
    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().filter(|e| e.stored != Stored::Zero).map(|e| e.len).sum()
    }

    /// The first broken invariant of the module note, if any. The scan guarantees none
    /// (debug builds assert it after every scan); the fuzz targets and property tests
    /// call it on indexes of hostile bytes.
    pub fn broken_invariant(&self) -> Option<String> {
        let mut prev_end = 0u64;
        for (i, e) in self.extents.iter().enumerate() {
            let end = e.start.checked_add(e.len).filter(|&end| end <= self.meta.virtual_size);
            let Some(end) = end.filter(|_| e.len > 0 && e.start >= prev_end) else {
                return Some(format!(
                    "extent {i} ({}+{}) is empty, unsorted or past the virtual size",
                    e.start, e.len
                ));
            };
            prev_end = end;
            let inside = |off: u64, len: u64| off.checked_add(len).is_some_and(|x| x <= self.file_len);
            match &e.stored {
                Stored::Zero => {}
                Stored::Plain { file_off } if inside(*file_off, e.len) => {}
                Stored::Plain { .. } => return Some(format!("extent {i}: payload runs past the file")),
                Stored::Lz4(frames) => {
                    let mut at = 0u64;
                    for f in frames.iter() {
                        if f.extent_off != at || f.len > MAX_LZ4_FRAME || !inside(f.file_off, f.comp_len) {
                            return Some(format!("extent {i}: lz4 frame {f:?} misplaced"));
                        }
                        at += f.len;
                    }
                    if at != e.len {
                        return Some(format!("extent {i}: lz4 frames hold {at} of {} bytes", e.len));
                    }
                }
            }
        }
        None
    }

    /// Opens the local file `path` read-only and indexes it. `raw_disk` names the disk of
    /// a raw image, which has no metadata of its own.
    /// A full or copy backup may be a raw image (`-t raw`, raw-format disks).
    pub fn open(path: &Path, raw_disk: &str) -> Result<StreamIndex, ScanError> {
        let file = open_local(path)?;
        Self::scan(path.to_owned(), file, Some(raw_disk))
    }

    /// Opens a local file that must be a stream (incrementals and differentials are never
    /// raw, so a damaged first header must not turn one into a raw image).
    pub fn open_stream(path: &Path) -> Result<StreamIndex, ScanError> {
        Self::scan(path.to_owned(), open_local(path)?, None)
    }

    /// Indexes `file`, named `path` in messages: a stream, or when `raw_disk` is given
    /// and the file does not start like one, a raw image of that disk.
    pub fn scan(
        path: PathBuf,
        file: Arc<dyn ReadAt>,
        raw_disk: Option<&str>,
    ) -> Result<StreamIndex, ScanError> {
        let io_err = |offset| {
            let path = path.clone();
            move |source| ScanError::Io { path, offset, source }
        };
        let file_len = file.size().map_err(io_err(0))?;
        let mut magic = [0u8; 5];
        let n = read_full(&*file, &mut magic, 0).map_err(io_err(0))?;
        let index = match raw_disk {
            Some(disk) if n < magic.len() || &magic != b"meta " => scan_raw(path, file, file_len, disk),
            _ => scan_stream(path, file, file_len),
        }?;
        debug_assert_eq!(index.broken_invariant(), None, "{}", index.path.display());
        Ok(index)
    }
}

/// Opens a local file by its whole path: the folder it is in is the source.
fn open_local(path: &Path) -> Result<Arc<dyn ReadAt>, ScanError> {
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => (dir, Path::new(name)),
        _ => (Path::new(""), path),
    };
    LocalSource::new(dir).open(name).map_err(|e| ScanError::opening(path, e))
}

fn read_header(path: &Path, file: &dyn ReadAt, offset: u64) -> Result<FrameHeader, ScanError> {
    let mut buf = [0u8; FRAME_LEN];
    read_exact(path, file, &mut buf, offset)?;
    parse_header(&buf).map_err(|source| ScanError::BadFrame { path: path.to_owned(), offset, source })
}

fn expect_crlf(path: &Path, file: &dyn ReadAt, offset: u64) -> Result<(), ScanError> {
    let mut crlf = [0u8; 2];
    read_exact(path, file, &mut crlf, offset)?;
    if &crlf != b"\r\n" {
        return Err(ScanError::invalid(path, offset, "missing CRLF after payload"));
    }
    Ok(())
}

fn scan_raw(
    path: PathBuf,
    file: Arc<dyn ReadAt>,
    file_len: u64,
    disk: &str,
) -> Result<StreamIndex, ScanError> {
    let extents = raw_extents(&*file, file_len).map_err(|source| ScanError::Io {
        path: path.clone(),
        offset: 0,
        source,
    })?;
    let data_size = extents.iter().map(|e| e.len).sum();
    let meta = StreamMeta {
        virtual_size: file_len,
        data_size,
        date: String::new(),
        disk_name: disk.to_owned(),
        disk_format: Some("raw".into()),
        checkpoint_name: String::new(),
        parent_checkpoint: String::new(),
        incremental: false,
        compressed: None,
        stream_version: 0,
    };
    Ok(StreamIndex { path, file, file_len, format: Format::Raw, meta, extents, damage: None })
}

/// The data extents of a raw file: the data runs its source reports.
fn raw_extents(file: &dyn ReadAt, file_len: u64) -> io::Result<Vec<StoredExtent>> {
    let runs = file.data_runs(file_len)?;
    Ok(runs
        .into_iter()
        .map(|r| StoredExtent {
            start: r.start,
            len: r.end - r.start,
            stored: Stored::Plain { file_off: r.start },
        })
        .collect())
}

fn scan_stream(path: PathBuf, file: Arc<dyn ReadAt>, file_len: u64) -> Result<StreamIndex, ScanError> {
    let head = read_header(&path, &*file, 0)?;
    if head.kind != FrameKind::Meta {
        return Err(ScanError::invalid(&path, 0, "first frame is not meta"));
    }
    if head.length > MAX_META_LEN || FRAME_LEN as u64 + head.length > file_len {
        return Err(ScanError::invalid(&path, 22, format!("metadata length {} is implausible", head.length)));
    }
    let mut json = vec![0u8; head.length as usize];
    read_exact(&path, &*file, &mut json, FRAME_LEN as u64)?;
    let meta = StreamMeta::parse(&json).map_err(|source| ScanError::BadMeta {
        path: path.clone(),
        offset: FRAME_LEN as u64,
        source,
    })?;
    let body = FRAME_LEN as u64 + head.length;
    expect_crlf(&path, &*file, body)?;

    let mut index =
        StreamIndex { path, file, file_len, format: Format::Stream, meta, extents: Vec::new(), damage: None };
    let (payloads, trailer_error) = match index.meta.compressed {
        None => (Payloads::Plain { body_end: file_len }, None),
        Some(_) => match read_trailer(&index) {
            Ok((sizes, body_end)) => (Payloads::Trailer { sizes, body_end }, None),
            // Without a trailer the lz4 frames are found by walking them (FORMAT.md §1.9).
            Err(e) => (Payloads::Walk, Some(e)),
        },
    };
    let mut frontier = 0;
    let mut result = walk_frames(&mut index, body + 2, &payloads, &mut frontier);
    if let (Err(_), Payloads::Trailer { .. }) = (&result, &payloads) {
        // A trailer that parses but does not fit the frames: walking the lz4 frames may
        // still find all of them. Keep whichever reading gets further.
        let with_trailer = std::mem::take(&mut index.extents);
        let mut walked_frontier = 0;
        let walked = walk_frames(&mut index, body + 2, &Payloads::Walk, &mut walked_frontier);
        let reach = |e: &[StoredExtent]| e.last().map_or(0, StoredExtent::end);
        if walked.is_ok() || reach(&index.extents) > reach(&with_trailer) {
            frontier = walked_frontier;
            let trailer_error = std::mem::replace(&mut result, walked).err();
            if result.is_ok() {
                let error = trailer_error.expect("the trailer walk failed");
                index.damage = Some(Damage { from: index.meta.virtual_size, error });
                return Ok(index);
            }
        } else {
            index.extents = with_trailer;
        }
    }
    if let Err(error) = result {
        index.damage = Some(Damage { from: frontier, error });
    } else if let Some(error) = trailer_error {
        // Every frame was found without the trailer: nothing is unreadable, but the file
        // is not intact.
        index.damage = Some(Damage { from: index.meta.virtual_size, error });
    }
    Ok(index)
}

/// Reads the trailer from EOF; returns it and the file offset where the trailer starts
/// (where the `stop` frame must end).
fn read_trailer(index: &StreamIndex) -> Result<(Vec<Vec<u64>>, u64), ScanError> {
    let (path, len) = (&index.path, index.file_len);
    let min = FRAME_LEN as u64 + 2;
    if len < min {
        return Err(ScanError::Truncated { path: path.clone(), offset: len });
    }
    let comp_at = len - FRAME_LEN as u64;
    let comp = read_header(path, &*index.file, comp_at)?;
    if comp.kind != FrameKind::Comp {
        return Err(ScanError::invalid(path, comp_at, "compressed stream does not end in a comp frame"));
    }
    if comp.length > MAX_TRAILER_LEN || comp.length > comp_at - 2 {
        return Err(ScanError::invalid(
            path,
            comp_at + 22,
            format!("trailer length {} is implausible", comp.length),
        ));
    }
    let json_at = comp_at - 2 - comp.length;
    expect_crlf(path, &*index.file, comp_at - 2)?;
    // Streamed from the file: its memory grows with the frames it lists, and those must
    // fit in the bytes before it.
    let json = io::BufReader::new(RangeRead { file: &*index.file, pos: json_at, end: comp_at - 2 });
    let trailer = parse_trailer(json, json_at / lz4::MIN_FRAME_LEN)
        .map_err(|source| ScanError::BadTrailer { path: path.clone(), offset: json_at, source })?;
    Ok((trailer, json_at))
}

/// How to find where each data payload ends.
enum Payloads {
    /// Uncompressed: a payload is as long as its extent; the body ends at `body_end`.
    Plain { body_end: u64 },
    /// Compressed, with the trailer's lz4 frame sizes per data frame.
    Trailer { sizes: Vec<Vec<u64>>, body_end: u64 },
    /// Compressed, trailer lost: walk the lz4 frames; where the body ends is unknown.
    Walk,
}

/// Indexes the body's frames. On error, `frontier` is the first disk offset the stream
/// can no longer vouch for: the start of the broken frame when its header was read
/// (frames are sorted, so nothing before it changed), else the end of the last good one.
fn walk_frames(
    index: &mut StreamIndex,
    mut pos: u64,
    payloads: &Payloads,
    frontier: &mut u64,
) -> Result<(), ScanError> {
    let path = index.path.clone();
    let vsize = index.meta.virtual_size;
    let mut data_total = 0u64;
    let mut data_frames = 0usize;
    // End of the previous frame, zero-length ones included: frames must not go backwards.
    let mut last_end = 0u64;
    loop {
        *frontier = last_end;
        let h = read_header(&path, &*index.file, pos)?;
        let at = pos;
        pos += FRAME_LEN as u64;
        match h.kind {
            FrameKind::Stop => break,
            FrameKind::Meta | FrameKind::Comp => {
                return Err(ScanError::invalid(
                    &path,
                    at,
                    format!("unexpected {:?} frame in the body", h.kind),
                ));
            }
            FrameKind::Data | FrameKind::Zero => {}
        }
        let end = h.start.checked_add(h.length).filter(|&e| e <= vsize).ok_or_else(|| {
            ScanError::invalid(
                &path,
                at,
                format!("extent {}+{} runs past the virtual size {vsize}", h.start, h.length),
            )
        })?;
        if h.start < last_end {
            return Err(ScanError::invalid(
                &path,
                at,
                format!("extent at {} overlaps or precedes the one before", h.start),
            ));
        }
        *frontier = h.start;
        let stored = if h.kind == FrameKind::Zero {
            Stored::Zero
        } else {
            data_total = data_total.saturating_add(h.length);
            let payload = pos;
            let stored = match payloads {
                &Payloads::Plain { body_end } => {
                    pos = pos
                        .checked_add(h.length)
                        .filter(|&p| p <= body_end)
                        .ok_or_else(|| ScanError::Truncated { path: path.clone(), offset: body_end })?;
                    Stored::Plain { file_off: payload }
                }
                Payloads::Trailer { sizes, body_end } => {
                    let sizes = sizes.get(data_frames).ok_or_else(|| {
                        ScanError::invalid(&path, at, "more data frames than trailer entries")
                    })?;
                    let frames = lz4_frames(index, payload, h.length, sizes, at)?;
                    pos = frames.last().map_or(payload, |f| f.file_off + f.comp_len);
                    if pos > *body_end {
                        return Err(ScanError::invalid(
                            &path,
                            at,
                            "compressed payload runs into the trailer",
                        ));
                    }
                    Stored::Lz4(frames)
                }
                Payloads::Walk => {
                    let frames = lz4::walk(&path, &*index.file, payload, h.length)?;
                    pos = frames.last().map_or(payload, |f| f.file_off + f.comp_len);
                    Stored::Lz4(frames.into_boxed_slice())
                }
            };
            data_frames += 1;
            expect_crlf(&path, &*index.file, pos)?;
            pos += 2;
            stored
        };
        last_end = end;
        if h.length > 0 {
            index.extents.push(StoredExtent { start: h.start, len: end - h.start, stored });
        }
    }
    let body_end = match payloads {
        Payloads::Plain { body_end } | Payloads::Trailer { body_end, .. } => *body_end,
        Payloads::Walk => pos,
    };
    if pos != body_end {
        return Err(ScanError::invalid(
            &path,
            pos,
            format!("{} unexpected bytes after the stop frame", body_end as i128 - pos as i128),
        ));
    }
    if let Payloads::Trailer { sizes, .. } = payloads
        && sizes.len() != data_frames
    {
        return Err(ScanError::invalid(&path, pos, "trailer has more entries than data frames"));
    }
    if data_total != index.meta.data_size {
        // The frames are intact; the metadata disagrees with them. No range is unreadable,
        // but the stream is not what its writer said it was.
        index.damage = Some(Damage {
            from: vsize,
            error: ScanError::invalid(
                &path,
                FRAME_LEN as u64,
                format!("dataSize says {} bytes, data frames hold {data_total}", index.meta.data_size),
            ),
        });
    }
    Ok(())
}

/// The lz4 frames of one compressed extent of `len` bytes at `payload`.
fn lz4_frames(
    index: &StreamIndex,
    payload: u64,
    len: u64,
    sizes: &[u64],
    at: u64,
) -> Result<Box<[Lz4Frame]>, ScanError> {
    let path = &index.path;
    let mut frames = Vec::with_capacity(sizes.len().min(4096));
    let (mut file_off, mut extent_off) = (payload, 0u64);
    for (i, &comp_len) in sizes.iter().enumerate() {
        let last = i + 1 == sizes.len();
        let frame_len = if last {
            len.checked_sub(extent_off)
        } else {
            lz4::frame_head(path, &*index.file, file_off)?.content_size
        };
        let frame_len =
            frame_len.filter(|&l| l <= MAX_LZ4_FRAME && extent_off + l <= len).ok_or_else(|| {
                ScanError::invalid(path, file_off, "lz4 frame sizes do not add up to the extent length")
            })?;
        if comp_len > lz4_bound(frame_len) {
            return Err(ScanError::invalid(
                path,
                file_off,
                format!("lz4 frame of {comp_len} bytes cannot hold {frame_len}"),
            ));
        }
        if file_off.checked_add(comp_len).is_none_or(|e| e > index.file_len) {
            return Err(ScanError::invalid(path, at, "lz4 frame runs past the end of the file"));
        }
        frames.push(Lz4Frame { file_off, comp_len, extent_off, len: frame_len });
        file_off += comp_len;
        extent_off += frame_len;
    }
    if frames.is_empty() {
        return Err(ScanError::invalid(path, at, "compressed extent without lz4 frames"));
    }
    Ok(frames.into_boxed_slice())
}

/// The largest lz4 frame `len` bytes can become: liblz4's worst case per block
/// (`LZ4_COMPRESSBOUND`: n + n/255 + 16), a 4-byte size word and a 4-byte checksum per
/// block of 64 KiB (the smallest lz4 block size, so the most blocks), plus 23 bytes
/// of frame header, end mark and content checksum. Only stops absurd trailer values.
fn lz4_bound(len: u64) -> u64 {
    len + len / 255 + (len / (64 << 10) + 1) * (16 + 8) + 23
}
