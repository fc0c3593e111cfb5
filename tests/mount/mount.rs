//! Real-mount tests: the real `vmback mount` binary over FUSE, driven with the commands a
//! user would run (ls, cmp, cp, du, dd, mount -o loop, fusermount3) and plain syscalls.
//!
//! Every mount is owned by a guard that unmounts and reaps it, whatever the test did.
//! Without /dev/fuse every test prints "skipping: ..." and passes.

mod live;
mod streams;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::{Whence, lseek};

use crate::common::files::pread;
use crate::common::fuse::{is_fuse_mounted, mount_entry, path_str, which};
use crate::common::mounted::{LoopMount, MOUNT_WAIT, Mounted};
use crate::common::ready::root_ready;
use crate::common::run::{run, run_as, run_ok, run_timeout};
use crate::common::tempdir;
use crate::require_fuse;
use streams::{KIB, MIB, Point, Rng, SetBuilder, Style};

const NOBODY: u32 = 65534;

// ---------------------------------------------------------------------------------------
// The shared source tree: two domains in their own set folders, built once per run and
// only ever read (each test mounts it on its own mountpoint).

struct Shared {
    /// SOURCE: holds `vm-alpha/` and `vm-beta/`.
    root: PathBuf,
    /// Per domain, its restore points oldest first.
    domains: Vec<(String, Vec<Point>)>,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

extern "C" fn remove_shared() {
    if let Some(s) = SHARED.get() {
        let _ = std::fs::remove_dir_all(&s.root);
    }
}

fn shared() -> &'static Shared {
    SHARED.get_or_init(|| {
        let root = tempdir().keep();
        let truth = root.join("truth");
        let source = root.join("source");
        let alpha = build_alpha(&source.join("vm-alpha"), &truth);
        let beta = build_beta(&source.join("vm-beta"), &truth);
        // SAFETY: registers an `extern "C" fn()` that takes nothing and only removes the
        // temp tree through a `static`; it runs once at process exit, after every test.
        unsafe { libc::atexit(remove_shared) };
        Shared { root, domains: vec![("vm-alpha".into(), alpha), ("vm-beta".into(), beta)] }
    })
}

impl Shared {
    fn source(&self) -> PathBuf {
        self.root.join("source")
    }
}

/// vm-alpha: `sda` plain, `sdb` lz4 with a 33 MiB extent (split into two lz4 frames) and
/// a resize at inc 2; full, two incrementals and a differential, with unaligned writes
/// that straddle extent ends, frame boundaries and holes.
fn build_alpha(dir: &Path, truth: &Path) -> Vec<Point> {
    let mut rng = Rng(0xa1fa);
    let mut b = SetBuilder::new(dir, truth, "vm-alpha");
    let sda = b.add_disk("sda", 24 * MIB + 12 * KIB, None);
    let sdb = b.add_disk("sdb", 40 * MIB, Some(2));
    let end = 24 * MIB + 12 * KIB;
    let d = b.disk(sda);
    d.fill(&mut rng, Style::Random, 0, MIB);
    d.fill(&mut rng, Style::Text, 4 * MIB, 3 * MIB);
    d.fill(&mut rng, Style::Text, 20 * MIB, 100 * KIB);
    d.fill(&mut rng, Style::Random, end - 8 * KIB, 8 * KIB);
    let d = b.disk(sdb);
    d.fill(&mut rng, Style::Text, 0, 2 * MIB);
    d.fill(&mut rng, Style::Mixed, 3 * MIB, 33 * MIB);
    b.full("2026-05-01T10:00:00.250000");

    let d = b.disk(sda);
    d.fill(&mut rng, Style::Random, MIB - 100, 300);
    d.fill(&mut rng, Style::Text, 5 * MIB + 7, 5000);
    d.fill(&mut rng, Style::Random, 10 * MIB, 64 * KIB);
    let d = b.disk(sdb);
    d.fill(&mut rng, Style::Random, 5 * MIB + 3, 70000);
    d.fill(&mut rng, Style::Text, 35 * MIB + 512, 2 * MIB);
    b.inc("2026-05-02T10:00:00.5");

    let d = b.disk(sda);
    d.fill(&mut rng, Style::Random, 7 * MIB - KIB, 2 * MIB);
    d.fill(&mut rng, Style::Text, 22 * MIB + 4 * KIB, 64 * KIB);
    d.write(2 * MIB, &[0u8; 4096]);
    let d = b.disk(sdb);
    d.grow(44 * MIB);
    d.fill(&mut rng, Style::Mixed, 42 * MIB, MIB);
    d.fill(&mut rng, Style::Text, 100, 10);
    b.inc("2026-05-03T10:00:00");

    let d = b.disk(sda);
    d.fill(&mut rng, Style::Text, 0, 4096);
    d.fill(&mut rng, Style::Random, 12 * MIB, MIB);
    d.write(end - 1, b"!");
    let d = b.disk(sdb);
    d.fill(&mut rng, Style::Random, 35 * MIB - 10, 20);
    d.fill(&mut rng, Style::Random, 43 * MIB + 1, 4095);
    b.diff("2026-05-04T10:00:00.75", 1_777_888_800);
    b.finish()
}

/// vm-beta: `vda` lz4 at an HC level, `vdb` a 128 MiB plain disk holding little data.
fn build_beta(dir: &Path, truth: &Path) -> Vec<Point> {
    let mut rng = Rng(0xbe7a);
    let mut b = SetBuilder::new(dir, truth, "vm-beta");
    let vda = b.add_disk("vda", 8 * MIB, Some(9));
    let vdb = b.add_disk("vdb", 128 * MIB, None);
    b.disk(vda).fill(&mut rng, Style::Text, 0, MIB);
    b.disk(vdb).fill(&mut rng, Style::Random, 0, 64 * KIB);
    b.disk(vdb).fill(&mut rng, Style::Text, 64 * MIB, 2 * MIB);
    b.full("2026-04-10T09:30:00.000001");
    b.disk(vda).fill(&mut rng, Style::Random, 4 * MIB, 128 * KIB);
    b.disk(vdb).fill(&mut rng, Style::Random, 100 * MIB, MIB);
    b.inc("2026-04-11T09:30:00.000001");
    b.finish()
}

/// Every image of the shared tree: (path under the mount, point disk).
fn shared_images(mnt: &Path) -> Vec<(PathBuf, &'static streams::PointDisk)> {
    let s = shared();
    let mut out = Vec::new();
    for (dom, points) in &s.domains {
        for p in points {
            for d in &p.disks {
                out.push((mnt.join(dom).join(&p.name).join(format!("{}.raw", d.disk)), d));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Small helpers.

/// The `.stats` counters.
fn stats(mnt: &Path) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(mnt.join(".stats")).expect("reading .stats");
    text.lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap_or_else(|| panic!("bad .stats line {l:?} in {text:?}"));
            (k.to_owned(), v.parse().unwrap_or_else(|_| panic!("bad .stats value in {l:?}")))
        })
        .collect()
}

/// Local time of a metadata date, as the mount shows it.
fn local_time(date: &str) -> SystemTime {
    use chrono::{Local, NaiveDateTime, TimeZone};
    let naive = NaiveDateTime::parse_from_str(date, "%Y-%m-%dT%H:%M:%S%.f").expect("date");
    SystemTime::from(Local.from_local_datetime(&naive).earliest().expect("local time"))
}

/// `ls -l` lines of `dir` as (mode, size, date, name, link target).
fn ls_l(dir: &Path, all: bool) -> Vec<(String, u64, String, String, Option<String>)> {
    let flags = if all { "-lA" } else { "-l" };
    let out = run_ok("ls", &[flags, "--time-style=+%Y-%m-%dT%H:%M:%S", path_str(dir)]);
    out.lines()
        .filter(|l| !l.starts_with("total"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 7, "odd ls line {l:?}");
            let rest = f[6..].join(" ");
            let (name, target) = match rest.split_once(" -> ") {
                Some((n, t)) => (n.to_owned(), Some(t.to_owned())),
                None => (rest, None),
            };
            (f[0].to_owned(), f[4].parse().expect("size"), f[5].to_owned(), name, target)
        })
        .collect()
}

/// A byte snapshot of a backup set: every file's sha256, size, mtime and ctime.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    for entry in walk(dir) {
        let m = std::fs::symlink_metadata(&entry).expect("stat");
        let sum = run_ok("sha256sum", &[path_str(&entry)]);
        let sum = sum.split_whitespace().next().unwrap_or_default().to_owned();
        let line = format!(
            "{sum} len={} mode={:o} mtime={}.{} ctime={}.{} ino={}",
            m.len(),
            m.mode(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.ino()
        );
        out.insert(entry, line);
    }
    out
}

/// Every regular file under `dir` (symlinks are not followed), sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let p = e.path();
            let t = e.file_type().expect("file type");
            if t.is_dir() {
                todo.push(p);
            } else if t.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn assert_unchanged(before: &BTreeMap<PathBuf, String>, after: &BTreeMap<PathBuf, String>) {
    for (p, was) in before {
        match after.get(p) {
            Some(now) => assert_eq!(was, now, "{} changed", p.display()),
            None => panic!("{} disappeared", p.display()),
        }
    }
    for p in after.keys() {
        assert!(before.contains_key(p), "{} appeared in the backup set", p.display());
    }
}

/// The mount options of `mnt` as /proc/self/mounts shows them.
fn mount_options(mnt: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts");
    mounts
        .lines()
        .rev()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && Path::new(f[1]) == mnt)
        .map(|f| f[3].to_owned())
        .unwrap_or_default()
}

