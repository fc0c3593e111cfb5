//! Hostile backup sets (issue 7, part 2): names that try to escape or garble the mount,
//! absurd sizes, frames that lie about where they are, huge frame counts, deeply nested
//! JSON and symlinks out of SOURCE.
//!
//! Each test builds a SOURCE holding one good set and the hostile one(s), then runs the
//! real `vmback ls --json` and a real FUSE mount. It checks that the hostile set gets a
//! warning naming its file (and the byte offset, for damage inside a stream), that every
//! name in the mount is one harmless path component, that the good set still mounts and
//! reads byte for byte, and that nothing outside SOURCE is read or shown.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vmback::chain::frame::{FrameKind, encode_header};
use vmback::chain::{StreamMeta, StreamWriter};

use crate::common::cli::{assert_success, run_ok, vmback};
use crate::common::files::pread;
use crate::common::mounted::Mounted;
use crate::common::tempdir;

/// Virtual size of the test disks: a few pages, enough for the data and zero frames.
const VSIZE: u64 = 64 << 10;
/// Longest name Linux allows for one path component.
const NAME_MAX: usize = 255;
/// Bound on `vmback ls`'s peak RSS over the 100 000-frame and nested-JSON sets. The index
/// of 100 000 frames is a few MiB; this is generous room for the binary and allocator
/// while catching a size taken from a length field or per-frame bloat.
const MAX_LS_RSS_KIB: u64 = 128 << 10;

/// The bytes of the good set's disk: a pattern no hostile set contains.
fn good_image() -> Vec<u8> {
    let mut image = vec![0u8; VSIZE as usize];
    for (i, b) in image[4096..12288].iter_mut().enumerate() {
        *b = (i % 241) as u8 + 1;
    }
    image
}

fn meta(disk: &str, virtual_size: u64, data_size: u64, compressed: bool) -> StreamMeta {
    StreamMeta::full(disk, virtual_size, data_size).lz4(compressed).dated("2026-06-30T08:21:01.123456")
}

/// A full stream of a `VSIZE` disk holding `image[4096..12288]` as data, zeros elsewhere.
fn full_stream(disk: &str, image: &[u8], compressed: bool) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), &meta(disk, VSIZE, 8192, compressed), 4096).expect("in memory");
    w.zero(0, 4096).expect("in memory");
    w.data(4096, &image[4096..12288]).expect("in memory");
    w.zero(12288, VSIZE - 12288).expect("in memory");
    w.finish().expect("in memory")
}

/// A set folder: `files` as (name, bytes).
fn write_set(dir: &Path, files: &[(&str, &[u8])]) {
    std::fs::create_dir_all(dir).expect("set folder");
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("set file");
    }
}

fn vmconfig(name: &str) -> Vec<u8> {
    format!("<domain type='kvm'>\n  <name>{name}</name>\n</domain>\n").into_bytes()
}

/// The good set, `good-vm`, in `SOURCE/good`.
fn write_good(source: &Path) {
    let stream = full_stream("sda", &good_image(), true);
    write_set(
        &source.join("good"),
        &[("sda.full.data", &stream), ("vmconfig.virtnbdbackup.0.xml", &vmconfig("good-vm"))],
    );
}

