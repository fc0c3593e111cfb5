//! Restores that rebuild the VM, against the real libvirtd: a persistent q35 domain
//! booting with UEFI (Debian's OVMF loader and an NVRAM made from its template; the guest
//! needs no OS), a qcow2 disk, a raw disk and an empty cdrom, backed up by vmback.
//!
//! - The set holds the boot files under upstream's names, byte for byte (a full of the
//!   running domain, a copy of the shut-off one), and Debian's virtnbdrestore puts the
//!   NVRAM back from it.
//! - The mount shows them beside `vmconfig.xml`, byte for byte.
//! - `vmback restore -D -N NAME` defines a VM that `virsh start` starts, whose disk
//!   equals the truth and whose NVRAM is in the output, marked for autostart as the
//!   original was; the missing original NVRAM is put back; the raw disk and the cdrom are
//!   left out.
//! - The qcow2 image is created with the original's options (from the saved qcow.json).
//! - `--raw`, `--compress` and `-A` each show their effect in the files and `qemu-img`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::backup::support::{mount, stack, virsh, virsh_ok, virtnbdrestore as upstream_restore};
use crate::common::compare::{assert_same, to_raw};
use crate::common::{names, path_str, tempdir};

use super::support::{allocated, run_ok, vmback, vmback_ok};

const MIB: u64 = 1 << 20;
const LOADER: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const VARS_TEMPLATE: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const DOM: &str = "vmback-t-uefi";
const COPY: &str = "vmback-t-uefi-copy";
/// Sizes of the two disks: small, so the test spends its time on what it checks.
const VDA_SIZE: u64 = 64 * MIB;
const VDB_SIZE: u64 = 16 * MIB;

/// Both domains go when the test ends, with their NVRAM.
struct Domains;

impl Drop for Domains {
    fn drop(&mut self) {
        for d in [DOM, COPY] {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", "--nvram", "--checkpoints-metadata", d]);
        }
    }
}

fn domain_xml(typ: &str, dir: &Path) -> String {
    format!(
        "<domain type='{typ}'><name>{DOM}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='q35'>hvm</type>\
         <loader readonly='yes' type='pflash'>{LOADER}</loader>\
         <nvram template='{VARS_TEMPLATE}'>{}</nvram></os><features><acpi/></features><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vdb' bus='virtio'/></disk>\
         <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
         <target dev='sdc' bus='sata'/><readonly/></disk>\
         <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>",
        nvram(dir).display(),
        dir.join("disks/uefi-vda.qcow2").display(),
        dir.join("disks/scratch.img").display(),
    )
}

fn nvram(dir: &Path) -> PathBuf {
    dir.join("nvram").join(format!("{DOM}_VARS.fd"))
}

