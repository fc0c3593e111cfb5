//! Backups of a domain on a second host, as a virtnbdbackup user takes them: libvirt over
//! `qemu+ssh://`, the backup job's NBD server on the remote address over TCP, and again
//! with TLS. The host is a network namespace with its own sshd and libvirtd
//! (contrib/realstack/remote-host.sh); its domains have two qcow2 disks and UEFI NVRAM.
//! Every command here runs as a backup host would run it: inside the script's `client`
//! wrapper, so root's ssh knows the host's key and has the client key, and libnbd finds
//! its client certificates where it looks for them.
//!
//! `chain`: vmback and Debian's virtnbdbackup take the same backups (full, inc, diff,
//! copy) of two domains given the same writes; every point of either set, restored by
//! vmback and by virtnbdrestore, equals the disks' truth taken on the remote host; shut-off
//! domains go through qemu-nbd started there. `faults`: a cut link, sshd stopped, a wrong
//! TLS certificate and an unknown host key fail clearly and leave no job behind. Needs
//! root (namespaces, libvirt); skips otherwise.

mod chain;
mod faults;
mod host;
mod restore;
mod sasl;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use host::{Host, check};

const DISKS: [&str; 2] = ["vda", "vdb"];

// NBD ports on the remote address, one set per test (backups of tests sharing the host
// run at the same time): 10809-10814 the chains, 10820-10827 the offline copies (one per
// disk), 10830-10833 the faults, 10840-10843 the remote restores, 10850 the SASL login, 10898-10899 src/backup/nbd.rs's tests.

fn skip() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: the remote host needs root (network namespace, libvirtd)");
        return true;
    }
    false
}

/// One virtnbdbackup run of `level` of `dom` into `set`; its NBD server on the remote
/// address at `port`.
fn virtnbdbackup(host: &Host, dom: &str, level: &str, set: &Path, port: u16, tls: bool) {
    let mut c = host.client("virtnbdbackup");
    c.args(["-U", &host.ssh_uri(), "--ssh-user", "root", "-I", host.get("ADDR")])
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

/// `vmback backup` of the remote `dom` as the client wrapper runs it, over `uri`, with
/// `args` after the common ones.
fn vmback_backup(
    host: &Host,
    env: &[(&str, &str)],
    uri: &str,
    dom: &str,
    set: &Path,
    args: &[&str],
) -> Output {
    host.client_with(env, env!("CARGO_BIN_EXE_vmback"))
        .args(["backup", "-U", uri, "-d", dom, "-o"])
        .arg(set)
        .args(args)
        .output()
        .expect("run vmback")
}

/// A vmback backup of `level` that must succeed; NBD at `port`, `--tls` if `tls`.
fn vmback_ok(host: &Host, dom: &str, level: &str, set: &Path, port: u16, tls: bool) {
    let port = port.to_string();
    let mut args = vec!["-l", level, "-P", &port];
    if tls {
        args.push("--tls");
    }
    let out = vmback_backup(host, &[], &host.ssh_uri(), dom, set, &args);
    check(out, &format!("vmback backup -l {level} (tls: {tls})"));
}

/// Every disk's truth now, as `dir/<disk>.raw`; returns `dir`.
fn truths(host: &Host, dom: &str, dir: &Path) -> PathBuf {
    std::fs::create_dir(dir).expect("mkdir");
    for disk in DISKS {
        host.truth(dom, disk, &dir.join(format!("{disk}.raw")));
    }
    dir.to_owned()
}

/// Which restore tool.
#[derive(Debug, Clone, Copy)]
enum Restorer {
    Vmback,
    Virtnbdrestore,
}

/// The image of `disk` a restore wrote into `out`: `<disk>.raw` or `.qcow2`, or named
/// after the original disk file (`<dom>-<disk>.qcow2`), as virtnbdrestore names them.
fn restored_image(out: &Path, disk: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(out)
        .expect("read restore folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let stem = name.strip_suffix(".qcow2").or_else(|| name.strip_suffix(".raw"));
            stem.is_some_and(|s| s == disk || s.ends_with(&format!("-{disk}")))
        })
        .collect();
    assert_eq!(found.len(), 1, "one image of {disk} in {}: {found:?}", out.display());
    found.into_iter().next().expect("one")
}

/// `set` restored by `tool` (up to `until`, or all of it) equals the truth files
/// `truth/<disk>.raw`.
fn restores_to(tool: Restorer, set: &Path, until: Option<&str>, truth: &Path, work: &Path) {
    let set_name = set.file_name().expect("a set folder").to_string_lossy();
    let out = work.join(format!("restore-{set_name}-{tool:?}-{}", until.unwrap_or("all")));
    let mut c = match tool {
        Restorer::Vmback => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_vmback"));
            c.arg("restore");
            c
        }
        Restorer::Virtnbdrestore => Command::new("virtnbdrestore"),
    };
    c.arg("-i").arg(set).arg("-o").arg(&out);
    if let Some(u) = until {
        c.args(["--until", u]);
    }
    check(c.output().expect("run restore"), &format!("{tool:?} of {} until {until:?}", set.display()));
    for disk in DISKS {
        let image = restored_image(&out, disk);
        let cmp = Command::new("qemu-img")
            .args(["compare", "-q", "-F", "raw"])
            .arg(&image)
            .arg(truth.join(format!("{disk}.raw")))
            .output()
            .expect("run qemu-img compare");
        assert!(
            cmp.status.success(),
            "{} {disk} restored by {tool:?} up to {until:?} differs from the truth: {}{}",
            set.display(),
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        );
    }
}

/// Both tools restore `set` (up to `until`) to `truth`.
fn both_restore_to(set: &Path, until: Option<&str>, truth: &Path, work: &Path) {
    for tool in [Restorer::Vmback, Restorer::Virtnbdrestore] {
        restores_to(tool, set, until, truth, work);
    }
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
