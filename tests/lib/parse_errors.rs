//! Malformed stream files, byte by byte.
//!
//! The baselines are the two worked examples of doc/FORMAT.md §1.11 (a 4096-byte disk,
//! `ABCDEFGH` at 0, zeros after), copied here from its hex dumps. Each test breaks
//! one thing and checks what `StreamIndex::open` says: an error (metadata unusable) or a
//! `Damage` (the frames before the break stay readable) whose message names the file and
//! the byte offset of the break. A few catalog-level cases at the end check that one bad
//! file breaks only the restore points that use it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tempfile::TempDir;
use vmback::cache::ReadCache;
use vmback::catalog::{Catalog, PointKey, RestorePoint, Status};
use vmback::chain::scan::{Format, Stored};
use vmback::chain::{ImageReader, Layer, ReadError, ScanError, StreamIndex, StreamMeta, StreamWriter};

// ---------------------------------------------------------------------------------------
// The worked examples (doc/FORMAT.md §1.11)

/// `xxd` of the uncompressed example, as printed in doc/FORMAT.md.
const UNCOMPRESSED_DUMP: &str = "\
00000000: 6d65 7461 2030 3030 3030 3030 3030 3030  meta 00000000000
00000010: 3030 3030 3020 3030 3030 3030 3030 3030  00000 0000000000
00000020: 3030 3031 3361 0d0a 7b0a 2020 2020 2276  00013a..{.    \"v
00000030: 6972 7475 616c 5369 7a65 223a 2034 3039  irtualSize\": 409
00000040: 362c 0a20 2020 2022 6461 7461 5369 7a65  6,.    \"dataSize
00000050: 223a 2038 2c0a 2020 2020 2264 6174 6522  \": 8,.    \"date\"
00000060: 3a20 2232 3032 362d 3036 2d33 3054 3038  : \"2026-06-30T08
00000070: 3a32 313a 3031 2e31 3233 3435 3622 2c0a  :21:01.123456\",.
00000080: 2020 2020 2264 6973 6b4e 616d 6522 3a20      \"diskName\":
00000090: 2273 6461 222c 0a20 2020 2022 6469 736b  \"sda\",.    \"disk
000000a0: 466f 726d 6174 223a 2022 7163 6f77 3222  Format\": \"qcow2\"
000000b0: 2c0a 2020 2020 2263 6865 636b 706f 696e  ,.    \"checkpoin
000000c0: 744e 616d 6522 3a20 2276 6972 746e 6264  tName\": \"virtnbd
000000d0: 6261 636b 7570 2e30 222c 0a20 2020 2022  backup.0\",.    \"
000000e0: 636f 6d70 7265 7373 6564 223a 2066 616c  compressed\": fal
000000f0: 7365 2c0a 2020 2020 2263 6f6d 7072 6573  se,.    \"compres
00000100: 7369 6f6e 4d65 7468 6f64 223a 2022 6c7a  sionMethod\": \"lz
00000110: 3422 2c0a 2020 2020 2270 6172 656e 7443  4\",.    \"parentC
00000120: 6865 636b 706f 696e 7422 3a20 2222 2c0a  heckpoint\": \"\",.
00000130: 2020 2020 2269 6e63 7265 6d65 6e74 616c      \"incremental
00000140: 223a 2066 616c 7365 2c0a 2020 2020 2273  \": false,.    \"s
00000150: 7472 6561 6d56 6572 7369 6f6e 223a 2032  treamVersion\": 2
00000160: 0a7d 0d0a 6461 7461 2030 3030 3030 3030  .}..data 0000000
00000170: 3030 3030 3030 3030 3020 3030 3030 3030  000000000 000000
00000180: 3030 3030 3030 3030 3038 0d0a 4142 4344  0000000008..ABCD
00000190: 4546 4748 0d0a 7a65 726f 2030 3030 3030  EFGH..zero 00000
000001a0: 3030 3030 3030 3030 3030 3820 3030 3030  00000000008 0000
000001b0: 3030 3030 3030 3030 3066 6638 0d0a 7374  000000000ff8..st
000001c0: 6f70 2030 3030 3030 3030 3030 3030 3030  op 0000000000000
000001d0: 3030 3020 3030 3030 3030 3030 3030 3030  000 000000000000
000001e0: 3030 3030 0d0a                           0000..
";

/// `xxd` of the compressed example from its data header on (offset 0x160); the bytes
/// before are the meta frame with `"compressed": 2` (J = 0x136).
const COMPRESSED_TAIL_DUMP: &str = "\
00000160: 6461 7461 2030 3030 3030 3030 3030 3030  data 00000000000
00000170: 3030 3030 3020 3030 3030 3030 3030 3030  00000 0000000000
00000180: 3030 3030 3038 0d0a 0422 4d18 7c40 0800  000008...\"M.|@..
00000190: 0000 0000 0000 2d08 0000 8041 4243 4445  ......-....ABCDE
000001a0: 4647 4819 0557 6300 0000 0019 0557 630d  FGH..Wc......Wc.
000001b0: 0a7a 6572 6f20 3030 3030 3030 3030 3030  .zero 0000000000
000001c0: 3030 3030 3038 2030 3030 3030 3030 3030  000008 000000000
000001d0: 3030 3030 6666 380d 0a73 746f 7020 3030  0000ff8..stop 00
000001e0: 3030 3030 3030 3030 3030 3030 3030 2030  00000000000000 0
000001f0: 3030 3030 3030 3030 3030 3030 3030 300d  000000000000000.
00000200: 0a5b 3339 5d0d 0a63 6f6d 7020 3030 3030  .[39]..comp 0000
00000210: 3030 3030 3030 3030 3030 3030 2030 3030  000000000000 000
00000220: 3030 3030 3030 3030 3030 3030 340d 0a    0000000000004..
";

/// Parses the hex columns of an `xxd` dump (offset, then 8 groups of 4 hex digits).
fn from_xxd(dump: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in dump.lines() {
        let hex: String = line[10..49].chars().filter(|c| !c.is_whitespace()).collect();
        for pair in hex.as_bytes().chunks(2) {
            out.push(u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap());
        }
    }
    out
}

/// The metadata JSON of the uncompressed example (314 bytes).
const META_JSON: &str = "{\n    \"virtualSize\": 4096,\n    \"dataSize\": 8,\n    \"date\": \"2026-06-30T08:21:01.123456\",\n    \"diskName\": \"sda\",\n    \"diskFormat\": \"qcow2\",\n    \"checkpointName\": \"virtnbdbackup.0\",\n    \"compressed\": false,\n    \"compressionMethod\": \"lz4\",\n    \"parentCheckpoint\": \"\",\n    \"incremental\": false,\n    \"streamVersion\": 2\n}";

/// The 39-byte lz4 frame of `ABCDEFGH` in the compressed example.
const LZ4_ABCDEFGH: [u8; 39] = [
    0x04, 0x22, 0x4d, 0x18, 0x7c, 0x40, 0x08, 0, 0, 0, 0, 0, 0, 0, 0x2d, 0x08, 0, 0, 0x80, b'A', b'B', b'C',
    b'D', b'E', b'F', b'G', b'H', 0x19, 0x05, 0x57, 0x63, 0, 0, 0, 0, 0x19, 0x05, 0x57, 0x63,
];

// File offsets in the uncompressed example.
const U_JSON: u64 = 0x28;
const U_META_CRLF: u64 = 0x162;
const U_DATA_HDR: u64 = 0x164;
const U_PAYLOAD_CRLF: u64 = 0x194;
const U_ZERO_HDR: u64 = 0x196;
const U_STOP_HDR: u64 = 0x1be;
const U_LEN: u64 = 0x1e6;

// File offsets in the compressed example.
const C_DATA_HDR: u64 = 0x160;
const C_LZ4: u64 = 0x188;
const C_STOP_END: u64 = 0x201;
const C_COMP_HDR: u64 = 0x207;
const C_LEN: u64 = 0x22f;

