//! Faults while mounted (issue 7, part 3): stream files deleted, replaced or truncated
//! under an open image, a read error from the disk under SOURCE (through a `Source` whose
//! reader fails, on the filesystem core; for real with SOURCE on an ext4 over a loop
//! device over an nbdkit export whose ddrescue map marks blocks bad; and with a
//! device-mapper `error` target where the kernel has device-mapper), and the scratch disk
//! for overlays filling up.
//!
//! Each fault fails only the requests that meet it, with EIO or ENOSPC, never hangs (every
//! mount runs under a watchdog) or panics, and leaves a log line naming the file and
//! offset. Every test checks with sha256 that the backup files it did not change itself
//! are untouched. Reads that must reach vmback use O_DIRECT, so the kernel's page cache
//! cannot answer them. Without /dev/fuse, root or a needed command a test prints
//! "skipping: ..." and passes.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::common::files::{aligned, assert_untouched, read_full_at, sha256_tree, write_until_enospc};
use crate::common::fuse::small_tmpfs;
use crate::common::fuse::{path_str, stdout_of_success};
use crate::common::mounted::Mounted;
use crate::common::ready::{is_root, ready, root_ready};
use crate::common::sample::{sample, sample_dirs, sample_image as image};
use crate::common::tempdir;
use vmback::catalog::Catalog;
use vmback::chain::StreamIndex;
use vmback::chain::scan::Stored;
use vmback::fs::{FsConfig, ImageFs, Ino, ROOT, Writes};
use vmback::source::{Entry, LocalSource, ReadAt, Source, SourceError, Tree};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Opens an image for O_DIRECT reads (they bypass the kernel's page cache).
fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `len` bytes at `off` (both multiples of 4 KiB) through an O_DIRECT handle.
fn read_direct(f: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, len);
    let done = read_full_at(f, buf, off)?;
    Ok(buf[..done].to_vec())
}

/// The file range holding the bytes of the data extent that starts at disk offset
/// `disk_off` in a stream file: its payload, or its lz4 frames.
fn stored_range(stream: &Path, disk_off: u64) -> Range<u64> {
    let index = StreamIndex::open(stream, "x").expect("index");
    let ext = index.extents.iter().find(|e| e.start == disk_off).expect("extent at that offset");
    match &ext.stored {
        Stored::Plain { file_off } => *file_off..file_off + (ext.end() - ext.start),
        Stored::Lz4(frames) => {
            let (a, b) = (frames.first().expect("a frame"), frames.last().expect("a frame"));
            a.file_off..b.file_off + b.comp_len
        }
        Stored::Zero => panic!("a zero extent at {disk_off}"),
    }
}

fn errno(r: &io::Result<Vec<u8>>) -> Option<i32> {
    r.as_ref().err().and_then(|e| e.raw_os_error())
}

// ---------------------------------------------------------------------------------------
// Stream files changed under an open image

