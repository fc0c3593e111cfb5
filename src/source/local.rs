//! A folder on the local filesystem as a [`Source`]: the one place vmback touches the
//! files of a backup location.
//!
//! Rules: the walk never follows a symlink (walkdir with `follow_links(false)`); opening
//! refuses a path whose components include a symlink (each checked with `lstat`, and the
//! last one opened with `O_NOFOLLOW`, so a symlink swapped in after the check is not
//! followed either); the root's device number is the tree's volume, which tells an
//! unmounted filesystem (an empty folder on another device) from deleted backups.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Entry, Kind, ReadAt, Source, SourceError, Stamp, Tree, check_relative};

/// See the module note.
#[derive(Debug, Clone)]
pub struct LocalSource {
    root: PathBuf,
}

impl LocalSource {
    /// The folder `root` (not opened until it is listed or read).
    pub fn new(root: &Path) -> LocalSource {
        LocalSource { root: root.to_owned() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io_err(&self, path: &Path) -> impl FnOnce(io::Error) -> SourceError + '_ {
        let path = self.display(path);
        move |source| SourceError::Io { path, source }
    }

    /// Opens the regular file at `path`, not following a symlink on any component.
    fn open_file(&self, path: &Path) -> Result<File, SourceError> {
        check_relative(self, path)?;
        let mut at = self.root.clone();
        for part in path.components() {
            at.push(part);
            let meta = std::fs::symlink_metadata(&at).map_err(self.io_err(path))?;
            if meta.file_type().is_symlink() {
                return Err(SourceError::Symlink { path: at });
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&at)
            .map_err(self.io_err(path))?;
        if !file.metadata().map_err(self.io_err(path))?.is_file() {
            return Err(SourceError::NotAFile { path: at });
        }
        Ok(file)
    }
}

fn kind_of(meta: &Metadata) -> Kind {
    let t = meta.file_type();
    if t.is_symlink() {
        Kind::Symlink
    } else if t.is_file() {
        Kind::File
    } else if t.is_dir() {
        Kind::Dir
    } else {
        Kind::Other
    }
}

fn entry_of(path: PathBuf, meta: &Metadata) -> Entry {
    let ns = |s: i64, ns: i64| i128::from(s) * 1_000_000_000 + i128::from(ns);
    let stamp = Stamp::Local {
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
    };
    let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
    Entry { path, kind: kind_of(meta), size: meta.len(), mtime, stamp }
}

impl Source for LocalSource {
    fn display(&self, path: &Path) -> PathBuf {
        if path.as_os_str().is_empty() { self.root.clone() } else { self.root.join(path) }
    }

    fn list(&self, max_depth: usize) -> Result<Tree, SourceError> {
        let root_err = self.io_err(Path::new(""));
        if let Err(e) = std::fs::read_dir(&self.root) {
            return Err(root_err(e));
        }
        let volume = std::fs::metadata(&self.root).map_err(self.io_err(Path::new("")))?.dev();
        let mut tree = Tree { entries: Vec::new(), unreadable: Vec::new(), volume: Some(volume) };
        let walk =
            walkdir::WalkDir::new(&self.root).follow_links(false).max_depth(max_depth).sort_by_file_name();
        for entry in walk.min_depth(1) {
            let found = entry.and_then(|e| {
                let meta = e.metadata()?;
                Ok((e.into_path(), meta))
            });
            match found {
                Ok((path, meta)) => {
                    let rel = path.strip_prefix(&self.root).unwrap_or(&path).to_owned();
                    tree.entries.push(entry_of(rel, &meta));
                }
                Err(e) => tree.unreadable.push(e.to_string()),
            }
        }
        Ok(tree)
    }

    fn stat(&self, path: &Path) -> Result<Entry, SourceError> {
        check_relative(self, path)?;
        let meta = std::fs::symlink_metadata(self.display(path)).map_err(self.io_err(path))?;
        Ok(entry_of(path.to_owned(), &meta))
    }

    fn open(&self, path: &Path) -> Result<Arc<dyn ReadAt>, SourceError> {
        Ok(Arc::new(LocalFile(self.open_file(path)?)))
    }

    fn read_whole(&self, path: &Path, max: u64) -> Result<Vec<u8>, SourceError> {
        let file = self.open_file(path)?;
        let len = file.metadata().map_err(self.io_err(path))?.len();
        let too_large = || SourceError::TooLarge { path: self.display(path), max };
        if len > max {
            return Err(too_large());
        }
        // The bound is on the bytes read, so a file grown since the check changes nothing.
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(max + 1).read_to_end(&mut bytes).map_err(self.io_err(path))?;
        if bytes.len() as u64 > max {
            return Err(too_large());
        }
        Ok(bytes)
    }
}

/// An open local file.
#[derive(Debug)]
struct LocalFile(File);

impl ReadAt for LocalFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn modified(&self) -> Option<std::time::SystemTime> {
        self.0.metadata().and_then(|m| m.modified()).ok()
    }

    /// From SEEK_DATA / SEEK_HOLE; a filesystem without them is all data.
    fn data_runs(&self, len: u64) -> io::Result<Vec<Range<u64>>> {
        use nix::errno::Errno;
        use nix::unistd::{Whence, lseek};
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            let start = match lseek(&self.0, pos as i64, Whence::SeekData) {
                Ok(s) => s as u64,
                Err(Errno::ENXIO) => break,
                Err(Errno::EINVAL) => pos,
                Err(e) => return Err(e.into()),
            };
            let end = match lseek(&self.0, start as i64, Whence::SeekHole) {
                Ok(e) => (e as u64).min(len),
                Err(Errno::EINVAL) => len,
                Err(e) => return Err(e.into()),
            };
            if end > start {
                out.push(start..end);
            }
            pos = end.max(start + 1);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, LocalSource) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("set")).expect("mkdir");
        std::fs::write(dir.path().join("set/a.data"), b"hello").expect("write");
        std::fs::write(dir.path().join("outside"), b"secret").expect("write");
        std::os::unix::fs::symlink(dir.path().join("outside"), dir.path().join("set/link.data"))
            .expect("symlink");
        std::os::unix::fs::symlink(dir.path().join("set"), dir.path().join("dirlink")).expect("symlink");
        let source = LocalSource::new(dir.path());
        (dir, source)
    }

    #[test]
    fn a_symlink_is_listed_and_never_followed() {
        let (_dir, src) = tree();
        let tree = src.list(16).expect("list");
        assert_eq!(
            super::super::kinds(&tree),
            [
                ("dirlink", Kind::Symlink),
                ("outside", Kind::File),
                ("set", Kind::Dir),
                ("set/a.data", Kind::File),
                ("set/link.data", Kind::Symlink)
            ]
        );
        for path in ["set/link.data", "dirlink/a.data"] {
            let err = src.open(Path::new(path)).expect_err(path);
            assert!(matches!(err, SourceError::Symlink { .. }), "{path}: {err}");
            let err = src.read_whole(Path::new(path), 100).expect_err(path);
            assert!(matches!(err, SourceError::Symlink { .. }), "{path}: {err}");
        }
        assert_eq!(src.stat(Path::new("set/link.data")).expect("lstat").kind, Kind::Symlink);
        let file = src.open(Path::new("set/a.data")).expect("open");
        let mut buf = [0u8; 8];
        assert_eq!(file.read_at(&mut buf, 1).expect("read"), 4);
        assert_eq!(&buf[..4], b"ello");
        assert_eq!(file.size().expect("size"), 5);
    }

    #[test]
    fn a_path_out_of_the_root_is_refused() {
        let (dir, src) = tree();
        let inner = LocalSource::new(&dir.path().join("set"));
        for path in ["../outside", "a/../../outside", "/etc/passwd"] {
            let err = inner.read_whole(Path::new(path), 100).expect_err(path);
            assert!(matches!(err, SourceError::Escapes { .. }), "{path}: {err}");
            assert!(inner.open(Path::new(path)).is_err(), "{path}");
            assert!(inner.stat(Path::new(path)).is_err(), "{path}");
        }
        assert!(matches!(src.open(Path::new("set")), Err(SourceError::NotAFile { .. })));
    }

    #[test]
    fn read_whole_is_bounded_before_it_allocates() {
        let (_dir, src) = tree();
        assert_eq!(src.read_whole(Path::new("set/a.data"), 5).expect("fits"), b"hello");
        let err = src.read_whole(Path::new("set/a.data"), 4).expect_err("too large");
        assert!(matches!(err, SourceError::TooLarge { max: 4, .. }), "{err}");
        assert!(err.to_string().contains("set/a.data"), "{err}");
    }

    #[test]
    fn a_sparse_file_has_data_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = File::create(dir.path().join("raw")).expect("create");
        f.set_len(4 << 20).expect("size");
        f.write_all_at(&[1u8; 4096], 1 << 20).expect("write");
        drop(f);
        let file = LocalSource::new(dir.path()).open(Path::new("raw")).expect("open");
        let runs = file.data_runs(4 << 20).expect("runs");
        // tmpfs and ext4 report the written block alone; a filesystem without holes, all.
        assert!(runs.iter().any(|r| r.contains(&(1 << 20))), "{runs:?}");
        assert!(runs.iter().all(|r| r.end <= 4 << 20), "{runs:?}");
    }
}
