//! Dot products of GGUF-quantized weight rows with f32 activations, read straight from the
//! quantized bytes.
//!
//! Decoding reads every weight once per token, so its speed is set by how many bytes the
//! weights take; a 4-bit row is a quarter of the f16 one. Each value is still dequantized
//! exactly (scale times quant, plus offset) and multiplied with `x` in f32: the activations
//! are never quantized, so the result equals `quant::dequantize` followed by an f32 dot
//! product up to rounding.
//!
//! Formats whose values are `d * q + m` per block (Q4_1, Q5_1, and Q4_K and Q5_K with their
//! per-sub-block mins) are computed as `d * sum(q * x) + m * sum(x)`: the sums of `x` over
//! 32-element blocks are the same for every row of a matrix-vector product, so
//! `block_sums` computes them once per vector and each row adds one term per block. The
//! fixed biases of Q4_0, Q5_0 and Q6_K (`-8`, `-16`, `-32`) are instead subtracted from the
//! integer quants, exactly: folded into the sums, they would leave `sum(q * x)` to cancel
//! against `bias * sum(x)` and cost digits whenever `x` has a mean.
//!
//! Every type has an AVX2 kernel; other CPUs dequantize a chunk at a time and multiply.

use crate::quant::{dequantize, GgmlType};

/// Elements summed into one entry of `block_sums`.
const SUM_BLOCK: usize = 32;

/// Sums of `x` over consecutive 32-element blocks (`x.len()` must be a multiple of 32), to be
/// passed to every `dot_row` call with the same `x`.
pub fn block_sums(x: &[f32]) -> Vec<f32> {
    assert_eq!(x.len() % SUM_BLOCK, 0, "length is not a multiple of 32");
    x.chunks_exact(SUM_BLOCK)
        .map(|block| {
            // Lane-wise partial sums vectorise; a plain running sum would not.
            let mut lanes = [0f32; 8];
            for part in block.chunks_exact(8) {
                for (lane, v) in lanes.iter_mut().zip(part) {
                    *lane += v;
                }
            }
            lanes.iter().sum()
        })
        .collect()
}

/// Whether `dot_row` reads `sums` for rows of this type.
fn uses_sums(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K
    )
}

