//! The shared, byte-bounded LRU of decoded lz4 frames. See the module note in `cache`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, OnceLock};

use lru::LruCache;
use parking_lot::Mutex;

/// Identifies one decoded unit: a stream file (numbered at mount) and a frame in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub file: u32,
    pub frame: u64,
}

/// An entry: empty until its first reader has decoded it.
#[derive(Default)]
struct Slot {
    data: Mutex<Option<Arc<Vec<u8>>>>,
}

struct Lru {
    /// Entries and the bytes each is charged (its buffer's capacity once filled from a
    /// spare, else its size).
    map: LruCache<BlockKey, (Arc<Slot>, usize)>,
    /// What the entries are charged, in all.
    bytes: usize,
    /// Buffers of evicted entries, oldest first, kept to decode later frames into.
    spares: VecDeque<Vec<u8>>,
    spare_bytes: usize,
}

/// Counters shown in the mount's `.stats` file.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Reads that found their frame decoded (or waited for another thread to decode it).
    pub hits: AtomicU64,
    /// Frames a reader decoded itself.
    pub misses: AtomicU64,
    /// Bytes read from backup files (payloads, compressed or not).
    pub bytes_read: AtomicU64,
    /// Bytes produced by lz4 decoding.
    pub bytes_decoded: AtomicU64,
    /// Frames decoded ahead of a sequential reader (not counted in `misses`).
    pub prefetched: AtomicU64,
}

impl CacheStats {
    pub fn render(&self, cache: &ReadCache) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (entries, bytes) = cache.usage();
        format!(
            "hits {}\nmisses {}\nprefetched {}\nbytes_read {}\nbytes_decoded {}\ncache_entries {entries}\ncache_bytes {bytes}\ncache_limit {}\n",
            get(&self.hits),
            get(&self.misses),
            get(&self.prefetched),
            get(&self.bytes_read),
            get(&self.bytes_decoded),
            cache.limit
        )
    }
}

/// See the module note. One LRU rather than N shards: an lz4 frame is up to 32 MiB, so
/// per-shard byte budgets of a 256 MiB cache would each hold barely one frame, and the
/// lock is only held for O(1) map work.
pub struct ReadCache {
    lru: Mutex<Lru>,
    limit: usize,
    pub stats: CacheStats,
    /// The queue of the prefetch thread, started by the first [`ReadCache::prefetch`].
    ahead: OnceLock<Sender<Job>>,
    /// Jobs queued and not yet started: at most `QUEUE`, reserved before a job is made,
    /// so the channel itself needs no bound.
    queued: AtomicUsize,
}

/// A decode queued for the prefetch thread.
type Job = Box<dyn FnOnce() + Send>;

/// Frames queued ahead at most. A sequential reader asks for the next frames on every
/// request; more than a couple queued would only be decoded after the reader got there.
const QUEUE: usize = 2;

