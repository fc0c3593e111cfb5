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
use crate::backup::remote::{NBD_PORT, RemoteOptions};
use crate::backup::{BackupOptions, Level, Outcome, run};

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// The domain to back up.
    #[arg(short = 'd', long = "domain")]
    pub domain: String,
    /// Backup level: auto is full into an empty folder, else inc.
    #[arg(short = 'l', long = "level", value_enum, default_value = "copy")]
    pub level: Level,
    /// Output folder (one chain per folder).
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
    /// Folder for the NBD socket and libvirt's scratch files (on the hypervisor for a
    /// remote one).
    #[arg(long = "scratchdir", default_value = "/var/tmp")]
    pub scratch_dir: PathBuf,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// virtnbdbackup's remote options: used when `-U` names another host
/// (`qemu+ssh://user@host/system`, `qemu+tcp://host/system`, `qemu+tls://host/system`).
#[derive(Args, Debug)]
#[command(next_help_heading = "Remote hypervisor")]
pub struct RemoteArgs {
    /// User for ssh to the hypervisor (boot files, qemu-img info, an offline disk's
    /// qemu-nbd) [default: the URI's user, else ssh's].
    #[arg(long = "ssh-user")]
    pub ssh_user: Option<String>,
    /// sshd's port there [default: the URI's port with an ssh transport, else ssh's].
    #[arg(long = "ssh-port")]
    pub ssh_port: Option<u16>,
    /// Private key for ssh (as ssh -i) [default: the URI's keyfile=, else ssh's].
    #[arg(long = "ssh-private-key")]
    pub ssh_private_key: Option<PathBuf>,
    /// User to authenticate against libvirtd (SASL).
    #[arg(long)]
    pub user: Option<String>,
    /// Password to authenticate against libvirtd (SASL).
    #[arg(long)]
    pub password: Option<String>,
    /// Address the NBD server listens on there and vmback connects to [default: the
    /// URI's host].
    #[arg(short = 'I', long = "nbd-ip")]
    pub nbd_ip: Option<String>,
    /// NBD port there (an offline backup uses one per disk from here on); unique per
    /// backup running at the same time.
    #[arg(short = 'P', long = "nbd-port", default_value_t = NBD_PORT)]
    pub nbd_port: u16,
    /// NBD over TLS (libnbd's client certificates here: /etc/pki/libnbd for root,
    /// ~/.pki/libnbd otherwise; qemu's backup certificates there).
    #[arg(long)]
    pub tls: bool,
    /// Certificate folder on the hypervisor for an offline backup's qemu-nbd with --tls.
    #[arg(long = "tls-cert", default_value = "/etc/pki/qemu/")]
    pub tls_cert: PathBuf,
}

impl From<&RemoteArgs> for RemoteOptions {
    fn from(a: &RemoteArgs) -> RemoteOptions {
        RemoteOptions {
            ssh_user: a.ssh_user.clone(),
            ssh_port: a.ssh_port,
            ssh_private_key: a.ssh_private_key.clone(),
            user: a.user.clone(),
            password: a.password.clone(),
            nbd_ip: a.nbd_ip.clone(),
            nbd_port: a.nbd_port,
            tls: a.tls,
            tls_cert: a.tls_cert.clone(),
        }
    }
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
            remote: (&a.remote).into(),
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
    let opts = opts.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            warn!("{sig}: stopping the backup");
            crate::backup::abort(&opts);
            std::process::exit(130);
        }
    });
}
