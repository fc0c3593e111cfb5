//! The chain folder's own record and its naming: `<domain>.cpt` (the checkpoints of the
//! chain, oldest first, as upstream's `json.dumps` writes them), the checkpoint XML folder,
//! and the lock that keeps two runs out of one folder.
//!
//! Invariants: a [`Folder`] exists only while its run holds the folder's lock (`flock` on
//! [`LOCK_FILE`], which names the holder's PID), so every `*.partial` found then was left
//! by a run that is no longer running, and only those are removed. The lock file is
//! unlinked by its holder before the lock is released; a run that locked a file some
//! earlier holder has unlinked since tries again on the new one, so two runs never hold
//! two different lock files of one folder. `.cpt` is written atomically (temporary file
//! and rename).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;
use tracing::warn;

/// The prefix of every checkpoint vmback (and virtnbdbackup) creates.
pub const CPT_PREFIX: &str = "virtnbdbackup.";

/// The lock file in the chain folder (hidden, and no name the catalog reads).
pub const LOCK_FILE: &str = ".vmback.lock";

/// Why the folder could not be used.
#[derive(Debug, Error)]
pub enum FolderError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a checkpoint list (a JSON list of names)")]
    NotACheckpointList {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{folder}: another vmback backup is running into this folder ({}); wait for it to end",
        holder.map_or_else(|| "its PID is not known".to_owned(), |p| format!("PID {p}"))
    )]
    InUse { folder: PathBuf, holder: Option<u32> },
}

type Result<T, E = FolderError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FolderError + '_ {
    move |source| FolderError::Io { path: path.to_owned(), source }
}

/// The checkpoint number of `virtnbdbackup.N`.
pub fn cpt_number(name: &str) -> Option<u64> {
    name.strip_prefix(CPT_PREFIX)?.parse().ok()
}

/// The name of the checkpoint that follows a chain of `len` checkpoints (numbered from 0).
pub fn next_checkpoint(len: usize) -> String {
    format!("{CPT_PREFIX}{len}")
}

/// Parses a `.cpt` file's contents.
pub fn parse_cpt(bytes: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// A `.cpt` file's contents as upstream writes them: `json.dumps` of the list.
pub fn format_cpt(list: &[String]) -> String {
    let quoted: Vec<String> = list.iter().map(|c| serde_json::Value::from(c.as_str()).to_string()).collect();
    format!("[{}]", quoted.join(", "))
}

/// The first of `t`, `t + 1`, ... that no file name in `names` holds as `.<t>.`: a
/// diff's or offline inc's name is its unix time, and two runs within one second must
/// not share names.
pub fn unique_time<S: AsRef<str>>(t: u64, names: &[S]) -> u64 {
    let taken = |t: u64| {
        let tag = format!(".{t}.");
        names.iter().any(|n| n.as_ref().contains(&tag))
    };
    (t..).find(|&t| !taken(t)).expect("some later second is free")
}

/// The folder's lock, held for the whole run and released (its file unlinked) on drop.
#[derive(Debug)]
pub struct FolderLock {
    path: PathBuf,
    _lock: Flock<File>,
}

impl FolderLock {
    /// Takes the lock of `folder` at once, or says who holds it.
    pub fn take(folder: &Path) -> Result<FolderLock> {
        let path = folder.join(LOCK_FILE);
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io(&path))?;
            let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((mut file, Errno::EWOULDBLOCK)) => {
                    let mut text = String::new();
                    let holder = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse().ok());
                    return Err(FolderError::InUse { folder: folder.to_owned(), holder });
                }
                Err((_, e)) => return Err(io(&path)(e.into())),
            };
            // The holder before us may have unlinked this file between our open and our
            // lock: then the lock guards nothing, and the file now at `path` is the one.
            let ours = lock.metadata().map_err(io(&path))?;
            match std::fs::metadata(&path) {
                Ok(now) if (now.dev(), now.ino()) == (ours.dev(), ours.ino()) => {}
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&path)(e)),
            }
            lock.set_len(0).map_err(io(&path))?;
            write!(lock, "{}", std::process::id()).map_err(io(&path))?;
            return Ok(FolderLock { path, _lock: lock });
        }
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // Unlinked while still locked (see the module note); the lock goes with `_lock`.
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!("{}: {e}", self.path.display());
        }
    }
}

