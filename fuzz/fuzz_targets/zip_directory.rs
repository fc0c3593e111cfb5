//! A zip archive's directory (virtnbdbackup's `-o -` sets, read in place): reading never
//! panics, and every member it keeps has a checked name and lies inside the archive.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmback::source::zip::{member_path, read_directory};
use vmback::source::{MemSource, Source};

fuzz_target!(|bytes: &[u8]| {
    let mem = MemSource::new();
    mem.insert("a.zip", bytes.to_vec());
    let file = mem.open(Path::new("a.zip")).expect("a file in memory");
    if let Ok(dir) = read_directory(&*file, Path::new("a.zip")) {
        for m in &dir.members {
            assert!(m.start.checked_add(m.len).is_some_and(|end| end <= bytes.len() as u64), "{m:?}");
            assert!(member_path(m.name.to_str().expect("checked names are UTF-8")).is_some(), "{m:?}");
        }
    }
});