/// Defines and starts (paused) the UEFI domain with data on both disks; returns the
/// truth of each disk as a raw image.
fn uefi_domain(dir: &Path) -> (PathBuf, PathBuf) {
    for sub in ["disks", "nvram", "truth"] {
        std::fs::create_dir(dir.join(sub)).expect("mkdir");
    }
    let vda = dir.join("disks/uefi-vda.qcow2");
    // Not qemu-img's defaults: the restored image is created with the original's options.
    let opts = "cluster_size=131072,lazy_refcounts=on";
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", opts, path_str(&vda), &VDA_SIZE.to_string()]);
    let vdb = dir.join("disks/scratch.img");
    run_ok("qemu-img", &["create", "-q", "-f", "raw", path_str(&vdb), &VDB_SIZE.to_string()]);
    for (img, fmt, writes) in [
        (&vda, "qcow2", ["write -P 0x41 0 1M", "write -P 0x42 40M 3M"]),
        (&vdb, "raw", ["write -P 0x51 0 512k", "write -P 0x52 8M 1M"]),
    ] {
        for w in writes {
            run_ok("qemu-io", &["-f", fmt, "-c", w, path_str(img)]);
        }
    }
    let _ = virsh(&["destroy", DOM]);
    let _ = virsh(&["undefine", "--nvram", "--checkpoints-metadata", DOM]);
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    let mut err = String::new();
    for typ in if kvm { &["kvm", "qemu"][..] } else { &["qemu"] } {
        let xml = dir.join(format!("domain-{typ}.xml"));
        std::fs::write(&xml, domain_xml(typ, dir)).expect("write xml");
        virsh_ok(&["define", path_str(&xml)]);
        let o = virsh(&["start", "--paused", DOM]);
        if o.status.success() {
            let truth = |img: &Path, fmt: &str, name: &str| {
                let raw = dir.join("truth").join(name);
                run_ok("qemu-img", &["convert", "-U", "-f", fmt, "-O", "raw", path_str(img), path_str(&raw)]);
                raw
            };
            return (truth(&vda, "qcow2", "vda.raw"), truth(&vdb, "raw", "vdb.raw"));
        }
        err = String::from_utf8_lossy(&o.stderr).into_owned();
        let _ = virsh(&["undefine", "--nvram", DOM]);
    }
    panic!("cannot start {DOM}: {err}");
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `qemu-img info --output=json` of `img`.
fn qemu_info(img: &Path) -> serde_json::Value {
    let o =
        Command::new("qemu-img").args(["info", "--output=json", path_str(img)]).output().expect("qemu-img");
    assert!(o.status.success(), "qemu-img info {}: {}", img.display(), String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("json")
}

fn assert_same_as(image: &Path, truth: &Path, what: &str) {
    let raw = image.with_extension("cmp.raw");
    to_raw(image, &raw);
    assert_same(&raw, truth, what);
    std::fs::remove_file(&raw).expect("rm");
}

#[test]
fn a_uefi_vm_is_backed_up_with_its_boot_files_and_rebuilt_by_restore() {
    if !stack() {
        return;
    }
    let _domains = Domains;
    let tmp = tempdir("uefi");
    let (vda_truth, vdb_truth) = uefi_domain(tmp.path());
    let vars = nvram(tmp.path());
    let vars_bytes = read(&vars);
    let set = tmp.path().join("set");
    virsh_ok(&["autostart", DOM]);
    vmback_ok(&["backup", "-d", DOM, "-l", "full", "-o", path_str(&set), "--raw"]);
    assert_eq!(read(&set.join("autostart.virtnbdbackup.0")), b"True", "upstream's autostart marker");

    // The set: upstream's names, the same bytes.
    let in_set = set.join(format!("{DOM}_VARS.fd.virtnbdbackup.0"));
    assert_eq!(
        read(&set.join("OVMF_CODE_4M.fd.virtnbdbackup.0")),
        read(Path::new(LOADER)),
        "loader in the set"
    );
    assert_eq!(read(&in_set), vars_bytes, "NVRAM in the set");

    // The mount: beside vmconfig.xml, the same bytes.
    {
        let m = mount(&set);
        let point = m.dir.path().join(DOM).join("virtnbdbackup.0");
        let shown = names(&point);
        for n in ["vmconfig.xml", "OVMF_CODE_4M.fd", &format!("{DOM}_VARS.fd")] {
            assert!(shown.iter().any(|s| s == n), "{n} not in the mount: {shown:?}");
        }
        assert_eq!(read(&point.join("OVMF_CODE_4M.fd")), read(Path::new(LOADER)), "loader in the mount");
        assert_eq!(read(&point.join(format!("{DOM}_VARS.fd"))), vars_bytes, "NVRAM in the mount");
    }

    // Debian's virtnbdrestore puts the missing NVRAM back from vmback's set.
    std::fs::remove_file(&vars).expect("rm nvram");
    let up = upstream_restore(&set, &[]);
    assert_eq!(read(&vars), vars_bytes, "virtnbdrestore put back the NVRAM from vmback's set");
    let up_vda = up.path().join("out/uefi-vda.qcow2");
    assert_same_as(&up_vda, &vda_truth, "virtnbdrestore of vmback's set, vda");

    // vmback restore -D: a VM that starts, its disk the truth, its NVRAM in the output;
    // the original NVRAM, missing again, is put back.
    std::fs::remove_file(&vars).expect("rm nvram");
    let out = tmp.path().join("out");
    vmback_ok(&["restore", "-i", path_str(&set), "-o", path_str(&out), "-D", "-N", COPY]);
    assert_eq!(read(&vars), vars_bytes, "vmback put back the missing NVRAM");
    let listed = names(&out);
    assert_eq!(
        listed,
        ["OVMF_CODE_4M.fd", "uefi-vda.qcow2", &format!("{DOM}_VARS.fd"), "vmconfig.xml"],
        "images as virtnbdrestore names them; the raw disk left out without --raw"
    );
    let info = qemu_info(&out.join("uefi-vda.qcow2"));
    assert_eq!(info["format"], "qcow2", "the disk's own format");
    assert_eq!(info["cluster-size"], 131072, "the original's cluster size: {info}");
    assert_eq!(
        info["format-specific"]["data"]["lazy-refcounts"], true,
        "the original's lazy refcounts: {info}"
    );
    assert_same_as(&out.join("uefi-vda.qcow2"), &vda_truth, "vmback restore -D, vda");
    let xml = virsh_ok(&["dumpxml", COPY]);
    let copy_vars = out.join(format!("{DOM}_VARS.fd"));
    assert_eq!(read(&copy_vars), vars_bytes, "NVRAM in the output");
    for want in [
        format!(">{}</nvram>", copy_vars.display()),
        format!(">{}</loader>", out.join("OVMF_CODE_4M.fd").display()),
        format!("<source file='{}'", out.join("uefi-vda.qcow2").display()),
    ] {
        assert!(xml.contains(&want), "{want} not in the defined domain:\n{xml}");
    }
    assert!(!xml.contains("scratch.img") && !xml.contains("cdrom"), "raw disk and cdrom left out:\n{xml}");
    assert_ne!(virsh_ok(&["domuuid", COPY]), virsh_ok(&["domuuid", DOM]), "a UUID of its own");
    let info = virsh_ok(&["dominfo", COPY]);
    assert!(info.lines().any(|l| l.starts_with("Autostart:") && l.contains("enable")), "{info}");
    virsh_ok(&["start", "--paused", COPY]);
    assert!(virsh_ok(&["domstate", COPY]).contains("paused"), "the restored VM runs");
    virsh_ok(&["destroy", COPY]);

    // --raw: the raw disk too, as it is, and kept in the adjusted XML.
    let raw_out = tmp.path().join("raw");
    vmback_ok(&["restore", "-i", path_str(&set), "-o", path_str(&raw_out), "--raw", "-c", "-N", "x"]);
    assert_same(&raw_out.join("scratch.img"), &vdb_truth, "--raw: scratch.img as it was");
    let adjusted = std::fs::read_to_string(raw_out.join("vmconfig.xml")).expect("vmconfig.xml");
    assert!(adjusted.contains(&format!("{}", raw_out.join("scratch.img").display())), "{adjusted}");
    assert!(!adjusted.contains("<uuid>") && adjusted.contains("<name>x</name>"), "{adjusted}");

    // --compress: compressed clusters, the same data.
    let c_out = tmp.path().join("compressed");
    vmback_ok(&["restore", "-i", path_str(&set), "-o", path_str(&c_out), "-d", "vda", "--compress"]);
    let check = Command::new("qemu-img")
        .args(["check", path_str(&c_out.join("uefi-vda.qcow2"))])
        .output()
        .expect("check");
    let check = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(check.contains("100.00% compressed clusters"), "--compress: {check}");
    assert_same_as(&c_out.join("uefi-vda.qcow2"), &vda_truth, "--compress, vda");
    let e = vmback(&[
        "restore",
        "-i",
        path_str(&set),
        "-o",
        path_str(&tmp.path().join("cr")),
        "-d",
        "vda",
        "--compress",
        "--format",
        "raw",
    ]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("--compress writes qcow2"), "{e:?}");

    // -A: the whole image allocated (qcow2 and raw), the same data; without it, thin.
    let thin = qemu_info(&out.join("uefi-vda.qcow2"))["actual-size"].as_u64().expect("actual-size");
    assert!(thin < VDA_SIZE / 4, "without -A the image is thin: {thin}");
    let a_out = tmp.path().join("prealloc");
    vmback_ok(&["restore", "-i", path_str(&set), "-o", path_str(&a_out), "-d", "vda", "-A"]);
    let full = qemu_info(&a_out.join("uefi-vda.qcow2"))["actual-size"].as_u64().expect("actual-size");
    assert!(full >= VDA_SIZE, "-A: {full} bytes allocated for a {VDA_SIZE}-byte disk");
    assert_same_as(&a_out.join("uefi-vda.qcow2"), &vda_truth, "-A, vda");
    let ar_out = tmp.path().join("prealloc-raw");
    vmback_ok(&[
        "restore",
        "-i",
        path_str(&set),
        "-o",
        path_str(&ar_out),
        "-d",
        "vda",
        "-A",
        "--format",
        "raw",
    ]);
    assert_eq!(allocated(&ar_out.join("uefi-vda.raw")), VDA_SIZE, "-A --format raw: every block allocated");
    assert_same(&ar_out.join("uefi-vda.raw"), &vda_truth, "-A --format raw, vda");

    // Shut off, a copy (offline, through qemu-nbd): the boot files under their plain names.
    virsh_ok(&["destroy", DOM]);
    let copy_set = tmp.path().join("copy-set");
    vmback_ok(&["backup", "-d", DOM, "-l", "copy", "-o", path_str(&copy_set)]);
    assert_eq!(read(&copy_set.join("OVMF_CODE_4M.fd")), read(Path::new(LOADER)), "loader in a copy");
    assert_eq!(read(&copy_set.join(format!("{DOM}_VARS.fd"))), read(&vars), "NVRAM in a copy");
}
