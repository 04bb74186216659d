//! Dot products of GGUF-quantized weight rows with an activation vector, read straight from
//! the quantized bytes.
//!
//! Decoding reads every weight once per token, so its speed is set first by how many bytes
//! the weights take (a 4-bit row is a quarter of the f16 one) and then by the arithmetic
//! spent per weight. To keep that arithmetic small, a vector multiplied with quantized rows
//! is itself quantized once per matrix-vector product (`prepare`), as llama.cpp does: to
//! signed 8-bit values in blocks of 32, each block with an f32 scale `d = max|x| / 127`.
//! A block of the row then meets a block of the vector as one integer dot product of
//! 32 byte pairs, scaled once in f32. The result is exact for the quantized vector up to
//! f32 rounding; quantizing costs each element at most `d / 2`.
//!
//! The 32-element vector blocks line up with every weight format's blocks (Q4_0 to Q8_0)
//! and sub-blocks (Q4_K, Q5_K; Q6_K's 16-element scales pair up inside them), so every
//! product of a weight scale with a vector scale is per 32 elements.
//!
//! Formats whose values are `d * q + m` (Q4_1, Q5_1, and Q4_K and Q5_K with their
//! per-sub-block mins) are computed as `d * sum(q * x) + m * sum(x)`, with the sum of each
//! vector block kept with its scale. The fixed biases of Q4_0, Q5_0 and Q6_K (`-8`,
//! `-16`, `-32`) and Q8_0's sign are instead kept in the weight bytes, which become signed:
//! the byte multiply needs one unsigned operand, so the weight's sign moves onto the vector
//! byte and its magnitude is used (the AVX-512 Q6_K kernel subtracts `32 * sum(x)`
//! instead, in integers).
//!
//! F32, F16 and BF16 rows are multiplied with the f32 vector as it is. Every type has an
//! AVX2 kernel, and the K-quants an AVX-512 one (with VNNI) that CPUs having it use; other
//! CPUs dequantize a chunk at a time and multiply.

use crate::kernels::quant::{dequantize, GgmlType};

/// Elements per block of a quantized vector.
const QBLOCK: usize = 32;

/// A vector quantized to 8 bits for products with quantized rows.
pub struct QuantizedVector {
    /// One quant per element, in `-127..=127`.
    qs: Vec<i8>,
    /// Per 32-element block, its scale: element `i` is `qs[i] * d[i / 32]`.
    d: Vec<f32>,
    /// Per block, the sum of its dequantized elements, for the formats with offsets.
    s: Vec<f32>,
}

impl QuantizedVector {
    fn len(&self) -> usize {
        self.qs.len()
    }

    /// Elements `start..start + out.len()` dequantized.
    fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        for (i, o) in (start..).zip(out) {
            *o = self.qs[i] as f32 * self.d[i / QBLOCK];
        }
    }
}

/// Quantizes `x` (a multiple of 32 elements long) to 8 bits per element, rounding to nearest.
pub fn quantize(x: &[f32]) -> QuantizedVector {
    assert_eq!(x.len() % QBLOCK, 0, "length is not a multiple of 32");
    let blocks = x.len() / QBLOCK;
    let mut v = QuantizedVector {
        qs: vec![0; x.len()],
        d: vec![0.0; blocks],
        s: vec![0.0; blocks],
    };
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: `available` checked the CPU features, and `v` was sized for `x` above.
        unsafe { simd::quantize(x, &mut v) };
        return v;
    }
    quantize_scalar(x, &mut v);
    v
}

/// The portable `quantize`, into a vector sized for `x`.
fn quantize_scalar(x: &[f32], v: &mut QuantizedVector) {
    for (((x, q), d), s) in x
        .chunks_exact(QBLOCK)
        .zip(v.qs.chunks_exact_mut(QBLOCK))
        .zip(&mut v.d)
        .zip(&mut v.s)
    {
        let amax = x.iter().fold(0f32, |m, x| m.max(x.abs()));
        let inverse = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        *d = amax / 127.0;
        let mut sum = 0;
        for (q, x) in q.iter_mut().zip(x) {
            *q = (x * inverse).round_ties_even() as i8;
            sum += *q as i32;
        }
        *s = *d * sum as f32;
    }
}

