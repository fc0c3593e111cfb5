//! Backing up a running domain through libvirt's pull-mode backup job: libvirt starts an
//! NBD server on a unix socket, vmback asks it which extents to save (`base:allocation`
//! for full and copy, the job's dirty bitmap for inc and diff) and reads them with libnbd.
//! A full or inc creates its checkpoint atomically with the job; a diff reads the changes
//! since the last checkpoint without creating one; a copy has no checkpoint at all.
//!
//! Around the job's start the guest's filesystems are frozen through the guest agent
//! (`-F`: some mountpoints), unless the domain is paused (`--pause` pauses it for that
//! moment). A domain that has a backup job already is refused, unless the job is a dead
//! vmback's (its socket `vmback.<pid>.sock` names a process that is gone): that one is
//! ended. `-s` starts the job and leaves it running; `-k` only ends it.
//!
//! Invariants: the job is always ended (also on error and on unwinding), except the one
//! `-s` is asked to leave running; another tool's job is never ended unasked. Before an inc or
//! diff the domain's checkpoints are brought in step with the folder's chain, and every
//! check that can refuse runs before anything is deleted: a checkpoint vmback did not make
//! refuses the run, so does one of the chain's names that libvirt holds with another
//! identity (a full into another folder replaced it: that folder's chain still needs every
//! bitmap it has). Only then are the checkpoints libvirt has and the chain lacks (a killed
//! or failed run's, newer than the chain's last) deleted, and the chain's ones libvirt
//! lost (a transient domain) redefined. `.cpt` and `checkpoints/` change only after every
//! disk is saved.
//!
//! On a remote hypervisor (a URI naming a host) the job's NBD server listens on TCP at
//! the NBD address and port (TLS with `--tls`, qemu's backup certificates there), and the
//! scratch files are on that host, in `--scratchdir` there, as virtnbdbackup has them.
//! When the network is lost mid-backup, the reads fail (see `nbd::TCP_DEAD_AFTER`) and
//! the job is ended over a new connection as soon as the host answers again, for up to
//! [`JOB_END_RETRY`]; after that the next run ends it.

use std::time::{Duration, Instant};

use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;

use super::disk::Extents;
use super::domxml::{self, DomDisk, NbdServer};
use super::folder::{CPT_PREFIX, Folder, cpt_number, next_checkpoint};
use super::host::Host;
use super::libvirt;
use super::nbd::{Endpoint, Nbd, Tls};
use super::remote::{self, UriHost};
use super::save::{Plan, save_disks, save_side_files, while_reading_parts};
use super::{BackupError, BackupOptions, Level, Outcome, Progress};

type Result<T, E = BackupError> = std::result::Result<T, E>;

/// How long a job whose connection was lost is retried to be ended: two minutes cover a
/// link flap or a restarting sshd; a host that stays away longer gets its job ended by
/// the next run (as after a kill).
const JOB_END_RETRY: Duration = Duration::from_secs(120);
/// Between two tries: connecting to a host that is away fails within this anyway
/// (no route) or takes ssh's connect timeout.
const JOB_END_PAUSE: Duration = Duration::from_secs(2);

/// A job that is always ended: on success, on error, and on unwinding.
struct Job<'a> {
    conn: &'a Connect,
    dom: &'a Domain,
    opts: &'a BackupOptions,
}

impl Drop for Job<'_> {
    fn drop(&mut self) {
        let Err(e) = libvirt::abort_job(self.dom) else { return };
        if self.conn.is_alive().unwrap_or(false) {
            warn!("{}", crate::error_chain(&e));
            return;
        }
        // The connection is gone (a lost network): end the job over a new one.
        warn!("{}: the connection to libvirt was lost; ending the backup job over a new one", self.opts.uri);
        let deadline = Instant::now() + JOB_END_RETRY;
        loop {
            if let Ok(conn) = remote::connect(&self.opts.uri, &self.opts.remote)
                && let Ok(dom) = conn.lookup_domain_by_name(&self.opts.domain)
            {
                match libvirt::abort_job(&dom) {
                    Ok(()) => info!("{}: backup job ended", self.opts.domain),
                    Err(e) => warn!("{}", crate::error_chain(&e)),
                }
                return;
            }
            if Instant::now() > deadline {
                warn!(
                    "{}: could not reach {} within {JOB_END_RETRY:?} to end the backup job; the \
                     next run ends it (or `virsh -c {} domjobabort {}`)",
                    self.opts.domain, self.opts.uri, self.opts.uri, self.opts.domain
                );
                return;
            }
            std::thread::sleep(JOB_END_PAUSE);
        }
    }
}

