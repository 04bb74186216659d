//! AVX2 kernels. A 32-element block of quants is laid out as 32 bytes in element order,
//! multiplied bytewise with the vector's 32 quants and summed in pairs (`maddubs`), then
//! in fours (`madd`) to eight i32 lanes, which are converted once and scaled into f32
//! accumulators that live across the whole row.

use super::{GgmlType, QuantizedVector, QBLOCK};
use std::arch::x86_64::*;

pub(super) use crate::kernels::dense::simd::available;
pub(super) use crate::kernels::dense::simd::hsum;

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize(x: &[f32], v: &mut QuantizedVector) {
    let magnitude = _mm256_set1_ps(-0.0);
    // `packs` interleaves its inputs per 128-bit lane; this puts the 4-byte groups back
    // in element order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (i, x) in x.chunks_exact(QBLOCK).enumerate() {
        let x: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(x.as_ptr().add(8 * k)));
        let abs = x.map(|x| _mm256_andnot_ps(magnitude, x));
        let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let inverse = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        // Rounds to nearest, ties to even, as the scalar path does.
        let q = x.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, inverse)));
        let words = [
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        ];
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words[0], words[1]), order);
        _mm256_storeu_si256(v.qs.as_mut_ptr().add(QBLOCK * i).cast(), bytes);
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let d = amax / 127.0;
        let first = hsum(_mm256_cvtepi32_ps(_mm256_add_epi32(q[0], q[1])));
        let sum = hsum(_mm256_cvtepi32_ps(sum));
        v.d[i] = d;
        v.s[i] = d * sum;
        v.halves[2 * i] = first as i32;
        v.halves[2 * i + 1] = (sum - first) as i32;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_quantized<const N: usize>(
    ty: GgmlType,
    row: &[u8],
    vs: [&QuantizedVector; N],
) -> [f32; N] {
    match ty {
        GgmlType::Q4_0 => dot_q4_0(row, vs),
        GgmlType::Q4_1 => dot_q4_1(row, vs),
        GgmlType::Q5_0 => dot_q5_0(row, vs),
        GgmlType::Q5_1 => dot_q5_1(row, vs),
        GgmlType::Q8_0 => dot_q8_0(row, vs),
        GgmlType::Q4K => dot_q4_k(row, vs),
        GgmlType::Q5K => dot_q5_k(row, vs),
        GgmlType::Q6K => dot_q6_k(row, vs),
        GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => unreachable!("dense row"),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_dense(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    match ty {
        GgmlType::F32 => dot_f32(row, x),
        GgmlType::F16 => dot_f16(row, x),
        GgmlType::Bf16 => dot_bf16(row, x),
        _ => unreachable!("quantized row"),
    }
}

/// The f16 at `p` (any alignment) in all eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn splat_f16(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(p.cast::<i16>().read_unaligned()))
}

/// Lane `j` of `v` in all eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lane(v: __m256, j: usize) -> __m256 {
    _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j as i32))
}

/// The 32 vector quants at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32(p: *const i8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

/// `sum w[i] * x[i]` over 32 byte pairs, in eight i32 lanes: `w` unsigned and below 128
/// (larger ones could saturate the pair sums), `x` signed.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_unsigned(w: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
}

/// As `dot_unsigned` for signed weights given as `|w|` and `w`: `|w| * (x * sign(w))`
/// is the same product.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_signed(magnitude: __m256i, w: __m256i, x: __m256i) -> __m256i {
    let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, w));
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

/// The 32 nibbles of a 16-byte run in element order: low nibbles first, then high ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles(qs: *const u8) -> __m256i {
    let q = _mm_loadu_si128(qs.cast());
    let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// 0xff in byte `i` where bit `i` of `bits` is set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bit_mask(bits: u32) -> __m256i {
    // Byte i takes byte i / 8 of `bits`, then tests bit i % 8 of it.
    let select = _mm256_setr_epi64x(
        0,
        0x0101_0101_0101_0101,
        0x0202_0202_0202_0202,
        0x0303_0303_0303_0303,
    );
    let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), select);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
}

