//! Zip archives read where they are: [`ZipSource`] is a local folder in which every
//! `*.zip` file shows as its members, in the zip's own folder, in place of the zip. A
//! virtnbdbackup `-o -` archive (`vm.cpt`, `checkpoints/`, the data files by their base
//! names, `vmconfig.*.xml`) is so a backup set in that folder, and the archives of one
//! chain side by side (the full and each inc, one `-o -` run each) are one set.
//!
//! Nothing is unpacked or copied: the central directory is read with the `zip` crate, each
//! member's data offset is taken from its local header, and a member's reads are `pread`s
//! of the archive at that offset ([`MemberReader`]). Only stored members can be read that
//! way; a compressed or encrypted one is left out and named in the walk's messages (the
//! catalog logs them, `vmback ls` shows them), as is a member the checks below refuse.
//!
//! Invariants:
//! - a member's name is checked before it names anything: `..`, a root, NUL or a
//!   backslash refuses it, so no member lands outside the zip's folder;
//! - a member's data range is checked against the archive's size before it is used;
//! - a name found twice (in two archives, or in an archive and as a plain file) is shown
//!   once: a plain file wins; between archives the newest (mtime) wins, which for the
//!   files every archive of a chain repeats (`vm.cpt`, `checkpoints/`) is the longest
//!   chain; a data file shadowed so is named in the messages;
//! - a directory is parsed again only when the archive's stamp changes, and an archive
//!   opened after a change is parsed again from the opened file, so a member never reads
//!   at the offsets of another version of its archive.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use thiserror::Error;

use super::{Entry, Kind, LocalSource, ReadAt, Source, SourceError, Stamp, Tree, check_relative};

/// Most members read from one archive. virtnbdbackup writes a few per disk and
/// checkpoint, so a long chain of many disks stays far below; the bound stops a hostile
/// directory from sizing the catalog.
const MAX_MEMBERS: usize = 65_536;

/// Deepest member name read: virtnbdbackup's go one folder deep (`checkpoints/`).
const MAX_NAME_DEPTH: usize = 16;

/// Read-ahead of the directory reader: the zip crate reads the end records and each
/// central header in small pieces; 64 KiB makes that a few `pread`s.
const DIR_BUFFER: usize = 64 << 10;

/// Why an archive's directory could not be read.
#[derive(Debug, Error)]
pub enum ZipDirError {
    #[error(
        "{path}: not a zip archive vmback can read (one still being written has no central directory yet)"
    )]
    Archive {
        path: PathBuf,
        #[source]
        source: ::zip::result::ZipError,
    },
}

/// One member that can be read in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The checked name, relative to the zip's folder.
    pub name: PathBuf,
    pub dir: bool,
    /// Where the member's bytes start in the archive (after its local header).
    pub start: u64,
    pub len: u64,
    /// The member's own time (zip's local-time stamp), if it has a valid one.
    pub mtime: Option<SystemTime>,
}

/// An archive's directory: the members that can be read in place, in directory order,
/// and a message naming each one left out and why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    pub members: Vec<Member>,
    pub skipped: Vec<String>,
}

/// `Read + Seek` over a [`ReadAt`], for the zip crate.
struct Positioned<'a> {
    file: &'a dyn ReadAt,
    pos: u64,
    len: u64,
}

impl Read for Positioned<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Positioned<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let to = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = to.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        Ok(self.pos)
    }
}

/// The checked relative path of member `name`, and whether it is a folder; `None` for a
/// name that could reach outside the zip's folder (see the module note).
pub fn member_path(name: &str) -> Option<(PathBuf, bool)> {
    if name.starts_with('/') || name.contains(['\0', '\\']) {
        return None;
    }
    let mut path = PathBuf::new();
    for part in name.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return None;
        }
        path.push(part);
    }
    let depth = path.components().count();
    (depth > 0 && depth <= MAX_NAME_DEPTH).then(|| (path, name.ends_with('/')))
}

