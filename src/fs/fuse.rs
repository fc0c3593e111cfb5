//! The thin adapter between the kernel and [`ImageFs`]: each method converts its
//! arguments, calls the core once and replies. Errors are logged here, and only here:
//! EIO (damage, I/O) at warn with the whole cause chain, the rest at debug.

use std::ffi::OsStr;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, IoctlFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use tracing::{debug, warn};

use super::{Attr, FsError, ImageFs, Kind, Seek};

/// How long the kernel may cache names and attributes. The tree changes when SOURCE
/// does (a new backup must show within 2 s, and `latest` move with it), so names are
/// trusted for 1 s. Contents never go stale under a cached name: a node whose contents
/// change gets a new inode number (see `inode`), and every write passes through here.
const TTL: Duration = Duration::from_secs(1);

/// The readahead asked for at INIT. The kernel caps it at what it offered (128 KiB on
/// current kernels); `session` raises it through sysfs afterwards when it can.
const MAX_READAHEAD: u32 = 1 << 20;

thread_local! {
    /// Each FUSE thread's reply buffer, kept between READs. A fresh zeroed buffer per
    /// READ cost a memset and a page fault per 4 KiB (glibc hands the freed memory back
    /// at once): under `perf`, faults, memset and page-table locks were about half of
    /// vmback's CPU on a sequential read. It grows to the largest READ (`max_pages`
    /// pages, at most 1 MiB with the readahead `session` sets), so it is small.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The core, plus what only the adapter needs.
pub struct FuseAdapter {
    pub fs: std::sync::Arc<ImageFs>,
    /// The mount's owner: every node shows this uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Where overlays are written: `statfs` reports its free space.
    pub overlay_dir: Option<std::path::PathBuf>,
    /// Run once by `destroy`, when the session's workers have stopped (see
    /// [`super::session::mount`], which uses it to end the mount cleanly).
    pub at_end: Option<Box<dyn FnOnce() + Send + Sync>>,
}

fn errno(op: &str, err: &FsError) -> Errno {
    let code = err.errno();
    if code == libc::EIO
        || code == libc::ENOSPC
        || matches!(err, FsError::Overlay(_) | FsError::View(_) | FsError::Keep(_) | FsError::Io { .. })
    {
        warn!("{op}: {}", crate::error_chain(err));
    } else {
        debug!("{op}: {err}");
    }
    Errno::from_i32(code)
}

impl FuseAdapter {
    fn attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.blocks,
            atime: a.mtime,
            mtime: a.mtime,
            ctime: a.mtime,
            crtime: a.mtime,
            kind: file_type(a.kind),
            perm: a.perm,
            nlink: if a.kind == Kind::Dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            // 4 KiB: the page size, and what cp and qemu use as their I/O unit hint.
            blksize: 4096,
            flags: 0,
        }
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Link => FileType::Symlink,
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_readahead(MAX_READAHEAD) {
            let _ = config.set_max_readahead(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else { return reply.error(Errno::ENOENT) };
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), Generation(0)),
            Err(e) => reply.error(errno("lookup", &e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(errno("getattr", &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(errno("readlink", &e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        match self.fs.open(ino.0, write) {
            Ok((fh, true)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Ok((fh, false)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(errno("open", &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        READ_BUF.with_borrow_mut(|buf| match self.fs.read_into(fh.0, offset, size, buf) {
            Ok(()) => reply.data(buf),
            Err(e) => reply.error(errno("read", &e)),
        })
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.fs.readdir(ino.0, offset) {
            Ok(entries) => {
                for (child, next, kind, name) in entries {
                    if reply.add(INodeNo(child), next, file_type(kind), name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdir", &e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let whence = match whence {
            libc::SEEK_DATA => Seek::Data,
            libc::SEEK_HOLE => Seek::Hole,
            other => return reply.error(errno("lseek", &FsError::BadWhence(other))),
        };
        let Ok(offset) = u64::try_from(offset) else { return reply.error(Errno::EINVAL) };
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(pos) => reply.offset(pos as i64),
            Err(e) => reply.error(errno("lseek", &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) of a kept image saves its overlay, as fsync does.
        match self.fs.sync(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("flush", &e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    // The tree itself is fixed: only image contents change. Creating, removing or
    // renaming anything answers EPERM (not ENOSYS, which tools report as a bug).
    fn mknod(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, _d: u32, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn symlink(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _t: &std::path::Path, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn link(&self, _r: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permissions are the kernel's job (private mount, or default_permissions with
        // --allow-other); writes to read-only images fail at open with EROFS.
        reply.ok();
    }

    // No extended attributes. ENOSYS (not ENODATA) makes the kernel remember that and
    // answer EOPNOTSUPP itself from then on: `ls -l` asks for two per file, and those
    // round trips were half the syscall time of `ls -lR` over 500 restore points.
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    // No ioctl means anything here. qemu with `cache=none` asks XFS_IOC_DIOINFO for its
    // O_DIRECT alignment and falls back when told ENOTTY ("not a typewriter": this file
    // has no such ioctl), which is the answer a plain file gives; fuser's default would
    // log a warning per call.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        debug!("ioctl {cmd:#x}: ENOTTY");
        reply.error(Errno::ENOTTY);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Free space is the overlay folder's (where writes end up); a read-only mount has
        // none. 255 is the longest name.
        let free = self.overlay_dir.as_deref().and_then(|d| nix::sys::statvfs::statvfs(d).ok());
        match free {
            Some(v) => reply.statfs(
                v.blocks(),
                v.blocks_free(),
                v.blocks_available(),
                0,
                0,
                v.block_size() as u32,
                255,
                v.fragment_size() as u32,
            ),
            None => reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno("write", &e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.fs.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fallocate", &e)),
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.fs.sync(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsync", &e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.fs.setattr(ino.0, fh.map(|f| f.0), size) {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(errno("setattr", &e)),
        }
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.sync_all() {
            errno("saving kept overlays", &e);
        }
        if let Some(end) = self.at_end.take() {
            end();
        }
    }
}
