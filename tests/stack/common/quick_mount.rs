//! The mount fixture of the real-stack tests, which only read the mounted images: a plain
//! `vmback mount SOURCE DIR`, TERM and `fusermount3 -uz` on drop. (The mount binary's
//! tests, which also stop, kill and write, have their fuller `common::mounted::Mounted`.)

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A real FUSE mount of `vmback mount SOURCE DIR`, unmounted when dropped.
pub struct Mount {
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
        let _ = Command::new("fusermount3").arg("-uz").arg(self.dir.path()).stderr(Stdio::null()).status();
    }
}

/// Mounts `source` on `dir` (vmback's stderr goes to `stderr`) and waits up to 20 s for
/// the mount to come up.
pub fn mount_on(source: &Path, dir: tempfile::TempDir, stderr: Stdio) -> Mount {
    let child = Command::new(env!("CARGO_BIN_EXE_vmback"))
        .arg("mount")
        .arg(source)
        .arg(dir.path())
        .stderr(stderr)
        .spawn()
        .expect("spawn vmback mount");
    let m = Mount { child, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if Command::new("mountpoint").arg("-q").arg(m.dir.path()).status().is_ok_and(|s| s.success()) {
            return m;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("vmback mount did not come up");
}
