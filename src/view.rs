//! The one shape every image speaks: a fixed size, positional reads, and runs of data
//! and holes. The chain reader, the overlay over it, a partition window and the mount's
//! image all implement [`ImageView`]; restore copies from one, the partition table is
//! read from one, `lseek` and `st_blocks` are answered from one.
//!
//! Bottom of the module stack: this module imports nothing from the rest of the crate,
//! so any layer may build on it.
//!
//! Invariants an implementation keeps:
//! - `read_at` fills `buf` from `off` up to the end of the image and returns how many
//!   bytes it filled: `buf.len()` unless the image ends first, 0 at or past the end.
//! - `run_at(pos)` for `pos < size` returns the kind of the run holding `pos` and an end
//!   `> pos`, at most `size`; a hole reads as zeros (data may read as zeros too). The runs
//!   need not be maximal: two data runs may touch.
//!
//! SEEK_DATA, SEEK_HOLE and the thin size are provided methods built on `run_at`, so
//! every view answers them the same way.

use std::sync::Arc;

/// The unit of SEEK_DATA / SEEK_HOLE answers. Tools such as `qemu-img convert` copy whole
/// 512-byte sectors between the offsets lseek gives them, so an extent edge inside a
/// sector (the format allows any byte offset) must not be reported as one: the data of
/// the partial sector would be dropped.
pub const SECTOR: u64 = 512;

/// What a range of an image reads as, for `lseek` and `st_blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// Bytes that are stored somewhere (possibly zeros).
    Data,
    /// Zeros that take no space: a zero frame, a range no backup wrote, a punched range.
    Hole,
}

/// A read a view could not serve: the errno a caller (FUSE, a copy) reports, and the
/// view's own error, shown as it is (the wrapper adds nothing to the message, so error
/// chains read as the inner error's). [`ViewError::inner`] gets the typed error back.
#[derive(Debug)]
pub struct ViewError {
    errno: i32,
    inner: Box<dyn std::error::Error + Send + Sync>,
}

impl ViewError {
    pub fn new(errno: i32, inner: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ViewError {
        ViewError { errno, inner: inner.into() }
    }

    /// The errno a FUSE request answers with.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The view's own error, for callers that want its type.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.inner
    }
}

impl std::fmt::Display for ViewError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl std::error::Error for ViewError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source()
    }
}

impl From<ViewError> for std::io::Error {
    fn from(e: ViewError) -> std::io::Error {
        std::io::Error::new(std::io::Error::from_raw_os_error(e.errno).kind(), e)
    }
}

/// See the module note.
pub trait ImageView: Send + Sync {
    /// Bytes in the image.
    fn size(&self) -> u64;

    /// Fills `buf` from `off` (clipped at the end); returns the bytes filled.
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, ViewError>;

    /// The run holding `pos` and where it ends (see the module note).
    fn run_at(&self, pos: u64) -> (Run, u64);

    /// The first offset at or after `pos` in a run of kind `want`, if any before the end.
    fn next_run(&self, mut pos: u64, want: Run) -> Option<u64> {
        while pos < self.size() {
            let (run, end) = self.run_at(pos);
            if run == want {
                return Some(pos);
            }
            pos = end;
        }
        None
    }

    /// Whether `[from, to)` holds no data.
    fn all_hole(&self, from: u64, to: u64) -> bool {
        self.next_run(from, Run::Data).is_none_or(|d| d >= to)
    }

    /// SEEK_DATA. Answers are in whole sectors: a sector with any data counts as data.
    fn seek_data(&self, pos: u64) -> Option<u64> {
        let size = self.size();
        let sector = pos / SECTOR * SECTOR;
        if pos < size && !self.all_hole(sector, (sector + SECTOR).min(size)) {
            return Some(pos);
        }
        self.next_run(pos, Run::Data).map(|d| (d / SECTOR * SECTOR).max(pos))
    }

    /// SEEK_HOLE, in whole sectors like [`ImageView::seek_data`]; the end counts as a
    /// hole.
    fn seek_hole(&self, pos: u64) -> u64 {
        let size = self.size();
        let mut from = pos;
        loop {
            let Some(h) = self.next_run(from, Run::Hole) else { return size };
            let sector = h / SECTOR * SECTOR;
            if self.all_hole(sector, (sector + SECTOR).min(size)) {
                return h;
            }
            let next = sector + SECTOR;
            if next >= size {
                return size;
            }
            if self.all_hole(next, (next + SECTOR).min(size)) {
                return next;
            }
            from = next;
        }
    }

    /// Bytes in data runs between `from` and `to`.
    fn data_bytes_in(&self, from: u64, to: u64) -> u64 {
        let (mut pos, mut total) = (from, 0);
        while pos < to.min(self.size()) {
            let (run, end) = self.run_at(pos);
            let end = end.min(to);
            if run == Run::Data {
                total += end - pos;
            }
            pos = end;
        }
        total
    }

    /// Bytes in data runs: the thin size, what `du` shows. Views that know it cheaper
    /// override this.
    fn data_bytes(&self) -> u64 {
        self.data_bytes_in(0, self.size())
    }
}

/// A view behind a pointer is the view (one body for both pointer kinds).
macro_rules! forward {
    ($($ptr:ty),*) => {$(
        impl<T: ImageView + ?Sized> ImageView for $ptr {
            fn size(&self) -> u64 {
                (**self).size()
            }
            fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, ViewError> {
                (**self).read_at(buf, off)
            }
            fn run_at(&self, pos: u64) -> (Run, u64) {
                (**self).run_at(pos)
            }
            fn data_bytes(&self) -> u64 {
                (**self).data_bytes()
            }
        }
    )*};
}

