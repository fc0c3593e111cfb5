//! `vmback backup`: thin full, incremental, differential and copy backups of libvirt
//! domains, written in virtnbdbackup's format so either tool can continue the other's
//! chain.
//!
//! The run itself is here: which level (`auto`), which disks, the checks that refuse a
//! run before anything is written, and `-S` (a shut-off domain started paused for the
//! run, with libvirt's autodestroy, and stopped again at its end). The parts: `folder` (the chain folder, its `.cpt`,
//! its lock, file naming), [`domxml`] (domain, backup and checkpoint XML), `online` (a
//! running domain, through libvirt's pull-mode backup job), `offline` (a shut-off one,
//! through our own `qemu-nbd`), `save` (the disks' data files), with `disk` (one disk's
//! stream), `nbd` (libnbd) and `libvirt` (the calls `virt` lacks) below them; `zipout`
//! is `-o -`, the set as a zip on standard output with the chain kept in the current
//! folder. A URI that names another host makes the run remote ([`remote`]: credentials,
//! NBD over TCP/TLS, and the hypervisor's files and commands over `ssh`).
//!
//! Invariants: the output folder is locked for the whole run, so only a dead run's
//! `*.partial` files are removed; each data file is written as `.partial`, synced and
//! renamed, so a killed run leaves nothing that passes for complete; `<domain>.cpt` and
//! `checkpoints/` are updated only after every disk is saved; no path that fails deletes a
//! checkpoint (or its bitmaps) the folder's chain or another folder's still needs.

mod bootfiles;
mod direct;
mod disk;
pub mod domxml;
mod folder;
pub mod host;
mod libvirt;
pub mod nbd;
pub mod offline;
mod online;
pub mod remote;
mod save;
pub mod ssh;
mod zipout;

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tracing::{info, warn};
use virt::domain::Domain;

use disk::DiskError;
use domxml::DomDisk;
use folder::{CPT_PREFIX, Folder, FolderError};
pub use libvirt::LibvirtError;
use offline::QemuNbdError;
use remote::RemoteOptions;
use ssh::SshError;
use zipout::ZipOut;
pub use zipout::ZipOutError;

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
    /// `-q`: ask qemu's tools (`nbdinfo --map`, as upstream does) for the extents instead
    /// of asking the NBD server directly; the same extents either way.
    pub qemu_extents: bool,
    pub job: JobOptions,
    /// Used when `uri` names another host.
    pub remote: RemoteOptions,
}

/// How the domain and its backup job are handled (upstream's `-S`, `--pause`, `-F`, `-s`,
/// `-k`, `-f`).
#[derive(Debug, Clone, Default)]
pub struct JobOptions {
    /// `-S`: a shut-off domain is started paused for the backup (so a full can make its
    /// checkpoint) and stopped again after it.
    pub start_domain: bool,
    /// `--pause`: the running domain is paused while the backup job starts.
    pub pause: bool,
    /// `-F`: freeze only the filesystems on these mountpoints (default: all).
    pub freeze: Vec<String>,
    /// `-s`: only start the backup job and leave its NBD server running; save nothing.
    pub start_only: bool,
    /// `-k`: end the domain's backup job, and do nothing else.
    pub kill_only: bool,
    /// `-f`: the NBD server's unix socket (online) or its prefix (offline, `.<disk>`).
    pub socket: Option<PathBuf>,
}

