//! Who may use the mount (issue 7, part 6): private to the mounting user by default, and
//! with `--allow-other` open to others with the files' modes enforced by the kernel
//! (`default_permissions`). The other user is a real unprivileged account created for the
//! test (useradd) and removed after; commands run as it through `setpriv`. Every test
//! checks with sha256 that no file under SOURCE changed.
//!
//! Needs root (useradd, setpriv, `allow_other`) and /dev/fuse; prints "skipping: ..." and
//! passes without them.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use crate::common::files::{assert_untouched, sha256_tree};
use crate::common::fuse::{path_str, stdout_of_success, which};
use crate::common::mounted::Mounted;
use crate::common::sample::sample_dirs;

/// useradd and userdel lock /etc/passwd; tests running in parallel take turns.
static ACCOUNTS: Mutex<()> = Mutex::new(());

/// An unprivileged account that exists for one test.
struct OtherUser {
    name: String,
    uid: u32,
}

impl OtherUser {
    fn create(tag: &str) -> OtherUser {
        let name = format!("vmbt-{tag}-{}", std::process::id());
        let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Command::new("userdel").arg(&name).stderr(Stdio::null()).status();
        let args = ["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", &name];
        stdout_of_success("useradd", &args, Command::new("useradd").args(args).output().expect("useradd"));
        let uid = nix::unistd::User::from_name(&name).expect("getpwnam").expect("the new user").uid.as_raw();
        assert_ne!(uid, 0);
        OtherUser { name, uid }
    }

    /// Runs `cmd args` as this user (its own uid and gid, no supplementary groups), under
    /// `timeout` so a hung mount cannot hang the test, in the C locale.
    fn run(&self, cmd: &str, args: &[&str]) -> Output {
        let gid = nix::unistd::User::from_uid(self.uid.into()).expect("getpwuid").expect("user").gid;
        Command::new("timeout")
            .args(["--kill-after=5", "60", "setpriv"])
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={gid}"))
            .args(["--clear-groups", "--", cmd])
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {cmd} as {}: {e}", self.name))
    }

    /// Runs as this user; fails the test unless it works. Returns stdout.
    fn run_ok(&self, cmd: &str, args: &[&str]) -> String {
        stdout_of_success(cmd, args, self.run(cmd, args))
    }

    /// Runs as this user; fails the test unless it fails with `why` in its stderr.
    #[track_caller]
    fn refused(&self, cmd: &str, args: &[&str], why: &str) {
        let out = self.run(cmd, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{cmd} {args:?} worked for {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(err.contains(why), "{cmd} {args:?} as {}: expected {why:?}, got: {err}", self.name);
    }
}

impl Drop for OtherUser {
    fn drop(&mut self) {
        let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Command::new("userdel").arg(&self.name).stderr(Stdio::null()).status();
    }
}

fn ready() -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: /dev/fuse is missing");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: creating a user and running as it needs root");
        return false;
    }
    for c in ["fusermount3", "useradd", "userdel", "setpriv", "timeout", "sha256sum", "stat", "dd"] {
        if which(c).is_none() {
            eprintln!("skipping: {c} is not installed");
            return false;
        }
    }
    true
}

/// The options of the FUSE mount at `mnt`, from /proc/self/mountinfo (per-mount options
/// and the filesystem's super options).
fn mount_options(mnt: &Path) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let line = info
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(path_str(mnt)))
        .unwrap_or_else(|| panic!("{} not in mountinfo", mnt.display()));
    line.to_owned()
}

fn sha256_of(out: &str) -> &str {
    out.split_whitespace().next().expect("a sum")
}

/// Without `--allow-other`, another user can neither list, stat nor read anything in the
/// mount, though it can reach the mountpoint's folder; the owner can, and the mount is
/// not `allow_other`.
#[test]
fn the_mount_is_private_by_default() {
    if !ready() {
        return;
    }
    let (t, src, mnt) = sample_dirs();
    let before = sha256_tree(&src);
    let user = OtherUser::create("priv");
    let mut m = Mounted::start(&src, &mnt, &[]);
    assert!(!mount_options(&mnt).contains("allow_other"), "{}", mount_options(&mnt));
    let dir = mnt.join("sample-vm/virtnbdbackup.1");
    // The path up to the mountpoint is open to the user: a refusal below is the mount's.
    user.run_ok("ls", &[path_str(t.path())]);
    for (cmd, args) in [
        ("ls", vec![path_str(&mnt)]),
        ("stat", vec![path_str(&mnt)]),
        ("ls", vec![path_str(&dir)]),
        ("cat", vec![path_str(&mnt.join(".stats"))]),
        ("cat", vec![path_str(&dir.join("vmconfig.xml"))]),
        ("sha256sum", vec![path_str(&dir.join("sda.raw"))]),
        ("stat", vec![path_str(&mnt.join("sample-vm/latest"))]),
    ] {
        user.refused(cmd, &args, "Permission denied");
    }
    let of = format!("of={}", dir.join("sdb.raw").display());
    user.refused("dd", &["if=/dev/zero", &of, "bs=512", "count=1", "conv=notrunc"], "Permission denied");
    // The owner can.
    let sum = Command::new("sha256sum").arg(dir.join("sda.raw")).output().expect("sha256sum");
    assert!(sum.status.success());
    m.stop();
    assert_untouched(&before, &sha256_tree(&src), &[]);
}

