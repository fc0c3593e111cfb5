//! Benchmark data: writes a synthetic virtnbdbackup backup set with vmback's own stream
//! writer, plus the "truth" raw image of each restore point, for contrib/bench/run.sh.
//!
//! ```text
//! cargo run --release --example gen_chain -- --out DIR [--size 2G] [--data-fraction 0.5]
//!     [--incrementals 3] [--inc-ranges 256] [--inc-max-len 2M] [--compress LEVEL] [--seed N]
//!     [--domain NAME] [--disk sda] [--truth-dir DIR --truth last|all]
//! ```
//!
//! The set uses upstream's file names (`sda.full.data`, `sda.inc.virtnbdbackup.N.data`,
//! `vmconfig.virtnbdbackup.N.xml`, `<domain>.cpt`). The full backup alternates data and
//! zero extents (64 KiB to 64 MiB long, so some are split into 32 MiB lz4 frames) until
//! about `--data-fraction` of the disk is data; each incremental rewrites `--inc-ranges`
//! scattered ranges of 64 KiB (the granularity of qemu's dirty bitmaps) to `--inc-max-len`.
//!
//! Disk content, per 4 KiB page: 45% text-like (a window of a pool of random words:
//! lz4 shrinks it about 2x), 35% random bytes (incompressible), 20% zeros (allocated but
//! empty). Each page depends only on (seed, layer, page number), so the plain and the
//! compressed chain of one seed hold the same bytes and share one truth image.
//!
//! The truth image of a restore point (`<truth-dir>/<disk>.<checkpoint>.raw`) is a sparse
//! file: holes where the chain has zeros or nothing, the data written where it has data.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use vmback::chain::{MAX_REQUEST, StreamMeta, StreamWriter};

const PAGE: u64 = 4096;
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

#[derive(Parser, Debug)]
struct Args {
    /// The backup set folder to write (created; must not hold a set already).
    #[arg(long)]
    out: PathBuf,
    /// Virtual disk size, e.g. 2G or 64M.
    #[arg(long, default_value = "2G", value_parser = parse_bytes)]
    size: u64,
    /// Share of the disk the full backup holds as data (the rest are zero frames).
    #[arg(long, default_value_t = 0.5)]
    data_fraction: f64,
    /// Number of incrementals after the full.
    #[arg(long, default_value_t = 3)]
    incrementals: u32,
    /// Scattered ranges each incremental rewrites.
    #[arg(long, default_value_t = 256)]
    inc_ranges: u32,
    /// Longest of those ranges (they are 64 KiB to this, log-uniform).
    #[arg(long, default_value = "2M", value_parser = parse_bytes)]
    inc_max_len: u64,
    /// lz4-compress the data frames at this level (like `virtnbdbackup -z`).
    #[arg(long)]
    compress: Option<u32>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Domain name written into vmconfig.*.xml and the .cpt file.
    #[arg(long, default_value = "bench-vm")]
    domain: String,
    #[arg(long, default_value = "sda")]
    disk: String,
    /// Where to write truth images (nothing is written without it).
    #[arg(long)]
    truth_dir: Option<PathBuf>,
    /// Which restore points get a truth image.
    #[arg(long, value_enum, default_value_t = Truth::Last)]
    truth: Truth,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Truth {
    Last,
    All,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size::Config::new().with_binary().parse_size(s).map_err(|e| e.to_string())
}

/// xorshift64*: fast, seeded, good enough for benchmark data.
struct Rng(u64);

impl Rng {
    /// A generator for one independent stream, keyed by `parts` (splitmix64 mixing).
    fn keyed(parts: &[u64]) -> Rng {
        let mut z = 0x9e37_79b9_7f4a_7c15u64;
        for &p in parts {
            z = (z ^ p).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
        }
        Rng(z | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        ((self.next() >> 32) * n) >> 32
    }

    /// Log-uniform in `[lo, hi]`, rounded down to a multiple of `align` (at least `align`).
    fn log_uniform(&mut self, lo: u64, hi: u64, align: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let v = (lo as f64 * (hi as f64 / lo as f64).powf(u)) as u64;
        (v / align * align).max(align)
    }
}

/// Fills disk pages with the content described in the module note.
struct Content {
    seed: u64,
    pool: Vec<u8>,
}

impl Content {
    fn new(seed: u64) -> Content {
        const WORDS: &[&str] = &[
            "the",
            "of",
            "and",
            "to",
            "in",
            "is",
            "that",
            "for",
            "it",
            "as",
            "with",
            "was",
            "on",
            "be",
            "at",
            "by",
            "this",
            "had",
            "not",
            "are",
            "but",
            "from",
            "or",
            "have",
            "an",
            "they",
            "which",
            "one",
            "you",
            "were",
            "all",
            "her",
            "she",
            "there",
            "would",
            "their",
            "we",
            "him",
            "been",
            "has",
            "when",
            "who",
            "will",
            "more",
            "no",
            "if",
            "out",
            "so",
            "said",
            "what",
            "up",
            "its",
            "about",
            "into",
            "than",
            "them",
            "can",
            "only",
            "other",
            "new",
            "some",
            "could",
            "time",
            "these",
            "kernel",
            "systemd",
            "libvirt",
            "/usr/lib/x86_64-linux-gnu/",
            "error:",
            "INFO",
            "2026-06-01T08:00:00",
            "0x7ffd3a2c",
            "{\"id\":",
            "</domain>",
        ];
        let mut rng = Rng::keyed(&[seed, 0x7e47]);
        let mut pool = Vec::with_capacity(4 * MIB as usize + 64);
        while pool.len() < 4 * MIB as usize {
            pool.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
            pool.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
        }
        Content { seed, pool }
    }

