//! `vmback backup`: thin full, incremental, differential and copy backups of libvirt
//! domains, written in virtnbdbackup's format so either tool can continue the other's
//! chain.
//!
//! A running domain is backed up through libvirt's pull-mode backup job: libvirt starts
//! an NBD server on a unix socket, vmback asks it which extents to save (`base:allocation`
//! for full and copy, the job's dirty bitmap for inc and diff) and reads them with libnbd.
//! A full or inc creates its checkpoint atomically with the job; a diff reads the changes
//! since the last checkpoint without creating one; a copy has no checkpoint at all. A
//! shut-off domain is read through a `qemu-nbd` of our own, as virtnbdbackup does: copy,
//! and inc/diff from the persistent bitmap of the last checkpoint.
//!
//! Invariants: the job is always ended (also on error and on Ctrl-C); each data file is
//! written as `.partial`, synced and renamed, so a killed run leaves nothing that passes
//! for complete; `<domain>.cpt` and `checkpoints/` are updated only after every disk is
//! saved. A libvirt checkpoint that the `.cpt` file does not know (left by a killed run)
//! is deleted before the next inc, so the chain in the folder stays the truth.

mod direct;
mod disk;
pub mod domxml;
mod libvirt;
mod nbd;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tracing::{info, warn};
use virt::connect::Connect;
use virt::domain::Domain;

use crate::chain::StreamMeta;
use disk::{DiskError, Extent, Extents, query_extents, write_raw, write_stream};
use domxml::DomDisk;
pub use libvirt::LibvirtError;
use nbd::Nbd;

/// The backup level (`-l`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Level {
    Copy,
    Full,
    Inc,
    Diff,
    /// Full into an empty folder, inc into one that holds a chain.
    Auto,
}

/// Everything `vmback backup` was asked (see the CLI for each option's meaning).
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub domain: String,
    pub level: Level,
    pub output: PathBuf,
    pub compress: Option<u32>,
    pub exclude: Vec<String>,
    pub include: Vec<String>,
    pub uri: String,
    pub workers: usize,
    pub threshold: Option<u64>,
    pub print_only: bool,
    pub raw_output: bool,
    pub raw_disks: bool,
    pub checkpoint_dir: Option<PathBuf>,
    pub scratch_dir: PathBuf,
}

/// Why a backup failed.
#[derive(Debug, Error)]
pub enum BackupError {
    #[error("cannot connect to libvirt at {uri} (is libvirtd running?)")]
    Connect {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("domain {0:?} not found")]
    NoDomain(String),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("disk {disk}")]
    Disk {
        disk: String,
        #[source]
        source: DiskError,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

type Result<T, E = BackupError> = std::result::Result<T, E>;

/// What one disk's backup saved.
#[derive(Debug, Clone)]
pub struct DiskSummary {
    pub disk: String,
    pub file: PathBuf,
    pub virtual_size: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub elapsed: Duration,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub enum Outcome {
    Saved {
        level: Level,
        disks: Vec<DiskSummary>,
    },
    /// `-p`: what a backup would save.
    Estimate {
        bytes: u64,
    },
    /// `--threshold`: less changed than asked; nothing written.
    BelowThreshold {
        bytes: u64,
    },
}

/// Called with (disk, bytes done) as the backup progresses.
pub type Progress<'a> = &'a (dyn Fn(&str, u64) + Sync);

/// The prefix of every checkpoint vmback (and virtnbdbackup) creates.
const CPT_PREFIX: &str = "virtnbdbackup.";

/// How long to wait for our own qemu-nbd to listen.
const QEMU_NBD_START: Duration = Duration::from_secs(20);

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_owned(), source }
}

/// Upstream's `datetime.now().isoformat()`: local time, microseconds unless zero.
fn iso_now() -> String {
    let now = chrono::Local::now();
    if now.timestamp_subsec_micros() == 0 {
        now.format("%Y-%m-%dT%H:%M:%S").to_string()
    } else {
        now.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The unix time for a diff's or offline inc's names, moved on past any second that
/// already names files in `out` (two runs within one second must not share names).
fn unique_time(out: &Path) -> String {
    let mut t = unix_now();
    let taken = |t: u64| {
        let tag = format!(".{t}.");
        std::fs::read_dir(out)
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().contains(&tag)))
            .unwrap_or(false)
    };
    while taken(t) {
        t += 1;
    }
    t.to_string()
}

