//! `vmback mount --background` (and so `mount -t fuse.vmback`): the command returns once
//! the mount is up while a detached vmback serves it. Forking is out (unsafe, and unsound
//! once threads exist), so vmback executes itself again with the same arguments as a
//! child in its own process group (a Ctrl-C in the terminal does not reach it) and with
//! stdin and stdout on /dev/null. The parent relays the child's log until the mount shows
//! in /proc/self/mountinfo, or until the child exits, whose error is then already shown
//! and whose failure the parent returns. Past that point the server's log goes nowhere
//! (the pipe is closed; a failed write drops the line) unless `--log-file` names a file.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use crate::fs::session::{check_mountpoint, mount_at};

/// Set in the detached child's environment: it serves in the foreground.
const CHILD_VAR: &str = "VMBACK_BACKGROUND_CHILD";

/// How often the parent looks for the new mount: short next to a mount's start-up (a
/// catalog scan), long enough that the polling costs nothing.
const POLL: Duration = Duration::from_millis(50);

/// Whether this process is the detached server of a `--background` mount.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_VAR).is_some()
}

/// Starts the detached server for `mountpoint` and waits for its mount (or its failure).
pub fn serve_detached(mountpoint: &Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    // Clear a stale mount here (the child would too), so that the mount found at the
    // mountpoint afterwards can only be the child's.
    check_mountpoint(mountpoint)?;
    let before = mount_at(mountpoint)?.map(|m| m.id);
    let exe = std::env::current_exe()?;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "vmback".into());
    let mut child = Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env(CHILD_VAR, "1")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the background vmback: {e}"))?;
    let relay = child
        .stderr
        .take()
        .map(|mut from| std::thread::spawn(move || std::io::copy(&mut from, &mut std::io::stderr())));
    loop {
        if let Some(status) = child.try_wait()? {
            if let Some(relay) = relay {
                let _ = relay.join();
            }
            return Err(format!("the background vmback exited ({status}) before the mount came up").into());
        }
        if let Some(m) = mount_at(mountpoint)?
            && m.is_fuse()
            && Some(m.id) != before
        {
            tracing::info!(
                "{}: mounted, served by vmback PID {} (stop it with `vmback umount {0}`)",
                mountpoint.display(),
                child.id()
            );
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(POLL);
    }
}
