//! `-o -`: the backup as an uncompressed zip archive on standard output, as virtnbdbackup
//! writes it (`virtnbdbackup -o - > backup.zip`): its members are the data files by their
//! base names (each followed by its `.chksum` sidecar, as a folder backup has them), the
//! `vmconfig.<ident>.xml` and `<disk>.<ident>.qcow.json` side files and, for a full or
//! inc, `<domain>.cpt` and `checkpoints/` with every checkpoint's XML. The checkpoint
//! files themselves stay in the current folder, as upstream keeps them (it runs with
//! output `./`), so the next `-o -` inc run from the same folder continues the chain.
//!
//! The archive is streamed: each member is written once, in order, through the zip
//! crate's streaming writer (stored, zip64 headers, sizes and CRC in a data descriptor
//! after the data), so stdout may be a pipe, and nothing but a write buffer is held in
//! memory. The data files are the bytes a folder backup writes (the same stream writer,
//! handed this member as its sink).
//!
//! Invariants: only [`ZipOut::finish`] writes the central directory. A run that fails
//! leaves the archive without one, so no tool reads it as a complete backup: the writer
//! is then never dropped, because the zip crate's drop would write the directory (it
//! leaks one write buffer in a process that is about to exit with the error).

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::mem::ManuallyDrop;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use thiserror::Error;
use zip::write::{SimpleFileOptions, StreamWriter};
use zip::{CompressionMethod, ZipWriter};

/// Write buffer in front of stdout: the stream writer writes frame headers of a few
/// dozen bytes between payloads of up to 32 MiB; 1 MiB makes the small ones few syscalls.
const OUT_BUFFER: usize = 1 << 20;

/// Why the archive could not be written.
#[derive(Debug, Error)]
pub enum ZipOutError {
    #[error("-o -: standard output is a terminal; redirect it to a file or pipe (> backup.zip)")]
    Terminal,
    #[error("-o -: cannot use standard output")]
    Stdout(#[source] io::Error),
    #[error("-o -: writing member {member} of the zip on standard output")]
    Write {
        member: String,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("-o -: reading {path} to add it to the zip")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("-o -: the zip writer failed before")]
    Failed,
}

type Sink = ZipWriter<StreamWriter<Box<dyn Write + Send>>>;

/// The archive being written; see the module note.
pub struct ZipOut {
    /// `None` once a member failed: the archive is then abandoned, never finished.
    writer: Mutex<Option<ManuallyDrop<Sink>>>,
}

/// Members get the time they are written at, in local time as upstream's `localtime()`;
/// the zip format cannot hold a time before 1980 (a wrong clock), which gets 1980.
fn now() -> zip::DateTime {
    use chrono::{Datelike, Timelike};
    let t = chrono::Local::now();
    let part = |v: u32| u8::try_from(v).unwrap_or(0);
    zip::DateTime::from_date_and_time(
        u16::try_from(t.year()).unwrap_or(1980),
        part(t.month()),
        part(t.day()),
        part(t.hour()),
        part(t.minute()),
        part(t.second()),
    )
    .unwrap_or_default()
}

fn options() -> SimpleFileOptions {
    SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        // zip64 headers for every member, as upstream's force_zip64: a data file's size is
        // not known when its header is written and may pass 4 GiB.
        .large_file(true)
        .last_modified_time(now())
}

impl ZipOut {
    /// The archive on standard output (refused on a terminal).
    pub fn stdout() -> Result<ZipOut, ZipOutError> {
        let stdout = io::stdout();
        if stdout.is_terminal() {
            return Err(ZipOutError::Terminal);
        }
        // Our own handle on fd 1, around std's line buffer (nothing else writes there).
        let fd = stdout.as_fd().try_clone_to_owned().map_err(ZipOutError::Stdout)?;
        Ok(ZipOut::new(Box::new(BufWriter::with_capacity(OUT_BUFFER, File::from(fd)))))
    }

    /// The archive written to `out`, which need not be seekable.
    pub fn new(out: Box<dyn Write + Send>) -> ZipOut {
        ZipOut { writer: Mutex::new(Some(ManuallyDrop::new(ZipWriter::new_stream(out)))) }
    }

    /// Runs `f` on the archive; a failure abandons it (see the module note).
    fn with<T>(
        &self,
        member: &str,
        f: impl FnOnce(&mut Sink) -> zip::result::ZipResult<T>,
    ) -> Result<T, ZipOutError> {
        let mut guard = self.writer.lock();
        let w = guard.as_mut().ok_or(ZipOutError::Failed)?;
        f(w).map_err(|source| {
            *guard = None;
            ZipOutError::Write { member: member.to_owned(), source }
        })
    }

    /// Writes member `name` with what `write` writes into it. An error of `write` also
    /// abandons the archive, and is returned as it is.
    pub fn member<T, E: From<ZipOutError>>(
        &self,
        name: &str,
        write: impl FnOnce(&mut dyn Write) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut guard = self.writer.lock();
        let w = guard.as_mut().ok_or(ZipOutError::Failed)?;
        if let Err(source) = w.start_file(name, options()) {
            *guard = None;
            return Err(ZipOutError::Write { member: name.to_owned(), source }.into());
        }
        match write(&mut **w) {
            Ok(v) => Ok(v),
            Err(e) => {
                *guard = None;
                Err(e)
            }
        }
    }

