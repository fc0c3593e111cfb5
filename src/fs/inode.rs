//! The mount's directory tree, built from a catalog, and built again whenever SOURCE
//! changes (a new backup, a set rotated away).
//!
//! ```text
//! /.stats                              cache counters
//! /<domain>/latest -> <newest point>
//! /<domain>/<point>/<disk>.raw         the disk image at that point
//! /<domain>/<point>/<disk>.p<N>.raw    partition N of that image (MBR or GPT)
//! /<domain>/<point>/vmconfig.xml       the domain XML saved with that backup
//! /<domain>/<point>/<boot file>        kernel, initrd, loader, NVRAM saved with it
//! /<domain>/<point>/info.json          which stream files make the point, and its status
//! ```
//! Partition files are not stored in the tree: they are synthetic nodes, made by a
//! provider (see `provider`) when someone looks into the point's folder, since finding
//! them reads the image's partition table. Their numbers come from [`SynthInos`], keyed
//! by folder, provider and the provider's key, and are drawn from the same counter as the
//! tree's, so no number is ever handed out twice.
//! A tree is immutable; a refresh builds a new one and swaps it in. Inode numbers are
//! stable across trees: a node keeps its number while its path and content stay the
//! same, and anything else gets a number never used before, so the kernel cannot serve
//! pages or attributes it cached for other contents. An image is the same while it is
//! the same backup by [`Identity`] (each stream file's name, size, date and checkpoint),
//! also when its files were indexed again (touched, their folder renamed, copied again):
//! it is then the same [`Image`], which keeps reading the files it opened, and its overlay
//! (a kept one stays locked by it) and cached frames carry over. An `info.json` is the
//! same while its stream files (by layer id), its vmconfig file and its boot files are; a `vmconfig.xml`
//! while its file is (path, size, inode, mtime). Broken restore points are left out
//! (`vmback ls` says why); damaged ones are shown.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use super::image::{ChainFile, Identity, Image};
use crate::catalog::{Catalog, RestorePoint, Status};
use crate::chain::Layer;
use crate::source::{self, SourcePath};
use crate::view::Window;

/// An inode number.
pub type Ino = u64;

/// The root's number: FUSE's `FUSE_ROOT_ID`, what the kernel asks for first.
pub const ROOT: Ino = 1;

/// The counters file has a fixed number: it never changes.
const STATS_INO: Ino = 2;

/// Name of the counters file at the mount root.
pub const STATS_NAME: &str = ".stats";

/// Name of the file in each restore point folder that says what the point is made of.
pub const INFO_NAME: &str = "info.json";

pub enum NodeKind {
    /// Children sorted by name.
    Dir(Vec<(String, Ino)>),
    Image(Arc<Image>),
    /// A file from the backup set, served as it is (bounded in size at build time).
    Config {
        file: SourcePath,
        size: u64,
    },
    Link(String),
    Stats,
    /// `info.json` of a restore point (domain name, point), written out when opened: for
    /// a long chain it lists hundreds of files, and most are never read. Its length is
    /// kept once known, so a `stat` writes it out only the first time.
    Info(Arc<(String, RestorePoint)>, OnceLock<u64>),
    /// The bytes of an open `info.json`, written out once at open (see `ImageFs::open`),
    /// not once per read request. Only in the handle table, never in the tree.
    Text(Arc<[u8]>),
    /// A partition of the image node `image`: a window on it. Not in the tree: made
    /// when looked up or listed (see `part_files`), from the image's partition table.
    Part {
        image: Ino,
        window: Window<Arc<Image>>,
    },
}

pub struct Node {
    pub ino: Ino,
    pub parent: Ino,
    pub kind: NodeKind,
    pub mtime: SystemTime,
}

/// An image node to be made: its number, its chain and what it is.
pub struct ImageSpec {
    pub ino: Ino,
    pub layers: Vec<Layer>,
    pub identity: Identity,
}

/// The next number never handed out, shared by [`Inos`] and [`SynthInos`].
#[derive(Clone)]
pub struct Counter(Arc<AtomicU64>);