/// Why a backup failed.
#[derive(Debug, Error)]
pub enum BackupError {
    #[error("-o -: {0} cannot go to standard output (as with virtnbdbackup); give a folder")]
    StdoutRaw(&'static str),
    #[error(transparent)]
    Zip(#[from] ZipOutError),
    #[error("cannot connect to libvirt at {uri} (is libvirtd running? for SASL: --user, --password)")]
    Connect {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("domain {0:?} not found")]
    NoDomain(String),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("cannot read the domain XML")]
    DomainXml(#[source] quick_xml::Error),
    #[error("{domain}: no disk to back up (see the log for why each was left out)")]
    NoDisk { domain: String },
    #[error("disk {disk}")]
    Disk {
        disk: String,
        #[source]
        source: DiskError,
    },
    #[error(transparent)]
    Folder(#[from] FolderError),
    #[error(transparent)]
    QemuNbd(#[from] QemuNbdError),
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("{folder}: holds a backup already; a {level} backup starts a new chain in an empty folder")]
    ChainExists { folder: PathBuf, level: &'static str },
    #[error("{folder}: no checkpoint list ({}); take a full backup into it first", cpt_file.display())]
    NoChain { folder: PathBuf, cpt_file: PathBuf },
    #[error(
        "{folder}: no checkpoint list ({}), so an inc or diff cannot continue {domain}'s \
         checkpoint(s) {}, which belong to another folder's chain or another tool; back up \
         into the folder that holds their chain, or take a full backup into it first{}",
        cpt_file.display(),
        checkpoints.join(", "),
        foreign_hint(domain, checkpoints)
    )]
    UnknownCheckpoints { folder: PathBuf, cpt_file: PathBuf, domain: String, checkpoints: Vec<String> },
    #[error(
        "{domain}: has checkpoint {checkpoint:?}, which vmback did not make; refusing to mix \
         chains (delete it with `virsh checkpoint-delete {domain} {checkpoint}`, or take a \
         -l copy, which needs no checkpoint)"
    )]
    ForeignCheckpoint { domain: String, checkpoint: String },
    #[error(
        "{checkpoint}: libvirt's checkpoint is not the one {folder} was taken with (a full \
         backup into another folder replaced it); start a new chain with a full"
    )]
    ReplacedCheckpoint { checkpoint: String, folder: PathBuf },
    #[error(
        "{domain}: has an active backup job (NBD server {endpoint}); check it with `virsh \
         domjobinfo {domain}`, end it with `vmback backup -k -d {domain} -o ...`"
    )]
    ActiveJob { domain: String, endpoint: String },
    #[error("{domain}: is shut off; -s starts a backup job, which needs a running domain (add -S)")]
    StartOnlyOffline { domain: String },
    #[error("-s with -S: the domain -S starts is stopped again when vmback exits, and its job with it")]
    StartOnlyStarted,
}

/// For [`BackupError::UnknownCheckpoints`]: a full deletes vmback's checkpoints, not
/// another tool's.
fn foreign_hint(domain: &str, checkpoints: &[String]) -> String {
    match checkpoints.iter().find(|c| !c.starts_with(CPT_PREFIX)) {
        Some(c) => format!(" (after `virsh checkpoint-delete {domain} {c}`: vmback did not make {c:?})"),
        None => String::new(),
    }
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
    /// `-s`: the job runs; its NBD server serves each disk at `(disk, NBD URI)`.
    JobStarted {
        endpoints: Vec<(String, String)>,
    },
    /// `-k`: whether there was a backup job to end.
    JobEnded {
        ended: bool,
    },
}

/// Called with (disk, bytes done) as the backup progresses.
pub type Progress<'a> = &'a (dyn Fn(&str, u64) + Sync);

/// The level a run takes when `asked` for one: `auto` is full into a folder with no
/// chain, else inc; a full of a shut-off domain is a copy (it could make no checkpoint).
fn resolve_level(asked: Level, has_chain: bool, active: bool) -> Level {
    match asked {
        Level::Auto if has_chain => Level::Inc,
        Level::Auto => Level::Full,
        Level::Full if !active => Level::Copy,
        l => l,
    }
}

/// Runs one backup. `progress` is told of every extent written.
pub fn run(opts: &BackupOptions, progress: Progress<'_>) -> Result<Outcome> {
    if opts.output != Path::new("-") {
        return run_into(opts, None, progress);
    }
    // `-o -`, as upstream: refused for raw output before libvirt is asked anything; the
    // chain's files in the current folder; one disk at a time into the zip.
    if opts.raw_output {
        return Err(BackupError::StdoutRaw("-t raw"));
    }
    if opts.raw_disks {
        return Err(BackupError::StdoutRaw("--raw"));
    }
    // `-p` writes nothing, so it needs no archive.
    let zip = if opts.print_only { None } else { Some(ZipOut::stdout()?) };
    let opts = BackupOptions { output: PathBuf::from("."), workers: 1, ..opts.clone() };
    run_into(&opts, zip, progress)
}

