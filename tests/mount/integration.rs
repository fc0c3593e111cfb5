//! System integration, for real: `vmback umount` (live, busy, lazy, refusals), recovery
//! after a SIGKILL under load (issue 7.4: through `vmback umount` and through a new
//! `vmback mount`, with fsynced writes kept by `--keep-overlay`), `mount -t fuse.vmback`
//! and an fstab line through the `mount.fuse.vmback` helper, the systemd units checked by
//! `systemd-analyze verify`, bash completion and the man pages, and `--log-level` against
//! `VMBACK_LOG`.
//!
//! Every mount is owned by a guard that unmounts and reaps it, whatever the test did.
//! Without /dev/fuse (or a needed command) a test prints "skipping: ..." and passes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crate::common::cli::{run_ok, vmback};
use crate::common::files::pread;
use crate::common::fuse::{
    is_fuse_mounted, mount_entry, path_str, stdout_of_success, umount_quietly, wait_until, which,
};
use crate::common::mounted::{MOUNT_WAIT, Mounted};
use crate::common::ready::{is_root, ready, root_ready};
use crate::common::rng::Rng;
use crate::common::sample::{sample, sample_dirs, sample_image as image};
use crate::common::tempdir;
use nix::errno::Errno;
use nix::sys::statfs::statfs;

const MIB: u64 = 1 << 20;

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn errno(e: &std::io::Error) -> Option<i32> {
    e.raw_os_error()
}

// ---------------------------------------------------------------------------------------
// vmback umount

