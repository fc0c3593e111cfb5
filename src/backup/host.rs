//! The hypervisor a backup reads from, for what libvirt does not carry: its files (boot
//! files, below) and its commands (`qemu-img info`, an offline disk's `qemu-nbd`).
//!
//! [`LocalHost`] is this machine. A remote URI (`qemu+ssh://`, `qemu+tcp://`,
//! `qemu+tls://`) gets a host reached over ssh; both answer through the same two calls,
//! so the backup's steps do not know which one they talk to.
//!
//! Invariants: a file is read whole into memory only up to the caller's bound (boot files
//! are small; a bigger one is refused, not truncated); a command's arguments are passed as
//! a vector, never through a shell on this machine.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// Why the host could not give a file.
#[derive(Debug, Error)]
pub enum HostError {
    #[error("{host}: cannot read {}", path.display())]
    Read {
        host: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{host}: {} is larger than {max} bytes; not copied", path.display())]
    TooLarge { host: String, path: PathBuf, max: u64 },
}

/// Where the domain's files are and its commands run.
pub trait Host: Send + Sync {
    /// For messages: `localhost`, `root@10.0.0.2`.
    fn name(&self) -> String;
    /// A command that runs `program args...` on the host; the caller adds arguments and
    /// runs it.
    fn command(&self, program: &str) -> Command;
    /// The whole file at `path` on the host, refused when larger than `max` bytes.
    fn read(&self, path: &Path, max: u64) -> Result<Vec<u8>, HostError>;
}

/// This machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalHost;

impl Host for LocalHost {
    fn name(&self) -> String {
        "localhost".into()
    }

    fn command(&self, program: &str) -> Command {
        Command::new(program)
    }

    fn read(&self, path: &Path, max: u64) -> Result<Vec<u8>, HostError> {
        let err = |source| HostError::Read { host: self.name(), path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(err)?;
        let mut data = Vec::new();
        // One byte past the bound tells a file of exactly `max` bytes from a larger one.
        file.take(max.saturating_add(1)).read_to_end(&mut data).map_err(err)?;
        if data.len() as u64 > max {
            return Err(HostError::TooLarge { host: self.name(), path: path.to_owned(), max });
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_files_are_read_whole_or_refused_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nvram.fd");
        std::fs::write(&p, vec![7u8; 100]).unwrap();
        assert_eq!(LocalHost.read(&p, 100).unwrap().len(), 100);
        let err = LocalHost.read(&p, 99).unwrap_err();
        assert!(matches!(err, HostError::TooLarge { max: 99, .. }), "{err}");
        let err = LocalHost.read(&dir.path().join("none"), 10).unwrap_err();
        assert!(err.to_string().contains("none"), "{err}");
    }

    #[test]
    fn local_commands_run_here() {
        let out = LocalHost.command("echo").arg("x y").output().unwrap();
        assert_eq!(out.stdout, b"x y\n");
    }
}
