//! A living catalog: while mounted, backups that land in SOURCE show up, sets that are
//! deleted disappear, and files that are open keep reading. Real mounts; the sets are
//! written with the library's stream writer (tests/mount/mount/streams.rs) into a staging
//! folder and moved into SOURCE the way backup tools finish a file (`.partial`, then a
//! rename). A real `vmback backup` into a mounted SOURCE is in tests/stack/backup.rs.
//!
//! Part of the `mount` test binary. Each test prints how long the change took to show (`appeared after ... ms`).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::streams::{MIB, Point, Rng, SetBuilder, Style};
use crate::common::mounted::Mounted;
use crate::common::ready::ready;
use crate::common::tempdir;

/// The bound on how soon a new backup shows.
const APPEAR_WITHIN: Duration = Duration::from_secs(2);

/// How long the tests wait before calling a change lost (well past [`APPEAR_WITHIN`], so
/// a slow CI machine reports the measured time instead of a bare failure).
const GIVE_UP: Duration = Duration::from_secs(20);

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Polls `cond` every 20 ms; returns how long it took to hold, or fails the test.
fn time_until(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < GIVE_UP, "{what}: not seen within {GIVE_UP:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = start.elapsed();
    println!("{what}: appeared after {} ms", took.as_millis());
    took
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    let read = |p: &Path| {
        let mut v = Vec::new();
        File::open(p).and_then(|mut f| f.read_to_end(&mut v)).map(|_| v)
    };
    match (read(a), read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// A staging folder with one set of `domain` (one 8 MiB disk, lz4 or not): a full and
/// `incs` incrementals, each changing a few MiB.
fn stage(root: &Path, domain: &str, incs: usize, compressed: Option<u32>) -> (PathBuf, Vec<Point>) {
    let dir = root.join("staging").join(domain);
    let mut rng = Rng(domain.len() as u64 * 7919);
    let mut b = SetBuilder::new(&dir, &root.join("truth"), domain);
    let sda = b.add_disk("sda", 8 * MIB, compressed);
    b.disk(sda).fill(&mut rng, Style::Mixed, 0, 2 * MIB);
    b.full("2026-06-01T08:00:00");
    for i in 0..incs {
        b.disk(sda).fill(&mut rng, Style::Random, (i as u64 + 2) * MIB, MIB / 2);
        b.inc(&format!("2026-06-0{}T08:00:00", i + 2));
    }
    (dir, b.finish())
}

/// Moves `files` (names in `from`) into `to` as a backup tool does: each written as
/// `NAME.partial`, then renamed.
fn land(from: &Path, to: &Path, files: &[String]) {
    std::fs::create_dir_all(to.join("checkpoints")).expect("set dir");
    for f in files {
        let partial = to.join(format!("{f}.partial"));
        std::fs::copy(from.join(f), &partial).expect("copy in");
        std::fs::rename(&partial, to.join(f)).expect("rename");
    }
}

fn set_files(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut v: Vec<String> = names(dir).into_iter().filter(|n| n != "checkpoints" && keep(n)).collect();
    for c in names(&dir.join("checkpoints")) {
        v.push(format!("checkpoints/{c}"));
    }
    v
}

#[test]
fn new_backups_appear_and_latest_follows() {
    if !ready(&[]) {
        return;
    }
    let tmp = tempdir();
    let (staged, points) = stage(tmp.path(), "vm-live", 2, Some(2));
    let source = tmp.path().join("source");
    let set = source.join("vm-live");
    // The full first, then mount.
    land(&staged, &set, &set_files(&staged, |n| n.contains(".full.") || !n.ends_with(".data")));
    let m = Mounted::start(&source, &tmp.path().join("mnt"), &[]);
    let dom = m.mnt.join("vm-live");
    assert_eq!(names(&dom), ["latest", "virtnbdbackup.0"]);

    // A backup in progress (a `.partial`) is not shown; once renamed, it is.
    let inc1 = "sda.inc.virtnbdbackup.1.data";
    std::fs::copy(staged.join(inc1), set.join(format!("{inc1}.partial"))).expect("partial");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(names(&dom), ["latest", "virtnbdbackup.0"], "a .partial must not show");
    std::fs::rename(set.join(format!("{inc1}.partial")), set.join(inc1)).expect("rename");
    let took = time_until("virtnbdbackup.1", || names(&dom).contains(&"virtnbdbackup.1".to_owned()));
    assert!(took <= APPEAR_WITHIN, "a new backup took {took:?} to show (bound {APPEAR_WITHIN:?})");
    let img = dom.join("virtnbdbackup.1/sda.raw");
    assert!(same_bytes(&img, &points[1].disks[0].truth), "new point differs from its truth");
    time_until("latest -> virtnbdbackup.1", || {
        std::fs::read_link(dom.join("latest")).is_ok_and(|t| t == Path::new("virtnbdbackup.1"))
    });
    assert!(same_bytes(&dom.join("latest/sda.raw"), &points[1].disks[0].truth));

    // An image open across a refresh keeps reading (and stays the same file).
    let mut open = File::open(dom.join("virtnbdbackup.0/sda.raw")).expect("open point 0");
    land(&staged, &set, &["sda.inc.virtnbdbackup.2.data".to_owned()]);
    time_until("virtnbdbackup.2", || names(&dom).contains(&"virtnbdbackup.2".to_owned()));
    let mut bytes = Vec::new();
    open.read_to_end(&mut bytes).expect("read across the refresh");
    assert_eq!(bytes, std::fs::read(&points[0].disks[0].truth).expect("truth"));
    for (i, p) in points.iter().enumerate() {
        let img = dom.join(format!("virtnbdbackup.{i}/sda.raw"));
        assert!(same_bytes(&img, &p.disks[0].truth), "{} differs after refreshes", img.display());
    }
    assert!(m.log().contains("backup in progress"), "no warning about the .partial:\n{}", m.log());
}

#[test]
fn a_deleted_set_disappears_while_its_open_file_keeps_reading() {
    if !ready(&[]) {
        return;
    }
    let tmp = tempdir();
    let source = tmp.path().join("source");
    let (a, a_points) = stage(tmp.path(), "vm-stay", 1, None);
    let (b, b_points) = stage(tmp.path(), "vm-go", 1, Some(2));
    land(&a, &source.join("vm-stay"), &set_files(&a, |_| true));
    land(&b, &source.join("vm-go"), &set_files(&b, |_| true));
    let m = Mounted::start(&source, &tmp.path().join("mnt"), &[]);
    assert_eq!(names(&m.mnt), [".stats", "vm-go", "vm-stay"]);

    let gone_img = m.mnt.join("vm-go/virtnbdbackup.1/sda.raw");
    let mut open = File::open(&gone_img).expect("open");
    let mut head = vec![0u8; MIB as usize];
    open.read_exact(&mut head).expect("first MiB");
    std::fs::remove_dir_all(source.join("vm-go")).expect("delete the set");
    time_until("vm-go removed", || !names(&m.mnt).contains(&"vm-go".to_owned()));
    // The kernel may trust names it looked up for a second more (and vmback answers for
    // nodes that just left the tree meanwhile), so the path goes away shortly after.
    time_until("vm-go's image path gone", || !gone_img.exists());

    // The open file reads on, to the end, from the deleted (still open) stream files.
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).expect("read after the set was deleted");
    head.extend(rest);
    assert_eq!(head, std::fs::read(&b_points[1].disks[0].truth).expect("truth"));
    drop(open);

    // The other domain never noticed.
    assert!(same_bytes(&m.mnt.join("vm-stay/latest/sda.raw"), &a_points[1].disks[0].truth));

    // A new domain appears: a whole set folder moved in.
    let (c, c_points) = stage(tmp.path(), "vm-new", 0, None);
    std::fs::rename(&c, source.join("vm-new")).expect("move the set in");
    let took = time_until("vm-new", || names(&m.mnt).contains(&"vm-new".to_owned()));
    assert!(took <= APPEAR_WITHIN, "a new domain took {took:?} to show");
    assert!(same_bytes(&m.mnt.join("vm-new/virtnbdbackup.0/sda.raw"), &c_points[0].disks[0].truth));
}

#[test]
fn a_replaced_full_gets_new_contents_under_the_same_name() {
    if !ready(&[]) {
        return;
    }
    let tmp = tempdir();
    let source = tmp.path().join("source");
    let (a, _) = stage(tmp.path(), "vm-redo", 0, None);
    land(&a, &source.join("vm-redo"), &set_files(&a, |_| true));
    let m = Mounted::start(&source, &tmp.path().join("mnt"), &[]);
    let img = m.mnt.join("vm-redo/virtnbdbackup.0/sda.raw");
    let before = std::fs::read(&img).expect("read");

    // A new full of the same domain replaces the set's files (a new chain, same names).
    let redo = tmp.path().join("redo");
    let mut rng = Rng(42);
    let mut b = SetBuilder::new(&redo.join("vm-redo"), &redo.join("truth"), "vm-redo");
    let sda = b.add_disk("sda", 8 * MIB, None);
    b.disk(sda).fill(&mut rng, Style::Text, MIB, 3 * MIB);
    b.full("2026-07-01T08:00:00");
    let points = b.finish();
    let staged = redo.join("vm-redo");
    land(&staged, &source.join("vm-redo"), &set_files(&staged, |_| true));
    time_until("the new full", || same_bytes(&img, &points[0].disks[0].truth));
    assert_ne!(before, std::fs::read(&points[0].disks[0].truth).expect("truth"));
}
