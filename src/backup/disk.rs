//! Backing up one disk: ask the NBD server which extents to save, then stream them into
//! a `.partial` file in the stream format (or a sparse raw image), sync, rename, and write
//! the `.chksum` sidecar; or stream them into any other sink (a member of the `-o -` zip)
//! through the same writer.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::direct::DirectFile;
use super::nbd::{Nbd, NbdError};
use crate::chain::{MAX_REQUEST, StreamMeta, StreamWriter};

/// Why one disk's backup failed.
#[derive(Debug, Error)]
pub enum DiskError {
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error("{path}: write failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD server answered block status at {0} with no extents")]
    NoExtents(u64),
    #[error("nbdinfo --map {uri} (-q): {reason}")]
    Nbdinfo { uri: String, reason: String },
}

/// Largest block-status request: the NBD protocol counts in 32 bits; 1 GiB keeps each
/// answer small and aligned whatever the server's block size.
const STATUS_CHUNK: u64 = 1 << 30;

/// NBD reads (of up to 32 MiB each) kept ready ahead of the writer: two is enough to
/// keep both sides busy, and bounds the memory to a few requests per disk.
const READ_AHEAD: usize = 2;

/// What a backup of one disk saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extents {
    /// `base:allocation`: every extent, as data or zero frames (full, copy).
    Allocation,
    /// A dirty bitmap: only the dirty extents, as data frames (inc, diff).
    Dirty,
}

/// One extent to save: `(start, len, is_data)`.
pub type Extent = (u64, u64, bool);

/// The extents of the whole export, merged where neighbours are of the same kind.
pub fn query_extents(nbd: &mut Nbd, size: u64, kind: Extents) -> Result<Vec<Extent>, DiskError> {
    let mut merged = Merged::new(size, kind);
    while merged.pos < size {
        let entries = nbd.block_status((size - merged.pos).min(STATUS_CHUNK), merged.pos)?;
        if entries.is_empty() {
            return Err(DiskError::NoExtents(merged.pos));
        }
        merged.extend(entries);
    }
    Ok(merged.finish())
}

