//! A small safe binding of the libnbd C library (Debian `libnbd-dev`): connect to an NBD
//! export over a unix socket or TCP (optionally TLS), query extents (`base:allocation` or
//! a dirty bitmap), read, and write (a remote restore writes its images through a
//! qemu-nbd on the target host). Only the calls vmback uses are bound.
//!
//! TLS ([`Endpoint::Tcp`] with [`Tls::Required`]) is required, never merely allowed: a
//! backup asked to use TLS must not fall back to plain text. The certificate folder holds
//! `ca-cert.pem`, `client-cert.pem` and `client-key.pem` (qemu's and libnbd's x509
//! layout), by default libnbd's own (`$HOME/.pki/libnbd`, `/etc/pki/libnbd` for root, as
//! virtnbdbackup's libnbd uses); libnbd checks the server's certificate against the host
//! name it dialled.
//!
//! A TCP connection must notice a lost network instead of waiting for a reply forever:
//! once connected, its socket gets keepalive probes and a TCP user timeout
//! ([`TCP_DEAD_AFTER`]), so a read on a cut link fails with ETIMEDOUT.
//!
//! A [`Nbd`] owns one `nbd_handle`. libnbd handles are thread-safe, but vmback gives each
//! disk worker its own connection, so requests of different disks never wait on each
//! other. Every `unsafe` block in the crate's NBD path is here, each with its reason.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;

use thiserror::Error;

#[allow(non_camel_case_types)]
#[repr(C)]
struct nbd_handle {
    _private: [u8; 0],
}

/// libnbd's `nbd_extent_callback`.
#[repr(C)]
struct ExtentCallback {
    callback: extern "C" fn(*mut c_void, *const c_char, u64, *mut u32, usize, *mut c_int) -> c_int,
    user_data: *mut c_void,
    free: Option<extern "C" fn(*mut c_void)>,
}

#[link(name = "nbd")]
unsafe extern "C" {
    fn nbd_create() -> *mut nbd_handle;
    fn nbd_close(h: *mut nbd_handle);
    fn nbd_get_error() -> *const c_char;
    fn nbd_get_errno() -> c_int;
    fn nbd_set_export_name(h: *mut nbd_handle, name: *const c_char) -> c_int;
    fn nbd_set_pread_initialize(h: *mut nbd_handle, request: bool) -> c_int;
    fn nbd_add_meta_context(h: *mut nbd_handle, name: *const c_char) -> c_int;
    fn nbd_connect_unix(h: *mut nbd_handle, path: *const c_char) -> c_int;
    fn nbd_connect_tcp(h: *mut nbd_handle, hostname: *const c_char, port: *const c_char) -> c_int;
    fn nbd_set_tls(h: *mut nbd_handle, tls: c_int) -> c_int;
    fn nbd_set_tls_certificates(h: *mut nbd_handle, dir: *const c_char) -> c_int;
    fn nbd_aio_get_fd(h: *mut nbd_handle) -> c_int;
    fn nbd_can_meta_context(h: *mut nbd_handle, name: *const c_char) -> c_int;
    fn nbd_get_size(h: *mut nbd_handle) -> i64;
    fn nbd_get_block_size(h: *mut nbd_handle, size_type: c_int) -> i64;
    fn nbd_pread(h: *mut nbd_handle, buf: *mut c_void, count: usize, offset: u64, flags: u32) -> c_int;
    fn nbd_pwrite(h: *mut nbd_handle, buf: *const c_void, count: usize, offset: u64, flags: u32) -> c_int;
    fn nbd_flush(h: *mut nbd_handle, flags: u32) -> c_int;
    fn nbd_block_status(h: *mut nbd_handle, count: u64, offset: u64, cb: ExtentCallback, flags: u32)
    -> c_int;
    fn nbd_shutdown(h: *mut nbd_handle, flags: u32) -> c_int;
    fn nbd_get_uri(h: *mut nbd_handle) -> *mut c_char;
}

/// `LIBNBD_SIZE_MAXIMUM`: the server's largest request.
const SIZE_MAXIMUM: c_int = 2;
/// `LIBNBD_TLS_REQUIRE`: fail unless the server agrees to TLS (see the module note).
const TLS_REQUIRE: c_int = 2;

/// A TCP connection whose peer acknowledged nothing for this long is given up (TCP user
/// timeout; keepalive probes make an idle connection count too). A live hypervisor acks
/// within milliseconds even under load; 30 s rides out a switch or link flap, and a
/// backup on a cut network fails within a minute instead of never.
pub const TCP_DEAD_AFTER: std::time::Duration = std::time::Duration::from_secs(30);
/// Idle seconds before the first keepalive probe, and between probes: a third of the
/// user timeout, so about three probes go out before it gives up.
const KEEPALIVE_SECS: c_int = 10;

