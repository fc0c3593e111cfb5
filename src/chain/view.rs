//! The chain reader as an [`ImageView`]: reads are [`ImageReader::read_at`], runs are the
//! pieces of the chain's extent map (a zero frame and a range no backup wrote are holes).

use super::reader::ImageReader;
use crate::view::{ImageView, Run, ViewError};

impl ImageView for ImageReader {
    fn size(&self) -> u64 {
        ImageReader::size(self)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, ViewError> {
        ImageReader::read_at(self, buf, off).map_err(|e| ViewError::new(e.errno(), e))
    }

    fn run_at(&self, pos: u64) -> (Run, u64) {
        match self.map().pieces(pos..pos + 1).first() {
            Some(p) if p.src.is_data() => (Run::Data, p.end),
            Some(p) => (Run::Hole, p.end),
            None => (Run::Hole, self.size()),
        }
    }

    /// Known from the map, without a walk.
    fn data_bytes(&self) -> u64 {
        self.map().data_bytes()
    }
}
