//! Where one expert's bytes are in the files and where they go in its slot: up to three
//! extents (merged where they touch), each keeping its offset modulo [`ALIGN`](super::ALIGN)
//! so that O_DIRECT can read it, and the three matrices (gate, up, down) inside the slot.

use super::{align_down, align_up};
use crate::moe::TensorRef;
use crate::weights::DType;

/// A byte range of a file that lands at `slot_offset` in the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub file: usize,
    pub offset: u64,
    pub len: u64,
    pub slot_offset: usize,
}

/// One matrix of an expert inside its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub dtype: DType,
    pub shape: [usize; 2],
    pub slot_offset: usize,
}

/// Where one expert's bytes are, and where they go.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertLayout {
    pub extents: Vec<Extent>,
    /// gate, up, down.
    pub parts: [Part; 3],
    /// xxh3-64 of gate ‖ up ‖ down bytes (packs only).
    pub checksum: Option<u64>,
}

pub(super) fn parts_bytes(parts: &[Part; 3]) -> u64 {
    parts
        .iter()
        .map(|p| (p.shape[0] * p.shape[1] * p.dtype.size()) as u64)
        .sum()
}

/// Extents of the three matrices, merged where they touch, laid out in the slot so that each
/// extent's first byte keeps its offset modulo [`ALIGN`](super::ALIGN) (what an O_DIRECT read
/// needs).
pub(super) fn layout_from_refs(refs: &[TensorRef; 3]) -> ExpertLayout {
    let mut order: Vec<usize> = (0..3).collect();
    order.sort_by_key(|&i| (refs[i].file, refs[i].offset));
    let mut extents: Vec<Extent> = Vec::new();
    let mut part_at = [(0usize, 0u64); 3]; // (extent index, offset within extent)
    for &i in &order {
        let r = &refs[i];
        let n = extents.len();
        match extents.last_mut() {
            Some(x) if x.file == r.file && x.offset + x.len == r.offset => {
                part_at[i] = (n - 1, x.len);
                x.len += r.nbytes();
            }
            _ => {
                part_at[i] = (extents.len(), 0);
                extents.push(Extent {
                    file: r.file,
                    offset: r.offset,
                    len: r.nbytes(),
                    slot_offset: 0,
                });
            }
        }
    }
    let mut base = 0u64;
    for x in &mut extents {
        let lead = x.offset - align_down(x.offset);
        x.slot_offset = (base + lead) as usize;
        base += align_up(lead + x.len);
    }
    let parts = std::array::from_fn(|i| {
        let (xi, within) = part_at[i];
        Part {
            dtype: refs[i].dtype,
            shape: refs[i].shape,
            slot_offset: extents[xi].slot_offset + within as usize,
        }
    });
    ExpertLayout {
        extents,
        parts,
        checksum: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::ALIGN;
    use super::*;

    fn r(file: usize, offset: u64, shape: [usize; 2]) -> TensorRef {
        TensorRef {
            file,
            offset,
            dtype: DType::BF16,
            shape,
        }
    }

    #[test]
    fn touching_extents_merge_and_keep_alignment_phase() {
        // down | gate | up contiguous in one file, starting mid-page.
        let down = r(0, 5000, [4, 8]); // 64 bytes
        let gate = r(0, 5064, [8, 4]);
        let up = r(0, 5128, [8, 4]);
        let l = layout_from_refs(&[gate, up, down]);
        assert_eq!(l.extents.len(), 1);
        assert_eq!(l.extents[0].offset, 5000);
        assert_eq!(l.extents[0].len, 192);
        assert_eq!(l.extents[0].slot_offset % ALIGN, 5000 % ALIGN);
        assert_eq!(l.parts[2].slot_offset, l.extents[0].slot_offset);
        assert_eq!(l.parts[0].slot_offset, l.extents[0].slot_offset + 64);
    }

    #[test]
    fn separate_extents_get_separate_pages() {
        let l = layout_from_refs(&[r(0, 100, [8, 4]), r(1, 9000, [8, 4]), r(0, 50_000, [4, 8])]);
        assert_eq!(l.extents.len(), 3);
        for x in &l.extents {
            assert_eq!(x.slot_offset % ALIGN, x.offset as usize % ALIGN);
        }
        assert!(l.extents[1].slot_offset >= ALIGN);
    }
}
