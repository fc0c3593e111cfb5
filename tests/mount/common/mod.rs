//! Helpers of the mount tests.

#[path = "../../common/cli.rs"]
pub mod cli;
pub mod files;
pub mod fuse;
pub mod logged_mount;
#[path = "../../common/quick_mount.rs"]
pub mod quick_mount;
pub mod ready;
#[path = "../../common/rng.rs"]
pub mod rng;
pub mod sample;
