//! `vmback restore`: disk images out of a backup set, through the same [`ImageReader`]
//! the mount uses (there is no second reconstruction path), and `vmback verify`.
//!
//! Every image is written to `NAME.partial`, synced, and renamed to `NAME` only when it
//! is whole, so an interrupted or failed restore never leaves a file that passes for
//! complete. Raw output is sparse. qcow2 output is the raw image converted by
//! `qemu-img convert` (then the raw file is removed), compressed with `--compress`;
//! `--preallocate` allocates the whole image (qcow2 `preallocation=full`, as upstream
//! creates its images; a raw file is `fallocate`d). A block device is written in place
//! (it cannot be renamed), with `--sparse=never` writing zeros over holes for devices that
//! were not zeroed beforehand. `rebuild` makes the rest of a VM: image names, boot files,
//! the (adjusted) domain XML and its definition in libvirt.

pub mod copy;
pub mod rebuild;
pub mod remote;
pub mod verify;
pub mod vmconfig;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::chain::{ImageReader, ReadError};
pub use copy::{CopyStats, FileSink, Sink, Sparse, copy_image};

/// Why a restore failed.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Reading the image being copied failed.
    #[error(transparent)]
    View(#[from] crate::view::ViewError),
    #[error("{path}: write failed at offset {offset}")]
    Write {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: exists already; remove it or choose another output folder")]
    Exists(PathBuf),
    #[error("{path}: block device holds {have} bytes, the image needs {need}")]
    DeviceTooSmall { path: PathBuf, have: u64, need: u64 },
    #[error("qemu-img convert to {path} failed: {detail}")]
    QemuImg { path: PathBuf, detail: String },
    #[error("{0}: --compress writes qcow2 images; not with raw output")]
    CompressRaw(PathBuf),
}

/// The image format written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// The format of a disk whose libvirt `<driver type>` (or stream `diskFormat`) is
    /// `name`: raw stays raw, anything else is restored as qcow2, as upstream restores it.
    pub fn of_disk(name: &str) -> Format {
        if name == "raw" { Format::Raw } else { Format::Qcow2 }
    }
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub format: Format,
    pub sparse: Sparse,
    /// Worker threads per disk.
    pub threads: usize,
    /// qcow2 with compressed clusters (`--compress`).
    pub compress: bool,
    /// Allocate the whole image (`-A`).
    pub preallocate: bool,
    /// qcow2 creation options of the original image (`rebuild::qcow2_options`).
    pub qcow2_options: Vec<String>,
}

/// What one disk's restore did.
#[derive(Debug, Clone)]
pub struct DiskReport {
    pub target: PathBuf,
    pub size: u64,
    pub stats: CopyStats,
    pub elapsed: Duration,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io { path: path.to_owned(), source }
}

/// Writes the image of `reader` to `target` (a new file, or an existing block device).
/// `done(bytes)` reports progress.
pub fn restore_image(
    reader: &ImageReader,
    target: &Path,
    opts: &RestoreOptions,
    done: &(dyn Fn(u64) + Sync),
) -> Result<DiskReport, RestoreError> {
    let started = Instant::now();
    let size = reader.size();
    let is_device = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    let stats = if is_device {
        let mut dev = OpenOptions::new().write(true).open(target).map_err(io(target))?;
        let have = dev.seek(SeekFrom::End(0)).map_err(io(target))?;
        if have < size {
            return Err(RestoreError::DeviceTooSmall { path: target.to_owned(), have, need: size });
        }
        let stats =
            copy_image(reader, &FileSink { file: &dev, path: target }, opts.sparse, opts.threads, done)?;
        dev.sync_all().map_err(io(target))?;
        stats
    } else {
        if target.exists() {
            return Err(RestoreError::Exists(target.to_owned()));
        }
        if opts.compress && opts.format == Format::Raw {
            return Err(RestoreError::CompressRaw(target.to_owned()));
        }
        let raw = partial_name(target, opts.format == Format::Qcow2);
        let file = File::create(&raw).map_err(io(&raw))?;
        file.set_len(size).map_err(io(&raw))?;
        let stats =
            copy_image(reader, &FileSink { file: &file, path: &raw }, opts.sparse, opts.threads, done)?;
        match opts.format {
            Format::Raw => {
                if opts.preallocate {
                    // Mode 0 allocates the holes (as unwritten extents: still zeros) and
                    // leaves the data as it is.
                    nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, size as i64)
                        .map_err(|e| io(&raw)(e.into()))?;
                }
                file.sync_all().map_err(io(&raw))?;
                std::fs::rename(&raw, target).map_err(io(target))?;
            }
            Format::Qcow2 => {
                // The raw stage is read once and deleted: no need to make it durable.
                // `-W` lets qemu-img write clusters out of order, in parallel; compressed
                // clusters (`-c`) and preallocation are qemu-img's.
                let partial = partial_name(target, false);
                let mut convert = Command::new("qemu-img");
                convert.args(["convert", "-q", "-W", "-f", "raw", "-O", "qcow2"]);
                if opts.compress {
                    convert.arg("-c");
                }
                let mut create = opts.qcow2_options.clone();
                if opts.preallocate {
                    create.push("preallocation=full".to_owned());
                }
                if !create.is_empty() {
                    convert.arg("-o").arg(create.join(","));
                }
                let out = convert.arg(&raw).arg(&partial).output().map_err(io(Path::new("qemu-img")))?;
                if !out.status.success() {
                    let detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                    return Err(RestoreError::QemuImg { path: target.to_owned(), detail });
                }
                std::fs::remove_file(&raw).map_err(io(&raw))?;
                File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
                std::fs::rename(&partial, target).map_err(io(target))?;
            }
        }
        stats
    };
    Ok(DiskReport { target: target.to_owned(), size, stats, elapsed: started.elapsed() })
}

/// `NAME.partial`, or `NAME.raw.partial` for the raw stage of a qcow2 restore.
fn partial_name(target: &Path, raw_stage: bool) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(if raw_stage { ".raw.partial" } else { ".partial" });
    target.with_file_name(name)
}
