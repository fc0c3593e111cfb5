//! Partitions as files and `info.json` (issue 6, parts 2 and 3) on the real stack.
//!
//! A raw disk image is partitioned by sfdisk (GPT; and MBR with an extended partition
//! holding a logical one); ext4 filesystems with known files, made by `mkfs.ext4 -d`, are
//! placed in its partitions (the one the test reads in the SECOND partition). The image is
//! written into the qcow2 disk of a real libvirt domain (paused, no guest OS, as in
//! tests/stack/backup.rs) and backed up for real with `vmback backup -l full`; for GPT, a new
//! file is then written into partition 2's filesystem (debugfs, then the changed partition
//! written into the running disk) and `vmback backup -l inc` saves it. For every point:
//! - `vmback restore` gives an image whose table [`read_table`] reads at the offsets sfdisk
//!   made, and whose partitions loop-mount (with `offset=`) holding the known files;
//! - in `vmback mount`, the point folder holds `<disk>.p<N>.raw` beside `<disk>.raw`, one
//!   per partition, which `mount -o loop,ro` mounts with no offset; and `info.json`, which
//!   lists the point's stream files in the order they apply.

// The backup tests' libvirt domain and backup helpers.
use crate::backup::support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use support::{
    Dom, MIB, Step, Tool, disk, ls_json, mount, path_str, point_name, run_ok, stack, tempdir, vmback_ok,
};
use vmback::fs::partition::{Partition, read_table};

const DISK: u64 = 64 * MIB;
const HELLO: &str = "hello from the second partition\n";
const SECOND: &str = "written after the full backup\n";

