//! The one mount fixture of the mount tests: a real `vmback mount` (spawned under a
//! watchdog, see [`Watched`]) owned by a guard that unmounts and reaps it whatever the
//! test did, and a loop mount of an image in it.
//!
//! Invariants: a [`Mounted`] is up and answering when `start` returns; dropping it leaves
//! no vmback process and nothing mounted at its mountpoint; its written data goes to an
//! overlay folder next to the mountpoint (unless the test names one), so even a killed
//! vmback leaves nothing outside the test's temp dir.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::statfs::statfs;
use nix::unistd::Pid;

use super::fuse::{
    Watched, force_unmount, is_fuse_mounted, mount_entry, path_str, umount_quietly, unique, wait_until,
};
use super::run::{run, run_ok};

/// How long a mount may take to come up, and a stopped vmback to exit: the longest any of
/// the tests' former guards allowed (10, 15 and 20 s), for a loaded 2-core CI machine.
pub const MOUNT_WAIT: Duration = Duration::from_secs(20);

/// The longest one test may keep a vmback running (the write tests' qemu and ext4 runs
/// take a minute or two). Past it the watchdog kills vmback, so a request stuck in a hung
/// mount fails (ENOTCONN) instead of hanging the test run.
const WATCHDOG: Duration = Duration::from_secs(180);

/// How often [`Mounted::stop_with`] looks whether vmback exited or refused.
const POLL: Duration = Duration::from_millis(100);

/// vmback's warning when an unmount met EBUSY and it found no process holding the mount.
const NOBODY_BUSY: &str = "works inside it ()";

/// Flags with which the test decides itself where written data goes.
const OWN_OVERLAY: [&str; 3] = ["--read-only", "--keep-overlay", "--overlay-dir"];

/// A running `vmback mount SOURCE MNT`; dropping it stops vmback and clears the mount.
pub struct Mounted {
    vmback: Watched,
    pub mnt: PathBuf,
    log: PathBuf,
}

impl Mounted {
    /// Mounts `source` on `mnt` (created if missing) with `extra` flags; fails the test
    /// with vmback's output if the mount does not come up.
    pub fn start(source: &Path, mnt: &Path, extra: &[&str]) -> Mounted {
        Self::try_start(source, mnt, extra)
            .unwrap_or_else(|(st, log)| panic!("vmback mount did not come up ({st:?}):\n{log}"))
    }