/// With `--allow-other` (writable, and with `--read-only`), the kernel enforces the modes
/// the tree shows (`default_permissions`): everything belongs to the mounting user,
/// folders are r-x for all, images rw-r--r-- (r--r--r-- when read-only), vmconfig.xml and
/// .stats r--r--r--. So another user can list and read everything (the same bytes as the
/// owner) but cannot write an image, create, remove or rename entries, truncate or chmod;
/// the owner can write images unless the mount is read-only.
#[test]
fn allow_other_honours_the_file_modes() {
    if !ready() {
        return;
    }
    let user = OtherUser::create("modes");
    for read_only in [false, true] {
        let what = if read_only { "--allow-other --read-only" } else { "--allow-other" };
        let (_t, src, mnt) = sample_dirs();
        let before = sha256_tree(&src);
        let args: &[&str] = if read_only { &["--allow-other", "--read-only"] } else { &["--allow-other"] };
        let mut m = Mounted::start(&src, &mnt, args);
        let opts = mount_options(&mnt);
        assert!(opts.contains("allow_other") && opts.contains("default_permissions"), "{what}: {opts}");

        // The type, mode and owner of every node, as the other user sees them: folders
        // and links open to all, images by the mount's mode, every other file read-only.
        let listing = user.run_ok("find", &[path_str(&mnt), "-mindepth", "1", "-printf", "%y %M %u %P\n"]);
        let image_mode = if read_only { "-r--r--r--" } else { "-rw-r--r--" };
        let mut paths = Vec::new();
        for line in listing.lines() {
            let f: Vec<&str> = line.splitn(4, ' ').collect();
            let (kind, mode, owner, path) = (f[0], f[1], f[2], f[3]);
            assert_eq!(owner, "root", "{what}: {line}");
            let want = match kind {
                "d" => "dr-xr-xr-x",
                "l" => "lrwxrwxrwx",
                _ if path.ends_with(".raw") => image_mode,
                _ => "-r--r--r--",
            };
            assert_eq!(mode, want, "{what}: {line}");
            paths.push(path);
        }
        for p in [".stats", "sample-vm", "sample-vm/latest", "sample-vm/virtnbdbackup.0/sda.raw"] {
            assert!(paths.contains(&p), "{what}: {p} not listed: {listing}");
        }
        for p in ["virtnbdbackup.2/sdb.raw", "virtnbdbackup.2/vmconfig.xml"] {
            assert!(paths.contains(&format!("sample-vm/{p}").as_str()), "{what}: {p} not listed: {listing}");
        }

        // A read-only mount refuses every change before the modes are looked at.
        let (denied, not_owner) = if read_only {
            ("Read-only file system", "Read-only file system")
        } else {
            ("Permission denied", "Operation not permitted")
        };
        let dir = mnt.join("sample-vm/virtnbdbackup.2");
        for disk in ["sda.raw", "sdb.raw"] {
            let img = dir.join(disk);
            let owner = stdout_of_success(
                "sha256sum",
                &[],
                Command::new("sha256sum").arg(&img).output().expect("sum"),
            );
            let other = user.run_ok("sha256sum", &[path_str(&img)]);
            assert_eq!(sha256_of(&other), sha256_of(&owner), "{what}: {disk} read differently");

            let of = format!("of={}", img.display());
            user.refused("dd", &["if=/dev/zero", &of, "bs=4096", "count=1", "conv=notrunc"], denied);
            user.refused("truncate", &["-s", "0", path_str(&img)], denied);
            user.refused("chmod", &["666", path_str(&img)], not_owner);
            user.refused("mv", &[path_str(&img), path_str(&dir.join("moved.raw"))], denied);
            user.refused("rm", &["-f", path_str(&img)], denied);
            let again = Command::new("sha256sum").arg(&img).output().expect("sum");
            assert_eq!(
                sha256_of(&String::from_utf8_lossy(&again.stdout)),
                sha256_of(&owner),
                "{what}: changed"
            );
        }
        user.refused("touch", &[path_str(&dir.join("new-file"))], denied);
        user.refused("mkdir", &[path_str(&mnt.join("new-dir"))], denied);
        user.run_ok("cat", &[path_str(&dir.join("vmconfig.xml")), path_str(&mnt.join(".stats"))]);

        // The owner (root, which the kernel lets past the modes) writes an image unless
        // the mount is read-only, where vmback refuses.
        let of = format!("of={}", dir.join("sdb.raw").display());
        let dd = Command::new("dd")
            .args(["if=/dev/zero", &of, "bs=4096", "count=1", "conv=notrunc"])
            .env("LC_ALL", "C")
            .output()
            .expect("dd");
        if read_only {
            assert!(String::from_utf8_lossy(&dd.stderr).contains("Read-only file system"), "{what}: {dd:?}");
        } else {
            assert!(dd.status.success(), "{what}: the owner cannot write: {dd:?}");
        }
        m.stop();
        assert_untouched(&before, &sha256_tree(&src), &[]);
    }
}