/// The partitions of an image file.
fn table_of(path: &Path) -> Vec<Partition> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    read_table(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The data partitions as `sfdisk --json` sees them (extended containers left out),
/// numbered by the digits their node names end with.
fn sfdisk_layout(raw: &Path) -> Vec<Partition> {
    let json: Value =
        serde_json::from_str(&run_ok("sfdisk", &["--json", path_str(raw)])).expect("sfdisk json");
    let table = &json["partitiontable"];
    let ss = table["sectorsize"].as_u64().expect("sectorsize");
    table["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter(|p| !["5", "f", "85"].contains(&p["type"].as_str().unwrap_or("")))
        .map(|p| {
            let node = p["node"].as_str().expect("node");
            let digits = node.len() - node.trim_end_matches(|c: char| c.is_ascii_digit()).len();
            Partition {
                number: node[node.len() - digits..].parse().expect("number"),
                start: p["start"].as_u64().expect("start") * ss,
                len: p["size"].as_u64().expect("size") * ss,
            }
        })
        .collect()
}

/// An ext4 filesystem image of `size` bytes holding `files` (name, text).
fn make_fs(dir: &Path, tag: &str, size: u64, files: &[(&str, &str)]) -> PathBuf {
    let root = dir.join(format!("{tag}.root"));
    std::fs::create_dir(&root).expect("mkdir");
    for (name, text) in files {
        std::fs::write(root.join(name), text).expect("write file");
    }
    let img = dir.join(format!("{tag}.ext4"));
    File::create(&img).and_then(|f| f.set_len(size)).expect("fs image");
    run_ok("mkfs.ext4", &["-q", "-F", "-L", tag, "-d", path_str(&root), path_str(&img)]);
    img
}

/// A `DISK`-byte raw image partitioned by `sfdisk SCRIPT`, with each `(number, fs image)`
/// copied into its partition. Returns the layout sfdisk made.
fn make_disk(raw: &Path, script: &str, filesystems: &[(u32, &Path)]) -> Vec<Partition> {
    File::create(raw).and_then(|f| f.set_len(DISK)).expect("disk image");
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", path_str(raw)])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run sfdisk (contrib/install-deps.sh installs it)");
    std::io::Write::write_all(&mut sfdisk.stdin.take().expect("stdin"), script.as_bytes()).expect("script");
    assert!(sfdisk.wait().expect("sfdisk").success(), "sfdisk failed on {script:?}");
    let layout = sfdisk_layout(raw);
    let out = File::options().write(true).open(raw).expect("open disk image");
    for (number, fs) in filesystems {
        let part = layout.iter().find(|p| p.number == *number).expect("partition made by sfdisk");
        let bytes = std::fs::read(fs).expect("read fs image");
        assert!(bytes.len() as u64 <= part.len, "{} does not fit partition {number}", fs.display());
        out.write_all_at(&bytes, part.start).expect("write fs into the disk image");
    }
    layout
}

/// A read-only loop mount, unmounted when dropped.
struct LoopMount {
    dir: tempfile::TempDir,
}

impl LoopMount {
    /// `mount -o loop,ro[,offset=,sizelimit=] IMAGE DIR`.
    fn new(image: &Path, window: Option<&Partition>) -> LoopMount {
        let dir = tempdir("loop");
        let mut opts = "loop,ro".to_owned();
        if let Some(p) = window {
            opts.push_str(&format!(",offset={},sizelimit={}", p.start, p.len));
        }
        run_ok("mount", &["-o", &opts, path_str(image), path_str(dir.path())]);
        LoopMount { dir }
    }

    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join(name)).ok()
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// What one partition's filesystem must hold: `(file, Some(text))` or `(file, None)` for
/// a file that must not be there.
type Expect<'a> = (u32, Vec<(&'a str, Option<&'a str>)>);

fn check_fs(m: &LoopMount, what: &str, files: &[(&str, Option<&str>)]) {
    for (name, text) in files {
        assert_eq!(m.read(name).as_deref(), *text, "{what}: file {name}");
    }
}

/// `vmback restore --until POINT`: the image's table is the one sfdisk made and each
/// partition's filesystem holds what `expect` says.
fn check_restore(set: &Path, point: &str, layout: &[Partition], expect: &[Expect]) {
    let out = tempdir("restore");
    let until = point.rsplit('/').next().expect("point name");
    vmback_ok(&[
        "restore",
        "-i",
        path_str(set),
        "-o",
        path_str(out.path()),
        "--until",
        until,
        "--format",
        "raw",
    ]);
    let image = out.path().join("vda.raw");
    assert_eq!(table_of(&image), layout, "restored {point}: partition table");
    for (number, files) in expect {
        let part = layout.iter().find(|p| p.number == *number).expect("partition");
        let m = LoopMount::new(&image, Some(part));
        check_fs(&m, &format!("restored {point}, partition {number}"), files);
    }
}

/// In the mount: `vda.p<N>.raw` for every partition (its size the partition's), each
/// loop-mountable with no offset; `info.json` listing the step's chain.
fn check_mounted(root: &Path, point: &str, chain: &[&Step], layout: &[Partition], expect: &[Expect]) {
    let dir = root.join(point);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.contains(&"vda.raw".to_owned()), "{point}: {names:?}");
    for p in layout {
        let file = dir.join(format!("vda.p{}.raw", p.number));
        let len = std::fs::metadata(&file).map(|m| m.len());
        assert_eq!(len.ok(), Some(p.len), "{}: size (folder holds {names:?})", file.display());
    }
    for (number, files) in expect {
        let m = LoopMount::new(&dir.join(format!("vda.p{number}.raw")), None);
        check_fs(&m, &format!("mounted {point}/vda.p{number}.raw"), files);
    }

    let text =
        std::fs::read_to_string(dir.join("info.json")).unwrap_or_else(|e| panic!("{point}/info.json: {e}"));
    let info: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{point}/info.json: {e}:\n{text}"));
    assert_eq!(Some(info["point"].as_str().unwrap_or("")), point.rsplit('/').next(), "{info:#}");
    assert_eq!(info["status"], "complete", "{info:#}");
    let disk = &info["disks"][0];
    assert_eq!(disk["disk"], "vda", "{info:#}");
    let streams = disk["streams"].as_array().expect("streams");
    let files: Vec<&str> = streams.iter().map(|s| s["file"].as_str().expect("file")).collect();
    let want: Vec<&str> = chain.iter().map(|s| s.files["vda"].as_str()).collect();
    assert_eq!(files, want, "{point}/info.json: streams");
    for (s, step) in streams.iter().zip(chain) {
        assert_eq!(s["level"], step.level.as_str(), "{s}");
        let size = std::fs::metadata(step.set.join(&step.files["vda"])).expect("stat").len();
        assert_eq!(s["size"], size, "{s}");
    }
}

/// Writes `image` into the domain's disk `vda` at byte `at`. The file must be readable
/// by qemu, so it is kept in the domain's own folder.
fn write_into(dom: &Dom, image: &Path, at: u64) {
    let len = std::fs::metadata(image).expect("stat").len();
    dom.writes("vda", &[format!("write -s {} {at} {len}", path_str(image))]);
}

