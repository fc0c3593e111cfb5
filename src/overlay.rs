//! The writable layer over an image: a dirty-page cache in memory that spills into a
//! sparse overlay file. Backup files are never written; written data is never dropped.
//!
//! State per image, looked up in this order:
//! 1. `mem`: dirty 4 KiB pages in memory. All images share one byte budget
//!    ([`DirtyBudget`], `--dirty-size`); when a write pushes the total past it, that
//!    image's pages are written into its overlay file and dropped from memory.
//! 2. `spilled`: page ranges whose bytes live in the overlay file (`File`) or that were
//!    discarded and read as zeros (`Zero`). A page in `mem` shadows its entry here.
//! 3. otherwise the base image: any [`ImageView`] (in the mount, the chain reader).
//!
//! The overlay file has the image's size and offsets, so page `p` is at `p * PAGE` in it,
//! and it is sparse: only spilled pages take space. One `RwLock` per image guards the
//! state; reads share it, writes, punches and spills take it exclusively. Holding it
//! across the file I/O of a spill is deliberate: it keeps the state and the file in step,
//! and spills are rare (once per `--dirty-size` of writes).
//!
//! A spill that fails (ENOSPC on the scratch disk) loses nothing: the pages stay in
//! memory. The write that triggered it has been applied and succeeds; later writes to that
//! overlay retry the spill first and fail with the error, changing nothing, until it
//! succeeds (e.g. after a punch freed space). So memory stays within the budget plus one
//! request per overlay.
//!
//! Layering: the overlay sits above the view it covers and knows it only as an
//! [`ImageView`]; it is itself an [`ImageView`] (the image with the writes), so a
//! partition window or a copy reads it like any other image.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use rangemap::RangeMap;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::warn;

use crate::view::{ImageView, Run, ViewError};

/// The unit of dirty data: the kernel's page size, and the block size guests and qemu
/// write in.
pub const PAGE: u64 = 4096;

/// Why a write-side request failed.
#[derive(Debug, Error)]
pub enum OverlayError {
    /// Reading the base image failed.
    #[error(transparent)]
    Base(#[from] ViewError),
    #[error("{path}: overlay file I/O failed")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("write at {offset} is past the end of the image ({size} bytes)")]
    PastEnd { offset: u64, size: u64 },
    #[error("{path}: the saved map is of a {map}-byte image, this image has {image} bytes")]
    MapSize { path: PathBuf, map: u64, image: u64 },
}

impl OverlayError {
    pub fn errno(&self) -> i32 {
        match self {
            OverlayError::Base(e) => e.errno(),
            // ENOSPC from a full scratch disk reaches the writer as ENOSPC.
            OverlayError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            // What a block device answers to a write past its end.
            OverlayError::PastEnd { .. } => libc::ENOSPC,
            OverlayError::MapSize { .. } => libc::EIO,
        }
    }
}

/// The memory all overlays of a mount may hold in dirty pages.
#[derive(Debug)]
pub struct DirtyBudget {
    used: AtomicU64,
    limit: u64,
}

impl DirtyBudget {
    pub fn new(limit: u64) -> DirtyBudget {
        DirtyBudget { used: AtomicU64::new(0), limit }
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Where spilled pages are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tier {
    File,
    Zero,
}

#[derive(Default)]
struct State {
    mem: BTreeMap<u64, Box<[u8]>>,
    spilled: RangeMap<u64, Tier>,
}

/// See the module note.
pub struct Overlay<B> {
    base: B,
    size: u64,
    path: PathBuf,
    /// Created at the first spill (or opened at load for a kept overlay); `opening`
    /// serializes that one-time creation, reads never take it.
    file: OnceLock<File>,
    opening: Mutex<()>,
    state: RwLock<State>,
    budget: std::sync::Arc<DirtyBudget>,
    /// Bumped by every write and punch: lets callers cache what they derive from the
    /// state (the thin size) and skip saving an unchanged kept overlay.
    version: AtomicU64,
}

/// The saved map of a kept overlay: which page ranges are in the file or zeroed.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedMap {
    pub size: u64,
    pub spilled: Vec<(u64, u64, Tier)>,
}

impl<B: ImageView> Overlay<B> {
    /// An empty overlay over `base` whose file (created on demand) is `path`.
    pub fn new(base: B, path: PathBuf, budget: std::sync::Arc<DirtyBudget>) -> Overlay<B> {
        Overlay {
            size: base.size(),
            base,
            path,
            file: OnceLock::new(),
            opening: Mutex::new(()),
            state: RwLock::new(State::default()),
            budget,
            version: AtomicU64::new(0),
        }
    }