fn hdr(kind: &str, start: u64, len: u64) -> Vec<u8> {
    format!("{kind} {start:016x} {len:016x}\r\n").into_bytes()
}

/// A meta frame holding `json`, then `body`.
fn stream(json: &str, body: &[u8]) -> Vec<u8> {
    [hdr("meta", 0, json.len() as u64), json.as_bytes().to_vec(), b"\r\n".to_vec(), body.to_vec()].concat()
}

fn uncompressed() -> Vec<u8> {
    let body =
        [hdr("data", 0, 8), b"ABCDEFGH\r\n".to_vec(), hdr("zero", 8, 0xff8), hdr("stop", 0, 0)].concat();
    stream(META_JSON, &body)
}

fn compressed_json() -> String {
    META_JSON.replace("\"compressed\": false", "\"compressed\": 2")
}

/// The compressed example up to and including its `stop` frame (no trailer).
fn compressed_body() -> Vec<u8> {
    let body = [
        hdr("data", 0, 8),
        LZ4_ABCDEFGH.to_vec(),
        b"\r\n".to_vec(),
        hdr("zero", 8, 0xff8),
        hdr("stop", 0, 0),
    ]
    .concat();
    stream(&compressed_json(), &body)
}

/// `prefix`, then a trailer holding `json` and its `comp` frame.
fn with_trailer(prefix: &[u8], json: &str) -> Vec<u8> {
    [prefix, json.as_bytes(), b"\r\n", &hdr("comp", 0, json.len() as u64)].concat()
}

fn compressed() -> Vec<u8> {
    with_trailer(&compressed_body(), "[39]")
}

fn example_image() -> Vec<u8> {
    let mut img = b"ABCDEFGH".to_vec();
    img.resize(4096, 0);
    img
}

// ---------------------------------------------------------------------------------------
// Opening and reading

struct Opened {
    _dir: TempDir,
    path: PathBuf,
    result: Result<StreamIndex, ScanError>,
}

fn open(bytes: &[u8]) -> Opened {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("sda.full.data");
    std::fs::write(&path, bytes).unwrap();
    let result = StreamIndex::open(&path, "sda");
    Opened { _dir: dir, path, result }
}

impl Opened {
    /// The scan error; panics if the file opened.
    fn err(&self) -> &ScanError {
        match &self.result {
            Ok(i) => panic!("expected an error, got an index with damage {:?}", i.damage),
            Err(e) => e,
        }
    }

    fn index(self) -> (TempDir, PathBuf, Arc<StreamIndex>) {
        match self.result {
            Ok(i) => (self._dir, self.path, Arc::new(i)),
            Err(e) => panic!("expected an index, got {e}"),
        }
    }
}

/// Asserts that `msg` names `path` and `offset N` (and, if given, contains `what`).
fn assert_names(msg: &str, path: &Path, offset: u64, what: &str) {
    assert!(msg.contains(&path.display().to_string()), "{msg:?} does not name {}", path.display());
    assert!(
        msg.contains(&format!("offset {offset}")) && !msg.contains(&format!("offset {offset}0")),
        "{msg:?} does not name offset {offset}"
    );
    assert!(msg.contains(what), "{msg:?} does not say {what:?}");
}

/// The message of an error and of its sources, joined.
fn chain_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    text
}

/// Opening fails; the error names the file, `offset` and `what`.
fn assert_open_fails(bytes: &[u8], offset: u64, what: &str) {
    let o = open(bytes);
    assert_names(&chain_text(o.err()), &o.path, offset, what);
}

/// Opening works but records damage from disk offset `from`, caused at file `offset`.
fn assert_damaged(bytes: &[u8], from: u64, offset: u64, what: &str) -> (TempDir, Arc<StreamIndex>) {
    let (dir, path, index) = open(bytes).index();
    let damage = index.damage.as_ref().expect("damage");
    assert_eq!(damage.from, from, "damage.from; error: {}", damage.error);
    assert_names(&chain_text(&damage.error), &path, offset, what);
    (dir, index)
}

fn reader(index: &Arc<StreamIndex>) -> ImageReader {
    ImageReader::new(vec![Layer { id: 1, index: index.clone() }], Arc::new(ReadCache::new(1 << 20)))
}

fn read(r: &ImageReader, off: u64, len: usize) -> Result<Vec<u8>, ReadError> {
    let mut buf = vec![0xa5; len];
    let n = r.read_at(&mut buf, off)?;
    buf.truncate(n);
    Ok(buf)
}

/// Reads before the damage give the example's bytes; reads touching `[from, 4096)` fail
/// with an error naming the file and the first unreadable disk offset.
fn assert_readable_until(index: &Arc<StreamIndex>, from: u64) {
    let r = reader(index);
    let img = example_image();
    assert_eq!(r.size(), 4096);
    assert_eq!(read(&r, 0, from as usize).unwrap(), img[..from as usize]);
    if from < 4096 {
        for (off, len) in [(from, 1usize), (0, 4096), (from.saturating_sub(3), 100), (4095, 1)] {
            match read(&r, off, len) {
                Err(e @ ReadError::Damaged { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&index.path.display().to_string()), "{msg}");
                    assert!(msg.contains(&format!("disk offset {}", off.max(from))), "{msg}");
                }
                other => panic!("read {off}+{len} past damage at {from}: {other:?}"),
            }
        }
    } else {
        assert_eq!(read(&r, 0, 5000).unwrap(), img);
    }
}

fn patch(mut bytes: Vec<u8>, at: u64, with: &[u8]) -> Vec<u8> {
    bytes[at as usize..at as usize + with.len()].copy_from_slice(with);
    bytes
}

// ---------------------------------------------------------------------------------------
// Baselines

#[test]
fn worked_examples_match_the_spec_dumps() {
    let u = from_xxd(UNCOMPRESSED_DUMP);
    assert_eq!(u.len() as u64, U_LEN);
    assert_eq!(u, uncompressed());
    // Up to the data header, the compressed example is the meta frame with J = 0x136
    // and `2` for `false`.
    let c = [stream(&compressed_json(), &[]), from_xxd(COMPRESSED_TAIL_DUMP)].concat();
    assert_eq!(c.len() as u64, C_LEN);
    assert_eq!(c, compressed());
    assert_eq!(&c[..40], b"meta 0000000000000000 0000000000000136\r\n");
}

#[test]
fn worked_examples_read_as_abcdefgh_then_zeros() {
    for (bytes, lz4) in [(uncompressed(), false), (compressed(), true)] {
        let (_dir, _path, index) = open(&bytes).index();
        assert!(index.damage.is_none(), "{:?}", index.damage);
        assert_eq!(index.format, Format::Stream);
        assert_eq!(index.meta.virtual_size, 4096);
        assert_eq!(index.meta.data_size, 8);
        assert_eq!(index.meta.compressed, lz4.then_some(2));
        assert_eq!(index.meta.checkpoint_name, "virtnbdbackup.0");
        assert_eq!(index.extents.len(), 2);
        assert_eq!((index.extents[0].start, index.extents[0].len), (0, 8));
        assert_eq!(
            (index.extents[1].start, index.extents[1].len, &index.extents[1].stored),
            (8, 0xff8, &Stored::Zero)
        );
        match &index.extents[0].stored {
            Stored::Plain { file_off } => assert!(!lz4 && *file_off == U_DATA_HDR + 40),
            Stored::Lz4(frames) => {
                assert!(lz4);
                assert_eq!(frames.len(), 1);
                assert_eq!((frames[0].file_off, frames[0].comp_len, frames[0].len), (C_LZ4, 39, 8));
            }
            Stored::Zero => panic!("data extent stored as zero"),
        }
        let r = reader(&index);
        assert_eq!(read(&r, 0, 10_000).unwrap(), example_image());
        assert_eq!(read(&r, 3, 3).unwrap(), b"DEF");
        assert_eq!(read(&r, 4090, 100).unwrap(), [0; 6]);
        assert_eq!(read(&r, 4096, 10).unwrap(), b"");
        assert_eq!(r.map().seek_data(0), Some(0));
        assert_eq!(r.map().seek_hole(0), 8);
        assert_eq!(r.map().seek_data(8), None);
        assert_eq!(r.map().data_bytes(), 8);
    }
}

