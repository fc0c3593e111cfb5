//! The lz4 frame format's framing (not its compression, which lz4_flex decodes): enough
//! to read a frame's content size and to find where frames end without a trailer.
//!
//! A compressed stream normally says where each lz4 frame ends in its trailer. When the
//! trailer is missing or damaged (a truncated file), the frames can still be found by
//! walking their structure (doc/FORMAT.md §1.9): header, then blocks each prefixed by
//! a 4-byte size word (high bit = stored uncompressed) and followed by a 4-byte checksum
//! when the frame has block checksums, a zero end mark, and a 4-byte content checksum.

use std::path::Path;

use super::io::{ScanError, read_exact};
use crate::source::ReadAt;

/// Upper bound for one lz4 frame's uncompressed size. Upstream writes at most one NBD
/// request (32 MiB, what qemu advertises) per lz4 frame; 64 MiB leaves room for other
/// writers while keeping a decode buffer of bounded size.
pub const MAX_LZ4_FRAME: u64 = 64 << 20;

/// One lz4 frame of a compressed extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lz4Frame {
    pub file_off: u64,
    pub comp_len: u64,
    /// Offset of this frame's first byte within the extent.
    pub extent_off: u64,
    pub len: u64,
}

const MAGIC: [u8; 4] = [0x04, 0x22, 0x4d, 0x18];
const FLG_BLOCK_CHECKSUM: u8 = 0x10;
const FLG_CONTENT_SIZE: u8 = 0x08;
const FLG_CONTENT_CHECKSUM: u8 = 0x04;
const FLG_DICT_ID: u8 = 0x01;
/// The size word's high bit marks a block stored uncompressed.
const STORED: u32 = 0x8000_0000;
/// The smallest lz4 frame: magic, FLG, BD and header checksum bytes, and the end mark.
pub const MIN_FRAME_LEN: u64 = 4 + 3 + 4;
/// The largest block the format allows (BD code 7).
const MAX_BLOCK: u64 = 4 << 20;

/// What the start of a frame says about it.
#[derive(Debug, Clone, Copy)]
pub struct FrameHead {
    pub flags: u8,
    pub content_size: Option<u64>,
    /// Bytes of magic + frame descriptor.
    pub len: u64,
}

/// Reads the frame header at `offset`.
pub fn frame_head(path: &Path, file: &dyn ReadAt, offset: u64) -> Result<FrameHead, ScanError> {
    let mut head = [0u8; 6];
    read_exact(path, file, &mut head, offset)?;
    if head[0..4] != MAGIC {
        return Err(ScanError::invalid(path, offset, "not an lz4 frame (bad magic)"));
    }
    let flags = head[4];
    let mut len = 6u64;
    let content_size = if flags & FLG_CONTENT_SIZE != 0 {
        let mut size = [0u8; 8];
        read_exact(path, file, &mut size, offset + len)?;
        len += 8;
        Some(u64::from_le_bytes(size))
    } else {
        None
    };
    if flags & FLG_DICT_ID != 0 {
        len += 4;
    }
    // The header checksum byte.
    Ok(FrameHead { flags, content_size, len: len + 1 })
}