#[test]
fn umount_live_busy_lazy_and_refusals() {
    if !ready(&[]) {
        return;
    }
    let (t, src, mnt) = sample_dirs();
    let mut m = Mounted::start(&src, &mnt, &[]);
    let (fs_type, fs_source) = mount_entry(&mnt).expect("mounted");
    assert_eq!(fs_type, "fuse.vmback");
    assert_eq!(Path::new(&fs_source), src.canonicalize().unwrap(), "the mount's source is SOURCE");

    // qemu with cache=none asks XFS_IOC_DIOINFO (_IOR('X', 30, 12 bytes)) of an image: the
    // answer is ENOTTY, as from a plain file, and nothing is logged (issue 18.8).
    let img = image(&mnt, "latest", "sda");
    let asked = Command::new("python3")
        .args(["-c", "import fcntl,sys\ntry:\n fcntl.ioctl(open(sys.argv[1],'rb'),0x800c581e,bytes(12))\nexcept OSError as e:\n print(e.errno)", path_str(&img)])
        .output()
        .expect("python3");
    assert_eq!(String::from_utf8_lossy(&asked.stdout).trim(), libc::ENOTTY.to_string(), "{asked:?}");

    // Busy: the error names this process and how to detach; the mount stays.
    let held = File::open(image(&mnt, "latest", "sda")).expect("open an image");
    let out = vmback(&["umount", path_str(&mnt)]);
    let said = text(&out);
    assert!(!out.status.success(), "unmounted a busy mount: {said}");
    assert!(said.contains("busy"), "{said}");
    assert!(said.contains(&format!("PID {} ", std::process::id())), "the holder is not named: {said}");
    assert!(said.contains("--lazy"), "{said}");
    assert!(is_fuse_mounted(&mnt), "a busy mount was unmounted");
    drop(held);

    // Live, not busy: unmounted, and vmback exits cleanly.
    let out = vmback(&["umount", path_str(&mnt)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!is_fuse_mounted(&mnt));
    let status = m
        .wait_exit(MOUNT_WAIT)
        .unwrap_or_else(|| panic!("vmback still running after the unmount:\n{}", m.log()));
    assert!(status.success(), "vmback exited with {status}:\n{}", m.log());
    // A clean unmount logs no warning (issue 18.8: fuser's own second unmount logged
    // "Failed to umount filesystem: Invalid argument" every time).
    assert!(!m.log().contains("WARN"), "a clean unmount warned:\n{}", m.log());
    assert!(m.log().contains("INFO unmounted"), "{}", m.log());

    // Lazy while a file is open: gone from the tree at once, the open file still reads,
    // vmback exits when it is closed.
    let mut m = Mounted::start(&src, &mnt, &[]);
    let img = image(&mnt, "latest", "sda");
    let held = File::open(&img).expect("open an image");
    let before = pread(&held, 0, 4096).expect("read");
    let out = vmback(&["umount", "--lazy", path_str(&mnt)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!is_fuse_mounted(&mnt), "still in the tree after --lazy");
    assert_eq!(pread(&held, 0, 4096).expect("read after a lazy detach"), before);
    drop(held);
    let status = m
        .wait_exit(MOUNT_WAIT)
        .unwrap_or_else(|| panic!("vmback still running after the unmount:\n{}", m.log()));
    assert!(status.success(), "vmback exited with {status}:\n{}", m.log());
    assert!(!m.log().contains("WARN"), "a lazy unmount warned:\n{}", m.log());

    // Not a mount, and not a FUSE mount: refused, nothing unmounted.
    let plain = t.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let out = vmback(&["umount", path_str(&plain)]);
    assert!(!out.status.success() && text(&out).contains("not a mountpoint"), "{}", text(&out));
    if is_root() {
        run_ok("mount", &["-t", "tmpfs", "tmpfs", path_str(&plain)]);
        let out = vmback(&["umount", path_str(&plain)]);
        let tmpfs_left = mount_entry(&plain).is_some_and(|(t, _)| t == "tmpfs");
        umount_quietly(&plain);
        assert!(!out.status.success() && text(&out).contains("not a FUSE"), "{}", text(&out));
        assert!(tmpfs_left, "vmback umount unmounted a tmpfs");
    }
}

// ---------------------------------------------------------------------------------------
// Issue 7.4: SIGKILL under load, then recovery without a reboot.

/// Readers hammering the mount's images (random 64 KiB reads) from threads, until a read
/// fails (the mount died); each keeps its file open until [`Readers::release`], as a
/// real reader stuck on a dead mount does.
struct Readers {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Readers {
    fn start(images: &[PathBuf]) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let threads = images
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let (stop, reads) = (stop.clone(), reads.clone());
                // Opened here, so every reader holds its file before the kill.
                let f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let size = f.metadata().expect("stat").len();
                thread::spawn(move || {
                    let mut rng = Rng(0x7e4d + i as u64);
                    let mut failed = false;
                    while !stop.load(Ordering::Relaxed) {
                        if failed {
                            thread::sleep(Duration::from_millis(10));
                        } else if pread(&f, rng.below(size / 65536) * 65536, 65536).is_ok() {
                            reads.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed = true;
                        }
                    }
                })
            })
            .collect();
        Readers { stop, reads, threads }
    }

    /// Waits until the readers have done `n` reads in all (so the mount is under load).
    fn wait_reads(&self, n: u64) {
        assert!(
            wait_until(MOUNT_WAIT, || self.reads.load(Ordering::Relaxed) >= n),
            "readers stalled at {} reads",
            self.reads.load(Ordering::Relaxed)
        );
    }

    /// Stops the readers and closes their files.
    fn release(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("reader thread");
        }
    }
}

/// Writes `data` at `off` into `img` and fsyncs it.
fn write_synced(img: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    f.write_all_at(data, off).expect("write");
    f.sync_all().expect("fsync");
}

fn read_at(img: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(img).unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    pread(&f, off, len).expect("read")
}

/// Kills vmback (SIGKILL) while readers run on every image, and checks what that leaves:
/// a dead FUSE mount (ENOTCONN), readers stopped by errors but still holding files there.
fn kill_under_load(m: &mut Mounted, images: &[PathBuf]) -> Readers {
    let up = statfs(&m.mnt).is_ok() && is_fuse_mounted(&m.mnt);
    assert!(up, "the mount went away before the kill:\n{}", m.log());
    let readers = Readers::start(images);
    readers.wait_reads(200);
    m.kill_hard();
    assert!(is_fuse_mounted(&m.mnt), "a killed FUSE server leaves its mount behind");
    assert_eq!(statfs(&m.mnt).err(), Some(Errno::ENOTCONN), "statfs of a dead mount");
    readers
}

