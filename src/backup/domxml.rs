//! The disks of a libvirt domain XML, and which of them a backup takes.

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

#[cfg(test)]
mod tests {
    use super::*;

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
