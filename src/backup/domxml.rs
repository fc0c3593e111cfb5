//! The XML a backup reads and writes: the disks of a libvirt domain XML, the
//! `<domainbackup>` and `<domaincheckpoint>` documents that start a pull-mode backup job,
//! and what tells two checkpoints of one name apart.
//!
//! Every name written into a document is XML-escaped; the documents are built as strings
//! because their shape is fixed and small.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use quick_xml::events::{BytesStart, Event};

/// One `<disk>` of `<devices>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomDisk {
    /// `<target dev=...>`: the name in backup file names (`sda`, `vdb`).
    pub target: String,
    /// `device=`: disk, cdrom, floppy or lun.
    pub device: String,
    /// `<driver type=...>`: qcow2, raw...
    pub format: String,
    /// `<source file=...>` (or `dev=` for block devices).
    pub source: Option<String>,
}

fn attr(e: &BytesStart<'_>, name: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
}

/// Parses the `<devices><disk>` elements of a domain XML.
pub fn disks(xml: &str) -> Result<Vec<DomDisk>, quick_xml::Error> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut out = Vec::new();
    let mut cur: Option<DomDisk> = None;
    loop {
        match reader.read_event()? {
            Event::Start(e) | Event::Empty(e) => match e.name().as_ref() {
                b"disk" => {
                    cur = Some(DomDisk {
                        target: String::new(),
                        device: attr(&e, b"device").unwrap_or_else(|| "disk".into()),
                        format: String::new(),
                        source: None,
                    });
                }
                b"driver" => {
                    if let Some(d) = cur.as_mut() {
                        d.format = attr(&e, b"type").unwrap_or_default();
                    }
                }
                b"source" => {
                    if let Some(d) = cur.as_mut()
                        && d.source.is_none()
                    {
                        d.source = attr(&e, b"file").or_else(|| attr(&e, b"dev"));
                    }
                }
                b"target" => {
                    if let Some(d) = cur.as_mut() {
                        d.target = attr(&e, b"dev").unwrap_or_default();
                    }
                }
                _ => {}
            },
            Event::End(e) if e.name().as_ref() == b"disk" => {
                if let Some(d) = cur.take()
                    && !d.target.is_empty()
                {
                    out.push(d);
                }
            }
            Event::Eof => return Ok(out),
            _ => {}
        }
    }
}

fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// The scratch file of `disk` for this process's job, in `scratch`.
pub fn scratch_file(scratch: &Path, disk: &str) -> std::path::PathBuf {
    scratch.join(format!("vmback.{}.{disk}.scratch", std::process::id()))
}

/// Where the backup job's NBD server listens.
#[derive(Debug, Clone, Copy)]
pub enum NbdServer<'a> {
    /// A unix socket on this machine (a local hypervisor).
    Unix(&'a Path),
    /// TCP on the hypervisor's address `name` (a remote one), TLS with qemu's backup
    /// certificates when `tls`.
    Tcp { name: &'a str, port: u16, tls: bool },
}

/// `<domainbackup mode='pull'>`: an NBD server at `server` serving `disks`, with the
/// changes since checkpoint `parent` (inc, diff) or everything (full, copy).
pub fn backup_xml(server: NbdServer<'_>, parent: Option<&str>, disks: &[DomDisk], scratch: &Path) -> String {
    let mut x = match server {
        NbdServer::Unix(socket) => format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{}'/>",
            esc(&socket.to_string_lossy())
        ),
        NbdServer::Tcp { name, port, tls } => format!(
            "<domainbackup mode='pull'><server transport='tcp' name='{}' port='{port}'{}/>",
            esc(name),
            if tls { " tls='yes'" } else { "" }
        ),
    };
    if let Some(p) = parent {
        x.push_str(&format!("<incremental>{}</incremental>", esc(p)));
    }
    x.push_str("<disks>");
    for d in disks {
        x.push_str(&format!(
            "<disk name='{}' backup='yes' type='file'><scratch file='{}'/></disk>",
            esc(&d.target),
            esc(&scratch_file(scratch, &d.target).to_string_lossy())
        ));
    }
    x.push_str("</disks></domainbackup>");
    x
}

/// `<domaincheckpoint>` of checkpoint `name` after `parent`, with a bitmap in every disk
/// but raw ones (which cannot hold one).
pub fn checkpoint_xml(name: &str, parent: Option<&str>, disks: &[DomDisk]) -> String {
    // The nonce makes this checkpoint distinguishable from a namesake (see
    // `checkpoint_identity`).
    let nonce = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut x = format!(
        "<domaincheckpoint><description>Backup checkpoint (vmback {nonce:x}.{})</description><name>{}</name>",
        std::process::id(),
        esc(name)
    );
    if let Some(p) = parent {
        x.push_str(&format!("<parent><name>{}</name></parent>", esc(p)));
    }
    x.push_str("<disks>");
    for d in disks.iter().filter(|d| d.format != "raw") {
        x.push_str(&format!("<disk name='{}' checkpoint='bitmap'/>", esc(&d.target)));
    }
    x.push_str("</disks></domaincheckpoint>");
    x
}

