//! `vmback backup`: its flags (turned into the library's [`BackupOptions`]), progress
//! bars, Ctrl-C, and the summary.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use nix::sys::signal::{SigSet, Signal};
use tracing::{info, warn};

use super::ls::human;
use super::{Result, cores, parse_bytes};
use crate::backup::{BackupOptions, Level, Outcome, run};

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// The domain to back up.
    #[arg(short = 'd', long = "domain")]
    pub domain: String,
    /// Backup level: auto is full into an empty folder, else inc.
    #[arg(short = 'l', long = "level", value_enum, default_value = "copy")]
    pub level: Level,
    /// Output folder (one chain per folder), or `-`: a zip on standard output, the chain
    /// kept in the current folder (as virtnbdbackup -o -).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// lz4-compress the data (optionally with a level, as upstream's -z).
    #[arg(short = 'z', long = "compress", num_args = 0..=1, default_missing_value = "2", require_equals = true)]
    pub compress: Option<u32>,
    /// Disks to leave out (comma-separated target names, e.g. vdb,vdc).
    #[arg(short = 'x', long = "exclude", value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// Back up only these disks.
    #[arg(short = 'i', long = "include", value_delimiter = ',')]
    pub include: Vec<String>,
    /// libvirt connection URI.
    #[arg(short = 'U', long = "uri", default_value = "qemu:///system")]
    pub uri: String,
    /// Disks backed up in parallel.
    #[arg(short = 'w', long = "worker")]
    pub worker: Option<usize>,
    /// Skip an inc/diff that would save fewer bytes than this.
    #[arg(long, value_parser = parse_bytes)]
    pub threshold: Option<u64>,
    /// Print how much a backup would save, and exit.
    #[arg(short = 'p', long = "printonly")]
    pub print_only: bool,
    /// Output type: stream (default) or raw images (full and copy only).
    #[arg(short = 't', long = "type", default_value = "stream", value_parser = ["stream", "raw"])]
    pub output_type: String,
    /// Include raw-format disks (saved as raw images in full and copy backups).
    #[arg(long)]
    pub raw: bool,
    /// Where checkpoint XML files are kept [default: OUTPUT/checkpoints].
    #[arg(short = 'C', long = "checkpointdir")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Folder for the NBD socket and libvirt's scratch files.
    #[arg(long = "scratchdir", default_value = "/var/tmp")]
    pub scratch_dir: PathBuf,
}

impl From<&BackupArgs> for BackupOptions {
    fn from(a: &BackupArgs) -> BackupOptions {
        BackupOptions {
            workers: a.worker.unwrap_or_else(cores),
            domain: a.domain.clone(),
            level: a.level,
            output: a.output.clone(),
            compress: a.compress,
            exclude: a.exclude.clone(),
            include: a.include.clone(),
            uri: a.uri.clone(),
            threshold: a.threshold,
            print_only: a.print_only,
            raw_output: a.output_type == "raw",
            raw_disks: a.raw,
            checkpoint_dir: a.checkpoint_dir.clone(),
            scratch_dir: a.scratch_dir.clone(),
        }
    }
}

pub fn backup(opts: &BackupOptions) -> Result<ExitCode> {
    stop_on_signal(opts);
    let bars = MultiProgress::new();
    let show = std::io::stderr().is_terminal();
    let by_disk: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    let logged: Mutex<HashMap<String, u64>> = Mutex::new(HashMap::new());
    let progress = |disk: &str, n: u64| {
        if show {
            let mut map = by_disk.lock().expect("no panics while held");
            let bar = map.entry(disk.to_owned()).or_insert_with(|| {
                let b = bars.add(ProgressBar::no_length());
                b.set_style(
                    ProgressStyle::with_template("{prefix:>6} {bytes} {bytes_per_sec} {elapsed}")
                        .expect("valid template"),
                );
                b.set_prefix(disk.to_owned());
                b
            });
            bar.inc(n);
        } else {
            // Plain lines when not on a terminal: one per GiB per disk.
            let mut map = logged.lock().expect("no panics while held");
            let done = map.entry(disk.to_owned()).or_default();
            let before = *done >> 30;
            *done += n;
            if *done >> 30 > before {
                info!("{disk}: {} processed", human(*done));
            }
        }
    };
    match run(opts, &progress)? {
        Outcome::Estimate { bytes } => outln!("estimated backup size: {} ({bytes} bytes)", human(bytes)),
        Outcome::BelowThreshold { bytes } => {
            outln!("{} changed, below the threshold: no backup taken", human(bytes))
        }
        Outcome::Saved { level, disks } => {
            for b in by_disk.lock().expect("no panics while held").values() {
                b.finish();
            }
            let (mut data, mut zero, mut secs) = (0, 0, 0f64);
            for d in &disks {
                let t = d.elapsed.as_secs_f64().max(1e-6);
                outln!(
                    "{}: {} ({} virtual): {} data, {} zero, {t:.1} s, {}/s",
                    d.disk,
                    d.file.display(),
                    human(d.virtual_size),
                    human(d.data_bytes),
                    human(d.zero_bytes),
                    human((d.data_bytes as f64 / t) as u64)
                );
                data += d.data_bytes;
                zero += d.zero_bytes;
                secs = secs.max(t);
            }
            outln!(
                "{level:?} backup of {}: {} data saved, {} zero, {secs:.1} s",
                opts.domain,
                human(data),
                human(zero)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// On Ctrl-C or SIGTERM: end the domain's backup job through a connection of its own
/// (the main thread may be blocked in an NBD read), then exit. Files being written stay
/// `.partial`; the next run removes them.
fn stop_on_signal(opts: &BackupOptions) {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    if set.thread_block().is_err() {
        return;
    }
    let (uri, domain) = (opts.uri.clone(), opts.domain.clone());
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            warn!("{sig}: stopping the backup");
            crate::backup::abort(&uri, &domain);
            std::process::exit(130);
        }
    });
}
