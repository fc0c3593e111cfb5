//! Saving the disks of one run: which extents each disk has to save, then the data files
//! (up to `--worker` disks at a time), named as upstream names them, and the side files
//! (`vmconfig.<ident>.xml`, `<disk>.<ident>.qcow.json`, the boot files and
//! `autostart.<ident>`: `bootfiles`).
//!
//! Invariants: each data file is written as `.partial` and synced; only when every disk
//! is saved do the files take their final names (never over an existing file), so a run
//! that failed on one disk leaves none that pass for a complete restore point. `-p` and
//! `--threshold` return before anything is written.
//! The side files' parts from the hypervisor (`qemu-img info`, the boot files' bytes) are
//! read in a thread while the disks are saved, but written only after they were.

use std::path::PathBuf;
use std::time::Instant;

use tracing::warn;

use super::bootfiles;
use super::disk::{
    self, DiskError, Extent, Extents, nbdinfo_extents, query_extents, stream_into, write_raw, write_stream,
};
use super::domxml::DomDisk;
use super::folder::Folder;
use super::host::{Host, HostError};
use super::nbd::Nbd;
use super::{BackupError, BackupOptions, DiskSummary, Level, Outcome, Progress};
use crate::catalog::boot::Named;
use crate::chain::StreamMeta;

type Result<T, E = BackupError> = std::result::Result<T, E>;

/// Upstream's `datetime.now().isoformat()`: local time, microseconds unless zero.
fn iso_now() -> String {
    let now = chrono::Local::now();
    if now.timestamp_subsec_micros() == 0 {
        now.format("%Y-%m-%dT%H:%M:%S").to_string()
    } else {
        now.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
    }
}

/// What the stream files of this run say about themselves.
pub struct Plan {
    pub level: Level,
    pub kind: Extents,
    pub meta_cpt: String,
    pub parent: String,
    /// `<ident>` of file names: checkpoint, unix time (diff) or `copy`.
    pub ident: String,
}

impl Plan {
    /// The data file name; `raw_disk` is a raw-format disk, which upstream always saves
    /// as `<disk>.copy.data` (a `-t raw` image keeps the level's name).
    fn file_name(&self, disk: &str, raw_disk: bool) -> String {
        match self.level {
            _ if raw_disk => format!("{disk}.copy.data"),
            Level::Full => format!("{disk}.full.data"),
            Level::Copy => format!("{disk}.copy.data"),
            Level::Inc if self.meta_cpt == self.parent => {
                // An offline inc: upstream names it after the parent checkpoint and so
                // overwrites the online inc of that name (FORMAT.md §4.1); the time keeps it apart.
                format!("{disk}.inc.{}.{}.data", self.parent, self.ident)
            }
            Level::Inc => format!("{disk}.inc.{}.data", self.meta_cpt),
            Level::Diff => format!("{disk}.diff.{}.data", self.ident),
            Level::Auto => unreachable!("resolved by run()"),
        }
    }
}

/// Queries every disk's extents, then (unless estimating or below the threshold) writes
/// them with up to `opts.workers` disks in parallel.
pub fn save_disks(
    disks: &[DomDisk],
    plan: &Plan,
    folder: &Folder,
    opts: &BackupOptions,
    progress: Progress<'_>,
    mut connect: impl FnMut(&DomDisk) -> Result<Nbd>,
) -> Result<Outcome> {
    let mut work: Vec<(&DomDisk, Nbd, u64, Vec<Extent>)> = Vec::new();
    for d in disks {
        let err = |source: DiskError| BackupError::Disk { disk: d.target.clone(), source };
        let mut nbd = connect(d)?;
        let size = nbd.size().map_err(|e| err(e.into()))?;
        let extents = if opts.qemu_extents {
            nbdinfo_extents(&nbd, size, plan.kind)
        } else {
            query_extents(&mut nbd, size, plan.kind)
        };
        let extents = extents.map_err(err)?;
        work.push((d, nbd, size, extents));
    }
    let bytes: u64 = work.iter().flat_map(|w| &w.3).filter(|e| e.2).map(|e| e.1).sum();
    if opts.print_only {
        return Ok(Outcome::Estimate { bytes });
    }
    if let Some(t) = opts.threshold
        && matches!(plan.level, Level::Inc | Level::Diff)
        && bytes < t
    {
        return Ok(Outcome::BelowThreshold { bytes });
    }
    let run = Run { plan, folder, opts, progress };
    let results = std::sync::Mutex::new(Vec::new());
    let queue = std::sync::Mutex::new(work);
    std::thread::scope(|s| {
        for _ in 0..opts.workers.max(1) {
            s.spawn(|| {
                loop {
                    let Some((d, mut nbd, size, extents)) = queue.lock().expect("no panics while held").pop()
                    else {
                        break;
                    };
                    let r = save_one(d, &mut nbd, size, &extents, &run);
                    results.lock().expect("no panics while held").push(r);
                }
            });
        }
    });
    // Only when every disk is saved do the files take their final names: a run that
    // failed on one disk leaves none that pass for a complete restore point.
    let saved =
        results.into_inner().expect("no panics while held").into_iter().collect::<Result<Vec<_>>>()?;
    let mut disks = Vec::with_capacity(saved.len());
    for (summary, pending) in saved {
        if let Some(p) = pending {
            p.commit().map_err(|source| BackupError::Disk { disk: summary.disk.clone(), source })?;
        }
        disks.push(summary);
    }
    disks.sort_by(|a, b| a.disk.cmp(&b.disk));
    Ok(Outcome::Saved { level: plan.level, disks })
}

