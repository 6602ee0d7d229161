//! Where one expert's bytes are in the files and where they go in its slot: extents (merged
//! where they touch), each keeping its offset modulo [`ALIGN`](super::ALIGN) so that O_DIRECT
//! can read it, and the three matrices (gate, up, down) inside the slot — for quantised ones,
//! their packed words, scales and biases (up to nine pieces), kept quantised.

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
    /// [`DType::U32`] for a quantised matrix's packed words.
    pub dtype: DType,
    /// `[out, in]` (of the float matrix a quantised one stands for).
    pub shape: [usize; 2],
    pub slot_offset: usize,
    pub quant: Option<QuantPart>,
}

/// A float tensor inside the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotPiece {
    pub dtype: DType,
    pub shape: [usize; 2],
    pub slot_offset: usize,
}

/// A quantised matrix's scales and biases inside the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantPart {
    pub spec: crate::quant::QuantSpec,
    pub scales: SlotPiece,
    pub biases: SlotPiece,
}

impl Part {
    /// Bytes of the matrix (a quantised one's words, scales and biases).
    pub fn nbytes(&self) -> u64 {
        let piece = |p: &SlotPiece| (p.dtype.nbytes(&p.shape)) as u64;
        match &self.quant {
            Some(q) => {
                (self.shape[0] * q.spec.words_per_row(self.shape[1]) * 4) as u64
                    + piece(&q.scales)
                    + piece(&q.biases)
            }
            None => self.dtype.nbytes(&self.shape) as u64,
        }
    }
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
    parts.iter().map(Part::nbytes).sum()
}

/// Extents of the three matrices (and of quantised ones' scales and biases), merged where
/// they touch, laid out in the slot so that each extent's first byte keeps its offset modulo
/// [`ALIGN`](super::ALIGN) (what an O_DIRECT read needs).
pub(super) fn layout_from_refs(refs: &[TensorRef; 3]) -> ExpertLayout {
    // Pieces: (matrix, role 0 words / 1 scales / 2 biases, file, offset, len).
    let mut pieces: Vec<(usize, usize, usize, u64, u64)> = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        pieces.push((i, 0, r.file, r.offset, r.nbytes()));
        if let Some(q) = &r.quant {
            pieces.push((i, 1, q.scales.file, q.scales.offset, q.scales.nbytes()));
            pieces.push((i, 2, q.biases.file, q.biases.offset, q.biases.nbytes()));
        }
    }
    pieces.sort_by_key(|p| (p.2, p.3));
    let mut extents: Vec<Extent> = Vec::new();
    let mut piece_at = [[(0usize, 0u64); 3]; 3]; // [matrix][role]: (extent index, offset within)
    for &(i, role, file, offset, len) in &pieces {
        let n = extents.len();
        match extents.last_mut() {
            Some(x) if x.file == file && x.offset + x.len == offset => {
                piece_at[i][role] = (n - 1, x.len);
                x.len += len;
            }
            _ => {
                piece_at[i][role] = (n, 0);
                extents.push(Extent {
                    file,
                    offset,
                    len,
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
    let at = |i: usize, role: usize| {
        let (xi, within) = piece_at[i][role];
        extents[xi].slot_offset + within as usize
    };
    let parts = std::array::from_fn(|i| Part {
        dtype: refs[i].dtype,
        shape: refs[i].shape,
        slot_offset: at(i, 0),
        quant: refs[i].quant.map(|q| QuantPart {
            spec: q.spec,
            scales: SlotPiece {
                dtype: q.scales.dtype,
                shape: q.scales.shape,
                slot_offset: at(i, 1),
            },
            biases: SlotPiece {
                dtype: q.biases.dtype,
                shape: q.biases.shape,
                slot_offset: at(i, 2),
            },
        }),
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
            quant: None,
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
