//! Where one expert's bytes are in the files and where they go in its slot: extents (merged
//! where they touch), each keeping its offset modulo [`ALIGN`](super::ALIGN) so that O_DIRECT
//! can read it, and the three matrices (gate, up, down) inside the slot — for quantised ones,
//! their packed words, scales and biases (up to nine pieces), kept quantised — and, for experts
//! with biases (gpt_oss), the three bias vectors after them. gpt_oss's experts are stored
//! otherwise than the engine computes them (gate and up interleaved, transposed, or MXFP4 in
//! the hub's nibble order): read as stored, they are rearranged in their slot once read
//! ([`Rearrange`]), so that a slot holds the same bytes as a pack's extent.

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
    /// gpt_oss: the gate, up and down biases, right after `parts` in the slot.
    pub biases: Option<[SlotPiece; 3]>,
    /// gpt_oss read from its checkpoint: the stored tensors' places in the slot as read, to
    /// be rearranged into `parts` and `biases` before use.
    pub rearrange: Option<Rearrange>,
    /// xxh3-64 of gate ‖ up ‖ down (‖ biases) bytes (packs only).
    pub checksum: Option<u64>,
}

/// An expert read as its checkpoint stores it: where each stored piece landed in the slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Rearrange {
    pub raw: crate::gpt_oss::RawExpert,
    /// Slot offset of each of `raw.pieces`.
    pub at: Vec<usize>,
}

impl ExpertLayout {
    /// Bytes of the expert as computed: its three matrices (and biases), contiguous in the
    /// slot from `parts[0].slot_offset`.
    pub fn bytes(&self) -> u64 {
        let biases = self.biases.as_ref().map_or(0, |b| {
            b.iter().map(|p| p.dtype.nbytes(&p.shape) as u64).sum::<u64>()
        });
        self.parts.iter().map(Part::nbytes).sum::<u64>() + biases
    }

