//! A small synthetic backup set, written with our own stream writer, so vmback can be
//! tried (and its mount shown) on a machine with no VM and no backups.
//!
//! Domain `sample-vm`, disks `sda` (64 MiB, plain) and `sdb` (16 MiB, lz4): a full, two
//! incrementals and a differential, laid out exactly as virtnbdbackup lays out a set.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::chain::{MAX_REQUEST, StreamMeta, StreamWriter};

const MIB: u64 = 1 << 20;

/// One backup run of one disk: `(level file part, checkpoint, parent, incremental)`.
struct Run {
    file: String,
    checkpoint: &'static str,
    parent: &'static str,
    date: &'static str,
    /// `(offset, length, text)`: data extents filled with the repeated text.
    writes: Vec<(u64, u64, String)>,
}

/// Writes the sample set into `dir` (created if missing; must not hold a set already).
/// Each data file is written as `.partial` and renamed when complete, as upstream does.
pub fn write_sample(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir.join("checkpoints"))?;
    for (path, bytes) in sample_files()? {
        let to = dir.join(&path);
        if path.extension().is_some_and(|e| e == "data") {
            let partial = dir.join(format!("{}.partial", path.display()));
            let mut file = File::create(&partial)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(partial, to)?;
        } else {
            fs::write(to, bytes)?;
        }
    }
    Ok(())
}

/// The files of the sample set, by path relative to the set's folder, in the order
/// virtnbdbackup writes them.
pub fn sample_files() -> io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = Vec::new();
    let runs = |disk: &str| -> Vec<Run> {
        let w = |off: u64, len: u64, what: &str| (off, len, format!("{disk} {what} "));
        vec![
            Run {
                file: format!("{disk}.full.data"),
                checkpoint: "virtnbdbackup.0",
                parent: "",
                date: "2026-06-01T08:00:00.000001",
                writes: vec![w(0, MIB, "boot sector and OS"), w(8 * MIB, 3 * MIB, "system files")],
            },
            Run {
                file: format!("{disk}.inc.virtnbdbackup.1.data"),
                checkpoint: "virtnbdbackup.1",
                parent: "virtnbdbackup.0",
                date: "2026-06-02T08:00:00.000001",
                writes: vec![w(9 * MIB, 64 << 10, "monday's changes")],
            },
            Run {
                file: format!("{disk}.inc.virtnbdbackup.2.data"),
                checkpoint: "virtnbdbackup.2",
                parent: "virtnbdbackup.1",
                date: "2026-06-03T08:00:00.000001",
                writes: vec![w(2 * MIB, 512 << 10, "tuesday's changes")],
            },
            Run {
                file: format!("{disk}.diff.1780560000.data"),
                checkpoint: "virtnbdbackup.3",
                parent: "virtnbdbackup.2",
                date: "2026-06-04T08:00:00.000001",
                writes: vec![w(4 * MIB, 128 << 10, "wednesday's diff")],
            },
        ]
    };
    for (disk, size, compressed) in [("sda", 64 * MIB, None), ("sdb", 16 * MIB, Some(2))] {
        for (i, run) in runs(disk).into_iter().enumerate() {
            files.push((PathBuf::from(&run.file), stream(disk, size, compressed, i == 0, &run)?));
        }
    }
    let cpt = r#"["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]"#;
    files.push(("sample-vm.cpt".into(), cpt.into()));
    for ident in ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2", "1780560000"] {
        let xml = format!(
            "<domain type='kvm'>\n  <name>sample-vm</name>\n  <memory unit='KiB'>65536</memory>\n  <description>vmback sample, backup {ident}</description>\n</domain>\n"
        );
        files.push((format!("vmconfig.{ident}.xml").into(), xml.into_bytes()));
    }
    for cpt in ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"] {
        let xml = format!("<domaincheckpoint>\n  <name>{cpt}</name>\n</domaincheckpoint>\n");
        files.push((Path::new("checkpoints").join(format!("{cpt}.xml")), xml.into_bytes()));
    }
    Ok(files)
}

/// The stream file of one run.
fn stream(disk: &str, size: u64, compressed: Option<u32>, full: bool, run: &Run) -> io::Result<Vec<u8>> {
    let meta = StreamMeta {
        compressed,
        ..StreamMeta::full(disk, size, run.writes.iter().map(|w| w.1).sum())
            .point(run.checkpoint, run.parent, !full)
            .dated(run.date)
    };
    let mut w = StreamWriter::new(Vec::new(), &meta, MAX_REQUEST)?;
    let mut pos = 0;
    for (off, len, text) in &run.writes {
        if full && *off > pos {
            w.zero(pos, off - pos)?;
        }
        let bytes: Vec<u8> = text.bytes().cycle().take(*len as usize).collect();
        w.data(*off, &bytes)?;
        pos = off + len;
    }
    if full && pos < size {
        w.zero(pos, size - pos)?;
    }
    w.finish()
}
