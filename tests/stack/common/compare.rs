//! Comparing two image files without loading them whole.

use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Compares two files in 1 MiB chunks; the first differing offset (or the shorter length
/// when the lengths differ), `None` when they are equal.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let open = |p: &Path| File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let len = |f: &File| f.metadata().expect("stat").len();
    let (la, lb) = (len(&fa), len(&fb));
    if la != lb {
        return Some(la.min(lb));
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let n = fa.read(&mut ba).expect("read a");
        if n == 0 {
            return None;
        }
        fb.read_exact(&mut bb[..n]).expect("read b");
        if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
            return Some(off + i as u64);
        }
        off += n as u64;
    }
}