fn errno_of(e: &io::Error) -> Option<Errno> {
    e.raw_os_error().map(Errno::from_raw)
}

// ---------------------------------------------------------------------------------------
// 1. The tree as `ls -l` shows it.

#[test]
fn ls_shows_domains_points_latest_dates_and_sizes() {
    require_fuse!();
    let td = tempdir();
    let src = td.path().join("set");
    vmback::sample::write_sample(&src).expect("sample set");
    let mnt = td.path().join("mnt");
    let m = Mounted::start(&src, &mnt, &[]);

    let root = ls_l(&mnt, true);
    let names: Vec<&str> = root.iter().map(|e| e.3.as_str()).collect();
    assert_eq!(names, [".stats", "sample-vm"], "{root:?}");
    assert!(root[1].0.starts_with("dr-x"), "domain dir mode: {root:?}");

    let dom = mnt.join("sample-vm");
    let points = [
        ("virtnbdbackup.0", "2026-06-01T08:00:00.000001", "virtnbdbackup.0"),
        ("virtnbdbackup.1", "2026-06-02T08:00:00.000001", "virtnbdbackup.1"),
        ("virtnbdbackup.2", "2026-06-03T08:00:00.000001", "virtnbdbackup.2"),
        ("virtnbdbackup.2.diff.20260604-080000", "2026-06-04T08:00:00.000001", "1780560000"),
    ];
    let listing = ls_l(&dom, false);
    let mut want: Vec<String> = points.iter().map(|p| p.0.to_owned()).collect();
    want.insert(0, "latest".into());
    assert_eq!(listing.iter().map(|e| e.3.clone()).collect::<Vec<_>>(), want, "{listing:?}");
    let latest = &listing[0];
    assert!(latest.0.starts_with('l'), "latest is a symlink: {latest:?}");
    assert_eq!(latest.4.as_deref(), Some(points[3].0), "latest points at the newest restore point");
    assert_eq!(latest.2, "2026-06-04T08:00:00");
    assert_eq!(std::fs::read_link(dom.join("latest")).expect("readlink"), Path::new(points[3].0));
    assert_eq!(
        std::fs::metadata(&dom).expect("stat").modified().expect("mtime"),
        local_time(points[3].1),
        "the domain dir's mtime is its newest backup"
    );

    for (entry, (name, date, ident)) in listing[1..].iter().zip(points) {
        assert!(entry.0.starts_with("dr-x"), "{entry:?}");
        assert_eq!(entry.2, &date[..19], "{name}: dir mtime is the backup date");
        let dir = dom.join(name);
        assert_eq!(std::fs::metadata(&dir).expect("stat").modified().expect("mtime"), local_time(date));
        let files = ls_l(&dir, false);
        let cfg_len = std::fs::metadata(src.join(format!("vmconfig.{ident}.xml"))).expect("cfg").len();
        // Images are writable by default (writes go to overlays); the saved XML is not.
        let info_len = std::fs::metadata(dir.join("info.json")).expect("info.json").len();
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("info.json")).expect("read info.json"))
                .expect("info.json is JSON");
        assert_eq!(info["point"], *name, "{info}");
        assert_eq!(info["status"], "complete", "{info}");
        let expect = [
            ("info.json", info_len, "-r--r--r--"),
            ("sda.raw", 64 * MIB, "-rw-r--r--"),
            ("sdb.raw", 16 * MIB, "-rw-r--r--"),
            ("vmconfig.xml", cfg_len, "-r--r--r--"),
        ];
        assert_eq!(files.len(), expect.len(), "{name}: {files:?}");
        for (f, (fname, size, mode)) in files.iter().zip(expect) {
            assert_eq!(f.3, fname, "{name}: {files:?}");
            assert_eq!(f.0, mode, "{name}/{fname}: mode");
            assert_eq!(f.1, size, "{name}/{fname}: size");
            assert_eq!(f.2, &date[..19], "{name}/{fname}: mtime is the backup date");
            let meta = std::fs::metadata(dir.join(fname)).expect("stat");
            assert_eq!(meta.modified().expect("mtime"), local_time(date), "{name}/{fname}");
        }
        let cfg = std::fs::read(dir.join("vmconfig.xml")).expect("vmconfig.xml");
        assert_eq!(cfg, std::fs::read(src.join(format!("vmconfig.{ident}.xml"))).expect("cfg"));
    }

    // `ls -lR` of the whole tree works and mentions nothing else.
    let all = run_ok("ls", &["-lR", path_str(&mnt)]);
    assert_eq!(all.matches(".raw").count(), 8, "{all}");
    assert_eq!(all.matches("vmconfig.xml").count(), 4, "{all}");
    drop(m);
}

