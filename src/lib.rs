//! vmback: mount, back up and restore libvirt/KVM backups in virtnbdbackup's format.
//!
//! The library behind the `vmback` binary; see README.md for the commands.
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_code)]

pub mod backup;
pub mod cache;
pub mod catalog;
pub mod chain;
pub mod cli;
pub mod fs;
pub mod restore;
pub mod sample;