    /// Fills `buf` with the bytes layer `layer` writes at disk offset `off` (page aligned).
    fn fill(&self, layer: u32, off: u64, buf: &mut [u8]) {
        debug_assert_eq!(off % PAGE, 0);
        for (i, page) in buf.chunks_mut(PAGE as usize).enumerate() {
            let mut rng = Rng::keyed(&[self.seed, layer as u64, off / PAGE + i as u64]);
            match rng.below(100) {
                0..45 => {
                    let at = rng.below((self.pool.len() - page.len()) as u64) as usize;
                    page.copy_from_slice(&self.pool[at..at + page.len()]);
                }
                45..80 => {
                    for w in page.chunks_mut(8) {
                        let r = rng.next().to_le_bytes();
                        w.copy_from_slice(&r[..w.len()]);
                    }
                }
                _ => page.fill(0),
            }
        }
    }
}

/// One extent of a stream: `(start, len, is_data)`.
type Extent = (u64, u64, bool);

/// The full backup's extents: alternating runs until the disk is covered.
fn full_extents(rng: &mut Rng, size: u64, fraction: f64) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let len = rng.log_uniform(64 * KIB, 64 * MIB, 64 * KIB).min(size - pos);
        let data = (rng.next() >> 11) as f64 / ((1u64 << 53) as f64) < fraction;
        match out.last_mut() {
            Some(last) if last.2 == data => last.1 += len,
            _ => out.push((pos, len, data)),
        }
        pos += len;
    }
    out
}

/// An incremental's extents: `n` scattered ranges, sorted and merged.
fn inc_extents(rng: &mut Rng, size: u64, n: u32, max_len: u64) -> Vec<Extent> {
    let gran = 64 * KIB;
    let mut ranges: Vec<(u64, u64)> = (0..n)
        .map(|_| {
            let len = rng.log_uniform(gran, max_len.max(gran), gran).min(size);
            let start = rng.below((size - len) / gran + 1) * gran;
            (start, start + len)
        })
        .collect();
    ranges.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged.into_iter().map(|(s, e)| (s, e - s, true)).collect()
}

