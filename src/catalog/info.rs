//! `info.json` of a restore point: what it is made of, in one `cat`.
//!
//! For each disk, the data files that make the point in the order they apply (the full
//! or copy first, then each incremental, then the differential if any), each with its
//! name relative to the set folder, date, size, compression, checkpoint, parent
//! checkpoint and level; and the status of each disk and of the whole point, with the
//! reason when it is not complete. It answers what users of `virtnbdrestore --until`
//! keep asking: which files does this point need, and are they all there.
//!
//! Everything comes from the catalog already built (no file is read), so the document
//! is the same on every mount of the same files. Keys are in a fixed order (the field
//! order of the structs below) and always present (`null` when there is nothing to say),
//! so scripts can rely on them. Dates are RFC 3339 in the local time zone, as the mount
//! shows them.

use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use super::naming::{Level, parse_stream_name};
use super::set::stream_date;
use super::{PointKey, RestorePoint, Status};
use crate::chain::{Format, Layer};

/// The whole document.
#[derive(Debug, Serialize)]
pub struct PointInfo {
    pub domain: String,
    pub point: String,
    /// `checkpoint`, `differential`, `offline incremental` or `copy`.
    pub kind: &'static str,
    pub date: String,
    /// The set folder the files below are named relative to.
    pub set: String,
    /// The saved domain XML of this point, relative to the set folder.
    pub vmconfig: Option<String>,
    /// The boot files saved with it (`<os>` element and file, relative to the set folder).
    pub boot_files: Vec<BootFileInfo>,
    pub status: &'static str,
    pub reason: Option<String>,
    pub disks: Vec<DiskInfo>,
}

/// One boot file of the point.
#[derive(Debug, Serialize)]
pub struct BootFileInfo {
    /// `loader`, `nvram`, `kernel` or `initrd`.
    pub element: String,
    /// Its path on the hypervisor, as the domain XML names it.
    pub path: String,
    pub file: String,
}

/// One disk of the point.
#[derive(Debug, Serialize)]
pub struct DiskInfo {
    pub disk: String,
    /// Bytes of the disk image; `null` when the point is broken for this disk.
    pub virtual_size: Option<u64>,
    pub status: &'static str,
    pub reason: Option<String>,
    /// In the order they apply; empty when the disk is broken (the reason says why).
    pub streams: Vec<StreamInfo>,
}

/// One data file.
#[derive(Debug, Serialize)]
pub struct StreamInfo {
    pub file: String,
    /// `full`, `inc`, `diff`, `copy`, or `raw` for a plain raw image.
    pub level: &'static str,
    pub date: String,
    /// Bytes of the file.
    pub size: u64,
    /// Bytes of disk data it holds (zeroed ranges not counted).
    pub data_bytes: u64,
    /// `none`, or `lz4` with its level (`lz4-2`).
    pub compression: String,
    pub checkpoint: Option<String>,
    pub parent_checkpoint: Option<String>,
    /// Where and why the file stops making sense, when it is damaged.
    pub damage: Option<String>,
}

