//! Mounting: options, the mount table, a clean unmount on Ctrl-C, SIGTERM or SIGHUP (as
//! well as on `fusermount3 -u` or `vmback umount` from outside), and recovery of a stale
//! mountpoint.
//!
//! A FUSE mount whose server died (SIGKILL, a crash) stays in the mount table and every
//! access to it fails with ENOTCONN. Such a mount has nothing left to lose: `vmback
//! umount` and `vmback mount` detach it lazily (so readers that still hold files there do
//! not keep it), but only after /proc/self/mountinfo confirms it is a FUSE mount; nothing
//! else is ever unmounted implicitly. A live mount is only unmounted when asked, and a busy
//! one is left mounted with the processes that hold it named.
//!
//! When its session ends, fuser 0.18 unmounts the mountpoint again if it thinks the mount
//! is still there; its check reads the poll result of /dev/fuse backwards, so it always
//! does, and an ordinary unmount (from outside or on a signal) ended with `WARN Failed to
//! umount filesystem: Invalid argument`. [`mount`] therefore takes fuser's handle of the
//! mount itself when the session's workers stop and, the connection being gone (POLLERR
//! on /dev/fuse), lets its unmount fail quietly; a mount still connected then is left to
//! fuser, which unmounts it and warns if that fails.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fuser::{Config, MountOption, SessionACL};
use nix::sys::signal::{SigSet, Signal};
use thiserror::Error;
use tracing::{info, warn};

use super::fuse::FuseAdapter;
use super::live::Refresher;
use super::{FsConfig, FsError, ImageFs, Writes};
use crate::catalog::{Catalog, Watched};

/// Why a mount failed.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error(
        "{0}: mountpoint is a stale FUSE mount (a vmback or other FUSE process was killed) \
         that could not be cleared; clear it with `vmback umount {0}` (or `umount -l {0}` as \
         root) and mount again"
    )]
    Stale(PathBuf),
    #[error("{0}: not a mountpoint")]
    NotMounted(PathBuf),
    #[error("{path}: is a {fs_type} mount, not a FUSE one; vmback only unmounts FUSE mounts (use umount(8))")]
    NotFuse { path: PathBuf, fs_type: String },
    #[error(
        "{path}: busy, still used by {holders}; close those (or leave the folder), or detach \
         it now with `vmback umount --lazy {path}` (it leaves the tree at once; vmback serves \
         the files still open and exits when the last is closed)"
    )]
    Busy { path: PathBuf, holders: String },
    #[error("unmounting {path} failed")]
    Unmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading /proc/self/mountinfo")]
    MountTable(#[source] procfs::ProcError),
    #[error("{0}: mountpoint is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path}: cannot use as mountpoint")]
    Mountpoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("preparing the images")]
    Images(#[from] FsError),
    #[error("mounting on {path} failed")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Let other users in (the kernel then checks the files' modes).
    pub allow_other: bool,
    /// Worker threads serving requests.
    pub threads: usize,
    /// Shown as the mount's source in /proc/mounts.
    pub fs_name: String,
    pub fs: FsConfig,
}

impl MountOptions {
    /// Worker threads by default: two per core, because a worker waits on `pread` as
    /// often as it decodes; capped at 16, past which more threads only add contention.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map_or(4, |n| (n.get() * 2).min(16))
    }
}

/// Whether `path` is a FUSE mount whose server is gone (the kernel answers ENOTCONN).
/// `statfs` always reaches the server, where `stat` may be answered from cached
/// attributes.
fn is_dead(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).err() == Some(nix::errno::Errno::ENOTCONN)
}

