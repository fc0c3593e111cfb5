//! Zip sets (`-o -`) against the real stack: a chain written by Debian's virtnbdbackup as
//! one zip per run (the full to a file, the inc through a pipe) is listed, mounted,
//! restored and verified by vmback in place, every image equal to its truth, and a
//! damaged member is reported by archive, member and offset; `vmback backup -o -` writes
//! a chain of zips that virtnbdrestore restores once unzipped (by Python's zipfile, not
//! ours) and vmback reads directly, keeping the chain's files in its working folder so
//! the next `-o -` inc continues it.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::backup::support::{
    Dom, MIB, Truth, assert_same, check_virtnbdrestore, cpt_list, disk, ls_json, mount, names, path_str,
    stack, tempdir, vmback, vmback_ok,
};

/// Writes a distinct pattern at a few places of each disk (`round` picks which).
fn write_round(dom: &Dom, round: u8) {
    let at = u64::from(round) * 3 * MIB;
    for (d, p) in [("vda", 0xa0 + round), ("vdb", 0xb0 + round)] {
        dom.writes(
            d,
            &[
                format!("write -P 0x{p:02x} {at} {}", 2 * MIB + 4096),
                format!("write -P 0x{:02x} {} 65536", p ^ 0x0f, 40 * MIB + at),
            ],
        );
    }
}

/// Runs `program args` in `cwd` with stdout into `zip`: straight into the file, or
/// (`pipe`) through a pipe copied by this process, as `| cat > zip` would.
fn to_zip(program: &str, args: &[&str], cwd: &Path, zip: &Path, pipe: bool) {
    let file = File::create(zip).expect("create zip");
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(cwd).stderr(Stdio::piped());
    let out = if pipe {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
        let mut from = child.stdout.take().expect("stdout");
        let mut to = file;
        std::io::copy(&mut from, &mut to).expect("copy the pipe");
        child.wait_with_output().expect("wait")
    } else {
        cmd.stdout(file).output().expect("run")
    };
    assert!(
        out.status.success(),
        "{program} {args:?} > {} failed ({}):\n{}",
        zip.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every point of `zips` (named `virtnbdbackup.N`) is complete and, in the mount and
/// restored by `vmback restore`, equals its truth.
fn check_read_in_place(zips: &Path, truths: &[Truth]) {
    let ls = ls_json(zips);
    let points = ls["domains"][0]["points"].as_array().expect("points");
    assert_eq!(points.len(), truths.len(), "{ls:#}");
    for p in points {
        assert_eq!(p["status"], "complete", "{}: {}", p["name"], p["reason"]);
    }
    let domain = ls["domains"][0]["name"].as_str().expect("domain name").to_owned();
    let m = mount(zips);
    for (i, truth) in truths.iter().enumerate() {
        let point = format!("virtnbdbackup.{i}");
        for (d, t) in truth {
            let image = m.dir.path().join(&domain).join(&point).join(format!("{d}.raw"));
            assert_same(&image, t, &format!("mount of {} {point}", zips.display()));
            let out = tempdir("zip-restore");
            vmback_ok(&[
                "restore",
                "-i",
                path_str(zips),
                "-o",
                path_str(out.path()),
                "--until",
                &point,
                "-d",
                d,
                "--format",
                "raw",
            ]);
            // named after the disk's file (<disk>.qcow2 here), as virtnbdrestore names it
            assert_same(&out.path().join(format!("{d}.raw")), t, &format!("vmback restore --until {point}"));
        }
    }
    let o = vmback(&["verify", path_str(zips)]);
    assert!(o.status.success(), "verify {}: {}", zips.display(), String::from_utf8_lossy(&o.stdout));
}

/// Where member `name`'s bytes start in `zip`, and how many there are.
fn member_range(zip: &Path, name: &str) -> (u64, u64) {
    let mut a = zip::ZipArchive::new(File::open(zip).expect("open zip")).expect("a zip");
    let m = a.by_name(name).expect("member");
    (m.data_start().expect("data start"), m.size())
}

#[test]
fn a_debian_virtnbdbackup_zip_chain_is_read_in_place() {
    if !stack() {
        return;
    }
    let name = "vmback-t-zipup";
    let mut dom = Dom::new(name, vec![disk("vda", 64 * MIB), disk("vdb", 48 * MIB)], false);
    let root = tempdir(name);
    let (work, zips) = (root.path().join("work"), root.path().join("zips"));
    std::fs::create_dir(&work).expect("mkdir");
    std::fs::create_dir(&zips).expect("mkdir");
    let mut truths = Vec::new();
    for (round, (level, file, pipe)) in
        [("full", "full.zip", false), ("inc", "inc1.zip", true)].into_iter().enumerate()
    {
        write_round(&dom, round as u8);
        to_zip("virtnbdbackup", &["-d", name, "-l", level, "-o", "-", "-n"], &work, &zips.join(file), pipe);
        truths.push(dom.truth());
    }
    // Upstream keeps the chain's files in its working folder.
    assert_eq!(cpt_list(&work, name), ["virtnbdbackup.0", "virtnbdbackup.1"]);
    check_read_in_place(&zips, &truths);
    // One archive alone is a source too.
    let ls = ls_json(&zips.join("full.zip"));
    assert_eq!(ls["domains"][0]["points"].as_array().map(Vec::len), Some(1), "{ls:#}");

    // A damaged member (its stop frame): named by archive, member and the offset in the
    // member of the frame the damage is in.
    let bad = root.path().join("bad");
    std::fs::create_dir(&bad).expect("mkdir");
    for f in ["full.zip", "inc1.zip"] {
        std::fs::copy(zips.join(f), bad.join(f)).expect("copy");
    }
    let (start, len) = member_range(&bad.join("full.zip"), "vda.full.data");
    let f = std::fs::OpenOptions::new().write(true).open(bad.join("full.zip")).expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, b"\xff\xff\xff\xff\xff\xff\xff\xff", start + len - 20)
        .expect("damage");
    drop(f);
    let o = vmback(&["verify", path_str(&bad)]);
    let report = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{report}");
    let want = format!("{}:vda.full.data at offset ", bad.join("full.zip").display());
    let at: u64 = report
        .split_once(&want)
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("{want:?} not in:\n{report}"));
    assert!((len - 64..=len - 20).contains(&at), "offset {at} of {len}: {report}");
}

