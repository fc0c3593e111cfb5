//! An independent reader of the stream format (written from doc/FORMAT.md §1, not
//! from vmback's scanner), used to find where to plant damage and what `verify` must
//! report; and a small writer of synthetic sets through the library's stream writer.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::Value;
use vmback::chain::{MAX_REQUEST, StreamMeta, StreamWriter};

pub const MIB: u64 = 1 << 20;
/// The lz4 frame magic, little endian on disk.
pub const LZ4_MAGIC: [u8; 4] = [0x04, 0x22, 0x4d, 0x18];

/// One lz4 frame of a compressed data payload.
#[derive(Debug, Clone, Copy)]
pub struct Lz4Frame {
    /// File offset of the frame (its magic).
    pub file_off: u64,
    pub size: u64,
    /// Disk range the frame decodes to.
    pub disk_start: u64,
    pub disk_end: u64,
}

/// One `data` or `zero` frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub data: bool,
    /// File offset of the 40-byte header.
    pub header_off: u64,
    pub start: u64,
    pub len: u64,
    /// File offset of the payload (data frames).
    pub payload_off: u64,
    /// Compressed streams: the lz4 frames of the payload.
    pub lz4: Vec<Lz4Frame>,
}

/// A stream file, walked.
#[derive(Debug, Clone)]
pub struct Stream {
    pub meta: Value,
    pub frames: Vec<Frame>,
}

impl Stream {
    pub fn virtual_size(&self) -> u64 {
        self.meta["virtualSize"].as_u64().expect("virtualSize")
    }
}

fn header(b: &[u8], at: usize) -> (String, u64, u64) {
    let h = &b[at..at + 40];
    assert_eq!(&h[38..40], b"\r\n", "header at {at} ends in CRLF");
    let kind = String::from_utf8(h[..4].to_vec()).expect("ascii kind");
    let num = |r: std::ops::Range<usize>| {
        u64::from_str_radix(std::str::from_utf8(&h[r]).expect("ascii"), 16).expect("hex number")
    };
    (kind, num(5..21), num(22..38))
}

/// Just the metadata of a stream file (reads its first frames only).
pub fn meta_of(path: &Path) -> Value {
    let f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut head = vec![0u8; 40];
    f.read_exact_at(&mut head, 0).expect("meta header");
    let (kind, _, len) = header(&head, 0);
    assert_eq!(kind, "meta", "{}", path.display());
    let mut json = vec![0u8; len as usize];
    f.read_exact_at(&mut json, 40).expect("meta json");
    serde_json::from_slice(&json).expect("meta is JSON")
}

