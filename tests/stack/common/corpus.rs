//! The corpus of real virtnbdbackup sets (contrib/realstack/make-corpus.sh) and its
//! manifest, for the tests that run when VMBACK_CORPUS is set.

use std::path::{Path, PathBuf};

/// The corpus folder, or `None` (after saying so) when VMBACK_CORPUS is not set.
pub fn corpus() -> Option<PathBuf> {
    match std::env::var_os("VMBACK_CORPUS") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipping: VMBACK_CORPUS is not set (contrib/test.sh sets it)");
            None
        }
    }
}

/// One manifest row.
#[derive(Debug, Clone)]
pub struct Row {
    pub set: String,
    // Read by the restore tests only; realstack includes this file too.
    #[allow(dead_code)]
    pub level: String,
    pub disk: String,
    pub data_file: String,
    pub truth: PathBuf,
}

/// The rows of `corpus/manifest.tsv`, columns found by their header names.
pub fn manifest(corpus: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(corpus.join("manifest.tsv")).expect("manifest.tsv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split('\t').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("column {name}"));
    let (set, level, disk, data, truth) =
        (col("set"), col("level"), col("disk"), col("data_file"), col("truth"));
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Row {
                set: f[set].into(),
                level: f[level].into(),
                disk: f[disk].into(),
                data_file: f[data].into(),
                truth: corpus.join(f[truth]),
            }
        })
        .collect()
}