forward!(Arc<T>, &T);

/// Bytes in memory as an image, all data: for tests and fuzzing, and small synthetic
/// files.
impl ImageView for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, ViewError> {
        let from = usize::try_from(off).unwrap_or(usize::MAX).min(self.len());
        let n = buf.len().min(self.len() - from);
        buf[..n].copy_from_slice(&self[from..from + n]);
        Ok(n)
    }
    fn run_at(&self, _pos: u64) -> (Run, u64) {
        (Run::Data, self.size())
    }
}

impl ImageView for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, ViewError> {
        self.as_slice().read_at(buf, off)
    }
    fn run_at(&self, pos: u64) -> (Run, u64) {
        self.as_slice().run_at(pos)
    }
}

/// `len` bytes of `inner` from `start`, as an image of its own: a partition of a disk.
/// Reads stop at the window's end; runs are clipped to it.
pub struct Window<V> {
    inner: V,
    start: u64,
    len: u64,
}

impl<V: ImageView> Window<V> {
    /// The window `[start, start + len)` of `inner`, clipped to `inner`'s size.
    pub fn new(inner: V, start: u64, len: u64) -> Window<V> {
        let start = start.min(inner.size());
        let len = len.min(inner.size() - start);
        Window { inner, start, len }
    }

    pub fn inner(&self) -> &V {
        &self.inner
    }

    /// Where the window starts in `inner`.
    pub fn start(&self) -> u64 {
        self.start
    }
}

impl<V: ImageView> ImageView for Window<V> {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, ViewError> {
        let n = self.len.saturating_sub(off).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.inner.read_at(&mut buf[..n], self.start + off)
    }
    fn run_at(&self, pos: u64) -> (Run, u64) {
        let (run, end) = self.inner.run_at(self.start + pos);
        (run, (end.saturating_sub(self.start)).min(self.len).max(pos + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image of `len` bytes made of runs of `step` bytes, data and hole in turn
    /// (starting with data); data bytes read as their offset's low byte.
    struct Striped {
        len: u64,
        step: u64,
    }

    impl ImageView for Striped {
        fn size(&self) -> u64 {
            self.len
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, ViewError> {
            let n = self.len.saturating_sub(off).min(buf.len() as u64) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                let at = off + i as u64;
                *b = if (at / self.step).is_multiple_of(2) { at as u8 | 1 } else { 0 };
            }
            Ok(n)
        }
        fn run_at(&self, pos: u64) -> (Run, u64) {
            let run = if (pos / self.step).is_multiple_of(2) { Run::Data } else { Run::Hole };
            (run, ((pos / self.step + 1) * self.step).min(self.len))
        }
    }

    #[test]
    fn a_window_reads_and_runs_as_the_slice_of_its_image() {
        let image = Arc::new(Striped { len: 10 * SECTOR, step: 3 * SECTOR / 2 });
        for (start, len) in
            [(0, 10 * SECTOR), (SECTOR, 4 * SECTOR), (2 * SECTOR, 8 * SECTOR), (9 * SECTOR, 5000)]
        {
            let w = Window::new(image.clone(), start, len);
            let len = len.min(image.size() - start);
            assert_eq!(w.size(), len);
            let mut whole = vec![0; image.size() as usize];
            image.read_at(&mut whole, 0).expect("image");
            let slice = &whole[start as usize..(start + len) as usize];
            for off in [0, 1, 511, 700, len.saturating_sub(3), len, len + 10] {
                let mut got = vec![0xee; 2000];
                let n = w.read_at(&mut got, off).expect("window");
                let want = &slice[off.min(len) as usize..(off + 2000).min(len) as usize];
                assert_eq!(&got[..n], want, "read at {off} of window {start}+{len}");
            }
            assert_eq!(w.data_bytes(), image.data_bytes_in(start, start + len));
            for pos in (0..len).step_by(97) {
                let want_data = image.seek_data(start + pos).filter(|&d| d < start + len).map(|d| d - start);
                assert_eq!(w.seek_data(pos), want_data, "seek_data({pos}) in {start}+{len}");
                let want_hole = image.seek_hole(start + pos).min(start + len) - start;
                assert_eq!(w.seek_hole(pos), want_hole, "seek_hole({pos}) in {start}+{len}");
                let (run, end) = w.run_at(pos);
                assert!(end > pos && end <= len);
                assert_eq!(run, image.run_at(start + pos).0);
            }
        }
    }

    #[test]
    fn seeks_answer_in_whole_sectors() {
        // Data in [0, 768), a hole in [768, 1536), data again up to 2304.
        let image = Striped { len: 3 * 768, step: 768 };
        assert_eq!(image.seek_hole(0), 1024, "the sector holding 768 has data");
        assert_eq!(image.seek_data(700), Some(700), "inside a data run");
        assert_eq!(image.seek_data(1100), Some(1536), "the sector of 1100 is all hole");
        assert_eq!(image.seek_hole(1536), 2304, "the end counts as a hole");
        assert_eq!(image.seek_data(2304), None);
        assert_eq!(image.data_bytes(), 2 * 768);
        let bytes: Vec<u8> = vec![7; 100];
        assert_eq!((bytes.size(), bytes.seek_data(5), bytes.seek_hole(5)), (100, Some(5), 100));
    }
}