/// Rows of 32-element blocks that start with an f16 scale `d`, then for formats with
/// `has_min` an f16 offset `m`, and whose values are `d * w + m`; `weights` gives the
/// 32 `w` of the block at a pointer as bytes, signed if `signed`, else below 128.
/// Each of the `N` vectors has accumulators of its own, updated in the same order
/// whatever `N` is.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_blocks32<const N: usize>(
    row: &[u8],
    vs: [&QuantizedVector; N],
    block_bytes: usize,
    has_min: bool,
    signed: bool,
    weights: impl Fn(*const u8) -> __m256i,
) -> [f32; N] {
    let row = row.as_ptr();
    // One accumulator per vector: a tile of several vectors has enough independent
    // chains, and decoding is bound by reading the row.
    let mut acc = [_mm256_setzero_ps(); N];
    // Lane 1 gathers m * sum(x).
    let mut offsets = [_mm_setzero_ps(); N];
    for i in 0..vs[0].d.len() {
        let b = row.add(block_bytes * i);
        let w = weights(b);
        let magnitude = _mm256_abs_epi8(w);
        let header = if has_min {
            b.cast::<u32>().read_unaligned()
        } else {
            b.cast::<u16>().read_unaligned().into()
        };
        let block_scales = _mm_cvtph_ps(_mm_cvtsi32_si128(header as i32));
        for t in 0..N {
            let v = vs[t];
            let x = load32(v.qs.as_ptr().add(QBLOCK * i));
            let p = if signed {
                dot_signed(magnitude, w, x)
            } else {
                dot_unsigned(w, x)
            };
            // (d, m) times (the vector block's scale, its sum).
            let scales = _mm_mul_ps(
                block_scales,
                _mm_unpacklo_ps(_mm_load_ss(&v.d[i]), _mm_load_ss(&v.s[i])),
            );
            acc[t] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), _mm256_cvtepi32_ps(p), acc[t]);
            if has_min {
                offsets[t] = _mm_add_ps(offsets[t], scales);
            }
        }
    }
    std::array::from_fn(|t| hsum(acc[t]) + _mm_cvtss_f32(_mm_movehdup_ps(offsets[t])))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_0<const N: usize>(row: &[u8], vs: [&QuantizedVector; N]) -> [f32; N] {
    let eight = _mm256_set1_epi8(8);
    dot_blocks32(row, vs, 18, false, true, |b| {
        _mm256_sub_epi8(nibbles(b.add(2)), eight)
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1<const N: usize>(row: &[u8], vs: [&QuantizedVector; N]) -> [f32; N] {
    dot_blocks32(row, vs, 20, true, false, |b| nibbles(b.add(4)))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_0<const N: usize>(row: &[u8], vs: [&QuantizedVector; N]) -> [f32; N] {
    let high = _mm256_set1_epi8(0xf0_u8 as i8);
    dot_blocks32(row, vs, 22, false, true, |b| {
        let set = bit_mask(b.add(2).cast::<u32>().read_unaligned());
        // q - 16 is the nibble where the fifth bit is set; where it is clear, the nibble
        // less 16, which as a byte is the nibble with the top four bits set.
        _mm256_or_si256(nibbles(b.add(6)), _mm256_andnot_si256(set, high))
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_1<const N: usize>(row: &[u8], vs: [&QuantizedVector; N]) -> [f32; N] {
    let fifth = _mm256_set1_epi8(0x10);
    dot_blocks32(row, vs, 24, true, false, |b| {
        let set = bit_mask(b.add(4).cast::<u32>().read_unaligned());
        _mm256_or_si256(nibbles(b.add(8)), _mm256_and_si256(set, fifth))
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0<const N: usize>(row: &[u8], vs: [&QuantizedVector; N]) -> [f32; N] {
    dot_blocks32(row, vs, 34, false, true, |b| {
        _mm256_loadu_si256(b.add(2).cast())
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

/// Per sub-block of a Q4_K / Q5_K block at `b`: `d * scale` as f32 (lanes 0..8, still
/// to be multiplied by each vector block's scale) and `dmin * min` (lanes 0..8).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k_block_scales(b: *const u8) -> (__m256, __m256, __m256) {
    let packed = k_scales_mins(b.add(4));
    let scales = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(packed));
    let mins = _mm256_mul_ps(
        splat_f16(b.add(2)),
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(packed, 8))),
    );
    (splat_f16(b), scales, mins)
}

/// For block `i` of vector `v`, per sub-block: the weight block's `d * scale` (from
/// [`k_block_scales`]) times the vector block's scale; the block's `dmin * min * sum(x)`
/// terms are added to `offsets`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k_vector_scales(
    (d, sub_scales, mins): (__m256, __m256, __m256),
    v: &QuantizedVector,
    i: usize,
    offsets: &mut __m256,
) -> __m256 {
    let xd = _mm256_loadu_ps(v.d.as_ptr().add(8 * i));
    let xs = _mm256_loadu_ps(v.s.as_ptr().add(8 * i));
    *offsets = _mm256_fmadd_ps(mins, xs, *offsets);
    _mm256_mul_ps(_mm256_mul_ps(d, xd), sub_scales)
}

/// Shared by Q4_K and Q5_K: `weights(b, group)` gives the 64 quants of group `group`
/// (0..4) of the block at `b`, as the 32 of its even sub-block and the 32 of its odd one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_k_blocks<const N: usize>(
    row: &[u8],
    vs: [&QuantizedVector; N],
    block_bytes: usize,
    weights: impl Fn(*const u8, usize) -> (__m256i, __m256i),
) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    let mut offsets = [_mm256_setzero_ps(); N];
    for (i, b) in row.chunks_exact(block_bytes).enumerate() {
        let b = b.as_ptr();
        let (d, sub_scales, mins) = k_block_scales(b);
        // The eight sub-blocks are exactly the eight vector blocks under this block.
        let scales: [__m256; N] = std::array::from_fn(|t| {
            k_vector_scales((d, sub_scales, mins), vs[t], i, &mut offsets[t])
        });
        for group in 0..4 {
            let (even, odd) = weights(b, group);
            for (t, v) in vs.iter().enumerate() {
                let x = v.qs.as_ptr().add(256 * i + 64 * group);
                for (j, w) in [even, odd].into_iter().enumerate() {
                    let p = dot_unsigned(w, load32(x.add(32 * j)));
                    let d = lane(scales[t], 2 * group + j);
                    acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[t]);
                }
            }
        }
    }
    std::array::from_fn(|t| hsum(_mm256_sub_ps(acc[t], offsets[t])))
}

/// Low nibbles of the 32 bytes at `qs` are one sub-block, high nibbles the next.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibble_pair(qs: *const u8) -> (__m256i, __m256i) {
    let q = _mm256_loadu_si256(qs.cast());
    let low = _mm256_set1_epi8(0x0f);
    (
        _mm256_and_si256(q, low),
        _mm256_and_si256(_mm256_srli_epi16(q, 4), low),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_k<const N: usize>(row: &[u8], vs: [&QuantizedVector; N]) -> [f32; N] {
    dot_k_blocks(row, vs, 144, |b, group| nibble_pair(b.add(16 + 32 * group)))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_k<const N: usize>(row: &[u8], vs: [&QuantizedVector; N]) -> [f32; N] {
    let fifth = _mm256_set1_epi8(0x10);
    dot_k_blocks(row, vs, 176, |b, group| {
        let (even, odd) = nibble_pair(b.add(48 + 32 * group));
        // Byte l of qh holds the fifth bits of element l of every sub-block, bit s for
        // sub-block s; shifting it to bit 4 puts it in place. The 16-bit shifts carry bits
        // across bytes only outside bit 4.
        let qh = _mm256_loadu_si256(b.add(16).cast());
        let bit = |s: usize| {
            let moved = if s <= 4 {
                _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - s as i32))
            } else {
                _mm256_srl_epi16(qh, _mm_cvtsi32_si128(s as i32 - 4))
            };
            _mm256_and_si256(moved, fifth)
        };
        (
            _mm256_or_si256(even, bit(2 * group)),
            _mm256_or_si256(odd, bit(2 * group + 1)),
        )
    })
}

/// For `madd` with the pair sums of run `k` (0..4) of a Q6_K half-block: the i16 scale of
/// its first 16 elements in the low lane, of its last 16 in the high lane, picked from
/// the half's eight scales held in both lanes.
const Q6_SCALE_PICK: [[i8; 32]; 4] = {
    let mut pick = [[0; 32]; 4];
    let mut k = 0;
    while k < 4 {
        let mut i = 0;
        while i < 32 {
            let scale = 2 * k + i / 16;
            pick[k][i] = (2 * scale + i % 2) as i8;
            i += 1;
        }
        k += 1;
    }
    pick
};

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6_k<const N: usize>(row: &[u8], vs: [&QuantizedVector; N]) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    let (four, two) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
    let bias = _mm256_set1_epi8(32);
    for (i, b) in row.chunks_exact(210).enumerate() {
        let b = b.as_ptr();
        // Per run of 32 elements: the block's d times the vector block's scale.
        let d = splat_f16(b.add(208));
        let scales: [__m256; N] =
            std::array::from_fn(|t| _mm256_mul_ps(d, _mm256_loadu_ps(vs[t].d.as_ptr().add(8 * i))));
        let sixteen = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(192).cast()));
        for half in 0..2 {
            let half_scales = if half == 0 {
                _mm256_permute2x128_si256(sixteen, sixteen, 0x00)
            } else {
                _mm256_permute2x128_si256(sixteen, sixteen, 0x11)
            };
            let ql = b.add(64 * half);
            let lo = _mm256_loadu_si256(ql.cast());
            let hi = _mm256_loadu_si256(ql.add(32).cast());
            let h = _mm256_loadu_si256(b.add(128 + 32 * half).cast());
            // Four runs of 32 elements: nibbles of ql[0..32] and ql[32..64], low then
            // high, each with its two bits of qh (bits 0-1, 2-3, 4-5, 6-7) moved to 4-5.
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
                let run = 4 * half + k;
                let w = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_and_si256(high, two)), bias);
                let magnitude = _mm256_abs_epi8(w);
                let pick = _mm256_loadu_si256(Q6_SCALE_PICK[k].as_ptr().cast());
                let run_scales = _mm256_shuffle_epi8(half_scales, pick);
                for (t, v) in vs.iter().enumerate() {
                    let x = load32(v.qs.as_ptr().add(256 * i + 32 * run));
                    let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, w));
                    let p = _mm256_madd_epi16(pairs, run_scales);
                    acc[t] = _mm256_fmadd_ps(lane(scales[t], run), _mm256_cvtepi32_ps(p), acc[t]);
                }
            }
        }
    }
    acc.map(|a| hsum(a))
}

/// Dense rows: `load` widens eight elements at a byte pointer to f32, `one` converts a
/// single element for the tail.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_dense_with(
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
    dot_dense_with(
        row,
        4,
        x,
        |p| _mm256_loadu_ps(p.cast()),
        |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    dot_dense_with(
        row,
        2,
        x,
        |p| _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
        |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    dot_dense_with(
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
