//! Running the real `vmback mount` and the real commands against it, with guards that
//! always unmount and reap, so a failing test never leaves a mount or a process behind.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::fuse::{Watched, stdout_of_success, umount_quietly, unique};
pub use crate::common::fuse::{is_fuse_mounted, mount_entry, path_str, wait_until, which};

/// How long a mount may take to show up, and a stopped vmback to exit.
pub const MOUNT_WAIT: Duration = Duration::from_secs(10);

/// The longest one test may keep a vmback running. Past it the watchdog kills vmback, so
/// a request stuck in a hung mount fails (ENOTCONN) instead of hanging the test run.
const WATCHDOG: Duration = Duration::from_secs(100);

/// Whether FUSE mounts can be tested here; prints why not.
pub fn fuse_ready() -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: /dev/fuse is missing");
        return false;
    }
    if which("fusermount3").is_none() {
        eprintln!("skipping: fusermount3 is not installed");
        return false;
    }
    true
}

/// Whether the test runs as root (loop mounts, other users); prints why not.
pub fn root_ready(what: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: {what} needs root");
        return false;
    }
    true
}

/// Returns from the test when FUSE is not available.
#[macro_export]
macro_rules! require_fuse {
    () => {
        if !support::fuse_ready() {
            return;
        }
    };
}

/// A temp dir readable by every user (tempfile makes them 0700), for tests where another
/// user has to reach the mountpoint.
pub fn tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("vmback-mount-test.").tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// Runs `cmd args` under `timeout` (so a hung mount cannot hang the test) and returns its
/// output.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    run_full(60, None, cmd, args)
}

/// Like [`run`], killed after `secs` seconds (exit status 124 then).
pub fn run_timeout(secs: u32, cmd: &str, args: &[&str]) -> Output {
    run_full(secs, None, cmd, args)
}

/// Like [`run`], as uid/gid `user` (via setpriv).
pub fn run_as(user: u32, cmd: &str, args: &[&str]) -> Output {
    run_full(60, Some(user), cmd, args)
}

fn run_full(secs: u32, user: Option<u32>, cmd: &str, args: &[&str]) -> Output {
    let mut c = Command::new("timeout");
    c.arg("--kill-after=5").arg(secs.to_string());
    if let Some(id) = user {
        c.arg("setpriv")
            .arg(format!("--reuid={id}"))
            .arg(format!("--regid={id}"))
            .arg("--clear-groups")
            .arg("--");
    }
    // C locale: stable sort order in `ls` and stable error texts to match.
    c.arg(cmd).args(args).env("LC_ALL", "C").stdin(Stdio::null());
    c.output().unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

/// Like [`run`], and fails the test unless the command succeeds; returns its stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    stdout_of_success(cmd, args, run(cmd, args))
}

/// A running `vmback mount SOURCE MNT`. Dropping it unmounts and reaps, whatever state the
/// test left it in: SIGTERM, then SIGKILL, then `fusermount3 -u`, then `umount -l`.
pub struct VmbackMount {
    vmback: Watched,
    pub mnt: PathBuf,
    log: PathBuf,
}

impl VmbackMount {
    /// Mounts `source` on `mnt` (created if missing) and waits until the mount is there;
    /// fails the test with vmback's log if it does not come up.
    pub fn start(source: &Path, mnt: &Path, extra: &[&str]) -> VmbackMount {
        match Self::try_start(source, mnt, extra) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`VmbackMount::start`], returning vmback's exit and log when it does not mount.
    pub fn try_start(source: &Path, mnt: &Path, extra: &[&str]) -> Result<VmbackMount, String> {
        std::fs::create_dir_all(mnt).ok();
        let n = unique();
        let log = mnt.with_extension(format!("vmback-{n}.log"));
        // Written data goes next to the mountpoint, not to /var/tmp, so even a killed
        // vmback leaves nothing outside the test's temp dir.
        let overlay = mnt.with_extension(format!("overlay-{n}"));
        let own_place = ["--read-only", "--keep-overlay", "--overlay-dir"];
        let mut extra: Vec<std::ffi::OsString> = extra.iter().map(Into::into).collect();
        if !extra.iter().any(|a| own_place.iter().any(|o| a == o)) {
            std::fs::create_dir_all(&overlay).expect("overlay dir");
            extra.push("--overlay-dir".into());
            extra.push(overlay.into());
        }
        let vmback = Watched::spawn(source, mnt, &extra, &log, WATCHDOG);
        let mut m = VmbackMount { vmback, mnt: mnt.to_owned(), log };
        match m.vmback.wait_mounted(mnt, MOUNT_WAIT) {
            Ok(()) => Ok(m),
            Err(Some(st)) => Err(format!("vmback mount exited with {st}:\n{}", m.log())),
            Err(None) => Err(format!("vmback did not mount within {MOUNT_WAIT:?}:\n{}", m.log())),
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.vmback.child.as_ref().expect("vmback was reaped").id() as i32)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signalling vmback");
    }

    /// vmback's stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Whether vmback is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.vmback.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits (bounded) for vmback to exit and reaps it; `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.vmback.child.as_mut()?;
        let mut status = None;
        wait_until(limit, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_some() {
            self.vmback.child = None;
        }
        status
    }

    /// Sends `sig` and waits for a clean exit; fails the test unless vmback exits 0 and
    /// the mount is gone.
    pub fn stop_with(&mut self, sig: Signal) {
        self.signal(sig);
        let status = self.wait_exit(MOUNT_WAIT);
        assert!(status.is_some(), "vmback did not exit within {MOUNT_WAIT:?} after {sig}:\n{}", self.log());
        let status = status.expect("checked");
        assert!(status.success(), "vmback exited with {status} after {sig}:\n{}", self.log());
        assert!(!is_fuse_mounted(&self.mnt), "{} still mounted after vmback exited", self.mnt.display());
    }
}

impl Drop for VmbackMount {
    fn drop(&mut self) {
        self.vmback.reap();
        force_unmount(&self.mnt);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Clears whatever is mounted at `mnt`: `fusermount3 -u`, then `umount -l`.
pub fn force_unmount(mnt: &Path) {
    for _ in 0..4 {
        if mount_entry(mnt).is_none() {
            return;
        }
        let p = path_str(mnt);
        let quiet = |cmd: &str, args: &[&str]| {
            let _ = Command::new(cmd).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        if is_fuse_mounted(mnt) {
            quiet("fusermount3", &["-u", "-q", p]);
        }
        if mount_entry(mnt).is_some() {
            quiet("umount", &["-l", p]);
        }
    }
}

/// A loop mount (`mount -o loop,...`) that is always unmounted on drop. Declare it after
/// the [`VmbackMount`] it reads from, so it is dropped first.
pub struct LoopMount {
    pub dir: PathBuf,
}

impl LoopMount {
    pub fn mount(image: &Path, dir: &Path, opts: &str) -> LoopMount {
        std::fs::create_dir_all(dir).expect("loop mountpoint");
        let out = run("mount", &["-o", opts, path_str(image), path_str(dir)]);
        assert!(
            out.status.success(),
            "mount -o {opts} {} {} failed: {}",
            image.display(),
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        LoopMount { dir: dir.to_owned() }
    }

    /// Unmounts now, failing the test if that does not work.
    pub fn unmount(self) {
        run_ok("umount", &[path_str(&self.dir)]);
        // Drop finds nothing left to do.
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        umount_quietly(&self.dir);
    }
}
