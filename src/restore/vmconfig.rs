//! The domain XML of a restored VM: the XML saved with the backup, adjusted so it can be
//! defined next to the original (virtnbdrestore's `--adjust-config`).
//!
//! What changes, as virtnbdrestore 1.9.15 does it, and what vmback does beyond it:
//! - `<uuid>` is removed (libvirt makes a new one) and `<name>` becomes the given name or
//!   `restore_<name>`;
//! - each restored disk's `<source file>` points at the restored image, its `<driver
//!   type>` says the restored image's format (vmback restores raw or qcow2, upstream only
//!   qcow2), a `type='volume'` disk becomes `type='file'`, and its `<backingStore>` goes
//!   (the restored image stands alone);
//! - cdrom, floppy and lun devices go, and so do raw-format disks unless `--raw`; so does
//!   every other disk that was not restored (upstream keeps those pointing at the original
//!   VM's files, so the copy would write into the original's disks);
//! - the boot files in `<os>` (`loader`, `nvram`, `kernel`, `initrd`) that were restored
//!   point at their restored paths.
//!
//! Everything else passes through event by event, untouched. A `<disk>` is buffered
//! until its end, since whether it stays depends on children that come after its start.

use std::collections::HashMap;

use quick_xml::events::{BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};
use thiserror::Error;

/// Why a domain XML could not be adjusted.
#[derive(Debug, Error)]
pub enum VmconfigError {
    #[error("domain XML, byte {offset}: {source}")]
    Xml {
        offset: u64,
        #[source]
        source: quick_xml::Error,
    },
    #[error("domain XML has no <name>")]
    NoName,
}

/// A disk as restored: the image's path and format (`raw`, `qcow2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredDisk {
    pub path: String,
    pub format: String,
}

/// What to change; see the module note.
#[derive(Debug, Default)]
pub struct Adjust {
    /// The new domain name; `None`: `restore_<name>`.
    pub name: Option<String>,
    /// Restored disks by target device (`vda`).
    pub disks: HashMap<String, RestoredDisk>,
    /// Keep raw-format disks (`--raw`).
    pub keep_raw: bool,
    /// Restored boot files by element name in `<os>` (`loader`, `nvram`, `kernel`,
    /// `initrd`): their new paths.
    pub boot_files: HashMap<String, String>,
}

/// The adjusted XML, the domain's new name, and one line per change, for the log.
#[derive(Debug)]
pub struct Adjusted {
    pub xml: String,
    pub name: String,
    pub changes: Vec<String>,
}