/// TLS on a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls<'a> {
    /// Plain NBD.
    Off,
    /// TLS or nothing; client certificates from `certificates`, else libnbd's default
    /// folders (see the module note).
    Required { certificates: Option<&'a Path> },
}

/// Where an NBD server listens.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint<'a> {
    /// A unix socket (a local backup job's NBD server, or a local qemu-nbd).
    Unix(&'a Path),
    /// TCP: the NBD server of a remote hypervisor (`--nbd-ip`, `--nbd-port`, `--tls`).
    Tcp { host: &'a str, port: u16, tls: Tls<'a> },
}

/// An NBD failure, with libnbd's message.
#[derive(Debug, Error)]
#[error("NBD {op}: {message}")]
pub struct NbdError {
    pub op: &'static str,
    pub message: String,
    pub errno: i32,
}

fn last_error(op: &'static str) -> NbdError {
    // SAFETY: nbd_get_error returns a thread-local string owned by libnbd (or NULL), valid
    // until the next libnbd call on this thread; it is copied out at once.
    let msg = unsafe { nbd_get_error() };
    let message = if msg.is_null() {
        "unknown error".to_owned()
    } else {
        // SAFETY: non-null, NUL-terminated, see above.
        unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned()
    };
    // SAFETY: a plain read of libnbd's thread-local errno.
    let errno = unsafe { nbd_get_errno() };
    NbdError { op, message, errno }
}

/// `e` with the place it was about put in front of its message.
fn at(mut e: NbdError, place: &dyn std::fmt::Display) -> NbdError {
    e.message = format!("{place}: {}", e.message);
    e
}

fn cstring(op: &'static str, s: &str) -> Result<CString, NbdError> {
    CString::new(s).map_err(|_| NbdError { op, message: format!("{s:?} contains NUL"), errno: libc::EINVAL })
}

/// One connection. See the module note.
pub struct Nbd {
    h: *mut nbd_handle,
    /// The meta context asked for at connect time.
    context: String,
    /// `host:port` of a TCP connection, for saying that the network was lost.
    peer: Option<String>,
}

// SAFETY: libnbd handles may be used from any thread (libnbd locks each handle
// internally); `Nbd` is moved to its worker thread, never shared without `&mut`.
unsafe impl Send for Nbd {}

impl Nbd {
    /// Connects to `export` at `endpoint`, asking for `meta_context` (`base:allocation`,
    /// `qemu:dirty-bitmap:...`).
    pub fn connect(endpoint: Endpoint<'_>, export: &str, meta_context: &str) -> Result<Nbd, NbdError> {
        // SAFETY: nbd_create has no preconditions; NULL means failure.
        let h = unsafe { nbd_create() };
        if h.is_null() {
            return Err(last_error("create"));
        }
        let mut nbd = Nbd { h, context: meta_context.to_owned(), peer: None };
        let name = cstring("set export name", export)?;
        let ctx = cstring("add meta context", meta_context)?;
        // SAFETY: `h` is a live handle; the strings are NUL-terminated and outlive the calls
        // (libnbd copies them).
        unsafe {
            if nbd_set_export_name(h, name.as_ptr()) == -1 {
                return Err(last_error("set export name"));
            }
            // libnbd zeroes every read buffer first, in case a caller reads it after a
            // failed read. `pread` below takes an initialized `&mut [u8]` and never
            // returns its bytes on failure, so the zeroing only cost time: about a tenth
            // of a full backup's CPU (perf).
            if nbd_set_pread_initialize(h, false) == -1 {
                return Err(last_error("set pread initialize"));
            }
            if nbd_add_meta_context(h, ctx.as_ptr()) == -1 {
                return Err(last_error("add meta context"));
            }
        }
        nbd.dial(endpoint)?;
        if let Endpoint::Tcp { host, port, .. } = endpoint {
            nbd.peer = Some(format!("{host}:{port}"));
        }
        // SAFETY: as above.
        unsafe {
            match nbd_can_meta_context(h, ctx.as_ptr()) {
                1 => {}
                0 => {
                    return Err(NbdError {
                        op: "meta context",
                        message: format!("the server does not offer {meta_context}"),
                        errno: libc::ENOTSUP,
                    });
                }
                _ => return Err(last_error("meta context")),
            }
        }
        Ok(nbd)
    }

