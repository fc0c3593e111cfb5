//! A reference-model test of [`ImageFs`] itself, driven with no kernel: random sequences
//! of lookups, listings, opens, reads, writes (through images and partition files),
//! closes and refreshes with a changed catalog, each checked against a simple model.
//!
//! The model is the catalog (which points and disks there are), a partition table
//! written into every `sda` before anyone looked into its folder (so the lazy table read
//! finds it), the base bytes of each image read by a chain reader of its own, and the
//! writes made since. It checks what is listed and found, sizes and kinds, bytes read,
//! that a path keeps its inode number while it stays, that a number is never handed out
//! for a second thing, that open files outlive a refresh, and that a write through one
//! file tells the alias hook of the other files showing those bytes.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::catalog::Watched;

const MIB: u64 = 1 << 20;
const DOMAIN: &str = "sample-vm";

/// The table written into each `sda`: `(number, start, len)`, MBR primary partitions.
const PARTS: [(u32, u64, u64); 2] = [(1, MIB, 4 * MIB), (2, 8 * MIB, 8 * MIB)];

/// Writes of the test stay at or after this offset of an image, clear of the table.
const FIRST_WRITABLE: u64 = MIB;

/// The sample's differential: the point that refreshes take away and bring back.
const DIFF_FILES: [&str; 2] = ["sda.diff.1780560000.data", "sdb.diff.1780560000.data"];

/// An MBR sector holding [`PARTS`].
fn mbr() -> Vec<u8> {
    let mut s = vec![0u8; 512];
    for (i, (_, start, len)) in PARTS.iter().enumerate() {
        let e = 446 + 16 * i;
        s[e + 4] = 0x83; // Linux
        s[e + 8..e + 12].copy_from_slice(&((start / 512) as u32).to_le_bytes());
        s[e + 12..e + 16].copy_from_slice(&((len / 512) as u32).to_le_bytes());
    }
    s[510..].copy_from_slice(&[0x55, 0xaa]);
    s
}

/// What a path of the model is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    Dir(Vec<String>),
    Link(String),
    /// An image file: the model image and the window of it the file shows.
    Image {
        image: String,
        start: u64,
        len: u64,
    },
    /// Another file (`.stats`, `info.json`, `vmconfig.xml`), read-only.
    Other,
}

/// One image's bytes: its base (a chain reader of the model's own) and the writes since.
struct ModelImage {
    base: Arc<ImageReader>,
    writes: Vec<(u64, Vec<u8>)>,
}

impl ModelImage {
    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let n = ImageReader::read_at(&self.base, &mut buf, off).expect("model base read");
        buf.truncate(n);
        for (at, data) in &self.writes {
            let (from, to) = ((*at).max(off), (at + data.len() as u64).min(off + buf.len() as u64));
            if from < to {
                buf[(from - off) as usize..(to - off) as usize]
                    .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
            }
        }
        buf
    }
}

#[derive(Debug, Clone)]
enum Op {
    Lookup(usize),
    Readdir(usize, u64),
    Open(usize, bool),
    Read(usize, u64, u32),
    Write(usize, u64, u32, u8),
    Release(usize),
    Refresh,
}

fn op() -> impl Strategy<Value = Op> {
    let any_path = 0usize..64;
    prop_oneof![
        3 => any_path.clone().prop_map(Op::Lookup),
        2 => (any_path.clone(), 0u64..12).prop_map(|(p, o)| Op::Readdir(p, o)),
        3 => (any_path, any::<bool>()).prop_map(|(p, w)| Op::Open(p, w)),
        4 => (0usize..8, any::<u64>(), 1u32..70_000).prop_map(|(h, o, l)| Op::Read(h, o, l)),
        4 => (0usize..8, any::<u64>(), 1u32..70_000, any::<u8>()).prop_map(|(h, o, l, b)| Op::Write(h, o, l, b)),
        1 => (0usize..8).prop_map(Op::Release),
        1 => Just(Op::Refresh),
    ]
}

