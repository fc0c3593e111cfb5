//! The filesystem core: every decision of the mount, with no FUSE types in it, so tests
//! can drive it without the kernel. [`fuse`] is the thin adapter that replies to the
//! kernel; [`session`] mounts it.
//!
//! A tree is immutable; when SOURCE changes, [`ImageFs::refresh`] builds a new one and
//! swaps it in (see [`inode`]). Requests by inode number (lookup, getattr, readdir, open)
//! see the current tree; requests on an open file go through its handle, which holds the
//! node it opened (for an `info.json`, its text, written out at open), so an open image
//! keeps working after a refresh took it out of the tree. Every handle of one image shares the image's one overlay, so two handles always
//! see the same bytes. The other mutable state is each overlay (its own lock) and the
//! read cache (its own lock).

pub mod fuse;
pub mod image;
pub mod inode;
pub mod live;
#[cfg(test)]
mod mem_source;
pub mod partition;
pub mod session;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use thiserror::Error;
use tracing::warn;

use crate::cache::{DirtyBudget, OverlayError, ReadCache};
use crate::catalog::Catalog;
use crate::chain::{ImageReader, io::read_full};
use image::{Image, KeepError, OverlayPlace};
pub use inode::{Ino, NodeKind, ROOT};
use inode::{Inos, Node, Tree};

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
    #[error("no such open file")]
    BadHandle,
    #[error("unsupported fallocate mode {0:#x}")]
    BadFallocate(i32),
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error(transparent)]
    Keep(#[from] KeepError),
    #[error("{path}: reading at byte {offset}")]
    Io {
        path: PathBuf,
        offset: u64,
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
            FsError::BadHandle => libc::EBADF,
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
}

/// The text of an `info.json` (the same every time: the catalog behind it does not change).
fn info_text(of: &(String, crate::catalog::RestorePoint)) -> Vec<u8> {
    crate::catalog::info::point_info(&of.0, &of.1).to_bytes()
}

/// The bytes of `all` a read of `size` bytes at `offset` gets.
fn part_of(all: &[u8], offset: u64, size: u32) -> &[u8] {
    let from = usize::try_from(offset).unwrap_or(usize::MAX).min(all.len());
    &all[from..all.len().min(from.saturating_add(size as usize))]
}

/// Partition files are numbered with this bit, the image's number shifted left by 8 and
/// the partition number: no counter-made number comes near 2^54, and Linux numbers at
/// most 255 partitions per disk ([`PART_MAX`]).
const PART_BIT: Ino = 1 << 62;
const PART_MAX: Ino = 0xff;

/// The end of the name of partition `n`'s file: `<disk>.p<n>.raw`.
fn part_suffix(n: u32) -> String {
    format!(".p{n}.raw")
}

/// `(<disk>, N)` of a partition file name `<disk>.p<N>.raw`, only as [`ImageFs::readdir`]
/// writes it (no sign, no leading zero), so `lookup` finds no name the listing lacks.
fn partition_name(name: &str) -> Option<(&str, u32)> {
    let (stem, n) = name.strip_suffix(".raw")?.rsplit_once(".p")?;
    let n: u32 = n.parse().ok()?;
    (name == format!("{stem}{}", part_suffix(n))).then_some((stem, n))
}

/// How long a replaced tree still answers for its nodes. The kernel trusts a name it
/// looked up for the entry TTL (1 s, see `fuse`): a `readlink`, `getattr` or `open` of a
/// node that left the tree within that time (a `latest` link that moved, an image whose
/// chain changed) is answered from the tree the kernel saw, not with ENOENT. Twice the TTL,
/// so a request already on its way when the TTL ran out is covered too.
const RETIRED_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// See the module note.
pub struct ImageFs {
    tree: RwLock<Arc<Tree>>,
    /// Held while a tree is built, so two refreshes never interleave.
    inos: Mutex<Inos>,
    /// Trees replaced in the last [`RETIRED_FOR`], newest last.
    retired: Mutex<Vec<(std::time::Instant, Arc<Tree>)>>,
    /// Open files by handle: an open file stays readable and writable after a refresh
    /// took it out of the tree (its set deleted or rotated away), until it is closed.
    handles: Mutex<HashMap<u64, Arc<Node>>>,
    next_fh: AtomicU64,
    cache: Arc<ReadCache>,
    budget: Arc<DirtyBudget>,
    writes: Writes,
    mounted_at: SystemTime,
    /// Told `(ino, offset, len)` when a write through one file changed bytes another file
    /// shows (an image and its partition files), so the adapter can drop the kernel's
    /// cached pages of that other file.
    alias_hook: OnceLock<AliasHook>,
}

/// See [`ImageFs::on_alias_change`].
pub type AliasHook = Box<dyn Fn(Ino, u64, u64) + Send + Sync>;

impl ImageFs {
    /// The filesystem of `catalog`. A kept overlay that cannot be used fails the mount.
    pub fn new(catalog: &Catalog, config: &FsConfig) -> Result<ImageFs> {
        let mut fs = ImageFs {
            tree: RwLock::new(Arc::new(Tree::default())),
            inos: Mutex::new(Inos::default()),
            retired: Mutex::new(Vec::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            cache: Arc::new(ReadCache::new(config.cache_size)),
            budget: Arc::new(DirtyBudget::new(config.dirty_size)),
            writes: config.writes.clone(),
            mounted_at: SystemTime::now(),
            alias_hook: OnceLock::new(),
        };
        let (tree, mut errors) = fs.build(catalog, None);
        if !errors.is_empty() {
            return Err(errors.swap_remove(0).into());
        }
        fs.tree = RwLock::new(Arc::new(tree));
        Ok(fs)
    }

    /// Swaps in the tree of `catalog` (SOURCE changed). Images that are the same carry
    /// over; kept overlays of images that left the tree are saved. Returns the number
    /// of images added and removed.
    pub fn refresh(&self, catalog: &Catalog) -> (usize, usize) {
        let old = self.tree.read().clone();
        let (tree, errors) = self.build(catalog, Some(&old));
        for e in errors {
            warn!("{}; that image is shown read-only", crate::error_chain(&e));
        }
        let added = tree.images().filter(|(ino, _)| old.image(*ino).is_none()).count();
        let gone: Vec<_> = old.images().filter(|(ino, _)| tree.image(*ino).is_none()).collect();
        *self.tree.write() = Arc::new(tree);
        let mut retired = self.retired.lock();
        retired.retain(|(at, _)| at.elapsed() < RETIRED_FOR);
        retired.push((std::time::Instant::now(), old.clone()));
        drop(retired);
        for (_, img) in &gone {
            if let Err(e) = img.sync() {
                warn!("saving the kept overlay of an image that left the tree: {}", crate::error_chain(&e));
            }
        }
        (added, gone.len())
    }

    /// Builds the tree of `catalog`, taking the images still the same from `old`. An
    /// image whose kept overlay cannot be used is made read-only; its error is returned.
    fn build(&self, catalog: &Catalog, old: Option<&Tree>) -> (Tree, Vec<KeepError>) {
        let mut errors = Vec::new();
        let tree = Tree::build(catalog, &mut self.inos.lock(), self.mounted_at, |specs| {
            let mut made: Vec<_> = specs.iter().map(|s| old.and_then(|t| t.image(s.ino)).cloned()).collect();
            let todo: Vec<usize> = (0..specs.len()).filter(|&i| made[i].is_none()).collect();
            let chains: Vec<_> = todo.iter().map(|&i| specs[i].layers.clone()).collect();
            for (&i, reader) in todo.iter().zip(ImageReader::many(&chains, &self.cache)) {
                let spec = &specs[i];
                let place = match &self.writes {
                    Writes::ReadOnly => OverlayPlace::None,
                    Writes::Scratch(dir) => OverlayPlace::Scratch(dir.join(format!("{}.overlay", spec.ino))),
                    Writes::Keep(dir) => OverlayPlace::Keep(dir),
                };
                let image =
                    Image::new(reader, spec.identity.clone(), place, &self.budget).unwrap_or_else(|e| {
                        errors.push(e);
                        Image::read_only(
                            ImageReader::new(spec.layers.clone(), self.cache.clone()),
                            &spec.identity,
                        )
                    });
                made[i] = Some(Arc::new(image));
            }
            made.into_iter().flatten().collect()
        });
        (tree, errors)
    }

    /// Sets the hook told of bytes changed under another file (see `alias_hook`).
    pub fn on_alias_change(&self, hook: AliasHook) {
        let _ = self.alias_hook.set(hook);
    }

    /// After `node` changed `len` bytes at `off` (of the file), tells the hook which
    /// other files show them: the image of a partition, or the partitions of an image.
    fn aliases_changed(&self, node: &Node, off: u64, len: u64) {
        let Some(hook) = self.alias_hook.get() else { return };
        match &node.kind {
            NodeKind::Part { start, .. } => hook((node.ino & !PART_BIT) >> 8, start + off, len),
            NodeKind::Image(img) => {
                for p in img.known_partitions().iter().filter(|p| Ino::from(p.number) <= PART_MAX) {
                    let (from, to) = (off.max(p.start), (off + len).min(p.start + p.len));
                    if from < to {
                        hook(PART_BIT | node.ino << 8 | Ino::from(p.number), from - p.start, to - from);
                    }
                }
            }
            _ => {}
        }
    }

    /// The node `ino` of the current tree, else of a tree replaced moments ago (see
    /// [`RETIRED_FOR`]).
    fn node(&self, ino: Ino) -> Result<Arc<Node>> {
        let tree = self.tree_with(ino).ok_or(FsError::NotFound)?;
        Self::node_in(&tree, ino).ok_or(FsError::NotFound)
    }

    /// The newest tree that has node `ino`: the current one, or a retired one.
    fn tree_with(&self, ino: Ino) -> Option<Arc<Tree>> {
        let current = self.tree.read().clone();
        if Self::node_in(&current, ino).is_some() {
            return Some(current);
        }
        let retired = self.retired.lock();
        retired.iter().rev().map(|(_, t)| t).find(|t| Self::node_in(t, ino).is_some()).cloned()
    }

    /// The node open under `fh`.
    fn handle(&self, fh: u64) -> Result<Arc<Node>> {
        self.handles.lock().get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    /// The image bytes a file shows: `(image, start, len)`, the whole image or the window
    /// of one of its partitions.
    fn window(node: &Node) -> Result<(&Arc<Image>, u64, u64)> {
        match &node.kind {
            NodeKind::Image(img) => Ok((img, 0, img.size())),
            NodeKind::Part { image, start, len } => Ok((image, *start, *len)),
            NodeKind::Dir(_) => Err(FsError::IsADirectory),
            _ => Err(FsError::ReadOnly),
        }
    }

    /// The partition files of the image node `img`, by partition number.
    fn partitions(img: &Node) -> Vec<(u32, Arc<Node>)> {
        let NodeKind::Image(image) = &img.kind else { return Vec::new() };
        let numbered = image.partitions().iter().filter(|p| Ino::from(p.number) <= PART_MAX);
        numbered.map(|p| (p.number, Self::part_node(img, image, p))).collect()
    }

    /// Partition `number` of the image node `img`, as a file.
    fn partition(img: &Node, number: u32) -> Option<Arc<Node>> {
        let NodeKind::Image(image) = &img.kind else { return None };
        let p = image.partitions().iter().find(|p| p.number == number && Ino::from(number) <= PART_MAX)?;
        Some(Self::part_node(img, image, p))
    }

    fn part_node(img: &Node, image: &Arc<Image>, p: &partition::Partition) -> Arc<Node> {
        let kind = NodeKind::Part { image: image.clone(), start: p.start, len: p.len };
        let ino = PART_BIT | img.ino << 8 | Ino::from(p.number);
        Arc::new(Node { ino, parent: img.parent, kind, mtime: img.mtime })
    }

    /// The node `ino` of the current tree, or the partition file it numbers.
    fn node_in(tree: &Tree, ino: Ino) -> Option<Arc<Node>> {
        if ino & PART_BIT == 0 {
            return tree.get(ino).cloned();
        }
        let img = tree.get((ino & !PART_BIT) >> 8)?;
        // The low 8 bits: at most PART_MAX, so the cast keeps them all.
        Self::partition(img, (ino & PART_MAX) as u32)
    }

    pub fn lookup(&self, parent: Ino, name: &str) -> Result<Attr> {
        let tree = self.tree.read().clone();
        match &tree.get(parent).ok_or(FsError::NotFound)?.kind {
            NodeKind::Dir(children) => {
                let find = |name: &str| {
                    let i = children.binary_search_by(|(n, _)| n.as_str().cmp(name)).ok()?;
                    tree.get(children[i].1)
                };
                if let Some(node) = find(name) {
                    return self.attr(node);
                }
                let (stem, n) = partition_name(name).ok_or(FsError::NotFound)?;
                let img = find(&format!("{stem}.raw")).ok_or(FsError::NotFound)?;
                let part = Self::partition(img, n).ok_or(FsError::NotFound)?;
                self.attr(&part)
            }
            _ => Err(FsError::NotADirectory),
        }
    }

    /// `stat`: of the open file `fh` when given (it may have left the tree), else of the
    /// node `ino` in the tree.
    pub fn getattr(&self, ino: Ino, fh: Option<u64>) -> Result<Attr> {
        match fh.and_then(|fh| self.handle(fh).ok()) {
            Some(node) => self.attr(&node),
            None => self.attr(&*self.node(ino)?),
        }
    }

    fn attr(&self, node: &Node) -> Result<Attr> {
        let (kind, size, blocks, perm) = match &node.kind {
            NodeKind::Dir(_) => (Kind::Dir, 0, 0, 0o555),
            NodeKind::Image(img) => {
                let perm = if img.writable() { 0o644 } else { 0o444 };
                (Kind::File, img.size(), img.data_bytes().div_ceil(512), perm)
            }
            NodeKind::Config { size, .. } => (Kind::File, *size, size.div_ceil(512), 0o444),
            NodeKind::Part { image, start, len } => {
                let perm = if image.writable() { 0o644 } else { 0o444 };
                (Kind::File, *len, image.data_bytes_in(*start, start + len).div_ceil(512), perm)
            }
            NodeKind::Info(of, len) => {
                let len = *len.get_or_init(|| info_text(of).len() as u64);
                (Kind::File, len, len.div_ceil(512), 0o444)
            }
            NodeKind::Text(t) => (Kind::File, t.len() as u64, (t.len() as u64).div_ceil(512), 0o444),
            NodeKind::Link(target) => (Kind::Link, target.len() as u64, 0, 0o777),
            NodeKind::Stats => {
                let len = self.stats().len() as u64;
                (Kind::File, len, len.div_ceil(512), 0o444)
            }
        };
        Ok(Attr { ino: node.ino, kind, size, blocks, mtime: node.mtime, perm })
    }

    /// `setattr`: the size of an image cannot change; other changes (times, modes) are
    /// accepted and ignored, so `touch` works.
    pub fn setattr(&self, ino: Ino, fh: Option<u64>, size: Option<u64>) -> Result<Attr> {
        let node = match fh.and_then(|fh| self.handle(fh).ok()) {
            Some(node) => node,
            None => self.node(ino)?,
        };
        let attr = self.attr(&node)?;
        match size {
            Some(s) if s != attr.size => {
                Self::window(&node)?;
                Err(FsError::FixedSize)
            }
            _ => Ok(attr),
        }
    }

    /// Directory entries after `offset` (0 = from the start): `(ino, next offset, kind, name)`.
    pub fn readdir(&self, ino: Ino, offset: u64) -> Result<Vec<(Ino, u64, Kind, String)>> {
        let tree = self.tree_with(ino).ok_or(FsError::NotFound)?;
        let node = tree.get(ino).ok_or(FsError::NotFound)?;
        let NodeKind::Dir(children) = &node.kind else { return Err(FsError::NotADirectory) };
        let dots = [(ino, ".".to_owned()), (node.parent, "..".to_owned())];
        let mut all: Vec<(Ino, String)> = dots.into_iter().collect();
        all.extend(children.iter().map(|(n, i)| (*i, n.clone())));
        for (name, child) in children {
            if let (Some(stem), Some(img)) = (name.strip_suffix(".raw"), tree.get(*child)) {
                let parts = Self::partitions(img);
                all.extend(
                    parts.into_iter().map(|(n, part)| (part.ino, format!("{stem}{}", part_suffix(n)))),
                );
            }
        }
        let kind = |child: Ino| match tree.get(child).map(|n| &n.kind) {
            Some(NodeKind::Dir(_)) => Kind::Dir,
            Some(NodeKind::Link(_)) => Kind::Link,
            _ => Kind::File,
        };
        let listed = all.into_iter().enumerate().skip(offset as usize);
        Ok(listed.map(|(k, (child, name))| (child, k as u64 + 1, kind(child), name)).collect())
    }

    pub fn readlink(&self, ino: Ino) -> Result<String> {
        match &self.node(ino)?.kind {
            NodeKind::Link(t) => Ok(t.clone()),
            _ => Err(FsError::NotALink),
        }
    }

    /// Opens `ino`; `write` is whether the caller asked for write access. Returns the
    /// file handle and whether the kernel may keep cached pages across opens (all but
    /// `.stats`).
    pub fn open(&self, ino: Ino, write: bool) -> Result<(u64, bool)> {
        let node = self.node(ino)?;
        let keep_cache = match &node.kind {
            NodeKind::Dir(_) => return Err(FsError::IsADirectory),
            NodeKind::Image(img) | NodeKind::Part { image: img, .. } if write && !img.writable() => {
                return Err(FsError::ReadOnly);
            }
            NodeKind::Image(_) | NodeKind::Part { .. } => true,
            _ if write => return Err(FsError::ReadOnly),
            NodeKind::Stats => false,
            _ => true,
        };
        let node = match &node.kind {
            NodeKind::Info(of, _) => {
                let kind = NodeKind::Text(info_text(of).into());
                Arc::new(Node { ino: node.ino, parent: node.parent, kind, mtime: node.mtime })
            }
            _ => node,
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, node);
        Ok((fh, keep_cache))
    }

    /// The last close of `fh`.
    pub fn release(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }

    /// Reads into a fresh buffer; see [`ImageFs::read_into`].
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_into(fh, offset, size, &mut buf)?;
        Ok(buf)
    }

    /// Replaces `buf`'s contents with up to `size` bytes of `fh` from `offset`. Image
    /// reads overwrite the buffer in place, so a caller that keeps `buf` between reads
    /// (the FUSE threads do) neither allocates nor zeroes it again.
    pub fn read_into(&self, fh: u64, offset: u64, size: u32, buf: &mut Vec<u8>) -> Result<()> {
        let node = self.handle(fh)?;
        let whole = |all: &[u8], buf: &mut Vec<u8>| {
            buf.clear();
            buf.extend_from_slice(part_of(all, offset, size));
        };
        match &node.kind {
            NodeKind::Image(_) | NodeKind::Part { .. } => {
                let (img, start, file_len) = Self::window(&node)?;
                let len = file_len.saturating_sub(offset).min(size as u64) as usize;
                // Every image read fills the whole range it returns, so old bytes left
                // in the buffer are overwritten, never returned.
                buf.resize(len, 0);
                let n = img.read_at(buf, start + offset)?;
                buf.truncate(n);
            }
            NodeKind::Text(t) => whole(t, buf),
            NodeKind::Info(of, _) => whole(&info_text(of), buf),
            NodeKind::Config { file, size: known } => {
                let io = |source| FsError::Io { path: file.shown(), offset, source };
                // The source follows no symlink, not even one swapped in since the scan.
                let reader = file.source.open(&file.path).map_err(|e| io(e.into_io()))?;
                let len = known.saturating_sub(offset).min(size as u64) as usize;
                buf.resize(len, 0);
                let n = read_full(&*reader, buf, offset).map_err(io)?;
                buf.truncate(n);
            }
            NodeKind::Stats => whole(self.stats().as_bytes(), buf),
            NodeKind::Dir(_) => return Err(FsError::IsADirectory),
            NodeKind::Link(_) => return Err(FsError::NotFound),
        }
        Ok(())
    }

    /// Writes into the image's overlay; a partition's writes stop at its end.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<usize> {
        let node = self.handle(fh)?;
        let (img, start, len) = Self::window(&node)?;
        if offset >= len && !data.is_empty() {
            // As on a block device: no space past the end.
            return Err(OverlayError::PastEnd { offset, size: len }.into());
        }
        let data = &data[..data.len().min((len - offset.min(len)) as usize)];
        let n = img.write_at(data, start + offset).ok_or(FsError::ReadOnly)??;
        self.aliases_changed(&node, offset, n as u64);
        Ok(n)
    }

    /// `fallocate`: punching a hole or zeroing a range (a guest's discard) makes it read
    /// as zeros; allocating inside the image is a no-op; nothing may change the size.
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        let node = self.handle(fh)?;
        let (img, start, size) = Self::window(&node)?;
        let inside = offset.checked_add(len).is_some_and(|e| e <= size);
        match mode & !falloc::KEEP_SIZE {
            0 if inside => Ok(()),
            0 => Err(FsError::FixedSize),
            falloc::PUNCH_HOLE | falloc::ZERO_RANGE => {
                let len = len.min(size.saturating_sub(offset));
                img.punch(start + offset, len).ok_or(FsError::ReadOnly)??;
                self.aliases_changed(&node, offset, len);
                Ok(())
            }
            _ => Err(FsError::BadFallocate(mode)),
        }
    }

    /// `fsync`/`flush`: a kept overlay is written out and its map saved; scratch overlays
    /// live only as long as the mount, so there is nothing more to make durable.
    pub fn sync(&self, fh: u64) -> Result<()> {
        if let Ok((img, _, _)) = Self::window(&*self.handle(fh)?) {
            img.sync()?;
        }
        Ok(())
    }

    /// Saves every kept overlay (at unmount): of the tree's images and of open ones that
    /// left it. Returns the first error after trying all.
    pub fn sync_all(&self) -> Result<()> {
        let tree = self.tree.read().clone();
        let open: Vec<Arc<Node>> = self.handles.lock().values().cloned().collect();
        let open_images = open.iter().filter_map(|n| Some(Self::window(n).ok()?.0));
        let mut first = Ok(());
        for img in tree.images().map(|(_, img)| img).chain(open_images) {
            if let Err(e) = img.sync()
                && first.is_ok()
            {
                first = Err(e.into());
            }
        }
        first
    }

    /// SEEK_DATA / SEEK_HOLE on an image; other files are all data.
    pub fn lseek(&self, fh: u64, offset: u64, whence: Seek) -> Result<u64> {
        let node = self.handle(fh)?;
        let Ok((img, start, len)) = Self::window(&node) else {
            // Other files are all data.
            let size = self.attr(&node)?.size;
            return match whence {
                _ if offset >= size => Err(FsError::NoData),
                Seek::Data => Ok(offset),
                Seek::Hole => Ok(size),
            };
        };
        if offset >= len {
            return Err(FsError::NoData);
        }
        let end = start + len;
        match whence {
            Seek::Data => {
                img.seek_data(start + offset).filter(|&d| d < end).map(|d| d - start).ok_or(FsError::NoData)
            }
            Seek::Hole => Ok(img.seek_hole(start + offset).min(end) - start),
        }
    }

    /// The `.stats` file's text.
    pub fn stats(&self) -> String {
        format!("{}dirty_bytes {}\n", self.cache.stats.render(&self.cache), self.budget.used())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Watched;

    /// The node at `path` (names from the root).
    fn walk(fs: &ImageFs, path: &[&str]) -> Attr {
        let mut at = fs.getattr(ROOT, None).expect("root");
        for name in path {
            at = fs.lookup(at.ino, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        at
    }

    #[test]
    fn an_image_indexed_again_keeps_its_number_and_kept_overlay() {
        let src = tempfile::tempdir().expect("tempdir");
        let keep = tempfile::tempdir().expect("tempdir");
        crate::sample::write_sample(src.path()).expect("sample");
        let (mut watched, cat) = Watched::open(src.path()).expect("catalog");
        let config =
            FsConfig { cache_size: 1 << 20, dirty_size: 1 << 20, writes: Writes::Keep(keep.path().into()) };
        let fs = ImageFs::new(&cat, &config).expect("fs");
        let path = ["sample-vm", "virtnbdbackup.0", "sda.raw"];
        let before = walk(&fs, &path);
        let (fh, _) = fs.open(before.ino, true).expect("open");
        assert_eq!(fs.write(fh, 4096, b"written").expect("write"), 7);
        // Touching the full makes the catalog index it again, under a new layer id.
        let full = std::fs::File::options().write(true).open(src.path().join("sda.full.data")).expect("full");
        full.set_modified(SystemTime::now() + std::time::Duration::from_secs(60)).expect("touch");
        let changed = watched.poll().expect("poll").expect("a change");
        fs.refresh(&changed);
        let after = walk(&fs, &path);
        assert_eq!(after.ino, before.ino, "the same backup keeps its number");
        assert_eq!(after.perm, 0o644, "still writable, not shown read-only");
        let (fh2, _) = fs.open(after.ino, false).expect("open again");
        assert_eq!(fs.read(fh2, 4096, 7).expect("read"), b"written");
        fs.release(fh);
        fs.release(fh2);
    }

    #[test]
    fn info_json_is_written_out_once_per_open_and_read_in_pieces() {
        let src = tempfile::tempdir().expect("tempdir");
        crate::sample::write_sample(src.path()).expect("sample");
        let cat = Catalog::discover(src.path()).expect("catalog");
        let fs = ImageFs::new(
            &cat,
            &FsConfig { cache_size: 1 << 20, dirty_size: 1 << 20, writes: Writes::ReadOnly },
        )
        .expect("fs");
        let at = walk(&fs, &["sample-vm", "virtnbdbackup.2", "info.json"]);
        let (fh, _) = fs.open(at.ino, false).expect("open");
        assert_eq!(fs.getattr(at.ino, Some(fh)).expect("fstat").size, at.size);
        let mut text = Vec::new();
        while let Ok(piece) = fs.read(fh, text.len() as u64, 100)
            && !piece.is_empty()
        {
            text.extend(piece);
        }
        fs.release(fh);
        assert_eq!(text.len() as u64, at.size);
        let doc: serde_json::Value = serde_json::from_slice(&text).expect("JSON");
        assert_eq!(doc["point"], "virtnbdbackup.2");
        assert!(fs.read(fh, 0, 100).is_err(), "released");
    }

    #[test]
    fn nodes_that_left_the_tree_answer_for_a_moment() {
        let src = tempfile::tempdir().expect("tempdir");
        crate::sample::write_sample(src.path()).expect("sample");
        let (mut watched, cat) = Watched::open(src.path()).expect("catalog");
        let config = FsConfig { cache_size: 1 << 20, dirty_size: 1 << 20, writes: Writes::ReadOnly };
        let fs = ImageFs::new(&cat, &config).expect("fs");
        let latest = walk(&fs, &["sample-vm", "latest"]);
        let target = fs.readlink(latest.ino).expect("readlink");
        let dir = walk(&fs, &["sample-vm", &target]);
        for disk in ["sda", "sdb"] {
            std::fs::remove_file(src.path().join(format!("{disk}.diff.1780560000.data"))).expect("rm");
        }
        let changed = watched.poll().expect("poll").expect("a change");
        fs.refresh(&changed);
        let moved = walk(&fs, &["sample-vm", "latest"]);
        assert_ne!(fs.readlink(moved.ino).expect("readlink"), target, "latest moved");
        // What the kernel looked up before the refresh still answers (its names are
        // trusted for a second): the old link, and the point that went away.
        assert_eq!(fs.readlink(latest.ino).expect("old link"), target);
        assert_eq!(fs.getattr(dir.ino, None).expect("old point").kind, Kind::Dir);
        assert!(!fs.readdir(dir.ino, 0).expect("old point's entries").is_empty());
        assert!(fs.lookup(walk(&fs, &["sample-vm"]).ino, &target).is_err(), "gone by name");
    }

    #[test]
    fn partition_names_are_read_only_as_listed() {
        assert_eq!(partition_name("sda.p1.raw"), Some(("sda", 1)));
        assert_eq!(partition_name("a.pb.p12.raw"), Some(("a.pb", 12)));
        for alias in ["sda.p01.raw", "sda.p+1.raw", "sda.p.raw", "sda.p1", "sda.raw", "sda.p1x.raw"] {
            assert_eq!(partition_name(alias), None, "{alias}");
        }
    }
}
