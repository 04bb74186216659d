//! The numeric kernels of the forward pass: products with the quantized weights, RMS norm,
//! rotary embeddings and activations. Everything accumulates in f32.
//!
//! The weights stay as the file stores them. Each token's activations are quantized to
//! 8 bits on their own and meet the weight rows through integer dot products (`qdot`), a
//! tile of tokens at a time in prefill and one token in decoding, with the same arithmetic
//! for each: what a token computes never depends on the tokens computed with it.

use half::f16;

use crate::gguf::TensorData;
use crate::qdot::{dot_rows, dot_rows_tokens, prepare, Prepared};
use crate::quant::{dequantize, GgmlType};
use rayon::prelude::*;

/// A weight matrix of `rows x cols`, one row per output feature, held exactly as the GGUF
/// file stores it and read from the mapped file in place: the weights take no memory
/// beyond the file's pages. Every product reads the quantized rows directly, whatever the
/// number of tokens: one arithmetic for every token.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    ty: GgmlType,
    quantized: WeightBytes,
}

/// Where a matrix's bytes live.
enum WeightBytes {
    Mapped(TensorData),
    Owned(Vec<u8>),
}

impl std::ops::Deref for WeightBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            WeightBytes::Mapped(data) => data,
            WeightBytes::Owned(bytes) => bytes,
        }
    }
}

impl Matrix {
    /// A matrix over a tensor of the mapped file (`rows` rows of `cols` elements of `ty`).
    pub fn mapped(rows: usize, cols: usize, ty: GgmlType, data: TensorData) -> Self {
        assert_eq!(data.len(), rows * ty.row_bytes(cols));
        Matrix {
            rows,
            cols,
            ty,
            quantized: WeightBytes::Mapped(data),
        }
    }

    /// A matrix of f32 values held in memory.
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Self {
        assert_eq!(values.len(), rows * cols);
        Matrix {
            rows,
            cols,
            ty: GgmlType::F32,
            quantized: WeightBytes::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        }
    }

    fn quantized_row(&self, r: usize) -> &[u8] {
        let len = self.ty.row_bytes(self.cols);
        &self.quantized[r * len..(r + 1) * len]
    }

    /// Row `r` exactly as stored, widened to f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        dequantize(self.ty, self.quantized_row(r), out);
    }

    pub fn bytes(&self) -> usize {
        self.quantized.len()
    }
}

/// Rows handed to one thread in a product: their bytes stay in the core's cache while
/// every token of the batch meets them.
const ROWS_PER_TASK: usize = 32;

/// Tokens that meet a task's rows together: their quantized activations stay in the
/// core's first-level cache while the rows are read.
const TOKENS_PER_PASS: usize = 8;

/// `out[n][r] = sum_k x[n][k] * w[r][k]` for `n` tokens: `x` is `n x w.cols`, `out` is
/// `n x w.rows`, both row-major. Each token's row is quantized on its own and each output
/// is one call of the same dot-product kernel, so a token's result does not depend on the
/// tokens computed with it.
pub fn matmul(x: &[f32], w: &Matrix, out: &mut [f32]) {
    let n = x.len() / w.cols;
    assert_eq!(x.len(), n * w.cols);
    assert_eq!(out.len(), n * w.rows);
    if n == 1 {
        return matvec(x, w, out);
    }
    if w.cols == 0 {
        out.fill(0.0);
        return;
    }
    let tokens: Vec<Prepared> = x.par_chunks(w.cols).map(|x| prepare(w.ty, x)).collect();
    let task_bytes = ROWS_PER_TASK * w.ty.row_bytes(w.cols);
    let blocks: Vec<Vec<f32>> = w
        .quantized
        .par_chunks(task_bytes)
        .map(|rows| {
            let count = rows.len() / w.ty.row_bytes(w.cols);
            let mut block = vec![0f32; n * count];
            for (xs, out) in tokens
                .chunks(TOKENS_PER_PASS)
                .zip(block.chunks_mut(TOKENS_PER_PASS * count))
            {
                dot_rows_tokens(w.ty, rows, xs, out);
            }
            block
        })
        .collect();
    for (b, block) in blocks.iter().enumerate() {
        let count = block.len() / n;
        for (t, values) in block.chunks_exact(count).enumerate() {
            let at = t * w.rows + b * ROWS_PER_TASK;
            out[at..at + count].copy_from_slice(values);
        }
    }
}

/// `out[r] = w[r] . x` for every row, read from the quantized rows, threads splitting them.
pub fn matvec(x: &[f32], w: &Matrix, out: &mut [f32]) {
    assert_eq!(x.len(), w.cols);
    assert_eq!(out.len(), w.rows);
    if w.cols == 0 {
        out.fill(0.0);
        return;
    }
    let x = prepare(w.ty, x);
    let task_bytes = ROWS_PER_TASK * w.ty.row_bytes(w.cols);
    out.par_chunks_mut(ROWS_PER_TASK)
        .zip(w.quantized.par_chunks(task_bytes))
        .for_each(|(out, rows)| dot_rows(w.ty, rows, &x, out));
}