    /// Adds member `name` holding `bytes`.
    pub fn add_bytes(&self, name: &str, bytes: &[u8]) -> Result<(), ZipOutError> {
        self.with(name, |w| {
            w.start_file(name, options())?;
            w.write_all(bytes)?;
            Ok(())
        })
    }

    /// Adds the local file `path` as member `name`.
    pub fn add_file(&self, name: &str, path: &Path) -> Result<(), ZipOutError> {
        let bytes =
            std::fs::read(path).map_err(|source| ZipOutError::Read { path: path.to_owned(), source })?;
        self.add_bytes(name, &bytes)
    }

    /// Adds the folder member `name/`.
    pub fn add_dir(&self, name: &str) -> Result<(), ZipOutError> {
        self.with(name, |w| w.add_directory(name, options()))
    }

    /// Writes the central directory and flushes: the archive is complete.
    pub fn finish(&self) -> Result<(), ZipOutError> {
        let w = self.writer.lock().take().ok_or(ZipOutError::Failed)?;
        let mut out = ManuallyDrop::into_inner(w)
            .finish()
            .map_err(|source| ZipOutError::Write { member: "(central directory)".into(), source })?
            .into_inner();
        out.flush().map_err(|e| ZipOutError::Write { member: "(central directory)".into(), source: e.into() })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::source::zip::read_directory;
    use crate::source::{MemSource, Source};

    /// A sink the test reads back: not seekable, as a pipe.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn members(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mem = MemSource::new();
        mem.insert("a.zip", bytes.to_vec());
        let dir = read_directory(&*mem.open(Path::new("a.zip")).expect("open"), Path::new("a.zip"))
            .expect("a readable zip");
        assert!(dir.skipped.is_empty(), "{:?}", dir.skipped);
        let name =
            |m: &crate::source::zip::Member| format!("{}{}", m.name.display(), if m.dir { "/" } else { "" });
        dir.members
            .iter()
            .map(|m| (name(m), bytes[m.start as usize..(m.start + m.len) as usize].to_vec()))
            .collect()
    }

    #[test]
    fn a_streamed_archive_reads_back_member_for_member() {
        let sink = Shared::default();
        let zip = ZipOut::new(Box::new(sink.clone()));
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        zip.member("sda.full.data", |w| w.write_all(&data).map_err(ZipOutError::Stdout)).expect("member");
        zip.add_bytes("sda.full.data.chksum", b"12345").expect("bytes");
        zip.add_dir("checkpoints").expect("dir");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("c.xml"), b"<c/>").expect("write");
        zip.add_file("checkpoints/virtnbdbackup.0.xml", &dir.path().join("c.xml")).expect("file");
        zip.finish().expect("finish");
        let bytes = sink.0.lock().clone();
        assert_eq!(
            members(&bytes),
            [
                ("sda.full.data".to_owned(), data),
                ("sda.full.data.chksum".to_owned(), b"12345".to_vec()),
                ("checkpoints/".to_owned(), vec![]),
                ("checkpoints/virtnbdbackup.0.xml".to_owned(), b"<c/>".to_vec()),
            ]
        );
        assert!(matches!(zip.finish(), Err(ZipOutError::Failed)), "finished once");
    }

    /// A member whose writer fails leaves an archive with no central directory, and
    /// nothing more is written to it.
    #[test]
    fn a_failed_member_abandons_the_archive() {
        let sink = Shared::default();
        let zip = ZipOut::new(Box::new(sink.clone()));
        zip.add_bytes("vm.cpt", b"[]").expect("bytes");
        let failed: Result<(), ZipOutError> = zip.member("sda.full.data", |w| {
            w.write_all(b"half a stream").map_err(ZipOutError::Stdout)?;
            Err(ZipOutError::Stdout(io::Error::other("NBD went away")))
        });
        assert!(failed.is_err());
        let len = sink.0.lock().len();
        assert!(matches!(zip.add_bytes("x", b"y"), Err(ZipOutError::Failed)));
        assert!(matches!(zip.finish(), Err(ZipOutError::Failed)));
        let bytes = sink.0.lock().clone();
        assert_eq!(bytes.len(), len, "nothing written after the failure");
        assert!(!bytes.windows(4).any(|w| w == b"PK\x05\x06"), "no end of central directory");
    }

    /// An archive dropped unfinished (the run failed after its data) gets no central
    /// directory either: the zip crate's drop never runs.
    #[test]
    fn an_unfinished_archive_stays_unfinished() {
        let sink = Shared::default();
        {
            let zip = ZipOut::new(Box::new(sink.clone()));
            zip.add_bytes("vm.cpt", b"[]").expect("bytes");
        }
        let bytes = sink.0.lock().clone();
        assert!(bytes.starts_with(b"PK\x03\x04"), "the member was written");
        assert!(!bytes.windows(4).any(|w| w == b"PK\x01\x02"), "no central directory");
    }
}