#[test]
fn ls_of_a_tree_with_two_domains() {
    require_fuse!();
    let s = shared();
    let td = tempdir();
    let mnt = td.path().join("mnt");
    let _m = Mounted::start(&s.source(), &mnt, &[]);
    let root: Vec<String> = ls_l(&mnt, false).into_iter().map(|e| e.3).collect();
    assert_eq!(root, ["vm-alpha", "vm-beta"]);
    for (dom, points) in &s.domains {
        let listing = ls_l(&mnt.join(dom), false);
        let newest = points.iter().max_by_key(|p| local_time(&p.date)).expect("points");
        let mut want: Vec<String> = points.iter().map(|p| p.name.clone()).collect();
        want.insert(0, "latest".into());
        assert_eq!(listing.iter().map(|e| e.3.clone()).collect::<Vec<_>>(), want, "{dom}: {listing:?}");
        assert_eq!(listing[0].4.as_deref(), Some(newest.name.as_str()), "{dom}: latest");
        for p in points {
            let files = ls_l(&mnt.join(dom).join(&p.name), false);
            for d in &p.disks {
                let f = files
                    .iter()
                    .find(|f| f.3 == format!("{}.raw", d.disk))
                    .unwrap_or_else(|| panic!("{dom}/{}: no {}.raw in {files:?}", p.name, d.disk));
                assert_eq!(f.1, d.size, "{dom}/{}/{}: virtual size", p.name, d.disk);
                assert_eq!(f.2, &p.date[..19], "{dom}/{}/{}: date", p.name, d.disk);
            }
            let cfg = files.iter().find(|f| f.3 == "vmconfig.xml").expect("vmconfig.xml");
            assert_eq!(cfg.1, std::fs::metadata(&p.vmconfig).expect("cfg").len());
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. Whole images.

#[test]
fn every_image_matches_the_truth() {
    require_fuse!();
    let s = shared();
    let td = tempdir();
    let mnt = td.path().join("mnt");
    let m = Mounted::start(&s.source(), &mnt, &[]);
    let mut compared = 0;
    for (img, d) in shared_images(&mnt) {
        let out = run("cmp", &[path_str(&d.truth), path_str(&img)]);
        assert!(
            out.status.success(),
            "cmp {} {}: {}{}",
            d.truth.display(),
            img.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        compared += 1;
    }
    assert_eq!(compared, 4 * 2 + 2 * 2);
    for (dom, points) in &s.domains {
        for p in points {
            let cfg = mnt.join(dom).join(&p.name).join("vmconfig.xml");
            run_ok("cmp", &[path_str(&p.vmconfig), path_str(&cfg)]);
        }
        // `latest/` is the newest point.
        let newest = points.last().expect("points");
        for d in &newest.disks {
            let img = mnt.join(dom).join("latest").join(format!("{}.raw", d.disk));
            run_ok("cmp", &[path_str(&d.truth), path_str(&img)]);
        }
    }
    // O_DIRECT (qemu's cache=none) and mmap read the same bytes.
    let alpha = &s.domains[0].1[3];
    for d in &alpha.disks {
        let img = mnt.join("vm-alpha").join(&alpha.name).join(format!("{}.raw", d.disk));
        let script = format!(
            "dd if='{}' iflag=direct bs=1M status=none | cmp - '{}'",
            img.display(),
            d.truth.display()
        );
        run_ok("sh", &["-c", &script]);
        if which("python3").is_some() {
            let py = "import hashlib, mmap, sys\n\
                      f = open(sys.argv[1], 'rb')\n\
                      m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n\
                      print(len(m), hashlib.sha256(m).hexdigest())";
            let got = run_ok("python3", &["-c", py, path_str(&img)]);
            let want = run_ok("python3", &["-c", py, path_str(&d.truth)]);
            assert_eq!(got, want, "mmap of {}", img.display());
        }
    }
    assert!(m.log().lines().all(|l| !l.contains("ERROR")), "{}", m.log());
}

/// Restore points keep their chains however many there are: 121 points in one folder
/// (the directory listing takes several readdir calls), a chain 121 files deep, and
/// checkpoint 10 sorting after checkpoint 9.
#[test]
fn hundreds_of_restore_points_list_and_read() {
    require_fuse!();
    let td = tempdir();
    let set = td.path().join("set");
    let mut rng = Rng(0x121);
    let mut b = SetBuilder::new(&set, &td.path().join("truth"), "vm-daily");
    let vda = b.add_disk("vda", 2 * MIB, Some(2));
    b.disk(vda).fill(&mut rng, Style::Text, 0, 256 * KIB);
    b.full("2025-01-01T02:00:00");
    for day in 1..=120u64 {
        let off = rng.below(2 * MIB - 4096);
        let len = 1 + rng.below(4096);
        b.disk(vda).fill(&mut rng, Style::Random, off, len);
        let date = format!("2025-{:02}-{:02}T02:00:00", 1 + (day / 28).min(11), 1 + day % 28);
        b.inc(&date);
    }
    let points = b.finish();
    let mnt = td.path().join("mnt");
    let _m = Mounted::start(&set, &mnt, &[]);
    let dom = mnt.join("vm-daily");
    let listed: std::collections::BTreeSet<String> = std::fs::read_dir(&dom)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    let mut want: std::collections::BTreeSet<String> = points.iter().map(|p| p.name.clone()).collect();
    want.insert("latest".into());
    assert_eq!(listed, want);
    let ls = run_ok("ls", &["-1", path_str(&dom)]);
    assert_eq!(ls.lines().count(), 122, "{ls}");
    assert_eq!(std::fs::read_link(dom.join("latest")).expect("latest"), Path::new("virtnbdbackup.120"));
    for i in [0, 9, 10, 11, 99, 100, 120] {
        let p = &points[i];
        assert_eq!(p.name, format!("virtnbdbackup.{i}"));
        let img = dom.join(&p.name).join("vda.raw");
        run_ok("cmp", &[path_str(&p.disks[0].truth), path_str(&img)]);
    }
}

/// Several folders of one domain (monthly rotation): each point is prefixed with its
/// folder's start, and `latest` is the newest across folders.
#[test]
fn rotation_folders_of_one_domain_merge_into_one_dir() {
    require_fuse!();
    let td = tempdir();
    let src = td.path().join("backups");
    let mut rng = Rng(0x4070);
    let mut sets = Vec::new();
    for (month, day2) in [("2026-04", false), ("2026-05", true)] {
        let mut b = SetBuilder::new(&src.join(month), &td.path().join(format!("truth-{month}")), "vm-rot");
        let sda = b.add_disk("sda", 4 * MIB, None);
        b.disk(sda).fill(&mut rng, Style::Random, 0, MIB);
        b.full(&format!("{month}-01T00:00:00"));
        b.disk(sda).fill(&mut rng, Style::Text, 2 * MIB, 4 * KIB);
        if day2 {
            b.diff(&format!("{month}-02T12:00:00"), 1_777_723_200);
        } else {
            b.inc(&format!("{month}-02T00:00:00"));
        }
        sets.push((month, b.finish()));
    }
    let mnt = td.path().join("mnt");
    let _m = Mounted::start(&src, &mnt, &[]);
    let dom = mnt.join("vm-rot");
    let mut names = Vec::new();
    for (month, points) in &sets {
        let prefix = format!("{}01-000000", month.replace('-', ""));
        for p in points {
            let name = format!("{prefix}.{}", p.name);
            let img = dom.join(&name).join("sda.raw");
            run_ok("cmp", &[path_str(&p.disks[0].truth), path_str(&img)]);
            names.push(name);
        }
    }
    let mut listed: Vec<String> = ls_l(&dom, false).into_iter().map(|e| e.3).collect();
    listed.retain(|n| n != "latest");
    names.sort();
    assert_eq!(listed, names);
    assert_eq!(
        std::fs::read_link(dom.join("latest")).expect("latest"),
        Path::new("20260501-000000.virtnbdbackup.0.diff.20260502-120000")
    );
}

/// Domain names come from the backed-up XML: whatever they hold, they become one safe
/// directory name in the mount.
#[test]
fn odd_domain_names_become_safe_directories() {
    require_fuse!();
    let td = tempdir();
    let src = td.path().join("backups");
    let mut rng = Rng(0x0dd);
    let mut expect = Vec::new();
    for (folder, xml_name, shown) in
        [("a", "web server ü", "web server ü"), ("b", "../../etc", ".._.._etc"), ("c", "..", "_..")]
    {
        let mut b = SetBuilder::new(&src.join(folder), &td.path().join(format!("truth-{folder}")), "odd");
        let sda = b.add_disk("sda", MIB, None);
        b.disk(sda).fill(&mut rng, Style::Random, 0, 64 * KIB);
        b.full("2026-01-01T00:00:00");
        let points = b.finish();
        let cfg = &points[0].vmconfig;
        let xml = std::fs::read_to_string(cfg)
            .expect("xml")
            .replace("<name>odd</name>", &format!("<name>{xml_name}</name>"));
        std::fs::write(cfg, xml).expect("xml");
        std::fs::remove_file(src.join(folder).join("odd.cpt")).expect("cpt");
        expect.push((shown, points));
    }
    let mnt = td.path().join("mnt");
    let _m = Mounted::start(&src, &mnt, &[]);
    // `ls -A`: a name that starts with a dot is hidden from plain `ls`.
    let root: Vec<String> = ls_l(&mnt, true).into_iter().map(|e| e.3).filter(|n| n != ".stats").collect();
    let mut want: Vec<String> = expect.iter().map(|e| e.0.to_owned()).collect();
    want.sort();
    assert_eq!(root, want);
    for (shown, points) in &expect {
        let img = mnt.join(shown).join("virtnbdbackup.0/sda.raw");
        run_ok("cmp", &[path_str(&points[0].disks[0].truth), path_str(&img)]);
    }
}

// ---------------------------------------------------------------------------------------
// 3. Concurrent random reads.

#[test]
fn concurrent_random_unaligned_reads_match_the_truth() {
    require_fuse!();
    let s = shared();
    let td = tempdir();
    let mnt = td.path().join("mnt");
    let mut m = Mounted::start(&s.source(), &mnt, &[]);
    let images = shared_images(&mnt);
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let images = &images;
            scope.spawn(move || {
                let mut rng = Rng(0xc0ffee + t);
                let opened: Vec<(File, File, u64)> = images
                    .iter()
                    .map(|(img, d)| {
                        let f = File::open(img).unwrap_or_else(|e| panic!("{}: {e}", img.display()));
                        (f, File::open(&d.truth).expect("truth"), d.size)
                    })
                    .collect();
                for i in 0..150 {
                    let k = rng.below(opened.len() as u64) as usize;
                    let (img, truth, size) = &opened[k];
                    // Mostly inside the image, sometimes across or past its end.
                    let off = rng.below(size + 64 * KIB);
                    let len = 1 + rng.below(if i % 8 == 0 { 2 * MIB } else { 200 * KIB }) as usize;
                    let got = pread(img, off, len).unwrap_or_else(|e| {
                        panic!("thread {t}: {} @{off}+{len}: {e}", images[k].0.display())
                    });
                    let want = pread(truth, off, len).expect("truth read");
                    assert_eq!(got.len(), want.len(), "thread {t}: {} @{off}+{len}", images[k].0.display());
                    if got != want {
                        let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                        panic!("thread {t}: {} @{off}+{len} differs at +{at}", images[k].0.display());
                    }
                }
            });
        }
    });
    assert!(m.alive(), "vmback died:\n{}", m.log());
    // Every lz4 frame was decoded once, however many threads wanted it at the same time.
    let st = stats(&mnt);
    assert!(st["misses"] <= st["cache_entries"], "frames decoded more than once: {st:?}");
    m.stop_with(Signal::SIGTERM);
}

// ---------------------------------------------------------------------------------------
// 4. SEEK_DATA / SEEK_HOLE.

/// What SEEK_DATA and SEEK_HOLE must return at `off`, from the merged data ranges.
fn expected_seek(data: &[(u64, u64)], size: u64, off: u64) -> (Result<u64, Errno>, Result<u64, Errno>) {
    if off >= size {
        return (Err(Errno::ENXIO), Err(Errno::ENXIO));
    }
    let d = match data.iter().find(|r| r.1 > off) {
        Some(r) => Ok(r.0.max(off)),
        None => Err(Errno::ENXIO),
    };
    let h = match data.iter().find(|r| r.0 <= off && off < r.1) {
        Some(r) => Ok(r.1),
        None => Ok(off),
    };
    (d, h)
}

/// `data` widened to whole `g`-byte blocks, as a filesystem with `g`-byte blocks reports
/// it; `g == 1` is exact. A filesystem may call zeros data, so any of these is right.
fn widened(data: &[(u64, u64)], size: u64, g: u64) -> Vec<(u64, u64)> {
    streams::merge(
        data.iter().map(|&(a, b)| (a / g * g, b.div_ceil(g).saturating_mul(g).min(size))).collect(),
    )
}

/// Block sizes at which vmback may report data and holes.
const SEEK_GRAINS: [u64; 3] = [1, 512, 4096];

#[test]
fn seek_data_and_seek_hole_follow_the_data() {
    require_fuse!();
    let s = shared();
    let td = tempdir();
    let mnt = td.path().join("mnt");
    let _m = Mounted::start(&s.source(), &mnt, &[]);
    let mut rng = Rng(0x5eec);
    for (img, d) in shared_images(&mnt) {
        assert!(!d.data.is_empty());
        let f = File::open(&img).expect("image");
        // A walk with SEEK_DATA / SEEK_HOLE (what cp, tar and qemu-img do) finds the data
        // ranges, exactly or widened to blocks.
        let mut walked = Vec::new();
        let mut pos = 0u64;
        while let Ok(start) = lseek(&f, pos as i64, Whence::SeekData) {
            let end = lseek(&f, start, Whence::SeekHole).expect("SEEK_HOLE after SEEK_DATA") as u64;
            assert!(end > start as u64, "{}: empty data range at {start}", img.display());
            walked.push((start as u64, end));
            pos = end;
        }
        let data = SEEK_GRAINS
            .iter()
            .map(|&g| widened(&d.data, d.size, g))
            .find(|w| *w == walked)
            .unwrap_or_else(|| panic!("{}: walk found {walked:?}, data is {:?}", img.display(), d.data));
        // Then every probe answers by the same ranges, ENXIO past the end and the last data.
        let mut probes = vec![0, 1, d.size - 1, d.size, d.size + 4096];
        for &(a, b) in d.data.iter().chain(&data) {
            probes.extend([a.saturating_sub(1), a, a + 1, b - 1, b, b + 1]);
        }
        probes.extend((0..20).map(|_| rng.below(d.size)));
        for off in probes {
            let (want_data, want_hole) = expected_seek(&data, d.size, off);
            let got_data = lseek(&f, off as i64, Whence::SeekData).map(|p| p as u64);
            let got_hole = lseek(&f, off as i64, Whence::SeekHole).map(|p| p as u64);
            assert_eq!(got_data, want_data, "{} SEEK_DATA {off} (data {data:?})", img.display());
            assert_eq!(got_hole, want_hole, "{} SEEK_HOLE {off} (data {data:?})", img.display());
        }
        // What is reported as a hole reads as zeros.
        if let Some(&(_, end)) = data.first()
            && end < d.size
        {
            let gap = pread(&f, end, 4096.min((d.size - end) as usize)).expect("read hole");
            assert!(gap.iter().all(|&b| b == 0), "{}: hole at {end} is not zeros", img.display());
        }
    }
    // Other files are all data.
    let cfg = File::open(mnt.join("vm-beta/virtnbdbackup.0/vmconfig.xml")).expect("cfg");
    let len = cfg.metadata().expect("stat").len();
    assert_eq!(lseek(&cfg, 3, Whence::SeekData), Ok(3));
    assert_eq!(lseek(&cfg, 3, Whence::SeekHole), Ok(len as i64));
    assert_eq!(lseek(&cfg, len as i64, Whence::SeekData), Err(Errno::ENXIO));
}

// ---------------------------------------------------------------------------------------
// 5. Sparse copies and du.

#[test]
fn sparse_cp_and_du_show_the_thin_size() {
    require_fuse!();
    let s = shared();
    let td = tempdir();
    let mnt = td.path().join("mnt");
    let _m = Mounted::start(&s.source(), &mnt, &[]);
    for (img, d) in shared_images(&mnt) {
        // The data bytes, exactly or counted in whole blocks, in 512-byte units.
        let thin: Vec<u64> = SEEK_GRAINS
            .iter()
            .map(|&g| streams::total(&widened(&d.data, d.size, g)).div_ceil(512) * 512)
            .collect();
        let du = run_ok("du", &["-B1", path_str(&img)]);
        let du: u64 = du.split_whitespace().next().expect("du").parse().expect("du number");
        assert!(thin.contains(&du), "du of {} is {du}, data is {thin:?} (virtual {})", img.display(), d.size);
        let du_apparent = run_ok("du", &["-B1", "--apparent-size", path_str(&img)]);
        assert!(du_apparent.starts_with(&format!("{}\t", d.size)), "{du_apparent}");
        let meta = std::fs::metadata(&img).expect("stat");
        assert_eq!(meta.blocks() * 512, du, "st_blocks of {}", img.display());
    }

    // The sparsest image: 128 MiB with 3 MiB of data.
    let beta = &s.domains[1].1[1];
    let d = beta.disks.iter().find(|d| d.disk == "vdb").expect("vdb");
    let img = mnt.join("vm-beta").join(&beta.name).join("vdb.raw");
    let copy = td.path().join("vdb-copy.raw");
    run_ok("cp", &["--sparse=always", path_str(&img), path_str(&copy)]);
    run_ok("cmp", &[path_str(&d.truth), path_str(&copy)]);
    let meta = std::fs::metadata(&copy).expect("copy");
    assert_eq!(meta.len(), d.size);
    let allocated = meta.blocks() * 512;
    let data = streams::total(&d.data);
    assert!(
        allocated <= data + MIB && allocated * 16 < d.size,
        "copy of {} is not sparse: {allocated} bytes allocated for {data} bytes of data in {}",
        img.display(),
        d.size
    );

    // `cp -a` of a whole restore point keeps the backup dates and stays sparse.
    let dest = td.path().join("restore");
    run_ok(
        "cp",
        &["-a", "--sparse=always", path_str(&mnt.join("vm-beta").join(&beta.name)), path_str(&dest)],
    );
    for pd in &beta.disks {
        let copy = dest.join(format!("{}.raw", pd.disk));
        run_ok("cmp", &[path_str(&pd.truth), path_str(&copy)]);
        let m = std::fs::metadata(&copy).expect("copy");
        assert_eq!(m.modified().expect("mtime"), local_time(&beta.date), "{}", copy.display());
        assert!(m.blocks() * 512 <= streams::total(&pd.data) + MIB, "{} is not sparse", copy.display());
    }
    run_ok("cmp", &[path_str(&beta.vmconfig), path_str(&dest.join("vmconfig.xml"))]);
}

/// qemu-img, what a user restores with: `info` sees a raw image of the virtual size,
/// `map` sees the data where the backup has it, and `convert` to qcow2 is identical.
#[test]
fn qemu_img_info_map_and_convert() {
    require_fuse!();
    if which("qemu-img").is_none() {
        eprintln!("skipping: qemu-img is not installed");
        return;
    }
    let s = shared();
    let td = tempdir();
    let mnt = td.path().join("mnt");
    let _m = Mounted::start(&s.source(), &mnt, &[]);
    // Extents on 4 KiB boundaries, as real backups have them (qemu's dirty bitmaps and
    // allocation are 64 KiB / 512-byte grained): vm-alpha's full, vm-beta.
    let alpha = &s.domains[0].1[0];
    let beta = &s.domains[1].1[1];
    let picks = [("vm-alpha", alpha, "sdb"), ("vm-beta", beta, "vdb"), ("vm-beta", beta, "vda")];
    qemu_img_checks(&mnt, td.path(), &picks);
}

/// The stream format does not require aligned extents (doc/FORMAT.md §1.8): a data
/// extent starting 1 byte into a sector must survive `qemu-img convert` too.
#[test]
fn qemu_img_convert_keeps_unaligned_extents() {
    require_fuse!();
    if which("qemu-img").is_none() {
        eprintln!("skipping: qemu-img is not installed");
        return;
    }
    let s = shared();
    let td = tempdir();
    let mnt = td.path().join("mnt");
    let _m = Mounted::start(&s.source(), &mnt, &["--read-only"]);
    // vm-alpha's diff: data at [43 MiB + 1, 43 MiB + 4096) and other odd edges.
    let diff = &s.domains[0].1[3];
    qemu_img_checks(&mnt, td.path(), &[("vm-alpha", diff, "sdb"), ("vm-alpha", diff, "sda")]);
}

fn qemu_img_checks(mnt: &Path, tmp: &Path, picks: &[(&str, &Point, &str)]) {
    for &(dom, p, disk) in picks {
        let d = p.disks.iter().find(|d| d.disk == disk).expect("disk");
        let img = mnt.join(dom).join(&p.name).join(format!("{disk}.raw"));
        let info: serde_json::Value = serde_json::from_str(&run_ok(
            "qemu-img",
            &["info", "--output=json", "-f", "raw", path_str(&img)],
        ))
        .expect("info json");
        assert_eq!(info["virtual-size"].as_u64(), Some(d.size), "{info}");

        let map: serde_json::Value =
            serde_json::from_str(&run_ok("qemu-img", &["map", "--output=json", "-f", "raw", path_str(&img)]))
                .expect("map json");
        let data: Vec<(u64, u64)> = map
            .as_array()
            .expect("map list")
            .iter()
            .filter(|e| e["data"].as_bool() == Some(true))
            .map(|e| {
                let (start, len) =
                    (e["start"].as_u64().expect("start"), e["length"].as_u64().expect("length"));
                (start, start + len)
            })
            .collect();
        // qemu may widen ranges to its alignment; every data byte must be inside its map.
        let data = streams::merge(data);
        for &(a, b) in &d.data {
            assert!(
                data.iter().any(|&(x, y)| x <= a && b <= y),
                "{}: data {a}..{b} missing from qemu-img map {data:?}",
                img.display()
            );
        }
        assert!(streams::total(&data) <= streams::total(&d.data) + 64 * KIB * d.data.len() as u64);

        let qcow = tmp.join(format!("{dom}-{}-{disk}.qcow2", p.name));
        run_ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", path_str(&img), path_str(&qcow)]);
        let cmp =
            run_ok("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", path_str(&d.truth), path_str(&qcow)]);
        assert!(cmp.contains("identical"), "{cmp}");
    }
}

