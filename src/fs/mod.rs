//! The filesystem core: every decision of the mount, with no FUSE types in it, so tests
//! can drive it without the kernel. [`fuse`] is the thin adapter that replies to the
//! kernel; [`session`] mounts it.
//!
//! A tree is immutable; when SOURCE changes, [`ImageFs::refresh`] builds a new one and
//! swaps it in (see [`inode`]). Requests by inode number (lookup, getattr, readdir, open)
//! see the current tree; requests on an open file go through its handle, which holds the
//! node it opened (for an `info.json`, its text, written out at open), so an open image
//! keeps working after a refresh took it out of the tree (see [`handle`]). Every handle
//! of one image shares the image's one overlay, so two handles always see the same bytes.
//! The other mutable state is each overlay (its own lock), the read cache (its own lock)
//! and the numbers of synthetic nodes (its own lock).
//!
//! Nodes not in the tree come from providers ([`provider`]): the core asks each for the
//! entries it adds to a folder and numbers them; partition files ([`part_files`]) are the
//! first. A new kind of synthetic node is a new provider in [`ImageFs::new`]'s list; the
//! request methods and the FUSE adapter stay as they are.

pub mod fuse;
pub mod handle;
pub mod image;
pub mod inode;
pub mod live;
#[cfg(test)]
mod mem_source;
#[cfg(test)]
mod model_tests;
pub mod part_files;
pub mod partition;
pub mod provider;
pub mod session;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use thiserror::Error;
use tracing::warn;

