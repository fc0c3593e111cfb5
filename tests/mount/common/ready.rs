//! Whether a test can run here: FUSE and the commands it needs, and root. Each check says
//! what is missing ("skipping: ...") and the test returns, passing.

use std::path::Path;

use super::fuse::which;

/// `/dev/fuse`, `fusermount3`, `timeout` (which [`super::run::run`] wraps every command
/// in) and `cmds` are there; otherwise says what is missing and returns false.
pub fn ready(cmds: &[&str]) -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: /dev/fuse is missing");
        return false;
    }
    for c in ["fusermount3", "timeout"].iter().chain(cmds) {
        if which(c).is_none() {
            eprintln!("skipping: {c} is not installed (contrib/install-deps.sh)");
            return false;
        }
    }
    true
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether the test runs as root (loop mounts, other users); prints why not.
pub fn root_ready(what: &str) -> bool {
    if !is_root() {
        eprintln!("skipping: {what} needs root");
        return false;
    }
    true
}

/// Returns from the test when FUSE is not available.
#[macro_export]
macro_rules! require_fuse {
    () => {
        if !$crate::common::ready::ready(&[]) {
            return;
        }
    };
}
