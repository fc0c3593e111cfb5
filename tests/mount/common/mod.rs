//! Helpers of the mount tests: one mount fixture ([`mounted::Mounted`]), one readiness
//! check ([`ready::ready`]), one temp dir ([`tempdir`]), one unmount guard
//! ([`fuse::Unmount`]), one pread loop ([`files::read_full_at`]).

#[path = "../../common/cli.rs"]
pub mod cli;
pub mod files;
pub mod fuse;
pub mod mounted;
pub mod ready;
#[path = "../../common/rng.rs"]
pub mod rng;
pub mod run;
pub mod sample;

/// A temp dir for one test, readable by every user (tempfile makes them 0700), for tests
/// where another user has to reach the mountpoint.
pub fn tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("vmback-mount-test.").tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}
