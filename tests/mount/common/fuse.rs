//! Running the real `vmback mount` under a watchdog, and reading the mount table: the
//! pieces the mount and write tests' guards share. Each guard keeps its own timeouts,
//! flags and way of unmounting.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(cmd)).find(|p| p.is_file())
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `out` of `cmd args`, which must have succeeded (else the test fails showing both
/// streams); returns its stdout.
pub fn stdout_of_success(cmd: &str, args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A number not handed out before in this test process (for unique file names).
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The mount (fs type and source) at exactly `mnt`, from /proc/self/mountinfo.
pub fn mount_entry(mnt: &Path) -> Option<(String, String)> {
    let mnt = std::fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_owned());
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Later lines are mounted over earlier ones; the last match is what is visible.
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        let point = unescape(fields.get(4)?);
        if Path::new(&point) != mnt {
            return None;
        }
        Some((fields.get(sep + 1)?.to_string(), unescape(fields.get(sep + 2)?)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(v) = s.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a FUSE filesystem is mounted at `mnt`.
pub fn is_fuse_mounted(mnt: &Path) -> bool {
    mount_entry(mnt).is_some_and(|(fstype, _)| fstype == "fuse" || fstype.starts_with("fuse."))
}

/// `umount DIR`, then `umount -l DIR` if that left it mounted; quiet, errors ignored.
pub fn umount_quietly(dir: &Path) {
    if mount_entry(dir).is_some() {
        let _ = Command::new("umount").arg(dir).stderr(Stdio::null()).status();
    }
    if mount_entry(dir).is_some() {
        let _ = Command::new("umount").arg("-l").arg(dir).stderr(Stdio::null()).status();
    }
}

/// Clears whatever is mounted at `mnt` (a vmback mount, live or dead, or a loop mount
/// over it): `fusermount3 -uz`, then `umount -l`, a few times for stacked mounts.
pub fn force_unmount(mnt: &Path) {
    // Two mounts at most are stacked at one point in these tests; twice that is plenty.
    for _ in 0..4 {
        if mount_entry(mnt).is_none() {
            return;
        }
        let quiet = |cmd: &str, args: &[&OsStr]| {
            let _ = Command::new(cmd).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        if is_fuse_mounted(mnt) {
            quiet("fusermount3", &["-uz".as_ref(), mnt.as_os_str()]);
        }
        if mount_entry(mnt).is_some() {
            quiet("umount", &["-l".as_ref(), mnt.as_os_str()]);
        }
    }
}

/// Unmounts a folder (e.g. a tmpfs a test made) on drop.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        umount_quietly(&self.0);
    }
}

/// A tmpfs of `size` (a `mount -o size=` value) mounted on `dir` (created): a small
/// scratch disk for overlays, unmounted when the guard drops.
pub fn small_tmpfs(dir: &Path, size: &str) -> Unmount {
    std::fs::create_dir_all(dir).expect("tmpfs mountpoint");
    let opts = format!("size={size}");
    super::run::run_ok("mount", &["-t", "tmpfs", "-o", &opts, "vmback-test", path_str(dir)]);
    Unmount(dir.to_owned())
}

/// Sends `sig` to the child when the test process dies without running its guards.
pub fn die_with_parent(cmd: &mut Command, sig: Signal) {
    let sig = sig as i32;
    // SAFETY: the closure runs in the child between fork and exec and makes one
    // async-signal-safe syscall (prctl), touching no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// A spawned `vmback mount`, watched: past its watchdog time it gets SIGKILL, so a request
/// stuck in a hung mount fails (ENOTCONN) instead of hanging the test run.
pub struct Watched {
    pub child: Option<Child>,
    watchdog: Option<mpsc::Sender<()>>,
}

impl Watched {
    /// Spawns `vmback mount EXTRA SOURCE MNT` with its output going to `log`; it gets
    /// SIGTERM (and unmounts itself) if the test process dies without running its guards.
    pub fn spawn(source: &Path, mnt: &Path, extra: &[OsString], log: &Path, watchdog: Duration) -> Watched {
        let log_file = File::create(log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmback"));
        die_with_parent(&mut cmd, Signal::SIGTERM);
        let child = cmd
            .arg("mount")
            .args(extra)
            .arg(source)
            .arg(mnt)
            .env("VMBACK_LOG", "info,fuser=warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("spawning vmback");
        let pid = Pid::from_raw(child.id() as i32);
        let (tx, rx) = mpsc::channel::<()>();
        thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(watchdog) {
                eprintln!("watchdog: vmback {pid} still running after {watchdog:?}; killing it");
                let _ = kill(pid, Signal::SIGKILL);
            }
        });
        Watched { child: Some(child), watchdog: Some(tx) }
    }

    /// Waits up to `limit` for a FUSE mount at `mnt`. `Err(Some(status))` when vmback
    /// exited first, `Err(None)` when it is still running but not mounted.
    pub fn wait_mounted(&mut self, mnt: &Path, limit: Duration) -> Result<(), Option<ExitStatus>> {
        let child = self.child.as_mut().expect("child");
        let mut exited = None;
        let up = wait_until(limit, || {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some(st);
                return true;
            }
            is_fuse_mounted(mnt)
        });
        match (up, exited) {
            (true, None) => Ok(()),
            (_, Some(st)) => Err(Some(st)),
            (false, None) => Err(None),
        }
    }
}

impl Watched {
    /// Stops the watchdog and reaps vmback if it is still there: SIGTERM, up to 5 s for
    /// it to exit, then SIGKILL. The guards call it before they unmount.
    pub fn reap(&mut self) {
        self.watchdog.take();
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let mut gone = matches!(child.try_wait(), Ok(Some(_)));
            if !gone {
                let _ = kill(pid, Signal::SIGTERM);
                gone = wait_until(Duration::from_secs(5), || matches!(child.try_wait(), Ok(Some(_))));
            }
            if !gone {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.reap();
    }
}
