//! Timing helpers for contrib/bench/run.sh. Each prints one line of `key=value` pairs.
//!
//! ```text
//! bench_io seq FILE [--bs 1M] [--small-pages]
//!     Reads FILE from start to end with read(2) calls of --bs bytes (what `dd bs=1M
//!     of=/dev/null` does). Prints bytes, secs, mbps (MB = 10^6 bytes). With
//!     --small-pages, first (untimed) drops FILE from the page cache and reads it back in
//!     4 KiB preads under POSIX_FADV_RANDOM, so the timed read is served from a page
//!     cache of 4 KiB folios, as FUSE files are cached (tracefs shows order-0 folios for
//!     FUSE, up to order 9 for ext4 after normal readahead).
//! bench_io rand FILE --map MAPFILE [--n 2000] [--seed 1] [--bs 4096]
//!     --n preads of --bs bytes at aligned offsets drawn uniformly from the data regions
//!     of MAPFILE (SEEK_DATA/SEEK_HOLE of the sparse truth image), so reads land where a
//!     guest filesystem has blocks, not in holes. One read at a time, in one thread; each
//!     timed alone. Prints n, p50_us, p90_us, p99_us, max_us, mean_us.
//! bench_io mountls VMBACK SOURCE MOUNTPOINT [-- EXTRA_MOUNT_ARGS...]
//!     Starts `VMBACK mount SOURCE MOUNTPOINT`, polls every 0.5 ms until MOUNTPOINT is a
//!     mount (its st_dev changes), runs `ls -lR MOUNTPOINT`, then stops vmback with
//!     SIGTERM. Prints mount_secs (start to mounted), ls_secs, total_secs, ls_lines.
//! bench_io lsr DIR
//!     Times `ls -lR DIR` alone. Prints ls_secs, ls_lines.
//! ```

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Whence, lseek};

fn die(msg: &str) -> ! {
    eprintln!("bench_io: {msg}");
    std::process::exit(2)
}

fn parse_size(s: &str) -> usize {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .ok()
        .and_then(|v| usize::try_from(v).ok())
        .unwrap_or_else(|| die(&format!("bad size {s}")))
}

/// `--key value` options after the positional arguments.
fn opt(args: &[String], key: &str) -> Option<String> {
    args.iter().position(|a| a == key).map(|i| args.get(i + 1).cloned().unwrap_or_else(|| die(key)))
}

fn seq(path: &str, bs: usize, small_pages: bool) {
    let mut f = File::open(path).unwrap_or_else(|e| die(&format!("{path}: {e}")));
    if small_pages {
        use nix::fcntl::{PosixFadviseAdvice as A, posix_fadvise};
        let advise =
            |a| posix_fadvise(f.as_fd(), 0, 0, a).unwrap_or_else(|e| die(&format!("{path}: fadvise: {e}")));
        advise(A::POSIX_FADV_DONTNEED);
        advise(A::POSIX_FADV_RANDOM);
        let mut page = [0u8; 4096];
        let mut at = 0;
        while let Ok(n @ 1..) = f.read_at(&mut page, at) {
            at += n as u64;
        }
        advise(A::POSIX_FADV_NORMAL);
    }
    let mut buf = vec![0u8; bs];
    let mut total = 0u64;
    let t = Instant::now();
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => die(&format!("{path}: read at {total}: {e}")),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!("bytes={total} secs={secs:.4} mbps={:.1}", total as f64 / secs / 1e6);
}

/// The data regions of a sparse file, as `(start, end)`.
fn data_regions(path: &str) -> Vec<(u64, u64)> {
    let f = File::open(path).unwrap_or_else(|e| die(&format!("{path}: {e}")));
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let Ok(start) = lseek(f.as_fd(), pos as i64, Whence::SeekData) else { break };
        let end = lseek(f.as_fd(), start, Whence::SeekHole).map_or(size, |e| e as u64);
        out.push((start as u64, end));
        pos = end;
    }
    out
}

