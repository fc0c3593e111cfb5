//! The catalog: every domain, restore point and disk found under a SOURCE folder.
//!
//! SOURCE is one backup set (a folder virtnbdbackup wrote) or any tree of folders holding
//! many, such as monthly rotation folders. Every folder with `*.data` files is a set; its
//! domain is the `<name>` of its saved `vmconfig.*.xml`, else the `<domain>.cpt` file name,
//! else the folder name. Symlinks are never followed, so nothing outside SOURCE is read.
//! A zip archive (virtnbdbackup's `-o -`) counts as its members in its own folder, so the
//! archives of one chain side by side are one set; SOURCE may also be one archive
//! ([`crate::source::ZipSource`]).
//! `*.partial` files (backups in progress or aborted) are skipped with a warning.
//!
//! Restore point names (also documented in README.md): a checkpoint keeps its name
//! (`virtnbdbackup.3`); a differential or offline incremental is named after its parent
//! checkpoint and its time (`virtnbdbackup.3.diff.20260630-082101`, `.offline.`), which
//! sorts right after that checkpoint; a copy backup is `20260630-082101.copy`. When a
//! domain has several sets (rotation folders), each name except copies gets the set's
//! start time as prefix (`20260601-000000.virtnbdbackup.0`), so names stay unique and sort
//! in time order. Names depend only on the backup files, so they are stable across mounts
//! of the same files; but a domain's second set (a new rotation folder) renames the points
//! of its first, which then get their set's start as prefix.
//!
//! A mounted catalog is built again when SOURCE changes: [`Listing`] is one cheap walk
//! (names and `lstat` stamps), and [`Catalog::build`] indexes only the stream files that
//! are new or changed since the last build ([`Indexed`]); an unchanged file keeps its
//! [`Layer`], id included, so everything built on it carries over.

pub mod boot;
pub mod info;
pub mod naming;
pub mod set;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::SystemTime;

use thiserror::Error;
use tracing::warn;

use crate::chain::{Layer, ScanError, StreamIndex};
use crate::source::{Kind, Source, SourcePath, Stamp, ZipSource};

pub use set::{DiskChain, PointKey, Status};
use set::{Found, SetPoint, build_points, stream_date};

/// Failing to read SOURCE itself (problems inside it are warnings, not errors).
#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("{path}: cannot read the backup folder")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: the filesystem the backups were on is no longer mounted there (the folder is \
         now empty, on another filesystem)"
    )]
    Unmounted { path: PathBuf },
}

/// Why a data file has no index. Cloned into every restore point it breaks.
#[derive(Debug, Clone, Error)]
pub enum IndexError {
    #[error(transparent)]
    Scan(Arc<ScanError>),
    #[error("{path}: vanished while indexing")]
    Vanished { path: PathBuf },
}

/// No domain to pick (the `--domain` choice of the commands).
#[derive(Debug, Error)]
pub enum DomainError {
    #[error("no domain {name:?}; found: {found}")]
    NotFound { name: String, found: String },
    #[error("no backup sets found")]
    Empty,
    #[error("several domains found ({found}); choose one with --domain")]
    Ambiguous { found: String },
}

/// Deepest folder level searched for sets. Rotation trees are two or three levels deep;
/// the bound only stops a pathological tree from being walked forever.
const MAX_DEPTH: usize = 16;

/// Largest `vmconfig.*.xml` read. Domain XML is a few KiB; this bounds the allocation.
pub const MAX_CONFIG: u64 = 16 << 20;

/// A restore point as shown in the mount and by `vmback ls`.
#[derive(Debug, Clone)]
pub struct RestorePoint {
    pub name: String,
    pub key: PointKey,
    pub date: SystemTime,
    pub set_dir: PathBuf,
    pub disks: Vec<DiskChain>,
    pub vmconfig: Option<SourcePath>,
    /// The boot files saved with that backup (see [`boot`]), as its `vmconfig` names them.
    pub boot_files: Vec<BootFile>,
}

/// A boot file of a restore point: what the domain XML says of it, and its file in the set.
#[derive(Debug, Clone)]
pub struct BootFile {
    pub named: boot::Named,
    pub file: SourcePath,
}

