//! The metadata JSON of a stream (`meta` frame, doc/FORMAT.md §1.4 and §1.5) and the
//! compression trailer (§1.7).
//!
//! Reading is tolerant of every writer generation: stream version 1 and 2, the version
//! under `streamVersion` or `stream-version`, `compressed` as bool or lz4 level, a
//! `parentCheckpoint` of `false`, a missing `diskFormat`. Writing is exact: the key order
//! and the `json.dumps(indent=4)` layout of upstream, with non-ASCII escaped as `\uXXXX`.

use serde_json::{Map, Value};
use thiserror::Error;

/// Upper bound for the metadata JSON. Real documents are ~320 bytes; this only stops a
/// damaged length field from sizing a huge allocation.
pub const MAX_META_LEN: u64 = 1 << 20;

/// Upper bound for the trailer JSON: one entry (at most ~20 bytes, or a list for extents
/// of 32 MiB and more) per data frame. 256 MiB allows ten million frames, far beyond any
/// real disk, while still refusing a length field that points at garbage.
pub const MAX_TRAILER_LEN: u64 = 256 << 20;

/// Largest virtual size accepted: the largest file size Linux can represent (`loff_t` is
/// signed), so the image can be shown as a file at all.
pub const MAX_VIRTUAL_SIZE: u64 = i64::MAX as u64;

/// What a metadata or trailer document got wrong.
#[derive(Debug, Error)]
pub enum MetaError {
    #[error("metadata is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("metadata is not a JSON object")]
    NotAnObject,
    #[error("metadata field {0:?} is missing")]
    Missing(&'static str),
    #[error("metadata field {0:?} has the wrong type")]
    WrongType(&'static str),
    #[error("metadata field {0:?} is {1}, more than a file can hold")]
    TooLarge(&'static str, u64),
    #[error("unsupported stream version {0}")]
    Version(u64),
    #[error("trailer is not a JSON list of frame sizes: {0}")]
    BadTrailer(String),
}

/// The metadata of one stream file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMeta {
    pub virtual_size: u64,
    pub data_size: u64,
    /// `datetime.isoformat()` in the backup host's local time, no zone.
    pub date: String,
    pub disk_name: String,
    pub disk_format: Option<String>,
    pub checkpoint_name: String,
    /// Empty when there is no parent (also for upstream's old `false`).
    pub parent_checkpoint: String,
    pub incremental: bool,
    /// `None` when not compressed; the lz4 level otherwise (old writers' `true` is level 2,
    /// the default of `-z`).
    pub compressed: Option<u32>,
    pub stream_version: u32,
}

impl StreamMeta {
    /// Parses a metadata document.
    pub fn parse(json: &[u8]) -> Result<StreamMeta, MetaError> {
        let value: Value = serde_json::from_slice(json)?;
        let obj = value.as_object().ok_or(MetaError::NotAnObject)?;
        let version = match obj.get("streamVersion").or_else(|| obj.get("stream-version")) {
            Some(v) => v.as_u64().ok_or(MetaError::WrongType("streamVersion"))?,
            None => return Err(MetaError::Missing("streamVersion")),
        };
        if !(1..=2).contains(&version) {
            return Err(MetaError::Version(version));
        }
        let compressed = match obj.get("compressed") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(2),
            Some(Value::Number(n)) => Some(
                n.as_u64().and_then(|l| u32::try_from(l).ok()).ok_or(MetaError::WrongType("compressed"))?,
            ),
            Some(_) => return Err(MetaError::WrongType("compressed")),
        };
        let parent_checkpoint = match obj.get("parentCheckpoint") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(MetaError::WrongType("parentCheckpoint")),
        };
        let virtual_size = req_u64(obj, "virtualSize")?;
        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(MetaError::TooLarge("virtualSize", virtual_size));
        }
        Ok(StreamMeta {
            virtual_size,
            data_size: req_u64(obj, "dataSize")?,
            date: opt_str(obj, "date")?.unwrap_or_default(),
            disk_name: opt_str(obj, "diskName")?.ok_or(MetaError::Missing("diskName"))?,
            disk_format: opt_str(obj, "diskFormat")?,
            checkpoint_name: opt_str(obj, "checkpointName")?.unwrap_or_default(),
            parent_checkpoint,
            incremental: match obj.get("incremental") {
                None => false,
                Some(v) => v.as_bool().ok_or(MetaError::WrongType("incremental"))?,
            },
            // Version 1 streams are never compressed (FORMAT.md §1.5), whatever a stray key says.
            compressed: if version == 2 { compressed } else { None },
            stream_version: version as u32,
        })
    }

    /// Serializes exactly as upstream's `json.dumps(meta, indent=4)`.
    pub fn to_json(&self) -> String {
        let mut obj = Map::new();
        obj.insert("virtualSize".into(), self.virtual_size.into());
        obj.insert("dataSize".into(), self.data_size.into());
        obj.insert("date".into(), self.date.clone().into());
        obj.insert("diskName".into(), self.disk_name.clone().into());
        if let Some(f) = &self.disk_format {
            obj.insert("diskFormat".into(), f.clone().into());
        }
        obj.insert("checkpointName".into(), self.checkpoint_name.clone().into());
        obj.insert("compressed".into(), self.compressed.map_or(Value::Bool(false), |l| l.into()));
        obj.insert("compressionMethod".into(), "lz4".into());
        obj.insert("parentCheckpoint".into(), self.parent_checkpoint.clone().into());
        obj.insert("incremental".into(), self.incremental.into());
        obj.insert("streamVersion".into(), self.stream_version.into());
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        serde::Serialize::serialize(&Value::Object(obj), &mut ser).expect("in-memory JSON");
        ascii_escape(&String::from_utf8(out).expect("serde_json writes UTF-8"))
    }
}