/// Refuses a missing or non-directory mountpoint. A stale FUSE mount there (its server was
/// killed) is detached first, with a log line; if that fails, the error says how to clear it.
pub fn check_mountpoint(path: &Path) -> Result<(), SessionError> {
    let probe = std::fs::metadata(path);
    let dead = probe.as_ref().map_or_else(|e| e.raw_os_error() == Some(libc::ENOTCONN), |_| is_dead(path));
    if dead {
        let stale = || SessionError::Stale(path.to_owned());
        if !mount_at(path)?.is_some_and(|m| m.is_fuse()) {
            return Err(stale());
        }
        unmount(path, true).map_err(|e| {
            warn!("{}: clearing the stale FUSE mount: {e}", path.display());
            stale()
        })?;
        warn!("{}: was a stale FUSE mount (its server was killed); unmounted it", path.display());
        return check_mountpoint(path);
    }
    match probe {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(SessionError::NotADirectory(path.to_owned())),
        Err(source) => Err(SessionError::Mountpoint { path: path.to_owned(), source }),
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id (unique while it is mounted).
    pub id: i32,
    /// `fuse.vmback` for a vmback mount (`fuse` for a FUSE mount without a subtype).
    pub fs_type: String,
    /// `major:minor` of the mount's device.
    pub dev: String,
}

impl MountEntry {
    pub fn is_fuse(&self) -> bool {
        self.fs_type == "fuse" || self.fs_type.starts_with("fuse.")
    }
}

/// `path` made absolute with its symlinks resolved, as the mount table shows it. The last
/// component is taken as is when it cannot be resolved (a stale mountpoint fails `stat`).
fn table_path(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    match (abs.parent().map(std::fs::canonicalize), abs.file_name()) {
        (Some(Ok(parent)), Some(name)) => parent.join(name),
        _ => abs,
    }
}

/// Undoes the kernel's octal escapes in mountinfo paths (`\040` for a space).
fn unescape(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match s.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok()) {
            Some(v) if b[i] == b'\\' => {
                out.push(v);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The mount visible at `path` (the one mounted last there), if any.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>, SessionError> {
    let want = table_path(path);
    let table =
        procfs::process::Process::myself().and_then(|p| p.mountinfo()).map_err(SessionError::MountTable)?;
    Ok(table
        .into_iter()
        .rev()
        .find(|m| unescape(&m.mount_point.to_string_lossy()) == want)
        .map(|m| MountEntry { id: m.mnt_id, fs_type: m.fs_type, dev: m.majmin }))
}

/// The processes that keep `mount` busy, as `PID (name: what)` items: working or root
/// directories and open files under it. Processes that cannot be inspected are skipped.
pub fn holders(mount: &Path) -> Vec<String> {
    use procfs::process::FDTarget;
    let mount = table_path(mount);
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    let mut found = Vec::new();
    for p in all.flatten() {
        let mut what = Vec::new();
        if p.cwd().is_ok_and(|d| d.starts_with(&mount)) {
            what.push("working directory".to_owned());
        }
        if p.root().is_ok_and(|d| d.starts_with(&mount)) {
            what.push("root directory".to_owned());
        }
        for fd in p.fd().into_iter().flatten().flatten() {
            if let FDTarget::Path(f) = fd.target
                && f.starts_with(&mount)
            {
                what.push(format!("open file {}", f.display()));
            }
        }
        if !what.is_empty() {
            let name = p.stat().map_or_else(|_| "?".to_owned(), |s| s.comm);
            found.push(format!("PID {} ({name}: {})", p.pid, what.join(", ")));
        }
    }
    found
}

/// How `vmback umount` left things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// A mount with a live server: its server ends by itself now.
    Live,
    /// A stale mount (its server was killed), detached lazily.
    Stale,
    /// Detached lazily as asked: gone from the tree; files still open keep working and
    /// the server ends when the last one is closed.
    Lazy,
}

/// `vmback umount`: unmounts the FUSE mount at `path` (refusing any other kind). A busy
/// live mount stays mounted unless `lazy`; the error names what holds it. A stale mount
/// is always detached lazily, since its server is gone.
pub fn umount(path: &Path, lazy: bool) -> Result<Unmounted, SessionError> {
    let Some(entry) = mount_at(path)? else { return Err(SessionError::NotMounted(path.to_owned())) };
    if !entry.is_fuse() {
        return Err(SessionError::NotFuse { path: path.to_owned(), fs_type: entry.fs_type });
    }
    let failed = |source| SessionError::Unmount { path: path.to_owned(), source };
    if lazy {
        return unmount(path, true).map(|()| Unmounted::Lazy).map_err(failed);
    }
    match unmount(path, false) {
        Ok(()) => Ok(Unmounted::Live),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let stale = std::fs::metadata(path).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN));
            if stale {
                return unmount(path, true).map(|()| Unmounted::Stale).map_err(failed);
            }
            let held = holders(path);
            let holders = if held.is_empty() {
                "a process (none found here: perhaps one in another mount namespace)".to_owned()
            } else {
                held.join(", ")
            };
            Err(SessionError::Busy { path: path.to_owned(), holders })
        }
        Err(e) => Err(failed(e)),
    }
}

