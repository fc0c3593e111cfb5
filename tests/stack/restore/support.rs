//! Helpers for the restore tests: the corpus and its manifest, running vmback and the
//! upstream tools, comparing images.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

pub const VMBACK: &str = env!("CARGO_BIN_EXE_vmback");

pub use crate::common::corpus::{Row, corpus, manifest};

pub use crate::common::cli::{run_ok, vmback};

/// Runs `vmback ARGS` and insists on success.
pub fn vmback_ok(args: &[&str]) -> Output {
    let out = vmback(args);
    crate::common::cli::assert_success("vmback", args, &out);
    out
}

/// A restore point as `ls --json` shows it.
#[derive(Debug, Clone)]
pub struct Point {
    /// The set folder the point's files are in.
    pub set: PathBuf,
    pub domain: String,
    pub name: String,
    pub vmconfig: Option<PathBuf>,
    /// Per disk, its chain's file names.
    pub disks: Vec<(String, Vec<String>)>,
}

impl Point {
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.domain, self.name)
    }

    pub fn files(&self, disk: &str) -> &[String] {
        &self
            .disks
            .iter()
            .find(|(d, _)| d == disk)
            .unwrap_or_else(|| panic!("{}: no disk {disk}", self.name))
            .1
    }
}

/// Every restore point of `ls` (all domains), in listing order.
pub fn points(ls: &Value) -> Vec<Point> {
    let mut out = Vec::new();
    for d in ls["domains"].as_array().expect("domains") {
        for p in d["points"].as_array().expect("points") {
            // Damaged points are listed (their intact ranges can be read); broken ones
            // (no chain) would not restore.
            assert!(p["status"] == "complete" || p["status"] == "damaged", "{}: {}", p["name"], p["reason"]);
            out.push(Point {
                set: PathBuf::from(p["set"].as_str().expect("set")),
                domain: d["name"].as_str().expect("domain name").into(),
                name: p["name"].as_str().expect("point name").into(),
                vmconfig: p["vmconfig"].as_str().map(PathBuf::from),
                disks: p["disks"]
                    .as_array()
                    .expect("disks")
                    .iter()
                    .map(|k| {
                        let files = k["files"].as_array().expect("files");
                        (
                            k["disk"].as_str().expect("disk").into(),
                            files.iter().map(|f| f.as_str().expect("file").into()).collect(),
                        )
                    })
                    .collect(),
            });
        }
    }
    out
}

/// The point whose chain for `disk` ends in `file`.
pub fn point_ending_in<'a>(points: &'a [Point], disk: &str, file: &str) -> &'a Point {
    let hits: Vec<&Point> = points
        .iter()
        .filter(|p| p.disks.iter().any(|(d, f)| d == disk && f.last().is_some_and(|l| l == file)))
        .collect();
    assert_eq!(hits.len(), 1, "exactly one point ends in {disk} {file}: {hits:?}");
    hits[0]
}

/// `domain/point` of every point whose chain (any disk) reads `file`.
pub fn points_reading(points: &[Point], file: &str) -> BTreeSet<String> {
    points
        .iter()
        .filter(|p| p.disks.iter().any(|(_, f)| f.iter().any(|x| x == file)))
        .map(Point::full_name)
        .collect()
}

pub use crate::common::compare::{assert_same, first_difference, to_raw};
pub use crate::common::{ls_json, names, path_str, tempdir};

/// Bytes allocated on disk for a file.
pub fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).blocks() * 512
}

/// `cp -a` of a corpus set into `dir` (mtimes kept: virtnbdrestore orders by them).
pub fn copy_set(from: &Path, to: &Path) {
    run_ok("cp", &["-a", path_str(from), path_str(to)]);
}

/// Makes sure virtnbdrestore can run: it needs a libvirt daemon (1.9.15).
pub fn upstream_ready() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        assert!(
            Command::new("virtnbdrestore").arg("--help").output().is_ok_and(|o| o.status.success()),
            "virtnbdrestore is missing (contrib/install-deps.sh installs it; the corpus needs it anyway)"
        );
        let answers = || {
            Command::new("virsh")
                .args(["-c", "qemu:///system", "list"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !answers() {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/realstack/libvirtd-up.sh");
            run_ok("bash", &[path_str(&script)]);
            assert!(answers(), "libvirtd does not answer after libvirtd-up.sh");
        }
    });
}

/// `virtnbdrestore -i SET -o OUT -n ARGS...` (OUT must not exist); panics on failure.
/// Returns its stderr (the log).
pub fn virtnbdrestore(set: &Path, out: &Path, args: &[&str]) -> String {
    upstream_ready();
    let log = out.with_extension("log");
    let mut all = vec!["-i", path_str(set), "-o", path_str(out), "-n", "-L", path_str(&log)];
    all.extend_from_slice(args);
    let o = Command::new("virtnbdrestore").args(&all).output().expect("run virtnbdrestore");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "virtnbdrestore {all:?} failed:\n{text}");
    // 1.9.15 logs a failed disk and still exits 0: a clean run has no ERROR line.
    assert!(!text.contains(" ERROR "), "virtnbdrestore {all:?} logged an error:\n{text}");
    text
}