/// The member's zip time as a local time.
fn zip_time(t: ::zip::DateTime) -> Option<SystemTime> {
    use chrono::{NaiveDate, TimeZone};
    let day = NaiveDate::from_ymd_opt(t.year().into(), t.month().into(), t.day().into())?;
    let at = day.and_hms_opt(t.hour().into(), t.minute().into(), t.second().into())?;
    Some(chrono::Local.from_local_datetime(&at).earliest()?.into())
}

/// Reads the directory of the archive `file` (named `shown` in messages).
pub fn read_directory(file: &dyn ReadAt, shown: &Path) -> Result<Directory, ZipDirError> {
    let err = |source| ZipDirError::Archive { path: shown.to_owned(), source };
    let len = file.size().map_err(|e| err(e.into()))?;
    let reader = BufReader::with_capacity(DIR_BUFFER, Positioned { file, pos: 0, len });
    let mut archive = ::zip::ZipArchive::new(reader).map_err(err)?;
    let mut dir = Directory::default();
    let count = archive.len();
    if count > MAX_MEMBERS {
        dir.skipped
            .push(format!("{}: {count} members; only the first {MAX_MEMBERS} are read", shown.display()));
    }
    for i in 0..count.min(MAX_MEMBERS) {
        let m = match archive.by_index_raw(i) {
            Ok(m) => m,
            Err(e) => {
                dir.skipped.push(format!("{}: member {i}: {e}", shown.display()));
                continue;
            }
        };
        let name = m.name().to_owned();
        let skip = |why: String| format!("{}:{name}: {why}; skipped", shown.display());
        let Some((path, is_dir)) = member_path(&name) else {
            dir.skipped.push(skip("a name that leaves the archive's folder".into()));
            continue;
        };
        let start = m.data_start().unwrap_or(u64::MAX);
        let (packed, size) = (m.compressed_size(), m.size());
        if m.encrypted() {
            dir.skipped.push(skip("encrypted".into()));
        } else if m.compression() != ::zip::CompressionMethod::Stored || packed != size {
            dir.skipped.push(skip(format!(
                "stored {:?}; vmback reads stored (uncompressed) members in place, as virtnbdbackup \
                 -o - writes them: unzip the archive to read it",
                m.compression()
            )));
        } else if start.checked_add(size).is_none_or(|end| end > len) {
            dir.skipped.push(skip(format!(
                "its {size} bytes at byte {start} reach past the end of the archive ({len} bytes)"
            )));
        } else {
            let mtime = m.last_modified().and_then(zip_time);
            dir.members.push(Member { name: path, dir: is_dir || m.is_dir(), start, len: size, mtime });
        }
    }
    Ok(dir)
}

/// A member opened for reading: positional reads of its archive, bounded to its bytes.
#[derive(Debug)]
pub struct MemberReader {
    archive: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

impl ReadAt for MemberReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = buf.len().min(usize::try_from(self.len - offset).unwrap_or(usize::MAX));
        self.archive.read_at(&mut buf[..n], self.start + offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn modified(&self) -> Option<SystemTime> {
        self.mtime.or_else(|| self.archive.modified())
    }
}

/// Where a shown member comes from.
#[derive(Debug, Clone)]
struct Shown {
    /// The archive's path in the local source.
    zip: PathBuf,
    stamp: Stamp,
    member: Member,
}

#[derive(Debug, Default)]
struct State {
    /// Parsed directories by archive path, with the stamp they were parsed at.
    dirs: HashMap<PathBuf, (Stamp, Arc<Result<Directory, String>>)>,
    /// The members shown by the last walk, by their path in this source.
    shown: HashMap<PathBuf, Shown>,
}

/// See the module note.
#[derive(Debug)]
pub struct ZipSource {
    local: LocalSource,
    /// When SOURCE is one zip file: its name in `local` (its folder). Only its members
    /// are shown, at the root, and nothing else of that folder.
    only: Option<PathBuf>,
    state: Mutex<State>,
}

/// An error with its causes, `: `-separated (this module sits below the crate's own helper).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn is_zip(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("zip"))
}

