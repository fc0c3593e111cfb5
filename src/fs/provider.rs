//! Synthetic nodes: files and folders that are not in the catalog's tree but made from
//! its nodes' content by a [`Provider`] (the partition files of an image today; the
//! files inside an image's filesystem later).
//!
//! The core owns the numbering: it asks each provider for the entries it adds to a
//! folder, numbers them in its table (`inode::SynthInos`) by folder, provider and the
//! entry's key, and finds a node by number again by asking the same provider for that key
//! in that folder. So a provider never deals with inode numbers, the FUSE adapter never
//! sees providers, and a provider may add a tree of any size, found lazily: a synthetic
//! folder is a [`NodeKind::Dir`] (with no tree children) whose entries the core asks its
//! provider for when it is listed or looked into.
//!
//! A provider's answers must be stable: the same folder and key give the same content
//! for as long as the tree nodes they come from are the same (their numbers are).

use std::time::SystemTime;

use super::inode::{Ino, Node, NodeKind, Tree};

/// One node a provider adds to a folder.
pub struct Entry {
    pub name: String,
    /// What the node is numbered by within its folder (see the module note).
    pub key: String,
    pub kind: NodeKind,
    pub mtime: SystemTime,
}

/// A file whose bytes a write changed, as a provider names it.
pub enum Target {
    /// A tree node.
    Ino(Ino),
    /// A synthetic node of this provider: its folder and key. Only a node the core
    /// numbered already is told (the kernel cannot cache one it never saw).
    Entry { dir: Ino, key: String },
}

/// See the module note.
pub trait Provider: Send + Sync {
    /// The entries it adds to folder `dir` (a node of `tree`, or a synthetic folder).
    fn children(&self, tree: &Tree, dir: &Node) -> Vec<Entry>;

    /// The entry named `name` in `dir`. Override when a name says where to look, so a
    /// lookup does not make the whole folder.
    fn lookup(&self, tree: &Tree, dir: &Node, name: &str) -> Option<Entry> {
        self.children(tree, dir).into_iter().find(|e| e.name == name)
    }

    /// The entry keyed `key` in `dir`; overridable like [`Provider::lookup`].
    fn entry(&self, tree: &Tree, dir: &Node, key: &str) -> Option<Entry> {
        self.children(tree, dir).into_iter().find(|e| e.key == key)
    }

    /// The other files that show bytes a write through `node` changed (`len` bytes at
    /// `off` of that file), each with the range in its own offsets.
    fn aliases(&self, _node: &Node, _off: u64, _len: u64) -> Vec<(Target, u64, u64)> {
        Vec::new()
    }
}
