//! vmback and virtnbdbackup back up the same remote domains: two domains (`-v` for vmback,
//! `-u` for virtnbdbackup) given the same writes, so each tool keeps a chain of its own
//! checkpoints, and the truths of the two, taken on the remote host, are the same bytes.

use std::path::Path;

use super::host::Host;
use super::{DISKS, both_restore_to, check, skip, truths, virtnbdbackup, vmback_ok};
use crate::common::compare::assert_same;
use crate::common::tempdir;

/// The same qemu-io commands on `disk` of every domain in `doms`.
fn write(host: &Host, doms: &[&str], disk: &str, cmds: &[&str]) {
    for d in doms {
        host.write(d, disk, cmds);
    }
}

/// The truths of both domains, which must be equal; returns vmback's domain's folder.
fn same_truths(host: &Host, doms: [&str; 2], work: &Path, tag: &str) -> std::path::PathBuf {
    let a = truths(host, doms[0], &work.join(format!("{tag}-v")));
    let b = truths(host, doms[1], &work.join(format!("{tag}-u")));
    for disk in DISKS {
        let f = format!("{disk}.raw");
        assert_same(&a.join(&f), &b.join(&f), &format!("{tag}: the two domains' {disk}"));
    }
    a
}

/// The remote host with twin domains given the same writes: `<name>-v` for vmback,
/// `<name>-u` for virtnbdbackup; `None` when the test is skipped.
fn twins(name: &str) -> Option<(Host, String, String)> {
    if skip() {
        return None;
    }
    let host = Host::start();
    let (v, u) = (format!("{name}-v"), format!("{name}-u"));
    for d in [&v, &u] {
        host.domain(d);
    }
    Some((host, v, u))
}

/// full, inc, diff and copy of the same writes by both tools, NBD on ports `ports` (one
/// per tool) with or without TLS; every point restored by both tools equals the truth.
fn chain(name: &str, ports: [u16; 2], tls: bool) {
    let Some((host, v, u)) = twins(name) else { return };
    let doms = [v.as_str(), u.as_str()];
    let work = tempdir(name);
    let w = work.path();
    let (sv, su) = (w.join("vmback"), w.join("virtnbdbackup"));
    let both = |level: &str, sv: &Path, su: &Path| {
        vmback_ok(&host, &v, level, sv, ports[0], tls);
        virtnbdbackup(&host, &u, level, su, ports[1], tls);
    };

    // full: data at both ends of each disk (64 MiB) and in the middle
    write(
        &host,
        &doms,
        "vda",
        &["write -P 0xa1 0 1M", "write -P 0xa2 10M 3M", "write -P 0xa3 67104768 4096"],
    );
    write(&host, &doms, "vdb", &["write -P 0xb1 64K 64K", "write -P 0xb2 1234567 100000"]);
    both("full", &sv, &su);
    let t0 = same_truths(&host, doms, w, "truth0");

    // inc: overwrites, zeroes (with and without unmap) and a discard
    write(&host, &doms, "vda", &["write -P 0xa4 11M 64K", "write -z 0 4096", "write -P 0xa5 40M 1M"]);
    write(&host, &doms, "vdb", &["discard 64K 64K", "write -z -u 1200000 50000", "write -P 0xb3 3 1000"]);
    both("inc", &sv, &su);
    let t1 = same_truths(&host, doms, w, "truth1");

    // diff: everything since checkpoint 1
    write(&host, &doms, "vda", &["write -P 0xa6 20M 2M"]);
    write(&host, &doms, "vdb", &["write -P 0xb4 30M 512K", "write -z 64K 4096"]);
    both("diff", &sv, &su);
    let t2 = same_truths(&host, doms, w, "truth2");

    // copy: a standalone full, no checkpoint
    write(&host, &doms, "vda", &["write -P 0xa7 1M 1M"]);
    write(&host, &doms, "vdb", &["write -z 30M 64K"]);
    let (cv, cu) = (w.join("vmback-copy"), w.join("virtnbdbackup-copy"));
    both("copy", &cv, &cu);
    let t3 = same_truths(&host, doms, w, "truth3");

    // both tools saved the boot files (loader and NVRAM) over ssh with each backup, under
    // the same names; the loader is the same file on the host
    for n in 0..2 {
        for (set, dom) in [(&sv, &v), (&su, &u)] {
            for f in
                [format!("OVMF_CODE_4M.fd.virtnbdbackup.{n}"), format!("{dom}_VARS.fd.virtnbdbackup.{n}")]
            {
                assert!(
                    set.join(&f).metadata().is_ok_and(|m| m.len() > 0),
                    "{f} missing or empty in {set:?}"
                );
            }
        }
        let loader = format!("OVMF_CODE_4M.fd.virtnbdbackup.{n}");
        assert!(
            std::fs::read(sv.join(&loader)).unwrap() == std::fs::read(su.join(&loader)).unwrap(),
            "{loader}"
        );
    }
    // each chain has its own checkpoints on the remote host, and no job is left
    for d in doms {
        assert_eq!(host.checkpoints(d), ["virtnbdbackup.0", "virtnbdbackup.1"], "{d}");
        assert!(!host.has_job(d), "{d}: a backup job is left running");
    }
    for set in [&sv, &su] {
        both_restore_to(set, Some("virtnbdbackup.0"), &t0, w);
        both_restore_to(set, Some("virtnbdbackup.1"), &t1, w);
        // the newest point: the diff on top of checkpoint 1
        both_restore_to(set, None, &t2, w);
    }
    for set in [&cv, &cu] {
        both_restore_to(set, None, &t3, w);
    }
}

