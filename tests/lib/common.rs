//! Helpers of the library-level tests.

#[path = "../common/rng.rs"]
pub mod rng;
