//! The integer dot products of [`super::dot`] on x86 vector units, written once and compiled
//! twice: for AVX-512 VNNI (`vpdpbusd`: 32 byte products a 256-bit instruction) and for AVX2
//! (`vpmaddubsw` + `vpmaddwd`: the same integer sums in two instructions), for the types Q8_0
//! and Q4_K_M files are made of (Q8_0, Q4_0, Q5_0, Q4_K and Q6_K) and the two table types,
//! MXFP4 (gpt-oss's experts) and IQ4_NL, whose nibbles become their values by a byte shuffle
//! on the 16-entry table (`vpshufb`), as ggml's own kernels do.
//!
//! Only the integer sums are vectorised: they are exact, and each block's float arithmetic is
//! the scalar reference's, in the same order, so every result is bit for bit what
//! [`super::dot::dot_scalar`] gives on every CPU (a test holds both to it). That keeps a GGUF
//! model's output the same everywhere, and as close to llama.cpp's as the reference is.
//!
//! Each instance module supplies `dot_u8_i8` (Σ of four adjacent u8·i8 products per i32 lane)
//! and `byte_mask` (bit j of a word set → byte j = 0xFF); the macro brings the rest.

macro_rules! integer_kernels {
    ($features:literal) => {
        /// `out[r · t + i] = row r · a[i]` for `rows` rows of `row_bytes` bytes of `ty` blocks in `w`
        /// and `t = a.len()` tokens; false for a type without a kernel here. Up to four tokens per
        /// pass over a row: a block's weights are unpacked once for them (what makes prefill cheaper
        /// per token than decode).
        ///
        /// # Safety
        /// [`supported`] is true.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn dot_rows(
            ty: BlockType,
            w: &[u8],
            rows: usize,
            row_bytes: usize,
            a: &[Acts],
            out: &mut [f32],
        ) -> bool {
            assert!(w.len() >= rows * row_bytes && out.len() >= rows * a.len());
            // SAFETY (each): the features are the caller's promise; the rows and activations have the
            // sizes the kernels read (checked by the callers' shapes: k values, whole blocks).
            unsafe {
                match ty {
                    BlockType::Q8_0 => by_rows::<Q8_0>(w, rows, row_bytes, a, out),
                    BlockType::Q4_0 => by_rows::<Q4_0>(w, rows, row_bytes, a, out),
                    BlockType::Q5_0 => by_rows::<Q5_0>(w, rows, row_bytes, a, out),
                    BlockType::MXFP4 => by_rows::<Mxfp4>(w, rows, row_bytes, a, out),
                    BlockType::IQ4_NL => by_rows::<Iq4Nl>(w, rows, row_bytes, a, out),
                    BlockType::Q4_K => by_rows::<Q4K>(w, rows, row_bytes, a, out),
                    BlockType::Q6_K => by_rows::<Q6K>(w, rows, row_bytes, a, out),
                    _ => return false,
                }
            }
            true
        }

        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn by_rows<K: Kernel>(w: &[u8], rows: usize, rb: usize, a: &[Acts], out: &mut [f32]) {
            let t = a.len();
            for r in 0..rows {
                let row = &w[r * rb..(r + 1) * rb];
                let out = &mut out[r * t..(r + 1) * t];
                for (c, chunk) in a.chunks(4).enumerate() {
                    let o = &mut out[4 * c..];
                    // SAFETY: as dot_rows'.
                    unsafe {
                        match chunk.len() {
                            1 => o[..1].copy_from_slice(&K::run::<1>(row, [&chunk[0]])),
                            2 => o[..2].copy_from_slice(&K::run::<2>(row, [&chunk[0], &chunk[1]])),
                            3 => o[..3].copy_from_slice(&K::run::<3>(row, [&chunk[0], &chunk[1], &chunk[2]])),
                            _ => o[..4].copy_from_slice(&K::run::<4>(
                                row,
                                [&chunk[0], &chunk[1], &chunk[2], &chunk[3]],
                            )),
                        }
                    }
                }
            }
        }

        /// A block kernel over `T` tokens at once.
        trait Kernel {
            /// # Safety
            /// As [`dot`]'s; `a` holds `T` tokens' activations for the row.
            unsafe fn run<const T: usize>(row: &[u8], a: [&Acts; T]) -> [f32; T];
        }

        /// The f16 at byte `at` of `b`, as f32 (exact; F16C, with no runtime check).
        #[target_feature(enable = $features)]
        #[inline]
        fn half(b: &[u8], at: usize) -> f32 {
            let bits = u16::from_le_bytes([b[at], b[at + 1]]);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
        }

        /// The sum of eight i32 lanes.
        #[target_feature(enable = $features)]
        #[inline]
        fn hsum(v: __m256i) -> i32 {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            _mm_cvtsi128_si32(s)
        }

        /// Thirty-two bytes at `p`.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn load32(p: *const u8) -> __m256i {
            // SAFETY: the caller's 32 readable bytes.
            unsafe { _mm256_loadu_si256(p.cast::<__m256i>()) }
        }

        /// A 32-value block's 16 bytes of nibbles as 32 bytes: low nibbles first, then high.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn nibbles16(p: *const u8) -> __m256i {
            // SAFETY: the caller's 16 readable bytes.
            let q = unsafe { _mm_loadu_si128(p.cast::<__m128i>()) };
            let m = _mm_set1_epi8(0x0F);
            _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16::<4>(q), m),
                _mm_and_si128(q, m),
            )
        }

        /// A 32-value type: its block bytes, the offset its values carry, and how a block's 32 weights
        /// become the bytes vpdpbusd multiplies (`signed`: they are signed and go through |w| and the
        /// sign moved onto the activations). The scale is the block's first field: an f16, or
        /// (`E8M0`) MXFP4's exponent byte, read as [`super::super::e8m0_half`] reads it.
        trait Block32 {
            const BB: usize;
            const OFFSET: i32;
            const SIGNED: bool;
            const E8M0: bool = false;
            /// # Safety
            /// `b` points at a whole block; the CPU has the features of this file.
            unsafe fn weights(b: *const u8) -> __m256i;
        }

        #[allow(non_camel_case_types)]
        struct Q8_0;
        impl Block32 for Q8_0 {
            const BB: usize = 34;
            const OFFSET: i32 = 0;
            const SIGNED: bool = true;
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn weights(b: *const u8) -> __m256i {
                // SAFETY: 32 weight bytes after the scale.
                unsafe { load32(b.add(2)) }
            }
        }

        #[allow(non_camel_case_types)]
        struct Q4_0;
        impl Block32 for Q4_0 {
            const BB: usize = 18;
            const OFFSET: i32 = 8;
            const SIGNED: bool = false;
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn weights(b: *const u8) -> __m256i {
                // SAFETY: 16 nibble bytes after the scale.
                unsafe { nibbles16(b.add(2)) }
            }
        }

        #[allow(non_camel_case_types)]
        struct Q5_0;
        impl Block32 for Q5_0 {
            const BB: usize = 22;
            const OFFSET: i32 = 16;
            const SIGNED: bool = false;
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn weights(b: *const u8) -> __m256i {
                // SAFETY: qh (4 bytes) and 16 nibble bytes after the scale.
                unsafe {
                    let qh = std::ptr::read_unaligned(b.add(2).cast::<u32>());
                    // Byte j gets 0x10 where bit j of qh is set.
                    let high = _mm256_and_si256(byte_mask(qh), _mm256_set1_epi8(0x10));
                    _mm256_or_si256(nibbles16(b.add(6)), high)
                }
            }
        }

        /// A block's 16 nibble bytes at `p` as their 32 values in `table` (low nibbles first, then
        /// high): one byte shuffle, the table in both 128-bit halves.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn lookup16(table: __m128i, p: *const u8) -> __m256i {
            // SAFETY: the caller's 16 readable bytes.
            unsafe { _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(table), nibbles16(p)) }
        }

        /// MXFP4: the table's values plus 12 (0..=24, unsigned, so no sign moves onto the
        /// activations; 12 · Σx comes off each block's sum), scale an E8M0 byte.
        struct Mxfp4;
        impl Block32 for Mxfp4 {
            const BB: usize = 17;
            const OFFSET: i32 = 12;
            const SIGNED: bool = false;
            const E8M0: bool = true;
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn weights(b: *const u8) -> __m256i {
                // SAFETY: the 16-byte table, and 16 nibble bytes after the scale byte.
                unsafe {
                    let values = _mm_loadu_si128(super::super::MXFP4_VALUES.as_ptr().cast::<__m128i>());
                    lookup16(_mm_add_epi8(values, _mm_set1_epi8(12)), b.add(1))
                }
            }
        }

        /// IQ4_NL: the table's values as they are (signed, up to 127 in magnitude: with an offset
        /// they would overflow vpmaddubsw's 16-bit pairs), scale an f16.
        struct Iq4Nl;
        impl Block32 for Iq4Nl {
            const BB: usize = 18;
            const OFFSET: i32 = 0;
            const SIGNED: bool = true;
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn weights(b: *const u8) -> __m256i {
                // SAFETY: the 16-byte table, and 16 nibble bytes after the scale.
                unsafe {
                    let values = _mm_loadu_si128(super::super::IQ4_NL_VALUES.as_ptr().cast::<__m128i>());
                    lookup16(values, b.add(2))
                }
            }
        }

        /// Eight blocks' scale fields (f16 bits, or E8M0 bytes) as floats, bit for bit the
        /// reference's: `_mm256_cvtph_ps`, or `2^(e - 128)` built in the exponent field (e ≥ 2)
        /// and as the subnormal `2^21 << e` below.
        #[target_feature(enable = $features)]
        #[inline]
        fn scales8<B: Block32>(fields: [i16; 8]) -> __m256 {
            let v = _mm_setr_epi16(
                fields[0], fields[1], fields[2], fields[3], fields[4], fields[5], fields[6], fields[7],
            );
            if !B::E8M0 {
                return _mm256_cvtph_ps(v);
            }
            let e = _mm256_cvtepu16_epi32(v);
            let normal = _mm256_slli_epi32::<23>(_mm256_sub_epi32(e, _mm256_set1_epi32(1)));
            let subnormal = _mm256_sllv_epi32(_mm256_set1_epi32(0x0020_0000), e);
            let small = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e);
            _mm256_castsi256_ps(_mm256_blendv_epi8(normal, subnormal, small))
        }

        /// One block's scale, as [`scales8`] gives it.
        #[target_feature(enable = $features)]
        #[inline]
        fn scale1<B: Block32>(b: &[u8]) -> f32 {
            if B::E8M0 {
                super::super::e8m0_half(b[0])
            } else {
                half(b, 0)
            }
        }

        impl<B: Block32> Kernel for B {
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn run<const T: usize>(row: &[u8], a: [&Acts; T]) -> [f32; T] {
                // SAFETY: as blocks32's.
                unsafe { blocks32::<B, T>(row, a) }
            }
        }

        /// Eight blocks' eight-lane partial sums to eight sums: horizontal adds, then the halves.
        #[target_feature(enable = $features)]
        #[inline]
        fn sums8(p: &[__m256i; 8]) -> __m256i {
            let h01 = _mm256_hadd_epi32(p[0], p[1]);
            let h23 = _mm256_hadd_epi32(p[2], p[3]);
            let h45 = _mm256_hadd_epi32(p[4], p[5]);
            let h67 = _mm256_hadd_epi32(p[6], p[7]);
            let (h0123, h4567) = (_mm256_hadd_epi32(h01, h23), _mm256_hadd_epi32(h45, h67));
            _mm256_add_epi32(
                _mm256_permute2x128_si256::<0x20>(h0123, h4567),
                _mm256_permute2x128_si256::<0x31>(h0123, h4567),
            )
        }

        /// Blocks `i .. i + G` of a row at `rp`: each token's eight partial integer sums per block
        /// (weights unpacked once for all tokens), and the blocks' scale fields.
        ///
        /// # Safety
        /// The blocks are inside the row and their activations inside each token's; the CPU has the
        /// features of this file.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn partials<B: Block32, const T: usize, const G: usize>(
            rp: *const u8,
            a: &[&Acts; T],
            i: usize,
        ) -> ([[__m256i; G]; T], [i16; 8]) {
            let mut p = [[_mm256_setzero_si256(); G]; T];
            let mut dws = [0i16; 8];
            for j in 0..G {
                // SAFETY: the caller's: block i + j is inside the row, its activations in each token's.
                unsafe {
                    let b = rp.add((i + j) * B::BB);
                    dws[j] = if B::E8M0 {
                        i16::from(*b)
                    } else {
                        std::ptr::read_unaligned(b.cast::<i16>())
                    };
                    let w = B::weights(b);
                    let wu = if B::SIGNED { _mm256_abs_epi8(w) } else { w };
                    for (t, pt) in p.iter_mut().enumerate() {
                        let x = load32(a[t].q.as_ptr().add(32 * (i + j)).cast::<u8>());
                        let x = if B::SIGNED { _mm256_sign_epi8(x, w) } else { x };
                        pt[j] = dot_u8_i8(wu, x);
                    }
                }
            }
            (p, dws)
        }

        /// A row of 32-value blocks against `T` tokens: eight blocks at a time, their weights unpacked
        /// once, each token's eight integer sums reduced together, scaled with the scalar reference's
        /// float operations lane by lane and added to its [`Lanes`](super::super::dot::Lanes), so each result
        /// is the reference's bit for bit.
        ///
        /// # Safety
        /// The CPU has the features of this file; `row` is whole blocks whose activations are in each
        /// of `a`.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn blocks32<B: Block32, const T: usize>(row: &[u8], a: [&Acts; T]) -> [f32; T] {
            let n = row.len() / B::BB;
            for t in &a {
                assert!(t.q.len() >= n * 32 && t.d.len() >= n && t.sums.len() >= n);
            }
            let rp = row.as_ptr();
            let mut lanes = [_mm256_setzero_ps(); T];
            let mut i = 0;
            while i + 8 <= n {
                // SAFETY: blocks i .. i + 8 are inside the row, their activations in each token's.
                let (p, dws) = unsafe { partials::<B, T, 8>(rp, &a, i) };
                let dw = scales8::<B>(dws);
                for (t, pt) in p.iter().enumerate() {
                    let mut s = sums8(pt);
                    // SAFETY (both loads): blocks i .. i + 8 have their activation sums and scales.
                    if B::OFFSET != 0 {
                        let sums = unsafe { _mm256_loadu_si256(a[t].sums.as_ptr().add(i).cast::<__m256i>()) };
                        s = _mm256_sub_epi32(s, _mm256_mullo_epi32(sums, _mm256_set1_epi32(B::OFFSET)));
                    }
                    let dx = unsafe { _mm256_loadu_ps(a[t].d.as_ptr().add(i)) };
                    // The reference: term = s as f32 · (dw · dx), added to lane i % 8 (i is a
                    // multiple of 8).
                    lanes[t] = _mm256_add_ps(
                        lanes[t],
                        _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, dx)),
                    );
                }
                i += 8;
            }
            // Four blocks left (rows of 128 or 160 values: expert down projections of narrow
            // experts): the same, on the lanes' low half (i is still a multiple of 8).
            if i + 4 <= n {
                // SAFETY: blocks i .. i + 4 are inside the row, their activations in each token's.
                let (p, dws) = unsafe { partials::<B, T, 4>(rp, &a, i) };
                // (dws[4..] are zero: their lanes are dropped.)
                let dw = _mm256_castps256_ps128(scales8::<B>(dws));
                for (t, pt) in p.iter().enumerate() {
                    // Four blocks' eight partial sums to four sums.
                    let h = _mm256_hadd_epi32(
                        _mm256_hadd_epi32(pt[0], pt[1]),
                        _mm256_hadd_epi32(pt[2], pt[3]),
                    );
                    let mut s4 = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
                    // SAFETY (both loads): blocks i .. i + 4 have their activation sums and scales.
                    if B::OFFSET != 0 {
                        let sums = unsafe { _mm_loadu_si128(a[t].sums.as_ptr().add(i).cast::<__m128i>()) };
                        s4 = _mm_sub_epi32(s4, _mm_mullo_epi32(sums, _mm_set1_epi32(B::OFFSET)));
                    }
                    let dx = unsafe { _mm_loadu_ps(a[t].d.as_ptr().add(i)) };
                    let term = _mm_mul_ps(_mm_cvtepi32_ps(s4), _mm_mul_ps(dw, dx));
                    lanes[t] = _mm256_add_ps(
                        lanes[t],
                        _mm256_insertf128_ps::<0>(_mm256_setzero_ps(), term),
                    );
                }
                i += 4;
            }
            let mut out = [0.0f32; T];
            for t in 0..T {
                let mut l = [0.0f32; 8];
                // SAFETY: eight floats.
                unsafe { _mm256_storeu_ps(l.as_mut_ptr(), lanes[t]) };
                let mut acc = super::super::dot::Lanes(l);
                for b in i..n {
                    // SAFETY: block b is inside the row, its activations inside the token's.
                    let s = unsafe {
                        let w = B::weights(rp.add(b * B::BB));
                        let x = load32(a[t].q.as_ptr().add(32 * b).cast::<u8>());
                        if B::SIGNED {
                            hsum(dot_u8_i8(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)))
                        } else {
                            hsum(dot_u8_i8(w, x))
                        }
                    } - B::OFFSET * a[t].sums[b];
                    acc.add(b, s as f32 * (scale1::<B>(&row[b * B::BB..]) * a[t].d[b]));
                }
                out[t] = acc.total();
            }
            out
        }

        struct Q4K;

        /// A Q4_K block's eight 6-bit scales and eight mins from their 12 packed bytes, four to a
        /// word (the bit layout of [`super::super::scale_min_k4`], done on whole words).
        #[inline(always)]
        fn q4k_scales_mins(p: &[u8]) -> ([u8; 8], [u8; 8]) {
            let word = |i: usize| u32::from_le_bytes([p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]]);
            let (w0, w1, w2) = (word(0), word(1), word(2));
            let low = 0x3f3f_3f3f;
            let sc_hi = (w2 & 0x0f0f_0f0f) | (((w0 >> 6) & 0x0303_0303) << 4);
            let m_hi = ((w2 >> 4) & 0x0f0f_0f0f) | (((w1 >> 6) & 0x0303_0303) << 4);
            let mut sc = [0u8; 8];
            let mut m = [0u8; 8];
            sc[..4].copy_from_slice(&(w0 & low).to_le_bytes());
            sc[4..].copy_from_slice(&sc_hi.to_le_bytes());
            m[..4].copy_from_slice(&(w1 & low).to_le_bytes());
            m[4..].copy_from_slice(&m_hi.to_le_bytes());
            (sc, m)
        }

        impl Kernel for Q4K {
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn run<const T: usize>(row: &[u8], a: [&Acts; T]) -> [f32; T] {
                let m = _mm256_set1_epi8(0x0F);
                let mut lanes = [super::super::dot::Lanes::default(); T];
                for (i, b) in row.chunks_exact(144).enumerate() {
                    let (sc, mn) = q4k_scales_mins(&b[4..16]);
                    // SAFETY: eight bytes each.
                    let (scv, mnv) = unsafe {
                        (
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64(sc.as_ptr().cast::<__m128i>())),
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64(mn.as_ptr().cast::<__m128i>())),
                        )
                    };
                    // Per token, sub-block j's eight partial sums.
                    let mut p = [[_mm256_setzero_si256(); 8]; T];
                    for c in 0..4 {
                        // SAFETY: 32 bytes of chunk c.
                        let q = unsafe { load32(b.as_ptr().add(16 + 32 * c)) };
                        let (lo, hi) = (
                            _mm256_and_si256(q, m),
                            _mm256_and_si256(_mm256_srli_epi16::<4>(q), m),
                        );
                        for (t, pt) in p.iter_mut().enumerate() {
                            // SAFETY: 64 activations of block i from 64·c.
                            let (xl, xh) = unsafe {
                                let xp = a[t].q.as_ptr().add(i * 256 + 64 * c).cast::<u8>();
                                (load32(xp), load32(xp.add(32)))
                            };
                            pt[2 * c] = dot_u8_i8(lo, xl);
                            pt[2 * c + 1] = dot_u8_i8(hi, xh);
                        }
                    }
                    let (d, dmin) = (half(b, 0), half(b, 2));
                    for t in 0..T {
                        // Σ_j scale_j · (sub-block j's sum), and Σ_j min_j · (its activations' sum).
                        let isum = hsum(_mm256_mullo_epi32(sums8(&p[t]), scv));
                        // SAFETY: the block's 16 activation sums.
                        let pairs = unsafe {
                            let sp = a[t].sums.as_ptr().add(i * 16).cast::<__m256i>();
                            _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(
                                _mm256_loadu_si256(sp),
                                _mm256_loadu_si256(sp.add(1)),
                            ))
                        };
                        let mins = hsum(_mm256_mullo_epi32(pairs, mnv));
                        let dy = a[t].d[i];
                        lanes[t].add(i, (dy * d) * isum as f32 - (dy * dmin) * mins as f32);
                    }
                }
                let mut out = [0.0f32; T];
                for (o, l) in out.iter_mut().zip(&lanes) {
                    *o = l.total();
                }
                out
            }
        }

        struct Q6K;
        impl Kernel for Q6K {
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn run<const T: usize>(row: &[u8], a: [&Acts; T]) -> [f32; T] {
                let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
                // Scale bytes in the order the sums come out of the horizontal adds below.
                let order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
                let mut lanes = [super::super::dot::Lanes::default(); T];
                for (i, b) in row.chunks_exact(210).enumerate() {
                    // SAFETY: the block's 16 scale bytes.
                    let sc = unsafe { _mm_loadu_si128(b.as_ptr().add(192).cast::<__m128i>()) };
                    let (sc_lo, sc_hi) = (
                        _mm256_cvtepi8_epi32(sc),
                        _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(sc)),
                    );
                    let ordered = _mm_shuffle_epi8(sc, order);
                    let (so_lo, so_hi) = (
                        _mm256_cvtepi8_epi32(ordered),
                        _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(ordered)),
                    );
                    // Per token, quarter v = 4n + c's partial sums: lanes 0–3 group 8n + 2c, 4–7 the next.
                    let mut p = [[_mm256_setzero_si256(); 8]; T];
                    for n in 0..2 {
                        // SAFETY: ql bytes 64n..64n+64, qh bytes 32n..32n+32 of the block.
                        let (qa, qb, qh) = unsafe {
                            (
                                load32(b.as_ptr().add(64 * n)),
                                load32(b.as_ptr().add(64 * n + 32)),
                                load32(b.as_ptr().add(128 + 32 * n)),
                            )
                        };
                        let values = [
                            _mm256_or_si256(
                                _mm256_and_si256(qa, m4),
                                _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2)),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(qb, m4),
                                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2)),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(qa), m4),
                                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2)),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(qb), m4),
                                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2)),
                            ),
                        ];
                        for (c, w) in values.into_iter().enumerate() {
                            for (t, pt) in p.iter_mut().enumerate() {
                                // SAFETY: 32 activations of block i from 128n + 32c.
                                let x = unsafe {
                                    load32(a[t].q.as_ptr().add(i * 256 + 128 * n + 32 * c).cast::<u8>())
                                };
                                pt[4 * n + c] = dot_u8_i8(w, x);
                            }
                        }
                    }
                    let d = half(b, 208);
                    for t in 0..T {
                        let pt = &p[t];
                        // Two rounds of horizontal adds: [v0 A, v1 A, v2 A, v3 A | v0 B, v1 B, v2 B, v3 B].
                        let h0123 = _mm256_hadd_epi32(
                            _mm256_hadd_epi32(pt[0], pt[1]),
                            _mm256_hadd_epi32(pt[2], pt[3]),
                        );
                        let h4567 = _mm256_hadd_epi32(
                            _mm256_hadd_epi32(pt[4], pt[5]),
                            _mm256_hadd_epi32(pt[6], pt[7]),
                        );
                        let raw = hsum(_mm256_add_epi32(
                            _mm256_mullo_epi32(h0123, so_lo),
                            _mm256_mullo_epi32(h4567, so_hi),
                        ));
                        // The values' offset of 32: Σ_g scale_g · 32 · (group g's activation sum).
                        // SAFETY: the block's 16 activation sums.
                        let offset = unsafe {
                            let sp = a[t].sums.as_ptr().add(i * 16).cast::<__m256i>();
                            hsum(_mm256_add_epi32(
                                _mm256_mullo_epi32(_mm256_loadu_si256(sp), sc_lo),
                                _mm256_mullo_epi32(_mm256_loadu_si256(sp.add(1)), sc_hi),
                            ))
                        };
                        lanes[t].add(i, (a[t].d[i] * d) * (raw - 32 * offset) as f32);
                    }
                }
                let mut out = [0.0f32; T];
                for (o, l) in out.iter_mut().zip(&lanes) {
                    *o = l.total();
                }
                out
            }
        }
    };
}

