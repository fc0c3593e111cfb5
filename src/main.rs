use std::process::ExitCode;

use vmback::cli::{init_logging, parse, run};

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
    let mut args = std::env::args_os();
    // argv[0] is kept: called as `mount.fuse.vmback`, vmback is mount(8)'s helper.
    let arg0 = args.next().unwrap_or_else(|| "vmback".into());
    // exec only returns when it failed: then carry on with the default threshold.
    let _ = std::process::Command::new(exe).arg0(arg0).args(args).env(VAR, "1048576").exec();
}

fn main() -> ExitCode {
    pin_malloc_threshold();
    let cli = match parse(std::env::args_os().collect()) {
        Ok(Some(cli)) => cli,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => e.exit(),
    };
    if let Err(e) = init_logging(&cli) {
        eprintln!("vmback: {e}");
        // 2: clap's exit code for a bad command line, which a bad filter or log file is.
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vmback: {}", vmback::error_chain(&*err));
            ExitCode::FAILURE
        }
    }
}