/// An activation vector in the form `dot_row` multiplies with rows of one type.
pub enum Prepared<'a> {
    /// For F32, F16 and BF16 rows: the vector as it is.
    Dense(&'a [f32]),
    /// For every quantized type.
    Quantized(QuantizedVector),
}

impl Prepared<'_> {
    fn len(&self) -> usize {
        match self {
            Prepared::Dense(x) => x.len(),
            Prepared::Quantized(v) => v.len(),
        }
    }
}

fn is_dense(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16)
}

/// `x` prepared once for any number of `dot_rows` calls with rows of type `ty`.
pub fn prepare(ty: GgmlType, x: &[f32]) -> Prepared<'_> {
    if is_dense(ty) {
        Prepared::Dense(x)
    } else {
        Prepared::Quantized(quantize(x))
    }
}

/// The kernels a CPU can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernels {
    /// The fastest this CPU runs.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if simd::avx512::available() {
                return Kernels::Avx512;
            }
            if simd::available() {
                return Kernels::Avx2;
            }
        }
        Kernels::Portable
    }
}

/// Tokens a tiled kernel takes at once: each block of a weight row is unpacked once for
/// all of them.
const TILE: usize = 8;

/// `out[r]` is the dot product of row `r` of `rows` with `x`: `rows` holds `out.len()` rows
/// of exactly `x.len()` elements of type `ty`, and `x` was prepared for `ty`.
pub fn dot_rows(ty: GgmlType, rows: &[u8], x: &Prepared, out: &mut [f32]) {
    dot_rows_with(Kernels::best(), ty, rows, &[x], out);
}

/// `out[t * count + r]` is the dot product of row `r` of `rows` with `xs[t]`, where
/// `count = out.len() / xs.len()` rows of `ty` fill `rows`. Every product is computed by
/// the same sequence of operations as [`dot_rows`] with that vector alone: a tile of
/// tokens shares the unpacking of the weights, never an accumulator.
pub fn dot_rows_tokens(ty: GgmlType, rows: &[u8], xs: &[Prepared], out: &mut [f32]) {
    let xs: Vec<&Prepared> = xs.iter().collect();
    dot_rows_with(Kernels::best(), ty, rows, &xs, out);
}

fn dot_rows_with(kernels: Kernels, ty: GgmlType, rows: &[u8], xs: &[&Prepared], out: &mut [f32]) {
    let Some(first) = xs.first() else {
        return;
    };
    let len = first.len();
    assert_eq!(len % ty.block_len(), 0, "row is not whole blocks");
    let row_bytes = ty.row_bytes(len);
    let count = out.len() / xs.len();
    assert_eq!(out.len(), count * xs.len());
    assert_eq!(rows.len(), count * row_bytes, "byte length mismatch");
    let quantized: Vec<&QuantizedVector> = xs
        .iter()
        .filter_map(|x| match x {
            Prepared::Quantized(v) => Some(v),
            Prepared::Dense(_) => None,
        })
        .collect();
    let all_dense = quantized.is_empty();
    assert!(
        xs.iter().all(|x| x.len() == len),
        "vectors of different lengths"
    );
    assert!(
        (all_dense && is_dense(ty)) || (quantized.len() == xs.len() && !is_dense(ty)),
        "vector prepared for another type"
    );
    if row_bytes == 0 {
        out.fill(0.0);
        return;
    }
    let rows = || rows.chunks_exact(row_bytes).enumerate();
    #[cfg(target_arch = "x86_64")]
    if kernels != Kernels::Portable {
        if all_dense {
            for (t, x) in xs.iter().enumerate() {
                let Prepared::Dense(x) = x else {
                    unreachable!("checked above")
                };
                for (r, row) in rows() {
                    // SAFETY: `best` (or a test) checked that the CPU has the features the
                    // kernels are compiled for, and the asserts above the lengths.
                    out[t * count + r] = unsafe { simd::dot_dense(ty, row, x) };
                }
            }
            return;
        }
        let mut tiles = quantized.chunks_exact(TILE);
        for (tile, at) in tiles.by_ref().zip((0..).step_by(TILE)) {
            let tile: &[&QuantizedVector; TILE] = tile.try_into().expect("a whole tile");
            for (r, row) in rows() {
                // SAFETY: as above.
                let products = unsafe { dot_quantized(kernels, ty, row, *tile) };
                for (i, p) in products.into_iter().enumerate() {
                    out[(at + i) * count + r] = p;
                }
            }
        }
        let done = xs.len() - tiles.remainder().len();
        for (t, v) in (done..).zip(tiles.remainder()) {
            for (r, row) in rows() {
                // SAFETY: as above.
                out[t * count + r] = unsafe { dot_quantized(kernels, ty, row, [*v])[0] };
            }
        }
        return;
    }
    for (t, x) in xs.iter().enumerate() {
        for (r, row) in rows() {
            out[t * count + r] = dot_row_scalar(ty, row, x);
        }
    }
}