fn date(layer: u32) -> String {
    // One backup an hour from 2026-06-01 08:00 local time, as isoformat() writes it.
    let t = chrono::DateTime::from_timestamp(1_780_300_800 + layer as i64 * 3600, 1000).expect("valid");
    t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

fn write_stream(
    args: &Args,
    content: &Content,
    layer: u32,
    extents: &[Extent],
    truth: Option<&File>,
) -> io::Result<u64> {
    let (file, checkpoint, parent) = if layer == 0 {
        (format!("{}.full.data", args.disk), "virtnbdbackup.0".to_owned(), String::new())
    } else {
        (
            format!("{}.inc.virtnbdbackup.{layer}.data", args.disk),
            format!("virtnbdbackup.{layer}"),
            format!("virtnbdbackup.{}", layer - 1),
        )
    };
    let data_size = extents.iter().filter(|e| e.2).map(|e| e.1).sum();
    let meta = StreamMeta {
        virtual_size: args.size,
        data_size,
        date: date(layer),
        disk_name: args.disk.clone(),
        disk_format: Some("qcow2".into()),
        checkpoint_name: checkpoint.clone(),
        parent_checkpoint: parent,
        incremental: layer > 0,
        compressed: args.compress,
        stream_version: 2,
    };
    let partial = args.out.join(format!("{file}.partial"));
    let out = BufWriter::with_capacity(MIB as usize, File::create(&partial)?);
    let mut w = StreamWriter::new(out, &meta, MAX_REQUEST)?;
    for &(start, len, data) in extents {
        if !data {
            w.zero(start, len)?;
            continue;
        }
        w.data_from(start, len, |rel, n| {
            let mut buf = vec![0u8; n];
            content.fill(layer, start + rel, &mut buf);
            if let Some(t) = truth {
                t.write_all_at(&buf, start + rel)?;
            }
            Ok(buf)
        })?;
    }
    w.finish()?.into_inner().map_err(|e| e.into_error())?;
    fs::rename(&partial, args.out.join(&file))?;
    let xml = format!(
        "<domain type='kvm'>\n  <name>{}</name>\n  <memory unit='KiB'>1048576</memory>\n  \
         <description>vmback benchmark, backup {checkpoint}</description>\n</domain>\n",
        args.domain
    );
    fs::write(args.out.join(format!("vmconfig.{checkpoint}.xml")), xml)?;
    Ok(data_size)
}

fn copy_sparse(from: &Path, to: &Path) -> io::Result<()> {
    let ok = Command::new("cp").arg("--sparse=always").arg(from).arg(to).status()?.success();
    if ok { Ok(()) } else { Err(io::Error::other(format!("cp {} {} failed", from.display(), to.display()))) }
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    if args.out.join(format!("{}.full.data", args.disk)).exists() {
        return Err(io::Error::other(format!("{} already holds a backup set", args.out.display())));
    }
    fs::create_dir_all(&args.out)?;
    let content = Content::new(args.seed);
    let mut rng = Rng::keyed(&[args.seed, 0x1a70]);
    let truth_path = |layer: u32| {
        args.truth_dir.as_ref().map(|d| d.join(format!("{}.virtnbdbackup.{layer}.raw", args.disk)))
    };
    // The truth image being built: the newest point's, renamed when it is final.
    let work = args.truth_dir.as_ref().map(|d| d.join(format!("{}.building.raw", args.disk)));
    let truth = match &work {
        Some(p) => {
            fs::create_dir_all(p.parent().expect("in truth dir"))?;
            let f = File::create(p)?;
            f.set_len(args.size)?;
            Some(f)
        }
        None => None,
    };
    let mut total = 0;
    let last = args.incrementals;
    for layer in 0..=last {
        let extents = if layer == 0 {
            full_extents(&mut rng, args.size, args.data_fraction)
        } else {
            inc_extents(&mut rng, args.size, args.inc_ranges, args.inc_max_len)
        };
        total += write_stream(&args, &content, layer, &extents, truth.as_ref())?;
        if let (Some(work), Some(dest)) = (&work, truth_path(layer)) {
            if layer == last {
                fs::rename(work, dest)?;
            } else if args.truth == Truth::All {
                copy_sparse(work, &dest)?;
            }
        }
    }
    let cpts: Vec<String> = (0..=last).map(|l| format!("\"virtnbdbackup.{l}\"")).collect();
    fs::write(args.out.join(format!("{}.cpt", args.domain)), format!("[{}]", cpts.join(", ")))?;
    eprintln!(
        "gen_chain: {} ({} virtual, {} points, {:.0} MiB of data frames{}) in {:.1} s",
        args.out.display(),
        args.size,
        last + 1,
        total as f64 / MIB as f64,
        args.compress.map_or(String::new(), |l| format!(", lz4 level {l}")),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