/// A stream file deleted, or replaced by another file renamed over it, while an image
/// built from it is open: the mount holds the old file open and keeps serving its bytes,
/// exactly, for plain and lz4 streams, with a decode cache too small to hold a frame (so
/// every read goes back to the file).
#[test]
fn deleted_or_replaced_stream_files_keep_serving_their_old_bytes() {
    if !ready(&["sha256sum"]) {
        return;
    }
    let (_t, src, mnt) = sample_dirs();
    let before = sha256_tree(&src);
    let mut m = Mounted::start(&src, &mnt, &["--cache-size", "0", "--read-only"]);
    let images: Vec<(PathBuf, File, Vec<u8>)> = [("virtnbdbackup.0", "sda"), ("virtnbdbackup.2", "sdb")]
        .into_iter()
        .map(|(point, disk)| {
            let path = image(&mnt, point, disk);
            let f = open_direct(&path);
            let size = f.metadata().expect("stat").len() as usize;
            let bytes = read_direct(&f, 0, size).expect("read before the change");
            (path, f, bytes)
        })
        .collect();

    // sda's full: deleted. sdb's full: a copy with every stored byte changed (garbage lz4)
    // renamed over it, as a tool replacing a file atomically would.
    std::fs::remove_file(src.join("sda.full.data")).expect("rm");
    let sdb = src.join("sdb.full.data");
    let mut bytes = std::fs::read(&sdb).expect("read sdb");
    for r in [stored_range(&sdb, 0), stored_range(&sdb, 8 * MIB)] {
        bytes[r.start as usize..r.end as usize].iter_mut().for_each(|b| *b ^= 0x55);
    }
    let new = src.join("sdb.full.data.new");
    std::fs::write(&new, &bytes).expect("write the replacement");
    std::fs::rename(&new, &sdb).expect("rename over");

    for (path, f, want) in &images {
        let got = read_direct(f, 0, want.len()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(got == *want, "{}: other bytes after the change", path.display());
        for off in [0, 8 * MIB + 4 * KIB, 10 * MIB] {
            let got = read_direct(f, off, 64 * KIB as usize).expect("a small read");
            assert!(got[..] == want[off as usize..(off + 64 * KIB) as usize], "{} at {off}", path.display());
        }
    }
    drop(images);
    let log = m.stop().expect("vmback exited");
    assert!(!log.contains("ERROR"), "{log}");
    assert_untouched(&before, &sha256_tree(&src), &["sda.full.data", "sdb.full.data"]);
}

/// A stream file truncated in place while its images are open: a read that needs bytes
/// past the new end fails with EIO, with a log line naming the file and where it now ends;
/// everything before the cut, the holes, and the ranges later backups cover still read
/// right, on the same open handle, and the mount keeps serving.
#[test]
fn truncated_stream_fails_only_the_ranges_past_the_cut() {
    if !ready(&["sha256sum"]) {
        return;
    }
    let (_t, src, mnt) = sample_dirs();
    let before = sha256_tree(&src);
    let mut m = Mounted::start(&src, &mnt, &["--cache-size", "0", "--read-only"]);
    let (p0, p1) = ("virtnbdbackup.0", "virtnbdbackup.1");
    // The truth, read before the cut.
    let want: Vec<(String, String, Vec<u8>)> = [(p0, "sda"), (p1, "sda"), (p0, "sdb")]
        .into_iter()
        .map(|(p, d)| {
            let f = open_direct(&image(&mnt, p, d));
            let size = f.metadata().expect("stat").len() as usize;
            (p.to_owned(), d.to_owned(), read_direct(&f, 0, size).expect("read before the cut"))
        })
        .collect();
    let open: Vec<File> = want.iter().map(|(p, d, _)| open_direct(&image(&mnt, p, d))).collect();

    // sda: cut 1 MiB into the payload of [8 MiB, 11 MiB), so [9 MiB, 11 MiB) is gone.
    // sdb (lz4): cut inside the frame of [8 MiB, 11 MiB), so all of it is gone.
    let sda = src.join("sda.full.data");
    let sda_cut = stored_range(&sda, 8 * MIB).start + MIB;
    let sdb = src.join("sdb.full.data");
    let r = stored_range(&sdb, 8 * MIB);
    let sdb_cut = r.start + (r.end - r.start) / 2;
    for (path, cut) in [(&sda, sda_cut), (&sdb, sdb_cut)] {
        OpenOptions::new().write(true).open(path).expect("open").set_len(cut).expect("truncate");
    }

    // (open image, offset, length, fails): sda of point 0 and 1, sdb of point 0.
    let cases: &[(usize, u64, u64, bool)] = &[
        (0, 0, MIB, false),
        (0, 8 * MIB, MIB, false),
        (0, 9 * MIB, 4 * KIB, true),
        (0, 8 * MIB + 512 * KIB, MIB, true),
        (0, 10 * MIB, MIB, true),
        (0, 11 * MIB, MIB, false),
        (0, 40 * MIB, MIB, false),
        // Point 1's incremental holds [9 MiB, 9 MiB + 64 KiB): not affected.
        (1, 9 * MIB, 64 * KIB, false),
        (1, 9 * MIB + 64 * KIB, 4 * KIB, true),
        (1, 0, MIB, false),
        (2, 0, MIB, false),
        (2, 8 * MIB, 4 * KIB, true),
        (2, 10 * MIB + 512 * KIB, 64 * KIB, true),
        (2, 11 * MIB, MIB, false),
    ];
    // Twice: a failed read leaves nothing behind that breaks the next one.
    for round in 0..2 {
        for &(i, off, len, fails) in cases {
            let (p, d, truth) = &want[i];
            let got = read_direct(&open[i], off, len as usize);
            let what = format!("round {round}: {p}/{d}.raw at {off}+{len}");
            if fails {
                assert_eq!(errno(&got), Some(libc::EIO), "{what}: {:?}", got.map(|v| v.len()));
            } else {
                let got = got.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(got[..] == truth[off as usize..(off + len) as usize], "{what}: other bytes");
            }
        }
    }
    // New opens see the same, and the mount still lists and serves.
    assert_eq!(errno(&read_direct(&open_direct(&image(&mnt, p0, "sda")), 10 * MIB, 4096)), Some(libc::EIO));
    assert!(std::fs::read_dir(mnt.join("sample-vm")).expect("ls").count() >= 4);
    drop(open);
    let log = m.stop().expect("vmback exited");
    for (name, cut) in [("sda.full.data", sda_cut), ("sdb.full.data", sdb_cut)] {
        let line =
            log.lines().find(|l| l.contains(name) && l.contains(&format!("file ends at offset {cut}")));
        assert!(
            line.is_some_and(|l| l.contains("WARN")),
            "no log line for the cut of {name} at {cut}:\n{log}"
        );
    }
    assert_untouched(&before, &sha256_tree(&src), &["sda.full.data", "sdb.full.data"]);
}

// ---------------------------------------------------------------------------------------
// A read error from the disk under SOURCE

/// SOURCE on a disk that fails (EIO) every read touching `bad` in the file named `name`.
#[derive(Debug)]
struct FailingDisk {
    disk: LocalSource,
    name: &'static str,
    bad: Range<u64>,
}

/// An open file of a [`FailingDisk`].
#[derive(Debug)]
struct FailingFile {
    file: Arc<dyn ReadAt>,
    bad: Range<u64>,
}

impl ReadAt for FailingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let end = offset + buf.len() as u64;
        if offset < self.bad.end && self.bad.start < end {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.read_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }

    fn modified(&self) -> Option<std::time::SystemTime> {
        self.file.modified()
    }

    fn data_runs(&self, len: u64) -> io::Result<Vec<Range<u64>>> {
        self.file.data_runs(len)
    }
}

