//! `vmback backup`: progress bars, Ctrl-C, and the summary.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use nix::sys::signal::{SigSet, Signal};
use tracing::{info, warn};

use super::ls::human;
use crate::backup::{BackupOptions, Outcome, run};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

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
