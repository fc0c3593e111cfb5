//! What a restore makes beyond the disk images, as virtnbdrestore makes it: the images'
//! names, the boot files, the domain XML and (with `-D`) the domain in libvirt.
//!
//! - An image is named after the original disk's file (`/images/vm1-sda.qcow2` gives
//!   `vm1-sda.qcow2`), or after its target (`sda`) when the domain XML names no file, and
//!   `--sequence` names it after the target, as upstream does. vmback can also write
//!   another format than the disk's (`--format`): the name then says so, its image
//!   extension (`.qcow2`, `.qcow`, `.raw`, `.img`) replaced or `.raw`/`.qcow2` added.
//! - Boot files (`catalog::boot`) are written into the output folder (on the host
//!   restored onto: this one, or a remote one over ssh) under their own names, and each one missing at its original path is put back there (upstream's rule:
//!   on every restore, never over an existing file, and here only to a plain absolute
//!   path, into a folder that exists); one that cannot be is a warning.
//! - A qcow2 image is created with the original's `compat`, `cluster_size`,
//!   `lazy_refcounts` and `compression_type`, from the `<disk>.<ident>.qcow.json` saved
//!   with the backup, as upstream creates it.
//! - The domain is defined only with `-D`, so nothing else needs a libvirt daemon.
//!
//! Invariants: every name written comes from `catalog::naming::safe_component` or is a
//! boot file's plain name, so nothing is written outside the output folder but the
//! original paths of boot files that are missing; no existing file is overwritten.

use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::{info, warn};

use super::Format;
use crate::backup::host::{Host, HostError};
use crate::backup::remote::RemoteOptions;
use crate::catalog::BootFile;
use crate::catalog::boot::MAX_BOOT_FILE;
use crate::catalog::naming::safe_component;

/// Why a VM could not be rebuilt.
#[derive(Debug, Error)]
pub enum RebuildError {
    #[error("{}: cannot read the boot file from the set", path.display())]
    ReadBoot {
        path: PathBuf,
        #[source]
        source: crate::source::SourceError,
    },
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("cannot connect to libvirt to define the domain")]
    Connect(#[source] Box<crate::backup::BackupError>),
    #[error("{uri}: defining domain {name} failed")]
    Define {
        uri: String,
        name: String,
        #[source]
        source: virt::error::Error,
    },
}

/// Image extensions a name may end in, replaced when the restored format differs.
const IMAGE_EXTENSIONS: [&str; 4] = ["qcow2", "qcow", "raw", "img"];

/// The name of a restored image: `file` (the original disk file's path, when known) or
/// `target`, in format `chosen` where the disk was `original` (see the module note).
pub fn image_name(file: Option<&str>, target: &str, original: Format, chosen: Format) -> String {
    let base = file.and_then(|f| Path::new(f).file_name()).map(|n| n.to_string_lossy().into_owned());
    let base = safe_component(base.as_deref().unwrap_or(target));
    if chosen == original {
        return base;
    }
    let stem = match base.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && IMAGE_EXTENSIONS.contains(&ext) => stem,
        _ => &base,
    };
    format!("{stem}.{}", chosen.extension())
}

/// The `qemu-img create -o` options of the image a `.qcow.json` (`qemu-img info` output)
/// describes. A value that is not a plain word or number is left out, so a file in the
/// set cannot add options of its own (a `,` would).
pub fn qcow2_options(json: &[u8]) -> Vec<String> {
    let Ok(info) = serde_json::from_slice::<serde_json::Value>(json) else { return Vec::new() };
    let data = &info["format-specific"]["data"];
    let plain = |v: &serde_json::Value| {
        let s = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return None,
        };
        (!s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')).then_some(s)
    };
    let mut out = Vec::new();
    if let Some(v) = plain(&data["compat"]) {
        out.push(format!("compat={v}"));
    }
    if let Some(v) = plain(&info["cluster-size"]) {
        out.push(format!("cluster_size={v}"));
    }
    if data["lazy-refcounts"] == serde_json::Value::Bool(true) {
        out.push("lazy_refcounts=on".to_owned());
    }
    if let Some(v) = plain(&data["compression-type"]) {
        out.push(format!("compression_type={v}"));
    }
    out
}

