//! The hypervisor a backup reads from, for what libvirt does not carry: its files (boot
//! files, below) and its commands (`qemu-img info`, an offline disk's `qemu-nbd`).
//!
//! [`LocalHost`] is this machine. A remote URI (`qemu+ssh://`, `qemu+tcp://`,
//! `qemu+tls://`) gets a host reached over ssh; both answer through the same two calls,
//! so the backup's steps do not know which one they talk to. A restore writes the
//! restored VM's small files (boot files, domain XML) there through the third.
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
    #[error("{host}: cannot write {}", path.display())]
    Write {
        host: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{host}: {} exists already; remove it or choose another output folder", path.display())]
    Exists { host: String, path: PathBuf },
}

/// Where the domain's files are and its commands run (or, for a restore, will be).
pub trait Host: Send + Sync {
    /// For messages: `localhost`, `root@10.0.0.2`.
    fn name(&self) -> String;
    /// A command that runs `program args...` on the host; the caller adds arguments and
    /// runs it.
    fn command(&self, program: &str) -> Command;
    /// The whole file at `path` on the host, refused when larger than `max` bytes.
    fn read(&self, path: &Path, max: u64) -> Result<Vec<u8>, HostError>;
    /// Writes a new file `path` on the host holding `data`: through `path.partial`,
    /// synced, renamed when whole; never over an existing file ([`HostError::Exists`]).
    fn write_new(&self, path: &Path, data: &[u8]) -> Result<(), HostError>;
}

/// `NAME.partial` beside `NAME`: where a file is written until it is whole.
pub fn partial(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
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

    fn write_new(&self, path: &Path, data: &[u8]) -> Result<(), HostError> {
        use std::io::Write;
        if path.exists() {
            return Err(HostError::Exists { host: self.name(), path: path.to_owned() });
        }
        let partial = partial(path);
        let err = |p: &Path| {
            let (host, path) = (self.name(), p.to_owned());
            move |source| HostError::Write { host, path, source }
        };
        let mut f = std::fs::File::create(&partial).map_err(err(&partial))?;
        f.write_all(data).and_then(|()| f.sync_all()).map_err(err(&partial))?;
        std::fs::rename(&partial, path).map_err(err(path))
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
    fn new_files_are_never_written_over_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("vm1_VARS.fd");
        LocalHost.write_new(&to, b"one").unwrap();
        assert!(matches!(LocalHost.write_new(&to, b"two"), Err(HostError::Exists { .. })));
        assert_eq!(std::fs::read(&to).unwrap(), b"one");
        assert!(!dir.path().join("vm1_VARS.fd.partial").exists());
    }

    #[test]
    fn local_commands_run_here() {
        let out = LocalHost.command("echo").arg("x y").output().unwrap();
        assert_eq!(out.stdout, b"x y\n");
    }
}