impl ReadCache {
    /// A cache holding at most `limit` bytes of decoded data, or its newest entry when
    /// that alone is larger.
    pub fn new(limit: usize) -> ReadCache {
        ReadCache {
            lru: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
                spares: VecDeque::new(),
                spare_bytes: 0,
            }),
            limit,
            stats: CacheStats::default(),
            ahead: OnceLock::new(),
            queued: AtomicUsize::new(0),
        }
    }

    /// The most bytes it holds (see [`ReadCache::new`]).
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn usage(&self) -> (usize, usize) {
        let lru = self.lru.lock();
        (lru.map.len(), lru.bytes + lru.spare_bytes)
    }

    /// Returns the cached bytes for `key`, or runs `load` (outside the LRU lock) and caches
    /// its result. `size` is the decoded size, known from the index before decoding.
    /// `load` gets a buffer to decode into: one an evicted entry no longer needs when
    /// there is one of about the right size (its pages are already mapped), else empty.
    pub fn get_or_load<E>(
        &self,
        key: BlockKey,
        size: usize,
        load: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, E>,
    ) -> Result<Arc<Vec<u8>>, E> {
        let (slot, spare) = {
            let mut lru = self.lru.lock();
            match lru.map.get(&key) {
                Some((slot, _)) => (slot.clone(), None),
                None => self.insert(&mut lru, key, size),
            }
        };
        // A miss is a decode this reader did, also of an entry a prefetch had made but not
        // yet started on; a hit found the bytes there (perhaps after waiting for them).
        let mut decoded = false;
        let got = self.fill(key, &slot, spare, |buf| {
            decoded = true;
            load(buf)
        });
        let counter = if decoded { &self.stats.misses } else { &self.stats.hits };
        counter.fetch_add(1, Ordering::Relaxed);
        got
    }

    /// Decodes `key` with `load` on the prefetch thread, unless it is cached (or being
    /// decoded) already, the queue is full, or the frame would take more than
    /// half the cache (it would evict the frame the reader is in). An entry is made at
    /// once, so a reader that gets there first decodes it itself and the queued job then
    /// finds it done. A failed load is forgotten: the reader meets the error itself.
    pub fn prefetch<E>(
        self: &Arc<Self>,
        key: BlockKey,
        size: usize,
        load: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, E> + Send + 'static,
    ) {
        if size.saturating_mul(2) > self.limit {
            return;
        }
        // A place in the queue first: a refused prefetch must not have evicted anything.
        let reserve = |q: usize| (q < QUEUE).then_some(q + 1);
        if self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, reserve).is_err() {
            return;
        }
        let (slot, spare) = {
            let mut lru = self.lru.lock();
            if lru.map.contains(&key) {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            self.insert(&mut lru, key, size)
        };
        let cache = self.clone();
        let job_slot = slot.clone();
        let job: Job = Box::new(move || {
            cache.queued.fetch_sub(1, Ordering::AcqRel);
            // Errors are dropped: `fill` forgets the entry and the reader meets them.
            let _ = cache.fill(key, &job_slot, spare, |buf| {
                cache.stats.prefetched.fetch_add(1, Ordering::Relaxed);
                load(buf)
            });
        });
        // The send fails only when the thread could not be started.
        if self.ahead.get_or_init(spawn_worker).send(job).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.forget(key, &slot);
        }
    }

    /// Adds an empty entry for `key` as the newest, evicting the oldest past the limit.
    /// Returns it with a spare buffer that fits `size`, if there is one; the entry is
    /// then charged for the buffer's whole capacity.
    fn insert(&self, lru: &mut Lru, key: BlockKey, size: usize) -> (Arc<Slot>, Option<Vec<u8>>) {
        let slot = Arc::new(Slot::default());
        lru.map.put(key, (slot.clone(), size));
        lru.bytes += size;
        self.evict(lru);
        let spare = lru
            .spares
            .iter()
            .enumerate()
            .filter(|(_, b)| fits(b.capacity(), size))
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)
            .and_then(|i| lru.spares.remove(i));
        if let Some(buf) = &spare {
            lru.spare_bytes -= buf.capacity();
            let extra = buf.capacity() - size;
            if let Some((_, charged)) = lru.map.peek_mut(&key) {
                *charged += extra;
                lru.bytes += extra;
            }
            self.evict(lru);
        }
        (slot, spare)
    }

    /// Drops the oldest entries until they fit in the limit less the spares' share, and
    /// keeps the buffers of those nobody reads any more as spares, up to that share
    /// (oldest dropped first). The newest entry always stays, even when it alone exceeds
    /// the limit: a cache smaller than one lz4 frame would otherwise decode the whole
    /// frame again for every request inside it.
    fn evict(&self, lru: &mut Lru) {
        let share = self.limit / SPARE_SHARE;
        while lru.bytes > self.limit - share && lru.map.len() > 1 {
            let Some((_, (old, charged))) = lru.map.pop_lru() else { break };
            lru.bytes -= charged;
            if let Some(buf) = unshared(old).filter(|b| b.capacity() >= MIN_SPARE) {
                lru.spare_bytes += buf.capacity();
                lru.spares.push_back(buf);
            }
        }
        while lru.spare_bytes > share
            && let Some(old) = lru.spares.pop_front()
        {
            lru.spare_bytes -= old.capacity();
        }
    }

    /// The entry's bytes, running `load` if nobody has yet (under the entry's lock).
    fn fill<E>(
        &self,
        key: BlockKey,
        slot: &Arc<Slot>,
        spare: Option<Vec<u8>>,
        load: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, E>,
    ) -> Result<Arc<Vec<u8>>, E> {
        let mut data = slot.data.lock();
        if let Some(d) = &*data {
            return Ok(d.clone());
        }
        match load(spare.unwrap_or_default()) {
            Ok(v) => {
                // Arc<Vec> rather than Arc<[u8]>: converting would copy the whole frame.
                let v = Arc::new(v);
                *data = Some(v.clone());
                Ok(v)
            }
            Err(e) => {
                drop(data);
                self.forget(key, slot);
                Err(e)
            }
        }
    }

    /// Drops `key` if it still maps to `slot` (a failed load must not stay cached empty).
    fn forget(&self, key: BlockKey, slot: &Arc<Slot>) {
        let mut lru = self.lru.lock();
        if lru.map.peek(&key).is_some_and(|(s, _)| Arc::ptr_eq(s, slot))
            && let Some((_, size)) = lru.map.pop(&key)
        {
            lru.bytes -= size;
        }
    }
}