impl RestorePoint {
    /// Broken if any disk is, else damaged if any is, else complete.
    pub fn status(&self) -> Status {
        let find = |broken: bool| {
            self.disks.iter().find_map(|d| match &d.status {
                Status::Broken(r) if broken => Some(Status::Broken(format!("{}: {r}", d.disk))),
                Status::Damaged(r) if !broken => Some(Status::Damaged(format!("{}: {r}", d.disk))),
                _ => None,
            })
        };
        find(true).or_else(|| find(false)).unwrap_or(Status::Complete)
    }
}

/// A domain (VM) and its restore points, oldest first.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    pub points: Vec<RestorePoint>,
}

impl Domain {
    /// The restore point called `name` as the mount and `vmback ls` show it; also a bare
    /// checkpoint name (`virtnbdbackup.3`) when exactly one point of the domain has it.
    pub fn find_point(&self, name: &str) -> Option<&RestorePoint> {
        if let Some(p) = self.points.iter().find(|p| p.name == name) {
            return Some(p);
        }
        let mut by_cpt = self.points.iter().filter(|p| p.key == PointKey::Checkpoint(name.to_owned()));
        match (by_cpt.next(), by_cpt.next()) {
            (Some(p), None) => Some(p),
            _ => None,
        }
    }

    /// The newest restore point that is not broken.
    pub fn latest(&self) -> Option<&RestorePoint> {
        self.points.iter().rev().find(|p| !matches!(p.status(), Status::Broken(_)))
    }
}

/// See the module note.
#[derive(Debug, Default)]
pub struct Catalog {
    pub domains: Vec<Domain>,
    pub warnings: Vec<String>,
    /// Where each layer's file is in SOURCE, by layer id.
    files: HashMap<u32, SourcePath>,
}

/// What one folder holds (paths relative to SOURCE; configs with their mtime).
#[derive(Default)]
struct Folder {
    data: Vec<PathBuf>,
    configs: BTreeMap<String, (PathBuf, SystemTime)>,
    cpt: Option<String>,
    /// Names of the folder's other regular files (boot files among them).
    others: std::collections::HashSet<String>,
}

/// What a file found in SOURCE is to the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EntryKind {
    Data,
    Partial,
    Config(String),
    Cpt(String),
    /// A symlink with a name the catalog would read: reported, never followed.
    Symlink,
    /// Any other regular file: a boot file may be one. Only its presence matters.
    Other,
}

/// A file of a [`Listing`]: its relative path, what it is, and its stamp and mtime.
type Listed = (PathBuf, EntryKind, Option<(Stamp, SystemTime)>);

/// One walk of SOURCE: every file that matters, with its stamp and mtime. Two listings
/// are equal exactly when the catalog built from them would be, so a refresh compares
/// listings (a few `lstat`s per set) and only rebuilds when they differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The volume SOURCE was on (see [`Watched::poll`]).
    volume: Option<u64>,
    /// Relative paths; no stamp for entries whose changes do not matter (see `walk`).
    entries: Vec<Listed>,
    /// Entries the walk could not read.
    unreadable: Vec<String>,
}

impl Listing {
    /// Walks `source` (which never follows symlinks).
    pub fn walk(source: &dyn Source) -> Result<Listing, CatalogError> {
        let tree = source
            .list(MAX_DEPTH)
            .map_err(|e| CatalogError::Root { path: source.display(Path::new("")), source: e.into_io() })?;
        let mut listing = Listing { volume: tree.volume, entries: Vec::new(), unreadable: tree.unreadable };
        for entry in tree.entries {
            let name = entry.path.file_name().unwrap_or_default().to_string_lossy();
            let kind = if entry.kind == Kind::Symlink {
                (name.ends_with(".data") || name.ends_with(".xml") || name.ends_with(".zip"))
                    .then_some(EntryKind::Symlink)
            } else if entry.kind != Kind::File {
                None
            } else if name.ends_with(".data.partial") {
                Some(EntryKind::Partial)
            } else if name.ends_with(".data") {
                Some(EntryKind::Data)
            } else if let Some(ident) = naming::config_ident(&name) {
                Some(EntryKind::Config(ident.to_owned()))
            } else if let Some(dom) = name.strip_suffix(".cpt") {
                Some(EntryKind::Cpt(dom.to_owned()))
            } else {
                Some(EntryKind::Other)
            };
            if let Some(kind) = kind {
                // A backup in progress grows its `.partial` all the time; only its coming
                // and going (renamed to `.data`) changes the catalog.
                let stamp = match kind {
                    EntryKind::Partial | EntryKind::Symlink | EntryKind::Other => None,
                    _ => Some((entry.stamp, entry.mtime)),
                };
                listing.entries.push((entry.path, kind, stamp));
            }
        }
        Ok(listing)
    }
}

