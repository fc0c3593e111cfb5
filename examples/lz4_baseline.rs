//! Benchmark baseline for compressed images: how fast single-threaded `lz4_flex` decodes
//! the lz4 frames one image needs, with everything already in memory. contrib/bench/run.sh
//! compares vmback's sequential read of the same image against it.
//!
//! ```text
//! cargo run --release --example lz4_baseline -- STREAM_FILE... [--disk sda] [--repeat 3]
//! ```
//!
//! The stream files are the image's chain, oldest first (full, then incrementals). The
//! frames are the ones vmback's reader decodes to read the whole image once: every lz4
//! frame that some byte of the merged extent map comes from, each once. Their compressed
//! bytes are read into memory first (not timed); then, timed, each frame is decoded with
//! `lz4_flex::frame::FrameDecoder` exactly as `ImageReader::decode` does (`read_exact`
//! of the content, then one more read so the end mark and content checksum are checked).
//!
//! Two timings are printed, best of `--repeat`:
//! - `secs`: decoding into one reused output buffer: the decoder alone (the baseline);
//! - `secs_fresh`: decoding into a fresh zeroed `Vec` per frame (page faults included);
//! - `secs_alloc`: what the reader does per frame on top: a fresh zeroed `Vec` for the
//!   compressed bytes (copied, standing in for the `pread`) and for the output, then
//!   `Arc<[u8]>::from(vec)` (which allocates again and copies the whole frame).
//!
//! Output, one line of `key=value`: frames, comp_bytes, decoded_bytes, image_size,
//! data_bytes (image bytes that come from lz4 data), secs, mbps (decoded MB/s),
//! secs_fresh, mbps_fresh, secs_alloc, mbps_alloc. MB = 10^6 bytes.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use vmback::chain::ExtentMap;
use vmback::chain::extent::Source;
use vmback::chain::io::read_full;
use vmback::chain::scan::{Stored, StreamIndex};

fn usage() -> ! {
    eprintln!("usage: lz4_baseline STREAM_FILE... [--disk sda] [--repeat N]");
    std::process::exit(2)
}

fn decode(comp: &[u8], out: &mut [u8]) {
    let mut dec = lz4_flex::frame::FrameDecoder::new(comp);
    dec.read_exact(out).expect("decodes");
    let mut extra = [0u8; 1];
    assert_eq!(dec.read(&mut extra).expect("end mark and checksum"), 0, "frame longer than its extent");
}

fn main() {
    let mut files = Vec::new();
    let mut disk = "sda".to_owned();
    let mut repeat = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--disk" => disk = args.next().unwrap_or_else(|| usage()),
            "--repeat" => repeat = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage()),
            "-h" | "--help" => usage(),
            _ => files.push(PathBuf::from(a)),
        }
    }
    if files.is_empty() {
        usage();
    }
    let layers: Vec<StreamIndex> = files
        .iter()
        .map(|p| StreamIndex::open(p, &disk).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    let size = layers.last().expect("not empty").meta.virtual_size;
    let map = ExtentMap::build(layers.iter(), size);

    // (layer, index of the extent, index of the frame) of every frame the image reads.
    let mut needed = BTreeSet::new();
    let mut data_bytes = 0;
    for piece in map.pieces(0..size) {
        let Source::Data { layer, extent } = piece.src else { continue };
        let ext = &layers[layer as usize].extents[extent as usize];
        let Stored::Lz4(frames) = &ext.stored else { continue };
        data_bytes += piece.end - piece.start;
        let (rs, re) = (piece.start - ext.start, piece.end - ext.start);
        for (fi, f) in frames.iter().enumerate() {
            if f.extent_off < re && f.extent_off + f.len > rs {
                needed.insert((layer, extent, fi));
            }
        }
    }
    // Load the compressed frames (untimed).
    let frames: Vec<(Vec<u8>, usize)> = needed
        .iter()
        .map(|&(layer, extent, fi)| {
            let index = &layers[layer as usize];
            let Stored::Lz4(frames) = &index.extents[extent as usize].stored else { unreachable!() };
            let f = frames[fi];
            let mut comp = vec![0u8; f.comp_len as usize];
            let n = read_full(&*index.file, &mut comp, f.file_off).expect("read");
            assert_eq!(n, comp.len(), "short read");
            (comp, f.len as usize)
        })
        .collect();
    let comp_bytes: usize = frames.iter().map(|f| f.0.len()).sum();
    let decoded: usize = frames.iter().map(|f| f.1).sum();
    let max_len = frames.iter().map(|f| f.1).max().unwrap_or(0);

    let mut best = f64::INFINITY;
    let mut best_fresh = f64::INFINITY;
    let mut best_alloc = f64::INFINITY;
    let mut out = vec![0u8; max_len];
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        for (comp, len) in &frames {
            decode(comp, &mut out[..*len]);
        }
        best = best.min(t.elapsed().as_secs_f64());

        let t = Instant::now();
        for (comp, len) in &frames {
            let mut o = vec![0u8; *len];
            decode(comp, &mut o);
            std::hint::black_box(&o);
        }
        best_fresh = best_fresh.min(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut keep = 0usize;
        for (comp, len) in &frames {
            let mut c = vec![0u8; comp.len()];
            c.copy_from_slice(comp);
            let mut o = vec![0u8; *len];
            decode(&c, &mut o);
            let a: Arc<[u8]> = o.into();
            keep = keep.wrapping_add(a[a.len() / 2] as usize);
        }
        best_alloc = best_alloc.min(t.elapsed().as_secs_f64());
        std::hint::black_box(keep);
    }
    let mbps = |s: f64| decoded as f64 / s / 1e6;
    println!(
        "frames={} comp_bytes={comp_bytes} decoded_bytes={decoded} image_size={size} data_bytes={data_bytes} \
         secs={best:.4} mbps={:.1} secs_fresh={best_fresh:.4} mbps_fresh={:.1} \
         secs_alloc={best_alloc:.4} mbps_alloc={:.1}",
        frames.len(),
        mbps(best),
        mbps(best_fresh),
        mbps(best_alloc)
    );
}