/// Walks an intact stream file completely.
pub fn walk(path: &Path) -> Stream {
    let b = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (kind, _, jlen) = header(&b, 0);
    assert_eq!(kind, "meta");
    let meta: Value = serde_json::from_slice(&b[40..40 + jlen as usize]).expect("meta JSON");
    let mut pos = 40 + jlen as usize;
    assert_eq!(&b[pos..pos + 2], b"\r\n");
    pos += 2;
    let compressed = !matches!(meta["compressed"], Value::Bool(false) | Value::Null);
    let trailer: Vec<Vec<u64>> = if compressed {
        let (kind, _, tlen) = header(&b, b.len() - 40);
        assert_eq!(kind, "comp");
        let json = &b[b.len() - 42 - tlen as usize..b.len() - 42];
        let list: Vec<Value> = serde_json::from_slice(json).expect("trailer JSON");
        list.iter()
            .map(|e| match e {
                Value::Number(n) => vec![n.as_u64().expect("size")],
                Value::Object(o) => o
                    .values()
                    .next()
                    .expect("one key")
                    .as_array()
                    .expect("list")
                    .iter()
                    .map(|v| v.as_u64().expect("size"))
                    .collect(),
                other => panic!("bad trailer entry {other}"),
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut frames = Vec::new();
    let mut k = 0;
    loop {
        let (kind, start, len) = header(&b, pos);
        let header_off = pos as u64;
        pos += 40;
        match kind.as_str() {
            "stop" => break,
            "zero" => frames.push(Frame {
                data: false,
                header_off,
                start,
                len,
                payload_off: pos as u64,
                lz4: Vec::new(),
            }),
            "data" => {
                let payload_off = pos as u64;
                let mut lz4 = Vec::new();
                if compressed {
                    let mut disk = start;
                    for &size in &trailer[k] {
                        assert_eq!(&b[pos..pos + 4], LZ4_MAGIC, "lz4 magic at {pos}");
                        let content = u64::from_le_bytes(b[pos + 6..pos + 14].try_into().expect("8 bytes"));
                        assert!(content <= MAX_REQUEST, "an lz4 frame holds at most 32 MiB");
                        lz4.push(Lz4Frame {
                            file_off: pos as u64,
                            size,
                            disk_start: disk,
                            disk_end: disk + content,
                        });
                        disk += content;
                        pos += size as usize;
                    }
                    assert_eq!(disk, start + len, "lz4 frames cover the extent");
                    k += 1;
                } else {
                    pos += len as usize;
                }
                assert_eq!(&b[pos..pos + 2], b"\r\n", "CRLF after payload at {pos}");
                pos += 2;
                frames.push(Frame { data: true, header_off, start, len, payload_off, lz4 });
            }
            other => panic!("{}: unexpected frame kind {other:?} at {header_off}", path.display()),
        }
    }
    Stream { meta, frames }
}

/// Adler-32 (zlib) of a file, as upstream's `.chksum` sidecars hold it.
pub fn adler32(path: &Path) -> u32 {
    let bytes = fs::read(path).expect("read for adler32");
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in bytes.chunks(5552) {
        for &x in chunk {
            a += x as u32;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

/// One extent of a synthetic full backup: data filled with a byte (0 gives a data frame
/// of stored zeros). Gaps between extents become `zero` frames.
#[derive(Debug, Clone, Copy)]
pub struct Fill {
    pub start: u64,
    pub len: u64,
    pub byte: u8,
}

/// Writes a one-point set (`<disk>.full.data`, vmconfig, `.cpt`) with upstream's names to
/// `dir`, and the sparse truth image to `truth`.
pub fn write_full_set(
    dir: &Path,
    truth: &Path,
    disk: &str,
    size: u64,
    fills: &[Fill],
    compressed: Option<u32>,
) {
    fs::create_dir_all(dir).expect("set dir");
    let data_size = fills.iter().map(|f| f.len).sum();
    let meta = StreamMeta {
        compressed,
        ..StreamMeta::full(disk, size, data_size).dated("2026-06-01T08:00:00.000001")
    };
    let t = File::create(truth).expect("truth");
    t.set_len(size).expect("truth size");
    let out = BufWriter::with_capacity(
        MIB as usize,
        File::create(dir.join(format!("{disk}.full.data"))).expect("data"),
    );
    let mut w = StreamWriter::new(out, &meta, MAX_REQUEST).expect("meta frame");
    let mut pos = 0;
    for f in fills {
        assert!(f.start >= pos, "fills are sorted and disjoint");
        if f.start > pos {
            w.zero(pos, f.start - pos).expect("zero frame");
        }
        w.data_from(f.start, f.len, |rel, n| {
            let buf = vec![f.byte; n];
            if f.byte != 0 {
                t.write_all_at(&buf, f.start + rel)?;
            }
            Ok(buf)
        })
        .expect("data frame");
        pos = f.start + f.len;
    }
    if pos < size {
        w.zero(pos, size - pos).expect("zero frame");
    }
    w.finish().expect("finish").flush().expect("flush");
    fs::write(
        dir.join("vmconfig.virtnbdbackup.0.xml"),
        "<domain type='kvm'>\n  <name>synthetic-vm</name>\n  <memory unit='KiB'>65536</memory>\n</domain>\n",
    )
    .expect("vmconfig");
    fs::write(dir.join("synthetic-vm.cpt"), r#"["virtnbdbackup.0"]"#).expect("cpt");
}
