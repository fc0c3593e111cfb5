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
use crate::backup::{BackupOptions, JobOptions, Level, Outcome, run};

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
    #[arg(short = 'T', long, value_parser = parse_bytes)]
    pub threshold: Option<u64>,
    /// Print how much a backup would save, and exit.
    #[arg(short = 'p', long = "printonly")]
    pub print_only: bool,
    /// Output type: stream (default) or raw images (full and copy only).
    #[arg(short = 't', long = "type", default_value = "stream", value_parser = ["stream", "raw"])]
    pub output_type: String,
    /// Include raw-format disks (saved as raw images in full and copy backups).
    #[arg(short = 'r', long)]
    pub raw: bool,
    /// Where checkpoint XML files are kept [default: OUTPUT/checkpoints].
    #[arg(short = 'C', long = "checkpointdir")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Folder for the NBD socket and libvirt's scratch files (on the hypervisor for a
    /// remote one).
    #[arg(long = "scratchdir", default_value = "/var/tmp")]
    pub scratch_dir: PathBuf,
    #[command(flatten)]
    pub job: JobArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
    #[command(flatten)]
    pub log: BackupLogArgs,
    /// Ask qemu's tools for the extents to save (`nbdinfo --map`, as upstream's -q does)
    /// instead of the NBD server directly; the backup is the same.
    #[arg(short = 'q', long = "qemu")]
    pub qemu: bool,
    /// Accepted for upstream's scripts: vmback never turns dirty ranges that read as
    /// zeros into holes (see the README), which is what this asks of upstream.
    #[arg(long = "no-sparse-detection")]
    pub no_sparse_detection: bool,
}

/// The domain and its backup job (upstream's names and meanings).
#[derive(Args, Debug)]
pub struct JobArgs {
    /// Start a shut-off domain paused for the backup (so a full makes its checkpoint),
    /// and stop it again after.
    #[arg(short = 'S', long = "start-domain")]
    pub start_domain: bool,
    /// Pause the running domain while the backup job starts.
    #[arg(long)]
    pub pause: bool,
    /// Freeze only the guest's filesystems on these mountpoints (comma-separated;
    /// default: all), through the guest agent.
    #[arg(short = 'F', long = "freeze-mountpoint", value_delimiter = ',')]
    pub freeze_mountpoint: Vec<String>,
    /// Only start the backup job and leave its NBD server running for other tools (see
    /// --socketfile); save nothing. End it with -k.
    #[arg(short = 's', long = "startonly", conflicts_with = "killonly")]
    pub startonly: bool,
    /// End the domain's backup job (one left by -s, another tool or a killed run), and
    /// do nothing else.
    #[arg(short = 'k', long = "killonly")]
    pub killonly: bool,
    /// The NBD server's unix socket; a shut-off domain's disks are served on PATH.DISK
    /// [default: SCRATCHDIR/vmback.PID.sock; with -s SCRATCHDIR/vmback-DOMAIN.sock].
    #[arg(short = 'f', long = "socketfile")]
    pub socketfile: Option<PathBuf>,
}

/// How `vmback backup` reports (upstream's names; the log filter and file are the global
/// --log-level and --log-file/--logfile).
#[derive(Args, Debug)]
pub struct BackupLogArgs {
    /// No progress bars.
    #[arg(short = 'n', long = "noprogress")]
    pub noprogress: bool,
    /// Log debug lines too (as --log-level debug; --log-level wins).
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
    /// Send the log to syslog too (/dev/log).
    #[arg(short = 'L', long = "syslog")]
    pub syslog: bool,
    /// No log on stderr (and no progress bars); --log-file and -L still get it.
    #[arg(long)]
    pub quiet: bool,
    /// No colours in the log on a terminal.
    #[arg(long)]
    pub nocolor: bool,
    /// Exit 2 when the backup succeeded but a warning was logged (e.g. no guest agent
    /// answered, so the filesystems were not frozen).
    #[arg(short = 'e', long = "strict")]
    pub strict: bool,
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
            qemu_extents: a.qemu,
            job: JobOptions {
                start_domain: a.job.start_domain,
                pause: a.job.pause,
                freeze: a.job.freeze_mountpoint.clone(),
                start_only: a.job.startonly,
                kill_only: a.job.killonly,
                socket: a.job.socketfile.clone(),
            },
            remote: (&a.remote).into(),
        }
    }
}

pub fn backup(a: &BackupArgs) -> Result<ExitCode> {
    let opts = &BackupOptions::from(a);
    stop_on_signal(opts);
    let bars = MultiProgress::new();
    let show = std::io::stderr().is_terminal() && !a.log.noprogress && !a.log.quiet;
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
        Outcome::JobStarted { endpoints } => {
            for (disk, uri) in endpoints {
                outln!("{disk}: {uri}");
            }
        }
        Outcome::JobEnded { ended } => {
            outln!("{}: {}", opts.domain, if ended { "backup job ended" } else { "no backup job" })
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
    let warnings = super::logging::warnings();
    if a.log.strict && warnings > 0 {
        info!("{warnings} warning(s) logged: exit code 2 (--strict)");
        // 2: upstream's exit code for a backup that logged warnings under --strict.
        return Ok(ExitCode::from(2));
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn parse(args: &str) -> super::BackupArgs {
        let cli = Cli::try_parse_from(format!("vmback backup -d vm -o /b {args}").split_whitespace())
            .unwrap_or_else(|e| panic!("{args}: {e}"));
        let Command::Backup(a) = cli.command else { panic!("not a backup") };
        *a
    }

    /// Upstream's short and long names of the options, as scripts spell them.
    #[test]
    fn upstreams_option_names_parse() {
        let a = parse("-S --pause -F /mnt,/var -s -f /tmp/s.sock -n -v -L --quiet --nocolor -e -q -r -T 100");
        assert!(a.job.start_domain && a.job.pause && a.job.startonly && a.raw && a.qemu);
        assert_eq!(a.job.freeze_mountpoint, ["/mnt", "/var"]);
        assert_eq!(a.job.socketfile.as_deref(), Some(std::path::Path::new("/tmp/s.sock")));
        let l = &a.log;
        assert!(l.noprogress && l.verbose && l.syslog && l.quiet && l.nocolor && l.strict);
        assert_eq!(a.threshold, Some(100));
        let a = parse(
            "--start-domain --freeze-mountpoint /x --killonly --socketfile s --noprogress --verbose \
             --syslog --strict --qemu --no-sparse-detection --raw --threshold 1K",
        );
        assert!(a.job.start_domain && a.job.killonly && a.no_sparse_detection && a.log.strict);
        assert_eq!(a.threshold, Some(1024));
        assert!(Cli::try_parse_from("vmback backup -d vm -o /b -s -k".split_whitespace()).is_err());
        let cli = Cli::try_parse_from("vmback --logfile /l backup -d vm -o /b".split_whitespace()).unwrap();
        assert_eq!(cli.log_file.as_deref(), Some(std::path::Path::new("/l")));
    }
}
