//! `vmback restore`, `dump` and `verify` with the real binary, against the true disk
//! contents of a corpus of real virtnbdbackup 1.9.15 backups
//! (contrib/realstack/make-corpus.sh) and against Debian's virtnbdrestore run on the same
//! sets; plus synthetic sets written with the library's stream writer for what the corpus
//! cannot show (a large image to interrupt, a mostly empty disk).
//!
//! Tests that need the corpus run when VMBACK_CORPUS names it and print "skipping"
//! otherwise. The corpus is only ever read: damage is planted in `cp -a` copies.

mod stream;
mod support;
mod vm;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use serde_json::Value;

use stream::{Fill, MIB, Stream, meta_of, walk, write_full_set};
use support::{
    Point, Row, allocated, assert_same, copy_set, corpus, first_difference, ls_json, manifest, names,
    path_str, point_ending_in, points, points_reading, run_ok, tempdir, to_raw, virtnbdrestore, vmback,
    vmback_ok,
};

// ---------------------------------------------------------------------------------------
// Helpers shared by the tests below.

/// The points of one set folder.
fn set_points(set: &Path) -> Vec<Point> {
    points(&ls_json(set))
}

/// Raw images (`<disk>.raw` for the `<disk>.qcow2` disks of these sets), which the tests
/// compare with the truth, unless the test chose a format.
fn raw_unless_said(args: &mut Vec<&str>) {
    if !args.contains(&"--format") {
        args.extend(["--format", "raw"]);
    }
}

/// `vmback restore -i SET -o OUT ARGS...`, which must succeed.
fn restore_ok(set: &Path, out: &Path, args: &[&str]) {
    let mut all = vec!["restore", "-i", path_str(set), "-o", path_str(out)];
    all.extend_from_slice(args);
    raw_unless_said(&mut all);
    vmback_ok(&all);
}

/// `vmback restore -i SET -o OUT ARGS...`, which must fail; returns its stderr.
fn restore_fails(set: &Path, out: &Path, args: &[&str]) -> String {
    let mut all = vec!["restore", "-i", path_str(set), "-o", path_str(out)];
    all.extend_from_slice(args);
    raw_unless_said(&mut all);
    let o = vmback(&all);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "vmback {all:?} should fail; stdout:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(o.status.code(), Some(1), "vmback {all:?}: exit status; stderr:\n{stderr}");
    stderr
}

/// The last manifest row of `set` for `disk` (the newest point).
fn last_row<'a>(rows: &'a [Row], set: &str, disk: &str) -> &'a Row {
    rows.iter().rfind(|r| r.set == set && r.disk == disk).unwrap_or_else(|| panic!("no row {set} {disk}"))
}

fn row<'a>(rows: &'a [Row], set: &str, data_file: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.set == set && r.data_file == data_file)
        .unwrap_or_else(|| panic!("no manifest row {set} {data_file}"))
}

/// The manifest row of the diff of `disk` in `set` (its file name carries the unix time
/// the corpus was made at).
fn diff_row<'a>(rows: &'a [Row], set: &str, disk: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.set == set && r.disk == disk && r.level == "diff")
        .unwrap_or_else(|| panic!("no diff of {disk} in {set}"))
}

/// The disks of a set, from the manifest.
fn disks_of(rows: &[Row], set: &str) -> Vec<String> {
    let d: BTreeSet<String> = rows.iter().filter(|r| r.set == set).map(|r| r.disk.clone()).collect();
    d.into_iter().collect()
}

/// The data files of `disk` in `set`, oldest mtime first (virtnbdrestore's order).
fn by_mtime(set: &Path, disk: &str) -> Vec<String> {
    let mut v: Vec<(std::time::SystemTime, String)> = fs::read_dir(set)
        .expect("set dir")
        .map(|e| e.expect("entry"))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.starts_with(&format!("{disk}.")) && name.ends_with(".data"))
                .then(|| (e.metadata().expect("stat").modified().expect("mtime"), name))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}

/// Checks that nothing but these names (and no `.partial`) is in `dir`.
fn assert_names(dir: &Path, want: &[&str], what: &str) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names(dir), want, "{what}: files in {}", dir.display());
}

/// Whether the output of a failed restore holds a final-named image of `disk`.
fn assert_only_partial(dir: &Path, disk: &str, ext: &str, what: &str) {
    let n = names(dir);
    assert!(!n.iter().any(|f| f == &format!("{disk}.{ext}")), "{what}: a final {disk}.{ext} exists: {n:?}");
    assert!(
        n.iter().any(|f| f.starts_with(&format!("{disk}.{ext}")) && f.ends_with(".partial")),
        "{what}: no {disk}.{ext}*.partial left: {n:?}"
    );
}

/// Data bytes allocated in `[from, to)` of a file, by SEEK_DATA/SEEK_HOLE.
fn data_in(file: &File, from: u64, to: u64) -> u64 {
    let mut pos = from;
    let mut total = 0;
    while pos < to {
        let data = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(Errno::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA: {e}"),
        };
        if data >= to {
            break;
        }
        let hole = lseek(file, data as i64, Whence::SeekHole).expect("SEEK_HOLE") as u64;
        total += hole.min(to) - data;
        pos = hole;
    }
    total
}

// ---------------------------------------------------------------------------------------
// Every restore point of the corpus.

