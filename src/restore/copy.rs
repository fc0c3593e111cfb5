//! Copies an image out of any [`ImageView`] (the chain reader, in `vmback restore`) into
//! a [`Sink`]: a file or block device here, or an image on another host over NBD
//! (`restore::remote`), in parallel and sparse.
//!
//! The image's runs say where data is; only those ranges are read. They are cut
//! into chunks that worker threads take in turn and write with `pwrite` at their own
//! offset, so no ordering between workers is needed and decoding (lz4) uses every core.
//! 4 KiB blocks that read as all zeros are not written when the output is sparse, so
//! holes stay holes even where the backup stored zeros as data.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use super::RestoreError;
use crate::view::{ImageView, Run};

/// Bytes per work unit: big enough that per-chunk overhead vanishes, small enough that
/// two workers share a 32 MiB lz4 frame's decode through the cache rather than racing.
const CHUNK: u64 = 4 << 20;

/// How a copy treats ranges that hold no data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sparse {
    /// Leave holes: the target reads as zeros there already (a new file).
    Always,
    /// Write zeros over every hole (a block device that was not zeroed beforehand).
    Never,
}

/// What a copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes written as data.
    pub written: u64,
    /// Bytes of data ranges that read as zeros and were left as holes.
    pub zero_skipped: u64,
}

/// The granule of zero detection: a filesystem block, the smallest hole a sparse file
/// can have, so every all-zero block of the image becomes a hole.
const ZERO_BLOCK: usize = 4096;

/// The byte ranges of `chunk` that are not all-zero blocks, adjacent ones merged.
fn nonzero_runs(chunk: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, block) in chunk.chunks(ZERO_BLOCK).enumerate() {
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let r = i * ZERO_BLOCK..i * ZERO_BLOCK + block.len();
        match runs.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => runs.push(r),
        }
    }
    runs
}

/// Where a copy writes.
pub trait Sink: Sync {
    /// Writes `data` at `offset`. `worker` is the calling worker's number (below the
    /// copy's thread count), so a sink can give each worker a connection of its own.
    fn write_at(&self, worker: usize, data: &[u8], offset: u64) -> Result<(), RestoreError>;
}

/// A file or block device on this machine, named for errors.
pub struct FileSink<'a> {
    pub file: &'a File,
    pub path: &'a std::path::Path,
}

impl Sink for FileSink<'_> {
    fn write_at(&self, _worker: usize, data: &[u8], offset: u64) -> Result<(), RestoreError> {
        self.file.write_all_at(data, offset).map_err(|source| RestoreError::Write {
            path: self.path.to_owned(),
            offset,
            source,
        })
    }
}

/// Copies the whole image into `out` at the same offsets. `done(bytes)` is called as
/// ranges complete (for progress). Stops at the first error and returns it.
pub fn copy_image(
    image: &dyn ImageView,
    out: &dyn Sink,
    sparse: Sparse,
    threads: usize,
    done: &(dyn Fn(u64) + Sync),
) -> Result<CopyStats, RestoreError> {
    let mut runs = Vec::new();
    let mut pos = 0;
    while pos < image.size() {
        let (run, end) = image.run_at(pos);
        runs.push((pos, end, run == Run::Data));
        pos = end;
    }
    let units: Vec<(u64, u64, bool)> = runs
        .into_iter()
        .filter(|&(_, _, data)| data || sparse == Sparse::Never)
        .flat_map(|(start, end, data)| {
            (start..end).step_by(CHUNK as usize).map(move |s| (s, (s + CHUNK).min(end), data))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    let first_error: Mutex<Option<RestoreError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for worker in 0..threads.max(1) {
            let (next, stop, written, skipped, first_error, units) =
                (&next, &stop, &written, &skipped, &first_error, &units);
            s.spawn(move || {
                let mut buf = vec![0u8; CHUNK as usize];
                while !stop.load(Ordering::Relaxed) {
                    let Some(&(start, end, data)) = units.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    let chunk = &mut buf[..(end - start) as usize];
                    let result = if data {
                        image.read_at(chunk, start).map_err(RestoreError::from).map(|_| ())
                    } else {
                        chunk.fill(0);
                        Ok(())
                    };
                    let result = result.and_then(|()| {
                        let runs = if sparse == Sparse::Always {
                            nonzero_runs(chunk)
                        } else {
                            std::iter::once(0..chunk.len()).collect()
                        };
                        let mut n = 0;
                        for r in runs {
                            let at = start + r.start as u64;
                            out.write_at(worker, &chunk[r.clone()], at)?;
                            n += r.len() as u64;
                        }
                        written.fetch_add(n, Ordering::Relaxed);
                        skipped.fetch_add(chunk.len() as u64 - n, Ordering::Relaxed);
                        Ok(())
                    });
                    match result {
                        Ok(()) => done(end - start),
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            first_error.lock().expect("no panics while held").get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    match first_error.into_inner().expect("no panics while held") {
        Some(e) => Err(e),
        None => Ok(CopyStats { written: written.into_inner(), zero_skipped: skipped.into_inner() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_are_left_out_and_neighbours_merged() {
        let mut chunk = vec![0u8; 6 * ZERO_BLOCK + 100];
        chunk[ZERO_BLOCK + 5] = 1;
        chunk[2 * ZERO_BLOCK] = 1;
        chunk[6 * ZERO_BLOCK + 99] = 1;
        assert_eq!(
            nonzero_runs(&chunk),
            vec![ZERO_BLOCK..3 * ZERO_BLOCK, 6 * ZERO_BLOCK..6 * ZERO_BLOCK + 100]
        );
        assert!(nonzero_runs(&[0; 100]).is_empty());
    }
}
