//! The partition table (MBR or GPT) of a disk image, read from any [`ImageView`], so
//! each partition can be shown as its own file (a [`crate::view::Window`] on the image).
//!
//! Read only: the crates are handed a [`Disk`] adapter that implements `Read + Seek` and
//! nothing else, so no write can reach the image. The crates decode the on-disk
//! structures and check their signatures and CRCs (`mbrman` the MBR and each EBR sector,
//! `gptman` the GPT headers and entry array); this module decides what to trust, the way
//! Linux's `block/partitions` does:
//! - No boot signature, or a sector 0 whose entries are not a partition table (a boot
//!   flag other than 0x00/0x80, as in a FAT or NTFS boot sector) → no table, `Ok(empty)`.
//! - A protective entry (type 0xEE, also in a hybrid MBR) → the GPT, primary header
//!   first, else the backup header in the last sector. A protective MBR with no readable
//!   GPT is an error ([`PartitionError::Gpt`]), since the disk says it has a table.
//! - Numbers as Linux gives them: GPT entry index + 1; MBR primary slots 1-4, logical
//!   partitions 5, 6, … in the order of the EBR chain.
//! - Every size read from the disk is checked before it sizes an allocation or a loop:
//!   the GPT entry size must be 128 (as Linux requires; gptman's CRC code asserts it),
//!   the entry count at most [`MAX_GPT_ENTRIES`], the entry array inside the image, and the
//!   EBR chain at most [`MAX_EBRS`] links long, each link moving forward (so no loop).
//!   LBA arithmetic is done in `u64` with checks, never in the crates' `u32`, which is why
//!   the EBR chain is walked here rather than by `mbrman::MBR::read_from` (its `u32` sums
//!   overflow on crafted EBR entries).
//! - An entry that is empty, reaches past the end of the image or overlaps an entry
//!   already accepted is skipped with a warning naming the entry and why ([`Skipped`]);
//!   the others are still returned.
//!
//! Sector size: 512 bytes, what virtual disks present unless the domain sets
//! `<blockio logical_block_size='4096'/>`. A GPT is also looked for with 4096-byte
//! sectors when none is found with 512 (its header sits in LBA 1 either way, so the
//! place it is found in says the size). An MBR carries no hint of its sector size and is
//! always read with 512: on a 4 KiB-sector disk its partitions would come out at an
//! eighth of their offsets, so such disks (GPT in practice) are not supported with MBR.

use std::io::{self, Read, Seek, SeekFrom};

use thiserror::Error;
use tracing::warn;

use crate::chain::io::read_full_with;
use crate::view::ImageView;

/// Sector size of virtual disks (see the module note).
const SECTOR: u64 = 512;

/// Sector sizes a GPT is looked for with, in order (see the module note).
const GPT_SECTORS: [u64; 2] = [SECTOR, 4096];

/// The only GPT entry size accepted: the UEFI minimum, the size every partitioning tool
/// writes, and the only one Linux reads (gptman also assumes it when checking the CRC).
const GPT_ENTRY_SIZE: u32 = 128;

/// Largest GPT entry count accepted. Tools write 128 entries (the UEFI minimum array of
/// 16 KiB); Linux shows at most 255 partitions per disk. 4096 entries (a 512 KiB array,
/// read as 4096 small reads and held as 4096 small structs by gptman) leaves room for any
/// table a tool makes while refusing a count field that would size a huge allocation.
pub const MAX_GPT_ENTRIES: u32 = 4096;

/// Longest EBR chain followed. Linux gives a disk at most 255 partition numbers
/// (DISK_MAX_PARTS = 256), so links past that could hold nothing Linux would show.
pub const MAX_EBRS: usize = 256;

/// One partition, in bytes from the start of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// As Linux numbers it (`sda<number>`).
    pub number: u32,
    pub start: u64,
    pub len: u64,
}

/// Why a partition table could not be read at all.
#[derive(Debug, Error)]
pub enum PartitionError {
    #[error("partition table: read error at byte {offset}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("protective MBR but no usable GPT: primary header: {primary}; backup header: {backup}")]
    Gpt { primary: GptHeaderError, backup: GptHeaderError },
}

