//! Backing up a shut-off domain, as virtnbdbackup does: a read-only `qemu-nbd` of our own
//! per disk, serving the image's allocation (copy) or the persistent bitmap of the
//! chain's last checkpoint (inc, diff).
//!
//! Invariants: nothing here writes to an image or deletes a checkpoint or bitmap (the
//! images are opened `-r`, and libvirt is not called), so a failure leaves the chain's
//! bitmaps as they were; no new checkpoint is made. Each `qemu-nbd` exits when our one
//! connection closes and is killed on drop, so none outlives the run. Its stderr is kept
//! and named in the error when it fails (another process holding the image, a missing or
//! inconsistent bitmap).
//!
//! On a remote hypervisor the qemu-nbd runs there, started over ssh as virtnbdbackup
//! does: listening on TCP, `--nbd-port` + the disk's index (bound to `--nbd-ip` when
//! given), TLS with the certificates in `--tls-cert` there when `--tls`. It is tied to
//! the ssh session that started it ([`REMOTE_QEMU_NBD`]): it exits when our connection
//! closes, and is killed when the session ends, so it never outlives the run either.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::disk::Extents;
use super::domxml::DomDisk;
use super::folder::{CPT_PREFIX, Folder};
use super::host::Host;
use super::nbd::{Endpoint, Nbd, Tls};
use super::remote::{Reach, RemoteOptions, UriHost};
use super::save::{Plan, save_disks, save_side_files, while_reading_parts};
use super::ssh::SshHost;
use super::{BackupError, BackupOptions, Level, Outcome, Progress};

/// Run on the hypervisor with qemu-nbd's arguments: starts it in the background
/// (`--fork` returns once it listens, or fails with its message on stderr), says `up`,
/// then waits for our end of the session to close its stdin and stops the server if it
/// still runs (it exits by itself when our one connection closes).
const REMOTE_QEMU_NBD: &str = r#"f=$(mktemp) || exit 1
qemu-nbd --fork --pid-file="$f" "$@" </dev/null >/dev/null || { rm -f "$f"; exit 1; }
p=$(cat "$f"); rm -f "$f"
echo up
cat >/dev/null
kill "$p" 2>/dev/null
exit 0"#;

/// How long to wait for our own qemu-nbd to listen: it opens the image first, which
/// takes well under a second even for large images; 20 s allows for a loaded machine.
const QEMU_NBD_START: Duration = Duration::from_secs(20);

/// How long a qemu-nbd that refused our connection may take to exit: it exits at once
/// when it cannot open the image; 2 s allows for a loaded machine.
const QEMU_NBD_EXIT: Duration = Duration::from_secs(2);

/// How often to look whether qemu-nbd listens yet: short against its start-up time.
const QEMU_NBD_POLL: Duration = Duration::from_millis(20);

/// Why a disk's qemu-nbd did not serve.
#[derive(Debug, Error)]
pub enum QemuNbdError {
    #[error("{disk}: the domain XML names no source file to read while it is shut off")]
    NoSource { disk: String },
    #[error("{disk}: cannot run qemu-nbd")]
    Spawn {
        disk: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{disk}: qemu-nbd could not serve {image} ({status}): {}", stderr.trim())]
    Exited { disk: String, image: String, status: ExitStatus, stderr: String },
    #[error("{disk}: qemu-nbd did not listen on {} within {QEMU_NBD_START:?}", socket.display())]
    NoSocket { disk: String, socket: PathBuf },
    #[error("{disk}: the hypervisor is not reached over ssh; cannot start qemu-nbd there")]
    NoSsh { disk: String },
}

/// Where a qemu-nbd listens.
enum Listen {
    Unix(PathBuf),
    Tcp { host: String, port: u16, tls: bool },
}

/// qemu-nbd's arguments to listen on TCP `port` (bound to `--nbd-ip` when given), with
/// TLS when `--tls`: as virtnbdbackup, the server's certificates in `--tls-cert` there,
/// clients not verified.
fn tcp_args(port: u16, remote: &RemoteOptions) -> Vec<String> {
    let mut argv = vec!["-p".to_owned(), port.to_string()];
    if let Some(ip) = &remote.nbd_ip {
        argv.extend(["-b".into(), ip.clone()]);
    }
    if remote.tls {
        let creds = format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=false",
            remote.tls_cert.display()
        );
        argv.extend(["--object".into(), creds, "--tls-creds".into(), "tls0".into()]);
    }
    argv
}

/// A qemu-nbd serving one disk of a shut-off domain (or a remote restore's target),
/// stopped on drop.
pub struct QemuNbd {
    child: Child,
    listen: Listen,
    disk: String,
    image: String,
}

