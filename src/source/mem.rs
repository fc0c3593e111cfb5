//! A [`Source`] held in memory: a map of relative path to bytes, for tests that need a
//! backup location without a disk (a whole catalog mounted with no file on disk).
//!
//! Folders are implied by the paths of their files. Every write gets the next
//! generation as its stamp, so a rewritten file is a changed file to the catalog. An
//! opened file keeps the bytes it was opened on, as an open local file keeps its inode.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;

use super::{Entry, Kind, ReadAt, Source, SourceError, Stamp, Tree, check_relative};

/// One file: its bytes, the generation that wrote it and when.
#[derive(Debug, Clone)]
struct MemFile {
    bytes: Arc<[u8]>,
    generation: u64,
    mtime: SystemTime,
}

#[derive(Debug, Default)]
struct Files {
    map: BTreeMap<PathBuf, MemFile>,
    generation: u64,
}

/// See the module note.
#[derive(Debug, Default)]
pub struct MemSource {
    files: Mutex<Files>,
}

impl MemSource {
    pub fn new() -> MemSource {
        MemSource::default()
    }

    /// Writes (or replaces) the file at `path`, creating its folders.
    pub fn insert(&self, path: impl Into<PathBuf>, bytes: impl Into<Arc<[u8]>>) {
        let mut files = self.files.lock();
        files.generation += 1;
        let file = MemFile { bytes: bytes.into(), generation: files.generation, mtime: SystemTime::now() };
        files.map.insert(path.into(), file);
    }

    /// Deletes the file at `path`; true if there was one.
    pub fn remove(&self, path: &Path) -> bool {
        self.files.lock().map.remove(path).is_some()
    }

    fn file(&self, path: &Path) -> Result<MemFile, SourceError> {
        check_relative(self, path)?;
        let files = self.files.lock();
        match files.map.get(path) {
            Some(f) => Ok(f.clone()),
            None if files.map.keys().any(|p| p.starts_with(path)) => {
                Err(SourceError::NotAFile { path: path.to_owned() })
            }
            None => Err(SourceError::Io { path: path.to_owned(), source: io::ErrorKind::NotFound.into() }),
        }
    }
}

fn file_entry(path: &Path, f: &MemFile) -> Entry {
    Entry {
        path: path.to_owned(),
        kind: Kind::File,
        size: f.bytes.len() as u64,
        mtime: f.mtime,
        stamp: Stamp::Generation(f.generation),
    }
}

fn dir_entry(path: &Path) -> Entry {
    let (mtime, stamp) = (SystemTime::UNIX_EPOCH, Stamp::Generation(0));
    Entry { path: path.to_owned(), kind: Kind::Dir, size: 0, mtime, stamp }
}

impl Source for MemSource {
    fn display(&self, path: &Path) -> PathBuf {
        path.to_owned()
    }

    fn list(&self, max_depth: usize) -> Result<Tree, SourceError> {
        let files = self.files.lock();
        let mut entries: Vec<Entry> = Vec::new();
        for (path, f) in &files.map {
            // The folders on the way that the previous file did not already list.
            let dirs: Vec<&Path> = path.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()).collect();
            for dir in dirs.into_iter().rev() {
                let listed = entries.iter().rev().any(|e| e.kind == Kind::Dir && e.path == dir);
                if !listed && dir.components().count() <= max_depth {
                    entries.push(dir_entry(dir));
                }
            }
            if path.components().count() <= max_depth {
                entries.push(file_entry(path, f));
            }
        }
        Ok(Tree { entries, unreadable: Vec::new(), volume: None })
    }

    fn stat(&self, path: &Path) -> Result<Entry, SourceError> {
        match self.file(path) {
            Ok(f) => Ok(file_entry(path, &f)),
            Err(SourceError::NotAFile { .. }) => Ok(dir_entry(path)),
            Err(e) => Err(e),
        }
    }

    fn open(&self, path: &Path) -> Result<Arc<dyn ReadAt>, SourceError> {
        let f = self.file(path)?;
        Ok(Arc::new(MemFileReader(f.bytes, f.mtime)))
    }

    fn read_whole(&self, path: &Path, max: u64) -> Result<Vec<u8>, SourceError> {
        let f = self.file(path)?;
        if f.bytes.len() as u64 > max {
            return Err(SourceError::TooLarge { path: path.to_owned(), max });
        }
        Ok(f.bytes.to_vec())
    }
}

/// An opened [`MemSource`] file.
#[derive(Debug)]
struct MemFileReader(Arc<[u8]>, SystemTime);

impl ReadAt for MemFileReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let from = usize::try_from(offset).unwrap_or(usize::MAX).min(self.0.len());
        let n = buf.len().min(self.0.len() - from);
        buf[..n].copy_from_slice(&self.0[from..from + n]);
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }

    fn modified(&self) -> Option<SystemTime> {
        Some(self.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mem_source_lists_folders_stamps_writes_and_bounds_reads() {
        let src = MemSource::new();
        src.insert("b/x.data", b"12345".to_vec());
        src.insert("a.cpt", b"[]".to_vec());
        src.insert("b/c/y.xml", b"<domain/>".to_vec());
        let tree = src.list(16).expect("list");
        assert_eq!(
            super::super::kinds(&tree),
            [
                ("a.cpt", Kind::File),
                ("b", Kind::Dir),
                ("b/c", Kind::Dir),
                ("b/c/y.xml", Kind::File),
                ("b/x.data", Kind::File)
            ]
        );
        let shallow = src.list(1).expect("list");
        assert_eq!(shallow.entries.len(), 2, "{shallow:?}");
        let file = src.open(Path::new("b/x.data")).expect("open");
        src.insert("b/x.data", b"changed!".to_vec());
        let mut buf = [0u8; 10];
        assert_eq!(file.read_at(&mut buf, 3).expect("read"), 2, "the opened version");
        assert_eq!(&buf[..2], b"45");
        assert_ne!(src.list(16).expect("list"), tree, "a rewrite is a change");
        assert_eq!(src.read_whole(Path::new("b/x.data"), 8).expect("read"), b"changed!");
        assert!(matches!(src.read_whole(Path::new("b/x.data"), 7), Err(SourceError::TooLarge { .. })));
        assert!(matches!(src.open(Path::new("b")), Err(SourceError::NotAFile { .. })));
        assert!(matches!(src.open(Path::new("b/../a.cpt")), Err(SourceError::Escapes { .. })));
        assert_eq!(src.stat(Path::new("b/c")).expect("dir").kind, Kind::Dir);
        assert!(src.remove(Path::new("a.cpt")));
        assert!(src.stat(Path::new("a.cpt")).is_err());
    }
}
