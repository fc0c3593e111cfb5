//! Library-level tests, no FUSE, no libvirt: reference models of the chain reader and the
//! write overlay, malformed and hostile stream bytes. One test binary (ripgrep's
//! `tests/tests.rs` shape): each file below is a module, so they compile and link once.

mod common;

mod chain_ref;
mod overlay_ref;
mod parse_errors;
mod stream_props;