/// The checkpoint number of `virtnbdbackup.N`.
fn cpt_number(name: &str) -> Option<u64> {
    name.strip_prefix(CPT_PREFIX)?.parse().ok()
}

/// The chain folder's own record: `<domain>.cpt` and the checkpoint XML folder.
struct Folder {
    out: PathBuf,
    cpt_file: PathBuf,
    cpt_dir: PathBuf,
    checkpoints: Vec<String>,
}

impl Folder {
    fn open(opts: &BackupOptions) -> Result<Folder> {
        std::fs::create_dir_all(&opts.output).map_err(io(&opts.output))?;
        let cpt_file =
            opts.output.join(format!("{}.cpt", crate::catalog::naming::safe_component(&opts.domain)));
        let checkpoints = match std::fs::read(&cpt_file) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                BackupError::Refused(format!("{}: not a checkpoint list: {e}", cpt_file.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&cpt_file)(e)),
        };
        let cpt_dir = opts.checkpoint_dir.clone().unwrap_or_else(|| opts.output.join("checkpoints"));
        std::fs::create_dir_all(&cpt_dir).map_err(io(&cpt_dir))?;
        Ok(Folder { out: opts.output.clone(), cpt_file, cpt_dir, checkpoints })
    }

    fn has_data(&self) -> Result<bool> {
        let entries = std::fs::read_dir(&self.out).map_err(io(&self.out))?;
        Ok(entries.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".data")))
    }

    /// Removes `*.partial` files a killed run left behind.
    fn clean_partials(&self) -> Result<()> {
        for e in std::fs::read_dir(&self.out).map_err(io(&self.out))?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".partial") {
                warn!("{}: removing a partial file an interrupted backup left", e.path().display());
                std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
            }
        }
        Ok(())
    }

    /// Writes `<domain>.cpt` as upstream does (`json.dumps` of the list), atomically.
    fn save_checkpoints(&self, list: &[String]) -> Result<()> {
        let quoted: Vec<String> = list.iter().map(|c| serde_json::to_string(c).expect("string")).collect();
        let tmp = self.cpt_file.with_extension("cpt.tmp");
        std::fs::write(&tmp, format!("[{}]", quoted.join(", "))).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.cpt_file).map_err(io(&self.cpt_file))
    }
}

/// Runs one backup. `progress` is told of every extent written.
pub fn run(opts: &BackupOptions, progress: Progress<'_>) -> Result<Outcome> {
    // libvirt prints every error to stderr by default; ours are reported with context.
    virt::error::clear_error_callback();
    let conn = Connect::open(Some(&opts.uri))
        .map_err(|source| BackupError::Connect { uri: opts.uri.clone(), source })?;
    let dom =
        conn.lookup_domain_by_name(&opts.domain).map_err(|_| BackupError::NoDomain(opts.domain.clone()))?;
    let xml = dom.xml_desc(0).map_err(|e| LibvirtError::new("domain XML", e))?;
    let disks = select_disks(&xml, opts)?;
    let active = dom.is_active().map_err(|e| LibvirtError::new("domain state", e))?;
    let mut folder = Folder::open(opts)?;
    let level = match opts.level {
        Level::Auto if folder.checkpoints.is_empty() => Level::Full,
        Level::Auto => Level::Inc,
        Level::Full if !active => {
            warn!("{} is not running: a full backup needs a checkpoint, taking a copy instead", opts.domain);
            Level::Copy
        }
        l => l,
    };
    if matches!(level, Level::Full | Level::Copy) && folder.has_data()? && !opts.print_only {
        return Err(BackupError::Refused(format!(
            "{}: holds a backup already; a {} backup starts a new chain in an empty folder",
            opts.output.display(),
            if level == Level::Full { "full" } else { "copy" }
        )));
    }
    if matches!(level, Level::Inc | Level::Diff) && folder.checkpoints.is_empty() {
        return Err(BackupError::Refused(format!(
            "{}: no checkpoint list ({}); take a full backup into it first",
            opts.output.display(),
            folder.cpt_file.display()
        )));
    }
    if !opts.print_only {
        folder.clean_partials()?;
    }
    if active {
        online(&dom, &xml, &disks, level, &mut folder, opts, progress)
    } else {
        offline(&xml, &disks, level, &folder, opts, progress)
    }
}