    /// Like [`Mounted::start`]; on failure returns vmback's exit status (`None` if it is
    /// still running, not mounted) and its output.
    pub fn try_start(
        source: &Path,
        mnt: &Path,
        extra: &[&str],
    ) -> Result<Mounted, (Option<ExitStatus>, String)> {
        // A dead mount there fails `stat`, and so create_dir_all: make only a missing one.
        if let Some(parent) = mnt.parent() {
            std::fs::create_dir_all(parent).expect("mountpoint's parent");
        }
        if let Err(e) = std::fs::create_dir(mnt) {
            assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "mountpoint {}: {e}", mnt.display());
        }
        let n = unique();
        let log = mnt.with_extension(format!("vmback-{n}.log"));
        let mut extra: Vec<OsString> = extra.iter().map(Into::into).collect();
        if !extra.iter().any(|a| OWN_OVERLAY.iter().any(|o| a == o)) {
            let overlay = mnt.with_extension(format!("overlay-{n}"));
            std::fs::create_dir_all(&overlay).expect("overlay dir");
            extra.push("--overlay-dir".into());
            extra.push(overlay.into());
        }
        let vmback = Watched::spawn(source, mnt, &extra, &log, WATCHDOG);
        let mut m = Mounted { vmback, mnt: mnt.to_owned(), log };
        match m.vmback.wait_mounted(mnt, MOUNT_WAIT) {
            Ok(()) => {}
            Err(Some(st)) => {
                m.vmback.child = None;
                return Err((Some(st), m.log()));
            }
            Err(None) => return Err((None, m.log())),
        }
        // A dead mount left there also counts as a FUSE mount: wait for one that answers.
        if !wait_until(MOUNT_WAIT, || statfs(mnt).is_ok() && is_fuse_mounted(mnt)) {
            return Err((None, m.log()));
        }
        Ok(m)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.vmback.child.as_ref().expect("vmback was reaped").id() as i32)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signalling vmback");
    }

    /// vmback's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

    /// [`Mounted::stop_with`] SIGTERM.
    pub fn stop(&mut self) -> Option<String> {
        self.stop_with(Signal::SIGTERM)
    }

    /// Sends `sig`; vmback must exit 0 within [`MOUNT_WAIT`] with no panic in its output
    /// and no mount left. Returns the output. Returns `None` (after a warning and SIGKILL)
    /// only when our mount is gone but a copy of it lives on in another process's mount
    /// namespace, which keeps the FUSE connection, and so vmback, alive: libvirt gives
    /// every qemu it starts a private copy of the mount table, so a domain started by
    /// anyone while this mount was up does that. The caller then skips checks that need
    /// vmback's own clean exit.
    pub fn stop_with(&mut self, sig: Signal) -> Option<String> {
        self.signal(sig);
        let deadline = Instant::now() + MOUNT_WAIT;
        let mut refusals = 0;
        let exited = loop {
            let status = self.wait_exit(POLL);
            if status.is_some() || Instant::now() >= deadline {
                break status;
            }
            // All tests of this binary share one process: a child that another test's
            // thread forks holds copies of this test's open files until it execs, so the
            // unmount can meet EBUSY from no holder vmback can name. Ask again then.
            let now = self.log().matches(NOBODY_BUSY).count();
            if now > refusals {
                refusals = now;
                self.signal(sig);
            }
        };
        let Some(status) = exited else {
            let child = self.vmback.child.as_mut().expect("vmback running");
            let diag = diagnose(child.id(), &self.mnt);
            if mount_entry(&self.mnt).is_none() && !foreign_copies(&self.mnt).is_empty() {
                eprintln!(
                    "warning: vmback unmounted {} but stays up for another mount namespace; \
                     killing it, post-unmount checks skipped:\n{diag}",
                    self.mnt.display()
                );
                let _ = child.kill();
                let _ = child.wait();
                self.vmback.child = None;
                return None;
            }
            panic!("vmback did not exit within {MOUNT_WAIT:?} after {sig}:\n{}\n{diag}", self.log());
        };
        let log = self.log();
        assert!(status.success(), "vmback exited with {status} after {sig}:\n{log}");
        assert!(!log.contains("panicked"), "vmback panicked:\n{log}");
        assert!(!is_fuse_mounted(&self.mnt), "{} still mounted after vmback exited", self.mnt.display());
        Some(log)
    }

    /// SIGKILL: no unmount, nothing saved at exit; the mount stays behind, dead.
    pub fn kill_hard(&mut self) {
        let mut child = self.vmback.child.take().expect("vmback running");
        child.kill().expect("SIGKILL vmback");
        child.wait().expect("reap vmback");
    }

    /// Peak resident memory of vmback so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = read_text(format!("/proc/{}/status", self.pid()));
        let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).expect("VmHWM");
        kib.trim().trim_end_matches("kB").trim().parse::<u64>().expect("VmHWM value") * 1024
    }

    /// The `.stats` file, as a map.
    pub fn stats(&self) -> BTreeMap<String, u64> {
        read_text(self.mnt.join(".stats"))
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_owned(), v.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.vmback.reap();
        force_unmount(&self.mnt);
        if std::thread::panicking() {
            eprintln!("vmback's log ({}):\n{}", self.log.display(), self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn read_text(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// What a stuck vmback is doing: its threads' kernel stacks, and whether it is mounted.
fn diagnose(pid: u32, mnt: &Path) -> String {
    let mut out = format!("mounted here: {:?}\n", mount_entry(mnt));
    // A copy of the mount in another mount namespace (e.g. one libvirt made for a qemu it
    // started meanwhile) keeps the FUSE connection alive after our unmount.
    for (pid, comm) in foreign_copies(mnt) {
        out.push_str(&format!("also mounted in the mount namespace of pid {pid} ({comm})\n"));
    }
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let p = t.path();
            let comm = read_text(p.join("comm"));
            let stat = read_text(p.join("stat"));
            let state = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().next().unwrap_or("?");
            let stack = read_text(p.join("stack"));
            out.push_str(&format!(
                "thread {} {} state {state}:\n{stack}\n",
                t.file_name().to_string_lossy(),
                comm.trim()
            ));
        }
    }
    out
}

/// Processes in another mount namespace that still see a mount at `mnt`.
fn foreign_copies(mnt: &Path) -> Vec<(String, String)> {
    let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
    let needle = format!(" {} ", mnt.display());
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if std::fs::read_link(p.path().join("ns/mnt")).ok() == ours {
            continue;
        }
        if read_text(p.path().join("mountinfo")).contains(&needle) {
            let comm = read_text(p.path().join("comm")).trim().to_owned();
            out.push((p.file_name().to_string_lossy().into_owned(), comm));
        }
    }
    out
}

/// `mount -o loop,...`; unmounted on drop. Declare it after the [`Mounted`] it reads
/// from, so it is dropped first.
pub struct LoopMount {
    pub dir: PathBuf,
    image: PathBuf,
}

impl LoopMount {
    pub fn mount(image: &Path, dir: &Path, opts: &str) -> LoopMount {
        std::fs::create_dir_all(dir).expect("loop mountpoint");
        run_ok("mount", &["-o", opts, path_str(image), path_str(dir)]);
        LoopMount { dir: dir.to_owned(), image: image.to_owned() }
    }

    /// Unmounts (failing the test if that fails) and waits until the loop device has let
    /// go of the image, so the FUSE mount can be unmounted next.
    pub fn unmount(mut self) {
        run_ok("umount", &[path_str(&self.dir)]);
        self.wait_detached();
    }

    fn wait_detached(&mut self) {
        let image = self.image.clone();
        let free = wait_until(Duration::from_secs(10), || {
            run("losetup", &["-j", path_str(&image)]).stdout.is_empty()
        });
        if !free {
            let out = run("losetup", &["-j", path_str(&image)]);
            for dev in String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split(':').next()) {
                let _ = run("losetup", &["-d", dev]);
            }
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        umount_quietly(&self.dir);
        self.wait_detached();
    }
}
