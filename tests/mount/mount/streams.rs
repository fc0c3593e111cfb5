//! Building backup sets the way virtnbdbackup lays them out, with the library's stream
//! writer, from sparse raw "work" images, and keeping the expected image of every restore
//! point ("truth") as a sparse raw file next to the set.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use vmback::chain::{MAX_REQUEST, StreamMeta, StreamWriter};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

pub use crate::common::rng::Rng;

impl Rng {
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What the bytes of a write look like (decides how well lz4 does on them).
#[derive(Debug, Clone, Copy)]
pub enum Style {
    /// Incompressible: lz4 stores its blocks raw.
    Random,
    /// Text that compresses well; each 4 KiB block names its offset, so misplaced blocks show.
    Text,
    /// 64 KiB of text, 64 KiB of random, alternating.
    Mixed,
}

/// `len` bytes of `style` for disk offset `off`.
pub fn content(rng: &mut Rng, style: Style, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    match style {
        Style::Random => rng.fill(&mut buf),
        Style::Text => text(&mut buf, off),
        Style::Mixed => {
            for (i, chunk) in buf.chunks_mut(64 << 10).enumerate() {
                if i % 2 == 0 {
                    text(chunk, off + i as u64 * (64 << 10));
                } else {
                    rng.fill(chunk);
                }
            }
        }
    }
    buf
}

fn text(buf: &mut [u8], off: u64) {
    const PHRASE: &[u8] = b"the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. ";
    for (i, block) in buf.chunks_mut(4096).enumerate() {
        let head = format!("[block at disk offset {:#014x}] ", off + i as u64 * 4096);
        let n = head.len().min(block.len());
        block[..n].copy_from_slice(&head.as_bytes()[..n]);
        for (j, b) in block[n..].iter_mut().enumerate() {
            *b = PHRASE[j % PHRASE.len()];
        }
    }
}

/// `[start, end)` ranges sorted and merged (touching ranges merge too).
pub fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.0 < r.1);
    ranges.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
            _ => out.push(r),
        }
    }
    out
}

/// Total length of merged ranges.
pub fn total(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|r| r.1 - r.0).sum()
}

/// The data extents `[start, end)` of a sparse file, by SEEK_DATA / SEEK_HOLE.
pub fn data_extents(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let size = file.metadata()?.len();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = (lseek(file, start as i64, Whence::SeekHole)? as u64).min(size);
        if end > start {
            out.push((start, end));
        }
        pos = end.max(start + 1);
    }
    Ok(out)
}

/// Copies `from` to `to` keeping its holes.
pub fn sparse_copy(from: &Path, to: &Path) -> io::Result<()> {
    let src = File::open(from)?;
    let dst = File::create(to)?;
    dst.set_len(src.metadata()?.len())?;
    let mut buf = vec![0u8; 4 << 20];
    for (start, end) in data_extents(&src)? {
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], pos)?;
            dst.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
    }
    Ok(())
}

/// The metadata of one stream file, apart from what the data decides.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    pub disk: &'a str,
    pub date: &'a str,
    pub checkpoint: &'a str,
    pub parent: &'a str,
    pub incremental: bool,
    pub compressed: Option<u32>,
}

fn meta(spec: &Spec, virtual_size: u64, data_size: u64) -> StreamMeta {
    StreamMeta {
        compressed: spec.compressed,
        ..StreamMeta::full(spec.disk, virtual_size, data_size)
            .point(spec.checkpoint, spec.parent, spec.incremental)
            .dated(spec.date)
    }
}