impl Source for FailingDisk {
    fn display(&self, path: &Path) -> PathBuf {
        self.disk.display(path)
    }

    fn list(&self, max_depth: usize) -> Result<Tree, SourceError> {
        self.disk.list(max_depth)
    }

    fn stat(&self, path: &Path) -> Result<Entry, SourceError> {
        self.disk.stat(path)
    }

    fn open(&self, path: &Path) -> Result<Arc<dyn ReadAt>, SourceError> {
        let file = self.disk.open(path)?;
        Ok(if path.file_name().is_some_and(|n| n == self.name) {
            Arc::new(FailingFile { file, bad: self.bad.clone() })
        } else {
            file
        })
    }

    fn read_whole(&self, path: &Path, max: u64) -> Result<Vec<u8>, SourceError> {
        self.disk.read_whole(path, max)
    }
}

fn ino_of(fs: &ImageFs, path: &str) -> Ino {
    path.split('/').fold(ROOT, |dir, name| fs.lookup(dir, name).unwrap_or_else(|e| panic!("{path}: {e}")).ino)
}

/// A file handle of `path`, open for reading and writing.
fn open_path(fs: &ImageFs, path: &str) -> u64 {
    fs.open(ino_of(fs, path), true).unwrap_or_else(|e| panic!("open {path}: {e}")).0
}