    /// Sets up TLS if asked, then connects (the handle is configured, not yet connected).
    fn dial(&self, endpoint: Endpoint<'_>) -> Result<(), NbdError> {
        match endpoint {
            Endpoint::Unix(socket) => {
                let path = cstring("connect", &socket.to_string_lossy())?;
                // SAFETY: live handle; NUL-terminated path that outlives the call.
                if unsafe { nbd_connect_unix(self.h, path.as_ptr()) } == -1 {
                    return Err(at(last_error("connect"), &socket.display()));
                }
            }
            Endpoint::Tcp { host, port, tls } => {
                if let Tls::Required { certificates } = tls {
                    // SAFETY: live handle, not connected yet.
                    if unsafe { nbd_set_tls(self.h, TLS_REQUIRE) } == -1 {
                        return Err(last_error("set tls"));
                    }
                    if let Some(dir) = certificates {
                        let dir = cstring("set tls certificates", &dir.to_string_lossy())?;
                        // SAFETY: live handle, not connected yet; libnbd copies the string.
                        if unsafe { nbd_set_tls_certificates(self.h, dir.as_ptr()) } == -1 {
                            return Err(last_error("set tls certificates"));
                        }
                    }
                }
                let c_host = cstring("connect", host)?;
                let c_port = cstring("connect", &port.to_string())?;
                let place = format!("{host}:{port}{}", if tls == Tls::Off { "" } else { " (TLS)" });
                // SAFETY: live handle; NUL-terminated strings that outlive the call.
                if unsafe { nbd_connect_tcp(self.h, c_host.as_ptr(), c_port.as_ptr()) } == -1 {
                    return Err(at(last_error("connect"), &place));
                }
                self.notice_lost_network().map_err(|e| at(e, &place))?;
            }
        }
        Ok(())
    }

    /// Keepalive and the TCP user timeout on the connected socket (see the module note).
    fn notice_lost_network(&self) -> Result<(), NbdError> {
        // SAFETY: live, connected handle; the fd stays libnbd's (not closed here).
        let fd = unsafe { nbd_aio_get_fd(self.h) };
        if fd < 0 {
            return Err(last_error("get socket"));
        }
        let timeout_ms = TCP_DEAD_AFTER.as_millis() as c_int;
        let opts = [
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_SECS),
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPALIVE_SECS),
            (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, timeout_ms),
        ];
        for (level, name, value) in opts {
            // SAFETY: `fd` is an open TCP socket; `value` is a c_int that outlives the call
            // and its size is passed.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    name,
                    (&value as *const c_int).cast(),
                    std::mem::size_of::<c_int>() as libc::socklen_t,
                )
            };
            if r == -1 {
                let e = std::io::Error::last_os_error();
                return Err(NbdError {
                    op: "set socket options",
                    message: e.to_string(),
                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                });
            }
        }
        Ok(())
    }

    /// The meta context this connection reads extents of (`base:allocation`, ...).
    pub fn context(&self) -> &str {
        &self.context
    }

    /// An NBD URI of the connected export, for tools that connect on their own
    /// (`nbd+unix:///vda?socket=...`, `nbd://host:port/vda`).
    pub fn uri(&self) -> Result<String, NbdError> {
        // SAFETY: live handle; the result is NULL or a malloc'ed NUL-terminated string that
        // the caller owns: copied, then freed once.
        unsafe {
            let p = nbd_get_uri(self.h);
            if p.is_null() {
                return Err(last_error("get uri"));
            }
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            libc::free(p.cast());
            Ok(s)
        }
    }

    /// The export's size in bytes.
    pub fn size(&self) -> Result<u64, NbdError> {
        // SAFETY: live handle.
        let n = unsafe { nbd_get_size(self.h) };
        u64::try_from(n).map_err(|_| last_error("get size"))
    }

    /// The server's largest request, if it says (qemu says 32 MiB).
    pub fn max_request(&self) -> Option<u64> {
        // SAFETY: live handle.
        let n = unsafe { nbd_get_block_size(self.h, SIZE_MAXIMUM) };
        u64::try_from(n).ok().filter(|&n| n > 0)
    }

    /// Reads `buf.len()` bytes at `offset` (at most the server's maximum request).
    pub fn pread(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        // SAFETY: live handle; `buf` is valid for writes of `buf.len()` bytes for the whole
        // (synchronous) call.
        let r = unsafe { nbd_pread(self.h, buf.as_mut_ptr().cast(), buf.len(), offset, 0) };
        if r == -1 { Err(self.lost(last_error("pread"))) } else { Ok(()) }
    }

    /// Writes `buf` at `offset` (at most the server's maximum request).
    pub fn pwrite(&mut self, buf: &[u8], offset: u64) -> Result<(), NbdError> {
        // SAFETY: live handle; `buf` is valid for reads of `buf.len()` bytes for the whole
        // (synchronous) call, and libnbd does not keep the pointer after it returns.
        let r = unsafe { nbd_pwrite(self.h, buf.as_ptr().cast(), buf.len(), offset, 0) };
        if r == -1 {
            Err(self.lost(at(last_error("pwrite"), &format_args!("offset {offset}"))))
        } else {
            Ok(())
        }
    }

    /// Makes every write so far durable on the server (NBD_CMD_FLUSH).
    pub fn flush(&mut self) -> Result<(), NbdError> {
        // SAFETY: live handle; a synchronous call with no buffers.
        let r = unsafe { nbd_flush(self.h, 0) };
        if r == -1 { Err(self.lost(last_error("flush"))) } else { Ok(()) }
    }

    /// The extents of `[offset, offset + count)` in the negotiated meta context, as
    /// `(length, flags)` pairs starting at `offset`. The server may answer for less than
    /// asked; the caller continues from where the answer ends.
    pub fn block_status(&mut self, count: u64, offset: u64) -> Result<Vec<(u64, u32)>, NbdError> {
        extern "C" fn collect(
            user: *mut c_void,
            _ctx: *const c_char,
            _offset: u64,
            entries: *mut u32,
            n: usize,
            _error: *mut c_int,
        ) -> c_int {
            // SAFETY: `user` is the `&mut Vec` passed below, alive for the synchronous call.
            let out = unsafe { &mut *(user as *mut Vec<(u64, u32)>) };
            if !entries.is_null() {
                // SAFETY: libnbd passes `n` u32 values (pairs of length and flags).
                let e = unsafe { std::slice::from_raw_parts(entries, n) };
                out.extend(e.chunks_exact(2).map(|p| (u64::from(p[0]), p[1])));
            }
            0
        }
        let mut out: Vec<(u64, u32)> = Vec::new();
        let cb = ExtentCallback {
            callback: collect,
            user_data: (&mut out as *mut Vec<(u64, u32)>).cast(),
            free: None,
        };
        // SAFETY: live handle; the callback only runs during this synchronous call, while
        // `out` is alive and not otherwise borrowed; `free` is None so libnbd keeps no
        // pointer to `out` afterwards.
        let r = unsafe { nbd_block_status(self.h, count, offset, cb, 0) };
        if r == -1 { Err(self.lost(last_error("block status"))) } else { Ok(out) }
    }
}