// ---------------------------------------------------------------------------------------
// 6. An ext4 filesystem inside the images, loop-mounted read-only.

/// Writes `files` (relative path -> content) under `root`.
fn write_tree(root: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (rel, bytes) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, bytes).expect("write file");
    }
}

fn check_tree(root: &Path, files: &BTreeMap<String, Vec<u8>>, gone: &[&str], what: &str) {
    for (rel, want) in files {
        let got = std::fs::read(root.join(rel)).unwrap_or_else(|e| panic!("{what}: {rel}: {e}"));
        assert!(got == *want, "{what}: {rel} differs ({} vs {} bytes)", got.len(), want.len());
    }
    for rel in gone {
        assert!(!root.join(rel).exists(), "{what}: {rel} should not exist");
    }
}

#[test]
fn ext4_inside_an_image_loop_mounts_read_only() {
    require_fuse!();
    if !root_ready("loop mounts") {
        return;
    }
    if which("mkfs.ext4").is_none() || !run("losetup", &["-f"]).status.success() {
        eprintln!("skipping: needs mkfs.ext4 and a free loop device");
        return;
    }
    let td = tempdir();
    let work = td.path().join("work");
    std::fs::create_dir_all(&work).expect("work");
    let raw0 = work.join("disk0.raw");
    File::create(&raw0).and_then(|f| f.set_len(64 * MIB)).expect("raw");
    run_ok("mkfs.ext4", &["-F", "-q", "-L", "vmbacktest", path_str(&raw0)]);

    let mut rng = Rng(0xe474);
    let big = {
        let mut v = streams::content(&mut rng, Style::Mixed, 0, 6 * MIB);
        v.extend(streams::content(&mut rng, Style::Random, 0, 12345));
        v
    };
    let mut files0 = BTreeMap::new();
    files0.insert("data/big.bin".to_owned(), big.clone());
    files0.insert("etc/hostname".to_owned(), b"vm-ext4\n".to_vec());
    files0.insert("docs/readme.txt".to_owned(), streams::content(&mut rng, Style::Text, 0, 30000));
    files0.insert("empty".to_owned(), Vec::new());
    let fsdir = work.join("fs");
    {
        let lm = LoopMount::mount(&raw0, &fsdir, "loop");
        write_tree(&fsdir, &files0);
        lm.unmount();
    }

    // The next day: part of big.bin is rewritten in place, a file is added, one removed.
    let raw1 = work.join("disk1.raw");
    streams::sparse_copy(&raw0, &raw1).expect("copy");
    let mut files1 = files0.clone();
    let patch = streams::content(&mut rng, Style::Random, 0, MIB + 77);
    {
        let lm = LoopMount::mount(&raw1, &fsdir, "loop");
        let f = OpenOptions::new().write(true).open(fsdir.join("data/big.bin")).expect("big.bin");
        f.write_all_at(&patch, 2 * MIB + 5).expect("patch");
        f.sync_all().expect("sync");
        drop(f);
        std::fs::remove_file(fsdir.join("docs/readme.txt")).expect("rm");
        std::fs::write(fsdir.join("docs/new.txt"), b"written after the full backup\n").expect("new");
        lm.unmount();
    }
    let b = files1.get_mut("data/big.bin").expect("big");
    b[(2 * MIB + 5) as usize..(3 * MIB + 82) as usize].copy_from_slice(&patch);
    files1.remove("docs/readme.txt");
    files1.insert("docs/new.txt".to_owned(), b"written after the full backup\n".to_vec());

    // The backup set: an lz4 full and an incremental of the changed blocks.
    let set = td.path().join("set");
    std::fs::create_dir_all(set.join("checkpoints")).expect("set");
    let spec = |date, cpt, parent, inc| streams::Spec {
        disk: "sda",
        date,
        checkpoint: cpt,
        parent,
        incremental: inc,
        compressed: Some(2),
    };
    streams::full_stream(
        &raw0,
        &set.join("sda.full.data"),
        &spec("2026-03-01T01:00:00", "virtnbdbackup.0", "", false),
    )
    .expect("full");
    let changed = streams::changed_blocks(&raw0, &raw1, 4096).expect("diff");
    assert!(!changed.is_empty() && streams::total(&changed) < 8 * MIB, "changed: {changed:?}");
    streams::inc_stream(
        &raw1,
        &changed,
        &set.join("sda.inc.virtnbdbackup.1.data"),
        &spec("2026-03-02T01:00:00", "virtnbdbackup.1", "virtnbdbackup.0", true),
    )
    .expect("inc");
    for ident in ["virtnbdbackup.0", "virtnbdbackup.1"] {
        let xml = format!(
            "<domain type='kvm'>\n  <name>ext4-vm</name>\n  <description>{ident}</description>\n</domain>\n"
        );
        std::fs::write(set.join(format!("vmconfig.{ident}.xml")), xml).expect("vmconfig");
    }
    std::fs::write(set.join("ext4-vm.cpt"), r#"["virtnbdbackup.0", "virtnbdbackup.1"]"#).expect("cpt");
    let before = snapshot(&set);

    let mnt = td.path().join("mnt");
    let mut m = Mounted::start(&set, &mnt, &[]);
    let ro = td.path().join("ro");
    for (point, raw, files, gone) in [
        ("virtnbdbackup.0", &raw0, &files0, &["docs/new.txt"][..]),
        ("virtnbdbackup.1", &raw1, &files1, &["docs/readme.txt"][..]),
    ] {
        let img = mnt.join("ext4-vm").join(point).join("sda.raw");
        run_ok("cmp", &[path_str(raw), path_str(&img)]);
        let lm = LoopMount::mount(&img, &ro, "loop,ro");
        check_tree(&ro, files, gone, point);
        let ls = run_ok("ls", &["-la", path_str(&ro.join("docs"))]);
        assert!(ls.contains(if point.ends_with('0') { "readme.txt" } else { "new.txt" }), "{ls}");
        // The filesystem is read-only all the way down.
        let err = std::fs::write(ro.join("etc/hostname"), b"x").expect_err("write in a ro mount");
        assert_eq!(errno_of(&err), Some(Errno::EROFS), "{err}");
        lm.unmount();
    }
    m.stop_with(Signal::SIGTERM);
    assert_unchanged(&before, &snapshot(&set));
}

// ---------------------------------------------------------------------------------------
// 7. Writes fail.

#[test]
fn read_only_mount_fails_writes_with_erofs() {
    require_fuse!();
    let s = shared();
    let td = tempdir();
    let mnt = td.path().join("mnt");
    let _m = Mounted::start(&s.source(), &mnt, &["--read-only"]);
    let p = &s.domains[0].1[0];
    let d = &p.disks[0];
    let dir = mnt.join("vm-alpha").join(&p.name);
    let img = dir.join(format!("{}.raw", d.disk));
    assert!(
        mount_entry(&mnt).is_some_and(|_| mount_options(&mnt).split(',').any(|o| o == "ro")),
        "not mounted ro: {}",
        mount_options(&mnt)
    );
    for f in ls_l(&dir, false) {
        assert_eq!(f.0, "-r--r--r--", "{f:?}");
    }

    let opens: [(&str, OpenOptions); 5] = [
        ("write", OpenOptions::new().write(true).clone()),
        ("read+write", OpenOptions::new().read(true).write(true).clone()),
        ("append", OpenOptions::new().append(true).clone()),
        ("truncate", OpenOptions::new().write(true).truncate(true).clone()),
        ("create", OpenOptions::new().write(true).create(true).clone()),
    ];
    for (what, o) in &opens {
        for target in [&img, &dir.join("vmconfig.xml"), &mnt.join(".stats")] {
            let err = o.open(target).expect_err("opened for writing");
            assert_eq!(errno_of(&err), Some(Errno::EROFS), "open({what}) {}: {err}", target.display());
        }
    }
    let err = File::create(dir.join("new-file")).expect_err("created a file");
    assert_eq!(errno_of(&err), Some(Errno::EROFS), "{err}");

    let img_s = path_str(&img);
    let of = format!("of={img_s}");
    let (sub, link) = (dir.join("sub"), dir.join("link"));
    let fails = [
        vec!["dd", "if=/dev/zero", of.as_str(), "bs=4096", "count=1", "conv=notrunc"],
        vec!["dd", "if=/dev/zero", of.as_str(), "bs=4096", "count=1"],
        vec!["truncate", "-s", "0", img_s],
        vec!["touch", img_s],
        vec!["chmod", "600", img_s],
        vec!["rm", "-f", img_s],
        vec!["mkdir", path_str(&sub)],
        vec!["ln", "-s", "x", path_str(&link)],
    ];
    for cmd in &fails {
        let out = run(cmd[0], &cmd[1..]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?} succeeded");
        assert!(err.contains("Read-only file system"), "{cmd:?}: {err}");
    }
    let mv = run("mv", &[img_s, path_str(&dir.join("moved.raw"))]);
    assert!(!mv.status.success() && String::from_utf8_lossy(&mv.stderr).contains("Read-only"), "{mv:?}");
    run_ok("cmp", &[path_str(&d.truth), img_s]);
    assert_eq!(std::fs::metadata(&img).expect("stat").len(), d.size);
}

// ---------------------------------------------------------------------------------------
// 8. Clean unmounts.

fn sample_mount(td: &Path) -> (PathBuf, Mounted) {
    let src = td.join("set");
    vmback::sample::write_sample(&src).expect("sample");
    let mnt = td.join("mnt");
    let m = Mounted::start(&src, &mnt, &[]);
    // Use it a little first.
    let cfg = std::fs::read(mnt.join("sample-vm/latest/vmconfig.xml")).expect("read through the mount");
    assert!(!cfg.is_empty());
    (mnt, m)
}

#[test]
fn sigterm_unmounts_cleanly() {
    require_fuse!();
    let td = tempdir();
    let (_mnt, mut m) = sample_mount(td.path());
    m.stop_with(Signal::SIGTERM);
    assert!(m.log().contains("unmounted"), "{}", m.log());
}

#[test]
fn sigint_unmounts_cleanly() {
    require_fuse!();
    let td = tempdir();
    let (_mnt, mut m) = sample_mount(td.path());
    m.stop_with(Signal::SIGINT);
}

#[test]
fn sighup_unmounts_cleanly() {
    require_fuse!();
    let td = tempdir();
    let (_mnt, mut m) = sample_mount(td.path());
    m.stop_with(Signal::SIGHUP);
}

#[test]
fn fusermount_from_outside_ends_vmback() {
    require_fuse!();
    let td = tempdir();
    let (mnt, mut m) = sample_mount(td.path());
    run_ok("fusermount3", &["-u", path_str(&mnt)]);
    let status = m.wait_exit(MOUNT_WAIT);
    let status = status.unwrap_or_else(|| panic!("vmback still running after fusermount3 -u:\n{}", m.log()));
    assert!(status.success(), "vmback exited with {status}:\n{}", m.log());
    assert!(!is_fuse_mounted(&mnt));
}

#[test]
fn sigterm_after_a_busy_unmount_still_works() {
    require_fuse!();
    let td = tempdir();
    let (mnt, mut m) = sample_mount(td.path());
    // A user still has a file open when they press Ctrl-C.
    let busy = File::open(mnt.join("sample-vm/latest/sda.raw")).expect("open");
    m.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    if m.alive() {
        // The unmount failed with EBUSY; once the file is closed, signalling again must work.
        assert!(is_fuse_mounted(&mnt));
        drop(busy);
        m.stop_with(Signal::SIGTERM);
    } else {
        // A lazy unmount would also be fine.
        let status = m.wait_exit(MOUNT_WAIT).expect("exited");
        assert!(status.success(), "{status}:\n{}", m.log());
    }
}

// ---------------------------------------------------------------------------------------
// 9. A stale mountpoint.

#[test]
fn stale_mountpoint_is_cleared_by_vmback_umount() {
    require_fuse!();
    let td = tempdir();
    let (mnt, mut m) = sample_mount(td.path());
    let src = td.path().join("set");
    m.signal(Signal::SIGKILL);
    assert!(m.wait_exit(MOUNT_WAIT).is_some(), "SIGKILL did not end vmback");
    assert!(is_fuse_mounted(&mnt), "a killed FUSE daemon leaves its mount behind");
    let err = std::fs::metadata(&mnt).expect_err("stat of a stale mount");
    assert_eq!(errno_of(&err), Some(Errno::ENOTCONN), "{err}");

    // `vmback mount` on it recovers too (tests/mount/integration.rs covers both under load).
    let out = run_timeout(20, env!("CARGO_BIN_EXE_vmback"), &["umount", path_str(&mnt)]);
    assert!(out.status.success(), "vmback umount of a stale mount: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!is_fuse_mounted(&mnt));
    let mut again = Mounted::start(&src, &mnt, &[]);
    let cfg = std::fs::read(mnt.join("sample-vm/virtnbdbackup.0/vmconfig.xml")).expect("read after remount");
    assert!(String::from_utf8_lossy(&cfg).contains("sample-vm"));
    again.stop_with(Signal::SIGTERM);
    drop(m);
}

// ---------------------------------------------------------------------------------------
// 10. Other users.

#[test]
fn other_users_are_kept_out_by_default() {
    require_fuse!();
    if !root_ready("running commands as another user") {
        return;
    }
    let td = tempdir();
    let (mnt, _m) = sample_mount(td.path());
    let cfg = mnt.join("sample-vm/virtnbdbackup.0/vmconfig.xml");
    for (cmd, args) in [
        ("ls", vec![path_str(&mnt)]),
        ("ls", vec![path_str(&mnt.join("sample-vm"))]),
        ("cat", vec![path_str(&cfg)]),
        ("stat", vec![path_str(&mnt)]),
    ] {
        let out = run_as(NOBODY, cmd, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{cmd} {args:?} worked for nobody: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(err.contains("Permission denied"), "{cmd} {args:?}: {err}");
    }
    // The owner still can.
    run_ok("cat", &[path_str(&cfg)]);
}

#[test]
fn allow_other_lets_other_users_read_but_not_write() {
    require_fuse!();
    if !root_ready("running commands as another user") {
        return;
    }
    for read_only in [false, true] {
        let td = tempdir();
        let src = td.path().join("set");
        vmback::sample::write_sample(&src).expect("sample");
        let mnt = td.path().join("mnt");
        let args: &[&str] = if read_only { &["--allow-other", "--read-only"] } else { &["--allow-other"] };
        let _m = Mounted::start(&src, &mnt, args);
        let dir = mnt.join("sample-vm/virtnbdbackup.1");
        let what = if read_only { "--read-only" } else { "writable" };

        let ls = run_as(NOBODY, "ls", &["-l", path_str(&dir)]);
        assert!(ls.status.success(), "{what}: {}", String::from_utf8_lossy(&ls.stderr));
        let ls = String::from_utf8_lossy(&ls.stdout);
        let image_mode = if read_only { "-r--r--r--" } else { "-rw-r--r--" };
        for (f, mode) in [("sda.raw", image_mode), ("sdb.raw", image_mode), ("vmconfig.xml", "-r--r--r--")] {
            let line = ls.lines().find(|l| l.ends_with(f)).unwrap_or_else(|| panic!("{f} missing: {ls}"));
            assert!(line.starts_with(mode), "{what}: {line}");
        }
        let cat = run_as(NOBODY, "cat", &[path_str(&dir.join("vmconfig.xml"))]);
        assert!(cat.status.success(), "{what}: {}", String::from_utf8_lossy(&cat.stderr));
        assert_eq!(cat.stdout, std::fs::read(src.join("vmconfig.virtnbdbackup.1.xml")).expect("cfg"));
        let img = dir.join("sdb.raw");
        let cat = run_as(NOBODY, "cat", &[path_str(&img)]);
        assert!(cat.status.success(), "{what}: {}", String::from_utf8_lossy(&cat.stderr));
        assert!(cat.stdout == std::fs::read(&img).expect("read as owner"), "{what}: nobody read other bytes");

        // The images belong to the mounting user: nobody may not write them, in either mode.
        let of = format!("of={}", img.display());
        let dd = run_as(NOBODY, "dd", &["if=/dev/zero", &of, "bs=512", "count=1", "conv=notrunc"]);
        let err = String::from_utf8_lossy(&dd.stderr);
        assert!(!dd.status.success(), "{what}: nobody wrote into an image");
        assert!(err.contains("Permission denied") || err.contains("Read-only file system"), "{what}: {err}");
        assert!(cat.stdout == std::fs::read(&img).expect("reread"), "{what}: the image changed");
    }
}

// ---------------------------------------------------------------------------------------
// 11. Damaged backups while mounted.

/// The file offset of a stream's `n`-th data payload, and its lz4 frames if compressed.
fn payload(path: &Path, n: usize) -> (u64, Vec<vmback::chain::scan::Lz4Frame>) {
    use vmback::chain::scan::Stored;
    let idx = vmback::chain::StreamIndex::open(path, "x").expect("index");
    assert!(idx.damage.is_none());
    let data: Vec<_> = idx.extents.iter().filter(|e| e.stored != Stored::Zero).collect();
    match &data[n].stored {
        Stored::Plain { file_off } => (*file_off, Vec::new()),
        Stored::Lz4(frames) => (frames[0].file_off, frames.to_vec()),
        Stored::Zero => unreachable!(),
    }
}

#[test]
fn damaged_streams_fail_only_their_ranges() {
    require_fuse!();
    let td = tempdir();
    let set = td.path().join("set");
    let mut rng = Rng(0xdead);
    let mut b = SetBuilder::new(&set, &td.path().join("truth"), "vm-damaged");
    let sda = b.add_disk("sda", 16 * MIB, None);
    let sdb = b.add_disk("sdb", 16 * MIB, Some(2));
    b.disk(sda).fill(&mut rng, Style::Random, 0, 4 * MIB);
    b.disk(sda).fill(&mut rng, Style::Text, 8 * MIB, 4 * MIB);
    b.disk(sdb).fill(&mut rng, Style::Random, 0, MIB);
    b.disk(sdb).fill(&mut rng, Style::Random, 4 * MIB, MIB);
    b.full("2026-02-01T00:00:00");
    b.disk(sda).fill(&mut rng, Style::Random, MIB, 64 * KIB);
    b.disk(sdb).fill(&mut rng, Style::Random, 6 * MIB, 256 * KIB);
    b.inc("2026-02-02T00:00:00");
    b.disk(sda).fill(&mut rng, Style::Text, 2 * MIB, 64 * KIB);
    b.disk(sda).fill(&mut rng, Style::Random, 9 * MIB, MIB);
    b.disk(sdb).fill(&mut rng, Style::Random, 8 * MIB, 512 * KIB);
    b.disk(sdb).fill(&mut rng, Style::Random, 12 * MIB, 512 * KIB);
    b.inc("2026-02-03T00:00:00");
    let points = b.finish();

    // sda inc 2: cut off in the middle of its second payload (a backup that died).
    let sda2 = set.join("sda.inc.virtnbdbackup.2.data");
    let (off, _) = payload(&sda2, 1);
    OpenOptions::new().write(true).open(&sda2).expect("sda2").set_len(off + 512 * KIB).expect("truncate");
    // sdb inc 2: one flipped bit inside the lz4 frame of its first extent (bit rot).
    let sdb2 = set.join("sdb.inc.virtnbdbackup.2.data");
    let (_, frames) = payload(&sdb2, 0);
    let f = OpenOptions::new().read(true).write(true).open(&sdb2).expect("sdb2");
    let at = frames[0].file_off + frames[0].comp_len / 2;
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).expect("read byte");
    f.write_all_at(&[byte[0] ^ 0x10], at).expect("flip");
    drop(f);
    let before = snapshot(&set);

    let mnt = td.path().join("mnt");
    let mut m = Mounted::start(&set, &mnt, &[]);
    let dom = mnt.join("vm-damaged");
    // The good restore points read fully.
    for p in &points[..2] {
        for d in &p.disks {
            run_ok(
                "cmp",
                &[path_str(&d.truth), path_str(&dom.join(&p.name).join(format!("{}.raw", d.disk)))],
            );
        }
    }
    let bad = &points[2];
    assert!(dom.join(&bad.name).is_dir(), "a damaged point is still shown");
    let truth =
        |disk: &str| File::open(&bad.disks.iter().find(|d| d.disk == disk).expect("disk").truth).expect("t");
    let eio = |img: &File, off: u64, len: usize, what: &str| {
        let err = pread(img, off, len).expect_err(what);
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{what}: {err}");
    };
    let good = |img: &File, truth: &File, off: u64, len: usize, what: &str| {
        let got = pread(img, off, len).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(got == pread(truth, off, len).expect("truth"), "{what}: wrong bytes");
    };

    let sda_img = File::open(dom.join(&bad.name).join("sda.raw")).expect("sda");
    let sda_truth = truth("sda");
    // Everything before the cut frame (at 9 MiB) reads: frames are sorted, so the stream
    // changed nothing between its last intact extent and that frame's start.
    good(&sda_img, &sda_truth, 0, 2 * MIB as usize, "sda before the damage");
    good(&sda_img, &sda_truth, 2 * MIB, 64 * KIB as usize, "sda: inc 2's intact extent");
    good(&sda_img, &sda_truth, 2 * MIB + 64 * KIB, (7 * MIB - 64 * KIB) as usize, "sda: up to the cut frame");
    // The stream cannot speak for anything after its break.
    eio(&sda_img, 9 * MIB + 4096, 4096, "sda: in the truncated payload");
    eio(&sda_img, 11 * MIB, 4096, "sda: after the truncated payload");
    eio(&sda_img, 9 * MIB + 4096, 4096, "sda: again (errors are not cached as data)");

    let sdb_img = File::open(dom.join(&bad.name).join("sdb.raw")).expect("sdb");
    let sdb_truth = truth("sdb");
    eio(&sdb_img, 8 * MIB + 100, 1000, "sdb: in the corrupt lz4 frame");
    good(&sdb_img, &sdb_truth, 12 * MIB, 512 * KIB as usize, "sdb: inc 2's other extent");
    good(&sdb_img, &sdb_truth, 0, MIB as usize, "sdb: the full's data");
    good(&sdb_img, &sdb_truth, 4 * MIB, 3 * MIB as usize, "sdb: the full's and inc 1's data");
    eio(&sdb_img, 8 * MIB, 512 * KIB as usize, "sdb: the whole corrupt extent, again");
    // A whole-image copy stops with EIO, as a failing disk would, after every byte before
    // the damage (the kernel's readahead into the damage does not cost the pages before).
    let out = run("cmp", &[path_str(&bad.disks[1].truth), path_str(&dom.join(&bad.name).join("sdb.raw"))]);
    assert!(!out.status.success(), "cmp read a corrupt image through");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Input/output error"), "{out:?}");
    let sda_path = dom.join(&bad.name).join("sda.raw");
    let dd = run("dd", &[&format!("if={}", sda_path.display()), "of=/dev/null", "bs=1M"]);
    let err = String::from_utf8_lossy(&dd.stderr);
    assert!(!dd.status.success() && err.contains("Input/output error"), "{err}");
    assert!(err.contains(&format!("{} bytes", 9 * MIB)), "dd stopped early or late: {err}");
    // ... and `dd conv=noerror,sync` salvages everything but the corrupt lz4 frame.
    let salvage = td.path().join("salvage.raw");
    let sdb_path = dom.join(&bad.name).join("sdb.raw");
    let dd = run(
        "dd",
        &[
            &format!("if={}", sdb_path.display()),
            &format!("of={}", salvage.display()),
            "bs=64k",
            "conv=noerror,sync",
        ],
    );
    assert!(String::from_utf8_lossy(&dd.stderr).contains("Input/output error"), "{dd:?}");
    let mut want = std::fs::read(&bad.disks[1].truth).expect("truth");
    want[(8 * MIB) as usize..(8 * MIB + 512 * KIB) as usize].fill(0);
    assert!(std::fs::read(&salvage).expect("salvage") == want, "salvaged image differs outside the damage");

    assert!(m.alive(), "vmback died on damaged input:\n{}", m.log());
    drop((sda_img, sdb_img));
    run_ok(
        "cmp",
        &[path_str(&points[1].disks[1].truth), path_str(&dom.join(&points[1].name).join("sdb.raw"))],
    );
    assert!(m.log().contains("WARN"), "damage is logged:\n{}", m.log());
    m.stop_with(Signal::SIGTERM);
    assert_unchanged(&before, &snapshot(&set));
}

/// A data file named `.inc.` or `.diff.` is always a stream: when its header is
/// destroyed (bit rot, a zeroed block) it must not turn into a raw disk image of the
/// stream's own bytes.
#[test]
fn corrupt_stream_header_is_not_shown_as_a_raw_disk() {
    require_fuse!();
    let td = tempdir();
    let set = td.path().join("set");
    let mut rng = Rng(0xb17);
    let mut b = SetBuilder::new(&set, &td.path().join("truth"), "vm-rot");
    let sda = b.add_disk("sda", 8 * MIB, None);
    b.disk(sda).fill(&mut rng, Style::Random, 0, 2 * MIB);
    b.full("2026-02-01T00:00:00");
    b.disk(sda).fill(&mut rng, Style::Random, 3 * MIB, 64 * KIB);
    b.inc("2026-02-02T00:00:00");
    b.disk(sda).fill(&mut rng, Style::Random, 4 * MIB, 512 * KIB);
    b.inc("2026-02-03T00:00:00");
    b.disk(sda).fill(&mut rng, Style::Random, 5 * MIB, 4 * KIB);
    b.diff("2026-02-04T00:00:00", 1_770_163_200);
    let points = b.finish();
    // The first 64 bytes of inc 2 are zeroed: the meta header is gone.
    let inc2 = set.join("sda.inc.virtnbdbackup.2.data");
    OpenOptions::new().write(true).open(&inc2).expect("inc2").write_all_at(&[0u8; 64], 0).expect("zero");

    let mnt = td.path().join("mnt");
    let _m = Mounted::start(&set, &mnt, &[]);
    let dom = mnt.join("vm-rot");
    for p in &points[..2] {
        run_ok("cmp", &[path_str(&p.disks[0].truth), path_str(&dom.join(&p.name).join("sda.raw"))]);
    }
    let names: Vec<&str> = points.iter().map(|p| p.name.as_str()).collect();
    for e in ls_l(&dom, false) {
        assert!(e.3 == "latest" || names.contains(&e.3.as_str()), "unexpected entry {e:?}");
        // No restore point may be dated after the newest backup (a file's mtime is not
        // a backup date when its metadata is intact elsewhere).
        assert!(e.2.as_str() <= "2026-02-04T00:00:00", "{e:?}");
    }
    for p in &points[2..] {
        let img = dom.join(&p.name).join("sda.raw");
        if !img.exists() {
            continue; // hidden as broken: fine
        }
        let len = std::fs::metadata(&img).expect("stat").len();
        assert_eq!(len, 8 * MIB, "{}: size {len} is not the disk's virtual size", img.display());
        let out = run("cmp", &[path_str(&p.disks[0].truth), path_str(&img)]);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
            "{}: a point built on a corrupt stream must fail with EIO, got {out:?}",
            img.display()
        );
    }
}

// ---------------------------------------------------------------------------------------
// 12. The .stats file.

#[test]
fn stats_count_decodes_and_cache_hits() {
    require_fuse!();
    let td = tempdir();
    let set = td.path().join("set");
    let mut rng = Rng(0x57a7);
    let mut b = SetBuilder::new(&set, &td.path().join("truth"), "vm-stats");
    let sdb = b.add_disk("sdb", 8 * MIB, Some(2));
    b.disk(sdb).fill(&mut rng, Style::Mixed, 0, MIB);
    b.full("2026-01-01T00:00:00");
    b.disk(sdb).fill(&mut rng, Style::Text, 6 * MIB, 64 * KIB);
    b.inc("2026-01-02T00:00:00");
    let points = b.finish();
    let (_, frames) = payload(&set.join("sdb.full.data"), 0);
    assert_eq!(frames.len(), 1);
    let comp_len = frames[0].comp_len;

    let mnt = td.path().join("mnt");
    let _m = Mounted::start(&set, &mnt, &[]);
    let s0 = stats(&mnt);
    for k in ["hits", "misses", "prefetched", "bytes_read", "bytes_decoded"] {
        assert_eq!(s0.get(k), Some(&0), "{k} at start: {s0:?}");
    }

    let img0 = File::open(mnt.join("vm-stats/virtnbdbackup.0/sdb.raw")).expect("img");
    let truth0 = File::open(&points[0].disks[0].truth).expect("truth");
    let first = pread(&img0, 0, MIB as usize).expect("read");
    assert!(first == pread(&truth0, 0, MIB as usize).expect("truth"));
    let s1 = stats(&mnt);
    assert_eq!(s1["misses"], 1, "one lz4 frame decoded once: {s1:?}");
    assert_eq!(s1["bytes_decoded"], MIB, "{s1:?}");
    assert!(s1["bytes_read"] >= comp_len, "{s1:?} (frame is {comp_len} bytes)");
    assert_eq!(s1["cache_entries"], 1, "{s1:?}");
    assert_eq!(s1["cache_bytes"], MIB, "{s1:?}");

    // Drop the kernel's copy, so the read reaches vmback again: a hit, no new decode.
    nix::fcntl::posix_fadvise(&img0, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .expect("fadvise");
    let again = pread(&img0, 4096, 100_000).expect("read again");
    assert!(again[..] == first[4096..4096 + 100_000]);
    let s2 = stats(&mnt);
    assert!(s2["hits"] > s1["hits"], "second read was not a cache hit: {s1:?} -> {s2:?}");
    assert_eq!(s2["misses"], s1["misses"], "{s1:?} -> {s2:?}");
    assert_eq!(s2["bytes_decoded"], s1["bytes_decoded"], "decoded again: {s1:?} -> {s2:?}");

    // The next restore point shares the full's frame: a hit through another image. Its
    // readahead is sequential, so inc 1's frame 5 MiB further on may be decoded ahead
    // (in the background, counted as prefetched) while this runs.
    let img1 = File::open(mnt.join("vm-stats/virtnbdbackup.1/sdb.raw")).expect("img1");
    assert!(pread(&img1, 0, MIB as usize).expect("read") == first);
    let s3 = stats(&mnt);
    assert!(s3["hits"] > s2["hits"], "{s2:?} -> {s3:?}");
    assert_eq!(s3["misses"], s2["misses"], "{s2:?} -> {s3:?}");
    assert!(s3["bytes_decoded"] - s2["bytes_decoded"] <= 64 * KIB, "{s2:?} -> {s3:?}");

    // inc 1's frame is new: decoded once, by this read or ahead of it.
    assert_eq!(pread(&img1, 6 * MIB, 10).expect("read").len(), 10);
    let s4 = stats(&mnt);
    let decodes = |s: &BTreeMap<String, u64>| s["misses"] + s["prefetched"];
    assert_eq!(decodes(&s4), decodes(&s2) + 1, "{s2:?} -> {s4:?}");
    assert_eq!(s4["bytes_decoded"], s2["bytes_decoded"] + 64 * KIB, "{s2:?} -> {s4:?}");
    // `cat` shows the same counters, whole.
    let cat = run_ok("cat", &[path_str(&mnt.join(".stats"))]);
    assert!(cat.contains(&format!("bytes_decoded {}\n", s4["bytes_decoded"])), "{cat}");
    assert!(cat.ends_with("\n") && cat.lines().count() == s4.len(), "{cat}");
}

/// A cache smaller than one lz4 frame (upstream writes 32 MiB frames) must not make every
/// request decode the whole frame again.
#[test]
fn small_cache_does_not_redecode_a_frame_per_request() {
    require_fuse!();
    let s = shared();
    let td = tempdir();
    let mnt = td.path().join("mnt");
    let _m = Mounted::start(&s.source(), &mnt, &["--cache-size", "16M"]);
    // vm-alpha's sdb: one 32 MiB lz4 frame from 3 MiB on.
    let p = &s.domains[0].1[0];
    let d = p.disks.iter().find(|d| d.disk == "sdb").expect("sdb");
    let img = File::open(mnt.join("vm-alpha").join(&p.name).join("sdb.raw")).expect("sdb");
    let got = pread(&img, 4 * MIB, 2 * MIB as usize).expect("read");
    assert!(got == pread(&File::open(&d.truth).expect("truth"), 4 * MIB, 2 * MIB as usize).expect("truth"));
    let st = stats(&mnt);
    assert!(
        st["bytes_decoded"] <= 2 * 32 * MIB,
        "reading 2 MiB decoded {} MiB: {st:?}",
        st["bytes_decoded"] / MIB
    );
}

// ---------------------------------------------------------------------------------------
// 13. The backup files are never written.

/// Watches directories with inotify for anything that writes: a modification, an
/// attribute change, a close after writing, creation, deletion, renames.
struct WriteWatch {
    file: File,
    dirs: Vec<PathBuf>,
}

impl WriteWatch {
    fn new(dirs: &[PathBuf]) -> WriteWatch {
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain syscall with constant flags; the result is checked below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just returned by inotify_init1 and is owned by nothing else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let mask = libc::IN_MODIFY
            | libc::IN_ATTRIB
            | libc::IN_CLOSE_WRITE
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF
            | libc::IN_MOVED_FROM
            | libc::IN_MOVED_TO;
        for d in dirs {
            let c = std::ffi::CString::new(d.as_os_str().as_bytes()).expect("path");
            // SAFETY: `fd` is a live inotify fd and `c` a NUL-terminated path that outlives the call.
            let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) };
            assert!(wd >= 0, "inotify_add_watch {}: {}", d.display(), io::Error::last_os_error());
        }
        WriteWatch { file: File::from(owned), dirs: dirs.to_vec() }
    }

    /// The events seen so far, as `(dir index, name, mask)`.
    fn events(&mut self) -> Vec<(usize, String, u32)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match self.file.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading inotify: {e}"),
            };
            let mut i = 0;
            while i + 16 <= n {
                let word = |k: usize| u32::from_ne_bytes(buf[i + k..i + k + 4].try_into().expect("4 bytes"));
                let (wd, mask, len) = (word(0) as usize, word(4), word(12) as usize);
                let name =
                    String::from_utf8_lossy(&buf[i + 16..i + 16 + len]).trim_end_matches('\0').to_owned();
                out.push((wd.saturating_sub(1).min(self.dirs.len() - 1), name, mask));
                i += 16 + len;
            }
        }
        out
    }
}

