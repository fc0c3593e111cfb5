//! Running `vmback` and other tools to completion (no timeout): shared by the `mount` and
//! `stack` test binaries.

use std::process::{Command, Output};

/// Fails the test, showing both streams, unless `out` (of `cmd args`) is a success.
#[track_caller]
pub fn assert_success(cmd: &str, args: &[&str], out: &Output) {
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command and insists on success; returns stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert_success(cmd, args, &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `vmback ARGS`.
pub fn vmback(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmback")).args(args).output().expect("run vmback")
}