/// What to change in libvirt's checkpoints (`ours`: the ones named `virtnbdbackup.N`) for
/// an inc or diff to continue the folder's `chain`.
#[derive(Debug, PartialEq, Eq)]
struct Reconcile {
    /// In libvirt, not in the chain: left by a run that did not finish.
    delete: Vec<String>,
    /// In the chain, not in libvirt: lost with a transient domain.
    redefine: Vec<String>,
    /// In both: must be the same checkpoints (see `domxml::checkpoint_identity`).
    compare: Vec<String>,
}

fn reconcile(chain: &[String], ours: &[String]) -> Reconcile {
    let mut delete: Vec<String> = ours.iter().filter(|c| !chain.contains(c)).cloned().collect();
    // Newest first: libvirt deletes a leaf without merging its bitmap into another.
    delete.sort_by_key(|c| std::cmp::Reverse(cpt_number(c)));
    Reconcile {
        delete,
        redefine: chain.iter().filter(|c| !ours.contains(c)).cloned().collect(),
        compare: chain.iter().filter(|c| ours.contains(c)).cloned().collect(),
    }
}

/// The hypervisor of a run: its libvirt connection, the domain, its files and commands.
pub struct Hypervisor<'a> {
    pub conn: &'a Connect,
    pub dom: &'a Domain,
    pub host: &'a dyn Host,
}