#[test]
fn writer_reproduces_the_uncompressed_example() {
    let meta = StreamMeta::parse(META_JSON.as_bytes()).unwrap();
    let mut w = StreamWriter::new(Vec::new(), &meta, vmback::chain::MAX_REQUEST).unwrap();
    w.data(0, b"ABCDEFGH").unwrap();
    w.zero(8, 0xff8).unwrap();
    assert_eq!(w.finish().unwrap(), from_xxd(UNCOMPRESSED_DUMP));
}

#[test]
fn tolerated_variants_open_cleanly() {
    // Object-form trailer entry for a single lz4 frame (what an extent >= M gets).
    let obj = with_trailer(&compressed_body(), "[{\"39\": [39]}]");
    // Uppercase hex in headers (upstream's int(x, 16) accepts it).
    let upper = patch(uncompressed(), U_ZERO_HDR + 22, b"0000000000000FF8");
    // Stream version 1 metadata: `stream-version`, no compression keys, parent `false`.
    let v1 = META_JSON
        .replace("\"streamVersion\": 2", "\"stream-version\": 1")
        .replace("    \"diskFormat\": \"qcow2\",\n", "")
        .replace("    \"compressed\": false,\n    \"compressionMethod\": \"lz4\",\n", "")
        .replace("\"parentCheckpoint\": \"\"", "\"parentCheckpoint\": false");
    let v1 = stream(&v1, &uncompressed()[U_DATA_HDR as usize..]);
    // Old writers' `compressed: true`.
    let yes = compressed_json().replace("\"compressed\": 2", "\"compressed\": true");
    let yes = with_trailer(&stream(&yes, &compressed_body()[C_DATA_HDR as usize..]), "[39]");
    // Zero-length data and zero frames are no-ops.
    let empty_frames = {
        let body = [
            hdr("data", 0, 0),
            b"\r\n".to_vec(),
            hdr("data", 0, 8),
            b"ABCDEFGH\r\n".to_vec(),
            hdr("zero", 8, 0),
            hdr("zero", 8, 0xff8),
            hdr("data", 4096, 0),
            b"\r\n".to_vec(),
            hdr("stop", 0, 0),
        ]
        .concat();
        stream(META_JSON, &body)
    };
    for (name, bytes) in [
        ("object trailer", obj),
        ("uppercase", upper),
        ("v1", v1),
        ("true", yes),
        ("empty frames", empty_frames),
    ] {
        let (_dir, _path, index) = open(&bytes).index();
        assert!(index.damage.is_none(), "{name}: {:?}", index.damage);
        assert_eq!(index.extents.len(), 2, "{name}");
        assert_eq!(read(&reader(&index), 0, 4096).unwrap(), example_image(), "{name}");
    }
}

// ---------------------------------------------------------------------------------------
// The file start and the meta frame: the stream cannot be used at all

/// `-z 0` (FORMAT.md §1.7, §4.4): metadata `"compressed": 0`, lz4 payloads, and no trailer, which
/// upstream cannot read. Walking the lz4 frames recovers every byte.
#[test]
fn level_zero_compression_without_trailer_is_readable() {
    let json = compressed_json().replace("\"compressed\": 2", "\"compressed\": 0");
    let bytes = stream(&json, &compressed_body()[C_DATA_HDR as usize..]);
    let (_dir, index) = assert_damaged(&bytes, 4096, C_STOP_END - 40, "does not end in a comp frame");
    assert_eq!(index.meta.compressed, Some(0));
    assert_readable_until(&index, 4096);
}

#[test]
fn files_not_starting_with_meta_are_raw_images() {
    // FORMAT.md §1.12: anything not starting with `meta ` is a raw disk image, garbage included.
    for bytes in
        [&b""[..], b"meta", b"data 0000000000000000 0000000000000008\r\nABCDEFGH\r\n", b"\x00garbage"]
    {
        let (_dir, _path, index) = open(bytes).index();
        assert_eq!(index.format, Format::Raw);
        assert_eq!(index.meta.virtual_size, bytes.len() as u64);
        assert_eq!(read(&reader(&index), 0, 100).unwrap(), bytes);
    }
}

#[test]
fn short_meta_header() {
    for n in [5usize, 6, 21, 39] {
        assert_open_fails(&uncompressed()[..n], n as u64, "ends early");
    }
}

#[test]
fn garbage_in_the_meta_header() {
    let cases: [(&[u8; 40], &str); 5] = [
        (b"meta 0000000000000000 000000000000013g\r\n", "bad hex"),
        (b"meta 0000000000000000 +00000000000013a\r\n", "bad hex"),
        (b"meta 000000000000000\xff 000000000000013a\r\n", "bad hex"),
        (b"meta 0000000000000000_000000000000013a\r\n", "space"),
        (b"meta 0000000000000000 000000000000013a\n\r", "CRLF"),
    ];
    for (h, what) in cases {
        let bytes = patch(uncompressed(), 0, h);
        assert_open_fails(&bytes, 0, what);
    }
}

#[test]
fn implausible_meta_lengths() {
    let len = |l: u64| patch(uncompressed(), 22, format!("{l:016x}").as_bytes());
    for l in [0x100001, 1 << 63, u64::MAX, U_LEN - 39, 0x1000] {
        assert_open_fails(&len(l), 22, &format!("metadata length {l} is implausible"));
    }
    // Too short: the JSON is cut.
    assert_open_fails(&len(0x139), U_JSON, "not valid JSON");
    assert_open_fails(&len(0), U_JSON, "not valid JSON");
}

#[test]
fn missing_crlf_after_the_metadata() {
    assert_open_fails(&patch(uncompressed(), U_META_CRLF, b"\r\r"), U_META_CRLF, "missing CRLF");
    // A meta length one too long swallows the CR (JSON whitespace); "\n" + 'd' follow.
    let long = patch(uncompressed(), 22, b"000000000000013b");
    assert_open_fails(&long, U_META_CRLF + 1, "missing CRLF");
}

fn meta_error(json: &str, what: &str) {
    let body = &uncompressed()[U_DATA_HDR as usize..];
    assert_open_fails(&stream(json, body), U_JSON, what);
}

#[test]
fn bad_metadata_json() {
    meta_error(&"x".repeat(META_JSON.len()), "not valid JSON");
    meta_error(&META_JSON.replace('}', " "), "not valid JSON");
    meta_error(&META_JSON.replace("\"sda\"", "\"\u{0}\u{1}\""), "not valid JSON");
    meta_error("[4096, 8]", "not a JSON object");
    meta_error("null", "not a JSON object");
}

#[test]
fn missing_metadata_fields() {
    for (line, field) in [
        ("    \"virtualSize\": 4096,\n", "virtualSize"),
        ("    \"dataSize\": 8,\n", "dataSize"),
        ("    \"diskName\": \"sda\",\n", "diskName"),
    ] {
        meta_error(&META_JSON.replace(line, ""), &format!("field \"{field}\" is missing"));
    }
    meta_error(&META_JSON.replace(",\n    \"streamVersion\": 2", ""), "field \"streamVersion\" is missing");
}