impl QemuNbd {
    /// On this machine, on a unix socket: `socket`, `-f`'s prefix (upstream's `<socketfile>.<disk>`), else one in `scratch`.
    fn start(
        d: &DomDisk,
        bitmap: Option<&str>,
        scratch: &Path,
        socket: Option<&Path>,
    ) -> Result<QemuNbd, QemuNbdError> {
        let image = source(d)?;
        let socket = match socket {
            Some(s) => PathBuf::from(format!("{}.{}", s.display(), d.target)),
            None => scratch.join(format!("vmback.{}.{}.sock", std::process::id(), d.target)),
        };
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new("qemu-nbd");
        // No --persistent: qemu-nbd exits when our one connection closes, also when vmback
        // is killed, so no server outlives the backup.
        cmd.arg("-r").arg(format!("--format={}", d.format));
        // Two clients: ours, and `-q`'s nbdinfo, which connects while ours is open.
        cmd.arg("--shared=2");
        cmd.args(["-x", &d.target]).arg("-k").arg(&socket);
        if let Some(b) = bitmap {
            cmd.arg(format!("--bitmap={b}"));
        }
        cmd.arg(&image).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|source| QemuNbdError::Spawn { disk: d.target.clone(), source })?;
        let mut q = QemuNbd { child, listen: Listen::Unix(socket.clone()), disk: d.target.clone(), image };
        let deadline = Instant::now() + QEMU_NBD_START;
        // qemu-nbd may make its socket before it opens the image: it listens only once
        // the socket exists and the process still runs.
        loop {
            q.check()?;
            if socket.exists() {
                return Ok(q);
            }
            if Instant::now() > deadline {
                return Err(QemuNbdError::NoSocket { disk: q.disk.clone(), socket });
            }
            std::thread::sleep(QEMU_NBD_POLL);
        }
    }

    /// On the remote hypervisor `host`, on TCP `port` (see the module note); connects to
    /// it at `address`.
    fn start_remote(
        host: &SshHost,
        d: &DomDisk,
        bitmap: Option<&str>,
        address: &str,
        port: u16,
        opts: &BackupOptions,
    ) -> Result<QemuNbd, QemuNbdError> {
        let image = source(d)?;
        let mut argv: Vec<String> =
            vec!["-r".into(), format!("--format={}", d.format), "-x".into(), d.target.clone()];
        argv.extend(tcp_args(port, &opts.remote));
        if let Some(b) = bitmap {
            argv.push(format!("--bitmap={b}"));
        }
        argv.push(image.clone());
        Self::spawn_remote(host, argv, &d.target, image, address, port, opts.remote.tls)
    }

    /// A writable qemu-nbd on the remote host `host` serving `image` (format `format`) as
    /// export `export` to up to `clients` connections at once, on TCP as
    /// [`QemuNbd::start_remote`]: the target of a remote restore.
    pub fn start_writable_remote(
        host: &SshHost,
        image: &str,
        format: &str,
        export: &str,
        clients: usize,
        address: &str,
        remote: &RemoteOptions,
    ) -> Result<QemuNbd, QemuNbdError> {
        let mut argv: Vec<String> = vec![
            format!("--format={format}"),
            "-x".into(),
            export.to_owned(),
            format!("--shared={}", clients.max(1)),
        ];
        argv.extend(tcp_args(remote.nbd_port, remote));
        argv.push(image.to_owned());
        Self::spawn_remote(host, argv, export, image.to_owned(), address, remote.nbd_port, remote.tls)
    }

    /// Runs qemu-nbd `argv` there through [`REMOTE_QEMU_NBD`] and waits until it listens.
    fn spawn_remote(
        host: &SshHost,
        argv: Vec<String>,
        disk: &str,
        image: String,
        address: &str,
        port: u16,
        tls: bool,
    ) -> Result<QemuNbd, QemuNbdError> {
        let mut child = host
            .spawn_tied(REMOTE_QEMU_NBD, &argv)
            .map_err(|source| QemuNbdError::Spawn { disk: disk.to_owned(), source })?;
        let listen = Listen::Tcp { host: address.to_owned(), port, tls };
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        // named with the host in messages: the path is one there
        let image = format!("{}:{image}", host.name());
        let mut q = QemuNbd { child, listen, disk: disk.to_owned(), image };
        if line.trim() == "up" {
            return Ok(q);
        }
        // It failed: the session ends, with qemu-nbd's (or ssh's) message on stderr.
        match q.child.wait() {
            Ok(status) => Err(q.exited(status)),
            Err(source) => Err(QemuNbdError::Spawn { disk: q.disk.clone(), source }),
        }
    }

    /// An error with qemu-nbd's own words once it has exited.
    fn check(&mut self) -> Result<(), QemuNbdError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(self.exited(status)),
            _ => Ok(()),
        }
    }

    fn exited(&mut self, status: ExitStatus) -> QemuNbdError {
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        QemuNbdError::Exited { disk: self.disk.clone(), image: self.image.clone(), status, stderr }
    }

    /// Connects to it; when that fails because qemu-nbd exited, says why it did.
    pub fn connect(&mut self, context: &str) -> Result<Nbd, BackupError> {
        let endpoint = match &self.listen {
            Listen::Unix(socket) => Endpoint::Unix(socket),
            Listen::Tcp { host, port, tls } => Endpoint::Tcp {
                host,
                port: *port,
                tls: if *tls { Tls::Required { certificates: None } } else { Tls::Off },
            },
        };
        Nbd::connect(endpoint, &self.disk, context).map_err(|e| {
            // The connection is refused when qemu-nbd gave up on the image after making
            // its socket: give it a moment to exit and say why.
            let deadline = Instant::now() + QEMU_NBD_EXIT;
            loop {
                if let Err(q) = self.check() {
                    return BackupError::QemuNbd(q);
                }
                if Instant::now() > deadline {
                    return BackupError::Disk { disk: self.disk.clone(), source: e.into() };
                }
                std::thread::sleep(QEMU_NBD_POLL);
            }
        })
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // Remote: killing our ssh session closes the remote script's stdin, which stops
        // the server there.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Listen::Unix(socket) = &self.listen {
            let _ = std::fs::remove_file(socket);
        }
    }
}