/// Backs up the running domain.
pub fn online(
    hv: &Hypervisor<'_>,
    xml: &str,
    disks: &[DomDisk],
    level: Level,
    folder: &mut Folder,
    opts: &BackupOptions,
    progress: Progress<'_>,
) -> Result<Outcome> {
    let (conn, dom, host) = (hv.conn, hv.dom, hv.host);
    end_stale_job(dom, &opts.domain)?;
    let existing = libvirt::checkpoint_names(dom)?;
    if let Some(foreign) = existing.iter().find(|c| !c.starts_with(CPT_PREFIX))
        && level != Level::Copy
    {
        return Err(BackupError::ForeignCheckpoint {
            domain: opts.domain.clone(),
            checkpoint: foreign.clone(),
        });
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
                folder.clear_checkpoints()?;
            }
            (Some(next_checkpoint(0)), None)
        }
        Level::Inc | Level::Diff => {
            let plan = reconcile(&folder.checkpoints, &ours);
            // The checkpoints libvirt has must be the ones this folder's chain was taken
            // with, not namesakes a full into another folder made since.
            for c in &plan.compare {
                let saved = folder.read_checkpoint(c)?;
                let live = libvirt::checkpoint_xml(dom, c)?;
                if domxml::checkpoint_identity(&saved) != domxml::checkpoint_identity(&live) {
                    return Err(BackupError::ReplacedCheckpoint {
                        checkpoint: c.clone(),
                        folder: folder.out.clone(),
                    });
                }
            }
            for c in &plan.delete {
                warn!("{c}: checkpoint not in {}; deleting it", folder.cpt_file.display());
                delete_checkpoint(dom, c)?;
            }
            for c in &plan.redefine {
                let saved = folder.read_checkpoint(c)?;
                info!("{c}: redefining the checkpoint from {}", folder.checkpoint_path(c).display());
                libvirt::create_checkpoint(dom, &saved, libvirt::REDEFINE)?;
            }
            let parent = folder.checkpoints.last().cloned().expect("run() checked there is a chain");
            let new = next_checkpoint(folder.checkpoints.len());
            (if level == Level::Inc { Some(new) } else { None }, Some(parent))
        }
        Level::Auto => unreachable!("resolved by run()"),
    };
    let remote = UriHost::parse(&opts.uri);
    let socket = socket_path(opts);
    let (server, endpoint) = match &remote {
        None => {
            let _ = std::fs::remove_file(&socket);
            (NbdServer::Unix(&socket), Endpoint::Unix(&socket))
        }
        Some(r) => {
            let (name, port) = (r.nbd_address(&opts.remote), opts.remote.nbd_port);
            let tls = if opts.remote.tls { Tls::Required { certificates: None } } else { Tls::Off };
            (NbdServer::Tcp { name, port, tls: opts.remote.tls }, Endpoint::Tcp { host: name, port, tls })
        }
    };
    let backup_xml = domxml::backup_xml(server, parent.as_deref(), disks, &opts.scratch_dir);
    let checkpoint_xml = new_cpt
        .as_ref()
        .filter(|_| !opts.print_only)
        .map(|c| domxml::checkpoint_xml(c, parent.as_deref(), disks));
    debug!("backup job XML: {backup_xml}");
    if let Some(x) = &checkpoint_xml {
        debug!("checkpoint XML: {x}");
    }
    begin_job(dom, &backup_xml, checkpoint_xml.as_deref(), opts)?;
    if opts.job.start_only {
        // -s: the job (and its NBD server) outlives vmback; nothing is saved.
        let uri = |d: &DomDisk| match endpoint {
            Endpoint::Unix(s) => format!("nbd+unix:///{}?socket={}", d.target, s.display()),
            Endpoint::Tcp { host, port, tls } => {
                let scheme = if matches!(tls, Tls::Off) { "nbd" } else { "nbds" };
                format!("{scheme}://{host}:{port}/{}", d.target)
            }
        };
        info!("{}: backup job started; end it with `vmback backup -k -d {0} -o ...`", opts.domain);
        return Ok(Outcome::JobStarted {
            endpoints: disks.iter().map(|d| (d.target.clone(), uri(d))).collect(),
        });
    }
    let job = Job { conn, dom, opts };
    let kind = if matches!(level, Level::Inc | Level::Diff) { Extents::Dirty } else { Extents::Allocation };
    let ident = match level {
        Level::Copy => "copy".to_owned(),
        Level::Diff => folder.unique_time()?,
        _ => new_cpt.clone().expect("full and inc have one"),
    };
    let meta_cpt = match level {
        Level::Copy => next_checkpoint(0),
        // A diff carries the name the next checkpoint will have (upstream, FORMAT.md §1.4).
        Level::Diff => next_checkpoint(folder.checkpoints.len()),
        _ => new_cpt.clone().expect("full and inc have one"),
    };
    let plan =
        Plan { level, kind, meta_cpt, parent: parent.clone().unwrap_or_default(), ident: ident.clone() };
    // The side files' parts from the hypervisor while the data moves: the job began, so
    // the images hold the new checkpoint's bitmap.
    let saving = &*folder;
    let (outcome, parts) = while_reading_parts(host, xml, disks, opts, || {
        save_disks(disks, &plan, saving, opts, progress, |d| {
            let context = match kind {
                Extents::Allocation => "base:allocation".to_owned(),
                Extents::Dirty => format!("qemu:dirty-bitmap:backup-{}", d.target),
            };
            Nbd::connect(endpoint, &d.target, &context)
                .map_err(|e| BackupError::Disk { disk: d.target.clone(), source: e.into() })
        })
    });
    let outcome = outcome?;
    if let (Outcome::Saved { .. }, Some(parts)) = (&outcome, parts) {
        if let Some(c) = &new_cpt {
            folder.add_checkpoint(c, &libvirt::checkpoint_xml(dom, c)?)?;
        }
        save_side_files(folder, xml, parts, &ident, dom.autostart().unwrap_or(false))?;
    } else if let Some(c) = &new_cpt
        && checkpoint_xml.is_some()
    {
        // Below the threshold: the checkpoint made with the job must not outlive it.
        drop(job);
        delete_checkpoint(dom, c)?;
        return Ok(outcome);
    }
    drop(job);
    if remote.is_none() {
        let _ = std::fs::remove_file(&socket);
    }
    Ok(outcome)
}

/// Deletes a checkpoint with its bitmaps, or only its metadata when the bitmaps are gone.
fn delete_checkpoint(dom: &Domain, name: &str) -> Result<()> {
    if let Err(e) = libvirt::delete_checkpoint(dom, name, 0) {
        warn!("{}; deleting its metadata only", crate::error_chain(&e));
        libvirt::delete_checkpoint(dom, name, libvirt::METADATA_ONLY)?;
    }
    Ok(())
}

/// The NBD server's socket: `-f`, else one named after this run (`vmback.<pid>.sock`,
/// which tells a dead run's job from a live one), or for `-s`, whose job outlives the
/// run, after the domain (`vmback-<domain>.sock`).
fn socket_path(opts: &BackupOptions) -> PathBuf {
    match &opts.job.socket {
        Some(s) => s.clone(),
        None if opts.job.start_only => opts.scratch_dir.join(format!("vmback-{}.sock", opts.domain)),
        None => opts.scratch_dir.join(format!("vmback.{}.sock", std::process::id())),
    }
}