/// Building metadata for writers and tests: start from [`StreamMeta::full`] and change
/// what differs.
impl StreamMeta {
    /// A full backup of `disk` as virtnbdbackup 1.9 writes it: stream version 2, a qcow2
    /// disk, checkpoint `virtnbdbackup.0` with no parent, uncompressed, no date.
    pub fn full(disk: &str, virtual_size: u64, data_size: u64) -> StreamMeta {
        StreamMeta {
            virtual_size,
            data_size,
            date: String::new(),
            disk_name: disk.into(),
            disk_format: Some("qcow2".into()),
            checkpoint_name: "virtnbdbackup.0".into(),
            parent_checkpoint: String::new(),
            incremental: false,
            compressed: None,
            stream_version: 2,
        }
    }

    /// The same stream as the point `checkpoint` after `parent` (`""` for none), an
    /// incremental or differential when `incremental`.
    pub fn point(self, checkpoint: &str, parent: &str, incremental: bool) -> StreamMeta {
        StreamMeta {
            checkpoint_name: checkpoint.into(),
            parent_checkpoint: parent.into(),
            incremental,
            ..self
        }
    }

    /// lz4-compressed when `on`, at level 2: what `virtnbdbackup -z` writes by default.
    pub fn lz4(self, on: bool) -> StreamMeta {
        StreamMeta { compressed: on.then_some(2), ..self }
    }

    /// Taken at `date` (`datetime.isoformat()`, local time, no zone).
    pub fn dated(self, date: &str) -> StreamMeta {
        StreamMeta { date: date.into(), ..self }
    }
}

/// Python's `ensure_ascii`: every non-ASCII char becomes `\uXXXX` (UTF-16 units).
/// Non-ASCII can only occur inside JSON strings, where this escape is valid.
fn ascii_escape(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

fn req_u64(obj: &Map<String, Value>, key: &'static str) -> Result<u64, MetaError> {
    obj.get(key).ok_or(MetaError::Missing(key))?.as_u64().ok_or(MetaError::WrongType(key))
}

fn opt_str(obj: &Map<String, Value>, key: &'static str) -> Result<Option<String>, MetaError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(MetaError::WrongType(key)),
    }
}

/// One trailer entry: the compressed sizes of the lz4 frames of one data frame.
pub type TrailerEntry = Vec<u64>;

/// Parses the trailer list: an int is one lz4 frame; `{"<sum>": [sizes]}` is several,
/// and the key must equal the sum of the list. At most `max_frames` lz4 frames in all:
/// the caller knows how many the file has room for, so a trailer listing more is refused
/// while it is read, before it costs memory (the document is streamed, never held whole
/// as a JSON tree: a 200 MB hostile trailer of `1,1,1,...` took 13 GB that way).
pub fn parse_trailer(json: impl std::io::Read, max_frames: u64) -> Result<Vec<TrailerEntry>, MetaError> {
    use serde::de::Deserializer as _;
    let mut de = serde_json::Deserializer::from_reader(json);
    let entries = de
        .deserialize_seq(trailer::ListVisitor { budget: max_frames })
        .and_then(|entries| de.end().map(|()| entries))
        .map_err(|e| MetaError::BadTrailer(e.to_string()))?;
    Ok(entries)
}

