//! The first [`Provider`]: the partition files of each image, `<disk>.p<N>.raw` beside
//! `<disk>.raw` in a restore point's folder, each a [`Window`] on the image.
//!
//! The table is read when someone lists the folder or looks up a partition's name, not
//! when the tree is built. A partition is keyed by its image's number and its partition
//! number: the image keeps its number exactly while it is the same backup (and its table
//! is read once per image), so the key stays the same exactly while the content does.
//! Writes through a partition file change the image's bytes and the reverse; `aliases`
//! names the other file so the kernel's cached pages of it are dropped.

use std::sync::Arc;

use super::inode::{Ino, Node, NodeKind, Tree};
use super::partition::Partition;
use super::provider::{Entry, Provider, Target};
use crate::view::Window;

/// Highest partition number shown: Linux numbers at most 255 partitions per disk
/// (DISK_MAX_PARTS = 256 minors, one for the disk), so a guest never sees more.
const PART_MAX: u32 = 0xff;

/// See the module note.
pub struct PartitionFiles;

/// The end of the name of partition `n`'s file: `<disk>.p<n>.raw`.
fn part_suffix(n: u32) -> String {
    format!(".p{n}.raw")
}

/// `(<disk>, N)` of a partition file name `<disk>.p<N>.raw`, only as `children` writes
/// it (no sign, no leading zero), so `lookup` finds no name the listing lacks.
fn partition_name(name: &str) -> Option<(&str, u32)> {
    let (stem, n) = name.strip_suffix(".raw")?.rsplit_once(".p")?;
    let n: u32 = n.parse().ok()?;
    (name == format!("{stem}{}", part_suffix(n))).then_some((stem, n))
}

/// `(image, N)` of a key as [`part_entry`] writes it.
fn parse_key(key: &str) -> Option<(Ino, u32)> {
    let (img, n) = key.split_once(':')?;
    Some((img.parse().ok()?, n.parse().ok()?))
}

/// The file of partition `p` of the image node `img` named `stem.raw`.
fn part_entry(stem: &str, img: &Node, p: &Partition) -> Option<Entry> {
    let NodeKind::Image(image) = &img.kind else { return None };
    let window = Window::new(image.clone(), p.start, p.len);
    Some(Entry {
        name: format!("{stem}{}", part_suffix(p.number)),
        key: format!("{}:{}", img.ino, p.number),
        kind: NodeKind::Part { image: img.ino, window },
        mtime: img.mtime,
    })
}

/// The shown partitions of an image node (none for other nodes).
fn partitions(img: &Node) -> &[Partition] {
    match &img.kind {
        NodeKind::Image(image) => image.partitions(),
        _ => &[],
    }
}

/// The image node `<stem>.raw` of folder `dir`.
fn image_in<'t>(tree: &'t Tree, dir: &Node, stem: &str) -> Option<&'t Arc<Node>> {
    let NodeKind::Dir(children) = &dir.kind else { return None };
    let name = format!("{stem}.raw");
    let i = children.binary_search_by(|(n, _)| n.as_str().cmp(&name)).ok()?;
    tree.get(children[i].1)
}

impl Provider for PartitionFiles {
    fn children(&self, tree: &Tree, dir: &Node) -> Vec<Entry> {
        let NodeKind::Dir(children) = &dir.kind else { return Vec::new() };
        let mut out = Vec::new();
        for (name, child) in children {
            if let (Some(stem), Some(img)) = (name.strip_suffix(".raw"), tree.get(*child)) {
                let shown = partitions(img).iter().filter(|p| p.number <= PART_MAX);
                out.extend(shown.filter_map(|p| part_entry(stem, img, p)));
            }
        }
        out
    }

    fn lookup(&self, tree: &Tree, dir: &Node, name: &str) -> Option<Entry> {
        let (stem, n) = partition_name(name)?;
        let img = image_in(tree, dir, stem)?;
        let p = partitions(img).iter().find(|p| p.number == n && n <= PART_MAX)?;
        part_entry(stem, img, p)
    }

    fn entry(&self, tree: &Tree, dir: &Node, key: &str) -> Option<Entry> {
        let (ino, n) = parse_key(key)?;
        let NodeKind::Dir(children) = &dir.kind else { return None };
        let (name, _) = children.iter().find(|(_, i)| *i == ino)?;
        let img = tree.get(ino)?;
        let p = partitions(img).iter().find(|p| p.number == n && n <= PART_MAX)?;
        part_entry(name.strip_suffix(".raw")?, img, p)
    }

    fn aliases(&self, node: &Node, off: u64, len: u64) -> Vec<(Target, u64, u64)> {
        match &node.kind {
            NodeKind::Part { image, window } => vec![(Target::Ino(*image), window.start() + off, len)],
            NodeKind::Image(img) => img
                .known_partitions()
                .iter()
                .filter(|p| p.number <= PART_MAX)
                .filter_map(|p| {
                    let (from, to) = (off.max(p.start), (off + len).min(p.start + p.len));
                    let key = format!("{}:{}", node.ino, p.number);
                    (from < to).then(|| (Target::Entry { dir: node.parent, key }, from - p.start, to - from))
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_are_read_only_as_listed() {
        assert_eq!(partition_name("sda.p1.raw"), Some(("sda", 1)));
        assert_eq!(partition_name("a.pb.p12.raw"), Some(("a.pb", 12)));
        for alias in ["sda.p01.raw", "sda.p+1.raw", "sda.p.raw", "sda.p1", "sda.raw", "sda.p1x.raw"] {
            assert_eq!(partition_name(alias), None, "{alias}");
        }
    }

    #[test]
    fn keys_read_back() {
        assert_eq!(parse_key("17:5"), Some((17, 5)));
        for bad in ["17", "x:5", "17:", ":5", "17:5:1"] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
    }
}
