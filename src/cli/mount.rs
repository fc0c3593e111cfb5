//! `vmback mount` and `vmback umount`: their flags, turned into the library's
//! [`MountOptions`], and the mount's lifetime. The scratch folder for overlays (unless
//! `--keep-overlay` or `--read-only`) is made before the mount and removed when the mount
//! ends, so it lives exactly as long as the session that writes into it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tempfile::TempDir;

use super::{Result, background, parse_bytes};
use crate::catalog::Watched;
use crate::fs::session::{MountOptions, Unmounted, mount as serve, umount as unmount};
use crate::fs::{FsConfig, Writes};

#[derive(Args, Debug)]
pub struct MountArgs {
    /// A backup set (virtnbdbackup output folder) or a folder tree holding many.
    pub source: PathBuf,
    /// An empty directory to mount on.
    pub mountpoint: PathBuf,
    /// Memory for decoded (lz4) data shared by all images, e.g. 256M or 1G.
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    pub cache_size: u64,
    /// Let other users read the mount (file modes are then enforced).
    #[arg(long)]
    pub allow_other: bool,
    /// Make every image read-only (writes fail with EROFS).
    #[arg(long)]
    pub read_only: bool,
    /// Memory for written data, shared by all images; past it, written data goes to
    /// overlay files.
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    pub dirty_size: u64,
    /// Where overlay files go: a fresh folder is made in it and removed at unmount.
    #[arg(long, default_value = "/var/tmp", conflicts_with = "keep_overlay")]
    pub overlay_dir: PathBuf,
    /// Keep written data in DIR across mounts (resume a VM booted from a backup).
    #[arg(long, value_name = "DIR")]
    pub keep_overlay: Option<PathBuf>,
    /// Threads serving requests [default: two per core, at most 16].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Look for new, changed and removed backups in SOURCE every SECONDS (0: never);
    /// they show in the mount without a remount.
    #[arg(long, value_name = "SECONDS", default_value = "1")]
    pub rescan: f64,
    /// Return once the mount is up, serving it from a detached process (what
    /// `mount -t fuse.vmback` does); stop it with `vmback umount MOUNTPOINT`.
    #[arg(long)]
    pub background: bool,
}

#[derive(Args, Debug)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
    /// Detach it even while in use: it leaves the tree now; files still open there keep
    /// working, and vmback exits when the last one is closed.
    #[arg(long, short = 'l')]
    pub lazy: bool,
}

/// The options of one mount and the scratch folder they name, which is removed when
/// this is dropped (after the unmount).
struct Prepared {
    opts: MountOptions,
    _scratch: Option<TempDir>,
}

/// `TryFrom`, not `From`: making the overlay folder can fail.
impl TryFrom<&MountArgs> for Prepared {
    type Error = Box<dyn std::error::Error>;

    fn try_from(a: &MountArgs) -> Result<Prepared> {
        let mut scratch = None;
        let writes = match (a.read_only, &a.keep_overlay) {
            (true, _) => Writes::ReadOnly,
            (false, Some(dir)) => {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                Writes::Keep(dir.clone())
            }
            (false, None) => {
                let dir = tempfile::Builder::new()
                    .prefix("vmback-overlay-")
                    .tempdir_in(&a.overlay_dir)
                    .map_err(|e| format!("{}: {e}", a.overlay_dir.display()))?;
                let path = dir.path().to_owned();
                scratch = Some(dir);
                Writes::Scratch(path)
            }
        };
        let opts = MountOptions {
            allow_other: a.allow_other,
            threads: a.threads.unwrap_or_else(MountOptions::default_threads),
            fs_name: std::fs::canonicalize(&a.source)
                .unwrap_or_else(|_| a.source.clone())
                .display()
                .to_string(),
            fs: FsConfig { cache_size: usize::try_from(a.cache_size)?, dirty_size: a.dirty_size, writes },
        };
        Ok(Prepared { opts, _scratch: scratch })
    }
}

/// Serves the mount until it is unmounted (or, with `--background`, until it is up).
pub fn mount(a: &MountArgs) -> Result<ExitCode> {
    if a.background && !background::is_child() {
        return background::serve_detached(&a.mountpoint);
    }
    let (watched, catalog) = Watched::open(&a.source)?;
    let every = std::time::Duration::try_from_secs_f64(a.rescan)
        .map_err(|e| format!("--rescan {}: {e}", a.rescan))?;
    let watch = (!every.is_zero()).then_some((watched, every));
    let prepared = Prepared::try_from(a)?;
    serve(&catalog, watch, &a.mountpoint, &prepared.opts)?;
    Ok(ExitCode::SUCCESS)
}

pub fn umount(a: &UmountArgs) -> Result<ExitCode> {
    let shown = a.mountpoint.display();
    match unmount(&a.mountpoint, a.lazy)? {
        Unmounted::Live => tracing::info!("unmounted {shown}"),
        Unmounted::Stale => tracing::info!("{shown} was stale (its server was killed); detached it"),
        Unmounted::Lazy => tracing::info!("detached {shown}; it ends when its last open file is closed"),
    }
    Ok(ExitCode::SUCCESS)
}
