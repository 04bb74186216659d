//! AVX-512 kernels (with VNNI): 64 elements of a row (a group of a K-quant block, or two
//! 32-element blocks) fill one 512-bit register, and `dpbusd` multiplies bytes and sums
//! them in fours in one step. It takes the weights unsigned, so fixed biases are taken
//! off through the vector's sums.

use super::avx2::{hsum, k_block_scales, k_vector_scales, nibbles, splat_f16};
use super::{GgmlType, QuantizedVector, QBLOCK};
use std::arch::x86_64::*;

pub(super) fn available() -> bool {
    super::avx2::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn dot_quantized<const N: usize>(
    ty: GgmlType,
    row: &[u8],
    vs: [&QuantizedVector; N],
) -> [f32; N] {
    match ty {
        GgmlType::Q4K => dot_k_blocks(row, vs, 144, |b, group| nibble_pair(b.add(16 + 32 * group))),
        GgmlType::Q5K => dot_q5_k(row, vs),
        GgmlType::Q6K => dot_q6_k(row, vs),
        GgmlType::Q4_0 => dot_pairs32(row, vs, 18, 8, false, |b| nibbles(b.add(2))),
        GgmlType::Q4_1 => dot_pairs32(row, vs, 20, 0, true, |b| nibbles(b.add(4))),
        GgmlType::Q5_0 => dot_pairs32(row, vs, 22, 16, false, |b| fifth_bits(b.add(2), b.add(6))),
        GgmlType::Q5_1 => dot_pairs32(row, vs, 24, 0, true, |b| fifth_bits(b.add(4), b.add(8))),
        // The signed bytes offset by 128 are unsigned.
        GgmlType::Q8_0 => dot_pairs32(row, vs, 34, 128, false, |b| {
            _mm256_xor_si256(
                _mm256_loadu_si256(b.add(2).cast()),
                _mm256_set1_epi8(0x80_u8 as i8),
            )
        }),
        GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => unreachable!("dense row"),
    }
}

/// The 32 five-bit quants of a Q5_0 / Q5_1 block: nibbles at `qs`, fifth bits in the
/// 32-bit word at `qh`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn fifth_bits(qh: *const u8, qs: *const u8) -> __m256i {
    let fifth = _mm256_maskz_set1_epi8(qh.cast::<u32>().read_unaligned(), 0x10);
    _mm256_or_si256(nibbles(qs), fifth)
}