/// What every disk of a run is saved with.
struct Run<'a> {
    plan: &'a Plan,
    folder: &'a Folder,
    opts: &'a BackupOptions,
    progress: Progress<'a>,
}

/// Saves one disk: into a `.partial` file, left for [`disk::Pending::commit`], or (`-o -`)
/// straight into the zip, data file and `.chksum` member.
fn save_one(
    d: &DomDisk,
    nbd: &mut Nbd,
    size: u64,
    extents: &[Extent],
    run: &Run<'_>,
) -> Result<(DiskSummary, Option<disk::Pending>)> {
    let Run { plan, folder, opts, progress } = *run;
    let started = Instant::now();
    let raw_disk = d.format == "raw";
    let raw_image = raw_disk || (opts.raw_output && matches!(plan.level, Level::Full | Level::Copy));
    let name = plan.file_name(&d.target, raw_disk);
    let file = match &folder.zip {
        Some(_) => PathBuf::from(format!("-:{name}")),
        None => folder.out.join(&name),
    };
    let done = |n| progress(&d.target, n);
    let err = |source| BackupError::Disk { disk: d.target.clone(), source };
    let pending = if raw_image {
        // run() refuses raw output to a zip, as upstream does.
        Some(write_raw(nbd, extents, size, &file, &done).map_err(err)?)
    } else {
        let meta = StreamMeta {
            virtual_size: size,
            data_size: 0,
            date: iso_now(),
            disk_name: d.target.clone(),
            disk_format: Some(d.format.clone()),
            checkpoint_name: plan.meta_cpt.clone(),
            parent_checkpoint: plan.parent.clone(),
            incremental: matches!(plan.level, Level::Inc | Level::Diff),
            compressed: opts.compress,
            stream_version: 2,
        };
        match &folder.zip {
            None => Some(write_stream(nbd, extents, meta, &file, &done).map_err(err)?),
            Some(zip) => {
                let checksum = zip.member(&name, |w| {
                    stream_into(nbd, extents, meta, w, &file, &done).map(|(_, sum, _)| sum).map_err(err)
                })?;
                zip.add_bytes(&format!("{name}.chksum"), checksum.to_string().as_bytes())?;
                None
            }
        }
    };
    let data_bytes = match &pending {
        Some(p) => p.data_bytes,
        None => extents.iter().filter(|e| e.2).map(|e| e.1).sum(),
    };
    let zero_bytes = extents.iter().filter(|e| !e.2).map(|e| e.1).sum();
    let summary = DiskSummary {
        disk: d.target.clone(),
        file,
        virtual_size: size,
        data_bytes,
        zero_bytes,
        elapsed: started.elapsed(),
    };
    Ok((summary, pending))
}

/// What the side files need from the hypervisor: each qcow disk's `qemu-img info` output
/// and the boot files' bytes. [`HostParts::read`] runs while the disks are saved (on a
/// remote hypervisor each part is an ssh session, 0.4 to 0.5 s), [`save_side_files`]
/// writes them after.
pub struct HostParts {
    host: String,
    /// `(target, JSON)`: `None` when `qemu-img info` failed (warned already).
    qcow: Vec<(String, Option<Vec<u8>>)>,
    boot: Vec<(Named, Result<Vec<u8>, HostError>)>,
}

impl HostParts {
    /// Reads every part at once. Called once the job began: the image is the one the
    /// backup reads, its new checkpoint's bitmap made (upstream runs `qemu-img info` after
    /// the data moved; nothing it prints depends on the data read).
    pub fn read(host: &dyn Host, xml: &str, disks: &[DomDisk]) -> HostParts {
        std::thread::scope(|s| {
            let jobs: Vec<_> = disks
                .iter()
                .filter(|d| d.format.starts_with("qcow"))
                .filter_map(|d| Some((d, d.source.as_ref()?)))
                .map(|(d, src)| (d, s.spawn(move || qemu_img_info(host, d, src))))
                .collect();
            let boot = bootfiles::read(host, xml);
            let qcow = jobs
                .into_iter()
                .map(|(d, j)| (d.target.clone(), j.join().unwrap_or_else(|p| std::panic::resume_unwind(p))))
                .collect();
            HostParts { host: host.name(), qcow, boot }
        })
    }
}

