//! Helpers of the real-stack tests.

#[path = "../../common/cli.rs"]
pub mod cli;
pub mod compare;
pub mod corpus;
#[path = "../../common/quick_mount.rs"]
pub mod quick_mount;
