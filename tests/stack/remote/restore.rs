//! A remote restore, as virtnbdrestore does one: `vmback restore -U qemu+ssh://...` of a
//! set backed up from the remote host writes the images into a folder on that host (over
//! NBD to a qemu-nbd there), puts the boot files and the adjusted XML there, and defines
//! the VM there, not here. The restored VM starts there; its disks, compared on the host,
//! equal the truth of the backed-up domain.

use std::path::Path;
use std::process::Command;

use super::host::Host;
use super::{DISKS, check, skip, truths, vmback_ok};
use crate::common::tempdir;

/// Stops (if running) and undefines `dom` on the host, with its NVRAM.
fn gone(host: &Host, dom: &str) {
    let _ = host.client("virsh").args(["-c", &host.ssh_uri(), "destroy", dom]).output();
    host.virsh(&["undefine", "--nvram", dom]);
}

/// Full and inc of `name`'s domain (NBD on `ports[0]`), then a restore of the newest point
/// onto the host as `<name>-r` (NBD on `ports[1]`); with or without TLS.
fn remote_restore(name: &str, ports: [u16; 2], tls: bool) {
    if skip() {
        return;
    }
    let host = Host::start();
    host.domain(name);
    let work = tempdir(name);
    let w = work.path();
    let set = w.join("set");
    host.write(name, "vda", &["write -P 0xe1 0 1M", "write -P 0xe2 67104768 4096"]);
    host.write(name, "vdb", &["write -P 0xf1 64K 64K"]);
    vmback_ok(&host, name, "full", &set, ports[0], tls);
    host.write(name, "vda", &["write -P 0xe3 20M 2M", "write -z 0 4096"]);
    host.write(name, "vdb", &["discard 64K 64K", "write -P 0xf2 3 1000"]);
    vmback_ok(&host, name, "inc", &set, ports[0], tls);
    let truth = truths(&host, name, &w.join("truth"));

    let restored = format!("{name}-r");
    let out = Path::new(host.get("STATE")).join("host").join(format!("restore-{name}"));
    // a run before this one may have left its VM and folder
    if host.virsh(&["list", "--all", "--name"]).lines().any(|n| n == restored) {
        gone(&host, &restored);
    }
    host.exec(&["rm", "-rf", out.to_str().expect("UTF-8 path")]);

    let port = ports[1].to_string();
    let mut c = host.client(env!("CARGO_BIN_EXE_vmback"));
    c.args(["restore", "-n", "-i"]).arg(&set).arg("-o").arg(&out);
    c.args(["-U", &host.ssh_uri(), "-c", "-D", "-N", &restored, "-P", &port, "-I", host.get("ADDR")]);
    if tls {
        c.arg("--tls");
    }
    let started = std::time::Instant::now();
    check(c.output().expect("run vmback restore"), &format!("vmback restore -U (tls: {tls})"));
    eprintln!("{name}: remote restore took {:.2} s", started.elapsed().as_secs_f64());

    // defined there, not here
    let names = host.virsh(&["list", "--all", "--name"]);
    assert!(names.lines().any(|n| n == restored), "{restored} not defined on the host: {names}");
    let here = Command::new("virsh").args(["-c", "qemu:///system", "dominfo", &restored]).output();
    assert!(!here.expect("run virsh").status.success(), "{restored} was defined on this machine");
    // its disks and NVRAM are the files in the folder there
    let xml = host.virsh(&["dumpxml", &restored]);
    let nvram = out.join(format!("{name}_VARS.fd"));
    assert!(xml.contains(&format!("{}</nvram>", nvram.display())), "NVRAM not at {}: {xml}", nvram.display());
    host.exec(&["test", "-s", nvram.to_str().expect("UTF-8 path")]);
    host.exec(&[
        "grep",
        "-q",
        &format!("<name>{restored}</name>"),
        out.join("vmconfig.xml").to_str().expect("UTF-8"),
    ]);
    for disk in DISKS {
        let image = out.join(format!("{name}-{disk}.qcow2"));
        let image = image.to_str().expect("UTF-8 path");
        assert!(xml.contains(&format!("file='{image}'")), "{disk} not at {image}: {xml}");
        let t = truth.join(format!("{disk}.raw"));
        host.exec(&["qemu-img", "compare", "-q", "-F", "raw", image, t.to_str().expect("UTF-8 path")]);
    }
    // it starts there (over the same URI a user would use)
    check(
        host.client("virsh")
            .args(["-c", &host.ssh_uri(), "start", "--paused", &restored])
            .output()
            .expect("virsh"),
        &format!("virsh start {restored} on the host"),
    );
    gone(&host, &restored);
    host.exec(&["rm", "-rf", out.to_str().expect("UTF-8 path")]);
}

#[test]
fn a_remote_restore_writes_defines_and_starts_the_vm_on_the_remote_host() {
    remote_restore("vmb-rr-tcp", [10840, 10841], false);
}

#[test]
fn a_remote_restore_over_nbd_tls_does_the_same() {
    remote_restore("vmb-rr-tls", [10842, 10843], true);
}