/// Stream files indexed by earlier builds, reused while their stamp is the same, so a
/// refresh indexes only new and changed files and an unchanged file keeps its layer id
/// (and with it its decoded frames in the read cache, and its `info.json` number).
#[derive(Default)]
pub struct Indexed {
    files: HashMap<PathBuf, (Option<Stamp>, Result<Layer, IndexError>)>,
}

/// A catalog kept in step with its SOURCE: [`Watched::poll`] walks SOURCE again and
/// builds a new catalog when anything changed.
pub struct Watched {
    source: Arc<dyn Source>,
    listing: Listing,
    known: Indexed,
    /// Warnings already logged: a refresh logs only new ones.
    warned: std::collections::HashSet<String>,
}

impl Watched {
    /// The catalog of the local folder `root` now (its zip archives read in place; `root`
    /// may be one archive), with its warnings logged.
    pub fn open(root: &Path) -> Result<(Watched, Catalog), CatalogError> {
        Watched::open_from(Arc::new(ZipSource::new(root)))
    }

    /// The catalog of `source` now, with its warnings logged.
    pub fn open_from(source: Arc<dyn Source>) -> Result<(Watched, Catalog), CatalogError> {
        let listing = Listing::walk(&*source)?;
        let mut known = Indexed::default();
        let cat = Catalog::build(&source, &listing, &mut known);
        let mut w = Watched { source, listing, known, warned: Default::default() };
        w.log_new(&cat);
        Ok((w, cat))
    }

    /// The new catalog if SOURCE changed since the last call, logging new warnings.
    /// SOURCE now empty and on another filesystem than before is an error, not a change:
    /// the filesystem it was (an NFS share, a USB disk) is unmounted, leaving the empty
    /// folder it was mounted on, and its backups are not deleted.
    pub fn poll(&mut self) -> Result<Option<Catalog>, CatalogError> {
        let listing = Listing::walk(&*self.source)?;
        if listing == self.listing {
            return Ok(None);
        }
        if listing.entries.is_empty() && listing.volume != self.listing.volume {
            return Err(CatalogError::Unmounted { path: self.source.display(Path::new("")) });
        }
        let cat = Catalog::build(&self.source, &listing, &mut self.known);
        self.listing = listing;
        self.log_new(&cat);
        Ok(Some(cat))
    }

    fn log_new(&mut self, cat: &Catalog) {
        for w in &cat.warnings {
            if !self.warned.contains(w) {
                warn!("{w}");
            }
        }
        self.warned = cat.warnings.iter().cloned().collect();
    }
}

/// Layer ids key decoded frames in the one read cache of a mount, so they are unique
/// for the life of the process, across every catalog built in it.
static NEXT_LAYER_ID: AtomicU32 = AtomicU32::new(1);

impl Catalog {
    /// Walks the local folder `root` and indexes every set in it.
    /// Its warnings are logged.
    pub fn discover(root: &Path) -> Result<Catalog, CatalogError> {
        Ok(Watched::open(root)?.1)
    }

    /// Walks `source` and indexes every set in it. Its warnings are logged.
    pub fn discover_from(source: Arc<dyn Source>) -> Result<Catalog, CatalogError> {
        Ok(Watched::open_from(source)?.1)
    }