#[test]
fn every_restore_point_of_the_corpus_restores_to_its_truth() {
    let Some(corpus) = corpus() else { return };
    let started = Instant::now();
    let rows = manifest(&corpus);
    assert!(rows.len() >= 20, "corpus too small: {} rows", rows.len());
    let tmp = tempdir("restore");
    let mut listings: BTreeMap<String, Vec<Point>> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        let set = corpus.join(&row.set);
        let pts = listings.entry(row.set.clone()).or_insert_with(|| set_points(&set));
        let p = point_ending_in(pts, &row.disk, &row.data_file);
        let out = tmp.path().join(format!("row{i:02}"));
        // Alternate the worker count: one worker, and more workers than this machine may have.
        let threads = if i % 2 == 0 { "1" } else { "5" };
        restore_ok(&set, &out, &["--until", &p.name, "-d", &row.disk, "--threads", threads]);
        let image = format!("{}.raw", row.disk);
        assert_names(&out, &[&image, "vmconfig.xml"], &format!("{} {}", row.set, row.data_file));
        assert_same(
            &out.join(&image),
            &row.truth,
            &format!("{} {} --until {} -d {}", row.set, row.level, p.name, row.disk),
        );
        let cfg = p.vmconfig.as_ref().expect("every corpus point has a vmconfig");
        assert_eq!(
            fs::read(out.join("vmconfig.xml")).expect("vmconfig.xml"),
            fs::read(cfg).expect("vmconfig")
        );
        fs::remove_dir_all(&out).expect("clean");
    }

    // No --until, no -d: every disk at the newest point.
    for set_name in listings.keys() {
        let out = tmp.path().join(format!("latest-{}", set_name.replace('/', "_")));
        restore_ok(&corpus.join(set_name), &out, &[]);
        let disks = disks_of(&rows, set_name);
        let mut want: Vec<String> = disks.iter().map(|d| format!("{d}.raw")).collect();
        want.push("vmconfig.xml".into());
        assert_eq!(names(&out), want, "{set_name}: latest");
        for d in &disks {
            assert_same(
                &out.join(format!("{d}.raw")),
                &last_row(&rows, set_name, d).truth,
                &format!("{set_name} latest {d}"),
            );
        }
        // A second restore into the same folder refuses to overwrite, and leaves the images.
        let err = restore_fails(&corpus.join(set_name), &out, &["-d", &disks[0]]);
        assert!(err.contains("exists already"), "{set_name}: {err}");
        assert_same(
            &out.join(format!("{}.raw", disks[0])),
            &last_row(&rows, set_name, &disks[0]).truth,
            "kept",
        );
        fs::remove_dir_all(&out).expect("clean");
    }

    // The folder tree of all sets: names carry the set's start time, --domain chooses.
    let root = corpus.join("sets");
    let all = points(&ls_json(&root));
    for r in [diff_row(&rows, "sets/compressed", "vdb"), &rows[2]] {
        let in_set: Vec<Point> = all.iter().filter(|p| p.set == corpus.join(&r.set)).cloned().collect();
        let p = point_ending_in(&in_set, &r.disk, &r.data_file);
        let out = tmp.path().join(format!("tree-{}", r.disk));
        let _ = fs::remove_dir_all(&out);
        restore_ok(&root, &out, &["--domain", &p.domain, "--until", &p.name, "-d", &r.disk]);
        assert_same(&out.join(format!("{}.raw", r.disk)), &r.truth, &format!("tree --until {}", p.name));
    }
    // A bare checkpoint name that two sets share is refused, and nothing is written.
    let out = tmp.path().join("ambiguous");
    let err = restore_fails(&root, &out, &["--until", "virtnbdbackup.1"]);
    assert!(err.contains("virtnbdbackup.1"), "{err}");
    assert!(!out.join("vda.raw").exists() && !out.join("vda.raw.partial").exists());
    // Unknown point, unknown disk.
    let plain = corpus.join("sets/plain");
    let err = restore_fails(&plain, &tmp.path().join("x1"), &["--until", "virtnbdbackup.99"]);
    assert!(err.contains("virtnbdbackup.99"), "{err}");
    let err = restore_fails(&plain, &tmp.path().join("x2"), &["-d", "vdz"]);
    assert!(err.contains("vdz"), "{err}");
    assert!(names(&tmp.path().join("x2")).iter().all(|n| !n.ends_with(".raw")));
    eprintln!(
        "{} manifest rows restored and equal to their truth in {:.1} s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn qcow2_output_holds_the_truth() {
    let Some(corpus) = corpus() else { return };
    let rows = manifest(&corpus);
    let tmp = tempdir("restore");
    // A diff, a compressed inc with chunked (>= 32 MiB) lz4 extents, a compressed copy.
    let picks = [
        diff_row(&rows, "sets/plain", "vda"),
        row(&rows, "sets/compressed", "vda.inc.virtnbdbackup.1.data"),
        row(&rows, "sets/copy-z", "vdb.copy.data"),
    ];
    for (i, r) in picks.into_iter().enumerate() {
        let set = corpus.join(&r.set);
        let p = point_ending_in(&set_points(&set), &r.disk, &r.data_file).clone();
        let out = tmp.path().join(format!("q{i}"));
        restore_ok(&set, &out, &["--until", &p.name, "-d", &r.disk, "--format", "qcow2"]);
        let image = out.join(format!("{}.qcow2", r.disk));
        assert_names(&out, &[&format!("{}.qcow2", r.disk), "vmconfig.xml"], &r.data_file);
        let info: Value =
            serde_json::from_str(&run_ok("qemu-img", &["info", "--output", "json", path_str(&image)]))
                .expect("info");
        assert_eq!(info["format"], "qcow2", "{}", image.display());
        assert_eq!(info["virtual-size"].as_u64(), Some(fs::metadata(&r.truth).expect("truth").len()));
        run_ok("qemu-img", &["check", "-q", path_str(&image)]);
        run_ok(
            "qemu-img",
            &["compare", "-q", "-f", "qcow2", "-F", "raw", path_str(&image), path_str(&r.truth)],
        );
    }
}

// ---------------------------------------------------------------------------------------
// Against virtnbdrestore.