/// Dot product of one quantized row with `x`: `row` holds exactly `x.len()` elements of type
/// `ty`, and `sums` is `block_sums(x)` (types without offsets ignore it, so it may be empty
/// for them).
pub fn dot_row(ty: GgmlType, row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    assert_eq!(x.len() % ty.block_len(), 0, "row is not whole blocks");
    assert_eq!(row.len(), ty.row_bytes(x.len()), "byte length mismatch");
    if uses_sums(ty) {
        assert_eq!(
            sums.len(),
            x.len() / SUM_BLOCK,
            "block sums of another vector"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // Safety: `available` checked the CPU features the kernels are compiled for, and the
        // asserts above the lengths they index by.
        return unsafe { simd::dot_row(ty, row, x, sums) };
    }
    dot_row_scalar(ty, row, x)
}

/// Elements dequantized at a time by the portable path: a multiple of every block length.
const SCALAR_CHUNK: usize = 256;

/// The portable path: dequantize a chunk at a time onto the stack and multiply.
fn dot_row_scalar(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let mut buf = [0f32; SCALAR_CHUNK];
    let mut total = 0.0;
    for (bytes, x) in row
        .chunks(ty.row_bytes(SCALAR_CHUNK))
        .zip(x.chunks(SCALAR_CHUNK))
    {
        let w = &mut buf[..x.len()];
        dequantize(ty, bytes, w);
        total += w.iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! AVX2 kernels. Quants are widened to one i32 lane per element (straight from memory
    //! where the layout allows), converted to f32 and multiplied with `x`; the products of a
    //! block are scaled by its `d` into accumulators that live across the whole row.

    use super::GgmlType;
    use std::arch::x86_64::*;

    pub use crate::kernels::simd::available;
    use crate::kernels::simd::hsum;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_row(ty: GgmlType, row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        match ty {
            GgmlType::F32 => dot_f32(row, x),
            GgmlType::F16 => dot_f16(row, x),
            GgmlType::Bf16 => dot_bf16(row, x),
            GgmlType::Q4_0 => dot_q4_0(row, x),
            GgmlType::Q4_1 => dot_q4_1(row, x, sums),
            GgmlType::Q5_0 => dot_q5_0(row, x),
            GgmlType::Q5_1 => dot_q5_1(row, x, sums),
            GgmlType::Q8_0 => dot_q8_0(row, x),
            GgmlType::Q4K => dot_q4_k(row, x, sums),
            GgmlType::Q5K => dot_q5_k(row, x, sums),
            GgmlType::Q6K => dot_q6_k(row, x),
        }
    }

    /// The f16 at `p` (any alignment) in all eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn splat_f16(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_set1_epi16(p.cast::<i16>().read_unaligned()))
    }

    /// Eight bytes at `p` zero-extended to i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn u8x8(p: *const u8) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()))
    }

    /// Eight bytes at `p` sign-extended to i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn i8x8(p: *const u8) -> __m256i {
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))
    }

    /// `sum q[i] * x[i]` over 32 elements given as four vectors of eight i32 quants, in lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot32(q: [__m256i; 4], x: *const f32) -> __m256 {
        let mut p = _mm256_mul_ps(_mm256_cvtepi32_ps(q[0]), _mm256_loadu_ps(x));
        for (k, q) in q.iter().enumerate().skip(1) {
            p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*q), _mm256_loadu_ps(x.add(8 * k)), p);
        }
        p
    }

    /// The 32 nibbles of a 16-byte run in element order: low nibbles first, then high ones.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(qs: *const u8) -> [__m256i; 4] {
        let (a, b) = (u8x8(qs), u8x8(qs.add(8)));
        let low = _mm256_set1_epi32(0x0f);
        [
            _mm256_and_si256(a, low),
            _mm256_and_si256(b, low),
            _mm256_srli_epi32(a, 4),
            _mm256_srli_epi32(b, 4),
        ]
    }

    /// Lane `i` of entry `b` is 16 if bit `i` of `b` is set: the fifth bits of eight Q5
    /// quants. One load from this table replaces a shift, a mask and a broadcast.
    static FIFTH_BITS: [Lanes; 256] = fifth_bits_table();

    #[derive(Clone, Copy)]
    #[repr(align(32))]
    struct Lanes([u32; 8]);

    const fn fifth_bits_table() -> [Lanes; 256] {
        let mut table = [Lanes([0; 8]); 256];
        let mut byte = 0;
        while byte < 256 {
            let mut lane = 0;
            while lane < 8 {
                table[byte].0[lane] = ((byte >> lane) as u32 & 1) << 4;
                lane += 1;
            }
            byte += 1;
        }
        table
    }

    /// 16 or 0 for each of 32 elements: bit `i` of `bits` belongs to element `i`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fifth_bits(bits: u32) -> [__m256i; 4] {
        bits.to_le_bytes()
            .map(|byte| _mm256_load_si256(FIFTH_BITS[byte as usize].0.as_ptr().cast()))
    }

    /// Adds the fifth bits to 32 quants.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn with_fifth_bits(q: [__m256i; 4], bits: u32) -> [__m256i; 4] {
        let high = fifth_bits(bits);
        std::array::from_fn(|k| _mm256_or_si256(q[k], high[k]))
    }

    /// Rows of 32-element blocks that start with an f16 scale `d`, then for formats with
    /// `has_min` an f16 offset `m`, and whose values are `d * q + m`; `quants` decodes the
    /// `q` of the block at a pointer.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_blocks32(
        row: &[u8],
        x: &[f32],
        sums: &[f32],
        block_bytes: usize,
        has_min: bool,
        quants: impl Fn(*const u8) -> [__m256i; 4],
    ) -> f32 {
        let mut acc = _mm256_setzero_ps();
        // Lane 1 gathers m * sum(x): one FMA per block, where extracting `m` to a scalar
        // would take three instructions.
        let mut offsets = _mm_setzero_ps();
        let blocks = row.chunks_exact(block_bytes).zip(x.chunks_exact(32));
        for (i, (b, x)) in blocks.enumerate() {
            let b = b.as_ptr();
            let header = if has_min {
                b.cast::<u32>().read_unaligned()
            } else {
                b.cast::<u16>().read_unaligned().into()
            };
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(header as i32));
            let qx = dot32(quants(b), x.as_ptr());
            acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dm), qx, acc);
            if has_min {
                offsets = _mm_fmadd_ps(dm, _mm_broadcast_ss(&sums[i]), offsets);
            }
        }
        hsum(acc) + _mm_cvtss_f32(_mm_movehdup_ps(offsets))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_0(row: &[u8], x: &[f32]) -> f32 {
        let eight = _mm256_set1_epi32(8);
        dot_blocks32(row, x, &[], 18, false, |b| {
            nibbles(b.add(2)).map(|q| _mm256_sub_epi32(q, eight))
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_1(row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        dot_blocks32(row, x, sums, 20, true, |b| nibbles(b.add(4)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q5_0(row: &[u8], x: &[f32]) -> f32 {
        dot_blocks32(row, x, &[], 22, false, |b| {
            let qh = b.add(2).cast::<u32>().read_unaligned();
            // q - 16 is the nibble, less 16 where the fifth bit is clear.
            let (low, clear) = (nibbles(b.add(6)), fifth_bits(!qh));
            std::array::from_fn(|k| _mm256_sub_epi32(low[k], clear[k]))
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q5_1(row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        dot_blocks32(row, x, sums, 24, true, |b| {
            let qh = b.add(4).cast::<u32>().read_unaligned();
            with_fifth_bits(nibbles(b.add(8)), qh)
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        dot_blocks32(row, x, &[], 34, false, |b| {
            let q = b.add(2);
            [i8x8(q), i8x8(q.add(8)), i8x8(q.add(16)), i8x8(q.add(24))]
        })
    }

    /// The eight 6-bit scales (bytes 0..8) and mins (bytes 8..16) of a Q4_K / Q5_K block,
    /// unpacked from their 12-byte table: sub-blocks 0..3 keep theirs in the low six bits of
    /// the first eight bytes, 4..7 split theirs into a nibble of the last four bytes and the
    /// two spare top bits of the first eight.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn k_scales_mins(packed: *const u8) -> __m128i {
        let word = |i: usize| packed.add(4 * i).cast::<u32>().read_unaligned();
        let (a, b, c) = (word(0), word(1), word(2));
        let (six, four, two) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
        _mm_setr_epi32(
            (a & six) as i32,
            ((c & four) | ((a >> 6) & two) << 4) as i32,
            (b & six) as i32,
            (((c >> 4) & four) | ((b >> 6) & two) << 4) as i32,
        )
    }

    /// Shared by Q4_K and Q5_K: `quants(b, group)` decodes the 64 quants of group `group` (0..4)
    /// of the block at `b`, as the 32 of its even sub-block and the 32 of its odd one.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_k_blocks(
        row: &[u8],
        x: &[f32],
        sums: &[f32],
        block_bytes: usize,
        quants: impl Fn(*const u8, usize) -> ([__m256i; 4], [__m256i; 4]),
    ) -> f32 {
        // Even and odd sub-blocks accumulate apart to halve the dependency chain.
        let mut acc = [_mm256_setzero_ps(); 2];
        for ((b, x), s) in row
            .chunks_exact(block_bytes)
            .zip(x.chunks_exact(256))
            .zip(sums.chunks_exact(8))
        {
            let b = b.as_ptr();
            let packed = k_scales_mins(b.add(4));
            let scales = _mm256_mul_ps(
                splat_f16(b),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(packed)),
            );
            let mins = _mm256_mul_ps(
                splat_f16(b.add(2)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(packed, 8))),
            );
            // The eight sub-blocks are exactly the eight 32-element sums of this block.
            acc[1] = _mm256_fnmadd_ps(mins, _mm256_loadu_ps(s.as_ptr()), acc[1]);
            let scales: [f32; 8] = std::mem::transmute(scales);
            for group in 0..4 {
                let (even, odd) = quants(b, group);
                let x = x.as_ptr().add(64 * group);
                for (j, (q, acc)) in [even, odd].into_iter().zip(&mut acc).enumerate() {
                    let d = _mm256_set1_ps(scales[2 * group + j]);
                    *acc = _mm256_fmadd_ps(d, dot32(q, x.add(32 * j)), *acc);
                }
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1]))
    }

    /// Low nibbles of the 32 bytes at `qs` are one sub-block, high nibbles the next.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibble_pairs(qs: *const u8) -> ([__m256i; 4], [__m256i; 4]) {
        let bytes = [
            u8x8(qs),
            u8x8(qs.add(8)),
            u8x8(qs.add(16)),
            u8x8(qs.add(24)),
        ];
        let low = _mm256_set1_epi32(0x0f);
        (
            bytes.map(|v| _mm256_and_si256(v, low)),
            bytes.map(|v| _mm256_srli_epi32(v, 4)),
        )
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_k(row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        dot_k_blocks(row, x, sums, 144, |b, group| {
            nibble_pairs(b.add(16 + 32 * group))
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q5_k(row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        dot_k_blocks(row, x, sums, 176, |b, group| {
            let (even, odd) = nibble_pairs(b.add(48 + 32 * group));
            // Byte l of qh holds the fifth bits of element l of every sub-block, bit s for
            // sub-block s: moving bit s to the top of each byte lets movemask collect them.
            let qh = _mm256_loadu_si256(b.add(16).cast());
            let bits = |s: usize| {
                let top = _mm256_sll_epi16(qh, _mm_cvtsi32_si128(7 - s as i32));
                _mm256_movemask_epi8(top) as u32
            };
            (
                with_fifth_bits(even, bits(2 * group)),
                with_fifth_bits(odd, bits(2 * group + 1)),
            )
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q6_k(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut q = [0i8; 256];
        for (b, x) in row.chunks_exact(210).zip(x.chunks_exact(256)) {
            let b = b.as_ptr();
            q6_k_quants(b, &mut q);
            let d = splat_f16(b.add(208));
            let sc = b.add(192);
            let scales = [sc, sc.add(8)].map(|sc| _mm256_mul_ps(d, _mm256_cvtepi32_ps(i8x8(sc))));
            let scales: [f32; 16] = std::mem::transmute(scales);
            // Each scale covers 16 elements; alternate accumulators between them.
            for pair in (0..16).step_by(2) {
                for (g, acc) in (pair..).zip(&mut acc) {
                    let (q, x) = (q.as_ptr().add(16 * g).cast::<u8>(), x.as_ptr().add(16 * g));
                    let p = _mm256_mul_ps(_mm256_cvtepi32_ps(i8x8(q)), _mm256_loadu_ps(x));
                    let p = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(i8x8(q.add(8))),
                        _mm256_loadu_ps(x.add(8)),
                        p,
                    );
                    *acc = _mm256_fmadd_ps(_mm256_set1_ps(scales[g]), p, *acc);
                }
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1]))
    }

    /// The 256 quants of the Q6_K block at `b`, bias removed, in element order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k_quants(b: *const u8, q: &mut [i8; 256]) {
        let (four, two) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
        let bias = _mm256_set1_epi8(32);
        for half in 0..2 {
            let ql = b.add(64 * half);
            let lo = _mm256_loadu_si256(ql.cast());
            let hi = _mm256_loadu_si256(ql.add(32).cast());
            let h = _mm256_loadu_si256(b.add(128 + 32 * half).cast());
            // Four runs of 32 elements: nibbles of ql[0..32] and ql[32..64], low then high,
            // each with its two bits of qh (bits 0-1, 2-3, 4-5, 6-7) moved to bits 4-5.
            let runs = [
                (_mm256_and_si256(lo, four), _mm256_slli_epi16(h, 4)),
                (_mm256_and_si256(hi, four), _mm256_slli_epi16(h, 2)),
                (_mm256_and_si256(_mm256_srli_epi16(lo, 4), four), h),
                (
                    _mm256_and_si256(_mm256_srli_epi16(hi, 4), four),
                    _mm256_srli_epi16(h, 2),
                ),
            ];
            for (k, (low, high)) in runs.into_iter().enumerate() {
                let v = _mm256_or_si256(low, _mm256_and_si256(high, two));
                let at = q.as_mut_ptr().add(128 * half + 32 * k);
                _mm256_storeu_si256(at.cast(), _mm256_sub_epi8(v, bias));
            }
        }
    }

    /// Dense rows: `load` widens eight elements at a byte pointer to f32, `one` converts a
    /// single element for the tail.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_dense(
        row: &[u8],
        width: usize,
        x: &[f32],
        load: impl Fn(*const u8) -> __m256,
        one: impl Fn(&[u8]) -> f32,
    ) -> f32 {
        let (w, xp) = (row.as_ptr(), x.as_ptr());
        let n = x.len();
        // Four accumulators keep four FMAs in flight.
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let at = i + 8 * j;
                *acc = _mm256_fmadd_ps(load(w.add(width * at)), _mm256_loadu_ps(xp.add(at)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(load(w.add(width * i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let tail = row[width * i..].chunks_exact(width).zip(&x[i..]);
        hsum(sum) + tail.map(|(w, x)| one(w) * x).sum::<f32>()
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
        dot_dense(
            row,
            4,
            x,
            |p| _mm256_loadu_ps(p.cast()),
            |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        )
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
        dot_dense(
            row,
            2,
            x,
            |p| _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        )
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
        dot_dense(
            row,
            2,
            x,
            // bf16 is the top half of an f32.
            |p| {
                let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
            },
            |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const ALL_TYPES: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Bf16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// Byte offsets of the f16 scale fields in a block: random bytes there could be huge,
    /// infinite or NaN, anywhere else they are valid quants.
    fn scale_offsets(ty: GgmlType) -> &'static [usize] {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q6K => &[208],
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => &[],
        }
    }

    fn random_row(ty: GgmlType, n: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let mut row = vec![0u8; ty.row_bytes(n)];
        for block in row.chunks_exact_mut(ty.block_bytes()) {
            let value: f32 = rng.gen_range(-1.0..1.0);
            match ty {
                GgmlType::F32 => block.copy_from_slice(&value.to_le_bytes()),
                GgmlType::F16 => block.copy_from_slice(&f16::from_f32(value).to_le_bytes()),
                GgmlType::Bf16 => block.copy_from_slice(&bf16::from_f32(value).to_le_bytes()),
                _ => {
                    rng.fill(block);
                    for &at in scale_offsets(ty) {
                        let scale = f16::from_f32(rng.gen_range(0.01..0.1));
                        block[at..at + 2].copy_from_slice(&scale.to_le_bytes());
                    }
                }
            }
        }
        row
    }

    /// The dot product of the dequantized row with `x` in f64, and the sum of the terms'
    /// magnitudes, which bounds the rounding error of any summation order.
    fn reference(ty: GgmlType, row: &[u8], x: &[f32]) -> (f64, f64) {
        let mut w = vec![0f32; x.len()];
        dequantize(ty, row, &mut w);
        let terms = w.iter().zip(x).map(|(&w, &x)| w as f64 * x as f64);
        (terms.clone().sum(), terms.map(f64::abs).sum())
    }

    fn lengths(ty: GgmlType) -> &'static [usize] {
        match ty.block_len() {
            256 => &[256, 512, 4864],
            32 => &[32, 256, 576, 896, 4864],
            _ => &[1, 7, 32, 40, 256, 896, 4864],
        }
    }

    #[test]
    fn matches_dequantize_for_every_type() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for ty in ALL_TYPES {
            for &n in lengths(ty) {
                for _ in 0..4 {
                    let row = random_row(ty, n, &mut rng);
                    // A mean away from zero, as real activations have, exercises the
                    // offset terms and would expose a bias cancelling against sum(x).
                    let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.5)).collect();
                    let sums = if n % SUM_BLOCK == 0 {
                        block_sums(&x)
                    } else {
                        Vec::new()
                    };
                    let (want, magnitude) = reference(ty, &row, &x);
                    let got = dot_row(ty, &row, &x, &sums) as f64;
                    // Relative to the terms' magnitudes, as `want` itself may cancel to
                    // near zero; f32 summation stays around 1e-7 of it.
                    assert!(
                        (got - want).abs() <= 1e-6 * magnitude,
                        "{ty:?} n={n}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_matches_scalar() {
        if !simd::available() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        for ty in ALL_TYPES {
            for &n in lengths(ty) {
                let row = random_row(ty, n, &mut rng);
                let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let sums = if n % SUM_BLOCK == 0 {
                    block_sums(&x)
                } else {
                    Vec::new()
                };
                let (_, magnitude) = reference(ty, &row, &x);
                let scalar = dot_row_scalar(ty, &row, &x);
                // Safety: `available` was checked above.
                let fast = unsafe { simd::dot_row(ty, &row, &x, &sums) };
                assert!(
                    (fast - scalar).abs() as f64 <= 1e-6 * magnitude,
                    "{ty:?} n={n}: {fast} vs {scalar}"
                );
            }
        }
    }

    #[test]
    fn block_sums_sum_each_block() {
        let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
        assert_eq!(block_sums(&x), [496.0, 1520.0]);
    }

    #[test]
    fn scalar_path_matches_dequantize() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for ty in ALL_TYPES {
            let n = 4864;
            let row = random_row(ty, n, &mut rng);
            let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let (want, magnitude) = reference(ty, &row, &x);
            let got = dot_row_scalar(ty, &row, &x) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * magnitude,
                "{ty:?}: {got} vs {want}"
            );
        }
    }
}
