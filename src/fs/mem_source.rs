//! A whole catalog mounted from memory: the sample set in a [`MemSource`], through
//! [`ImageFs`] with no file on disk and no kernel, answers every lookup, listing and read
//! exactly as the same set on disk does (the mount of files on disk is checked against
//! the truth by the mount tests), and its images hold the sample's bytes.

use std::path::Path;
use std::sync::Arc;

use super::{FsConfig, ImageFs, Ino, Kind, ROOT, Writes};
use crate::catalog::Catalog;
use crate::source::{MemSource, Source};

const MIB: u64 = 1 << 20;

fn mount(catalog: &Catalog) -> ImageFs {
    let config = FsConfig { cache_size: 64 << 20, dirty_size: 1 << 20, writes: Writes::ReadOnly };
    ImageFs::new(catalog, &config).expect("fs")
}

/// Every node under `dir`: its path from the root, kind, size and number.
fn tree(fs: &ImageFs, dir: Ino, at: &str, out: &mut Vec<(String, Kind, u64, Ino)>) {
    for (ino, _, kind, name) in fs.readdir(dir, 0).expect("readdir") {
        if name == "." || name == ".." {
            continue;
        }
        let path = format!("{at}/{name}");
        let attr = fs.lookup(dir, &name).unwrap_or_else(|e| panic!("lookup {path}: {e}"));
        assert_eq!((attr.ino, attr.kind), (ino, kind), "{path}: lookup and readdir agree");
        out.push((path.clone(), kind, attr.size, ino));
        if kind == Kind::Dir {
            tree(fs, ino, &path, out);
        }
    }
}

fn read(fs: &ImageFs, ino: Ino, off: u64, len: u32) -> Vec<u8> {
    let (fh, _) = fs.open(ino, false).expect("open");
    let bytes = fs.read(fh, off, len).expect("read");
    fs.release(fh);
    bytes
}

#[test]
fn a_catalog_in_memory_mounts_as_the_same_files_on_disk_do() {
    let mem = Arc::new(MemSource::new());
    for (path, bytes) in crate::sample::sample_files().expect("sample") {
        mem.insert(Path::new("backups/sample").join(path), bytes);
    }
    assert!(mem.stat(Path::new("backups/sample/sda.full.data")).expect("stat").size > MIB);
    let in_mem = Catalog::discover_from(mem).expect("catalog in memory");
    assert!(in_mem.warnings.is_empty(), "{:?}", in_mem.warnings);
    let disk = tempfile::tempdir().expect("tempdir");
    crate::sample::write_sample(disk.path()).expect("sample on disk");
    let on_disk = Catalog::discover(disk.path()).expect("catalog on disk");

    let (mem_fs, disk_fs) = (mount(&in_mem), mount(&on_disk));
    let (mut mem_tree, mut disk_tree) = (Vec::new(), Vec::new());
    tree(&mem_fs, ROOT, "", &mut mem_tree);
    tree(&disk_fs, ROOT, "", &mut disk_tree);
    let shape = |t: &[(String, Kind, u64, Ino)]| -> Vec<(String, Kind, Option<u64>)> {
        // info.json names the set's folder, which differs (a temp dir, a path in memory).
        t.iter().map(|(p, k, s, _)| (p.clone(), *k, (!p.ends_with("info.json")).then_some(*s))).collect()
    };
    assert_eq!(shape(&mem_tree), shape(&disk_tree));
    let configs = mem_tree.iter().filter(|(p, ..)| p.ends_with("/vmconfig.xml")).count();
    assert_eq!(configs, 4, "{mem_tree:?}");

    let mut images = 0;
    for ((path, kind, size, ino), (_, _, _, disk_ino)) in mem_tree.iter().zip(&disk_tree) {
        // The counters of `.stats` are each mount's own.
        if *kind != Kind::File || path.ends_with("info.json") || path == "/.stats" {
            continue;
        }
        // Every MiB's first 128 KiB, and the last bytes: data, zero frames and holes.
        let offsets = (0..*size).step_by(MIB as usize).chain([size.saturating_sub(100)]);
        for off in offsets {
            let (got, want) =
                (read(&mem_fs, *ino, off, 128 << 10), read(&disk_fs, *disk_ino, off, 128 << 10));
            assert!(got == want, "{path} at {off}: the bytes differ");
        }
        images += usize::from(path.ends_with(".raw"));
    }
    assert_eq!(images, 8, "two disks at four restore points");
    let sda = mem_fs.lookup(
        mem_fs.lookup(mem_fs.lookup(ROOT, "sample-vm").unwrap().ino, "virtnbdbackup.1").unwrap().ino,
        "sda.raw",
    );
    let sda = sda.expect("sda at point 1").ino;
    assert!(read(&mem_fs, sda, 0, 22).starts_with(b"sda boot sector and OS"));
    assert!(read(&mem_fs, sda, 9 * MIB, 24).starts_with(b"sda monday's changes"));
    assert_eq!(read(&mem_fs, sda, 20 * MIB, 4096), vec![0u8; 4096]);
}
