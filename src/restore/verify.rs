//! `vmback verify`: reads every stream file of a SOURCE completely and reports each
//! damaged range with the file, the byte offset, the disk range and the restore points it
//! affects.
//!
//! Checks, per file: the frame walk of the scan (headers, CRLFs, trailer, `dataSize`),
//! every payload read back through the same reader the mount uses (so every lz4 block and
//! content checksum is checked), and the `.chksum` Adler-32 sidecar of newer upstream
//! versions where one exists. Per restore point: the chain links (a broken chain is a
//! finding too). The cache has no budget (it keeps only its newest frame), so memory stays
//! bounded by about one lz4 frame per thread.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::cache::ReadCache;
use crate::catalog::{Catalog, Status};
use crate::chain::io::read_full;
use crate::chain::scan::Stored;
use crate::chain::{ImageReader, Layer};
use crate::source::SourcePath;

/// Largest `.chksum` sidecar read: an Adler-32 in decimal is ten digits at most; 4 KiB
/// leaves room for whitespace and stops a stray large file from being read.
const MAX_SIDECAR: u64 = 4 << 10;

/// Bytes read per step of a plain payload.
const STEP: u64 = 4 << 20;

/// One problem found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub file: PathBuf,
    /// Byte offset in `file`, where the problem is known to that precision.
    pub offset: Option<u64>,
    pub problem: String,
    /// The disk range whose bytes cannot be trusted, if the problem has one.
    pub disk_range: Option<Range<u64>>,
    /// Restore points (`domain/point`) that read this file.
    pub points: Vec<String>,
}

/// Everything `verify` found.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub files: usize,
    pub data_bytes: u64,
    pub findings: Vec<Finding>,
}

/// Verifies every file and chain of `catalog`, using `threads` workers.
pub fn verify(catalog: &Catalog, threads: usize) -> VerifyReport {
    let mut layers: BTreeMap<u32, (Layer, Vec<String>)> = BTreeMap::new();
    let mut report = VerifyReport::default();
    for d in &catalog.domains {
        for p in &d.points {
            let name = format!("{}/{}", d.name, p.name);
            if let Status::Broken(reason) = p.status() {
                report.findings.push(Finding {
                    file: p.set_dir.clone(),
                    offset: None,
                    problem: format!("broken chain: {reason}"),
                    disk_range: None,
                    points: vec![name.clone()],
                });
            }
            for l in p.disks.iter().flat_map(|disk| &disk.layers) {
                layers.entry(l.id).or_insert_with(|| (l.clone(), Vec::new())).1.push(name.clone());
            }
        }
    }
    report.files = layers.len();
    let work: Vec<_> = layers.into_values().collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let found = Mutex::new(Vec::new());
    let bytes = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                while let Some((layer, points)) =
                    work.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    let (f, n) = verify_file(layer, catalog.file_of(layer), points);
                    bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    found.lock().expect("no panics while held").extend(f);
                }
            });
        }
    });
    report.data_bytes = bytes.into_inner();
    report.findings.extend(found.into_inner().expect("no panics while held"));
    report.findings.sort_by(|a, b| (&a.file, a.offset).cmp(&(&b.file, b.offset)));
    report
}

/// The findings of one file, and the data bytes read.
fn verify_file(layer: &Layer, file: Option<&SourcePath>, points: &[String]) -> (Vec<Finding>, u64) {
    let index = &layer.index;
    let finding = |offset, problem: String, disk_range| Finding {
        file: index.path.clone(),
        offset,
        problem,
        disk_range,
        points: points.to_vec(),
    };
    let mut out = Vec::new();
    if let Some(d) = &index.damage {
        let range = (d.from < index.meta.virtual_size).then(|| d.from..index.meta.virtual_size);
        out.push(finding(Some(d.error.offset()), d.error.to_string(), range));
    }
    // A one-layer reader reads this file's extents and nothing else.
    let reader = ImageReader::new(vec![layer.clone()], Arc::new(ReadCache::new(0)));
    let mut read = 0u64;
    let mut buf = Vec::new();
    for ext in &index.extents {
        let ranges: Vec<Range<u64>> = match &ext.stored {
            Stored::Zero => continue,
            Stored::Lz4(frames) => {
                frames.iter().map(|f| ext.start + f.extent_off..ext.start + f.extent_off + f.len).collect()
            }
            Stored::Plain { .. } => {
                (ext.start..ext.end()).step_by(STEP as usize).map(|s| s..(s + STEP).min(ext.end())).collect()
            }
        };
        for r in ranges {
            buf.resize((r.end - r.start) as usize, 0);
            match reader.read_at(&mut buf, r.start) {
                Ok(_) => read += r.end - r.start,
                Err(e) => {
                    let (_, offset) = e.location();
                    out.push(finding(offset, crate::error_chain(&e), Some(r)));
                }
            }
        }
    }
    if let Some(problem) = file.and_then(|f| check_sidecar(f, &layer.index.file)) {
        out.push(finding(None, problem, None));
    }
    (out, read)
}

/// Compares the `.chksum` sidecar (Adler-32 of the whole file, decimal) when there is
/// one; upstream writes the text `None` in some modes, which means "no checksum".
fn check_sidecar(file: &SourcePath, data: &Arc<dyn crate::source::ReadAt>) -> Option<String> {
    let mut side = file.path.as_os_str().to_owned();
    side.push(".chksum");
    let text = file.source.read_whole(side.as_ref(), MAX_SIDECAR).ok()?;
    let want: u32 = std::str::from_utf8(&text).ok()?.trim().parse().ok()?;
    let mut adler = simd_adler32::Adler32::new();
    // Read in 1 MiB steps: few calls, and a small buffer per verify thread.
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        match read_full(&**data, &mut buf, at) {
            Ok(0) => break,
            Ok(n) => {
                adler.write(&buf[..n]);
                at += n as u64;
            }
            Err(e) => return Some(format!("cannot read for the checksum: {e}")),
        }
    }
    let got = adler.finish();
    (got != want).then(|| format!("Adler-32 is {got}, the .chksum sidecar says {want}"))
}