impl Default for Counter {
    fn default() -> Counter {
        Counter(Arc::new(AtomicU64::new(STATS_INO + 1)))
    }
}

impl Counter {
    fn take(&self) -> Ino {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// Inode numbers of tree nodes handed out so far, by what the node is; kept from one
/// tree to the next.
pub struct Inos {
    by_key: HashMap<String, Ino>,
    next: Counter,
}

impl Inos {
    pub fn new(next: Counter) -> Inos {
        Inos { by_key: HashMap::new(), next }
    }

    fn get(&mut self, key: String) -> Ino {
        *self.by_key.entry(key).or_insert_with(|| self.next.take())
    }
}

/// What a synthetic node is numbered by: the folder it is in, the provider that made it
/// (its index in the mount's list) and the provider's key for it, which stays the same
/// exactly while the node's content does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SynthKey {
    pub dir: Ino,
    pub provider: usize,
    pub key: String,
}

/// Numbers of synthetic nodes, both ways. Entries live until their outermost tree
/// folder has left every tree still answering ([`SynthInos::retain`]).
pub struct SynthInos {
    by_key: HashMap<SynthKey, Ino>,
    by_ino: HashMap<Ino, SynthKey>,
    next: Counter,
}

impl SynthInos {
    pub fn new(next: Counter) -> SynthInos {
        SynthInos { by_key: HashMap::new(), by_ino: HashMap::new(), next }
    }

    /// The number of `key`, handed out now if it has none.
    pub fn number(&mut self, key: SynthKey) -> Ino {
        if let Some(&ino) = self.by_key.get(&key) {
            return ino;
        }
        let ino = self.next.take();
        self.by_ino.insert(ino, key.clone());
        self.by_key.insert(key, ino);
        ino
    }

    /// The number of `key` if it has one (the kernel may know it).
    pub fn find(&self, key: &SynthKey) -> Option<Ino> {
        self.by_key.get(key).copied()
    }

    /// What `ino` numbers, if it is synthetic.
    pub fn key(&self, ino: Ino) -> Option<&SynthKey> {
        self.by_ino.get(&ino)
    }