/// The `fuser` configuration for `opts`.
pub fn fuser_config(opts: &MountOptions) -> Config {
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(opts.fs_name.clone()),
        MountOption::Subtype("vmback".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    // fuser mounts as root with the type `fuse` and leaves the subtype to fusermount3
    // (unprivileged mounts); the kernel takes it as an option, so the mount shows as
    // `fuse.vmback` either way.
    if nix::unistd::geteuid().is_root() {
        cfg.mount_options.push(MountOption::CUSTOM("subtype=vmback".into()));
    }
    if matches!(opts.fs.writes, Writes::ReadOnly) {
        cfg.mount_options.push(MountOption::RO);
    }
    if opts.allow_other {
        cfg.acl = SessionACL::All;
        cfg.mount_options.push(MountOption::DefaultPermissions);
    }
    cfg.n_threads = Some(opts.threads.max(1));
    cfg.clone_fd = true;
    cfg
}

/// Readahead, in KiB, for the mount's backing device. The kernel offers FUSE only 128 KiB
/// at INIT; 1 MiB matches the largest FUSE request (256 pages), so sequential readers
/// get whole-request reads.
const READAHEAD_KB: &str = "1024";

/// Raises the mount's readahead through sysfs (root only; others keep the default). The
/// device comes from /proc/self/mountinfo: a `stat` of the mountpoint would wait on this
/// very session, which is not serving yet.
fn raise_readahead(mountpoint: &Path) {
    if let Ok(Some(m)) = mount_at(mountpoint)
        && let Err(e) = std::fs::write(format!("/sys/class/bdi/{}/read_ahead_kb", m.dev), READAHEAD_KB)
    {
        tracing::debug!("readahead of {} stays at the kernel's default: {e}", mountpoint.display());
    }
}

/// How long after an unmount to explain why the process is still running.
const LINGER_NOTICE: std::time::Duration = std::time::Duration::from_secs(5);

/// Unmounts `path` (`lazy`: detaches it at once, it ends when its last user lets go):
/// directly as root, through `fusermount3 -u` otherwise (what an unprivileged FUSE mount
/// needs). A busy mount gives EBUSY.
fn unmount(path: &Path, lazy: bool) -> io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        let flags = if lazy { nix::mount::MntFlags::MNT_DETACH } else { nix::mount::MntFlags::empty() };
        return nix::mount::umount2(path, flags).map_err(io::Error::from);
    }
    let flag = if lazy { "-uz" } else { "-u" };
    let out = std::process::Command::new("fusermount3").arg(flag).arg(path).output()?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if msg.contains("busy") {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    Err(io::Error::other(msg))
}

