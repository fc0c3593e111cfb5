//! One backup set (a folder written by one virtnbdbackup chain) and its restore points.
//!
//! Chains are ordered by metadata, not by mtime (doc/FORMAT.md §3.2): per disk the base
//! (`full`), then the online incrementals by the number of their checkpoint, each of which
//! must name the one before as its parent. A stream that is not incremental resets the
//! chain (a lost-CBT full inside an `inc` name). Differentials and offline incrementals
//! (`checkpointName == parentCheckpoint`) hold everything since their parent checkpoint,
//! so their restore point is that checkpoint's chain plus the one file. Each `copy` is a
//! restore point of its own. Restore points of different disks are matched by key: the
//! checkpoint name, or the parent checkpoint plus the rank among its differentials.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::SystemTime;

use thiserror::Error;

use super::IndexError;
use super::naming::{Level, StreamName, checkpoint_order};
use crate::chain::{Format, Layer, StreamIndex};
use crate::source::SourcePath;

/// Why a disk of a restore point cannot be rebuilt (its [`Status::Broken`] reason).
#[derive(Debug, Clone, Error)]
pub enum ChainError {
    #[error(transparent)]
    Unreadable(#[from] IndexError),
    #[error("no full backup of disk {disk} in this folder")]
    NoFull { disk: String },
    #[error("{file}: parent checkpoint {parent:?} is not the previous checkpoint {previous:?}")]
    NotAfterPrevious { file: String, parent: String, previous: String },
    #[error("{file}: parent checkpoint {parent:?} is not in this folder")]
    ParentMissing { file: String, parent: String },
}

/// The status text of a broken chain: the error with its causes.
fn broken(e: &ChainError) -> Status {
    Status::Broken(crate::error_chain(e))
}

/// How a restore point came to be; decides its name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PointKey {
    /// Full plus incrementals up to this checkpoint.
    Checkpoint(String),
    /// The `rank`-th differential (or offline incremental) on top of checkpoint `parent`.
    Derived { parent: String, offline: bool, rank: usize },
    /// The `rank`-th copy backup of the set.
    Copy { rank: usize },
}

/// Whether a restore point can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Complete,
    /// Readable, but some range fails with EIO (or the metadata disagrees with the data).
    Damaged(String),
    /// Cannot be rebuilt: a file of its chain is missing or unreadable.
    Broken(String),
}

/// One disk of a restore point: its chain, oldest first.
#[derive(Debug, Clone)]
pub struct DiskChain {
    pub disk: String,
    /// Empty when the point is broken for this disk.
    pub layers: Vec<Layer>,
    pub status: Status,
}

/// A restore point of one set, before it gets its name in the domain.
#[derive(Debug, Clone)]
pub struct SetPoint {
    pub key: PointKey,
    pub date: SystemTime,
    pub disks: Vec<DiskChain>,
    pub vmconfig: Option<SourcePath>,
    /// Filled in by the catalog, which knows the folder's other files.
    pub boot_files: Vec<super::BootFile>,
}

/// A data file as found in the folder: its name, and its index or why it has none.
pub struct Found {
    pub name: StreamName,
    pub path: PathBuf,
    pub index: Result<Layer, IndexError>,
    pub date: SystemTime,
}

impl Found {
    fn meta_str(&self, f: impl Fn(&StreamIndex) -> &str) -> Option<&str> {
        self.index.as_ref().ok().map(|l| f(&l.index))
    }
    fn checkpoint(&self) -> &str {
        match (&self.name.level, self.meta_str(|i| &i.meta.checkpoint_name)) {
            (_, Some(c)) if !c.is_empty() => c,
            (Level::Inc(c), _) => c,
            _ => "virtnbdbackup.0",
        }
    }
    fn parent(&self) -> Option<&str> {
        self.meta_str(|i| &i.meta.parent_checkpoint)
    }
    fn incremental(&self) -> bool {
        self.index.as_ref().is_ok_and(|l| l.index.meta.incremental)
    }
    fn is_raw(&self) -> bool {
        self.index.as_ref().is_ok_and(|l| l.index.format == Format::Raw)
    }
    fn name_str(&self) -> String {
        self.path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    }
}

/// The restore points of one set, from its data files and its `vmconfig.*.xml` files.
pub fn build_points(files: Vec<Found>, configs: &BTreeMap<String, SourcePath>) -> Vec<SetPoint> {
    let mut by_disk: BTreeMap<String, Vec<Found>> = BTreeMap::new();
    let has_full = files.iter().any(|f| f.name.level == Level::Full);
    for f in files {
        by_disk.entry(f.name.disk.clone()).or_default().push(f);
    }
    let mut points: BTreeMap<PointKey, SetPoint> = BTreeMap::new();
    for (disk, files) in by_disk {
        for (key, date, diff_ts, chain) in disk_points(&disk, files, has_full) {
            let vmconfig = config_for(&key, diff_ts, configs);
            let p = points.entry(key.clone()).or_insert_with(|| SetPoint {
                key,
                date,
                disks: Vec::new(),
                vmconfig,
                boot_files: Vec::new(),
            });
            p.date = p.date.max(date);
            p.disks.push(chain);
        }
    }
    points.into_values().collect()
}

/// The restore points of one disk: key, date, the unix time in a diff's file name, chain.
type DiskPoint = (PointKey, SystemTime, Option<u64>, DiskChain);