/// Why one GPT header (primary or backup) was not used.
#[derive(Debug, Error)]
pub enum GptHeaderError {
    #[error("none at byte {offset} ({source})")]
    Invalid {
        offset: u64,
        #[source]
        source: gptman::Error,
    },
    #[error("header at byte {offset}: entry size {size}, only {GPT_ENTRY_SIZE} is supported")]
    EntrySize { offset: u64, size: u32 },
    #[error("header at byte {offset}: {count} entries, more than the {MAX_GPT_ENTRIES} accepted")]
    TooManyEntries { offset: u64, count: u32 },
    #[error(
        "header at byte {offset}: entry array at LBA {lba} ({count} entries) lies outside the {size}-byte image"
    )]
    ArrayOutside { offset: u64, lba: u64, count: u32, size: u64 },
    #[error("entry array of the header at byte {offset}: {source}")]
    Array {
        offset: u64,
        #[source]
        source: gptman::Error,
    },
    #[error("the image is smaller than two sectors")]
    TooSmall,
}

/// Why one entry of a table was skipped (logged, the others are still returned).
#[derive(Debug, Error)]
pub enum Skipped {
    #[error("partition {number}: zero length")]
    Empty { number: u32 },
    #[error("partition {number}: bytes {start}..{end} reach past the end of the {size}-byte image")]
    Outside { number: u32, start: u64, end: u64, size: u64 },
    #[error("partition {number}: overlaps partition {other}")]
    Overlaps { number: u32, other: u32 },
    #[error(
        "extended partition {slot}: EBR at byte {offset}: {why}; logical partitions from here on are skipped"
    )]
    Ebr { slot: u32, offset: u64, why: String },
}

/// The read function [`Disk`] reads through: fill the buffer from the byte offset, return
/// how many bytes were read (0 only at the end of the image).
type ReadAt<'a> = &'a mut dyn FnMut(&mut [u8], u64) -> io::Result<usize>;

/// `Read + Seek` over the caller's read function, for the crates. `base` shifts every
/// offset, so an EBR sector can be decoded as if it were sector 0. Remembers the first
/// read error with its offset, since the crates wrap it without the offset.
struct Disk<'a> {
    read_at: ReadAt<'a>,
    size: u64,
    base: u64,
    pos: u64,
    failed: Option<(u64, io::Error)>,
    /// The last block read and where it starts: the crates parse field by field, a few
    /// bytes per `read`, and each image read has a cost of its own (`ls -lR` of 500
    /// restore points spent a third of vmback's CPU in them).
    block: Vec<u8>,
    block_at: Option<u64>,
}

/// The unit the crates' reads are served from: a 4 KiB sector holds any one structure
/// they read, but a GPT entry array, which spans a few.
const BLOCK: u64 = 4096;

impl<'a> Disk<'a> {
    fn new(read_at: ReadAt<'a>, size: u64) -> Disk<'a> {
        Disk { read_at, size, base: 0, pos: 0, failed: None, block: Vec::new(), block_at: None }
    }
}

impl Read for Disk<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(offset) = self.base.checked_add(self.pos).filter(|&o| o < self.size) else {
            return Ok(0);
        };
        let at = offset - offset % BLOCK;
        if self.block_at != Some(at) {
            self.block_at = None;
            self.block.resize((self.size - at).min(BLOCK) as usize, 0);
            let (read_at, mut last) = (&mut self.read_at, at);
            let read = |b: &mut [u8], o| {
                last = o;
                read_at(b, o)
            };
            match read_full_with(&mut self.block, at, read) {
                Ok(got) => self.block.truncate(got),
                Err(e) => {
                    let copy = io::Error::new(e.kind(), e.to_string());
                    self.failed.get_or_insert((last, e));
                    return Err(copy);
                }
            }
            self.block_at = Some(at);
        }
        let from = (offset - at) as usize;
        let n = self.block.len().saturating_sub(from).min(buf.len());
        buf[..n].copy_from_slice(&self.block[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Disk<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let end = self.size.saturating_sub(self.base);
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => end.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        Ok(self.pos)
    }
}

impl Disk<'_> {
    /// The caller's read error, if one happened, else `other`.
    fn error_or<T>(&mut self, other: T) -> Result<T, PartitionError> {
        match self.failed.take() {
            Some((offset, source)) => Err(PartitionError::Io { offset, source }),
            None => Ok(other),
        }
    }
}

