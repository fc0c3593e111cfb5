//! Reading files at an offset (the one retry loop of the tests), O_DIRECT buffers, and
//! the sha256 of every file under SOURCE, to show that backup files stay untouched.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::fuse::path_str;

/// The kernel's O_DIRECT alignment for buffers, offsets and lengths on every file system
/// these tests use (the page size).
pub const DIRECT_ALIGN: usize = 4096;

/// Fills `buf` from `off` (short only at EOF), retrying on EINTR; how many bytes it read.
pub fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads up to `len` bytes at `off` (short only at EOF), retrying on EINTR.
pub fn pread(f: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let done = read_full_at(f, &mut buf, off)?;
    buf.truncate(done);
    Ok(buf)
}

/// Writes `data(k)` at `start + k * len(data)` for k = 0, 1, ... `count` - 1 until a write
/// fails, which must be with ENOSPC after at least one write fit (the scratch disk for
/// overlays filling up). Returns the writes that fit and the offset of the failed one.
#[track_caller]
pub fn write_until_enospc(
    f: &File,
    start: u64,
    count: u64,
    mut data: impl FnMut(u64) -> Vec<u8>,
) -> (Vec<(u64, Vec<u8>)>, u64) {
    let mut written = Vec::new();
    let mut off = start;
    for k in 0..count {
        let bytes = data(k);
        match f.write_all_at(&bytes, off) {
            Ok(()) => {
                let len = bytes.len() as u64;
                written.push((off, bytes));
                off += len;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "write at {off}: {e}");
                assert!(!written.is_empty(), "not even the first write fit");
                return (written, off);
            }
        }
    }
    panic!("{count} writes from {start} fit; the scratch disk was to fill up first");
}

/// A buffer of `len` bytes aligned for O_DIRECT, carved out of `storage`.
pub fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + DIRECT_ALIGN, 0);
    let at = storage.as_ptr().align_offset(DIRECT_ALIGN);
    &mut storage[at..at + len]
}

/// sha256 of every file under `dir` (symlinks not followed), by path relative to `dir`.
pub fn sha256_tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let files: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .map(|e| e.expect("walking SOURCE"))
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    let mut out = BTreeMap::new();
    // Batches keep each command line far below ARG_MAX.
    for chunk in files.chunks(64) {
        let out_of = Command::new("sha256sum").args(chunk).output().expect("sha256sum");
        assert!(out_of.status.success(), "sha256sum: {}", String::from_utf8_lossy(&out_of.stderr));
        for line in String::from_utf8_lossy(&out_of.stdout).lines() {
            let (sum, path) = line.split_once("  ").expect("sha256sum line");
            let rel = Path::new(path).strip_prefix(dir).expect("under dir").to_owned();
            out.insert(rel, sum.to_owned());
        }
    }
    out
}

/// Fails the test unless `after` has the same files with the same sums as `before`, apart
/// from `touched` (paths relative to SOURCE the test itself changed, deleted or created).
#[track_caller]
pub fn assert_untouched(
    before: &BTreeMap<PathBuf, String>,
    after: &BTreeMap<PathBuf, String>,
    touched: &[&str],
) {
    let keep = |m: &BTreeMap<PathBuf, String>| -> BTreeMap<PathBuf, String> {
        m.iter()
            .filter(|(p, _)| !touched.iter().any(|t| Path::new(t) == *p))
            .map(|(p, s)| (p.clone(), s.clone()))
            .collect()
    };
    let (b, a) = (keep(before), keep(after));
    assert!(!b.is_empty(), "no files under SOURCE");
    for (p, sum) in &b {
        assert_eq!(a.get(p), Some(sum), "backup file {} changed or vanished", path_str(p));
    }
    let extra: Vec<&PathBuf> = a.keys().filter(|p| !b.contains_key(*p)).collect();
    assert!(extra.is_empty(), "files appeared under SOURCE: {extra:?}");
}
