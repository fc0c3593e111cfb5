//! Writable images through a real mount: the real `vmback mount` binary over FUSE, written
//! by real clients (qemu-io, a paused qemu VM through HMP `qemu-io`, qemu-img with a qcow2
//! on top, ext4 on a loop device) and by plain syscalls, and checked against models of
//! the bytes. Also: kept overlays across mounts and refused against another chain, and
//! the backup files staying byte-identical under heavy writes.
//!
//! Every vmback, qemu and loop mount is owned by a guard that cleans up whatever the test
//! did. Without /dev/fuse (or a needed command) a test prints "skipping: ..." and passes.

mod support;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::common::files::{aligned, sha256_tree, write_until_enospc};
use crate::common::fuse::{is_fuse_mounted, path_str, small_tmpfs};
use crate::common::mounted::{LoopMount, Mounted};
use crate::common::ready::{is_root, ready, root_ready};
use crate::common::run::{run, run_ok};
use crate::common::sample::{sample, sample_dirs, sample_image};
use crate::common::tempdir;
use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::unistd::{Whence, lseek};
use support::{
    DiskSpec, KIB, MIB, Qemu, Rng, assert_same, images, pread, raw_set, read_all, read_range, stream_set,
};

const DATE: &str = "2026-06-01T08:00:00.000001";