impl PointInfo {
    /// The document: pretty-printed JSON with a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Only strings, numbers and nulls: serializing cannot fail.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// The `info.json` of `point`, a restore point of `domain`.
pub fn point_info(domain: &str, point: &RestorePoint) -> PointInfo {
    let (status, reason) = status_fields(&point.status());
    PointInfo {
        domain: domain.to_owned(),
        point: point.name.clone(),
        kind: match point.key {
            PointKey::Checkpoint(_) => "checkpoint",
            PointKey::Derived { offline: false, .. } => "differential",
            PointKey::Derived { offline: true, .. } => "offline incremental",
            PointKey::Copy { .. } => "copy",
        },
        date: rfc3339(point.date),
        set: point.set_dir.display().to_string(),
        vmconfig: point.vmconfig.as_ref().map(|p| relative(&p.shown(), &point.set_dir)),
        boot_files: point
            .boot_files
            .iter()
            .map(|b| BootFileInfo {
                element: b.named.element.clone(),
                path: b.named.path.clone(),
                file: relative(&b.file.shown(), &point.set_dir),
            })
            .collect(),
        status,
        reason,
        disks: point
            .disks
            .iter()
            .map(|d| {
                let (status, reason) = status_fields(&d.status);
                DiskInfo {
                    disk: d.disk.clone(),
                    virtual_size: d.layers.last().map(|l| l.index.meta.virtual_size),
                    status,
                    reason,
                    streams: d.layers.iter().map(|l| stream_info(l, &point.set_dir)).collect(),
                }
            })
            .collect(),
    }
}

fn stream_info(layer: &Layer, set_dir: &Path) -> StreamInfo {
    let index = &layer.index;
    let file = relative(&index.path, set_dir);
    let name = index.path.file_name().and_then(|n| parse_stream_name(&n.to_string_lossy()));
    let level = match (index.format, name.map(|n| n.level)) {
        (Format::Raw, _) => "raw",
        (_, Some(Level::Full)) => "full",
        (_, Some(Level::Inc(_))) => "inc",
        (_, Some(Level::Diff(_))) => "diff",
        // The catalog only keeps files whose name parses; a copy is the one left.
        (_, Some(Level::Copy) | None) => "copy",
    };
    let meta = &index.meta;
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    StreamInfo {
        file,
        level,
        date: rfc3339(stream_date(Some(index), index.file.modified())),
        size: index.file_len,
        data_bytes: index.data_bytes(),
        compression: meta.compressed.map_or_else(|| "none".into(), |l| format!("lz4-{l}")),
        checkpoint: non_empty(&meta.checkpoint_name),
        parent_checkpoint: non_empty(&meta.parent_checkpoint),
        damage: index.damage.as_ref().map(|d| d.error.to_string()),
    }
}

fn status_fields(status: &Status) -> (&'static str, Option<String>) {
    match status {
        Status::Complete => ("complete", None),
        Status::Damaged(r) => ("damaged", Some(r.clone())),
        Status::Broken(r) => ("broken", Some(r.clone())),
    }
}

/// `path` relative to the set folder (files of a set are always inside it).
fn relative(path: &Path, set_dir: &Path) -> String {
    path.strip_prefix(set_dir).unwrap_or(path).display().to_string()
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Local>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use serde_json::{Value, json};

    fn infos(src: &Path) -> Vec<Value> {
        let cat = Catalog::discover(src).expect("catalog");
        let dom = cat.domain(None).expect("one domain");
        dom.points
            .iter()
            .map(|p| serde_json::from_slice(&point_info(&dom.name, p).to_bytes()).expect("valid JSON"))
            .collect()
    }

    fn files(v: &Value, disk: usize) -> Vec<&str> {
        v["disks"][disk]["streams"]
            .as_array()
            .expect("streams")
            .iter()
            .map(|s| s["file"].as_str().expect("file"))
            .collect()
    }

    #[test]
    fn sample_set_points_list_their_files_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::sample::write_sample(dir.path()).expect("sample");
        let all = infos(dir.path());
        let names: Vec<&str> = all.iter().map(|v| v["point"].as_str().expect("point")).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        let inc2 = all.iter().find(|v| v["point"] == "virtnbdbackup.2").expect("inc 2");
        assert_eq!(inc2["kind"], "checkpoint");
        assert_eq!(inc2["status"], "complete");
        assert_eq!(inc2["reason"], Value::Null);
        assert_eq!(inc2["disks"][0]["disk"], "sda");
        assert_eq!(inc2["disks"][0]["virtual_size"], 64 << 20);
        assert_eq!(
            files(inc2, 1),
            ["sdb.full.data", "sdb.inc.virtnbdbackup.1.data", "sdb.inc.virtnbdbackup.2.data"]
        );
        let s = &inc2["disks"][1]["streams"][1];
        let size = std::fs::metadata(dir.path().join("sdb.inc.virtnbdbackup.1.data")).expect("stat").len();
        assert_eq!(s["size"], size);
        assert_eq!(s["level"], "inc");
        assert_eq!(s["compression"], "lz4-2", "sdb is the compressed disk: {s}");
        assert_eq!(s["checkpoint"], "virtnbdbackup.1");
        assert_eq!(s["parent_checkpoint"], "virtnbdbackup.0");
        assert_eq!(s["data_bytes"], 64 << 10);
        assert!(s["date"].as_str().expect("date").starts_with("2026-06-02T08:00:00"), "{s}");
        assert_eq!(inc2["disks"][0]["streams"][0]["compression"], "none");
        assert_eq!(inc2["disks"][0]["streams"][0]["parent_checkpoint"], Value::Null);
        let diff = all.iter().find(|v| v["kind"] == "differential").expect("diff");
        assert_eq!(files(diff, 0).last(), Some(&"sda.diff.1780560000.data"));
        assert_eq!(diff["disks"][0]["streams"][3]["level"], "diff");
        // Keys always present, in a fixed order.
        let keys: Vec<&String> = inc2.as_object().expect("object").keys().collect();
        assert_eq!(
            keys,
            ["domain", "point", "kind", "date", "set", "vmconfig", "boot_files", "status", "reason", "disks"]
        );
        assert_eq!(inc2["domain"], "sample-vm");
    }

    #[test]
    fn missing_and_damaged_files_show_in_the_status() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::sample::write_sample(dir.path()).expect("sample");
        std::fs::remove_file(dir.path().join("sda.inc.virtnbdbackup.1.data")).expect("rm");
        let f = dir.path().join("sdb.inc.virtnbdbackup.2.data");
        let len = std::fs::metadata(&f).expect("stat").len();
        std::fs::OpenOptions::new().write(true).open(&f).and_then(|f| f.set_len(len - 100)).expect("cut");
        let all = infos(dir.path());
        let by_name = |n: &str| all.iter().find(|v| v["point"] == n).unwrap_or_else(|| panic!("{n}"));
        let inc2 = by_name("virtnbdbackup.2");
        assert_eq!(inc2["status"], "broken");
        let reason = inc2["reason"].as_str().expect("reason");
        assert!(reason.starts_with("sda: ") && reason.contains("virtnbdbackup.0"), "{reason}");
        assert_eq!(inc2["disks"][0]["status"], "broken");
        assert_eq!(inc2["disks"][0]["streams"], json!([]));
        assert_eq!(inc2["disks"][0]["virtual_size"], Value::Null);
        assert_eq!(inc2["disks"][1]["status"], "damaged");
        let damage = inc2["disks"][1]["streams"][2]["damage"].as_str().expect("damage");
        assert!(damage.contains("sdb.inc.virtnbdbackup.2.data"), "{damage}");
        assert_eq!(by_name("virtnbdbackup.0")["status"], "complete");
    }
}
