//! One image of the mount: the shared chain reader, plus (unless read-only) its overlay.
//!
//! A kept overlay (`--keep-overlay DIR`) lives at `DIR/<domain>/<point>/<disk>.overlay`
//! with a map `<disk>.overlay.json` beside it. The map records the identity of the
//! restore point the overlay was written against (domain, point, disk, and each stream
//! file's name and size); an overlay whose identity does not match is refused, because
//! its pages would be laid over the wrong disk contents.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::partition::{self, Partition};
use crate::cache::{DirtyBudget, Overlay, OverlayError, Run, SavedMap};
use crate::chain::ImageReader;
use tracing::warn;

/// The unit of SEEK_DATA / SEEK_HOLE answers. Tools such as `qemu-img convert` copy whole
/// 512-byte sectors between the offsets lseek gives them, so an extent edge inside a
/// sector (the format allows any byte offset) must not be reported as one: the data of
/// the partial sector would be dropped.
const SECTOR: u64 = 512;

/// Problems with a kept overlay, found when mounting.
#[derive(Debug, Error)]
pub enum KeepError {
    #[error(
        "{map}: this overlay was written against another restore point ({found}), not {expected}; \
         use another --keep-overlay folder or remove it"
    )]
    Mismatch { map: PathBuf, expected: String, found: String },
    #[error("{path}: cannot read or write the kept overlay")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: in use by another vmback mount")]
    Busy { path: PathBuf },
    #[error("{path}: the kept overlay's data file is missing; its map says it holds data")]
    MissingData { path: PathBuf },
    #[error("{path}: the kept overlay's map is not valid")]
    BadMap {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Overlay(#[from] OverlayError),
}

/// What a kept overlay belongs to; its chain also keeps an image's inode number (and the
/// image) across a refresh (see `inode`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub domain: String,
    pub point: String,
    pub disk: String,
    /// The stream files of the chain, oldest first.
    pub chain: Vec<ChainFile>,
}

/// One stream file, as much as tells it apart from a later backup of the same disk
/// under the same name (a re-taken full has the same name and may have the same size,
/// never the same date).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChainFile {
    pub name: String,
    pub size: u64,
    pub date: String,
    pub checkpoint: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files: Vec<String> = self.chain.iter().map(|c| format!("{} of {}", c.name, c.date)).collect();
        write!(f, "{}/{}/{} from {}", self.domain, self.point, self.disk, files.join(" + "))
    }
}

#[derive(Serialize, Deserialize)]
struct MapFile {
    identity: Identity,
    map: SavedMap,
}

/// Where a kept overlay's map is saved.
struct Kept {
    map_path: PathBuf,
    identity: Identity,
    /// An exclusive lock on `<disk>.overlay.lock`, held while mounted, so two mounts
    /// never write one overlay.
    _lock: nix::fcntl::Flock<std::fs::File>,
    /// The overlay version last saved (0: as loaded, or nothing written).
    saved: parking_lot::Mutex<u64>,
}

/// See the module note.
pub struct Image {
    pub reader: ImageReader,
    overlay: Option<Overlay>,
    kept: Option<Kept>,
    /// `(overlay version, data bytes)`: the thin size is a walk over the image, so it is
    /// computed once per change, not once per `stat`.
    thin: parking_lot::Mutex<Option<(u64, u64)>>,
    /// `domain/point/disk`, for log lines.
    label: String,
    /// The partition table, read on first use.
    partitions: OnceLock<Vec<Partition>>,
}

/// Where an image's overlay goes.
pub enum OverlayPlace<'a> {
    /// Read-only image.
    None,
    /// A file in the mount's scratch folder, deleted at unmount.
    Scratch(PathBuf),
    /// Kept across mounts under this folder.
    Keep(&'a Path),
}

