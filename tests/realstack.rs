//! Compatibility with the real tool: a corpus of backups taken by Debian's virtnbdbackup
//! from a live libvirt domain (contrib/realstack/make-corpus.sh), with each disk's true
//! contents recorded after every backup. Every image in the vmback mount must equal its
//! truth, byte for byte.
//!
//! Runs when VMBACK_CORPUS names a corpus folder (contrib/test.sh builds one and sets
//! it); prints "skipping" otherwise.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn corpus() -> Option<PathBuf> {
    match std::env::var_os("VMBACK_CORPUS") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipping: VMBACK_CORPUS is not set (contrib/test.sh sets it)");
            None
        }
    }
}

struct Row {
    set: String,
    disk: String,
    data_file: String,
    truth: PathBuf,
}

fn manifest(corpus: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(corpus.join("manifest.tsv")).expect("manifest.tsv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split('\t').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("column {name}"));
    let (set, disk, data, truth) = (col("set"), col("disk"), col("data_file"), col("truth"));
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Row {
                set: f[set].into(),
                disk: f[disk].into(),
                data_file: f[data].into(),
                truth: corpus.join(f[truth]),
            }
        })
        .collect()
}

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

struct Mount {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
        let _ = Command::new("fusermount3").arg("-uz").arg(self.dir.path()).stderr(Stdio::null()).status();
    }
}

fn mount(source: &Path) -> Mount {
    let dir = tempfile::tempdir().expect("tempdir");
    let child = Command::new(env!("CARGO_BIN_EXE_vmback"))
        .arg("mount")
        .arg(source)
        .arg(dir.path())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vmback mount");
    let m = Mount { child, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if Command::new("mountpoint").arg("-q").arg(m.dir.path()).status().is_ok_and(|s| s.success()) {
            return m;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("vmback mount did not come up");
}

/// Compares two files in 1 MiB chunks; returns the first differing offset.
fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let (mut fa, mut fb) = (File::open(a).expect("open a"), File::open(b).expect("open b"));
    let la = fa.metadata().expect("stat").len();
    let lb = fb.metadata().expect("stat").len();
    if la != lb {
        return Some(la.min(lb));
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let n = fa.read(&mut ba).expect("read a");
        if n == 0 {
            return None;
        }
        fb.read_exact(&mut bb[..n]).expect("read b");
        if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
            return Some(off + i as u64);
        }
        off += n as u64;
    }
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