#[test]
fn sigkill_under_load_is_recovered_by_umount_and_by_mount() {
    if !ready(&[]) {
        return;
    }
    let (t, src, mnt) = sample_dirs();
    let keep = t.path().join("keep");
    let flags = ["--keep-overlay", path_str(&keep)];
    let point = "virtnbdbackup.2";
    let images: Vec<PathBuf> = ["sda", "sdb"]
        .iter()
        .flat_map(|d| [image(&mnt, point, d), image(&mnt, "virtnbdbackup.0", d)])
        .collect();
    let (sda, sdb) = (image(&mnt, point, "sda"), image(&mnt, point, "sdb"));
    let mut rng = Rng(0x7a4);
    let mut bytes = |n: usize| (0..n).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>();
    let (a, b, c) = (bytes(MIB as usize + 3), bytes(70_000), bytes(4096));

    // Round 1: fsynced writes, SIGKILL under load, `vmback umount` clears the dead mount
    // while the readers still hold their files.
    let mut m = Mounted::start(&src, &mnt, &flags);
    let untouched = read_at(&sda, 40 * MIB, MIB as usize);
    write_synced(&sda, 5 * MIB + 1, &a);
    write_synced(&sdb, 3 * MIB + 5, &b);
    let readers = kill_under_load(&mut m, &images);
    let out = vmback(&["umount", path_str(&mnt)]);
    assert!(out.status.success(), "vmback umount of a dead mount: {}", text(&out));
    assert!(text(&out).contains("stale"), "{}", text(&out));
    assert!(!is_fuse_mounted(&mnt), "the dead mount is still there");
    // Readers of pages still in the page cache may have kept going: only the files
    // held open across the recovery matter here.
    readers.release();
    drop(m);

    // Round 2: the data is back; more writes, SIGKILL under load again, and this time a
    // new `vmback mount` on the dead mountpoint clears it itself.
    let mut m = Mounted::start(&src, &mnt, &flags);
    assert_eq!(read_at(&sda, 5 * MIB + 1, a.len()), a, "fsynced write lost by SIGKILL (sda)");
    assert_eq!(read_at(&sdb, 3 * MIB + 5, b.len()), b, "fsynced write lost by SIGKILL (sdb, lz4)");
    assert_eq!(read_at(&sda, 40 * MIB, MIB as usize), untouched, "unwritten range changed");
    write_synced(&sda, 20 * MIB - 7, &c);
    let readers = kill_under_load(&mut m, &images);
    let again = Mounted::start(&src, &mnt, &flags);
    assert!(again.log().contains("stale FUSE mount"), "no log line about the recovery:\n{}", again.log());
    assert_eq!(read_at(&sda, 5 * MIB + 1, a.len()), a, "round 1 write lost");
    assert_eq!(read_at(&sda, 20 * MIB - 7, c.len()), c, "fsynced write lost by the second SIGKILL");
    assert_eq!(read_at(&sdb, 3 * MIB + 5, b.len()), b);
    readers.release();
    drop(again);
    drop(m);
}

// ---------------------------------------------------------------------------------------
// mount -t fuse.vmback and /etc/fstab

/// /sbin/mount.fuse.vmback is one file for the whole machine: the tests that install it
/// (this guard, the Debian package) take turns.
static SBIN_HELPER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sbin_helper_turn() -> std::sync::MutexGuard<'static, ()> {
    SBIN_HELPER.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// mount(8) finds the helper only at /sbin/mount.fuse.vmback: this guard points it at
/// the binary under test and puts back what was there before.
struct Helper {
    path: PathBuf,
    before: Option<PathBuf>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Helper {
    fn install() -> Helper {
        let _turn = sbin_helper_turn();
        let path = PathBuf::from("/sbin/mount.fuse.vmback");
        let before = std::fs::read_link(&path).ok();
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vmback"), &path).expect("install the mount helper");
        Helper { path, before, _turn }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(to) = &self.before {
            let _ = std::os::unix::fs::symlink(to, &self.path);
        }
    }
}

/// A mount made through mount(8) or `vmback mount --background`; the guard clears the
/// mount and kills the detached server if the test did not unmount.
struct SysMount {
    mnt: PathBuf,
    pid: u32,
}

/// The vmback process serving `mnt`: the one whose command line names it.
fn server_pid(mnt: &Path) -> Option<u32> {
    let want = path_str(mnt).as_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let mut args = cmdline.split(|b| *b == 0);
        let exe = args.next()?;
        let ours = exe.ends_with(b"vmback") && pid != std::process::id();
        (ours && args.any(|a| a == want)).then_some(pid)
    })
}