/// What tells two checkpoints of one name apart: the `<creationTime>` (seconds) and the
/// `<description>`, which for vmback's checkpoints holds a nonce (two fulls within one
/// second have the same creation time).
pub fn checkpoint_identity(xml: &str) -> (Option<&str>, Option<&str>) {
    let element = |tag: &str| {
        let open = format!("<{tag}>");
        let start = xml.find(&open)? + open.len();
        let len = xml[start..].find(&format!("</{tag}>"))?;
        Some(xml[start..start + len].trim())
    };
    (element("creationTime"), element("description"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dd(target: &str, format: &str) -> DomDisk {
        DomDisk { target: target.into(), device: "disk".into(), format: format.into(), source: None }
    }

    #[test]
    fn backup_xml_names_socket_parent_and_scratch_files() {
        let disks = [dd("vda", "qcow2"), dd("v'b", "qcow2")];
        let x = backup_xml(
            NbdServer::Unix(Path::new("/run/s.sock")),
            Some("virtnbdbackup.1"),
            &disks,
            Path::new("/tmp"),
        );
        let pid = std::process::id();
        assert_eq!(
            x,
            format!(
                "<domainbackup mode='pull'><server transport='unix' socket='/run/s.sock'/>\
                 <incremental>virtnbdbackup.1</incremental><disks>\
                 <disk name='vda' backup='yes' type='file'><scratch file='/tmp/vmback.{pid}.vda.scratch'/></disk>\
                 <disk name='v&apos;b' backup='yes' type='file'><scratch file='/tmp/vmback.{pid}.v&apos;b.scratch'/></disk>\
                 </disks></domainbackup>"
            )
        );
        let full = backup_xml(NbdServer::Unix(Path::new("/s")), None, &disks[..1], Path::new("/tmp"));
        assert!(!full.contains("<incremental>"), "{full}");
        let tcp = NbdServer::Tcp { name: "10.0.0.2", port: 10809, tls: false };
        let remote = backup_xml(tcp, None, &disks[..1], Path::new("/var/tmp"));
        assert!(
            remote.starts_with(
                "<domainbackup mode='pull'><server transport='tcp' name='10.0.0.2' port='10809'/>"
            ),
            "{remote}"
        );
        let tls = NbdServer::Tcp { name: "hv&1", port: 10900, tls: true };
        let remote = backup_xml(tls, None, &disks[..1], Path::new("/var/tmp"));
        assert!(
            remote.contains("<server transport='tcp' name='hv&amp;1' port='10900' tls='yes'/>"),
            "{remote}"
        );
    }

    #[test]
    fn checkpoint_xml_has_a_bitmap_per_qcow2_disk_and_a_nonce() {
        let disks = [dd("vda", "qcow2"), dd("vdb", "raw")];
        let a = checkpoint_xml("virtnbdbackup.2", Some("virtnbdbackup.1"), &disks);
        assert!(
            a.contains("<name>virtnbdbackup.2</name><parent><name>virtnbdbackup.1</name></parent>"),
            "{a}"
        );
        assert!(a.contains("<disks><disk name='vda' checkpoint='bitmap'/></disks>"), "{a}");
        assert!(!a.contains("vdb"), "{a}");
        let b = checkpoint_xml("virtnbdbackup.2", Some("virtnbdbackup.1"), &disks);
        assert_ne!(checkpoint_identity(&a), checkpoint_identity(&b), "namesakes differ by nonce");
        assert!(!checkpoint_xml("virtnbdbackup.0", None, &disks).contains("<parent>"));
    }

    #[test]
    fn checkpoint_identity_reads_time_and_description() {
        let x = "<domaincheckpoint><name>c</name><description> d </description>\
                 <creationTime>1700000000</creationTime></domaincheckpoint>";
        assert_eq!(checkpoint_identity(x), (Some("1700000000"), Some("d")));
        assert_eq!(checkpoint_identity("<domaincheckpoint/>"), (None, None));
        assert_eq!(checkpoint_identity("<creationTime>1"), (None, None));
    }

    #[test]
    fn finds_disks_and_their_kinds() {
        let xml = r#"<domain type='kvm'><name>vm1</name><devices>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>
              <source file='/var/lib/libvirt/images/vm1.qcow2'/><backingStore/>
              <target dev='vda' bus='virtio'/></disk>
            <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
              <source file='/iso/x.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
            <disk type='block' device='disk'><driver name='qemu' type='raw'/>
              <source dev='/dev/vg/data'/><target dev='vdb' bus='virtio'/></disk>
            </devices></domain>"#;
        let d = disks(xml).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(
            d[0],
            DomDisk {
                target: "vda".into(),
                device: "disk".into(),
                format: "qcow2".into(),
                source: Some("/var/lib/libvirt/images/vm1.qcow2".into())
            }
        );
        assert_eq!((d[1].device.as_str(), d[1].target.as_str()), ("cdrom", "sda"));
        assert_eq!((d[2].format.as_str(), d[2].source.as_deref()), ("raw", Some("/dev/vg/data")));
    }
}