/// The serde visitors of [`parse_trailer`]: each lz4 frame size is pushed straight into
/// its entry, counted against the budget as it arrives.
mod trailer {
    use std::fmt;

    use serde::de::{DeserializeSeed, Deserializer, Error, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use super::TrailerEntry;

    /// The whole list.
    pub(super) struct ListVisitor {
        pub(super) budget: u64,
    }

    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<TrailerEntry>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of lz4 frame sizes")
        }

        fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(entry) = seq.next_element_seed(Entry { budget: &mut self.budget })? {
                out.push(entry);
            }
            Ok(out)
        }
    }

    /// Counts one lz4 frame against the budget.
    fn spend<E: Error>(budget: &mut u64) -> Result<(), E> {
        *budget =
            budget.checked_sub(1).ok_or_else(|| E::custom("more lz4 frames than the file has room for"))?;
        Ok(())
    }

    /// One entry: an int, or `{"<sum>": [sizes]}`.
    struct Entry<'b> {
        budget: &'b mut u64,
    }

    impl<'de> DeserializeSeed<'de> for Entry<'_> {
        type Value = TrailerEntry;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<TrailerEntry, D::Error> {
            de.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Entry<'_> {
        type Value = TrailerEntry;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(r#"a frame size or {"<sum>": [sizes]}"#)
        }

        fn visit_u64<E: Error>(self, n: u64) -> Result<TrailerEntry, E> {
            spend(self.budget)?;
            Ok(vec![n])
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TrailerEntry, A::Error> {
            let key: String = map.next_key()?.ok_or_else(|| A::Error::custom("empty object"))?;
            let sizes = map.next_value_seed(Sizes { budget: self.budget })?;
            if map.next_key::<IgnoredAny>()?.is_some() {
                return Err(A::Error::custom("object with more than one key"));
            }
            let total = sizes.iter().try_fold(0u64, |a, &s| a.checked_add(s));
            if sizes.is_empty() || key.parse::<u64>().ok() != total {
                return Err(A::Error::custom(format!("key {key:?} is not the sum of its sizes")));
            }
            Ok(sizes)
        }
    }

    /// The size list of an object entry.
    struct Sizes<'b> {
        budget: &'b mut u64,
    }

    impl<'de> DeserializeSeed<'de> for Sizes<'_> {
        type Value = TrailerEntry;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<TrailerEntry, D::Error> {
            de.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for Sizes<'_> {
        type Value = TrailerEntry;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of lz4 frame sizes")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TrailerEntry, A::Error> {
            let mut out = Vec::new();
            while let Some(size) = seq.next_element::<u64>()? {
                spend(self.budget)?;
                out.push(size);
            }
            Ok(out)
        }
    }
}