/// Adjusts `xml` as [`Adjust`] says.
pub fn adjust(xml: &str, adj: &Adjust) -> Result<Adjusted, VmconfigError> {
    let mut reader = Reader::from_str(xml);
    let mut out = Writer::new(Vec::with_capacity(xml.len()));
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut disk: Option<Vec<Event<'static>>> = None;
    let mut changes = Vec::new();
    let mut name = None;
    // While inside an element whose text is replaced: the replacement, once written.
    let mut replacing: Option<(usize, Option<String>)> = None;
    let err =
        |reader: &Reader<&[u8]>, source| VmconfigError::Xml { offset: reader.buffer_position(), source };
    loop {
        let ev = reader.read_event().map_err(|e| err(&reader, e))?.into_owned();
        match &ev {
            Event::Start(e) => path.push(e.name().as_ref().to_vec()),
            Event::End(_) => {
                if replacing.as_ref().is_some_and(|(depth, _)| *depth == path.len()) {
                    let (_, text) = replacing.take().expect("checked");
                    if let Some(text) = text {
                        emit(&mut out, &mut disk, Event::Text(BytesText::new(&text).into_owned()));
                    }
                }
                path.pop();
            }
            Event::Eof => break,
            _ => {}
        }
        let at = |names: &[&[u8]]| {
            path.len() == names.len() && path.iter().zip(names).all(|(a, b)| a.as_slice() == *b)
        };
        match &ev {
            Event::Start(e) if at(&[b"domain", b"uuid"]) => {
                changes.push("removed <uuid>".to_owned());
                skip(&mut reader, e).map_err(|x| err(&reader, x))?;
                path.pop();
                continue;
            }
            Event::Empty(e) if path.len() == 1 && e.name().as_ref() == b"uuid" => continue,
            Event::Start(_) if at(&[b"domain", b"name"]) => {
                let old = read_text(&mut reader).map_err(|x| err(&reader, x))?;
                let new = adj.name.clone().unwrap_or_else(|| format!("restore_{old}"));
                changes.push(format!("name {old} -> {new}"));
                emit(&mut out, &mut disk, ev);
                emit(&mut out, &mut disk, Event::Text(BytesText::new(&new).into_owned()));
                replacing = Some((path.len(), None));
                name = Some(new);
                continue;
            }
            Event::Start(e) if path.len() == 3 && path[..2] == [b"domain".to_vec(), b"os".to_vec()] => {
                let el = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if let Some(new) = adj.boot_files.get(&el) {
                    let old = read_text(&mut reader).map_err(|x| err(&reader, x))?;
                    changes.push(format!("<{el}> {old} -> {new}"));
                    emit(&mut out, &mut disk, ev);
                    replacing = Some((path.len(), Some(new.clone())));
                    continue;
                }
            }
            Event::Start(_) if at(&[b"domain", b"devices", b"disk"]) => {
                disk = Some(Vec::new());
            }
            _ => {}
        }
        if replacing.is_some() && matches!(ev, Event::Text(_) | Event::CData(_) | Event::GeneralRef(_)) {
            continue;
        }
        let disk_ends = matches!(&ev, Event::End(e) if e.name().as_ref() == b"disk") && path.len() == 2;
        emit(&mut out, &mut disk, ev);
        if disk_ends {
            let events = disk.take().expect("a disk was started");
            if let Some(events) = adjust_disk(events, adj, &mut changes) {
                for ev in events {
                    write(&mut out, ev);
                }
            }
        }
    }
    let name = name.ok_or(VmconfigError::NoName)?;
    let xml = String::from_utf8(out.into_inner()).expect("written from str events");
    Ok(Adjusted { xml, name, changes })
}

/// Sends `ev` to the open disk's buffer, or straight out.
fn emit(out: &mut Writer<Vec<u8>>, disk: &mut Option<Vec<Event<'static>>>, ev: Event<'static>) {
    match disk {
        Some(buf) => buf.push(ev),
        None => write(out, ev),
    }
}

fn write(out: &mut Writer<Vec<u8>>, ev: Event<'_>) {
    out.write_event(ev).expect("writing to a Vec cannot fail");
}

/// Skips the rest of the element `start` opened (its children and end).
fn skip(reader: &mut Reader<&[u8]>, start: &BytesStart<'_>) -> Result<(), quick_xml::Error> {
    reader.read_to_end(start.to_end().name()).map(|_| ())
}

/// The text of the element just opened, without consuming its end: read from a clone of
/// the reader, so the events are still there to be passed through or replaced.
fn read_text(reader: &mut Reader<&[u8]>) -> Result<String, quick_xml::Error> {
    let mut peek = reader.clone();
    let mut text = String::new();
    loop {
        match peek.read_event()? {
            Event::Text(t) => text.push_str(&t.xml_content().map_err(quick_xml::Error::from)?),
            Event::CData(t) => text.push_str(&t.decode().map_err(quick_xml::Error::from)?),
            Event::GeneralRef(r) => {
                let name = r.decode().map_err(quick_xml::Error::from)?;
                let entity = format!("&{name};");
                text.push_str(
                    &quick_xml::escape::unescape(&entity).map_or(entity.clone(), |s| s.into_owned()),
                );
            }
            _ => return Ok(text.trim().to_owned()),
        }
    }
}

fn attr(e: &BytesStart<'_>, name: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
}

