//! The command line: clap definitions, and each command turned into a call of the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::cache::ReadCache;
use crate::catalog::{Catalog, RestorePoint, Status, stamp};
use crate::chain::ImageReader;
use crate::fs::FsConfig;
use crate::fs::session::{MountOptions, mount};

#[derive(Parser, Debug)]
#[command(
    name = "vmback",
    version,
    about = "Mount, back up and restore libvirt/KVM backups (virtnbdbackup format)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
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
        /// Threads serving requests [default: two per core, at most 16].
        #[arg(long)]
        threads: Option<usize>,
    },
    /// List domains, restore points and disks found in SOURCE.
    Ls {
        source: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a small sample backup set (two disks, full + 2 incrementals + a diff) to DIR.
    Sample { dir: PathBuf },
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size::Config::new().with_binary().parse_size(s).map_err(|e| e.to_string())
}

/// Runs one command; errors are printed with their causes by `main`.
pub fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cli.command {
        Command::Mount { source, mountpoint, cache_size, allow_other, threads } => {
            let catalog = Catalog::discover(&source)?;
            let opts = MountOptions {
                allow_other,
                threads: threads.unwrap_or_else(MountOptions::default_threads),
                fs_name: source.display().to_string(),
                fs: FsConfig { cache_size: usize::try_from(cache_size)? },
            };
            mount(&catalog, &mountpoint, &opts)?;
        }
        Command::Ls { source, json } => {
            let catalog = Catalog::discover(&source)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ls_json(&catalog))?);
            } else {
                print!("{}", ls_text(&catalog));
            }
        }
        Command::Sample { dir } => {
            crate::sample::write_sample(&dir)?;
            println!("sample backup set written to {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `(virtual size, stored size)` of each disk of a point; (0, 0) when it is broken.
fn disk_sizes(point: &RestorePoint) -> Vec<(u64, u64)> {
    // Only extent maps are built here; nothing is read, so the cache stays empty.
    let cache = std::sync::Arc::new(ReadCache::new(0));
    point
        .disks
        .iter()
        .map(|d| {
            if d.layers.is_empty() {
                return (0, 0);
            }
            let img = ImageReader::new(d.layers.clone(), cache.clone());
            (img.size(), img.map().data_bytes())
        })
        .collect()
}

fn status_words(s: &Status) -> (&'static str, Option<&str>) {
    match s {
        Status::Complete => ("complete", None),
        Status::Damaged(r) => ("damaged", Some(r)),
        Status::Broken(r) => ("broken", Some(r)),
    }
}

fn file_names(paths: impl Iterator<Item = impl AsRef<Path>>) -> Vec<String> {
    paths
        .map(|p| p.as_ref().file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()))
        .collect()
}

fn ls_json(catalog: &Catalog) -> serde_json::Value {
    let domains: Vec<_> = catalog
        .domains
        .iter()
        .map(|d| {
            let points: Vec<_> = d
                .points
                .iter()
                .map(|p| {
                    let st = p.status();
                    let (status, reason) = status_words(&st);
                    let disks: Vec<_> = p
                        .disks
                        .iter()
                        .zip(disk_sizes(p))
                        .map(|(disk, (virt, stored))| {
                            json!({
                                "disk": disk.disk,
                                "virtual_size": virt,
                                "stored_size": stored,
                                "files": file_names(disk.layers.iter().map(|l| &l.index.path)),
                            })
                        })
                        .collect();
                    json!({
                        "name": p.name,
                        "date": chrono::DateTime::<chrono::Local>::from(p.date).to_rfc3339(),
                        "set": p.set_dir,
                        "status": status,
                        "reason": reason,
                        "vmconfig": p.vmconfig,
                        "disks": disks,
                    })
                })
                .collect();
            json!({ "name": d.name, "latest": d.latest().map(|p| &p.name), "points": points })
        })
        .collect();
    json!({ "domains": domains, "warnings": catalog.warnings })
}

fn ls_text(catalog: &Catalog) -> String {
    let mut out = String::new();
    for d in &catalog.domains {
        out.push_str(&format!("{}\n", d.name));
        for p in &d.points {
            let st = p.status();
            let (status, reason) = status_words(&st);
            out.push_str(&format!("  {:<40} {}  {status}", p.name, stamp(p.date)));
            if let Some(r) = reason {
                out.push_str(&format!(": {r}"));
            }
            out.push('\n');
            for (disk, (virt, stored)) in p.disks.iter().zip(disk_sizes(p)) {
                let files = file_names(disk.layers.iter().map(|l| &l.index.path)).join(" + ");
                out.push_str(&format!(
                    "      {:<8} {:>10} virtual {:>10} stored  {files}\n",
                    disk.disk,
                    human(virt),
                    human(stored)
                ));
            }
        }
    }
    for w in &catalog.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

/// Bytes as a short binary-unit figure, e.g. `64.0 MiB`.
fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}
