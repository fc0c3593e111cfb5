//! Mounting: options, the stale-mountpoint check, and a clean unmount on Ctrl-C,
//! SIGTERM or SIGHUP (as well as on `fusermount3 -u` from outside).

use std::io;
use std::path::{Path, PathBuf};

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
        "{0}: mountpoint is a stale FUSE mount (a vmback or other FUSE process was killed); \
         clear it with `fusermount3 -u {0}` (or `umount -l {0}` as root) and mount again"
    )]
    Stale(PathBuf),
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

/// Refuses a missing, non-directory, or stale mountpoint, with a message that says how
/// to fix it.
pub fn check_mountpoint(path: &Path) -> Result<(), SessionError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(SessionError::NotADirectory(path.to_owned())),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Err(SessionError::Stale(path.to_owned())),
        Err(source) => Err(SessionError::Mountpoint { path: path.to_owned(), source }),
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
    let want = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_owned());
    let want = want.to_string_lossy();
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    // mountinfo fields: id, parent, major:minor, root, mount point, ...; the newest last.
    let dev = info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && f[4] == want).then(|| f[2].to_owned())
    });
    if let Some(dev) = dev
        && let Err(e) = std::fs::write(format!("/sys/class/bdi/{dev}/read_ahead_kb"), READAHEAD_KB)
    {
        tracing::debug!("readahead of {want} stays at the kernel's default: {e}");
    }
}

/// How long after an unmount to explain why the process is still running.
const LINGER_NOTICE: std::time::Duration = std::time::Duration::from_secs(5);

/// Unmounts `path`: directly as root, through `fusermount3 -u` otherwise (what an
/// unprivileged FUSE mount needs). A busy mount gives EBUSY.
fn unmount(path: &Path) -> io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        return nix::mount::umount(path).map_err(io::Error::from);
    }
    let out = std::process::Command::new("fusermount3").arg("-u").arg(path).output()?;
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
    let adapter = FuseAdapter {
        fs,
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        overlay_dir,
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
    let session = fuser::Session::new(adapter, mountpoint, &fuser_config(opts)).map_err(mount_err)?;
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
            match unmount(&path) {
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
                    "{shown} is busy: a process has a file open there or works inside it; \
                     close it and send {sig} again, or detach it now with `fusermount3 -uz {shown}`"
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
