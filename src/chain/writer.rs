//! Writes stream files byte-compatible with upstream (doc/FORMAT.md §1.10).
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
        })
    }

    /// Writes a data extent held in memory.
    pub fn data(&mut self, start: u64, bytes: &[u8]) -> io::Result<()> {
        self.data_from(start, bytes.len() as u64, |off, n| Ok(&bytes[off as usize..off as usize + n]))
    }

    /// Writes a data extent of `len` bytes, fetched by `next(offset_in_extent, n)` in
    /// pieces of `n <= max_request` bytes. Each piece is written (or compressed) straight
    /// from what `next` returns, which must be exactly `n` bytes: a backup hands over its
    /// NBD read buffers without another copy.
    pub fn data_from<B: AsRef<[u8]>>(
        &mut self,
        start: u64,
        len: u64,
        mut next: impl FnMut(u64, usize) -> io::Result<B>,
    ) -> io::Result<()> {
        self.out.write_all(&encode_header(FrameKind::Data, start, len))?;
        let chunked = len >= self.max_request;
        let mut sizes = Vec::new();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(self.max_request) as usize;
            let piece = next(done, n)?;
            let piece = piece.as_ref();
            if piece.len() != n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a piece of {} bytes where {n} were asked for", piece.len()),
                ));
            }
            if self.compressed {
                sizes.push(lz4_frame(piece, &mut self.out)?);
            } else {
                self.out.write_all(piece)?;
            }
            done += n as u64;
        }
        if self.compressed {
            if sizes.is_empty() {
                // A zero-length extent still gets one (empty) lz4 frame.
                sizes.push(lz4_frame(&[], &mut self.out)?);
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

/// Writes `data` to `out` as one lz4 frame with the parameters python-lz4 uses (64 KiB
/// linked blocks, block and content checksums, content size); returns the frame's size.
fn lz4_frame(data: &[u8], out: &mut impl Write) -> io::Result<u64> {
    let info = FrameInfo::new()
        .block_size(BlockSize::Max64KB)
        .block_mode(BlockMode::Linked)
        .block_checksums(true)
        .content_checksum(true)
        .content_size(Some(data.len() as u64));
    let mut counted = Counted { out, bytes: 0 };
    let mut enc = FrameEncoder::with_frame_info(info, &mut counted);
    enc.write_all(data)?;
    enc.finish().map_err(io::Error::other)?;
    Ok(counted.bytes)
}

/// A writer that counts what passes through it.
struct Counted<'a, W> {
    out: &'a mut W,
    bytes: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
