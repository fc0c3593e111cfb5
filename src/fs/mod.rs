//! The filesystem core: every decision of the mount, with no FUSE types in it, so tests
//! can drive it without the kernel. [`fuse`] is the thin adapter that replies to the
//! kernel; [`session`] mounts it.
//!
//! Everything here is immutable after the mount, except the read cache (its own locks)
//! and nothing else: images are read-only in this version, so no handle state is kept and
//! a file handle is just the inode.

pub mod fuse;
pub mod inode;
pub mod session;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::SystemTime;

use thiserror::Error;

use crate::cache::ReadCache;
use crate::catalog::Catalog;
use crate::chain::{ImageReader, ReadError, scan::read_full};
use inode::Tree;
pub use inode::{Ino, NodeKind, ROOT};

/// Why a filesystem request failed; [`FsError::errno`] says what the caller sees.
#[derive(Debug, Error)]
pub enum FsError {
    #[error("no such file")]
    NotFound,
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    #[error("not a symlink")]
    NotALink,
    #[error("the images are read-only")]
    ReadOnly,
    #[error("no data at or after the offset")]
    NoData,
    #[error("unsupported whence {0}")]
    BadWhence(i32),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("reading {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotADirectory => libc::ENOTDIR,
            FsError::IsADirectory => libc::EISDIR,
            FsError::NotALink => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoData => libc::ENXIO,
            FsError::BadWhence(_) => libc::EINVAL,
            FsError::Read(e) => e.errno(),
            FsError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

type Result<T, E = FsError> = std::result::Result<T, E>;

/// What `stat` shows for a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    /// 512-byte blocks holding data: the thin size, what `du` shows.
    pub blocks: u64,
    pub mtime: SystemTime,
    pub perm: u16,
}

/// The file types the mount shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Link,
}

/// `lseek` whence values the kernel passes on to the filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seek {
    Data,
    Hole,
}

/// Options of the core (the CLI fills them).
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Bytes of decoded lz4 frames kept in memory.
    pub cache_size: usize,
}

/// See the module note.
pub struct ImageFs {
    tree: Tree,
    images: Vec<ImageReader>,
    cache: Arc<ReadCache>,
}

impl ImageFs {
    pub fn new(catalog: &Catalog, config: &FsConfig) -> ImageFs {
        let cache = Arc::new(ReadCache::new(config.cache_size));
        let tree = Tree::build(catalog, SystemTime::now());
        let images =
            tree.images.iter().map(|layers| ImageReader::new(layers.clone(), cache.clone())).collect();
        ImageFs { tree, images, cache }
    }

    fn node(&self, ino: Ino) -> Result<&inode::Node> {
        self.tree.get(ino).ok_or(FsError::NotFound)
    }

    pub fn lookup(&self, parent: Ino, name: &str) -> Result<Attr> {
        match &self.node(parent)?.kind {
            NodeKind::Dir(children) => {
                let i = children
                    .binary_search_by(|(n, _)| n.as_str().cmp(name))
                    .map_err(|_| FsError::NotFound)?;
                self.getattr(children[i].1)
            }
            _ => Err(FsError::NotADirectory),
        }
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let node = self.node(ino)?;
        let (kind, size, blocks, perm) = match &node.kind {
            NodeKind::Dir(_) => (Kind::Dir, 0, 0, 0o555),
            NodeKind::Image(i) => {
                let img = &self.images[*i];
                (Kind::File, img.size(), img.map().data_bytes().div_ceil(512), 0o444)
            }
            NodeKind::Config { size, .. } => (Kind::File, *size, size.div_ceil(512), 0o444),
            NodeKind::Link(target) => (Kind::Link, target.len() as u64, 0, 0o777),
            NodeKind::Stats => {
                let len = self.stats().len() as u64;
                (Kind::File, len, len.div_ceil(512), 0o444)
            }
        };
        Ok(Attr { ino, kind, size, blocks, mtime: node.mtime, perm })
    }

    /// Directory entries after `offset` (0 = from the start): `(ino, next offset, kind, name)`.
    pub fn readdir(&self, ino: Ino, offset: u64) -> Result<Vec<(Ino, u64, Kind, String)>> {
        let node = self.node(ino)?;
        let NodeKind::Dir(children) = &node.kind else { return Err(FsError::NotADirectory) };
        let dots = [(ino, ".".to_owned()), (node.parent, "..".to_owned())];
        let all = dots.into_iter().chain(children.iter().map(|(n, i)| (*i, n.clone())));
        all.enumerate()
            .skip(offset as usize)
            .map(|(k, (child, name))| Ok((child, k as u64 + 1, self.getattr(child)?.kind, name)))
            .collect()
    }

    pub fn readlink(&self, ino: Ino) -> Result<String> {
        match &self.node(ino)?.kind {
            NodeKind::Link(t) => Ok(t.clone()),
            _ => Err(FsError::NotALink),
        }
    }

    /// Checks an open; `write` is whether the caller asked for write access.
    /// Returns whether the kernel may keep cached pages across opens (all but `.stats`).
    pub fn open(&self, ino: Ino, write: bool) -> Result<bool> {
        match &self.node(ino)?.kind {
            NodeKind::Dir(_) => Err(FsError::IsADirectory),
            _ if write => Err(FsError::ReadOnly),
            NodeKind::Stats => Ok(false),
            _ => Ok(true),
        }
    }

    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>> {
        match &self.node(ino)?.kind {
            NodeKind::Image(i) => {
                let img = &self.images[*i];
                let len = img.size().saturating_sub(offset).min(size as u64) as usize;
                let mut buf = vec![0u8; len];
                let n = img.read_at(&mut buf, offset)?;
                buf.truncate(n);
                Ok(buf)
            }
            NodeKind::Config { path, size: known } => {
                let io = |source| FsError::Io { path: path.clone(), source };
                // O_NOFOLLOW: a symlink swapped in since the scan is not followed out of SOURCE.
                let file =
                    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(io)?;
                let len = known.saturating_sub(offset).min(size as u64) as usize;
                let mut buf = vec![0u8; len];
                let n = read_full(&file, &mut buf, offset).map_err(io)?;
                buf.truncate(n);
                Ok(buf)
            }
            NodeKind::Stats => {
                let s = self.stats().into_bytes();
                let from = (offset as usize).min(s.len());
                Ok(s[from..s.len().min(from + size as usize)].to_vec())
            }
            NodeKind::Dir(_) => Err(FsError::IsADirectory),
            NodeKind::Link(_) => Err(FsError::NotFound),
        }
    }

    /// SEEK_DATA / SEEK_HOLE on an image; other files are all data.
    pub fn lseek(&self, ino: Ino, offset: u64, whence: Seek) -> Result<u64> {
        let attr = self.getattr(ino)?;
        if offset >= attr.size {
            return Err(FsError::NoData);
        }
        match (&self.node(ino)?.kind, whence) {
            (NodeKind::Image(i), Seek::Data) => {
                self.images[*i].map().seek_data(offset).ok_or(FsError::NoData)
            }
            (NodeKind::Image(i), Seek::Hole) => Ok(self.images[*i].map().seek_hole(offset)),
            (_, Seek::Data) => Ok(offset),
            (_, Seek::Hole) => Ok(attr.size),
        }
    }

    /// The `.stats` file's text.
    pub fn stats(&self) -> String {
        self.cache.stats.render(&self.cache)
    }
}