    /// An overlay over `base` restored from a kept file and its saved map.
    pub fn load(
        map: &SavedMap,
        base: B,
        path: PathBuf,
        budget: std::sync::Arc<DirtyBudget>,
    ) -> Result<Overlay<B>, OverlayError> {
        if map.size != base.size() {
            return Err(OverlayError::MapSize { path, map: map.size, image: base.size() });
        }
        let o = Overlay::new(base, path, budget);
        {
            let mut st = o.state.write();
            for &(s, e, tier) in &map.spilled {
                if s < e {
                    st.spilled.insert(s..e, tier);
                }
            }
        }
        if !map.spilled.is_empty() {
            o.with_file(|_| Ok(()))?;
        }
        Ok(o)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image under the writes.
    pub fn base(&self) -> &B {
        &self.base
    }

    fn io_err(&self) -> impl FnOnce(io::Error) -> OverlayError + '_ {
        |source| OverlayError::Io { path: self.path.clone(), source }
    }

    fn with_file<T>(&self, f: impl FnOnce(&File) -> io::Result<T>) -> Result<T, OverlayError> {
        if self.file.get().is_none() {
            let _one = self.opening.lock();
            if self.file.get().is_none() {
                let file =
                    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&self.path);
                let file = file.map_err(self.io_err())?;
                file.set_len(self.size).map_err(self.io_err())?;
                let _ = self.file.set(file);
            }
        }
        f(self.file.get().expect("opened above")).map_err(self.io_err())
    }

    /// Reads `buf.len()` bytes at `off` (clipped at the end of the image).
    fn read(&self, buf: &mut [u8], off: u64) -> Result<usize, OverlayError> {
        let end = off.saturating_add(buf.len() as u64).min(self.size);
        if off >= end {
            return Ok(0);
        }
        let st = self.state.read();
        let mut pos = off;
        while pos < end {
            let page = pos / PAGE;
            let (src, run_end) = self.source_at(&st, page);
            let stop = run_end.saturating_mul(PAGE).min(end);
            let out = &mut buf[(pos - off) as usize..(stop - off) as usize];
            match src {
                Src::Mem => {
                    let mut at = pos;
                    while at < stop {
                        let p = &st.mem[&(at / PAGE)];
                        let from = (at % PAGE) as usize;
                        let n = ((stop - at) as usize).min(PAGE as usize - from);
                        let o = (at - pos) as usize;
                        out[o..o + n].copy_from_slice(&p[from..from + n]);
                        at += n as u64;
                    }
                }
                Src::File => self.with_file(|f| f.read_exact_at(out, pos))?,
                Src::Zero => out.fill(0),
                Src::Base => {
                    self.base.read_at(out, pos)?;
                }
            }
            pos = stop;
        }
        Ok((end - off) as usize)
    }

    /// Where page `page` reads from, and the first page after it that may read from
    /// elsewhere (runs of mem pages stop at each page; the others stop at the next change).
    fn source_at(&self, st: &State, page: u64) -> (Src, u64) {
        if st.mem.contains_key(&page) {
            // A run of consecutive dirty pages reads as one piece.
            let mut end = page + 1;
            for (&p, _) in st.mem.range(page + 1..) {
                if p != end {
                    break;
                }
                end += 1;
            }
            return (Src::Mem, end);
        }
        let next_mem = st.mem.range(page..).next().map_or(u64::MAX, |(&p, _)| p);
        match st.spilled.get_key_value(&page) {
            Some((r, tier)) => {
                let src = if *tier == Tier::File { Src::File } else { Src::Zero };
                (src, r.end.min(next_mem))
            }
            None => {
                let next_spill =
                    st.spilled.overlapping(page..u64::MAX).next().map_or(u64::MAX, |(r, _)| r.start);
                (Src::Base, next_mem.min(next_spill))
            }
        }
    }