impl ZipSource {
    /// The folder `root` with its archives shown as their members, or, when `root` is a
    /// zip file, that archive alone.
    pub fn new(root: &Path) -> ZipSource {
        let file = std::fs::symlink_metadata(root).is_ok_and(|m| m.is_file());
        let (local, only) = match (root.parent(), root.file_name()) {
            (Some(parent), Some(name)) if file => {
                let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
                (LocalSource::new(parent), Some(PathBuf::from(name)))
            }
            _ => (LocalSource::new(root), None),
        };
        ZipSource { local, only, state: Mutex::new(State::default()) }
    }

    /// The directory of archive `zip` at `stamp`, parsed unless known at that stamp.
    fn directory(&self, zip: &Path, stamp: Stamp) -> Arc<Result<Directory, String>> {
        if let Some((s, d)) = self.state.lock().dirs.get(zip)
            && *s == stamp
        {
            return d.clone();
        }
        let shown = self.local.display(zip);
        let parsed = match self.local.open(zip) {
            Ok(file) => read_directory(&*file, &shown).map_err(|e| chain(&e)),
            Err(e) => Err(chain(&e)),
        };
        let parsed = Arc::new(parsed);
        self.state.lock().dirs.insert(zip.to_owned(), (stamp, parsed.clone()));
        parsed
    }

    /// The archives' members as entries beside the plain `entries`, by the rules of the
    /// module note; messages go to `unreadable`.
    fn add_members(
        &self,
        mut entries: Vec<Entry>,
        unreadable: &mut Vec<String>,
        max_depth: usize,
    ) -> Vec<Entry> {
        let (mut zips, plain): (Vec<Entry>, Vec<Entry>) =
            entries.drain(..).partition(|e| e.kind == Kind::File && (self.only.is_some() || is_zip(&e.path)));
        let mut out: HashMap<PathBuf, Entry> = plain.into_iter().map(|e| (e.path.clone(), e)).collect();
        let mut shown: HashMap<PathBuf, Shown> = HashMap::new();
        zips.sort_by(|a, b| (a.mtime, &a.path).cmp(&(b.mtime, &b.path)));
        for zip in &zips {
            let dir = self.directory(&zip.path, zip.stamp);
            let dir = match &*dir {
                Ok(d) => d,
                Err(e) => {
                    unreadable.push(e.clone());
                    continue;
                }
            };
            unreadable.extend(dir.skipped.iter().cloned());
            let base =
                if self.only.is_some() { Path::new("") } else { zip.path.parent().unwrap_or(Path::new("")) };
            for m in &dir.members {
                let path = base.join(&m.name);
                if path.components().count() > max_depth {
                    continue;
                }
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                let data = name.ends_with(".data");
                if let Some(old) = shown.get(&path) {
                    if data {
                        unreadable.push(format!(
                            "{}:{}: shadowed by the same name in {}",
                            self.local.display(&old.zip).display(),
                            old.member.name.display(),
                            self.local.display(&zip.path).display()
                        ));
                    }
                } else if out.contains_key(&path) {
                    if data {
                        unreadable.push(format!(
                            "{}:{}: a file of that name is beside the archive; skipped",
                            self.local.display(&zip.path).display(),
                            m.name.display()
                        ));
                    }
                    continue;
                }
                let kind = if m.dir { Kind::Dir } else { Kind::File };
                let size = if m.dir { 0 } else { m.len };
                let mtime = m.mtime.unwrap_or(zip.mtime);
                out.insert(path.clone(), Entry { path: path.clone(), kind, size, mtime, stamp: zip.stamp });
                shown.insert(path, Shown { zip: zip.path.clone(), stamp: zip.stamp, member: m.clone() });
            }
        }
        // Folders only implied by member names (`checkpoints/x.xml` without its entry).
        let implied: Vec<(PathBuf, Entry)> = shown
            .iter()
            .flat_map(|(p, s)| {
                p.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()).map(move |a| {
                    let e = Entry {
                        path: a.to_owned(),
                        kind: Kind::Dir,
                        size: 0,
                        mtime: SystemTime::UNIX_EPOCH,
                        stamp: s.stamp,
                    };
                    (a.to_owned(), e)
                })
            })
            .collect();
        for (p, e) in implied {
            out.entry(p).or_insert(e);
        }
        self.state.lock().shown = shown;
        let mut entries: Vec<Entry> = out.into_values().collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        entries
    }

    /// The member shown at `path` by the last walk.
    fn shown(&self, path: &Path) -> Option<Shown> {
        self.state.lock().shown.get(path).cloned()
    }

    fn not_found(&self, path: &Path) -> SourceError {
        SourceError::Io { path: self.display(path), source: io::ErrorKind::NotFound.into() }
    }

    /// Opens the member at `path`, reading its archive's directory again if the archive
    /// changed since the walk.
    fn open_member(&self, path: &Path, s: &Shown) -> Result<MemberReader, SourceError> {
        if s.member.dir {
            return Err(SourceError::NotAFile { path: self.display(path) });
        }
        let archive = self.local.open(&s.zip)?;
        let now = self.local.stat(&s.zip)?.stamp;
        let member = if now == s.stamp {
            s.member.clone()
        } else {
            let shown = self.local.display(&s.zip);
            let dir = read_directory(&*archive, &shown)
                .map_err(|e| SourceError::Io { path: shown, source: io::Error::other(e) })?;
            dir.members.into_iter().find(|m| m.name == s.member.name).ok_or_else(|| self.not_found(path))?
        };
        Ok(MemberReader { archive, start: member.start, len: member.len, mtime: member.mtime })
    }
}

