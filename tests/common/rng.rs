//! splitmix64: deterministic test data and random offsets without a dependency.
//!
//! Shared by the `lib` and `mount` test binaries (`tests/common/` holds what more than one
//! binary uses; each binary's `common` module includes it by `#[path]`). Tests add the
//! byte-filling methods they need in their own `impl Rng` blocks.

pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `[0, n)`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}
