//! File names of a backup set (doc/FORMAT.md §2.1) and names that are safe to show.

/// The backup level a data file's name says it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Level {
    Full,
    Copy,
    /// `inc.<checkpoint>`
    Inc(String),
    /// `diff.<unix seconds>`
    Diff(String),
}

/// A parsed `<disk>.<level>[.<ident>].data` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamName {
    pub disk: String,
    pub level: Level,
}

/// Parses a data file name; `None` for anything else. libvirt target names (`sda`,
/// `vdb`, `hdc`) hold no dots, so the disk is everything before the first one.
pub fn parse_stream_name(name: &str) -> Option<StreamName> {
    let stem = name.strip_suffix(".data")?;
    let (disk, rest) = stem.split_once('.')?;
    // The disk names a file in the mount: a name that is not already one safe path
    // component (control characters, an absurd length) is no libvirt target.
    if disk.is_empty() || safe_component(disk) != disk {
        return None;
    }
    let level = match rest.split_once('.') {
        None if rest == "full" => Level::Full,
        None if rest == "copy" => Level::Copy,
        Some(("inc", cpt)) if !cpt.is_empty() => Level::Inc(cpt.to_owned()),
        Some(("diff", ts)) if !ts.is_empty() => Level::Diff(ts.to_owned()),
        _ => return None,
    };
    Some(StreamName { disk: disk.to_owned(), level })
}

/// The `<ident>` of a `vmconfig.<ident>.xml` name, which names the files saved beside it
/// (boot files, `autostart.<ident>`, `<disk>.<ident>.qcow.json`).
pub fn config_ident(name: &str) -> Option<&str> {
    name.strip_prefix("vmconfig.").and_then(|n| n.strip_suffix(".xml"))
}

/// Longest name shown in the mount. Linux allows 255 bytes per component; the margin
/// leaves room for the suffixes vmback appends (`.raw`, `.2`).
const MAX_NAME: usize = 200;

/// Makes a name taken from backup metadata safe as one path component: `/`, NUL and
/// control characters become `_`, `.`, `..` and the empty name get a `_` prefix, and
/// long names are cut (at a char boundary).
pub fn safe_component(name: &str) -> String {
    let mut out: String = name.chars().map(|c| if c == '/' || c.is_control() { '_' } else { c }).collect();
    if out.len() > MAX_NAME {
        let mut cut = MAX_NAME;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    if out.is_empty() || out == "." || out == ".." {
        out.insert(0, '_');
    }
    out
}

/// Orders checkpoint names by their numeric suffix (`virtnbdbackup.10` after `.9`,
/// upstream issue #17), then by the whole name.
pub fn checkpoint_order(name: &str) -> (u64, &str) {
    let n = name.rsplit('.').next().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
    (n, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(disk: &str, level: Level) -> Option<StreamName> {
        Some(StreamName { disk: disk.into(), level })
    }

    #[test]
    fn parses_every_upstream_name() {
        assert_eq!(parse_stream_name("sda.full.data"), named("sda", Level::Full));
        assert_eq!(parse_stream_name("vdb.copy.data"), named("vdb", Level::Copy));
        assert_eq!(
            parse_stream_name("sda.inc.virtnbdbackup.12.data"),
            named("sda", Level::Inc("virtnbdbackup.12".into()))
        );
        assert_eq!(
            parse_stream_name("hdc.diff.1782810000.data"),
            named("hdc", Level::Diff("1782810000".into()))
        );
        for bad in [
            "sda.full.data.partial",
            "sda.data",
            ".full.data",
            "sda.inc..data",
            "sda.weird.data",
            "vmconfig.virtnbdbackup.0.xml",
            "sda.full.data.chksum",
            "a\nb.full.data",
        ] {
            assert_eq!(parse_stream_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn unsafe_names_cannot_escape() {
        assert_eq!(safe_component(".."), "_..");
        assert_eq!(safe_component("."), "_.");
        assert_eq!(safe_component(""), "_");
        assert_eq!(safe_component("../../etc"), ".._.._etc");
        assert_eq!(safe_component("a\0b\nc"), "a_b_c");
        assert_eq!(safe_component(&"x".repeat(4000)).len(), MAX_NAME);
        assert_eq!(safe_component(&"\u{e9}".repeat(150)).len(), MAX_NAME);
        assert_eq!(safe_component("vm-1"), "vm-1");
    }

    #[test]
    fn checkpoints_order_numerically() {
        let mut v = vec!["virtnbdbackup.10", "virtnbdbackup.2", "virtnbdbackup.0"];
        v.sort_by_key(|n| checkpoint_order(n));
        assert_eq!(v, ["virtnbdbackup.0", "virtnbdbackup.2", "virtnbdbackup.10"]);
    }
}