impl Source for ZipSource {
    fn display(&self, path: &Path) -> PathBuf {
        if let Some(s) = self.shown(path) {
            return PathBuf::from(format!(
                "{}:{}",
                self.local.display(&s.zip).display(),
                s.member.name.display()
            ));
        }
        match &self.only {
            Some(zip) if path.as_os_str().is_empty() => self.local.display(zip),
            Some(zip) => PathBuf::from(format!("{}:{}", self.local.display(zip).display(), path.display())),
            None => self.local.display(path),
        }
    }

    fn list(&self, max_depth: usize) -> Result<Tree, SourceError> {
        let mut tree = match &self.only {
            Some(zip) => {
                let entry = self.local.stat(zip)?;
                if entry.kind != Kind::File {
                    return Err(SourceError::NotAFile { path: self.local.display(zip) });
                }
                let volume = match entry.stamp {
                    Stamp::Local { dev, .. } => Some(dev),
                    Stamp::Generation(_) => None,
                };
                Tree { entries: vec![entry], unreadable: Vec::new(), volume }
            }
            None => self.local.list(max_depth)?,
        };
        let entries = std::mem::take(&mut tree.entries);
        tree.entries = self.add_members(entries, &mut tree.unreadable, max_depth);
        Ok(tree)
    }

    fn stat(&self, path: &Path) -> Result<Entry, SourceError> {
        check_relative(self, path)?;
        if let Some(s) = self.shown(path) {
            let (kind, size) = if s.member.dir { (Kind::Dir, 0) } else { (Kind::File, s.member.len) };
            let mtime = s.member.mtime.unwrap_or(SystemTime::UNIX_EPOCH);
            return Ok(Entry { path: path.to_owned(), kind, size, mtime, stamp: s.stamp });
        }
        match &self.only {
            Some(_) => Err(self.not_found(path)),
            None => self.local.stat(path),
        }
    }

    fn open(&self, path: &Path) -> Result<Arc<dyn ReadAt>, SourceError> {
        check_relative(self, path)?;
        match (self.shown(path), &self.only) {
            (Some(s), _) => Ok(Arc::new(self.open_member(path, &s)?)),
            (None, Some(_)) => Err(self.not_found(path)),
            (None, None) => self.local.open(path),
        }
    }

