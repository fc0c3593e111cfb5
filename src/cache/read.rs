//! The shared, byte-bounded LRU of decoded lz4 frames. See the module note in `cache`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
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
    map: LruCache<BlockKey, (Arc<Slot>, usize)>,
    bytes: usize,
}

/// Counters shown in the mount's `.stats` file.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
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
    ahead: OnceLock<SyncSender<Job>>,
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
            lru: Mutex::new(Lru { map: LruCache::unbounded(), bytes: 0 }),
            limit,
            stats: CacheStats::default(),
            ahead: OnceLock::new(),
        }
    }

    /// The most bytes it holds (see [`ReadCache::new`]).
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn usage(&self) -> (usize, usize) {
        let lru = self.lru.lock();
        (lru.map.len(), lru.bytes)
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
            if let Some((slot, _)) = lru.map.get(&key) {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                (slot.clone(), None)
            } else {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                self.insert(&mut lru, key, size)
            }
        };
        self.fill(key, &slot, spare, load)
    }

    /// Decodes `key` with `load` on the prefetch thread, unless it is cached (or being
    /// decoded) already, the thread has enough queued, or the frame would take more than
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
        let (slot, spare) = {
            let mut lru = self.lru.lock();
            if lru.map.contains(&key) {
                return;
            }
            self.insert(&mut lru, key, size)
        };
        let cache = self.clone();
        let job_slot = slot.clone();
        let job: Job = Box::new(move || {
            // Errors are dropped: `fill` forgets the entry and the reader meets them.
            let _ = cache.fill(key, &job_slot, spare, |buf| {
                cache.stats.prefetched.fetch_add(1, Ordering::Relaxed);
                load(buf)
            });
        });
        match self.ahead.get_or_init(spawn_worker).try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.forget(key, &slot),
        }
    }

    /// Adds an empty entry for `key` as the newest, evicting the oldest past the limit.
    /// Returns it with the buffer of an evicted entry that fits `size` and that no reader
    /// holds any more, if there is one.
    fn insert(&self, lru: &mut Lru, key: BlockKey, size: usize) -> (Arc<Slot>, Option<Vec<u8>>) {
        let slot = Arc::new(Slot::default());
        lru.map.put(key, (slot.clone(), size));
        lru.bytes += size;
        let mut spare = None;
        // The newest entry always stays, even when it alone exceeds the limit: a cache
        // smaller than one lz4 frame would otherwise decode the whole frame again for
        // every request inside it.
        while lru.bytes > self.limit && lru.map.len() > 1 {
            let Some((_, (old, evicted))) = lru.map.pop_lru() else { break };
            lru.bytes -= evicted;
            if spare.is_none() {
                spare = reusable(old, size);
            }
        }
        (slot, spare)
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

/// The bytes of an evicted entry, to decode the next one into, if nobody else holds them
/// and their capacity is `size` or at most an eighth more (the cache counts an entry by
/// its size: a much larger buffer kept under a small entry would pass the limit unseen).
fn reusable(old: Arc<Slot>, size: usize) -> Option<Vec<u8>> {
    let data = Arc::try_unwrap(old).ok()?.data.into_inner()?;
    let buf = Arc::try_unwrap(data).ok()?;
    (buf.capacity() >= size && buf.capacity() - size <= size / 8).then_some(buf)
}

/// The prefetch thread: runs queued decodes until the cache is dropped. One thread: on
/// two cores, one decoding ahead while the FUSE threads serve the frame before it is
/// what overlaps; more would compete with the serving itself.
fn spawn_worker() -> SyncSender<Job> {
    let (tx, rx) = sync_channel::<Job>(QUEUE);
    let spawned = std::thread::Builder::new().name("vmback-prefetch".into()).spawn(move || {
        for job in rx {
            job();
        }
    });
    if let Err(e) = spawned {
        // The queue's receiver is gone with the closure: every prefetch is then refused
        // at `try_send` and readers decode for themselves, as without prefetching.
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
        let c = ReadCache::new(300);
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
        assert!(c.usage().1 <= 300);
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
    fn an_evicted_buffer_is_decoded_into_again() {
        let c = ReadCache::new(200);
        let first = c.get_or_load::<()>(key(1), 100, |_| Ok(vec![1; 100])).unwrap();
        let at = first.as_ptr();
        drop(first);
        c.get_or_load::<()>(key(2), 100, |_| Ok(vec![2; 100])).unwrap();
        // key 1 is evicted for key 3, and nobody holds its bytes: key 3 gets them.
        let got = c
            .get_or_load::<()>(key(3), 100, |buf| {
                assert_eq!((buf.as_ptr(), buf.len()), (at, 100), "not the evicted buffer");
                Ok(buf)
            })
            .unwrap();
        assert_eq!(&got[..], &[1; 100], "the loader decides what to write over it");
        // A buffer a reader still holds (key 3's, in `got`), or one much larger than the
        // new entry, is not handed out.
        c.get_or_load::<()>(key(4), 100, |_| Ok(vec![4; 100])).unwrap();
        c.get_or_load::<()>(key(5), 100, |buf| {
            assert!(buf.is_empty(), "key 3's bytes are still held");
            Ok(vec![5; 100])
        })
        .unwrap();
        c.get_or_load::<()>(key(6), 10, |buf| {
            assert!(buf.is_empty(), "a 100-byte buffer is too large for 10 bytes");
            Ok(vec![6; 10])
        })
        .unwrap();
        drop(got);
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
    }
}