fn source(d: &DomDisk) -> Result<String, QemuNbdError> {
    d.source.clone().ok_or_else(|| QemuNbdError::NoSource { disk: d.target.clone() })
}

/// Backs up the shut-off domain (`level` is copy, inc or diff).
#[expect(
    clippy::too_many_arguments,
    reason = "the run's parts, each used once; a struct would only rename them"
)]
pub fn offline(
    reach: &Reach,
    xml: &str,
    disks: &[DomDisk],
    level: Level,
    folder: &Folder,
    opts: &BackupOptions,
    progress: Progress<'_>,
    autostart: bool,
) -> Result<Outcome, BackupError> {
    let parent = folder.checkpoints.last().cloned().filter(|_| level != Level::Copy);
    let bitmap = parent.clone();
    let remote = UriHost::parse(&opts.uri);
    let host = reach.host();
    let mut servers = disks
        .iter()
        .enumerate()
        .map(|(i, d)| match &remote {
            None => QemuNbd::start(d, bitmap.as_deref(), &opts.scratch_dir, opts.job.socket.as_deref()),
            Some(r) => {
                let ssh = reach.ssh().ok_or_else(|| QemuNbdError::NoSsh { disk: d.target.clone() })?;
                // one port per disk from --nbd-port on, as virtnbdbackup
                let port = opts.remote.nbd_port.saturating_add(i as u16);
                QemuNbd::start_remote(ssh, d, bitmap.as_deref(), r.nbd_address(&opts.remote), port, opts)
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ident = match level {
        Level::Copy => "copy".to_owned(),
        _ => folder.unique_time()?,
    };
    // An offline inc or diff holds every change since the last checkpoint and makes no
    // new one: its checkpointName is its parent (FORMAT.md §1.4).
    let plan = Plan {
        level,
        kind: if bitmap.is_some() { Extents::Dirty } else { Extents::Allocation },
        meta_cpt: parent.clone().unwrap_or_else(|| format!("{CPT_PREFIX}0")),
        parent: parent.unwrap_or_default(),
        ident: ident.clone(),
    };
    let context = match &bitmap {
        Some(b) => format!("qemu:dirty-bitmap:{b}"),
        None => "base:allocation".to_owned(),
    };
    // The side files' parts from the hypervisor while the data moves.
    let (outcome, parts) = while_reading_parts(host, xml, disks, opts, || {
        save_disks(disks, &plan, folder, opts, progress, |d| {
            let i = disks.iter().position(|x| x.target == d.target).expect("one of ours");
            servers[i].connect(&context)
        })
    });
    let outcome = outcome?;
    drop(servers);
    if let (Outcome::Saved { .. }, Some(parts)) = (&outcome, parts) {
        save_side_files(folder, xml, parts, &ident, autostart)?;
    }
    Ok(outcome)
}
