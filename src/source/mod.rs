//! Where backup sets are read from: one trait, [`Source`], for every byte vmback reads
//! from a backup location (the catalog's walk, stream files, `vmconfig.*.xml`).
//!
//! A source is a tree of entries named by paths relative to its root (`set/sda.full.data`);
//! the root itself is the empty path. It can list the tree, stat an entry, open a file as a
//! positional reader ([`ReadAt`], shared by every thread that reads it) and read a small
//! file whole, bounded by a size the caller gives. [`LocalSource`] is a folder on the local
//! filesystem; [`MemSource`] holds its files in memory (tests); [`ZipSource`] is a local
//! folder whose zip archives show as their members, read in place. An object store fits
//! the same shape: keys are the relative paths, a reader answers `read_at` with ranged
//! reads, and its data runs are "all data".
//!
//! Invariants every implementation keeps:
//! - a path with `..`, a root or a prefix component is refused ([`SourceError::Escapes`]),
//!   so nothing outside the root is named;
//! - symlinks are listed as [`Kind::Symlink`] and never followed, on any component;
//! - [`Source::read_whole`] checks the size before it allocates and never returns more
//!   than the bound, even for a file that grows while it is read.
//!
//! This module imports nothing from the rest of the crate: it is the bottom of the stack.

mod local;
mod mem;
pub mod zip;

use std::fmt::Debug;
use std::io;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use thiserror::Error;

pub use local::LocalSource;
pub use mem::MemSource;
pub use zip::ZipSource;

/// A problem reading a source, naming the entry as [`Source::display`] shows it.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error("{path}: cannot read")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: names a place outside the backup folder")]
    Escapes { path: PathBuf },
    #[error("{path}: is a symlink; not followed")]
    Symlink { path: PathBuf },
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: larger than the {max} bytes allowed")]
    TooLarge { path: PathBuf, max: u64 },
}

impl SourceError {
    /// The error as an `io::Error` for callers that report errnos (FUSE): the OS's own
    /// error when there is one, else the closest errno.
    pub fn into_io(self) -> io::Error {
        let errno = match &self {
            SourceError::Io { .. } => None,
            SourceError::Escapes { .. } => Some(libc::EACCES),
            SourceError::Symlink { .. } => Some(libc::ELOOP),
            SourceError::NotAFile { .. } => Some(libc::EINVAL),
            SourceError::TooLarge { .. } => Some(libc::EFBIG),
        };
        match (self, errno) {
            (SourceError::Io { source, .. }, _) => source,
            (_, errno) => io::Error::from_raw_os_error(errno.unwrap_or(libc::EIO)),
        }
    }
}

/// What an entry is. Symlinks are reported, never followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A device, socket or fifo: never read.
    Other,
}

/// What tells one version of an entry from the next: an entry replaced, rewritten, grown,
/// truncated or (locally) chmod'ed gets another stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stamp {
    /// A local file: device, inode, length, mtime and ctime (ns). The ctime catches a
    /// `chmod`, which may be what makes an unreadable file readable.
    Local { dev: u64, ino: u64, len: u64, mtime_ns: i128, ctime_ns: i128 },
    /// A [`MemSource`] entry: a counter bumped by every write.
    Generation(u64),
}

/// One entry of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the source's root.
    pub path: PathBuf,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub stamp: Stamp,
}

/// A walk of a source: its entries in name order, depth first (a folder's entries right
/// after it), without the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    pub entries: Vec<Entry>,
    /// Entries the walk could not read, as messages naming them.
    pub unreadable: Vec<String>,
    /// The volume the root is on (a local device number), for sources that have one: an
    /// empty root on another volume than before is an unmounted filesystem, not a
    /// folder whose backups were deleted.
    pub volume: Option<u64>,
}

/// An open file of a source: positional reads, shareable between threads.
pub trait ReadAt: Debug + Send + Sync {
    /// Reads into `buf` from `offset`, as `pread(2)`: the count, short or 0 at the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// The file's length now (it may have changed since it was opened).
    fn size(&self) -> io::Result<u64>;

    /// When the file was last written, if the source knows.
    fn modified(&self) -> Option<SystemTime>;

    /// The ranges of `[0, len)` that hold data, sorted; the rest reads as zeros. Only a
    /// sparse local file has holes; every other source answers "all data".
    fn data_runs(&self, len: u64) -> io::Result<Vec<Range<u64>>> {
        Ok((len > 0).then_some(0..len).into_iter().collect())
    }
}

/// A tree of backup files; see the module note.
pub trait Source: Debug + Send + Sync {
    /// How `path` is named in messages (for a local source, the root joined with it).
    fn display(&self, path: &Path) -> PathBuf;

    /// Walks the tree, `max_depth` levels of folders deep at most.
    fn list(&self, max_depth: usize) -> Result<Tree, SourceError>;

    /// The entry at `path`, without following a symlink.
    fn stat(&self, path: &Path) -> Result<Entry, SourceError>;

    /// Opens the regular file at `path` for reading.
    fn open(&self, path: &Path) -> Result<Arc<dyn ReadAt>, SourceError>;

    /// The bytes of the regular file at `path`, if it holds at most `max` of them.
    fn read_whole(&self, path: &Path, max: u64) -> Result<Vec<u8>, SourceError>;
}

/// A file of a source, by its path there: what a catalog hands out for reading later.
#[derive(Debug, Clone)]
pub struct SourcePath {
    pub source: Arc<dyn Source>,
    pub path: PathBuf,
}

impl SourcePath {
    /// How the file is named in messages.
    pub fn shown(&self) -> PathBuf {
        self.source.display(&self.path)
    }
}

/// The paths and kinds of a tree's entries, for tests to compare with what they made.
#[cfg(test)]
fn kinds(tree: &Tree) -> Vec<(&str, Kind)> {
    tree.entries.iter().map(|e| (e.path.to_str().expect("test paths are UTF-8"), e.kind)).collect()
}

/// Refuses a path that could name something outside the root.
fn check_relative(source: &dyn Source, path: &Path) -> Result<(), SourceError> {
    if path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        Ok(())
    } else {
        Err(SourceError::Escapes { path: source.display(path) })
    }
}