/// Rows of 32-element blocks whose values are `d * (w - bias)`, plus an f16 offset `m`
/// after `d` for formats with `has_min`; `weights` gives the 32 `w` of the block at a
/// pointer as unsigned bytes. Two blocks fill one register, and `dpbusd` multiplies
/// and sums their bytes with the vector's in one step; the bias and the offset
/// come back per block as `(m - bias * d) * sum(x)`, from the vector's block sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_pairs32<const N: usize>(
    row: &[u8],
    vs: [&QuantizedVector; N],
    block_bytes: usize,
    bias: u8,
    has_min: bool,
    weights: impl Fn(*const u8) -> __m256i,
) -> [f32; N] {
    let row = row.as_ptr();
    let blocks = vs[0].d.len();
    // One accumulator per vector: a tile of several vectors has enough independent
    // chains, and decoding is bound by reading the row.
    let mut acc = [_mm512_setzero_ps(); N];
    let mut offsets = [_mm_setzero_ps(); N];
    // Lanes 0..8 take the first of two scales, lanes 8..16 the second.
    let halves = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi32(1), 1);
    let scale =
        |b: *const u8| _mm_cvtph_ps(_mm_cvtsi32_si128(b.cast::<u16>().read_unaligned().into()));
    for i in (0..blocks).step_by(2) {
        let both = i + 1 < blocks;
        let (b0, b1) = (row.add(block_bytes * i), row.add(block_bytes * (i + 1)));
        let w = if both {
            _mm512_inserti64x4(_mm512_castsi256_si512(weights(b0)), weights(b1), 1)
        } else {
            _mm512_castsi256_si512(weights(b0))
        };
        // (d0, d1) and (m0 - bias * d0, m1 - bias * d1) in the two low lanes.
        let d1 = if both { scale(b1) } else { _mm_setzero_ps() };
        let d = _mm_unpacklo_ps(scale(b0), d1);
        let mut m = _mm_mul_ps(d, _mm_set1_ps(-(bias as f32)));
        if has_min {
            let m1 = if both {
                scale(b1.add(2))
            } else {
                _mm_setzero_ps()
            };
            m = _mm_add_ps(m, _mm_unpacklo_ps(scale(b0.add(2)), m1));
        }
        let mask: u64 = if both { u64::MAX } else { u32::MAX.into() };
        for t in 0..N {
            let v = vs[t];
            let x = _mm512_maskz_loadu_epi8(mask, v.qs.as_ptr().add(QBLOCK * i).cast());
            let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
            let (xd, xs) = if both {
                (
                    _mm_castpd_ps(_mm_load_sd(v.d.as_ptr().add(i).cast())),
                    _mm_castpd_ps(_mm_load_sd(v.s.as_ptr().add(i).cast())),
                )
            } else {
                (_mm_load_ss(&v.d[i]), _mm_load_ss(&v.s[i]))
            };
            let scales = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_mul_ps(d, xd)));
            acc[t] = _mm512_fmadd_ps(scales, _mm512_cvtepi32_ps(p), acc[t]);
            offsets[t] = _mm_fmadd_ps(m, xs, offsets[t]);
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        let o = offsets[t];
        out[t] = _mm512_reduce_add_ps(acc[t]) + _mm_cvtss_f32(_mm_add_ss(o, _mm_movehdup_ps(o)));
    }
    out
}

/// Lanes 0..8 from lane `2 * pair` of a vector of eight, lanes 8..16 from the next.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pair_lanes(eight: __m512, pair: usize) -> __m512 {
    let index = _mm512_inserti64x4(
        _mm512_set1_epi32(2 * pair as i32),
        _mm256_set1_epi32(2 * pair as i32 + 1),
        1,
    );
    _mm512_permutexvar_ps(index, eight)
}

/// `sum (w - bias) * x` over 64 byte pairs, in sixteen i32 lanes of four pairs each.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot64(w: __m512i, x: __m512i, bias: u8) -> __m512i {
    let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
    if bias == 0 {
        return p;
    }
    let b = _mm512_set1_epi8(bias as i8);
    _mm512_sub_epi32(p, _mm512_dpbusd_epi32(_mm512_setzero_si512(), b, x))
}

/// Low nibbles of the 32 bytes at `qs` (one sub-block), then their high nibbles (the
/// next).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn nibble_pair(qs: *const u8) -> __m512i {
    let q = _mm512_broadcast_i64x4(_mm256_loadu_si256(qs.cast()));
    let shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    _mm512_and_si512(_mm512_srlv_epi16(q, shifts), _mm512_set1_epi8(0x0f))
}

