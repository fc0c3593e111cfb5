//! `vmback ls`: the catalog as a table or as JSON. A SOURCE holding no backup says so,
//! with the catalog's warnings as the reasons files were not taken.

use std::collections::HashMap;
use std::path::Path;

use serde_json::json;

use crate::cache::ReadCache;
use crate::catalog::{Catalog, RestorePoint, Status};
use crate::chain::ImageReader;

/// `(virtual size, stored size)` of every disk of every point, keyed by the chain's
/// stream file ids; (0, 0) for a broken one.
struct Sizes(HashMap<Vec<u32>, (u64, u64)>);

impl Sizes {
    fn of(catalog: &Catalog) -> Sizes {
        // Only extent maps are built here; nothing is read, so the cache stays empty.
        let cache = std::sync::Arc::new(ReadCache::new(0));
        let chains: Vec<_> = catalog
            .domains
            .iter()
            .flat_map(|d| &d.points)
            .flat_map(|p| &p.disks)
            .filter(|d| !d.layers.is_empty())
            .map(|d| d.layers.clone())
            .collect();
        let readers = ImageReader::many(&chains, &cache);
        Sizes(
            chains
                .iter()
                .zip(readers)
                .map(|(c, r)| (c.iter().map(|l| l.id).collect(), (r.size(), r.map().data_bytes())))
                .collect(),
        )
    }

    fn disks(&self, point: &RestorePoint) -> Vec<(u64, u64)> {
        point
            .disks
            .iter()
            .map(|d| {
                let ids: Vec<u32> = d.layers.iter().map(|l| l.id).collect();
                self.0.get(&ids).copied().unwrap_or((0, 0))
            })
            .collect()
    }
}

pub fn status_words(s: &Status) -> (&'static str, Option<&str>) {
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

pub fn ls_json(catalog: &Catalog) -> serde_json::Value {
    let sizes = Sizes::of(catalog);
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
                        .zip(sizes.disks(p))
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
                        "vmconfig": p.vmconfig.as_ref().map(|c| c.shown()),
                        "disks": disks,
                    })
                })
                .collect();
            json!({ "name": d.name, "latest": d.latest().map(|p| &p.name), "points": points })
        })
        .collect();
    json!({ "domains": domains, "warnings": catalog.warnings })
}

/// A point's date as people write it, in local time: `2026-12-03 11:21:24`.
fn shown_date(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Local>::from(t).format("%Y-%m-%d %H:%M:%S").to_string()
}

pub fn ls_text(catalog: &Catalog, source: &Path) -> String {
    let sizes = Sizes::of(catalog);
    let mut out = String::new();
    if catalog.domains.is_empty() {
        let why = if catalog.warnings.is_empty() {
            ": it holds no stream file (*.data) of virtnbdbackup or vmback"
        } else {
            "; files not taken:"
        };
        out.push_str(&format!("no backup found in {}{why}\n", source.display()));
    }
    for d in &catalog.domains {
        out.push_str(&format!("{}\n", d.name));
        for p in &d.points {
            let st = p.status();
            let (status, reason) = status_words(&st);
            out.push_str(&format!("  {:<40} {}  {status}", p.name, shown_date(p.date)));
            if let Some(r) = reason {
                out.push_str(&format!(": {r}"));
            }
            out.push('\n');
            for (disk, (virt, stored)) in p.disks.iter().zip(sizes.disks(p)) {
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
pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}