#[test]
fn gpt_disk_partitions_show_as_files_after_full_and_inc() {
    if !stack() {
        return;
    }
    let name = "vmback-t-parts-gpt";
    let mut dom = Dom::new(name, vec![disk("vda", DISK)], false);
    let src = dom.dir.path().join("src");
    let p1 = make_fs(&src, "p1", 8 * MIB, &[("which.txt", "partition one\n")]);
    let p2 = make_fs(&src, "p2", 40 * MIB, &[("hello.txt", HELLO)]);
    let raw = src.join("disk.raw");
    let layout = make_disk(&raw, "label: gpt\nsize=8MiB\nsize=40MiB\n", &[(1, &p1), (2, &p2)]);
    assert_eq!(layout.iter().map(|p| p.number).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(table_of(&raw), layout, "read_table on the image sfdisk made");
    write_into(&dom, &raw, 0);

    let root = tempdir(name);
    let set = root.path().join("set");
    let full = dom.backup(Tool::Vmback, "full", &set, &[]);

    // A new file in partition 2's filesystem, written into the running disk.
    let second = src.join("second.txt");
    std::fs::write(&second, SECOND).expect("write");
    run_ok("debugfs", &["-w", "-R", &format!("write {} second.txt", path_str(&second)), path_str(&p2)]);
    write_into(&dom, &p2, layout[1].start);
    let inc = dom.backup(Tool::Vmback, "inc", &set, &[]);

    let ls = ls_json(&set);
    let (full_point, inc_point) = (point_name(&ls, &full), point_name(&ls, &inc));
    let one = (1, vec![("which.txt", Some("partition one\n"))]);
    let before = [one.clone(), (2, vec![("hello.txt", Some(HELLO)), ("second.txt", None)])];
    let after = [one, (2, vec![("hello.txt", Some(HELLO)), ("second.txt", Some(SECOND))])];
    check_restore(&set, &full_point, &layout, &before);
    check_restore(&set, &inc_point, &layout, &after);

    let m = mount(&set);
    check_mounted(m.dir.path(), &full_point, &[&full], &layout, &before);
    check_mounted(m.dir.path(), &inc_point, &[&full, &inc], &layout, &after);
    check_partition_writes(&m.dir.path().join(&inc_point), &layout[1]);
}

/// A partition file is a window on its image: the same bytes, and writes through it (an
/// ext4 mounted read-write from `vda.p<N>.raw`) land in the image at the partition's
/// offset, in the overlay.
fn check_partition_writes(point: &Path, part: &Partition) {
    let file = point.join(format!("vda.p{}.raw", part.number));
    let image = File::open(point.join("vda.raw")).expect("open image");
    let window = |what: &str| {
        let mut buf = vec![0u8; part.len as usize];
        image.read_exact_at(&mut buf, part.start).expect("read the image's window");
        assert!(buf == std::fs::read(&file).expect("read partition file"), "{what}: window differs");
    };
    window("before writes");
    let dir = tempdir("rw");
    run_ok("mount", &["-o", "loop", path_str(&file), path_str(dir.path())]);
    std::fs::write(dir.path().join("written.txt"), "written through the partition file\n").expect("write");
    run_ok("umount", &[path_str(dir.path())]);
    window("after writes");
    let m = LoopMount::new(&point.join("vda.raw"), Some(part));
    check_fs(
        &m,
        "the image, at the partition's offset",
        &[("written.txt", Some("written through the partition file\n"))],
    );
}

#[test]
fn mbr_disk_with_a_logical_partition_shows_each_as_a_file() {
    if !stack() {
        return;
    }
    let name = "vmback-t-parts-mbr";
    let mut dom = Dom::new(name, vec![disk("vda", DISK)], false);
    let src = dom.dir.path().join("src");
    let p2 = make_fs(&src, "p2", 24 * MIB, &[("hello.txt", HELLO)]);
    let p5 = make_fs(&src, "p5", 16 * MIB, &[("logical.txt", "a logical partition\n")]);
    let raw = src.join("disk.raw");
    // In sectors: 8 MiB, 24 MiB, an extended partition of 30 MiB and a logical one of
    // 16 MiB in it (sfdisk needs the logical one's start to place it inside).
    let script = "label: dos\n\
        start=2048, size=16384, type=83\n\
        start=18432, size=49152, type=83\n\
        start=67584, size=61440, type=5\n\
        start=69632, size=32768, type=83\n";
    let layout = make_disk(&raw, script, &[(2, &p2), (5, &p5)]);
    assert_eq!(layout.iter().map(|p| p.number).collect::<Vec<_>>(), [1, 2, 5]);
    assert_eq!(table_of(&raw), layout, "read_table on the image sfdisk made");
    write_into(&dom, &raw, 0);

    let root = tempdir(name);
    let set = root.path().join("set");
    let full = dom.backup(Tool::Vmback, "full", &set, &[]);
    let point = point_name(&ls_json(&set), &full);
    let expect =
        [(2, vec![("hello.txt", Some(HELLO))]), (5, vec![("logical.txt", Some("a logical partition\n"))])];
    check_restore(&set, &point, &layout, &expect);

    let m = mount(&set);
    check_mounted(m.dir.path(), &point, &[&full], &layout, &expect);
}