/// Writes `ranges` of `raw` (sorted, disjoint) as data frames; in a full stream
/// (`fill_zero`) the gaps become zero frames so the frames tile the disk.
fn write_stream(
    raw: &Path,
    ranges: &[(u64, u64)],
    fill_zero: bool,
    out: &Path,
    spec: &Spec,
) -> io::Result<()> {
    let src = File::open(raw)?;
    let size = src.metadata()?.len();
    let m = meta(spec, size, total(ranges));
    let mut w = StreamWriter::new(BufWriter::new(File::create(out)?), &m, MAX_REQUEST)?;
    let mut pos = 0;
    for &(start, end) in ranges {
        if fill_zero && start > pos {
            w.zero(pos, start - pos)?;
        }
        w.data_from(start, end - start, |rel, n| {
            let mut buf = vec![0u8; n];
            src.read_exact_at(&mut buf, start + rel).map(|()| buf)
        })?;
        pos = end;
    }
    if fill_zero && pos < size {
        w.zero(pos, size - pos)?;
    }
    w.finish()?.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// A full stream of a sparse raw file: data frames for its data extents, zero frames for
/// its holes. Returns the data extents.
pub fn full_stream(raw: &Path, out: &Path, spec: &Spec) -> io::Result<Vec<(u64, u64)>> {
    let extents = data_extents(&File::open(raw)?)?;
    write_stream(raw, &extents, true, out, spec)?;
    Ok(extents)
}

/// An incremental stream of `raw` holding the changed `ranges` (merged here).
pub fn inc_stream(raw: &Path, ranges: &[(u64, u64)], out: &Path, spec: &Spec) -> io::Result<Vec<(u64, u64)>> {
    let ranges = merge(ranges.to_vec());
    write_stream(raw, &ranges, false, out, spec)?;
    Ok(ranges)
}

/// The ranges where two raw images differ, compared in `block`-byte blocks (the longer
/// image's tail counts as changed where it is not zero).
pub fn changed_blocks(old: &Path, new: &Path, block: u64) -> io::Result<Vec<(u64, u64)>> {
    let (a, b) = (File::open(old)?, File::open(new)?);
    let size = b.metadata()?.len();
    let old_size = a.metadata()?.len();
    let mut out = Vec::new();
    let (mut x, mut y) = (vec![0u8; block as usize], vec![0u8; block as usize]);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(block) as usize;
        b.read_exact_at(&mut y[..n], pos)?;
        x[..n].fill(0);
        if pos < old_size {
            let m = (old_size - pos).min(n as u64) as usize;
            a.read_exact_at(&mut x[..m], pos)?;
        }
        if x[..n] != y[..n] {
            out.push((pos, pos + n as u64));
        }
        pos += n as u64;
    }
    Ok(merge(out))
}

/// One disk of a set being built: a sparse work image and what changed since the last
/// checkpoint.
pub struct Disk {
    pub name: String,
    pub compressed: Option<u32>,
    work: PathBuf,
    /// Data ranges of the chain at the last checkpoint.
    chain_data: Vec<(u64, u64)>,
    /// Ranges written since the last checkpoint.
    dirty: Vec<(u64, u64)>,
}

impl Disk {
    pub fn size(&self) -> u64 {
        std::fs::metadata(&self.work).expect("work image").len()
    }

    pub fn write(&mut self, off: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(&self.work).expect("work image");
        assert!(off + bytes.len() as u64 <= self.size(), "write past the disk end");
        f.write_all_at(bytes, off).expect("writing work image");
        self.dirty.push((off, off + bytes.len() as u64));
    }

    pub fn fill(&mut self, rng: &mut Rng, style: Style, off: u64, len: u64) {
        let bytes = content(rng, style, off, len);
        self.write(off, &bytes);
    }

    /// Grows the disk (as `virsh blockresize` does).
    pub fn grow(&mut self, size: u64) {
        assert!(size >= self.size());
        OpenOptions::new().write(true).open(&self.work).expect("work image").set_len(size).expect("grow");
    }
}

/// The expected image of one disk at one restore point.
#[derive(Debug, Clone)]
pub struct PointDisk {
    pub disk: String,
    pub truth: PathBuf,
    pub size: u64,
    /// Where the chain has data frames (SEEK_DATA stops there), merged.
    pub data: Vec<(u64, u64)>,
}