/// Mounts `catalog` on `mountpoint` and serves it in the foreground until a signal or an
/// outside unmount ends the session. With `watch`, the tree follows SOURCE, polled at
/// that interval (see [`super::live`]).
pub fn mount(
    catalog: &Catalog,
    watch: Option<(Watched, std::time::Duration)>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<(), SessionError> {
    check_mountpoint(mountpoint)?;
    let overlay_dir = match &opts.fs.writes {
        Writes::ReadOnly => None,
        Writes::Scratch(d) | Writes::Keep(d) => Some(d.clone()),
    };
    let fs = std::sync::Arc::new(ImageFs::new(catalog, &opts.fs)?);
    // Filled in once the session exists; the adapter's `destroy` runs it.
    let ending: Arc<Mutex<Option<Ending>>> = Arc::default();
    let at_end = {
        let ending = ending.clone();
        move || {
            if let Some(e) = ending.lock().ok().and_then(|mut e| e.take()) {
                e.finish();
            }
        }
    };
    let adapter = FuseAdapter {
        fs,
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        overlay_dir,
        at_end: Some(Box::new(at_end)),
    };
    // Block the stop signals before any thread exists, so every fuser worker inherits the
    // mask and only the waiter below sees them.
    let mut stop = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        stop.add(s);
    }
    stop.thread_block().map_err(|e| SessionError::Mount { path: mountpoint.to_owned(), source: e.into() })?;
    let _refresher = watch.map(|(w, every)| Refresher::start(adapter.fs.clone(), w, every));
    let mount_err = |source| SessionError::Mount { path: mountpoint.to_owned(), source };
    let (changed, aliases) = std::sync::mpsc::channel::<(u64, u64, u64)>();
    adapter.fs.on_alias_change(Box::new(move |ino, off, len| {
        let _ = changed.send((ino, off, len));
    }));
    let mut session = fuser::Session::new(adapter, mountpoint, &fuser_config(opts)).map_err(mount_err)?;
    let device = session.as_fd().try_clone_to_owned().map_err(mount_err)?;
    if let Ok(mut e) = ending.lock() {
        *e = Some(Ending { unmounter: session.unmount_callable(), device });
    }
    // Dropping the kernel's pages of a file whose bytes changed under another (an image
    // and its partition files) is done from a thread of its own: the kernel may wait on
    // page locks held by reads that need a worker of this session to finish.
    let notifier = session.notifier();
    std::thread::spawn(move || {
        for (ino, off, len) in aliases {
            let (off, len) = (i64::try_from(off).unwrap_or(i64::MAX), i64::try_from(len).unwrap_or(i64::MAX));
            // ENOENT: the kernel holds nothing of that file, so there is nothing to drop.
            let _ = notifier.inval_inode(fuser::INodeNo(ino), off, len);
        }
    });
    raise_readahead(mountpoint);
    let path = mountpoint.to_owned();
    std::thread::spawn(move || {
        while let Ok(sig) = stop.wait() {
            let shown = path.display();
            info!("{sig}: unmounting {shown}");
            match unmount(&path, false) {
                Ok(()) => {
                    // The session ends (and this process with it) once the kernel lets go.
                    // If it has not after a while, say why rather than hang silently.
                    std::thread::sleep(LINGER_NOTICE);
                    warn!(
                        "{shown} is unmounted here but still held elsewhere: a process started \
                         while it was mounted (a VM, a container) has its own copy of the mount; \
                         vmback exits when that process does"
                    );
                    break;
                }
                // Someone still uses the mount (a VM with an image open, a shell inside):
                // pulling it away would fail their I/O, so stay mounted and say so.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => warn!(
                    "{shown} is busy: a process has a file open there or works inside it ({}); \
                     close it and send {sig} again, or detach it now with `vmback umount --lazy {shown}`",
                    holders(&path).join(", ")
                ),
                Err(e) => tracing::error!("unmounting {shown}: {e}"),
            }
        }
    });
    info!("mounted on {}", mountpoint.display());
    session.run().map_err(mount_err)?;
    info!("unmounted {}", mountpoint.display());
    Ok(())
}

/// fuser's handle of a mount, and the mount's /dev/fuse, for the end of its session.
struct Ending {
    unmounter: fuser::SessionUnmounter,
    device: OwnedFd,
}

impl Ending {
    /// Takes the mount from fuser's session (so the session's end does not unmount it a
    /// second time) once the kernel has dropped the connection: /dev/fuse then polls
    /// POLLERR (libfuse's test in `fuse_kern_unmount`).
    fn finish(mut self) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fd = [PollFd::new(self.device.as_fd(), PollFlags::empty())];
        let gone = poll(&mut fd, PollTimeout::ZERO).is_ok()
            && fd[0].revents().is_some_and(|r| r.contains(PollFlags::POLLERR));
        if gone {
            // Nothing is mounted there any more: fuser's umount(2) fails with EINVAL.
            let _ = self.unmounter.unmount();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/my\040backups\134x"), PathBuf::from(r"/mnt/my backups\x"));
        assert_eq!(unescape(r"/plain\09"), PathBuf::from(r"/plain\09"));
    }
}
