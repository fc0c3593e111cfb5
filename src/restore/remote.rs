//! Restoring onto another host, as virtnbdrestore restores to a remote `-U`: the images
//! are written there, not here. Over the same ssh connection a backup uses
//! (`backup::ssh`), `qemu-img create` makes each image there (`NAME.partial`, with the
//! original's qcow2 options, preallocated with `-A`), a writable `qemu-nbd` of ours serves
//! it on TCP (`--nbd-ip`/`--nbd-port`, TLS with `--tls`, as for a backup's offline disk)
//! and the copy writes it over NBD, one connection per worker. Only data is sent: holes
//! and all-zero blocks are left out (a fresh image reads as zeros there), unless
//! `--sparse=never`. When the image is whole, it is flushed, the server is stopped, and
//! the image is renamed to `NAME` once qemu-nbd has let go of it (`qemu-img info` takes
//! the image's lock only then), so a VM started at once finds it free.
//!
//! Invariants: no existing file there is written over (the target is checked first, and
//! `qemu-img create` writes only the `.partial`); the server never outlives the image's
//! restore (it is tied to our ssh session, see `backup::offline`). `--compress` is
//! refused: qemu-nbd writes plain clusters.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use thiserror::Error;

use super::copy::{Sink, copy_image};
use super::{DiskReport, Format, RestoreError, RestoreOptions};
use crate::backup::host::{Host, partial};
use crate::backup::nbd::{Nbd, NbdError};
use crate::backup::offline::QemuNbd;
use crate::backup::remote::{RemoteOptions, UriHost};
use crate::backup::ssh::{SshError, SshHost};
use crate::chain::ImageReader;