/// An offset of a file of `len` bytes, mostly near the edges that matter (the partition
/// edges, the ends).
fn place(seed: u64, len: u64) -> u64 {
    let anchors = [0, MIB, 5 * MIB, 8 * MIB, 16 * MIB, len];
    let base = anchors[(seed % anchors.len() as u64) as usize];
    let delta = (seed >> 8) % 200_000;
    if seed & 0x80 == 0 { base.saturating_sub(delta) } else { base + delta }.min(len + 10)
}

struct Model {
    src: tempfile::TempDir,
    side: tempfile::TempDir,
    _scratch: tempfile::TempDir,
    watched: Watched,
    fs: ImageFs,
    points: Vec<String>,
    /// The point whose files refreshes take away and bring back, and how often it came
    /// back (its images are new each time).
    diff_point: String,
    diff_present: bool,
    generation: u32,
    bases: HashMap<(String, String), Arc<ImageReader>>,
    images: HashMap<String, ModelImage>,
    /// The number each present path was seen with.
    inos: HashMap<String, Ino>,
    /// Every number seen, with the path it was seen for.
    seen: HashMap<Ino, String>,
    /// Open handles: the handle number and what it is.
    handles: Vec<(u64, Want)>,
    hooks: Arc<Mutex<Vec<(Ino, u64, u64)>>>,
}

impl Model {
    fn new() -> Model {
        let src = tempfile::tempdir().expect("tempdir");
        let scratch = tempfile::tempdir().expect("tempdir");
        crate::sample::write_sample(src.path()).expect("sample");
        let (watched, cat) = Watched::open(src.path()).expect("catalog");
        // A quarter of a MiB of dirty pages: the writes of a run spill to the overlay files.
        let config = FsConfig {
            dirty_size: 256 << 10,
            ..super::tests::config(Writes::Scratch(scratch.path().into()))
        };
        let fs = ImageFs::new(&cat, &config).expect("fs");
        let hooks = Arc::new(Mutex::new(Vec::new()));
        let told = hooks.clone();
        fs.on_alias_change(Box::new(move |ino, off, len| told.lock().push((ino, off, len))));
        let domain = cat.domains.iter().find(|d| d.name == DOMAIN).expect("domain");
        let points: Vec<String> = domain.points.iter().map(|p| p.name.clone()).collect();
        let cache = Arc::new(ReadCache::new(4 << 20));
        let mut bases = HashMap::new();
        for p in &domain.points {
            for d in &p.disks {
                let reader = ImageReader::new(d.layers.clone(), cache.clone());
                bases.insert((p.name.clone(), d.disk.clone()), Arc::new(reader));
            }
        }
        let diff_point = domain.latest().expect("latest").name.clone();
        let mut m = Model {
            src,
            side: tempfile::tempdir().expect("tempdir"),
            _scratch: scratch,
            watched,
            fs,
            points,
            diff_point,
            diff_present: true,
            generation: 0,
            bases,
            images: HashMap::new(),
            inos: HashMap::new(),
            seen: HashMap::new(),
            handles: Vec::new(),
            hooks,
        };
        for p in m.points.clone() {
            m.new_images(&p);
            // The table goes in before anyone looks into the folder: the table is read
            // then, so it finds it.
            let ino = m.walk(&format!("{DOMAIN}/{p}/sda.raw")).expect("sda.raw").ino;
            let (fh, _) = m.fs.open(ino, true).expect("open sda.raw");
            assert_eq!(m.fs.write(fh, 0, &mbr()).expect("write the table"), 512);
            m.fs.release(fh);
            m.images.get_mut(&m.image_key(&p, "sda")).expect("image").writes.push((0, mbr()));
        }
        m.hooks.lock().clear();
        m
    }

    fn image_key(&self, point: &str, disk: &str) -> String {
        let generation = if point == self.diff_point { self.generation } else { 0 };
        format!("{point}/{disk}#{generation}")
    }