/// Shared by Q4_K and Q5_K: `weights(b, group)` gives the 64 quants of group `group`
/// (0..4) of the block at `b`, its even sub-block then its odd one.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_k_blocks<const N: usize>(
    row: &[u8],
    vs: [&QuantizedVector; N],
    block_bytes: usize,
    weights: impl Fn(*const u8, usize) -> __m512i,
) -> [f32; N] {
    let mut acc = [_mm512_setzero_ps(); N];
    let mut offsets = [_mm256_setzero_ps(); N];
    for (i, b) in row.chunks_exact(block_bytes).enumerate() {
        let b = b.as_ptr();
        let (d, sub_scales, mins) = k_block_scales(b);
        // The eight sub-blocks are exactly the eight vector blocks under this block.
        let scales: [__m512; N] = std::array::from_fn(|t| {
            let eight = k_vector_scales((d, sub_scales, mins), vs[t], i, &mut offsets[t]);
            _mm512_castps256_ps512(eight)
        });
        for group in 0..4 {
            let w = weights(b, group);
            for (t, v) in vs.iter().enumerate() {
                let x = _mm512_loadu_si512(v.qs.as_ptr().add(256 * i + 64 * group).cast());
                let p = _mm512_cvtepi32_ps(dot64(w, x, 0));
                acc[t] = _mm512_fmadd_ps(pair_lanes(scales[t], group), p, acc[t]);
            }
        }
    }
    std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]) - hsum(offsets[t]))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q5_k<const N: usize>(row: &[u8], vs: [&QuantizedVector; N]) -> [f32; N] {
    let fifth = _mm512_set1_epi8(0x10);
    dot_k_blocks(row, vs, 176, |b, group| {
        // Byte l of qh holds the fifth bits of element l of every sub-block, bit s
        // for sub-block s: shifted down by s in each half (the 16-bit shifts bring
        // no other bit to bit 0 of a byte), then up to bit 4.
        let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(16).cast()));
        let shifts = _mm512_inserti64x4(
            _mm512_set1_epi16(2 * group as i16),
            _mm256_set1_epi16(2 * group as i16 + 1),
            1,
        );
        let bits = _mm512_slli_epi16(_mm512_srlv_epi16(qh, shifts), 4);
        let nib = nibble_pair(b.add(48 + 32 * group));
        _mm512_or_si512(nib, _mm512_and_si512(bits, fifth))
    })
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q6_k<const N: usize>(row: &[u8], vs: [&QuantizedVector; N]) -> [f32; N] {
    let mut acc = [_mm512_setzero_ps(); N];
    let (four, two) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
    // qh bits 0-1 and 2-3 moved to 4-5 for the first pair of runs of a half, bits 4-5
    // and 6-7 for the second.
    let up = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    let down = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    // Lane l of a pair of runs holds elements 4l..4l + 4: scale 2 * run + l / 4.
    let quarter = _mm512_srli_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        2,
    );
    for (i, b) in row.chunks_exact(210).enumerate() {
        let b = b.as_ptr();
        // Per run of 32 elements, the block's d times the vector block's scale; per
        // 16 elements, the quants' own scale.
        let d = splat_f16(b.add(208));
        let runs: [__m512; N] = std::array::from_fn(|t| {
            let xd = _mm256_loadu_ps(vs[t].d.as_ptr().add(8 * i));
            _mm512_castps256_ps512(_mm256_mul_ps(d, xd))
        });
        let sixteens = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(192).cast())));
        for half in 0..2 {
            // Low nibbles of ql[0..32] and ql[32..64] are runs 0 and 1 of the half,
            // their high nibbles runs 2 and 3.
            let ql = _mm512_loadu_si512(b.add(64 * half).cast());
            let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(128 + 32 * half).cast()));
            let pairs = [
                (_mm512_and_si512(ql, four), _mm512_sllv_epi16(qh, up)),
                (
                    _mm512_and_si512(_mm512_srli_epi16(ql, 4), four),
                    _mm512_srlv_epi16(qh, down),
                ),
            ];
            for (k, (low, high)) in pairs.into_iter().enumerate() {
                let run = 4 * half + 2 * k;
                let w = _mm512_or_si512(low, _mm512_and_si512(high, two));
                let index = _mm512_add_epi32(_mm512_set1_epi32(2 * run as i32), quarter);
                let quant_scales = _mm512_permutexvar_ps(index, sixteens);
                for (t, v) in vs.iter().enumerate() {
                    let xq = _mm512_loadu_si512(v.qs.as_ptr().add(256 * i + 32 * run).cast());
                    let p = _mm512_cvtepi32_ps(dot64(w, xq, 32));
                    let scales = _mm512_mul_ps(quant_scales, pair_lanes(runs[t], run / 2));
                    acc[t] = _mm512_fmadd_ps(scales, p, acc[t]);
                }
            }
        }
    }
    acc.map(|a| _mm512_reduce_add_ps(a))
}