/// Runs one backup into `opts.output`, or into `zip` with the chain's files kept there.
fn run_into(opts: &BackupOptions, zip: Option<ZipOut>, progress: Progress<'_>) -> Result<Outcome> {
    // ssh to a remote hypervisor takes as long as libvirt's connection (a handshake
    // each): both at once.
    let reach = std::thread::spawn({
        let opts = opts.clone();
        move || remote::Reach::new(&opts)
    });
    let conn = remote::connect(&opts.uri, &opts.remote)?;
    let dom =
        conn.lookup_domain_by_name(&opts.domain).map_err(|_| BackupError::NoDomain(opts.domain.clone()))?;
    if opts.job.kill_only {
        return online::kill_job(&dom, &opts.domain);
    }
    let (active, _started) = start_domain(&dom, opts)?;
    let xml = dom.xml_desc(0).map_err(|e| LibvirtError::new("domain XML", e))?;
    let disks = select_disks(&xml, opts)?;
    let mut folder = Folder::open(&opts.output, &opts.domain, opts.checkpoint_dir.as_deref())?;
    folder.zip = zip;
    // The current folder of a `-o -` run holds the chain's files and whatever else;
    // only its `.cpt` matters (upstream checks and cleans nothing else there).
    let to_zip = folder.zip.is_some();
    let level = resolve_level(opts.level, !folder.checkpoints.is_empty(), active);
    if opts.level == Level::Full && level == Level::Copy {
        warn!("{} is not running: a full backup needs a checkpoint, taking a copy instead", opts.domain);
    }
    if matches!(level, Level::Full | Level::Copy) && !to_zip && folder.has_data()? && !opts.print_only {
        let level = if level == Level::Full { "full" } else { "copy" };
        return Err(BackupError::ChainExists { folder: opts.output.clone(), level });
    }
    if matches!(level, Level::Inc | Level::Diff) && folder.checkpoints.is_empty() {
        let mut checkpoints = libvirt::checkpoint_names(&dom)?;
        checkpoints.sort();
        let (folder, cpt_file) = (opts.output.clone(), folder.cpt_file.clone());
        return Err(if checkpoints.is_empty() {
            BackupError::NoChain { folder, cpt_file }
        } else {
            BackupError::UnknownCheckpoints { folder, cpt_file, domain: opts.domain.clone(), checkpoints }
        });
    }
    // Before anything on the hypervisor changes: an ssh failure leaves it as it was.
    let reach = reach.join().expect("no panic in Reach::new")?;
    if !opts.print_only && !to_zip {
        folder.clean_partials()?;
    }
    let outcome = if active {
        let hv = online::Hypervisor { conn: &conn, dom: &dom, host: reach.host() };
        online::online(&hv, &xml, &disks, level, &mut folder, opts, progress)
    } else {
        offline::offline(
            &reach,
            &xml,
            &disks,
            level,
            &folder,
            opts,
            progress,
            dom.autostart().unwrap_or(false),
        )
    }?;
    if let (Some(zip), Outcome::Saved { level, .. }) = (&folder.zip, &outcome) {
        finish_zip(zip, &folder, *level)?;
    }
    Ok(outcome)
}

/// The chain's files into the zip (for a full or inc, as upstream: `<domain>.cpt` and
/// every checkpoint's XML), then its central directory.
fn finish_zip(zip: &ZipOut, folder: &Folder, level: Level) -> Result<()> {
    if matches!(level, Level::Full | Level::Inc) {
        let name = |p: &Path| p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        zip.add_file(&name(&folder.cpt_file), &folder.cpt_file)?;
        let dir = name(&folder.cpt_dir);
        zip.add_dir(&dir)?;
        for c in &folder.checkpoints {
            zip.add_file(&format!("{dir}/{c}.xml"), &folder.checkpoint_path(c))?;
        }
    }
    Ok(zip.finish()?)
}

/// A domain `-S` started, stopped again on drop (also when the run fails).
struct Started<'a>(&'a Domain, &'a str);

impl Drop for Started<'_> {
    fn drop(&mut self) {
        info!("{}: stopping the domain again (it was shut off)", self.1);
        if let Err(e) = self.0.destroy() {
            warn!("{}: cannot stop the domain -S started: {e}", self.1);
        }
    }
}

/// Whether the domain runs, after `-S` started it paused if it was shut off (with
/// autodestroy, so libvirt stops it even if vmback is killed); and `-s`'s checks.
fn start_domain<'a>(dom: &'a Domain, opts: &'a BackupOptions) -> Result<(bool, Option<Started<'a>>)> {
    let active = dom.is_active().map_err(|e| LibvirtError::new("domain state", e))?;
    if active || !opts.job.start_domain {
        if opts.job.start_only && !active {
            return Err(BackupError::StartOnlyOffline { domain: opts.domain.clone() });
        }
        return Ok((active, None));
    }
    if opts.job.start_only {
        return Err(BackupError::StartOnlyStarted);
    }
    info!("{}: shut off; starting it paused for the backup (-S)", opts.domain);
    dom.create_with_flags(virt::sys::VIR_DOMAIN_START_PAUSED | virt::sys::VIR_DOMAIN_START_AUTODESTROY)
        .map_err(|e| LibvirtError::new("start the domain paused (-S)", e))?;
    Ok((true, Some(Started(dom, &opts.domain))))
}

