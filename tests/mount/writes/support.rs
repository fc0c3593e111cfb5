//! Helpers for the write tests: the real `vmback mount`, qemu and loop mounts behind
//! guards that always clean up, commands under `timeout`, and backup sets built with the
//! library's stream writer.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Whence, lseek};
use vmback::chain::{MAX_REQUEST, StreamMeta, StreamWriter};

use crate::common::fuse::{Watched, die_with_parent, mount_entry, stdout_of_success, umount_quietly, unique};
pub use crate::common::fuse::{is_fuse_mounted, path_str, wait_until};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// How long a mount may take to appear, and a stopped vmback to exit.
pub const MOUNT_WAIT: Duration = Duration::from_secs(15);

/// Past this, a vmback still running is killed, so a request stuck in a hung mount fails
/// with ENOTCONN instead of hanging the test run.
const WATCHDOG: Duration = Duration::from_secs(150);

pub use crate::common::rng::Rng;

impl Rng {
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        for c in v.chunks_mut(8) {
            let x = self.next_u64().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
        v
    }
}

// ---------------------------------------------------------------------------------------
// Environment and commands

pub use crate::common::ready::is_root;

/// Whether this machine can run the test; prints why not. `cmds` are extra commands it
/// needs beyond `timeout`, which [`run`] wraps every command in.
pub fn ready(cmds: &[&str]) -> bool {
    crate::common::ready::ready(&[&["timeout"], cmds].concat())
}

/// Runs `cmd args` under `timeout 120` with the C locale.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("--kill-after=5")
        .arg("120")
        .arg(cmd)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

/// Like [`run`], failing the test unless it succeeds; returns stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    stdout_of_success(cmd, args, run(cmd, args))
}

/// The fs type mounted at exactly `mnt`, if any (the last, visible, mount).
pub fn mount_type(mnt: &Path) -> Option<String> {
    mount_entry(mnt).map(|(fstype, _)| fstype)
}

fn read_text(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

// ---------------------------------------------------------------------------------------
// vmback

/// A running `vmback mount`; dropping it unmounts and reaps whatever state it is in.
pub struct Vmback {
    vmback: Watched,
    pub mnt: PathBuf,
    log: PathBuf,
}

impl Vmback {
    /// Mounts `source` on `mnt` (created if missing) with `extra` flags; fails the test
    /// with vmback's log if the mount does not come up.
    pub fn start(source: &Path, mnt: &Path, extra: &[&str]) -> Vmback {
        Self::try_start(source, mnt, extra)
            .unwrap_or_else(|(st, log)| panic!("vmback mount failed ({st:?}):\n{log}"))
    }

    /// Like [`Vmback::start`]; on failure returns vmback's exit status (None if it never
    /// exited) and its output.
    pub fn try_start(
        source: &Path,
        mnt: &Path,
        extra: &[&str],
    ) -> Result<Vmback, (Option<ExitStatus>, String)> {
        std::fs::create_dir_all(mnt).expect("mountpoint");
        let log = mnt.with_extension(format!("log{}", unique()));
        let extra: Vec<OsString> = extra.iter().map(Into::into).collect();
        let vmback = Watched::spawn(source, mnt, &extra, &log, WATCHDOG);
        let mut m = Vmback { vmback, mnt: mnt.to_owned(), log };
        match m.vmback.wait_mounted(mnt, MOUNT_WAIT) {
            Ok(()) => Ok(m),
            Err(Some(st)) => {
                m.vmback.child = None;
                Err((Some(st), m.log()))
            }
            Err(None) => Err((None, m.log())),
        }
    }

    /// Peak resident memory of vmback so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let pid = self.vmback.child.as_ref().expect("vmback running").id();
        let status = read_text(Path::new(&format!("/proc/{pid}/status")));
        let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).expect("VmHWM");
        kib.trim().trim_end_matches("kB").trim().parse::<u64>().expect("VmHWM value") * 1024
    }

    /// vmback's output so far.
    pub fn log(&self) -> String {
        read_text(&self.log)
    }

    /// SIGTERM, then a clean exit within [`MOUNT_WAIT`] and no mount left. Returns false
    /// (after a warning and SIGKILL) only when our mount is gone but a copy of it lives on
    /// in another process's mount namespace, which keeps the FUSE connection, and so
    /// vmback, alive: libvirt gives every qemu it starts a private copy of the mount
    /// table, so a domain started by anyone while this mount was up does that. The
    /// caller then skips checks that need vmback's own clean exit.
    pub fn stop(&mut self) -> bool {
        let mnt = self.mnt.clone();
        let log_path = self.log.clone();
        let child = self.vmback.child.as_mut().expect("vmback running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("signalling vmback");
        let mut status = None;
        wait_until(MOUNT_WAIT, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        let log = read_text(&log_path);
        let Some(status) = status else {
            let diag = diagnose(child.id(), &mnt);
            if mount_type(&mnt).is_none() && !foreign_copies(&mnt).is_empty() {
                eprintln!(
                    "warning: vmback unmounted {} but stays up for another mount namespace; \
                     killing it, post-unmount checks skipped:\n{diag}",
                    mnt.display()
                );
                let _ = child.kill();
                let _ = child.wait();
                self.vmback.child = None;
                return false;
            }
            panic!("vmback did not exit after SIGTERM:\n{log}\n{diag}");
        };
        self.vmback.child = None;
        assert!(status.success(), "vmback exited with {status}:\n{log}");
        assert!(!is_fuse_mounted(&self.mnt), "{} still mounted after vmback exited", self.mnt.display());
        true
    }

    /// SIGKILL (no clean unmount, no overlay saved at exit), then clears the dead mount.
    pub fn kill_hard(&mut self) {
        let mut child = self.vmback.child.take().expect("vmback running");
        let _ = child.kill();
        let _ = child.wait();
        let _ = Command::new("fusermount3").arg("-uz").arg(&self.mnt).stderr(Stdio::null()).status();
        assert!(wait_until(MOUNT_WAIT, || mount_type(&self.mnt).is_none()), "dead mount not cleared");
    }

    /// The `.stats` file, as a map.
    pub fn stats(&self) -> BTreeMap<String, u64> {
        read_text(&self.mnt.join(".stats"))
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_owned(), v.trim().parse().ok()?))
            })
            .collect()
    }
}