impl Nbd {
    /// `e`, saying so when it is a TCP connection that timed out (see the module note).
    fn lost(&self, mut e: NbdError) -> NbdError {
        if let Some(peer) = &self.peer
            && e.errno == libc::ETIMEDOUT
        {
            e.message = format!(
                "{} ({peer} acknowledged nothing for {TCP_DEAD_AFTER:?}: the network to it was lost)",
                e.message
            );
        }
        e
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        // SAFETY: `h` is live and dropped exactly once here; shutdown before close lets the
        // server see a clean disconnect (errors are irrelevant at this point).
        unsafe {
            nbd_shutdown(self.h, 0);
            nbd_close(self.h);
        }
    }
}

#[cfg(test)]
mod tests {
    //! TCP and TLS against a real qemu-nbd on the second host of the remote tests
    //! (contrib/realstack/remote-host.sh: its address, its server and client
    //! certificates). Needs root; skips otherwise.
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::{Endpoint, Nbd, Tls};

    /// One MiB into the 4 MiB image, 64 KiB of 0x5a: one allocated extent to find and read.
    const DATA_AT: u64 = 1 << 20;
    const DATA_LEN: usize = 64 << 10;

    fn run(c: &mut Command) -> String {
        let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
        assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    /// A qemu-nbd serving a 4 MiB qcow2 on the remote host; killed (by its pid) on drop.
    struct Server {
        pid: String,
        host: HashMap<String, String>,
        _dir: tempfile::TempDir,
        _in_use: nix::fcntl::Flock<std::fs::File>,
    }

    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/realstack/remote-host.sh")
    }

