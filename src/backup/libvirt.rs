//! The libvirt calls of a backup that the `virt` crate has no safe wrappers for:
//! checkpoints (list, look up, create or redefine, XML, delete), starting, describing and
//! ending a pull-mode backup job, and freezing the guest's filesystems (all of them or
//! some mountpoints) through libvirt's guest agent calls. Every `unsafe` block of the libvirt path is here, each with its
//! reason; everything else uses `virt`'s safe API.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char};

use thiserror::Error;
use virt::domain::Domain;
use virt::sys;

/// A libvirt failure, with libvirt's own message.
#[derive(Debug, Error)]
#[error("libvirt: {op}")]
pub struct LibvirtError {
    pub op: String,
    #[source]
    pub source: virt::error::Error,
}

impl LibvirtError {
    pub fn new(op: impl Into<String>, source: virt::error::Error) -> LibvirtError {
        LibvirtError { op: op.into(), source }
    }

    fn last(op: impl Into<String>) -> LibvirtError {
        LibvirtError::new(op, virt::error::Error::last_error())
    }
}

type Result<T> = std::result::Result<T, LibvirtError>;

/// `VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE`: define a checkpoint from saved XML (its
/// bitmaps already exist in the disk images).
pub const REDEFINE: u32 = sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE;

/// `VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY`: forget a checkpoint, keep the bitmaps.
pub const METADATA_ONLY: u32 = sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY;

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).expect("NULs removed")
}

/// Takes ownership of a string libvirt allocated (freed here).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string allocated by libvirt with malloc.
unsafe fn owned_string(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: per the contract above.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: libvirt allocated it with malloc and hands ownership to the caller.
    unsafe { libc::free(p.cast()) };
    Some(s)
}

/// A checkpoint handle, freed on drop.
struct Checkpoint(sys::virDomainCheckpointPtr);

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // SAFETY: a live handle from libvirt, freed once.
        unsafe { sys::virDomainCheckpointFree(self.0) };
    }
}

fn lookup(dom: &Domain, name: &str) -> Result<Checkpoint> {
    let n = cstring(name);
    // SAFETY: `dom` is a live domain handle; the name outlives the call.
    let p = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), n.as_ptr(), 0) };
    if p.is_null() { Err(LibvirtError::last(format!("checkpoint {name}"))) } else { Ok(Checkpoint(p)) }
}

/// Names of the domain's checkpoints, in no particular order.
pub fn checkpoint_names(dom: &Domain) -> Result<Vec<String>> {
    let mut list: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
    // SAFETY: live domain; libvirt allocates the array and its handles for the caller.
    let n = unsafe { sys::virDomainListAllCheckpoints(dom.as_ptr(), &mut list, 0) };
    if n < 0 {
        return Err(LibvirtError::last("list checkpoints"));
    }
    let mut names = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: `list` holds `n` live handles; each is wrapped once so it is freed.
        let cp = Checkpoint(unsafe { *list.add(i) });
        // SAFETY: live handle; the returned name belongs to the handle (not freed by us).
        let name = unsafe { sys::virDomainCheckpointGetName(cp.0) };
        if !name.is_null() {
            // SAFETY: non-null NUL-terminated string owned by the live handle.
            names.push(unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned());
        }
    }
    // SAFETY: the array itself was malloc'ed by libvirt and is ours to free.
    unsafe { libc::free(list.cast()) };
    Ok(names)
}

/// Creates (or with [`REDEFINE`], redefines) a checkpoint from XML.
pub fn create_checkpoint(dom: &Domain, xml: &str, flags: u32) -> Result<()> {
    let x = cstring(xml);
    // SAFETY: live domain; the XML outlives the call; the returned handle is freed at once.
    let p = unsafe { sys::virDomainCheckpointCreateXML(dom.as_ptr(), x.as_ptr(), flags) };
    if p.is_null() {
        return Err(LibvirtError::last("create checkpoint"));
    }
    drop(Checkpoint(p));
    Ok(())
}