    /// Writes `data` at `off`. Returns the bytes written (short at the end of the image).
    pub fn write_at(&self, data: &[u8], off: u64) -> Result<usize, OverlayError> {
        if data.is_empty() {
            return Ok(0);
        }
        if off >= self.size {
            return Err(OverlayError::PastEnd { offset: off, size: self.size });
        }
        let end = off.saturating_add(data.len() as u64).min(self.size);
        let mut st = self.state.write();
        // Still over the budget: an earlier spill failed (a full scratch disk). Make room
        // first, and if that fails too, fail this write having changed nothing: memory
        // stays bounded and a write that reports ENOSPC leaves no trace.
        if self.budget.used() > self.budget.limit && !st.mem.is_empty() {
            self.spill(&mut st)?;
        }
        self.version.fetch_add(1, Ordering::Relaxed);
        let mut pos = off;
        while pos < end {
            let page = pos / PAGE;
            let page_start = page * PAGE;
            let stop = (page_start + PAGE).min(end);
            let src = &data[(pos - off) as usize..(stop - off) as usize];
            let at = (pos - page_start) as usize;
            if !st.mem.contains_key(&page) {
                let mut p = vec![0u8; PAGE as usize].into_boxed_slice();
                if src.len() < PAGE as usize {
                    self.fill_page(&st, page, &mut p)?;
                }
                st.mem.insert(page, p);
                self.budget.used.fetch_add(PAGE, Ordering::Relaxed);
            }
            let p = st.mem.get_mut(&page).expect("inserted above");
            p[at..at + src.len()].copy_from_slice(src);
            pos = stop;
        }
        if self.budget.used() > self.budget.limit
            && let Err(e) = self.spill(&mut st)
        {
            // This write is applied and held in memory (over the budget by at most this
            // one request), so it succeeded; the next write retries the spill first.
            warn!(
                "{}; keeping {} bytes of written pages in memory until a spill succeeds",
                crate::error_chain(&e),
                st.mem.len() as u64 * PAGE
            );
        }
        Ok((end - off) as usize)
    }

    /// The current bytes of a page not in memory.
    fn fill_page(&self, st: &State, page: u64, p: &mut [u8]) -> Result<(), OverlayError> {
        let start = page * PAGE;
        let len = PAGE.min(self.size - start) as usize;
        match st.spilled.get(&page) {
            Some(Tier::File) => self.with_file(|f| f.read_exact_at(&mut p[..len], start)),
            Some(Tier::Zero) => Ok(()),
            None => self.base.read_at(&mut p[..len], start).map(|_| ()).map_err(OverlayError::from),
        }
    }