    impl Server {
        /// Serves on `port`; with `tls`, TLS only and client certificates verified.
        fn start(port: u16, tls: bool) -> Server {
            let env = |cmd: &str| -> HashMap<String, String> {
                run(Command::new(script()).arg(cmd))
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            };
            // the host in use, shared: the stack tests' fault test takes it alone (see
            // tests/stack/remote/host.rs), before `start` undoes its faults
            let lock = Path::new(&env("env")["VMBACK_REMOTE_STATE"]).join("use.lock");
            let _ = std::fs::create_dir_all(lock.parent().expect("a folder"));
            let file = std::fs::File::create(&lock).expect("use.lock");
            let in_use = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockShared).expect("flock");
            let host = env("start");
            // on /var/tmp: the host's mount namespace shares it (not the private /tmp of
            // a test runner, should it have one)
            let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
            let img = dir.path().join("img.qcow2");
            run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("4M"));
            let write = format!("write -q -P 0x5a {DATA_AT} {DATA_LEN}");
            run(Command::new("qemu-io").args(["-f", "qcow2", "-c", &write]).arg(&img));
            let pidfile = dir.path().join("pid");
            let mut c = Command::new(script());
            c.args(["exec", "qemu-nbd", "--fork", "--persistent", "-f", "qcow2", "-x", "disk"])
                .args(["-b", &host["VMBACK_REMOTE_ADDR"], "-p", &port.to_string()])
                .arg("--pid-file")
                .arg(&pidfile);
            if tls {
                let creds = format!(
                    "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir={}",
                    host["VMBACK_REMOTE_SERVER_PKI"]
                );
                c.args(["--object", &creds, "--tls-creds", "tls0"]);
            }
            run(c.arg(&img));
            let pid = std::fs::read_to_string(&pidfile).expect("qemu-nbd pid file").trim().to_owned();
            Server { pid, host, _dir: dir, _in_use: in_use }
        }

        /// The remote host's `VMBACK_REMOTE_<key>` (its address, certificate folders).
        fn get(&self, key: &str) -> &str {
            &self.host[&format!("VMBACK_REMOTE_{key}")]
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg(&self.pid).status();
        }
    }

    fn root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("skipping: the remote host needs root");
        }
        root
    }

    /// Connects, finds the data extent through base:allocation and reads it back.
    fn reads_the_image(host: &str, port: u16, tls: Tls<'_>) {
        let mut nbd =
            Nbd::connect(Endpoint::Tcp { host, port, tls }, "disk", "base:allocation").expect("connect");
        assert_eq!(nbd.size().expect("size"), 4 << 20);
        let extents = nbd.block_status(4 << 20, 0).expect("block status");
        let mut off = 0;
        let mut allocated = Vec::new();
        for (len, flags) in extents {
            // base:allocation flag 1 = hole
            if flags & 1 == 0 {
                allocated.push((off, len));
            }
            off += len;
        }
        assert!(
            allocated.iter().any(|&(o, l)| o <= DATA_AT && DATA_AT + DATA_LEN as u64 <= o + l),
            "{allocated:?}"
        );
        let mut buf = vec![0u8; DATA_LEN];
        nbd.pread(&mut buf, DATA_AT).expect("pread");
        assert!(buf.iter().all(|&b| b == 0x5a));
    }

    // Ports of these tests' own on the remote address (the backup tests use 10809-10810).
    const TCP_PORT: u16 = 10898;
    const TLS_PORT: u16 = 10899;

    #[test]
    fn tcp_reads_extents_and_data() {
        if !root() {
            return;
        }
        let server = Server::start(TCP_PORT, false);
        reads_the_image(server.get("ADDR"), TCP_PORT, Tls::Off);
    }

    #[test]
    fn tls_with_the_client_certificates_reads_and_without_them_fails_clearly() {
        if !root() {
            return;
        }
        let server = Server::start(TLS_PORT, true);
        let host = server.get("ADDR");
        reads_the_image(
            host,
            TLS_PORT,
            Tls::Required { certificates: Some(Path::new(server.get("NBD_CLIENT_PKI"))) },
        );

        // plain text to a TLS-only server: refused
        let e =
            Nbd::connect(Endpoint::Tcp { host, port: TLS_PORT, tls: Tls::Off }, "disk", "base:allocation")
                .err()
                .expect("plain connect to a TLS server must fail");
        assert!(e.message.starts_with(&format!("{host}:{TLS_PORT}: ")), "{e}");
        // a folder without our client certificate (the server's own: no client-cert.pem)
        let wrong = Path::new(server.get("SERVER_PKI"));
        let e = Nbd::connect(
            Endpoint::Tcp { host, port: TLS_PORT, tls: Tls::Required { certificates: Some(wrong) } },
            "disk",
            "base:allocation",
        )
        .err()
        .expect("TLS without a client certificate must fail");
        assert!(e.message.starts_with(&format!("{host}:{TLS_PORT} (TLS): ")), "{e}");
        eprintln!("as expected: {e}");
    }
}