impl SysMount {
    /// Runs mount(8) with `args`, which must succeed and leave a vmback mount at `mnt`.
    fn mount(args: &[&str], mnt: &Path) -> SysMount {
        let out = Command::new("mount").args(args).stdin(Stdio::null()).output().expect("run mount");
        Self::check(&out, mnt, &format!("mount {args:?}"))
    }

    /// `what` (whose output is `out`) returned: the mount must be up, served by a vmback.
    fn check(out: &Output, mnt: &Path, what: &str) -> SysMount {
        let said = text(out);
        let guard = SysMount { mnt: mnt.to_owned(), pid: server_pid(mnt).unwrap_or(0) };
        assert!(out.status.success(), "{what}: {said}");
        assert_eq!(mount_entry(mnt).map(|e| e.0).as_deref(), Some("fuse.vmback"), "{what}: {said}");
        assert!(guard.pid != 0, "{what}: no vmback process serves {}", mnt.display());
        guard
    }

    fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    /// The mount's options as findmnt shows them.
    fn options(&self) -> String {
        let args = ["-n", "-o", "OPTIONS", path_str(&self.mnt)];
        stdout_of_success("findmnt", &args, Command::new("findmnt").args(args).output().expect("findmnt"))
    }

    /// After an unmount: the detached server exits by itself.
    fn wait_server_gone(&self) {
        assert!(
            wait_until(MOUNT_WAIT, || !self.alive()),
            "vmback {} still running after the unmount",
            self.pid
        );
    }
}

impl Drop for SysMount {
    fn drop(&mut self) {
        umount_quietly(&self.mnt);
        if self.pid != 0 && self.alive() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::SIGKILL,
            );
        }
    }
}

/// `umount MNT` (util-linux), which must succeed; if the mount is busy, the failure
/// names the holders (as `vmback umount` finds them).
fn sys_umount(mnt: &Path) {
    let out = Command::new("umount").arg(mnt).output().expect("umount");
    if !out.status.success() {
        let holders = text(&vmback(&["umount", path_str(mnt)]));
        panic!("umount {}: {}\n{holders}", mnt.display(), text(&out));
    }
}