/// The open flags of vmback's descriptors on files under `dir`, from /proc.
fn open_flags_under(pid: nix::unistd::Pid, dir: &Path) -> Vec<(PathBuf, i32)> {
    let mut out = Vec::new();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/pid/fd");
    for e in fds.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        if !target.starts_with(dir) {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy()))
            .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
            .expect("fdinfo flags");
        out.push((target, flags));
    }
    out
}

#[test]
fn backup_files_are_never_written() {
    require_fuse!();
    let td = tempdir();
    let src = td.path().join("source");
    vmback::sample::write_sample(&src.join("sample")).expect("sample");
    let mut rng = Rng(0x1313);
    let mut b = SetBuilder::new(&src.join("vm-z"), &td.path().join("truth"), "vm-z");
    let vda = b.add_disk("vda", 8 * MIB, Some(2));
    b.disk(vda).fill(&mut rng, Style::Mixed, MIB, 2 * MIB);
    b.full("2026-01-05T00:00:00");
    b.disk(vda).fill(&mut rng, Style::Random, 2 * MIB, 100);
    b.diff("2026-01-06T00:00:00", 1_767_657_600);
    let points = b.finish();

    let before = snapshot(&src);
    let mut dirs: Vec<PathBuf> = walk(&src).iter().filter_map(|p| p.parent().map(Path::to_owned)).collect();
    dirs.sort();
    dirs.dedup();
    let mut watch = WriteWatch::new(&dirs);

    let mnt = td.path().join("mnt");
    // Writable (the default): what is written to an image must land in an overlay.
    let mut m = Mounted::start(&src, &mnt, &[]);
    let copy = td.path().join("copy.raw");
    run_ok("cp", &["--sparse=always", path_str(&mnt.join("vm-z/latest/vda.raw")), path_str(&copy)]);
    run_ok("cmp", &[path_str(&copy), path_str(&points[1].disks[0].truth)]);
    // Everything a user might do: read every file, seek, write, discard, try to resize.
    let mut images = 0;
    for f in walk(&mnt) {
        run_ok("dd", &[&format!("if={}", f.display()), "of=/dev/null", "bs=1M", "status=none"]);
        if f.extension().is_some_and(|e| e == "raw") {
            images += 1;
            let file = File::open(&f).expect("image");
            let _ = lseek(&file, 0, Whence::SeekData);
            let _ = lseek(&file, 0, Whence::SeekHole);
            let of = format!("of={}", f.display());
            let _ = run("dd", &["if=/dev/urandom", &of, "bs=64k", "count=4", "seek=3", "conv=notrunc,fsync"]);
            let _ = run("fallocate", &["--punch-hole", "--offset", "0", "--length", "65536", path_str(&f)]);
            let _ = run("truncate", &["-s", "1M", path_str(&f)]);
            let _ = OpenOptions::new().write(true).open(&f).map(|f| f.sync_all());
        }
    }
    assert_eq!(images, 8 + 2, "images seen: {:?}", walk(&mnt));

    // vmback holds the backup files open, and only for reading.
    let fds = open_flags_under(m.pid(), &std::fs::canonicalize(&src).expect("canonical"));
    assert!(!fds.is_empty(), "vmback holds no backup file open?");
    for (path, flags) in &fds {
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY, "{} open with flags {flags:o}", path.display());
    }
    m.stop_with(Signal::SIGTERM);

    let events = watch.events();
    assert!(events.is_empty(), "the backup set was written to: {events:?}");
    assert_unchanged(&before, &snapshot(&src));
}
