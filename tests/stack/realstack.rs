//! Compatibility with the real tool: a corpus of backups taken by Debian's virtnbdbackup
//! from a live libvirt domain (contrib/realstack/make-corpus.sh), with each disk's true
//! contents recorded after every backup. Every image in the vmback mount must equal its
//! truth, byte for byte.
//!
//! Runs when VMBACK_CORPUS names a corpus folder (contrib/test.sh builds one and sets
//! it); prints "skipping" otherwise.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::compare::first_difference;
use crate::common::corpus::{Row, corpus, manifest};
use crate::common::quick_mount::{Mount, mount_on};
use serde_json::Value;

/// The `<domain>/<point>` whose chain for `row.disk` ends in `row.data_file` in `row.set`.
fn point_of(ls: &Value, corpus: &Path, row: &Row) -> Option<String> {
    let set_dir = corpus.join(&row.set);
    for d in ls["domains"].as_array()? {
        for p in d["points"].as_array()? {
            if Path::new(p["set"].as_str()?) != set_dir {
                continue;
            }
            for disk in p["disks"].as_array()? {
                let files = disk["files"].as_array()?;
                if disk["disk"] == row.disk.as_str() && files.last()? == row.data_file.as_str() {
                    return Some(format!("{}/{}", d["name"].as_str()?, p["name"].as_str()?));
                }
            }
        }
    }
    None
}

fn mount(source: &Path) -> Mount {
    mount_on(source, tempfile::tempdir().expect("tempdir"), Stdio::inherit())
}

#[test]
fn every_image_of_a_real_virtnbdbackup_corpus_equals_its_truth() {
    let Some(corpus) = corpus() else { return };
    let sets = corpus.join("sets");
    let out =
        Command::new(env!("CARGO_BIN_EXE_vmback")).arg("ls").arg("--json").arg(&sets).output().expect("ls");
    assert!(out.status.success(), "vmback ls failed: {}", String::from_utf8_lossy(&out.stderr));
    let ls: Value = serde_json::from_slice(&out.stdout).expect("ls --json");
    for d in ls["domains"].as_array().expect("domains") {
        for p in d["points"].as_array().expect("points") {
            assert_eq!(p["status"], "complete", "{}/{}: {}", d["name"], p["name"], p["reason"]);
        }
    }
    let rows = manifest(&corpus);
    assert!(rows.len() >= 10, "corpus too small: {} rows", rows.len());
    let m = mount(&sets);
    let mut checked = 0;
    for row in &rows {
        let point = point_of(&ls, &corpus, row)
            .unwrap_or_else(|| panic!("no restore point ends in {}/{}", row.set, row.data_file));
        let image = m.dir.path().join(&point).join(format!("{}.raw", row.disk));
        assert_eq!(
            first_difference(&image, &row.truth),
            None,
            "{} differs from {} ({}/{})",
            image.display(),
            row.truth.display(),
            row.set,
            row.data_file
        );
        checked += 1;
    }
    eprintln!("{checked} images equal their truth");
}
