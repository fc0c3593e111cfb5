//! `mount -t fuse.vmback SOURCE MOUNT -o OPTIONS` and its /etc/fstab line: mount(8) runs
//! the helper `/sbin/mount.fuse.vmback SOURCE MOUNT [-sfnv] [-o OPTIONS] [-t TYPE]`, which
//! is a symlink to vmback (the set-up installs it). Called by that name, vmback turns the
//! options into `vmback mount --background` flags and mounts; mount(8) waits for the
//! helper, which returns once the mount is up while a detached vmback serves it.
//!
//! The generic options that mount(8) passes on (rw, user, user=NAME, nofail, _netdev, the dev, suid,
//! exec and atime variants) are ignored: the mount is always nodev and nosuid. Any other
//! unknown option is refused by name, unless mount(8) was given `-s` (sloppy).

use std::ffi::OsString;

use clap::{CommandFactory, Parser};

use super::Cli;

/// The helper's file name: mount(8) looks for `/sbin/mount.<type>`.
pub const NAME: &str = "mount.fuse.vmback";

/// mount(8)'s helper calling convention (util-linux `mount(8)`, "External helpers").
#[derive(Parser, Debug)]
#[command(name = NAME, about = "mount(8) helper: mount -t fuse.vmback SOURCE MOUNT -o OPTIONS")]
struct HelperArgs {
    source: OsString,
    mountpoint: OsString,
    /// Comma-separated mount options.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// The filesystem type (fuse.vmback).
    #[arg(short = 't')]
    fs_type: Option<String>,
    /// Fake: do everything but mount.
    #[arg(short = 'f')]
    fake: bool,
    /// Do not write /etc/mtab (there is none to write).
    #[arg(short = 'n')]
    _no_mtab: bool,
    /// Verbose: log at debug level.
    #[arg(short = 'v')]
    verbose: bool,
    /// Sloppy: ignore unknown options instead of refusing them.
    #[arg(short = 's')]
    sloppy: bool,
    /// Mount in another mount namespace (not supported).
    #[arg(short = 'N')]
    namespace: Option<String>,
}

/// Options that take a value, and the `vmback mount` flag each one becomes.
const VALUED: [(&str, &str); 8] = [
    ("cache_size", "--cache-size"),
    ("rescan", "--rescan"),
    ("dirty_size", "--dirty-size"),
    ("overlay_dir", "--overlay-dir"),
    ("keep_overlay", "--keep-overlay"),
    ("threads", "--threads"),
    ("log_level", "--log-level"),
    ("log_file", "--log-file"),
];

/// Generic options mount(8) hands to every helper, meaningless here.
fn is_generic(opt: &str) -> bool {
    const NAMES: [&str; 21] = [
        "rw",
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "owner",
        "group",
        "_netdev",
        "nofail",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "noexec",
        "atime",
        "noatime",
        "relatime",
        "nodiratime",
    ];
    // `user=<name>`: what mount(8) makes of `user` for a user's mount (a mount-table note).
    NAMES.contains(&opt) || ["x-", "comment=", "user="].iter().any(|p| opt.starts_with(p))
}

/// The `vmback` command line for the helper's arguments; `None` for a fake mount.
pub fn parse(args: Vec<OsString>) -> Result<Option<Cli>, clap::Error> {
    let h = HelperArgs::try_parse_from(args)?;
    let refuse = |msg: String| HelperArgs::command().error(clap::error::ErrorKind::InvalidValue, msg);
    if let Some(ns) = h.namespace {
        return Err(refuse(format!("-N {ns}: mounting into another namespace is not supported")));
    }
    if let Some(t) = h.fs_type.as_deref().filter(|t| !matches!(*t, "fuse.vmback" | "vmback")) {
        return Err(refuse(format!("-t {t}: this helper mounts fuse.vmback only")));
    }
    if h.fake {
        return Ok(None);
    }
    // The global flags (--log-level, --log-file) may follow the subcommand too.
    let mut flags: Vec<OsString> = vec!["vmback".into(), "mount".into(), "--background".into()];
    if h.verbose {
        flags.extend(["--log-level".into(), "debug".into()]);
    }
    for opt in h.options.iter().flat_map(|o| o.split(',')).filter(|o| !o.is_empty()) {
        let (key, value) = opt.split_once('=').map_or((opt, None), |(k, v)| (k, Some(v)));
        if let (Some(value), Some((_, flag))) = (value, VALUED.iter().find(|(k, _)| *k == key)) {
            flags.extend([(*flag).into(), value.into()]);
            continue;
        }
        match (key, value) {
            ("allow_other", None) => flags.push("--allow-other".into()),
            ("ro", None) => flags.push("--read-only".into()),
            _ if is_generic(opt) || h.sloppy => {}
            _ => {
                let known: Vec<String> = VALUED.iter().map(|(k, _)| format!("{k}=")).collect();
                return Err(refuse(format!(
                    "unknown option `{opt}` in -o (vmback takes allow_other, ro, {})",
                    known.join(", ")
                )));
            }
        }
    }
    flags.extend(["--".into(), h.source, h.mountpoint]);
    Cli::try_parse_from(flags).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn helper(args: &[&str]) -> Result<Option<Cli>, clap::Error> {
        parse(std::iter::once(NAME).chain(args.iter().copied()).map(OsString::from).collect())
    }

    #[test]
    fn options_become_mount_flags() {
        let opts = "ro,allow_other,cache_size=1G,threads=3,log_level=debug,log_file=/var/log/v.log,nofail,_netdev,x-systemd.automount,user,user=alice";
        let cli =
            helper(&["/backup", "/mnt/vmback", "-o", opts, "-t", "fuse.vmback", "-n"]).unwrap().unwrap();
        assert_eq!(cli.log_level.as_deref(), Some("debug"));
        assert_eq!(cli.log_file.as_deref(), Some(std::path::Path::new("/var/log/v.log")));
        let Command::Mount(m) = cli.command else { panic!("not a mount: {:?}", cli.command) };
        assert_eq!((m.source.to_str(), m.mountpoint.to_str()), (Some("/backup"), Some("/mnt/vmback")));
        assert!(m.read_only && m.allow_other && m.background);
        assert_eq!((m.cache_size, m.threads), (1 << 30, Some(3)));
    }

    #[test]
    fn unknown_options_are_refused_unless_sloppy() {
        let err = helper(&["/b", "/m", "-o", "ro,frobnicate"]).unwrap_err().to_string();
        assert!(err.contains("`frobnicate`"), "{err}");
        assert!(helper(&["/b", "/m", "-s", "-o", "ro,frobnicate"]).unwrap().is_some());
        let err = helper(&["/b", "/m", "-o", "cache_size=lots"]).unwrap_err().to_string();
        assert!(err.contains("lots"), "{err}");
        assert!(helper(&["/b", "/m", "-t", "fuse.sshfs"]).is_err());
        assert!(helper(&["/b", "/m", "-N", "1234"]).is_err());
    }

    #[test]
    fn fake_mount_does_nothing() {
        assert!(helper(&["/b", "/m", "-f", "-o", "ro"]).unwrap().is_none());
    }
}