/// The filesystem core reading through a disk that fails inside one payload of sda and
/// one lz4 frame of sdb: reads and partial-page writes that need those bytes fail with
/// EIO and a message naming the file and offset; every other read and write works, in
/// the same image and in others, and whole-page writes over the bad range (which need no
/// base bytes) work and read back.
#[test]
fn disk_read_error_fails_only_the_requests_that_need_the_bad_bytes() {
    let t = tempdir();
    let src = sample(t.path());
    let before = sha256_tree(&src);
    let catalog = Catalog::discover(&src).expect("catalog");
    let scratch = t.path().join("scratch");
    std::fs::create_dir_all(&scratch).expect("scratch");
    let config = FsConfig { cache_size: 0, dirty_size: 64 * KIB, writes: Writes::Scratch(scratch.clone()) };
    let good = ImageFs::new(&catalog, &config).expect("fs");
    for (name, disk) in [("sda.full.data", "sda"), ("sdb.full.data", "sdb")] {
        let stored = stored_range(&src.join(name), 8 * MIB);
        // sda: the 4 KiB of payload holding disk bytes [9 MiB, 9 MiB + 4 KiB). sdb: one
        // byte in the middle of the lz4 frame of [8 MiB, 11 MiB), which fails all of it.
        let bad = match disk {
            "sda" => stored.start + MIB..stored.start + MIB + 4 * KIB,
            _ => (stored.start + stored.end) / 2..(stored.start + stored.end) / 2 + 1,
        };
        std::fs::create_dir_all(scratch.join(disk)).expect("scratch");
        let config = FsConfig { writes: Writes::Scratch(scratch.join(disk)), ..config.clone() };
        let failing = FailingDisk { disk: LocalSource::new(&src), name, bad: bad.clone() };
        let failing = Catalog::discover_from(Arc::new(failing)).expect("catalog on the failing disk");
        let fs = ImageFs::new(&failing, &config).expect("fs");
        let path = format!("sample-vm/virtnbdbackup.0/{disk}.raw");
        let fh = open_path(&fs, &path);
        let want = |off: u64, len: u32| good.read(open_path(&good, &path), off, len).expect("good read");
        let hit = 9 * MIB;
        for (off, len) in [(hit, 4096), (hit - 100, 200), (8 * MIB, 2 * MIB as u32)] {
            let err = fs.read(fh, off, len).expect_err(&format!("{path} at {off}+{len}"));
            let msg = vmback::error_chain(&err);
            assert_eq!(err.errno(), libc::EIO, "{msg}");
            assert!(msg.contains(name) && msg.contains("read failed at offset"), "{msg}");
        }
        for (off, len) in [(0, MIB as u32), (hit + 8 * KIB + MIB, 4096), (20 * MIB, 65536)] {
            if disk == "sdb" && (8 * MIB..11 * MIB).contains(&off) {
                continue; // the whole frame is unreadable
            }
            assert_eq!(fs.read(fh, off, len).expect("a read elsewhere"), want(off, len), "{path} at {off}");
        }
        // Point 1 on the same full: its incremental covers [9 MiB, 9 MiB + 64 KiB), so for
        // sda the bad bytes are not needed there; sdb's frame still is, around it.
        let path1 = format!("sample-vm/virtnbdbackup.1/{disk}.raw");
        let fh1 = open_path(&fs, &path1);
        let want1 = |off: u64, len: u32| good.read(open_path(&good, &path1), off, len).expect("good read");
        assert_eq!(fs.read(fh1, hit, 4096).expect("covered by the incremental"), want1(hit, 4096));
        assert_eq!(fs.read(fh1, 0, 4096).expect("a read elsewhere"), want1(0, 4096));
        if disk == "sdb" {
            assert_eq!(fs.read(fh1, 10 * MIB, 4096).map_err(|e| e.errno()).err(), Some(libc::EIO));
        }
        // A partial-page write needs the page's base bytes: EIO, and nothing changes.
        let err = fs.write(fh, hit + 100, b"partial").expect_err("a partial page over the bad bytes");
        assert_eq!(err.errno(), libc::EIO, "{}", vmback::error_chain(&err));
        // Whole pages need no base bytes; a write elsewhere works too.
        let page = vec![0xabu8; 4096];
        assert_eq!(fs.write(fh, hit, &page).expect("a whole-page write"), 4096);
        assert_eq!(fs.read(fh, hit, 4096).expect("reads back from the overlay"), page);
        assert_eq!(fs.write(fh, 100, b"elsewhere").expect("a write elsewhere"), 9);
        assert_eq!(&fs.read(fh, 100, 9).expect("read back")[..], b"elsewhere");
    }
    assert_untouched(&before, &sha256_tree(&src), &[]);
}