/// The PID in a socket name `vmback.<pid>.sock` (see [`socket_path`]).
fn socket_pid(socket: &Path) -> Option<u32> {
    let name = socket.file_name()?.to_str()?;
    name.strip_prefix("vmback.")?.strip_suffix(".sock")?.parse().ok()
}

/// The PID in a scratch file name `vmback.<pid>.<disk>.scratch` ([`domxml::scratch_file`]).
fn scratch_pid(scratch: &Path) -> Option<u32> {
    let name = scratch.file_name()?.to_str()?;
    name.strip_prefix("vmback.")?.split('.').next()?.parse().ok()
}

/// What a backup job's XML says: where its NBD server listens (its unix socket, or
/// host:port), and the vmback run that started it, if one did: the PID in its unix
/// socket's name, or for a TCP server (a remote hypervisor's), in its scratch files'. A
/// `-s` job's socket names no PID; over TCP a `-s` job cannot be told from a killed run's.
fn job_owner(job_xml: &str) -> (Option<String>, Option<u32>) {
    let mut reader = quick_xml::Reader::from_str(job_xml);
    let (mut endpoint, mut unix, mut scratch) = (None, false, None);
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Empty(e) | quick_xml::events::Event::Start(e)) => {
                let attr = |k: &[u8]| {
                    e.try_get_attribute(k)
                        .ok()
                        .flatten()
                        .and_then(|a| a.unescape_value().ok())
                        .map(|v| v.into_owned())
                };
                match e.name().as_ref() {
                    b"server" => {
                        unix = attr(b"socket").is_some();
                        endpoint = attr(b"socket")
                            .or_else(|| Some(format!("{}:{}", attr(b"name")?, attr(b"port")?)));
                    }
                    b"scratch" if scratch.is_none() => scratch = attr(b"file"),
                    _ => {}
                }
            }
            Ok(quick_xml::events::Event::Eof) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let pid = match (&endpoint, unix) {
        (Some(socket), true) => socket_pid(Path::new(socket)),
        _ => scratch.as_deref().and_then(|s| scratch_pid(Path::new(s))),
    };
    (endpoint, pid)
}

/// A backup job the domain has already: a killed vmback's (see [`job_owner`]: a process
/// that is gone) is ended, with a warning; any other one (another tool's, a `-s` job, a
/// run still going) refuses the run, as upstream refuses it.
fn end_stale_job(dom: &Domain, domain: &str) -> Result<()> {
    let Ok(job_xml) = libvirt::backup_job_xml(dom) else { return Ok(()) };
    let (endpoint, pid) = job_owner(&job_xml);
    let endpoint = endpoint.unwrap_or_else(|| "unknown".into());
    match pid {
        Some(pid) if !Path::new(&format!("/proc/{pid}")).exists() => {
            warn!("{domain}: ending the backup job of vmback PID {pid}, which is gone ({endpoint})");
            Ok(libvirt::abort_job(dom)?)
        }
        _ => Err(BackupError::ActiveJob { domain: domain.to_owned(), endpoint }),
    }
}

/// `-k`: ends the domain's backup job, if it has one.
pub fn kill_job(dom: &Domain, domain: &str) -> Result<Outcome> {
    let Ok(job_xml) = libvirt::backup_job_xml(dom) else {
        info!("{domain}: has no backup job to end");
        return Ok(Outcome::JobEnded { ended: false });
    };
    libvirt::abort_job(dom)?;
    info!("{domain}: ended its backup job (NBD server {})", job_owner(&job_xml).0.unwrap_or_default());
    Ok(Outcome::JobEnded { ended: true })
}