    fn new_images(&mut self, point: &str) {
        for disk in ["sda", "sdb"] {
            let base = self.bases[&(point.to_owned(), disk.to_owned())].clone();
            self.images.insert(self.image_key(point, disk), ModelImage { base, writes: Vec::new() });
        }
    }

    fn present(&self) -> Vec<&String> {
        self.points.iter().filter(|p| self.diff_present || **p != self.diff_point).collect()
    }

    /// Whether the point's `sda` has the table: its first image does; one brought back
    /// by a refresh is new, without the table.
    fn has_table(&self, point: &str) -> bool {
        point != self.diff_point || self.generation == 0
    }

    /// The model's tree: every present path and what it is.
    fn tree(&self) -> HashMap<String, Want> {
        let mut t = HashMap::new();
        let points = self.present();
        let newest = points.last().expect("points").to_string();
        let mut dom: Vec<String> = points.iter().map(|p| p.to_string()).collect();
        dom.push("latest".into());
        dom.sort();
        t.insert(String::new(), Want::Dir(vec![".stats".into(), DOMAIN.into()]));
        t.insert(".stats".into(), Want::Other);
        t.insert(DOMAIN.into(), Want::Dir(dom));
        t.insert(format!("{DOMAIN}/latest"), Want::Link(newest));
        for p in points {
            let dir = format!("{DOMAIN}/{p}");
            let mut names: Vec<String> =
                ["info.json", "sda.raw", "sdb.raw", "vmconfig.xml"].map(String::from).into();
            for disk in ["sda", "sdb"] {
                let (image, len) = (self.image_key(p, disk), self.bases[&(p.clone(), disk.into())].size());
                t.insert(format!("{dir}/{disk}.raw"), Want::Image { image, start: 0, len });
            }
            if self.has_table(p) {
                for (n, start, len) in PARTS {
                    names.push(format!("sda.p{n}.raw"));
                    let image = self.image_key(p, "sda");
                    t.insert(format!("{dir}/sda.p{n}.raw"), Want::Image { image, start, len });
                }
            }
            t.insert(format!("{dir}/info.json"), Want::Other);
            t.insert(format!("{dir}/vmconfig.xml"), Want::Other);
            t.insert(dir, Want::Dir(names));
        }
        t
    }

    /// Paths the ops pick from: all that may exist, and names that never do.
    fn candidates(&self) -> Vec<String> {
        let mut c = vec![String::new(), ".stats".into(), DOMAIN.into(), format!("{DOMAIN}/latest")];
        for p in &self.points {
            let dir = format!("{DOMAIN}/{p}");
            for f in ["sda.raw", "sdb.raw", "sda.p1.raw", "sda.p2.raw", "info.json", "vmconfig.xml"] {
                c.push(format!("{dir}/{f}"));
            }
            for f in ["sda.p3.raw", "sda.p01.raw", "sdb.p1.raw", "nothing"] {
                c.push(format!("{dir}/{f}"));
            }
            c.push(dir);
        }
        c.push("nothing".into());
        c
    }

    /// Looks `path` up name by name from the root.
    fn walk(&self, path: &str) -> Result<Attr> {
        let mut at = self.fs.getattr(ROOT, None)?;
        for name in path.split('/').filter(|n| !n.is_empty()) {
            at = self.fs.lookup(at.ino, name)?;
        }
        Ok(at)
    }

    /// `ino` was seen for `path`: the same number as before while the path stayed, else
    /// one never seen for anything.
    fn saw(&mut self, path: &str, ino: Ino) -> Result<(), TestCaseError> {
        match self.inos.get(path) {
            Some(&known) => prop_assert_eq!(known, ino, "{} changed its number", path),
            None => {
                let before = self.seen.get(&ino);
                prop_assert!(before.is_none(), "{} got number {} of {:?}", path, ino, before);
                self.inos.insert(path.to_owned(), ino);
                self.seen.insert(ino, path.to_owned());
            }
        }
        Ok(())
    }