#[test]
fn vmback_and_virtnbdbackup_over_ssh_and_nbd_tcp_restore_to_the_remote_truth() {
    chain("vmb-rt-tcp", [10811, 10812], false);
}

#[test]
fn vmback_and_virtnbdbackup_over_ssh_and_nbd_tls_restore_to_the_remote_truth() {
    chain("vmb-rt-tls", [10813, 10814], true);
}

/// A copy of shut-off domains by both tools: qemu-nbd started on the remote host over
/// ssh, one port per disk from `ports[i]` on.
fn offline_copy(name: &str, ports: [u16; 2], tls: bool) {
    let Some((host, v, u)) = twins(name) else { return };
    let doms = [v.as_str(), u.as_str()];
    write(&host, &doms, "vda", &["write -P 0xc1 2M 1M", "write -P 0xc2 67108352 512"]);
    write(&host, &doms, "vdb", &["write -P 0xd1 0 64K"]);
    for d in doms {
        host.virsh(&["destroy", d]);
    }
    let work = tempdir(name);
    let w = work.path();
    let (sv, su) = (w.join("vmback"), w.join("virtnbdbackup"));
    vmback_ok(&host, &v, "copy", &sv, ports[0], tls);
    virtnbdbackup(&host, &u, "copy", &su, ports[1], tls);
    let truth = same_truths(&host, doms, w, "truth");
    for (set, dom) in [(&sv, &v), (&su, &u)] {
        for f in ["OVMF_CODE_4M.fd".to_owned(), format!("{dom}_VARS.fd")] {
            assert!(set.join(&f).metadata().is_ok_and(|m| m.len() > 0), "{f} missing or empty in {set:?}");
        }
    }
    // the qemu-nbd servers there ended with the backups (the host shares our process
    // table: a network namespace, not a PID one); they stop a moment after we close
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = std::process::Command::new("pgrep").args(["-a", "qemu-nbd"]).output().expect("pgrep");
        let left = String::from_utf8_lossy(&left.stdout).into_owned();
        if !left.contains(&format!("{v}-vda")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "a qemu-nbd of {v} outlived the backup: {left}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let qcow_json = sv.join("vda.copy.qcow.json");
    let info = std::fs::read_to_string(&qcow_json).unwrap_or_else(|e| panic!("{}: {e}", qcow_json.display()));
    assert!(info.contains("\"format\": \"qcow2\""), "qemu-img info from the remote host: {info}");
    for set in [&sv, &su] {
        both_restore_to(set, None, &truth, w);
    }
    check(
        std::process::Command::new(env!("CARGO_BIN_EXE_vmback"))
            .arg("verify")
            .arg(&sv)
            .output()
            .expect("verify"),
        "vmback verify",
    );
}

#[test]
fn copies_of_shut_off_remote_domains_through_qemu_nbd_there_restore_to_the_truth() {
    offline_copy("vmb-rt-off", [10822, 10820], false);
}

#[test]
fn tls_copies_of_shut_off_remote_domains_restore_to_the_truth() {
    offline_copy("vmb-rt-offtls", [10826, 10824], true);
}