/// Starts the backup job: with `--pause` the running domain is paused around it; the
/// guest's filesystems (`-F`: those on the given mountpoints) are frozen around it when
/// the guest agent answers and the domain is not paused (as upstream: a paused guest
/// cannot answer).
fn begin_job(
    dom: &Domain,
    backup_xml: &str,
    checkpoint_xml: Option<&str>,
    opts: &BackupOptions,
) -> Result<()> {
    let paused = opts.job.pause && pause(dom, &opts.domain);
    let frozen = if is_paused(dom) {
        info!("{}: paused, so not freezing the guest's filesystems", opts.domain);
        false
    } else {
        freeze(dom, &opts.job.freeze)
    };
    let begun = libvirt::backup_begin(dom, backup_xml, checkpoint_xml);
    if frozen && let Err(e) = libvirt::fs_thaw(dom) {
        warn!("{}", crate::error_chain(&e));
    }
    if paused {
        match dom.resume() {
            Ok(()) => info!("{}: resumed", opts.domain),
            Err(e) => warn!("{}: cannot resume the domain --pause paused: {e}", opts.domain),
        }
    }
    Ok(begun?)
}

fn is_paused(dom: &Domain) -> bool {
    matches!(dom.state(), Ok((Enum::Known(DomainState::Paused), _)))
}

/// `--pause`: pauses the domain unless it is paused already; whether it did.
fn pause(dom: &Domain, domain: &str) -> bool {
    if is_paused(dom) {
        info!("{domain}: paused already (--pause)");
        return false;
    }
    match dom.suspend() {
        Ok(()) => {
            info!("{domain}: paused while the backup job starts (--pause)");
            true
        }
        Err(e) => {
            warn!("{domain}: cannot pause the domain: {e}");
            false
        }
    }
}

/// Freezes the guest's filesystems (all, or those on `mountpoints`); whether it did.
fn freeze(dom: &Domain, mountpoints: &[String]) -> bool {
    match libvirt::fs_freeze(dom, mountpoints) {
        Ok(n) => {
            info!("froze {n} filesystem(s) of the guest");
            true
        }
        Err(e) => {
            warn!(
                "no guest agent answered: backing up without freezing the guest's filesystems ({})",
                e.source.message()
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_jobs_endpoint_and_its_runs_pid_are_read_from_its_xml() {
        let scratch = "<disks><disk name='vda' backup='yes' type='file'>\
                       <scratch file='/var/tmp/vmback.4343.vda.scratch'/></disk></disks>";
        let unix = format!(
            "<domainbackup mode='pull'><server transport='unix' socket='/var/tmp/vmback.4242.sock'/>{scratch}</domainbackup>"
        );
        assert_eq!(job_owner(&unix), (Some("/var/tmp/vmback.4242.sock".into()), Some(4242)));
        // -s or -f: the socket names no run, whatever the scratch files say.
        let s = unix.replace("vmback.4242.sock", "vmback-vm1.sock");
        assert_eq!(job_owner(&s), (Some("/var/tmp/vmback-vm1.sock".into()), None));
        // TCP (a remote hypervisor): the scratch files name the run.
        let tcp = format!(
            "<domainbackup mode='pull'><server transport='tcp' name='10.0.0.2' port='10809'/>{scratch}</domainbackup>"
        );
        assert_eq!(job_owner(&tcp), (Some("10.0.0.2:10809".into()), Some(4343)));
        let other = "<domainbackup mode='pull'><server transport='unix' socket='/var/tmp/virtnbdbackup.77'/>\
                     <disks><disk name='vda'><scratch file='/var/tmp/backup.ABCDE.vda'/></disk></disks></domainbackup>";
        assert_eq!(job_owner(other).1, None);
        for name in ["/tmp/nbd.sock", "/x/vmback.x.sock"] {
            assert_eq!(socket_pid(Path::new(name)), None, "{name}");
        }
        assert_eq!(scratch_pid(Path::new("/tmp/vmback.12.v.d.scratch")), Some(12));
    }

    #[test]
    fn a_killed_runs_checkpoints_go_newest_first_and_lost_ones_come_back() {
        let chain = names(&["virtnbdbackup.0", "virtnbdbackup.1"]);
        let r = reconcile(
            &chain,
            &names(&["virtnbdbackup.2", "virtnbdbackup.1", "virtnbdbackup.10", "virtnbdbackup.0"]),
        );
        assert_eq!(r.delete, ["virtnbdbackup.10", "virtnbdbackup.2"]);
        assert!(r.redefine.is_empty());
        assert_eq!(r.compare, chain);
        let r = reconcile(&chain, &[]);
        assert_eq!((r.delete.len(), r.redefine.clone(), r.compare.len()), (0, chain.clone(), 0));
        let r = reconcile(&chain, &chain);
        assert_eq!(r, Reconcile { delete: vec![], redefine: vec![], compare: chain });
    }
}
