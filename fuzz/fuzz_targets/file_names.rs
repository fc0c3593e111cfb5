//! Data file names and names shown in the mount: parsing never panics, a parsed name
//! describes its input, and a safe component is always one harmless path component.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmback::catalog::naming::{checkpoint_order, parse_stream_name, safe_component};

/// Longest name `safe_component` may return: its limit plus the `_` prefix.
const MAX_SAFE: usize = 201;

fuzz_target!(|name: &str| {
    if let Some(parsed) = parse_stream_name(name) {
        assert!(!parsed.disk.is_empty() && !parsed.disk.contains('.'), "{parsed:?}");
        assert!(name.starts_with(&format!("{}.", parsed.disk)) && name.ends_with(".data"));
    }
    let safe = safe_component(name);
    assert!(!safe.is_empty() && safe != "." && safe != ".." && safe.len() <= MAX_SAFE, "{safe:?}");
    assert!(!safe.contains('/') && !safe.chars().any(char::is_control), "{safe:?}");
    let _ = checkpoint_order(name);
});