/// Ends the backup job of `domain`, if it has one (for Ctrl-C: used from another thread
/// with a connection of its own).
pub fn abort(uri: &str, domain: &str) {
    if let Ok(conn) = Connect::open(Some(uri))
        && let Ok(dom) = conn.lookup_domain_by_name(domain)
        && dom.is_active().unwrap_or(false)
        && let Err(e) = libvirt::abort_job(&dom)
    {
        warn!("{}", crate::error_chain(&e));
    }
}

/// The disks to back up, by the rules upstream applies.
fn select_disks(xml: &str, opts: &BackupOptions) -> Result<Vec<DomDisk>> {
    let all =
        domxml::disks(xml).map_err(|e| BackupError::Refused(format!("cannot read the domain XML: {e}")))?;
    let mut out = Vec::new();
    for d in all {
        if d.device != "disk" {
            info!("{}: skipping {} device", d.target, d.device);
        } else if !opts.include.is_empty() && !opts.include.contains(&d.target) {
            info!("{}: not included", d.target);
        } else if opts.exclude.contains(&d.target) {
            info!("{}: excluded", d.target);
        } else if d.format == "raw" && !opts.raw_disks {
            warn!("{}: raw-format disk has no bitmaps; skipped (include it with --raw)", d.target);
        } else {
            out.push(d);
        }
    }
    if out.is_empty() {
        return Err(BackupError::Refused(format!("{}: no disk to back up", opts.domain)));
    }
    Ok(out)
}

/// A job that is always ended: on success, on error, and on unwinding.
struct Job<'a>(&'a Domain);

impl Drop for Job<'_> {
    fn drop(&mut self) {
        if let Err(e) = libvirt::abort_job(self.0) {
            warn!("{}", crate::error_chain(&e));
        }
    }
}

