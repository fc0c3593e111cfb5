//! One image of the mount: the chain reader, or (unless read-only) the overlay over it.
//! It is an [`ImageView`]: reads, runs, SEEK_DATA/SEEK_HOLE and the thin size come from
//! whichever of the two it holds.
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
use crate::chain::ImageReader;
use crate::overlay::{DirtyBudget, Overlay, OverlayError, SavedMap, Tier};
use crate::view::{ImageView, Run, ViewError};
use tracing::warn;

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

/// What an image reads from.
enum Layers {
    ReadOnly(ImageReader),
    Writable(Overlay<ImageReader>),
}

/// See the module note.
pub struct Image {
    layers: Layers,
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
            OverlayPlace::Scratch(path) => (Overlay::new(reader, path, budget.clone()), None),
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
                        if saved.map.spilled.iter().any(|s| s.2 == Tier::File) && !data.exists() {
                            return Err(KeepError::MissingData { path: data });
                        }
                        Overlay::load(&saved.map, reader, data, budget.clone())?
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Overlay::new(reader, data, budget.clone())
                    }
                    Err(source) => return Err(KeepError::Io { path: map_path, source }),
                };
                let kept = Kept {
                    map_path,
                    identity: identity.clone(),
                    _lock: lock,
                    saved: parking_lot::Mutex::new(0),
                };
                (overlay, Some(kept))
            }
        };
        let mut image = Image::with(Layers::Writable(overlay), &identity);
        image.kept = kept;
        Ok(image)
    }

    /// An image without overlay (EROFS on write).
    pub fn read_only(reader: ImageReader, identity: &Identity) -> Image {
        Image::with(Layers::ReadOnly(reader), identity)
    }

    fn with(layers: Layers, identity: &Identity) -> Image {
        Image {
            layers,
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
            partition::read_table(self).unwrap_or_else(|e| {
                warn!("no partition files: {}", crate::error_chain(&e));
                Vec::new()
            })
        })
    }

    /// The partitions, if they were read already.
    pub fn known_partitions(&self) -> &[Partition] {
        self.partitions.get().map_or(&[], |p| p)
    }

    pub fn writable(&self) -> bool {
        matches!(self.layers, Layers::Writable(_))
    }

    fn overlay(&self) -> Option<&Overlay<ImageReader>> {
        match &self.layers {
            Layers::Writable(o) => Some(o),
            Layers::ReadOnly(_) => None,
        }
    }

    /// Writes through the overlay; `None` for a read-only image.
    pub fn write_at(&self, data: &[u8], off: u64) -> Option<Result<usize, OverlayError>> {
        self.overlay().map(|o| o.write_at(data, off))
    }

    /// Zeroes a range; `None` for a read-only image.
    pub fn punch(&self, off: u64, len: u64) -> Option<Result<(), OverlayError>> {
        self.overlay().map(|o| o.punch(off, len))
    }

    /// For a kept overlay: writes dirty pages to its file, syncs it and saves the map
    /// (atomically: a temporary file renamed over the old map).
    pub fn sync(&self) -> Result<(), KeepError> {
        let (Some(o), Some(k)) = (self.overlay(), &self.kept) else { return Ok(()) };
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

impl ImageView for Image {
    fn size(&self) -> u64 {
        match &self.layers {
            Layers::ReadOnly(r) => ImageView::size(r),
            Layers::Writable(o) => o.size(),
        }
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, ViewError> {
        match &self.layers {
            Layers::ReadOnly(r) => ImageView::read_at(r, buf, off),
            Layers::Writable(o) => o.read_at(buf, off),
        }
    }

    fn run_at(&self, pos: u64) -> (Run, u64) {
        match &self.layers {
            Layers::ReadOnly(r) => r.run_at(pos),
            Layers::Writable(o) => o.run_at(pos),
        }
    }

    /// From the chain's map while nothing was written; else a walk over the runs, done
    /// once per change of the overlay.
    fn data_bytes(&self) -> u64 {
        match &self.layers {
            Layers::Writable(o) if !o.is_empty() => {
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
            Layers::Writable(o) => o.base().data_bytes(),
            Layers::ReadOnly(r) => ImageView::data_bytes(r),
        }
    }
}
