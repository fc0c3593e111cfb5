//! Reading stream files: the read helpers every part of `chain` uses, over a source's
//! positional reader ([`ReadAt`]), and the error a stream file's scan reports.
//!
//! Every helper retries EINTR and reports a short read as what it is (the end of the
//! file), so the callers above tell a truncated file from a failing disk.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::frame::FrameError;
use super::meta::MetaError;
use crate::source::{ReadAt, SourceError};

/// A problem with a stream file, always with the file and byte offset.
#[derive(Debug, Error)]
pub enum ScanError {
    #[error("{path}: cannot read at offset {offset}")]
    Io {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{path}: stream ends early at offset {offset} (truncated?)")]
    Truncated { path: PathBuf, offset: u64 },
    #[error("{path}: bad frame header at offset {offset}")]
    BadFrame {
        path: PathBuf,
        offset: u64,
        #[source]
        source: FrameError,
    },
    #[error("{path}: bad metadata at offset {offset}")]
    BadMeta {
        path: PathBuf,
        offset: u64,
        #[source]
        source: MetaError,
    },
    #[error("{path}: bad compression trailer at offset {offset}")]
    BadTrailer {
        path: PathBuf,
        offset: u64,
        #[source]
        source: MetaError,
    },
    #[error("{path}: {what} at offset {offset}")]
    Invalid { path: PathBuf, offset: u64, what: String },
}

impl ScanError {
    /// The byte offset in the file where the problem is.
    pub fn offset(&self) -> u64 {
        match self {
            ScanError::Io { offset, .. }
            | ScanError::Truncated { offset, .. }
            | ScanError::BadFrame { offset, .. }
            | ScanError::BadMeta { offset, .. }
            | ScanError::BadTrailer { offset, .. }
            | ScanError::Invalid { offset, .. } => *offset,
        }
    }

    pub(crate) fn invalid(path: &Path, offset: u64, what: impl Into<String>) -> ScanError {
        ScanError::Invalid { path: path.to_owned(), offset, what: what.into() }
    }

    /// The file `path` could not be opened: a read failing at offset 0.
    pub fn opening(path: &Path, error: SourceError) -> ScanError {
        ScanError::Io { path: path.to_owned(), offset: 0, source: error.into_io() }
    }
}

/// Reads as much of `buf` as the file has at `offset`; returns the count.
pub fn read_full(file: &dyn ReadAt, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    read_full_with(buf, offset, |b, at| file.read_at(b, at))
}

/// Fills `buf` from `offset` with positional reads `read_at(part, at)` (as `pread(2)`:
/// a count, 0 at the end), retrying on EINTR; returns the count, short only at the end.
pub fn read_full_with(
    buf: &mut [u8],
    offset: u64,
    mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads exactly `buf.len()` bytes at `offset`, or names the truncation.
pub(crate) fn read_exact(
    path: &Path,
    file: &dyn ReadAt,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), ScanError> {
    let n = read_full(file, buf, offset).map_err(|source| ScanError::Io {
        path: path.to_owned(),
        offset,
        source,
    })?;
    if n < buf.len() {
        return Err(ScanError::Truncated { path: path.to_owned(), offset: offset + n as u64 });
    }
    Ok(())
}

/// A [`io::Read`] over `[pos, end)` of a file; `UnexpectedEof` if the file ends first.
pub struct RangeRead<'a> {
    pub file: &'a dyn ReadAt,
    pub pos: u64,
    pub end: u64,
}

impl io::Read for RangeRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.end - self.pos) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += got as u64;
        Ok(got)
    }
}