#[test]
fn vmback_backup_to_stdout_writes_a_zip_chain_either_tool_restores() {
    if !stack() {
        return;
    }
    let name = "vmback-t-zipout";
    let mut dom = Dom::new(name, vec![disk("vda", 64 * MIB), disk("vdb", 48 * MIB)], false);
    let root = tempdir(name);
    let (work, zips, unzipped) =
        (root.path().join("work"), root.path().join("zips"), root.path().join("unzipped"));
    for d in [&work, &zips, &unzipped] {
        std::fs::create_dir(d).expect("mkdir");
    }
    let vmback_bin = env!("CARGO_BIN_EXE_vmback");
    let mut truths = Vec::new();
    let mut mounted = None;
    for (round, (level, file, pipe)) in
        [("full", "full.zip", false), ("inc", "inc1.zip", true)].into_iter().enumerate()
    {
        write_round(&dom, round as u8);
        to_zip(vmback_bin, &["backup", "-d", name, "-l", level, "-o", "-"], &work, &zips.join(file), pipe);
        truths.push(dom.truth());
        // Mounted after the full: the inc's archive, written into the mounted folder,
        // shows up as the next point once it is complete.
        mounted.get_or_insert_with(|| mount(&zips));
        // Unzipped by Python's zipfile (not the zip crate), later archives over earlier.
        crate::backup::support::run_ok(
            "python3",
            &["-m", "zipfile", "-e", path_str(&zips.join(file)), path_str(&unzipped)],
        );
    }
    // The chain's files stay in the working folder, as upstream keeps them; no folder `-`.
    assert_eq!(cpt_list(&work, name), ["virtnbdbackup.0", "virtnbdbackup.1"]);
    assert_eq!(names(&work.join("checkpoints")), ["virtnbdbackup.0.xml", "virtnbdbackup.1.xml"]);
    assert!(!work.join("-").exists() && !zips.join("-").exists());
    let cpts: Vec<String> = dom.checkpoints().into_iter().collect();
    assert_eq!(cpts, ["virtnbdbackup.0", "virtnbdbackup.1"]);
    // What each archive holds, as upstream's: data files, sidecars, side files, the chain.
    let mut inc = names(&unzipped);
    inc.retain(|n| n.contains("virtnbdbackup.1") || n.ends_with(".cpt"));
    assert_eq!(
        inc,
        [
            "vda.inc.virtnbdbackup.1.data".to_owned(),
            "vda.inc.virtnbdbackup.1.data.chksum".into(),
            "vda.virtnbdbackup.1.qcow.json".into(),
            "vdb.inc.virtnbdbackup.1.data".into(),
            "vdb.inc.virtnbdbackup.1.data.chksum".into(),
            "vdb.virtnbdbackup.1.qcow.json".into(),
            format!("{name}.cpt"),
            "vmconfig.virtnbdbackup.1.xml".into(),
        ]
    );
    assert_eq!(cpt_list(&unzipped, name), ["virtnbdbackup.0", "virtnbdbackup.1"]);

    let m = mounted.expect("mounted");
    let image = m.dir.path().join(name).join("virtnbdbackup.1").join("vda.raw");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !image.exists() {
        assert!(Instant::now() < deadline, "{} did not show up in the mount", image.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_same(&image, &truths[1]["vda"], "the inc's zip in a live mount");
    drop(m);

    // Debian's virtnbdrestore on the unzipped files: the whole chain and the full.
    check_virtnbdrestore(&unzipped, &[], &truths[1], "whole chain from the zips");
    check_virtnbdrestore(&unzipped, &["--until", "virtnbdbackup.0"], &truths[0], "the full from the zip");
    // vmback on the archives themselves.
    check_read_in_place(&zips, &truths);
}

/// The real corpus (Debian's virtnbdbackup sets, plain and lz4-compressed), each set
/// zipped by Python's zipfile as `-o -` writes it (stored, zip64, streamed through a
/// pipe): every image of the zips' mount equals its truth.
#[test]
fn the_real_corpus_zipped_mounts_to_its_truths() {
    use crate::common::corpus::{corpus, manifest};
    let Some(corpus) = corpus() else { return };
    let rows = manifest(&corpus);
    let root = tempdir("zip-corpus");
    let sets: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.set.as_str()).collect();
    for set in &sets {
        let dir = root.path().join(set);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let script = "import os, sys, zipfile\n\
            z = zipfile.ZipFile(sys.stdout.buffer, 'x', zipfile.ZIP_STORED)\n\
            for base, _, files in sorted(os.walk('.')):\n\
            \x20   for f in sorted(files):\n\
            \x20       p = os.path.join(base, f)[2:]\n\
            \x20       with open(p, 'rb') as src, z.open(zipfile.ZipInfo(p), 'w', force_zip64=True) as dst:\n\
            \x20           dst.write(src.read())\n\
            z.close()\n";
        to_zip("python3", &["-c", script], &corpus.join(set), &dir.join("set.zip"), true);
    }
    let ls = ls_json(root.path());
    let m = mount(root.path());
    for row in &rows {
        let set_dir = root.path().join(&row.set);
        let member = format!("set.zip:{}", row.data_file);
        let point = ls["domains"].as_array().expect("domains").iter().find_map(|d| {
            d["points"].as_array()?.iter().find_map(|p| {
                let ends_here = Path::new(p["set"].as_str()?) == set_dir
                    && p["disks"].as_array()?.iter().any(|k| {
                        k["disk"] == row.disk.as_str()
                            && k["files"]
                                .as_array()
                                .and_then(|f| f.last())
                                .is_some_and(|f| *f == member.as_str())
                    });
                ends_here.then(|| {
                    format!("{}/{}", d["name"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or(""))
                })
            })
        });
        let point = point.unwrap_or_else(|| panic!("no point ends in {member} of {}:\n{ls:#}", row.set));
        let image = m.dir.path().join(&point).join(format!("{}.raw", row.disk));
        assert_same(&image, &row.truth, &format!("{} {member}", row.set));
    }
    eprintln!("{} images of {} zipped sets equal their truth", rows.len(), sets.len());
}

/// `-o -` of a shut-off domain: the copy through our own qemu-nbd goes into the zip as it
/// does from a running one; virtnbdrestore restores it unzipped, vmback reads it in place.
#[test]
fn a_shut_off_domains_copy_to_stdout_is_a_zip_either_tool_restores() {
    if !stack() {
        return;
    }
    let name = "vmback-t-zipoff";
    let mut dom = Dom::new(name, vec![disk("vda", 64 * MIB), disk("vdb", 48 * MIB)], true);
    let root = tempdir(name);
    let (work, zips, unzipped) =
        (root.path().join("work"), root.path().join("zips"), root.path().join("unzipped"));
    for d in [&work, &zips, &unzipped] {
        std::fs::create_dir(d).expect("mkdir");
    }
    write_round(&dom, 1);
    let truth = dom.truth();
    dom.shut_off();
    let zip = zips.join("copy.zip");
    to_zip(env!("CARGO_BIN_EXE_vmback"), &["backup", "-d", name, "-l", "copy", "-o", "-"], &work, &zip, true);
    // a copy makes no checkpoint and no chain: nothing is kept in the working folder
    assert!(dom.checkpoints().is_empty());
    assert!(!work.join(format!("{name}.cpt")).exists() && !work.join("-").exists());
    crate::backup::support::run_ok("python3", &["-m", "zipfile", "-e", path_str(&zip), path_str(&unzipped)]);
    for f in ["vda.copy.data", "vdb.copy.data", "vmconfig.copy.xml"] {
        assert!(unzipped.join(f).exists(), "{f} not in the zip: {:?}", names(&unzipped));
    }
    check_virtnbdrestore(&unzipped, &[], &truth, "a shut-off domain's copy from the zip");
    let ls = ls_json(&zips);
    let point = ls["domains"][0]["points"][0]["name"].as_str().expect("a point").to_owned();
    let m = mount(&zips);
    for (d, t) in &truth {
        assert_same(
            &m.dir.path().join(name).join(&point).join(format!("{d}.raw")),
            t,
            "the copy's zip mounted",
        );
    }
}