/// Why a remote restore failed.
#[derive(Debug, Error)]
pub enum RemoteError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Copy(#[from] RestoreError),
    #[error("{host}: {what} failed: {detail}")]
    Command { host: String, what: String, detail: String },
    #[error("{host}:{}: --compress is not supported for a remote restore (qemu-nbd writes plain clusters)", path.display())]
    Compress { host: String, path: PathBuf },
    #[error("{host}: {}: the output must be an absolute path there", path.display())]
    Relative { host: String, path: PathBuf },
    #[error("{host}:{}: exists already; remove it or choose another output folder", path.display())]
    Exists { host: String, path: PathBuf },
    #[error("{host}:{}: the NBD server", image.display())]
    Server {
        host: String,
        image: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{host}:{}: NBD", image.display())]
    Nbd {
        host: String,
        image: PathBuf,
        #[source]
        source: NbdError,
    },
}

/// The meta context asked for on a write connection: qemu-nbd offers it always; nothing
/// is read through it.
const WRITE_CONTEXT: &str = "base:allocation";

/// Run there with the image as `$1` and its final name as `$2`: waits until no process
/// holds the image's write lock (`qemu-img info` fails while qemu-nbd still has it
/// open), then renames it. 200 tries 50 ms apart: qemu-nbd closes an image in well under
/// a second once its last client has gone; 10 s allows for a loaded host.
const SETTLE_AND_RENAME: &str = r#"i=0
until qemu-img info -- "$1" >/dev/null 2>&1; do
  i=$((i + 1)); [ "$i" -ge 200 ] && { qemu-img info -- "$1" >&2; exit 1; }
  sleep 0.05
done
mv -- "$1" "$2""#;

/// The other host of a remote restore, connected over ssh.
pub struct RemoteTarget {
    ssh: SshHost,
    /// Where vmback connects to the NBD server there.
    address: String,
    opts: RemoteOptions,
}

impl RemoteTarget {
    /// For a libvirt `uri` naming another host: that host, over ssh (connected now);
    /// `None` for a URI of this machine.
    pub fn connect(uri: &str, opts: &RemoteOptions) -> Result<Option<RemoteTarget>, RemoteError> {
        let Some(h) = UriHost::parse(uri) else { return Ok(None) };
        let ssh = SshHost::connect(h.ssh_target(opts))?;
        Ok(Some(RemoteTarget { ssh, address: h.nbd_address(opts).to_owned(), opts: opts.clone() }))
    }

    pub fn host(&self) -> &dyn Host {
        &self.ssh
    }

    /// Runs `program args` there; an error with its stderr when it fails.
    fn run(&self, what: &str, program: &str, args: &[&std::ffi::OsStr]) -> Result<(), RemoteError> {
        let out = self.ssh.command(program).args(args).output();
        let detail = match out {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => e.to_string(),
        };
        Err(RemoteError::Command { host: self.ssh.name(), what: what.to_owned(), detail })
    }

    /// Makes the output folder `dir` there (with its parents); it must be absolute.
    pub fn make_dir(&self, dir: &Path) -> Result<(), RemoteError> {
        if !dir.is_absolute() {
            return Err(RemoteError::Relative { host: self.ssh.name(), path: dir.to_owned() });
        }
        self.run(&format!("mkdir {}", dir.display()), "mkdir", &["-p".as_ref(), "--".as_ref(), dir.as_ref()])
    }

    /// Writes the image of `reader` to a new file `target` there (see the module note).
    pub fn restore_image(
        &self,
        reader: &ImageReader,
        target: &Path,
        opts: &RestoreOptions,
        done: &(dyn Fn(u64) + Sync),
    ) -> Result<DiskReport, RemoteError> {
        let started = Instant::now();
        let host = self.ssh.name();
        if opts.compress {
            return Err(RemoteError::Compress { host, path: target.to_owned() });
        }
        if self.ssh.command("test").arg("-e").arg(target).status().is_ok_and(|s| s.success()) {
            return Err(RemoteError::Exists { host, path: target.to_owned() });
        }
        let image = partial(target);
        let size = reader.size();
        let format = opts.format.extension();
        let mut create = if opts.format == Format::Qcow2 { opts.qcow2_options.clone() } else { Vec::new() };
        if opts.preallocate {
            create.push("preallocation=full".to_owned());
        }
        let mut args: Vec<std::ffi::OsString> =
            vec!["create".into(), "-q".into(), "-f".into(), format.into()];
        if !create.is_empty() {
            args.extend(["-o".into(), create.join(",").into()]);
        }
        args.extend([image.clone().into_os_string(), size.to_string().into()]);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        self.run(&format!("qemu-img create {}", image.display()), "qemu-img", &args)?;
        let server_err = |source: Box<dyn std::error::Error + Send + Sync>| RemoteError::Server {
            host: host.clone(),
            image: image.clone(),
            source,
        };
        let threads = opts.threads.max(1);
        let export = target.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let image_str = image.to_string_lossy();
        let mut server = QemuNbd::start_writable_remote(
            &self.ssh,
            &image_str,
            format,
            &export,
            threads,
            &self.address,
            &self.opts,
        )
        .map_err(|e| server_err(e.into()))?;
        let conns = (0..threads)
            .map(|_| server.connect(WRITE_CONTEXT).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| server_err(e.into()))?;
        let sink = NbdSink { conns, image: &image };
        let stats = copy_image(reader, &sink, opts.sparse, threads, done)?;
        for c in &sink.conns {
            c.lock().expect("no panics while held").flush().map_err(|source| RemoteError::Nbd {
                host: host.clone(),
                image: image.clone(),
                source,
            })?;
        }
        drop(sink);
        drop(server);
        let args: [&std::ffi::OsStr; 5] =
            ["-c".as_ref(), SETTLE_AND_RENAME.as_ref(), "vmback".as_ref(), image.as_ref(), target.as_ref()];
        self.run(&format!("rename {} to {}", image.display(), target.display()), "sh", &args)?;
        Ok(DiskReport { target: target.to_owned(), size, stats, elapsed: started.elapsed() })
    }
}

/// An image being written over NBD: one connection per copy worker.
struct NbdSink<'a> {
    conns: Vec<Mutex<Nbd>>,
    image: &'a Path,
}

impl Sink for NbdSink<'_> {
    fn write_at(&self, worker: usize, data: &[u8], offset: u64) -> Result<(), RestoreError> {
        // each worker has its own connection: the lock is never contended
        let mut c = self.conns[worker % self.conns.len()].lock().expect("no panics while held");
        c.pwrite(data, offset).map_err(|e| RestoreError::Write {
            path: self.image.to_owned(),
            offset,
            source: std::io::Error::other(e),
        })
    }
}
