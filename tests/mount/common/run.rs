//! Running the commands a user would run against a mount, each under `timeout`, so a hung
//! mount cannot hang the test run.

use std::process::{Command, Output, Stdio};

use super::fuse::stdout_of_success;

/// How long one command may take: the slowest ones (qemu-img, mkfs and fsck of a 64 MiB
/// image, a qemu boot to its monitor) take seconds; two minutes is a loaded CI machine's
/// worst case, not a normal run.
const TIMEOUT_SECS: u32 = 120;

/// Runs `cmd args` under `timeout` with the C locale and returns its output.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    run_full(TIMEOUT_SECS, None, cmd, args)
}

/// Like [`run`], killed after `secs` seconds (exit status 124 then).
pub fn run_timeout(secs: u32, cmd: &str, args: &[&str]) -> Output {
    run_full(secs, None, cmd, args)
}

/// Like [`run`], as uid/gid `user` (via setpriv).
pub fn run_as(user: u32, cmd: &str, args: &[&str]) -> Output {
    run_full(TIMEOUT_SECS, Some(user), cmd, args)
}

fn run_full(secs: u32, user: Option<u32>, cmd: &str, args: &[&str]) -> Output {
    let mut c = Command::new("timeout");
    c.arg("--kill-after=5").arg(secs.to_string());
    if let Some(id) = user {
        c.arg("setpriv")
            .arg(format!("--reuid={id}"))
            .arg(format!("--regid={id}"))
            .arg("--clear-groups")
            .arg("--");
    }
    // C locale: stable sort order in `ls` and stable error texts to match.
    c.arg(cmd).args(args).env("LC_ALL", "C").stdin(Stdio::null());
    c.output().unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

/// Like [`run`], and fails the test unless the command succeeds; returns its stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    stdout_of_success(cmd, args, run(cmd, args))
}