#[test]
fn metadata_fields_of_the_wrong_type() {
    for (from, to, field) in [
        ("\"virtualSize\": 4096", "\"virtualSize\": \"4096\"", "virtualSize"),
        ("\"virtualSize\": 4096", "\"virtualSize\": -4096", "virtualSize"),
        ("\"virtualSize\": 4096", "\"virtualSize\": 4096.5", "virtualSize"),
        ("\"virtualSize\": 4096", "\"virtualSize\": 18446744073709551616", "virtualSize"),
        ("\"dataSize\": 8", "\"dataSize\": null", "dataSize"),
        ("\"diskName\": \"sda\"", "\"diskName\": 7", "diskName"),
        ("\"incremental\": false", "\"incremental\": \"no\"", "incremental"),
        ("\"compressed\": false", "\"compressed\": \"lz4\"", "compressed"),
        ("\"compressed\": false", "\"compressed\": -1", "compressed"),
        ("\"parentCheckpoint\": \"\"", "\"parentCheckpoint\": 0", "parentCheckpoint"),
        ("\"streamVersion\": 2", "\"streamVersion\": \"2\"", "streamVersion"),
    ] {
        meta_error(&META_JSON.replace(from, to), &format!("field \"{field}\" has the wrong type"));
    }
    meta_error(
        &META_JSON.replace("\"streamVersion\": 2", "\"streamVersion\": 3"),
        "unsupported stream version 3",
    );
    meta_error(
        &META_JSON.replace("\"streamVersion\": 2", "\"streamVersion\": 0"),
        "unsupported stream version 0",
    );
}

// ---------------------------------------------------------------------------------------
// The body: damage from the first frame that is wrong

#[test]
fn unknown_frame_kind_in_the_body() {
    let bytes = patch(uncompressed(), U_ZERO_HDR, b"junk");
    let (_dir, index) = assert_damaged(&bytes, 8, U_ZERO_HDR, "unknown frame kind \"junk\"");
    assert_readable_until(&index, 8);
    let bytes = patch(uncompressed(), U_DATA_HDR, b"Data");
    let (_dir, index) = assert_damaged(&bytes, 0, U_DATA_HDR, "unknown frame kind");
    assert_readable_until(&index, 0);
}

#[test]
fn meta_or_comp_frame_in_the_body() {
    for kind in [&b"meta"[..], b"comp"] {
        let bytes = patch(uncompressed(), U_ZERO_HDR, kind);
        let (_dir, index) = assert_damaged(&bytes, 8, U_ZERO_HDR, "frame in the body");
        assert_readable_until(&index, 8);
    }
}

#[test]
fn bad_hex_and_separators_in_body_headers() {
    for (at, with, what) in [
        (U_DATA_HDR + 5, &b"g"[..], "bad hex"),
        (U_DATA_HDR + 37, b" ", "bad hex"),
        (U_DATA_HDR + 4, b"-", "space"),
        (U_DATA_HDR + 38, b"\n\n", "CRLF"),
    ] {
        let bytes = patch(uncompressed(), at, with);
        let (_dir, index) = assert_damaged(&bytes, 0, U_DATA_HDR, what);
        assert_readable_until(&index, 0);
    }
    let bytes = patch(uncompressed(), U_ZERO_HDR + 30, b"x");
    let (_dir, index) = assert_damaged(&bytes, 8, U_ZERO_HDR, "bad hex");
    assert_readable_until(&index, 8);
    let bytes = patch(uncompressed(), U_STOP_HDR + 38, b"\r\r");
    let (_dir, index) = assert_damaged(&bytes, 4096, U_STOP_HDR, "CRLF");
    assert_readable_until(&index, 4096);
}

#[test]
fn missing_crlf_after_a_data_payload() {
    for bad in [&b"\n\r"[..], b"zz", b"\r\0"] {
        let bytes = patch(uncompressed(), U_PAYLOAD_CRLF, bad);
        let (_dir, index) = assert_damaged(&bytes, 0, U_PAYLOAD_CRLF, "missing CRLF");
        assert_readable_until(&index, 0);
    }
}

#[test]
fn frames_past_the_virtual_size() {
    // The zero frame ends one byte past 4096.
    let bytes = patch(uncompressed(), U_ZERO_HDR + 22, b"0000000000000ff9");
    let (_dir, index) = assert_damaged(&bytes, 8, U_ZERO_HDR, "runs past the virtual size 4096");
    assert_readable_until(&index, 8);
    // A data frame starting at the end; one whose end overflows u64; a huge length.
    for (start, len) in [(4096u64, 8u64), (u64::MAX - 3, 8), (0, u64::MAX), (1 << 63, 1 << 63)] {
        let bytes = patch(uncompressed(), U_DATA_HDR, &hdr("data", start, len));
        let (_dir, index) = assert_damaged(&bytes, 0, U_DATA_HDR, "runs past the virtual size");
        assert_readable_until(&index, 0);
    }
}

#[test]
fn overlapping_frames() {
    // The zero frame starts inside the data frame.
    let bytes = patch(uncompressed(), U_ZERO_HDR, &hdr("zero", 4, 0xffc));
    let (_dir, index) = assert_damaged(&bytes, 8, U_ZERO_HDR, "overlaps");
    assert_readable_until(&index, 8);
    // A second frame going back to 0.
    let body = [
        hdr("data", 0, 8),
        b"ABCDEFGH\r\n".to_vec(),
        hdr("zero", 8, 8),
        hdr("data", 0, 8),
        b"abcdefgh\r\n".to_vec(),
        hdr("stop", 0, 0),
    ]
    .concat();
    let json = META_JSON.replace("\"dataSize\": 8", "\"dataSize\": 16");
    let bytes = stream(&json, &body);
    let at = 40 + json.len() as u64 + 2 + 40 + 10 + 40;
    let (_dir, index) = assert_damaged(&bytes, 16, at, "overlaps or precedes");
    let r = reader(&index);
    assert_eq!(read(&r, 0, 16).unwrap(), example_image()[..16]);
    assert!(read(&r, 16, 1).is_err());
}

/// Two data extents: `ABCDEFGH` at 0 and `IJKLMNOP` at 16.
fn two_extents() -> (Vec<u8>, u64) {
    let body = [
        hdr("data", 0, 8),
        b"ABCDEFGH\r\n".to_vec(),
        hdr("zero", 8, 8),
        hdr("data", 16, 8),
        b"IJKLMNOP\r\n".to_vec(),
        hdr("zero", 24, 4096 - 24),
        hdr("stop", 0, 0),
    ]
    .concat();
    let json = META_JSON.replace("\"dataSize\": 8", "\"dataSize\": 16");
    let second_payload = 40 + json.len() as u64 + 2 + 40 + 10 + 40 + 40;
    (stream(&json, &body), second_payload)
}

#[test]
fn truncated_in_a_payload() {
    let (bytes, second) = two_extents();
    for cut in [second, second + 3, second + 8, second + 9] {
        let o = open(&bytes[..cut as usize]);
        let (_dir, path, index) = o.index();
        let d = index.damage.as_ref().expect("damage");
        assert_eq!(d.from, 16, "cut at {cut}");
        assert_names(&d.error.to_string(), &path, cut, "ends early");
        let r = reader(&index);
        let mut want = b"ABCDEFGH".to_vec();
        want.resize(16, 0);
        assert_eq!(read(&r, 0, 16).unwrap(), want);
        assert!(matches!(read(&r, 10, 10), Err(ReadError::Damaged { disk_offset: 16, .. })));
        assert!(read(&r, 4000, 10).is_err());
    }
    // Cut inside the second data header.
    let (_dir, path, index) = open(&bytes[..second as usize - 20]).index();
    let d = index.damage.as_ref().unwrap();
    assert_eq!(d.from, 16);
    assert_names(&d.error.to_string(), &path, second - 20, "ends early");
    // Cut in the first payload: nothing is readable.
    let cut = U_DATA_HDR as usize + 40 + 4;
    let (_dir, index) = {
        let (d, _p, i) = open(&uncompressed()[..cut]).index();
        (d, i)
    };
    assert_eq!(index.damage.as_ref().unwrap().from, 0);
    assert_readable_until(&index, 0);
}

