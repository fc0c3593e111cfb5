//! The command line: clap definitions, and each command turned into a call of the library.
//! The output of `ls` lives in [`ls`], of `restore`, `dump` and `verify` in [`restore`];
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
mod ls;
mod restore;

use crate::catalog::{Catalog, Watched};
use crate::fs::session::{MountOptions, Unmounted, mount, umount};
use crate::fs::{FsConfig, Writes};
use crate::restore::{Format, Sparse};

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
    /// mount(8), whose log otherwise ends with its start-up).
    #[arg(long, global = true, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Parses the command line `args` (with the program name first). Called as
/// `mount.fuse.vmback` (mount(8)'s helper for `-t fuse.vmback`), it takes mount(8)'s
/// helper arguments instead; `None` then means there is nothing to do (`-f`, a fake mount).
pub fn parse(args: Vec<std::ffi::OsString>) -> Result<Option<Cli>, clap::Error> {
    let name = args.first().map(Path::new).and_then(Path::file_name);
    if name.is_some_and(|n| n == helper::NAME) {
        return helper::parse(args);
    }
    Cli::try_parse_from(args).map(Some)
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show backup sets as raw disk images: MOUNT/<domain>/<restore point>/<disk>.raw
    Mount {
        /// A backup set (virtnbdbackup output folder) or a folder tree holding many.
        source: PathBuf,
        /// An empty directory to mount on.
        mountpoint: PathBuf,
        /// Memory for decoded (lz4) data shared by all images, e.g. 256M or 1G.
        #[arg(long, default_value = "256M", value_parser = parse_bytes)]
        cache_size: u64,
        /// Let other users read the mount (file modes are then enforced).
        #[arg(long)]
        allow_other: bool,
        /// Make every image read-only (writes fail with EROFS).
        #[arg(long)]
        read_only: bool,
        /// Memory for written data, shared by all images; past it, written data goes to
        /// overlay files.
        #[arg(long, default_value = "256M", value_parser = parse_bytes)]
        dirty_size: u64,
        /// Where overlay files go: a fresh folder is made in it and removed at unmount.
        #[arg(long, default_value = "/var/tmp", conflicts_with = "keep_overlay")]
        overlay_dir: PathBuf,
        /// Keep written data in DIR across mounts (resume a VM booted from a backup).
        #[arg(long, value_name = "DIR")]
        keep_overlay: Option<PathBuf>,
        /// Threads serving requests [default: two per core, at most 16].
        #[arg(long)]
        threads: Option<usize>,
        /// Look for new, changed and removed backups in SOURCE every SECONDS (0: never);
        /// they show in the mount without a remount.
        #[arg(long, value_name = "SECONDS", default_value = "1")]
        rescan: f64,
        /// Return once the mount is up, serving it from a detached process (what
        /// `mount -t fuse.vmback` does); stop it with `vmback umount MOUNTPOINT`.
        #[arg(long)]
        background: bool,
    },
    /// Unmount a vmback (or other FUSE) mount, as `fusermount3 -u` does; also clears a
    /// mount left stale by a killed vmback.
    Umount {
        mountpoint: PathBuf,
        /// Detach it even while in use: it leaves the tree now; files still open there keep
        /// working, and vmback exits when the last one is closed.
        #[arg(long, short = 'l')]
        lazy: bool,
    },
    /// List domains, restore points and disks found in SOURCE.
    Ls {
        source: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Back up a libvirt domain in virtnbdbackup's format (full, inc, diff, copy).
    Backup {
        /// The domain to back up.
        #[arg(short = 'd', long = "domain")]
        domain: String,
        /// Backup level: auto is full into an empty folder, else inc.
        #[arg(short = 'l', long = "level", value_enum, default_value = "copy")]
        level: crate::backup::Level,
        /// Output folder (one chain per folder).
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// lz4-compress the data (optionally with a level, as upstream's -z).
        #[arg(short = 'z', long = "compress", num_args = 0..=1, default_missing_value = "2", require_equals = true)]
        compress: Option<u32>,
        /// Disks to leave out (comma-separated target names, e.g. vdb,vdc).
        #[arg(short = 'x', long = "exclude", value_delimiter = ',')]
        exclude: Vec<String>,
        /// Back up only these disks.
        #[arg(short = 'i', long = "include", value_delimiter = ',')]
        include: Vec<String>,
        /// libvirt connection URI.
        #[arg(short = 'U', long = "uri", default_value = "qemu:///system")]
        uri: String,
        /// Disks backed up in parallel.
        #[arg(short = 'w', long = "worker")]
        worker: Option<usize>,
        /// Skip an inc/diff that would save fewer bytes than this.
        #[arg(long, value_parser = parse_bytes)]
        threshold: Option<u64>,
        /// Print how much a backup would save, and exit.
        #[arg(short = 'p', long = "printonly")]
        print_only: bool,
        /// Output type: stream (default) or raw images (full and copy only).
        #[arg(short = 't', long = "type", default_value = "stream", value_parser = ["stream", "raw"])]
        output_type: String,
        /// Include raw-format disks (saved as raw images in full and copy backups).
        #[arg(long)]
        raw: bool,
        /// Where checkpoint XML files are kept [default: OUTPUT/checkpoints].
        #[arg(short = 'C', long = "checkpointdir")]
        checkpoint_dir: Option<PathBuf>,
        /// Folder for the NBD socket and libvirt's scratch files.
        #[arg(long = "scratchdir", default_value = "/var/tmp")]
        scratch_dir: PathBuf,
    },
    /// Rebuild disk images from a backup set: every disk at the newest restore point, or at
    /// --until POINT. `-o dump` prints the stream metadata instead.
    Restore {
        /// The backup set (or a folder tree of sets; then --domain may be needed).
        #[arg(short = 'i', long = "input")]
        input: PathBuf,
        /// Output folder (created if missing), a block device (with -d), or `dump`.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// The restore point, named as `vmback ls` and the mount show it (a bare checkpoint
        /// name such as virtnbdbackup.2 works when it is unique).
        #[arg(long)]
        until: Option<String>,
        /// Restore only this disk (e.g. sda).
        #[arg(short = 'd', long = "disk")]
        disk: Option<String>,
        /// Apply exactly these stream files (relative to -i), in this order.
        #[arg(long, value_delimiter = ',')]
        sequence: Vec<PathBuf>,
        /// Output image format.
        #[arg(long, value_enum, default_value = "raw")]
        format: Format,
        /// Leave holes (always), or write zeros over them (never: for block devices).
        #[arg(long, value_enum, default_value = "always")]
        sparse: Sparse,
        /// The domain, when the input holds several.
        #[arg(long)]
        domain: Option<String>,
        /// Worker threads per disk [default: one per core].
        #[arg(long)]
        threads: Option<usize>,
    },
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

fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size::Config::new().with_binary().parse_size(s).map_err(|e| e.to_string())
}

/// Writes one line to stdout; see [`outln`].
pub(crate) fn write_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
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
pub fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cli.command {
        Command::Mount {
            source,
            mountpoint,
            cache_size,
            allow_other,
            read_only,
            dirty_size,
            overlay_dir,
            keep_overlay,
            threads,
            rescan,
            background,
        } => {
            if background && !background::is_child() {
                return background::serve_detached(&mountpoint);
            }
            let (watched, catalog) = Watched::open(&source)?;
            let every = std::time::Duration::try_from_secs_f64(rescan)
                .map_err(|e| format!("--rescan {rescan}: {e}"))?;
            let watch = (!every.is_zero()).then_some((watched, every));
            // The scratch folder lives until this arm ends, i.e. until unmount.
            let mut scratch = None;
            let writes = match (read_only, keep_overlay) {
                (true, _) => Writes::ReadOnly,
                (false, Some(dir)) => {
                    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                    Writes::Keep(dir)
                }
                (false, None) => {
                    let dir = tempfile::Builder::new()
                        .prefix("vmback-overlay-")
                        .tempdir_in(&overlay_dir)
                        .map_err(|e| format!("{}: {e}", overlay_dir.display()))?;
                    let path = dir.path().to_owned();
                    scratch = Some(dir);
                    Writes::Scratch(path)
                }
            };
            let opts = MountOptions {
                allow_other,
                threads: threads.unwrap_or_else(MountOptions::default_threads),
                fs_name: std::fs::canonicalize(&source)
                    .unwrap_or_else(|_| source.clone())
                    .display()
                    .to_string(),
                fs: FsConfig { cache_size: usize::try_from(cache_size)?, dirty_size, writes },
            };
            mount(&catalog, watch, &mountpoint, &opts)?;
            drop(scratch);
        }
        Command::Ls { source, json } => {
            let catalog = Catalog::discover(&source)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&ls::ls_json(&catalog))?);
            } else {
                outln!("{}", ls::ls_text(&catalog).trim_end());
            }
        }
        Command::Backup {
            domain,
            level,
            output,
            compress,
            exclude,
            include,
            uri,
            worker,
            threshold,
            print_only,
            output_type,
            raw,
            checkpoint_dir,
            scratch_dir,
        } => {
            let opts = crate::backup::BackupOptions {
                workers: worker.unwrap_or_else(cores),
                domain,
                level,
                output,
                compress,
                exclude,
                include,
                uri,
                threshold,
                print_only,
                raw_output: output_type == "raw",
                raw_disks: raw,
                checkpoint_dir,
                scratch_dir,
            };
            return backup::backup(&opts);
        }
        Command::Restore { input, output, until, disk, sequence, format, sparse, domain, threads } => {
            if output.as_os_str() == "dump" {
                return restore::dump(&input);
            }
            let opts =
                crate::restore::RestoreOptions { format, sparse, threads: threads.unwrap_or_else(cores) };
            let what = restore::What { until, disk, sequence, domain };
            return restore::restore(&input, &output, &what, &opts);
        }
        Command::Dump { input } => return restore::dump(&input),
        Command::Verify { source, json, threads } => {
            return restore::verify(&source, json, threads.unwrap_or_else(cores));
        }
        Command::Umount { mountpoint, lazy } => {
            let shown = mountpoint.display();
            match umount(&mountpoint, lazy)? {
                Unmounted::Live => tracing::info!("unmounted {shown}"),
                Unmounted::Stale => {
                    tracing::info!("{shown} was stale (its server was killed); detached it");
                }
                Unmounted::Lazy => {
                    tracing::info!("detached {shown}; it ends when its last open file is closed")
                }
            }
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