/// Finds the lz4 frames of a compressed extent of `len` bytes whose payload starts at
/// `payload`, by walking the frame structure. Needs frames with a content size (every
/// writer of this format sets it).
pub fn walk(path: &Path, file: &dyn ReadAt, payload: u64, len: u64) -> Result<Vec<Lz4Frame>, ScanError> {
    let file_len =
        file.size().map_err(|source| ScanError::Io { path: path.to_owned(), offset: payload, source })?;
    let past_end =
        |at: u64| (at > file_len).then(|| ScanError::Truncated { path: path.to_owned(), offset: file_len });
    let mut frames = Vec::new();
    let (mut pos, mut extent_off) = (payload, 0u64);
    while extent_off < len || frames.is_empty() {
        let head = frame_head(path, file, pos)?;
        let size = head
            .content_size
            .filter(|&s| s <= MAX_LZ4_FRAME && extent_off + s <= len)
            .ok_or_else(|| ScanError::invalid(path, pos, "lz4 frame without a usable content size"))?;
        let mut at = pos + head.len;
        loop {
            let mut word = [0u8; 4];
            read_exact(path, file, &mut word, at)?;
            let word = u32::from_le_bytes(word);
            at += 4;
            if word == 0 {
                break;
            }
            let block = u64::from(word & !STORED);
            if block > MAX_BLOCK {
                return Err(ScanError::invalid(path, at - 4, format!("lz4 block of {block} bytes")));
            }
            at += block + if head.flags & FLG_BLOCK_CHECKSUM != 0 { 4 } else { 0 };
            if let Some(e) = past_end(at) {
                return Err(e);
            }
        }
        if head.flags & FLG_CONTENT_CHECKSUM != 0 {
            at += 4;
        }
        if let Some(e) = past_end(at) {
            return Err(e);
        }
        frames.push(Lz4Frame { file_off: pos, comp_len: at - pos, extent_off, len: size });
        extent_off += size;
        pos = at;
        if size == 0 && extent_off < len {
            return Err(ScanError::invalid(path, pos, "empty lz4 frame inside an extent"));
        }
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::cache::ReadCache;
    use crate::chain::{ImageReader, Layer, StreamIndex, StreamMeta, StreamWriter};

    /// A compressed full stream of 64 KiB: data at [0, 20000) (5 lz4 frames of 4 KiB) and
    /// [32768, 40000), zeros elsewhere. Returns the file bytes and the image.
    fn stream() -> (Vec<u8>, Vec<u8>) {
        let mut image = vec![0u8; 65536];
        for (i, b) in image[..20000].iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        image[32768..40000].fill(0x5a);
        let meta = StreamMeta::full("sda", 65536, 20000 + 7232).lz4(true);
        let mut w = StreamWriter::new(Vec::new(), &meta, 4096).unwrap();
        w.data(0, &image[..20000]).unwrap();
        w.zero(20000, 12768).unwrap();
        w.data(32768, &image[32768..40000]).unwrap();
        w.zero(40000, 25536).unwrap();
        (w.finish().unwrap(), image)
    }

    fn open(bytes: &[u8]) -> (tempfile::TempDir, StreamIndex) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sda.full.data");
        std::fs::write(&path, bytes).unwrap();
        let index = StreamIndex::open(&path, "sda").unwrap();
        (dir, index)
    }

    fn read(index: StreamIndex, off: u64, len: usize) -> Result<Vec<u8>, String> {
        let reader = ImageReader::new(
            vec![Layer { id: 1, index: Arc::new(index) }],
            Arc::new(ReadCache::new(1 << 20)),
        );
        let mut buf = vec![0u8; len];
        reader.read_at(&mut buf, off).map(|_| buf).map_err(|e| e.to_string())
    }

    #[test]
    fn frames_are_found_without_the_trailer() {
        let (bytes, image) = stream();
        let comp = &bytes[bytes.len() - 40..];
        let t = usize::from_str_radix(std::str::from_utf8(&comp[22..38]).unwrap(), 16).unwrap();
        let (_dir, index) = open(&bytes[..bytes.len() - 42 - t]);
        let damage = index.damage.as_ref().expect("a missing trailer is reported");
        assert_eq!(damage.from, 65536, "but nothing is unreadable");
        assert!(damage.error.to_string().contains("sda.full.data"), "{}", damage.error);
        match &index.extents[0].stored {
            super::super::scan::Stored::Lz4(frames) => assert_eq!(frames.len(), 5),
            other => panic!("{other:?}"),
        }
        assert_eq!(read(index, 0, 65536).unwrap(), image);
    }

    #[test]
    fn a_truncated_compressed_stream_serves_what_is_before_the_cut() {
        let (bytes, image) = stream();
        // Cut inside the second data frame's payload.
        let cut = bytes.windows(4).rposition(|w| w == b"data").unwrap() + 60;
        let (_dir, index) = open(&bytes[..cut]);
        // The zero frame before the cut was read whole; the damage starts after it.
        assert_eq!(index.damage.as_ref().unwrap().from, 32768);
        assert_eq!(read(index, 0, 32768).unwrap(), image[..32768]);
        let (_dir, index) = open(&bytes[..cut]);
        let err = read(index, 30000, 4096).unwrap_err();
        assert!(err.contains("sda.full.data") && err.contains("32768"), "{err}");
    }
}