/// The chain folder, locked for this run.
pub struct Folder {
    pub out: PathBuf,
    pub cpt_file: PathBuf,
    pub cpt_dir: PathBuf,
    /// The chain's checkpoints, oldest first (empty: no chain yet).
    pub checkpoints: Vec<String>,
    /// `-o -`: the zip on standard output the data and side files go to (the folder,
    /// then the current one, keeps the checkpoint files).
    pub zip: Option<super::zipout::ZipOut>,
    _lock: FolderLock,
}

impl Folder {
    /// Creates the folder (and the checkpoint XML folder, `checkpoints/` unless
    /// `cpt_dir` names another), takes its lock and reads `<domain>.cpt`.
    pub fn open(out: &Path, domain: &str, cpt_dir: Option<&Path>) -> Result<Folder> {
        std::fs::create_dir_all(out).map_err(io(out))?;
        let lock = FolderLock::take(out)?;
        let cpt_file = out.join(format!("{}.cpt", crate::catalog::naming::safe_component(domain)));
        let checkpoints = match std::fs::read(&cpt_file) {
            Ok(b) => parse_cpt(&b)
                .map_err(|source| FolderError::NotACheckpointList { path: cpt_file.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&cpt_file)(e)),
        };
        let cpt_dir = cpt_dir.map_or_else(|| out.join("checkpoints"), Path::to_owned);
        std::fs::create_dir_all(&cpt_dir).map_err(io(&cpt_dir))?;
        Ok(Folder { out: out.to_owned(), cpt_file, cpt_dir, checkpoints, zip: None, _lock: lock })
    }

    /// The names of the files in the folder.
    pub fn names(&self) -> Result<Vec<String>> {
        let entries = std::fs::read_dir(&self.out).map_err(io(&self.out))?;
        Ok(entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
    }

    /// [`unique_time`] of now for this folder's files.
    pub fn unique_time(&self) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Ok(unique_time(now, &self.names()?).to_string())
    }

    pub fn has_data(&self) -> Result<bool> {
        Ok(self.names()?.iter().any(|n| n.ends_with(".data")))
    }

    /// Removes the `*.partial` files of runs that are no longer running (with the lock
    /// held, that is every one: see the module note), and logs each.
    pub fn clean_partials(&self) -> Result<()> {
        for name in self.names()?.iter().filter(|n| n.ends_with(".partial")) {
            let path = self.out.join(name);
            warn!("{}: removing what an earlier backup that did not finish left", path.display());
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok(())
    }

    /// The saved XML of checkpoint `name`.
    pub fn checkpoint_path(&self, name: &str) -> PathBuf {
        self.cpt_dir.join(format!("{name}.xml"))
    }

    pub fn read_checkpoint(&self, name: &str) -> Result<String> {
        let path = self.checkpoint_path(name);
        std::fs::read_to_string(&path).map_err(io(&path))
    }

    /// Saves checkpoint `name`'s XML and appends it to the chain in `.cpt`.
    pub fn add_checkpoint(&mut self, name: &str, xml: &str) -> Result<()> {
        let path = self.checkpoint_path(name);
        std::fs::write(&path, xml).map_err(io(&path))?;
        self.checkpoints.push(name.to_owned());
        let tmp = self.cpt_file.with_extension("cpt.tmp");
        std::fs::write(&tmp, format_cpt(&self.checkpoints)).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.cpt_file).map_err(io(&self.cpt_file))
    }

