//! Backups of a domain on a second host, as a virtnbdbackup user takes them: libvirt over
//! `qemu+ssh://`, the backup job's NBD server on the remote address over TCP, and again
//! with TLS. The host is a network namespace with its own sshd and libvirtd
//! (contrib/realstack/remote-host.sh); the domain has two qcow2 disks and UEFI NVRAM.
//!
//! Here Debian's virtnbdbackup takes the sets: every point of each set, restored by
//! virtnbdrestore, equals the disks' truth taken on the remote host, and the boot files
//! came over with each backup. Needs root (namespaces, libvirt); skips otherwise.

mod host;

use std::path::{Path, PathBuf};
use std::process::Command;

use host::{Host, check};

const DISKS: [&str; 2] = ["vda", "vdb"];

fn skip() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: the remote host needs root (network namespace, libvirtd)");
        return true;
    }
    false
}

/// One virtnbdbackup run of `level` of `dom` into `set`; its NBD server on the remote
/// address at `port` (a port of this test's own: backups of the tests sharing the host
/// may run at the same time).
fn backup(host: &Host, dom: &str, level: &str, set: &Path, port: u16, tls: bool) {
    let mut c = host.client(tls, "virtnbdbackup");
    c.args(["-U", host.get("SSH_URI"), "--ssh-user", "root", "-I", host.get("ADDR")])
        .args(["-P", &port.to_string(), "-d", dom, "-l", level, "-n", "-o"])
        .arg(set);
    if tls {
        c.arg("--tls");
    }
    let out =
        check(c.output().expect("run virtnbdbackup"), &format!("virtnbdbackup -l {level} (tls: {tls})"));
    // the data went over the network, to the remote address: nbd:// (nbds:// with TLS)
    let log = String::from_utf8_lossy(&out.stderr);
    let url = format!("{}://{}:{port}/vda", if tls { "nbds" } else { "nbd" }, host.get("ADDR"));
    assert!(log.contains(&url), "virtnbdbackup did not use {url}:\n{log}");
}

/// virtnbdrestore of `set` (up to checkpoint `until`, or all of it) equals the truth
/// files `truth/<disk>.raw`.
fn restores_to(set: &Path, dom: &str, until: Option<&str>, truth: &Path, work: &Path) {
    let out = work.join(format!("restore-{}", until.unwrap_or("all")));
    let mut c = Command::new("virtnbdrestore");
    c.arg("-i").arg(set).arg("-o").arg(&out);
    if let Some(u) = until {
        c.args(["--until", u]);
    }
    check(c.output().expect("run virtnbdrestore"), &format!("virtnbdrestore (until {until:?})"));
    for disk in DISKS {
        // virtnbdrestore names each image after the original disk file
        let image = out.join(format!("{dom}-{disk}.qcow2"));
        let cmp = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
            .arg(&image)
            .arg(truth.join(format!("{disk}.raw")))
            .output()
            .expect("run qemu-img compare");
        assert!(
            cmp.status.success(),
            "{dom} {disk} restored up to {until:?} differs from the truth: {}{}",
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        );
    }
}

/// Every disk's truth now, as `dir/<disk>.raw`; returns `dir`.
fn truths(host: &Host, dom: &str, dir: &Path) -> PathBuf {
    std::fs::create_dir(dir).expect("mkdir");
    for disk in DISKS {
        host.truth(dom, disk, &dir.join(format!("{disk}.raw")));
    }
    dir.to_owned()
}