#[test]
fn stream_without_stop() {
    // Every frame is there, the stop frame is not: the image is readable, but damaged.
    let bytes = &uncompressed()[..U_STOP_HDR as usize];
    let (_dir, index) = assert_damaged(bytes, 4096, U_STOP_HDR, "ends early");
    assert_readable_until(&index, 4096);
    let bytes = &uncompressed()[..U_STOP_HDR as usize + 10];
    let (_dir, index) = assert_damaged(bytes, 4096, U_STOP_HDR + 10, "ends early");
    assert_readable_until(&index, 4096);
}

#[test]
fn bytes_after_the_stop_frame() {
    let bytes = [uncompressed(), b"\r\n".to_vec()].concat();
    let (_dir, index) = assert_damaged(&bytes, 4096, U_LEN, "2 unexpected bytes after the stop frame");
    assert_readable_until(&index, 4096);
}

#[test]
fn data_size_mismatch() {
    let bytes = stream(
        &META_JSON.replace("\"dataSize\": 8", "\"dataSize\": 9"),
        &uncompressed()[U_DATA_HDR as usize..],
    );
    let (_dir, index) = assert_damaged(&bytes, 4096, U_JSON, "dataSize says 9 bytes, data frames hold 8");
    assert_readable_until(&index, 4096);
}

// ---------------------------------------------------------------------------------------
// Compressed streams: the trailer

/// A lost or broken trailer: the lz4 frames are found by walking them (FORMAT.md §1.9), so every
/// extent stays readable; the stream is still reported as damaged (from the virtual size,
/// i.e. no unreadable range), naming the trailer problem.
#[test]
fn compressed_stream_without_trailer() {
    let body = compressed_body();
    let (_dir, index) = assert_damaged(&body, 4096, C_STOP_END - 40, "does not end in a comp frame");
    assert_readable_until(&index, 4096);
    match &index.extents[0].stored {
        Stored::Lz4(frames) => {
            assert_eq!((frames[0].file_off, frames[0].comp_len, frames[0].len), (C_LZ4, 39, 8))
        }
        other => panic!("{other:?}"),
    }
    // Cut in the trailer or the comp frame: the last 40 bytes are not a comp frame.
    for cut in [C_COMP_HDR + 39, C_COMP_HDR + 1, C_COMP_HDR, C_STOP_END + 2] {
        let o = open(&compressed()[..cut as usize]);
        let (_dir, _path, index) = o.index();
        let d = index.damage.as_ref().expect("damage");
        assert_eq!(d.from, 4096, "cut at {cut}: {}", d.error);
        assert!(chain_text(&d.error).contains(&format!("offset {}", cut - 40)), "{}", chain_text(&d.error));
        assert_readable_until(&index, 4096);
    }
    // Cut before the stop frame ends: the walk reaches the cut.
    for cut in [C_STOP_END - 1, C_STOP_END - 40] {
        let (_dir, index) = assert_damaged(&compressed()[..cut as usize], 4096, cut, "ends early");
        assert_readable_until(&index, 4096);
    }
    // Cut inside the lz4 frame or its CRLF: nothing is readable.
    for cut in [C_LZ4 + 3, C_LZ4 + 20, C_LZ4 + 38, C_LZ4 + 40] {
        let o = open(&compressed()[..cut as usize]);
        let (_dir, _path, index) = o.index();
        let d = index.damage.as_ref().expect("damage");
        assert_eq!(d.from, 0, "cut at {cut}: {}", d.error);
        assert!(chain_text(&d.error).contains("ends early"), "{}", d.error);
        assert_readable_until(&index, 0);
    }
    // Where the walk reads the header or the CRLF, the error names the end of the file.
    for cut in [C_LZ4 + 3, C_LZ4 + 40] {
        assert_damaged(&compressed()[..cut as usize], 0, cut, "ends early");
    }
}

#[test]
fn truncation_inside_a_walked_lz4_frame_names_the_end_of_the_file() {
    // 412 bytes: cut in the block data. Reported: "stream ends early at offset 423"
    // (the next size word, 11 bytes past EOF). 430 bytes: cut in the content checksum;
    // reported at 431. The uncompressed scan and the header reads name the file end.
    for cut in [C_LZ4 + 20, C_LZ4 + 38] {
        assert_damaged(&compressed()[..cut as usize], 0, cut, "ends early");
    }
}

#[test]
fn trailer_length_pointing_outside_the_file() {
    let comp_len_at = C_COMP_HDR + 22;
    for t in [C_COMP_HDR - 1, 0x1000, 1 << 63, u64::MAX] {
        let bytes = patch(compressed(), comp_len_at, format!("{t:016x}").as_bytes());
        let (_dir, index) =
            assert_damaged(&bytes, 4096, comp_len_at, &format!("trailer length {t} is implausible"));
        assert_readable_until(&index, 4096);
    }
    // Pointing inside the file but at the wrong place: the JSON is cut.
    let bytes = patch(compressed(), comp_len_at, b"0000000000000003");
    let (_dir, index) = assert_damaged(&bytes, 4096, C_STOP_END + 1, "not a JSON list of frame sizes");
    assert_readable_until(&index, 4096);
}

/// A trailer listing more lz4 frames than the bytes before it can hold (each takes at
/// least 11) is refused as it is read, before it costs memory; the frames are walked.
#[test]
fn trailer_listing_more_frames_than_the_file_holds() {
    let room = C_STOP_END / 11;
    let json = format!("[39{}]", ", 1".repeat(room as usize));
    let bytes = with_trailer(&compressed_body(), &json);
    let (_dir, index) =
        assert_damaged(&bytes, 4096, C_STOP_END, "more lz4 frames than the file has room for");
    assert_readable_until(&index, 4096);
}

#[test]
fn missing_crlf_before_the_comp_frame() {
    let bytes = patch(compressed(), C_COMP_HDR - 2, b"\n\n");
    let (_dir, index) = assert_damaged(&bytes, 4096, C_COMP_HDR - 2, "missing CRLF");
    assert_readable_until(&index, 4096);
}

#[test]
fn trailer_json_not_a_list_of_sizes() {
    for json in [
        "{39}",
        "\"39\"",
        "{\"39\": [39]}",
        "[\"39\"]",
        "[-39]",
        "[39.0]",
        "[[39]]",
        "[null]",
        "[18446744073709551616]",
        "[{\"39\": [39], \"0\": []}]",
        "[{\"39\": 39}]",
        "[{\"39\": [\"39\"]}]",
    ] {
        let bytes = with_trailer(&compressed_body(), json);
        let (_dir, index) = assert_damaged(&bytes, 4096, C_STOP_END, "bad compression trailer");
        assert_readable_until(&index, 4096);
    }
}

#[test]
fn trailer_dict_key_must_equal_the_sum() {
    for json in [
        "[{\"40\": [39]}]",
        "[{\"38\": [39]}]",
        "[{\"039x\": [39]}]",
        "[{\"\": [39]}]",
        "[{\"0\": []}]",
        "[{\"18446744073709551615\": [18446744073709551615, 1]}]",
    ] {
        let bytes = with_trailer(&compressed_body(), json);
        let (_dir, index) =
            assert_damaged(&bytes, 4096, C_STOP_END, "trailer is not a JSON list of frame sizes");
        assert_readable_until(&index, 4096);
    }
}

#[test]
fn trailer_entry_count_mismatch() {
    // Fewer entries than data frames: the trailer cannot locate the data frame, but
    // walking the lz4 frames does; the stream is reported damaged and reads whole.
    let bytes = with_trailer(&compressed_body(), "[]");
    let (_dir, index) = assert_damaged(&bytes, 4096, C_DATA_HDR, "more data frames than trailer entries");
    assert_readable_until(&index, 4096);
    // More entries: every frame is readable, the stream is still damaged.
    let bytes = with_trailer(&compressed_body(), "[39, 39]");
    let stop_end = C_STOP_END;
    let (_dir, index) = assert_damaged(&bytes, 4096, stop_end, "trailer has more entries than data frames");
    assert_readable_until(&index, 4096);
}

