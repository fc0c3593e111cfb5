//! The boot files of a backup: the kernel, initrd, loader and UEFI NVRAM the domain XML
//! names in `<os>`, copied from the hypervisor (through [`Host`], so over ssh for a remote
//! one) into the set under upstream's names (`catalog::boot`), and the `autostart.<ident>`
//! marker upstream writes when the domain starts with the host.
//!
//! Invariants: a file is written as `<name>.partial` and renamed, so a name in the set is
//! always a whole copy; a boot file that cannot be read is a warning, as upstream makes it
//! (the disks are saved already and stay a valid restore point); the names are plain file
//! names, so nothing is written outside the set's folder.

use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::{info, warn};

use super::host::{Host, HostError};
use crate::catalog::boot::{self, MAX_BOOT_FILE, Named};

/// Why a boot file was not saved (logged as a warning).
#[derive(Debug, Error)]
pub enum BootFileError {
    #[error("{element} file: {source}")]
    Read {
        element: String,
        #[source]
        source: HostError,
    },
    #[error("{}: cannot write", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("domain XML: cannot read <os>")]
    Xml(#[source] quick_xml::Error),
}

/// The boot files `xml` names, each with its bytes read from `host` (or why not): the
/// part of [`save`] that talks to the hypervisor, so it can run while the disks are
/// saved. All at once: on a remote hypervisor each is an ssh session.
pub fn read(host: &dyn Host, xml: &str) -> Vec<(Named, Result<Vec<u8>, HostError>)> {
    let named = match boot::named_in(xml) {
        Ok(n) => n,
        Err(e) => {
            warn!("{}", crate::error_chain(&BootFileError::Xml(e)));
            Vec::new()
        }
    };
    std::thread::scope(|s| {
        let reads: Vec<_> =
            named.iter().map(|n| (n, s.spawn(|| host.read(Path::new(&n.path), MAX_BOOT_FILE)))).collect();
        reads
            .into_iter()
            .map(|(n, data)| {
                // a panic in a reader is a bug: pass it on
                let data = data.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                (n.clone(), data)
            })
            .collect()
    })
}

/// Writes each boot file [`read`] got from `host` into `out` as `<name>.<ident>` (plain
/// `<name>` for a copy), and `autostart.<ident>` when `autostart`. Returns the names
/// written; failures are logged.
pub fn save(
    host: &str,
    out: &Path,
    files: Vec<(Named, Result<Vec<u8>, HostError>)>,
    ident: &str,
    autostart: bool,
) -> Vec<String> {
    let mut saved = Vec::new();
    for (n, data) in files {
        let name = boot::set_name(&n.name, ident);
        let done = data
            .map_err(|source| BootFileError::Read { element: n.element.clone(), source })
            .and_then(|data| write(out, &name, &data));
        match done {
            Ok(()) => {
                info!("saved {} {} from {host} as {name}", n.element, n.path);
                saved.push(name);
            }
            Err(e) => warn!("{}; not saved", crate::error_chain(&e)),
        }
    }
    if autostart {
        let name = format!("autostart.{ident}");
        // Upstream's marker holds the word its restore only tests for.
        match write(out, &name, b"True") {
            Ok(()) => saved.push(name),
            Err(e) => warn!("{}", crate::error_chain(&e)),
        }
    }
    saved
}

/// Writes `out/name` through `out/name.partial`, synced before the rename.
fn write(out: &Path, name: &str, data: &[u8]) -> Result<(), BootFileError> {
    use std::io::Write;
    let path = out.join(name);
    let partial = out.join(format!("{name}.partial"));
    let err = |p: &Path| {
        let p = p.to_owned();
        move |source| BootFileError::Write { path: p, source }
    };
    let mut f = std::fs::File::create(&partial).map_err(err(&partial))?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(err(&partial))?;
    std::fs::rename(&partial, &path).map_err(err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::host::LocalHost;

    #[test]
    fn boot_files_are_saved_under_upstreams_names() {
        let hv = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let nvram = hv.path().join("vm1_VARS.fd");
        std::fs::write(&nvram, b"vars").unwrap();
        let xml = format!(
            "<domain><name>vm1</name><os><loader>{}</loader><nvram>{}</nvram></os></domain>",
            hv.path().join("missing_CODE.fd").display(),
            nvram.display()
        );
        let saved = save("localhost", out.path(), read(&LocalHost, &xml), "virtnbdbackup.0", true);
        assert_eq!(saved, ["vm1_VARS.fd.virtnbdbackup.0", "autostart.virtnbdbackup.0"]);
        assert_eq!(std::fs::read(out.path().join("vm1_VARS.fd.virtnbdbackup.0")).unwrap(), b"vars");
        assert_eq!(std::fs::read(out.path().join("autostart.virtnbdbackup.0")).unwrap(), b"True");
        let copy = save("localhost", out.path(), read(&LocalHost, &xml), "copy", false);
        assert_eq!(copy, ["vm1_VARS.fd"], "a copy's boot files keep their plain names");
        let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(!left.iter().any(|n| n.to_string_lossy().ends_with(".partial")), "{left:?}");
    }
}