/// The sample set put on a disk that is made to fail, and what the checks need about it.
struct OnDisk {
    src: PathBuf,
    /// A copy on the test's own disk: the reference bytes.
    copy: PathBuf,
    before: std::collections::BTreeMap<PathBuf, String>,
    /// sda's full: the file range of the payload of [8 MiB, 11 MiB), and 64 KiB in its
    /// middle that the disk fails, as file offsets and as byte ranges of the device.
    payload: Range<u64>,
    bad_file: Range<u64>,
    bad_device: Vec<Range<u64>>,
}

/// Writes the sample set into `fs_dir/set` (on the disk to fail) and a reference copy into
/// `tmp/copy`, and picks the bytes to fail.
fn put_sample_on(fs_dir: &Path, tmp: &Path) -> OnDisk {
    let src = fs_dir.join("set");
    vmback::sample::write_sample(&src).expect("sample set");
    run_ok("sync", &[]);
    let copy = tmp.join("copy");
    run_ok("cp", &["-a", path_str(&src), path_str(&copy)]);
    let sda = src.join("sda.full.data");
    let payload = stored_range(&sda, 8 * MIB);
    let bad = (payload.start + 3 * MIB / 2).next_multiple_of(64 * KIB);
    let bad_file = bad..bad + 64 * KIB;
    let bad_device = device_ranges(&sda, bad_file.clone());
    OnDisk { before: sha256_tree(&src), src, copy, payload, bad_file, bad_device }
}

/// Reads sda of the first point through a mount of the failing set and of the reference
/// copy: the reads that need the failing blocks get EIO, all others the right bytes, on
/// the same handle; the mount logs the file and offset and exits cleanly. The kernel reads
/// (and fails) whole page-cache folios, which can be larger than a block, so the good
/// reads keep 1 MiB away from the bad blocks.
fn check_failing_reads(tmp: &Path, on: &OnDisk) {
    let mnt = tmp.join("mnt");
    let mut m = Mounted::start(&on.src, &mnt, &["--read-only"]);
    let mref = tmp.join("mref");
    let mut r = Mounted::start(&on.copy, &mref, &["--read-only"]);
    let f = open_direct(&image(&mnt, "virtnbdbackup.0", "sda"));
    let g = open_direct(&image(&mref, "virtnbdbackup.0", "sda"));
    let hit = 8 * MIB + (on.bad_file.start - on.payload.start);
    for (off, len, fails) in [
        (0, MIB, false),
        (8 * MIB, 256 * KIB, false),
        (hit, 4 * KIB, true),
        (hit - 4 * KIB, 8 * KIB, true),
        (hit + MIB, 256 * KIB, false),
        (20 * MIB, MIB, false),
        (hit + 60 * KIB, 4 * KIB, true),
        (hit - 256 * KIB, MIB, true),
        (0, 4 * KIB, false),
    ] {
        let got = read_direct(&f, off, len as usize);
        if fails {
            assert_eq!(errno(&got), Some(libc::EIO), "at {off}+{len}");
        } else {
            let want = read_direct(&g, off, len as usize).expect("reference");
            let got = got.unwrap_or_else(|e| panic!("at {off}+{len}: {e}"));
            assert!(got == want, "other bytes at {off}+{len}");
        }
    }
    drop((f, g));
    r.stop();
    let log = m.stop().expect("vmback exited");
    let at = log.lines().find(|l| l.contains("WARN") && l.contains("sda.full.data: read failed at offset"));
    assert!(at.is_some(), "no log line for the disk error:\n{log}");
}

