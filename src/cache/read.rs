//! The shared, byte-bounded LRU of decoded lz4 frames. See the module note in `cache`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
}

impl CacheStats {
    pub fn render(&self, cache: &ReadCache) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (entries, bytes) = cache.usage();
        format!(
            "hits {}\nmisses {}\nbytes_read {}\nbytes_decoded {}\ncache_entries {entries}\ncache_bytes {bytes}\ncache_limit {}\n",
            get(&self.hits),
            get(&self.misses),
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
}

impl ReadCache {
    /// A cache holding at most `limit` bytes of decoded data, or its newest entry when
    /// that alone is larger.
    pub fn new(limit: usize) -> ReadCache {
        ReadCache {
            lru: Mutex::new(Lru { map: LruCache::unbounded(), bytes: 0 }),
            limit,
            stats: CacheStats::default(),
        }
    }

    fn usage(&self) -> (usize, usize) {
        let lru = self.lru.lock();
        (lru.map.len(), lru.bytes)
    }

    /// Returns the cached bytes for `key`, or runs `load` (outside the LRU lock) and caches
    /// its result. `size` is the decoded size, known from the index before decoding.
    pub fn get_or_load<E>(
        &self,
        key: BlockKey,
        size: usize,
        load: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Arc<Vec<u8>>, E> {
        let slot = {
            let mut lru = self.lru.lock();
            if let Some((slot, _)) = lru.map.get(&key) {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                slot.clone()
            } else {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                let slot = Arc::new(Slot::default());
                lru.map.put(key, (slot.clone(), size));
                lru.bytes += size;
                // The newest entry always stays, even when it alone exceeds the limit: a
                // cache smaller than one lz4 frame would otherwise decode the whole frame
                // again for every request inside it.
                while lru.bytes > self.limit && lru.map.len() > 1 {
                    match lru.map.pop_lru() {
                        Some((_, (_, evicted))) => lru.bytes -= evicted,
                        None => break,
                    }
                }
                slot
            }
        };
        let mut data = slot.data.lock();
        if let Some(d) = &*data {
            return Ok(d.clone());
        }
        match load() {
            Ok(v) => {
                // Arc<Vec> rather than Arc<[u8]>: converting would copy the whole frame.
                let v = Arc::new(v);
                *data = Some(v.clone());
                Ok(v)
            }
            Err(e) => {
                drop(data);
                self.forget(key, &slot);
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
            c.get_or_load::<()>(key(f), 100, || Ok(vec![f as u8; 100])).unwrap();
        }
        c.get_or_load::<()>(key(0), 100, || panic!("cached")).unwrap();
        c.get_or_load::<()>(key(3), 100, || Ok(vec![3; 100])).unwrap();
        // 1 was least recently used and went; 0 stayed.
        let loads = AtomicUsize::new(0);
        let count = || {
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
        assert!(c.get_or_load(key(1), 10, || Err("boom")).is_err());
        assert_eq!(c.usage(), (0, 0));
        assert_eq!(&*c.get_or_load::<()>(key(1), 10, || Ok(vec![7; 10])).unwrap(), &[7; 10]);
    }

    #[test]
    fn concurrent_readers_decode_once() {
        let c = ReadCache::new(1 << 20);
        let loads = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let v = c
                        .get_or_load::<()>(key(9), 4096, || {
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
        assert_eq!(c.get_or_load::<()>(key(1), 100, || Ok(vec![1; 100])).unwrap().len(), 100);
        assert_eq!(c.usage(), (1, 100));
        c.get_or_load::<()>(key(1), 100, || panic!("cached")).unwrap();
        c.get_or_load::<()>(key(2), 100, || Ok(vec![2; 100])).unwrap();
        assert_eq!(c.usage(), (1, 100));
    }
}