/// Serializes a trailer as upstream does: `json.dumps(list)` with default separators.
/// Entries of one frame from an extent shorter than `max_request` are plain ints.
pub fn trailer_json(entries: &[(bool, Vec<u64>)]) -> String {
    let parts: Vec<String> = entries
        .iter()
        .map(|(chunked, sizes)| {
            if *chunked {
                let total: u64 = sizes.iter().sum();
                let list: Vec<String> = sizes.iter().map(u64::to_string).collect();
                format!("{{\"{total}\": [{}]}}", list.join(", "))
            } else {
                sizes[0].to_string()
            }
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metadata of the worked example in doc/FORMAT.md §1.11 (314 bytes).
    pub const EXAMPLE: &str = "{\n    \"virtualSize\": 4096,\n    \"dataSize\": 8,\n    \"date\": \"2026-06-30T08:21:01.123456\",\n    \"diskName\": \"sda\",\n    \"diskFormat\": \"qcow2\",\n    \"checkpointName\": \"virtnbdbackup.0\",\n    \"compressed\": false,\n    \"compressionMethod\": \"lz4\",\n    \"parentCheckpoint\": \"\",\n    \"incremental\": false,\n    \"streamVersion\": 2\n}";

    #[test]
    fn parses_and_writes_the_worked_example_byte_for_byte() {
        assert_eq!(EXAMPLE.len(), 0x13a);
        let m = StreamMeta::parse(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(m.virtual_size, 4096);
        assert_eq!(m.compressed, None);
        assert_eq!(m.to_json(), EXAMPLE);
        assert_eq!(StreamMeta::full("sda", 4096, 8).dated("2026-06-30T08:21:01.123456"), m);
        let z = m.lz4(true);
        assert_eq!(z.to_json().len(), 0x136);
    }

    #[test]
    fn reads_stream_version_1_with_old_keys() {
        let v1 = br#"{"virtualSize": 10, "dataSize": 0, "date": "x", "diskName": "vda",
            "checkpointName": "virtnbdbackup.0", "parentCheckpoint": false,
            "incremental": false, "stream-version": 1}"#;
        let m = StreamMeta::parse(v1).unwrap();
        assert_eq!((m.stream_version, m.compressed, m.disk_format), (1, None, None));
        assert_eq!(m.parent_checkpoint, "");
    }

    #[test]
    fn reads_compressed_as_bool_or_level() {
        let base = |c: &str| {
            format!(
                r#"{{"virtualSize": 1, "dataSize": 0, "diskName": "a", "compressed": {c}, "streamVersion": 2}}"#
            )
        };
        assert_eq!(StreamMeta::parse(base("true").as_bytes()).unwrap().compressed, Some(2));
        assert_eq!(StreamMeta::parse(base("false").as_bytes()).unwrap().compressed, None);
        assert_eq!(StreamMeta::parse(base("9").as_bytes()).unwrap().compressed, Some(9));
        assert!(StreamMeta::parse(base("\"yes\"").as_bytes()).is_err());
        let none = r#"{"virtualSize": 1, "dataSize": 0, "diskName": "a", "streamVersion": 2}"#;
        assert_eq!(StreamMeta::parse(none.as_bytes()).unwrap().compressed, None);
    }

    #[test]
    fn rejects_bad_metadata() {
        assert!(matches!(StreamMeta::parse(b"{not json"), Err(MetaError::Json(_))));
        assert!(matches!(StreamMeta::parse(b"[1]"), Err(MetaError::NotAnObject)));
        assert!(matches!(
            StreamMeta::parse(br#"{"dataSize": 0, "diskName": "a", "streamVersion": 2}"#),
            Err(MetaError::Missing("virtualSize"))
        ));
        assert!(matches!(
            StreamMeta::parse(br#"{"virtualSize": -1, "dataSize": 0, "diskName": "a", "streamVersion": 2}"#),
            Err(MetaError::WrongType("virtualSize"))
        ));
        assert!(matches!(
            StreamMeta::parse(br#"{"virtualSize": 1, "dataSize": 0, "diskName": "a", "streamVersion": 3}"#),
            Err(MetaError::Version(3))
        ));
        assert!(matches!(
            StreamMeta::parse(br#"{"virtualSize": 9223372036854775808, "dataSize": 0, "diskName": "a", "streamVersion": 2}"#),
            Err(MetaError::TooLarge("virtualSize", 0x8000_0000_0000_0000))
        ));
    }

    #[test]
    fn ascii_escapes_like_python() {
        assert_eq!(ascii_escape("\"d\u{e9}\u{1f600}\""), "\"d\\u00e9\\ud83d\\ude00\"");
    }

    #[test]
    fn trailer_forms() {
        assert_eq!(parse_trailer(&b"[39]"[..], 10).unwrap(), vec![vec![39]]);
        let t = br#"[{"133": [47, 47, 39]}, {"42": [42]}]"#;
        assert_eq!(parse_trailer(&t[..], 10).unwrap(), vec![vec![47, 47, 39], vec![42]]);
        assert_eq!(trailer_json(&[(true, vec![47, 47, 39]), (true, vec![42])]).as_bytes(), t);
        assert_eq!(trailer_json(&[(false, vec![39])]), "[39]");
        assert!(parse_trailer(&b"[]"[..], 10).unwrap().is_empty());
        for bad in
            [&br#"[{"100": [47]}]"#[..], b"[-1]", b"{}", br#"[{"1": [1], "2": [2]}]"#, b"[1] x", b"[[1]]"]
        {
            assert!(matches!(parse_trailer(bad, 10), Err(MetaError::BadTrailer(_))), "{bad:?}");
        }
        // The budget counts lz4 frames, in ints and in lists alike.
        assert_eq!(parse_trailer(&br#"[1, {"5": [2, 3]}]"#[..], 3).unwrap(), vec![vec![1], vec![2, 3]]);
        assert!(matches!(parse_trailer(&br#"[1, {"5": [2, 3]}]"#[..], 2), Err(MetaError::BadTrailer(_))));
    }
}
