//! Where the log goes: tracing to stderr, or appended to `--log-file` (`--logfile`), and
//! with `backup -L` to syslog as well; `backup --quiet` leaves stderr out. One filter for
//! all of them: `--log-level`, else `backup -v` (debug), else `VMBACK_LOG`, else
//! [`DEFAULT_LOG`]. Colours only on a terminal, and not with `backup --nocolor`. Beside
//! them a layer counts the warnings, for `backup --strict`.
//!
//! Syslog goes through `syslog-tracing` (libc's `openlog`/`syslog`, so `/dev/log` as
//! every syslog daemon and journald serve it, as upstream's `SysLogHandler("/dev/log")`),
//! with the same lines as stderr, each at its level's syslog priority. `tracing-journald`
//! would reach only journald, not a plain syslog daemon or a remote-forwarding rsyslog.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use tracing::{Event, Level, Subscriber, warn};
use tracing_subscriber::Registry;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use super::{Cli, Command};

/// The log filter when neither `--log-level`, `-v` nor `VMBACK_LOG` sets one: fuser's own
/// info lines (one per session event) are noise to a user.
const DEFAULT_LOG: &str = "info,fuser=warn";

/// Where syslog(3) sends its messages.
const DEV_LOG: &str = "/dev/log";

/// Warnings logged so far (see [`warnings`]).
static WARNINGS: AtomicUsize = AtomicUsize::new(0);

/// How many warnings were logged since the start, whatever the filter let through.
pub fn warnings() -> usize {
    WARNINGS.load(Ordering::Relaxed)
}

/// Counts WARN events (it sits behind a WARN filter, so it sees WARN and ERROR).
struct CountWarnings;

impl<S: Subscriber> Layer<S> for CountWarnings {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if *event.metadata().level() == Level::WARN {
            WARNINGS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The filter of every layer that writes (see the module note). An error names the
/// malformed one.
fn filter_spec(cli: &Cli, verbose: bool) -> Result<String, String> {
    let spec = match (cli.log_level.as_deref(), std::env::var("VMBACK_LOG")) {
        (Some(f), _) => {
            return EnvFilter::try_new(f).map(|_| f.to_owned()).map_err(|e| format!("--log-level {f}: {e}"));
        }
        (None, _) if verbose => "debug".to_owned(),
        (None, Ok(f)) if !f.is_empty() => {
            return EnvFilter::try_new(&f).map(|_| f.clone()).map_err(|e| format!("VMBACK_LOG={f}: {e}"));
        }
        (None, _) => DEFAULT_LOG.to_owned(),
    };
    Ok(spec)
}

/// The log file: the global `--log-file` (`--logfile`), or virtnbdrestore's `-L` of a
/// restore.
fn log_file(cli: &Cli) -> Option<&Path> {
    match &cli.command {
        Command::Restore(a) => cli.log_file.as_deref().or(a.restore_log.as_deref()),
        _ => cli.log_file.as_deref(),
    }
}

/// Sets up logging for `cli` (see the module note). A bad filter or a log file that
/// cannot be opened is an error.
pub fn init_logging(cli: &Cli) -> Result<(), String> {
    let (verbose, quiet, syslog, nocolor) = match &cli.command {
        Command::Backup(a) => (a.log.verbose, a.log.quiet, a.log.syslog, a.log.nocolor),
        Command::Restore(a) => (a.verbose, false, false, false),
        _ => (false, false, false, false),
    };
    let spec = filter_spec(cli, verbose)?;
    let filter = || EnvFilter::new(&spec);
    // The server of a `mount --background` logs into a pipe whose reader leaves once the
    // mount is up: a failed write must drop the line, not report (and panic) on the same
    // stderr.
    let fmt = || tracing_subscriber::fmt::layer().with_target(false).log_internal_errors(false);
    let file = match log_file(cli) {
        Some(path) => Some(open_log(path)?),
        None => None,
    };
    let to_stderr = file.is_none() && !quiet;
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = Vec::new();
    if let Some(f) = file {
        layers
            .push(fmt().with_writer(std::sync::Mutex::new(f)).with_ansi(false).with_filter(filter()).boxed());
    }
    if to_stderr {
        let ansi = !nocolor && std::io::IsTerminal::is_terminal(&std::io::stderr());
        layers.push(fmt().with_writer(std::io::stderr).with_ansi(ansi).with_filter(filter()).boxed());
    }
    let syslog = syslog
        .then(|| syslog_tracing::Syslog::new(c"vmback", syslog_tracing::Options::LOG_PID, Default::default()))
        .flatten();
    let to_syslog = syslog.is_some();
    if let Some(w) = syslog {
        // syslog stamps the time itself.
        layers.push(fmt().with_writer(w).with_ansi(false).without_time().with_filter(filter()).boxed());
    }
    layers.push(CountWarnings.with_filter(LevelFilter::WARN).boxed());
    tracing_subscriber::registry().with(layers).init();
    if to_syslog && !Path::new(DEV_LOG).exists() {
        warn!("-L: no syslog daemon listens on {DEV_LOG}; the log does not reach syslog");
    }
    Ok(())
}

fn open_log(path: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("--log-file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn cli(args: &str) -> Cli {
        Cli::try_parse_from(args.split_whitespace()).unwrap_or_else(|e| panic!("{args}: {e}"))
    }

    #[test]
    fn a_restores_log_file_is_virtnbdrestores_l_or_the_global_one() {
        let l = |args: &str| log_file(&cli(args)).map(Path::to_owned);
        assert_eq!(l("vmback restore -i in -o out -L /r.log -v -f /s -n"), Some("/r.log".into()));
        assert_eq!(l("vmback --logfile /g.log restore -i in -o out -L /r.log"), Some("/g.log".into()));
        assert_eq!(l("vmback restore -i in -o out"), None);
        assert_eq!(l("vmback --log-file /g.log ls /b"), Some("/g.log".into()));
    }
}