/// For sets/plain and sets/compressed: virtnbdrestore's whole chain and `--until` every
/// checkpoint that a diff does not shadow, against vmback's restore of the same chain.
#[test]
fn restores_equal_virtnbdrestore_on_the_same_chains() {
    let Some(corpus) = corpus() else { return };
    let started = Instant::now();
    let rows = manifest(&corpus);
    let tmp = tempdir("restore");
    let mut compared = Vec::new();
    let mut shadowed = Vec::new();
    for set_name in ["sets/plain", "sets/compressed"] {
        let set = corpus.join(set_name);
        let pts = set_points(&set);
        let disks = disks_of(&rows, set_name);
        let cpt = fs::read_dir(&set)
            .expect("set")
            .map(|e| e.expect("entry").path())
            .find(|p| p.extension().is_some_and(|x| x == "cpt"))
            .expect("a .cpt file");
        let cpts: Vec<String> =
            serde_json::from_slice(&fs::read(&cpt).expect("cpt")).expect(".cpt is a JSON list");
        // (label, virtnbdrestore args, per disk: the file upstream stops at)
        let mut runs: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
        let last: Vec<String> = disks.iter().map(|d| by_mtime(&set, d).pop().expect("files")).collect();
        runs.push(("whole chain".into(), vec![], last));
        for c in &cpts {
            // virtnbdrestore --until C stops after the first file (by mtime) that carries
            // checkpointName C; a diff carries the NEXT checkpoint's name and shadows it
            // (doc/FORMAT.md §3.3): such points are not the checkpoint's.
            let stops: Vec<String> = disks
                .iter()
                .map(|d| {
                    by_mtime(&set, d)
                        .into_iter()
                        .find(|f| meta_of(&set.join(f))["checkpointName"] == c.as_str())
                        .unwrap_or_else(|| panic!("{set_name}: no {d} file carries {c}"))
                })
                .collect();
            if stops.iter().any(|f| f.contains(".diff.")) {
                shadowed.push(format!("{set_name} {c} (stops at {})", stops.join(", ")));
                continue;
            }
            runs.push((format!("--until {c}"), vec!["--until".into(), c.clone()], stops));
        }
        for (i, (label, args, stops)) in runs.iter().enumerate() {
            let up = tmp.path().join(format!("{}-up{i}", &set_name[5..]));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            virtnbdrestore(&set, &up, &args);
            // The vmback point whose chain ends where upstream stopped, for every disk.
            let ps: BTreeSet<String> =
                disks.iter().zip(stops).map(|(d, f)| point_ending_in(&pts, d, f).name.clone()).collect();
            assert_eq!(ps.len(), 1, "{set_name} {label}: disks stop at different points: {ps:?}");
            let point = ps.into_iter().next().expect("one");
            let ours = tmp.path().join(format!("{}-vm{i}", &set_name[5..]));
            restore_ok(&set, &ours, &["--until", &point]);
            for d in &disks {
                let raw = up.join(format!("{d}.up.raw"));
                to_raw(&up.join(format!("{d}.qcow2")), &raw);
                assert_eq!(
                    first_difference(&ours.join(format!("{d}.raw")), &raw),
                    None,
                    "{set_name} {label} {d}: vmback --until {point} differs from virtnbdrestore"
                );
                fs::remove_file(&raw).expect("clean");
            }
            compared.push(format!("{set_name} {label} = vmback {point}"));
            fs::remove_dir_all(&up).expect("clean");
            fs::remove_dir_all(&ours).expect("clean");
        }
    }
    // Each set has a full and two incs before its diff: at least three checkpoints count.
    assert!(compared.len() >= 2 * 3, "too few comparisons: {compared:?}");
    eprintln!(
        "equal to virtnbdrestore: {}\nshadowed by a diff (not compared): {}\nin {:.1} s",
        compared.join("; "),
        shadowed.join("; "),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn sequence_applies_exactly_the_listed_files_like_virtnbdrestore() {
    let Some(corpus) = corpus() else { return };
    let rows = manifest(&corpus);
    let tmp = tempdir("restore");
    let plain_diff = &diff_row(&rows, "sets/plain", "vda").data_file;
    let compressed_diff = &diff_row(&rows, "sets/compressed", "vdb").data_file;
    let cases = [
        // Up to a diff: the only upstream way to restore a diff's state.
        (
            "sets/plain",
            "vda",
            format!("vda.full.data,vda.inc.virtnbdbackup.1.data,vda.inc.virtnbdbackup.2.data,{plain_diff}"),
        ),
        // Skipping the incs: not a real state of the disk, but both must apply just these.
        ("sets/compressed", "vdb", format!("vdb.full.data,{compressed_diff}")),
    ];
    for (i, (set_name, disk, seq)) in cases.iter().enumerate() {
        let set = corpus.join(set_name);
        let up = tmp.path().join(format!("up{i}"));
        virtnbdrestore(&set, &up, &["--sequence", seq]);
        let ours = tmp.path().join(format!("vm{i}"));
        restore_ok(&set, &ours, &["--sequence", seq]);
        assert_names(&ours, &[&format!("{disk}.raw")], &format!("--sequence {seq}"));
        let raw = tmp.path().join(format!("up{i}.raw"));
        to_raw(&up.join(disk), &raw);
        assert_same(
            &ours.join(format!("{disk}.raw")),
            &raw,
            &format!("{set_name} --sequence {seq} vs virtnbdrestore"),
        );
        if i == 0 {
            assert_same(
                &ours.join(format!("{disk}.raw")),
                &diff_row(&rows, set_name, "vda").truth,
                "diff truth",
            );
        }
    }
    // The first file must be a full or copy backup, for both tools.
    let plain = corpus.join("sets/plain");
    for seq in ["vda.inc.virtnbdbackup.1.data,vda.inc.virtnbdbackup.2.data", plain_diff.as_str()] {
        let out = tmp.path().join("refused");
        let err = restore_fails(&plain, &out, &["--sequence", seq]);
        assert!(err.contains("full or copy"), "--sequence {seq}: {err}");
        assert!(
            names(&out).iter().all(|n| !n.starts_with("vda")),
            "--sequence {seq} wrote {:?}",
            names(&out)
        );
        support::upstream_ready();
        let up = Command::new("virtnbdrestore")
            .args(["-i", path_str(&plain), "-o", path_str(&tmp.path().join("up-refused")), "-n"])
            .args(["-L", path_str(&tmp.path().join("up-refused.log")), "--sequence", seq])
            .output()
            .expect("virtnbdrestore");
        assert!(!up.status.success(), "virtnbdrestore accepted --sequence {seq}");
    }
}

#[test]
fn dump_matches_virtnbdrestore_dump() {
    let Some(corpus) = corpus() else { return };
    support::upstream_ready();
    for set_name in ["sets/plain", "sets/compressed", "sets/copy-z"] {
        let set = corpus.join(set_name);
        let tmp = tempdir("restore");
        let up = Command::new("virtnbdrestore")
            .args(["-i", path_str(&set), "-o", "dump", "-L", path_str(&tmp.path().join("dump.log"))])
            .output()
            .expect("virtnbdrestore -o dump");
        assert!(up.status.success(), "virtnbdrestore -o dump: {}", String::from_utf8_lossy(&up.stderr));
        let up_list: Vec<Value> = serde_json::from_slice(&up.stdout).expect("virtnbdrestore dump is JSON");
        // It logs each file's path before its metadata, in the same order.
        let up_files: Vec<String> = String::from_utf8_lossy(&up.stderr)
            .lines()
            .filter_map(|l| l.split("]: ").nth(1))
            .filter(|p| p.starts_with('/') && p.ends_with(".data"))
            .map(|p| Path::new(p).file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            up_files.len(),
            up_list.len(),
            "{set_name}: file lines in the log:\n{}",
            String::from_utf8_lossy(&up.stderr)
        );
        let upstream: BTreeMap<String, &Value> = up_files.into_iter().zip(&up_list).collect();

        let ours = vmback_ok(&["dump", "-i", path_str(&set)]);
        let again = vmback_ok(&["restore", "-i", path_str(&set), "-o", "dump"]);
        assert_eq!(ours.stdout, again.stdout, "`restore -o dump` and `dump` print the same");
        let action = vmback_ok(&["restore", "-a", "dump", "-i", path_str(&set)]);
        assert_eq!(ours.stdout, action.stdout, "`restore -a dump` and `dump` print the same");
        let list: Vec<Value> = serde_json::from_slice(&ours.stdout).expect("vmback dump is JSON");
        let mut mine: BTreeMap<String, Value> = BTreeMap::new();
        for mut v in list {
            let file = v.as_object_mut().expect("object").shift_remove("file").expect("a file field");
            let file = PathBuf::from(file.as_str().expect("file is a string"));
            assert_eq!(file.parent(), Some(set.as_path()), "{set_name}: file {}", file.display());
            let name = file.file_name().expect("name").to_string_lossy().into_owned();
            assert!(mine.insert(name.clone(), v).is_none(), "{set_name}: {name} twice");
        }
        let on_disk: BTreeSet<String> = names(&set).into_iter().filter(|n| n.ends_with(".data")).collect();
        assert_eq!(
            mine.keys().cloned().collect::<BTreeSet<_>>(),
            on_disk,
            "{set_name}: one entry per stream file"
        );
        assert_eq!(
            upstream.keys().cloned().collect::<BTreeSet<_>>(),
            on_disk,
            "{set_name}: virtnbdrestore's files"
        );
        for (name, theirs) in &upstream {
            let ours = &mine[name];
            let keys = |v: &Value| v.as_object().expect("object").keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(ours), keys(theirs), "{set_name} {name}: fields and their order");
            assert_eq!(ours, *theirs, "{set_name} {name}: values");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Sparse output.

#[test]
fn raw_output_of_a_mostly_empty_corpus_disk_is_sparse() {
    let Some(corpus) = corpus() else { return };
    let rows = manifest(&corpus);
    let tmp = tempdir("restore");
    let r = last_row(&rows, "sets/plain", "vdb");
    restore_ok(&corpus.join("sets/plain"), tmp.path(), &["-d", "vdb"]);
    let image = tmp.path().join("vdb.raw");
    assert_same(&image, &r.truth, "plain vdb latest");
    let (size, used, truth_used) =
        (fs::metadata(&image).expect("stat").len(), allocated(&image), allocated(&r.truth));
    eprintln!("plain vdb: {size} virtual, {used} allocated (the truth: {truth_used})");
    assert!(used < size / 8, "plain vdb: {used} of {size} bytes allocated; the disk is mostly holes");
}

#[test]
fn raw_output_keeps_holes_zero_frames_and_stored_zeros_sparse() {
    let tmp = tempdir("restore");
    for compressed in [None, Some(2)] {
        let label = if compressed.is_some() { "lz4" } else { "plain" };
        let set = tmp.path().join(format!("set-{label}"));
        let truth = tmp.path().join(format!("truth-{label}.raw"));
        let fills = [
            Fill { start: 0, len: MIB, byte: 0x11 },
            // A data frame of stored zeros (what 1.9.15 writes for zeroed dirty ranges).
            Fill { start: 100 * MIB, len: 16 * MIB, byte: 0 },
            // >= 32 MiB: chunked into two lz4 frames when compressed.
            Fill { start: 200 * MIB, len: 40 * MIB, byte: 0x33 },
            Fill { start: 1023 * MIB, len: MIB, byte: 0x22 },
        ];
        write_full_set(&set, &truth, "sda", 1024 * MIB, &fills, compressed);
        let out = tmp.path().join(format!("out-{label}"));
        restore_ok(&set, &out, &[]);
        let image = out.join("sda.raw");
        assert_same(&image, &truth, label);
        let used = allocated(&image);
        let data = 42 * MIB;
        assert!(
            (data..=data + MIB).contains(&used),
            "{label}: {used} bytes allocated, want the {data} data bytes (holes, zero frames and stored zeros stay holes)"
        );
        let f = File::open(&image).expect("image");
        assert_eq!(data_in(&f, 100 * MIB, 116 * MIB), 0, "{label}: stored zeros became a hole");
        assert_eq!(data_in(&f, MIB, 100 * MIB), 0, "{label}: a zero frame stayed a hole");
        // --sparse never writes every byte (for block devices not zeroed beforehand).
        let out = tmp.path().join(format!("never-{label}"));
        restore_ok(&set, &out, &["--sparse", "never"]);
        assert_same(&out.join("sda.raw"), &truth, &format!("{label} --sparse never"));
        assert!(allocated(&out.join("sda.raw")) >= 1024 * MIB, "{label}: --sparse never leaves no hole");
        fs::remove_dir_all(&out).expect("clean");
    }
}

/// README: "Raw output is sparse: holes, zero extents and stored runs of zeros stay
/// holes." A stored run of zeros inside a data extent stays a hole only when it fills a
/// whole 4 MiB work chunk of the copy; shorter runs next to data are written as zeros
/// (e.g. compressed vda, newest point: 16 MiB discarded at 32 MiB with one byte written at
/// 44 MiB leaves 44..48 MiB allocated). Checked at 64 KiB, the granularity of qemu's dirty
/// bitmaps, so of the extents in incrementals.
#[test]
fn stored_zero_runs_inside_data_extents_stay_holes() {
    let Some(corpus) = corpus() else { return };
    const BLOCK: u64 = 64 << 10;
    let rows = manifest(&corpus);
    let tmp = tempdir("restore");
    let zeros = vec![0u8; BLOCK as usize];
    let mut bad = Vec::new();
    for set_name in ["sets/plain", "sets/compressed", "sets/copy", "sets/copy-z"] {
        let out = tmp.path().join(&set_name[5..]);
        restore_ok(&corpus.join(set_name), &out, &[]);
        for d in disks_of(&rows, set_name) {
            let image = out.join(format!("{d}.raw"));
            let f = File::open(&image).expect("image");
            let mut buf = vec![0u8; BLOCK as usize];
            let size = f.metadata().expect("stat").len();
            let mut wasted = 0;
            for off in (0..size).step_by(BLOCK as usize) {
                f.read_exact_at(&mut buf, off).expect("read");
                if buf == zeros && data_in(&f, off, off + BLOCK) > 0 {
                    wasted += BLOCK;
                }
            }
            let truth = allocated(&last_row(&rows, set_name, &d).truth);
            if wasted > 0 {
                bad.push(format!(
                    "{set_name} {d}: {wasted} bytes of all-zero 64 KiB blocks allocated ({} allocated, truth {truth})",
                    allocated(&image)
                ));
            }
        }
    }
    assert!(bad.is_empty(), "zeros written as data:\n{}", bad.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Damage: planted in copies of the corpus sets, named by `verify`, refused by `restore`.

struct VerifyRun {
    code: Option<i32>,
    text: String,
    json: Value,
}

fn verify(source: &Path) -> VerifyRun {
    let t = vmback(&["verify", path_str(source)]);
    let j = vmback(&["verify", "--json", path_str(source)]);
    assert_eq!(t.status.code(), j.status.code(), "text and --json exit alike");
    let json: Value = serde_json::from_slice(&j.stdout).expect("verify --json is JSON");
    VerifyRun { code: t.status.code(), text: String::from_utf8_lossy(&t.stdout).into_owned(), json }
}

/// A clean verify of an intact set copy (`--json`; also the text output when `text`, which
/// costs one more full read of the set).
fn assert_intact(set: &Path, text: bool) {
    let j = vmback(&["verify", "--json", path_str(set)]);
    let json: Value = serde_json::from_slice(&j.stdout).expect("verify --json is JSON");
    assert_eq!(j.status.code(), Some(0), "intact {}: {json:#}", set.display());
    assert_eq!(json["findings"].as_array().map(Vec::len), Some(0), "{json:#}");
    let streams = names(set).iter().filter(|n| n.ends_with(".data")).count();
    assert_eq!(json["files"].as_u64(), Some(streams as u64), "every stream file is verified");
    assert!(json["data_bytes"].as_u64().is_some_and(|n| n > 0));
    if text {
        let t = vmback(&["verify", path_str(set)]);
        let out = String::from_utf8_lossy(&t.stdout);
        assert_eq!(t.status.code(), Some(0), "intact {}: {out}", set.display());
        assert!(!out.contains("DAMAGED") && out.contains(" 0 problems"), "{out}");
    }
}

/// What verify must say about one planted problem.
struct Expect<'a> {
    file: &'a Path,
    offset: Option<u64>,
    /// Bounds for the reported disk range: `start` in `start_within`, and `end`.
    range: Option<(std::ops::RangeInclusive<u64>, u64)>,
    points: BTreeSet<String>,
}

/// Verify exits 1 and reports exactly this one finding, the same in text and JSON.
fn assert_one_finding(set: &Path, want: &Expect) {
    let v = verify(set);
    assert_eq!(v.code, Some(1), "verify of damaged {}: {}", set.display(), v.text);
    let findings = v.json["findings"].as_array().expect("findings");
    assert_eq!(findings.len(), 1, "one finding for {}: {:#}", want.file.display(), v.json);
    let f = &findings[0];
    assert_eq!(f["file"].as_str(), Some(path_str(want.file)), "{f:#}");
    assert_eq!(f["offset"].as_u64(), want.offset, "offset of the damage in {}: {f:#}", want.file.display());
    let problem = f["problem"].as_str().expect("problem");
    match &want.range {
        Some((start, end)) => {
            let (s, e) = (
                f["disk_range"]["start"].as_u64().expect("start"),
                f["disk_range"]["end"].as_u64().expect("end"),
            );
            assert!(
                start.contains(&s) && e == *end,
                "disk range {s}..{e}, want start in {start:?} and end {end}: {f:#}"
            );
        }
        None => assert!(f["disk_range"].is_null(), "{f:#}"),
    }
    let points: Vec<String> =
        f["points"].as_array().expect("points").iter().map(|p| p.as_str().expect("point").into()).collect();
    assert_eq!(points.iter().cloned().collect::<BTreeSet<_>>(), want.points, "affected points: {f:#}");
    // The text line carries the same, in the documented shape.
    let at = want.offset.map_or(String::new(), |o| format!(" at offset {o}"));
    let range = match (f["disk_range"]["start"].as_u64(), f["disk_range"]["end"].as_u64()) {
        (Some(s), Some(e)) => format!("; disk bytes {s}..{e}"),
        _ => String::new(),
    };
    let line =
        format!("DAMAGED {}{at}: {problem}{range}; affects {}", want.file.display(), points.join(", "));
    let damaged: Vec<&str> = v.text.lines().filter(|l| l.starts_with("DAMAGED")).collect();
    assert_eq!(damaged, vec![line.as_str()], "text output:\n{}", v.text);
}

/// A copy of a corpus set in a scratch folder, checked intact.
fn intact_copy(corpus: &Path, set_name: &str, tmp: &Path) -> PathBuf {
    let copy = tmp.join(&set_name[5..]);
    copy_set(&corpus.join(set_name), &copy);
    assert_intact(&copy, false);
    copy
}

fn flip_byte(file: &Path, off: u64) {
    let f = OpenOptions::new().read(true).write(true).open(file).expect("open copy");
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).expect("read byte");
    f.write_all_at(&[b[0] ^ 0xff], off).expect("flip byte");
}

fn truncate(file: &Path, len: u64) {
    OpenOptions::new().write(true).open(file).expect("open copy").set_len(len).expect("truncate");
}

/// Whether every byte of `range` is rewritten by a data frame of a file after `damaged`
/// in `chain` (then restoring the chain never reads the damaged range).
fn covered_later(set: &Path, chain: &[String], damaged: &str, range: std::ops::Range<u64>) -> bool {
    let after = chain.iter().skip_while(|f| *f != damaged).skip(1);
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for f in after {
        spans.extend(walk(&set.join(f)).frames.iter().filter(|x| x.data).map(|x| (x.start, x.start + x.len)));
    }
    spans.sort();
    let mut pos = range.start;
    for (s, e) in spans {
        if s <= pos && e > pos {
            pos = e;
        }
    }
    pos >= range.end
}

#[test]
fn verify_names_a_flipped_byte_inside_an_lz4_frame() {
    let Some(corpus) = corpus() else { return };
    let rows = manifest(&corpus);
    let tmp = tempdir("restore");
    let set = intact_copy(&corpus, "sets/compressed", tmp.path());
    let name = "vda.inc.virtnbdbackup.1.data";
    let file = set.join(name);
    let s: Stream = walk(&file);
    // The second lz4 frame of a >= 32 MiB extent (an object entry in the trailer).
    let frame = s.frames.iter().find(|f| f.lz4.len() >= 2).expect("a chunked extent");
    let lz = frame.lz4[1];
    let bytes = fs::read(&file).expect("read");
    let at = lz.file_off as usize;
    assert_eq!(bytes[at..at + 4], stream::LZ4_MAGIC);
    assert_eq!(bytes[at + 4] & 0x08, 0x08, "python-lz4 frames carry the content size");
    // Frame header 15 bytes, then the first block's size word; flip a byte of its data.
    let block = u32::from_le_bytes(bytes[at + 15..at + 19].try_into().expect("4")) & 0x7fff_ffff;
    assert!(block > 200, "first block of {block} bytes");
    flip_byte(&file, lz.file_off + 19 + 100);

    let pts = set_points(&set);
    let reading = points_reading(&pts, name);
    assert_one_finding(
        &set,
        &Expect {
            file: &file,
            offset: Some(lz.file_off),
            range: Some((lz.disk_start..=lz.disk_start, lz.disk_end)),
            points: reading.clone(),
        },
    );

    // Restore: points that read the damaged frame fail (and leave only .partial files);
    // points that never read it, because a later inc rewrote the range or the file is not
    // in their chain, restore their truth.
    let mut failed = 0;
    let mut fine = 0;
    for p in &pts {
        let chain = p.files("vda");
        let reads =
            chain.iter().any(|f| f == name) && !covered_later(&set, chain, name, lz.disk_start..lz.disk_end);
        let out = tmp.path().join(format!("out-{}", p.name));
        if reads {
            restore_fails(&set, &out, &["--until", &p.name]);
            assert_only_partial(&out, "vda", "raw", &p.name);
            // The other disk of the point is restored all the same.
            let vdb = row(&rows, "sets/compressed", p.files("vdb").last().expect("file"));
            assert_same(&out.join("vdb.raw"), &vdb.truth, &format!("{} vdb next to a damaged vda", p.name));
            failed += 1;
        } else {
            restore_ok(&set, &out, &["--until", &p.name, "-d", "vda"]);
            let r = row(&rows, "sets/compressed", chain.last().expect("file"));
            assert_same(&out.join("vda.raw"), &r.truth, &format!("{} does not read the damage", p.name));
            if chain.iter().any(|f| f == name) {
                fine += 1;
            }
        }
    }
    assert!(failed >= 1, "some point reads the damaged frame");
    assert!(fine >= 1, "the corpus has a point that reads the file but not the damaged frame");
    // qcow2: the raw stage stays a .partial, no .qcow2 appears.
    let p = point_ending_in(&pts, "vda", name);
    let out = tmp.path().join("qcow2");
    restore_fails(&set, &out, &["--until", &p.name, "-d", "vda", "--format", "qcow2"]);
    assert_only_partial(&out, "vda", "qcow2", "qcow2 of a damaged point");
}

/// Truncates a data file of a copy in the middle of a data payload and checks verify and
/// restore.
fn truncated_case(set_name: &str, name: &str, disk: &str) {
    let Some(corpus) = corpus() else { return };
    let rows = manifest(&corpus);
    let tmp = tempdir("restore");
    let set = intact_copy(&corpus, set_name, tmp.path());
    let file = set.join(name);
    let s = walk(&file);
    // The last data frame: cut its payload (its lz4 frame, when compressed) in half.
    let k = s.frames.iter().rposition(|f| f.data && f.len >= 4096).expect("a data frame");
    let frame = &s.frames[k];
    let cut = match frame.lz4.last() {
        Some(lz) => lz.file_off + lz.size / 2,
        None => frame.payload_off + frame.len / 2,
    };
    truncate(&file, cut);
    // Extents before the cut frame are intact; the damage starts at or before its start.
    let prev_end = s.frames[..k].iter().rev().find(|f| f.len > 0).map_or(0, |f| f.start + f.len);
    let pts = set_points(&set);
    assert_one_finding(
        &set,
        &Expect {
            file: &file,
            offset: Some(cut),
            range: Some((prev_end..=frame.start, s.virtual_size())),
            points: points_reading(&pts, name),
        },
    );
    let p = point_ending_in(&pts, disk, name);
    let out = tmp.path().join("damaged");
    restore_fails(&set, &out, &["--until", &p.name, "-d", disk]);
    assert_only_partial(&out, disk, "raw", "truncated");
    // The other disk at the same point, and the point before, are fine.
    let other = disks_of(&rows, set_name).into_iter().find(|d| d != disk).expect("two disks");
    let out = tmp.path().join("other");
    restore_ok(&set, &out, &["--until", &p.name, "-d", &other]);
    assert_same(
        &out.join(format!("{other}.raw")),
        &row(&rows, set_name, p.files(&other).last().expect("f")).truth,
        "other disk",
    );
    let chain = p.files(disk);
    let before = &chain[chain.len() - 2];
    let q = point_ending_in(&pts, disk, before);
    let out = tmp.path().join("before");
    restore_ok(&set, &out, &["--until", &q.name, "-d", disk]);
    assert_same(
        &out.join(format!("{disk}.raw")),
        &row(&rows, set_name, before).truth,
        "point before the damage",
    );
}

#[test]
fn verify_names_a_truncated_plain_stream() {
    truncated_case("sets/plain", "vdb.inc.virtnbdbackup.3.data", "vdb");
}

#[test]
fn verify_names_a_truncated_compressed_stream() {
    truncated_case("sets/compressed", "vdb.inc.virtnbdbackup.3.data", "vdb");
}

/// Breaks the header of the second body frame of a data file of a copy.
fn broken_header_case(set_name: &str, name: &str, disk: &str, patch: (u64, u8)) {
    let Some(corpus) = corpus() else { return };
    let tmp = tempdir("restore");
    let set = intact_copy(&corpus, set_name, tmp.path());
    let file = set.join(name);
    let s = walk(&file);
    let frame = &s.frames[1];
    let f = OpenOptions::new().write(true).open(&file).expect("open copy");
    f.write_all_at(&[patch.1], frame.header_off + patch.0).expect("patch header");
    let prev = &s.frames[0];
    let pts = set_points(&set);
    assert_one_finding(
        &set,
        &Expect {
            file: &file,
            offset: Some(frame.header_off),
            range: Some((prev.start + prev.len..=frame.start, s.virtual_size())),
            points: points_reading(&pts, name),
        },
    );
    let p = point_ending_in(&pts, disk, name);
    let out = tmp.path().join("damaged");
    restore_fails(&set, &out, &["--until", &p.name, "-d", disk]);
    assert_only_partial(&out, disk, "raw", "broken header");
}

#[test]
fn verify_names_a_broken_frame_header() {
    // "data" -> "dXta" in a plain inc.
    broken_header_case("sets/plain", "vda.inc.virtnbdbackup.2.data", "vda", (1, b'X'));
}

#[test]
fn verify_names_a_broken_frame_header_in_a_compressed_stream() {
    // A non-hex digit in the START field of a compressed full's second frame.
    broken_header_case("sets/compressed", "vdb.full.data", "vdb", (12, b'g'));
}

#[test]
fn verify_checks_chksum_sidecars() {
    let Some(corpus) = corpus() else { return };
    let tmp = tempdir("restore");
    let set = intact_copy(&corpus, "sets/plain", tmp.path());
    let name = "vdb.full.data";
    let file = set.join(name);
    let sidecar = set.join(format!("{name}.chksum"));
    let sum = stream::adler32(&file);
    // Upstream writes the decimal value without a newline; `None` means "no checksum".
    fs::write(&sidecar, sum.to_string()).expect("sidecar");
    fs::write(set.join("vda.full.data.chksum"), "None").expect("None sidecar");
    assert_intact(&set, true);
    fs::write(&sidecar, sum.wrapping_add(1).to_string()).expect("wrong sidecar");
    let pts = set_points(&set);
    assert_one_finding(
        &set,
        &Expect { file: &file, offset: None, range: None, points: points_reading(&pts, name) },
    );
    let v = verify(&set);
    let problem = v.json["findings"][0]["problem"].as_str().expect("problem");
    assert!(problem.contains(&sum.to_string()) && problem.contains(&(sum + 1).to_string()), "{problem}");
}

/// virtnbdrestore's actions (issue 18.7): `-o verify`, like `-o dump`, names the action,
/// not a folder to restore into; `-a verify` is the same; both verify as `vmback verify`
/// does, exit code included, and write nothing.
#[test]
fn restore_o_verify_and_a_verify_verify_instead_of_restoring() {
    let Some(corpus) = corpus() else { return };
    let tmp = tempdir("restore");
    let set = intact_copy(&corpus, "sets/plain", tmp.path());
    let cwd = tmp.path().join("cwd");
    fs::create_dir(&cwd).expect("cwd");
    let run = |args: &[&str]| {
        let out =
            Command::new(env!("CARGO_BIN_EXE_vmback")).args(args).current_dir(&cwd).output().expect("vmback");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let check = |want: Option<i32>| {
        let plain = vmback(&["verify", path_str(&set)]);
        let plain = (plain.status.code(), String::from_utf8_lossy(&plain.stdout).into_owned());
        assert_eq!(plain.0, want, "vmback verify: {}", plain.1);
        for args in [
            &["restore", "-i", path_str(&set), "-o", "verify"][..],
            &["restore", "-a", "verify", "-i", path_str(&set)],
            &["restore", "--action", "verify", "-i", path_str(&set), "-o", "anything"],
        ] {
            assert_eq!(run(args), plain, "{args:?} prints and exits as `vmback verify`");
        }
        assert_eq!(names(&cwd), Vec::<String>::new(), "a verify wrote into the current folder");
    };
    check(Some(0));
    fs::write(set.join("vdb.full.data.chksum"), "1").expect("wrong sidecar");
    check(Some(1));
    // A restore without an output has nowhere to go: refused, naming -o.
    let out = vmback(&["restore", "-i", path_str(&set)]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && said.contains("-o"), "{:?}: {said}", out.status);
}

// ---------------------------------------------------------------------------------------
// Interrupted restore.

/// A child process that is killed and reaped when dropped, whatever the test did.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_interrupted_restore_leaves_only_a_partial_file() {
    let tmp = tempdir("restore");
    // Data per 64 MiB of a 2 GiB disk; doubled whenever the restore finishes before the kill.
    for (attempt, per) in [8 * MIB, 16 * MIB, 32 * MIB, 64 * MIB].into_iter().enumerate() {
        let set = tmp.path().join(format!("set{attempt}"));
        let truth = tmp.path().join(format!("truth{attempt}.raw"));
        let size = 2048 * MIB;
        let fills: Vec<Fill> = (0..size / (64 * MIB))
            .map(|i| Fill { start: i * 64 * MIB, len: per, byte: 0x40 + i as u8 })
            .collect();
        write_full_set(&set, &truth, "sda", size, &fills, None);
        let out = tmp.path().join(format!("out{attempt}"));
        let (partial, image) = (out.join("sda.raw.partial"), out.join("sda.raw"));
        let mut child = Reaped(
            Command::new(support::VMBACK)
                .args([
                    "restore",
                    "-i",
                    path_str(&set),
                    "-o",
                    path_str(&out),
                    "--threads",
                    "1",
                    "--format",
                    "raw",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn vmback restore"),
        );
        // Kill as soon as the restore has begun writing; a bound only against a hang.
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut exited = None;
        while !partial.exists() {
            if let Some(st) = child.0.try_wait().expect("try_wait") {
                exited = Some(st);
                break;
            }
            assert!(Instant::now() < deadline, "restore neither started writing nor exited");
            std::thread::sleep(Duration::from_millis(1));
        }
        if exited.is_none() {
            child.0.kill().expect("SIGKILL");
            child.0.wait().expect("reap");
        }
        if image.exists() {
            eprintln!("attempt {attempt}: the restore finished before the kill; trying a bigger image");
            let _ = fs::remove_dir_all(&out);
            continue;
        }
        assert!(exited.is_none(), "restore exited on its own without an image: {exited:?}");
        let left = names(&out);
        assert!(!left.is_empty() && left.iter().all(|n| n.ends_with(".partial")), "after SIGKILL: {left:?}");
        // Running it again finishes the job: the final image, and no .partial left.
        restore_ok(&set, &out, &[]);
        assert_names(&out, &["sda.raw", "vmconfig.xml"], "rerun after the kill");
        run_ok("cmp", &[path_str(&image), path_str(&truth)]);
        return;
    }
    panic!("every restore finished before it could be killed");
}

// ---------------------------------------------------------------------------------------
// A block device target.

/// A loop device over a file, detached when dropped.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        Loop(run_ok("losetup", &["-f", "--show", path_str(file)]).trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A backing file of `size` bytes of 0xff (a device that was not zeroed).
fn ff_file(path: &Path, size: u64) {
    let f = File::create(path).expect("backing file");
    let buf = vec![0xffu8; MIB as usize];
    for off in (0..size).step_by(MIB as usize) {
        f.write_all_at(&buf, off).expect("fill 0xff");
    }
}

#[test]
fn restore_onto_a_loop_device() {
    let Some(corpus) = corpus() else { return };
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists() {
        eprintln!("skipping: needs root and loop devices");
        return;
    }
    let rows = manifest(&corpus);
    let tmp = tempdir("restore");
    let set = corpus.join("sets/compressed");
    let r = last_row(&rows, "sets/compressed", "vda");
    let size = fs::metadata(&r.truth).expect("truth").len();
    let backing = tmp.path().join("dev.img");
    ff_file(&backing, size);
    let dev = Loop::attach(&backing);
    let devp = Path::new(&dev.0);
    restore_ok(&set, devp, &["-d", "vda", "--sparse", "never"]);
    run_ok("cmp", &[&dev.0, path_str(&r.truth)]);

    // With holes left as holes, the 0xff of a device that was not zeroed shows through.
    ff_file(&backing, size);
    run_ok("blockdev", &["--flushbufs", &dev.0]);
    restore_ok(&set, devp, &["-d", "vda"]);
    let same = Command::new("cmp").args(["-s", &dev.0, path_str(&r.truth)]).status().expect("cmp");
    assert!(!same.success(), "--sparse always leaves the holes of a device unwritten");

    // One disk per device; the device must be big enough.
    let err = restore_fails(&set, devp, &[]);
    assert!(err.contains("one disk"), "{err}");
    let small = tmp.path().join("small.img");
    ff_file(&small, size / 2);
    let small_dev = Loop::attach(&small);
    let err = restore_fails(&set, Path::new(&small_dev.0), &["-d", "vda", "--sparse", "never"]);
    assert!(err.contains(&size.to_string()), "{err}");
}

// ---------------------------------------------------------------------------------------
// Output into a closed pipe (`vmback dump | head -1`).

/// A command whose reader went away (`vmback dump -i SET | head -1`) should stop quietly
/// (SIGPIPE, or an error exit), as Unix tools do; vmback panics ("failed printing to
/// stdout: Broken pipe") and exits 101. Same for `verify` and `ls`.
#[test]
fn dump_and_verify_into_a_closed_pipe_do_not_panic() {
    let tmp = tempdir("restore");
    let set = tmp.path().join("set");
    let fills = [Fill { start: 0, len: MIB, byte: 0x5a }];
    write_full_set(&set, &tmp.path().join("truth.raw"), "sda", 8 * MIB, &fills, None);
    for args in [vec!["dump", "-i", path_str(&set)], vec!["verify", path_str(&set)]] {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        drop(read);
        let out = Command::new(support::VMBACK)
            .args(&args)
            .stdout(Stdio::from(write))
            .stderr(Stdio::piped())
            .output()
            .expect("run vmback");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "vmback {args:?} into a closed pipe: {}\n{stderr}", out.status);
    }
}