    /// Rearranges a slot read as the checkpoint stores the expert into the layout `parts` and
    /// `biases` describe (no-op for other experts).
    pub fn rearrange_in(&self, slot: &mut [u8]) {
        let Some(r) = &self.rearrange else { return };
        let bytes: Vec<&[u8]> = r
            .raw
            .pieces
            .iter()
            .zip(&r.at)
            .map(|(p, &at)| &slot[at..at + p.len as usize])
            .collect();
        let out = r.raw.rearrange(&bytes);
        let mut at = self.parts[0].slot_offset;
        for b in &out.bytes {
            slot[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
    }
}

/// Extents over `pieces` (file, offset, length), merged where they touch, laid out in the slot
/// so that each extent's first byte keeps its offset modulo [`ALIGN`](super::ALIGN); and the
/// slot offset of each piece.
fn extents_of(pieces: &[(usize, u64, u64)]) -> (Vec<Extent>, Vec<usize>) {
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by_key(|&k| (pieces[k].0, pieces[k].1));
    let mut extents: Vec<Extent> = Vec::new();
    let mut piece_at = vec![(0usize, 0u64); pieces.len()]; // (extent index, offset within)
    for k in order {
        let (file, offset, len) = pieces[k];
        let n = extents.len();
        match extents.last_mut() {
            Some(x) if x.file == file && x.offset + x.len == offset => {
                piece_at[k] = (n - 1, x.len);
                x.len += len;
            }
            _ => {
                piece_at[k] = (n, 0);
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
    let at = piece_at
        .iter()
        .map(|&(xi, within)| extents[xi].slot_offset + within as usize)
        .collect();
    (extents, at)
}

/// gpt_oss's expert read as stored (`raw`), rearranged in its slot into gate, up, down and
/// the three biases, contiguous from the first extent's first byte: the same bytes in all (a
/// permutation; MXFP4's 16 + 1 bytes a block stay 17), so they fit where they were read.
pub(super) fn layout_rearranged(raw: crate::gpt_oss::RawExpert) -> ExpertLayout {
    let pieces: Vec<(usize, u64, u64)> = raw.pieces.iter().map(|p| (p.file, p.offset, p.len)).collect();
    let (extents, at) = extents_of(&pieces);
    let shapes = raw.shapes();
    let (mat, bias) = (raw.mat_dtype(), raw.bias_dtype);
    let mut next = extents.first().map_or(0, |x| x.slot_offset);
    let mut place = |dtype: DType, shape: [usize; 2]| {
        let p = SlotPiece {
            dtype,
            shape,
            slot_offset: next,
        };
        next += dtype.nbytes(&shape);
        p
    };
    let parts = std::array::from_fn(|k| {
        let p = place(mat, shapes[k]);
        Part {
            dtype: p.dtype,
            shape: p.shape,
            slot_offset: p.slot_offset,
            quant: None,
        }
    });
    let biases = std::array::from_fn(|k| place(bias, shapes[3 + k]));
    ExpertLayout {
        extents,
        parts,
        biases: Some(biases),
        rearrange: Some(Rearrange { raw, at }),
        checksum: None,
    }
}

/// Extents of the three matrices (and of quantised ones' scales and biases), merged where
/// they touch, laid out in the slot so that each extent's first byte keeps its offset modulo
/// [`ALIGN`](super::ALIGN) (what an O_DIRECT read needs).
pub(super) fn layout_from_refs(
    refs: &[TensorRef; 3],
    biases: Option<&[crate::moe::Piece; 3]>,
) -> ExpertLayout {
    // Pieces: per matrix its words, then a quantised one's scales and biases; then gpt_oss's
    // expert biases.
    let mut pieces: Vec<(usize, u64, u64)> = Vec::new();
    let mut index = [[0usize; 3]; 3]; // [matrix][role 0 words / 1 scales / 2 biases]
    for (i, r) in refs.iter().enumerate() {
        index[i][0] = pieces.len();
        pieces.push((r.file, r.offset, r.nbytes()));
        if let Some(q) = &r.quant {
            index[i][1] = pieces.len();
            pieces.push((q.scales.file, q.scales.offset, q.scales.nbytes()));
            index[i][2] = pieces.len();
            pieces.push((q.biases.file, q.biases.offset, q.biases.nbytes()));
        }
    }
    let first_bias = pieces.len();
    if let Some(b) = biases {
        pieces.extend(b.iter().map(|p| (p.file, p.offset, p.nbytes())));
    }
    let (extents, at) = extents_of(&pieces);
    let parts = std::array::from_fn(|i| Part {
        dtype: refs[i].dtype,
        shape: refs[i].shape,
        slot_offset: at[index[i][0]],
        quant: refs[i].quant.map(|q| QuantPart {
            spec: q.spec,
            scales: SlotPiece {
                dtype: q.scales.dtype,
                shape: q.scales.shape,
                slot_offset: at[index[i][1]],
            },
            biases: SlotPiece {
                dtype: q.biases.dtype,
                shape: q.biases.shape,
                slot_offset: at[index[i][2]],
            },
        }),
    });
    let biases = biases.map(|b| {
        std::array::from_fn(|k| SlotPiece {
            dtype: b[k].dtype,
            shape: b[k].shape,
            slot_offset: at[first_bias + k],
        })
    });
    ExpertLayout {
        extents,
        parts,
        biases,
        rearrange: None,
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
        let l = layout_from_refs(&[gate, up, down], None);
        assert_eq!(l.extents.len(), 1);
        assert_eq!(l.extents[0].offset, 5000);
        assert_eq!(l.extents[0].len, 192);
        assert_eq!(l.extents[0].slot_offset % ALIGN, 5000 % ALIGN);
        assert_eq!(l.parts[2].slot_offset, l.extents[0].slot_offset);
        assert_eq!(l.parts[0].slot_offset, l.extents[0].slot_offset + 64);
    }

    #[test]
    fn separate_extents_get_separate_pages() {
        let l = layout_from_refs(
            &[r(0, 100, [8, 4]), r(1, 9000, [8, 4]), r(0, 50_000, [4, 8])],
            None,
        );
        assert_eq!(l.extents.len(), 3);
        for x in &l.extents {
            assert_eq!(x.slot_offset % ALIGN, x.offset as usize % ALIGN);
        }
        assert!(l.extents[1].slot_offset >= ALIGN);
    }
}