    fn read_whole(&self, path: &Path, max: u64) -> Result<Vec<u8>, SourceError> {
        check_relative(self, path)?;
        let Some(s) = self.shown(path) else {
            return match &self.only {
                Some(_) => Err(self.not_found(path)),
                None => self.local.read_whole(path, max),
            };
        };
        let file = self.open_member(path, &s)?;
        if file.len > max {
            return Err(SourceError::TooLarge { path: self.display(path), max });
        }
        let mut bytes = vec![0u8; file.len as usize];
        let mut at = 0;
        while at < bytes.len() {
            match file.read_at(&mut bytes[at..], at as u64) {
                Ok(0) => {
                    let short =
                        io::Error::new(io::ErrorKind::UnexpectedEof, "the archive ends inside the member");
                    return Err(SourceError::Io { path: self.display(path), source: short });
                }
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(SourceError::Io { path: self.display(path), source }),
            }
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Write};

    use ::zip::write::SimpleFileOptions;
    use proptest::prelude::*;

    use super::*;
    use crate::source::MemSource;

    /// A stored zip of `files` (a name ending in `/` is a folder), as the zip crate writes
    /// one to a seekable file (sizes in the local headers, no data descriptors).
    fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = ::zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default().compression_method(::zip::CompressionMethod::Stored);
        for (name, bytes) in files {
            if let Some(dir) = name.strip_suffix('/') {
                w.add_directory(dir, opts).expect("dir");
            } else {
                w.start_file(*name, opts).expect("start");
                w.write_all(bytes).expect("write");
            }
        }
        w.finish().expect("finish").into_inner()
    }

    /// The directory of `bytes` read through a [`MemSource`] file.
    fn directory_of(bytes: &[u8]) -> Result<Directory, ZipDirError> {
        let mem = MemSource::new();
        mem.insert("a.zip", bytes.to_vec());
        read_directory(&*mem.open(Path::new("a.zip")).expect("open"), Path::new("a.zip"))
    }

    /// Offsets of every central header (`PK\1\2`) in `zip`.
    fn central_headers(zip: &[u8]) -> Vec<usize> {
        zip.windows(4).enumerate().filter(|(_, w)| *w == b"PK\x01\x02").map(|(i, _)| i).collect()
    }

    fn read_all(f: &dyn ReadAt) -> Vec<u8> {
        let mut buf = vec![0u8; f.size().expect("size") as usize + 10];
        let n = f.read_at(&mut buf, 0).expect("read");
        buf.truncate(n);
        buf
    }

    fn set_mtime(path: &Path, secs: u64) {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        std::fs::File::options().write(true).open(path).expect("open").set_modified(t).expect("mtime");
    }

