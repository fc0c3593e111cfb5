//! Helpers for the write tests: a paused qemu behind a guard that always cleans up, file
//! checks, and backup sets built with the library's stream writer. (The vmback and loop
//! mounts, commands and readiness checks are the mount tests' common ones.)

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::{Whence, lseek};
use vmback::chain::{MAX_REQUEST, StreamMeta, StreamWriter};

use crate::common::fuse::{die_with_parent, unique, wait_until};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

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

fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
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
