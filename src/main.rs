use std::process::ExitCode;

use clap::Parser;
use vmback::cli::{Cli, run};

fn main() -> ExitCode {
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