fn rw(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn seek(f: &File, off: u64, whence: Whence) -> Result<u64, Errno> {
    lseek(f, off as i64, whence).map(|p| p as u64)
}

fn punch(f: &File, off: u64, len: u64, flags: FallocateFlags) {
    fallocate(f, flags, off as i64, len as i64)
        .unwrap_or_else(|e| panic!("fallocate {flags:?} {off}+{len}: {e}"));
}

const PUNCH: FallocateFlags = FallocateFlags::FALLOC_FL_PUNCH_HOLE.union(FallocateFlags::FALLOC_FL_KEEP_SIZE);

fn zero_model(model: &mut [u8], off: u64, len: u64) {
    let end = (off + len).min(model.len() as u64);
    model[off as usize..end as usize].fill(0);
}

fn write_model(model: &mut [u8], off: u64, data: &[u8]) {
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// Entries of a folder (which must exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A second set in the source tree: `odd-vm`, one lz4 disk `vdc` whose size is not a page
/// multiple, with data at its start and in its last bytes.
fn odd_set(dir: &Path) -> Vec<u8> {
    let size = 4 * MIB + 1536;
    let mut rng = Rng(0x0dd);
    let disks = [DiskSpec {
        name: "vdc",
        size,
        lz4: true,
        extents: vec![(0, rng.bytes(100 * KIB as usize)), (size - 3000, rng.bytes(3000))],
    }];
    stream_set(dir, "odd-vm", DATE, &disks).remove(0)
}

// ---------------------------------------------------------------------------------------
// qemu-io

/// `qemu-io -f raw` writes patterns, write-zeroes (with and without unmap) and discards,
/// buffered and with `-t none` (O_DIRECT); a fresh `qemu-io` reads them back with
/// `read -P`, and the whole image read through the mount matches the model.
#[test]
fn qemu_io_patterns_zeroes_and_discards() {
    if !ready(&["qemu-io"]) {
        return;
    }
    let t = tempdir();
    let src = sample(t.path());
    let ovl = t.path().join("ovl");
    std::fs::create_dir_all(&ovl).unwrap();
    let mnt = t.path().join("mnt");
    let _m = Mounted::start(&src, &mnt, &["--overlay-dir", path_str(&ovl), "--dirty-size", "256K"]);
    for (img, cache) in [
        (sample_image(&mnt, "virtnbdbackup.1", "sdb"), "writeback"),
        (sample_image(&mnt, "virtnbdbackup.2", "sda"), "none"),
    ] {
        let mut model = read_all(&img);
        let size = model.len() as u64;
        // (qemu-io command, offset, length, byte it leaves); ranges do not overlap.
        let ops: Vec<(&str, u64, u64, u8)> = vec![
            ("write -P 0x5a", 4097, 70000, 0x5a),
            ("write -P 0xa5", 8 * MIB, MIB, 0xa5),
            ("write -z", 9 * MIB + 512, 64 * KIB + 100, 0),
            ("write -z -u", 10 * MIB, 128 * KIB, 0),
            ("discard", 512 * KIB, 256 * KIB, 0),
            ("discard", 10 * MIB + 512 * KIB, 8 * KIB, 0),
            ("write -P 0x11", size - 3, 3, 0x11),
        ];
        let mut args: Vec<String> = ["-f", "raw", "-d", "unmap", "-t", cache].map(String::from).to_vec();
        for (cmd, off, len, byte) in &ops {
            args.push("-c".into());
            args.push(format!("{cmd} {off} {len}"));
            model[*off as usize..(*off + *len) as usize].fill(*byte);
        }
        args.push(path_str(&img).into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_ok("qemu-io", &argv);
        assert!(!out.contains("failed") && !out.to_lowercase().contains("error"), "qemu-io writes:\n{out}");

        let mut args: Vec<String> = ["-r", "-f", "raw", "-t", cache].map(String::from).to_vec();
        for (_, off, len, byte) in &ops {
            args.push("-c".into());
            args.push(format!("read -P {byte:#x} {off} {len}"));
        }
        args.push(path_str(&img).into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_ok("qemu-io", &argv);
        assert!(!out.contains("Pattern verification failed"), "{} (cache={cache}):\n{out}", img.display());
        assert_eq!(out.matches("read ").count(), ops.len(), "qemu-io reads:\n{out}");
        assert_same(&read_all(&img), &model, &format!("{} after qemu-io (cache={cache})", img.display()));
    }
}

// ---------------------------------------------------------------------------------------
// A qemu VM

/// A paused VM whose virtio-blk disk is the image: HMP `qemu-io` writes through the
/// device (patterns, unaligned, write-zeroes, discard, the last page), flushes; the image
/// read through a fresh open matches. Then the other way: bytes written through the mount
/// are what the VM's disk reads.
fn vm_roundtrip(cache: &str) {
    if !ready(&["qemu-system-x86_64"]) {
        return;
    }
    let t = tempdir();
    let src = sample(t.path());
    let ovl = t.path().join("ovl");
    std::fs::create_dir_all(&ovl).unwrap();
    let mnt = t.path().join("mnt");
    let _m = Mounted::start(&src, &mnt, &["--overlay-dir", path_str(&ovl), "--dirty-size", "1M"]);
    let img = sample_image(&mnt, "virtnbdbackup.2", "sda");
    let mut model = read_all(&img);
    let size = model.len() as u64;

    let drive = format!("file={},format=raw,if=none,id=d0,cache={cache},discard=unmap", img.display());
    let mut q = Qemu::start(t.path(), &["-drive", &drive, "-device", "virtio-blk-pci,drive=d0,id=vd0"]);
    let info = q.hmp("info block");
    let dev = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Attached to:"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("no 'Attached to:' in info block:\n{info}"));
    assert!(info.contains(&img.display().to_string()), "info block:\n{info}");

    // (command, offset, length, byte left), in ranges that do not overlap: over data
    // of the full, of an incremental, over holes, unaligned, and the last page.
    let ops: Vec<(&str, u64, u64, u8)> = vec![
        ("write -P 0xab", 0, MIB, 0xab),
        ("write -P 0xcd", 5_000_000, 3000, 0xcd),
        ("write -P 0x3c", 8 * MIB + 100, 200 * KIB, 0x3c),
        ("write -z", 9 * MIB, 64 * KIB, 0),
        ("write -z -u", 10 * MIB, 128 * KIB, 0),
        ("discard", 2 * MIB, 512 * KIB, 0),
        ("write -P 0xef", size - 4096, 4096, 0xef),
    ];
    for (cmd, off, len, byte) in &ops {
        q.hmp(&format!("qemu-io -d {dev} \"{cmd} {off} {len}\""));
        model[*off as usize..(*off + *len) as usize].fill(*byte);
    }
    q.hmp(&format!("qemu-io -d {dev} \"flush\""));
    assert_same(&read_all(&img), &model, &format!("image after VM writes (cache={cache})"));

    // Host writes through the mount; the VM's disk must read them (no stale cache).
    let f = rw(&img);
    f.write_all_at(&[0x77; 64 * KIB as usize], 20 * MIB).unwrap();
    f.write_all_at(&[0x78; 5], 9 * MIB + 4093).unwrap();
    f.sync_all().unwrap();
    for (off, len, byte) in [(20 * MIB, 64 * KIB, 0x77u8), (9 * MIB + 4093, 5, 0x78), (0, MIB, 0xab)] {
        q.hmp(&format!("qemu-io -d {dev} \"read -P {byte:#x} {off} {len}\""));
    }
    let log = q.quit();
    assert!(
        !log.contains("Pattern verification failed"),
        "VM read stale or wrong data (cache={cache}):\n{log}"
    );
    assert!(log.contains("read 65536/65536 bytes at offset 20971520"), "VM reads did not run:\n{log}");
    assert_eq!(log.matches("wrote ").count(), 6, "qemu-io writes in the VM:\n{log}");
}

#[test]
fn vm_virtio_writes_cache_writeback() {
    vm_roundtrip("writeback");
}

#[test]
fn vm_virtio_writes_cache_none() {
    vm_roundtrip("none");
}

// ---------------------------------------------------------------------------------------
// qemu-img

/// A qcow2 with the mounted image as its raw backing file takes writes and reads
/// through to the (already written) image; `qemu-img convert` of the mounted image to raw
/// and to qcow2 gives the image's bytes (convert skips what SEEK_DATA calls holes, so a
/// wrong hole shows here).
#[test]
fn qcow2_on_top_and_convert() {
    if !ready(&["qemu-img", "qemu-io"]) {
        return;
    }
    let t = tempdir();
    let src = sample(t.path());
    let ovl = t.path().join("ovl");
    std::fs::create_dir_all(&ovl).unwrap();
    let mnt = t.path().join("mnt");
    let _m = Mounted::start(&src, &mnt, &["--overlay-dir", path_str(&ovl), "--dirty-size", "128K"]);
    let img = sample_image(&mnt, "virtnbdbackup.1", "sdb");
    let mut model = read_all(&img);
    let size = model.len() as u64;

    // Change the image through the mount first: data into holes, a punch over data.
    let mut rng = Rng(3);
    let f = rw(&img);
    for (off, len) in [(3 * MIB + 7, 300 * KIB), (13 * MIB, 4096), (size - 10, 10), (6 * MIB + 4095, 2)] {
        let data = rng.bytes(len as usize);
        f.write_all_at(&data, off).unwrap();
        write_model(&mut model, off, &data);
    }
    punch(&f, 8 * MIB, 256 * KIB, PUNCH);
    zero_model(&mut model, 8 * MIB, 256 * KIB);
    f.sync_all().unwrap();
    drop(f);

    let top = t.path().join("top.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", path_str(&img), "-F", "raw", path_str(&top)]);
    let mut top_model = model.clone();
    let ops = [
        ("write -P 0x42", MIB, 64 * KIB, 0x42u8),
        ("write -z", 8 * MIB + 256 * KIB, 4096, 0),
        ("write -P 0x43", size - 512, 512, 0x43),
    ];
    let mut args = vec!["-f".to_owned(), "qcow2".to_owned()];
    for (cmd, off, len, byte) in ops {
        args.extend(["-c".to_owned(), format!("{cmd} {off} {len}")]);
        top_model[off as usize..(off + len) as usize].fill(byte);
    }
    args.push(path_str(&top).into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok("qemu-io", &argv);
    let last = format!("read -P 0x43 {} 512", size - 512);
    let out =
        run_ok("qemu-io", &["-r", "-f", "qcow2", "-c", "read -P 0x42 1M 64k", "-c", &last, path_str(&top)]);
    assert!(!out.contains("failed"), "reading the qcow2:\n{out}");
    assert_same(&read_all(&img), &model, "the backing image after writes into the qcow2 above it");
    let top_raw = t.path().join("top.raw");
    run_ok("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", path_str(&top), path_str(&top_raw)]);
    assert_same(&read_all(&top_raw), &top_model, "qcow2 over the mounted image, converted to raw");

    let conv_raw = t.path().join("conv.raw");
    let conv_qcow2 = t.path().join("conv.qcow2");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", path_str(&img), path_str(&conv_raw)]);
    assert_same(&read_all(&conv_raw), &model, "qemu-img convert -O raw of the written image");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", path_str(&img), path_str(&conv_qcow2)]);
    run_ok("qemu-img", &["compare", "-q", "-f", "qcow2", "-F", "raw", path_str(&conv_qcow2), path_str(&img)]);
    run_ok("qemu-img", &["compare", "-q", "-f", "raw", "-F", "raw", path_str(&img), path_str(&conv_raw)]);
    let back = t.path().join("back.raw");
    run_ok("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", path_str(&conv_qcow2), path_str(&back)]);
    assert_same(&read_all(&back), &model, "the qcow2 conversion converted back");
}

// ---------------------------------------------------------------------------------------
// ext4 on a loop device

/// A 64 MiB ext4 image made by `mkfs.ext4 -d` from `files` (name, bytes), as a sparse raw
/// file at `raw`.
fn make_ext4(raw: &Path, files: &[(&str, Vec<u8>)]) {
    let pop = raw.with_extension("d");
    std::fs::create_dir_all(&pop).unwrap();
    for (name, bytes) in files {
        std::fs::write(pop.join(name), bytes).unwrap();
    }
    File::create(raw).unwrap().set_len(64 * MIB).unwrap();
    run_ok("mkfs.ext4", &["-q", "-F", "-b", "4096", "-E", "nodiscard", "-d", path_str(&pop), path_str(raw)]);
}

fn ext4_ready() -> bool {
    if !ready(&["mkfs.ext4", "e2fsck", "losetup", "mount", "umount", "fstrim"]) {
        return false;
    }
    if !is_root() || !Path::new("/dev/loop-control").exists() {
        eprintln!("skipping: loop mounts need root and /dev/loop-control");
        return false;
    }
    true
}

/// ext4 read-write through a loop device on the mounted image: write, delete and fstrim
/// (discards reach vmback as fallocate punches), unmount, fsck, mount again and read.
/// Then with `--keep-overlay`: a file written in one vmback session is there in the next.
/// Then a different chain with the same domain, point and disk names is refused with a
/// message naming the kept overlay. The backup files never change.
#[test]
fn ext4_loop_rw_and_kept_overlay() {
    if !ext4_ready() {
        return;
    }
    let t = tempdir();
    let mut rng = Rng(0xe47);
    let hello = b"hello from the backup\n".to_vec();
    let old = rng.bytes(200 * KIB as usize);
    let raw = t.path().join("work.raw");
    make_ext4(&raw, &[("hello.txt", hello.clone()), ("old.bin", old.clone())]);
    let set = t.path().join("set");
    raw_set(&set, "ext4-vm", "sda", DATE, &raw);
    let sums = sha256_tree(&set);
    let mnt = t.path().join("mnt");
    let lp = t.path().join("lp");
    let ovl = t.path().join("ovl");
    std::fs::create_dir_all(&ovl).unwrap();
    let img = mnt.join("ext4-vm/virtnbdbackup.0/sda.raw");

    // 1. Scratch overlay.
    let new = rng.bytes(300 * KIB as usize + 17);
    {
        let mut m = Mounted::start(&set, &mnt, &["--overlay-dir", path_str(&ovl), "--dirty-size", "256K"]);
        let l = LoopMount::mount(&img, &lp, "loop,rw");
        assert_eq!(std::fs::read(lp.join("hello.txt")).unwrap(), hello);
        assert_same(&std::fs::read(lp.join("old.bin")).unwrap(), &old, "old.bin from the backup");
        std::fs::write(lp.join("new.bin"), &new).unwrap();
        File::open(lp.join("new.bin")).unwrap().sync_all().unwrap();
        std::fs::remove_file(lp.join("old.bin")).unwrap();
        run_ok("sync", &["-f", path_str(&lp)]);
        run_ok("fstrim", &[path_str(&lp)]);
        l.unmount();
        run_ok("e2fsck", &["-fn", path_str(&img)]);
        let l = LoopMount::mount(&img, &lp, "loop,rw");
        assert_same(&std::fs::read(lp.join("new.bin")).unwrap(), &new, "new.bin after a loop remount");
        assert!(!lp.join("old.bin").exists());
        assert_eq!(std::fs::read(lp.join("hello.txt")).unwrap(), hello);
        l.unmount();
        if m.stop().is_some() {
            assert!(entries(&ovl).is_empty(), "scratch overlay left behind: {:?}", entries(&ovl));
        }
    }

    // 2. Kept overlay, across two vmback sessions.
    let keep = t.path().join("keep");
    let kept = rng.bytes(MIB as usize + 4096 + 3);
    let keep_flags = ["--keep-overlay", path_str(&keep), "--dirty-size", "256K"];
    {
        let mut m = Mounted::start(&set, &mnt, &keep_flags);
        let l = LoopMount::mount(&img, &lp, "loop,rw");
        assert!(!lp.join("new.bin").exists(), "a scratch overlay's data outlived its mount");
        std::fs::write(lp.join("kept.bin"), &kept).unwrap();
        l.unmount();
        m.stop();
    }
    let map = keep.join("ext4-vm/virtnbdbackup.0/sda.overlay.json");
    assert!(map.is_file(), "no kept map at {}", map.display());
    {
        let mut m = Mounted::start(&set, &mnt, &keep_flags);
        let l = LoopMount::mount(&img, &lp, "loop,rw");
        assert_same(&std::fs::read(lp.join("kept.bin")).unwrap(), &kept, "kept.bin in the next session");
        assert_eq!(std::fs::read(lp.join("hello.txt")).unwrap(), hello);
        l.unmount();
        run_ok("e2fsck", &["-fn", path_str(&img)]);
        m.stop();
    }

    // 3. Another chain under the same names: refused, naming the overlay.
    let raw2 = t.path().join("other.raw");
    make_ext4(&raw2, &[("hello.txt", b"another disk\n".to_vec()), ("pad.bin", rng.bytes(64 * KIB as usize))]);
    let set2 = t.path().join("set2");
    raw_set(&set2, "ext4-vm", "sda", DATE, &raw2);
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert_ne!(
        len(&set.join("sda.full.data")),
        len(&set2.join("sda.full.data")),
        "test setup: chains must differ"
    );
    match Mounted::try_start(&set2, &mnt, &keep_flags) {
        Ok(_) => panic!("vmback mounted another chain over a kept overlay"),
        Err((None, log)) => panic!("vmback neither mounted nor exited:\n{log}"),
        Err((Some(st), log)) => {
            assert!(!st.success(), "exit status {st}");
            assert!(log.contains(path_str(&map)), "the error does not name the kept overlay:\n{log}");
            assert!(log.contains("another restore point"), "unclear error:\n{log}");
        }
    }
    assert!(!is_fuse_mounted(&mnt));
    assert_eq!(sha256_tree(&set), sums, "backup files changed");
}

/// A kept overlay written against one chain must not be laid over another chain whose
/// stream files have the same names and sizes (a set taken again of a disk with the same
/// allocation, e.g. after rotation).
#[test]
fn kept_overlay_refuses_a_same_sized_other_chain() {
    if !ready(&[]) {
        return;
    }
    let t = tempdir();
    let set = |name: &str, byte: u8, date: &str| {
        let dir = t.path().join(name);
        let disks = [DiskSpec {
            name: "sda",
            size: 4 * MIB,
            lz4: false,
            extents: vec![(0, vec![byte; 256 * KIB as usize])],
        }];
        stream_set(&dir, "same-vm", date, &disks);
        dir
    };
    let a = set("a", b'A', "2026-06-01T08:00:00.000001");
    let b = set("b", b'B', "2026-06-09T08:00:00.000001");
    let size = |d: &Path| std::fs::metadata(d.join("sda.full.data")).unwrap().len();
    assert_eq!(size(&a), size(&b), "test setup: equal sizes");
    let keep = t.path().join("keep");
    let mnt = t.path().join("mnt");
    let flags = ["--keep-overlay", path_str(&keep)];
    {
        let mut m = Mounted::start(&a, &mnt, &flags);
        let f = rw(&mnt.join("same-vm/virtnbdbackup.0/sda.raw"));
        f.write_all_at(b"written over chain A", MIB).unwrap();
        f.sync_all().unwrap();
        drop(f);
        m.stop();
    }
    if let Ok(m) = Mounted::try_start(&b, &mnt, &flags) {
        let img = mnt.join("same-vm/virtnbdbackup.0/sda.raw");
        let base = read_range(&img, 0, 4);
        let over = read_range(&img, MIB, 20);
        drop(m);
        panic!(
            "chain B mounted with chain A's kept overlay: B's bytes {:?} under A's write {:?}",
            String::from_utf8_lossy(&base),
            String::from_utf8_lossy(&over)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Semantics through the mount

/// Read-after-write at unaligned offsets, on a plain image, an lz4 image and an image
/// whose size is not a page multiple: through the writing handle, through a second handle
/// whose pages were cached before the write (no stale page cache), through a fresh open,
/// and with O_DIRECT both ways. Other restore points of the same disk do not change.
#[test]
fn read_after_write_two_handles_no_stale_cache() {
    if !ready(&[]) {
        return;
    }
    let t = tempdir();
    let root = t.path().join("src");
    sample(&root);
    odd_set(&root.join("odd"));
    let mnt = t.path().join("mnt");
    let ovl = t.path().join("ovl");
    std::fs::create_dir_all(&ovl).unwrap();
    let m = Mounted::start(&root, &mnt, &["--overlay-dir", path_str(&ovl), "--dirty-size", "64K"]);
    let cases = [
        (sample_image(&mnt, "virtnbdbackup.1", "sdb"), Some(sample_image(&mnt, "virtnbdbackup.2", "sdb"))),
        (sample_image(&mnt, "virtnbdbackup.0", "sda"), Some(sample_image(&mnt, "virtnbdbackup.1", "sda"))),
        (mnt.join("odd-vm/virtnbdbackup.0/vdc.raw"), None),
    ];
    let mut rng = Rng(0x5eed);
    for (img, other) in &cases {
        let other_before = other.as_ref().map(|o| read_all(o));
        let mut model = read_all(img);
        let size = model.len() as u64;
        let w = rw(img);
        let r = File::open(img).unwrap();
        // Fill r's page cache with the whole image.
        assert_same(&pread(&r, 0, size as usize), &model, "first read");
        let mut writes = vec![
            (0, 1),
            (4095, 2),
            (3 * 4096 - 1, 4098),
            (12345, 70000),
            (size / 2 + 7, MIB + 3),
            (size - 1, 1),
            (size - 5000, 5000),
            (size - 4096 - 10, 20),
        ];
        if size > 8 * MIB {
            writes.push((8 * MIB - 100, 200));
        }
        for (off, len) in writes {
            let data = rng.bytes(len as usize);
            w.write_all_at(&data, off).unwrap();
            write_model(&mut model, off, &data);
            let (from, to) = (off.saturating_sub(100), (off + len + 100).min(size));
            let want = &model[from as usize..to as usize];
            let what = format!("{} write {len} at {off}", img.display());
            assert_same(&pread(&w, from, (to - from) as usize), want, &format!("{what}: same handle"));
            assert_same(
                &pread(&r, from, (to - from) as usize),
                want,
                &format!("{what}: second, cached handle"),
            );
            assert_same(&read_range(img, from, (to - from) as usize), want, &format!("{what}: fresh open"));
        }
        // O_DIRECT write, read through the cached handle; buffered write, O_DIRECT read.
        let d = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(img).unwrap();
        let mut store = Vec::new();
        let buf = aligned(&mut store, 8192);
        buf.copy_from_slice(&rng.bytes(8192));
        let at = 64 * KIB;
        assert_eq!(d.write_at(buf, at).unwrap(), 8192);
        write_model(&mut model, at, buf);
        assert_same(
            &pread(&r, at - 10, 8212),
            &model[(at - 10) as usize..(at + 8202) as usize],
            "after O_DIRECT write",
        );
        let data = rng.bytes(100);
        w.write_all_at(&data, at + 50).unwrap();
        write_model(&mut model, at + 50, &data);
        let buf = aligned(&mut store, 4096);
        assert_eq!(d.read_at(buf, at).unwrap(), 4096);
        assert_same(buf, &model[at as usize..(at + 4096) as usize], "O_DIRECT read after a buffered write");

        assert_same(&read_all(img), &model, &format!("{} whole image", img.display()));
        assert_same(
            &pread(&r, 0, size as usize),
            &model,
            &format!("{} whole image, old handle", img.display()),
        );
        if let (Some(o), Some(before)) = (other, other_before) {
            assert_same(
                &read_all(o),
                &before,
                &format!("{} changed by writes to another point", o.display()),
            );
        }
    }
    let dirty = m.stats().get("dirty_bytes").copied().expect("dirty_bytes in .stats");
    assert!(dirty <= 64 * KIB, "dirty_bytes {dirty} above --dirty-size 64K");
}

/// fallocate PUNCH_HOLE and ZERO_RANGE (nix and util-linux `fallocate`) read back as
/// zeros even where the page cache held the old bytes; SEEK_DATA/SEEK_HOLE and st_blocks
/// follow writes into holes and punches of data; fallocate that would grow fails.
#[test]
fn fallocate_seek_and_blocks() {
    if !ready(&["fallocate"]) {
        return;
    }
    let (t, src, mnt) = sample_dirs();
    let ovl = t.path().join("ovl");
    std::fs::create_dir_all(&ovl).unwrap();
    let _m = Mounted::start(&src, &mnt, &["--overlay-dir", path_str(&ovl), "--dirty-size", "64K"]);
    // Point 0 of sda: data at [0, 1M) and [8M, 11M), holes elsewhere.
    let img = sample_image(&mnt, "virtnbdbackup.0", "sda");
    let mut model = read_all(&img);
    let size = model.len() as u64;
    let f = rw(&img);
    let blocks = || std::fs::metadata(&img).unwrap().blocks();
    let data = |off| seek(&f, off, Whence::SeekData);
    let hole = |off| seek(&f, off, Whence::SeekHole);
    // st_blocks is the data the runs hold: same as the SEEK_DATA/SEEK_HOLE walk.
    let walk = || support::data_extents(&f).iter().map(|(s, e)| e - s).sum::<u64>();
    assert_eq!(blocks(), 4 * MIB / 512);
    assert_eq!((data(MIB), hole(0)), (Ok(8 * MIB), Ok(MIB)));

    // A byte into a hole: its page becomes data.
    f.write_all_at(b"x", 30 * MIB + 100).unwrap();
    model[(30 * MIB + 100) as usize] = b'x';
    assert_eq!((data(11 * MIB), hole(30 * MIB)), (Ok(30 * MIB), Ok(30 * MIB + 4096)));
    assert_eq!(blocks(), 4 * MIB / 512 + 8);
    // The last byte.
    f.write_all_at(b"z", size - 1).unwrap();
    model[(size - 1) as usize] = b'z';
    assert_eq!((data(31 * MIB), hole(size - 4096)), (Ok(size - 4096), Ok(size)));
    assert_eq!(blocks() * 512, walk());

    // Punch cached data: zeros, a hole, fewer blocks.
    assert_same(
        &pread(&f, 8 * MIB, MIB as usize),
        &model[(8 * MIB) as usize..(9 * MIB) as usize],
        "warm cache",
    );
    punch(&f, 8 * MIB, MIB, PUNCH);
    zero_model(&mut model, 8 * MIB, MIB);
    assert_same(
        &pread(&f, 8 * MIB - 10, MIB as usize + 20),
        &model[(8 * MIB - 10) as usize..(9 * MIB + 10) as usize],
        "after punch",
    );
    assert_eq!((data(MIB), hole(8 * MIB)), (Ok(9 * MIB), Ok(8 * MIB)));
    assert_eq!(blocks(), 4 * MIB / 512 + 16 - MIB / 512);

    // Unaligned ZERO_RANGE over cached data: zeros exactly there; whole pages inside
    // become a hole.
    let (zo, zl) = (9 * MIB + 100, 10_000);
    assert!(pread(&f, zo, zl as usize).iter().any(|&b| b != 0));
    punch(&f, zo, zl, FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE);
    zero_model(&mut model, zo, zl);
    assert_same(
        &pread(&f, 9 * MIB, 4 * 4096),
        &model[(9 * MIB) as usize..(9 * MIB + 4 * 4096) as usize],
        "after ZERO_RANGE",
    );
    assert_eq!(hole(9 * MIB), Ok(9 * MIB + 4096));
    assert_eq!(data(9 * MIB + 4096), Ok(9 * MIB + 2 * 4096));
    // ZERO_RANGE without KEEP_SIZE, inside the image.
    punch(&f, 10 * MIB, 3 * 4096, FallocateFlags::FALLOC_FL_ZERO_RANGE);
    zero_model(&mut model, 10 * MIB, 3 * 4096);

    // util-linux fallocate, as a user would.
    let p = path_str(&img);
    run_ok("fallocate", &["-p", "-o", "0", "-l", "4096", p]);
    run_ok("fallocate", &["-z", "-o", "5000", "-l", "9000", p]);
    zero_model(&mut model, 0, 4096);
    zero_model(&mut model, 5000, 9000);
    assert_eq!(hole(0), Ok(0));
    assert_eq!(data(0), Ok(4096));

    // The tail, with the last byte: a hole to the end again.
    punch(&f, 60 * MIB, 4 * MIB, PUNCH);
    zero_model(&mut model, 60 * MIB, 4 * MIB);
    assert_eq!(data(31 * MIB), Err(Errno::ENXIO));
    assert_eq!(blocks() * 512, walk());

    // Allocation inside is a no-op; growing is refused.
    fallocate(&f, FallocateFlags::empty(), 0, 4096).expect("fallocate mode 0 inside the image");
    assert_eq!(fallocate(&f, FallocateFlags::empty(), (size - 10) as i64, 4096), Err(Errno::EPERM));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), size);

    assert_same(&read_all(&img), &model, "whole image after punches");
    assert_same(&pread(&f, 0, size as usize), &model, "whole image, the punching handle");
}

/// The size is fixed (truncate and O_TRUNC fail with EPERM), fsync and fdatasync succeed,
/// a write at the end fails with ENOSPC and one across it is short.
#[test]
fn size_fixed_fsync_and_end_of_image() {
    if !ready(&["truncate"]) {
        return;
    }
    let (t, src, mnt) = sample_dirs();
    let ovl = t.path().join("ovl");
    std::fs::create_dir_all(&ovl).unwrap();
    let _m = Mounted::start(&src, &mnt, &["--overlay-dir", path_str(&ovl)]);
    let img = sample_image(&mnt, "virtnbdbackup.2", "sdb");
    let size = std::fs::metadata(&img).unwrap().len();
    // Only images take writes.
    for other in [img.with_file_name("vmconfig.xml"), mnt.join(".stats")] {
        let err = OpenOptions::new().write(true).open(&other).expect_err("open for writing");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{}: {err}", other.display());
    }
    let f = rw(&img);
    for len in [size + 4096, size - 1, 0] {
        let err = f.set_len(len).expect_err("set_len must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "set_len({len}): {err}");
    }
    f.set_len(size).expect("set_len to the same size is a no-op");
    let out = run("truncate", &["-s", "1M", path_str(&img)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"));
    let err = OpenOptions::new().write(true).truncate(true).open(&img).expect_err("O_TRUNC");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));

    f.write_all_at(b"fsync me", 4096).unwrap();
    f.sync_all().expect("fsync");
    f.sync_data().expect("fdatasync");
    assert_eq!(read_range(&img, 4096, 8), b"fsync me");

    let err = f.write_at(b"past", size).expect_err("write at the end");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    let err = f.write_at(b"past", size + 12345).expect_err("write past the end");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(f.write_at(b"0123456789", size - 4).unwrap(), 4, "a write across the end is short");
    assert_eq!(read_range(&img, size - 4, 100), b"0123");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), size);
    assert_eq!(f.metadata().unwrap().len(), size);
}

/// A shared writable mmap of an image: the kernel writes the dirty pages back through
/// FUSE on msync; a fresh open reads them (python3's mmap, to stay free of unsafe code).
#[test]
fn mmap_shared_write_reaches_the_image() {
    if !ready(&["python3"]) {
        return;
    }
    let (t, src, mnt) = sample_dirs();
    let ovl = t.path().join("ovl");
    std::fs::create_dir_all(&ovl).unwrap();
    let _m = Mounted::start(&src, &mnt, &["--overlay-dir", path_str(&ovl), "--dirty-size", "64K"]);
    let img = sample_image(&mnt, "virtnbdbackup.1", "sdb");
    let mut model = read_all(&img);
    let script = "import mmap, os, sys\n\
        fd = os.open(sys.argv[1], os.O_RDWR)\n\
        m = mmap.mmap(fd, 3 << 20, offset=7 << 20)\n\
        m[4090:4106] = b'mmap across page'\n\
        m[(1 << 20) + 5:(1 << 20) + 5 + 300000] = bytes(range(256)) * 1171 + bytes(224)\n\
        m.flush()\n\
        m.close()\n";
    run_ok("python3", &["-c", script, path_str(&img)]);
    write_model(&mut model, 7 * MIB + 4090, b"mmap across page");
    let pattern: Vec<u8> = (0..=255u8).cycle().take(256 * 1171).chain([0u8; 224]).collect();
    write_model(&mut model, 8 * MIB + 5, &pattern);
    assert_same(&read_all(&img), &model, "image after mmap writes");
}

/// `--read-only`: opening an image for writing fails with EROFS, modes show no write
/// bit, reading works and no overlay folder is made.
#[test]
fn read_only_mount_refuses_writes() {
    if !ready(&[]) {
        return;
    }
    let (t, src, mnt) = sample_dirs();
    let ovl = t.path().join("ovl");
    std::fs::create_dir_all(&ovl).unwrap();
    let _m = Mounted::start(&src, &mnt, &["--read-only", "--overlay-dir", path_str(&ovl)]);
    let img = sample_image(&mnt, "virtnbdbackup.1", "sda");
    for opts in [OpenOptions::new().write(true).clone(), OpenOptions::new().read(true).write(true).clone()] {
        let err = opts.open(&img).expect_err("open for writing");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    }
    assert_eq!(std::fs::metadata(&img).unwrap().permissions().mode() & 0o222, 0);
    assert_eq!(read_range(&img, 8 * MIB, 4), b"sda ");
    let f = File::open(&img).unwrap();
    assert!(fallocate(&f, PUNCH, 0, 4096).is_err());
    assert!(entries(&ovl).is_empty(), "a read-only mount made {:?}", entries(&ovl));
}

// ---------------------------------------------------------------------------------------
// Safety

/// Heavy concurrent writes to every image of two sets (sequential, random, unaligned,
/// punches) with a 64 KiB dirty budget, so pages spill all the time: every image reads
/// like its model, the budget holds, the overlay scratch folder exists while mounted and
/// is gone after, and every backup file is byte-identical (sha256) before and after.
#[test]
fn heavy_writes_leave_backups_untouched() {
    if !ready(&["sha256sum"]) {
        return;
    }
    let t = tempdir();
    let root = t.path().join("src");
    sample(&root);
    odd_set(&root.join("odd"));
    let before = sha256_tree(&root);
    let mnt = t.path().join("mnt");
    let ovl = t.path().join("ovl");
    std::fs::create_dir_all(&ovl).unwrap();
    let mut m = Mounted::start(
        &root,
        &mnt,
        &["--overlay-dir", path_str(&ovl), "--dirty-size", "64K", "--cache-size", "1M", "--threads", "4"],
    );
    let scratch = entries(&ovl);
    assert!(
        scratch.len() == 1 && scratch[0].starts_with("vmback-overlay-"),
        "expected one scratch folder in --overlay-dir, found {scratch:?}"
    );
    let imgs = images(&mnt);
    assert_eq!(imgs.len(), 9, "images: {imgs:?}");
    std::thread::scope(|s| {
        for (i, img) in imgs.iter().enumerate() {
            s.spawn(move || {
                let mut rng = Rng(i as u64 * 7919);
                let mut model = read_all(img);
                let size = model.len() as u64;
                let f = rw(img);
                let start = rng.below(size / 2);
                for k in 0..24 {
                    let off = start + k * 128 * KIB;
                    let data = rng.bytes((128 * KIB).min(size - off) as usize);
                    f.write_all_at(&data, off).unwrap();
                    write_model(&mut model, off, &data);
                }
                for k in 0..400 {
                    let off = if k % 3 == 0 { rng.below(size / 4096) * 4096 } else { rng.below(size) };
                    let len = (1 + rng.below(16 * KIB)).min(size - off);
                    let data = rng.bytes(len as usize);
                    f.write_all_at(&data, off).unwrap();
                    write_model(&mut model, off, &data);
                    if k % 10 == 0 {
                        let off = rng.below(size);
                        let len = 1 + rng.below(64 * KIB);
                        punch(&f, off, len, PUNCH);
                        zero_model(&mut model, off, len);
                    }
                    if k % 20 == 0 {
                        let off = rng.below(size);
                        let len = (1 + rng.below(64 * KIB)).min(size - off);
                        let want = &model[off as usize..(off + len) as usize];
                        assert_same(
                            &pread(&f, off, len as usize),
                            want,
                            &format!("{} during the load", img.display()),
                        );
                    }
                }
                f.sync_all().unwrap();
                assert_same(&read_all(img), &model, &format!("{} after heavy writes", img.display()));
            });
        }
    });
    let dirty = m.stats().get("dirty_bytes").copied().expect("dirty_bytes");
    assert!(dirty <= 64 * KIB, "dirty_bytes {dirty} above --dirty-size 64K after the load");
    let spilled = entries(&ovl.join(&scratch[0]));
    assert!(!spilled.is_empty(), "nothing spilled with --dirty-size 64K");
    if m.stop().is_some() {
        assert!(entries(&ovl).is_empty(), "scratch overlay folder left after unmount: {:?}", entries(&ovl));
    }
    let after = sha256_tree(&root);
    assert_eq!(before, after, "backup files changed");
}

/// A full scratch disk: with the overlay folder on a 1 MiB tmpfs, writes fail with
/// ENOSPC (not EIO, no crash), what was written before still reads back, the mount keeps
/// serving, punching frees overlay space so writes work again, and the unmount is clean.
#[test]
fn full_overlay_disk_gives_enospc() {
    if !ready(&["mount", "umount"]) {
        return;
    }
    if !root_ready("a tmpfs mount") {
        return;
    }
    let (t, src, mnt) = sample_dirs();
    let small = t.path().join("small");
    let _tmpfs = small_tmpfs(&small, "1M");
    let mut m = Mounted::start(&src, &mnt, &["--overlay-dir", path_str(&small), "--dirty-size", "64K"]);
    let img = sample_image(&mnt, "virtnbdbackup.0", "sda");
    let f = rw(&img);
    let mut rng = Rng(0xf011);
    let start = 20 * MIB;
    // 64 writes of 64 KiB: 4 MiB do not fit in a 1 MiB overlay disk.
    let (written, at) = write_until_enospc(&f, start, 64, |_| rng.bytes(64 * KIB as usize));
    for (off, data) in &written {
        assert_same(
            &read_range(&img, *off, data.len()),
            data,
            &format!("write at {off} before the disk filled"),
        );
    }
    assert_eq!(read_range(&img, 8 * MIB, 4), b"sda ", "the mount still serves reads");
    // Punching what was written frees the overlay file's space; writes work again.
    punch(&f, start, at - start + 64 * KIB, PUNCH);
    let data = rng.bytes(64 * KIB as usize);
    f.write_all_at(&data, 40 * MIB).expect("a write after punching freed the overlay disk");
    assert_same(&read_range(&img, 40 * MIB, data.len()), &data, "write after the punch");
    assert!(read_range(&img, start, (at - start) as usize).iter().all(|&b| b == 0), "punched range");
    drop(f);
    if m.stop().is_some() {
        assert!(entries(&small).is_empty(), "scratch overlay left on the small disk: {:?}", entries(&small));
    }
}

/// Two vmback processes must not share one `--keep-overlay` folder: each would save its
/// own map over the other's, and one's writes would be lost (or pages of the two mixed in
/// one overlay file). Expected: the second mount is refused while the first runs (or
/// both sessions' writes survive).
#[test]
fn kept_overlay_is_not_shared_by_two_mounts() {
    if !ready(&[]) {
        return;
    }
    let t = tempdir();
    let src = sample(t.path());
    let keep = t.path().join("keep");
    let flags = ["--keep-overlay", path_str(&keep)];
    let (mnt1, mnt2) = (t.path().join("mnt1"), t.path().join("mnt2"));
    let mut a = Mounted::start(&src, &mnt1, &flags);
    let Ok(mut b) = Mounted::try_start(&src, &mnt2, &flags) else {
        return; // Refused: what we want.
    };
    for (mnt, off, text) in [(&mnt1, MIB, b"first mount "), (&mnt2, 2 * MIB, b"second mount")] {
        let f = rw(&sample_image(mnt, "virtnbdbackup.1", "sda"));
        f.write_all_at(text, off).unwrap();
        f.sync_all().unwrap();
    }
    a.stop();
    b.stop();
    let _c = Mounted::start(&src, &mnt1, &flags);
    let img = sample_image(&mnt1, "virtnbdbackup.1", "sda");
    let (one, two) = (read_range(&img, MIB, 12), read_range(&img, 2 * MIB, 12));
    assert!(
        one == b"first mount " && two == b"second mount",
        "two mounts shared one kept overlay; after both: {:?} / {:?}",
        String::from_utf8_lossy(&one),
        String::from_utf8_lossy(&two)
    );
}

/// With `--keep-overlay`, fsync is durable: bytes written and punched before an fsync
/// are there after vmback is killed (SIGKILL: no unmount, nothing saved at exit) and
/// mounted again; so is a write followed by close(2) (FUSE flush). A damaged map is
/// refused with a message naming it.
#[test]
fn kept_overlay_fsync_survives_sigkill() {
    if !ready(&[]) {
        return;
    }
    let (t, src, mnt) = sample_dirs();
    let keep = t.path().join("keep");
    let flags = ["--keep-overlay", path_str(&keep), "--dirty-size", "64K"];
    let img = sample_image(&mnt, "virtnbdbackup.2", "sdb");
    let mut model;
    {
        let mut m = Mounted::start(&src, &mnt, &flags);
        model = read_all(&img);
        let mut rng = Rng(0x5161);
        let f = rw(&img);
        let big = rng.bytes(300 * KIB as usize + 5);
        f.write_all_at(&big, 3 * MIB + 1).unwrap();
        write_model(&mut model, 3 * MIB + 1, &big);
        f.write_all_at(b"small, in memory", 12 * MIB + 7).unwrap();
        write_model(&mut model, 12 * MIB + 7, b"small, in memory");
        punch(&f, 8 * MIB, 64 * KIB, PUNCH);
        zero_model(&mut model, 8 * MIB, 64 * KIB);
        f.sync_all().expect("fsync");
        // Written and closed (flush), never fsynced.
        let g = rw(&img);
        g.write_all_at(b"closed", 15 * MIB).unwrap();
        write_model(&mut model, 15 * MIB, b"closed");
        drop(g);
        drop(f);
        m.kill_hard();
    }
    {
        let mut m = Mounted::start(&src, &mnt, &flags);
        assert_same(&read_all(&img), &model, "kept overlay after SIGKILL");
        m.stop();
    }
    let map = keep.join("sample-vm/virtnbdbackup.2/sdb.overlay.json");
    std::fs::write(&map, b"{ not json").unwrap();
    match Mounted::try_start(&src, &mnt, &flags) {
        Ok(_) => panic!("mounted with a damaged kept map"),
        Err((st, log)) => {
            assert!(st.is_some_and(|s| !s.success()), "{st:?}:\n{log}");
            assert!(log.contains(path_str(&map)), "the error does not name the map:\n{log}");
        }
    }
}

/// Memory stays within what the flags allow: a sequential write of more than
/// `--dirty-size` keeps vmback's peak RSS under --dirty-size + --cache-size + 64 MiB.
#[test]
fn peak_rss_within_dirty_and_cache_size() {
    if !ready(&[]) {
        return;
    }
    let t = tempdir();
    let src = t.path().join("set");
    let disks = [DiskSpec { name: "sda", size: 256 * MIB, lz4: false, extents: vec![(0, vec![1u8; 4096])] }];
    stream_set(&src, "big-vm", DATE, &disks);
    let mnt = t.path().join("mnt");
    let ovl = t.path().join("ovl");
    std::fs::create_dir_all(&ovl).unwrap();
    let m = Mounted::start(
        &src,
        &mnt,
        &["--overlay-dir", path_str(&ovl), "--dirty-size", "96M", "--cache-size", "1M"],
    );
    let at_mount = m.peak_rss();
    let f = rw(&mnt.join("big-vm/virtnbdbackup.0/sda.raw"));
    let chunk = vec![0x5au8; MIB as usize];
    for k in 0..100 {
        f.write_all_at(&chunk, k * MIB).unwrap();
    }
    f.sync_all().unwrap();
    let peak = m.peak_rss();
    let limit = (96 + 1 + 64) * MIB;
    assert!(
        peak <= limit,
        "peak RSS {} MiB (at mount {} MiB) above --dirty-size 96M + --cache-size 1M + 64 MiB = {} MiB",
        peak / MIB,
        at_mount / MIB,
        limit / MIB
    );
}

/// `cp --sparse`, `qemu-img convert` and qemu's block-status walk an image with
/// SEEK_DATA/SEEK_HOLE, two calls per extent; each call should cost about the same
/// whatever the number of dirty pages. With 6000 scattered dirty pages the walk must
/// finish well within 10 s (a FUSE round trip is tens of microseconds).
#[test]
fn seek_walk_is_not_quadratic_in_dirty_pages() {
    if !ready(&[]) {
        return;
    }
    let (t, src, mnt) = sample_dirs();
    let ovl = t.path().join("ovl");
    std::fs::create_dir_all(&ovl).unwrap();
    let _m = Mounted::start(&src, &mnt, &["--overlay-dir", path_str(&ovl)]);
    // Point 0 of sda: data at [0, 1M) and [8M, 11M), holes from 11M to the end.
    let img = sample_image(&mnt, "virtnbdbackup.0", "sda");
    let f = rw(&img);
    let pages = 6000;
    for k in 0..pages {
        f.write_all_at(b"x", 12 * MIB + 2 * k * 4096).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (mut pos, mut extents) = (0, 0);
    let size = f.metadata().unwrap().len();
    while pos < size {
        assert!(
            std::time::Instant::now() < deadline,
            "the SEEK_DATA/SEEK_HOLE walk found only {extents} extents (up to offset {pos}) in 10 s"
        );
        let Ok(d) = seek(&f, pos, Whence::SeekData) else { break };
        pos = seek(&f, d, Whence::SeekHole).unwrap();
        extents += 1;
    }
    assert_eq!(extents, 2 + pages);
}