/// A real disk error, where the kernel has device-mapper: SOURCE on an ext4 on a dm device
/// whose table is switched, while mounted, to an `error` target over the blocks of 64 KiB
/// of sda's payload. Skipped (saying so) without device-mapper's error target.
#[test]
fn disk_read_error_from_a_device_mapper_error_target() {
    if !ready(&["dmsetup", "losetup", "mkfs.ext4", "filefrag", "mount", "umount", "sha256sum"]) {
        return;
    }
    if !root_ready("device-mapper") {
        return;
    }
    let targets = Command::new("dmsetup").arg("targets").output();
    if !targets
        .as_ref()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("error"))
    {
        eprintln!("skipping: device-mapper's error target is not available here (dmsetup targets failed)");
        return;
    }
    let t = tempdir();
    let dm = DmDisk::new(t.path(), 128 * MIB);
    let on = put_sample_on(&dm.dir, t.path());
    let sda = on.src.join("sda.full.data");
    drop_cache(&sda);
    let sectors: Vec<Range<u64>> = on.bad_device.iter().map(|r| r.start / 512..r.end / 512).collect();
    dm.load(&sectors);
    check_failing_reads(t.path(), &on);
    dm.load(&[]);
    drop_cache(&sda);
    assert_untouched(&on.before, &sha256_tree(&on.src), &[]);
}

/// A real disk error without device-mapper: SOURCE on an ext4 whose block device is a
/// loop device over an NBD export (nbdfuse) served by nbdkit with its `ddrescue` filter,
/// whose map marks the blocks of 64 KiB of sda's payload bad: every read of them fails
/// with EIO down in the block layer.
#[test]
fn disk_read_error_from_a_failing_block_device() {
    if !ready(&["nbdkit", "nbdfuse", "losetup", "mkfs.ext4", "filefrag", "mount", "umount", "sha256sum"]) {
        return;
    }
    if !is_root() {
        eprintln!("skipping: loop devices need root");
        return;
    }
    let filter = Command::new("nbdkit").args(["--filter=ddrescue", "null", "--help"]).output();
    if !filter.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("skipping: nbdkit has no ddrescue filter here");
        return;
    }
    let t = tempdir();
    let img = t.path().join("disk.img");
    let size = 128 * MIB;
    File::create(&img).expect("disk image").set_len(size).expect("size");
    run_ok("mkfs.ext4", &["-q", "-F", "-b", "4096", path_str(&img)]);
    let fs = t.path().join("fs");
    let on = {
        let _rw = LoopFs::mount(&img, &fs, false);
        put_sample_on(&fs, t.path())
    };
    // A ddrescue map: all of the disk rescued ('+') except the bad ranges ('-').
    let mut map = String::from("# Mapfile. Created by GNU ddrescue version 1.25\n0x00000000 + 1\n");
    let mut pos = 0;
    for r in &on.bad_device {
        map += &format!(
            "{pos:#010x} {:#010x} +\n{:#010x} {:#010x} -\n",
            r.start - pos,
            r.start,
            r.end - r.start
        );
        pos = r.end;
    }
    map += &format!("{pos:#010x} {:#010x} +\n", size - pos);
    let map_file = t.path().join("disk.map");
    std::fs::write(&map_file, map).expect("map");
    {
        let nbd = NbdFuse::start(&t.path().join("nbd"), &img, &map_file);
        let _ro = LoopFs::mount(&nbd.file, &fs, true);
        check_failing_reads(t.path(), &on);
    }
    let _ro = LoopFs::mount(&img, &fs, true);
    assert_untouched(&on.before, &sha256_tree(&on.src), &[]);
}

fn run_ok(cmd: &str, args: &[&str]) -> String {
    stdout_of_success(
        cmd,
        args,
        Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}")),
    )
}