/// The partitions of `image`; empty when it has no partition table. See the module note
/// for what is trusted and what is skipped.
pub fn read_table(image: &dyn ImageView) -> Result<Vec<Partition>, PartitionError> {
    let size = image.size();
    let mut read_at = |buf: &mut [u8], off: u64| image.read_at(buf, off).map_err(io::Error::from);
    let mut disk = Disk::new(&mut read_at, size);
    let header = mbrman::MBRHeader::read_from(&mut disk);
    let Ok(mbr) = disk.error_or(header)? else {
        return Ok(Vec::new());
    };
    let mut found = Found { size, parts: Vec::new() };
    if mbr.iter().any(|(_, e)| e.sys == 0xee) {
        read_gpt(&mut disk, &mut found)?;
    } else {
        read_mbr(&mut disk, &mbr, &mut found)?;
    }
    Ok(found.parts)
}

/// The partitions accepted so far, checked as they come.
struct Found {
    size: u64,
    parts: Vec<Partition>,
}

impl Found {
    /// Adds the partition unless it is empty, outside the image or overlaps one already
    /// accepted; then logs why.
    fn add(&mut self, number: u32, start: u64, len: u64) {
        let end = start.saturating_add(len);
        let skip = if len == 0 {
            Some(Skipped::Empty { number })
        } else if end > self.size {
            Some(Skipped::Outside { number, start, end, size: self.size })
        } else {
            self.parts
                .iter()
                .find(|p| start < p.start + p.len && p.start < end)
                .map(|p| Skipped::Overlaps { number, other: p.number })
        };
        match skip {
            Some(why) => warn!("{why}; skipped"),
            None => self.parts.push(Partition { number, start, len }),
        }
    }
}

/// Primary partitions (slots 1-4), then the logical ones of each extended partition.
fn read_mbr(disk: &mut Disk, mbr: &mbrman::MBRHeader, found: &mut Found) -> Result<(), PartitionError> {
    let mut next_logical = 5;
    for (slot, e) in mbr.iter() {
        let slot = slot as u32;
        if e.is_unused() {
            continue;
        }
        let start = u64::from(e.starting_lba) * SECTOR;
        if e.is_extended() {
            read_logicals(disk, slot, start, &mut next_logical, found)?;
        } else {
            found.add(slot, start, u64::from(e.sectors) * SECTOR);
        }
    }
    Ok(())
}

/// Follows the EBR chain of the extended partition in `slot`, starting at byte `ext`.
/// Each EBR is an MBR-like sector: its data entries are relative to the EBR, its link
/// entry to the extended partition's start. A broken link ends the chain with a warning.
fn read_logicals(
    disk: &mut Disk,
    slot: u32,
    ext: u64,
    number: &mut u32,
    found: &mut Found,
) -> Result<(), PartitionError> {
    let mut rel = 0u64;
    for link in 0..MAX_EBRS {
        let ebr = ext + rel;
        let skip = |why: String| warn!("{}", Skipped::Ebr { slot, offset: ebr, why });
        if ebr.saturating_add(SECTOR) > disk.size {
            skip("past the end of the image".into());
            return Ok(());
        }
        disk.base = ebr;
        let header = mbrman::MBRHeader::read_from(&mut *disk);
        disk.base = 0;
        let header = match disk.error_or(header)? {
            Ok(h) => h,
            // An extended partition with no logical partition need not hold an EBR.
            Err(_) if link == 0 => return Ok(()),
            Err(e) => {
                skip(format!("not an EBR ({e})"));
                return Ok(());
            }
        };
        for (_, e) in header.iter().filter(|(_, e)| e.is_used() && !e.is_extended()) {
            found.add(*number, ebr + u64::from(e.starting_lba) * SECTOR, u64::from(e.sectors) * SECTOR);
            *number += 1;
        }
        let Some((_, next)) = header.iter().find(|(_, e)| e.is_extended() && e.sectors > 0) else {
            return Ok(());
        };
        let next = u64::from(next.starting_lba) * SECTOR;
        if next <= rel {
            skip(format!("links back to byte {}", ext + next));
            return Ok(());
        }
        rel = next;
    }
    warn!("{}", Skipped::Ebr { slot, offset: ext + rel, why: format!("chain longer than {MAX_EBRS} links") });
    Ok(())
}

