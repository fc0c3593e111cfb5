//! Caches between the backup files and the images.
//!
//! [`ReadCache`] holds decoded lz4 frames: one byte-bounded LRU shared by every image of
//! a mount. Uncompressed payloads are not copied into it: they are `pread` straight from
//! the stream file, and the kernel's page cache (of the backup file below and, with
//! `FOPEN_KEEP_CACHE`, of the image above) already keeps them; a second copy here would
//! only halve what fits in memory.
//!
//! Lock order: the LRU mutex is held only to look up, insert or evict an entry, never
//! while reading or decoding. Each entry has its own mutex that the first reader holds
//! while it decodes, so eight readers of one cold 32 MiB frame decode it once; the rest
//! wait on that entry, not on the whole cache.
//!
//! Two things keep a sequential read of a compressed image from waiting on decodes: a
//! prefetch thread ([`ReadCache::prefetch`]) that decodes the frames just ahead of the
//! reader while the FUSE threads serve the current one (the reader's entry is made at
//! once, so whoever gets there first decodes it, once; a prefetch the thread has no room
//! for is refused before it makes an entry), and spare buffers: up to a quarter of the
//! limit holds the buffers of evicted frames, and a new frame is decoded into one that
//! fits, so its pages need not be mapped and zeroed again. The limit bounds entries and
//! spares together.

mod read;

pub use read::{BlockKey, CacheStats, ReadCache};