/// `e` with attribute `name` set to `value` (added or replaced), others kept in order.
fn with_attr(e: &BytesStart<'_>, name: &str, value: &str) -> BytesStart<'static> {
    let mut new = BytesStart::new(String::from_utf8_lossy(e.name().as_ref()).into_owned());
    let mut set = false;
    for a in e.attributes().flatten() {
        if a.key.as_ref() == name.as_bytes() {
            new.push_attribute((name, value));
            set = true;
        } else {
            new.push_attribute(a);
        }
    }
    if !set {
        new.push_attribute((name, value));
    }
    new.into_owned()
}

/// One buffered `<disk>` (its start to its end): `None` when it goes, else its events
/// with the restored image in place.
fn adjust_disk(
    events: Vec<Event<'static>>,
    adj: &Adjust,
    changes: &mut Vec<String>,
) -> Option<Vec<Event<'static>>> {
    let start = |e: &Event<'_>, want: &[u8]| match e {
        Event::Start(s) | Event::Empty(s) if s.name().as_ref() == want => Some(s.clone().into_owned()),
        _ => None,
    };
    let head = events.first().and_then(|e| start(e, b"disk"))?;
    let device = attr(&head, b"device").unwrap_or_else(|| "disk".to_owned());
    let target = events.iter().find_map(|e| start(e, b"target")).and_then(|t| attr(&t, b"dev"));
    let format = events.iter().find_map(|e| start(e, b"driver")).and_then(|d| attr(&d, b"type"));
    let target = target.unwrap_or_default();
    if matches!(device.as_str(), "cdrom" | "floppy" | "lun") {
        changes.push(format!("removed {device} {target}"));
        return None;
    }
    let restored = adj.disks.get(&target);
    if format.as_deref() == Some("raw") && !adj.keep_raw && restored.is_none() {
        changes.push(format!("removed raw disk {target} (restore with --raw to keep it)"));
        return None;
    }
    let Some(restored) = restored else {
        changes.push(format!("removed disk {target}: not restored"));
        return None;
    };
    changes.push(format!("disk {target} -> {} ({})", restored.path, restored.format));
    let mut out = Vec::with_capacity(events.len());
    // Open elements around the current event (the disk itself is 1), and, while a
    // `<backingStore>` is being dropped, the depth its end closes.
    let mut depth = 0usize;
    let mut skipping: Option<usize> = None;
    for ev in events {
        let opens = matches!(ev, Event::Start(_));
        let closes = matches!(ev, Event::End(_));
        // The element's own nesting level: 2 for the disk's children.
        let level = depth + 1;
        if opens {
            depth += 1;
        }
        if let Some(d) = skipping {
            if closes {
                if depth == d {
                    skipping = None;
                }
                depth -= 1;
            }
            continue;
        }
        if closes {
            depth -= 1;
        }
        let child = |s: &BytesStart<'_>, name: &[u8]| level == 2 && s.name().as_ref() == name;
        let ev = match ev {
            Event::Start(s) | Event::Empty(s) if child(&s, b"backingStore") => {
                if opens {
                    skipping = Some(depth);
                }
                continue;
            }
            Event::Start(s) if level == 1 && attr(&s, b"type").as_deref() == Some("volume") => {
                Event::Start(with_attr(&s, "type", "file"))
            }
            Event::Start(s) if child(&s, b"driver") => Event::Start(with_attr(&s, "type", &restored.format)),
            Event::Empty(s) if child(&s, b"driver") => Event::Empty(with_attr(&s, "type", &restored.format)),
            Event::Start(s) | Event::Empty(s) if child(&s, b"source") => {
                let mut src = BytesStart::new("source");
                src.push_attribute(("file", restored.path.as_str()));
                // Keep what is not about where the data lives: `index=` belonged to the
                // old backing chain, pool/volume/dev/protocol name other kinds of source.
                for a in s.attributes().flatten() {
                    if !matches!(
                        a.key.as_ref(),
                        b"file" | b"dev" | b"pool" | b"volume" | b"index" | b"name" | b"protocol"
                    ) {
                        src.push_attribute(a);
                    }
                }
                if opens { Event::Start(src.into_owned()) } else { Event::Empty(src.into_owned()) }
            }
            other => other,
        };
        out.push(ev);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='kvm'>
  <name>vm1</name>
  <uuid>3f1b0a52-5c1e-4a57-9d1e-0a4b5c6d7e8f</uuid>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/vm1_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/vm1-sda.qcow2' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='sda' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='default' volume='vm1-vdb.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/debian.iso'/>
      <target dev='sdc' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/scratch.img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <interface type='network'><source network='default'/></interface>
  </devices>
</domain>"#;

    fn restored(path: &str, format: &str) -> RestoredDisk {
        RestoredDisk { path: path.into(), format: format.into() }
    }

    fn base() -> Adjust {
        let mut disks = HashMap::new();
        disks.insert("sda".into(), restored("/restore/vm1-sda.raw", "raw"));
        disks.insert("vdb".into(), restored("/restore/vm1-vdb.qcow2", "qcow2"));
        Adjust { disks, ..Adjust::default() }
    }

    #[test]
    fn renames_drops_uuid_and_points_disks_at_the_restored_images() {
        let a = adjust(XML, &base()).unwrap();
        assert_eq!(a.name, "restore_vm1");
        assert!(a.xml.contains("<name>restore_vm1</name>"), "{}", a.xml);
        assert!(!a.xml.contains("uuid"), "{}", a.xml);
        let d = crate::backup::domxml::disks(&a.xml).unwrap();
        let got: Vec<_> =
            d.iter().map(|d| (d.target.as_str(), d.format.as_str(), d.source.as_deref())).collect();
        assert_eq!(
            got,
            [("sda", "raw", Some("/restore/vm1-sda.raw")), ("vdb", "qcow2", Some("/restore/vm1-vdb.qcow2"))]
        );
        assert!(!a.xml.contains("backingStore") && !a.xml.contains("base.qcow2"), "{}", a.xml);
        assert!(!a.xml.contains("type='volume'") && !a.xml.contains("pool="), "{}", a.xml);
        assert!(a.xml.contains("discard=\"unmap\"") || a.xml.contains("discard='unmap'"), "{}", a.xml);
        assert!(!a.xml.contains("debian.iso") && !a.xml.contains("scratch.img"), "{}", a.xml);
        assert!(a.xml.contains("<interface type='network'>"), "untouched parts pass through: {}", a.xml);
        assert!(a.changes.iter().any(|c| c.contains("cdrom sdc")), "{:?}", a.changes);
        assert!(a.changes.iter().any(|c| c.contains("raw disk vdc")), "{:?}", a.changes);
    }

    #[test]
    fn a_given_name_and_restored_boot_files() {
        let mut adj = base();
        adj.name = Some("copy & co".into());
        adj.boot_files.insert("nvram".into(), "/restore/copy_VARS.fd".into());
        let a = adjust(XML, &adj).unwrap();
        assert!(a.xml.contains("<name>copy &amp; co</name>"), "{}", a.xml);
        assert!(
            a.xml.contains("<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/restore/copy_VARS.fd</nvram>"),
            "{}",
            a.xml
        );
        assert!(a.xml.contains(">/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"), "{}", a.xml);
    }

    #[test]
    fn raw_disks_stay_with_keep_raw_when_restored() {
        let mut adj = base();
        adj.keep_raw = true;
        adj.disks.insert("vdc".into(), restored("/restore/scratch.img", "raw"));
        let a = adjust(XML, &adj).unwrap();
        assert!(a.xml.contains("/restore/scratch.img"), "{}", a.xml);
    }

    #[test]
    fn a_disk_not_restored_goes() {
        let mut adj = base();
        adj.disks.remove("vdb");
        let a = adjust(XML, &adj).unwrap();
        assert!(!a.xml.contains("vdb"), "{}", a.xml);
        assert!(a.changes.iter().any(|c| c == "removed disk vdb: not restored"), "{:?}", a.changes);
    }

    #[test]
    fn bad_xml_names_the_offset() {
        let e = adjust("<domain><name>x</nam></domain>", &base()).unwrap_err();
        assert!(matches!(e, VmconfigError::Xml { .. }), "{e}");
        assert!(e.to_string().contains("byte"), "{e}");
        assert!(matches!(adjust("<domain/>", &base()), Err(VmconfigError::NoName)));
    }
}
