//! Boot files: the kernel, initrd, firmware loader and UEFI NVRAM a domain XML names in
//! `<os>`, and the names under which a backup set holds them.
//!
//! virtnbdbackup saves each one with every backup as `<basename>.<ident>` (`<ident>` as
//! in `vmconfig.<ident>.xml`: the checkpoint, the unix time of a diff) and, for a copy
//! backup, as plain `<basename>`; vmback writes and reads the same names, so either tool
//! restores them.
//!
//! Invariants: a name is only ever the last component of the path in the XML, and only
//! one that is a plain file name (no `..`, nothing that [`safe_component`] would change),
//! so a name from a domain XML can never point outside the set's folder or the
//! restore's output folder.

use quick_xml::events::Event;

use super::naming::safe_component;

/// Largest boot file copied into a set or out of one. Loaders and NVRAM stores are a few
/// MiB and kernels tens of MiB, but an initrd holding every module and firmware of a
/// distribution reaches a few hundred MiB; a copy is held in memory once, and anything
/// larger is no boot file.
pub const MAX_BOOT_FILE: u64 = 512 << 20;

/// The `<os>` children that name a boot file, in the order upstream looks at them.
pub const ELEMENTS: [&str; 4] = ["loader", "nvram", "kernel", "initrd"];

/// A boot file a domain XML names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// The `<os>` child: `loader`, `nvram`, `kernel` or `initrd`.
    pub element: String,
    /// The path on the hypervisor, as the XML says it.
    pub path: String,
    /// Its last component: the name in the set and in the mount.
    pub name: String,
}

/// The boot files `xml` names in `<domain><os>`; an element whose path has no usable
/// file name is left out. `Err` when the XML cannot be read.
pub fn named_in(xml: &str) -> Result<Vec<Named>, quick_xml::Error> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut out = Vec::new();
    let mut text: Option<(String, String)> = None;
    loop {
        match reader.read_event()? {
            Event::Start(e) => {
                path.push(e.name().as_ref().to_vec());
                let el = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if path.len() == 3 && path[0] == b"domain" && path[1] == b"os" && ELEMENTS.contains(&&*el) {
                    text = Some((el, String::new()));
                }
            }
            Event::Text(t) => {
                if let Some((_, s)) = text.as_mut() {
                    s.push_str(&t.xml_content()?);
                }
            }
            Event::GeneralRef(r) => {
                if let Some((_, s)) = text.as_mut() {
                    let entity = format!("&{};", r.decode()?);
                    s.push_str(
                        &quick_xml::escape::unescape(&entity).map_or(entity.clone(), |u| u.into_owned()),
                    );
                }
            }
            Event::End(_) => {
                if path.len() == 3
                    && let Some((element, p)) = text.take()
                {
                    let p = p.trim().to_owned();
                    if let Some(name) = file_name(&p) {
                        out.push(Named { element, path: p, name });
                    }
                }
                path.pop();
            }
            Event::Eof => return Ok(out),
            _ => {}
        }
    }
}

/// The last component of `path` when it is a plain, safe file name.
fn file_name(path: &str) -> Option<String> {
    let name = std::path::Path::new(path).file_name()?.to_str()?;
    (safe_component(name) == name).then(|| name.to_owned())
}

/// The name a backup with `ident` gives boot file `name` in the set.
pub fn set_name(name: &str, ident: &str) -> String {
    if ident == "copy" { name.to_owned() } else { format!("{name}.{ident}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='kvm'><name>vm1</name>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/vm1&amp;_VARS.fd</nvram>
    <kernel>/boot/..</kernel>
    <initrd>  /boot/initrd.img  </initrd>
  </os>
  <devices><disk><source file='/x/kernel'/></disk></devices>
</domain>"#;

    #[test]
    fn boot_files_of_os_with_safe_names_only() {
        let got = named_in(XML).unwrap();
        let got: Vec<_> =
            got.iter().map(|n| (n.element.as_str(), n.path.as_str(), n.name.as_str())).collect();
        assert_eq!(
            got,
            [
                ("loader", "/usr/share/OVMF/OVMF_CODE_4M.fd", "OVMF_CODE_4M.fd"),
                ("nvram", "/var/lib/libvirt/qemu/nvram/vm1&_VARS.fd", "vm1&_VARS.fd"),
                ("initrd", "/boot/initrd.img", "initrd.img"),
            ],
            "a path ending in .. names no file"
        );
        assert!(named_in("<domain><name>x</name></domain>").unwrap().is_empty());
        assert!(named_in("<domain><os><loader>a</nvram></os></domain>").is_err());
    }

    #[test]
    fn set_names_are_upstreams() {
        assert_eq!(set_name("vm1_VARS.fd", "virtnbdbackup.0"), "vm1_VARS.fd.virtnbdbackup.0");
        assert_eq!(set_name("vm1_VARS.fd", "1700000000"), "vm1_VARS.fd.1700000000");
        assert_eq!(set_name("vm1_VARS.fd", "copy"), "vm1_VARS.fd");
    }
}