/// A restore point as the mount should show it.
#[derive(Debug, Clone)]
pub struct Point {
    pub name: String,
    /// The metadata date, `YYYY-MM-DDTHH:MM:SS[.ffffff]` local time.
    pub date: String,
    pub vmconfig: PathBuf,
    pub disks: Vec<PointDisk>,
}

/// A backup set (one virtnbdbackup output folder) being built run by run.
pub struct SetBuilder {
    pub dir: PathBuf,
    truth_dir: PathBuf,
    pub domain: String,
    pub disks: Vec<Disk>,
    pub points: Vec<Point>,
    /// Checkpoints created so far (`virtnbdbackup.0` .. `.N-1`).
    checkpoints: usize,
}

impl SetBuilder {
    /// A set of `domain` in `dir`; work and truth images go to `truth_dir`.
    pub fn new(dir: &Path, truth_dir: &Path, domain: &str) -> SetBuilder {
        std::fs::create_dir_all(dir.join("checkpoints")).expect("set dir");
        std::fs::create_dir_all(truth_dir).expect("truth dir");
        SetBuilder {
            dir: dir.to_owned(),
            truth_dir: truth_dir.to_owned(),
            domain: domain.to_owned(),
            disks: Vec::new(),
            points: Vec::new(),
            checkpoints: 0,
        }
    }

    /// Adds an empty disk; returns its index.
    pub fn add_disk(&mut self, name: &str, size: u64, compressed: Option<u32>) -> usize {
        let work = self.truth_dir.join(format!("{}.{name}.work.raw", self.domain));
        File::create(&work).and_then(|f| f.set_len(size)).expect("work image");
        self.disks.push(Disk {
            name: name.into(),
            compressed,
            work,
            chain_data: Vec::new(),
            dirty: Vec::new(),
        });
        self.disks.len() - 1
    }

    pub fn disk(&mut self, i: usize) -> &mut Disk {
        &mut self.disks[i]
    }

    fn vmconfig(&self, ident: &str) -> PathBuf {
        let path = self.dir.join(format!("vmconfig.{ident}.xml"));
        let disks: String = self
            .disks
            .iter()
            .map(|d| {
                format!(
                    "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='/var/lib/libvirt/images/{}-{}.qcow2'/>\n      <target dev='{}' bus='scsi'/>\n    </disk>\n",
                    self.domain, d.name, d.name
                )
            })
            .collect();
        let xml = format!(
            "<domain type='kvm'>\n  <name>{}</name>\n  <memory unit='KiB'>1048576</memory>\n  <description>backup {ident}</description>\n  <devices>\n{disks}  </devices>\n</domain>\n",
            self.domain
        );
        std::fs::write(&path, xml).expect("vmconfig");
        path
    }

    fn snapshot(&self, point: &str, d: &Disk, data: Vec<(u64, u64)>) -> PointDisk {
        let truth = self.truth_dir.join(format!("{}.{point}.{}.raw", self.domain, d.name));
        sparse_copy(&d.work, &truth).expect("truth image");
        let size = d.size();
        let data = merge(data.into_iter().map(|(s, e)| (s.min(size), e.min(size))).collect());
        PointDisk { disk: d.name.clone(), truth, size, data }
    }

    /// A full backup of every disk (`<disk>.full.data`, checkpoint `virtnbdbackup.0`).
    pub fn full(&mut self, date: &str) -> &Point {
        assert_eq!(self.checkpoints, 0, "one full per set");
        let point = "virtnbdbackup.0";
        let mut disks = Vec::new();
        for i in 0..self.disks.len() {
            let d = &self.disks[i];
            let out = self.dir.join(format!("{}.full.data", d.name));
            let spec = Spec {
                disk: &d.name,
                date,
                checkpoint: point,
                parent: "",
                incremental: false,
                compressed: d.compressed,
            };
            let extents = full_stream(&d.work, &out, &spec).expect("full stream");
            disks.push(self.snapshot(point, d, extents.clone()));
            let d = &mut self.disks[i];
            d.chain_data = extents;
            d.dirty.clear();
        }
        self.finish_point(point.into(), date, point, disks)
    }

