//! Real FUSE mounts of the real `vmback` binary: reads, writes, faults, who may access the
//! mount, hostile backup sets, and the system integration (umount, `mount -t
//! fuse.vmback`, systemd units, completion, man pages). No libvirt. One test binary
//! (ripgrep's `tests/tests.rs` shape): each file below is a module.

mod common;

mod access;
mod faults;
mod hostile;
mod integration;
mod mount;
mod writes;