#[test]
fn mount_t_fuse_vmback_and_an_fstab_line() {
    if !ready(&["mount", "findmnt", "cmp"]) {
        return;
    }
    if !root_ready("installing /sbin/mount.fuse.vmback") {
        return;
    }
    let _helper = Helper::install();
    let (t, src, mnt) = sample_dirs();
    std::fs::create_dir(&mnt).unwrap();
    let reference = t.path().join("restored");
    let out = vmback(&["restore", "-i", path_str(&src), "-o", path_str(&reference), "--format", "raw"]);
    assert!(out.status.success(), "{}", text(&out));
    let same_as_restore = |mnt: &Path| {
        for disk in ["sda", "sdb"] {
            let img = image(mnt, "latest", disk);
            run_ok("cmp", &[path_str(&img), path_str(&reference.join(format!("{disk}.raw")))]);
        }
    };

    // mount -t with vmback's options and generic ones; read-only, other users let in.
    let m = SysMount::mount(
        &[
            "-t",
            "fuse.vmback",
            path_str(&src),
            path_str(&mnt),
            "-o",
            "allow_other,ro,cache_size=64M,threads=3,log_level=warn,nofail,_netdev,noatime",
        ],
        &mnt,
    );
    let opts = m.options();
    assert!(opts.contains("ro,") && opts.contains("allow_other"), "{opts}");
    let entries = std::fs::read_dir(mnt.join("sample-vm")).expect("ls").count();
    assert!(entries >= 5, "{entries} entries in sample-vm");
    same_as_restore(&mnt);
    let err = OpenOptions::new().write(true).open(image(&mnt, "latest", "sda")).expect_err("write on ro");
    assert_eq!(errno(&err), Some(libc::EROFS), "{err}");
    sys_umount(&mnt);
    assert!(!is_fuse_mounted(&mnt));
    m.wait_server_gone();
    drop(m);

    // Writable with keep_overlay=: written data survives `umount` and a new mount; the
    // detached server's log goes on in log_file= after mount(8) has returned.
    let keep = t.path().join("keep");
    let log = t.path().join("vmback.log");
    let rw =
        format!("keep_overlay={},dirty_size=1M,log_file={},log_level=debug", keep.display(), log.display());
    let args = ["-t", "fuse.vmback", path_str(&src), path_str(&mnt), "-o", rw.as_str()];
    let m = SysMount::mount(&args, &mnt);
    write_synced(&image(&mnt, "latest", "sdb"), 7 * MIB, b"through mount -t");
    sys_umount(&mnt);
    m.wait_server_gone();
    drop(m);
    let m = SysMount::mount(&args, &mnt);
    assert_eq!(read_at(&image(&mnt, "latest", "sdb"), 7 * MIB, 16), b"through mount -t");
    let out = vmback(&["umount", path_str(&mnt)]);
    assert!(out.status.success(), "{}", text(&out));
    m.wait_server_gone();
    drop(m);
    let logged = std::fs::read_to_string(&log).expect("log_file written");
    let ends = logged.lines().filter(|l| l.contains(&format!("unmounted {}", mnt.display()))).count();
    assert_eq!(ends, 2, "both sessions logged their end in {}:\n{logged}", log.display());

    // Refusals: an unknown option is named; a bad SOURCE shows the server's error.
    let out = Command::new("mount")
        .args(["-t", "fuse.vmback", path_str(&src), path_str(&mnt), "-o", "ro,frobnicate=3"])
        .output()
        .unwrap();
    assert!(!out.status.success() && text(&out).contains("frobnicate=3"), "{}", text(&out));
    let missing = t.path().join("no-such-set");
    let out = Command::new("mount")
        .args(["-t", "fuse.vmback", path_str(&missing), path_str(&mnt)])
        .output()
        .unwrap();
    assert!(!out.status.success() && text(&out).contains(path_str(&missing)), "{}", text(&out));
    assert!(!is_fuse_mounted(&mnt));

    // A real fstab line, in a temporary fstab: `mount MOUNT` finds the rest there.
    let fstab = t.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# vmback\n{}\t{}\tfuse.vmback\tallow_other,ro,noauto,nofail,x-systemd.automount\t0 0\n",
            src.display(),
            mnt.display()
        ),
    )
    .unwrap();
    let m = SysMount::mount(&["-T", path_str(&fstab), path_str(&mnt)], &mnt);
    assert!(m.options().contains("allow_other"), "{}", m.options());
    same_as_restore(&mnt);
    sys_umount(&mnt);
    m.wait_server_gone();
}

/// `vmback mount --background` returns once the mount is up; the server outlives it.
#[test]
fn background_mount_returns_once_mounted() {
    if !ready(&[]) {
        return;
    }
    let (_t, src, mnt) = sample_dirs();
    std::fs::create_dir(&mnt).unwrap();
    let out = vmback(&["mount", "--background", "--read-only", path_str(&src), path_str(&mnt)]);
    let guard = SysMount::check(&out, &mnt, "vmback mount --background");
    assert!(text(&out).contains(&format!("served by vmback PID {}", guard.pid)), "{}", text(&out));
    assert!(std::fs::read(mnt.join("sample-vm/latest/vmconfig.xml")).is_ok());
    let out = vmback(&["umount", path_str(&mnt)]);
    assert!(out.status.success(), "{}", text(&out));
    guard.wait_server_gone();
}

// ---------------------------------------------------------------------------------------
// systemd, completions, man pages, log level