use crate::cache::ReadCache;
use crate::catalog::Catalog;
use crate::chain::{ImageReader, io::read_full};
use crate::overlay::{DirtyBudget, OverlayError};
use crate::view::{ImageView, ViewError};
use handle::Handles;
use image::{Image, KeepError, OverlayPlace};
use inode::{Counter, Inos, Node, SynthInos, SynthKey, Tree};
pub use inode::{Ino, NodeKind, ROOT};
use provider::{Entry, Provider, Target};

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
    View(#[from] ViewError),
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
            FsError::View(e) => e.errno(),
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
    handles: Handles,
    /// Numbers of the providers' nodes; from the same counter as `inos`.
    synth: Mutex<SynthInos>,
    /// What adds nodes to the tree's folders; a node's provider is its index here.
    providers: Vec<Box<dyn Provider>>,
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
        let numbers = Counter::default();
        let mut fs = ImageFs {
            tree: RwLock::new(Arc::new(Tree::default())),
            inos: Mutex::new(Inos::new(numbers.clone())),
            retired: Mutex::new(Vec::new()),
            handles: Handles::default(),
            synth: Mutex::new(SynthInos::new(numbers)),
            providers: vec![Box::new(part_files::PartitionFiles)],
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
        // Numbers of synthetic nodes whose folder no tree still answering has are let go.
        let current = self.tree.read().clone();
        let live = |ino| current.get(ino).is_some() || retired.iter().any(|(_, t)| t.get(ino).is_some());
        self.synth.lock().retain(live);
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
    /// other files show them (as the providers say: the image of a partition, or the
    /// partitions of an image).
    fn aliases_changed(&self, node: &Node, off: u64, len: u64) {
        let Some(hook) = self.alias_hook.get() else { return };
        for (provider, p) in self.providers.iter().enumerate() {
            for (target, off, len) in p.aliases(node, off, len) {
                let ino = match target {
                    Target::Ino(ino) => Some(ino),
                    Target::Entry { dir, key } => self.synth.lock().find(&SynthKey { dir, provider, key }),
                };
                if let Some(ino) = ino {
                    hook(ino, off, len);
                }
            }
        }
    }

    /// The node `ino` of the current tree, else of a tree replaced moments ago (see
    /// [`RETIRED_FOR`]).
    fn node(&self, ino: Ino) -> Result<Arc<Node>> {
        let tree = self.tree_with(ino).ok_or(FsError::NotFound)?;
        self.node_in(&tree, ino).ok_or(FsError::NotFound)
    }

    /// The newest tree that has node `ino`: the current one, or a retired one.
    fn tree_with(&self, ino: Ino) -> Option<Arc<Tree>> {
        let current = self.tree.read().clone();
        if self.node_in(&current, ino).is_some() {
            return Some(current);
        }
        let retired = self.retired.lock();
        retired.iter().rev().map(|(_, t)| t).find(|t| self.node_in(t, ino).is_some()).cloned()
    }

    /// The node open under `fh`.
    fn handle(&self, fh: u64) -> Result<Arc<Node>> {
        self.handles.get(fh).ok_or(FsError::BadHandle)
    }

    /// The image bytes a file shows: `(image, start, len)`, the whole image or the window
    /// of one of its partitions.
    fn window(node: &Node) -> Result<(&Arc<Image>, u64, u64)> {
        match &node.kind {
            NodeKind::Image(img) => Ok((img, 0, img.size())),
            NodeKind::Part { window, .. } => Ok((window.inner(), window.start(), window.size())),
            NodeKind::Dir(_) => Err(FsError::IsADirectory),
            _ => Err(FsError::ReadOnly),
        }
    }

    /// What a file of an image reads as: the image, or its partition's window.
    fn view(node: &Node) -> Option<&dyn ImageView> {
        match &node.kind {
            NodeKind::Image(img) => Some(&**img),
            NodeKind::Part { window, .. } => Some(window),
            _ => None,
        }
    }

    /// The node `ino` of `tree`, or the synthetic node it numbers there (asked of its
    /// provider in its folder).
    fn node_in(&self, tree: &Tree, ino: Ino) -> Option<Arc<Node>> {
        if let Some(node) = tree.get(ino) {
            return Some(node.clone());
        }
        let key = self.synth.lock().key(ino)?.clone();
        let dir = self.node_in(tree, key.dir)?;
        let entry = self.providers.get(key.provider)?.entry(tree, &dir, &key.key)?;
        Some(Self::made(ino, &dir, entry))
    }

    fn made(ino: Ino, dir: &Node, e: Entry) -> Arc<Node> {
        Arc::new(Node { ino, parent: dir.ino, kind: e.kind, mtime: e.mtime })
    }

    /// Numbers the entry provider `provider` added to `dir`.
    fn number(&self, dir: &Node, provider: usize, e: Entry) -> Arc<Node> {
        let ino = self.synth.lock().number(SynthKey { dir: dir.ino, provider, key: e.key.clone() });
        Self::made(ino, dir, e)
    }

    pub fn lookup(&self, parent: Ino, name: &str) -> Result<Attr> {
        let tree = self.tree.read().clone();
        let dir = self.node_in(&tree, parent).ok_or(FsError::NotFound)?;
        let NodeKind::Dir(children) = &dir.kind else { return Err(FsError::NotADirectory) };
        if let Ok(i) = children.binary_search_by(|(n, _)| n.as_str().cmp(name))
            && let Some(node) = tree.get(children[i].1)
        {
            return self.attr(node);
        }
        for (i, p) in self.providers.iter().enumerate() {
            if let Some(e) = p.lookup(&tree, &dir, name) {
                return self.attr(&self.number(&dir, i, e));
            }
        }
        Err(FsError::NotFound)
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
            NodeKind::Part { window, .. } => {
                let perm = if window.inner().writable() { 0o644 } else { 0o444 };
                (Kind::File, window.size(), window.data_bytes().div_ceil(512), perm)
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
        let node = self.node_in(&tree, ino).ok_or(FsError::NotFound)?;
        let NodeKind::Dir(children) = &node.kind else { return Err(FsError::NotADirectory) };
        let dots = [(ino, Kind::Dir, ".".to_owned()), (node.parent, Kind::Dir, "..".to_owned())];
        let mut all: Vec<(Ino, Kind, String)> = dots.into_iter().collect();
        let kind_in_tree = |child: Ino| tree.get(child).map_or(Kind::File, |n| Self::kind(&n.kind));
        all.extend(children.iter().map(|(n, i)| (*i, kind_in_tree(*i), n.clone())));
        for (i, p) in self.providers.iter().enumerate() {
            for e in p.children(&tree, &node) {
                let name = e.name.clone();
                let made = self.number(&node, i, e);
                all.push((made.ino, Self::kind(&made.kind), name));
            }
        }
        let listed = all.into_iter().enumerate().skip(offset as usize);
        Ok(listed.map(|(k, (child, kind, name))| (child, k as u64 + 1, kind, name)).collect())
    }

    /// The file type a node shows.
    fn kind(kind: &NodeKind) -> Kind {
        match kind {
            NodeKind::Dir(_) => Kind::Dir,
            NodeKind::Link(_) => Kind::Link,
            _ => Kind::File,
        }
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
            NodeKind::Image(_) | NodeKind::Part { .. } if write && !Self::window(&node)?.0.writable() => {
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
        Ok((self.handles.open(node), keep_cache))
    }

    /// The last close of `fh`.
    pub fn release(&self, fh: u64) {
        self.handles.close(fh);
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
                let view = Self::view(&node).ok_or(FsError::IsADirectory)?;
                let len = view.size().saturating_sub(offset).min(size as u64) as usize;
                // Every image read fills the whole range it returns, so old bytes left
                // in the buffer are overwritten, never returned.
                buf.resize(len, 0);
                let n = view.read_at(buf, offset)?;
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
        let open = self.handles.all();
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
        let Some(view) = Self::view(&node) else {
            // Other files are all data.
            let size = self.attr(&node)?.size;
            return match whence {
                _ if offset >= size => Err(FsError::NoData),
                Seek::Data => Ok(offset),
                Seek::Hole => Ok(size),
            };
        };
        if offset >= view.size() {
            return Err(FsError::NoData);
        }
        match whence {
            Seek::Data => view.seek_data(offset).ok_or(FsError::NoData),
            Seek::Hole => Ok(view.seek_hole(offset)),
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

    /// The options of these tests: 1 MiB of cache and of dirty pages, direct reads.
    pub(super) fn config(writes: Writes) -> FsConfig {
        FsConfig { cache_size: 1 << 20, dirty_size: 1 << 20, writes }
    }

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
        let config = config(Writes::Keep(keep.path().into()));
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
        let fs = ImageFs::new(&cat, &config(Writes::ReadOnly)).expect("fs");
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
        let config = config(Writes::ReadOnly);
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
}
