//! vmback: mount, back up and restore libvirt/KVM backups in virtnbdbackup's format.
//!
//! The library behind the `vmback` binary; see README.md for the commands.
//!
//! The image read path, bottom up (each module imports only from those below it):
//! [`view`] (the [`view::ImageView`] trait every image speaks) → [`cache`] (the read
//! cache) → [`chain`] (the stream format; the chain reader is an `ImageView`) →
//! [`overlay`] (writes over any `ImageView`) → [`fs`] (images, partition windows, the
//! mount) and [`restore`] (copies from any `ImageView`).
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_code)]

pub mod backup;
pub mod cache;
pub mod catalog;
pub mod chain;
pub mod cli;
pub mod fs;
pub mod overlay;
pub mod restore;
pub mod sample;
pub mod source;
pub mod view;

/// An error with its causes on one line (`what: why: deeper why`), for logs and the
/// command line; `std::error::Report` does this but is not stable yet.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    msg
}