    /// Moves every in-memory page of this overlay into its file.
    fn spill(&self, st: &mut State) -> Result<(), OverlayError> {
        let pages: Vec<u64> = st.mem.keys().copied().collect();
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                j += 1;
            }
            // Written straight from the pages (no copy of the run: a spill must not need
            // as much memory again as the pages it frees).
            let start = pages[i] * PAGE;
            let bufs: Vec<&[u8]> = pages[i..j]
                .iter()
                .map(|p| {
                    let page = &st.mem[p][..];
                    &page[..(self.size - p * PAGE).min(PAGE) as usize]
                })
                .collect();
            self.with_file(|f| write_all_vectored_at(f, &bufs, start))?;
            st.spilled.insert(pages[i]..pages[j - 1] + 1, Tier::File);
            i = j;
        }
        self.budget.used.fetch_sub(PAGE * pages.len() as u64, Ordering::Relaxed);
        st.mem.clear();
        Ok(())
    }

    /// Makes `[off, off + len)` read as zeros (fallocate PUNCH_HOLE / ZERO_RANGE).
    pub fn punch(&self, off: u64, len: u64) -> Result<(), OverlayError> {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return Ok(());
        }
        // Whole pages inside the range become Zero; the partial pages at its edges (and
        // the last, short page of an image whose size is not a page multiple) are
        // written as zeros.
        let first_full = off.div_ceil(PAGE);
        let last_full = if end == self.size { end.div_ceil(PAGE) } else { end / PAGE };
        if first_full >= last_full {
            let zeros = vec![0u8; (end - off) as usize];
            return self.write_at(&zeros, off).map(|_| ());
        }
        if off < first_full * PAGE {
            self.write_at(&vec![0u8; (first_full * PAGE - off) as usize], off)?;
        }
        let tail = last_full * PAGE;
        if tail < end {
            self.write_at(&vec![0u8; (end - tail) as usize], tail)?;
        }
        let mut st = self.state.write();
        self.version.fetch_add(1, Ordering::Relaxed);
        let dropped = st.mem.range(first_full..last_full).count() as u64;
        let keys: Vec<u64> = st.mem.range(first_full..last_full).map(|(&k, _)| k).collect();
        for k in keys {
            st.mem.remove(&k);
        }
        self.budget.used.fetch_sub(dropped * PAGE, Ordering::Relaxed);
        let had_file = st.spilled.overlapping(first_full..last_full).any(|(_, t)| *t == Tier::File);
        st.spilled.insert(first_full..last_full, Tier::Zero);
        drop(st);
        if had_file {
            // Give the space back; the map already says Zero, so a failure here only
            // costs disk space.
            let _ = self.with_file(|f| {
                let range = (first_full * PAGE) as i64;
                let len = ((last_full * PAGE).min(self.size) - first_full * PAGE) as i64;
                nix::fcntl::fallocate(
                    f,
                    nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    range,
                    len,
                )
                .map_err(io::Error::from)
            });
        }
        Ok(())
    }

    /// The run containing `pos`: whether it is data, and where it ends (clipped to the
    /// image).
    fn run(&self, pos: u64) -> (Run, u64) {
        let st = self.state.read();
        let page = pos / PAGE;
        let (src, next) = self.source_at(&st, page);
        let mut end = next.saturating_mul(PAGE).min(self.size);
        let run = match src {
            Src::Mem | Src::File => Run::Data,
            Src::Zero => Run::Hole,
            Src::Base => {
                let (run, base_end) = self.base.run_at(pos);
                end = end.min(base_end);
                run
            }
        };
        (run, end.max(pos + 1))
    }

    /// Spills every dirty page, syncs the file and returns the map to save (for kept
    /// overlays).
    pub fn persist(&self) -> Result<SavedMap, OverlayError> {
        let mut st = self.state.write();
        if !st.mem.is_empty() {
            self.spill(&mut st)?;
        }
        if let Some(f) = self.file.get() {
            f.sync_all().map_err(self.io_err())?;
        }
        let spilled = st.spilled.iter().map(|(r, t)| (r.start, r.end, *t)).collect();
        Ok(SavedMap { size: self.size, spilled })
    }

    /// Changes whenever the overlay's content does.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Whether anything was ever written.
    pub fn is_empty(&self) -> bool {
        let st = self.state.read();
        st.mem.is_empty() && st.spilled.is_empty()
    }
}

/// The image with the writes.
impl<B: ImageView> ImageView for Overlay<B> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, ViewError> {
        self.read(buf, off).map_err(|e| match e {
            OverlayError::Base(e) => e,
            e => ViewError::new(e.errno(), e),
        })
    }

    fn run_at(&self, pos: u64) -> (Run, u64) {
        self.run(pos)
    }
}

/// Most buffers one `pwritev` takes (Linux's IOV_MAX).
const IOV_MAX: usize = 1024;

/// Writes `bufs` back to back at `offset`, with as few `pwritev` calls as it takes.
fn write_all_vectored_at(file: &File, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let mut queue: std::collections::VecDeque<&[u8]> =
        bufs.iter().copied().filter(|b| !b.is_empty()).collect();
    while !queue.is_empty() {
        let iov: Vec<io::IoSlice<'_>> = queue.iter().take(IOV_MAX).map(|b| io::IoSlice::new(b)).collect();
        let mut n = nix::sys::uio::pwritev(file, &iov, offset as i64).map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        offset += n as u64;
        while n > 0 {
            let front = queue.pop_front().expect("n <= bytes queued");
            if n < front.len() {
                queue.push_front(&front[n..]);
                n = 0;
            } else {
                n -= front.len();
            }
        }
    }
    Ok(())
}

/// Where one page reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Mem,
    File,
    Zero,
    Base,
}

impl<B> Drop for Overlay<B> {
    fn drop(&mut self) {
        let pages = self.state.get_mut().mem.len() as u64;
        self.budget.used.fetch_sub(pages * PAGE, Ordering::Relaxed);
    }
}