#[test]
fn trailer_sizes_that_do_not_fit_the_payload() {
    // One byte short or long: the CRLF after the payload is not where it should be. The
    // trailer is wrong, not the frames: walking them reads the whole image.
    for (t, crlf_at) in [(38u64, C_LZ4 + 38), (40, C_LZ4 + 40)] {
        let bytes = with_trailer(&compressed_body(), &format!("[{t}]"));
        let (_dir, index) = assert_damaged(&bytes, 4096, crlf_at, "missing CRLF");
        assert_readable_until(&index, 4096);
    }
    // Sizes no lz4 frame of 8 bytes can have, up to u64::MAX: refused without allocating.
    for t in [100u64, 1 << 32, 1 << 63, u64::MAX] {
        let bytes = with_trailer(&compressed_body(), &format!("[{t}]"));
        let (_dir, index) =
            assert_damaged(&bytes, 4096, C_LZ4, &format!("lz4 frame of {t} bytes cannot hold 8"));
        assert_readable_until(&index, 4096);
    }
    // A data frame claiming far more than one lz4 frame can decode to (1 TiB).
    let json = compressed_json()
        .replace("\"virtualSize\": 4096", "\"virtualSize\": 1099511627776")
        .replace("\"dataSize\": 8", "\"dataSize\": 1099511627776");
    let body = [hdr("data", 0, 1 << 40), LZ4_ABCDEFGH.to_vec(), b"\r\n".to_vec(), hdr("stop", 0, 0)].concat();
    let bytes = with_trailer(&stream(&json, &body), "[39]");
    let lz4_at = 40 + json.len() as u64 + 2 + 40;
    let (_dir, path, index) = open(&bytes).index();
    let d = index.damage.as_ref().expect("damage");
    assert_eq!(d.from, 0);
    assert_names(&chain_text(&d.error), &path, lz4_at, "do not add up");
}

// ---------------------------------------------------------------------------------------
// Corrupt lz4 frames: the scan cannot see them, the read that decodes them fails

#[test]
fn corrupt_lz4_frame_fails_only_the_reads_that_touch_it() {
    let cases = [
        (C_LZ4 + 19, "data byte 'A'"),
        (C_LZ4 + 26, "data byte 'H'"),
        (C_LZ4 + 27, "block checksum"),
        (C_LZ4 + 35, "content checksum"),
        (C_LZ4 + 38, "content checksum, last byte"),
        (C_LZ4 + 6, "content size field"),
        (C_LZ4 + 14, "header checksum"),
        (C_LZ4, "magic"),
        (C_LZ4 + 31, "end mark"),
    ];
    for (at, what) in cases {
        let mut bytes = compressed();
        bytes[at as usize] ^= 0x01;
        let (_dir, path, index) = open(&bytes).index();
        assert!(index.damage.is_none(), "{what}: the scan does not decode, yet found {:?}", index.damage);
        let r = reader(&index);
        for attempt in 0..2 {
            match read(&r, 0, 4096) {
                Err(e @ ReadError::Decode { .. }) => {
                    assert_names(&e.to_string(), &path, C_LZ4, "corrupt lz4 frame");
                    assert_eq!(e.errno(), EIO);
                }
                other => panic!("{what} (attempt {attempt}): {other:?}"),
            }
            assert!(read(&r, 7, 1).is_err(), "{what}");
        }
        assert_eq!(read(&r, 8, 5000).unwrap(), vec![0; 4088], "{what}");
        assert_eq!(r.map().data_bytes(), 8);
    }
}

/// Linux's EIO.
const EIO: i32 = 5;

/// A compressed stream of three extents written by `StreamWriter` with small lz4 frames.
fn multi_frame_stream(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut img = vec![0u8; 64 << 10];
    let extents = [(0usize, 10_000usize), (20_000, 9_000), (40_000, 5_000)];
    for (i, &(s, l)) in extents.iter().enumerate() {
        for (k, b) in img[s..s + l].iter_mut().enumerate() {
            *b = (k * 7 + i * 31 + (k >> 5)) as u8 | 1;
        }
    }
    let mut meta = StreamMeta::parse(compressed_json().as_bytes()).unwrap();
    meta.virtual_size = img.len() as u64;
    meta.data_size = extents.iter().map(|e| e.1 as u64).sum();
    let mut w = StreamWriter::new(Vec::new(), &meta, 4096).unwrap();
    let mut pos = 0;
    for &(s, l) in &extents {
        w.zero(pos as u64, (s - pos) as u64).unwrap();
        w.data(s as u64, &img[s..s + l]).unwrap();
        pos = s + l;
    }
    w.zero(pos as u64, (img.len() - pos) as u64).unwrap();
    let bytes = w.finish().unwrap();
    let path = dir.join("sda.full.data");
    std::fs::write(&path, &bytes).unwrap();
    (path, img)
}

fn lz4_frames_of(index: &StreamIndex, extent: usize) -> Vec<vmback::chain::scan::Lz4Frame> {
    match &index.extents[extent].stored {
        Stored::Lz4(f) => f.to_vec(),
        other => panic!("extent {extent} is {other:?}"),
    }
}

#[test]
fn corrupt_frame_inside_a_multi_frame_extent() {
    let dir = TempDir::new().unwrap();
    let (path, img) = multi_frame_stream(dir.path());
    let clean = StreamIndex::open(&path, "sda").unwrap();
    assert!(clean.damage.is_none());
    // Extent 2 is data [20000, 29000): frames of 4096, 4096, 808 bytes.
    assert_eq!((clean.extents[2].start, clean.extents[2].len), (20_000, 9_000));
    let frames = lz4_frames_of(&clean, 2);
    assert_eq!(frames.iter().map(|f| f.len).collect::<Vec<_>>(), [4096, 4096, 808]);
    let bad = frames[1];
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(bad.file_off + bad.comp_len / 2) as usize] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let index = Arc::new(StreamIndex::open(&path, "sda").unwrap());
    assert!(index.damage.is_none());
    let r = reader(&index);
    let bad_range = 20_000 + 4096..20_000 + 8192;
    for (off, len) in [(0u64, 20_000 + 4096usize), (20_000 + 8192, 40_000), (30_000, 10), (40_000, 5_000)] {
        let want = &img[off as usize..(off as usize + len).min(img.len())];
        assert_eq!(read(&r, off, len).unwrap(), want, "{off}+{len}");
    }
    for (off, len) in [(bad_range.start, 1usize), (bad_range.end - 1, 1), (0, 65536), (24_000, 200)] {
        match read(&r, off, len) {
            Err(e @ ReadError::Decode { .. }) => assert_names(&e.to_string(), &path, bad.file_off, "corrupt"),
            other => panic!("{off}+{len}: {other:?}"),
        }
    }
}

