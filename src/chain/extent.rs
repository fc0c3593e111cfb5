//! The merged extent map of one image: which layer answers for each byte.
//!
//! Built once per image from its layers, oldest first. A layer that is not incremental
//! (full, copy, raw, or a lost-CBT full inside an `inc` file) starts over: what it does
//! not store is a hole. An incremental layer lays its `data` and `zero` extents over what
//! is there; its gaps show the layers below. A `zero` extent in an incremental counts as
//! "now zero" (upstream restore skips those and keeps stale data; we do not copy that).
//!
//! Invariants: pieces are sorted, non-empty, do not overlap and tile `[0, size)` exactly,
//! so the piece holding any offset is found by binary search (O(log n)).

use std::ops::Range;

use super::scan::{Stored, StreamIndex};

/// Who answers for a piece of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Never written: reads as zeros, shown as a hole.
    Hole,
    /// A `zero` extent: reads as zeros, shown as a hole.
    Zero,
    /// Extent `extent` of layer `layer`.
    Data { layer: u16, extent: u32 },
    /// Layer `layer` is damaged here: reads fail.
    Damaged { layer: u16 },
}

impl Source {
    /// Whether SEEK_DATA should stop here (and `du` count it).
    pub fn is_data(self) -> bool {
        matches!(self, Source::Data { .. } | Source::Damaged { .. })
    }
}

/// `[start, end)` answered by `src`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub end: u64,
    pub src: Source,
}

/// See the module note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentMap {
    pieces: Vec<Piece>,
    size: u64,
}