    /// The catalog of `listing` (a walk of `source`), indexing only the files `known`
    /// does not already hold in the same version; `known` is left holding exactly the
    /// files of `listing`.
    pub fn build(source: &Arc<dyn Source>, listing: &Listing, known: &mut Indexed) -> Catalog {
        let mut cat = Catalog::default();
        for e in &listing.unreadable {
            cat.warn(format!("skipping unreadable entry: {e}"));
        }
        let mut folders: BTreeMap<PathBuf, Folder> = BTreeMap::new();
        let mut stamps = HashMap::new();
        let mut mtimes = HashMap::new();
        for (path, kind, stamp) in &listing.entries {
            let dir = path.parent().unwrap_or(Path::new("")).to_owned();
            let shown = source.display(path);
            let mtime = stamp.map_or(SystemTime::UNIX_EPOCH, |(_, m)| m);
            match kind {
                EntryKind::Symlink => cat.warn(format!("{}: is a symlink; not followed", shown.display())),
                EntryKind::Partial => {
                    cat.warn(format!("{}: backup in progress or aborted; skipped", shown.display()))
                }
                EntryKind::Data => {
                    folders.entry(dir).or_default().data.push(path.clone());
                    stamps.insert(path.clone(), stamp.map(|(s, _)| s));
                    mtimes.insert(path.clone(), mtime);
                }
                EntryKind::Config(ident) => {
                    folders.entry(dir).or_default().configs.insert(ident.clone(), (path.clone(), mtime));
                }
                EntryKind::Cpt(dom) => folders.entry(dir).or_default().cpt = Some(dom.clone()),
                EntryKind::Other => {
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    folders.entry(dir).or_default().others.insert(name);
                }
            }
        }
        // A file whose stamp could not be read is indexed again every time.
        known.files.retain(|path, (stamp, _)| stamp.is_some() && stamps.get(path) == Some(stamp));
        let fresh = index_all(
            &**source,
            folders.values().flat_map(|f| &f.data).filter(|p| !known.files.contains_key(*p)),
        );
        for (path, index) in fresh {
            let layer = index
                .map(|i| Layer { id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed), index: Arc::new(i) });
            let stamp = stamps.get(&path).copied().flatten();
            known.files.insert(path, (stamp, layer));
        }
        let mut domains: BTreeMap<String, Vec<(PathBuf, Vec<SetPoint>)>> = BTreeMap::new();
        for (dir, folder) in folders {
            if folder.data.is_empty() {
                continue;
            }
            let domain = domain_name(&**source, &dir, &folder);
            let mut found = Vec::new();
            for rel in folder.data {
                let path = source.display(&rel);
                let file_name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let Some(name) = naming::parse_stream_name(&file_name) else {
                    cat.warn(format!("{}: not a data file name vmback knows; skipped", path.display()));
                    continue;
                };
                let index = match known.files.get(&rel) {
                    Some((_, index)) => index.clone(),
                    None => Err(IndexError::Vanished { path: path.clone() }),
                };
                match &index {
                    Ok(l) => {
                        if let Some(d) = &l.index.damage {
                            cat.warn(format!("damaged: {}", crate::error_chain(&d.error)));
                        }
                    }
                    Err(e) => cat.warn(format!("unreadable: {}", crate::error_chain(e))),
                }
                if let Ok(l) = &index {
                    cat.files.insert(l.id, SourcePath { source: source.clone(), path: rel.clone() });
                }
                let date = stream_date(index.as_ref().ok().map(|l| &*l.index), mtimes.get(&rel).copied());
                found.push(Found { name, path, index, date });
            }
            let configs = folder
                .configs
                .into_iter()
                .map(|(ident, (path, _))| (ident, SourcePath { source: source.clone(), path }))
                .collect();
            let mut points = build_points(found, &configs);
            for p in &mut points {
                p.boot_files = boot_files(&**source, source, p.vmconfig.as_ref(), &dir, &folder.others);
            }
            domains.entry(domain).or_default().push((source.display(&dir), points));
        }
        cat.domains = domains.into_iter().map(|(name, sets)| name_points(name, sets)).collect();
        cat
    }

    /// The domain called `name`, or the only one when no name is given.
    pub fn domain(&self, name: Option<&str>) -> Result<&Domain, DomainError> {
        let found = || self.domains.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ");
        match name {
            Some(n) => self
                .domains
                .iter()
                .find(|d| d.name == n)
                .ok_or_else(|| DomainError::NotFound { name: n.to_owned(), found: found() }),
            None if self.domains.len() == 1 => Ok(&self.domains[0]),
            None if self.domains.is_empty() => Err(DomainError::Empty),
            None => Err(DomainError::Ambiguous { found: found() }),
        }
    }

    /// Where the file of `layer` (a layer of this catalog) is in its source.
    pub fn file_of(&self, layer: &Layer) -> Option<&SourcePath> {
        self.files.get(&layer.id)
    }

    /// Records a warning. Control characters (a newline in a file name) are escaped, so
    /// a name in SOURCE cannot fake a line of the log or of `vmback ls`.
    fn warn(&mut self, msg: String) {
        let safe = if msg.contains(char::is_control) {
            msg.chars()
                .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
                .collect()
        } else {
            msg
        };
        self.warnings.push(safe);
    }
}