/// The GPT, looked for with each sector size in turn. When none is usable, the error of
/// the first size where some header was found, else of the first size.
fn read_gpt(disk: &mut Disk, found: &mut Found) -> Result<(), PartitionError> {
    let mut failures = Vec::new();
    for ss in GPT_SECTORS {
        let entries = match gpt_at(disk, ss, ss)? {
            Ok(entries) => entries,
            Err(primary) => {
                let backup = match (disk.size / ss).checked_sub(1).filter(|&lba| lba > 1) {
                    Some(lba) => gpt_at(disk, lba * ss, ss)?,
                    None => Err(GptHeaderError::TooSmall),
                };
                match backup {
                    Ok(entries) => entries,
                    Err(backup) => {
                        failures.push((primary, backup));
                        continue;
                    }
                }
            }
        };
        for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.is_used()) {
            // At most MAX_GPT_ENTRIES entries, so the index fits.
            let number = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let sectors = e.ending_lba.checked_sub(e.starting_lba).map_or(0, |n| n.saturating_add(1));
            found.add(number, e.starting_lba.saturating_mul(ss), sectors.saturating_mul(ss));
        }
        return Ok(());
    }
    let pick = failures.iter().position(|(p, b)| !p.is_absent() || !b.is_absent()).unwrap_or(0);
    let (primary, backup) = failures.swap_remove(pick);
    Err(PartitionError::Gpt { primary, backup })
}

impl GptHeaderError {
    /// No header at all there, as opposed to a damaged or unsupported one.
    fn is_absent(&self) -> bool {
        matches!(
            self,
            GptHeaderError::TooSmall
                | GptHeaderError::Invalid { source: gptman::Error::InvalidSignature, .. }
        )
    }
}

