//! The mount's directory tree, built once from the catalog and never changed.
//!
//! ```text
//! /.stats                              cache counters
//! /<domain>/latest -> <newest point>
//! /<domain>/<point>/<disk>.raw         the disk image at that point
//! /<domain>/<point>/vmconfig.xml       the domain XML saved with that backup
//! ```
//! Inode numbers are indexes into one `Vec` (root = 1), so lookups need no lock. Broken
//! restore points are left out (`vmback ls` says why); damaged ones are shown.

use std::path::PathBuf;
use std::time::SystemTime;

use super::image::{ChainFile, Identity};
use crate::catalog::{Catalog, Status};
use crate::chain::Layer;

/// An inode number: index + 1 in the node table.
pub type Ino = u64;

pub const ROOT: Ino = 1;

/// Name of the counters file at the mount root.
pub const STATS_NAME: &str = ".stats";

#[derive(Debug)]
pub enum NodeKind {
    /// Children sorted by name.
    Dir(Vec<(String, Ino)>),
    /// The disk image with this index in [`Tree::images`].
    Image(usize),
    /// A file from the backup set, served as it is (bounded in size at build time).
    Config {
        path: PathBuf,
        size: u64,
    },
    Link(String),
    Stats,
}

#[derive(Debug)]
pub struct Node {
    pub parent: Ino,
    pub kind: NodeKind,
    pub mtime: SystemTime,
}

/// An image in the tree: its chain and what it is.
pub struct ImageSpec {
    pub layers: Vec<Layer>,
    pub identity: Identity,
}

/// The tree, plus the chains of the images in it.
pub struct Tree {
    pub nodes: Vec<Node>,
    pub images: Vec<ImageSpec>,
}

impl Tree {
    pub fn build(catalog: &Catalog, mounted_at: SystemTime) -> Tree {
        let mut t = Tree { nodes: Vec::new(), images: Vec::new() };
        let root = t.add(ROOT, NodeKind::Dir(Vec::new()), mounted_at);
        let stats = t.add(root, NodeKind::Stats, mounted_at);
        let mut root_children = vec![(STATS_NAME.to_owned(), stats)];
        for domain in &catalog.domains {
            let shown: Vec<_> =
                domain.points.iter().filter(|p| !matches!(p.status(), Status::Broken(_))).collect();
            if shown.is_empty() {
                continue;
            }
            let newest = shown.iter().map(|p| p.date).max().unwrap_or(mounted_at);
            let dom = t.add(root, NodeKind::Dir(Vec::new()), newest);
            let mut dom_children = Vec::new();
            if let Some(latest) = domain.latest() {
                let link = t.add(dom, NodeKind::Link(latest.name.clone()), latest.date);
                dom_children.push(("latest".to_owned(), link));
            }
            for point in shown {
                let dir = t.add(dom, NodeKind::Dir(Vec::new()), point.date);
                let mut files = Vec::new();
                for disk in &point.disks {
                    let chain = disk
                        .layers
                        .iter()
                        .map(|l| ChainFile {
                            name: l.index.path.file_name().unwrap_or_default().to_string_lossy().into_owned(),
                            size: l.index.file_len,
                            date: l.index.meta.date.clone(),
                            checkpoint: l.index.meta.checkpoint_name.clone(),
                        })
                        .collect();
                    let identity = Identity {
                        domain: domain.name.clone(),
                        point: point.name.clone(),
                        disk: disk.disk.clone(),
                        chain,
                    };
                    t.images.push(ImageSpec { layers: disk.layers.clone(), identity });
                    let img = t.add(dir, NodeKind::Image(t.images.len() - 1), point.date);
                    files.push((format!("{}.raw", disk.disk), img));
                }
                if let Some(path) = &point.vmconfig
                    && let Ok(meta) = std::fs::symlink_metadata(path)
                    && meta.is_file()
                {
                    let cfg =
                        t.add(dir, NodeKind::Config { path: path.clone(), size: meta.len() }, point.date);
                    files.push(("vmconfig.xml".to_owned(), cfg));
                }
                t.set_children(dir, files);
                dom_children.push((point.name.clone(), dir));
            }
            t.set_children(dom, dom_children);
            root_children.push((domain.name.clone(), dom));
        }
        t.set_children(root, root_children);
        t
    }

    fn add(&mut self, parent: Ino, kind: NodeKind, mtime: SystemTime) -> Ino {
        self.nodes.push(Node { parent, kind, mtime });
        self.nodes.len() as Ino
    }

    fn set_children(&mut self, dir: Ino, mut children: Vec<(String, Ino)>) {
        children.sort();
        children.dedup_by(|a, b| a.0 == b.0);
        self.nodes[(dir - 1) as usize].kind = NodeKind::Dir(children);
    }

    pub fn get(&self, ino: Ino) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }
}
