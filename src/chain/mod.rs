//! virtnbdbackup's stream format and the chain semantics built on it.
//!
//! A stream file is a `meta` frame (JSON), then `data` and `zero` frames each naming a disk
//! range, a `stop` frame, and, when compressed, a JSON trailer giving the lz4 frame sizes
//! of each data frame (doc/FORMAT.md describes it). A disk at a restore
//! point is the chain of stream files leading to it: a full or copy, then incrementals or
//! one differential, each laid over the ones before.
//!
//! - [`io`]: read helpers over a source's reader, and the scan's error type.
//! - [`frame`]: the 40-byte header; [`meta`]: the metadata and trailer JSON; [`lz4`]: lz4
//!   frame types and framing.
//! - Imports run one way: `reader` -> `scan` -> `lz4` -> `io` -> `source`.
//! - [`scan`]: one pass over a file yields a [`StreamIndex`] (no payload is read).
//! - [`extent`]: the merged [`ExtentMap`] of a chain, looked up by binary search.
//! - [`reader`]: [`ImageReader`], the only place image bytes are rebuilt; `view` makes
//!   it an [`crate::view::ImageView`].
//! - [`writer`]: [`StreamWriter`], byte-compatible with upstream's writer.

pub mod extent;
pub mod frame;
pub mod io;
pub mod lz4;
pub mod meta;
pub mod reader;
pub mod scan;
mod view;
pub mod writer;

pub use extent::ExtentMap;
pub use meta::StreamMeta;
pub use reader::{ImageReader, Layer, ReadError};
pub use scan::{Format, ScanError, StreamIndex};
pub use writer::{MAX_REQUEST, StreamWriter};
