use std::process::ExitCode;

use clap::Parser;
use vmback::cli::{Cli, run};

/// glibc's `malloc` raises its mmap threshold the first time it frees a large block
/// (a decoded 32 MiB lz4 frame); from then on, freed frames smaller than that stay in
/// per-thread arenas instead of going back to the system, and the process grows far past
/// `--cache-size` (measured: 380 MiB peak instead of 292 MiB for a 256 MiB cache). glibc
/// reads a fixed threshold from the environment only at start-up, so the first start sets
/// it and executes itself again. 1 MiB: every frame buffer is mapped and unmapped on its
/// own, while ordinary small allocations stay in the arenas.
fn pin_malloc_threshold() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MALLOC_MMAP_THRESHOLD_";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    // exec only returns when it failed: then carry on with the default threshold.
    let _ = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env(VAR, "1048576").exec();
}

fn main() -> ExitCode {
    pin_malloc_threshold();
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMBACK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vmback: {}", vmback::error_chain(&*err));
            ExitCode::FAILURE
        }
    }
}
