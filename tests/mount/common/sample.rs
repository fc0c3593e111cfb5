//! The library's sample backup set (`vmback sample`) as a test source, and the paths of
//! its images in a mount.

use std::path::{Path, PathBuf};

/// The sample set (`sample-vm`: sda 64 MiB plain, sdb 16 MiB lz4) in `dir/set`.
pub fn sample(dir: &Path) -> PathBuf {
    let src = dir.join("set");
    vmback::sample::write_sample(&src).expect("sample set");
    src
}

/// `MOUNT/sample-vm/POINT/DISK.raw`.
pub fn sample_image(mnt: &Path, point: &str, disk: &str) -> PathBuf {
    mnt.join("sample-vm").join(point).join(format!("{disk}.raw"))
}

/// The start of most mount tests: a temp dir ([`super::tempdir`], so every user may enter
/// it and a refusal comes from the mount, not from the path) holding the sample set in
/// `set`, and the path `mnt` of a mountpoint beside it.
pub fn sample_dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = super::tempdir();
    let src = sample(t.path());
    let mnt = t.path().join("mnt");
    (t, src, mnt)
}