    /// Keeps the entries whose outermost folder not made by a provider satisfies `live`.
    pub fn retain(&mut self, live: impl Fn(Ino) -> bool) {
        let outer = |mut ino: Ino| {
            // Each step goes to an older number (a folder is numbered before what is in
            // it), so the walk ends.
            while let Some(k) = self.by_ino.get(&ino) {
                ino = k.dir;
            }
            ino
        };
        let dead: Vec<Ino> =
            self.by_ino.iter().filter(|(_, k)| !live(outer(k.dir))).map(|(&i, _)| i).collect();
        for ino in dead {
            if let Some(k) = self.by_ino.remove(&ino) {
                self.by_key.remove(&k);
            }
        }
    }
}

/// A node before its image exists.
enum Draft {
    Done(NodeKind),
    Image(ImageSpec),
}

/// See the module note.
#[derive(Default)]
pub struct Tree {
    nodes: HashMap<Ino, Arc<Node>>,
}

impl Tree {
    /// The tree of `catalog`, numbering nodes through `inos` (which then holds only this
    /// tree's numbers). `images` makes the images of the specs given, in order; it is
    /// called once, with all of them, so readers of one chain can share work.
    pub fn build(
        catalog: &Catalog,
        inos: &mut Inos,
        mounted_at: SystemTime,
        images: impl FnOnce(Vec<ImageSpec>) -> Vec<Arc<Image>>,
    ) -> Tree {
        let mut b = Builder { inos, drafts: Vec::new(), used: HashSet::new() };
        let mut root_children = vec![(STATS_NAME.to_owned(), STATS_INO)];
        b.drafts.push((STATS_INO, ROOT, Draft::Done(NodeKind::Stats), mounted_at));
        for domain in &catalog.domains {
            let shown: Vec<_> =
                domain.points.iter().filter(|p| !matches!(p.status(), Status::Broken(_))).collect();
            if shown.is_empty() {
                continue;
            }
            let newest = shown.iter().map(|p| p.date).max().unwrap_or(mounted_at);
            let dom = b.ino(format!("d:{}", domain.name));
            let mut dom_children = Vec::new();
            if let Some(latest) = domain.latest() {
                let link = b.ino(format!("l:{}:{}", domain.name, latest.name));
                b.drafts.push((link, dom, Draft::Done(NodeKind::Link(latest.name.clone())), latest.date));
                dom_children.push(("latest".to_owned(), link));
            }
            for point in shown {
                let at = format!("{}/{}", domain.name, point.name);
                let dir = b.ino(format!("p:{at}"));
                let mut files = Vec::new();
                for disk in &point.disks {
                    let identity = Identity {
                        domain: domain.name.clone(),
                        point: point.name.clone(),
                        disk: disk.disk.clone(),
                        chain: disk.layers.iter().map(chain_file).collect(),
                    };
                    // A hash, not the chain itself: the keys of all points of a long chain
                    // would grow with the square of its length. Two versions of one disk
                    // at one path share a 64-bit hash about once in 2^64 refreshes.
                    let mut chain = std::hash::DefaultHasher::new();
                    identity.chain.hash(&mut chain);
                    let img = b.ino(format!("i:{at}/{}:{:016x}", disk.disk, chain.finish()));
                    let spec = ImageSpec { ino: img, layers: disk.layers.clone(), identity };
                    b.drafts.push((img, dir, Draft::Image(spec), point.date));
                    files.push((format!("{}.raw", disk.disk), img));
                }
                let all_ids: Vec<String> =
                    point.disks.iter().flat_map(|d| d.layers.iter().map(|l| l.id.to_string())).collect();
                // Everything info.json says comes from the layers but the vmconfig and
                // boot files, which may show up after the data (rsync copies in name order).
                let cfg_name = point.vmconfig.as_ref().map(|p| p.shown().display().to_string());
                let boot: Vec<String> =
                    point.boot_files.iter().map(|f| f.file.shown().display().to_string()).collect();
                let info = b.ino(format!(
                    "n:{at}:{}:{}:{}",
                    all_ids.join(","),
                    cfg_name.unwrap_or_default(),
                    boot.join(",")
                ));
                let of = Arc::new((domain.name.clone(), point.clone()));
                b.drafts.push((info, dir, Draft::Done(NodeKind::Info(of, OnceLock::new())), point.date));
                files.push((INFO_NAME.to_owned(), info));
                // The domain XML, and beside it the boot files saved with it, under their
                // own names (plain file names: `catalog::boot`), unless one would take the
                // name of another file of the folder.
                let side = point
                    .vmconfig
                    .iter()
                    .map(|f| ("vmconfig.xml".to_owned(), f))
                    .chain(point.boot_files.iter().map(|bf| (bf.named.name.clone(), &bf.file)));
                for (name, file) in side {
                    if files.iter().any(|(n, _)| *n == name) {
                        continue;
                    }
                    if let Ok(entry) = file.source.stat(&file.path)
                        && entry.kind == source::Kind::File
                    {
                        let size = entry.size;
                        // A file rewritten in place keeps its path and may keep its size: its
                        // stamp (locally inode, times and length) tells the versions apart.
                        let cfg = b.ino(format!("c:{}:{size}:{:?}", file.shown().display(), entry.stamp));
                        b.drafts.push((
                            cfg,
                            dir,
                            Draft::Done(NodeKind::Config { file: file.clone(), size }),
                            point.date,
                        ));
                        files.push((name, cfg));
                    }
                }
                b.dir(dir, dom, files, point.date);
                dom_children.push((point.name.clone(), dir));
            }
            b.dir(dom, ROOT, dom_children, newest);
            root_children.push((domain.name.clone(), dom));
        }
        b.dir(ROOT, ROOT, root_children, mounted_at);
        let Builder { inos, drafts, used } = b;
        inos.by_key.retain(|key, _| used.contains(key));

        let (mut specs, mut placed, mut done) = (Vec::new(), Vec::new(), Vec::new());
        for (ino, parent, draft, mtime) in drafts {
            match draft {
                Draft::Done(kind) => done.push(Node { ino, parent, kind, mtime }),
                Draft::Image(spec) => {
                    specs.push(spec);
                    placed.push((ino, parent, mtime));
                }
            }
        }
        let image_nodes = placed.into_iter().zip(images(specs)).map(|((ino, parent, mtime), img)| Node {
            ino,
            parent,
            kind: NodeKind::Image(img),
            mtime,
        });
        Tree { nodes: done.into_iter().chain(image_nodes).map(|n| (n.ino, Arc::new(n))).collect() }
    }