    fn check_attr(&mut self, path: &str, want: &Want, at: &Attr) -> Result<(), TestCaseError> {
        if !path.is_empty() {
            self.saw(path, at.ino)?;
        }
        match want {
            Want::Dir(_) => prop_assert_eq!(at.kind, Kind::Dir, "{}", path),
            Want::Link(target) => {
                prop_assert_eq!(at.kind, Kind::Link);
                prop_assert_eq!(&self.fs.readlink(at.ino).expect("readlink"), target);
            }
            Want::Image { len, .. } => {
                prop_assert_eq!((at.kind, at.size, at.perm), (Kind::File, *len, 0o644), "{}", path);
            }
            Want::Other => prop_assert_eq!(at.kind, Kind::File, "{}", path),
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let tree = self.tree();
        let candidates = self.candidates();
        match *op {
            Op::Lookup(i) => {
                let path = &candidates[i % candidates.len()];
                match (self.walk(path), tree.get(path)) {
                    (Ok(at), Some(want)) => self.check_attr(path, want, &at)?,
                    (Err(_), None) => {}
                    (got, want) => prop_assert!(false, "lookup {}: got {:?}, want {:?}", path, got, want),
                }
            }
            Op::Readdir(i, offset) => {
                let path = &candidates[i % candidates.len()];
                let Some(Want::Dir(names)) = tree.get(path) else { return Ok(()) };
                let dir = self.walk(path).expect("a present folder");
                self.check_attr(path, &tree[path], &dir)?;
                let listed = self.fs.readdir(dir.ino, offset).expect("readdir");
                let mut want: Vec<String> = vec![".".into(), "..".into()];
                want.extend(names.iter().cloned());
                let want: Vec<&String> = want.iter().skip(offset as usize).collect();
                let got: Vec<&String> = listed.iter().map(|e| &e.3).collect();
                prop_assert_eq!(got, want, "readdir {} from {}", path, offset);
                for (k, (ino, next, kind, name)) in listed.iter().enumerate() {
                    prop_assert_eq!(*next, offset + k as u64 + 1);
                    if name != "." && name != ".." {
                        let child = if path.is_empty() { name.clone() } else { format!("{path}/{name}") };
                        self.saw(&child, *ino)?;
                        let want_kind = match &tree[&child] {
                            Want::Dir(_) => Kind::Dir,
                            Want::Link(_) => Kind::Link,
                            _ => Kind::File,
                        };
                        prop_assert_eq!(*kind, want_kind, "{}", child);
                    }
                }
            }
            Op::Open(i, write) => {
                let path = &candidates[i % candidates.len()];
                let Some(want) = tree.get(path) else { return Ok(()) };
                let at = self.walk(path).expect("a present file");
                let res = self.fs.open(at.ino, write);
                match (want, res) {
                    (Want::Dir(_), Err(FsError::IsADirectory)) => {}
                    (Want::Other, Err(FsError::ReadOnly)) if write => {}
                    (Want::Image { .. } | Want::Other, Ok((fh, _))) => self.handles.push((fh, want.clone())),
                    (Want::Link(_), _) => {}
                    (want, res) => prop_assert!(false, "open {} ({}): {:?} for {:?}", path, write, res, want),
                }
            }
            Op::Read(h, seed, len) => {
                let Some((fh, want)) = self.handles.get(h % self.handles.len().max(1)).cloned() else {
                    return Ok(());
                };
                let size = self.fs.getattr(0, Some(fh)).expect("fstat").size;
                let off = place(seed, size);
                let got =
                    self.fs.read(fh, off, len).map_err(|e| TestCaseError::fail(format!("read: {e}")))?;
                if let Want::Image { image, start, len: file_len } = &want {
                    prop_assert_eq!(size, *file_len);
                    let n = file_len.saturating_sub(off).min(len as u64) as usize;
                    let model = self.images[image].read(start + off, n);
                    prop_assert!(
                        got == model,
                        "read of {} at {} of {:?} differs from the model",
                        len,
                        off,
                        want
                    );
                }
            }
            Op::Write(h, seed, len, byte) => {
                let Some((fh, Want::Image { image, start, len: file_len })) =
                    self.handles.get(h % self.handles.len().max(1)).cloned()
                else {
                    return Ok(());
                };
                let off = place(seed, file_len).max(FIRST_WRITABLE.saturating_sub(start));
                let data = vec![byte; len as usize];
                let res = self.fs.write(fh, off, &data);
                if off >= file_len {
                    prop_assert!(res.is_err(), "a write past the end must fail");
                    return Ok(());
                }
                let n = res.map_err(|e| TestCaseError::fail(format!("write: {e}")))?;
                prop_assert_eq!(n as u64, (len as u64).min(file_len - off));
                self.images.get_mut(&image).expect("image").writes.push((start + off, data[..n].to_vec()));
                self.check_hooks(&image, start, start + off, n as u64)?;
            }
            Op::Release(h) => {
                if !self.handles.is_empty() {
                    let (fh, _) = self.handles.remove(h % self.handles.len());
                    self.fs.release(fh);
                    prop_assert!(self.fs.read(fh, 0, 1).is_err(), "released");
                }
            }
            Op::Refresh => {
                let (from, to) = if self.diff_present {
                    (self.src.path(), self.side.path())
                } else {
                    (self.side.path(), self.src.path())
                };
                for f in DIFF_FILES {
                    std::fs::rename(from.join(f), to.join(f)).expect("move the diff");
                }
                self.diff_present = !self.diff_present;
                let changed = self.watched.poll().expect("poll").expect("a change");
                self.fs.refresh(&changed);
                if self.diff_present {
                    self.generation += 1;
                    let p = self.diff_point.clone();
                    self.new_images(&p);
                }
                // Paths that left, and the moved link, are numbered anew when seen again.
                let now = self.tree();
                self.inos.retain(|path, _| now.contains_key(path) && !path.ends_with("/latest"));
            }
        }
        self.hooks.lock().clear();
        Ok(())
    }

    /// After a write of `len` bytes at image offset `at` of `image` through the file
    /// starting at `start`: the hook was told of every other file that shows them and
    /// the kernel may have cached (a present one the model saw a number for).
    fn check_hooks(&self, image: &str, start: u64, at: u64, len: u64) -> Result<(), TestCaseError> {
        let told: HashSet<(Ino, u64, u64)> = self.hooks.lock().iter().copied().collect();
        let tree = self.tree();
        let mut want = HashSet::new();
        for (path, w) in &tree {
            let Want::Image { image: i, start: s, len: l } = w else { continue };
            if i != image || *s == start {
                continue;
            }
            let (from, to) = (at.max(*s), (at + len).min(s + l));
            if let (Some(&ino), true) = (self.inos.get(path), from < to) {
                want.insert((ino, from - s, to - from));
            }
        }
        // Only files of present images are predictable; the hook may also be told of
        // files of an image that left (a tree still answering for it).
        let present: HashSet<Ino> = self.inos.values().copied().collect();
        let told: HashSet<_> = told.into_iter().filter(|t| present.contains(&t.0)).collect();
        let current = tree.values().any(|w| matches!(w, Want::Image { image: i, .. } if i == image));
        if current {
            prop_assert_eq!(told, want, "alias hook after a write at {} of {}", at, image);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, max_shrink_iters: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn image_fs_matches_its_model(ops in prop::collection::vec(op(), 1..40)) {
        let mut m = Model::new();
        // Every path at the start, so later ops find numbers to compare with.
        for path in m.candidates() {
            m.apply(&Op::Lookup(m.candidates().iter().position(|c| *c == path).expect("listed")))?;
        }
        for op in &ops {
            m.apply(op)?;
        }
        for (fh, _) in std::mem::take(&mut m.handles) {
            m.fs.release(fh);
        }
    }
}