/// A set whose domain comes from its `.cpt` file name, with one data file.
fn write_named_set(source: &Path, folder: &str, domain: &str, data: &[u8]) -> PathBuf {
    let dir = source.join(folder);
    write_set(&dir, &[(&format!("{domain}.cpt"), br#"["virtnbdbackup.0"]"#), ("sda.full.data", data)]);
    dir.join("sda.full.data")
}

/// `vmback ls --json SOURCE`, which must succeed: the hostile sets are warnings, not
/// failures of the whole catalog.
fn ls(source: &Path) -> Value {
    let args = ["ls", "--json", source.to_str().expect("UTF-8 path")];
    let out = vmback(&args);
    assert_success("vmback", &args, &out);
    serde_json::from_slice(&out.stdout).expect("ls --json prints JSON")
}

fn warnings(ls: &Value) -> Vec<String> {
    ls["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .map(|w| w.as_str().expect("text").to_owned())
        .collect()
}

fn domain<'a>(ls: &'a Value, name: &str) -> Option<&'a Value> {
    ls["domains"].as_array().expect("domains").iter().find(|d| d["name"] == name)
}

/// Fails unless some warning names `file` and, when given, `offset N`.
#[track_caller]
fn assert_warned(ls: &Value, file: &Path, offset: Option<u64>, what: &str) {
    let file = file.to_str().expect("UTF-8 path");
    let hit = warnings(ls).into_iter().find(|w| {
        w.contains(file) && offset.is_none_or(|o| w.contains(&format!("offset {o}"))) && w.contains(what)
    });
    assert!(hit.is_some(), "no warning names {file} at {offset:?} with {what:?}: {:#?}", warnings(ls));
}

/// The status of the only point of domain `name` (`complete`, `damaged`, `broken`).
fn status_of(ls: &Value, name: &str) -> String {
    let d = domain(ls, name).unwrap_or_else(|| panic!("no domain {name:?} in {ls:#}"));
    d["points"][0]["status"].as_str().expect("status").to_owned()
}

/// Mounts SOURCE, checks the good set reads byte for byte, and that every name in the
/// mount is one harmless component. Returns the mount for more checks, and the temp dir
/// that holds its mountpoint.
fn mount_and_check_good(source: &Path) -> (Mounted, tempfile::TempDir) {
    let dir = tempdir();
    let m = Mounted::start(source, &dir.path().join("mnt"), &[]);
    let image = std::fs::read(m.mnt.join("good-vm/virtnbdbackup.0/sda.raw")).expect("read good image");
    assert!(image == good_image(), "the good set reads wrong beside a hostile one");
    for entry in walkdir::WalkDir::new(&m.mnt).follow_links(false) {
        let entry = entry.expect("walk the mount");
        let name = entry.file_name().to_str().expect("mount names are UTF-8");
        assert!(
            name.len() <= NAME_MAX && !name.chars().any(char::is_control) && name != "..",
            "unsafe name in the mount: {name:?}"
        );
    }
    (m, dir)
}

/// The first offset where reading `file` through the mount fails with EIO, reading 4 KiB
/// at a time; `None` when it reads to the end.
fn first_eio(file: &Path) -> Option<u64> {
    let f = File::open(file).expect("open image");
    let len = f.metadata().expect("stat image").len();
    (0..len).step_by(4096).find(|&off| match pread(&f, off, 4096) {
        Ok(_) => false,
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{}: {e}", file.display());
            true
        }
    })
}

/// Runs `vmback ls --json SOURCE` under `/usr/bin/time` and returns its peak RSS in KiB.
fn ls_peak_rss_kib(source: &Path, what: &str) -> u64 {
    let report = tempfile::NamedTempFile::new().expect("temp file");
    let vmback_bin = env!("CARGO_BIN_EXE_vmback");
    let (report_path, source) = (report.path().to_str().expect("UTF-8"), source.to_str().expect("UTF-8"));
    run_ok("/usr/bin/time", &["-f", "%M", "-o", report_path, vmback_bin, "ls", "--json", source]);
    let text = std::fs::read_to_string(report.path()).expect("time's report");
    let kib = text.trim().parse().unwrap_or_else(|_| panic!("time printed {text:?}"));
    eprintln!("vmback ls on {what}: peak RSS {kib} KiB");
    kib
}

// ---------------------------------------------------------------------------------------
// Names

/// Domain and disk names that try to climb out, split paths, hide or flood: in the domain
/// XML `<name>` and in the stream metadata's `diskName`.
#[test]
fn hostile_names_in_vmconfig_and_metadata_stay_one_safe_component() {
    let source = tempfile::tempdir().expect("source");
    write_good(source.path());
    let long = "x".repeat(4000);
    let names = ["../../escape", "a/b", "nul\0name", "new\nline", long.as_str()];
    for (i, name) in names.iter().enumerate() {
        let stream = full_stream(name, &good_image(), false);
        let dir = source.path().join(format!("set{i}"));
        write_set(&dir, &[("sda.full.data", &stream), ("vmconfig.virtnbdbackup.0.xml", &vmconfig(name))]);
    }
    let listed = ls(source.path());
    let domains: Vec<&str> = listed["domains"]
        .as_array()
        .expect("domains")
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect();
    assert_eq!(domains.len(), names.len() + 1, "{domains:?}");
    for d in &domains {
        assert!(d.len() <= NAME_MAX && !d.contains('/') && !d.chars().any(char::is_control) && *d != "..");
    }
    let (m, _dir) = mount_and_check_good(source.path());
    for d in domains {
        let image = std::fs::read(m.mnt.join(d).join("virtnbdbackup.0/sda.raw")).expect("read image");
        assert!(image == good_image(), "{d}: image reads wrong");
    }
}

/// Boot files whose paths in `<os>` climb out, end in `..`, or end in the name of another
/// file of the point's folder: only plain names show, each beside `vmconfig.xml` with
/// the bytes of its file in the set, and no name takes the place of the image or the XML.
#[test]
fn hostile_boot_file_names_stay_in_their_folder() {
    let source = tempfile::tempdir().expect("source");
    write_good(source.path());
    let xml = "<domain type='kvm'><name>boot-vm</name><os>\
               <loader>/usr/share/../../x/vmconfig.xml</loader><nvram>../../vm_VARS.fd</nvram>\
               <kernel>/boot/sda.raw</kernel><initrd>/boot/..</initrd></os></domain>";
    let stream = full_stream("sda", &good_image(), false);
    write_set(
        &source.path().join("boot"),
        &[
            ("sda.full.data", &stream),
            ("vmconfig.virtnbdbackup.0.xml", xml.as_bytes()),
            ("vm_VARS.fd.virtnbdbackup.0", b"vars"),
            ("vmconfig.xml.virtnbdbackup.0", b"not the config"),
            ("sda.raw.virtnbdbackup.0", b"not the image"),
        ],
    );
    let (m, _dir) = mount_and_check_good(source.path());
    let point = m.mnt.join("boot-vm/virtnbdbackup.0");
    let mut names: Vec<String> = std::fs::read_dir(&point)
        .expect("point folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["info.json", "sda.raw", "vm_VARS.fd", "vmconfig.xml"]);
    assert_eq!(std::fs::read(point.join("vm_VARS.fd")).expect("nvram"), b"vars");
    assert_eq!(std::fs::read(point.join("vmconfig.xml")).expect("xml"), xml.as_bytes());
    assert!(
        std::fs::read(point.join("sda.raw")).expect("image") == good_image(),
        "the image, not a boot file"
    );
    let info: Value =
        serde_json::from_slice(&std::fs::read(point.join("info.json")).expect("info")).expect("json");
    let nvram = info["boot_files"].as_array().expect("boot_files").iter().find(|b| b["element"] == "nvram");
    assert_eq!(nvram.expect("nvram in info.json")["file"], "vm_VARS.fd.virtnbdbackup.0", "{info}");
}

/// Domain names taken from the `.cpt` file name (no vmconfig), and a data file whose disk
/// part holds a newline.
#[test]
fn hostile_names_in_file_names() {
    let source = tempfile::tempdir().expect("source");
    write_good(source.path());
    let stream = full_stream("sda", &good_image(), false);
    let long = "y".repeat(250);
    for (folder, domain) in [("dots", ".."), ("newline", "new\nline"), ("long", long.as_str())] {
        write_named_set(source.path(), folder, domain, &stream);
    }
    let odd = source.path().join("odd-disk");
    write_set(&odd, &[("odd.cpt", b"[]"), ("a\nb.full.data", &stream)]);
    let listed = ls(source.path());
    for name in ["_..", "new_line", &"y".repeat(200)] {
        assert_eq!(status_of(&listed, name), "complete", "{listed:#}");
    }
    // Named with the newline escaped: a file name cannot start a line of its own.
    assert_warned(&listed, &odd.join("a\\nb.full.data"), None, "not a data file name");
    let (m, _dir) = mount_and_check_good(source.path());
    let image = std::fs::read(m.mnt.join("_../virtnbdbackup.0/sda.raw")).expect("read image");
    assert!(image == good_image());
}

// ---------------------------------------------------------------------------------------
// Sizes and frames

/// A stream whose meta frame holds `json` verbatim, followed by `body` (frames as bytes).
fn stream_with_meta(json: &str, body: &[u8]) -> Vec<u8> {
    let mut out = encode_header(FrameKind::Meta, 0, json.len() as u64).to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn meta_json(virtual_size: &str) -> String {
    format!(r#"{{"virtualSize": {virtual_size}, "dataSize": 0, "diskName": "sda", "streamVersion": 2}}"#)
}

#[test]
fn absurd_virtual_sizes_are_refused_with_file_and_offset() {
    let source = tempfile::tempdir().expect("source");
    write_good(source.path());
    let stop = encode_header(FrameKind::Stop, 0, 0);
    let mut cases = Vec::new();
    for (folder, size, what) in [
        ("huge", "9223372036854775808", "virtualSize"),
        ("max", "18446744073709551615", "virtualSize"),
        ("negative", "-1", "virtualSize"),
    ] {
        let path = write_named_set(source.path(), folder, folder, &stream_with_meta(&meta_json(size), &stop));
        cases.push((folder, path, what));
    }
    let listed = ls(source.path());
    for (folder, path, what) in cases {
        // The metadata JSON starts after the 40-byte header.
        assert_warned(&listed, &path, Some(40), "bad metadata");
        assert!(
            warnings(&listed).iter().any(|w| w.contains(&path.display().to_string()) && w.contains(what))
        );
        assert_eq!(status_of(&listed, folder), "broken");
    }
    mount_and_check_good(source.path());
}

/// Frames that overlap, run past the virtual size or past the end of the file, and a
/// trailer that points outside the file. Each is damage at a named offset: what comes
/// before it reads, what comes after fails with EIO.
#[test]
fn lying_frames_are_damage_at_a_named_offset() {
    let source = tempfile::tempdir().expect("source");
    write_good(source.path());
    let image = good_image();
    let head = |kind, start, len| encode_header(kind, start, len).to_vec();
    let data = |start: u64, len: u64| {
        let mut f = head(FrameKind::Data, start, len);
        f.extend_from_slice(&image[start as usize..(start + len) as usize]);
        f.extend_from_slice(b"\r\n");
        f
    };
    let meta_len = |m: &StreamMeta| 40 + m.to_json().len() as u64 + 2;
    let plain = meta("sda", VSIZE, 8192, false);
    let body_at = meta_len(&plain);
    let stop = head(FrameKind::Stop, 0, 0);
    let build = |frames: &[Vec<u8>]| {
        let mut out = stream_with_meta(&plain.to_json(), &frames.concat());
        out.extend_from_slice(&stop);
        out
    };
    // Data 4096+4096, then a frame starting inside it.
    let first = data(4096, 4096);
    let second_at = body_at + first.len() as u64;
    let overlap = build(&[first.clone(), data(6144, 4096)]);
    // A frame running from 8192 past the virtual size.
    let past_vsize = build(&[first.clone(), head(FrameKind::Zero, 8192, VSIZE)]);
    // A data frame whose length runs past the end of the file.
    let mut past_eof = stream_with_meta(&plain.to_json(), &first);
    past_eof.extend_from_slice(&head(FrameKind::Data, 8192, 4096));
    past_eof.extend_from_slice(&image[8192..9000]);
    // A compressed stream whose trailer length points before the start of the file.
    let mut bad_trailer = full_stream("sda", &image, true);
    let comp_at = bad_trailer.len() - 40;
    bad_trailer.truncate(comp_at);
    bad_trailer.extend_from_slice(&encode_header(FrameKind::Comp, 0, 1 << 20));

    let set = |folder, bytes: &[u8]| write_named_set(source.path(), folder, folder, bytes);
    let cases = [
        (set("overlap", &overlap), second_at, "overlaps", Some(8192)),
        (set("past-vsize", &past_vsize), second_at, "past the virtual size", Some(8192)),
        (set("past-eof", &past_eof), past_eof.len() as u64, "ends early", Some(8192)),
        (set("bad-trailer", &bad_trailer), comp_at as u64 + 22, "trailer length", None),
    ];
    let listed = ls(source.path());
    let (m, _dir) = mount_and_check_good(source.path());
    for (path, offset, what, eio_from) in cases {
        assert_warned(&listed, &path, Some(offset), what);
        let folder = path.parent().and_then(Path::file_name).and_then(|n| n.to_str()).expect("folder");
        assert_eq!(status_of(&listed, folder), "damaged", "{folder}");
        let served = m.mnt.join(folder).join("virtnbdbackup.0/sda.raw");
        // Reads fail from the broken frame on (the page holding it), and only there.
        assert_eq!(first_eio(&served), eio_from.map(|o| o / 4096 * 4096), "{folder}");
        let f = File::open(&served).expect("open image");
        assert_eq!(pread(&f, 0, 8192).expect("read before the damage"), image[..8192]);
    }
}

// ---------------------------------------------------------------------------------------
// Volume: many frames, deep JSON

/// 100 000 one-byte data frames: indexed and served correctly, in bounded memory.
#[test]
fn a_hundred_thousand_tiny_frames() {
    /// Frames in the stream: the issue's figure.
    const FRAMES: u64 = 100_000;
    let source = tempfile::tempdir().expect("source");
    write_good(source.path());
    // One byte at every other offset: frames do not merge and each needs its own piece.
    let vsize = 2 * FRAMES;
    let mut w = StreamWriter::new(Vec::new(), &meta("sda", vsize, FRAMES, false), 4096).expect("in memory");
    let mut expected = vec![0u8; vsize as usize];
    for i in 0..FRAMES {
        let b = (i % 255) as u8 + 1;
        w.data(2 * i, &[b]).expect("in memory");
        expected[2 * i as usize] = b;
    }
    write_named_set(source.path(), "tiny", "tiny", &w.finish().expect("in memory"));
    let listed = ls(source.path());
    assert_eq!(status_of(&listed, "tiny"), "complete");
    assert!(ls_peak_rss_kib(source.path(), "100 000 frames") < MAX_LS_RSS_KIB);
    let (m, _dir) = mount_and_check_good(source.path());
    let image = std::fs::read(m.mnt.join("tiny/virtnbdbackup.0/sda.raw")).expect("read image");
    assert!(image == expected, "the 100 000-frame image reads wrong");
}

/// Metadata and a trailer nested 100 000 levels deep: refused (metadata) or walked around
/// (trailer), in bounded memory, naming the file and offset.
#[test]
fn deeply_nested_json() {
    /// Nesting depth: far past any parser's recursion limit, still under the 1 MiB bound
    /// on metadata.
    const DEPTH: usize = 100_000;
    let source = tempfile::tempdir().expect("source");
    write_good(source.path());
    let nested = format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH));
    let json = format!(
        r#"{{"virtualSize": 4096, "dataSize": 0, "diskName": "sda", "streamVersion": 2, "x": {nested}}}"#
    );
    let deep_meta = write_named_set(
        source.path(),
        "deep-meta",
        "deep-meta",
        &stream_with_meta(&json, &encode_header(FrameKind::Stop, 0, 0)),
    );
    // A compressed stream whose trailer is the nested list.
    let mut deep_trailer = full_stream("sda", &good_image(), true);
    let comp = deep_trailer.len() - 40;
    let trailer_len: usize = std::str::from_utf8(&deep_trailer[comp + 22..comp + 38])
        .ok()
        .and_then(|h| usize::from_str_radix(h, 16).ok())
        .expect("comp header");
    let trailer_at = comp - 2 - trailer_len;
    deep_trailer.truncate(trailer_at);
    deep_trailer.extend_from_slice(nested.as_bytes());
    deep_trailer.extend_from_slice(b"\r\n");
    deep_trailer.extend_from_slice(&encode_header(FrameKind::Comp, 0, nested.len() as u64));
    let deep_trailer_path = write_named_set(source.path(), "deep-trailer", "deep-trailer", &deep_trailer);

    let listed = ls(source.path());
    assert_warned(&listed, &deep_meta, Some(40), "bad metadata");
    assert_eq!(status_of(&listed, "deep-meta"), "broken");
    assert_warned(&listed, &deep_trailer_path, Some(trailer_at as u64), "bad compression trailer");
    // Every frame is still found by walking the lz4 frames: damaged, but all readable.
    assert_eq!(status_of(&listed, "deep-trailer"), "damaged");
    assert!(ls_peak_rss_kib(source.path(), "nested JSON") < MAX_LS_RSS_KIB);
    let (m, _dir) = mount_and_check_good(source.path());
    let image = std::fs::read(m.mnt.join("deep-trailer/virtnbdbackup.0/sda.raw")).expect("read image");
    assert!(image == good_image());
}

/// A trailer listing four million lz4 frames in a file with room for none: refused while
/// it is read (it once cost 65 bytes of memory per byte of trailer).
#[test]
fn a_trailer_listing_millions_of_frames() {
    /// Entries in the trailer: 8 MB of `1,`, which as a JSON tree took over 500 MB.
    const ENTRIES: usize = 4 << 20;
    let source = tempfile::tempdir().expect("source");
    write_good(source.path());
    let json =
        r#"{"virtualSize": 4096, "dataSize": 0, "diskName": "sda", "compressed": 2, "streamVersion": 2}"#;
    let mut bytes = stream_with_meta(json, &encode_header(FrameKind::Stop, 0, 0));
    let trailer_at = bytes.len() as u64;
    let trailer = format!("[{}1]", "1,".repeat(ENTRIES));
    bytes.extend_from_slice(trailer.as_bytes());
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(&encode_header(FrameKind::Comp, 0, trailer.len() as u64));
    let path = write_named_set(source.path(), "many", "many", &bytes);
    let listed = ls(source.path());
    assert_warned(&listed, &path, Some(trailer_at), "more lz4 frames than the file has room for");
    assert!(ls_peak_rss_kib(source.path(), "a trailer of 4 million frames") < MAX_LS_RSS_KIB);
    mount_and_check_good(source.path());
}

// ---------------------------------------------------------------------------------------
// Symlinks

/// Symlinks inside SOURCE to a data file, a domain XML and a whole set outside it: never
/// followed, warned about, and nothing of the outside set is shown or served.
#[test]
fn symlinks_out_of_source_are_never_followed() {
    let outside = tempfile::tempdir().expect("outside");
    // The outside set's data: a pattern found nowhere inside SOURCE.
    let mut secret = vec![0u8; VSIZE as usize];
    secret[4096..12288].copy_from_slice(&b"SECRET!!".repeat(1024));
    let secret_stream = full_stream("sda", &secret, false);
    write_set(
        outside.path(),
        &[("sda.full.data", &secret_stream), ("vmconfig.virtnbdbackup.0.xml", &vmconfig("outside-vm"))],
    );
    let source = tempfile::tempdir().expect("source");
    write_good(source.path());
    let linked = source.path().join("linked");
    std::fs::create_dir(&linked).expect("folder");
    std::fs::write(linked.join("linked.cpt"), b"[]").expect("cpt");
    let links = [
        (linked.join("sda.full.data"), outside.path().join("sda.full.data")),
        (linked.join("vmconfig.virtnbdbackup.0.xml"), outside.path().join("vmconfig.virtnbdbackup.0.xml")),
        (source.path().join("whole-set"), outside.path().to_owned()),
    ];
    for (link, target) in &links {
        std::os::unix::fs::symlink(target, link).expect("symlink");
    }
    let listed = ls(source.path());
    for (link, _) in &links[..2] {
        assert_warned(&listed, link, None, "is a symlink; not followed");
    }
    assert!(domain(&listed, "outside-vm").is_none() && domain(&listed, "linked").is_none(), "{listed:#}");
    let (m, _dir) = mount_and_check_good(source.path());
    for entry in walkdir::WalkDir::new(&m.mnt).follow_links(false) {
        let entry = entry.expect("walk the mount");
        assert_ne!(entry.file_name(), "outside-vm");
        if entry.file_type().is_file() && entry.file_name() != ".stats" {
            let bytes = std::fs::read(entry.path()).expect("read a mounted file");
            assert!(
                !bytes.windows(8).any(|w| w == b"SECRET!!"),
                "{} serves outside data",
                entry.path().display()
            );
        }
    }
}