/// Threads that index data files at once. Indexing is a few small reads per file, bound
/// by the latency of cold reads rather than by CPU, so more threads than cores help.
const INDEX_THREADS: usize = 8;

/// Indexes a data file: full and copy backups may be raw images, the others never.
fn open_data_file(
    source: &dyn Source,
    path: &Path,
    name: &naming::StreamName,
) -> Result<StreamIndex, IndexError> {
    let shown = source.display(path);
    let raw_disk = match name.level {
        naming::Level::Full | naming::Level::Copy => Some(name.disk.as_str()),
        naming::Level::Inc(_) | naming::Level::Diff(_) => None,
    };
    let scanned = match source.open(path) {
        Ok(file) => StreamIndex::scan(shown, file, raw_disk),
        Err(e) => Err(ScanError::opening(&shown, e)),
    };
    scanned.map_err(|e| IndexError::Scan(Arc::new(e)))
}

/// Indexes every data file with a known name, on [`INDEX_THREADS`] threads.
fn index_all<'a>(
    source: &dyn Source,
    paths: impl Iterator<Item = &'a PathBuf>,
) -> HashMap<PathBuf, Result<StreamIndex, IndexError>> {
    let jobs: Vec<(&PathBuf, naming::StreamName)> = paths
        .filter_map(|p| Some((p, naming::parse_stream_name(&p.file_name()?.to_string_lossy())?)))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = parking_lot::Mutex::new(HashMap::with_capacity(jobs.len()));
    std::thread::scope(|s| {
        for _ in 0..INDEX_THREADS.min(jobs.len()) {
            s.spawn(|| {
                while let Some((path, name)) =
                    jobs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    let index = open_data_file(source, path, name);
                    done.lock().insert((*path).clone(), index);
                }
            });
        }
    });
    done.into_inner()
}

/// The domain a set belongs to, made safe as a directory name.
fn domain_name(source: &dyn Source, dir: &Path, folder: &Folder) -> String {
    let from_xml = folder
        .configs
        .values()
        .map(|(p, mtime)| (mtime, p))
        .max()
        .and_then(|(_, p)| config_domain_name(source, p));
    let name = from_xml.or_else(|| folder.cpt.clone()).unwrap_or_else(|| {
        let shown = source.display(dir);
        shown.file_name().map_or_else(|| "domain".into(), |n| n.to_string_lossy().into_owned())
    });
    naming::safe_component(&name)
}

/// The boot files saved with the backup whose domain XML is `config`: those it names
/// that are in the set's folder `dir` under upstream's name.
fn boot_files(
    source: &dyn Source,
    shared: &Arc<dyn Source>,
    config: Option<&SourcePath>,
    dir: &Path,
    present: &std::collections::HashSet<String>,
) -> Vec<BootFile> {
    let Some(config) = config else { return Vec::new() };
    let file_name = config.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let Some(ident) = naming::config_ident(&file_name) else {
        return Vec::new();
    };
    let Ok(xml) = source.read_whole(&config.path, MAX_CONFIG) else { return Vec::new() };
    let Ok(named) = boot::named_in(&String::from_utf8_lossy(&xml)) else { return Vec::new() };
    named
        .into_iter()
        .filter_map(|named| {
            let in_set = boot::set_name(&named.name, ident);
            present.contains(&in_set).then(|| BootFile {
                named,
                file: SourcePath { source: shared.clone(), path: dir.join(in_set) },
            })
        })
        .collect()
}