/// What a stuck vmback is doing: its threads' kernel stacks, and whether it is mounted.
fn diagnose(pid: u32, mnt: &Path) -> String {
    let mut out = format!("mounted here: {:?}\n", mount_type(mnt));
    // A copy of the mount in another mount namespace (e.g. one libvirt made for a qemu it
    // started meanwhile) keeps the FUSE connection alive after our unmount.
    for (pid, comm) in foreign_copies(mnt) {
        out.push_str(&format!("also mounted in the mount namespace of pid {pid} ({comm})\n"));
    }
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let p = t.path();
            let comm = read_text(&p.join("comm"));
            let stat = read_text(&p.join("stat"));
            let state = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().next().unwrap_or("?");
            let stack = read_text(&p.join("stack"));
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
        if read_text(&p.path().join("mountinfo")).contains(&needle) {
            let comm = read_text(&p.path().join("comm")).trim().to_owned();
            out.push((p.file_name().to_string_lossy().into_owned(), comm));
        }
    }
    out
}

impl Drop for Vmback {
    fn drop(&mut self) {
        self.vmback.reap();
        for _ in 0..3 {
            if mount_type(&self.mnt).is_none() {
                break;
            }
            let quiet = |cmd: &str, args: &[&str]| {
                let _ = Command::new(cmd).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
            };
            quiet("fusermount3", &["-uz", path_str(&self.mnt)]);
            if mount_type(&self.mnt).is_some() {
                quiet("umount", &["-l", path_str(&self.mnt)]);
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

// ---------------------------------------------------------------------------------------
// Loop mounts

/// `mount -o loop,...`; unmounted on drop. Declare it after the [`Vmback`] it reads from.
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

// ---------------------------------------------------------------------------------------
// qemu

/// A paused `qemu-system-x86_64` with its HMP monitor on a unix socket; killed on drop.
pub struct Qemu {
    child: Option<Child>,
    sock: UnixStream,
    log: PathBuf,
}

impl Qemu {
    /// Starts qemu (no guest code runs: `-S`) with `args` added, e.g. `-drive` and
    /// `-device`; stdout and stderr (where HMP `qemu-io` prints) go to a log in `dir`.
    pub fn start(dir: &Path, args: &[&str]) -> Qemu {
        let sock_path = dir.join(format!("qemu{}.sock", unique()));
        let log = sock_path.with_extension("log");
        let file = File::create(&log).expect("qemu log");
        let mut cmd = Command::new("qemu-system-x86_64");
        die_with_parent(&mut cmd, Signal::SIGKILL);
        let monitor = format!("unix:{},server=on,wait=off", sock_path.display());
        let mut child = cmd
            .args(["-nodefaults", "-display", "none", "-S", "-m", "64", "-machine", "accel=kvm:tcg"])
            .args(["-monitor", &monitor])
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .spawn()
            .expect("spawning qemu-system-x86_64");
        let mut sock = None;
        let up = wait_until(Duration::from_secs(20), || {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return true;
            }
            sock = UnixStream::connect(&sock_path).ok();
            sock.is_some()
        });
        let Some(sock) = sock.filter(|_| up) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qemu did not start:\n{}", read_text(&log));
        };
        sock.set_read_timeout(Some(Duration::from_secs(60))).expect("socket timeout");
        let mut q = Qemu { child: Some(child), sock, log };
        q.read_prompt();
        q
    }

    /// Reads up to and including the next `(qemu) ` prompt.
    fn read_prompt(&mut self) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"(qemu) ") {
            match self.sock.read(&mut buf) {
                Ok(0) => panic!("qemu closed its monitor:\n{}", read_text(&self.log)),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("reading the qemu monitor: {e}\n{}", read_text(&self.log)),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Runs one HMP command; returns its reply (after the echoed command line).
    pub fn hmp(&mut self, cmd: &str) -> String {
        self.sock.write_all(format!("{cmd}\n").as_bytes()).expect("writing to the qemu monitor");
        let reply = self.read_prompt();
        // The monitor echoes the line with terminal escapes; the reply follows its CRLF.
        let body = reply.split_once("\r\n").map_or("", |(_, b)| b);
        body.trim_end_matches("(qemu) ").to_owned()
    }

    /// `quit`s qemu, waits for it and returns everything it printed.
    pub fn quit(mut self) -> String {
        let _ = self.sock.write_all(b"quit\n");
        let mut child = self.child.take().expect("qemu running");
        let done = wait_until(Duration::from_secs(20), || matches!(child.try_wait(), Ok(Some(_))));
        if !done {
            let _ = child.kill();
            let _ = child.wait();
        }
        read_text(&self.log)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

// ---------------------------------------------------------------------------------------
// Files

pub fn read_all(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `len` bytes at `off` of a fresh open of `path` (short only at the end).
pub fn read_range(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    pread(&f, off, len)
}

pub fn pread(f: &File, off: u64, len: usize) -> Vec<u8> {
    crate::common::files::pread(f, off, len).unwrap_or_else(|e| panic!("pread {len} at {off}: {e}"))
}

/// Fails with the first differing offset instead of printing megabytes.
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    let show = |b: &[u8]| format!("{:02x?}", &b[first.min(b.len())..(first + 16).min(b.len())]);
    panic!(
        "{what}: differs at offset {first} (lengths {} and {}): got {} want {}",
        got.len(),
        want.len(),
        show(got),
        show(want)
    );
}

/// Every regular file under `dir` for which `keep` holds, sorted; symlinks (the `latest`
/// links of a mount) are not followed.
fn files_under(dir: &Path, keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("dir entry");
            let t = e.file_type().expect("file type");
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() && keep(&e.path()) {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// sha256 of every regular file under `dir`, by path.
pub fn sha256_tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let files = files_under(dir, |_| true);
    let mut out = BTreeMap::new();
    for chunk in files.chunks(64) {
        let args: Vec<&str> = chunk.iter().map(|p| path_str(p)).collect();
        for line in run_ok("sha256sum", &args).lines() {
            let (sum, path) = line.split_once("  ").expect("sha256sum line");
            out.insert(PathBuf::from(path), sum.to_owned());
        }
    }
    out
}

/// Every `*.raw` image under a mount, not following the `latest` links.
pub fn images(mnt: &Path) -> Vec<PathBuf> {
    files_under(mnt, |p| p.extension().is_some_and(|x| x == "raw"))
}

/// The data extents of a sparse file (SEEK_DATA / SEEK_HOLE).
pub fn data_extents(f: &File) -> Vec<(u64, u64)> {
    let size = f.metadata().expect("stat").len();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match lseek(f, pos as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(Errno::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA: {e}"),
        };
        let end = lseek(f, start as i64, Whence::SeekHole).expect("SEEK_HOLE") as u64;
        out.push((start, end));
        pos = end;
    }
    out
}

// ---------------------------------------------------------------------------------------
// Backup sets

/// One disk of a one-point set: its size, lz4 or not, and its data extents.
pub struct DiskSpec<'a> {
    pub name: &'a str,
    pub size: u64,
    pub lz4: bool,
    pub extents: Vec<(u64, Vec<u8>)>,
}

fn meta(disk: &str, size: u64, data: u64, lz4: bool, date: &str) -> StreamMeta {
    StreamMeta::full(disk, size, data).lz4(lz4).dated(date)
}

/// Writes the files around the streams: vmconfig, `.cpt`, checkpoint XML.
fn set_files(dir: &Path, domain: &str) {
    std::fs::create_dir_all(dir.join("checkpoints")).expect("set dir");
    let xml = format!(
        "<domain type='kvm'>\n  <name>{domain}</name>\n  <memory unit='KiB'>65536</memory>\n</domain>\n"
    );
    std::fs::write(dir.join("vmconfig.virtnbdbackup.0.xml"), xml).expect("vmconfig");
    std::fs::write(dir.join(format!("{domain}.cpt")), "[\"virtnbdbackup.0\"]").expect("cpt");
    std::fs::write(
        dir.join("checkpoints/virtnbdbackup.0.xml"),
        "<domaincheckpoint>\n  <name>virtnbdbackup.0</name>\n</domaincheckpoint>\n",
    )
    .expect("checkpoint xml");
}

/// A set of one full backup (`virtnbdbackup.0`) of `disks`; returns each disk's bytes.
pub fn stream_set(dir: &Path, domain: &str, date: &str, disks: &[DiskSpec<'_>]) -> Vec<Vec<u8>> {
    set_files(dir, domain);
    let mut truths = Vec::new();
    for d in disks {
        let mut truth = vec![0u8; d.size as usize];
        let mut ext: Vec<&(u64, Vec<u8>)> = d.extents.iter().collect();
        ext.sort_by_key(|e| e.0);
        let data = ext.iter().map(|e| e.1.len() as u64).sum();
        let path = dir.join(format!("{}.full.data", d.name));
        let file = File::create(&path).expect("stream file");
        let mut w =
            StreamWriter::new(BufWriter::new(file), &meta(d.name, d.size, data, d.lz4, date), MAX_REQUEST)
                .expect("stream");
        let mut pos = 0;
        for (off, bytes) in ext {
            assert!(*off >= pos, "extents overlap");
            if *off > pos {
                w.zero(pos, off - pos).expect("zero frame");
            }
            w.data(*off, bytes).expect("data frame");
            truth[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
            pos = off + bytes.len() as u64;
        }
        if pos < d.size {
            w.zero(pos, d.size - pos).expect("zero frame");
        }
        w.finish().expect("finish").into_inner().expect("flush").sync_all().expect("sync");
        truths.push(truth);
    }
    truths
}

/// A set of one full backup of disk `disk`, whose contents are the sparse raw file `raw`:
/// data frames for its data extents, zero frames for its holes.
pub fn raw_set(dir: &Path, domain: &str, disk: &str, date: &str, raw: &Path) {
    set_files(dir, domain);
    let src = File::open(raw).expect("raw image");
    let size = src.metadata().expect("stat").len();
    let extents = data_extents(&src);
    let data = extents.iter().map(|(s, e)| e - s).sum();
    let file = File::create(dir.join(format!("{disk}.full.data"))).expect("stream file");
    let mut w = StreamWriter::new(BufWriter::new(file), &meta(disk, size, data, false, date), MAX_REQUEST)
        .expect("stream");
    let mut pos = 0;
    for (s, e) in extents {
        if s > pos {
            w.zero(pos, s - pos).expect("zero frame");
        }
        w.data_from(s, e - s, |off, n| {
            let mut buf = vec![0u8; n];
            src.read_exact_at(&mut buf, s + off).map(|()| buf)
        })
        .expect("data frame");
        pos = e;
    }
    if pos < size {
        w.zero(pos, size - pos).expect("zero frame");
    }
    w.finish().expect("finish").into_inner().expect("flush").sync_all().expect("sync");
}

/// Unmounts a folder (a tmpfs made by a test) on drop.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        umount_quietly(&self.0);
    }
}