fn rand(path: &str, map: &str, n: usize, seed: u64, bs: usize) {
    let regions = data_regions(map);
    let bs64 = bs as u64;
    // Aligned block slots per region, and their running total, to draw uniformly.
    let mut cum = Vec::with_capacity(regions.len());
    let mut total = 0u64;
    for &(s, e) in &regions {
        let first = s.div_ceil(bs64);
        let slots = (e / bs64).saturating_sub(first);
        total += slots;
        cum.push((total, first));
    }
    if total == 0 {
        die(&format!("{map}: no data regions"));
    }
    let f = File::open(path).unwrap_or_else(|e| die(&format!("{path}: {e}")));
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut buf = vec![0u8; bs];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let k = x.wrapping_mul(0x2545_f491_4f6c_dd1d) % total;
        let i = cum.partition_point(|&(c, _)| c <= k);
        let before = if i == 0 { 0 } else { cum[i - 1].0 };
        let off = (cum[i].1 + (k - before)) * bs64;
        let t = Instant::now();
        f.read_exact_at(&mut buf, off).unwrap_or_else(|e| die(&format!("{path}: pread at {off}: {e}")));
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let mean = lat.iter().sum::<f64>() / lat.len() as f64;
    println!(
        "n={n} p50_us={:.1} p90_us={:.1} p99_us={:.1} max_us={:.1} mean_us={mean:.1}",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        lat[lat.len() - 1]
    );
}

/// Runs `ls -lR dir`; returns (seconds, lines of output).
fn ls_r(dir: &Path) -> (f64, usize) {
    let t = Instant::now();
    let out = Command::new("ls")
        .arg("-lR")
        .arg(dir)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| die(&format!("ls: {e}")));
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        die(&format!("ls -lR {} failed", dir.display()));
    }
    (secs, out.stdout.iter().filter(|&&b| b == b'\n').count())
}

fn mountls(vmback: &str, source: &str, mnt: &str, extra: &[String]) {
    let mnt_path = &std::fs::canonicalize(mnt).unwrap_or_else(|e| die(&format!("{mnt}: {e}")));
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    let parent_dev = dev(mnt_path.parent().unwrap_or(Path::new("/")));
    if dev(mnt_path) != parent_dev {
        die(&format!("{mnt} is already a mount"));
    }
    let t = Instant::now();
    let mut child = Command::new(vmback)
        .arg("mount")
        .arg(source)
        .arg(mnt)
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| die(&format!("{vmback}: {e}")));
    loop {
        if dev(mnt_path).is_some_and(|d| Some(d) != parent_dev) {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            die(&format!("vmback mount exited early: {st}"));
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            die("mount did not appear within 120 s");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let mount_secs = t.elapsed().as_secs_f64();
    let (ls_secs, lines) = ls_r(mnt_path);
    let total = t.elapsed().as_secs_f64();
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let _ = child.wait();
    println!("mount_secs={mount_secs:.4} ls_secs={ls_secs:.4} total_secs={total:.4} ls_lines={lines}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pos = |i: usize| args.get(i).map(String::as_str).unwrap_or_else(|| die("missing argument"));
    match args.first().map(String::as_str) {
        Some("seq") => seq(
            pos(1),
            opt(&args, "--bs").map_or(1 << 20, |s| parse_size(&s)),
            args.iter().any(|a| a == "--small-pages"),
        ),
        Some("rand") => rand(
            pos(1),
            &opt(&args, "--map").unwrap_or_else(|| die("rand needs --map")),
            opt(&args, "--n").map_or(2000, |s| s.parse().unwrap_or_else(|_| die("bad --n"))),
            opt(&args, "--seed").map_or(1, |s| s.parse().unwrap_or_else(|_| die("bad --seed"))),
            opt(&args, "--bs").map_or(4096, |s| parse_size(&s)),
        ),
        Some("mountls") => {
            let extra = args.iter().position(|a| a == "--").map_or(&[][..], |i| &args[i + 1..]);
            mountls(pos(1), pos(2), pos(3), extra)
        }
        Some("lsr") => {
            let (secs, lines) = ls_r(Path::new(pos(1)));
            println!("ls_secs={secs:.4} ls_lines={lines}");
        }
        _ => die("usage: bench_io seq|rand|mountls|lsr ... (see the source)"),
    }
}