/// `<domain><name>` of a saved domain XML.
fn config_domain_name(source: &dyn Source, path: &Path) -> Option<String> {
    use quick_xml::events::Event;
    // The source follows no symlink, even one swapped in since the walk, and reads no
    // more than the bound.
    let xml = source.read_whole(path, MAX_CONFIG).ok()?;
    let mut reader = quick_xml::Reader::from_reader(&xml[..]);
    let mut buf = Vec::new();
    let mut depth = 0usize;
    let mut in_name = false;
    loop {
        match reader.read_event_into(&mut buf).ok()? {
            Event::Start(e) => {
                depth += 1;
                in_name = depth == 2 && e.name().as_ref() == b"name";
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                in_name = false;
            }
            Event::Text(t) if in_name => return Some(t.decode().ok()?.into_owned()),
            Event::Eof => return None,
            _ => {}
        }
        buf.clear();
    }
}

/// Gives the points of a domain their names (see the module note), oldest first.
fn name_points(domain: String, sets: Vec<(PathBuf, Vec<SetPoint>)>) -> Domain {
    let multi = sets.len() > 1;
    let mut points = Vec::new();
    let mut used: HashMap<String, usize> = HashMap::new();
    for (dir, set_points) in sets {
        let set_start = set_points.iter().map(|p| p.date).min().unwrap_or(SystemTime::UNIX_EPOCH);
        for p in set_points {
            let mut name = match &p.key {
                PointKey::Checkpoint(c) => c.clone(),
                PointKey::Derived { parent, offline, .. } => {
                    format!("{parent}.{}.{}", if *offline { "offline" } else { "diff" }, stamp(p.date))
                }
                PointKey::Copy { .. } => format!("{}.copy", stamp(p.date)),
            };
            if multi && !matches!(p.key, PointKey::Copy { .. }) {
                name = format!("{}.{name}", stamp(set_start));
            }
            let mut name = naming::safe_component(&name);
            let n = used.entry(name.clone()).or_default();
            *n += 1;
            if *n > 1 {
                name = format!("{name}.{n}");
            }
            points.push(RestorePoint {
                name,
                key: p.key,
                date: p.date,
                set_dir: dir.clone(),
                disks: p.disks,
                vmconfig: p.vmconfig,
                boot_files: p.boot_files,
            });
        }
    }
    points.sort_by(|a, b| (a.date, &a.name).cmp(&(b.date, &b.name)));
    Domain { name: domain, points }
}

