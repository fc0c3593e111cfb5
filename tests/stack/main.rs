//! The real stack: `vmback backup` against libvirt and QEMU, restore against the corpus of
//! real virtnbdbackup sets and Debian's virtnbdrestore, the corpus mounted, partitions of
//! real backed-up disks. Needs libvirt (contrib/realstack/libvirtd-up.sh) and
//! VMBACK_CORPUS; tests print "skipping: ..." without them. One test binary (ripgrep's
//! `tests/tests.rs` shape): each file below is a module.

mod common;

mod backup;
mod partitions;
mod realstack;
mod remote;
mod restore;
mod zip;