/// The GPT header at byte `offset` and its entry array, with the sizes checked before
/// gptman reads the array. The outer error is the caller's read error.
fn gpt_at(
    disk: &mut Disk,
    offset: u64,
    ss: u64,
) -> Result<Result<Vec<gptman::GPTPartitionEntry>, GptHeaderError>, PartitionError> {
    let header = disk
        .seek(SeekFrom::Start(offset))
        .map_err(gptman::Error::from)
        .and_then(|_| gptman::GPTHeader::read_from(&mut *disk));
    let header = match disk.error_or(header)? {
        Ok(h) => h,
        Err(source) => return Ok(Err(GptHeaderError::Invalid { offset, source })),
    };
    let (count, size) = (header.number_of_partition_entries, header.size_of_partition_entry);
    if size != GPT_ENTRY_SIZE {
        return Ok(Err(GptHeaderError::EntrySize { offset, size }));
    }
    if count > MAX_GPT_ENTRIES {
        return Ok(Err(GptHeaderError::TooManyEntries { offset, count }));
    }
    let lba = header.partition_entry_lba;
    let array_end = lba.checked_mul(ss).and_then(|s| s.checked_add(u64::from(count) * u64::from(size)));
    if array_end.is_none_or(|e| e > disk.size) {
        return Ok(Err(GptHeaderError::ArrayOutside { offset, lba, count, size: disk.size }));
    }
    let entries = header.read_partitions(&mut *disk, ss);
    Ok(match disk.error_or(entries)? {
        Ok(entries) => Ok(entries),
        Err(source) => Err(GptHeaderError::Array { offset, source }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::process::{Command, Stdio};

    const MIB: u64 = 1 << 20;

    fn run(cmd: &str, args: &[&str], stdin: &str) -> String {
        use std::io::Write;
        let mut child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd}: {e} (install it with contrib/install-deps.sh)"));
        child.stdin.take().expect("piped").write_all(stdin.as_bytes()).expect("stdin");
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{cmd} {args:?} failed");
        String::from_utf8(out.stdout).expect("utf-8")
    }

    fn image(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        File::create(&path).and_then(|f| f.set_len(size)).expect("image");
        (dir, path)
    }

    /// An image file, read in place (the images here are 64 MiB, read hundreds of times).
    struct FileView(File, u64);

    impl ImageView for FileView {
        fn size(&self) -> u64 {
            self.1
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, crate::view::ViewError> {
            self.0.read_at(buf, off).map_err(|e| crate::view::ViewError::new(libc::EIO, e))
        }
        fn run_at(&self, _: u64) -> (crate::view::Run, u64) {
            (crate::view::Run::Data, self.1)
        }
    }

    fn table_of(path: &Path) -> Result<Vec<Partition>, PartitionError> {
        let f = File::open(path).expect("open");
        let size = f.metadata().expect("stat").len();
        read_table(&FileView(f, size))
    }

    /// The data partitions as `sfdisk --json` sees them (the extended container left out),
    /// numbered by the digits its node names end with.
    fn sfdisk_view(dev: &Path) -> Vec<Partition> {
        let json: serde_json::Value =
            serde_json::from_str(&run("sfdisk", &["--json", &dev.to_string_lossy()], "")).expect("json");
        let table = &json["partitiontable"];
        let ss = table["sectorsize"].as_u64().unwrap_or(SECTOR);
        table["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .filter(|p| !["5", "f", "85"].contains(&p["type"].as_str().unwrap_or("")))
            .map(|p| {
                let node = p["node"].as_str().expect("node");
                let digits = node.len() - node.trim_end_matches(|c: char| c.is_ascii_digit()).len();
                Partition {
                    number: node[node.len() - digits..].parse().expect("number"),
                    start: p["start"].as_u64().expect("start") * ss,
                    len: p["size"].as_u64().expect("size") * ss,
                }
            })
            .collect()
    }

    fn patch(path: &Path, offset: u64, bytes: &[u8]) {
        OpenOptions::new().write(true).open(path).and_then(|f| f.write_all_at(bytes, offset)).expect("patch");
    }

    const MBR_SCRIPT: &str = "label: dos\n\
        start=2048, size=8192, type=83\n\
        start=10240, size=8192, type=83\n\
        start=18432, type=5\n\
        start=20480, size=4096, type=83\n\
        start=26624, size=4096, type=83\n\
        start=32768, size=2048, type=83\n";

    #[test]
    fn mbr_with_logical_partitions_matches_sfdisk() {
        let (_dir, path) = image(64 * MIB);
        run("sfdisk", &["-q", &path.to_string_lossy()], MBR_SCRIPT);
        let parts = table_of(&path).expect("table");
        assert_eq!(parts, sfdisk_view(&path));
        let numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
        assert_eq!(numbers, [1, 2, 5, 6, 7]);
        assert_eq!(parts[1], Partition { number: 2, start: 10240 * SECTOR, len: 8192 * SECTOR });
    }

    #[test]
    fn gpt_made_by_sgdisk_matches_sfdisk_with_gaps_in_numbers() {
        let (_dir, path) = image(64 * MIB);
        let p = path.to_string_lossy();
        run("sgdisk", &["-n", "1:2048:+4M", "-n", "2:0:+8M", "-n", "5:0:+1M", "-n", "128:0:0", &p], "");
        let parts = table_of(&path).expect("table");
        assert_eq!(parts, sfdisk_view(&path));
        let numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
        assert_eq!(numbers, [1, 2, 5, 128]);
        assert_eq!(parts[0], Partition { number: 1, start: MIB, len: 4 * MIB });
    }

    #[test]
    fn gpt_backup_header_is_used_when_the_primary_is_damaged() {
        let (_dir, path) = image(64 * MIB);
        run("sgdisk", &["-n", "1:0:+4M", "-n", "2:0:+4M", &path.to_string_lossy()], "");
        let want = table_of(&path).expect("table");
        patch(&path, SECTOR + 40, &[0xff; 8]); // first usable LBA: breaks the header CRC
        assert_eq!(table_of(&path).expect("backup"), want);
    }

    #[test]
    fn gpt_on_a_4k_sector_disk() {
        let (_dir, path) = image(64 * MIB);
        let dev = run("losetup", &["-f", "--show", "--sector-size", "4096", &path.to_string_lossy()], "");
        let dev = dev.trim();
        run("sfdisk", &["-q", "--no-reread", dev], "label: gpt\nsize=4M\nsize=8M\n");
        let want = sfdisk_view(Path::new(dev));
        run("losetup", &["-d", dev], "");
        assert_eq!(want[0].start % 4096, 0);
        assert_eq!(table_of(&path).expect("table"), want);
    }

    #[test]
    fn no_table_gives_no_partitions() {
        let (_dir, path) = image(8 * MIB);
        assert_eq!(table_of(&path).expect("zeros"), []);
        run("mkfs.ext4", &["-q", "-F", &path.to_string_lossy()], "");
        assert_eq!(table_of(&path).expect("bare ext4"), []);
        let (_dir, empty) = image(0);
        assert_eq!(table_of(&empty).expect("empty image"), []);
        // A boot sector that is not a table (boot flags other than 0x00/0x80), as FAT has.
        let (_dir, fat) = image(MIB);
        patch(&fat, 446, &[0x33; 64]);
        patch(&fat, 510, &[0x55, 0xaa]);
        assert_eq!(table_of(&fat).expect("boot sector"), []);
    }

    #[test]
    fn entries_outside_overlapping_or_empty_are_skipped() {
        let (_dir, path) = image(64 * MIB);
        run("sfdisk", &["-q", &path.to_string_lossy()], "label: dos\nsize=4M\nsize=4M\nsize=4M\nsize=4M\n");
        let all = table_of(&path).expect("table");
        let entry = |slot: u64| 446 + 16 * (slot - 1);
        patch(&path, entry(2) + 8, &2049u32.to_le_bytes()); // inside partition 1
        patch(&path, entry(3) + 12, &0u32.to_le_bytes()); // zero length
        patch(&path, entry(4) + 12, &u32::MAX.to_le_bytes()); // 2 TiB, past the end
        assert_eq!(table_of(&path).expect("table"), all[..1]);
    }

    #[test]
    fn ebr_chains_that_loop_or_overflow_end_without_panic() {
        let (_dir, path) = image(64 * MIB);
        run("sfdisk", &["-q", &path.to_string_lossy()], MBR_SCRIPT);
        let want = table_of(&path).expect("table");
        // The second EBR (before logical 6) links back to the first: a loop.
        let ebr2 = 26624 - 2048;
        let link = ebr2 * SECTOR + 446 + 16 + 8;
        patch(&path, link, &0u32.to_le_bytes());
        assert_eq!(table_of(&path).expect("loop"), want[..4]);
        // A logical entry whose start overflows 32 bits once added to its EBR's LBA.
        patch(&path, ebr2 * SECTOR + 446 + 8, &u32::MAX.to_le_bytes());
        assert_eq!(table_of(&path).expect("overflow"), want[..3]);
    }

    #[test]
    fn absurd_gpt_sizes_are_refused_before_any_allocation() {
        let (_dir, path) = image(64 * MIB);
        run("sgdisk", &["-n", "1:0:+4M", &path.to_string_lossy()], "");
        let f = File::open(&path).expect("open");
        let headers: Vec<(u64, gptman::GPTHeader)> = [1, 64 * MIB / SECTOR - 1]
            .into_iter()
            .map(|lba| {
                let read_at = &mut |b: &mut [u8], o| f.read_at(b, o);
                let mut disk = Disk::new(read_at, 64 * MIB);
                disk.seek(SeekFrom::Start(lba * SECTOR)).expect("seek");
                (lba * SECTOR, gptman::GPTHeader::read_from(&mut disk).expect("header"))
            })
            .collect();
        for (count, size) in [(u32::MAX, 128), (MAX_GPT_ENTRIES + 1, 128), (128, 4096), (128, 0)] {
            for (at, good) in &headers {
                let mut h = good.clone();
                (h.number_of_partition_entries, h.size_of_partition_entry) = (count, size);
                patch(&path, at + 80, &count.to_le_bytes());
                patch(&path, at + 84, &size.to_le_bytes());
                patch(&path, at + 16, &h.generate_crc32_checksum().to_le_bytes());
            }
            let err = table_of(&path).expect_err("absurd sizes");
            let PartitionError::Gpt { primary, backup } = &err else { panic!("{err}") };
            let want_size = size != GPT_ENTRY_SIZE;
            for e in [primary, backup] {
                assert!(
                    matches!(e, GptHeaderError::EntrySize { .. }) == want_size
                        && matches!(e, GptHeaderError::TooManyEntries { .. }) != want_size,
                    "{count} x {size}: {err}"
                );
            }
        }
    }

    #[test]
    fn truncated_images() {
        let (_dir, path) = image(64 * MIB);
        run("sgdisk", &["-n", "1:0:+4M", "-n", "2:0:+40M", &path.to_string_lossy()], "");
        let all = table_of(&path).expect("table");
        File::options().write(true).open(&path).and_then(|f| f.set_len(20 * MIB)).expect("truncate");
        assert_eq!(table_of(&path).expect("primary header still there"), all[..1]);
        File::options().write(true).open(&path).and_then(|f| f.set_len(1000)).expect("truncate");
        let err = table_of(&path).expect_err("entry array cut off");
        assert!(
            matches!(err, PartitionError::Gpt { primary: GptHeaderError::ArrayOutside { .. }, .. }),
            "{err}"
        );
        File::options().write(true).open(&path).and_then(|f| f.set_len(300)).expect("truncate");
        assert_eq!(table_of(&path).expect("less than a sector"), []);
    }

    #[test]
    fn flipped_bytes_never_panic() {
        let (_dir, path) = image(64 * MIB);
        run("sfdisk", &["-q", &path.to_string_lossy()], MBR_SCRIPT);
        let (_dir2, gpt) = image(64 * MIB);
        run("sgdisk", &["-n", "1:0:+4M", "-n", "2:0:+4M", &gpt.to_string_lossy()], "");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // Sectors that hold table structures: the MBR, the GPT header and entries, the EBRs.
        let places = [0, 1, 2, 18432, 26624 - 2048];
        for round in 0..400 {
            let img = if round % 2 == 0 { &path } else { &gpt };
            let sector = places[(next() % places.len() as u64) as usize];
            let offset = sector * SECTOR + next() % SECTOR;
            patch(img, offset, &[next() as u8]);
            let _ = table_of(img);
        }
    }

    /// An image of which every read fails.
    struct Unreadable;

    impl ImageView for Unreadable {
        fn size(&self) -> u64 {
            MIB
        }
        fn read_at(&self, _: &mut [u8], off: u64) -> Result<usize, crate::view::ViewError> {
            Err(crate::view::ViewError::new(libc::EIO, format!("bad sector at {off}")))
        }
        fn run_at(&self, _: u64) -> (crate::view::Run, u64) {
            (crate::view::Run::Data, MIB)
        }
    }

    #[test]
    fn read_errors_name_the_offset() {
        let err = read_table(&Unreadable).expect_err("read error");
        assert!(matches!(err, PartitionError::Io { offset: 0, .. }), "{err}");
    }
}
