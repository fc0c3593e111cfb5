//! The command line: clap definitions, and each command turned into a call of the library.
//! A command with many flags has an `Args` struct in its own module, turned into the
//! library's options with `From` (or `TryFrom`); this file only dispatches. `mount` and
//! `umount` live in [`mount`], `backup` in [`backup`], the output of `ls` in [`ls`], of
//! `restore`, `dump` and `verify` (and the restore plan) in [`restore`];
//! `mount -t fuse.vmback` (the `mount.fuse.vmback` helper name) in [`helper`], and the
//! detached server of `mount --background` in [`background`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// `println!` for command output: a reader that went away (`vmback ls | head`) ends the
/// output quietly instead of panicking; other write errors are logged.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_line(format_args!($($arg)*))
    };
}

mod background;
mod backup;
mod helper;
mod logging;
mod ls;
mod mount;
mod restore;

use backup::BackupArgs;
pub use logging::init_logging;
use mount::{MountArgs, UmountArgs};
use restore::RestoreArgs;

use crate::catalog::Catalog;

/// Every command's result: the exit code, or an error that `main` prints with its causes.
type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Parser, Debug)]
#[command(
    name = "vmback",
    version,
    about = "Mount, back up and restore libvirt/KVM backups (virtnbdbackup format)"
)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or tracing's filter syntax); wins over
    /// the VMBACK_LOG environment variable [default: info].
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Append the log to FILE instead of writing it to stderr (e.g. for a mount made by
    /// mount(8), whose log otherwise ends with its start-up); `--logfile` as upstream.
    #[arg(long, global = true, value_name = "FILE", visible_alias = "logfile")]
    pub log_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Parses the command line `args` (with the program name first). Called as
/// `mount.fuse.vmback` (mount(8)'s helper for `-t fuse.vmback`), it takes mount(8)'s
/// helper arguments instead; `None` then means there is nothing to do (`-f`, a fake mount).
pub fn parse(args: Vec<std::ffi::OsString>) -> std::result::Result<Option<Cli>, clap::Error> {
    let name = args.first().map(Path::new).and_then(Path::file_name);
    if name.is_some_and(|n| n == helper::NAME) {
        return helper::parse(args);
    }
    Cli::try_parse_from(args).map(Some)
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show backup sets as raw disk images: MOUNT/<domain>/<restore point>/<disk>.raw
    Mount(MountArgs),
    /// Unmount a vmback (or other FUSE) mount, as `fusermount3 -u` does; also clears a
    /// mount left stale by a killed vmback.
    Umount(UmountArgs),
    /// List domains, restore points and disks found in SOURCE.
    Ls {
        source: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Back up a libvirt domain in virtnbdbackup's format (full, inc, diff, copy).
    Backup(Box<BackupArgs>),
    /// Rebuild disk images from a backup set: every disk at the newest restore point, or at
    /// --until POINT, with its boot files; `-c`/`-D` rebuild (and define) the VM, here or
    /// on a remote host (`-U`). `-a dump` (or `-o dump`) prints the stream metadata
    /// instead, `-a verify` (or `-o verify`) verifies the set.
    Restore(Box<RestoreArgs>),
    /// Print the metadata of every stream file of a backup set as JSON.
    Dump {
        #[arg(short = 'i', long = "input")]
        input: PathBuf,
    },
    /// Read every stream file completely and report damage; exits 1 if any is found.
    Verify {
        source: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Files verified in parallel [default: one per core].
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Write a small sample backup set (two disks, full + 2 incrementals + a diff) to DIR.
    Sample { dir: PathBuf },
    /// Print a shell completion script (for the set-up; e.g. `vmback completions bash`).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages (vmback.1 and one per command) into DIR (for the set-up).
    #[command(hide = true)]
    Man { dir: PathBuf },
}

fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    parse_size::Config::new().with_binary().parse_size(s).map_err(|e| e.to_string())
}

/// Set when stdout carries data (`backup -o -`, a zip): command output goes to stderr.
static STDOUT_IS_DATA: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes one line to stdout (stderr when stdout carries data); see [`outln`].
pub(crate) fn write_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out: Box<dyn Write> = if STDOUT_IS_DATA.load(std::sync::atomic::Ordering::Relaxed) {
        Box::new(std::io::stderr().lock())
    } else {
        Box::new(std::io::stdout().lock())
    };
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n"))
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        tracing::warn!("writing the output: {e}");
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Runs one command; errors are printed with their causes by `main`.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Mount(a) => return mount::mount(&a),
        Command::Umount(a) => return mount::umount(&a),
        Command::Ls { source, json } => {
            let catalog = Catalog::discover(&source)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&ls::ls_json(&catalog))?);
            } else {
                outln!("{}", ls::ls_text(&catalog, &source).trim_end());
            }
        }
        Command::Backup(a) => {
            STDOUT_IS_DATA.store(a.output == Path::new("-"), std::sync::atomic::Ordering::Relaxed);
            return backup::backup(&a);
        }
        Command::Restore(a) => return restore::run(&a),
        Command::Dump { input } => return restore::dump(&input),
        Command::Verify { source, json, threads } => {
            return restore::verify(&source, json, threads.unwrap_or_else(cores));
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "vmback", &mut std::io::stdout());
        }
        Command::Man { dir } => {
            clap_mangen::generate_to(Cli::command(), &dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Command::Sample { dir } => {
            crate::sample::write_sample(&dir)?;
            outln!("sample backup set written to {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
