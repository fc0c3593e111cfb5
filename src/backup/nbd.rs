//! A small safe binding of the libnbd C library (Debian `libnbd-dev`): connect to an NBD
//! export over a unix socket, query extents (`base:allocation` or a dirty bitmap) and
//! read. Only the calls vmback uses are bound.
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
    fn nbd_can_meta_context(h: *mut nbd_handle, name: *const c_char) -> c_int;
    fn nbd_get_size(h: *mut nbd_handle) -> i64;
    fn nbd_get_block_size(h: *mut nbd_handle, size_type: c_int) -> i64;
    fn nbd_pread(h: *mut nbd_handle, buf: *mut c_void, count: usize, offset: u64, flags: u32) -> c_int;
    fn nbd_block_status(h: *mut nbd_handle, count: u64, offset: u64, cb: ExtentCallback, flags: u32)
    -> c_int;
    fn nbd_shutdown(h: *mut nbd_handle, flags: u32) -> c_int;
}

/// `LIBNBD_SIZE_MAXIMUM`: the server's largest request.
const SIZE_MAXIMUM: c_int = 2;

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

fn cstring(op: &'static str, s: &str) -> Result<CString, NbdError> {
    CString::new(s).map_err(|_| NbdError { op, message: format!("{s:?} contains NUL"), errno: libc::EINVAL })
}

/// One connection. See the module note.
pub struct Nbd {
    h: *mut nbd_handle,
}

// SAFETY: libnbd handles may be used from any thread (libnbd locks each handle
// internally); `Nbd` is moved to its worker thread, never shared without `&mut`.
unsafe impl Send for Nbd {}

impl Nbd {
    /// Connects to `export` on the unix socket `socket`, asking for `meta_context`
    /// (`base:allocation`, `qemu:dirty-bitmap:...`).
    pub fn connect_unix(socket: &Path, export: &str, meta_context: &str) -> Result<Nbd, NbdError> {
        // SAFETY: nbd_create has no preconditions; NULL means failure.
        let h = unsafe { nbd_create() };
        if h.is_null() {
            return Err(last_error("create"));
        }
        let nbd = Nbd { h };
        let name = cstring("set export name", export)?;
        let ctx = cstring("add meta context", meta_context)?;
        let path = cstring("connect", &socket.to_string_lossy())?;
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
            if nbd_connect_unix(h, path.as_ptr()) == -1 {
                return Err(last_error("connect"));
            }
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
        if r == -1 { Err(last_error("pread")) } else { Ok(()) }
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
        if r == -1 { Err(last_error("block status")) } else { Ok(out) }
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