impl ExtentMap {
    /// Builds the map of `layers` (oldest first) for an image of `size` bytes.
    pub fn build<'a>(layers: impl IntoIterator<Item = &'a StreamIndex>, size: u64) -> ExtentMap {
        let mut pieces = vec![Piece { start: 0, end: size, src: Source::Hole }];
        for (li, layer) in layers.into_iter().enumerate() {
            pieces = apply(pieces, li, layer, size);
        }
        ExtentMap { pieces: coalesce(pieces), size }
    }

    /// The map of this map's chain plus `layer` (layer number `li`), when the image keeps
    /// its size: building each restore point from its parent's map costs one overlay
    /// per point instead of one per layer of the chain.
    pub fn extend(&self, li: usize, layer: &StreamIndex, size: u64) -> Option<ExtentMap> {
        (size == self.size)
            .then(|| ExtentMap { pieces: coalesce(apply(self.pieces.clone(), li, layer, size)), size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The pieces overlapping `range`, in order (the first and last may stick out of it).
    pub fn pieces(&self, range: Range<u64>) -> &[Piece] {
        if range.start >= range.end || range.start >= self.size {
            return &[];
        }
        let first = self.pieces.partition_point(|p| p.end <= range.start);
        let last = self.pieces.partition_point(|p| p.start < range.end);
        &self.pieces[first..last]
    }

    /// Bytes in data pieces: the thin size of the image.
    pub fn data_bytes(&self) -> u64 {
        self.pieces.iter().filter(|p| p.src.is_data()).map(|p| p.end - p.start).sum()
    }

    /// The first data offset at or after `off` (SEEK_DATA), if any.
    pub fn seek_data(&self, off: u64) -> Option<u64> {
        self.pieces(off..self.size).iter().find(|p| p.src.is_data()).map(|p| p.start.max(off))
    }

    /// The first hole offset at or after `off` (SEEK_HOLE); the size counts as a hole.
    pub fn seek_hole(&self, off: u64) -> u64 {
        self.pieces(off..self.size).iter().find(|p| !p.src.is_data()).map_or(self.size, |p| p.start.max(off))
    }
}

/// `pieces` with layer `li` applied (see the module note).
fn apply(mut pieces: Vec<Piece>, li: usize, layer: &StreamIndex, size: u64) -> Vec<Piece> {
    let li = u16::try_from(li).expect("invariant: chains are shorter than 65536 layers");
    if !layer.meta.incremental {
        pieces = vec![Piece { start: 0, end: size, src: Source::Hole }];
    }
    let mut top: Vec<Piece> = layer
        .extents
        .iter()
        .enumerate()
        .filter(|(_, e)| e.start < size)
        .map(|(i, e)| Piece {
            start: e.start,
            end: e.end().min(size),
            src: match e.stored {
                Stored::Zero => Source::Zero,
                _ => Source::Data { layer: li, extent: i as u32 },
            },
        })
        .collect();
    if let Some(d) = &layer.damage {
        let to = layer.meta.virtual_size.min(size);
        if d.from < to {
            top.push(Piece { start: d.from, end: to, src: Source::Damaged { layer: li } });
        }
    }
    overlay(&pieces, &top)
}

/// `base` with `top` laid over it. Both tile-or-sort invariants hold: `base` tiles
/// `[0, size)`; `top` is sorted and non-overlapping.
fn overlay(base: &[Piece], top: &[Piece]) -> Vec<Piece> {
    let mut out = Vec::with_capacity(base.len() + 2 * top.len());
    let mut bi = 0;
    let mut pos = 0;
    let mut emit_base = |out: &mut Vec<Piece>, from: u64, to: u64| {
        while bi < base.len() && base[bi].end <= from {
            bi += 1;
        }
        let mut i = bi;
        while i < base.len() && base[i].start < to {
            let (s, e) = (base[i].start.max(from), base[i].end.min(to));
            if s < e {
                out.push(Piece { start: s, end: e, src: base[i].src });
            }
            i += 1;
        }
    };
    for t in top {
        if t.start > pos {
            emit_base(&mut out, pos, t.start);
        }
        let start = t.start.max(pos);
        if start < t.end {
            out.push(Piece { start, end: t.end, src: t.src });
        }
        pos = pos.max(t.end);
    }
    let end = base.last().map_or(0, |p| p.end);
    if pos < end {
        emit_base(&mut out, pos, end);
    }
    out
}

/// Merges neighbours that read the same way (data pieces never merge: each names its extent).
fn coalesce(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        match out.last_mut() {
            Some(last)
                if last.end == p.start && last.src == p.src && !matches!(p.src, Source::Data { .. }) =>
            {
                last.end = p.end;
            }
            _ => out.push(p),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(start: u64, end: u64, src: Source) -> Piece {
        Piece { start, end, src }
    }
    const D: Source = Source::Data { layer: 1, extent: 0 };

    #[test]
    fn overlay_splits_covers_and_keeps_gaps() {
        let base = vec![p(0, 100, Source::Hole)];
        let top = vec![p(10, 20, D), p(20, 30, Source::Zero), p(90, 100, D)];
        let out = overlay(&base, &top);
        assert_eq!(
            out,
            vec![
                p(0, 10, Source::Hole),
                p(10, 20, D),
                p(20, 30, Source::Zero),
                p(30, 90, Source::Hole),
                p(90, 100, D)
            ]
        );
        let over = overlay(&out, &[p(0, 100, Source::Zero)]);
        assert_eq!(over, vec![p(0, 100, Source::Zero)]);
        assert_eq!(overlay(&out, &[]), out);
    }

    #[test]
    fn lookups_are_by_binary_search_and_seek_works() {
        let m = ExtentMap {
            pieces: vec![p(0, 10, Source::Hole), p(10, 20, D), p(20, 30, Source::Zero), p(30, 40, D)],
            size: 40,
        };
        assert_eq!(m.pieces(0..1), &m.pieces[0..1]);
        assert_eq!(m.pieces(9..11), &m.pieces[0..2]);
        assert_eq!(m.pieces(39..100), &m.pieces[3..4]);
        assert!(m.pieces(40..50).is_empty());
        assert_eq!(m.seek_data(0), Some(10));
        assert_eq!(m.seek_data(15), Some(15));
        assert_eq!(m.seek_data(20), Some(30));
        assert_eq!(m.seek_hole(10), 20);
        assert_eq!(m.seek_hole(35), 40);
        assert_eq!(m.data_bytes(), 20);
    }
}