    /// An incremental backup of every disk (`<disk>.inc.virtnbdbackup.N.data`).
    pub fn inc(&mut self, date: &str) -> &Point {
        let n = self.checkpoints;
        assert!(n > 0, "an incremental needs a full first");
        let (point, parent) = (format!("virtnbdbackup.{n}"), format!("virtnbdbackup.{}", n - 1));
        let mut disks = Vec::new();
        for i in 0..self.disks.len() {
            let d = &self.disks[i];
            let out = self.dir.join(format!("{}.inc.{point}.data", d.name));
            let spec = Spec {
                disk: &d.name,
                date,
                checkpoint: &point,
                parent: &parent,
                incremental: true,
                compressed: d.compressed,
            };
            let ranges = inc_stream(&d.work, &d.dirty, &out, &spec).expect("inc stream");
            let data = merge(d.chain_data.iter().chain(&ranges).copied().collect());
            disks.push(self.snapshot(&point, d, data.clone()));
            let d = &mut self.disks[i];
            d.chain_data = data;
            d.dirty.clear();
        }
        self.finish_point(point.clone(), date, &point, disks)
    }

    /// A differential backup of every disk (`<disk>.diff.<unix_ts>.data`): everything since
    /// the last checkpoint, which it does not replace.
    pub fn diff(&mut self, date: &str, unix_ts: u64) -> &Point {
        let n = self.checkpoints;
        assert!(n > 0, "a differential needs a full first");
        let (cpt, parent) = (format!("virtnbdbackup.{n}"), format!("virtnbdbackup.{}", n - 1));
        let name = format!("{parent}.diff.{}", stamp(date));
        let mut disks = Vec::new();
        for i in 0..self.disks.len() {
            let d = &self.disks[i];
            let out = self.dir.join(format!("{}.diff.{unix_ts}.data", d.name));
            let spec = Spec {
                disk: &d.name,
                date,
                checkpoint: &cpt,
                parent: &parent,
                incremental: true,
                compressed: d.compressed,
            };
            let ranges = inc_stream(&d.work, &d.dirty, &out, &spec).expect("diff stream");
            let data = merge(d.chain_data.iter().chain(&ranges).copied().collect());
            disks.push(self.snapshot(&name, d, data));
        }
        self.points.push(Point {
            name,
            date: date.into(),
            vmconfig: self.vmconfig(&unix_ts.to_string()),
            disks,
        });
        self.points.last().expect("just pushed")
    }

    fn finish_point(&mut self, name: String, date: &str, ident: &str, disks: Vec<PointDisk>) -> &Point {
        let vmconfig = self.vmconfig(ident);
        let xml = format!("<domaincheckpoint>\n  <name>{ident}</name>\n</domaincheckpoint>\n");
        std::fs::write(self.dir.join("checkpoints").join(format!("{ident}.xml")), xml).expect("cpt xml");
        self.checkpoints += 1;
        let cpts: Vec<String> = (0..self.checkpoints).map(|i| format!("\"virtnbdbackup.{i}\"")).collect();
        std::fs::write(self.dir.join(format!("{}.cpt", self.domain)), format!("[{}]", cpts.join(", ")))
            .expect("cpt file");
        self.points.push(Point { name, date: date.into(), vmconfig, disks });
        self.points.last().expect("just pushed")
    }

    /// Removes the work images; returns the points.
    pub fn finish(self) -> Vec<Point> {
        for d in &self.disks {
            let _ = std::fs::remove_file(&d.work);
        }
        self.points
    }
}

/// `2026-05-04T10:00:00.75` -> `20260504-100000` (what vmback names diffs after).
pub fn stamp(date: &str) -> String {
    let digits: String = date.chars().take(19).filter(|c| c.is_ascii_digit()).collect();
    format!("{}-{}", &digits[..8], &digits[8..14])
}