fn full_and_inc(dom: &str, port: u16, tls: bool) {
    if skip() {
        return;
    }
    let host = Host::start();
    host.domain(dom);
    let work = tempfile::tempdir().expect("tempdir");
    let set = work.path().join("set");

    // full: data at both ends of each disk (64 MiB) and in the middle
    host.write(dom, "vda", &["write -P 0xa1 0 1M", "write -P 0xa2 10M 3M", "write -P 0xa3 67104768 4096"]);
    host.write(dom, "vdb", &["write -P 0xb1 64K 64K", "write -P 0xb2 1234567 100000"]);
    backup(&host, dom, "full", &set, port, tls);
    let truth0 = truths(&host, dom, &work.path().join("truth0"));

    // inc: overwrites, zeroes (with and without unmap) and a discard
    host.write(dom, "vda", &["write -P 0xa4 11M 64K", "write -z 0 4096", "write -P 0xa5 40M 1M"]);
    host.write(dom, "vdb", &["discard 64K 64K", "write -z -u 1200000 50000", "write -P 0xb3 3 1000"]);
    backup(&host, dom, "inc", &set, port, tls);
    let truth1 = truths(&host, dom, &work.path().join("truth1"));

    // the boot files came over ssh with each backup: loader and NVRAM
    for n in 0..2 {
        for f in [format!("OVMF_CODE_4M.fd.virtnbdbackup.{n}"), format!("{dom}_VARS.fd.virtnbdbackup.{n}")] {
            let p = set.join(&f);
            assert!(p.metadata().is_ok_and(|m| m.len() > 0), "{f} missing or empty in the set");
        }
    }
    restores_to(&set, dom, Some("virtnbdbackup.0"), &truth0, work.path());
    restores_to(&set, dom, Some("virtnbdbackup.1"), &truth1, work.path());
}

// NBD ports on the remote address, one set per test (see backup()): 10809 (virtnbdbackup's
// default) and 10810 here, 10820-10821 for the offline copy (qemu-nbd on one port per
// disk), 10898-10899 for src/backup/nbd.rs's tests.

#[test]
fn virtnbdbackup_over_ssh_and_nbd_tcp_restores_to_the_remote_truth() {
    full_and_inc("vmb-rt-vnb-tcp", 10809, false);
}

#[test]
fn virtnbdbackup_over_ssh_and_nbd_tls_restores_to_the_remote_truth() {
    full_and_inc("vmb-rt-vnb-tls", 10810, true);
}

#[test]
fn every_uri_reaches_the_remote_libvirtd_and_not_the_local_one() {
    if skip() {
        return;
    }
    let host = Host::start();
    for key in ["SSH_URI", "LIBSSH_URI", "LIBSSH2_URI", "TCP_URI", "TLS_URI"] {
        let uri = host.get(key);
        let out =
            check(Command::new("virsh").args(["-c", uri, "hostname"]).output().expect("run virsh"), uri);
        // the remote host's own UTS name is its address (see remote-host.sh)
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), host.get("ADDR"), "{uri}");
        let out = check(
            Command::new("virsh").args(["-c", uri, "list", "--all", "--name"]).output().expect("run virsh"),
            uri,
        );
        let names = String::from_utf8_lossy(&out.stdout);
        assert!(
            names.lines().any(|n| n == host.get("DOMAIN")),
            "{uri}: no {} in {names}",
            host.get("DOMAIN")
        );
    }
}

#[test]
fn virtnbdbackup_copy_of_a_shut_off_remote_domain_restores_to_the_remote_truth() {
    if skip() {
        return;
    }
    let host = Host::start();
    let dom = "vmb-rt-vnb-off";
    host.domain(dom);
    host.write(dom, "vda", &["write -P 0xc1 2M 1M", "write -P 0xc2 67108352 512"]);
    host.write(dom, "vdb", &["write -P 0xd1 0 64K"]);
    check(
        host.client(false, "virsh")
            .args(["-c", host.get("SSH_URI"), "destroy", dom])
            .output()
            .expect("virsh"),
        "virsh destroy",
    );
    let work = tempfile::tempdir().expect("tempdir");
    let set = work.path().join("set");
    // offline: virtnbdbackup starts qemu-nbd on the remote host over ssh
    backup(&host, dom, "copy", &set, 10820, false);
    let truth = truths(&host, dom, &work.path().join("truth"));
    for f in ["OVMF_CODE_4M.fd".to_owned(), format!("{dom}_VARS.fd")] {
        assert!(set.join(&f).metadata().is_ok_and(|m| m.len() > 0), "{f} missing or empty in the set");
    }
    restores_to(&set, dom, None, &truth, work.path());
}