/// The XML of a checkpoint, with disk sizes when libvirt can give them.
pub fn checkpoint_xml(dom: &Domain, name: &str) -> Result<String> {
    let cp = lookup(dom, name)?;
    for flags in [sys::VIR_DOMAIN_CHECKPOINT_XML_SIZE, 0] {
        // SAFETY: live handle; the result is malloc'ed and owned by us.
        if let Some(s) = unsafe { owned_string(sys::virDomainCheckpointGetXMLDesc(cp.0, flags)) } {
            return Ok(s);
        }
    }
    Err(LibvirtError::last(format!("checkpoint {name} XML")))
}

/// Deletes a checkpoint (and its bitmaps, unless `flags` is [`METADATA_ONLY`]).
pub fn delete_checkpoint(dom: &Domain, name: &str, flags: u32) -> Result<()> {
    let cp = lookup(dom, name)?;
    // SAFETY: live handle.
    if unsafe { sys::virDomainCheckpointDelete(cp.0, flags) } < 0 {
        return Err(LibvirtError::last(format!("delete checkpoint {name}")));
    }
    Ok(())
}

/// Starts a backup job (`virDomainBackupBegin`), creating `checkpoint_xml` atomically
/// with it when given.
pub fn backup_begin(dom: &Domain, backup_xml: &str, checkpoint_xml: Option<&str>) -> Result<()> {
    let b = cstring(backup_xml);
    let c = checkpoint_xml.map(cstring);
    let c_ptr = c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: live domain; both strings (or NULL) outlive the call.
    if unsafe { sys::virDomainBackupBegin(dom.as_ptr(), b.as_ptr(), c_ptr, 0) } < 0 {
        return Err(LibvirtError::last("start backup job"));
    }
    Ok(())
}

/// Ends the domain's current job (how a pull-mode backup is finished, too).
pub fn abort_job(dom: &Domain) -> Result<()> {
    // SAFETY: live domain.
    if unsafe { sys::virDomainAbortJob(dom.as_ptr()) } < 0 {
        return Err(LibvirtError::last("end backup job"));
    }
    Ok(())
}

/// The XML of the domain's running backup job (`virDomainBackupGetXMLDesc`); an error
/// when it has none.
pub fn backup_job_xml(dom: &Domain) -> Result<String> {
    // SAFETY: live domain; the result is malloc'ed and owned by us.
    unsafe { owned_string(sys::virDomainBackupGetXMLDesc(dom.as_ptr(), 0)) }
        .ok_or_else(|| LibvirtError::last("backup job XML"))
}

/// Freezes the guest's filesystems through the guest agent (`virDomainFSFreeze`): all of
/// them, or only those mounted on `mountpoints`. Returns how many were frozen.
pub fn fs_freeze(dom: &Domain, mountpoints: &[String]) -> Result<u32> {
    let owned: Vec<CString> = mountpoints.iter().map(|m| cstring(m)).collect();
    let mut ptrs: Vec<*const c_char> = owned.iter().map(|m| m.as_ptr()).collect();
    let list = if ptrs.is_empty() { std::ptr::null_mut() } else { ptrs.as_mut_ptr() };
    // SAFETY: live domain; `list` is NULL or `ptrs.len()` NUL-terminated strings that
    // outlive the call (libvirt only reads them).
    let n = unsafe { sys::virDomainFSFreeze(dom.as_ptr(), list, ptrs.len() as u32, 0) };
    u32::try_from(n).map_err(|_| LibvirtError::last("freeze the guest's filesystems"))
}

/// Thaws every filesystem [`fs_freeze`] froze (`virDomainFSThaw`).
pub fn fs_thaw(dom: &Domain) -> Result<u32> {
    // SAFETY: live domain; no mountpoint list (NULL, 0): thaw all.
    let n = unsafe { sys::virDomainFSThaw(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    u32::try_from(n).map_err(|_| LibvirtError::last("thaw the guest's filesystems"))
}
