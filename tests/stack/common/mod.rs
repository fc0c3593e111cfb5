//! Helpers of the real-stack tests: one temp dir ([`tempdir`]), one mount fixture
//! ([`quick_mount::Mount`]), and what the backup, restore and partition tests share.

use std::path::Path;

use serde_json::Value;

#[path = "../../common/cli.rs"]
pub mod cli;
pub mod compare;
pub mod corpus;
pub mod quick_mount;

/// A scratch folder for one test, removed when dropped; `what` goes into its name for
/// whoever finds one left behind. Never inside the corpus.
pub fn tempdir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("vmback-stack-test.{what}.")).tempdir().expect("tempdir")
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The names in a folder, sorted; none when it is missing.
pub fn names(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<String> =
        rd.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// `vmback ls --json SOURCE`, which must succeed.
pub fn ls_json(source: &Path) -> Value {
    let args = ["ls", "--json", path_str(source)];
    let out = cli::vmback(&args);
    cli::assert_success("vmback", &args, &out);
    serde_json::from_slice(&out.stdout).expect("ls --json is JSON")
}