fn disk_points(disk: &str, files: Vec<Found>, set_has_full: bool) -> Vec<DiskPoint> {
    let mut out = Vec::new();
    let point = |layers: Vec<Layer>, status: Status| DiskChain { disk: disk.to_owned(), layers, status };
    let (mut bases, mut incs, mut derived, mut copies) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for f in files {
        match &f.name.level {
            Level::Full => bases.push(f),
            // A raw-format disk is saved as `copy` inside a full backup (FORMAT.md §1.12).
            Level::Copy if set_has_full && f.is_raw() => bases.push(f),
            Level::Copy => copies.push(f),
            Level::Inc(_) if f.parent().is_some_and(|p| p == f.checkpoint()) => derived.push((true, f)),
            Level::Inc(_) => incs.push(f),
            Level::Diff(_) => derived.push((false, f)),
        }
    }
    // Copies: each one alone.
    copies.sort_by_key(|f| f.date);
    for (rank, f) in copies.into_iter().enumerate() {
        let chain = match f.index {
            Ok(l) => point(vec![l.clone()], status_of(&[l])),
            Err(e) => point(Vec::new(), broken(&e.into())),
        };
        out.push((PointKey::Copy { rank }, f.date, None, chain));
    }
    // The checkpoint chain: base, then incrementals in checkpoint order.
    incs.sort_by(|a, b| checkpoint_order(a.checkpoint()).cmp(&checkpoint_order(b.checkpoint())));
    let mut by_cpt: HashMap<String, Result<Vec<Layer>, ChainError>> = HashMap::new();
    let mut chain: Result<Vec<Layer>, ChainError> = Err(ChainError::NoFull { disk: disk.to_owned() });
    let mut last_cpt = String::new();
    for f in bases.into_iter().chain(incs) {
        let cpt = f.checkpoint().to_owned();
        let is_inc = matches!(f.name.level, Level::Inc(_)) && f.incremental();
        chain = match (chain, f.index.clone()) {
            (_, Err(e)) => Err(e.into()),
            (_, Ok(l)) if !is_inc => Ok(vec![l]),
            (Ok(mut layers), Ok(l)) if f.parent() == Some(last_cpt.as_str()) => {
                layers.push(l);
                Ok(layers)
            }
            (Ok(_), Ok(_)) => Err(ChainError::NotAfterPrevious {
                file: f.name_str(),
                parent: f.parent().unwrap_or("").to_owned(),
                previous: last_cpt.clone(),
            }),
            (Err(e), Ok(_)) => Err(e),
        };
        last_cpt = cpt.clone();
        by_cpt.insert(cpt.clone(), chain.clone());
        out.push((PointKey::Checkpoint(cpt), f.date, None, chain_point(disk, &chain)));
    }
    // Differentials and offline incrementals on top of their parent checkpoint.
    derived.sort_by_key(|(_, f)| f.date);
    let mut ranks: HashMap<(String, bool), usize> = HashMap::new();
    for (offline, f) in derived {
        let parent = f.parent().unwrap_or("").to_owned();
        let diff_ts = match &f.name.level {
            Level::Diff(ts) => ts.parse().ok(),
            _ => None,
        };
        let rank = ranks.entry((parent.clone(), offline)).or_default();
        let key = PointKey::Derived { parent: parent.clone(), offline, rank: *rank };
        *rank += 1;
        let chain = match (by_cpt.get(&parent), &f.index) {
            (_, Err(e)) => Err(e.clone().into()),
            (Some(Ok(base)), Ok(l)) => Ok(base.iter().chain([l]).cloned().collect()),
            (Some(Err(e)), Ok(_)) => Err(e.clone()),
            (None, Ok(_)) => Err(ChainError::ParentMissing { file: f.name_str(), parent: parent.clone() }),
        };
        out.push((key, f.date, diff_ts, chain_point(disk, &chain)));
    }
    out
}

fn chain_point(disk: &str, chain: &Result<Vec<Layer>, ChainError>) -> DiskChain {
    match chain {
        Ok(layers) => DiskChain { disk: disk.to_owned(), layers: layers.clone(), status: status_of(layers) },
        Err(e) => DiskChain { disk: disk.to_owned(), layers: Vec::new(), status: broken(e) },
    }
}

/// Damaged when any layer is; the first damage names the file and offset.
fn status_of(layers: &[Layer]) -> Status {
    match layers.iter().find_map(|l| l.index.damage.as_ref()) {
        Some(d) => Status::Damaged(crate::error_chain(&d.error)),
        None => Status::Complete,
    }
}

/// The `vmconfig.<ident>.xml` saved with the backup that made `key`.
fn config_for(
    key: &PointKey,
    diff_ts: Option<u64>,
    configs: &BTreeMap<String, SourcePath>,
) -> Option<SourcePath> {
    match key {
        PointKey::Checkpoint(c) => configs.get(c).cloned(),
        PointKey::Copy { .. } => configs.get("copy").cloned(),
        // Offline incrementals are named after their parent checkpoint (FORMAT.md §2.4).
        PointKey::Derived { parent, offline: true, .. } => configs.get(parent).cloned(),
        // A diff run names each file with the unix time when that file was started, so
        // its config and data file can be seconds apart (FORMAT.md §2.4): take the closest, within
        // a minute.
        PointKey::Derived { offline: false, .. } => {
            let ts = diff_ts?;
            configs
                .iter()
                .filter_map(|(k, p)| Some((k.parse::<u64>().ok()?.abs_diff(ts), p)))
                .filter(|(d, _)| *d <= 60)
                .min_by_key(|(d, _)| *d)
                .map(|(_, p)| p.clone())
        }
    }
}

/// The date of a stream: its metadata `date` (local time), else the file's mtime.
pub fn stream_date(index: Option<&StreamIndex>, mtime: Option<SystemTime>) -> SystemTime {
    use chrono::{Local, NaiveDateTime, TimeZone};
    index
        .and_then(|i| NaiveDateTime::parse_from_str(&i.meta.date, "%Y-%m-%dT%H:%M:%S%.f").ok())
        .and_then(|d| Local.from_local_datetime(&d).earliest())
        .map(SystemTime::from)
        .or(mtime)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}
