//! Checking a whole chain: every backup step restores to the disks' truth at that step,
//! with Debian's virtnbdrestore (whole chain, `--until`, `--sequence`) and with vmback
//! (`restore --until`, and the FUSE mount).

use std::collections::BTreeMap;
use std::path::Path;

use super::support::{
    Step, Truth, assert_same, check_virtnbdrestore, cpt_list, ls_json, mount, parallel, path_str, point_name,
    stream_meta, tempdir, vmback_ok,
};

/// The steps of `set`, in the order they were taken.
fn of_set<'a>(steps: &'a [Step], set: &Path) -> Vec<&'a Step> {
    steps.iter().filter(|s| s.set == set).collect()
}

/// Whether a step's file for `disk` is an online inc (it made the checkpoint it names).
fn online_inc(step: &Step, disk: &str) -> bool {
    let m = stream_meta(&step.set.join(&step.files[disk]));
    step.level == "inc" && m["checkpointName"] != m["parentCheckpoint"]
}

/// virtnbdrestore on the chain in `set` (steps of other sets are ignored):
/// - the whole chain gives the last step's truth;
/// - `--until virtnbdbackup.K` gives the truth of the first file (in time order) whose
///   checkpointName is K: the inc that made K, or a diff taken before it (a diff carries
///   the next checkpoint's name, doc/FORMAT.md §3.3);
/// - `--sequence` of every prefix of each disk's files gives that step's truth, and so
///   does the base with only the online incs up to each online inc (diffs and offline
///   incs left out: each inc holds every change since its parent checkpoint).
pub fn check_upstream(set: &Path, domain: &str, steps: &[Step]) {
    let chain = of_set(steps, set);
    let last = chain.last().expect("a chain");
    let mut jobs: Vec<(Vec<String>, Truth, String)> = Vec::new();
    jobs.push((Vec::new(), last.truth.clone(), "whole chain".into()));
    if set.join(format!("{domain}.cpt")).exists() {
        for k in cpt_list(set, domain) {
            let first = chain
                .iter()
                .find(|s| s.files.values().all(|f| stream_meta(&set.join(f))["checkpointName"] == k.as_str()))
                .unwrap_or_else(|| panic!("no file of {} names checkpoint {k}", set.display()));
            jobs.push((vec!["--until".into(), k.clone()], first.truth.clone(), format!("until {k}")));
        }
    }
    let disks: Vec<String> = last.files.keys().cloned().collect();
    for disk in &disks {
        for i in 0..chain.len() {
            let seq: Vec<&str> = chain[..=i].iter().map(|s| s.files[disk].as_str()).collect();
            let want = Truth::from([(disk.clone(), chain[i].truth[disk].clone())]);
            jobs.push((
                vec!["--sequence".into(), seq.join(","), "-d".into(), disk.clone()],
                want.clone(),
                format!("prefix {i}"),
            ));
            if i > 0 && online_inc(chain[i], disk) {
                let only: Vec<&str> = chain[..=i]
                    .iter()
                    .enumerate()
                    .filter(|(j, s)| *j == 0 || online_inc(s, disk))
                    .map(|(_, s)| s.files[disk].as_str())
                    .collect();
                if only.len() < seq.len() {
                    jobs.push((
                        vec!["--sequence".into(), only.join(","), "-d".into(), disk.clone()],
                        want.clone(),
                        format!("incs only up to {i}"),
                    ));
                }
            }
        }
    }
    let work: Vec<Box<dyn FnOnce() + Send + '_>> = jobs
        .into_iter()
        .map(|(args, want, what)| {
            Box::new(move || {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                check_virtnbdrestore(set, &a, &want, &what);
            }) as Box<dyn FnOnce() + Send + '_>
        })
        .collect();
    parallel(2, work);
}

/// `vmback restore -i SET -o OUT --until POINT -d DISK` for every step and disk.
pub fn check_vmback_restore(steps: &[Step]) {
    let mut ls_cache: BTreeMap<&Path, serde_json::Value> = BTreeMap::new();
    for s in steps {
        let ls = ls_cache.entry(&s.set).or_insert_with(|| ls_json(&s.set));
        let full = point_name(ls, s);
        let point = full.split_once('/').expect("domain/point").1;
        for (disk, truth) in &s.truth {
            let out = tempdir("restore");
            vmback_ok(&[
                "restore",
                "-i",
                path_str(&s.set),
                "-o",
                path_str(out.path()),
                "--until",
                point,
                "-d",
                disk,
                "--format",
                "raw",
            ]);
            assert_same(
                &out.path().join(format!("{disk}.raw")),
                truth,
                &format!("vmback restore --until {point}"),
            );
        }
    }
}

/// Every step's restore point in one `vmback mount ROOT` equals its truth.
pub fn check_mount(root: &Path, steps: &[Step]) {
    let ls = ls_json(root);
    for d in ls["domains"].as_array().expect("domains") {
        for p in d["points"].as_array().expect("points") {
            assert_eq!(p["status"], "complete", "{}/{}: {}", d["name"], p["name"], p["reason"]);
        }
    }
    let m = mount(root);
    for s in steps {
        let point = point_name(&ls, s);
        for (disk, truth) in &s.truth {
            let image = m.dir.path().join(&point).join(format!("{disk}.raw"));
            assert_same(&image, truth, &format!("mount {point} ({} {})", s.level, s.files[disk]));
        }
    }
}