/// The unit files load cleanly in `systemd-analyze verify` (with the binary path pointed
/// at the one under test, which it checks exists).
#[test]
fn systemd_units_verify() {
    if which("systemd-analyze").is_none() {
        eprintln!("skipping: systemd-analyze is not installed");
        return;
    }
    let t = tempdir();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    for name in ["vmback@.service", "mnt-vmback.mount"] {
        let unit = std::fs::read_to_string(units.join(name)).expect("unit file");
        assert!(unit.contains("vmback"), "{name}");
        std::fs::write(
            t.path().join(name),
            unit.replace("/usr/local/bin/vmback", env!("CARGO_BIN_EXE_vmback")),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("vmback@.service", t.path().join("vmback@demo.service")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "./vmback@demo.service", "./mnt-vmback.mount"])
        .current_dir(t.path())
        .output()
        .expect("systemd-analyze");
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let ours: Vec<&str> = said.lines().filter(|l| l.contains("vmback")).collect();
    assert!(ours.is_empty(), "systemd-analyze complains about our units:\n{}", ours.join("\n"));
}

/// Runs `script` in bash; its stdout.
fn bash(script: &str, env: &[(&str, &Path)]) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(script);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("bash");
    assert!(out.status.success(), "bash -c {script}:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bash_completion_completes_commands_and_flags() {
    if which("bash").is_none() {
        eprintln!("skipping: bash is not installed");
        return;
    }
    let t = tempdir();
    let dir = t.path().join("completions");
    std::fs::create_dir(&dir).unwrap();
    let script = dir.join("vmback");
    let out = vmback(&["completions", "bash"]);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(&script, &out.stdout).unwrap();
    let complete = |words: &str| {
        bash(
            &format!(
                "source \"$SCRIPT\"; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
                 _vmback vmback \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
                 printf '%s\\n' \"${{COMPREPLY[@]}}\""
            ),
            &[("SCRIPT", &script)],
        )
    };
    let subs = complete("vmback u");
    assert_eq!(subs.trim(), "umount", "{subs}");
    let all = complete("vmback ''");
    for sub in ["mount", "umount", "ls", "backup", "restore", "verify"] {
        assert!(all.lines().any(|l| l == sub), "{sub} missing from {all}");
    }
    let flags = complete("vmback mount --kee");
    assert_eq!(flags.trim(), "--keep-overlay", "{flags}");

    // Loaded on demand by bash-completion from where the set-up installs it (the user
    // directory here stands in for /usr/local/share/bash-completion/completions).
    let loader = Path::new("/usr/share/bash-completion/bash_completion");
    if loader.exists() {
        let shown = bash(
            "source /usr/share/bash-completion/bash_completion; __load_completion vmback; complete -p vmback",
            &[("BASH_COMPLETION_USER_DIR", t.path())],
        );
        assert!(shown.contains("_vmback"), "{shown}");
    }
    for shell in ["zsh", "fish"] {
        let out = vmback(&["completions", shell]);
        assert!(out.status.success() && text(&out).contains("umount"), "{shell}: {}", text(&out));
    }
}

#[test]
fn man_pages_render() {
    if which("man").is_none() {
        eprintln!("skipping: man is not installed (man-db)");
        return;
    }
    let t = tempdir();
    let out = vmback(&["man", path_str(t.path())]);
    assert!(out.status.success(), "{}", text(&out));
    for (page, want) in [
        ("vmback.1", "vmback-umount(1)"),
        ("vmback-mount.1", "--keep-overlay"),
        ("vmback-umount.1", "--lazy"),
    ] {
        let out = Command::new("man")
            .args(["-l", path_str(&t.path().join(page))])
            .env("MANWIDTH", "100")
            .env("LC_ALL", "C")
            .output()
            .expect("man");
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "man -l {page}: {}", text(&out));
        assert!(shown.contains(want), "{page} lacks {want}:\n{shown}");
        assert!(shown.contains("--log-level"), "{page} lacks --log-level:\n{shown}");
    }
    let hidden = std::fs::read_dir(t.path()).unwrap().flatten().any(|e| {
        let n = e.file_name();
        n == "vmback-completions.1" || n == "vmback-man.1"
    });
    assert!(!hidden, "pages for the set-up's hidden commands");
}