fn online(
    dom: &Domain,
    xml: &str,
    disks: &[DomDisk],
    level: Level,
    folder: &mut Folder,
    opts: &BackupOptions,
    progress: Progress<'_>,
) -> Result<Outcome> {
    // A job left by a killed run blocks a new one: end it first (no job is fine).
    if libvirt::abort_job(dom).is_ok() {
        warn!("{}: ended a backup job an earlier run left running", opts.domain);
    }
    let existing = libvirt::checkpoint_names(dom)?;
    if let Some(foreign) = existing.iter().find(|c| !c.starts_with(CPT_PREFIX)) {
        if level != Level::Copy {
            return Err(BackupError::Refused(format!(
                "{}: has checkpoint {foreign:?} that vmback did not make; refusing to mix chains",
                opts.domain
            )));
        }
    }
    let mut ours: Vec<String> = existing.into_iter().filter(|c| c.starts_with(CPT_PREFIX)).collect();
    ours.sort_by_key(|c| std::cmp::Reverse(cpt_number(c)));
    let (new_cpt, parent) = match level {
        Level::Copy => (None, None),
        Level::Full => {
            if !opts.print_only {
                for c in &ours {
                    delete_checkpoint(dom, c)?;
                }
                clear_checkpoint_files(folder)?;
                folder.checkpoints.clear();
            }
            (Some(format!("{CPT_PREFIX}0")), None)
        }
        Level::Inc | Level::Diff => {
            // Checkpoints libvirt has but the folder does not (a killed run's) go; the
            // ones the folder has but libvirt lost (a transient domain) come back.
            for c in ours.iter().filter(|c| !folder.checkpoints.contains(c)) {
                warn!("{c}: checkpoint not in {}; deleting it", folder.cpt_file.display());
                delete_checkpoint(dom, c)?;
            }
            // The checkpoints libvirt has must be the ones this folder's chain was taken
            // with, not namesakes a full into another folder made since.
            for c in folder.checkpoints.iter().filter(|c| ours.contains(c)) {
                let saved_path = folder.cpt_dir.join(format!("{c}.xml"));
                let saved = std::fs::read_to_string(&saved_path).map_err(io(&saved_path))?;
                let live = libvirt::checkpoint_xml(dom, c)?;
                if checkpoint_identity(&saved) != checkpoint_identity(&live) {
                    return Err(BackupError::Refused(format!(
                        "{c}: libvirt's checkpoint is not the one {} was taken with (a full \
                         backup into another folder replaced it); start a new chain with a full",
                        opts.output.display()
                    )));
                }
            }
            for c in folder.checkpoints.iter().filter(|c| !ours.contains(c)) {
                let path = folder.cpt_dir.join(format!("{c}.xml"));
                let saved = std::fs::read_to_string(&path).map_err(io(&path))?;
                info!("{c}: redefining the checkpoint from {}", path.display());
                libvirt::create_checkpoint(dom, &saved, libvirt::REDEFINE)?;
            }
            let parent = folder.checkpoints.last().cloned().expect("checked non-empty");
            let new = format!("{CPT_PREFIX}{}", folder.checkpoints.len());
            (if level == Level::Inc { Some(new) } else { None }, Some(parent))
        }
        Level::Auto => unreachable!("resolved by run()"),
    };
    let socket = opts.scratch_dir.join(format!("vmback.{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let backup_xml = backup_xml(&socket, parent.as_deref(), disks, &opts.scratch_dir);
    let checkpoint_xml =
        new_cpt.as_ref().filter(|_| !opts.print_only).map(|c| checkpoint_xml(c, parent.as_deref(), disks));
    let frozen = freeze(dom);
    let begun = libvirt::backup_begin(dom, &backup_xml, checkpoint_xml.as_deref());
    if frozen {
        thaw(dom);
    }
    begun?;
    let job = Job(dom);
    let kind = if matches!(level, Level::Inc | Level::Diff) { Extents::Dirty } else { Extents::Allocation };
    let ident = match level {
        Level::Copy => "copy".to_owned(),
        Level::Diff => unique_time(&folder.out),
        _ => new_cpt.clone().expect("full and inc have one"),
    };
    let meta_cpt = match level {
        Level::Copy => format!("{CPT_PREFIX}0"),
        // A diff carries the name the next checkpoint will have (upstream, FORMAT.md §1.4).
        Level::Diff => format!("{CPT_PREFIX}{}", folder.checkpoints.len()),
        _ => new_cpt.clone().expect("full and inc have one"),
    };
    let plan =
        Plan { level, kind, meta_cpt, parent: parent.clone().unwrap_or_default(), ident: ident.clone() };
    let outcome = save_disks(disks, &plan, opts, progress, |d| {
        let context = match kind {
            Extents::Allocation => "base:allocation".to_owned(),
            Extents::Dirty => format!("qemu:dirty-bitmap:backup-{}", d.target),
        };
        Nbd::connect_unix(&socket, &d.target, &context)
    })?;
    if let Outcome::Saved { .. } = outcome {
        if let Some(c) = &new_cpt {
            let cxml = libvirt::checkpoint_xml(dom, c)?;
            let path = folder.cpt_dir.join(format!("{c}.xml"));
            std::fs::write(&path, cxml).map_err(io(&path))?;
            folder.checkpoints.push(c.clone());
            folder.save_checkpoints(&folder.checkpoints)?;
        }
        save_side_files(&folder.out, xml, disks, &ident);
    } else if let Some(c) = &new_cpt
        && checkpoint_xml.is_some()
    {
        // Below the threshold: the checkpoint made with the job must not outlive it.
        drop(job);
        delete_checkpoint(dom, c)?;
        return Ok(outcome);
    }
    drop(job);
    let _ = std::fs::remove_file(&socket);
    Ok(outcome)
}

/// What tells two checkpoints of one name apart: the `<creationTime>` (seconds) and the
/// `<description>`, which for vmback's checkpoints holds a nonce (two fulls within one
/// second have the same creation time).
fn checkpoint_identity(xml: &str) -> (Option<&str>, Option<&str>) {
    let element = |tag: &str| {
        let open = format!("<{tag}>");
        let start = xml.find(&open)? + open.len();
        let len = xml[start..].find(&format!("</{tag}>"))?;
        Some(xml[start..start + len].trim())
    };
    (element("creationTime"), element("description"))
}

/// Deletes a checkpoint with its bitmaps, or only its metadata when the bitmaps are gone.
fn delete_checkpoint(dom: &Domain, name: &str) -> Result<()> {
    if let Err(e) = libvirt::delete_checkpoint(dom, name, 0) {
        warn!("{}; deleting its metadata only", crate::error_chain(&e));
        libvirt::delete_checkpoint(dom, name, libvirt::METADATA_ONLY)?;
    }
    Ok(())
}

fn clear_checkpoint_files(folder: &Folder) -> Result<()> {
    for e in std::fs::read_dir(&folder.cpt_dir).map_err(io(&folder.cpt_dir))?.flatten() {
        if e.file_name().to_string_lossy().ends_with(".xml") {
            std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
        }
    }
    let _ = std::fs::remove_file(&folder.cpt_file);
    Ok(())
}

/// What the stream files of this run say about themselves.
struct Plan {
    level: Level,
    kind: Extents,
    meta_cpt: String,
    parent: String,
    /// `<ident>` of file names: checkpoint, unix time (diff) or `copy`.
    ident: String,
}

impl Plan {
    /// The data file name; `raw_disk` is a raw-format disk, which upstream always saves
    /// as `<disk>.copy.data` (a `-t raw` image keeps the level's name).
    fn file_name(&self, disk: &str, raw_disk: bool) -> String {
        match self.level {
            _ if raw_disk => format!("{disk}.copy.data"),
            Level::Full => format!("{disk}.full.data"),
            Level::Copy => format!("{disk}.copy.data"),
            Level::Inc if self.meta_cpt == self.parent => {
                // An offline inc: upstream names it after the parent checkpoint and so
                // overwrites the online inc of that name (FORMAT.md §4.1); the time keeps it apart.
                format!("{disk}.inc.{}.{}.data", self.parent, self.ident)
            }
            Level::Inc => format!("{disk}.inc.{}.data", self.meta_cpt),
            Level::Diff => format!("{disk}.diff.{}.data", self.ident),
            Level::Auto => unreachable!("resolved by run()"),
        }
    }
}

/// Queries every disk's extents, then (unless estimating or below the threshold) writes
/// them with up to `opts.workers` disks in parallel.
fn save_disks(
    disks: &[DomDisk],
    plan: &Plan,
    opts: &BackupOptions,
    progress: Progress<'_>,
    connect: impl Fn(&DomDisk) -> Result<Nbd, nbd::NbdError>,
) -> Result<Outcome> {
    let mut work: Vec<(&DomDisk, Nbd, u64, Vec<Extent>)> = Vec::new();
    for d in disks {
        let err = |source: DiskError| BackupError::Disk { disk: d.target.clone(), source };
        let mut nbd = connect(d).map_err(|e| err(e.into()))?;
        let size = nbd.size().map_err(|e| err(e.into()))?;
        let extents = query_extents(&mut nbd, size, plan.kind).map_err(err)?;
        work.push((d, nbd, size, extents));
    }
    let bytes: u64 = work.iter().flat_map(|w| &w.3).filter(|e| e.2).map(|e| e.1).sum();
    if opts.print_only {
        return Ok(Outcome::Estimate { bytes });
    }
    if let Some(t) = opts.threshold
        && matches!(plan.level, Level::Inc | Level::Diff)
        && bytes < t
    {
        return Ok(Outcome::BelowThreshold { bytes });
    }
    let results = std::sync::Mutex::new(Vec::new());
    let queue = std::sync::Mutex::new(work);
    std::thread::scope(|s| {
        for _ in 0..opts.workers.max(1) {
            s.spawn(|| {
                loop {
                    let Some((d, mut nbd, size, extents)) = queue.lock().expect("no panics while held").pop()
                    else {
                        break;
                    };
                    let r = save_one(d, &mut nbd, size, &extents, plan, opts, progress);
                    results.lock().expect("no panics while held").push(r);
                }
            });
        }
    });
    // Only when every disk is saved do the files take their final names: a run that
    // failed on one disk leaves none that pass for a complete restore point.
    let saved =
        results.into_inner().expect("no panics while held").into_iter().collect::<Result<Vec<_>>>()?;
    let mut disks = Vec::with_capacity(saved.len());
    for (summary, pending) in saved {
        pending.commit().map_err(|source| BackupError::Disk { disk: summary.disk.clone(), source })?;
        disks.push(summary);
    }
    disks.sort_by(|a, b| a.disk.cmp(&b.disk));
    Ok(Outcome::Saved { level: plan.level, disks })
}

fn save_one(
    d: &DomDisk,
    nbd: &mut Nbd,
    size: u64,
    extents: &[Extent],
    plan: &Plan,
    opts: &BackupOptions,
    progress: Progress<'_>,
) -> Result<(DiskSummary, disk::Pending)> {
    let started = Instant::now();
    let raw_disk = d.format == "raw";
    let raw_image = raw_disk || (opts.raw_output && matches!(plan.level, Level::Full | Level::Copy));
    let file = opts.output.join(plan.file_name(&d.target, raw_disk));
    let done = |n| progress(&d.target, n);
    let err = |source| BackupError::Disk { disk: d.target.clone(), source };
    let pending = if raw_image {
        write_raw(nbd, extents, size, &file, &done).map_err(err)?
    } else {
        let meta = StreamMeta {
            virtual_size: size,
            data_size: 0,
            date: iso_now(),
            disk_name: d.target.clone(),
            disk_format: Some(d.format.clone()),
            checkpoint_name: plan.meta_cpt.clone(),
            parent_checkpoint: plan.parent.clone(),
            incremental: matches!(plan.level, Level::Inc | Level::Diff),
            compressed: opts.compress,
            stream_version: 2,
        };
        write_stream(nbd, extents, meta, &file, &done).map_err(err)?
    };
    let zero_bytes = extents.iter().filter(|e| !e.2).map(|e| e.1).sum();
    let summary = DiskSummary {
        disk: d.target.clone(),
        file,
        virtual_size: size,
        data_bytes: pending.data_bytes,
        zero_bytes,
        elapsed: started.elapsed(),
    };
    Ok((summary, pending))
}

/// `vmconfig.<ident>.xml` and `<disk>.<ident>.qcow.json`, as upstream writes them.
fn save_side_files(out: &Path, xml: &str, disks: &[DomDisk], ident: &str) {
    let cfg = out.join(format!("vmconfig.{ident}.xml"));
    if let Err(e) = std::fs::write(&cfg, xml) {
        warn!("{}: {e}", cfg.display());
    }
    for d in disks.iter().filter(|d| d.format.starts_with("qcow")) {
        let Some(src) = &d.source else { continue };
        match Command::new("qemu-img").args(["info", "--output", "json", "--force-share", src]).output() {
            Ok(o) if o.status.success() => {
                let path = out.join(format!("{}.{ident}.qcow.json", d.target));
                if let Err(e) = std::fs::write(&path, &o.stdout) {
                    warn!("{}: {e}", path.display());
                }
            }
            _ => warn!("{}: qemu-img info failed; no qcow.json saved", d.target),
        }
    }
}

fn backup_xml(socket: &Path, parent: Option<&str>, disks: &[DomDisk], scratch: &Path) -> String {
    let esc = |s: &str| quick_xml::escape::escape(s).into_owned();
    let mut x = format!(
        "<domainbackup mode='pull'><server transport='unix' socket='{}'/>",
        esc(&socket.to_string_lossy())
    );
    if let Some(p) = parent {
        x.push_str(&format!("<incremental>{}</incremental>", esc(p)));
    }
    x.push_str("<disks>");
    for d in disks {
        let file = scratch.join(format!("vmback.{}.{}.scratch", std::process::id(), d.target));
        x.push_str(&format!(
            "<disk name='{}' backup='yes' type='file'><scratch file='{}'/></disk>",
            esc(&d.target),
            esc(&file.to_string_lossy())
        ));
    }
    x.push_str("</disks></domainbackup>");
    x
}

fn checkpoint_xml(name: &str, parent: Option<&str>, disks: &[DomDisk]) -> String {
    let esc = |s: &str| quick_xml::escape::escape(s).into_owned();
    // The nonce makes this checkpoint distinguishable from a namesake (see
    // `checkpoint_identity`).
    let nonce = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut x = format!(
        "<domaincheckpoint><description>Backup checkpoint (vmback {nonce:x}.{})</description><name>{}</name>",
        std::process::id(),
        esc(name)
    );
    if let Some(p) = parent {
        x.push_str(&format!("<parent><name>{}</name></parent>", esc(p)));
    }
    x.push_str("<disks>");
    for d in disks.iter().filter(|d| d.format != "raw") {
        x.push_str(&format!("<disk name='{}' checkpoint='bitmap'/>", esc(&d.target)));
    }
    x.push_str("</disks></domaincheckpoint>");
    x
}

/// Freezes the guest's filesystems through the qemu guest agent, when one answers.
fn freeze(dom: &Domain) -> bool {
    match dom.qemu_agent_command(r#"{"execute":"guest-fsfreeze-freeze"}"#, 5, 0) {
        Ok(_) => true,
        Err(_) => {
            warn!("no guest agent answered: backing up without freezing the guest's filesystems");
            false
        }
    }
}

fn thaw(dom: &Domain) {
    if let Err(e) = dom.qemu_agent_command(r#"{"execute":"guest-fsfreeze-thaw"}"#, 5, 0) {
        warn!("thawing the guest's filesystems failed: {e}");
    }
}

/// A qemu-nbd serving one disk of a shut-off domain, stopped on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn start_qemu_nbd(d: &DomDisk, bitmap: Option<&str>, scratch: &Path) -> Result<QemuNbd> {
    let source = d
        .source
        .as_ref()
        .ok_or_else(|| BackupError::Refused(format!("{}: disk has no source file", d.target)))?;
    let socket = scratch.join(format!("vmback.{}.{}.sock", std::process::id(), d.target));
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new("qemu-nbd");
    // No --persistent: qemu-nbd exits when our one connection closes, also when vmback is
    // killed, so no server outlives the backup.
    cmd.arg("-r").arg(format!("--format={}", d.format));
    cmd.args(["-x", &d.target]).arg("-k").arg(&socket);
    if let Some(b) = bitmap {
        cmd.arg(format!("--bitmap={b}"));
    }
    cmd.arg(source);
    let child = cmd.spawn().map_err(io(Path::new("qemu-nbd")))?;
    let mut q = QemuNbd { child, socket };
    let deadline = Instant::now() + QEMU_NBD_START;
    while !q.socket.exists() {
        if let Ok(Some(status)) = q.child.try_wait() {
            return Err(BackupError::Refused(format!(
                "{}: qemu-nbd exited with {status} (is the disk in use, or does it lack bitmap {bitmap:?}?)",
                d.target
            )));
        }
        if Instant::now() > deadline {
            return Err(BackupError::Refused(format!("{}: qemu-nbd did not start", d.target)));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(q)
}

fn offline(
    xml: &str,
    disks: &[DomDisk],
    level: Level,
    folder: &Folder,
    opts: &BackupOptions,
    progress: Progress<'_>,
) -> Result<Outcome> {
    let parent = folder.checkpoints.last().cloned();
    let bitmap = match level {
        Level::Copy => None,
        _ => Some(parent.clone().expect("inc and diff checked a checkpoint exists")),
    };
    let servers = disks
        .iter()
        .map(|d| start_qemu_nbd(d, bitmap.as_deref(), &opts.scratch_dir))
        .collect::<Result<Vec<_>>>()?;
    let ident = match level {
        Level::Copy => "copy".to_owned(),
        _ => unique_time(&folder.out),
    };
    // An offline inc or diff holds every change since the last checkpoint and makes no
    // new one: its checkpointName is its parent (FORMAT.md §1.4).
    let plan = Plan {
        level,
        kind: if bitmap.is_some() { Extents::Dirty } else { Extents::Allocation },
        meta_cpt: parent.clone().filter(|_| level != Level::Copy).unwrap_or_else(|| format!("{CPT_PREFIX}0")),
        parent: parent.filter(|_| level != Level::Copy).unwrap_or_default(),
        ident: ident.clone(),
    };
    let outcome = save_disks(disks, &plan, opts, progress, |d| {
        let i = disks.iter().position(|x| x.target == d.target).expect("one of ours");
        let context = match &bitmap {
            Some(b) => format!("qemu:dirty-bitmap:{b}"),
            None => "base:allocation".to_owned(),
        };
        Nbd::connect_unix(&servers[i].socket, &d.target, &context)
    })?;
    drop(servers);
    if let Outcome::Saved { .. } = outcome {
        save_side_files(&folder.out, xml, disks, &ident);
    }
    Ok(outcome)
}