    pub fn get(&self, ino: Ino) -> Option<&Arc<Node>> {
        self.nodes.get(&ino)
    }

    pub fn image(&self, ino: Ino) -> Option<&Arc<Image>> {
        match &self.nodes.get(&ino)?.kind {
            NodeKind::Image(img) => Some(img),
            _ => None,
        }
    }

    /// Every image of the tree.
    pub fn images(&self) -> impl Iterator<Item = (Ino, &Arc<Image>)> {
        self.nodes.values().filter_map(|n| match &n.kind {
            NodeKind::Image(img) => Some((n.ino, img)),
            _ => None,
        })
    }
}

/// What a kept overlay records of one stream file.
fn chain_file(l: &Layer) -> ChainFile {
    ChainFile {
        name: l.index.path.file_name().unwrap_or_default().to_string_lossy().into_owned(),
        size: l.index.file_len,
        date: l.index.meta.date.clone(),
        checkpoint: l.index.meta.checkpoint_name.clone(),
    }
}

struct Builder<'a> {
    inos: &'a mut Inos,
    drafts: Vec<(Ino, Ino, Draft, SystemTime)>,
    used: HashSet<String>,
}

impl Builder<'_> {
    fn ino(&mut self, key: String) -> Ino {
        let ino = self.inos.get(key.clone());
        self.used.insert(key);
        ino
    }

    fn dir(&mut self, ino: Ino, parent: Ino, mut children: Vec<(String, Ino)>, mtime: SystemTime) {
        children.sort();
        children.dedup_by(|a, b| a.0 == b.0);
        self.drafts.push((ino, parent, Draft::Done(NodeKind::Dir(children)), mtime));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: Ino, key: &str) -> SynthKey {
        SynthKey { dir, provider: 0, key: key.into() }
    }

    #[test]
    fn synthetic_numbers_are_stable_unique_and_let_go_with_their_folder() {
        let next = Counter::default();
        let mut tree = Inos::new(next.clone());
        let mut synth = SynthInos::new(next);
        let (dir_a, dir_b) = (tree.get("p:a".into()), tree.get("p:b".into()));
        let p1 = synth.number(key(dir_a, "7:1"));
        assert_eq!(synth.number(key(dir_a, "7:1")), p1, "the same key keeps its number");
        let nested = synth.number(key(p1, "etc"));
        let other = synth.number(key(dir_b, "7:1"));
        let all = [dir_a, dir_b, p1, nested, other, tree.get("p:c".into())];
        assert_eq!(all.iter().collect::<HashSet<_>>().len(), all.len(), "one counter, no number twice");
        assert_eq!(synth.key(nested), Some(&key(p1, "etc")));
        assert_eq!(synth.find(&key(dir_a, "7:2")), None, "find hands out nothing");
        // Folder a leaves every tree: its entries go, also the one inside a synthetic
        // folder of it; b's stays.
        synth.retain(|ino| ino == dir_b);
        assert_eq!((synth.key(p1), synth.key(nested)), (None, None));
        assert_eq!(synth.find(&key(dir_b, "7:1")), Some(other));
        let again = synth.number(key(dir_a, "7:1"));
        assert!(!all.contains(&again), "a key let go gets a new number");
    }
}