/// The share of the limit (1/4: 64 MiB, two upstream frames, of the default 256 MiB)
/// that may hold spare buffers instead of entries. Decoding into a buffer whose pages are
/// already mapped saves a page fault per 4 KiB: measured, faults were a sixth of the CPU
/// of reading an lz4 image, and kept the FUSE threads waiting on the page-table lock.
const SPARE_SHARE: usize = 4;

/// Smaller buffers are not kept: glibc serves them from its heap, already mapped (vmback
/// sets the mmap threshold to 1 MiB at start, see `main`).
const MIN_SPARE: usize = 1 << 20;

/// Whether a spare of `cap` bytes may take an entry of `size`: large enough, and at most
/// twice as large, since the entry is charged for all of it.
fn fits(cap: usize, size: usize) -> bool {
    cap >= size && cap <= 2 * size
}

/// The bytes of an evicted entry, if it was filled and nobody else holds them.
fn unshared(old: Arc<Slot>) -> Option<Vec<u8>> {
    let data = Arc::try_unwrap(old).ok()?.data.into_inner()?;
    Arc::try_unwrap(data).ok()
}

/// The prefetch thread: runs queued decodes until the cache is dropped. One thread: on
/// two cores, one decoding ahead while the FUSE threads serve the frame before it is
/// what overlaps; more would compete with the serving itself.
fn spawn_worker() -> Sender<Job> {
    let (tx, rx) = channel::<Job>();
    let spawned = std::thread::Builder::new().name("vmback-prefetch".into()).spawn(move || {
        for job in rx {
            job();
        }
    });
    if let Err(e) = spawned {
        // The queue's receiver is gone with the closure: every prefetch is then refused
        // at `send` and readers decode for themselves, as without prefetching.
        tracing::warn!("no prefetch thread ({e}); lz4 frames are decoded only when read");
    }
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn key(frame: u64) -> BlockKey {
        BlockKey { file: 0, frame }
    }

    #[test]
    fn evicts_by_bytes_in_lru_order() {
        // 300 bytes for entries: a quarter of the limit is the spares' share.
        let c = ReadCache::new(400);
        for f in 0..3 {
            c.get_or_load::<()>(key(f), 100, |_| Ok(vec![f as u8; 100])).unwrap();
        }
        c.get_or_load::<()>(key(0), 100, |_| panic!("cached")).unwrap();
        c.get_or_load::<()>(key(3), 100, |_| Ok(vec![3; 100])).unwrap();
        // 1 was least recently used and went; 0 stayed.
        let loads = AtomicUsize::new(0);
        let count = |_| {
            loads.fetch_add(1, Ordering::Relaxed);
            Ok::<_, ()>(vec![0; 100])
        };
        c.get_or_load(key(0), 100, count).unwrap();
        assert_eq!(loads.load(Ordering::Relaxed), 0);
        c.get_or_load(key(1), 100, count).unwrap();
        assert_eq!(loads.load(Ordering::Relaxed), 1);
        assert!(c.usage().1 <= 400);
    }

    #[test]
    fn failed_loads_are_not_cached() {
        let c = ReadCache::new(1000);
        assert!(c.get_or_load(key(1), 10, |_| Err("boom")).is_err());
        assert_eq!(c.usage(), (0, 0));
        assert_eq!(&*c.get_or_load::<()>(key(1), 10, |_| Ok(vec![7; 10])).unwrap(), &[7; 10]);
    }

    #[test]
    fn concurrent_readers_decode_once() {
        let c = ReadCache::new(1 << 20);
        let loads = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let v = c
                        .get_or_load::<()>(key(9), 4096, |_| {
                            loads.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(std::time::Duration::from_millis(20));
                            Ok(vec![1; 4096])
                        })
                        .unwrap();
                    assert_eq!(v.len(), 4096);
                });
            }
        });
        assert_eq!(loads.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_newest_entry_stays_even_when_larger_than_the_limit() {
        let c = ReadCache::new(10);
        assert_eq!(c.get_or_load::<()>(key(1), 100, |_| Ok(vec![1; 100])).unwrap().len(), 100);
        assert_eq!(c.usage(), (1, 100));
        c.get_or_load::<()>(key(1), 100, |_| panic!("cached")).unwrap();
        c.get_or_load::<()>(key(2), 100, |_| Ok(vec![2; 100])).unwrap();
        assert_eq!(c.usage(), (1, 100));
    }

    #[test]
    fn evicted_buffers_are_decoded_into_again() {
        const M: usize = 1 << 20;
        // 12 MiB for entries, 4 MiB for spares.
        let c = ReadCache::new(16 * M);
        let first = c.get_or_load::<()>(key(1), 4 * M, |_| Ok(vec![1; 4 * M])).unwrap();
        let at = first.as_ptr();
        drop(first);
        for k in 2..=3 {
            c.get_or_load::<()>(key(k), 4 * M, |_| Ok(vec![k as u8; 4 * M])).unwrap();
        }
        // Key 1 is evicted for key 4, and nobody holds its bytes: they are kept, and key
        // 4 is decoded into them.
        let got = c
            .get_or_load::<()>(key(4), 3 * M, |buf| {
                assert_eq!((buf.as_ptr(), buf.capacity()), (at, 4 * M), "not the evicted buffer");
                Ok(buf)
            })
            .unwrap();
        assert!(got.iter().all(|&b| b == 1), "the loader decides what to write over it");
        // ... and charged for all 4 MiB of it.
        assert_eq!(c.usage(), (3, 12 * M));
        // A buffer a reader still holds (key 4's, in `got`) is not kept.
        c.get_or_load::<()>(key(5), 4 * M, |_| Ok(vec![5; 4 * M])).unwrap();
        c.get_or_load::<()>(key(6), 4 * M, |_| Ok(vec![6; 4 * M])).unwrap();
        c.get_or_load::<()>(key(7), 4 * M, |buf| {
            assert!(buf.is_empty(), "key 4's bytes are still read");
            Ok(vec![7; 4 * M])
        })
        .unwrap();
        drop(got);
        // Nor is one more than twice as large as the new entry handed out.
        c.get_or_load::<()>(key(8), 4 * M, |_| Ok(vec![8; 4 * M])).unwrap();
        c.get_or_load::<()>(key(9), M, |buf| {
            assert!(buf.is_empty(), "a 4 MiB buffer for 1 MiB");
            Ok(vec![9; M])
        })
        .unwrap();
        let (_, bytes) = c.usage();
        assert!(bytes <= 16 * M, "{bytes}");
    }

    /// Waits until `key` is cached with bytes (a prefetch finished).
    fn wait_cached(c: &Arc<ReadCache>, k: BlockKey) -> Arc<Vec<u8>> {
        for _ in 0..500 {
            let slot = c.lru.lock().map.peek(&k).map(|(s, _)| s.clone());
            if let Some(d) = slot.and_then(|s| s.data.lock().clone()) {
                return d;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{k:?} was not prefetched");
    }

    #[test]
    fn prefetched_frames_are_hits_and_failures_are_forgotten() {
        let c = Arc::new(ReadCache::new(1000));
        c.prefetch::<()>(key(1), 100, |_| Ok(vec![1; 100]));
        assert_eq!(&wait_cached(&c, key(1))[..], &[1; 100]);
        assert_eq!(c.stats.prefetched.load(Ordering::Relaxed), 1);
        c.get_or_load::<()>(key(1), 100, |_| panic!("prefetched")).unwrap();
        assert_eq!((c.stats.hits.load(Ordering::Relaxed), c.stats.misses.load(Ordering::Relaxed)), (1, 0));
        // Cached already: nothing is queued.
        c.prefetch::<()>(key(1), 100, |_| panic!("cached"));
        // A frame larger than half the cache would push out the one being read.
        c.prefetch::<()>(key(2), 600, |_| panic!("too large"));
        // A failed prefetch leaves no entry behind; the reader decodes and sees the error.
        c.prefetch(key(3), 100, |_| Err("boom"));
        c.prefetch::<()>(key(4), 100, |_| Ok(vec![4; 100]));
        wait_cached(&c, key(4));
        assert!(!c.lru.lock().map.contains(&key(3)), "failed prefetch stayed");
        assert!(c.get_or_load(key(3), 100, |_| Err("again")).is_err());

        // With the thread busy and the queue full, a prefetch is refused before it makes
        // an entry (which could evict another).
        let (go, wait) = std::sync::mpsc::channel::<()>();
        // Counted before job 10 is queued: the thread counts it when it starts it, which
        // may be before or after any later point of this test.
        let prefetched = c.stats.prefetched.load(Ordering::Relaxed);
        c.prefetch::<()>(key(10), 10, move |_| {
            wait.recv().ok();
            Ok(vec![0; 10])
        });
        for k in 11..=13 {
            c.prefetch::<()>(key(k), 10, |_| Ok(vec![0; 10]));
        }
        assert!(!c.lru.lock().map.contains(&key(13)), "a refused prefetch made an entry");
        // A reader that gets to a queued frame first decodes it, and counts a miss; the
        // job then finds it done and decodes nothing.
        let misses = c.stats.misses.load(Ordering::Relaxed);
        let queued = if c.lru.lock().map.contains(&key(12)) { key(12) } else { key(11) };
        c.get_or_load::<()>(queued, 10, |_| Ok(vec![9; 10])).unwrap();
        assert_eq!(c.stats.misses.load(Ordering::Relaxed), misses + 1);
        go.send(()).unwrap();
        wait_cached(&c, key(10));
        c.prefetch::<()>(key(20), 10, |_| Ok(vec![0; 10]));
        wait_cached(&c, key(20));
        assert_eq!(&c.get_or_load::<()>(queued, 10, |_| panic!("decoded")).unwrap()[..], &[9; 10]);
        // Jobs 10 and 20 decoded, and 11 too when the reader took 12; the reader's never.
        let eleven = u64::from(queued == key(12));
        assert_eq!(c.stats.prefetched.load(Ordering::Relaxed), prefetched + 2 + eleven);
    }
}