/// Writes the point's boot files into `output` on `host` (under their names) and puts
/// back each one missing at its original path there. Returns `(element, path in output)`
/// for each one written there. A boot file already in `output` is an error, as an image
/// is.
pub fn restore_boot_files(
    host: &dyn Host,
    boot: &[BootFile],
    output: &Path,
) -> Result<Vec<(String, PathBuf)>, RebuildError> {
    let mut written = Vec::new();
    for b in boot {
        let data = b
            .file
            .source
            .read_whole(&b.file.path, MAX_BOOT_FILE)
            .map_err(|source| RebuildError::ReadBoot { path: b.file.shown(), source })?;
        let to = output.join(&b.named.name);
        host.write_new(&to, &data)?;
        info!("{} {}: {}:{}", b.named.element, b.file.shown().display(), host.name(), to.display());
        written.push((b.named.element.clone(), to));
        let original = Path::new(&b.named.path);
        if !plain_absolute(original) {
            warn!("{}: {} is no plain absolute path; not put back", b.named.element, original.display());
            continue;
        }
        match host.write_new(original, &data) {
            Ok(()) => info!("{}: put back at {}:{}", b.named.element, host.name(), original.display()),
            Err(HostError::Exists { .. }) => {
                info!("{}: {} exists; left as it is", b.named.element, original.display())
            }
            Err(e) => warn!("{}: not put back: {}", b.named.element, crate::error_chain(&e)),
        }
    }
    Ok(written)
}

/// An absolute path without `..` components (`.` ones mean nothing): where a boot file
/// may be put back.
fn plain_absolute(p: &Path) -> bool {
    use std::path::Component;
    p.is_absolute() && p.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Defines the domain `xml` (named `name`) in libvirt at `uri`, marked to start with the
/// host when `autostart` (upstream's `autostart.*` file was in the set); `remote` gives
/// the SASL credentials (`--user`, `--password`), as for a backup.
pub fn define(
    uri: &str,
    remote: &RemoteOptions,
    name: &str,
    xml: &str,
    autostart: bool,
) -> Result<(), RebuildError> {
    let conn = crate::backup::remote::connect(uri, remote).map_err(|e| RebuildError::Connect(Box::new(e)))?;
    let dom = conn.define_domain_xml(xml).map_err(|source| RebuildError::Define {
        uri: uri.to_owned(),
        name: name.to_owned(),
        source,
    })?;
    info!("defined domain {name} in {uri}");
    if autostart && let Err(e) = dom.set_autostart(true) {
        warn!("{name}: autostart not set: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_named_after_the_original_file() {
        let q = Format::Qcow2;
        let r = Format::Raw;
        assert_eq!(image_name(Some("/var/lib/libvirt/images/vm1-sda.qcow2"), "sda", q, q), "vm1-sda.qcow2");
        assert_eq!(image_name(Some("/images/scratch.img"), "vdc", r, r), "scratch.img");
        assert_eq!(image_name(None, "sda", q, q), "sda", "no file: the target, as upstream");
        // Another format than the disk's: the name says so.
        assert_eq!(image_name(Some("/images/vm1-sda.qcow2"), "sda", q, r), "vm1-sda.raw");
        assert_eq!(image_name(Some("/images/disk"), "sda", q, r), "disk.raw");
        assert_eq!(image_name(Some("/images/a.b.img"), "vdc", r, q), "a.b.qcow2");
        assert_eq!(image_name(None, "sda", q, r), "sda.raw");
        assert_eq!(image_name(Some("/images/.qcow2"), "sda", q, r), ".qcow2.raw");
        // A name from the XML never leaves the output folder.
        assert_eq!(image_name(Some("/images/.."), "sda", q, q), "sda");
        assert_eq!(image_name(Some("/"), "sda", q, q), "sda");
    }

    #[test]
    fn qcow2_options_come_from_the_saved_image_info() {
        let json = br#"{"cluster-size": 131072, "format-specific": {"type": "qcow2", "data":
            {"compat": "0.10", "lazy-refcounts": true, "compression-type": "zlib"}}}"#;
        assert_eq!(
            qcow2_options(json),
            ["compat=0.10", "cluster_size=131072", "lazy_refcounts=on", "compression_type=zlib"]
        );
        let hostile = br#"{"cluster-size": "65536,data_file=/etc/passwd", "format-specific": {"data": {"compat": "1.1"}}}"#;
        assert_eq!(qcow2_options(hostile), ["compat=1.1"]);
        assert!(qcow2_options(b"not json").is_empty());
    }

    #[test]
    fn boot_files_go_back_only_to_plain_absolute_paths() {
        assert!(plain_absolute(Path::new("/var/lib/libvirt/qemu/nvram/vm1_VARS.fd")));
        for p in ["nvram/vm1_VARS.fd", "/var/lib/../../etc/x", "../x"] {
            assert!(!plain_absolute(Path::new(p)), "{p}");
        }
    }
}