/// Ends the backup job of `opts.domain`, if it has one (for Ctrl-C: used from another
/// thread with a connection of its own, to the same URI with the same credentials).
pub fn abort(opts: &BackupOptions) {
    if let Ok(conn) = remote::connect(&opts.uri, &opts.remote)
        && let Ok(dom) = conn.lookup_domain_by_name(&opts.domain)
        && dom.is_active().unwrap_or(false)
        && let Err(e) = libvirt::abort_job(&dom)
    {
        warn!("{}", crate::error_chain(&e));
    }
}

/// The disks to back up, by the rules upstream applies.
fn select_disks(xml: &str, opts: &BackupOptions) -> Result<Vec<DomDisk>> {
    let all = domxml::disks(xml).map_err(BackupError::DomainXml)?;
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
        return Err(BackupError::NoDisk { domain: opts.domain.clone() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BackupOptions {
        BackupOptions {
            domain: "vm".into(),
            level: Level::Full,
            output: PathBuf::from("-"),
            compress: None,
            exclude: vec![],
            include: vec![],
            // A daemon that is not there: the test fails if run() asks it anything.
            uri: "qemu+unix:///system?socket=/nonexistent/vmback-test.sock".into(),
            workers: 1,
            threshold: None,
            print_only: false,
            raw_output: false,
            raw_disks: false,
            checkpoint_dir: None,
            scratch_dir: PathBuf::from("/tmp"),
            qemu_extents: false,
            job: JobOptions::default(),
            remote: RemoteOptions::default(),
        }
    }

    #[test]
    fn raw_output_to_stdout_is_refused_before_libvirt_is_asked() {
        for (raw_output, raw_disks, what) in [(true, false, "-t raw"), (false, true, "--raw")] {
            let err = run(&BackupOptions { raw_output, raw_disks, ..opts() }, &|_, _| {}).err().unwrap();
            assert!(matches!(err, BackupError::StdoutRaw(w) if w == what), "{err}");
            assert!(err.to_string().contains("-o -") && err.to_string().contains(what), "{err}");
        }
        assert!(!Path::new("-").exists(), "no folder named -");
    }

    #[test]
    fn auto_is_full_then_inc_and_a_shut_off_full_is_a_copy() {
        assert_eq!(resolve_level(Level::Auto, false, true), Level::Full);
        assert_eq!(resolve_level(Level::Auto, true, true), Level::Inc);
        assert_eq!(resolve_level(Level::Auto, true, false), Level::Inc);
        assert_eq!(resolve_level(Level::Full, false, false), Level::Copy);
        assert_eq!(resolve_level(Level::Full, true, true), Level::Full);
        for l in [Level::Copy, Level::Inc, Level::Diff] {
            assert_eq!(resolve_level(l, false, false), l);
        }
    }

    #[test]
    fn disks_are_picked_as_upstream_picks_them() {
        let xml = "<domain><devices>\
            <disk device='disk'><driver type='qcow2'/><target dev='vda'/></disk>\
            <disk device='disk'><driver type='qcow2'/><target dev='vdb'/></disk>\
            <disk device='disk'><driver type='raw'/><target dev='vdc'/></disk>\
            <disk device='cdrom'><driver type='raw'/><target dev='sda'/></disk>\
            </devices></domain>";
        let pick = |o: &BackupOptions| -> Vec<String> {
            select_disks(xml, o).map(|d| d.into_iter().map(|d| d.target).collect()).unwrap_or_default()
        };
        let mut o = opts();
        assert_eq!(pick(&o), ["vda", "vdb"]);
        o.raw_disks = true;
        assert_eq!(pick(&o), ["vda", "vdb", "vdc"]);
        o.exclude = vec!["vda".into()];
        assert_eq!(pick(&o), ["vdb", "vdc"]);
        o.include = vec!["vdb".into()];
        assert_eq!(pick(&o), ["vdb"]);
        o.include = vec!["vda".into()];
        let err = select_disks(xml, &o).err().unwrap();
        assert!(matches!(&err, BackupError::NoDisk { domain } if domain == "vm"), "{err}");
        assert!(matches!(select_disks("<domain><a></b></domain>", &opts()), Err(BackupError::DomainXml(_))));
    }

    #[test]
    fn unknown_checkpoints_are_named_with_what_to_do() {
        let err = BackupError::UnknownCheckpoints {
            folder: "/b/set".into(),
            cpt_file: "/b/set/vm.cpt".into(),
            domain: "vm".into(),
            checkpoints: vec!["someone-elses".into(), "virtnbdbackup.0".into()],
        };
        let msg = err.to_string();
        for want in [
            "someone-elses",
            "virtnbdbackup.0",
            "take a full backup",
            "virsh checkpoint-delete vm someone-elses",
        ] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
    }
}