/// On AVX-512 (VNNI, BW, VL).
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::super::BlockType;
    use super::super::dot::Acts;

    /// Whether this CPU has what these kernels need.
    pub(crate) fn supported() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            use std::arch::is_x86_feature_detected as has;
            has!("avx512f")
                && has!("avx512bw")
                && has!("avx512vl")
                && has!("avx512vnni")
                && has!("avx2")
                && has!("f16c")
        })
    }

    /// Σ w·x over 32 unsigned `w` (0..=255) and signed `x`, as 8 partial sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    #[inline]
    fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
    }

    /// Byte j = 0xFF where bit j of `bits` is set.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    #[inline]
    fn byte_mask(bits: u32) -> __m256i {
        _mm256_movm_epi8(bits)
    }

    integer_kernels!("avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c");
}

/// On AVX2 (with FMA and F16C: every x86 CPU since 2013–2015).
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::super::BlockType;
    use super::super::dot::Acts;

    /// Whether this CPU has what these kernels need.
    pub(crate) fn supported() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            use std::arch::is_x86_feature_detected as has;
            has!("avx2") && has!("fma") && has!("f16c")
        })
    }

    /// Σ w·x over 32 unsigned `w` and signed `x`, as 8 partial sums: pairs of products in 16
    /// bits, then pairs of pairs in 32. Exact here: every `w` these kernels pass is at most 128
    /// (IQ4_NL's |values| at most 127, MXFP4's offset values at most 24) and every `x` at most
    /// 127 in magnitude, so a pair stays within i16 (2·128·127 < 32767).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    /// Byte j = 0xFF where bit j of `bits` is set: each byte gets the word's byte j / 8, then
    /// its own bit is tested.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn byte_mask(bits: u32) -> __m256i {
        let v = _mm256_set1_epi32(bits as i32);
        let spread = _mm256_shuffle_epi8(
            v,
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3,
                3,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
    }

    integer_kernels!("avx2,fma,f16c");
}
