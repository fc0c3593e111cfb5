//! A `vmback mount` whose output is kept for the test to read (the fault and access tests
//! check the log lines a fault leaves), and the sha256 of every file under SOURCE, to show
//! that backup files stay untouched.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::fuse::{Watched, path_str, umount_quietly, unique, wait_until};

/// How long a mount may take to come up, and a stopped vmback to exit.
const MOUNT_WAIT: Duration = Duration::from_secs(20);

/// Past this, vmback is killed, so a request stuck in a hung mount fails (ENOTCONN)
/// instead of hanging the test run.
const WATCHDOG: Duration = Duration::from_secs(180);

/// A running `vmback mount`; dropping it stops vmback and clears the mount.
pub struct LoggedMount {
    vmback: Watched,
    pub mnt: PathBuf,
    log: PathBuf,
}

impl LoggedMount {
    /// Mounts `source` on `mnt` (created if missing) with `extra` flags; fails the test
    /// with vmback's output if the mount does not come up.
    pub fn start(source: &Path, mnt: &Path, extra: &[&str]) -> LoggedMount {
        std::fs::create_dir_all(mnt).expect("mountpoint");
        let log = mnt.with_extension(format!("log{}", unique()));
        let extra: Vec<OsString> = extra.iter().map(Into::into).collect();
        let vmback = Watched::spawn(source, mnt, &extra, &log, WATCHDOG);
        let mut m = LoggedMount { vmback, mnt: mnt.to_owned(), log };
        if let Err(st) = m.vmback.wait_mounted(mnt, MOUNT_WAIT) {
            panic!("vmback mount did not come up ({st:?}):\n{}", m.log());
        }
        m
    }

    /// vmback's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; vmback must exit cleanly within [`MOUNT_WAIT`], with no panic in its
    /// output. Returns the output.
    pub fn stop(&mut self) -> String {
        let mut child = self.vmback.child.take().expect("vmback running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("signalling vmback");
        let mut status = None;
        wait_until(MOUNT_WAIT, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        let log = self.log();
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmback did not exit after SIGTERM:\n{log}");
        };
        assert!(status.success(), "vmback exited with {status}:\n{log}");
        assert!(!log.contains("panicked"), "vmback panicked:\n{log}");
        log
    }
}

impl Drop for LoggedMount {
    fn drop(&mut self) {
        self.vmback.reap();
        if super::fuse::is_fuse_mounted(&self.mnt) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.mnt).stderr(Stdio::null()).status();
        }
        umount_quietly(&self.mnt);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// sha256 of every file under `dir` (symlinks not followed), by path relative to `dir`.
pub fn sha256_tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let files: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .map(|e| e.expect("walking SOURCE"))
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    let mut out = BTreeMap::new();
    for chunk in files.chunks(64) {
        let out_of = Command::new("sha256sum").args(chunk).output().expect("sha256sum");
        assert!(out_of.status.success(), "sha256sum: {}", String::from_utf8_lossy(&out_of.stderr));
        for line in String::from_utf8_lossy(&out_of.stdout).lines() {
            let (sum, path) = line.split_once("  ").expect("sha256sum line");
            let rel = Path::new(path).strip_prefix(dir).expect("under dir").to_owned();
            out.insert(rel, sum.to_owned());
        }
    }
    out
}

/// Fails the test unless `after` has the same files with the same sums as `before`, apart
/// from `touched` (paths relative to SOURCE the test itself changed, deleted or created).
#[track_caller]
pub fn assert_untouched(
    before: &BTreeMap<PathBuf, String>,
    after: &BTreeMap<PathBuf, String>,
    touched: &[&str],
) {
    let keep = |m: &BTreeMap<PathBuf, String>| -> BTreeMap<PathBuf, String> {
        m.iter()
            .filter(|(p, _)| !touched.iter().any(|t| Path::new(t) == *p))
            .map(|(p, s)| (p.clone(), s.clone()))
            .collect()
    };
    let (b, a) = (keep(before), keep(after));
    assert!(!b.is_empty(), "no files under SOURCE");
    for (p, sum) in &b {
        assert_eq!(a.get(p), Some(sum), "backup file {} changed or vanished", path_str(p));
    }
    let extra: Vec<&PathBuf> = a.keys().filter(|p| !b.contains_key(*p)).collect();
    assert!(extra.is_empty(), "files appeared under SOURCE: {extra:?}");
}