/// A sortable local timestamp for names, e.g. `20260630-082101`.
pub fn stamp(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Local>::from(t).format("%Y%m%d-%H%M%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::LocalSource;
    use nix::mount::{MntFlags, MsFlags, mount, umount2};

    /// The sample chain split over two stored zips (full, then the rest), as two
    /// virtnbdbackup `-o -` runs leave it, catalogs as the same folder unzipped would.
    #[test]
    fn zips_of_one_chain_side_by_side_are_one_set() {
        use std::io::Write;
        let files = crate::sample::sample_files().expect("sample");
        let plain = tempfile::tempdir().expect("tempdir");
        crate::sample::write_sample(plain.path()).expect("sample");
        let zipped = tempfile::tempdir().expect("tempdir");
        let opts =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, pick) in [("full.zip", true), ("incs.zip", false)] {
            let mut w = zip::ZipWriter::new(std::fs::File::create(zipped.path().join(name)).expect("create"));
            for (path, bytes) in &files {
                let full = path.to_string_lossy().contains(".full.");
                if full == pick || !path.to_string_lossy().ends_with(".data") {
                    w.start_file(path.to_string_lossy(), opts).expect("member");
                    w.write_all(bytes).expect("write");
                }
            }
            w.finish().expect("finish");
        }
        let summary = |cat: &Catalog| -> Vec<(String, String, usize)> {
            let d = cat.domain(None).expect("one domain");
            d.points.iter().map(|p| (d.name.clone(), p.name.clone(), p.disks.len())).collect()
        };
        let want = summary(&Catalog::discover(plain.path()).expect("plain"));
        let got = Catalog::discover(zipped.path()).expect("zipped");
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
        assert_eq!(summary(&got), want);
        assert_eq!(want.len(), 4, "{want:?}");
    }

    #[test]
    fn a_chmod_is_a_change() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        crate::sample::write_sample(dir.path()).expect("sample");
        let source = LocalSource::new(dir.path());
        let before = Listing::walk(&source).expect("walk");
        let full = dir.path().join("sda.full.data");
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_ne!(Listing::walk(&source).expect("walk"), before);
    }

    /// Boot files named in a point's vmconfig are found under upstream's names; one that
    /// appears later is a change; a name from the XML never leaves the folder.
    #[test]
    fn boot_files_are_found_beside_their_vmconfig() {
        let mem = Arc::new(crate::source::MemSource::new());
        for (path, bytes) in crate::sample::sample_files().expect("sample") {
            mem.insert(path, bytes);
        }
        let xml = "<domain><name>sample-vm</name><os><loader>/usr/share/OVMF/CODE.fd</loader>\
                   <nvram>/var/lib/libvirt/qemu/nvram/vm_VARS.fd</nvram><kernel>/x/..</kernel></os></domain>";
        mem.insert("vmconfig.virtnbdbackup.0.xml", xml.as_bytes().to_vec());
        mem.insert("vm_VARS.fd.virtnbdbackup.0", b"vars".to_vec());
        let (mut watched, cat) = Watched::open_from(mem.clone()).expect("catalog");
        let point = |cat: &Catalog| {
            let d = cat.domain(None).expect("one domain");
            d.find_point("virtnbdbackup.0").expect("point").clone()
        };
        let names = |p: &RestorePoint| {
            p.boot_files.iter().map(|b| (b.named.element.clone(), b.file.path.clone())).collect::<Vec<_>>()
        };
        assert_eq!(names(&point(&cat)), [("nvram".to_owned(), PathBuf::from("vm_VARS.fd.virtnbdbackup.0"))]);
        mem.insert("CODE.fd.virtnbdbackup.0", b"code".to_vec());
        let cat = watched.poll().expect("poll").expect("a new boot file is a change");
        assert_eq!(names(&point(&cat)).len(), 2);
        assert!(watched.poll().expect("poll").is_none());
    }

    #[test]
    fn a_catalog_in_memory_follows_its_changes() {
        let mem = Arc::new(crate::source::MemSource::new());
        for (path, bytes) in crate::sample::sample_files().expect("sample") {
            mem.insert(path, bytes);
        }
        let (mut watched, cat) = Watched::open_from(mem.clone()).expect("catalog");
        assert_eq!(cat.domain(None).expect("one domain").points.len(), 4);
        assert!(watched.poll().expect("poll").is_none(), "nothing changed");
        assert!(mem.remove(Path::new("sda.diff.1780560000.data")));
        let changed = watched.poll().expect("poll").expect("a change");
        let point = changed.domains[0].points.last().expect("points");
        let disks: Vec<_> = point.disks.iter().map(|d| d.disk.as_str()).collect();
        assert_eq!(disks, ["sdb"], "the diff point lost sda");
        let err = changed.domain(Some("other")).expect_err("no such domain");
        assert!(
            matches!(err, DomainError::NotFound { .. }) && err.to_string().contains("sample-vm"),
            "{err}"
        );
    }

    /// Needs root (mounts a tmpfs).
    #[test]
    fn an_unmounted_source_keeps_its_catalog() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tmpfs = || mount(Some("tmpfs"), dir.path(), Some("tmpfs"), MsFlags::empty(), None::<&str>);
        tmpfs().expect("mount a tmpfs");
        crate::sample::write_sample(dir.path()).expect("sample");
        let (mut watched, cat) = Watched::open(dir.path()).expect("catalog");
        assert_eq!(cat.domains.len(), 1);
        // Lazily: the catalog holds the stream files open.
        umount2(dir.path(), MntFlags::MNT_DETACH).expect("umount");
        let err = watched.poll().expect_err("gone, not empty");
        assert!(matches!(err, CatalogError::Unmounted { .. }), "{err}");
        tmpfs().expect("mount again");
        crate::sample::write_sample(dir.path()).expect("sample");
        let back = watched.poll().expect("poll").expect("back");
        assert_eq!(back.domains.len(), 1);
        umount2(dir.path(), MntFlags::MNT_DETACH).expect("umount");
    }
}
