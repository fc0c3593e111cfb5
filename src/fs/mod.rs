//! The filesystem core: every decision of the mount, with no FUSE types in it, so tests
//! can drive it without the kernel. [`fuse`] is the thin adapter that replies to the
//! kernel; [`session`] mounts it.
//!
//! The tree and the chain readers are immutable after the mount. The only mutable state
//! is each image's overlay (its own lock) and the read cache (its own lock). File handles
//! carry no state: every handle of an image shares the image's one overlay, so two
//! handles always see the same bytes, and a handle is just the inode.

pub mod fuse;
pub mod image;
pub mod inode;
pub mod session;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use thiserror::Error;

use crate::cache::{DirtyBudget, OverlayError, ReadCache};
use crate::catalog::Catalog;
use crate::chain::{ImageReader, StreamRead, scan::read_full};
use image::{Image, KeepError, OverlayPlace};
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
    #[error("read-only")]
    ReadOnly,
    #[error("an image's size is fixed")]
    FixedSize,
    #[error("no data at or after the offset")]
    NoData,
    #[error("unsupported whence {0}")]
    BadWhence(i32),
    #[error("unsupported fallocate mode {0:#x}")]
    BadFallocate(i32),
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error(transparent)]
    Keep(#[from] KeepError),
    #[error("reading {path}")]
    Io {
        path: PathBuf,
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
            // truncate(2) on an image: like a block device, its size cannot change.
            FsError::FixedSize => libc::EPERM,
            FsError::NoData => libc::ENXIO,
            FsError::BadWhence(_) => libc::EINVAL,
            FsError::BadFallocate(_) => libc::EOPNOTSUPP,
            FsError::Overlay(e) => e.errno(),
            FsError::Keep(KeepError::Overlay(e)) => e.errno(),
            FsError::Keep(KeepError::Io { source, .. }) => source.raw_os_error().unwrap_or(libc::EIO),
            FsError::Keep(_) => libc::EIO,
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

/// `fallocate(2)` modes an image accepts.
pub mod falloc {
    pub const KEEP_SIZE: i32 = 0x01;
    pub const PUNCH_HOLE: i32 = 0x02;
    pub const ZERO_RANGE: i32 = 0x10;
}

/// Where writes go.
#[derive(Debug, Clone)]
pub enum Writes {
    /// Every image is read-only (EROFS).
    ReadOnly,
    /// Overlays in this scratch folder, which the caller deletes at unmount.
    Scratch(PathBuf),
    /// Overlays kept in this folder across mounts.
    Keep(PathBuf),
}

/// Options of the core (the CLI fills them).
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Bytes of decoded lz4 frames kept in memory.
    pub cache_size: usize,
    /// Bytes of written pages kept in memory before they go to overlay files.
    pub dirty_size: u64,
    pub writes: Writes,
    /// How stream files are read: [`crate::chain::Direct`] in the mount; tests put a
    /// failing disk here.
    pub io: Arc<dyn StreamRead>,
}

/// See the module note.
pub struct ImageFs {
    tree: Tree,
    images: Vec<Image>,
    cache: Arc<ReadCache>,
    budget: Arc<DirtyBudget>,
}

impl ImageFs {
    pub fn new(catalog: &Catalog, config: &FsConfig) -> Result<ImageFs> {
        let cache = Arc::new(ReadCache::new(config.cache_size));
        let budget = Arc::new(DirtyBudget::new(config.dirty_size));
        let tree = Tree::build(catalog, SystemTime::now());
        let chains: Vec<_> = tree.images.iter().map(|s| s.layers.clone()).collect();
        let readers = ImageReader::many(&chains, &cache);
        let mut images = Vec::with_capacity(tree.images.len());
        for (i, (spec, reader)) in tree.images.iter().zip(readers).enumerate() {
            let place = match &config.writes {
                Writes::ReadOnly => OverlayPlace::None,
                Writes::Scratch(dir) => OverlayPlace::Scratch(dir.join(format!("{i}.overlay"))),
                Writes::Keep(dir) => OverlayPlace::Keep(dir),
            };
            images.push(Image::new(
                reader.with_io(config.io.clone()),
                spec.identity.clone(),
                place,
                &budget,
            )?);
        }
        Ok(ImageFs { tree, images, cache, budget })
    }

    fn node(&self, ino: Ino) -> Result<&inode::Node> {
        self.tree.get(ino).ok_or(FsError::NotFound)
    }

    fn image(&self, ino: Ino) -> Result<&Image> {
        match &self.node(ino)?.kind {
            NodeKind::Image(i) => Ok(&self.images[*i]),
            NodeKind::Dir(_) => Err(FsError::IsADirectory),
            _ => Err(FsError::ReadOnly),
        }
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
                let perm = if img.writable() { 0o644 } else { 0o444 };
                (Kind::File, img.size(), img.data_bytes().div_ceil(512), perm)
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

    /// `setattr`: the size of an image cannot change; other changes (times, modes) are
    /// accepted and ignored, so `touch` works.
    pub fn setattr(&self, ino: Ino, size: Option<u64>) -> Result<Attr> {
        let attr = self.getattr(ino)?;
        match size {
            Some(s) if s != attr.size => {
                self.image(ino)?;
                Err(FsError::FixedSize)
            }
            _ => Ok(attr),
        }
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
            NodeKind::Image(i) if write && !self.images[*i].writable() => Err(FsError::ReadOnly),
            NodeKind::Image(_) => Ok(true),
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

    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<usize> {
        Ok(self.image(ino)?.write_at(data, offset).ok_or(FsError::ReadOnly)??)
    }

    /// `fallocate`: punching a hole or zeroing a range (a guest's discard) makes it read
    /// as zeros; allocating inside the image is a no-op; nothing may change the size.
    pub fn fallocate(&self, ino: Ino, offset: u64, len: u64, mode: i32) -> Result<()> {
        let img = self.image(ino)?;
        let inside = offset.checked_add(len).is_some_and(|e| e <= img.size());
        match mode & !falloc::KEEP_SIZE {
            0 if inside => Ok(()),
            0 => Err(FsError::FixedSize),
            falloc::PUNCH_HOLE | falloc::ZERO_RANGE => {
                Ok(img.punch(offset, len).ok_or(FsError::ReadOnly)??)
            }
            _ => Err(FsError::BadFallocate(mode)),
        }
    }

    /// `fsync`/`flush`: a kept overlay is written out and its map saved; scratch overlays
    /// live only as long as the mount, so there is nothing more to make durable.
    pub fn sync(&self, ino: Ino) -> Result<()> {
        if let NodeKind::Image(i) = &self.node(ino)?.kind {
            self.images[*i].sync()?;
        }
        Ok(())
    }

    /// Saves every kept overlay (at unmount). Returns the first error after trying all.
    pub fn sync_all(&self) -> Result<()> {
        let mut first = Ok(());
        for img in &self.images {
            if let Err(e) = img.sync()
                && first.is_ok()
            {
                first = Err(e.into());
            }
        }
        first
    }

    /// SEEK_DATA / SEEK_HOLE on an image; other files are all data.
    pub fn lseek(&self, ino: Ino, offset: u64, whence: Seek) -> Result<u64> {
        // The size only: a full getattr would also compute the thin size.
        let size = match &self.node(ino)?.kind {
            NodeKind::Image(i) => self.images[*i].size(),
            _ => self.getattr(ino)?.size,
        };
        if offset >= size {
            return Err(FsError::NoData);
        }
        match (&self.node(ino)?.kind, whence) {
            (NodeKind::Image(i), Seek::Data) => self.images[*i].seek_data(offset).ok_or(FsError::NoData),
            (NodeKind::Image(i), Seek::Hole) => Ok(self.images[*i].seek_hole(offset)),
            (_, Seek::Data) => Ok(offset),
            (_, Seek::Hole) => Ok(size),
        }
    }

    /// The `.stats` file's text.
    pub fn stats(&self) -> String {
        format!("{}dirty_bytes {}\n", self.cache.stats.render(&self.cache), self.budget.used())
    }
}