/// Dot product of f16 values with f32 values, accumulated in f32.
pub fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: `available` checked the CPU features the function is compiled for.
        return unsafe { simd::dot_f16(a, b) };
    }
    a.iter().zip(b).map(|(a, b)| a.to_f32() * b).sum()
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: as in `dot_f16`.
        return unsafe { simd::dot_f32(a, b) };
    }
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use half::f16;
    use std::arch::x86_64::*;

    /// Whether this CPU runs the AVX2 kernels here and in `qdot`.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// Whether it also has the 512-bit vectors of AVX-512F and VL.
    pub fn avx512_available() -> bool {
        available() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let off = i + 8 * j;
                *acc = _mm256_fmadd_ps(load_f16(pa.add(off)), _mm256_loadu_ps(pb.add(off)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(load_f16(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(sum);
        for j in i..n {
            total += a[j].to_f32() * b[j];
        }
        total
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let off = i + 8 * j;
                *acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(off)),
                    _mm256_loadu_ps(pb.add(off)),
                    *acc,
                );
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(sum);
        for j in i..n {
            total += a[j] * b[j];
        }
        total
    }
}

/// RMS normalisation of each `weight.len()`-wide row of `x`, in place.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let mean_square = dot(row, row) / row.len() as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v *= scale * w;
        }
    }
}

/// How a model pairs the dimensions it rotates: GGUF `llama` files rotate adjacent pairs
/// (their converter permuted Q and K to make it so), `qwen2` rotates dimension `i` with
/// `i + d/2` (the "NeoX" layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Adjacent,
    Halves,
}

/// Rotary position embeddings with the model's base frequency.
pub struct Rope {
    pub style: RopeStyle,
    head_dim: usize,
    inv_freq: Vec<f32>,
}

/// cos and sin of `position * theta_i` for a run of positions, computed once per forward
/// call and shared by every layer and head.
pub struct RopeAngles {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(style: RopeStyle, head_dim: usize, base: f32) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        Rope {
            style,
            head_dim,
            inv_freq,
        }
    }

    pub fn angles(&self, positions: impl Iterator<Item = usize>) -> RopeAngles {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in positions {
            for &freq in &self.inv_freq {
                let (s, c) = (p as f32 * freq).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        RopeAngles { cos, sin }
    }

    /// Rotate every head in `x` (a row of `heads * head_dim` values) by the angles of the
    /// `t`-th position in `angles`.
    pub fn apply(&self, x: &mut [f32], angles: &RopeAngles, t: usize) {
        let half = self.head_dim / 2;
        let cos = &angles.cos[t * half..(t + 1) * half];
        let sin = &angles.sin[t * half..(t + 1) * half];
        for head in x.chunks_exact_mut(self.head_dim) {
            for i in 0..half {
                let (a, b) = match self.style {
                    RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                    RopeStyle::Halves => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// `gate = silu(gate) * up`, elementwise.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn a_token_in_a_batch_gets_what_it_gets_alone() {
        let (rows, cols, n) = (70, 96, 19);
        let w = Matrix::from_f32(rows, cols, &pseudo_random(rows * cols, 1));
        let x = pseudo_random(n * cols, 2);
        let mut batched = vec![0.0; n * rows];
        matmul(&x, &w, &mut batched);
        for t in 0..n {
            let mut single = vec![0.0; rows];
            matmul(&x[t * cols..(t + 1) * cols], &w, &mut single);
            assert_eq!(single, batched[t * rows..(t + 1) * rows], "token {t}");
        }
    }

    #[test]
    fn simd_dot_matches_scalar_on_odd_lengths() {
        for len in [0, 1, 7, 8, 31, 33, 100] {
            let a = pseudo_random(len, 3);
            let b = pseudo_random(len, 4);
            let a16: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
            let scalar: f32 = a16.iter().zip(&b).map(|(a, b)| a.to_f32() * b).sum();
            assert!((dot_f16(&a16, &b) - scalar).abs() < 1e-5, "len {len}");
        }
    }

    #[test]
    fn rope_styles_rotate_different_pairs() {
        let rope = Rope::new(RopeStyle::Adjacent, 4, 10000.0);
        let mut adjacent = vec![1.0, 0.0, 0.0, 0.0];
        rope.apply(&mut adjacent, &rope.angles(1..2), 0);
        assert!((adjacent[1] - 1f32.sin()).abs() < 1e-6 && adjacent[2] == 0.0);
        let rope = Rope::new(RopeStyle::Halves, 4, 10000.0);
        let mut halves = vec![1.0, 0.0, 0.0, 0.0];
        rope.apply(&mut halves, &rope.angles(1..2), 0);
        assert!((halves[2] - 1f32.sin()).abs() < 1e-6 && halves[1] == 0.0);
    }
}
