//! Comparing two image files without loading them whole, and converting an image to raw
//! to compare it.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::path_str;

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

/// Fails the test unless `image` equals `truth` byte for byte, naming the first
/// differing byte.
#[track_caller]
pub fn assert_same(image: &Path, truth: &Path, what: &str) {
    let d = first_difference(image, truth);
    assert_eq!(
        d,
        None,
        "{what}: {} differs from the truth {} at byte {d:?}",
        image.display(),
        truth.display()
    );
}

/// A qcow2 (or any) image as raw, for comparing. Waits for the image's lock: the qemu-nbd
/// virtnbdrestore forks may still be closing it when virtnbdrestore returns.
pub fn to_raw(image: &Path, raw: &Path) {
    // Closing takes milliseconds; 20 s is a loaded machine's worst case.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = Command::new("qemu-img")
            .args(["convert", "-O", "raw", path_str(image), path_str(raw)])
            .output()
            .expect("run qemu-img");
        if o.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("lock") && Instant::now() < deadline,
            "qemu-img convert {}: {err}",
            image.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