    /// Forgets the chain: the saved checkpoint XML and `.cpt` (a full starts anew).
    pub fn clear_checkpoints(&mut self) -> Result<()> {
        for e in std::fs::read_dir(&self.cpt_dir).map_err(io(&self.cpt_dir))?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".xml") {
                std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
            }
        }
        let _ = std::fs::remove_file(&self.cpt_file);
        self.checkpoints.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpt_files_read_and_write_as_upstream() {
        let list = vec!["virtnbdbackup.0".to_owned(), "virtnbdbackup.1".to_owned()];
        assert_eq!(format_cpt(&list), r#"["virtnbdbackup.0", "virtnbdbackup.1"]"#);
        assert_eq!(format_cpt(&[]), "[]");
        assert_eq!(parse_cpt(format_cpt(&list).as_bytes()).unwrap(), list);
        assert_eq!(parse_cpt(br#"["a\"b"]"#).unwrap(), ["a\"b"]);
        assert!(parse_cpt(b"{}").is_err());
        assert!(parse_cpt(b"").is_err());
    }

    #[test]
    fn checkpoints_are_numbered_in_order() {
        assert_eq!(cpt_number("virtnbdbackup.12"), Some(12));
        assert_eq!(cpt_number("virtnbdbackup.x"), None);
        assert_eq!(cpt_number("other.1"), None);
        assert_eq!(next_checkpoint(0), "virtnbdbackup.0");
        assert_eq!(next_checkpoint(3), "virtnbdbackup.3");
    }

    #[test]
    fn unique_times_skip_seconds_that_name_files() {
        let names = ["vda.diff.100.data", "vda.inc.virtnbdbackup.1.101.data", "vmconfig.100.xml"];
        assert_eq!(unique_time(99, &names), 99);
        assert_eq!(unique_time(100, &names), 102);
        assert_eq!(unique_time(102, &names), 102);
        assert_eq!(unique_time(5, &[] as &[&str]), 5);
    }

    #[test]
    fn a_folder_reads_its_chain_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("set");
        let mut f = Folder::open(&out, "vm/1", None).unwrap();
        assert!(f.checkpoints.is_empty());
        assert_eq!(f.cpt_file, out.join("vm_1.cpt"));
        f.add_checkpoint("virtnbdbackup.0", "<x/>").unwrap();
        f.add_checkpoint("virtnbdbackup.1", "<y/>").unwrap();
        drop(f);
        let mut f = Folder::open(&out, "vm/1", None).unwrap();
        assert_eq!(f.checkpoints, ["virtnbdbackup.0", "virtnbdbackup.1"]);
        assert_eq!(f.read_checkpoint("virtnbdbackup.1").unwrap(), "<y/>");
        f.clear_checkpoints().unwrap();
        assert!(f.checkpoints.is_empty() && !f.cpt_file.exists());
        assert!(std::fs::read_dir(out.join("checkpoints")).unwrap().next().is_none());
    }

    #[test]
    fn a_broken_cpt_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vm.cpt"), "[\"virtnbdbackup.0\"").unwrap();
        let err = Folder::open(dir.path(), "vm", None).err().unwrap();
        assert!(
            matches!(&err, FolderError::NotACheckpointList { path, .. } if path.ends_with("vm.cpt")),
            "{err}"
        );
    }

    /// A second run into a locked folder fails at once, names the holder and touches no
    /// `.partial`; once the holder is gone, the next run removes the leftovers.
    #[test]
    fn one_run_per_folder_and_only_dead_runs_partials_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = Folder::open(dir.path(), "vm", None).unwrap();
        let partial = dir.path().join("vda.full.data.partial");
        std::fs::write(&partial, "being written").unwrap();
        let err = Folder::open(dir.path(), "vm", None).err().unwrap();
        match &err {
            FolderError::InUse { folder, holder } => {
                assert_eq!(folder, dir.path());
                assert_eq!(*holder, Some(std::process::id()));
            }
            e => panic!("{e}"),
        }
        assert!(err.to_string().contains(&format!("PID {}", std::process::id())), "{err}");
        assert!(partial.exists());
        drop(first);
        assert!(!dir.path().join(LOCK_FILE).exists(), "the holder leaves no lock file");
        let second = Folder::open(dir.path(), "vm", None).unwrap();
        second.clean_partials().unwrap();
        assert!(!partial.exists());
    }

    /// A lock file left by a killed run (its PID inside, no lock held) is no obstacle.
    #[test]
    fn a_killed_runs_lock_file_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), "999999999").unwrap();
        let f = Folder::open(dir.path(), "vm", None).unwrap();
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(text, std::process::id().to_string());
        drop(f);
    }
}