/// `-q`: the same extents as [`query_extents`], asked of qemu's tools as upstream's `-q`
/// asks them: `nbdinfo --json --map=CONTEXT URI`, a connection of its own to the server.
pub fn nbdinfo_extents(nbd: &Nbd, size: u64, kind: Extents) -> Result<Vec<Extent>, DiskError> {
    let uri = nbd.uri()?;
    let nbdinfo = |reason: String| DiskError::Nbdinfo { uri: uri.clone(), reason };
    let out = std::process::Command::new("nbdinfo")
        .args(["--json", &format!("--map={}", nbd.context()), &uri])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| nbdinfo(format!("cannot run it: {e}")))?;
    if !out.status.success() {
        return Err(nbdinfo(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        offset: u64,
        length: u64,
        #[serde(rename = "type")]
        flags: u32,
    }
    let entries: Vec<Entry> =
        serde_json::from_slice(&out.stdout).map_err(|e| nbdinfo(format!("unexpected output: {e}")))?;
    let mut merged = Merged::new(size, kind);
    for e in entries {
        if e.offset != merged.pos {
            return Err(nbdinfo(format!("extent at {} where {} was expected", e.offset, merged.pos)));
        }
        merged.extend([(e.length, e.flags)]);
    }
    if merged.pos < size {
        return Err(DiskError::NoExtents(merged.pos));
    }
    Ok(merged.finish())
}

/// Extents `(length, flags)` from `pos` on, as the server answers them, turned into
/// [`Extent`]s merged where neighbours are of the same kind.
struct Merged {
    out: Vec<Extent>,
    pos: u64,
    size: u64,
    kind: Extents,
}

impl Merged {
    fn new(size: u64, kind: Extents) -> Merged {
        Merged { out: Vec::new(), pos: 0, size, kind }
    }

    fn extend(&mut self, entries: impl IntoIterator<Item = (u64, u32)>) {
        for (len, flags) in entries {
            let len = len.min(self.size - self.pos);
            if len == 0 {
                break;
            }
            // base:allocation: bit 0 is "hole"; an allocated range that reads as zeros is
            // still saved as data, as upstream does (FORMAT.md §1.13). Dirty bitmaps: bit 0 is "dirty".
            let data = match self.kind {
                Extents::Allocation => flags & 1 == 0,
                Extents::Dirty => flags & 1 == 1,
            };
            match self.out.last_mut() {
                Some(last) if last.2 == data && last.0 + last.1 == self.pos => last.1 += len,
                _ => self.out.push((self.pos, len, data)),
            }
            self.pos += len;
        }
    }

    fn finish(mut self) -> Vec<Extent> {
        if self.kind == Extents::Dirty {
            self.out.retain(|e| e.2);
        }
        self.out
    }
}

/// Adler-32 of everything written, for the `.chksum` sidecar.
struct Checksummed<W> {
    inner: W,
    adler: simd_adler32::Adler32,
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.adler.write(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An NBD read buffer lent to the stream writer; dropping it hands it back to the reader
/// thread for its next read.
struct Recycled<'a> {
    buf: Vec<u8>,
    home: &'a std::sync::mpsc::Sender<Vec<u8>>,
}

impl AsRef<[u8]> for Recycled<'_> {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled<'_> {
    fn drop(&mut self) {
        // The reader may have stopped already: then the buffer is simply freed.
        let _ = self.home.send(std::mem::take(&mut self.buf));
    }
}

/// `NAME.partial` beside `NAME`.
pub fn partial_of(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Writes one stream file at `target` from `extents`, read through `nbd`, as `.partial`
/// (around the page cache) and synced. `meta` gets its `dataSize` here. `done(bytes)`
/// reports progress.
pub fn write_stream(
    nbd: &mut Nbd,
    extents: &[Extent],
    meta: StreamMeta,
    target: &Path,
    done: &dyn Fn(u64),
) -> Result<Pending, DiskError> {
    let partial = partial_of(target);
    let io = |source| DiskError::Io { path: partial.clone(), source };
    let out = DirectFile::create(&partial).map_err(io)?;
    let (out, checksum, data_bytes) = stream_into(nbd, extents, meta, out, &partial, done)?;
    let file = out.finish().map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(Pending { partial, target: target.to_owned(), checksum: Some(checksum), data_bytes })
}

/// Writes one stream from `extents`, read through `nbd`, into `out` (named `shown` in
/// errors); returns `out`, the Adler-32 of what was written (the `.chksum` sidecar) and
/// the data bytes. `meta` gets its `dataSize` here. Every output of a backup, a file or
/// a zip member, gets its bytes from here.
pub fn stream_into<W: Write>(
    nbd: &mut Nbd,
    extents: &[Extent],
    mut meta: StreamMeta,
    out: W,
    shown: &Path,
    done: &dyn Fn(u64),
) -> Result<(W, u32, u64), DiskError> {
    meta.data_size = extents.iter().filter(|e| e.2).map(|e| e.1).sum();
    let io = |source| DiskError::Io { path: shown.to_owned(), source };
    let out = Checksummed { inner: out, adler: simd_adler32::Adler32::new() };
    let max_request = nbd.max_request().unwrap_or(MAX_REQUEST).min(MAX_REQUEST);
    let mut w = StreamWriter::new(out, &meta, max_request).map_err(io)?;
    // A reader thread keeps NBD reads going while this one compresses and writes: the
    // two overlap instead of taking turns. Buffers go back to the reader for reuse.
    let (filled_tx, filled) = std::sync::mpsc::sync_channel::<Result<Vec<u8>, NbdError>>(READ_AHEAD);
    let (empty_tx, empty) = std::sync::mpsc::channel::<Vec<u8>>();
    let written = std::thread::scope(|s| {
        s.spawn(move || {
            for &(start, len, _) in extents.iter().filter(|e| e.2) {
                let mut off = 0;
                while off < len {
                    let n = (len - off).min(max_request) as usize;
                    let mut buf = empty.try_recv().unwrap_or_default();
                    buf.resize(n, 0);
                    let r = nbd.pread(&mut buf, start + off).map(|()| buf);
                    let failed = r.is_err();
                    if filled_tx.send(r).is_err() || failed {
                        return;
                    }
                    off += n as u64;
                }
            }
        });
        // Owned here, so an early return (a write error) drops it: the reader's next send
        // fails and it stops, instead of waiting for ever on a full channel.
        let filled = filled;
        let mut nbd_err = None;
        for &(start, len, data) in extents {
            if data {
                let r = w.data_from(start, len, |_, _| match filled.recv() {
                    // Written straight from the NBD buffer, which then goes back to the
                    // reader (`Recycled`'s drop).
                    Ok(Ok(buf)) => Ok(Recycled { buf, home: &empty_tx }),
                    Ok(Err(e)) => {
                        let err = std::io::Error::other(e.to_string());
                        nbd_err = Some(e);
                        Err(err)
                    }
                    Err(_) => Err(std::io::Error::other("NBD reader stopped")),
                });
                if let Err(e) = r {
                    return Err(nbd_err.take().map_or_else(|| io(e), DiskError::Nbd));
                }
            } else if !meta.incremental {
                w.zero(start, len).map_err(io)?;
            }
            done(len);
        }
        Ok(())
    });
    written?;
    let out = w.finish().map_err(io)?;
    Ok((out.inner, out.adler.finish(), meta.data_size))
}

/// A data file written and synced as `.partial`, waiting for every other disk of the
/// run to succeed before it takes its final name.
#[derive(Debug)]
pub struct Pending {
    partial: PathBuf,
    target: PathBuf,
    /// Adler-32 for the `.chksum` sidecar (raw images get none, as upstream).
    checksum: Option<u32>,
    pub data_bytes: u64,
}

impl Pending {
    /// Renames the file to its final name (never over an existing file) and writes the
    /// `.chksum` sidecar.
    pub fn commit(self) -> Result<(), DiskError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| DiskError::Io { path, source }
        };
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &self.partial,
            nix::fcntl::AT_FDCWD,
            &self.target,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| io(&self.target)(e.into()))?;
        if let Some(sum) = self.checksum {
            let mut side = self.target.as_os_str().to_owned();
            side.push(".chksum");
            std::fs::write(&side, sum.to_string()).map_err(io(Path::new(&side)))?;
        }
        Ok(())
    }
}

/// Writes a sparse raw image at `target` (`-t raw`, raw-format disks with `--raw`).
pub fn write_raw(
    nbd: &mut Nbd,
    extents: &[Extent],
    size: u64,
    target: &Path,
    done: &dyn Fn(u64),
) -> Result<Pending, DiskError> {
    use std::os::unix::fs::FileExt;
    let partial = partial_of(target);
    let io = |source| DiskError::Io { path: partial.clone(), source };
    let file = File::create(&partial).map_err(io)?;
    file.set_len(size).map_err(io)?;
    let max_request = nbd.max_request().unwrap_or(MAX_REQUEST).min(MAX_REQUEST);
    let mut buf = vec![0u8; max_request as usize];
    let mut saved = 0;
    for &(start, len, data) in extents.iter() {
        if data {
            let mut off = 0;
            while off < len {
                let chunk = &mut buf[..(len - off).min(max_request) as usize];
                nbd.pread(chunk, start + off)?;
                file.write_all_at(chunk, start + off).map_err(io)?;
                off += chunk.len() as u64;
            }
            saved += len;
        }
        done(len);
    }
    file.sync_all().map_err(io)?;
    Ok(Pending { partial, target: target.to_owned(), checksum: None, data_bytes: saved })
}
