//! Whether a test can run here: FUSE and the commands it needs, and root.

use std::path::Path;

use super::fuse::which;

/// `/dev/fuse`, `fusermount3` and `cmds` are there; otherwise says what is missing
/// ("skipping: ...") and returns false.
pub fn ready(cmds: &[&str]) -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: /dev/fuse is missing");
        return false;
    }
    for c in ["fusermount3"].iter().chain(cmds) {
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