/// `vmback ls` of a folder with no backup says so, and why files in it were not taken
/// (issue 18.8); a point's date reads `2026-06-01 08:00:00`.
#[test]
fn ls_says_when_nothing_was_found_and_shows_plain_dates() {
    let t = tempdir();
    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let said = run_ok(env!("CARGO_BIN_EXE_vmback"), &["ls", path_str(&empty)]);
    assert_eq!(
        said.trim_end(),
        format!(
            "no backup found in {}: it holds no stream file (*.data) of virtnbdbackup or vmback",
            empty.display()
        )
    );
    let partial = empty.join("sda.full.data.partial");
    std::fs::write(&partial, b"in progress").unwrap();
    let said = run_ok(env!("CARGO_BIN_EXE_vmback"), &["ls", path_str(&empty)]);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(
        lines,
        [
            format!("no backup found in {}; files not taken:", empty.display()),
            format!("warning: {}: backup in progress or aborted; skipped", partial.display()),
        ],
        "{said}"
    );

    let src = sample(t.path());
    let said = run_ok(env!("CARGO_BIN_EXE_vmback"), &["ls", path_str(&src)]);
    let point = said.lines().find(|l| l.trim_start().starts_with("virtnbdbackup.0 ")).expect("point 0");
    let date = point.split_whitespace().skip(1).take(2).collect::<Vec<_>>().join(" ");
    assert!(
        chrono::NaiveDateTime::parse_from_str(&date, "%Y-%m-%d %H:%M:%S").is_ok(),
        "date {date:?} in {point:?}"
    );
}

/// `--log-level` wins over `VMBACK_LOG`; both filter; a bad filter is an error.
#[test]
fn log_level_flag_and_env() {
    let t = tempdir();
    let src = sample(t.path());
    std::fs::write(src.join("sda.inc.virtnbdbackup.3.data.partial"), b"in progress").unwrap();
    let warned = |env: Option<&str>, flag: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmback"));
        cmd.env_remove("VMBACK_LOG");
        if let Some(e) = env {
            cmd.env("VMBACK_LOG", e);
        }
        if let Some(f) = flag {
            cmd.args(["--log-level", f]);
        }
        let out = cmd.arg("ls").arg(&src).output().expect("vmback ls");
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stderr).contains("partial")
    };
    assert!(warned(None, None), "the default level shows warnings");
    assert!(!warned(Some("error"), None), "VMBACK_LOG=error still shows warnings");
    assert!(warned(Some("error"), Some("warn")), "--log-level does not win over VMBACK_LOG");
    assert!(!warned(Some("debug"), Some("error")), "--log-level does not win over VMBACK_LOG");
    let out = vmback(&["ls", path_str(&src), "--log-level", "no==such"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--log-level no==such"), "{}", text(&out));
}

// ---------------------------------------------------------------------------------------
// The Debian package

/// contrib/deb/build.sh packages the binary under test; contrib/deb/check.sh installs the
/// .deb with apt-get as a user would, runs `vmback --version` from /usr/bin, mounts a
/// sample set through the installed mount helper, finds the man page and the unit, and
/// purges it leaving no file behind.
#[test]
fn the_debian_package_installs_runs_and_purges() {
    if !root_ready("installing a package") {
        return;
    }
    if which("dpkg-deb").is_none() {
        eprintln!("skipping: dpkg-deb is not installed (contrib/install-deps.sh installs it)");
        return;
    }
    let _turn = sbin_helper_turn();
    let t = tempdir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = run_ok(
        "bash",
        &[
            path_str(&root.join("contrib/deb/build.sh")),
            "--bin",
            env!("CARGO_BIN_EXE_vmback"),
            path_str(t.path()),
        ],
    );
    let deb = built.trim().lines().last().expect("build.sh prints the .deb");
    assert!(deb.ends_with(".deb") && Path::new(deb).exists(), "{built}");
    let said = run_ok("bash", &[path_str(&root.join("contrib/deb/check.sh")), deb]);
    let version = format!("vmback {}", env!("CARGO_PKG_VERSION"));
    for line in [
        version.as_str(),
        "read bytes through mount -t fuse.vmback: 4096",
        "/usr/share/man/man1/vmback-mount.1.gz",
        "purged, no file left",
    ] {
        assert!(said.contains(line), "missing {line:?} in:\n{said}");
    }
}
