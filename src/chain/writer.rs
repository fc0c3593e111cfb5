//! Writes stream files byte-compatible with upstream (stream-format.md §1.10).
//!
//! Used by `vmback sample`, by the tests to build chains, and by `backup`. A data extent
//! of `len >= max_request` bytes is read and (when compressing) lz4-framed in pieces of
//! `max_request` bytes, exactly as upstream splits its NBD reads, so the trailer has the
//! same int-or-object shape and virtnbdrestore decodes it.

use std::io::{self, Write};

use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};

use super::frame::{FrameKind, encode_header};
use super::meta::{StreamMeta, trailer_json};

/// Upstream's `maxRequestSize`: qemu's NBD server advertises 32 MiB, and upstream splits
/// extents (and lz4 frames) at that size.
pub const MAX_REQUEST: u64 = 32 << 20;

/// A stream being written to `W`.
pub struct StreamWriter<W: Write> {
    out: W,
    compressed: bool,
    max_request: u64,
    /// Per data frame: whether it was split (object form) and its lz4 frame sizes.
    trailer: Vec<(bool, Vec<u64>)>,
    data_written: u64,
    declared_data: u64,
    /// The piece buffer, kept across extents (a fresh 32 MiB buffer per extent costs a
    /// page fault and zeroing per page).
    buf: Vec<u8>,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the `meta` frame. `meta.data_size` must be the sum of the data extents that
    /// follow; [`StreamWriter::finish`] checks it.
    pub fn new(mut out: W, meta: &StreamMeta, max_request: u64) -> io::Result<Self> {
        let json = meta.to_json();
        out.write_all(&encode_header(FrameKind::Meta, 0, json.len() as u64))?;
        out.write_all(json.as_bytes())?;
        out.write_all(b"\r\n")?;
        Ok(StreamWriter {
            out,
            compressed: meta.compressed.is_some(),
            max_request: max_request.max(1),
            trailer: Vec::new(),
            data_written: 0,
            declared_data: meta.data_size,
            buf: Vec::new(),
        })
    }

    /// Writes a data extent held in memory.
    pub fn data(&mut self, start: u64, bytes: &[u8]) -> io::Result<()> {
        self.data_from(start, bytes.len() as u64, |off, buf| {
            let off = off as usize;
            buf.copy_from_slice(&bytes[off..off + buf.len()]);
            Ok(())
        })
    }

    /// Writes a data extent of `len` bytes, fetched by `read(offset_in_extent, buf)` in
    /// pieces of at most `max_request` bytes.
    pub fn data_from(
        &mut self,
        start: u64,
        len: u64,
        mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.out.write_all(&encode_header(FrameKind::Data, start, len))?;
        let chunked = len >= self.max_request;
        let mut sizes = Vec::new();
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(len.min(self.max_request) as usize, 0);
        let mut done = 0u64;
        while done < len {
            let piece = &mut buf[..(len - done).min(self.max_request) as usize];
            read(done, piece)?;
            if self.compressed {
                let frame = lz4_frame(piece)?;
                sizes.push(frame.len() as u64);
                self.out.write_all(&frame)?;
            } else {
                self.out.write_all(piece)?;
            }
            done += piece.len() as u64;
        }
        self.buf = buf;
        if self.compressed {
            if sizes.is_empty() {
                // A zero-length extent still gets one (empty) lz4 frame.
                let frame = lz4_frame(&[])?;
                sizes.push(frame.len() as u64);
                self.out.write_all(&frame)?;
            }
            self.trailer.push((chunked, sizes));
        }
        self.out.write_all(b"\r\n")?;
        self.data_written += len;
        Ok(())
    }

    /// Writes a zero extent (full and copy streams only).
    pub fn zero(&mut self, start: u64, len: u64) -> io::Result<()> {
        self.out.write_all(&encode_header(FrameKind::Zero, start, len))
    }

    /// Writes the `stop` frame and, when compressing, the trailer; returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        if self.data_written != self.declared_data {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "metadata declares {} data bytes, {} were written",
                    self.declared_data, self.data_written
                ),
            ));
        }
        self.out.write_all(&encode_header(FrameKind::Stop, 0, 0))?;
        if self.compressed {
            let json = trailer_json(&self.trailer);
            self.out.write_all(json.as_bytes())?;
            self.out.write_all(b"\r\n")?;
            self.out.write_all(&encode_header(FrameKind::Comp, 0, json.len() as u64))?;
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One lz4 frame with the parameters python-lz4 uses: 64 KiB linked blocks, block and
/// content checksums, content size.
fn lz4_frame(data: &[u8]) -> io::Result<Vec<u8>> {
    let info = FrameInfo::new()
        .block_size(BlockSize::Max64KB)
        .block_mode(BlockMode::Linked)
        .block_checksums(true)
        .content_checksum(true)
        .content_size(Some(data.len() as u64));
    let mut enc = FrameEncoder::with_frame_info(info, Vec::with_capacity(data.len() / 2 + 64));
    enc.write_all(data)?;
    enc.finish().map_err(io::Error::other)
}