/// The products of one row with `N` quantized vectors on the kernels `kernels` names.
///
/// # Safety
/// The CPU has the features of `kernels`, and the row and vectors are of one length.
#[cfg(target_arch = "x86_64")]
unsafe fn dot_quantized<const N: usize>(
    kernels: Kernels,
    ty: GgmlType,
    row: &[u8],
    vs: [&QuantizedVector; N],
) -> [f32; N] {
    match kernels {
        Kernels::Avx512 => simd::avx512::dot_quantized(ty, row, vs),
        _ => simd::dot_quantized(ty, row, vs),
    }
}

/// Elements dequantized at a time by the portable path: a multiple of every block length.
const SCALAR_CHUNK: usize = 256;

/// The portable path: dequantize a chunk of the row (and of `x`, if quantized) at a time
/// onto the stack and multiply.
fn dot_row_scalar(ty: GgmlType, row: &[u8], x: &Prepared) -> f32 {
    let (mut w, mut xs) = ([0f32; SCALAR_CHUNK], [0f32; SCALAR_CHUNK]);
    let mut total = 0.0;
    for (chunk, bytes) in row.chunks(ty.row_bytes(SCALAR_CHUNK)).enumerate() {
        let (start, n) = (
            chunk * SCALAR_CHUNK,
            bytes.len() / ty.block_bytes() * ty.block_len(),
        );
        let w = &mut w[..n];
        dequantize(ty, bytes, w);
        let xs = match x {
            Prepared::Dense(x) => &x[start..start + n],
            Prepared::Quantized(v) => {
                v.dequantize_range(start, &mut xs[..n]);
                &xs[..n]
            }
        };
        total += w.iter().zip(xs).map(|(w, x)| w * x).sum::<f32>();
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! AVX2 kernels. A 32-element block of quants is laid out as 32 bytes in element order,
    //! multiplied bytewise with the vector's 32 quants and summed in pairs (`maddubs`), then
    //! in fours (`madd`) to eight i32 lanes, which are converted once and scaled into f32
    //! accumulators that live across the whole row.

    use super::{GgmlType, QuantizedVector, QBLOCK};
    use std::arch::x86_64::*;

    pub use crate::kernels::dense::simd::available;
    use crate::kernels::dense::simd::hsum;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize(x: &[f32], v: &mut QuantizedVector) {
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
            v.d[i] = d;
            v.s[i] = d * hsum(_mm256_cvtepi32_ps(sum));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_quantized<const N: usize>(
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
    pub unsafe fn dot_dense(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
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
    unsafe fn splat_f16(p: *const u8) -> __m256 {
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
    unsafe fn nibbles(qs: *const u8) -> __m256i {
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
                acc[t] =
                    _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), _mm256_cvtepi32_ps(p), acc[t]);
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
    unsafe fn k_block_scales(b: *const u8) -> (__m256, __m256, __m256) {
        let packed = k_scales_mins(b.add(4));
        let scales = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(packed));
        let mins = _mm256_mul_ps(
            splat_f16(b.add(2)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(packed, 8))),
        );
        (splat_f16(b), scales, mins)
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
                let v = vs[t];
                let xd = _mm256_loadu_ps(v.d.as_ptr().add(8 * i));
                let xs = _mm256_loadu_ps(v.s.as_ptr().add(8 * i));
                offsets[t] = _mm256_fmadd_ps(mins, xs, offsets[t]);
                _mm256_mul_ps(_mm256_mul_ps(d, xd), sub_scales)
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
            let scales: [__m256; N] = std::array::from_fn(|t| {
                _mm256_mul_ps(d, _mm256_loadu_ps(vs[t].d.as_ptr().add(8 * i)))
            });
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
                    let w =
                        _mm256_sub_epi8(_mm256_or_si256(low, _mm256_and_si256(high, two)), bias);
                    let magnitude = _mm256_abs_epi8(w);
                    let pick = _mm256_loadu_si256(Q6_SCALE_PICK[k].as_ptr().cast());
                    let run_scales = _mm256_shuffle_epi8(half_scales, pick);
                    for (t, v) in vs.iter().enumerate() {
                        let x = load32(v.qs.as_ptr().add(256 * i + 32 * run));
                        let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, w));
                        let p = _mm256_madd_epi16(pairs, run_scales);
                        acc[t] =
                            _mm256_fmadd_ps(lane(scales[t], run), _mm256_cvtepi32_ps(p), acc[t]);
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

    /// AVX-512 kernels (with VNNI): 64 elements of a row (a group of a K-quant block, or two
    /// 32-element blocks) fill one 512-bit register, and `dpbusd` multiplies bytes and sums
    /// them in fours in one step. It takes the weights unsigned, so fixed biases are taken
    /// off through the vector's sums.
    pub mod avx512 {
        use super::super::{GgmlType, QuantizedVector, QBLOCK};
        use super::{hsum, k_block_scales, nibbles, splat_f16};
        use std::arch::x86_64::*;

        pub fn available() -> bool {
            super::available()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        pub unsafe fn dot_quantized<const N: usize>(
            ty: GgmlType,
            row: &[u8],
            vs: [&QuantizedVector; N],
        ) -> [f32; N] {
            match ty {
                GgmlType::Q4K => {
                    dot_k_blocks(row, vs, 144, |b, group| nibble_pair(b.add(16 + 32 * group)))
                }
                GgmlType::Q5K => dot_q5_k(row, vs),
                GgmlType::Q6K => dot_q6_k(row, vs),
                GgmlType::Q4_0 => dot_pairs32(row, vs, 18, 8, false, |b| nibbles(b.add(2))),
                GgmlType::Q4_1 => dot_pairs32(row, vs, 20, 0, true, |b| nibbles(b.add(4))),
                GgmlType::Q5_0 => {
                    dot_pairs32(row, vs, 22, 16, false, |b| fifth_bits(b.add(2), b.add(6)))
                }
                GgmlType::Q5_1 => {
                    dot_pairs32(row, vs, 24, 0, true, |b| fifth_bits(b.add(4), b.add(8)))
                }
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
            let scale = |b: *const u8| {
                _mm_cvtph_ps(_mm_cvtsi32_si128(b.cast::<u16>().read_unaligned().into()))
            };
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
                    let scales =
                        _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_mul_ps(d, xd)));
                    acc[t] = _mm512_fmadd_ps(scales, _mm512_cvtepi32_ps(p), acc[t]);
                    offsets[t] = _mm_fmadd_ps(m, xs, offsets[t]);
                }
            }
            let mut out = [0f32; N];
            for t in 0..N {
                let o = offsets[t];
                out[t] =
                    _mm512_reduce_add_ps(acc[t]) + _mm_cvtss_f32(_mm_add_ss(o, _mm_movehdup_ps(o)));
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
                    let v = vs[t];
                    let xd = _mm256_loadu_ps(v.d.as_ptr().add(8 * i));
                    let xs = _mm256_loadu_ps(v.s.as_ptr().add(8 * i));
                    offsets[t] = _mm256_fmadd_ps(mins, xs, offsets[t]);
                    _mm512_castps256_ps512(_mm256_mul_ps(_mm256_mul_ps(d, xd), sub_scales))
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
                let sixteens =
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(192).cast())));
                for half in 0..2 {
                    // Low nibbles of ql[0..32] and ql[32..64] are runs 0 and 1 of the half,
                    // their high nibbles runs 2 and 3.
                    let ql = _mm512_loadu_si512(b.add(64 * half).cast());
                    let qh =
                        _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(128 + 32 * half).cast()));
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
                            let xq =
                                _mm512_loadu_si512(v.qs.as_ptr().add(256 * i + 32 * run).cast());
                            let p = _mm512_cvtepi32_ps(dot64(w, xq, 32));
                            let scales = _mm512_mul_ps(quant_scales, pair_lanes(runs[t], run / 2));
                            acc[t] = _mm512_fmadd_ps(scales, p, acc[t]);
                        }
                    }
                }
            }
            acc.map(|a| _mm512_reduce_add_ps(a))
        }
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

    /// A vector with a mean away from zero, as real activations have: it exercises the
    /// offset terms and would expose a bias cancelling against sum(x).
    fn random_vector(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0..1.5)).collect()
    }

    /// What `dot_row` multiplies the row with: `x` itself, or its quantized values.
    fn effective(x: &Prepared) -> Vec<f32> {
        match x {
            Prepared::Dense(x) => x.to_vec(),
            Prepared::Quantized(v) => {
                let mut out = vec![0f32; v.len()];
                v.dequantize_range(0, &mut out);
                out
            }
        }
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
            32 => &[32, 64, 96, 256, 576, 896, 4864],
            _ => &[1, 7, 32, 40, 256, 896, 4864],
        }
    }

    /// Every kernel set this CPU runs.
    fn all_kernels() -> Vec<Kernels> {
        let mut all = vec![Kernels::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if simd::available() {
                all.push(Kernels::Avx2);
            }
            if simd::avx512::available() {
                all.push(Kernels::Avx512);
            }
        }
        all
    }

    fn dot_row(kernels: Kernels, ty: GgmlType, row: &[u8], x: &Prepared) -> f32 {
        let mut out = [0.0];
        dot_rows_with(kernels, ty, row, &[x], &mut out);
        out[0]
    }

    /// A vector in a tile of several is multiplied exactly as alone: the same bits, on
    /// every kernel set, for whole tiles and the tokens left over.
    #[test]
    fn a_vector_in_a_tile_gets_what_it_gets_alone() {
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        for kernels in all_kernels() {
            for ty in ALL_TYPES {
                let (n, rows, tokens) = (512, 3, TILE + 3);
                let matrix: Vec<u8> = (0..rows)
                    .flat_map(|_| random_row(ty, n, &mut rng))
                    .collect();
                let xs: Vec<Vec<f32>> = (0..tokens).map(|_| random_vector(n, &mut rng)).collect();
                let prepared: Vec<Prepared> = xs.iter().map(|x| prepare(ty, x)).collect();
                let all: Vec<&Prepared> = prepared.iter().collect();
                let mut together = vec![0.0; tokens * rows];
                dot_rows_with(kernels, ty, &matrix, &all, &mut together);
                for (t, x) in prepared.iter().enumerate() {
                    let mut alone = vec![0.0; rows];
                    dot_rows_with(kernels, ty, &matrix, &[x], &mut alone);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&together[t * rows..(t + 1) * rows]),
                        bits(&alone),
                        "{kernels:?} {ty:?} token {t}"
                    );
                }
            }
        }
    }

    /// Against the row and the vector the kernels actually multiply, they are exact up to
    /// f32 rounding: the integer products are exact and each block is scaled once.
    #[test]
    fn matches_dequantize_for_every_type() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for kernels in all_kernels() {
            for ty in ALL_TYPES {
                for &n in lengths(ty) {
                    for _ in 0..4 {
                        let row = random_row(ty, n, &mut rng);
                        let x = random_vector(n, &mut rng);
                        let prepared = prepare(ty, &x);
                        let (want, magnitude) = reference(ty, &row, &effective(&prepared));
                        let got = dot_row(kernels, ty, &row, &prepared) as f64;
                        // Relative to the terms' magnitudes, as `want` itself may cancel to
                        // near zero; f32 summation stays around 1e-7 of it.
                        assert!(
                            (got - want).abs() <= 1e-6 * magnitude,
                            "{kernels:?} {ty:?} n={n}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_are_taken_in_order() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        for ty in ALL_TYPES {
            let (n, rows) = (512, 5);
            let matrix: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(ty, n, &mut rng))
                .collect();
            let x = random_vector(n, &mut rng);
            let prepared = prepare(ty, &x);
            let mut out = vec![0.0; rows];
            dot_rows(ty, &matrix, &prepared, &mut out);
            for (r, row) in matrix.chunks_exact(ty.row_bytes(n)).enumerate() {
                assert_eq!(out[r], dot_row(Kernels::best(), ty, row, &prepared));
            }
        }
    }

    /// Against the unquantized vector, the error is what quantizing `x` costs: at most half
    /// a step of each block's scale per element, times the weight there.
    #[test]
    fn quantized_vector_error_is_bounded() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        for ty in ALL_TYPES.into_iter().filter(|&ty| !is_dense(ty)) {
            let n = 4864;
            let row = random_row(ty, n, &mut rng);
            let x = random_vector(n, &mut rng);
            let Prepared::Quantized(v) = prepare(ty, &x) else {
                panic!("{ty:?} is quantized");
            };
            let mut w = vec![0f32; n];
            dequantize(ty, &row, &mut w);
            let bound: f64 = w
                .iter()
                .enumerate()
                .map(|(i, w)| w.abs() as f64 * v.d[i / QBLOCK] as f64 / 2.0)
                .sum();
            let (want, magnitude) = reference(ty, &row, &x);
            let got = dot_row(Kernels::best(), ty, &row, &Prepared::Quantized(v)) as f64;
            assert!(
                (got - want).abs() <= bound + 1e-6 * magnitude,
                "{ty:?}: {got} vs {want}, bound {bound}"
            );
        }
    }

    #[test]
    fn quantize_rounds_each_block_to_its_scale() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut x = random_vector(4864, &mut rng);
        // An all-zero block and one with a single large element.
        x[32..64].fill(0.0);
        x[70] = -40.0;
        let v = quantize(&x);
        for (i, (&x, &q)) in x.iter().zip(&v.qs).enumerate() {
            let d = v.d[i / QBLOCK];
            assert!((x - q as f32 * d).abs() <= d * 0.5001, "element {i}");
        }
        assert_eq!(v.qs[70], -127);
        assert!(v.qs[32..64].iter().all(|&q| q == 0) && v.d[1] == 0.0);
        for (b, q) in v.qs.chunks_exact(QBLOCK).enumerate() {
            let sum: i32 = q.iter().map(|&q| q as i32).sum();
            assert_eq!(v.s[b], v.d[b] * sum as f32);
        }
    }

    #[test]
    fn simd_quantize_matches_scalar() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let x = random_vector(4864, &mut rng);
        let v = quantize(&x);
        let mut scalar = QuantizedVector {
            qs: vec![0; x.len()],
            d: vec![0.0; x.len() / QBLOCK],
            s: vec![0.0; x.len() / QBLOCK],
        };
        quantize_scalar(&x, &mut scalar);
        assert_eq!(v.qs, scalar.qs);
        assert_eq!(v.d, scalar.d);
        for (a, b) in v.s.iter().zip(&scalar.s) {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn simd_matches_scalar() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        for kernels in all_kernels() {
            for ty in ALL_TYPES {
                for &n in lengths(ty) {
                    let row = random_row(ty, n, &mut rng);
                    let x = random_vector(n, &mut rng);
                    let prepared = prepare(ty, &x);
                    let (_, magnitude) = reference(ty, &row, &effective(&prepared));
                    let scalar = dot_row(Kernels::Portable, ty, &row, &prepared);
                    let fast = dot_row(kernels, ty, &row, &prepared);
                    assert!(
                        (fast - scalar).abs() as f64 <= 1e-6 * magnitude,
                        "{kernels:?} {ty:?} n={n}: {fast} vs {scalar}"
                    );
                }
            }
        }
    }
}