/// Runs `save` (the disks' saving) while [`HostParts::read`] reads the side files' parts
/// in another thread; with `-p` nothing is read (nothing is written).
pub fn while_reading_parts<T: Send>(
    host: &dyn Host,
    xml: &str,
    disks: &[DomDisk],
    opts: &BackupOptions,
    save: impl FnOnce() -> T + Send,
) -> (T, Option<HostParts>) {
    std::thread::scope(|s| {
        let parts = (!opts.print_only).then(|| s.spawn(|| HostParts::read(host, xml, disks)));
        let saved = save();
        (saved, parts.map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e))))
    })
}

/// `qemu-img info --output json --force-share SRC` on the host, as upstream runs it.
fn qemu_img_info(host: &dyn Host, d: &DomDisk, src: &str) -> Option<Vec<u8>> {
    match host.command("qemu-img").args(["info", "--output", "json", "--force-share", src]).output() {
        Ok(o) if o.status.success() => Some(o.stdout),
        _ => {
            warn!("{}: qemu-img info on {} failed; no qcow.json saved", d.target, host.name());
            None
        }
    }
}

/// `vmconfig.<ident>.xml`, `<disk>.<ident>.qcow.json`, the boot files and (for a domain
/// that starts with its host) `autostart.<ident>`, as upstream writes them (with `-o -`,
/// in the current folder and in the zip). Only after the disks were saved.
pub fn save_side_files(
    folder: &Folder,
    xml: &str,
    parts: HostParts,
    ident: &str,
    autostart: bool,
) -> Result<()> {
    let out = &folder.out;
    let mut written = Vec::new();
    let cfg = out.join(format!("vmconfig.{ident}.xml"));
    match std::fs::write(&cfg, xml) {
        Ok(()) => written.push(cfg),
        Err(e) => warn!("{}: {e}", cfg.display()),
    }
    for (target, json) in parts.qcow {
        let Some(json) = json else { continue };
        let path = out.join(format!("{target}.{ident}.qcow.json"));
        match std::fs::write(&path, json) {
            Ok(()) => written.push(path),
            Err(e) => warn!("{}: {e}", path.display()),
        }
    }
    written.extend(
        bootfiles::save(&parts.host, out, parts.boot, ident, autostart).into_iter().map(|n| out.join(n)),
    );
    if let Some(zip) = &folder.zip {
        for path in written {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            zip.add_file(&name, &path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(level: Level, meta_cpt: &str, parent: &str, ident: &str) -> Plan {
        Plan {
            level,
            kind: Extents::Allocation,
            meta_cpt: meta_cpt.into(),
            parent: parent.into(),
            ident: ident.into(),
        }
    }

    #[test]
    fn data_files_are_named_as_upstream_names_them() {
        let full = plan(Level::Full, "virtnbdbackup.0", "", "virtnbdbackup.0");
        assert_eq!(full.file_name("vda", false), "vda.full.data");
        assert_eq!(full.file_name("vda", true), "vda.copy.data", "a raw disk is always a copy");
        assert_eq!(plan(Level::Copy, "virtnbdbackup.0", "", "copy").file_name("sda", false), "sda.copy.data");
        let inc = plan(Level::Inc, "virtnbdbackup.2", "virtnbdbackup.1", "virtnbdbackup.2");
        assert_eq!(inc.file_name("vda", false), "vda.inc.virtnbdbackup.2.data");
        let diff = plan(Level::Diff, "virtnbdbackup.2", "virtnbdbackup.1", "1700000000");
        assert_eq!(diff.file_name("vda", false), "vda.diff.1700000000.data");
        // Offline: named after the parent and the time, never the online inc's name.
        let off = plan(Level::Inc, "virtnbdbackup.1", "virtnbdbackup.1", "1700000000");
        assert_eq!(off.file_name("vdb", false), "vdb.inc.virtnbdbackup.1.1700000000.data");
    }

    #[test]
    fn dates_read_as_upstreams_isoformat() {
        let d = iso_now();
        assert!(chrono::NaiveDateTime::parse_from_str(&d, "%Y-%m-%dT%H:%M:%S%.f").is_ok(), "{d}");
        assert!(matches!(d.len(), 19 | 26), "{d}");
    }
}