    #[test]
    fn zips_side_by_side_show_their_members_in_their_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("vm")).expect("mkdir");
        let full = zip_of(&[
            ("sda.full.data", b"full bytes"),
            ("vm.cpt", br#"["virtnbdbackup.0"]"#),
            ("checkpoints/", b""),
            ("checkpoints/virtnbdbackup.0.xml", b"<c0/>"),
        ]);
        let inc = zip_of(&[
            ("sda.inc.virtnbdbackup.1.data", b"inc"),
            ("vm.cpt", br#"["virtnbdbackup.0", "virtnbdbackup.1"]"#),
            ("checkpoints/virtnbdbackup.1.xml", b"<c1/>"),
        ]);
        std::fs::write(dir.path().join("vm/b-full.zip"), &full).expect("write");
        std::fs::write(dir.path().join("vm/a-inc.zip"), &inc).expect("write");
        set_mtime(&dir.path().join("vm/b-full.zip"), 1_000);
        set_mtime(&dir.path().join("vm/a-inc.zip"), 2_000);
        std::fs::write(dir.path().join("vm/notes.txt"), b"plain").expect("write");
        let src = ZipSource::new(dir.path());
        let tree = src.list(16).expect("list");
        assert!(tree.unreadable.is_empty(), "{:?}", tree.unreadable);
        assert_eq!(
            crate::source::kinds(&tree),
            [
                ("vm", Kind::Dir),
                ("vm/checkpoints", Kind::Dir),
                ("vm/checkpoints/virtnbdbackup.0.xml", Kind::File),
                ("vm/checkpoints/virtnbdbackup.1.xml", Kind::File),
                ("vm/notes.txt", Kind::File),
                ("vm/sda.full.data", Kind::File),
                ("vm/sda.inc.virtnbdbackup.1.data", Kind::File),
                ("vm/vm.cpt", Kind::File),
            ]
        );
        let f = src.open(Path::new("vm/sda.full.data")).expect("open");
        assert_eq!(read_all(&*f), b"full bytes");
        let mut buf = [0u8; 4];
        assert_eq!(f.read_at(&mut buf, 5).expect("read"), 4);
        assert_eq!(&buf, b"byte");
        assert_eq!(f.read_at(&mut buf, 10).expect("read"), 0, "nothing past the member");
        // The newest archive's copy of a repeated file: the longest chain.
        let cpt = src.read_whole(Path::new("vm/vm.cpt"), 100).expect("cpt");
        assert_eq!(cpt, br#"["virtnbdbackup.0", "virtnbdbackup.1"]"#);
        assert!(matches!(src.read_whole(Path::new("vm/vm.cpt"), 5), Err(SourceError::TooLarge { .. })));
        let shown = src.display(Path::new("vm/sda.full.data"));
        assert!(shown.ends_with("vm/b-full.zip:sda.full.data"), "{}", shown.display());
        assert_eq!(src.stat(Path::new("vm/sda.full.data")).expect("stat").size, 10);
        assert_eq!(src.read_whole(Path::new("vm/notes.txt"), 100).expect("plain"), b"plain");
        assert!(matches!(src.open(Path::new("vm/../vm/vm.cpt")), Err(SourceError::Escapes { .. })));
    }

    #[test]
    fn one_zip_as_source_shows_only_its_members() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("full.zip"), zip_of(&[("sda.full.data", b"x")])).expect("write");
        std::fs::write(dir.path().join("secret.data"), b"not in the zip").expect("write");
        let src = ZipSource::new(&dir.path().join("full.zip"));
        let tree = src.list(16).expect("list");
        assert_eq!(crate::source::kinds(&tree), [("sda.full.data", Kind::File)]);
        assert!(src.open(Path::new("secret.data")).is_err(), "the zip's folder is not the source");
        assert!(src.read_whole(Path::new("secret.data"), 100).is_err());
        assert_eq!(src.display(Path::new("")), dir.path().join("full.zip"));
        assert_eq!(read_all(&*src.open(Path::new("sda.full.data")).expect("open")), b"x");
    }

    #[test]
    fn a_rewritten_zip_is_read_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("set.zip");
        std::fs::write(&path, zip_of(&[("a.data", b"first")])).expect("write");
        let src = ZipSource::new(dir.path());
        src.list(16).expect("list");
        // Rewritten after the walk: the open reads the new directory, not old offsets.
        std::fs::write(&path, zip_of(&[("pad", &[7u8; 100]), ("a.data", b"second!")])).expect("write");
        assert_eq!(read_all(&*src.open(Path::new("a.data")).expect("open")), b"second!");
        let tree = src.list(16).expect("list");
        assert_eq!(crate::source::kinds(&tree), [("a.data", Kind::File), ("pad", Kind::File)]);
    }

    #[test]
    fn hostile_members_are_named_and_never_escape() {
        let mut names = Vec::new();
        for n in ["../evil.data", "/abs.data", "a\\b.data", "x/../../y.data", "ok/./fine.data"] {
            names.push((n, &b"payload"[..]));
        }
        let dir = directory_of(&zip_of(&names)).expect("directory");
        let kept: Vec<_> = dir.members.iter().map(|m| m.name.to_str().expect("utf-8")).collect();
        assert_eq!(kept, ["ok/fine.data"]);
        assert_eq!(dir.skipped.len(), 4, "{:?}", dir.skipped);
        assert!(
            dir.skipped.iter().all(|s| s.contains("a.zip:") && s.contains("leaves")),
            "{:?}",
            dir.skipped
        );
        assert_eq!(member_path("checkpoints/"), Some((PathBuf::from("checkpoints"), true)));
        assert_eq!(member_path(".//vm.cpt"), Some((PathBuf::from("vm.cpt"), false)));
        assert_eq!(member_path(""), None);
        assert_eq!(member_path("a\0b"), None);
    }

    #[test]
    fn compressed_members_and_bad_ranges_are_refused_by_name() {
        let good = zip_of(&[("sda.full.data", b"0123456789"), ("b.data", b"abc")]);
        let cds = central_headers(&good);
        // Member 1 claims deflate (method 8) in both headers.
        let mut deflated = good.clone();
        deflated[cds[0] + 10] = 8;
        let local = deflated.windows(4).position(|w| w == b"PK\x03\x04").expect("local header");
        deflated[local + 8] = 8;
        let dir = directory_of(&deflated).expect("directory");
        assert_eq!(dir.members.len(), 1);
        assert!(
            dir.skipped[0].contains("a.zip:sda.full.data") && dir.skipped[0].contains("unzip"),
            "{:?}",
            dir.skipped
        );
        // Member 2's sizes reach far past the end of the archive.
        let mut long = good.clone();
        for field in [20, 24] {
            long[cds[1] + field..cds[1] + field + 4].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
        }
        let dir = directory_of(&long).expect("directory");
        assert_eq!(dir.members.len(), 1);
        assert!(
            dir.skipped[0].contains("a.zip:b.data") && dir.skipped[0].contains("past the end"),
            "{dir:?}"
        );
        // Cut before the end of central directory: no archive at all.
        let err = directory_of(&good[..good.len() - 10]).expect_err("truncated");
        assert!(err.to_string().contains("a.zip"), "{err}");
    }

    /// What virtnbdbackup writes to a pipe: Python's zipfile, stored, zip64 local headers
    /// with zero sizes, and data descriptors after each member.
    #[test]
    fn a_python_zip_streamed_to_a_pipe_reads_in_place() {
        let bytes = include_bytes!("../../fuzz/corpus/zip_directory/python-stream.zip");
        let dir = directory_of(bytes).expect("directory");
        assert!(dir.skipped.is_empty(), "{:?}", dir.skipped);
        let names: Vec<_> = dir.members.iter().map(|m| (m.name.to_str().expect("utf-8"), m.dir)).collect();
        assert_eq!(
            names,
            [
                ("sda.full.data", false),
                ("vm.cpt", false),
                ("checkpoints", true),
                ("checkpoints/virtnbdbackup.0.xml", false)
            ]
        );
        let data = &dir.members[0];
        assert_eq!(
            &bytes[data.start as usize..(data.start + data.len) as usize],
            &b"stream bytes".repeat(4)[..]
        );
    }

    proptest! {
        /// Any mutation of an archive: no panic, and every member kept lies in the file
        /// and has a checked name.
        #[test]
        fn a_mangled_directory_never_reaches_out(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = zip_of(&[("sda.full.data", &[1u8; 300]), ("checkpoints/", b""), ("vm.cpt", b"[]")]);
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            let keep = bytes.len() - cut.index(bytes.len() / 8 + 1);
            bytes.truncate(keep);
            if let Ok(dir) = directory_of(&bytes) {
                for m in &dir.members {
                    prop_assert!(m.start + m.len <= bytes.len() as u64, "{m:?}");
                    let name = m.name.to_str().unwrap_or("");
                    prop_assert!(member_path(name).is_some(), "{m:?}");
                }
            }
        }
    }
}