#[test]
fn lz4_content_size_out_of_range_in_a_split_extent() {
    let dir = TempDir::new().unwrap();
    let (path, _img) = multi_frame_stream(dir.path());
    let clean = StreamIndex::open(&path, "sda").unwrap();
    let first = lz4_frames_of(&clean, 2)[0];
    let clean_bytes = std::fs::read(&path).unwrap();
    // The content-size field (bytes 6..14 of the lz4 frame) of a non-last frame is what
    // the scan trusts: a huge or too-large value must not be believed (or allocated).
    for size in [u64::MAX, 1 << 63, 64 << 20 | 1, 9_001] {
        let mut bytes = clean_bytes.clone();
        bytes[first.file_off as usize + 6..first.file_off as usize + 14].copy_from_slice(&size.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let index = Arc::new(StreamIndex::open(&path, "sda").unwrap());
        let d = index.damage.as_ref().expect("damage");
        // Extents 0 and 1 (data, zero) are fine: the damage starts where extent 2 does.
        assert_eq!(d.from, 20_000, "{size}");
        assert_names(&chain_text(&d.error), &path, first.file_off, "do not add up");
        let r = reader(&index);
        assert!(read(&r, 0, 20_000).is_ok());
        assert!(read(&r, 20_000, 1).is_err());
    }
    // Content size flag cleared: a split extent needs it.
    let mut bytes = clean_bytes.clone();
    bytes[first.file_off as usize + 4] &= !0x08;
    std::fs::write(&path, &bytes).unwrap();
    let index = StreamIndex::open(&path, "sda").unwrap();
    assert_eq!(index.damage.as_ref().expect("damage").from, 20_000);
    // Bad magic where a split extent's frame should start.
    let mut bytes = clean_bytes;
    bytes[first.file_off as usize] = b'X';
    std::fs::write(&path, &bytes).unwrap();
    let index = StreamIndex::open(&path, "sda").unwrap();
    let d = index.damage.as_ref().expect("damage");
    assert_eq!(d.from, 20_000);
    assert_names(&chain_text(&d.error), &path, first.file_off, "bad magic");
}

// ---------------------------------------------------------------------------------------
// Huge sizes

#[test]
fn huge_virtual_size_and_zero_frames_need_no_memory() {
    // The largest size a file can have (`loff_t` is signed).
    let max = i64::MAX as u64;
    let json = META_JSON
        .replace("\"virtualSize\": 4096", &format!("\"virtualSize\": {max}"))
        .replace("\"dataSize\": 8", "\"dataSize\": 0");
    let body = [hdr("zero", 0, max), hdr("stop", 0, 0)].concat();
    let (_dir, _path, index) = open(&stream(&json, &body)).index();
    assert!(index.damage.is_none());
    let r = reader(&index);
    assert_eq!(r.size(), max);
    assert_eq!(read(&r, max - 10, 100).unwrap(), [0; 10]);
    assert_eq!(read(&r, 1 << 62, 16).unwrap(), [0; 16]);
    assert_eq!(r.map().seek_data(0), None);
    assert_eq!(r.map().data_bytes(), 0);
}

#[test]
fn virtual_sizes_no_file_can_hold_are_refused() {
    for size in [1u64 << 63, u64::MAX] {
        let json = META_JSON.replace("\"virtualSize\": 4096", &format!("\"virtualSize\": {size}"));
        assert_open_fails(&stream(&json, &hdr("stop", 0, 0)), 40, "more than a file can hold");
    }
}

#[test]
fn huge_data_frames_are_truncation_not_allocation() {
    let json = META_JSON
        .replace("\"virtualSize\": 4096", &format!("\"virtualSize\": {}", i64::MAX))
        .replace("\"dataSize\": 8", &format!("\"dataSize\": {}", 1u64 << 62));
    let body = [hdr("data", 0, 1 << 62), b"ABCDEFGH\r\n".to_vec(), hdr("stop", 0, 0)].concat();
    let bytes = stream(&json, &body);
    let len = bytes.len() as u64;
    let (_dir, path, index) = open(&bytes).index();
    let d = index.damage.as_ref().expect("damage");
    assert_eq!(d.from, 0);
    assert_names(&d.error.to_string(), &path, len, "ends early");
    assert!(read(&reader(&index), 0, 8).is_err());
}

// ---------------------------------------------------------------------------------------
// Catalog level: a bad file breaks the points that use it, and only those

/// One stream of disk `sda`: file name, checkpoint, parent, incremental, its data.
struct Run<'a> {
    file: &'a str,
    checkpoint: &'a str,
    parent: &'a str,
    incremental: bool,
    minute: u32,
    data: &'a [u8],
}

/// Writes `run` (a data extent at 4096 * minute, over a 1 MiB disk) into `dir`.
fn write_run(dir: &Path, run: &Run) -> PathBuf {
    let size = 1 << 20;
    let meta = StreamMeta::full("sda", size, run.data.len() as u64)
        .point(run.checkpoint, run.parent, run.incremental)
        .dated(&format!("2026-06-30T08:{:02}:01.123456", run.minute));
    let mut w = StreamWriter::new(Vec::new(), &meta, 4096).unwrap();
    let at = 4096 * u64::from(run.minute);
    if !run.incremental {
        w.zero(0, at).unwrap();
    }
    w.data(at, run.data).unwrap();
    if !run.incremental {
        w.zero(at + run.data.len() as u64, size - at - run.data.len() as u64).unwrap();
    }
    let path = dir.join(run.file);
    std::fs::write(&path, w.finish().unwrap()).unwrap();
    path
}

fn run<'a>(file: &'a str, checkpoint: &'a str, parent: &'a str, minute: u32) -> Run<'a> {
    Run { file, checkpoint, parent, incremental: !parent.is_empty(), minute, data: b"some data" }
}

fn points(dir: &Path) -> (Vec<RestorePoint>, Vec<String>) {
    let cat = Catalog::discover(dir).unwrap();
    assert_eq!(cat.domains.len(), 1, "{:?}", cat.domains);
    (cat.domains[0].points.clone(), cat.warnings)
}

fn status_of<'a>(points: &'a [RestorePoint], key: &PointKey) -> (&'a RestorePoint, Status) {
    let p = points.iter().find(|p| &p.key == key).unwrap_or_else(|| panic!("no point {key:?}"));
    (p, p.status())
}

fn cpt(n: u32) -> PointKey {
    PointKey::Checkpoint(format!("virtnbdbackup.{n}"))
}

fn diff_on(n: u32) -> PointKey {
    PointKey::Derived { parent: format!("virtnbdbackup.{n}"), offline: false, rank: 0 }
}

/// Reads 9 bytes at 4096 * minute through the point's chain.
fn read_point(p: &RestorePoint, minute: u64) -> Vec<u8> {
    let r = ImageReader::new(p.disks[0].layers.clone(), Arc::new(ReadCache::new(1 << 20)));
    read(&r, 4096 * minute, 9).unwrap()
}

fn v(n: u32) -> String {
    format!("virtnbdbackup.{n}")
}

#[test]
fn broken_parent_link_breaks_that_point_and_later_ones() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let (v0, v1, v2, v3) = (v(0), v(1), v(2), v(3));
    write_run(d, &run("sda.full.data", &v0, "", 0));
    write_run(d, &run("sda.inc.virtnbdbackup.1.data", &v1, &v0, 1));
    write_run(d, &run("sda.diff.1782810000.data", &v2, &v1, 2));
    write_run(d, &run("sda.inc.virtnbdbackup.2.data", &v2, "virtnbdbackup.7", 3));
    write_run(d, &run("sda.inc.virtnbdbackup.3.data", &v3, &v2, 4));
    write_run(d, &run("sda.diff.1782810300.data", &v(4), &v3, 5));
    let (points, warnings) = points(d);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(points.len(), 6);
    for key in [cpt(0), cpt(1), diff_on(1)] {
        let (p, s) = status_of(&points, &key);
        assert_eq!(s, Status::Complete, "{key:?}");
        assert_eq!(read_point(p, 0), b"some data");
    }
    for key in [cpt(2), cpt(3), diff_on(3)] {
        let (p, s) = status_of(&points, &key);
        match s {
            Status::Broken(why) => {
                assert!(why.contains("sda.inc.virtnbdbackup.2.data"), "{why}");
                assert!(why.contains("virtnbdbackup.7"), "{why}");
            }
            other => panic!("{key:?}: {other:?}"),
        }
        assert!(p.disks[0].layers.is_empty());
    }
    let cat = Catalog::discover(d).unwrap();
    assert_eq!(cat.domains[0].latest().map(|p| &p.key), Some(&diff_on(1)));
}

