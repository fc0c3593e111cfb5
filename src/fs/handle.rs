//! Open files by handle number.
//!
//! A handle holds the node it opened, not its number: an open file stays readable and
//! writable after a refresh took it out of the tree (its set deleted or rotated away),
//! until it is closed. Numbers are never reused within a mount (a 64-bit counter), so a
//! stale handle from the kernel finds nothing rather than another file.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::inode::Node;

/// See the module note.
pub struct Handles {
    open: Mutex<HashMap<u64, Arc<Node>>>,
    next: AtomicU64,
}

impl Default for Handles {
    fn default() -> Handles {
        // 0 is left out: some tools take a zero handle for "none".
        Handles { open: Mutex::new(HashMap::new()), next: AtomicU64::new(1) }
    }
}

impl Handles {
    /// Opens `node` under a new handle number.
    pub fn open(&self, node: Arc<Node>) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.open.lock().insert(fh, node);
        fh
    }

    /// The node open under `fh`.
    pub fn get(&self, fh: u64) -> Option<Arc<Node>> {
        self.open.lock().get(&fh).cloned()
    }

    /// The last close of `fh`.
    pub fn close(&self, fh: u64) {
        self.open.lock().remove(&fh);
    }

    /// Every open node.
    pub fn all(&self) -> Vec<Arc<Node>> {
        self.open.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::inode::NodeKind;

    #[test]
    fn handles_are_never_reused_and_outlive_nothing_after_close() {
        let h = Handles::default();
        let node = |ino| {
            let kind = NodeKind::Link(format!("{ino}"));
            Arc::new(Node { ino, parent: 1, kind, mtime: std::time::SystemTime::UNIX_EPOCH })
        };
        let a = h.open(node(10));
        let b = h.open(node(11));
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_eq!(h.get(a).map(|n| n.ino), Some(10));
        h.close(a);
        assert!(h.get(a).is_none());
        let c = h.open(node(12));
        assert!(c != a && c != b, "a closed number is not handed out again");
        assert_eq!(h.all().len(), 2);
    }
}