/// Drops a file's clean pages from the page cache, so the next reads go to the disk.
fn drop_cache(path: &Path) {
    let f = File::open(path).expect("open");
    nix::fcntl::posix_fadvise(&f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .expect("fadvise");
}

/// Where file bytes `range` (4 KiB aligned) are on the filesystem's device, as byte
/// ranges of the device, from `filefrag -v`.
fn device_ranges(file: &Path, range: Range<u64>) -> Vec<Range<u64>> {
    let out = run_ok("filefrag", &["-v", "-b4096", path_str(file)]);
    let (first, last) = (range.start / 4096, range.end / 4096);
    let mut found = Vec::new();
    // Lines like "   0:        0..    2047:      34816..     36863:   2048: ..."
    for line in out.lines() {
        let fields: Vec<&str> = line.split(':').map(str::trim).collect();
        if fields.len() < 4 || fields[0].parse::<u64>().is_err() {
            continue;
        }
        let span = |s: &str| -> Option<(u64, u64)> {
            let (a, b) = s.split_once("..")?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        };
        let (Some((l0, l1)), Some((p0, _))) = (span(fields[1]), span(fields[2])) else { continue };
        let (a, b) = (first.max(l0), last.min(l1 + 1));
        if a < b {
            found.push((p0 + a - l0) * 4096..(p0 + b - l0) * 4096);
        }
    }
    assert!(!found.is_empty(), "no blocks found for {range:?} in:\n{out}");
    found
}

/// A filesystem on a loop device over `backing`, mounted on `dir`; unmounted and detached
/// on drop.
struct LoopFs {
    dir: PathBuf,
    dev: String,
}

impl LoopFs {
    /// Read-only mounts skip the journal (`noload`), so nothing is written to the device.
    fn mount(backing: &Path, dir: &Path, read_only: bool) -> LoopFs {
        std::fs::create_dir_all(dir).expect("mountpoint");
        let ro: &[&str] = if read_only { &["-r"] } else { &[] };
        let dev = run_ok("losetup", &[ro, &["-f", "--show", path_str(backing)]].concat()).trim().to_owned();
        let fs = LoopFs { dir: dir.to_owned(), dev };
        let opts: &[&str] = if read_only { &["-o", "ro,noload"] } else { &[] };
        run_ok("mount", &[opts, &[fs.dev.as_str(), path_str(dir)]].concat());
        fs
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        crate::common::fuse::umount_quietly(&self.dir);
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
    }
}

/// `nbdfuse` showing nbdkit's export of a disk image, with its ddrescue map applied, as the
/// read-only file `file`; unmounted and stopped on drop.
struct NbdFuse {
    child: std::process::Child,
    dir: PathBuf,
    file: PathBuf,
}

impl NbdFuse {
    fn start(dir: &Path, image: &Path, map: &Path) -> NbdFuse {
        std::fs::create_dir_all(dir).expect("nbdfuse mountpoint");
        let file = dir.join("disk");
        let mut cmd = Command::new("nbdfuse");
        crate::common::fuse::die_with_parent(&mut cmd, nix::sys::signal::Signal::SIGTERM);
        let child = cmd
            .arg("-r")
            .arg(&file)
            .args(["--command", "nbdkit", "-s", "--exit-with-parent", "--filter=ddrescue", "file"])
            .arg(image)
            .arg(format!("ddrescue-mapfile={}", map.display()))
            .stdin(std::process::Stdio::null())
            // It reports every failed read; the test checks what vmback says.
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nbdfuse");
        let n = NbdFuse { child, dir: dir.to_owned(), file };
        let up = crate::common::fuse::wait_until(std::time::Duration::from_secs(20), || n.file.exists());
        assert!(up, "nbdfuse did not show {}", n.file.display());
        n
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.dir).output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An ext4 on a device-mapper device over a loop device, mounted on `dir`; torn down on
/// drop.
struct DmDisk {
    image: PathBuf,
    loopdev: String,
    name: String,
    dir: PathBuf,
    sectors: u64,
}

impl DmDisk {
    fn new(tmp: &Path, size: u64) -> DmDisk {
        let image = tmp.join("disk.img");
        File::create(&image).expect("disk image").set_len(size).expect("size");
        let loopdev = run_ok("losetup", &["-f", "--show", path_str(&image)]).trim().to_owned();
        let name = format!("vmback-faults-{}", std::process::id());
        let d = DmDisk { image, loopdev, name, dir: tmp.join("fs"), sectors: size / 512 };
        d.load(&[]);
        run_ok("mkfs.ext4", &["-q", "-F", &d.device()]);
        std::fs::create_dir_all(&d.dir).expect("mountpoint");
        run_ok("mount", &[&d.device(), path_str(&d.dir)]);
        d
    }

    fn device(&self) -> String {
        format!("/dev/mapper/{}", self.name)
    }

    /// Loads a table mapping the loop device linearly, except `bad` sector ranges, which
    /// fail every I/O.
    fn load(&self, bad: &[Range<u64>]) {
        let mut table = String::new();
        let mut pos = 0;
        for r in bad {
            if r.start > pos {
                table += &format!("{pos} {} linear {} {pos}\n", r.start - pos, self.loopdev);
            }
            table += &format!("{} {} error\n", r.start, r.end - r.start);
            pos = r.end;
        }
        if pos < self.sectors {
            table += &format!("{pos} {} linear {} {pos}\n", self.sectors - pos, self.loopdev);
        }
        let exists = Path::new(&self.device()).exists();
        let table_file = self.image.with_extension("table");
        std::fs::write(&table_file, &table).expect("table");
        let verb = if exists { "reload" } else { "create" };
        run_ok("dmsetup", &[verb, &self.name, path_str(&table_file)]);
        if exists {
            run_ok("dmsetup", &["resume", &self.name]);
        }
    }
}

impl Drop for DmDisk {
    fn drop(&mut self) {
        let quiet = |cmd: &str, args: &[&str]| {
            let _ = Command::new(cmd).args(args).output();
        };
        quiet("umount", &[path_str(&self.dir)]);
        quiet("dmsetup", &["remove", &self.name]);
        quiet("losetup", &["-d", &self.loopdev]);
    }
}

// ---------------------------------------------------------------------------------------
// The scratch disk for overlays filling up

/// Overlays on a 1 MiB tmpfs: writes past its room fail with ENOSPC, each failed write
/// changes nothing, what was written before reads back, other images and reads keep
/// working, and the log says which overlay file could not be written and why.
#[test]
fn full_scratch_disk_fails_only_the_writes_that_need_room() {
    if !ready(&["mount", "umount", "sha256sum"]) {
        return;
    }
    if !root_ready("a tmpfs mount") {
        return;
    }
    let t = tempdir();
    let src = sample(t.path());
    let before = sha256_tree(&src);
    let small = t.path().join("small");
    let _tmpfs = small_tmpfs(&small, "1M");
    let mnt = t.path().join("mnt");
    let mut m = Mounted::start(&src, &mnt, &["--overlay-dir", path_str(&small), "--dirty-size", "64K"]);
    let img = image(&mnt, "virtnbdbackup.0", "sda");
    let f = OpenOptions::new().read(true).write(true).open(&img).expect("open rw");
    let d = open_direct(&img);
    let chunk = 64 * KIB;
    // 64 writes of 64 KiB: 4 MiB do not fit a 1 MiB scratch disk.
    let (written, at) = write_until_enospc(&f, 20 * MIB, 64, |k| vec![(k as u8) | 1; chunk as usize]);
    // The failed write left the image as it was (zeros there); earlier writes are intact.
    let there = read_direct(&d, at, chunk as usize).expect("read");
    assert!(there.iter().all(|&b| b == 0), "the write at {at} that failed left bytes in the image");
    for (off, data) in &written {
        assert!(read_direct(&d, *off, data.len()).expect("read") == *data, "write at {off} lost");
    }
    // Every later write that needs room fails the same way, and changes nothing either.
    let again = f.write_all_at(&vec![7u8; chunk as usize], at + MIB).expect_err("still full");
    assert_eq!(again.raw_os_error(), Some(libc::ENOSPC));
    // Reads keep working, of this image and of others.
    assert_eq!(&read_direct(&d, 8 * MIB, 4096).expect("read")[..4], b"sda ");
    let sdb = open_direct(&image(&mnt, "virtnbdbackup.2", "sdb"));
    assert_eq!(&read_direct(&sdb, 0, 4096).expect("read")[..4], b"sdb ");
    drop((f, d, sdb));
    let log = m.stop().expect("vmback exited");
    let overlay_dir = path_str(&small);
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(overlay_dir) && l.contains("No space left on device")),
        "no log line naming the full overlay disk:\n{log}"
    );
    assert_untouched(&before, &sha256_tree(&src), &[]);
}