#[test]
fn partial_files_are_skipped_with_a_warning() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    write_run(d, &run("sda.full.data", &v(0), "", 0));
    write_run(d, &run("sda.inc.virtnbdbackup.1.data", &v(1), &v(0), 1));
    let partial = write_run(d, &run("sda.inc.virtnbdbackup.2.data.partial", &v(2), &v(1), 2));
    let (points, warnings) = points(d);
    assert_eq!(points.iter().map(|p| p.key.clone()).collect::<Vec<_>>(), [cpt(0), cpt(1)]);
    assert!(points.iter().all(|p| p.status() == Status::Complete));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(&partial.display().to_string()) && warnings[0].contains("skipped"),
        "{warnings:?}"
    );
}

#[test]
fn garbage_metadata_breaks_only_the_points_using_the_file() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    write_run(d, &run("sda.full.data", &v(0), "", 0));
    let bad = write_run(d, &run("sda.inc.virtnbdbackup.1.data", &v(1), &v(0), 1));
    write_run(d, &run("sda.inc.virtnbdbackup.2.data", &v(2), &v(1), 2));
    write_run(d, &run("sda.diff.1782810000.data", &v(1), &v(0), 3));
    write_run(d, &Run { incremental: false, ..run("sda.copy.data", &v(0), "", 4) });
    // Garbage in the metadata JSON, header intact.
    let mut bytes = std::fs::read(&bad).unwrap();
    bytes[40..60].copy_from_slice(b"#garbage#garbage#gar");
    std::fs::write(&bad, &bytes).unwrap();
    let (points, warnings) = points(d);
    assert_eq!(points.len(), 5);
    for key in [cpt(0), diff_on(0), PointKey::Copy { rank: 0 }] {
        assert_eq!(status_of(&points, &key).1, Status::Complete, "{key:?}");
    }
    for key in [cpt(1), cpt(2)] {
        match status_of(&points, &key).1 {
            Status::Broken(why) => assert_names(&why, &bad, 40, "bad metadata"),
            other => panic!("{key:?}: {other:?}"),
        }
    }
    assert!(warnings.iter().any(|w| w.contains(&bad.display().to_string())), "{warnings:?}");
    let (p, _) = status_of(&points, &diff_on(0));
    assert_eq!(read_point(p, 3), b"some data");
}

/// Garbage in the metadata of a differential breaks that differential's point only; in
/// the full, every point but the copy.
#[test]
fn garbage_metadata_in_a_diff_or_the_full() {
    let garble = |path: &Path| {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[44..50].copy_from_slice(b"\"\":,,,");
        std::fs::write(path, &bytes).unwrap();
    };
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let full = write_run(d, &run("sda.full.data", &v(0), "", 0));
    write_run(d, &run("sda.inc.virtnbdbackup.1.data", &v(1), &v(0), 1));
    write_run(d, &run("sda.diff.1782810000.data", &v(2), &v(1), 2));
    let bad_diff = write_run(d, &run("sda.diff.1782810060.data", &v(2), &v(1), 3));
    write_run(d, &run("sda.inc.virtnbdbackup.2.data", &v(2), &v(1), 4));
    write_run(d, &Run { incremental: false, ..run("sda.copy.data", &v(0), "", 5) });
    garble(&bad_diff);
    let (found, _) = points(d);
    assert_eq!(found.len(), 6);
    let broken: Vec<&RestorePoint> =
        found.iter().filter(|p| matches!(p.status(), Status::Broken(_))).collect();
    assert_eq!(broken.len(), 1, "{:?}", found.iter().map(|p| (&p.key, p.status())).collect::<Vec<_>>());
    match broken[0].status() {
        Status::Broken(why) => assert_names(&why, &bad_diff, 40, "bad metadata"),
        other => panic!("{other:?}"),
    }
    for key in [cpt(0), cpt(1), cpt(2), diff_on(1), PointKey::Copy { rank: 0 }] {
        assert_eq!(status_of(&found, &key).1, Status::Complete, "{key:?}");
    }
    garble(&full);
    let (found, _) = points(d);
    for p in &found {
        let s = p.status();
        match &p.key {
            PointKey::Copy { .. } => assert_eq!(s, Status::Complete),
            key => assert!(matches!(s, Status::Broken(_)), "{key:?}: {s:?}"),
        }
    }
}

#[test]
fn damaged_layer_marks_its_points_damaged_and_reads_before_the_damage() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    write_run(d, &run("sda.full.data", &v(0), "", 0));
    // Inc 1 changes minutes 1 and 3; its file is cut in the second payload.
    let bad = d.join("sda.inc.virtnbdbackup.1.data");
    let mut meta = StreamMeta::parse(META_JSON.as_bytes()).unwrap();
    meta.virtual_size = 1 << 20;
    meta.data_size = 18;
    meta.date = "2026-06-30T08:01:01.123456".into();
    meta.checkpoint_name = v(1);
    meta.parent_checkpoint = v(0);
    meta.incremental = true;
    let mut w = StreamWriter::new(Vec::new(), &meta, 4096).unwrap();
    w.data(4096, b"inc1 at 1").unwrap();
    w.data(3 * 4096, b"inc1 at 3").unwrap();
    let bytes = w.finish().unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() - 45]).unwrap();
    write_run(d, &run("sda.inc.virtnbdbackup.2.data", &v(2), &v(1), 2));
    let (points, warnings) = points(d);
    assert_eq!(status_of(&points, &cpt(0)).1, Status::Complete);
    for key in [cpt(1), cpt(2)] {
        let (p, s) = status_of(&points, &key);
        assert!(matches!(&s, Status::Damaged(why) if why.contains(&bad.display().to_string())), "{s:?}");
        let index = &p.disks[0].layers[1].index;
        // The cut frame's header was read: frames are sorted, so inc 1 changed nothing
        // before that frame's start, and the damage begins there.
        assert_eq!(index.damage.as_ref().unwrap().from, 3 * 4096);
        // Below the damage: the full's data and inc 1's first extent.
        let r = ImageReader::new(p.disks[0].layers.clone(), Arc::new(ReadCache::new(1 << 20)));
        assert_eq!(read(&r, 0, 9).unwrap(), b"some data");
        assert_eq!(read(&r, 4096, 9).unwrap(), b"inc1 at 1");
        assert!(read(&r, 4096 + 9, 1).is_ok());
        assert!(read(&r, 2 * 4096, 9).is_ok());
        if key == cpt(2) {
            assert_eq!(read(&r, 2 * 4096, 9).unwrap(), b"some data");
        }
        // From it on, inc 1 cannot say what changed: EIO.
        assert!(matches!(read(&r, 3 * 4096, 9), Err(ReadError::Damaged { disk_offset: 12288, .. })));
    }
    assert!(warnings.iter().any(|w| w.contains("damaged")), "{warnings:?}");
}

#[test]

fn inc_file_with_a_garbage_header_is_broken_not_a_raw_image() {
    // Raw images only exist as full/copy files (doc/FORMAT.md §1.12); an `inc` whose
    // first bytes are garbage is a damaged stream, and its points cannot be rebuilt.
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    write_run(d, &run("sda.full.data", &v(0), "", 0));
    let bad = write_run(d, &run("sda.inc.virtnbdbackup.1.data", &v(1), &v(0), 1));
    write_run(d, &run("sda.inc.virtnbdbackup.2.data", &v(2), &v(1), 2));
    let mut bytes = std::fs::read(&bad).unwrap();
    bytes[0..4].copy_from_slice(b"\0\0\0\0");
    std::fs::write(&bad, &bytes).unwrap();
    let (points, _warnings) = points(d);
    assert_eq!(status_of(&points, &cpt(0)).1, Status::Complete);
    for key in [cpt(1), cpt(2)] {
        let (p, s) = status_of(&points, &key);
        assert!(matches!(s, Status::Broken(_)), "{key:?} is {s:?}, layers {:?}", p.disks[0].layers.len());
    }
}