impl Image {
    pub fn new(
        reader: ImageReader,
        identity: Identity,
        place: OverlayPlace<'_>,
        budget: &Arc<DirtyBudget>,
    ) -> Result<Image, KeepError> {
        let size = reader.size();
        let (overlay, kept) = match place {
            OverlayPlace::None => return Ok(Image::read_only(reader, &identity)),
            OverlayPlace::Scratch(path) => (Some(Overlay::new(size, path, budget.clone())), None),
            OverlayPlace::Keep(dir) => {
                let folder = dir.join(&identity.domain).join(&identity.point);
                std::fs::create_dir_all(&folder)
                    .map_err(|source| KeepError::Io { path: folder.clone(), source })?;
                let data = folder.join(format!("{}.overlay", identity.disk));
                let map_path = folder.join(format!("{}.overlay.json", identity.disk));
                let lock_path = folder.join(format!("{}.overlay.lock", identity.disk));
                let lock_file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)
                    .map_err(|source| KeepError::Io { path: lock_path.clone(), source })?;
                let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
                    .map_err(|_| KeepError::Busy { path: data.clone() })?;
                let overlay = match std::fs::read(&map_path) {
                    Ok(bytes) => {
                        let saved: MapFile = serde_json::from_slice(&bytes)
                            .map_err(|source| KeepError::BadMap { path: map_path.clone(), source })?;
                        if saved.identity != identity || saved.map.size != size {
                            return Err(KeepError::Mismatch {
                                map: map_path,
                                expected: identity.to_string(),
                                found: saved.identity.to_string(),
                            });
                        }
                        if saved.map.spilled.iter().any(|s| s.2 == crate::cache::Tier::File) && !data.exists()
                        {
                            return Err(KeepError::MissingData { path: data });
                        }
                        Overlay::load(&saved.map, data, budget.clone())?
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Overlay::new(size, data, budget.clone())
                    }
                    Err(source) => return Err(KeepError::Io { path: map_path, source }),
                };
                let kept = Kept {
                    map_path,
                    identity: identity.clone(),
                    _lock: lock,
                    saved: parking_lot::Mutex::new(0),
                };
                (Some(overlay), Some(kept))
            }
        };
        Ok(Image { overlay, kept, ..Image::read_only(reader, &identity) })
    }

    /// An image without overlay (EROFS on write).
    pub fn read_only(reader: ImageReader, identity: &Identity) -> Image {
        Image {
            reader,
            overlay: None,
            kept: None,
            thin: parking_lot::Mutex::new(None),
            label: format!("{}/{}/{}", identity.domain, identity.point, identity.disk),
            partitions: OnceLock::new(),
        }
    }

    /// The partitions of the image's MBR or GPT, read (through the overlay) on first use;
    /// none when there is no table, or when it cannot be read (logged).
    pub fn partitions(&self) -> &[Partition] {
        self.partitions.get_or_init(|| {
            // The table's warnings (entries skipped) name the image through this span.
            let _image = tracing::warn_span!("partition table", image = %self.label).entered();
            let mut read = |buf: &mut [u8], off: u64| self.read_at(buf, off).map_err(std::io::Error::other);
            partition::read_table(self.size(), &mut read).unwrap_or_else(|e| {
                warn!("no partition files: {}", crate::error_chain(&e));
                Vec::new()
            })
        })
    }

    pub fn size(&self) -> u64 {
        self.reader.size()
    }

    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, OverlayError> {
        match &self.overlay {
            Some(o) => o.read_at(&self.reader, buf, off),
            None => Ok(self.reader.read_at(buf, off)?),
        }
    }

    /// Writes through the overlay; `None` for a read-only image.
    pub fn write_at(&self, data: &[u8], off: u64) -> Option<Result<usize, OverlayError>> {
        self.overlay.as_ref().map(|o| o.write_at(&self.reader, data, off))
    }

    /// Zeroes a range; `None` for a read-only image.
    pub fn punch(&self, off: u64, len: u64) -> Option<Result<(), OverlayError>> {
        self.overlay.as_ref().map(|o| o.punch(&self.reader, off, len))
    }

    /// The data-or-hole run containing `pos` and its end.
    pub fn run_at(&self, pos: u64) -> (Run, u64) {
        match &self.overlay {
            Some(o) => o.run_at(&self.reader, pos),
            None => {
                let piece = self.reader.map().pieces(pos..pos + 1).first().copied();
                match piece {
                    Some(p) if p.src.is_data() => (Run::Data, p.end),
                    Some(p) => (Run::Hole, p.end),
                    None => (Run::Hole, self.size()),
                }
            }
        }
    }

    /// The first offset at or after `pos` in a run of kind `want`, if any before the end.
    fn next_run(&self, mut pos: u64, want: Run) -> Option<u64> {
        while pos < self.size() {
            let (run, end) = self.run_at(pos);
            if run == want {
                return Some(pos);
            }
            pos = end;
        }
        None
    }

    /// Whether `[from, to)` holds no data.
    fn all_hole(&self, from: u64, to: u64) -> bool {
        self.next_run(from, Run::Data).is_none_or(|d| d >= to)
    }

    /// SEEK_DATA. Answers are in whole sectors: a sector with any data counts as data.
    pub fn seek_data(&self, pos: u64) -> Option<u64> {
        let sector = pos / SECTOR * SECTOR;
        if pos < self.size() && !self.all_hole(sector, (sector + SECTOR).min(self.size())) {
            return Some(pos);
        }
        self.next_run(pos, Run::Data).map(|d| (d / SECTOR * SECTOR).max(pos))
    }

    /// SEEK_HOLE, in whole sectors like [`Image::seek_data`]; the end counts as a hole.
    pub fn seek_hole(&self, pos: u64) -> u64 {
        let size = self.size();
        let mut from = pos;
        loop {
            let Some(h) = self.next_run(from, Run::Hole) else { return size };
            let sector = h / SECTOR * SECTOR;
            if self.all_hole(sector, (sector + SECTOR).min(size)) {
                return h;
            }
            let next = sector + SECTOR;
            if next >= size {
                return size;
            }
            if self.all_hole(next, (next + SECTOR).min(size)) {
                return next;
            }
            from = next;
        }
    }

    /// The partitions, if they were read already.
    pub fn known_partitions(&self) -> &[Partition] {
        self.partitions.get().map_or(&[], |p| p)
    }

    /// Bytes in data runs between `from` and `to`.
    pub fn data_bytes_in(&self, from: u64, to: u64) -> u64 {
        let (mut pos, mut total) = (from, 0);
        while pos < to.min(self.size()) {
            let (run, end) = self.run_at(pos);
            let end = end.min(to);
            if run == Run::Data {
                total += end - pos;
            }
            pos = end;
        }
        total
    }

    /// Bytes in data runs: what `du` shows.
    pub fn data_bytes(&self) -> u64 {
        match &self.overlay {
            Some(o) if !o.is_empty() => {
                let version = o.version();
                let mut thin = self.thin.lock();
                if let Some((v, bytes)) = *thin
                    && v == version
                {
                    return bytes;
                }
                let total = self.data_bytes_in(0, self.size());
                *thin = Some((version, total));
                total
            }
            _ => self.reader.map().data_bytes(),
        }
    }

    /// For a kept overlay: writes dirty pages to its file, syncs it and saves the map
    /// (atomically: a temporary file renamed over the old map).
    pub fn sync(&self) -> Result<(), KeepError> {
        let (Some(o), Some(k)) = (&self.overlay, &self.kept) else { return Ok(()) };
        let mut saved = k.saved.lock();
        let version = o.version();
        if *saved == version {
            return Ok(());
        }
        let map = o.persist()?;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| KeepError::Io { path, source }
        };
        let tmp = k.map_path.with_extension("json.tmp");
        let bytes =
            serde_json::to_vec(&MapFile { identity: k.identity.clone(), map }).expect("in-memory JSON");
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        std::io::Write::write_all(&mut &file, &bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &k.map_path).map_err(io(&k.map_path))?;
        if let Some(dir) = k.map_path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
        }
        *saved = version;
        Ok(())
    }
}
